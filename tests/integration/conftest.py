"""Integration fixtures: workers in this process, and worker processes to kill."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp import web

from worker.config import Config
from worker.worker import Worker, build_worker

RunWorker = Callable[..., AbstractAsyncContextManager[Worker]]


@pytest.fixture
def run_worker() -> RunWorker:
    """`async with run_worker(cfg, concurrency=8) as w:` runs a Worker in this event loop."""

    @asynccontextmanager
    async def run(cfg: Config, *, concurrency: int = 8) -> AsyncIterator[Worker]:
        worker = build_worker(cfg, concurrency=concurrency)
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await task
            await worker.aclose()

    return run


SpawnWorker = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn_worker() -> Iterator[SpawnWorker]:
    """Start `tokenq worker` processes; any left running are killed after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(config: Path, *, concurrency: int = 8) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--config", str(config), "--log-level", "warning",
             "worker", "--processes", "1", "--concurrency", str(concurrency)],
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
async def client(simulator_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The official SDK pointed at the simulator (the module's own, where it starts one)."""
    async with anthropic.AsyncAnthropic(base_url=simulator_url, api_key="test", max_retries=0) as c:
        yield c


class Webhook:
    """A local HTTP receiver of alert POSTs: what it got, and how many to refuse first."""

    def __init__(self) -> None:
        self.url = ""
        self.received: list[dict[str, Any]] = []
        self.refuse = 0  # answer this many POSTs with 500 before accepting

    async def handle(self, request: web.Request) -> web.Response:
        if self.refuse > 0:
            self.refuse -= 1
            return web.Response(status=500, text="refused on purpose")
        self.received.append(await request.json())
        return web.Response(text="ok")

    def texts(self) -> list[str]:
        return [str(body["text"]) for body in self.received]


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    """A webhook receiver on a free port of 127.0.0.1 (aiohttp, in the test's event loop)."""
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hook.url = f"http://127.0.0.1:{port}/hook"
    yield hook
    await runner.cleanup()
