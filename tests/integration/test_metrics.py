"""`tokenq metrics` against a real Valkey, the simulator and a real worker: the exposition
parses, its counters are the usage stream's sums, its gauges show the queues, limits, caps,
breakers and batches; promtool finds nothing to complain about where it is installed."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import ConfigFactory
from tests.helpers import FAST_BATCHES, add, entries, eventually, sim_call
from tests.integration.conftest import RunWorker
from worker.cells import NANO, hour_label, nano_usd
from worker.contract import Keys, UsageEvent, to_fields
from worker.metrics import Counters, scrape
from worker.report import Query, query
from worker.rollups import Rollups, settings_of


def request(text: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": text}]})


def samples(text: str) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def total(found: dict[str, list[Sample]], name: str, **labels: str) -> float:
    return sum(s.value for s in found.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip


async def test_metrics_are_the_usage_streams_sums_and_the_fleets_state(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, tmp_path: Path,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.2})
    cfg, path = make_config(**FAST_BATCHES, **{"features.summarize.daily_usd": 5.0})
    jobs = [
        ("normal", "summarize", "acme"), ("normal", "summarize", "globex"),
        ("high", "classify_ticket", "acme"), ("low", "nightly_enrich", "acme"),
        ("normal", "support_faq", "initech"), ("normal", "no_such_feature", "acme"),
    ]  # fmt: skip
    async with run_worker(cfg):
        for priority, feature, tenant in jobs:
            job = {"feature": feature, "tenant": tenant, "request": request(feature)}
            await add(redis, keys.jobs(priority), job)
        await eventually(lambda: _count(redis, keys.usage, len(jobs)), what="every outcome")
    events = [f for _, f in await entries(redis, keys.usage)]
    for n in range(3):  # waiting jobs, with no worker running
        await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": request(f"{n}")})

    text = (await scrape(redis, cfg)).decode()
    found = samples(text)
    assert total(found, "tokenq_jobs_total") == len(jobs)
    # The unknown feature, and classify_ticket: the simulator's answer to "classify_ticket"
    # fails its check, which ends the job check_failed (an error, with the answer) since the
    # job-run rework.
    assert total(found, "tokenq_jobs_total", status="error") == 2
    assert total(found, "tokenq_jobs_total", mode="batch", feature="nightly_enrich") == 1
    assert total(found, "tokenq_jobs_total", feature="(unknown feature)") == 1
    cost = sum(nano_usd(e["cost_usd"]) for e in events)
    assert round(total(found, "tokenq_cost_usd_total") * NANO) == cost
    tokens = sum(int(e["output_tokens"]) for e in events)
    assert total(found, "tokenq_tokens_total", kind="output") == tokens
    assert total(found, "tokenq_response_cache_total", result="miss") >= 1
    assert total(found, "tokenq_api_latency_seconds_count") == sum(
        1 for e in events if e["mode"] == "realtime" and e["status"] == "ok"
    )
    assert total(found, "tokenq_queue_depth", priority="normal") == 3
    assert total(found, "tokenq_queue_oldest_age_seconds", priority="normal") >= 0
    assert total(found, "tokenq_queue_pending", priority="normal") == 0
    assert total(found, "tokenq_queue_consumers", priority="normal", state="active") == 0
    assert total(found, "tokenq_ratelimit_limit_per_minute", model="claude-haiku-5-5",
                 kind="requests") == cfg.models["claude-haiku-5-5"].limits.rpm  # type: ignore[union-attr]  # fmt: skip
    assert found["tokenq_ratelimit_headroom_ratio"]
    assert total(found, "tokenq_budget_cap_usd", cap="features.summarize.daily_usd") == 5.0
    spent = total(found, "tokenq_budget_spent_usd", cap="features.summarize.daily_usd")
    assert spent > 0
    assert total(found, "tokenq_breaker_state", state="closed") >= 1
    assert total(found, "tokenq_batches", state="done") == 1
    assert "tenant" not in {k for s in found["tokenq_jobs_total"] for k in s.labels}

    if shutil.which("promtool"):
        promtool = await asyncio.create_subprocess_exec(
            "promtool", "check", "metrics", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        said, _ = await promtool.communicate(text.encode())
        assert promtool.returncode == 0, said.decode()

    served = await _served(path)
    assert total(samples(served), "tokenq_jobs_total") == len(jobs)


async def _served(path: Path) -> str:
    """GET /metrics from a `tokenq metrics` process on a free port."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "--config", str(path), "metrics", "--port", "0",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line.startswith("tokenq metrics: http://"), line
        url = line.rsplit(" ", 1)[-1]
        return await asyncio.to_thread(_get, url)
    finally:
        proc.terminate()
        await proc.wait()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        return str(reply.read().decode())


