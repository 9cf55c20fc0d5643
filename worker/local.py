"""`tokenq up`: the whole system on one machine, for trying tokenq out.

Starts (or reuses) the embedded valkey-server, the simulator when no ANTHROPIC_API_KEY is set,
`tokenq worker` and the demo producer as child processes, and tails the usage stream in the
foreground until Ctrl-C (or, with exit_when_done, until the demo's jobs all have results).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from urllib.parse import urlparse

import redis.asyncio as aioredis

from worker.config import Config
from worker.contract import Keys
from worker.embedded import connect, redis_url
from worker.errors import ConfigError
from worker.usage import HitRates, follow, tail_line


def simulator_needed(cfg: Config) -> bool:
    return cfg.anthropic.base_url == "auto" and not os.environ.get("ANTHROPIC_API_KEY")


def simulator_alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_sim/health", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def start_simulator(cfg: Config, latency_ms: int) -> subprocess.Popen[bytes] | None:
    """Start the simulator at anthropic.simulator_url unless one already answers there."""
    url = cfg.anthropic.simulator_url.rstrip("/")
    if simulator_alive(url):
        return None
    where = urlparse(url)
    args = [
        sys.executable, "-m", "simulator", "--host", where.hostname or "127.0.0.1",
        "--port", str(where.port or 80), "--latency-ms", str(latency_ms),
    ]  # fmt: skip
    child = subprocess.Popen(args, stdout=subprocess.PIPE)
    assert child.stdout is not None
    line = child.stdout.readline().decode()
    if "listening" not in line:
        child.kill()
        raise ConfigError(
            f"the simulator did not start at {url} (anthropic.simulator_url); is the port taken?"
        )
    return child


def up(
    cfg: Config,
    config_path: str,
    *,
    processes: int,
    demo_jobs: int,
    demo_rate: float,
    latency_ms: int,
    exit_when_done: bool,
) -> int:
    """Run everything; returns the exit code (non-zero if the demo producer failed)."""
    url = redis_url(cfg)
    print(f"tokenq up: redis {url} ({cfg.redis.url})", flush=True)
    children: list[subprocess.Popen[bytes]] = []
    if simulator_needed(cfg):
        sim = start_simulator(cfg, latency_ms)
        children += [sim] if sim else []
        print(f"tokenq up: no ANTHROPIC_API_KEY, using the simulator at "
              f"{cfg.anthropic.simulator_url}", flush=True)  # fmt: skip
    # The usage tail below shows every outcome; the workers report only what goes wrong.
    tokenq = [sys.executable, "-m", "worker", "--config", config_path, "--log-level", "warning"]
    children.append(subprocess.Popen([*tokenq, "worker", "--processes", str(processes)]))
    if cfg.alerts.webhook_url:  # without one, the tail below shows the alert events already
        children.append(subprocess.Popen([*tokenq, "alerts"]))
        print(f"tokenq up: alerts go to {cfg.alerts.webhook_url}", flush=True)
    demo = subprocess.Popen(
        [sys.executable, "-m", "producers.demo", "--redis-url", url, "--prefix", cfg.prefix,
         "--jobs", str(demo_jobs), "--rate", str(demo_rate)]
    )  # fmt: skip
    children.append(demo)
    try:
        return asyncio.run(_tail_until_done(cfg, url, demo, exit_when_done))
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait()


class _Totals:
    count = 0
    cost_usd = 0.0
    baseline_usd = 0.0
    last_id = ""


async def _print_events(redis: aioredis.Redis, keys: Keys, totals: _Totals) -> None:
    rates = HitRates()
    async for entry_id, event in follow(redis, keys, block_ms=1000):
        totals.count += 1
        totals.cost_usd += event.cost_usd
        totals.baseline_usd += event.baseline_cost_usd
        totals.last_id = entry_id
        print(tail_line(event, rates), flush=True)


async def _caught_up(redis: aioredis.Redis, keys: Keys, totals: _Totals) -> None:
    """Wait until the tail has printed the newest usage event (at most 5 s)."""
    newest = await redis.xrevrange(keys.usage, count=1)
    target = str(newest[0][0]) if newest else ""
    for _ in range(250):
        if totals.last_id >= target:
            return
        await asyncio.sleep(0.02)  # the tail task advances on its own; this only waits for it


async def _tail_until_done(
    cfg: Config, url: str, demo: subprocess.Popen[bytes], exit_when_done: bool
) -> int:
    redis = connect(url, block_s=1.0)
    keys = Keys(cfg.prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    totals = _Totals()
    tail = asyncio.create_task(_print_events(redis, keys, totals))
    demo_done = asyncio.create_task(asyncio.to_thread(demo.wait))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({demo_done, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if demo_done.done():
            await _caught_up(redis, keys, totals)
            saved = 100 * (1 - totals.cost_usd / totals.baseline_usd) if totals.baseline_usd else 0
            print(
                f"tokenq up: demo finished (exit {demo.returncode}); {totals.count} usage events, "
                f"cost ${totals.cost_usd:.4f} vs naive ${totals.baseline_usd:.4f} "
                f"({saved:.0f}% saved)." + ("" if exit_when_done else " Ctrl-C stops."),
                flush=True,
            )
            if not exit_when_done:
                await stopped
            return demo.returncode or 0
        return 0
    finally:
        tail.cancel()
        stopped.cancel()
        await redis.aclose()
