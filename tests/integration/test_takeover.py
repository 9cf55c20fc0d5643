"""A worker presumed dead that is in fact alive (its renewals stopped for longer than the
visibility timeout: a Redis outage, a long pause) must not write anything for a job another
worker has taken over: not its end, not its deferral, not its run, and its renewals must not
take the job back. Otherwise the job ends twice: two results, two usage events."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import redis.asyncio as aioredis

from tests.helpers import add, entries
from worker.contract import GROUP, Keys, Result, UsageEvent, to_fields
from worker.queue import Delivery, Finish, Queue

HELLO = json.dumps({"messages": [{"role": "user", "content": "Hello there"}]})


def ending(job_id: str, text: str) -> Finish:
    result = msgspec.json.encode(Result(id=job_id, status="ok", text=text))
    event = UsageEvent(ts_ms=1, job_id=job_id, feature="summarize")
    return Finish(result, to_fields(event), None)


async def taken_over(redis: aioredis.Redis, keys: Keys) -> tuple[Queue, Queue, Delivery]:
    """Worker a read the job; worker b took it over (its idle time passed the timeout)."""
    qa, qb = (Queue(redis, keys, ["normal"], c, visibility_ms=1) for c in ("a", "b"))
    await qa.ensure_groups()
    entry = await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO})
    [d] = await qa.read(1, 100)
    got: Any = await redis.xclaim(keys.jobs("normal"), GROUP, "b", 0, [entry])
    assert got and d.entry_id == entry
    return qa, qb, d


async def test_the_first_worker_cannot_finish_a_job_taken_over(
    redis: aioredis.Redis, keys: Keys
) -> None:
    qa, qb, d = await taken_over(redis, keys)
    assert not await qa.finish(d, d.job_id, ending(d.job_id, "from a"))
    assert await redis.get(keys.result(d.job_id)) is None
    assert await entries(redis, keys.usage) == []
    assert await qb.finish(d, d.job_id, ending(d.job_id, "from b"))
    assert json.loads(await redis.get(keys.result(d.job_id)) or "{}")["text"] == "from b"
    assert len(await entries(redis, keys.usage)) == 1
    assert not await qb.finish(d, d.job_id, ending(d.job_id, "again"))  # once only


async def test_the_first_worker_cannot_defer_renew_or_record_a_job_taken_over(
    redis: aioredis.Redis, keys: Keys
) -> None:
    qa, _, d = await taken_over(redis, keys)
    assert not await qa.defer(d, d.job_id, 10**13)
    assert await redis.zcard(keys.deferred) == 0
    assert not await qa.save_run(d, b'{"t0":1}')
    assert await redis.hget(keys.state(d.job_id), "run") is None
    await qa.renew([d])
    rows: Any = await redis.xpending_range(keys.jobs("normal"), GROUP, "-", "+", 10)
    assert [r["consumer"] for r in rows] == ["b"]  # not taken back
