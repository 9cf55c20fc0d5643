"""Budget holds on a real Valkey (worker.budgets): each in the holds set with its amount, so a
cap's hash stays small; settled once, expired when nobody settles them, and the holds an
older tokenq wrote (the amount in the hash) settled and expired all the same."""

from __future__ import annotations

import datetime as dt

import redis.asyncio as aioredis

from tests.conftest import ConfigFactory
from worker.budgets import Budgets, Cap, Hold
from worker.contract import Keys

RESETS = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
NANO = 1_000_000_000


def cap(keys: Keys) -> Cap:
    key = keys.budget("feature:summarize", "2030-01-01")
    return Cap("features.summarize.daily_usd", key, "2030-01-01", 10.0, None, 3600, RESETS)


async def test_holds_keep_the_hash_small_and_settle_once(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    cfg, _ = make_config()
    budgets, c = Budgets(redis, cfg), cap(keys)
    holds = [await budgets.reserve([c], f"h{n}", 0.5, 1_000) for n in range(3)]
    assert all(isinstance(h, Hold) for h in holds)
    assert sorted(await redis.hkeys(c.key)) == ["held", "requests"]
    assert await redis.hget(c.key, "held") == str(int(1.5 * NANO))
    hold = holds[0]
    assert isinstance(hold, Hold)
    for _ in range(2):  # a settlement sent again after a lost reply counts once
        await budgets.settle(hold, 0.25, called=True)
    got = await redis.hmget(c.key, ["spent", "held", "requests"])
    assert got == [str(NANO // 4), str(NANO), "3"]
    assert await redis.zcard(c.holds) == 2


async def test_an_unsettled_hold_expires_without_spending(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    cfg, _ = make_config()
    budgets, c = Budgets(redis, cfg), cap(keys)
    assert isinstance(await budgets.reserve([c], "old", 2.0, 1_000), Hold)
    later = 1_000 + int((cfg.anthropic.timeout_s + 61) * 1000)
    assert isinstance(await budgets.reserve([c], "new", 1.0, later), Hold)
    assert await redis.hmget(c.key, ["spent", "held"]) == [None, str(NANO)]
    assert await redis.zrange(c.holds, 0, -1) == [f"new:{NANO}"]


async def test_holds_an_older_tokenq_wrote_are_settled_and_expired(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    cfg, _ = make_config()
    budgets, c = Budgets(redis, cfg), cap(keys)
    # Two holds as an older tokenq wrote them: the member is the id, the amount in the hash.
    await redis.hset(c.key, mapping={"held": 3 * NANO, "requests": 2, "h:a": NANO, "h:b": 2 * NANO})
    await redis.zadd(c.holds, {"a": 10**13, "b": 2_000})
    await budgets.settle(Hold("a", (c,), 1.0), 0.5, called=True)
    assert isinstance(await budgets.reserve([c], "new", 1.0, 3_000), Hold)  # b has expired
    assert sorted(await redis.hkeys(c.key)) == ["held", "requests", "spent"]
    assert await redis.hmget(c.key, ["spent", "held"]) == [str(NANO // 2), str(NANO)]
    assert await redis.zrange(c.holds, 0, -1) == [f"new:{NANO}"]
