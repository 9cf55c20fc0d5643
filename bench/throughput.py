#!/usr/bin/env python3
"""Throughput of the whole worker path, against arq on the same machine in the same run.

    python3 dev.py bench            (or: .venv/bin/python bench/throughput.py --help)

Measures, one after the other, against one valkey-server it starts itself:
  1. tokenq, simulator at 0 ms: N jobs pre-loaded with submit_many, one in-process Worker
     (concurrency C) runs them through the SDK and the simulator over HTTP: jobs/s.
  2. tokenq, in-process transport: the same, the SDK's HTTP client answering every call at once
     from memory (httpx2.MockTransport): the worker's own cost per job, without the simulator's.
  3. arq: the same number of no-op jobs through arq's Worker (max_jobs = C, burst mode, its
     defaults otherwise), in a venv of its own (arq pins redis<6): jobs/s.
  4. one `tokenq worker` process with 2,000 calls in flight at 500 ms simulated latency:
     its peak RSS and jobs/s.
The ratio printed last is (2) / (3): tokenq's full per-job path against arq doing nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producers import NewJob, Producer  # noqa: E402
from worker.config import Config, parse_config  # noqa: E402
from worker.embedded import connect, free_port, server_args, wait_until_ready  # noqa: E402
from worker.worker import build_worker  # noqa: E402

REQUEST = {"messages": [{"role": "user", "content": "Summarise: queues keep bills small."}]}
CANNED = msgspec.json.encode(
    {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-haiku-5-5",
        "content": [{"type": "text", "text": "Queues keep bills small."}],
        "stop_reason": "end_turn", "stop_sequence": None, "stop_details": None,
        "container": None,
        "usage": {"input_tokens": 18, "output_tokens": 7, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "service_tier": "standard"},
    }
)  # fmt: skip
ARQ_SCRIPT = """
import asyncio, json, sys, time
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker

async def noop(ctx):
    return None

async def main(port, jobs, max_jobs):
    settings = RedisSettings(host="127.0.0.1", port=port, database=1)
    pool = await create_pool(settings)
    await pool.flushdb()
    for start in range(0, jobs, 500):
        await asyncio.gather(*(pool.enqueue_job("noop") for _ in range(min(500, jobs - start))))
    worker = Worker(functions=[noop], redis_settings=settings, burst=True, max_jobs=max_jobs,
                    handle_signals=False, keep_result=60)
    t0 = time.perf_counter()
    await worker.async_run()
    seconds = time.perf_counter() - t0
    print(json.dumps({"jobs": worker.jobs_complete, "seconds": seconds,
                      "settings": f"burst=True max_jobs={max_jobs} poll_delay=0.5 (default)"}))
    await worker.close()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
"""


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


@contextmanager
def services(latency_ms: int = 0) -> Iterator[tuple[str, str]]:
    """A valkey-server and the simulator on free ports: (redis url, simulator url)."""
    port = free_port()
    base = parse_config(tomllib.loads((ROOT / "config.toml").read_text()))
    with tempfile.TemporaryDirectory() as data:
        valkey = subprocess.Popen(server_args(base, port=port, data_dir=data),
                                  stdout=subprocess.DEVNULL)  # fmt: skip
        sim = subprocess.Popen(
            [sys.executable, "-m", "simulator", "--port", "0", "--latency-ms", str(latency_ms)],
            stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        try:
            assert wait_until_ready(port), "valkey-server did not start"
            assert sim.stdout is not None
            sim_url = sim.stdout.readline().decode().split()[-1]
            yield f"redis://127.0.0.1:{port}/0", sim_url
        finally:
            for proc in (sim, valkey):
                proc.terminate()
                proc.wait()
            if sim.stdout:
                sim.stdout.close()


def bench_config(redis_url: str, sim_url: str, prefix: str) -> tuple[Config, str]:
    """The repo's config pointed at these servers: (Config, the same as TOML text)."""
    text = (ROOT / "config.toml").read_text()
    for old, new in [
        ('prefix = "tokenq"', f'prefix = "{prefix}"'),
        ('url = "embedded"', f'url = "{redis_url}"'),
        ('base_url = "auto"', f'base_url = "{sim_url}"'),
    ]:
        text = text.replace(old, new, 1)
    return parse_config(tomllib.loads(text)), text


async def preload(redis_url: str, prefix: str, jobs: int) -> None:
    redis = connect(redis_url)
    producer = Producer(redis, prefix)
    for start in range(0, jobs, 1000):
        batch = [
            NewJob(feature="summarize", request=REQUEST) for _ in range(min(1000, jobs - start))
        ]
        await producer.submit_many(batch)
    await redis.aclose()


async def run_tokenq(cfg: Config, jobs: int, concurrency: int, mock: bool) -> float:
    """jobs/s of one in-process Worker through a pre-loaded backlog."""
    await preload(cfg.redis.url, cfg.prefix, jobs)
    client = None
    if mock:

        async def answer(_: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(200, content=CANNED, headers={"request-id": "req_bench",
                                   "content-type": "application/json"})  # fmt: skip

        client = anthropic.AsyncAnthropic(
            api_key="bench", base_url="http://bench.invalid", max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)),
        )  # fmt: skip
    worker = build_worker(cfg, concurrency=concurrency, client=client)
    redis = connect(cfg.redis.url)
    usage = f"{cfg.prefix}:usage"
    t0 = time.perf_counter()
    task = asyncio.create_task(worker.run())
    # A benchmark's progress check, 20 a second: it is not what is timed.
    while await redis.xlen(usage) < jobs:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - t0
    worker.stop()
    await task
    await worker.aclose()
    await redis.aclose()
    return jobs / seconds


