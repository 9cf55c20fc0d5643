"""Rollups and `tokenq report` against a real Valkey, the simulator and real workers: the
report's figures are the usage stream's, added up."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from tests.conftest import ConfigFactory
from tests.helpers import FAST_BATCHES, add, entries, eventually, run, sim_call
from tests.integration.conftest import RunWorker
from worker.cells import BOUNDS_MS, INDEX, NANO, bucket, nano_usd
from worker.config import Config
from worker.contract import Keys
from worker.periods import read_hours
from worker.report import Query, display, percentiles, query
from worker.rollups import Rollups, settings_of

SYSTEM = "You are a careful assistant for a ticketing product. " * 60  # over 512 tokens


def request(text: str, system: str | None = None) -> str:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    if system:
        body["system"] = system
    return json.dumps(body)


JOBS: list[tuple[str, dict[str, str]]] = [
    *[("normal", {"feature": "summarize", "tenant": t, "request": request(f"Summarise {n}.")})
      for n, t in enumerate(["acme", "acme", "globex", "initech", "globex", "acme"])],
    *[("normal", {"feature": "support_faq", "tenant": t, "request": request("How do I log in?")})
      for t in ["acme", "globex", "initech", "acme", "umbrella"]],
    *[("high", {"feature": "classify_ticket", "tenant": "acme",
                "request": request(f"Ticket {n}: printer on fire", SYSTEM)}) for n in range(4)],
    *[("low", {"feature": "nightly_enrich", "tenant": "globex", "request": request(f"Row {n}")})
      for n in range(4)],
    ("normal", {"feature": "no_such_feature", "tenant": "acme", "request": request("x")}),
    ("high", {"feature": "summarize", "tenant": "globex"}),  # no request: malformed
    ("normal", {"feature": "summarize", "request": request("Summarise without a tenant.")}),
]  # fmt: skip


async def run_jobs(
    redis: aioredis.Redis, keys: Keys, cfg: Config, run_worker: RunWorker
) -> list[dict[str, str]]:
    """Run JOBS (the FAQ ones one after another, so that later ones hit the response cache);
    the usage events' fields."""
    async with run_worker(cfg):
        for n, (priority, fields) in enumerate(JOBS):
            await add(redis, keys.jobs(priority), {**fields, "id": f"job-{n}"})
            if fields["feature"] == "support_faq":
                result = keys.result(f"job-{n}")
                await eventually(lambda: redis.exists(result), what="the FAQ answer")  # noqa: B023
        await eventually(lambda: _count(redis, keys.usage, len(JOBS)), what="every outcome")
    return [f for _, f in await entries(redis, keys.usage)]


async def _count(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.xlen(key)) >= n


def expected(events: list[dict[str, str]], key: Callable[[dict[str, str]], str]) -> dict[str, Any]:
    """The report's figures computed from usage events, per key(event)."""
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        r = out.setdefault(key(e), {"jobs": 0, "ok": 0, "errors": 0, "tokens": 0, "cost": 0,
                                    "base": 0, "batch": 0, "hits": 0})  # fmt: skip
        r["jobs"] += 1
        r["ok" if e["status"] == "ok" else "errors"] += 1
        r["tokens"] += sum(int(e[k]) for k in ("input_tokens", "output_tokens",
                           "cache_creation_input_tokens", "cache_read_input_tokens"))  # fmt: skip
        r["cost"] += nano_usd(e["cost_usd"])
        r["base"] += nano_usd(e["baseline_cost_usd"])
        r["batch"] += e["mode"] == "batch"
        r["hits"] += e["response_cache"] in ("hit", "joined")
    return out


def figures(row: dict[str, Any]) -> dict[str, Any]:
    hit_rate = row["response_cache_hit_rate"]
    asked = None if hit_rate is None else hit_rate
    return {
        "jobs": row["jobs"], "ok": row["ok"], "errors": row["errors"], "tokens": row["tokens"],
        "cost": round(row["cost_usd"] * NANO), "base": round(row["baseline_usd"] * NANO),
        "batch": round(row["batch_share"] * row["jobs"]), "hit_rate": asked,
    }  # fmt: skip


