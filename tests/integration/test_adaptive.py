"""The adaptive router's Redis side against a real Valkey: what the finishing transaction
records, what a worker reads back, and producers' feedback."""

from __future__ import annotations

import asyncio
import copy
import tomllib
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.helpers import add, entries, eventually
from worker.adaptive import (
    Answered,
    OutcomeStats,
    TierStats,
    read_stats,
    record_into,
    route,
)
from worker.config import Config, parse_config
from worker.contract import GROUP, Keys
from worker.feedback import FeedbackReader

ROOT = Path(__file__).resolve().parents[2]
RAW: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())
T0 = 1_800_000_000_000  # ms
PASS, FAIL = None, "answer is not JSON"


def adaptive_config(prefix: str, **settings: Any) -> Config:
    raw = copy.deepcopy(RAW)
    raw["prefix"] = prefix
    raw["router"]["policy"] = "adaptive"
    raw["router"]["adaptive"].update(settings)
    raw["features"]["summarize"].pop("tier")
    raw["features"]["summarize"]["target_pass_rate"] = 0.98
    return parse_config(raw)


async def finish(
    redis: aioredis.Redis, keys: Keys, cfg: Config, job_id: str,
    answers: list[tuple[str, str | None]], now_ms: int = T0, in_use: str | None = None,
) -> None:  # fmt: skip
    """What the worker's finishing MULTI would add for one job of summarize (kind short)."""
    async with redis.pipeline(transaction=True) as tx:
        record_into(tx, keys, cfg, feature="summarize", kind="short", job_id=job_id,
                    answers=answers, now_ms=now_ms, in_use=in_use)  # fmt: skip
        await tx.execute()


class Clock:
    def __init__(self) -> None:
        self.now_ms = T0

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def cfg(prefix: str) -> Config:
    return adaptive_config(prefix)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def reader(redis: aioredis.Redis, keys: Keys, cfg: Config, clock: Clock) -> FeedbackReader:
    reader = FeedbackReader(redis, keys, "w1", lambda: cfg, clock)
    await reader.ensure_group()
    return reader


async def test_the_finishing_write_is_read_back_as_counts(
    redis: aioredis.Redis, keys: Keys, cfg: Config
) -> None:
    await finish(redis, keys, cfg, "a", [("haiku", FAIL), ("sonnet", PASS)], in_use="haiku")
    await finish(redis, keys, cfg, "b", [("haiku", PASS)])
    await finish(redis, keys, cfg, "c", [("haiku", "stop_reason max_tokens"), ("sonnet", PASS)])
    stats = await read_stats(redis, keys, cfg.router.adaptive, "summarize", T0)
    assert stats.in_use == {"short": "haiku"}
    assert stats.counts["short", "haiku"] == TierStats(1.0, 1.0, 1.0, 1.0)
    assert stats.counts["short", "sonnet"] == TierStats(2.0, 0.0, 2.0, 0.0)
    # Every key written expires: counts, in use, and the job's record for feedback.
    written = [k async for k in redis.scan_iter(f"{keys.prefix}:*")]
    assert len(written) == 2 + 1 + 3  # two horizons, the in-use hash, three records
    ttls = [await redis.ttl(k) for k in written]
    assert all(t > 0 for t in ttls), dict(zip(written, ttls, strict=True))
    assert await redis.ttl(keys.answered("a")) == cfg.router.adaptive.feedback_ttl_s
    record = msgspec.json.decode(cast(str, await redis.get(keys.answered("a"))), type=Answered)
    assert record == Answered("summarize", "short", "sonnet", "p", "p", T0)


async def test_counts_halve_every_half_life_when_read_later(
    redis: aioredis.Redis, keys: Keys, prefix: str
) -> None:
    cfg = adaptive_config(prefix, half_life_s=60, recent_half_life_s=10)
    await finish(redis, keys, cfg, "a", [("haiku", PASS)])
    stats = await read_stats(redis, keys, cfg.router.adaptive, "summarize", T0 + 120_000)
    assert stats.counts["short", "haiku"].passed == pytest.approx(0.25)
    assert stats.counts["short", "haiku"].recent_passed == pytest.approx(2**-12)


async def test_a_process_reads_a_feature_once_per_cache_ms(
    redis: aioredis.Redis, keys: Keys, cfg: Config
) -> None:
    stats = OutcomeStats(redis, keys)
    await finish(redis, keys, cfg, "a", [("haiku", PASS)])
    first, again = await asyncio.gather(
        stats.get(cfg, "summarize", T0), stats.get(cfg, "summarize", T0)
    )
    assert first is again  # one read for both
    await finish(redis, keys, cfg, "b", [("haiku", PASS)])
    assert (await stats.get(cfg, "summarize", T0 + 999)).counts["short", "haiku"].passed == 1.0
    fresh = await stats.get(cfg, "summarize", T0 + 1000)
    assert fresh.counts["short", "haiku"].passed == pytest.approx(2.0, rel=1e-3)  # 1 s older


