"""The fenced script (worker.fence) on a real Valkey: each write's key and values passed as they
are, the usage event packed once and pushed as it is for the rollups, a budget reservation
taken with the run saved before a call (or refused with nothing written), and the settlements
of a job's calls written with its end."""

from __future__ import annotations

from typing import Any

import msgspec
import redis.asyncio as aioredis

from tests.conftest import ConfigFactory
from tests.helpers import cap, pending
from worker import fence, outcomes
from worker.budgets import Budgets, Hold, Refusal
from worker.contract import GROUP, Keys, Result, UsageEvent, to_fields
from worker.queue import Finish, Queue
from worker.rollups import entry_of, outcome_of


async def test_writes_pass_keys_in_order_and_values_untouched(
    redis: aioredis.Redis, keys: Keys, valkey_url: str
) -> None:
    queue, d = await pending(redis, keys)
    w = fence.Writes(d.stream, d.entry_id, queue.consumer)
    odd = b"k1\x00v\xff*"  # what the old encoding's tags looked like, and bytes not UTF-8
    w.add("HSET", f"{keys.prefix}:t:one", "k", odd, "v", "k2")
    w.add("RPUSH", f"{keys.prefix}:t:two", 7, 1.5)
    w.add("SET", f"{keys.prefix}:t:three", "*")
    assert await w.run(queue._fenced)
    raw = aioredis.Redis.from_url(valkey_url)  # bytes as stored
    try:
        assert await raw.hgetall(f"{keys.prefix}:t:one") == {b"k": odd, b"v": b"k2"}
    finally:
        await raw.aclose()
    assert await redis.lrange(f"{keys.prefix}:t:two", 0, -1) == ["7", "1.5"]
    assert await redis.get(f"{keys.prefix}:t:three") == "*"


async def test_the_event_is_written_from_its_packed_fields_and_pushed_as_it_is(
    redis: aioredis.Redis, keys: Keys, valkey_url: str
) -> None:
    queue, d = await pending(redis, keys)
    event = to_fields(UsageEvent(ts_ms=1, job_id=d.job_id, feature="summarize", tenant="é" * 40))
    result = msgspec.json.encode(Result(id=d.job_id, status="ok", text="hi"))
    assert await queue.finish(d, d.job_id, Finish(result, event, None, None, rollup=True))
    stored: Any = await redis.xrange(keys.usage)
    assert [fields for _, fields in stored] == [event]
    raw = aioredis.Redis.from_url(valkey_url)  # bytes as stored
    try:
        pushes: Any = await raw.lrange(keys.rollup_queue, 0, -1)
    finally:
        await raw.aclose()
    assert pushes == [entry_of(event)]
    assert outcome_of(pushes[0]) == event


async def test_a_run_saved_with_its_reservation_takes_both_or_neither(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    cfg, _ = make_config()
    budgets, (queue, d) = Budgets(redis, cfg), await pending(redis, keys)
    taken = budgets.reservation([cap(keys, 1.0)], "h1", 0.6, 1_000)
    assert await queue.save_run(d, b'{"t0":1}', taken) is True
    assert await redis.hget(keys.state(d.job_id), "run") == '{"t0":1}'
    assert await redis.hget(taken.caps[0].key, "held") == str(600_000_000)

    refused = budgets.reservation([cap(keys, 1.0)], "h2", 0.6, 1_000)
    reply = await queue.save_run(d, b'{"t0":2}', refused)
    assert isinstance(reply, list)
    why = budgets.refusal(refused, reply)
    assert isinstance(why, Refusal) and why.dimension == "usd" and why.held_usd == 0.6
    assert await redis.hget(keys.state(d.job_id), "run") == '{"t0":1}'  # not written
    assert await redis.zrange(taken.caps[0].holds, 0, -1) == ["h1:600000000"]


async def test_a_worker_that_lost_the_job_reserves_nothing(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    cfg, _ = make_config()
    budgets, (queue, d) = Budgets(redis, cfg), await pending(redis, keys)
    await redis.xclaim(keys.jobs("normal"), GROUP, "b", 0, [d.entry_id])
    r = budgets.reservation([cap(keys, 1.0)], "h1", 0.1, 1_000)
    assert await queue.save_run(d, b'{"t0":1}', r) is False
    assert not await redis.exists(r.caps[0].key, r.caps[0].holds)


async def test_a_jobs_end_settles_its_holds_and_names_the_caps_that_reached_their_alert(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    cfg, _ = make_config(**{"budgets.alert_at": 0.5})
    budgets, (queue, d) = Budgets(redis, cfg), await pending(redis, keys)
    c = cap(keys, 1.0)
    hold = await budgets.reserve([c], "h1", 0.4, 1_000)
    assert isinstance(hold, Hold)
    event = UsageEvent(ts_ms=1, job_id=d.job_id, feature="summarize")
    result = Result(id=d.job_id, status="ok", text="hi")
    settle = (budgets.settlement(hold, 0.3, called=True),)
    ending = outcomes.Ending(result, event, settle=settle)

    other = Queue(redis, keys, ["normal"], "b", visibility_ms=60_000)
    assert await outcomes.finish(other, d, d.job_id, ending) is None  # not b's: nothing
    assert await redis.hmget(c.key, ["spent", "held"]) == [None, str(400_000_000)]

    assert await outcomes.finish(queue, d, d.job_id, ending) == []  # under half of the cap
    assert await redis.hmget(c.key, ["spent", "held"]) == [str(300_000_000), "0"]

    queue2, d2 = await pending(redis, keys)
    hold2 = await budgets.reserve([c], "h2", 0.4, 1_000)
    assert isinstance(hold2, Hold)
    settle2 = (budgets.settlement(hold2, 0.3, called=True),)
    ending2 = outcomes.Ending(result, event, settle=settle2)
    assert await outcomes.finish(queue2, d2, d2.job_id, ending2) == [1]  # 0.6 of the cap
    assert await redis.hget(c.key, "spent") == str(600_000_000)
