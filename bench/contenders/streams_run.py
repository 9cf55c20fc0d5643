"""The minimal redis-py streams worker: what a hand-written consumer of a Redis stream costs.

    python bench/contenders/streams_run.py preload --url URL --jobs N
    python bench/contenders/streams_run.py work --url URL --jobs N --concurrency C
        [--finish each|batch] [--sleep-ms MS]

Run by .bench/redis-py-venv (redis[hiredis] as tokenq pins it). `work` reads with XREADGROUP
(COUNT = free slots, BLOCK 100 ms), runs each job as a task (a no-op, or an asyncio sleep of
--sleep-ms), and finishes it with its result (SET ... EX) and its XACK in one MULTI: nothing
is acknowledged before its result is written, tokenq's guarantee. `--finish batch` reads up to
C jobs, runs them, and finishes them all in one MULTI (a reference: it holds every job of a
read until the slowest is done). Done means N jobs finished; it sends no probes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import handshake
import redis.asyncio as aioredis

STREAM, GROUP, CONSUMER = "bench:jobs", "bench", "c1"
RESULT = b'{"status":"ok","text":"done"}'
RESULT_TTL_S = 3600


async def preload(r: aioredis.Redis, jobs: int) -> None:
    """The group, then `jobs` entries, 1,000 per pipelined round trip."""
    await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for start in range(0, jobs, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(jobs, start + 1000)):
            pipe.xadd(STREAM, {"job": str(i), "payload": "noop"})
        await pipe.execute()


async def run_job(sleep_s: float) -> bytes:
    if sleep_s:
        await asyncio.sleep(sleep_s)
    return RESULT


async def finish_each(r: aioredis.Redis, jobs: int, concurrency: int, sleep_s: float) -> None:
    """One task per job; each finishes in its own MULTI (result + XACK)."""

    async def one(entry_id: bytes) -> None:
        result = await run_job(sleep_s)
        async with r.pipeline(transaction=True) as tx:
            tx.set(b"bench:result:" + entry_id, result, ex=RESULT_TTL_S)
            tx.xack(STREAM, GROUP, entry_id)
            await tx.execute()

    tasks: set[asyncio.Task[None]] = set()
    read = 0
    while read < jobs or tasks:
        free = concurrency - len(tasks)
        if free == 0 or read == jobs:
            finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()
            tasks -= finished
            continue
        reply: Any = await r.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=free, block=100)
        for _, entries in reply:
            for entry_id, _fields in entries:
                tasks.add(asyncio.create_task(one(entry_id)))
                read += 1


async def finish_batch(r: aioredis.Redis, jobs: int, concurrency: int, sleep_s: float) -> None:
    """Read up to `concurrency` jobs, run them, finish them all in one MULTI."""
    done = 0
    while done < jobs:
        reply: Any = await r.xreadgroup(
            GROUP, CONSUMER, {STREAM: ">"}, count=concurrency, block=100
        )
        ids: list[bytes] = [entry_id for _, entries in reply for entry_id, _fields in entries]
        if not ids:
            continue
        results = await asyncio.gather(*(run_job(sleep_s) for _ in ids))
        async with r.pipeline(transaction=True) as tx:
            for entry_id, result in zip(ids, results, strict=True):
                tx.set(b"bench:result:" + entry_id, result, ex=RESULT_TTL_S)
            tx.xack(STREAM, GROUP, *ids)
            await tx.execute()
        done += len(ids)


async def main(a: argparse.Namespace) -> None:
    r = aioredis.Redis.from_url(a.url, max_connections=a.concurrency + 1)
    try:
        if a.mode == "preload":
            await preload(r, a.jobs)
            return
        await r.ping()
        handshake.ready()
        t0 = time.perf_counter()
        finish = finish_batch if a.finish == "batch" else finish_each
        await finish(r, a.jobs, a.concurrency, a.sleep_ms / 1000)
        handshake.done(time.perf_counter() - t0, {}, settings=f"finish={a.finish}")
        pending = await r.xpending(STREAM, GROUP)
        handshake.finished(failed=int(pending["pending"]))
    finally:
        await r.aclose()


if __name__ == "__main__":
    parser = handshake.peer_arguments(__doc__)
    parser.add_argument("--finish", choices=["each", "batch"], default="each")
    parser.add_argument("--sleep-ms", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
