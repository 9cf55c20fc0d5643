"""A worker presumed dead that is in fact alive (its renewals stopped for longer than the
visibility timeout: a Redis outage, a long pause) must not write anything for a job another
worker has taken over: not its end, not its deferral, not its run, and its renewals must not
take the job back. Otherwise the job ends twice: two results, two usage events."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import msgspec
import pytest
import redis.asyncio as aioredis

from producers import Producer
from tests.conftest import ConfigFactory
from tests.helpers import add, entries, eventually, pending_count, sim_call, sim_is, usage_events
from tests.integration.conftest import RunWorker
from worker import jobrun
from worker.admission import admit
from worker.calls import Caller, CallFor
from worker.contract import GROUP, Keys, Result, UsageEvent, to_fields
from worker.jobrun import Call, JobRun
from worker.queue import Delivery, Finish, Queue

SMALL = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 200}
HELLO = json.dumps({"messages": [{"role": "user", "content": "Hello there"}]})


def ending(job_id: str, text: str) -> Finish:
    result = msgspec.json.encode(Result(id=job_id, status="ok", text=text))
    event = UsageEvent(ts_ms=1, job_id=job_id, feature="summarize")
    return Finish(result, to_fields(event), None)


async def taken_over(redis: aioredis.Redis, keys: Keys) -> tuple[Queue, Queue, Delivery]:
    """Worker a read the job; worker b took it over (its idle time passed the timeout)."""
    qa, qb = (Queue(redis, keys, ["normal"], c, visibility_ms=1) for c in ("a", "b"))
    await qa.ensure_groups()
    entry = await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO})
    [d] = await qa.read(1, 100)
    got: Any = await redis.xclaim(keys.jobs("normal"), GROUP, "b", 0, [entry])
    assert got and d.entry_id == entry
    return qa, qb, d


async def test_the_first_worker_cannot_finish_a_job_taken_over(
    redis: aioredis.Redis, keys: Keys
) -> None:
    qa, qb, d = await taken_over(redis, keys)
    assert not await qa.finish(d, d.job_id, ending(d.job_id, "from a"))
    assert await redis.get(keys.result(d.job_id)) is None
    assert await entries(redis, keys.usage) == []
    assert await qb.finish(d, d.job_id, ending(d.job_id, "from b"))
    assert json.loads(await redis.get(keys.result(d.job_id)) or "{}")["text"] == "from b"
    assert len(await entries(redis, keys.usage)) == 1
    assert not await qb.finish(d, d.job_id, ending(d.job_id, "again"))  # once only


async def test_the_first_worker_cannot_defer_renew_or_record_a_job_taken_over(
    redis: aioredis.Redis, keys: Keys
) -> None:
    qa, _, d = await taken_over(redis, keys)
    assert not await qa.defer(d, d.job_id, 10**13)
    assert await redis.zcard(keys.deferred) == 0
    assert not await qa.save_run(d, b'{"t0":1}')
    assert await redis.hget(keys.state(d.job_id), "run") is None
    await qa.renew([d])
    rows: Any = await redis.xpending_range(keys.jobs("normal"), GROUP, "-", "+", 10)
    assert [r["consumer"] for r in rows] == ["b"]  # not taken back


async def test_a_live_worker_whose_job_was_taken_over_writes_nothing_and_its_call_counts_once(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # Worker a is alive and waiting for a slow answer, but its renewals have stopped (as
    # through an outage of its own link to Redis); worker b takes the job over after the
    # visibility timeout, reports a's call as an orphan, calls again and ends the job. When
    # a's answer comes, a must write nothing: one result, one job event, and a's paid call in
    # the accounts once (b's orphan estimate; the budget settled once, not at both).
    cfg, _ = make_config(**{"queue.visibility_timeout_s": 1.0,
                            "features.summarize.daily_usd": 1.0})  # fmt: skip
    sim_call(sim, "config", {"latency_ms": 3000})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg, concurrency=1) as a:  # busy: a does not reclaim its own entry

        async def stalled(_: Any) -> None:
            return None

        monkeypatch.setattr(a.queue, "renew", stalled)
        job_id = await producer.submit("summarize", SMALL)
        await eventually(lambda: sim_is(sim, in_flight=1), what="a's call in flight")
        async with run_worker(cfg) as b:
            result = await producer.result(job_id, timeout_s=20)
            assert result.status == "ok"
            await eventually(lambda: sim_is(sim, in_flight=0, requests=2), what="both answers")
            assert b.queue.consumer != a.queue.consumer
    # a has stopped, after its answer came and its finishing write was refused.
    events = await usage_events(redis, keys)
    assert sorted(e.kind for e in events) == ["job", "orphan"]
    [job] = [e for e in events if e.kind == "job"]
    [orphan] = [e for e in events if e.kind == "orphan"]
    assert job.job_id == orphan.job_id == job_id
    assert job.attempt == 2 and job.status == "ok"
    billed = float(sim_call(sim, "ledger")["total_cost_usd"])
    assert job.cost_usd < billed <= job.cost_usd + orphan.reserved_usd
    day = time.strftime("%Y-%m-%d", time.gmtime())
    budget: Any = await redis.hgetall(f"{keys.prefix}:budget:feature:summarize:{day}")
    spent = int(budget["spent"]) / 1e9
    assert int(budget["held"]) == 0
    assert billed - 1e-9 <= spent <= job.cost_usd + orphan.reserved_usd + 1e-9  # a's once
    assert await redis.xlen(keys.dead) == 0
    assert await pending_count(redis, keys.jobs("normal")) == 0


async def test_only_the_worker_holding_the_job_reports_a_lost_call(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory,
    client: anthropic.AsyncAnthropic,
) -> None:  # fmt: skip
    # Worker a's call was cancelled or timed out after worker b took the job over: a must not
    # report it (nor write the run); b, which holds the job, reports it once.
    cfg, _ = make_config()
    qa, qb, d = await taken_over(redis, keys)
    lost = Call(model="claude-haiku-5-5", tier="fast", started_ms=1, estimate_usd=0.001,
                reserved_usd=0.002)  # fmt: skip
    run = JobRun(first_ms=1, tier="fast", calls=[lost])
    raw = jobrun.encode(run)
    await redis.hset(keys.state(d.job_id), "run", raw)
    job = admit(d.fields, cfg).job

    def call_for() -> CallFor:
        mine = jobrun.decode(raw, first_ms=1)
        return CallFor(d, job, mine, 0, stored=raw.decode())

    a = call_for()
    await Caller(cfg, qa, client).report_lost(a, a.run.in_flight())
    assert await entries(redis, keys.usage) == []
    assert await redis.hget(keys.state(d.job_id), "run") == raw.decode()
    b = call_for()
    await Caller(cfg, qb, client).report_lost(b, b.run.in_flight())
    [(_, event)] = await entries(redis, keys.usage)
    assert event["kind"] == "orphan" and event["job_id"] == d.job_id
    assert [c.state for c in b.run.calls] == ["lost"]


async def test_a_worker_that_reclaims_its_own_job_in_flight_does_not_run_it_twice(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # After an outage longer than the visibility timeout every pending entry looks idle, its
    # holder's own included: a worker's reclaim hands it back a job it is still running. The
    # fence cannot tell two tasks of one consumer apart, so the worker must not start it
    # again (a second call, an orphan event for a call that was in fact answered).
    cfg, _ = make_config(**{"queue.visibility_timeout_s": 1.0})
    sim_call(sim, "config", {"latency_ms": 3000})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg, concurrency=4) as w:

        async def stalled(_: Any) -> None:
            return None

        monkeypatch.setattr(w.queue, "renew", stalled)
        job_id = await producer.submit("summarize", SMALL)
        result = await producer.result(job_id, timeout_s=20)
    assert result.status == "ok"
    events = await usage_events(redis, keys)
    assert [(e.kind, e.attempt) for e in events] == [("job", 1)]
    assert sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]["requests"] == 1
