"""Worker processes: kill -9 loses nothing, SIGTERM drains, the CLI works end to end."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from producers import NewJob, Producer
from tests.conftest import ConfigFactory
from tests.helpers import (
    add,
    eventually,
    pending_count,
    read_result,
    run,
    sim_call,
    stream_at_least,
    stream_len,
    usage_events,
)
from tests.integration.conftest import SpawnWorker
from worker.config import load_config
from worker.contract import GROUP, Keys, Result
from worker.embedded import connect, ensure_running, free_port

ROOT = Path(__file__).resolve().parents[2]
HELLO = {"messages": [{"role": "user", "content": "Write one line about queues."}]}


async def test_kill_9_of_a_worker_loses_nothing(
    redis: aioredis.Redis,
    keys: Keys,
    sim: str,
    make_config: ConfigFactory,
    spawn_worker: SpawnWorker,
) -> None:
    _, path = make_config(**{"queue.visibility_timeout_s": 2.0})
    sim_call(sim, "config", {"latency_ms": 200})
    producer = Producer(redis, keys.prefix)
    ids = await producer.submit_many(
        NewJob(feature="summarize", request=HELLO, id=f"k-{n}") for n in range(1000)
    )
    concurrency = 40
    victim = spawn_worker(path, concurrency=concurrency)
    spawn_worker(path, concurrency=concurrency)
    await eventually(
        lambda: stream_at_least(redis, keys.usage, 150), what="150 results", timeout_s=30
    )
    victim.send_signal(signal.SIGKILL)  # mid-flight: up to `concurrency` calls die with it
    victim.wait()

    async def all_results() -> bool:
        return int(await redis.exists(*(keys.result(i) for i in ids))) == len(ids)

    await eventually(all_results, what="1000 results", timeout_s=90)
    everything = await usage_events(redis, keys)
    events = [e for e in everything if e.kind == "job"]
    assert len(events) == 1000, "exactly one usage event per job"
    assert sorted(e.job_id for e in events) == sorted(ids)
    assert all(e.status == "ok" for e in events)
    # The killed process's calls in flight: each reported once, as an orphan, by the worker
    # that took its job over, and counted as an attempt of that job.
    orphans = [e for e in everything if e.kind == "orphan"]
    assert len(orphans) <= concurrency
    assert sum(e.attempt - 1 for e in events) == len(orphans)
    for job_id in ids:
        assert (await read_result(redis, keys, job_id)).status == "ok"
    ledger = sim_call(sim, "ledger")
    billed = ledger["models"]["claude-haiku-5-5"]["requests"]
    # Only the killed process's in-flight calls may have been billed twice, and the usage
    # events bracket the bill: the answers exactly, the lost calls at their worst case.
    assert 1000 <= billed <= 1000 + len(orphans), billed
    paid = sum(e.cost_usd for e in events)
    worst = paid + sum(e.reserved_usd for e in orphans)
    assert paid - 1e-9 <= ledger["total_cost_usd"] <= worst + 1e-9
    assert await pending_count(redis, keys.jobs("normal")) == 0


async def test_sigterm_drains_in_flight_jobs_and_leaves_the_rest(
    redis: aioredis.Redis,
    keys: Keys,
    sim: str,
    make_config: ConfigFactory,
    spawn_worker: SpawnWorker,
) -> None:
    _, path = make_config()
    sim_call(sim, "config", {"latency_ms": 1000})
    producer = Producer(redis, keys.prefix)
    await producer.submit_many(NewJob(feature="summarize", request=HELLO) for _ in range(30))
    proc = spawn_worker(path, concurrency=10)
    stream = keys.jobs("normal")

    async def ten_in_flight() -> bool:
        return await pending_count(redis, stream) == 10

    await eventually(ten_in_flight, what="10 jobs in flight", timeout_s=15)
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 20)
    assert code == 0
    assert await stream_len(redis, keys.usage) == 10  # the in-flight ones finished
    assert await stream_len(redis, stream) == 20  # the rest wait for the next worker
    assert await pending_count(redis, stream) == 0
    consumers: Any = await redis.xinfo_consumers(stream, GROUP)
    assert consumers == []  # a clean exit leaves no consumer behind


async def test_cli_submit_wait_prints_the_result(
    redis: aioredis.Redis,
    keys: Keys,
    sim: str,
    make_config: ConfigFactory,
    spawn_worker: SpawnWorker,
) -> None:
    _, path = make_config()
    spawn_worker(path)
    tokenq = [sys.executable, "-m", "worker", "--config", str(path)]
    proc = await asyncio.create_subprocess_exec(
        *tokenq, "submit", "summarize", "--tenant", "acme", "--wait", "--timeout", "20",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate(json.dumps(HELLO).encode())
    assert proc.returncode == 0, out
    job_id, _, result_json = out.decode().partition("\n")
    result = msgspec.json.decode(result_json, type=Result)
    assert result.id == job_id.strip() and result.status == "ok"

    bad = await asyncio.create_subprocess_exec(
        *tokenq, "submit", "nope", "{}", stderr=asyncio.subprocess.PIPE
    )
    _, err = await bad.communicate()
    assert bad.returncode == 2 and b"feature 'nope' is not in config.toml" in err

    # The worker's own check runs before XADD: nothing is submitted that it would dead-letter.
    wrong = await asyncio.create_subprocess_exec(
        *tokenq, "submit", "summarize", '{"messages": "hi"}', stderr=asyncio.subprocess.PIPE
    )
    _, err = await wrong.communicate()
    assert wrong.returncode == 2 and b"`messages` must be an array of messages" in err
    assert await stream_len(redis, keys.jobs("normal")) == 0


async def test_cli_dead_list_and_replay(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory, spawn_worker: SpawnWorker
) -> None:
    _, path = make_config()
    await add(redis, keys.jobs("normal"), {"feature": "nope", "request": "{}"})
    spawn_worker(path)
    await eventually(lambda: stream_at_least(redis, keys.dead, 1), what="dead letter")
    tokenq = [sys.executable, "-m", "worker", "--config", str(path), "dead"]
    code, out, _ = await run(*tokenq, "list")
    assert code == 0 and "unknown_feature" in out and "feature=nope" in out
    dead_id = out.split()[0]
    code, out, _ = await run(*tokenq, "replay", dead_id)
    assert code == 0 and f"replayed {dead_id}" in out
    # Still unknown, so it is dead-lettered again: nothing is dropped.
    await eventually(lambda: stream_at_least(redis, keys.dead, 1), what="second dead letter")
    code, _, err = await run(*tokenq, "replay", "1-1")
    assert code == 1 and "no dead letter" in err


async def test_embedded_server_keeps_data_across_restarts(tmp_path: Path) -> None:
    port = free_port()
    text = (
        (ROOT / "config.toml")
        .read_text()
        .replace("embedded_port = 6399", f"embedded_port = {port}")
    )
    text = text.replace('data_dir = ".tokenq/valkey"', 'data_dir = "data"')
    (tmp_path / "config.toml").write_text(text)
    cfg = load_config(tmp_path / "config.toml")
    for round_ in range(2):
        url = await asyncio.to_thread(ensure_running, cfg)
        assert url == f"redis://127.0.0.1:{port}/0"
        client = connect(url)
        try:
            if round_ == 0:
                await client.set("kept", "yes")
            else:
                assert await client.get("kept") == "yes"
            await client.shutdown(nosave=False)
        except aioredis.ConnectionError:
            pass  # SHUTDOWN closes the connection before it answers
        finally:
            await client.aclose()
    assert (tmp_path / "data" / "appendonlydir").is_dir()
