#!/usr/bin/env python3
"""Chaos: the reference workload through a fleet while API faults, kill -9 of workers, a Redis
restart and deferrals hit it; then the invariants of a job's life, and the figures last.

    .venv/bin/python bench/chaos.py [--seed 1] [--jobs 3000] [--processes 3]
    (or: python3 dev.py bench chaos --seed 1)

Starts its own valkey-server (append-only, fsync always, so its restart loses nothing) and
the simulator (150 ms latency, --seed), writes the reference trace (make_workload.py --jobs N
--seed S) and feeds it over about FEED_S seconds to --processes `tokenq worker` processes
(config.toml with the rate limits raised, short retries, visibility timeout, breaker reset and
batch windows, and a daily cap on summarize_doc that the run reaches). Meanwhile a schedule
drawn from the seed:
  - API faults throughout: 429 with and without retry-after, 500, and slow answers (so that
    calls are in flight when a worker dies);
  - a 529 storm of a few seconds (the breakers open and defer jobs);
  - kill -9 of a worker process, twice (each started again a second later);
  - the organization's spend limit reached for a few seconds (429 enforced_spend_limit_
    reached: the fleet stops and defers its jobs), then lifted with `tokenq budgets resume`;
  - a Redis restart (two seconds down).
Then it waits for every job's result and checks (exit 1 if one fails):
  - every job has exactly one result and one usage event of kind job;
  - no job made more calls than queue.max_attempts, and every request the simulator saw is
    counted in a job's attempts (none was made behind the run's back);
  - the usage events bracket the simulator's ledger: the jobs' cost_usd is at most what it
    billed, and that plus the orphans' reserved_usd at least;
  - no cap was exceeded (the cap's spend in Redis, and its feature's events);
  - every worker process and the batcher are alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from common import (
    ROOT,
    UNLIMITED,
    Servers,
    raised_limits,
    say,
    sim_call,
    simulator,
    stop,
    workload,
    write_config,
)

from producers import NewJob, Producer
from worker.config import Config, load_config
from worker.contract import Keys, UsageEvent, from_fields
from worker.embedded import connect, free_port, server_args, wait_until_ready

FEED_S = 45.0  # the trace is fed over this long, so the schedule meets jobs in every state
CAP_USD = 0.05  # features.summarize_doc.daily_usd: reached within the run
BASE_FAULTS = {"429": 0.04, "429-bare": 0.02, "500": 0.02}
SETTINGS: dict[str, object] = {
    "queue.visibility_timeout_s": 4.0,
    "queue.max_attempts": 8,
    "queue.retry_base_s": 0.2,
    "queue.retry_max_s": 3.0,
    "worker.grace_s": 3.0,
    "breakers.reset_timeout_s": 2.0,
    "batch.flush_interval_s": 2.0,
    "batch.poll_s": 0.5,
    "batch.lease_s": 3.0,
    "features.summarize_doc.daily_usd": CAP_USD,
}


class Valkey:
    """The run's valkey-server, which the schedule restarts."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder / "valkey"
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = server_args(load_config(ROOT / "config.toml"), port=self.port,
                           data_dir=str(self.folder))  # fmt: skip
        args[args.index("everysec")] = "always"  # every acknowledged write is on disk
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        if not wait_until_ready(self.port):
            raise RuntimeError(f"valkey-server did not answer on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


class Fleet:
    """The worker processes: started, killed with SIGKILL, started again."""

    def __init__(self, config: Path, processes: int, concurrency: int, log: Path) -> None:
        self.command = [sys.executable, "-m", "worker", "--config", str(config), "--log-level",
                        "warning", "worker", "--processes", "1", "--concurrency",
                        str(concurrency)]  # fmt: skip
        self.log = log.open("ab")
        self.procs = [self._start() for _ in range(processes)]
        self.kills = 0

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command, cwd=ROOT, stdout=self.log, stderr=self.log)

    async def kill(self, n: int) -> None:
        victim = self.procs[n % len(self.procs)]
        victim.kill()
        victim.wait()
        self.kills += 1
        await asyncio.sleep(1.0)  # a supervisor's restart delay
        self.procs[n % len(self.procs)] = self._start()

    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)
        self.log.close()


@dataclass
class Chaos:
    """What the schedule did, for the figures."""

    events: list[str] = field(default_factory=list)