def run_arq(redis_url: str, jobs: int, concurrency: int) -> tuple[float, str]:
    """jobs/s of arq's Worker on no-op jobs, in its own venv."""
    venv = ROOT / ".bench" / "arq-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        say("creating .bench/arq-venv with arq (once)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "arq==0.28.*"], check=True)
    script = ROOT / ".bench" / "arq_noop.py"
    script.write_text(ARQ_SCRIPT)
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run([str(python), str(script), port, str(jobs), str(concurrency)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["jobs"] == jobs, report
    return jobs / report["seconds"], str(report["settings"])


def run_rss(redis_url: str, sim_url: str, in_flight: int, jobs: int) -> tuple[float, int, float]:
    """(peak RSS MiB, most calls seen in flight, jobs/s) of one worker process."""
    cfg, text = bench_config(redis_url, sim_url, "brss")
    req = urllib.request.Request(f"{sim_url}/_sim/config", method="POST",
                                 data=json.dumps({"latency_ms": 500}).encode())  # fmt: skip
    urllib.request.urlopen(req, timeout=5).close()
    asyncio.run(preload(redis_url, cfg.prefix, jobs))
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.toml"
        config.write_text(text)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--config", str(config), "--log-level", "warning",
             "worker", "--processes", "1", "--concurrency", str(in_flight)], cwd=ROOT,
        )  # fmt: skip
        try:
            most, peak_kib = asyncio.run(watch(cfg, proc.pid, jobs))
        finally:
            proc.terminate()
            proc.wait()
    return peak_kib / 1024, most, jobs / (time.perf_counter() - t0)


async def watch(cfg: Config, pid: int, jobs: int) -> tuple[int, int]:
    """Sample a worker process until all jobs are done: (most in flight, peak RSS KiB)."""
    redis = connect(cfg.redis.url)
    stream, usage = f"{cfg.prefix}:jobs:normal", f"{cfg.prefix}:usage"
    status = Path(f"/proc/{pid}/status")
    most = peak = 0
    while await redis.xlen(usage) < jobs:
        pending: Any = await redis.xpending(stream, "workers")
        most = max(most, int(pending["pending"]))
        vm_hwm = status.read_text().split("VmHWM:")[1]  # noqa: ASYNC240 - procfs, no disk
        peak = max(peak, int(vm_hwm.split()[0]))
        await asyncio.sleep(0.1)  # sampling interval
    await redis.aclose()
    return most, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per run (5000)")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs in flight (64)")
    parser.add_argument(
        "--in-flight", type=int, default=2000, help="calls in flight for RSS (2000)"
    )
    parser.add_argument("--skip-arq", action="store_true", help="leave out the arq baseline")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the RSS run")
    a = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with services() as (redis_url, sim_url):
        say(f"1/4 tokenq through the simulator (0 ms): {a.jobs} jobs, concurrency {a.concurrency}")
        cfg, _ = bench_config(redis_url, sim_url, "bsim")
        sim_rate = asyncio.run(run_tokenq(cfg, a.jobs, a.concurrency, mock=False))
        rows.append(("tokenq, simulator over HTTP, 0 ms", f"{sim_rate:,.0f} jobs/s"))
        say("2/4 tokenq with the in-process transport")
        cfg, _ = bench_config(redis_url, sim_url, "bmock")
        mock_rate = asyncio.run(run_tokenq(cfg, a.jobs, a.concurrency, mock=True))
        rows.append(("tokenq, in-process transport", f"{mock_rate:,.0f} jobs/s"))
        arq_rate = 0.0
        if not a.skip_arq:
            say(f"3/4 arq, {a.jobs} no-op jobs, max_jobs {a.concurrency}")
            arq_rate, arq_settings = run_arq(redis_url, a.jobs, a.concurrency)
            rows.append((f"arq no-op ({arq_settings})", f"{arq_rate:,.0f} jobs/s"))
        if not a.skip_rss:
            jobs = a.in_flight * 3
            say(f"4/4 one worker process, {a.in_flight} in flight at 500 ms, {jobs} jobs")
            mib, most, rate = run_rss(redis_url, sim_url, a.in_flight, jobs)
            seen = f"peak RSS {mib:.0f} MiB, {most} in flight at most, {rate:,.0f} jobs/s"
            rows.append((f"worker process, {a.in_flight} in flight at 500 ms", seen))
    width = max(len(k) for k, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    ratio = f"{mock_rate / arq_rate:.2f}" if arq_rate else "n/a (--skip-arq)"
    print(
        f"throughput: tokenq {sim_rate:,.0f} jobs/s (simulator) / {mock_rate:,.0f} jobs/s "
        f"(in-process transport) vs arq {arq_rate:,.0f} no-op jobs/s: "
        f"ratio in-process/arq {ratio}"
    )


if __name__ == "__main__":
    main()
