"""Nothing lost: bad inputs dead-lettered with reasons, retries, reclaim, renewal, priorities."""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from producers import Producer
from tests.conftest import ConfigFactory
from tests.helpers import add, eventually, read_result, sim_call, stream_len, usage_events
from tests.integration.conftest import RunWorker
from worker.contract import GROUP, Keys
from worker.deadletters import dead_letters, replay
from worker.embedded import free_port

HELLO = json.dumps({"messages": [{"role": "user", "content": "Hello there"}]})
BAD_INPUTS: list[tuple[dict[str, str], str, str]] = [
    ({"request": HELLO}, "malformed_job", "no `feature` field"),
    ({"feature": "nope", "request": HELLO}, "unknown_feature", "config.toml [features]"),
    ({"feature": "summarize", "request": "{not json"}, "malformed_job", "not valid JSON"),
    ({"feature": "summarize", "request": "[1, 2]"}, "malformed_job", "must be a JSON object"),
    ({"feature": "summarize", "request": "{}"}, "malformed_job", "`messages`"),
    ({"feature": "summarize", "request": '{"messages":"hi"}'}, "malformed_job", "array"),
    (
        {"feature": "summarize", "request": '{"messages":[{"role":"user","content":"x"}],'
         '"max_tokens":"lots"}'},
        "malformed_job", "max_tokens",
    ),
    (
        {"feature": "summarize", "request": '{"messages":[{"role":"user","content":"x"}],'
         '"temperature":0.5}'},
        "malformed_job", "temperature",
    ),
    ({"feature": "summarize", "tier": "gpt-9", "request": HELLO}, "malformed_job", "[tiers]"),
    ({"feature": "summarize", "request": HELLO, "deadline_ms": "1000"}, "deadline_exceeded",
     "deadline_ms 1000 passed"),
    (
        {"feature": "summarize", "request": json.dumps(
            {"messages": [{"role": "user", "content": "x" * 5000}]})},
        "too_large", "queue.max_entry_bytes",
    ),
]  # fmt: skip


async def test_malformed_entries_are_dead_lettered_and_valid_ones_run(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"queue.max_entry_bytes": 4096})
    expected: dict[str, tuple[str, str]] = {}
    valid: list[str] = []
    for n in range(330):
        fields, error_type, says = BAD_INPUTS[n % len(BAD_INPUTS)]
        await add(redis, keys.jobs("normal"), {**fields, "id": f"bad-{n}"})
        expected[f"bad-{n}"] = (error_type, says)
        await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO,
                                               "id": f"ok-{n}"})  # fmt: skip
        valid.append(f"ok-{n}")
    async with run_worker(cfg, concurrency=32) as worker:
        await eventually(lambda: _all_done(redis, keys, 660), what="660 outcomes", timeout_s=60)
        # The worker is still alive and takes new work.
        late = await Producer(redis, keys.prefix).submit("summarize", HELLO)
        assert (await Producer(redis, keys.prefix).result(late, timeout_s=10)).status == "ok"
        assert not worker._stopping.is_set()
    dead = await dead_letters(redis, keys, count=1000)
    assert len(dead) == 330
    for _, fields in dead:
        error_type, says = expected[fields["id"]]
        assert fields["error_type"] == error_type, fields
        assert says in fields["error"], fields
        assert fields["priority"] == "normal" and fields["attempts"] == "0"
    for job_id in valid:
        assert (await read_result(redis, keys, job_id)).status == "ok"
    bad_result = await read_result(redis, keys, "bad-1")
    assert bad_result.status == "error" and bad_result.error is not None
    assert bad_result.error.type == "unknown_feature"
    assert sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]["requests"] == 331


async def _all_done(redis: aioredis.Redis, keys: Keys, n: int) -> bool:
    return await stream_len(redis, keys.usage) >= n


async def test_failing_calls_retry_then_dead_letter_with_last_error(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"queue.max_attempts": 3})
    sim_call(sim, "config", {"fault_rate": {"500": 1.0}})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        job_id = await producer.submit("summarize", HELLO)
        result = await producer.result(job_id, timeout_s=10)
    assert result.status == "error" and result.error is not None
    assert result.error.type == "max_attempts"
    [(dead_id, fields)] = await dead_letters(redis, keys)
    assert fields["attempts"] == "3"
    assert "failed 3 attempts" in fields["error"] and "InternalServerError 500" in fields["error"]
    ledger = sim_call(sim, "ledger")
    assert ledger["faults"]["500"] == 3 and ledger["models"] == {}
    [event] = await usage_events(redis, keys)
    assert event.error_type == "max_attempts"

    # Once the cause is gone, a replay runs the job again under the same id.
    sim_call(sim, "config", {"fault_rate": {}})
    assert await replay(redis, keys, dead_id, cfg.queue.priorities) == job_id
    assert await dead_letters(redis, keys) == []
    async with run_worker(cfg):
        again = await producer.result(job_id, timeout_s=10)
    assert again.status == "ok"


