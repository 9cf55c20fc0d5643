"""Shared round trips (worker.trips) on a real Valkey: many jobs' writes in one round trip,
each job's own replies and errors, scripts loaded once and again after a flush."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from worker import trips
from worker.trips import Trips, raise_first

ECHO = "return ARGV[1] .. redis.call('GET', KEYS[1])"


async def reads(redis: aioredis.Redis) -> int:
    """Requests the server has read so far (this INFO's own included)."""
    info: Any = await redis.info("stats")
    return int(info["total_reads_processed"])


async def exec_calls(redis: aioredis.Redis) -> int:
    stats: Any = await redis.info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


async def test_jobs_of_one_loop_turn_share_one_round_trip(redis: aioredis.Redis) -> None:
    shared = Trips(redis)
    await redis.ping()  # the pool's connection is open
    before = await reads(redis)

    async def job(n: int) -> list[Any]:
        return await shared.run(lambda pipe: (pipe.set(f"t:{n}", n), pipe.incr("t:count")))

    got = await asyncio.gather(*(job(n) for n in range(50)))
    after = await reads(redis)
    assert [r[0] for r in got] == [True] * 50
    assert sorted(int(r[1]) for r in got) == list(range(1, 51))  # each its own replies
    assert after - before - 1 <= 2  # 50 jobs: one trip (a second at most), not 50
    assert await redis.get("t:49") == "49"


async def test_an_atomic_trip_is_one_transaction_and_errors_stay_with_their_job(
    redis: aioredis.Redis,
) -> None:
    shared = Trips(redis)
    await redis.set("t:text", "not a number")
    execs = await exec_calls(redis)
    bad = shared.run(lambda tx: (tx.set("t:a", 1), tx.incr("t:text")), atomic=True)
    good = shared.run(lambda tx: tx.set("t:b", 2), atomic=True)
    bad_replies, good_replies = await asyncio.gather(bad, good)
    with pytest.raises(ResponseError):
        raise_first(bad_replies)
    assert raise_first(good_replies) == [True]
    assert await redis.mget("t:a", "t:b") == ["1", "2"]
    assert await exec_calls(redis) == execs + 1  # both jobs' writes in one MULTI/EXEC


async def test_scripts_load_once_and_again_after_a_flush(redis: aioredis.Redis) -> None:
    script = trips.register(redis, ECHO)
    shared = Trips(redis)
    await redis.config_resetstat()
    await shared.load(warm=3)
    await redis.set("t:k", "world")
    queued = lambda pipe: trips.evalsha_into(pipe, script, ["t:k"], ["hello "])  # noqa: E731
    assert raise_first(await shared.run(queued)) == ["hello world"]
    await redis.script_flush()  # Valkey lost its scripts (a restart)
    # As fence.Writes.into queues it (redis-py would send SCRIPT EXISTS first): not here.
    got = await shared.run(
        lambda pipe: (pipe.scripts.add(script), pipe.evalsha(script.sha, 1, "t:k", "again "))
    )
    assert raise_first(got) == ["again world"]  # NOSCRIPT: loaded again, run once more
    stats: Any = await redis.info("commandstats")
    assert "cmdstat_script|exists" not in stats
    assert stats["cmdstat_evalsha"]["calls"] == 3  # the first, the NOSCRIPT one, its rerun
    clients: Any = await redis.info("clients")
    assert int(clients["connected_clients"]) >= 3  # the pool warmed


async def test_a_trip_that_fails_fails_every_job_in_it() -> None:
    nowhere = aioredis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    shared = Trips(nowhere)
    jobs = [shared.run(lambda pipe: pipe.set("t:x", 1)) for _ in range(3)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert [type(r) for r in results] == [RedisConnectionError] * 3
    await nowhere.aclose()


async def test_a_script_registered_elsewhere_is_loaded_the_first_time_a_trip_carries_it(
    redis: aioredis.Redis,
) -> None:
    script = redis.register_script("return 'elsewhere ' .. ARGV[1]")  # not trips.register
    shared = Trips(redis)
    await redis.script_flush()

    def queued(pipe: Any) -> None:  # as a module outside worker.trips queues it on a MULTI
        pipe.scripts.add(script)
        pipe.evalsha(script.sha, 0, "one")

    assert raise_first(await shared.run(queued, atomic=True)) == ["elsewhere one"]
    await redis.script_flush()
    assert raise_first(await shared.run(queued, atomic=True)) == ["elsewhere one"]  # again
