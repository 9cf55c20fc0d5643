"""Batch windows against a real Valkey and the simulator's Message Batches (worker.batcher)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import urllib.request
from typing import Any

import anthropic
import httpx2
import pytest
import redis.asyncio as aioredis

from tests.conftest import ConfigFactory
from tests.helpers import (
    FAST_BATCHES,
    eventually,
    pending_count,
    read_result,
    run,
    sim_call,
    usage_events,
)
from tests.integration.conftest import RunWorker, SpawnWorker
from worker.batcher import custom_id
from worker.contract import Keys
from worker.operators import batch_rows
from worker.worker import build_worker

HELLO = json.dumps({"messages": [{"role": "user", "content": "Hello there, batch."}]})


async def submit(redis: aioredis.Redis, keys: Keys, n: int, priority: str = "low",
                 **extra: str) -> list[str]:  # fmt: skip
    ids = [extra.pop("id")] if "id" in extra else [f"job-{priority}-{i}" for i in range(n)]
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            fields: dict[Any, Any] = {"feature": "summarize", "request": HELLO, "id": job_id}
            fields.update(extra)
            pipe.xadd(keys.jobs(priority), fields)
        await pipe.execute()
    return ids


async def all_results(redis: aioredis.Redis, keys: Keys, ids: list[str]) -> bool:
    return bool(await redis.exists(*(keys.result(i) for i in ids)) == len(ids))


async def test_low_jobs_go_through_one_batch_at_half_price(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.2})
    cfg, _ = make_config(**FAST_BATCHES)
    ids = await submit(redis, keys, 20)
    async with run_worker(cfg):
        await eventually(lambda: all_results(redis, keys, ids), what="20 batch results")
    for job_id in ids:
        result = await read_result(redis, keys, job_id)
        assert result.status == "ok" and result.mode == "batch", result
    events = await usage_events(redis, keys)
    assert sorted(e.job_id for e in events) == sorted(ids)
    assert {e.mode for e in events} == {"batch"}
    ledger = sim_call(sim, "ledger")
    assert sum(m["requests"] for m in ledger["batch"].values()) == 20
    assert sum(m["requests"] for m in ledger["models"].values()) == 0
    ours = sum(e.cost_usd for e in events)
    assert abs(ours - ledger["total_cost_usd"]) < 1e-9


async def test_5000_jobs_become_batches_within_the_limits_one_result_each(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.2})
    cfg, _ = make_config(**FAST_BATCHES, **{"batch.max_requests": 1000, "batch.max_bytes": 250_000})
    ids = await submit(redis, keys, 5000)
    async with run_worker(cfg):
        await eventually(lambda: all_results(redis, keys, ids), what="5000 results", timeout_s=60)
    rows = await batch_rows(redis, keys)
    assert len(rows) >= 5 and all(r["state"] == "done" for r in rows), rows
    assert all(int(r["count"]) <= 1000 and int(r["bytes"]) <= 250_000 for r in rows), rows
    assert sum(int(r["succeeded"]) for r in rows) == 5000
    events = await usage_events(redis, keys)
    assert len(events) == 5000 and {e.job_id for e in events} == set(ids)
    assert {e.mode for e in events} == {"batch"}
    ledger = sim_call(sim, "ledger")
    assert sum(m["requests"] for m in ledger["batch"].values()) == 5000
    assert await redis.xlen(keys.jobs("low")) == 0
    assert await pending_count(redis, keys.jobs("low")) == 0


async def test_a_batcher_killed_while_polling_is_resumed_by_the_next(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    spawn_worker: SpawnWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 3600})
    _, path = make_config(**FAST_BATCHES)
    ids = await submit(redis, keys, 50)
    first = spawn_worker(path)

    async def submitted() -> bool:
        return any(r["state"] == "submitted" for r in await batch_rows(redis, keys))

    await eventually(submitted, what="a submitted batch")
    old_lease = await redis.get(keys.batcher_lease)
    first.send_signal(signal.SIGKILL)
    first.wait()
    spawn_worker(path)

    async def taken_over() -> bool:
        lease = await redis.get(keys.batcher_lease)
        return lease is not None and lease != old_lease

    # A new process: importing the SDK alone takes seconds on a loaded machine.
    await eventually(taken_over, what="a new batcher", timeout_s=30)
    assert len(sim_batches(sim)) == 1  # nothing submitted again
    sim_call(sim, "advance", {"seconds": 3600})
    await eventually(lambda: all_results(redis, keys, ids), what="50 results", timeout_s=20)
    assert len(sim_batches(sim)) == 1
    events = await usage_events(redis, keys)
    assert sorted(e.job_id for e in events) == sorted(ids)  # exactly one each
    assert {e.mode for e in events} == {"batch"}
    ledger = sim_call(sim, "ledger")
    assert sum(m["requests"] for m in ledger["batch"].values()) == 50


def sim_batches(sim: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{sim}/v1/messages/batches?limit=100",
        headers={"x-api-key": "test", "anthropic-version": "2026-10-21"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        data: list[dict[str, Any]] = json.loads(reply.read())["data"]
    return data


class LoseFirstCreate(httpx2.AsyncBaseTransport):
    """Passes requests through, but the answer to the first batch create is lost (or, with
    `before`, the create never reaches the API): the batcher cannot tell which."""

    def __init__(self, *, before: bool) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.before = before
        self.lost = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        create = request.method == "POST" and request.url.path == "/v1/messages/batches"
        if create and not self.lost:
            self.lost += 1
            if self.before:
                raise httpx2.ConnectError("connection refused (test)", request=request)
            response = await self.inner.handle_async_request(request)
            await response.aread()
            raise httpx2.ReadTimeout("answer lost (test)", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("before", [False, True], ids=["answer-lost", "never-sent"])
async def test_a_create_without_answer_is_found_or_sent_once(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, before: bool
) -> None:
    sim_call(sim, "config", {"batch_seconds": 0.2})
    cfg, _ = make_config(**FAST_BATCHES, **{"anthropic.timeout_s": 0.5})
    ids = await submit(redis, keys, 10)
    transport = LoseFirstCreate(before=before)
    client = anthropic.AsyncAnthropic(
        api_key="test", base_url=sim, max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport),
    )  # fmt: skip
    worker = build_worker(cfg, concurrency=8, client=client)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: all_results(redis, keys, ids), what="10 results")
    finally:
        worker.stop()
        await task
        await worker.aclose()
    assert transport.lost == 1
    assert len(sim_batches(sim)) == 1
    assert sorted(e.job_id for e in await usage_events(redis, keys)) == sorted(ids)


async def test_errored_items_are_retried_in_the_next_batch_then_dead_lettered(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.1, "batch_error_rate": 1.0})
    cfg, _ = make_config(**FAST_BATCHES, **{"queue.max_attempts": 2})
    ids = await submit(redis, keys, 5)
    async with run_worker(cfg):
        await eventually(lambda: all_results(redis, keys, ids), what="5 error results")
    for job_id in ids:
        result = await read_result(redis, keys, job_id)
        assert result.status == "error" and result.error is not None
        assert result.error.type == "max_attempts", result.error
        assert "batch item errored: api_error" in result.error.message
    rows = await batch_rows(redis, keys)
    assert [int(r["errored"]) for r in rows] == [5, 5]  # two batches, one attempt each
    dead = await redis.xlen(keys.dead)
    assert dead == 5


async def test_errored_items_can_be_retried_in_real_time(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.1, "batch_error_rate": 1.0})
    cfg, _ = make_config(**FAST_BATCHES, **{"batch.retry": "realtime"})
    ids = await submit(redis, keys, 5)
    async with run_worker(cfg):
        await eventually(lambda: all_results(redis, keys, ids), what="5 results")
    events = await usage_events(redis, keys)
    assert sorted(e.job_id for e in events) == sorted(ids)
    assert {(e.mode, e.status, e.attempt) for e in events} == {("realtime", "ok", 2)}


async def test_a_request_the_api_refuses_is_dead_lettered_with_its_error(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.1})
    # A model the API does not know (tokenq's own checks pass every request it would refuse
    # for its content): the item comes back errored, not_found_error.
    ghost = 'models."claude-ghost-1".'
    prices = {ghost + name: 1.0 for name in ("input_usd_per_mtok", "output_usd_per_mtok",
              "cache_write_5m_usd_per_mtok", "cache_write_1h_usd_per_mtok",
              "cache_read_usd_per_mtok")}  # fmt: skip
    cfg, _ = make_config(**FAST_BATCHES, **prices, **{"tiers.ghost": "claude-ghost-1"})
    fields = {"feature": "summarize", "request": HELLO, "id": "bad", "tier": "ghost"}
    await redis.xadd(keys.jobs("low"), fields)  # type: ignore[arg-type]
    async with run_worker(cfg):
        await eventually(lambda: all_results(redis, keys, ["bad"]), what="the error result")
    result = await read_result(redis, keys, "bad")
    assert result.error is not None and result.error.type == "invalid_request"
    assert "model: claude-ghost-1" in result.error.message


async def test_expired_items_go_back_to_the_queue_without_burning_an_attempt(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.1, "batch_expiry_rate": 1.0})
    cfg, _ = make_config(**FAST_BATCHES)
    ids = await submit(redis, keys, 5)
    async with run_worker(cfg):

        async def expired_once() -> bool:
            return any(int(r.get("expired", 0)) == 5 for r in await batch_rows(redis, keys))

        await eventually(expired_once, what="a batch of 5 expired items")
        sim_call(sim, "config", {"batch_expiry_rate": 0.0})
        await eventually(lambda: all_results(redis, keys, ids), what="5 results")
    events = await usage_events(redis, keys)
    assert sorted(e.job_id for e in events) == sorted(ids)
    assert {(e.mode, e.status) for e in events} == {("batch", "ok")}
    assert max(e.attempt for e in events) <= 2  # an expiry may be refunded after the next read


async def test_a_deadline_before_the_window_ends_runs_in_real_time(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.1})
    cfg, _ = make_config(**FAST_BATCHES, **{"batch.completion_s": 3600.0})
    soon = str(int(time.time() * 1000) + 60_000)  # before the window's end (1 h away)
    late = str(int(time.time() * 1000) + 7_200_000)  # after it
    await submit(redis, keys, 1, deadline_ms=soon, id="soon")
    await submit(redis, keys, 1, deadline_ms=late, id="late")
    async with run_worker(cfg):
        await eventually(lambda: all_results(redis, keys, ["soon", "late"]), what="2 results")
    assert (await read_result(redis, keys, "soon")).mode == "realtime"
    assert (await read_result(redis, keys, "late")).mode == "batch"


async def test_tokenq_batches_lists_and_cancels(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 3600})
    cfg, path = make_config(**FAST_BATCHES)
    ids = await submit(redis, keys, 3)
    tokenq = [sys.executable, "-m", "worker", "--config", str(path), "batches"]
    async with run_worker(cfg):

        async def submitted() -> bool:
            return any(r["state"] == "submitted" for r in await batch_rows(redis, keys))

        await eventually(submitted, what="a submitted batch")
        code, out, _ = await run(*tokenq, "--json")
        assert code == 0, out
        row = json.loads(out.splitlines()[0])
        assert row["state"] == "submitted" and row["count"] == "3", row
        code, out, err = await run(*tokenq, "cancel", row["api_id"])
        assert code == 0 and "canceling" in out, (out, err)
        # The item in flight finishes (the batch ends then); the canceled ones go back to
        # their stream and into the next batch.
        sim_call(sim, "config", {"batch_seconds": 0.1})
        sim_call(sim, "advance", {"seconds": 3600})
        await eventually(lambda: all_results(redis, keys, ids), what="3 results")
        code, out, _ = await run(*tokenq)
    assert code == 0 and "done" in out and "canceled 2" in out, out
    assert len(sim_batches(sim)) == 2
    events = await usage_events(redis, keys)
    assert sorted(e.job_id for e in events) == sorted(ids)


async def test_a_job_id_the_api_refuses_as_custom_id_is_mapped(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.1})
    cfg, _ = make_config(**FAST_BATCHES)
    async with run_worker(cfg):
        # A realtime job takes the bare entry id 7-0; the low one runs as low:7-0 (a ':' is
        # not allowed in a custom_id, so it goes to the API hashed).
        await redis.xadd(keys.jobs("normal"), {"feature": "summarize", "request": HELLO}, id="7-0")
        await eventually(lambda: redis.exists(keys.result("7-0")), what="normal's result")
        await redis.xadd(keys.jobs("low"), {"feature": "summarize", "request": HELLO}, id="7-0")
        await submit(redis, keys, 1, id="tenant.acme/report#1")
        want = ["low:7-0", "tenant.acme/report#1"]
        await eventually(lambda: all_results(redis, keys, want), what="the batch results")
    for job_id in want:
        assert (await read_result(redis, keys, job_id)).mode == "batch"
    assert custom_id("low:7-0").startswith("h-") and custom_id("7-0") == "7-0"


async def test_a_529_on_batch_create_is_retried_soon_not_after_the_timeout(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    # A 529 answer means the batch was not created: there is nothing to look for, so the
    # batcher need not wait out anthropic.timeout_s (60 s here) before creating it again.
    sim_call(sim, "config", {"batch_seconds": 0.1, "fault_rate": {"batch-529": 1.0}})
    cfg, _ = make_config(**FAST_BATCHES, **{"anthropic.timeout_s": 60.0})
    ids = await submit(redis, keys, 3)
    async with run_worker(cfg):

        async def refused() -> bool:
            return int(sim_call(sim, "ledger")["faults"].get("batch-529", 0)) >= 1

        await eventually(refused, what="a create answered 529")
        sim_call(sim, "config", {"fault_rate": {}})
        await eventually(lambda: all_results(redis, keys, ids), what="3 results", timeout_s=15)
    assert len(sim_batches(sim)) == 1
    assert {e.mode for e in await usage_events(redis, keys)} == {"batch"}


async def test_a_batcher_that_lost_its_lease_hands_no_job_to_real_time(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory
) -> None:
    # A batcher learns it lost the lease only when it next renews or writes; meanwhile the
    # next batcher finds the same pending entries. Handing one over must be fenced too, or
    # both batchers start it in real time: two calls, two usage events.
    from worker.batcher import Batcher
    from worker.contract import BATCHER, GROUP
    from worker.lease import LeaseLost

    cfg, _ = make_config(**FAST_BATCHES)
    worker = build_worker(cfg, concurrency=8)
    adopted: list[str] = []
    try:
        await worker.queue.ensure_groups()
        await submit(redis, keys, 1, deadline_ms=str(int(time.time() * 1000) + 5000))
        batcher = Batcher(worker.queue, worker.client, lambda: cfg,
                          lambda d: adopted.append(d.entry_id), asyncio.Event())  # fmt: skip
        assert await batcher.lease.acquire(60_000)
        [d] = await batcher.queue.take("low", 10)
        await redis.set(keys.batcher_lease, "another-process")  # the lease moved on
        with pytest.raises(LeaseLost):
            await batcher._hand_over(d)
        rows: Any = await redis.xpending_range(keys.jobs("low"), GROUP, "-", "+", 10)
        assert [r["consumer"] for r in rows] == [BATCHER] and adopted == []  # still its own
        await redis.set(keys.batcher_lease, batcher.lease.token)  # held again: handed over
        await batcher._hand_over(d)
        rows = await redis.xpending_range(keys.jobs("low"), GROUP, "-", "+", 10)
        assert [r["consumer"] for r in rows] == [worker.queue.consumer]
        assert adopted == [d.entry_id]
    finally:
        await worker.aclose()


async def test_a_due_window_under_the_spend_stop_leaves_the_event_loop_free(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory
) -> None:
    # Under the organization's spend stop no batch is created, and the window stays due: the
    # batcher must wait for its next turn, not ask again at once (which never yielded: the
    # worker stopped reading and the batcher lease lapsed).
    from worker.batcher import Batcher

    cfg, _ = make_config(**FAST_BATCHES)
    worker = build_worker(cfg, concurrency=8)
    stopping = asyncio.Event()
    try:
        await worker.queue.ensure_groups()
        await submit(redis, keys, 3)
        await redis.set(keys.spend_stop, int(time.time() * 1000) + 3_600_000)
        batcher = Batcher(worker.queue, worker.client, lambda: cfg, lambda d: None, stopping)
        working = asyncio.create_task(batcher._work())

        async def due() -> bool:
            return batcher._due()

        await eventually(due, what="a due window", timeout_s=30)
        ticks = 0
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks >= 20, f"the event loop ran {ticks} times in 1 s beside the batcher"
        assert len(batcher.waiting) == 3  # no window was closed
        stopping.set()
        await asyncio.wait_for(working, 30)
    finally:
        stopping.set()
        await worker.aclose()
