"""Answer checks through the worker (real Valkey, the simulator, the SDK): an answer that fails
the feature's JSON Schema or regex escalates, and the reason says which check."""

from __future__ import annotations

import redis.asyncio as aioredis

from producers import Producer
from tests.conftest import ConfigFactory
from tests.helpers import usage_events
from tests.integration.conftest import RunWorker
from worker.contract import Keys

ASKS_JSON = {"messages": [{"role": "user", "content": "Say hello in JSON"}]}


async def test_an_answer_failing_the_schema_escalates_and_says_why(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # The simulator answers a request that asks for JSON with {"answer": "..."}.
    wants_label = {"type": "object", "required": ["label"]}
    cfg, _ = make_config(**{
        "features.summarize.expect": "json", "features.summarize.expect_schema": wants_label,
        "features.classify_ticket.expect_schema": {"type": "object", "required": ["answer"]},
        "features.classify_ticket.max_tokens": 100,
    })  # fmt: skip
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        failed = await producer.result(await producer.submit("summarize", ASKS_JSON), 10)
        passed = await producer.result(await producer.submit("classify_ticket", ASKS_JSON), 10)
    assert failed.tier == "sonnet" and passed.tier == "haiku"
    events = {e.job_id: e for e in await usage_events(redis, keys)}
    why = "answer fails expect_schema: 'label' is a required property"
    assert events[failed.id].route_reason == (
        f"features.summarize.tier; escalated to sonnet: {why}; check failed: {why}"
    )
    assert events[passed.id].route_reason == "features.classify_ticket.tier"


async def test_an_answer_not_matching_the_regex_escalates(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.expect_regex": "^VERDICT: (yes|no)$"})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        result = await producer.result(await producer.submit("summarize", ASKS_JSON), 10)
    assert result.tier == "sonnet"
    [event] = await usage_events(redis, keys)
    assert "escalated to sonnet: answer does not match expect_regex" in event.route_reason
