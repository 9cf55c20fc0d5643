"""Alerts out (real Valkey, a local webhook receiver): alert events, open breakers and
dead-letter bursts reach the webhook once per condition per period, fleet-wide."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from producers import Producer
from tests.conftest import ConfigFactory
from tests.helpers import add, eventually
from tests.integration.conftest import RunWorker, Webhook
from worker.alerts import Alerter
from worker.config import Config
from worker.contract import Keys, UsageEvent, to_fields
from worker.embedded import connect

SMALL = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 100}


def alert_event(message: str, feature: str = "summarize") -> dict[str, str]:
    return to_fields(UsageEvent(
        ts_ms=int(time.time() * 1000), job_id="", feature=feature, kind="alert",
        error_type="budget_alert", message=message, cost_usd=0.4,
    ))  # fmt: skip


@pytest.fixture
async def raw(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client that does not decode replies, as `tokenq alerts` uses."""
    client = connect(valkey_url, decode=False)
    yield client
    await client.aclose()


def alerter(raw: aioredis.Redis, cfg: Config) -> Alerter:
    return Alerter(raw, cfg, tick_ms=20)  # a tick with nothing new waits no longer


async def test_an_alert_event_is_sent_once_though_two_processes_see_it(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, make_config: ConfigFactory,
    webhook: Webhook,
) -> None:  # fmt: skip
    cfg, _ = make_config(**{"alerts.webhook_url": webhook.url})
    first, second = alerter(raw, cfg), alerter(raw, cfg)
    start = await first._start_at()
    await add(redis, keys.usage, alert_event("features.summarize.daily_usd reached 80% of 0.5"))
    await first.tick(start)
    await second.tick(start)
    assert webhook.texts() == [
        f"[{keys.prefix}] budget_alert: features.summarize.daily_usd reached 80% of 0.5 "
        "(feature summarize)"
    ]
    assert (first.sent, second.sent) == (1, 0)


async def test_entries_that_are_not_usage_events_are_skipped(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, make_config: ConfigFactory,
    webhook: Webhook,
) -> None:  # fmt: skip
    cfg, _ = make_config(**{"alerts.webhook_url": webhook.url})
    watch = alerter(raw, cfg)
    start = await watch._start_at()
    await raw.xadd(keys.usage, {b"kind": b"alert", b"message": b"\xff\xfe not utf-8"})
    await raw.xadd(keys.usage, {b"ts_ms": b"soon", b"job_id": b"", b"feature": b"x"})
    await add(redis, keys.usage, {"kind": "alert", "feature": "x"})  # no ts_ms, no job_id
    await add(redis, keys.usage, alert_event("the real one"))
    await watch.tick(start)
    assert webhook.texts() == [f"[{keys.prefix}] budget_alert: the real one (feature summarize)"]


async def test_an_open_breaker_is_sent_once_per_period(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, make_config: ConfigFactory,
    webhook: Webhook,
) -> None:  # fmt: skip
    cfg, _ = make_config(**{"alerts.webhook_url": webhook.url})
    await redis.hset(f"{keys.prefix}:breaker:model:claude-opus-5-5", mapping={
        "state": "open", "fails": 5, "successes": 0, "opened_at": int(time.time() * 1000),
    })  # fmt: skip
    await redis.hset(f"{keys.prefix}:breaker:feature:summarize", mapping={"state": "closed"})
    watch = alerter(raw, cfg)
    start = await watch._start_at()
    await watch.tick(start)
    await watch.tick(start)
    [text] = webhook.texts()
    assert "circuit breaker model:claude-opus-5-5 opened at" in text
    assert "after 5 API failures in a row" in text


async def test_a_burst_of_dead_letters_is_sent_with_its_error_types(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, make_config: ConfigFactory,
    webhook: Webhook,
) -> None:  # fmt: skip
    cfg, _ = make_config(**{"alerts.webhook_url": webhook.url, "alerts.dead_letter_burst": 3})
    watch = alerter(raw, cfg)
    start = await watch._start_at()
    for kind in ("max_attempts", "max_attempts"):
        await add(redis, keys.dead, {"error_type": kind, "error": "e"})
    await watch.tick(start)
    assert webhook.texts() == []  # two are not a burst of three
    await add(redis, keys.dead, {"error_type": "malformed_job", "error": "e"})
    await watch.tick(start)
    assert webhook.texts() == [
        f"[{keys.prefix}] 3 dead letters in the last 60 s (max_attempts 2, malformed_job 1); "
        "`tokenq dead list` shows why"
    ]


async def test_a_failed_send_is_tried_again_on_the_next_tick(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, make_config: ConfigFactory,
    webhook: Webhook,
) -> None:  # fmt: skip
    cfg, _ = make_config(**{"alerts.webhook_url": webhook.url})
    watch, other = alerter(raw, cfg), alerter(raw, cfg)
    start = await watch._start_at()
    webhook.refuse = 1
    await add(redis, keys.usage, alert_event("cap reached"))
    last = await watch.tick(start)
    assert webhook.texts() == [] and watch.waiting
    await other.tick(last)  # the condition was given back: a process may take it again
    await watch.tick(last)
    assert webhook.texts() == [f"[{keys.prefix}] budget_alert: cap reached (feature summarize)"]


async def test_tokenq_alerts_sends_a_workers_budget_alert_to_the_webhook(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, webhook: Webhook,
) -> None:  # fmt: skip
    cfg, path = make_config(**{"features.summarize.daily_usd": 0.001, "budgets.alert_at": 0.02,
                               "alerts.webhook_url": webhook.url})  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "--config", str(path), "alerts",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        started = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"tokenq alerts: watching" in started
        producer = Producer(redis, keys.prefix)
        async with run_worker(cfg, concurrency=1):
            for _ in range(4):
                await producer.result(await producer.submit("summarize", SMALL), timeout_s=30)
        await eventually(lambda: _has(webhook.received), what="alert at the webhook")
        [text] = webhook.texts()
        assert "budget_alert: features.summarize.daily_usd reached 2% of 0.001 USD" in text
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def _has(items: list[Any]) -> bool:
    return bool(items)