def schedule(seed: int, sim: str, valkey: Valkey, fleet: Fleet, config: Path,
             log: Chaos) -> list[tuple[float, str, Callable[[], Awaitable[None]]]]:  # fmt: skip
    """The run's chaos, drawn from the seed: (seconds after the start, what, how)."""
    rng = random.Random(seed)

    def faults(rates: dict[str, float], slow: float = 0.05) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            sim_call(sim, "config", {"fault_rate": rates, "slow_rate": slow, "slow_ms": 4000})

        return go

    async def spend_limit() -> None:
        sim_call(sim, "config", {"spend_cap_reached": True})
        await asyncio.sleep(rng.uniform(2, 4))
        sim_call(sim, "config", {"spend_cap_reached": False})
        await asyncio.sleep(1.0)
        # As an operator would: again until it is done (Redis may be restarting just then).
        for _ in range(30):
            done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "worker",
                                           "--config", str(config), "budgets", "resume"],
                                           capture_output=True, text=True)  # fmt: skip
            if done.returncode == 0:
                break
            log.events.append(f"budgets resume failed: {' '.join(done.stderr.split())[:400]}")
            await asyncio.sleep(2.0)
        log.events.append(f"budgets resume: {done.stdout.strip()}")

    async def redis_restart() -> None:
        valkey.stop()
        await asyncio.sleep(2.0)
        valkey.start()

    storm = {**BASE_FAULTS, "529": 0.7}
    at = [2.0, rng.uniform(8, 12), rng.uniform(16, 20), rng.uniform(22, 26),
          rng.uniform(28, 32), rng.uniform(34, 38), rng.uniform(40, 44)]  # fmt: skip
    victims = rng.sample(range(len(fleet.procs)), 2) if len(fleet.procs) > 1 else [0, 0]
    return [
        (at[0], "API faults on: 429, 429 without retry-after, 500, slow answers",
         faults(BASE_FAULTS)),
        (at[1], "a 529 storm", faults(storm)),
        (at[1] + rng.uniform(3, 6), "the 529 storm ends", faults(BASE_FAULTS)),
        (at[2], f"kill -9 worker {victims[0]}", lambda: fleet.kill(victims[0])),
        (at[3], "the spend limit reached, then lifted (tokenq budgets resume)", spend_limit),
        (at[4], "Redis restarts", redis_restart),
        (at[5], f"kill -9 worker {victims[1]}", lambda: fleet.kill(victims[1])),
        (at[6] + 10, "API faults off", faults({}, 0.0)),
    ]  # fmt: skip


