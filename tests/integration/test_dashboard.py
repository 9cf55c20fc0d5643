"""`tokenq dashboard` in a real headless Chromium (Debian's): it draws the jobs a real worker
ran, updates without a reload when more finish, and the test saves a screenshot.

Without Chromium the test is skipped on a developer's machine and fails in CI (CI=true), where
.ci/run installs it; a Chromium that does not start always fails the test."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.browser import chromium, open_browser
from tests.conftest import ConfigFactory
from tests.helpers import FAST_BATCHES, add, eventually, sim_call
from tests.integration.conftest import RunWorker
from worker.contract import Keys, UsageEvent, to_fields
from worker.rollups import Rollups, settings_of

LIVE = [("summarize", "acme-live", "normal"), ("summarize", "globex", "normal"),
        ("support_faq", "acme-live", "normal"), ("support_faq", "initech", "normal"),
        ("classify_ticket", "acme-live", "high"), ("nightly_enrich", "globex", "low")]  # fmt: skip


def history(now_ms: int, rng: random.Random) -> list[dict[str, str]]:
    """Outcomes of the 23 hours before this one (written to the rollups directly), so that
    the charts have a day to show."""
    haiku, opus = "claude-haiku-5-5", "claude-opus-5-5"
    features = {"summarize": (haiku, 0.0009), "support_faq": (haiku, 0.0002),
                "classify_ticket": (haiku, 0.0003), "code_review": (opus, 0.03)}  # fmt: skip
    out = []
    for back in range(23, 0, -1):
        for _ in range(rng.randint(20, 60)):
            feature = rng.choice(list(features))
            model, price = features[feature]
            cost = price * rng.uniform(0.5, 1.5)
            out.append(to_fields(UsageEvent(
                ts_ms=now_ms - back * 3_600_000, job_id="h", feature=feature,
                tenant=rng.choice(("acme", "globex", "initech", "umbrella", "hooli")),
                priority="normal", model=model, input_tokens=rng.randint(200, 3000),
                output_tokens=rng.randint(20, 400), cost_usd=cost,
                baseline_cost_usd=cost * rng.uniform(3, 12), latency_ms=rng.randint(300, 4000),
                queue_ms=rng.randint(5, 2000),
                cache_read_input_tokens=rng.choice((0, 0, 1500)),
                response_cache=rng.choice(("miss", "miss", "hit")),
            )))  # fmt: skip
    return out


def request(text: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": text}]})


async def test_the_dashboard_shows_the_jobs_and_updates_live(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    browser = chromium()
    if browser is None:
        message = "Chromium is not installed (apt-get install chromium; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    sim_call(sim, "config", {"batch_seconds": 0.2})
    cfg, path = make_config(**FAST_BATCHES, **{"features.summarize.daily_usd": 2.0})
    rollups = Rollups(keys, settings_of(cfg))
    async with redis.pipeline(transaction=True) as tx:
        rollups.push_into(tx, history(int(time.time() * 1000), random.Random(4)))
        await tx.execute()

    async with run_worker(cfg):
        for n, (feature, tenant, priority) in enumerate(LIVE):
            job = {"feature": feature, "tenant": tenant, "request": request(f"{feature} {n}")}
            await add(redis, keys.jobs(priority), job)
        await eventually(lambda: _count(redis, keys.usage, len(LIVE)), what="the live jobs")

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "--config", str(path), "dashboard", "--port", "0",
            "--refresh", "0.5", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
            assert line.startswith("tokenq dashboard: http://"), line
            async with open_browser(browser) as page:
                await page.goto(line.rsplit(" ", 1)[-1])

                async def shows(selector: str) -> bool:
                    found = await page.evaluate(f"document.querySelector({selector!r}) !== null")
                    return bool(found)

                for selector in ('#spend rect[data-feature="summarize"]',
                                 '#spend rect[data-feature="code_review"]',
                                 '#tenants rect[data-tenant="acme-live"]',
                                 '#caches rect[data-cache="response"]',
                                 '#latency polyline[data-series="latency_p95_ms"]'):  # fmt: skip
                    await eventually(lambda s=selector: shows(s), what=selector, timeout_s=30)  # type: ignore[misc]
                text = str(await page.evaluate("document.body.innerText"))
                assert "summarize.daily_usd" in text and "model:claude-haiku-5-5" in text
                before = int(await page.evaluate("document.body.dataset.jobs"))
                assert before >= len(LIVE)

                job = {"feature": "summarize", "tenant": "late-tenant", "request": request("late")}
                await add(redis, keys.jobs("normal"), job)  # a new outcome, no reload
                await eventually(lambda: shows('#tenants rect[data-tenant="late-tenant"]'),
                                 what="the late job on the page", timeout_s=30)  # fmt: skip
                assert int(await page.evaluate("document.body.dataset.jobs")) == before + 1

                shot = Path(os.environ.get("TOKENQ_SCREENSHOT_DIR") or tmp_path) / "dashboard.png"
                await page.screenshot(shot)
                assert shot.stat().st_size > 20_000
                with capsys.disabled():
                    print(f"\ndashboard screenshot: {shot}")
        finally:
            proc.terminate()
            await proc.wait()


async def _count(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.xlen(key)) >= n
