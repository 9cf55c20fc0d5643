"""Redis under strain: more jobs in flight than connections, and a Redis restart mid-flight."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import redis.asyncio as aioredis

from producers import NewJob, Producer
from tests.conftest import ROOT, ConfigFactory
from tests.helpers import (
    eventually,
    pending_count,
    sim_call,
    sim_is,
    sim_requests,
    stream_at_least,
    usage_events,
)
from tests.integration.conftest import RunWorker
from worker.config import load_config
from worker.contract import Keys
from worker.embedded import connect, free_port, server_args, wait_until_ready

REQUEST = {"messages": [{"role": "user", "content": "Summarise: pools and restarts."}]}


async def test_more_jobs_in_flight_than_redis_connections(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # 200 calls in flight share 4 connections: commands wait for a free one, none fails.
    # The simulator records the most calls it held at once, so nothing samples the worker
    # (a synchronous poll here would stall the worker's own event loop).
    cfg, _ = make_config(**{"redis.max_connections": 4})
    sim_call(sim, "config", {"latency_ms": 2000})
    producer = Producer(redis, keys.prefix)
    await producer.submit_many(NewJob(feature="summarize", request=REQUEST) for _ in range(400))
    async with run_worker(cfg, concurrency=200):
        await eventually(lambda: stream_at_least(redis, keys.usage, 400), what="400 events",
                         timeout_s=60)  # fmt: skip
    events = await usage_events(redis, keys)
    assert len(events) == 400 and {e.status for e in events} == {"ok"}
    assert sim_requests(sim) == 400
    assert sim_call(sim, "ledger")["peak_in_flight"] >= 150
    assert await pending_count(redis, keys.jobs("normal")) == 0


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
            await eventually(lambda: sim_is(sim, in_flight=30), what="30 calls in flight")
            server.terminate()  # Redis goes away while every call is at the API
            server.wait(timeout=10)
            # The answers arrive while Redis is down: the worker holds them and keeps trying.
            await eventually(lambda: sim_is(sim, in_flight=0, requests=30), what="30 answers")
            server = start_valkey(port, data)
            await eventually(lambda: stream_at_least(redis, keys.usage, 30), what="30 events",
                             timeout_s=30)  # fmt: skip
        events = await usage_events(redis, keys)
        assert sorted(e.job_id for e in events) == sorted(ids)
        assert {e.status for e in events} == {"ok"} and {e.attempt for e in events} == {1}
        assert sim_requests(sim) == 30  # written after the restart, not fetched again
        assert await pending_count(redis, keys.jobs("normal")) == 0
    finally:
        await redis.aclose()
        server.terminate()
        server.wait(timeout=10)


async def test_a_worker_started_while_redis_is_away_waits_for_it(
    tmp_path: Path, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # A worker (re)started by its supervisor during a Redis restart must wait for Redis, not
    # exit: nothing would start it again.
    port, data = free_port(), tmp_path / "valkey"
    url = f"redis://127.0.0.1:{port}/0"
    cfg, _ = make_config(**{"redis.url": url})
    keys = Keys(cfg.prefix)
    server = None
    redis = connect(url, block_s=5)
    try:
        async with run_worker(cfg):
            await asyncio.sleep(1.5)  # the outage the worker starts in (measured, not hoped for)
            server = start_valkey(port, data)
            producer = Producer(redis, keys.prefix)
            job_id = await producer.submit("summarize", REQUEST)
            assert (await producer.result(job_id, timeout_s=20)).status == "ok"
    finally:
        await redis.aclose()
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