async def test_an_unreachable_api_is_retried_then_dead_lettered_as_a_connection_error(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    closed = free_port()  # nothing listens here: every call is refused at connect
    cfg, _ = make_config(
        **{"queue.max_attempts": 2, "anthropic.base_url": f"http://127.0.0.1:{closed}"}
    )
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        job_id = await producer.submit("summarize", HELLO)
        result = await producer.result(job_id, timeout_s=20)
    assert result.status == "error" and result.error is not None
    assert result.error.type == "max_attempts"
    [(_, fields)] = await dead_letters(redis, keys)
    assert fields["attempts"] == "2" and "APIConnectionError" in fields["error"]


async def test_transient_faults_are_retried_and_billed_once(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"queue.max_attempts": 10})
    sim_call(sim, "config", {"fault_rate": {"529": 0.2, "429": 0.1, "500": 0.05}})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg, concurrency=16):
        ids = [await producer.submit("summarize", HELLO) for _ in range(60)]
        results = [await producer.result(i, timeout_s=30) for i in ids]
    assert all(r.status == "ok" for r in results)
    ledger = sim_call(sim, "ledger")
    assert ledger["models"]["claude-haiku-5-5"]["requests"] == 60
    assert sum(ledger["faults"].values()) > 0
    attempts = [e.attempt for e in await usage_events(redis, keys)]
    assert max(attempts) > 1


async def test_jobs_of_a_dead_consumer_are_reclaimed(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"queue.visibility_timeout_s": 0.5})
    producer = Producer(redis, keys.prefix)
    ids = [await producer.submit("summarize", HELLO) for _ in range(5)]
    stream = keys.jobs("normal")
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    taken: Any = await redis.xreadgroup(GROUP, "ghost", {stream: ">"}, count=5)
    assert len(taken[0][1]) == 5  # a consumer that took them and died
    async with run_worker(cfg):
        results = [await producer.result(i, timeout_s=10) for i in ids]
    assert all(r.status == "ok" for r in results)
    assert sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]["requests"] == 5


async def test_slow_calls_are_renewed_not_reclaimed(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"queue.visibility_timeout_s": 0.6})
    sim_call(sim, "config", {"latency_ms": 1500})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg, concurrency=4), run_worker(cfg, concurrency=4):
        ids = [await producer.submit("summarize", HELLO) for _ in range(6)]
        results = [await producer.result(i, timeout_s=20) for i in ids]
    assert all(r.status == "ok" for r in results)
    # Each call outlived the visibility timeout 2.5 times over; none was run twice.
    assert sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]["requests"] == 6


async def test_higher_priority_first(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # The rule for realtime reads: low is batched by default, so it is read in real time here.
    cfg, _ = make_config(**{"queue.fair_every": 1000, "batch.priorities": []})
    producer = Producer(redis, keys.prefix)
    for priority in ("low", "normal", "high"):
        for _ in range(4):
            await producer.submit("summarize", HELLO, priority=priority)
    async with run_worker(cfg, concurrency=1):
        await eventually(lambda: _all_done(redis, keys, 12), what="12 outcomes")
    order = [e.priority for e in await usage_events(redis, keys)]
    assert order == ["high"] * 4 + ["normal"] * 4 + ["low"] * 4


async def test_lower_priorities_are_not_starved(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # The rule for realtime reads: low is batched by default, so it is read in real time here.
    cfg, _ = make_config(**{"queue.fair_every": 3, "batch.priorities": []})
    producer = Producer(redis, keys.prefix)
    for priority in ("low", "normal", "high"):
        for _ in range(12):
            await producer.submit("summarize", HELLO, priority=priority)
    async with run_worker(cfg, concurrency=1):
        await eventually(lambda: _all_done(redis, keys, 12), what="12 outcomes")
    first = [e.priority for e in (await usage_events(redis, keys))[:12]]
    # Every third read offers its slot to normal and low in turn.
    assert first.count("normal") >= 2 and first.count("low") >= 2, first


async def test_deadline_passed_while_queued_fails_without_a_call(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config()
    producer = Producer(redis, keys.prefix)
    job_id = await producer.submit("summarize", HELLO, deadline_ms=int(time.time() * 1000) - 1)
    async with run_worker(cfg):
        result = await producer.result(job_id, timeout_s=10)
    assert result.error is not None and result.error.type == "deadline_exceeded"
    assert sim_call(sim, "ledger")["models"] == {}


async def test_calls_over_the_timeout_count_as_failed_attempts(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"queue.max_attempts": 2, "anthropic.timeout_s": 0.2})
    sim_call(sim, "config", {"latency_ms": 1000})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        job_id = await producer.submit("summarize", HELLO)
        result = await producer.result(job_id, timeout_s=10)
    assert result.error is not None and result.error.type == "max_attempts"
    assert "APITimeoutError" in result.error.message
