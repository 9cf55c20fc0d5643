"""Fleet circuit breakers against a real Valkey: two Breakers stand in for two processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import anthropic
import httpx2
import redis.asyncio as aioredis

from tests.helpers import eventually
from worker.breakers import Breakers, Open, Ticket
from worker.config import BreakersConfig
from worker.contract import Keys

NAME = "feature:summarize"


def failure() -> anthropic.InternalServerError:
    request = httpx2.Request("POST", "http://sim/v1/messages")
    return anthropic.InternalServerError(
        "Overloaded", response=httpx2.Response(529, request=request), body=None
    )


def pair(
    redis: aioredis.Redis, keys: Keys, **settings: float
) -> tuple[Breakers, Breakers, Callable[[], Breakers]]:
    cfg = BreakersConfig(**{"fail_max": 3, "reset_timeout_s": 30.0, "half_open_probes": 2,
                            "success_threshold": 2, "sync_ms": 0, **settings})  # type: ignore[arg-type]  # fmt: skip

    def make() -> Breakers:
        return Breakers(redis, keys, cfg, probe_ttl_s=60)

    return make(), make(), make


async def admitted(b: Breakers) -> Ticket:
    ticket = await b.admit([NAME])
    assert isinstance(ticket, Ticket), f"refused: {ticket}"
    return ticket


async def state(redis: aioredis.Redis, keys: Keys) -> str:
    return str(await redis.hget(f"{keys.prefix}:breaker:{NAME}", "state"))


async def test_failures_in_two_processes_add_up_and_both_see_the_breaker_open(
    redis: aioredis.Redis, keys: Keys
) -> None:
    a, b, _ = pair(redis, keys)
    for _ in range(2):
        await a.record(await admitted(a), failure())
    assert await state(redis, keys) == "closed"
    await b.record(await admitted(b), failure())  # the fleet's third failure in a row
    assert await state(redis, keys) == "open"
    refused = await a.admit([NAME])
    assert isinstance(refused, Open) and refused.name == NAME
    assert refused.retry_at_ms > time.time() * 1000 + 25_000  # reset_timeout_s 30


async def test_a_success_anywhere_resets_the_run_of_failures(
    redis: aioredis.Redis, keys: Keys
) -> None:
    a, b, _ = pair(redis, keys)
    await a.record(await admitted(a), failure())
    await a.record(await admitted(a), failure())
    await b.record(await admitted(b), None)
    await a.record(await admitted(a), failure())
    assert await state(redis, keys) == "closed"
    assert await redis.hget(f"{keys.prefix}:breaker:{NAME}", "fails") == "1"


async def test_half_open_lets_only_the_probes_through_fleet_wide_then_closes(
    redis: aioredis.Redis, keys: Keys
) -> None:
    a, b, make = pair(redis, keys, reset_timeout_s=0.2)
    for _ in range(3):
        await a.record(await admitted(a), failure())
    assert isinstance(await b.admit([NAME]), Open)

    async def probe_admitted() -> bool:
        return isinstance(await a.admit([NAME]), Ticket)

    await eventually(probe_admitted, what="a half-open probe slot after reset_timeout")
    # `a` holds one probe slot (from the check above); one more is free, for `b`.
    probe_b = await admitted(b)
    third = await make().admit([NAME])
    assert isinstance(third, Open), "a third concurrent probe was let through"
    assert await state(redis, keys) == "half-open"
    await b.record(probe_b, None)
    c = make()
    probe_c = await admitted(c)  # b's slot is free again
    await c.record(probe_c, None)  # the second success in a row (success_threshold 2)
    assert await state(redis, keys) == "closed"
    assert isinstance(await b.admit([NAME]), Ticket)


async def test_a_failed_probe_opens_the_breaker_again(redis: aioredis.Redis, keys: Keys) -> None:
    a, b, _ = pair(redis, keys, reset_timeout_s=0.2)
    for _ in range(3):
        await a.record(await admitted(a), failure())
    first_open = await redis.hget(f"{keys.prefix}:breaker:{NAME}", "opened_at")

    async def probe() -> bool:
        return isinstance(await b.admit([NAME]), Ticket)

    await eventually(probe, what="a half-open probe slot")
    ticket = await b.admit([NAME])  # the second slot
    assert isinstance(ticket, Ticket)
    await b.record(ticket, failure())
    assert await state(redis, keys) == "open"
    assert await redis.hget(f"{keys.prefix}:breaker:{NAME}", "opened_at") != first_open


async def test_cancelled_calls_and_429s_count_neither_way_and_free_their_probe(
    redis: aioredis.Redis, keys: Keys
) -> None:
    a, b, _ = pair(redis, keys, reset_timeout_s=0.2, half_open_probes=1)
    await a.record(await admitted(a), failure())
    await a.record(await admitted(a), asyncio.CancelledError())
    request = httpx2.Request("POST", "http://sim/v1/messages")
    limited = anthropic.RateLimitError(
        "slow down", response=httpx2.Response(429, request=request), body=None
    )
    await a.record(await admitted(a), limited)
    assert await redis.hget(f"{keys.prefix}:breaker:{NAME}", "fails") == "1"
    for _ in range(2):
        await a.record(await admitted(a), failure())
    assert await state(redis, keys) == "open"

    async def probe() -> bool:
        return isinstance(await b.admit([NAME]), Ticket)

    await eventually(probe, what="the half-open probe slot")
    assert isinstance(await a.admit([NAME]), Open)  # the only slot is b's
    held = await b.admit([NAME])
    assert isinstance(held, Open)  # b's first admit already holds it; release it neutrally
    slot_holder = Ticket((NAME,), (NAME,), await _probe_id(redis, keys))
    await b.record(slot_holder, asyncio.CancelledError())
    assert await state(redis, keys) == "half-open"
    assert isinstance(await a.admit([NAME]), Ticket)  # the slot came back


async def _probe_id(redis: aioredis.Redis, keys: Keys) -> str:
    members = await redis.zrange(f"{keys.prefix}:breaker:{NAME}:probes", 0, -1)
    assert len(members) == 1
    return str(members[0])


async def test_disabled_breakers_admit_everything(redis: aioredis.Redis, keys: Keys) -> None:
    b = Breakers(redis, keys, BreakersConfig(enabled=False), probe_ttl_s=60)
    for _ in range(10):
        await b.record(await admitted(b), failure())
    assert await redis.exists(f"{keys.prefix}:breaker:{NAME}") == 0
