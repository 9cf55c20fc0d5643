"""Budget reservations and settlements in the fenced scripts (worker.fence, worker.budgets) on a
real Valkey: many workers reserving at once never pass a cap, a settlement counts once however
many of the end, the job boundary and a taker run it, holds an older tokenq wrote are expired
and settled by the fenced script too, the usage event's bytes are those a plain XADD writes,
and nothing applies twice after Valkey lost its scripts."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from producers import NewJob, Producer
from tests.conftest import ConfigFactory
from tests.helpers import cap, pending, sim_call
from tests.integration.conftest import RunWorker
from worker import jobrun, outcomes
from worker.budgets import Budgets, Hold
from worker.contract import Keys, Result, UsageEvent, to_fields
from worker.jobrun import Call, JobRun
from worker.queue import Delivery, Finish, Queue, flat
from worker.rollups import outcome_of

NANO = 1_000_000_000
SMALL = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 100}


@pytest.fixture
def budgets(redis: aioredis.Redis, make_config: ConfigFactory) -> Budgets:
    """Budgets over the repo's config as the tests run it."""
    cfg, _ = make_config()
    return Budgets(redis, cfg)


def ending(d: Delivery, budgets: Budgets, hold: Hold, cost: float) -> outcomes.Ending:
    event = UsageEvent(ts_ms=1, job_id=d.job_id, feature="summarize")
    result = Result(id=d.job_id, status="ok", text="hi")
    return outcomes.Ending(result, event, settle=(budgets.settlement(hold, cost, called=True),))


async def test_many_workers_reserving_at_once_never_pass_the_cap(
    redis: aioredis.Redis, keys: Keys, budgets: Budgets
) -> None:
    c = cap(keys, 1.0)
    workers = [await pending(redis, keys, f"w{n}") for n in range(40)]

    async def save(n: int, queue: Queue, d: Delivery) -> bool | list[Any]:
        r = budgets.reservation([c], f"h{n}", 0.3, 1_000)
        return await queue.save_run(d, b'{"t0":1}', r)

    got = await asyncio.gather(*(save(n, q, d) for n, (q, d) in enumerate(workers)))
    taken = [n for n, reply in enumerate(got) if reply is True]
    assert len(taken) == 3 and all(isinstance(reply, list) for reply in got if reply is not True)
    assert await redis.hmget(c.key, ["held", "requests"]) == [str(int(0.9 * NANO)), "3"]
    assert sorted(await redis.zrange(c.holds, 0, -1)) == sorted(f"h{n}:300000000" for n in taken)
    runs = [await redis.hget(keys.state(d.job_id), "run") for _, d in workers]
    assert [n for n, run in enumerate(runs) if run is not None] == taken  # refused: no run


async def test_the_fenced_reservation_expires_the_holds_of_both_formats(
    redis: aioredis.Redis, keys: Keys, budgets: Budgets
) -> None:
    c = cap(keys, 10.0)
    (queue, d) = await pending(redis, keys)
    # An older tokenq's hold (amount in the hash) and a current one, both past their expiry.
    await redis.hset(c.key, mapping={"held": 3 * NANO, "requests": 2, "h:old": NANO})
    await redis.zadd(c.holds, {"old": 2_000, f"new:{2 * NANO}": 2_000})
    r = budgets.reservation([c], "now", 1.0, 3_000)
    assert await queue.save_run(d, b'{"t0":1}', r) is True
    assert sorted(await redis.hkeys(c.key)) == ["held", "requests"]
    assert await redis.hget(c.key, "held") == str(NANO)
    assert await redis.zrange(c.holds, 0, -1) == [f"now:{NANO}"]