async def play(plan: list[tuple[float, str, Callable[[], Awaitable[None]]]], t0: float,
               log: Chaos) -> None:  # fmt: skip
    async def at_time(at: float, what: str, action: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        say(f"  {time.monotonic() - t0:5.1f} s  {what}")
        log.events.append(f"{time.monotonic() - t0:5.1f} s  {what}")
        await action()

    await asyncio.gather(*(at_time(*step) for step in plan))


async def feed(url: str, prefix: str, trace: list[dict[str, Any]], ids: list[str]) -> None:
    """Submit the trace over FEED_S seconds, in chunks; a Redis restart is waited out."""
    producer = Producer(connect(url), prefix)
    chunk = max(1, len(trace) // int(FEED_S * 4))
    t0 = time.monotonic()
    for start in range(0, len(trace), chunk):
        jobs = [NewJob(feature=j["feature"], request=j["request"], priority=j["priority"],
                       tenant=j["tenant"], id=ids[start + n])
                for n, j in enumerate(trace[start : start + chunk])]  # fmt: skip
        while True:
            try:
                await producer.submit_many(jobs)
                break
            except (OSError, aioredis.RedisError):
                await asyncio.sleep(0.5)  # the schedule's Redis restart
        await asyncio.sleep(max(0.0, t0 + FEED_S * (start + chunk) / len(trace) - time.monotonic()))


async def settled(url: str, keys: Keys, ids: list[str], timeout_s: float) -> int:
    """Wait until every job has a result; how many are missing at the deadline."""
    client = connect(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            missing = 0
            try:
                for n in range(0, len(ids), 500):
                    names = [keys.result(i) for i in ids[n : n + 500]]
                    missing += len(names) - int(await client.exists(*names))
            except (OSError, aioredis.RedisError):
                missing = len(ids)
            if not missing or time.monotonic() > deadline:
                return missing
            await asyncio.sleep(1.0)  # progress is checked in Redis: no event to wait on
    finally:
        await client.aclose()


@dataclass
class Check:
    name: str
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = f"{'PASS' if not self.failures else 'FAIL'}  {self.name}"
        return "\n".join([head, *(f"        {f}" for f in self.failures[:10])])


async def check(url: str, cfg: Config, ids: list[str], ledger: dict[str, Any],
                fleet: Fleet) -> tuple[list[Check], dict[str, Any]]:  # fmt: skip
    """The invariants, and the figures they are made of."""
    keys, client = Keys(cfg.prefix), connect(url)
    try:
        raw: Any = await client.xrange(keys.usage)
        events = [from_fields(f) for _, f in raw]
        results = [await client.get(keys.result(i)) for i in ids]
        day = time.strftime("%Y-%m-%d", time.gmtime())
        cap: Any = await client.hgetall(keys.budget("feature:summarize_doc", day))
        lease = await client.get(keys.batcher_lease)
    finally:
        await client.aclose()
    jobs = [e for e in events if e.kind == "job"]
    orphans = [e for e in events if e.kind == "orphan"]
    per_job = Counter(e.job_id for e in jobs)
    one = Check("every job has exactly one result and one usage event of kind job")
    one.failures += [f"{i}: no result" for i, r in zip(ids, results, strict=True) if r is None]
    one.failures += [f"{i}: {per_job[i]} usage events" for i in ids if per_job[i] != 1]
    calls = Check(f"no job made more calls than queue.max_attempts ({cfg.queue.max_attempts})")
    calls.failures += [f"{e.job_id}: attempt {e.attempt}" for e in jobs
                       if e.attempt > cfg.queue.max_attempts]  # fmt: skip
    seen = _seen(ledger)
    counted = Check("every request the simulator saw is a call counted in a job's attempts")
    if sum(e.attempt for e in jobs) < seen:
        counted.failures.append(f"{sum(e.attempt for e in jobs)} attempts, {seen} requests")
    paid = sum(e.cost_usd for e in jobs)
    worst = paid + sum(e.reserved_usd for e in orphans)
    billed = float(ledger["total_cost_usd"])
    bracket = Check("the jobs' cost_usd <= the ledger <= that + the orphans' reserved_usd")
    if not paid - 1e-9 <= billed <= worst + 1e-9:
        bracket.failures.append(f"{paid:.6f} <= {billed:.6f} <= {worst:.6f} does not hold")
    capped = Check(f"no cap exceeded (features.summarize_doc.daily_usd = {CAP_USD})")
    spent = int(cap.get("spent", 0)) / 1e9
    feature = sum(e.cost_usd for e in jobs if e.feature == "summarize_doc")
    if spent > CAP_USD or feature > CAP_USD + 1e-9:
        capped.failures.append(f"spent {spent:.6f} in Redis, {feature:.6f} in usage events")
    alive = Check("every worker process and the batcher are alive at the end")
    alive.failures += [f"worker {n} exited" for n, ok in enumerate(fleet.alive()) if not ok]
    if lease is None:
        alive.failures.append("no process holds the batcher lease")
    figures = {"jobs": jobs, "orphans": orphans, "paid": paid, "worst": worst, "billed": billed,
               "spent": spent, "estimate": paid + sum(e.cost_usd for e in orphans)}  # fmt: skip
    return [one, calls, counted, bracket, capped, alive], figures


def _seen(ledger: dict[str, Any]) -> int:
    """The Messages requests the simulator answered: billed (realtime and batch items) and
    faults, but the spend limit's (not counted as attempts: nothing is billed)."""
    billed = sum(m["requests"] for section in ("models", "batch")
                 for m in ledger.get(section, {}).values())  # fmt: skip
    faults = sum(
        n for name, n in ledger["faults"].items() if name not in ("spend-cap", "batch-529")
    )
    return int(billed + faults)


def report(checks: list[Check], f: dict[str, Any], ledger: dict[str, Any], chaos: Chaos,
           fleet: Fleet, seconds: float, seed: int) -> None:  # fmt: skip
    jobs: list[UsageEvent] = f["jobs"]
    outcomes = Counter(e.error_type or e.status for e in jobs)
    billed_requests = sum(m["requests"] for m in ledger["models"].values())
    batch_requests = sum(m["requests"] for m in ledger.get("batch", {}).values())
    for c in checks:
        print(c.line())
    print("chaos, in order:")
    for line in chaos.events:
        print(f"  {line}")
    print(f"figures (seed {seed}, {seconds:.0f} s):")
    print(f"  jobs {len(jobs)}: " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    print(f"  calls counted as attempts {sum(e.attempt for e in jobs)}, requests the simulator "
          f"saw {_seen(ledger)} (most attempts for one job "
          f"{max((e.attempt for e in jobs), default=0)}); deferred jobs "
          f"{sum(1 for e in jobs if e.deferred_ms)}; kill -9 {fleet.kills}")  # fmt: skip
    print(f"  simulator: {billed_requests} realtime and {batch_requests} batch requests billed,"
          f" faults {json.dumps(ledger['faults'], sort_keys=True)}")  # fmt: skip
    print(f"  orphan events {len(f['orphans'])}: estimated ${f['estimate'] - f['paid']:.6f}, "
          f"reserved ${f['worst'] - f['paid']:.6f}")  # fmt: skip
    print(f"  cap summarize_doc: spent ${f['spent']:.6f} of ${CAP_USD}")
    print(f"  cost: usage events ${f['paid']:.6f} <= ledger ${f['billed']:.6f} <= "
          f"${f['worst']:.6f} (with the orphans' worst case); best estimate "
          f"${f['estimate']:.6f}")  # fmt: skip


async def chaos_run(folder: Path, a: argparse.Namespace, valkey: Valkey, sim_url: str) -> int:
    limits = raised_limits(load_config(ROOT / "config.toml"))
    srv = Servers(valkey.url, sim_url, 0, 0)
    cfg, path = write_config(folder, srv, f"chaos{a.seed}", {**limits, **SETTINGS})
    trace = workload(folder, a.jobs, a.seed)
    ids = [f"chaos-{a.seed}-{n}" for n in range(len(trace))]
    say(f"seed {a.seed}: {len(trace)} jobs over {FEED_S:.0f} s, {a.processes} workers")
    fleet = Fleet(path, a.processes, a.concurrency, folder / "fleet.log")
    try:
        chaos = Chaos()
        t0 = time.monotonic()
        plan = schedule(a.seed, sim_url, valkey, fleet, path, chaos)
        await asyncio.gather(play(plan, t0, chaos), feed(valkey.url, cfg.prefix, trace, ids))
        missing = await settled(valkey.url, Keys(cfg.prefix), ids, a.settle_s)
        seconds = time.monotonic() - t0
        await asyncio.sleep(cfg.batch.lease_s)  # a lease between holders is taken over by now
        ledger = sim_call(sim_url, "ledger")
        checks, figures = await check(valkey.url, cfg, ids, ledger, fleet)
        if missing:
            say(f"{missing} jobs had no result after {a.settle_s:.0f} s")
        report(checks, figures, ledger, chaos, fleet, seconds, a.seed)
        if any(c.failures for c in checks):
            errors(folder / "fleet.log")
            return 1
        return 0
    finally:
        fleet.stop()


def errors(log: Path, most: int = 40) -> None:
    """The last errors of the fleet's log (it goes with the run's folder)."""
    lines = log.read_text(errors="replace").splitlines()
    wanted = [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln or "Error" in ln]
    print(f"the fleet's log, its last {min(most, len(wanted))} error lines of {len(wanted)}:")
    for line in wanted[-most:]:
        print(f"  {line[:300]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1, help="schedule and trace seed (1)")
    parser.add_argument("--jobs", type=int, default=3000, help="jobs of the trace (3000)")
    parser.add_argument("--processes", type=int, default=3, help="worker processes (3)")
    parser.add_argument("--concurrency", type=int, default=24, help="jobs per process (24)")
    parser.add_argument("--settle-s", type=float, default=150.0,
                        help="how long to wait for the last results (150)")  # fmt: skip
    a = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenq-chaos-") as tmp:
        folder = Path(tmp)
        valkey = Valkey(folder)
        # The simulator at 150 ms, batches done in a second, limits far above the run's.
        sim_args = ("--seed", str(a.seed), "--limit", UNLIMITED, "--latency-ms", "150",
                    "--batch-seconds", "1")  # fmt: skip
        try:
            valkey.start()
            with simulator(folder, sim_args) as (sim_url, _pid):
                return asyncio.run(chaos_run(folder, a, valkey, sim_url))
        finally:
            valkey.stop()


if __name__ == "__main__":
    sys.exit(main())
