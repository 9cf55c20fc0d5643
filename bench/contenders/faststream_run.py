"""FastStream's contender: a Redis stream subscriber in a consumer group, in
.bench/faststream-venv (faststream[redis] with hiredis).

    python bench/contenders/faststream_run.py preload --url URL --jobs N
    python bench/contenders/faststream_run.py work --url URL --jobs N --concurrency C
        [--sleep-ms MS] [--max-records R]

`preload` creates the group at the stream's start (FastStream would create it at `$`, past a
backlog) and publishes N messages (JSON numbers) with the broker's own publish, one pipeline
per 1,000. `work` subscribes with StreamSub(group, consumer, max_records=C) and max_workers=C
(the concurrent subscriber: up to C handlers at once), a connection pool to match
(max_connections=C+2), the default ack policy (XACK once the handler returned) and the
per-message access log off (logger=None; tokenq runs at warning level too). The handler does
nothing, or sleeps --sleep-ms asynchronously. Done means N handlers have returned and the
group has nothing pending (each ack follows its handler); that last part is watched with
XPENDING every millisecond, reported as probes.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import handshake
import redis.asyncio as aioredis
from faststream.redis import RedisBroker, StreamSub

STREAM, GROUP, CONSUMER = "bench:jobs", "bench", "c1"


async def preload(url: str, jobs: int) -> None:
    broker = RedisBroker(url, logger=None)
    client = aioredis.Redis.from_url(url)
    try:
        await broker.connect()
        await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        for start in range(0, jobs, 1000):
            async with client.pipeline(transaction=False) as pipe:
                for i in range(start, min(jobs, start + 1000)):
                    await broker.publish(i, stream=STREAM, pipeline=pipe)
                await pipe.execute()
    finally:
        await broker.stop()
        await client.aclose()


async def work(a: argparse.Namespace) -> None:
    # One connection per handler in flight (each acks on its own) and the reader's: FastStream's
    # pool is not blocking, and an ack that finds no connection is lost to the pending list.
    broker = RedisBroker(a.url, logger=None, max_connections=a.concurrency + 2)
    probe = aioredis.Redis.from_url(a.url)
    handled = 0
    all_handled = asyncio.Event()
    sleep_s = a.sleep_ms / 1000
    max_records = a.max_records or a.concurrency
    sub = StreamSub(STREAM, group=GROUP, consumer=CONSUMER, max_records=max_records)

    # FastStream is not installed where mypy runs: its decorator is untyped there.
    @broker.subscriber(stream=sub, max_workers=a.concurrency)  # type: ignore[untyped-decorator]
    async def handle(body: int) -> None:
        nonlocal handled
        if sleep_s:
            await asyncio.sleep(sleep_s)
        handled += 1
        if handled == a.jobs:
            all_handled.set()

    try:
        await broker.connect()
        await probe.ping()
        handshake.ready()
        t0 = time.perf_counter()
        await broker.start()
        await all_handled.wait()
        polls = 1
        while (await probe.xpending(STREAM, GROUP))["pending"]:
            polls += 1
            await asyncio.sleep(0.001)
        handshake.done(
            time.perf_counter() - t0, {"xpending": polls},
            settings=f"max_workers={a.concurrency} max_records={max_records} "
            f"max_connections={a.concurrency + 2} polling_interval=100ms ack=after handler "
            "logger=None",
        )  # fmt: skip
        await broker.stop()
        pending = await probe.xpending(STREAM, GROUP)
        handshake.finished(failed=int(pending["pending"]))
    finally:
        await probe.aclose()


async def main(a: argparse.Namespace) -> None:
    if a.mode == "preload":
        await preload(a.url, a.jobs)
    else:
        await work(a)


if __name__ == "__main__":
    parser = handshake.peer_arguments(__doc__)
    parser.add_argument("--sleep-ms", type=int, default=0)
    parser.add_argument("--max-records", type=int, help="entries per XREADGROUP (concurrency)")
    asyncio.run(main(parser.parse_args()))