async def test_a_jobs_end_settles_a_hold_an_older_tokenq_wrote(
    redis: aioredis.Redis, keys: Keys, budgets: Budgets
) -> None:
    c = cap(keys, 10.0)
    (queue, d) = await pending(redis, keys)
    await redis.hset(c.key, mapping={"held": NANO, "requests": 1, "h:old": NANO})
    await redis.zadd(c.holds, {"old": 10**13})
    end = ending(d, budgets, Hold("old", (c,), 1.0), 0.25)
    assert await outcomes.finish(queue, d, d.job_id, end) == []
    assert await redis.hgetall(c.key) == {"held": "0", "requests": "1", "spent": str(NANO // 4)}
    assert await redis.zcard(c.holds) == 0


async def test_a_call_is_settled_once_by_the_end_and_the_job_boundary_in_either_order(
    redis: aioredis.Redis, keys: Keys, budgets: Budgets
) -> None:
    c = cap(keys, 10.0)
    for boundary_first in (False, True):
        (queue, d) = await pending(redis, keys)
        hold = await budgets.reserve([c], f"h{boundary_first}", 0.5, 1_000)
        assert isinstance(hold, Hold)
        if boundary_first:
            await budgets.settle(hold, 0.25, called=True)
        assert await outcomes.finish(queue, d, d.job_id, ending(d, budgets, hold, 0.25)) == []
        # The end's reply lost: written again (refused by the fence), then the job boundary.
        assert await outcomes.finish(queue, d, d.job_id, ending(d, budgets, hold, 0.25)) is None
        await budgets.settle(hold, 0.25, called=True)
    assert await redis.hmget(c.key, ["spent", "held", "requests"]) == [str(NANO // 2), "0", "2"]
    assert await redis.zcard(c.holds) == 0


async def test_a_taker_settles_a_hold_at_the_reservation_its_run_recorded(
    redis: aioredis.Redis, keys: Keys, budgets: Budgets
) -> None:
    c = cap(keys, 10.0)
    worst = 0.1 + 0.2 + 1e-13  # a float with a long repr: the run's JSON keeps it exactly
    r = budgets.reservation([c], "lost", worst, 1_000)
    assert (await budgets.reserve([c], "lost", worst, 1_000)) == r.hold
    call = Call(model="m", tier="t", started_ms=1, reserved_usd=worst, hold="lost",
                hold_keys=[c.key])  # fmt: skip
    stored = jobrun.decode(jobrun.encode(JobRun(first_ms=1, calls=[call])), first_ms=1)
    [sent] = stored.in_flight()
    async with redis.pipeline(transaction=True) as tx:
        await budgets.settle_lost_into(tx, sent.hold, sent.hold_keys, sent.reserved_usd)
        await tx.execute()
    assert await redis.hmget(c.key, ["spent", "held"]) == [str(round(worst * NANO)), "0"]
    assert await redis.zcard(c.holds) == 0


async def test_an_events_bytes_not_utf8_are_those_a_plain_xadd_writes(
    redis: aioredis.Redis, keys: Keys, valkey_url: str
) -> None:
    queue, d = await pending(redis, keys)
    odd = b"\xff\xfe caf\xc3\xa9 \xe9t\xe9".decode("utf-8", "surrogateescape")
    event = to_fields(UsageEvent(ts_ms=1, job_id=d.job_id, feature=odd, tenant=odd * 30,
                                 message=odd * 3000))  # fmt: skip
    result = msgspec.json.encode(Result(id=d.job_id, status="ok", text="hi"))
    assert await queue.finish(d, d.job_id, Finish(result, event, None, None, rollup=True))
    await redis.xadd(f"{keys.prefix}:plain", dict(event))  # type: ignore[arg-type]
    # What the fenced script packed for the rollups before the event travelled packed.
    before: Any = await redis.eval("return cmsgpack.pack(ARGV)", 0, *flat(event))
    raw = aioredis.Redis.from_url(valkey_url)  # bytes as stored
    try:
        stored: Any = [await raw.xrange(key) for key in (keys.usage, f"{keys.prefix}:plain")]
        [pushed] = await raw.lrange(keys.rollup_queue, 0, -1)
    finally:
        await raw.aclose()
    [[(_, written)], [(_, plain)]] = stored
    assert list(written.items()) == list(plain.items())
    assert outcome_of(pushed) == outcome_of(before) == event


async def test_nothing_applies_twice_when_valkey_lost_its_scripts(
    redis: aioredis.Redis, keys: Keys, budgets: Budgets
) -> None:
    c = cap(keys, 10.0)
    (queue, d) = await pending(redis, keys)
    await queue.trips.load()
    await redis.script_flush()  # a restart
    r = budgets.reservation([c], "h1", 0.5, 1_000)
    assert await queue.save_run(d, b'{"t0":1}', r) is True
    assert await redis.hmget(c.key, ["held", "requests"]) == [str(NANO // 2), "1"]
    await redis.script_flush()
    assert await outcomes.finish(queue, d, d.job_id, ending(d, budgets, r.hold, 0.25)) == []
    assert await redis.hmget(c.key, ["spent", "held"]) == [str(NANO // 4), "0"]
    assert await redis.xlen(keys.usage) == 1


async def test_every_paid_call_is_in_spent_once_with_escalations_on_two_workers(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # Each job's haiku answer is no JSON: it escalates to sonnet, so the first call is settled
    # before the second's reservation and the second with the job's end.
    cfg, _ = make_config(**{"features.summarize.expect": "json",
                            "features.summarize.daily_usd": 5.0})  # fmt: skip
    producer = Producer(redis, keys.prefix)
    plain = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 200}
    ids = await producer.submit_many([NewJob(feature="summarize", request=plain)] * 40)
    async with run_worker(cfg, concurrency=16), run_worker(cfg, concurrency=16):
        done = [await producer.result(i, timeout_s=30) for i in ids]
    assert all(r.tier == "sonnet" for r in done)
    ledger = sim_call(sim, "ledger")
    assert sum(m["requests"] for m in ledger["models"].values()) == 80
    day = time.strftime("%Y-%m-%d", time.gmtime())
    budget: Any = await redis.hgetall(keys.budget("feature:summarize", day))
    assert abs(int(budget["spent"]) / NANO - float(ledger["total_cost_usd"])) < 80e-9
    assert budget["held"] == "0" and budget["requests"] == "80"
    assert await redis.zcard(f"{keys.budget('feature:summarize', day)}:holds") == 0


async def test_a_reservation_whose_reply_was_lost_is_given_back_before_the_retry(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # The run saved with the call's reservation is applied, but its reply never comes back (the
    # connection dropped): the call is prepared again with a new reservation. The first one must
    # not stay held, nor count a request the job never made.
    cfg, _ = make_config(**{"features.summarize.daily_usd": 5.0})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg) as w:
        save_run, lost = w.queue.save_run, list[str]()

        async def reply_lost(d: Delivery, run: bytes, r: Any = None) -> bool | list[Any]:
            got = await save_run(d, run, r)
            if r is not None and not lost:
                lost.append(r.hold_id)
                raise RedisConnectionError("connection reset by peer")
            return got

        monkeypatch.setattr(w.queue, "save_run", reply_lost)
        done = await producer.result(await producer.submit("summarize", SMALL), timeout_s=20)
    assert done.status == "ok" and lost
    day = time.strftime("%Y-%m-%d", time.gmtime())
    budget: Any = await redis.hgetall(keys.budget("feature:summarize", day))
    assert budget["held"] == "0" and budget["requests"] == "1"
    billed = float(sim_call(sim, "ledger")["total_cost_usd"])
    assert abs(int(budget["spent"]) / NANO - billed) < 1e-9
    assert await redis.zcard(f"{keys.budget('feature:summarize', day)}:holds") == 0


async def test_an_alert_that_cannot_be_written_after_the_end_is_a_warning_not_a_failure(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory, run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # The job's end settles its call and reports the cap's alert level crossed; writing the
    # alert then fails on Redis. The job has ended: a warning, not "failed unexpectedly".
    cfg, _ = make_config(**{"features.summarize.daily_usd": 5.0, "budgets.alert_at": 0.000001})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg) as w:
        tried: list[str] = []

        async def broken(c: Any, cap: Any) -> None:
            tried.append(cap.key)
            raise RedisConnectionError("connection reset by peer")

        monkeypatch.setattr(w.caller, "_alert", broken)
        with caplog.at_level(logging.WARNING, logger="tokenq"):
            done = await producer.result(await producer.submit("summarize", SMALL), timeout_s=20)
    assert done.status == "ok" and tried
    assert "writing a budget alert failed" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
