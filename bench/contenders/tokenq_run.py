"""tokenq's contender: one Worker (worker.worker.build_worker, as `tokenq worker` builds it)
in this process, through a backlog bench/throughput.py loaded onto the `normal` stream.

    python bench/contenders/tokenq_run.py --config PATH --jobs N --concurrency C
        [--transport simulator|in-process] [--warm K] [--timeout S]

`--transport in-process` answers every API call at once from memory through the SDK's own
client (an httpx2.MockTransport): what is left is tokenq's own cost per job. `--warm K`: K jobs
already waiting are run by a first worker before `ready` (the response-cache case: its answer
is then cached). Done means the usage stream holds one event per job: tokenq writes the event,
the result and the XACK in one MULTI, so the last event is the last job finished. Progress is
read with XLEN every 5 ms on a connection of its own; those polls are reported as probes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import handshake
import httpx2
import msgspec
import redis.asyncio as aioredis

from worker.config import Config, load_config
from worker.contract import Keys
from worker.embedded import connect
from worker.worker import build_worker

CANNED = msgspec.json.encode(
    {
        "id": "msg_01BenchCannedReply", "type": "message", "role": "assistant",
        "model": "claude-haiku-5-5",
        "content": [{"type": "text", "text": "Queues keep bills small."}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 18, "output_tokens": 7, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "service_tier": "standard"},
    }
)  # fmt: skip
CANNED_HEADERS = {"content-type": "application/json", "request-id": "req_01BenchCanned"}
POLL_S = 0.005  # progress polling: its commands are reported and taken out of the counts


class InProcessApi:
    """The Messages API in this process: every POST /v1/messages gets the same valid reply."""

    def __init__(self) -> None:
        self.calls = 0

    async def answer(self, request: httpx2.Request) -> httpx2.Response:
        if request.method != "POST" or request.url.path != "/v1/messages":
            error = {"type": "not_found_error", "message": f"no route {request.url.path}"}
            body = {"type": "error", "error": error}
            return httpx2.Response(404, json=body, headers=CANNED_HEADERS)
        self.calls += 1
        return httpx2.Response(200, content=CANNED, headers=CANNED_HEADERS)

    def client(self) -> anthropic.AsyncAnthropic:
        """A new SDK client whose HTTP client is this in-process API (a worker closes its own)."""
        return anthropic.AsyncAnthropic(
            api_key="bench",
            base_url="http://bench.invalid",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self.answer)),
        )


async def wait_for_usage(
    probe: aioredis.Redis, usage: str, want: int, task: asyncio.Task[None], timeout_s: float
) -> int:
    """Wait until the usage stream holds `want` events; returns the XLEN polls sent.

    Raises RuntimeError if the worker stops or `timeout_s` passes first."""
    polls, deadline = 0, time.monotonic() + timeout_s
    while True:
        polls += 1
        if await probe.xlen(usage) >= want:
            return polls
        if task.done():
            task.result()  # re-raises the worker's exception
            raise RuntimeError(f"the worker stopped before {want} jobs were done")
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {want} jobs done after {timeout_s:g} s")
        await asyncio.sleep(POLL_S)


async def run_until(
    cfg: Config, api: InProcessApi | None, a: argparse.Namespace, probe: aioredis.Redis,
    want: int, when_done: Callable[[int], None],
) -> None:  # fmt: skip
    """Run a worker until the usage stream holds `want` events, call `when_done(polls)`, then
    stop the worker and wait for it to drain."""
    worker = build_worker(cfg, concurrency=a.concurrency, client=api.client() if api else None)
    task = asyncio.create_task(worker.run())
    try:
        when_done(await wait_for_usage(probe, Keys(cfg.prefix).usage, want, task, a.timeout))
    finally:
        worker.stop()
        await task
        await worker.aclose()


async def count_failed(probe: aioredis.Redis, usage: str) -> int:
    """Usage events whose status is not ok (there should be none)."""
    events: Any = await probe.xrange(usage)
    return sum(1 for _, fields in events if fields.get("status") != "ok")


async def main(a: argparse.Namespace) -> None:
    cfg = load_config(a.config)
    api = InProcessApi() if a.transport == "in-process" else None
    probe = connect(cfg.redis.url)
    try:
        if a.warm:
            await run_until(cfg, api, a, probe, a.warm, lambda polls: None)
        await probe.ping()  # its connection is made before the bench's first snapshot
        calls0 = api.calls if api else 0
        handshake.ready()
        t0 = time.perf_counter()

        def report(polls: int) -> None:
            seconds = time.perf_counter() - t0
            calls = api.calls - calls0 if api else None
            handshake.done(seconds, {"xlen": polls}, api_calls=calls)

        await run_until(cfg, api, a, probe, a.warm + a.jobs, report)
        handshake.finished(failed=await count_failed(probe, Keys(cfg.prefix).usage))
    finally:
        await probe.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--transport", choices=["simulator", "in-process"], default="simulator")
    parser.add_argument("--warm", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser.parse_args()))
