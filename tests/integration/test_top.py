"""`tokenq top` (real Valkey): one frame shows the queues, rates, limits, breakers, budgets,
batches and consumers as the streams and hashes hold them; live, q and Ctrl-C quit."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pty
import signal
import sys
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import ConfigFactory
from tests.helpers import add, eventually
from worker.cli import main
from worker.contract import GROUP, Keys, Status, UsageEvent, to_fields

JOB = {"feature": "summarize", "request": '{"messages":[{"role":"user","content":"hi"}]}'}


def tokenq(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`tokenq ARGS` in this process (in a thread: it runs an event loop of its own)."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0), capsys.readouterr().out


async def idle_ms(redis: aioredis.Redis, stream: str, name: str) -> int:
    consumers: Any = await redis.xinfo_consumers(stream, GROUP)
    return next(int(c["idle"]) for c in consumers if c["name"] == name)


async def test_once_shows_the_fleet_as_redis_holds_it(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    _, path = make_config(**{"queue.visibility_timeout_s": 1.0,
                             "features.summarize.daily_usd": 0.01})  # fmt: skip
    normal, high = keys.jobs("normal"), keys.jobs("high")
    for stream in (normal, high):
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for _ in range(3):
        await add(redis, normal, JOB)
    # A worker that took two jobs and died; one that took nothing lately; one just now.
    await redis.xreadgroup(GROUP, "dead-worker", {normal: ">"}, count=2)
    await redis.xgroup_createconsumer(high, GROUP, "resting-worker")
    await eventually(
        lambda: _idle_over(redis, normal, "dead-worker", 1000), what="idle", timeout_s=10
    )
    await eventually(
        lambda: _idle_over(redis, high, "resting-worker", 1000), what="idle", timeout_s=10
    )
    await redis.xreadgroup(GROUP, "live-worker", {high: ">"}, count=1)
    now = int(time.time() * 1000)
    statuses: list[Status] = ["ok", "ok", "ok", "error"]
    for status in statuses:
        event = UsageEvent(ts_ms=now, job_id="j", feature="summarize", status=status)
        await add(redis, keys.usage, to_fields(event))
    await add(redis, keys.usage, {"not": "a usage event"})
    await redis.hset(f"{keys.prefix}:breaker:feature:summarize", mapping={
        "state": "open", "fails": 5, "successes": 0, "opened_at": now - 3000})  # fmt: skip
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    await redis.hset(f"{keys.prefix}:budget:feature:summarize:{day}",
                     mapping={"spent": 9_000_000, "held": 0, "requests": 3})  # fmt: skip
    await redis.zadd(keys.batches, {"b1": now - 5000})
    batch = {"state": "submitted", "count": 7, "bytes": 100, "planned_ms": now - 5000}
    # redis-py's stubs want a mapping of unions; these are all str or int.
    await redis.hset(keys.batch("b1"), mapping=batch)  # type: ignore[arg-type]
    code, out = await asyncio.to_thread(
        tokenq, capsys, "--config", str(path), "top", "--once", "--window", "10"
    )
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("tokenq top") and f"prefix {keys.prefix}" in lines[0]
    assert "password" not in out
    assert "jobs/s 0.4   errors/s 0.1   in flight 2   consumers: 1 live, 1 idle, 1 dead" in out
    row = _row(lines, "normal ")
    cells = row.split()
    assert cells[1:3] == ["3", "1"] and cells[3:5][1] == "s" and cells[-1] == "2"
    assert _row(lines, "low (batch windows)").split()[-1] == "0"
    assert "claude-haiku-5-5" in out and "rate limits in use" in out
    assert "feature:summarize" in _row(lines, "feature:summarize") and "open" in out
    assert "features.summarize.daily_usd" in out and "90%" in _row(lines, "features.summarize")
    assert _row(lines, "b1 ").split()[1:3] == ["submitted", "7"]
    assert _row(lines, "dead-worker").split()[1] == "2"


async def _idle_over(redis: aioredis.Redis, stream: str, name: str, ms: int) -> bool:
    return await idle_ms(redis, stream, name) > ms


def _row(lines: list[str], start: str) -> str:
    return next(line for line in lines if line.strip().startswith(start.strip()))


@pytest.mark.parametrize("quit_by", ["q", "SIGINT"])
async def test_live_view_refreshes_and_quits_cleanly(
    make_config: ConfigFactory, quit_by: str
) -> None:
    _, path = make_config()
    leader, follower = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "--config", str(path), "top", "--interval", "0.2",
        stdin=follower, stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    os.close(follower)
    seen = b""
    try:
        async with asyncio.timeout(60):
            while seen.count(b"tokenq top") < 2:  # a frame, then a refresh
                seen += await asyncio.to_thread(os.read, leader, 65536)
        if quit_by == "q":
            os.write(leader, b"q")
        else:
            proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(leader)
    assert b"Traceback" not in seen
