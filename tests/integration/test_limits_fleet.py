"""Rate limits with worker processes and the simulator enforcing limits of its own."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from producers import NewJob, Producer
from tests.conftest import ConfigFactory
from tests.helpers import (
    eventually,
    run,
    sim_call,
    sim_requests,
    stream_at_least,
    stream_len,
    usage_events,
)
from tests.integration.conftest import SpawnWorker
from worker.contract import Keys

HAIKU = "claude-haiku-5-5"
LIMITS = 'models."claude-haiku-5-5".limits'
HELLO = {"messages": [{"role": "user", "content": "Summarise: buckets refill."}]}


def limits(rpm: int, itpm: int = 2_000_000, otpm: int = 400_000) -> dict[str, Any]:
    return {f"{LIMITS}.rpm": rpm, f"{LIMITS}.itpm": itpm, f"{LIMITS}.otpm": otpm}


@pytest.fixture
def sim_limits(sim: str) -> Iterator[Any]:
    """Set the simulator's own limits for haiku (the `sim` fixture restores the defaults)."""

    def set_limits(rpm: int, itpm: int = 2_000_000, otpm: int = 400_000) -> None:
        sim_call(sim, "config", {"limits": {HAIKU: [rpm, itpm, otpm]}})

    yield set_limits


def refused(sim: str) -> int:
    """Requests the simulator refused for its rate limits."""
    return sum(int(n) for n in sim_call(sim, "ledger")["rate_limited"].values())


async def submit(redis: aioredis.Redis, keys: Keys, n: int) -> list[str]:
    producer = Producer(redis, keys.prefix)
    return await producer.submit_many(NewJob(feature="summarize", request=HELLO) for _ in range(n))


async def test_three_workers_together_stay_under_the_limit(
    redis: aioredis.Redis, keys: Keys, sim: str, sim_limits: Any,
    make_config: ConfigFactory, spawn_worker: SpawnWorker,
) -> None:  # fmt: skip
    # Each process alone would send all 130 at once; the simulator allows 120 a minute.
    sim_limits(120)
    _, path = make_config(**limits(120))
    await submit(redis, keys, 130)
    for _ in range(3):
        spawn_worker(path, concurrency=64)
    await eventually(lambda: stream_at_least(redis, keys.usage, 130), what="130 results",
                     timeout_s=40)  # fmt: skip
    assert refused(sim) == 0
    assert sim_requests(sim) == 130
    assert {e.status for e in await usage_events(redis, keys)} == {"ok"}


async def test_a_lower_real_limit_means_backoff_and_success_not_dead_letters(
    redis: aioredis.Redis, keys: Keys, sim: str, sim_limits: Any,
    make_config: ConfigFactory, spawn_worker: SpawnWorker,
) -> None:  # fmt: skip
    sim_limits(60)  # config.toml says 600: another application shares the key, say
    _, path = make_config(**limits(600))
    await submit(redis, keys, 75)
    spawn_worker(path, concurrency=32)
    spawn_worker(path, concurrency=32)
    await eventually(lambda: stream_at_least(redis, keys.usage, 75), what="75 results",
                     timeout_s=40)  # fmt: skip
    events = await usage_events(redis, keys)
    assert {e.status for e in events} == {"ok"}
    assert await stream_len(redis, keys.dead) == 0
    assert sim_requests(sim) == 75
    # The answers' headers taught the fleet the lower limit: `tokenq limits` shows it.
    code, out, _ = await run(sys.executable, "-m", "worker", "--config", str(path), "limits")
    assert code == 0 and "learnt from the API" in out


async def test_jobs_waiting_for_capacity_are_renewed_not_reclaimed(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    spawn_worker: SpawnWorker,
) -> None:  # fmt: skip
    # 120/min with target 0.98: 117 at once, then 2 a second; the last jobs wait ~6 s,
    # far past the 1 s visibility timeout.
    _, path = make_config(**limits(120), **{"queue.visibility_timeout_s": 1.0})
    await submit(redis, keys, 130)
    spawn_worker(path, concurrency=64)
    spawn_worker(path, concurrency=64)
    await eventually(lambda: stream_at_least(redis, keys.usage, 130), what="130 results",
                     timeout_s=40)  # fmt: skip
    events = await usage_events(redis, keys)
    assert len(events) == 130 and {e.attempt for e in events} == {1}
    assert sim_requests(sim) == 130  # nobody took a waiting job over and called again


@pytest.mark.parametrize("how", ["tokenq reload", "SIGHUP"])
async def test_reload_applies_new_limits_to_running_workers(
    how: str, redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    spawn_worker: SpawnWorker,
) -> None:  # fmt: skip
    _, path = make_config(**limits(30), **{"limits.target": 1.0})
    await submit(redis, keys, 40)
    worker = spawn_worker(path)
    # 30 at once, then one every 2 s: the last 10 would need 20 s.
    # A process starting on a loaded machine: the first 30 are not about timing.
    await eventually(lambda: stream_at_least(redis, keys.usage, 30), what="30 results",
                     timeout_s=30)  # fmt: skip
    assert await stream_len(redis, keys.usage) < 40
    raise_rpm(path, 100_000)
    if how == "SIGHUP":
        worker.send_signal(signal.SIGHUP)
    else:
        code, out, _ = await run(sys.executable, "-m", "worker", "--config", str(path), "reload")
        assert code == 0 and "reload sent to 1 worker" in out, out
    await eventually(lambda: stream_at_least(redis, keys.usage, 40), what="the other 10",
                     timeout_s=5)  # fmt: skip
    assert worker.poll() is None  # reloaded, not restarted


def raise_rpm(path: Path, rpm: int) -> None:
    text = path.read_text()
    head, _, tail = text.partition('[models."claude-haiku-5-5".limits]')
    path.write_text(head + '[models."claude-haiku-5-5".limits]' + re.sub(
        r"rpm = \d+", f"rpm = {rpm}", tail, count=1
    ))  # fmt: skip
