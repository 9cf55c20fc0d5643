"""Redis under strain: more jobs in flight than connections, and a Redis restart mid-flight."""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis.asyncio as aioredis

from producers import NewJob, Producer
from tests.conftest import ROOT, ConfigFactory
from tests.helpers import eventually, pending_count, sim_call, stream_len, usage_events
from tests.integration.conftest import RunWorker
from worker.config import load_config
from worker.contract import Keys
from worker.embedded import connect, free_port, server_args, wait_until_ready

REQUEST = {"messages": [{"role": "user", "content": "Summarise: pools and restarts."}]}


def in_flight(sim: str) -> int:
    return int(sim_call(sim, "ledger")["in_flight"])


def requests(sim: str) -> int:
    models = sim_call(sim, "ledger")["models"]
    return sum(int(m["requests"]) for m in models.values())


async def test_more_jobs_in_flight_than_redis_connections(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # 200 calls in flight share 4 connections: commands wait for a free one, none fails.
    cfg, _ = make_config(**{"redis.max_connections": 4})
    sim_call(sim, "config", {"latency_ms": 300})
    producer = Producer(redis, keys.prefix)
    await producer.submit_many(NewJob(feature="summarize", request=REQUEST) for _ in range(400))
    async with run_worker(cfg, concurrency=200):
        await eventually(lambda: _ready(in_flight(sim) >= 150), what="150 calls in flight")
        await eventually(lambda: _count(redis, keys.usage, 400), what="400 events", timeout_s=30)
    events = await usage_events(redis, keys)
    assert len(events) == 400 and {e.status for e in events} == {"ok"}
    assert requests(sim) == 400
    assert await pending_count(redis, keys.jobs("normal")) == 0


async def _ready(value: bool) -> bool:
    return value


async def _count(redis: aioredis.Redis, stream: str, n: int) -> bool:
    return await stream_len(redis, stream) >= n


def start_valkey(port: int, data: Path) -> subprocess.Popen[bytes]:
    cfg = load_config(ROOT / "config.toml")
    args = server_args(cfg, port=port, data_dir=str(data))
    args[args.index("everysec")] = "always"  # every acknowledged write is on disk
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_until_ready(port), "valkey-server did not start"
    return proc


async def test_a_redis_restart_mid_flight_loses_nothing_and_bills_once(
    tmp_path: Path, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    port, data = free_port(), tmp_path / "valkey"  # a server this test stops and starts
    url = f"redis://127.0.0.1:{port}/0"
    cfg, _ = make_config(**{"redis.url": url})
    keys = Keys(cfg.prefix)
    server = start_valkey(port, data)
    redis = connect(url, block_s=5)
    try:
        producer = Producer(redis, keys.prefix)
        ids = await producer.submit_many(
            NewJob(feature="summarize", request=REQUEST) for _ in range(30)
        )
        sim_call(sim, "config", {"latency_ms": 1500})
        async with run_worker(cfg, concurrency=50):
            await eventually(lambda: _ready(in_flight(sim) == 30), what="30 calls in flight")
            server.terminate()  # Redis goes away while every call is at the API
            server.wait(timeout=10)
            # The answers arrive while Redis is down: the worker holds them and keeps trying.
            await eventually(lambda: _ready(requests(sim) == 30 and in_flight(sim) == 0),
                             what="30 answers")  # fmt: skip
            server = start_valkey(port, data)
            await eventually(
                lambda: _count(redis, keys.usage, 30), what="30 usage events", timeout_s=30
            )
        events = await usage_events(redis, keys)
        assert sorted(e.job_id for e in events) == sorted(ids)
        assert {e.status for e in events} == {"ok"} and {e.attempt for e in events} == {1}
        assert requests(sim) == 30  # written after the restart, not fetched again
        assert await pending_count(redis, keys.jobs("normal")) == 0
    finally:
        await redis.aclose()
        server.terminate()
        server.wait(timeout=10)