async def test_report_figures_are_the_usage_streams_sums(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.2})
    cfg, path = make_config(**FAST_BATCHES)
    events = await run_jobs(redis, keys, cfg, run_worker)
    assert {e["mode"] for e in events} == {"realtime", "cache", "batch"}
    assert {e["status"] for e in events} == {"ok", "error"}
    assert any(int(e["cache_read_input_tokens"]) for e in events), "no prompt-cache read"
    now = int(time.time() * 1000)
    hours = Query(now // 3_600_000 - 1, now // 3_600_000 + 1)

    async def report(**kw: Any) -> dict[str, dict[str, Any]]:
        q = Query(hours.start_hour, hours.end_hour, **kw)
        answer = await query(redis, Rollups(keys, settings_of(cfg)), q, now_ms=now)
        return {"/".join(str(r[k]) for k in q.by): figures(r) for r in answer.rows}

    def compare(got: dict[str, dict[str, Any]], among: list[dict[str, str]],
                key_of: Callable[[dict[str, str]], str]) -> None:  # fmt: skip
        want = expected(among, key_of)
        assert sorted(got) == sorted(want)
        for name, w in want.items():
            g = got[name]
            assert {k: g[k] for k in w if k != "hits"} == {k: v for k, v in w.items()
                                                           if k != "hits"}, name  # fmt: skip
            asked = sum(1 for e in among if key_of(e) == name and e["status"] == "ok"
                        and e["response_cache"] in ("hit", "joined", "miss"))  # fmt: skip
            assert g["hit_rate"] == (w["hits"] / asked if asked else None), name

    def feature(e: dict[str, str]) -> str:
        return display(e["feature"] if e["feature"] in cfg.features else "\x1eunknown")

    def tenant(e: dict[str, str]) -> str:
        return display(e["tenant"])

    compare(await report(by=("feature",)), events, feature)
    compare(await report(by=("tenant",)), events, tenant)
    compare(await report(by=("priority",)), events, lambda e: e["priority"])
    compare(await report(by=("feature", "tenant")), events, lambda e: f"{feature(e)}/{tenant(e)}")
    only = await report(by=("tenant",), feature="summarize")
    compare(only, [e for e in events if e["feature"] == "summarize"], tenant)
    acme = await report(by=("feature",), tenant="acme")
    compare(acme, [e for e in events if e["tenant"] == "acme"], feature)

    code, out, err = await run(sys.executable, "-m", "worker", "--config", str(path), "report",
                               "--since", "2h", "--by", "feature", "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["total"]["jobs"] == len(JOBS)
    assert round(doc["total"]["cost_usd"] * NANO) == sum(nano_usd(e["cost_usd"]) for e in events)
    code, out, err = await run(sys.executable, "-m", "worker", "--config", str(path), "report",
                               "--since", "2h", "--by", "tenant,priority")  # fmt: skip
    assert code == 0, err
    assert "acme" in out and "total" in out and "saved%" in out, out


async def test_percentiles_from_the_rollups_are_within_a_bucket_of_the_exact_ones(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"latency_ms": 30})
    cfg, _ = make_config()
    async with run_worker(cfg, concurrency=16):
        for n in range(60):
            await add(redis, keys.jobs("normal"), {"feature": "summarize", "tenant": "acme",
                                                   "request": request(f"Doc {n}.")})  # fmt: skip
        await eventually(lambda: _count(redis, keys.usage, 60), what="60 outcomes")
    events = [f for _, f in await entries(redis, keys.usage)]
    now = int(time.time() * 1000)
    q = Query(now // 3_600_000 - 1, now // 3_600_000 + 1)
    answer = await query(redis, Rollups(keys, settings_of(cfg)), q, now_ms=now)
    latencies = sorted(int(e["latency_ms"]) for e in events)
    waits = sorted(int(e["queue_ms"]) for e in events)
    for got, exact in [
        (answer.total["latency_p50_ms"], latencies[len(latencies) // 2 - 1]),
        (answer.total["latency_p95_ms"], latencies[int(len(latencies) * 0.95) - 1]),
        (answer.total["queue_wait_p95_ms"], waits[int(len(waits) * 0.95) - 1]),
    ]:
        assert abs(bucket(round(got)) - bucket(exact)) <= 1, (got, exact, BOUNDS_MS)


def test_percentile_of_merged_histograms_is_within_one_bucket() -> None:
    import random

    rng = random.Random(7)
    for _ in range(200):
        values = [int(rng.lognormvariate(6, 1.5)) for _ in range(rng.randint(1, 400))]
        parts = [values[: len(values) // 3], values[len(values) // 3 :]]
        merged = [0] * (len(BOUNDS_MS) + 1)
        for part in parts:  # two cells' histograms added, as the rollups do
            for v in part:
                merged[bucket(v)] += 1
        ordered = sorted(values)
        for q in (0.5, 0.95, 0.99):
            exact = ordered[max(0, -(-len(ordered) * q // 1) - 1).__int__()]
            got = percentiles(np.array([merged]), q)[0]
            assert got is not None and abs(bucket(round(got)) - bucket(exact)) <= 1


async def test_foreign_entries_in_the_rollup_keys_are_skipped(
    redis: aioredis.Redis, keys: Keys
) -> None:
    hour = int(time.time()) // 3600
    label = time.strftime("%Y%m%d%H", time.gmtime(hour * 3600))
    index = {"Kabc": "not a cell", "Kxyz": "a\x1fb\x1fc\x1fd", "Kstr": "e\x1ff\x1fg\x1fh",
             "junk": "1"}  # fmt: skip
    await redis.hset(keys.rollup_index(label), mapping=index)  # type: ignore[arg-type]
    await redis.hset(
        keys.rollup_cell(label, "xyz"),
        mapping={"n": "2", "usd": "oops", "zz": "1", "ti": str(2**70)},
    )
    await redis.set(keys.rollup_cell(label, "str"), "not a hash")
    await redis.zadd(keys.rollup_live, {str(hour): hour, "junk": 1})
    await redis.hset(keys.rollup_hour(label), mapping={"cells": "junk", "all": "junk"})
    cells = (await read_hours(redis, keys, [hour]))[hour].vectors()
    assert list(cells) == ["a\x1fb\x1fc\x1fd"]
    assert cells["a\x1fb\x1fc\x1fd"][0] == 2
    assert cells["a\x1fb\x1fc\x1fd"][INDEX["ti"]] == 0  # past int64: not ours


async def test_a_period_older_than_the_retention_says_so(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    cfg, path = make_config(**{"report.retention_days": 2})
    now = int(time.time() * 1000)
    rollups = Rollups(keys, settings_of(cfg))
    hour = now // 3_600_000
    recent = await query(redis, rollups, Query(hour - 24, hour + 1), now_ms=now)
    assert recent.notes == []
    old = await query(redis, rollups, Query(hour - 24 * 3, hour + 1), now_ms=now)
    assert "report.retention_days = 2" in old.notes[0]
    code, out, err = await run(sys.executable, "-m", "worker", "--config", str(path), "report",
                               "--since", "3d", "--csv")  # fmt: skip
    assert code == 0 and out.startswith("jobs,ok,errors,tokens") and "retention" in err