async def test_tenant_labels_only_when_configured(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config(**{"metrics.tenant_labels": True})
    async with run_worker(cfg):
        for tenant in ("acme", "globex", "acme"):
            job = {"feature": "summarize", "tenant": tenant, "request": request("hi")}
            await add(redis, keys.jobs("normal"), job)
        await eventually(lambda: _count(redis, keys.usage, 3), what="3 outcomes")
    found = samples((await scrape(redis, cfg)).decode())
    assert total(found, "tokenq_jobs_total", tenant="acme") == 2
    assert total(found, "tokenq_jobs_total", tenant="globex") == 1


async def _count(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.xlen(key)) >= n


GRAFANA = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "tokenq.json"


async def test_the_grafana_board_queries_only_exported_metrics(
    redis: aioredis.Redis, make_config: ConfigFactory, tmp_path: Path
) -> None:
    cfg, _ = make_config()
    text = (await scrape(redis, cfg)).decode()  # an empty fleet: every family, no samples
    exported = {f.name for f in text_string_to_metric_families(text)}
    board = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    used = {re.sub(r"_(total|bucket|count|sum)$", "", name)
            for e in exprs for name in re.findall(r"tokenq_[a-z_]+", e)}  # fmt: skip
    assert used <= exported, used - exported
    assert exported - used <= {"tokenq_queue_consumers", "tokenq_ratelimit_limit_per_minute",
                               "tokenq_ratelimit_usable_per_minute", "tokenq_ratelimit_in_use",
                               "tokenq_ratelimit_paused_seconds"}, exported - used  # fmt: skip
    if shutil.which("promtool"):  # the queries parse as PromQL
        concrete = [e.replace("$__rate_interval", "5m").replace("$__range", "1h")
                    .replace("$feature", ".*") for e in exprs]  # fmt: skip
        rules = {"groups": [{"name": "board", "rules": [
            {"record": f"board:q{n}", "expr": e} for n, e in enumerate(concrete)]}]}  # fmt: skip
        path = tmp_path / "rules.json"  # YAML is a superset of JSON
        path.write_text(json.dumps(rules))
        promtool = await asyncio.create_subprocess_exec(
            "promtool", "check", "rules", str(path), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        said, _ = await promtool.communicate()
        assert promtool.returncode == 0, said.decode()


async def test_counters_count_each_outcome_once_whoever_compacts_its_hour(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    cfg, _ = make_config()
    rollups = Rollups(keys, settings_of(cfg))
    now = int(time.time() * 1000)
    hour = now // 3_600_000
    events = []
    for back in (30, 5, 0):  # two finished hours and the current one
        events += [to_fields(UsageEvent(
            ts_ms=(hour - back) * 3_600_000 + 1000 + n, job_id=f"j{back}-{n}",
            feature="summarize", tenant="acme", priority="normal", model="claude-haiku-5-5",
            cost_usd=0.001 * (n + 1), latency_ms=900,
        )) for n in range(4)]  # fmt: skip
    async with redis.pipeline(transaction=True) as tx:
        rollups.push_into(tx, events)
        await tx.execute()
    cost = sum(nano_usd(e["cost_usd"]) for e in events)

    async def counted(counters: Counters) -> tuple[float, float]:
        found = samples((await scrape(redis, cfg, counters)).decode())
        return total(found, "tokenq_jobs_total"), total(found, "tokenq_cost_usd_total")

    exporter = Counters(rollups)
    assert await counted(exporter) == (12, cost / NANO)  # three live hours
    await rollups.fold(redis, now)  # a worker's duty compacts the two finished hours
    assert not await redis.exists(keys.rollup_index(hour_label(hour - 30)))
    assert not await redis.exists(keys.rollup_index(hour_label(hour - 5)))
    assert await redis.exists(keys.rollup_index(hour_label(hour)))
    assert await counted(exporter) == (12, cost / NANO)
    q = Query(hour - 40, hour + 1, ("feature",))
    await query(redis, rollups, q, now_ms=now)  # another reader
    assert await counted(Counters(rollups)) == (12, cost / NANO)  # a restarted exporter
    async with redis.pipeline(transaction=True) as tx:  # one more, in the current hour
        rollups.push_into(tx, [{**events[-1], "job_id": "late"}])
        await tx.execute()
    assert await counted(exporter) == (13, (cost + nano_usd(events[-1]["cost_usd"])) / NANO)
