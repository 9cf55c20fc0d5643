"""`tokenq reconcile` against the simulator's Admin API reports (real Valkey, the simulator,
the SDK): tokenq's own figures agree with what the provider billed, and a planted difference
is found, explained and fails the run."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from decimal import Decimal

import anthropic
import pytest
import redis.asyncio as aioredis

from producers import Producer
from tests.conftest import ConfigFactory
from tests.helpers import FAST_BATCHES, sim_call
from tests.integration.conftest import RunWorker
from worker.cli import main
from worker.contract import Keys

HELLO = {"messages": [{"role": "user", "content": "Summarise: the cat sat on the mat."}]}


def tokenq(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`tokenq ARGS` in this process (run in a thread: it has an event loop of its own):
    (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


async def run_jobs(redis: aioredis.Redis, keys: Keys, cfg_run: RunWorker, cfg: object) -> None:
    producer = Producer(redis, keys.prefix)
    # low: a Message Batch at half price, billed apart by the provider (service tier batch)
    jobs = [("summarize", "normal"), ("code_review", "normal"), ("nightly_enrich", "low")]
    async with cfg_run(cfg):
        ids = [
            await producer.submit(f, {**HELLO, "system": f"Job {n}."}, priority=p)
            for n, (f, p) in enumerate(jobs * 3)
        ]
        for job_id in ids:
            assert (await producer.result(job_id, timeout_s=30)).status == "ok"


async def test_reconcile_agrees_with_the_providers_report_and_exits_0(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    cfg, path = make_config(**FAST_BATCHES)
    await run_jobs(redis, keys, run_worker, cfg)
    code, out, _ = await asyncio.to_thread(
        tokenq, capsys, "--config", str(path), "reconcile", "--json"
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0, out
    assert {r["model"] for r in rows} == {"claude-haiku-5-5", "claude-opus-5-5"}
    billed = Decimal(str(sim_call(sim, "ledger")["total_cost_usd"]))
    ours = sum(Decimal(r["tokenq"]["cost_usd"]) for r in rows)
    assert abs(ours - billed) < Decimal("1e-9")
    for r in rows:
        assert r["tokenq"] == r["provider"] and not r["over"] and r["causes"] == []
    [haiku] = [r for r in rows if r["model"] == "claude-haiku-5-5"]
    assert Decimal(haiku["provider"]["batch_cost_usd"]) > 0


async def test_reconcile_finds_a_planted_difference_explains_it_and_exits_1(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, client: anthropic.AsyncAnthropic, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    cfg, path = make_config(**FAST_BATCHES)
    await run_jobs(redis, keys, run_worker, cfg)
    # Another application on the same organization: calls tokenq never saw.
    for n in range(3):
        await client.messages.create(
            model="claude-opus-5-5", max_tokens=200,
            messages=[{"role": "user", "content": f"Another app's question {n} " * 20}],
        )  # fmt: skip
    today = dt.datetime.now(dt.UTC).date().isoformat()
    code, out, _ = await asyncio.to_thread(
        tokenq, capsys, "--config", str(path), "reconcile", "--from", today,
        "--max-diff-usd", "0.001",
    )  # fmt: skip
    assert code == 1, out
    [opus] = [line for line in out.splitlines() if "claude-opus-5-5" in line and "OVER" in line]
    assert opus.startswith(today)
    assert "likely: the provider billed calls tokenq has no record of: other applications" in out
    assert "tokens, tokenq less provider: input -" in out
    [haiku] = [line for line in out.splitlines() if "claude-haiku-5-5" in line]
    assert "OVER" not in haiku and "$0.00 (0.0%)" in haiku
    assert "1 of 2 day-and-model rows over the thresholds (more than $0.001 and more" in out
    # Loose enough thresholds let it pass.
    code, _, _ = await asyncio.to_thread(
        tokenq, capsys, "--config", str(path), "reconcile", "--max-diff-usd", "1"
    )
    assert code == 0


async def test_reconcile_says_when_the_admin_api_cannot_answer(
    make_config: ConfigFactory, capsys: pytest.CaptureFixture[str], sim: str
) -> None:
    _, path = make_config()
    code, _, err = await asyncio.to_thread(
        tokenq, capsys, "--config", str(path), "reconcile", "--admin-url", f"{sim}/nowhere"
    )
    assert code == 2
    assert "/nowhere/v1/organizations/usage_report/messages answered 404" in err
