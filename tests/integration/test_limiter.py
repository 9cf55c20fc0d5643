"""The fleet limiter's Lua buckets on a real Valkey, with an injected clock (clock_ms)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import ConfigFactory
from tests.helpers import eventually
from worker.limiter import Answer, FleetLimiter, Grant, Unfit

HAIKU = "claude-haiku-5-5"
LIMITS = 'models."claude-haiku-5-5".limits'
T0 = 1_800_000_000_000  # ms


def limits(rpm: int = 60, itpm: int = 3000, otpm: int = 1000, **more: Any) -> dict[str, Any]:
    return {
        "limits.target": 1.0, f"{LIMITS}.rpm": rpm, f"{LIMITS}.itpm": itpm,
        f"{LIMITS}.otpm": otpm, **more,
    }  # fmt: skip


@pytest.fixture
def make_limiter(redis: aioredis.Redis, make_config: ConfigFactory) -> Iterator[Any]:
    def make(**overrides: Any) -> FleetLimiter:
        cfg, _ = make_config(**limits(**overrides))
        return FleetLimiter(redis, cfg, clock_ms=T0)

    yield make


async def take(lim: FleetLimiter, want: tuple[int, int, int], rank: int = 1,
               feature: str = "summarize") -> Grant | float:  # fmt: skip
    return await lim.take_now(HAIKU, feature, rank, want)


async def test_a_full_bucket_grants_its_size_then_refills_continuously(make_limiter: Any) -> None:
    lim = make_limiter()
    for _ in range(60):
        assert isinstance(await take(lim, (1, 10, 10)), Grant)
    assert await take(lim, (1, 10, 10)) == pytest.approx(1.0)  # 60/min: one a second
    lim.clock_ms = T0 + 500
    assert await take(lim, (1, 10, 10)) == pytest.approx(0.5)
    lim.clock_ms = T0 + 1000
    assert isinstance(await take(lim, (1, 10, 10)), Grant)


async def test_tokens_bind_and_settling_gives_back_what_was_not_used(make_limiter: Any) -> None:
    lim = make_limiter()
    first = await take(lim, (1, 1000, 500))
    assert isinstance(first, Grant) and isinstance(await take(lim, (1, 1000, 500)), Grant)
    # Output is empty: 500 tokens at 1000/min take 30 s.
    assert await take(lim, (1, 1000, 500)) == pytest.approx(30.0)
    await lim.settle(first, Answer((1, 200, 100), {}))  # used 100 of the 500 reserved
    assert isinstance(await take(lim, (1, 1000, 400)), Grant)
    # Input: 3000 - 1000 - 1000 + 800 given back - 1000 = 800 left.
    assert await take(lim, (1, 1000, 0)) == pytest.approx(200 * 60 / 3000)


async def test_a_call_bigger_than_the_limit_is_unfit(make_limiter: Any) -> None:
    lim = make_limiter()
    with pytest.raises(Unfit, match="needs 5,000 input tokens but claude-haiku-5-5 allows 3,000"):
        await take(lim, (1, 5000, 10))
    # max_tokens over the output limit is capped, not refused (the API counts generated ones).
    grant = await take(lim, (1, 10, 50_000))
    assert isinstance(grant, Grant) and grant.taken == (1, 10, 1000)


async def test_a_waiting_higher_priority_holds_back_lower_ones(make_limiter: Any) -> None:
    lim = make_limiter(**{"limits.priority_hold_ms": 2000})
    assert isinstance(await take(lim, (1, 2500, 0), rank=2), Grant)  # 500 input tokens left
    assert await take(lim, (1, 1000, 0), rank=0) == pytest.approx(10.0)  # high: must wait
    lim.clock_ms = T0 + 100
    assert await take(lim, (1, 100, 0), rank=2) == pytest.approx(0.5)  # low: held back
    assert isinstance(await take(lim, (1, 100, 0), rank=0), Grant)  # high itself is not
    lim.clock_ms = T0 + 2001  # the claim ran out: nobody of rank 0 asked since
    assert isinstance(await take(lim, (1, 100, 0), rank=2), Grant)


async def test_answers_pull_buckets_down_and_teach_lower_limits(make_limiter: Any) -> None:
    lim = make_limiter()
    grant = await take(lim, (1, 10, 10))
    assert isinstance(grant, Grant)
    headers = {
        "anthropic-ratelimit-requests-remaining": "4",
        "anthropic-ratelimit-requests-limit": "30",
    }
    await lim.settle(grant, Answer((1, 10, 10), headers))
    for _ in range(4):  # another application used the rest
        assert isinstance(await take(lim, (1, 10, 10)), Grant)
    assert await take(lim, (1, 10, 10)) == pytest.approx(2.0)  # refills at 30/min, not 60
    lim.clock_ms = T0 + 120_000
    granted = [isinstance(await take(lim, (1, 10, 10)), Grant) for _ in range(61)]
    assert granted.count(True) == 30  # full at the learnt limit
    lim.clock_ms = T0 + 400_000  # learn_ttl_s (300 s) after the last answer that showed it
    granted = [isinstance(await take(lim, (1, 10, 10)), Grant) for _ in range(61)]
    assert granted.count(True) == 60


async def test_a_429_pauses_the_model_for_retry_after(make_limiter: Any) -> None:
    lim = make_limiter()
    grant = await take(lim, (1, 10, 10))
    assert isinstance(grant, Grant)
    await lim.settle(grant, Answer(None, {"retry-after": "3"}, status=429))
    assert await take(lim, (1, 10, 10)) == pytest.approx(3.0)
    lim.clock_ms = T0 + 3000
    assert isinstance(await take(lim, (1, 10, 10)), Grant)


async def test_a_feature_share_is_its_own_bucket(make_limiter: Any) -> None:
    lim = make_limiter(**{"features.nightly_enrich.limit_share": 0.5})
    enrich = [isinstance(await take(lim, (1, 10, 10), feature="nightly_enrich"), Grant)
              for _ in range(31)]  # fmt: skip
    assert enrich.count(True) == 30
    assert isinstance(await take(lim, (1, 10, 10), feature="support_faq"), Grant)


async def test_lanes_of_two_processes_serve_high_priority_first(
    redis: aioredis.Redis, make_config: ConfigFactory
) -> None:
    cfg, _ = make_config(**limits(rpm=60, **{"limits.priority_hold_ms": 1500}))
    first, second = FleetLimiter(redis, cfg, clock_ms=T0), FleetLimiter(redis, cfg, clock_ms=T0)
    for _ in range(60):
        assert isinstance(await take(first, (1, 1, 1)), Grant)
    order: list[str] = []

    async def call(lim: FleetLimiter, name: str, rank: int) -> None:
        await lim.acquire(HAIKU, "summarize", rank, (1, 1, 1))
        order.append(name)

    lows = [asyncio.create_task(call(first, f"low{n}", 2)) for n in range(3)]
    await asyncio.sleep(0.05)  # the low lane has asked and waits
    highs = [asyncio.create_task(call(second, f"high{n}", 0)) for n in range(3)]
    for n in range(1, 7):  # one request's worth of refill at a time
        await asyncio.sleep(0.05)
        for lim in (first, second):
            lim.clock_ms = T0 + 1000 * n
        second.nudge()  # the high lane asks first, then the low one
        await eventually(lambda: _ready(len(order) >= n), what=f"{n} grants")  # noqa: B023
        first.nudge()
    await asyncio.gather(*lows, *highs)
    assert order[:3] == ["high0", "high1", "high2"]
    assert sorted(order[3:]) == ["low0", "low1", "low2"]


async def _ready(value: bool) -> bool:
    return value


async def test_pacing_learns_what_share_of_reserved_input_the_api_counts(
    make_limiter: Any,
) -> None:
    # Prompt-cache reads are not counted by the API: reservations made of the whole prompt
    # come back mostly unused, and this process's aiolimiter (which cannot give back) must
    # then be charged the counted share, or it would throttle far below the limit.
    lim = make_limiter(rpm=10_000, itpm=1_000_000)
    assert lim.counted == {}
    for _ in range(40):
        grant = await take(lim, (1, 1000, 10))
        assert isinstance(grant, Grant)
        await lim.settle(grant, Answer((1, 100, 5), {}))  # counted: a tenth
    assert lim.counted[HAIKU] == pytest.approx(0.1, abs=0.02)
    failed = await take(lim, (1, 1000, 10))
    assert isinstance(failed, Grant)
    await lim.settle(failed, Answer(None, {}, 500))  # no usage: nothing learnt
    assert lim.counted[HAIKU] == pytest.approx(0.1, abs=0.02)


async def test_a_feature_at_its_limit_share_never_holds_back_other_features(
    make_limiter: Any,
) -> None:
    lim = make_limiter(**{"features.summarize.limit_share": 0.1})  # 6 requests/min of 60
    for _ in range(6):
        assert isinstance(await take(lim, (1, 10, 10), rank=0), Grant)
    refused = await take(lim, (1, 10, 10), rank=0)  # summarize's share is spent
    assert isinstance(refused, float)
    # A lower priority of another feature on the same model still gets the model's capacity:
    # the share's refusal is summarize's own business, not a priority hold on the model.
    assert isinstance(await take(lim, (1, 10, 10), rank=2, feature="support_faq"), Grant)
