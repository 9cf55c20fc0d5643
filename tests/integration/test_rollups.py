"""The rollups' writes against a real Valkey: merged deltas write what single outcomes write,
an hour keeps its tenant bound, and 100k outcomes stay within the documented memory."""

from __future__ import annotations

import random
import time
from typing import Any

import redis.asyncio as aioredis

from worker.contract import Keys, UsageEvent, to_fields
from worker.rollups import (
    CELL_BYTES,
    OTHER,
    Rollups,
    Settings,
    hour_label,
    max_cells_per_hour,
)

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
        raw: Any = await redis.hgetall(key)
        out[str(key).removeprefix(prefix)] = dict(raw)
    return out


async def test_a_merged_delta_writes_what_its_outcomes_write_one_by_one(
    redis: aioredis.Redis, prefix: str
) -> None:
    settings = Settings(features=frozenset(FEATURES), tenants_per_hour=4)
    rng = random.Random(3)
    events = [outcome(rng, n, tenants=9, hours=2) for n in range(300)]
    one, many = Rollups(Keys(f"{prefix}a"), settings), Rollups(Keys(f"{prefix}b"), settings)
    for e in events:
        async with redis.pipeline(transaction=True) as tx:
            one.add_into(tx, e)
            await tx.execute()
    for start in range(0, len(events), 50):  # as finishes that share one round trip would
        async with redis.pipeline(transaction=True) as tx:
            many.write_into(tx, many.delta(events[start : start + 50]))
            await tx.execute()
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
    for _ in range(20):  # 100k outcomes, 5,000 to a delta
        delta = rollups.delta(rng.choice(pool) for _ in range(5000))
        async with redis.pipeline(transaction=True) as tx:
            rollups.write_into(tx, delta)
            await tx.execute()
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
