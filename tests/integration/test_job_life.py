"""One job, one life: attempts, timings and spend that survive deferral, escalation, faults,
cancellation and the death of a worker (real Valkey, the simulator, the SDK).

Each test reproduces one way a job's history used to be lost, and asserts what a producer or
an operator sees: results, usage events, dead letters and the simulator's ledger.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from producers import NewJob, Producer
from tests.conftest import ConfigFactory
from tests.helpers import (
    eventually,
    pending_count,
    read_result,
    run,
    sim_call,
    sim_is,
    sim_requests,
    stream_at_least,
    usage_events,
)
from tests.integration.conftest import RunWorker, SpawnWorker
from tests.integration.test_redis_trouble import start_valkey
from worker.contract import Keys, UsageEvent
from worker.deadletters import dead_letters
from worker.embedded import connect, free_port

SMALL = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 200}
NOT_JSON = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 200}


def ledger_cost(sim: str) -> float:
    return float(sim_call(sim, "ledger")["total_cost_usd"])


def of_kind(events: list[UsageEvent], kind: str) -> list[UsageEvent]:
    return [e for e in events if e.kind == kind]


async def due_now(redis: aioredis.Redis, keys: Keys) -> None:
    """Make every deferred job due (as the clock reaching its time would)."""
    members: Any = await redis.zrange(keys.deferred, 0, -1)
    for member in members:
        await redis.zadd(keys.deferred, {member: 0})


async def test_max_attempts_counts_calls_across_breaker_deferrals(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # Every call fails; the breaker opens after each failure and defers the job. The job must
    # still be dead-lettered after max_attempts calls in all, not start over at each return.
    cfg, _ = make_config(**{
        "queue.max_attempts": 3, "breakers.fail_max": 1, "breakers.reset_timeout_s": 0.2,
        "breakers.half_open_probes": 1, "breakers.success_threshold": 1,
    })  # fmt: skip
    sim_call(sim, "config", {"fault_rate": {"529": 1.0}})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        job_id = await producer.submit("summarize", SMALL)
        result = await producer.result(job_id, timeout_s=30)
    assert result.status == "error" and result.error is not None
    assert result.error.type == "max_attempts", result.error
    assert sim_call(sim, "ledger")["faults"]["529"] == 3
    [(_, dead)] = await dead_letters(redis, keys)
    assert dead["attempts"] == "3"
    [event] = of_kind(await usage_events(redis, keys), "job")
    assert event.attempt == 3
    assert event.deferred_ms > 0 and event.queue_ms >= event.deferred_ms


async def test_a_deferred_job_keeps_its_attempt_queue_time_and_deferred_time(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, path = make_config(**{"features.summarize.daily_usd": 0.00001,
                               "features.summarize.budget_policy": "defer"})  # fmt: skip
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg) as worker:
        submitted = time.time()
        job_id = await producer.submit("summarize", SMALL)

        async def deferred() -> bool:
            return int(await redis.zcard(keys.deferred)) == 1

        await eventually(deferred, what="the job in the deferred set")
        seen = time.time()
        await asyncio.sleep(0.5)  # time passes in the deferred set (measured, not hoped for)
        path.write_text(path.read_text().replace("daily_usd = 1e-05", "daily_usd = 1.0"))
        worker.config_file = str(path)
        assert worker.reload()
        released = time.time()
        await due_now(redis, keys)
        result = await producer.result(job_id, timeout_s=10)
    assert result.status == "ok"
    [event] = of_kind(await usage_events(redis, keys), "job")
    assert event.attempt == 1
    assert event.deferred_ms >= (released - seen) * 1000 - 5
    assert event.queue_ms >= event.deferred_ms
    assert event.queue_ms >= (released - submitted) * 1000 - 5


async def test_an_answer_whose_escalation_a_budget_refuses_is_delivered_and_paid_for(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # A haiku call fits the cap; the escalation to sonnet (200 x $10/M output) does not.
    cfg, _ = make_config(**{"features.summarize.expect": "json",
                            "features.summarize.daily_usd": 0.001})  # fmt: skip
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        result = await producer.result(await producer.submit("summarize", NOT_JSON), 10)
    assert result.status == "error" and result.error is not None
    assert result.error.type == "check_failed", result.error
    assert result.text and result.tier == "haiku"  # the answer that was paid for
    [event] = of_kind(await usage_events(redis, keys), "job")
    assert event.error_type == "check_failed"
    assert abs(event.cost_usd - ledger_cost(sim)) < 1e-12 and event.cost_usd > 0
    assert "features.summarize.daily_usd" in event.route_reason


async def test_a_deferred_escalation_resumes_on_the_dearer_tier_without_paying_twice(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, path = make_config(**{"features.summarize.expect": "json",
                               "features.summarize.daily_usd": 0.001,
                               "features.summarize.budget_policy": "defer"})  # fmt: skip
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg) as worker:
        job_id = await producer.submit("summarize", NOT_JSON)

        async def deferred() -> bool:
            return int(await redis.zcard(keys.deferred)) == 1

        await eventually(deferred, what="the escalation put off")
        path.write_text(path.read_text().replace("daily_usd = 0.001", "daily_usd = 1.0"))
        worker.config_file = str(path)
        assert worker.reload()
        await due_now(redis, keys)
        result = await producer.result(job_id, timeout_s=10)
    assert result.tier == "sonnet"
    models = sim_call(sim, "ledger")["models"]
    assert models["claude-haiku-5-5"]["requests"] == 1  # not called again after the deferral
    assert models["claude-sonnet-5-5"]["requests"] == 1
    [event] = of_kind(await usage_events(redis, keys), "job")
    assert abs(event.cost_usd - ledger_cost(sim)) < 1e-12
    assert event.attempt == 2 and event.deferred_ms > 0
    assert "escalated to sonnet" in event.route_reason


async def test_an_answer_whose_escalation_the_deadline_refuses_keeps_its_cost(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.expect": "json"})
    sim_call(sim, "config", {"latency_ms": 800})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        deadline = int(time.time() * 1000) + 400  # passes while the first call is answered
        job_id = await producer.submit("summarize", NOT_JSON, deadline_ms=deadline)
        result = await producer.result(job_id, timeout_s=10)
    assert result.status == "error" and result.error is not None
    assert result.error.type == "check_failed" and result.text
    [event] = of_kind(await usage_events(redis, keys), "job")
    assert abs(event.cost_usd - ledger_cost(sim)) < 1e-12 and event.cost_usd > 0
    assert "deadline" in event.route_reason


async def test_a_call_cancelled_after_grace_is_settled_at_its_reservation_and_reported(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"worker.grace_s": 0.2, "queue.visibility_timeout_s": 1.0,
                            "features.summarize.daily_usd": 1.0})  # fmt: skip
    sim_call(sim, "config", {"latency_ms": 1500})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        job_id = await producer.submit("summarize", SMALL)
        await eventually(lambda: sim_is(sim, in_flight=1), what="the call in flight")
    # The worker stopped: its call was cancelled after grace_s, and the API still bills it.
    await eventually(lambda: sim_is(sim, in_flight=0, requests=1), what="the call billed")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    budget: Any = await redis.hgetall(f"{keys.prefix}:budget:feature:summarize:{day}")
    assert int(budget["held"]) == 0 and int(budget["spent"]) > 0  # settled, not at zero
    reserved_nano = int(budget["spent"])
    async with run_worker(cfg):  # another worker takes the job over
        result = await producer.result(job_id, timeout_s=20)
    assert result.status == "ok"
    events = await usage_events(redis, keys)
    [orphan] = of_kind(events, "orphan")
    [job] = of_kind(events, "job")
    assert orphan.job_id == job_id and orphan.model == "claude-haiku-5-5"
    assert abs(orphan.reserved_usd * 1e9 - reserved_nano) <= 1
    assert 0 < orphan.cost_usd <= orphan.reserved_usd
    assert job.attempt == 2  # the lost call was a call started
    billed = ledger_cost(sim)
    assert job.cost_usd <= billed <= job.cost_usd + orphan.reserved_usd


async def test_calls_in_flight_when_a_worker_is_killed_are_reported_as_orphans(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    spawn_worker: SpawnWorker,
) -> None:  # fmt: skip
    _, path = make_config(**{"queue.visibility_timeout_s": 1.0})
    sim_call(sim, "config", {"latency_ms": 1500})
    producer = Producer(redis, keys.prefix)
    ids = await producer.submit_many(
        NewJob(feature="summarize", request=SMALL, id=f"o-{n}") for n in range(5)
    )
    victim = spawn_worker(path)
    await eventually(lambda: sim_is(sim, in_flight=5), what="5 calls in flight")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    spawn_worker(path)
    await eventually(lambda: stream_at_least(redis, keys.usage, 10), what="10 events",
                     timeout_s=30)  # fmt: skip
    events = await usage_events(redis, keys)
    jobs, orphans = of_kind(events, "job"), of_kind(events, "orphan")
    assert sorted(e.job_id for e in jobs) == sorted(ids)
    assert sorted(e.job_id for e in orphans) == sorted(ids)
    assert all(e.attempt == 2 and e.status == "ok" for e in jobs)
    await eventually(lambda: sim_is(sim, in_flight=0), what="nothing in flight")
    billed = ledger_cost(sim)
    paid = sum(e.cost_usd for e in jobs)
    assert paid < billed <= paid + sum(e.reserved_usd for e in orphans)
    assert await pending_count(redis, keys.jobs("normal")) == 0


async def test_a_redis_restart_after_the_answer_repeats_only_the_writes(
    tmp_path: Path, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # A feature with a response cache and de-duplication: the answer is stored in Redis
    # after the call, and that write fails while Redis is away.
    port, data = free_port(), tmp_path / "valkey"
    url = f"redis://127.0.0.1:{port}/0"
    cfg, _ = make_config(**{"redis.url": url})
    keys = Keys(cfg.prefix)
    server = start_valkey(port, data)
    redis = connect(url, block_s=5)
    try:
        producer = Producer(redis, keys.prefix)
        ids = await producer.submit_many(
            NewJob(feature="support_faq", request={"messages": [
                {"role": "user", "content": f"Where is my parcel number {n}?"}]})
            for n in range(5)
        )  # fmt: skip
        sim_call(sim, "config", {"latency_ms": 1500})
        async with run_worker(cfg, concurrency=10):
            await eventually(lambda: sim_is(sim, in_flight=5), what="5 calls in flight")
            server.terminate()
            server.wait(timeout=10)
            await eventually(lambda: sim_is(sim, in_flight=0, requests=5), what="5 answers")
            server = start_valkey(port, data)
            await eventually(lambda: stream_at_least(redis, keys.usage, 5), what="5 events",
                             timeout_s=30)  # fmt: skip
        events = of_kind(await usage_events(redis, keys), "job")
        assert sorted(e.job_id for e in events) == sorted(ids)
        assert {(e.status, e.attempt) for e in events} == {("ok", 1)}
        assert sim_requests(sim) == 5  # the answers were written, not fetched again
        for job_id in ids:
            assert (await read_result(redis, keys, job_id)).status == "ok"
    finally:
        await redis.aclose()
        server.terminate()
        server.wait(timeout=10)


async def test_the_spend_cap_429_stops_the_fleet_until_resumed_without_burning_attempts(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:

    cfg, path = make_config(**{"queue.max_attempts": 2})
    sim_call(sim, "config", {"spend_cap_reached": True})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg, concurrency=1):
        ids = [await producer.submit("summarize", SMALL)]
        ids.append(await producer.submit("summarize", SMALL, tier="sonnet"))

        async def both_deferred() -> bool:
            return int(await redis.zcard(keys.deferred)) == 2

        await eventually(both_deferred, what="both jobs put off", timeout_s=15)
        faults = sim_call(sim, "ledger")["faults"]
        assert faults == {"spend-cap": 1}, faults  # the second job made no call
        code, out, err = await run(sys.executable, "-m", "worker", "--config", str(path),
                                   "budgets")  # fmt: skip
        assert code == 0 and "spend limit" in out, (out, err)
        sim_call(sim, "config", {"spend_cap_reached": False})
        code, out, err = await run(sys.executable, "-m", "worker", "--config", str(path),
                                   "budgets", "resume")  # fmt: skip
        assert code == 0, err
        await due_now(redis, keys)
        done = [await producer.result(i, timeout_s=15) for i in ids]
    assert [r.status for r in done] == ["ok", "ok"]
    assert await dead_letters(redis, keys) == []
    events = await usage_events(redis, keys)
    assert [e.attempt for e in of_kind(events, "job")] == [1, 1]
    [alert] = of_kind(events, "alert")
    assert alert.error_type == "spend_limit" and "tokenq budgets resume" in alert.message


async def test_an_answer_that_still_fails_its_check_is_an_error_with_the_answer(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.expect": "json"})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        result = await producer.result(await producer.submit("summarize", NOT_JSON), 10)
    assert result.status == "error" and result.error is not None
    assert result.error.type == "check_failed"
    assert "answer is not JSON" in result.error.message
    assert result.tier == "sonnet" and result.text and json.dumps(result.content)
    [event] = of_kind(await usage_events(redis, keys), "job")
    assert (event.status, event.error_type, event.attempt) == ("error", "check_failed", 2)
    assert abs(event.cost_usd - ledger_cost(sim)) < 1e-12
    assert await dead_letters(redis, keys) == []  # answered: nothing to replay


async def test_a_probe_refused_by_a_budget_before_its_call_frees_its_slot(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"breakers.reset_timeout_s": 1.0, "breakers.half_open_probes": 1,
                            "features.summarize.daily_usd": 0.0000001})  # fmt: skip
    long_ago = int(time.time() * 1000) - 60_000  # open, and due for a probe
    await redis.hset(f"{keys.prefix}:breaker:feature:summarize", mapping={
        "state": "open", "fails": 5, "successes": 0, "opened_at": long_ago,
    })  # fmt: skip
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        result = await producer.result(await producer.submit("summarize", SMALL), 10)
        assert result.error is not None and result.error.type == "budget_exceeded"
        probes = f"{keys.prefix}:breaker:feature:summarize:probes"
        assert await redis.zcard(probes) == 0  # the probe made no call: its slot is free
    assert sim_requests(sim) == 0
