"""arq's contender: its Worker on no-op jobs, in .bench/arq-venv (arq pins redis < 6).

    python bench/contenders/arq_run.py preload --url URL --jobs N
    python bench/contenders/arq_run.py work --url URL --jobs N --concurrency C [--poll-delay S]

`preload` enqueues N jobs of `noop` with arq's own pool (enqueue_job, 500 at a time). `work`
runs arq's Worker with max_jobs = C and everything else at arq's defaults (results kept for
keep_result, 3,600 s; queue_read_limit max(5 C, 100)) but poll_delay: arq reads the queue
once per poll_delay (0.5 s by default), which caps it at queue_read_limit / poll_delay jobs a
second, so the bench lowers it (--poll-delay). Done means arq's after_job_end hook, called
once a job's result is stored and its keys cleaned up, has run N times; no probes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import handshake
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def main(a: argparse.Namespace) -> None:
    settings = RedisSettings.from_dsn(a.url)
    pool = await create_pool(settings)
    try:
        if a.mode == "preload":
            for start in range(0, a.jobs, 500):
                batch = min(500, a.jobs - start)
                await asyncio.gather(*(pool.enqueue_job("noop") for _ in range(batch)))
            return
        finished = 0
        all_done = asyncio.Event()

        async def after_job_end(ctx: dict[str, Any]) -> None:
            nonlocal finished
            finished += 1
            if finished == a.jobs:
                all_done.set()

        worker = Worker(
            functions=[noop], redis_pool=pool, max_jobs=a.concurrency, poll_delay=a.poll_delay,
            after_job_end=after_job_end, handle_signals=False,
        )  # fmt: skip
        handshake.ready()
        t0 = time.perf_counter()
        task = asyncio.create_task(worker.main())
        await all_done.wait()
        w = worker
        handshake.done(
            time.perf_counter() - t0, {},
            settings=f"max_jobs={w.max_jobs} poll_delay={w.poll_delay_s:g}s "
            f"queue_read_limit={w.queue_read_limit} keep_result={w.keep_result_s:g}s",
        )  # fmt: skip
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        handshake.finished(failed=worker.jobs_failed)
        await worker.close()
    finally:
        await pool.aclose()


if __name__ == "__main__":
    parser = handshake.peer_arguments(__doc__)
    parser.add_argument("--poll-delay", type=float, default=0.01)
    asyncio.run(main(parser.parse_args()))