async def test_a_bad_verdict_turns_a_pass_into_a_failure_once(
    redis: aioredis.Redis, keys: Keys, cfg: Config, reader: FeedbackReader, clock: Clock
) -> None:
    await finish(redis, keys, cfg, "job-1", [("haiku", PASS)])
    clock.now_ms = T0 + 60_000
    await add(redis, keys.feedback, {"job_id": "job-1", "verdict": "bad", "reason": "wrong"})
    await add(redis, keys.feedback, {"job_id": "job-1", "verdict": "bad"})  # sent twice
    assert await reader.step(block_ms=100) == {"applied": 1, "unchanged": 1}
    stats = await read_stats(redis, keys, cfg.router.adaptive, "summarize", clock.now_ms)
    haiku = stats.counts["short", "haiku"]
    assert haiku.passed == pytest.approx(0.0, abs=1e-9) and haiku.failed == pytest.approx(1.0)
    record = msgspec.json.decode(cast(str, await redis.get(keys.answered("job-1"))), type=Answered)
    assert (record.held, record.verdict, record.reason) == ("f", "bad", "")
    assert await redis.ttl(keys.answered("job-1")) > 0  # KEEPTTL
    assert await entries(redis, keys.feedback) == []  # applied entries are deleted
    assert await redis.hgetall(keys.feedback_counts) == {"applied": "1", "unchanged": "1"}
    await add(redis, keys.feedback, {"job_id": "job-1", "verdict": "good"})  # changed their mind
    assert await reader.step(block_ms=100) == {"applied": 1}
    stats = await read_stats(redis, keys, cfg.router.adaptive, "summarize", clock.now_ms)
    haiku = stats.counts["short", "haiku"]
    assert haiku.passed == pytest.approx(1.0) and haiku.failed == pytest.approx(0.0, abs=1e-9)


async def test_entries_it_cannot_use_are_counted_and_dropped_and_reading_goes_on(
    redis: aioredis.Redis, keys: Keys, cfg: Config, reader: FeedbackReader
) -> None:
    await finish(redis, keys, cfg, "job-1", [("haiku", PASS)])
    await redis.set(keys.answered("job-x"), b"\xff not ours")
    garbage: list[dict[Any, Any]] = [
        {"verdict": "bad"},  # no job_id
        {"job_id": "job-1", "verdict": "meh"},
        {"job_id": b"\xff\xfe", "verdict": "bad"},  # not UTF-8
        {b"\xc3\x28": "x"},
        {"job_id": "", "verdict": "bad"},
        {"job_id": "x" * 100_000, "verdict": "good"},  # no such job
        {"job_id": "nobody", "verdict": "bad"},
        {"job_id": "job-x", "verdict": "bad"},  # a record that is not one of ours
    ]
    for fields in garbage:
        await redis.xadd(keys.feedback, fields)
    await add(redis, keys.feedback, {"job_id": "job-1", "verdict": "bad"})
    assert await reader.step(block_ms=100) == {"malformed": 5, "unknown_job": 3, "applied": 1}
    assert await entries(redis, keys.feedback) == []
    assert await redis.hgetall(keys.feedback_counts) == {
        "malformed": "5", "unknown_job": "3", "applied": "1",
    }  # fmt: skip
    assert await redis.strlen(keys.answered("job-x")) == 10  # left as it was


async def test_an_entry_left_by_a_dead_reader_is_taken_over(
    redis: aioredis.Redis, keys: Keys, cfg: Config, clock: Clock
) -> None:
    await finish(redis, keys, cfg, "job-1", [("haiku", PASS)])
    dead = FeedbackReader(redis, keys, "dead", lambda: cfg, clock)
    await dead.ensure_group()
    await add(redis, keys.feedback, {"job_id": "job-1", "verdict": "bad"})
    await redis.xreadgroup(GROUP, "dead", {keys.feedback: ">"})  # read, then the process died
    alive = FeedbackReader(redis, keys, "alive", lambda: cfg, clock, idle_ms=50)
    assert await alive.step(block_ms=10) == {}  # not idle long enough yet

    async def taken_over() -> bool:
        return await alive.step(block_ms=10) == {"applied": 1}

    await eventually(taken_over, what="the dead reader's entry applied")
    await alive.close()
    consumers: Any = await redis.xinfo_consumers(keys.feedback, GROUP)
    assert [c["name"] for c in consumers] == ["dead"]  # alive left; dead had one pending


async def test_the_reader_recreates_a_deleted_stream_and_stops_when_asked(
    redis: aioredis.Redis, keys: Keys, cfg: Config, reader: FeedbackReader
) -> None:
    await finish(redis, keys, cfg, "job-1", [("haiku", PASS)])
    await redis.delete(keys.feedback)
    stopping = asyncio.Event()
    running = asyncio.create_task(reader.run(stopping, block_ms=50))
    await eventually(lambda: redis.exists(keys.feedback), what="the feedback stream recreated")
    await add(redis, keys.feedback, {"job_id": "job-1", "verdict": "bad"})

    async def applied() -> bool:
        return reader.counts["applied"] == 1

    await eventually(applied, what="the verdict applied")
    stopping.set()
    await asyncio.wait_for(running, 5)


async def test_feedback_moves_the_router_off_a_tier_whose_answers_producers_reject(
    redis: aioredis.Redis, keys: Keys, cfg: Config, reader: FeedbackReader, clock: Clock
) -> None:
    # Haiku in use, every answer passing its check (a text feature: the check cannot tell).
    for n in range(300):
        at = T0 + n * 1000
        await finish(redis, keys, cfg, f"job-{n}", [("haiku", PASS)], now_ms=at,
                     in_use="haiku" if n == 0 else None)  # fmt: skip
    clock.now_ms = T0 + 300_000
    stats = OutcomeStats(redis, keys)
    before = route(cfg, "summarize", 100, await stats.get(cfg, "summarize", clock.now_ms), "x")
    assert before.tier == "haiku" and before.reason.startswith("adaptive: haiku passes 1.000")
    for n in range(280, 300):  # producers: the last twenty were wrong
        await add(redis, keys.feedback, {"job_id": f"job-{n}", "verdict": "bad"})
    assert await reader.step(block_ms=100) == {"applied": 20}
    after = route(cfg, "summarize", 100, await stats.get(cfg, "summarize", clock.now_ms + 1000),
                  "x")  # fmt: skip
    assert (after.tier, after.in_use) == ("sonnet", "sonnet")
    assert "haiku passes" in after.reason and "under 0.98" in after.reason
