"""The rollups' writes against a real Valkey: folds of any size write what one fold of every
outcome writes, an hour keeps its tenant bound, 100k outcomes stay within the documented
memory, a finished job is folded once (a folder that lost its lease applies nothing), and
reports add up the same before, during and after compaction."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from worker.cells import (
    CELL_BYTES,
    HOURS,
    INDEX,
    METRICS,
    OTHER,
    Settings,
    day_label,
    hour_label,
    max_cells_per_hour,
    metrics_of,
)
from worker.compaction import compact_due
from worker.contract import GROUP, Keys, UsageEvent, to_fields
from worker.queue import Delivery, Finish, Queue
from worker.report import Query, query, row
from worker.rollups import Rollups

FEATURES = ("summarize", "support_faq", "classify_ticket", "code_review", "nightly_enrich")
MODELS = ("claude-haiku-5-5", "claude-sonnet-5-5")
PRIORITIES = ("high", "normal", "low")
HOUR = int(time.time()) // 3600 - 30  # hours of yesterday: within the retention


def outcome(rng: random.Random, n: int, tenants: int, hours: int = 1) -> dict[str, str]:
    return to_fields(UsageEvent(
        ts_ms=(HOUR + n % hours) * 3_600_000 + rng.randrange(3_600_000), job_id=f"j{n}",
        feature=rng.choice((*FEATURES, "not-configured")),
        tenant=f"tenant-{rng.randrange(tenants)}",
        priority=rng.choice(PRIORITIES), model=rng.choice(MODELS),
        mode=rng.choice(("realtime", "realtime", "batch", "cache")),
        status="ok" if rng.random() > 0.05 else "error", input_tokens=rng.randrange(5000),
        output_tokens=rng.randrange(800), cache_read_input_tokens=rng.choice((0, 0, 2048)),
        cost_usd=rng.random() / 50, baseline_cost_usd=rng.random() / 10,
        latency_ms=rng.randrange(20, 20_000), queue_ms=rng.randrange(0, 600_000),
        response_cache=rng.choice(("miss", "hit", "off")),
    ))  # fmt: skip


async def dump(redis: aioredis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    async for key in redis.scan_iter(match=f"{prefix}:rollup:*", count=1000):
        if await redis.type(key) == "zset":  # the live hours
            raw: Any = dict.fromkeys(await redis.zrange(key, 0, -1), "")
        else:
            raw = await redis.hgetall(key)
        out[str(key).removeprefix(prefix)] = dict(raw)
    return out


async def push(redis: aioredis.Redis, rollups: Rollups, events: list[dict[str, str]]) -> None:
    async with redis.pipeline(transaction=True) as tx:
        rollups.push_into(tx, events)
        await tx.execute()


async def test_small_folds_write_what_one_fold_of_every_outcome_writes(
    redis: aioredis.Redis, prefix: str
) -> None:
    settings = Settings(features=frozenset(FEATURES), tenants_per_hour=4)
    rng = random.Random(3)
    events = [outcome(rng, n, tenants=9, hours=2) for n in range(300)]
    one, many = Rollups(Keys(f"{prefix}a"), settings), Rollups(Keys(f"{prefix}b"), settings)
    for n, e in enumerate(events):  # folded a few at a time, as a busy fleet's second
        await push(redis, one, [e])
        if n % 7 == 0:
            assert await one.fold_records(redis) == (1 if n == 0 else 7)
    await one.fold_records(redis)
    await push(redis, many, events)
    assert await many.fold_records(redis) == len(events)
    single, merged = await dump(redis, f"{prefix}a"), await dump(redis, f"{prefix}b")
    assert single == merged and len(single) > 20
    index = single[f":rollup:h:{hour_label(HOUR)}"]
    assert index["#T"] == "4" and sum(k.startswith("T") for k in index) == 4
    assert any(v.endswith(OTHER) for v in index.values())  # the 5th tenant on counts as other


async def test_100k_outcomes_stay_within_the_documented_memory(
    redis: aioredis.Redis, prefix: str
) -> None:
    settings = Settings(features=frozenset(FEATURES), tenants_per_hour=100)
    rollups, keys = Rollups(Keys(prefix), settings), Keys(prefix)
    rng = random.Random(5)
    pool = [outcome(rng, n, tenants=200, hours=2) for n in range(8000)]  # distinct outcomes
    for _ in range(20):  # 100k outcomes, 5,000 at a time
        await push(redis, rollups, [rng.choice(pool) for _ in range(5000)])
        await rollups.fold_records(redis)
    bound = max_cells_per_hour(settings, len(MODELS), len(PRIORITIES))
    used = 0
    for hour in range(HOUR, HOUR + 2):
        index: Any = await redis.hgetall(keys.rollup_index(hour_label(hour)))
        cells = [k[1:] for k in index if k.startswith("K")]
        assert int(index["#T"]) == 100 and len(cells) <= bound
        async with redis.pipeline(transaction=False) as pipe:
            pipe.memory_usage(keys.rollup_index(hour_label(hour)))
            for cid in cells:
                pipe.memory_usage(keys.rollup_cell(hour_label(hour), cid))
            sizes: list[Any] = await pipe.execute()
        hour_bytes = sum(int(n or 0) for n in sizes)
        assert hour_bytes <= len(cells) * CELL_BYTES, (hour_bytes, len(cells))
        used += hour_bytes
    assert used <= 2 * bound * CELL_BYTES


async def test_each_finished_job_is_folded_once_even_by_a_server_that_lost_its_scripts(
    redis: aioredis.Redis, prefix: str
) -> None:
    """The finishing write appends the outcome; folds (several at once, one after a script
    flush, as after a restart) add each outcome to its cell once."""
    keys = Keys(prefix)
    rollups = Rollups(keys, Settings(features=frozenset(FEATURES)))
    queue = Queue(redis, keys, list(PRIORITIES), "c1", visibility_ms=60_000, rollups=rollups)
    await queue.ensure_groups()
    for _ in range(40):
        await redis.xadd(keys.jobs("normal"), {"feature": "summarize", "request": "{}"})
    got: Any = await redis.xreadgroup(GROUP, "c1", {keys.jobs("normal"): ">"}, count=40)
    event = outcome(random.Random(1), 0, tenants=1)
    for n, (entry_id, fields) in enumerate(got[0][1]):
        d = Delivery("normal", keys.jobs("normal"), entry_id, dict(fields))
        await queue.finish(d, f"job-{n}", Finish(b"{}", event, rollup=True))
        if n == 20:
            await redis.script_flush()
            await asyncio.gather(*(rollups.fold_records(redis) for _ in range(4)))
    assert await redis.llen(keys.rollup_queue) == 40 - 21
    await asyncio.gather(*(rollups.fold_records(redis) for _ in range(4)))
    index: Any = await redis.hgetall(keys.rollup_index(hour_label(HOUR)))
    [cell] = [k[1:] for k in index if k.startswith("K")]
    assert await redis.hget(keys.rollup_cell(hour_label(HOUR), cell), "n") == "40"
    assert await redis.exists(*(keys.result(f"job-{n}") for n in range(40))) == 40
    assert not await redis.exists(keys.rollup_queue)


async def test_a_folder_that_lost_its_lease_applies_nothing_and_strays_are_left_out(
    redis: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys(prefix)
    rollups = Rollups(keys, Settings(features=frozenset(FEATURES)))
    queue = Queue(redis, keys, list(PRIORITIES), "c1", visibility_ms=60_000, rollups=rollups)
    await queue.ensure_groups()
    entry_id: Any = await redis.xadd(keys.jobs("normal"), {"feature": "summarize", "request": "{}"})
    await redis.xreadgroup(GROUP, "c1", {keys.jobs("normal"): ">"})
    # A tenant whose bytes are not UTF-8 (the client keeps them as surrogate escapes).
    event = {**outcome(random.Random(2), 0, tenants=1), "tenant": "acme\udcff"}
    d = Delivery("normal", keys.jobs("normal"), entry_id, {})
    assert await queue.finish(d, "job-0", Finish(b"{}", event, rollup=True))
    await push(redis, rollups, [outcome(random.Random(2), n, tenants=1) for n in range(1, 30)])
    strays = [b"\xff not MessagePack", msgspec.msgpack.encode(["odd"]), b"\x81\xa1a\x01"]
    await redis.rpush(keys.rollup_queue, *strays)
    await redis.set(keys.rollup_folding, "another folder", px=60_000)  # it took over
    assert await rollups._fold(redis, "a folder that paused") == 0  # fenced: nothing applied
    assert await redis.llen(keys.rollup_queue) == 33
    assert not await redis.exists(keys.rollup_index(hour_label(HOUR)))
    await redis.delete(keys.rollup_folding)  # its lease ran out
    with caplog.at_level(logging.WARNING, logger="tokenq.rollups"):
        assert await rollups.fold_records(redis) == 33
    assert "left out 3 queue entries" in caplog.text
    assert not await redis.exists(keys.rollup_queue, keys.rollup_folding)
    index: Any = await redis.hgetall(keys.rollup_index(hour_label(HOUR)))
    assert "Tacme?" in index  # the tenant as stored: printable
    cells = [k[1:] for k in index if k.startswith("K")]
    counts: list[Any] = [
        await redis.hget(keys.rollup_cell(hour_label(HOUR), c), "n") for c in cells
    ]
    assert sum(int(n) for n in counts) == 30


async def test_compacted_hours_and_days_answer_as_the_outcomes_add_up(
    redis: aioredis.Redis, prefix: str
) -> None:
    # An hour keeps rows for its first 3 tenants, a compacted day for its 3 biggest.
    keys, settings = Keys(prefix), Settings(features=frozenset(FEATURES), tenants_per_hour=3)
    rollups = Rollups(keys, settings)
    day = int(time.time()) // 86_400 - 3
    rng = random.Random(9)
    events = [outcome(rng, n, tenants=8, hours=48) for n in range(600)]
    for n, e in enumerate(events):  # two whole days, three days ago
        e["ts_ms"] = str(day * 86_400_000 + int(e["ts_ms"]) % 3_600_000 + (n % 48) * 3_600_000)
    await push(redis, rollups, events)

    def want(key: Callable[[dict[str, str]], str], among: list[dict[str, str]]) -> dict[str, Any]:
        sums: dict[str, list[int]] = {}
        for e in among:
            v = sums.setdefault(key(e), [0] * len(METRICS))
            for name, amount in (metrics_of(e) or {}).items():
                v[INDEX[name]] += amount
        return {k: row(v) for k, v in sums.items()}

    async def got(by: tuple[str, ...]) -> dict[str, Any]:
        q = Query(day * 24, day * 24 + 48, by)
        answer = await query(redis, rollups, q, now_ms=int(time.time() * 1000))
        return {"/".join(str(r[k]) for k in by): {k: v for k, v in r.items() if k not in by}
                for r in answer.rows}  # fmt: skip

    def feature(e: dict[str, str]) -> str:
        return e["feature"] if e["feature"] in FEATURES else "(unknown feature)"

    def hour(e: dict[str, str]) -> str:
        return time.strftime("%Y-%m-%d %H:00", time.gmtime(int(e["ts_ms"]) // 1000))

    async def compact() -> None:  # what the workers' fold duty does, tick after tick
        while await compact_due(redis, keys, settings, int(time.time() * 1000), 10):
            pass

    assert await got(("feature",)) == want(feature, events)  # read from the live hours
    await compact()
    label = hour_label(day * 24 + 5)
    assert await redis.exists(keys.rollup_day(day_label(day)))
    assert not await redis.exists(keys.rollup_index(label))  # cells gone, hour compacted
    assert await redis.exists(keys.rollup_hour(label))
    assert not await redis.zcard(keys.rollup_live) and not await redis.zcard(keys.rollup_pending)
    assert await got(("feature",)) == want(feature, events)  # read from the days
    assert await redis.hexists(keys.rollup_day(day_label(day)), HOURS)
    assert await got(("hour",)) == want(hour, events)  # read from the days' hours views
    assert await got(("feature", "hour")) == want(lambda e: f"{feature(e)}/{hour(e)}", events)
    await redis.hdel(keys.rollup_day(day_label(day)), HOURS)  # as an older version compacted it
    assert await got(("hour",)) == want(hour, events)  # read from its compacted hours
    by_tenant = await got(("tenant",))
    assert "(other)" in by_tenant and len(by_tenant) <= 3 * 2 + 1
    assert sum(r["jobs"] for r in by_tenant.values()) == len(events)
    by_model = await got(("tenant", "model"))  # the days' view per model and tenant
    assert sum(r["jobs"] for r in by_model.values()) == len(events)
    assert not any(k.endswith("/(all)") for k in by_model)
    await redis.hdel(keys.rollup_day(day_label(day)), "model-tenant")  # as an older version
    assert await got(("tenant", "model")) == by_model  # read from the day's cells instead

    late = {**events[0], "ts_ms": str(day * 86_400_000 + 5 * 3_600_000 + 1)}
    await push(redis, rollups, [late])  # a worker whose clock is behind
    assert await got(("feature",)) == want(feature, [*events, late])  # the day's hours
    assert await got(("hour",)) == want(hour, [*events, late])
    await compact()  # merges the late outcome into its hour, then its day again
    assert await redis.zrange(keys.rollup_pending, 0, -1) == []
    assert await got(("feature",)) == want(feature, [*events, late])
    assert await got(("hour",)) == want(hour, [*events, late])
