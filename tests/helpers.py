"""Shared test helpers: waiting on conditions, free ports, the simulator's admin API, a job read
from the queue and a budget cap."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from worker.budgets import Cap
from worker.contract import GROUP, Keys, Result, UsageEvent, from_fields
from worker.queue import Delivery, Queue


async def eventually(
    check: Callable[[], Awaitable[bool | int]], *, what: str, timeout_s: float = 10.0
) -> None:
    """Wait until check() is true; fail at the deadline saying what never happened."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await check():  # noqa: ASYNC110 - the condition is in another process
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"no {what} after {timeout_s}s") from None


ROOT = Path(__file__).resolve().parent.parent
FAST_BATCHES = {"batch.flush_interval_s": 0.2, "batch.poll_s": 0.1, "batch.lease_s": 1.0}
"""Config overrides that make the batcher flush and poll often, and hand its lease over soon."""


@contextmanager
def own_simulator(*args: str) -> Iterator[str]:
    """`python -m simulator --port 0 --seed 1 ARGS` in its own process; its base URL. Fails
    with the simulator's stderr when it does not start; checks it exits 0 on SIGTERM."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulator", "--port", "0", "--seed", "1", *args],
            stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline().decode().strip()
            if not line.startswith("simulator listening on http://"):
                stderr.seek(0)
                raise AssertionError(f"simulator did not start: {line!r}\n{stderr.read().decode()}")
            yield line.rsplit(" ", 1)[-1]
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0, "the simulator did not exit 0 on SIGTERM"
            proc.stdout.close()


@contextmanager
def settings_restored(base_url: str, defaults: dict[str, Any]) -> Iterator[None]:
    """The simulator at `defaults` with an empty ledger (and cache, and batches) for a test,
    and at `defaults` again after it."""
    sim_call(base_url, "config", defaults)
    sim_call(base_url, "reset", {})
    yield
    sim_call(base_url, "config", defaults)


def sim_call(base_url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST with a body) one of the simulator's /_sim/ admin endpoints."""
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(
        f"{base_url}/_sim/{path}", data=data, method=method,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read() or b"null")


# Typed views of redis-py calls (its stubs allow bytes and None everywhere; the test client
# decodes replies to str).
async def entries(
    redis: aioredis.Redis, key: str, count: int | None = None
) -> list[tuple[str, dict[str, str]]]:
    """XRANGE of a whole stream, oldest first."""
    reply: Any = await redis.xrange(key, count=count)
    return [(str(i), dict(f)) for i, f in reply]


async def raw_entries(redis: aioredis.Redis, key: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """XRANGE of a whole stream with names and values left as bytes (they may be any bytes)."""
    reply: Any = await redis.execute_command(  # type: ignore[no-untyped-call]  # no hints
        "XRANGE", key, "-", "+", **{NEVER_DECODE: []}
    )
    return [(i.decode(), dict(f)) for i, f in reply]


async def add(redis: aioredis.Redis, key: str, fields: dict[str, str]) -> str:
    """XADD, returning the entry id."""
    return str(await redis.xadd(key, cast("dict[Any, Any]", fields)))


JOB = {"feature": "summarize", "request": "{}"}
RESETS = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)


async def pending(redis: aioredis.Redis, keys: Keys, consumer: str = "a") -> tuple[Queue, Delivery]:
    """A JOB added to the normal stream and read by `consumer`: its queue and the delivery."""
    queue = Queue(redis, keys, ["normal"], consumer, visibility_ms=60_000)
    await queue.ensure_groups()
    await add(redis, keys.jobs("normal"), JOB)
    [d] = await queue.read(1, 100)
    return queue, d


def cap(keys: Keys, usd: float) -> Cap:
    """summarize's daily cap of `usd` for 2030-01-01, resetting at RESETS."""
    key = keys.budget("feature:summarize", "2030-01-01")
    return Cap("features.summarize.daily_usd", key, "2030-01-01", usd, None, 3600, RESETS)


async def read_result(redis: aioredis.Redis, keys: Keys, job_id: str) -> Result:
    """The result a job has (fails the test when it has none)."""
    raw = await redis.get(keys.result(job_id))
    assert raw is not None, f"job {job_id} has no result"
    return msgspec.json.decode(raw, type=Result)


async def usage_events(redis: aioredis.Redis, keys: Keys) -> list[UsageEvent]:
    return [from_fields(f) for _, f in await entries(redis, keys.usage)]


async def stream_len(redis: aioredis.Redis, key: str) -> int:
    return int(await redis.xlen(key))


async def stream_at_least(redis: aioredis.Redis, key: str, n: int) -> bool:
    return await stream_len(redis, key) >= n


def sim_requests(sim: str, ledger: dict[str, Any] | None = None) -> int:
    """Requests the simulator billed, all models together."""
    models = (ledger or sim_call(sim, "ledger"))["models"]
    return sum(int(m["requests"]) for m in models.values())


async def sim_is(
    sim: str, *, in_flight: int, requests: int | None = None, at_least: bool = False
) -> bool:
    """The simulator has `in_flight` requests open (or more, `at_least`), and has billed
    `requests` in all when that is given."""
    ledger = sim_call(sim, "ledger")
    billed = sim_requests(sim, ledger)
    open_now = int(ledger["in_flight"])
    enough = open_now >= in_flight if at_least else open_now == in_flight
    return enough and requests in (None, billed)


async def pending_count(redis: aioredis.Redis, stream: str) -> int:
    """Entries delivered to the workers group and not yet acknowledged (0 before it exists)."""
    try:
        reply: Any = await redis.xpending(stream, GROUP)
    except ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        return 0
    return int(reply["pending"])


async def run(*args: str) -> tuple[int, str, str]:
    """Run a command to its end: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()
