"""The job path end to end: plain XADD in, result key, usage event and ledger out."""

from __future__ import annotations

import json

import msgspec
import redis.asyncio as aioredis

from producers import NewJob, Producer
from tests.conftest import ConfigFactory
from tests.helpers import (
    add,
    entries,
    eventually,
    pending_count,
    read_result,
    sim_call,
    stream_len,
    usage_events,
)
from tests.integration.conftest import RunWorker
from worker.contract import Keys, Result
from worker.usage import ApiUsage, cost_usd

HELLO = json.dumps({"messages": [{"role": "user", "content": "Summarise: the cat sat."}]})


async def test_plain_xadd_yields_result_and_usage_matching_ledger(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config()
    entry_id = await add(
        redis, keys.jobs("normal"), {"feature": "summarize", "tenant": "acme", "request": HELLO}
    )
    job_id = entry_id  # the contract's default id
    async with run_worker(cfg):
        await eventually(lambda: redis.exists(keys.result(job_id)), what="result")
    result = await read_result(redis, keys, job_id)
    assert result.status == "ok" and result.mode == "realtime" and result.text
    assert result.model == "claude-haiku-5-5" and result.tier == "haiku"
    [event] = await usage_events(redis, keys)
    assert (event.job_id, event.feature, event.tenant, event.status) == (
        job_id, "summarize", "acme", "ok"
    )  # fmt: skip
    ledger = sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]
    assert ledger["requests"] == 1
    assert (event.input_tokens, event.output_tokens) == (
        ledger["input_tokens"], ledger["output_tokens"]
    )  # fmt: skip
    prices = cfg.models["claude-haiku-5-5"]
    expected = cost_usd(ApiUsage(event.input_tokens, event.output_tokens), prices)
    assert abs(event.cost_usd - expected) < 1e-9
    assert abs(event.cost_usd - ledger["cost_usd"]) < 1e-9
    assert event.baseline_cost_usd > event.cost_usd  # haiku vs the opus baseline
    assert await stream_len(redis, keys.jobs("normal")) == 0  # acknowledged and deleted
    assert await pending_count(redis, keys.jobs("normal")) == 0


async def test_producer_result_wakes_and_reply_to_gets_a_copy(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config()
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        job_id = await producer.submit(
            "classify_ticket", json.loads(HELLO), id="job-1", reply_to=f"replies:{keys.prefix}"
        )
        result = await producer.result(job_id, timeout_s=10)
    # The summary is not JSON, so it fails classify_ticket's check even after escalation: an
    # error result that carries the answer (error_type check_failed), copied to reply_to too.
    assert result.id == "job-1" and result.status == "error" and result.text
    assert result.error is not None and result.error.type == "check_failed"
    [(_, reply)] = await entries(redis, f"replies:{keys.prefix}")
    assert msgspec.json.decode(reply["result"], type=Result) == result


async def test_result_times_out_without_a_worker(redis: aioredis.Redis, keys: Keys) -> None:
    producer = Producer(redis, keys.prefix)
    job_id = await producer.submit("summarize", HELLO)
    try:
        await producer.result(job_id, timeout_s=0.3)
    except TimeoutError as exc:
        assert job_id in str(exc)
    else:
        raise AssertionError("result() returned without a worker")


async def test_submit_many_and_feature_max_tokens(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config()
    producer = Producer(redis, keys.prefix)
    # cache "off": support_faq shares answers (response cache, de-duplication); not here.
    jobs = [
        NewJob(feature="support_faq", request=HELLO, priority="high", cache="off")
        for _ in range(20)
    ]
    ids = await producer.submit_many(jobs)
    async with run_worker(cfg):
        results = [await producer.result(i, timeout_s=10) for i in ids]
    assert len(set(ids)) == 20 and all(r.status == "ok" for r in results)
    assert all(r.usage is not None and r.usage["output_tokens"] <= 300 for r in results)
    assert sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]["requests"] == 20


async def test_forced_tier_and_default_tier_are_recorded(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config()
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        forced = await producer.submit("summarize", HELLO, tier="opus")
        await producer.result(forced, timeout_s=10)
    [event] = await usage_events(redis, keys)
    assert (event.tier, event.model, event.route_reason) == (
        "opus", "claude-opus-5-5", "forced by job.tier"
    )  # fmt: skip


async def test_redelivered_job_with_result_is_acked_without_a_call(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config()
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        first = await producer.submit("summarize", HELLO, id="same-id")
        await producer.result(first, timeout_s=10)
        # The same job again (a producer retry, or a redelivery after a crash).
        await producer.submit("summarize", HELLO, id="same-id")
        await eventually(
            lambda: _drained(redis, keys.jobs("normal")), what="second delivery acknowledged"
        )
    assert sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]["requests"] == 1
    assert await stream_len(redis, keys.usage) == 1


async def _drained(redis: aioredis.Redis, stream: str) -> bool:
    return await stream_len(redis, stream) == 0 and await pending_count(redis, stream) == 0


async def test_same_entry_id_on_two_streams_gives_two_results(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # Both streams read in real time (low is batched by default; test_batches covers that).
    cfg, _ = make_config(**{"batch.priorities": []})
    # Each stream numbers its own entries: both get id 5-1 (as two XADDs in one ms would).
    for priority in ("high", "low"):
        await redis.xadd(keys.jobs(priority), {"feature": "summarize", "request": HELLO}, id="5-1")
    async with run_worker(cfg):
        await eventually(lambda: _drained(redis, keys.jobs("low")), what="low acknowledged")
        await eventually(lambda: _drained(redis, keys.jobs("high")), what="high acknowledged")
    # The first to claim the bare entry id keeps it; the other runs under its qualified id.
    ids = sorted(e.job_id for e in await usage_events(redis, keys))
    assert ids in (["5-1", "high:5-1"], ["5-1", "low:5-1"])
    for job_id in ids:
        assert (await read_result(redis, keys, job_id)).status == "ok"
    assert sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]["requests"] == 2


async def test_a_same_numbered_entry_after_the_first_finished_still_runs(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"batch.priorities": []})  # batched: see test_batches
    async with run_worker(cfg):
        await redis.xadd(keys.jobs("normal"), {"feature": "summarize", "request": HELLO}, id="7-0")
        await eventually(lambda: redis.exists(keys.result("7-0")), what="normal's result")
        await redis.xadd(keys.jobs("low"), {"feature": "summarize", "request": HELLO}, id="7-0")
        await eventually(lambda: redis.exists(keys.result("low:7-0")), what="low's result")
    assert [e.job_id for e in await usage_events(redis, keys)] == ["7-0", "low:7-0"]
    assert sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]["requests"] == 2
