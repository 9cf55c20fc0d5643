#!/usr/bin/env python3
"""Rate limits across worker processes: the share of the binding limit used, and the 429s.

    .venv/bin/python bench/ratelimit.py [--seconds 120] [--processes 3] [--latency-ms 300]

Starts its own Valkey and simulator. The simulator limits claude-haiku-5-5 to 600 requests,
200,000 input tokens and 40,000 output tokens a minute, and config.toml says the same. A
backlog of the reference workload (bench/workloads/make_workload.py --jobs 2000 --seed 7,
every job forced to the haiku tier) waits on the streams. Then two runs of --seconds each:
  1. tokenq: --processes `tokenq worker` processes with limits.mode = "fleet" (the default);
  2. naive: the same processes with limits.mode = "local": each keeps the full limits alone
     with its own aiolimiter, as independent processes do.
Each run starts with full buckets on both sides (its own key prefix and backlog, a simulator
reset). T runs from the fleet's first call (the buckets stay full until then; the processes'
start is not what is measured) for --seconds. The most the API admits in T seconds is a full
bucket plus T/60 of refill, so the share of a limit is used / (limit x (1 + T/60)); the
binding limit is the one with the largest share. Used and refused come from the simulator's
ledger at T. Printed first: the error of the input-token estimate on the same workload. The
last line is the headline.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    UNLIMITED,
    Servers,
    say,
    servers,
    sim_call,
    stop,
    workload,
    write_config,
)

from producers import NewJob, Producer
from simulator.tokens import input_tokens
from worker.embedded import connect
from worker.estimate import Calibration

MODEL = "claude-haiku-5-5"
LIMITS = (600, 200_000, 40_000)
DIMS = ("requests", "input tokens", "output tokens")


def estimator_error(trace: list[dict[str, Any]], scale: float = 1.0) -> str:
    """How far the estimate is from what the simulator bills (times `scale`, standing for a
    tokenizer that counts more), raw and with the calibration learning from each answer."""
    cal = Calibration()
    raw_errors: list[float] = []
    cal_errors: list[float] = []
    for job in trace:
        params = {**job["request"], "model": MODEL}
        billed = round(input_tokens(params) * scale)
        estimate, raw = cal.estimate(MODEL, params)
        raw_errors.append(raw / billed - 1)
        cal_errors.append(estimate / billed - 1)
        cal.learn(MODEL, raw, billed)

    def describe(errors: list[float]) -> str:
        mean = sum(abs(e) for e in errors) / len(errors)
        return f"mean |error| {mean:.2%}, worst {max(errors, key=abs):+.2%}"

    return f"raw: {describe(raw_errors)}; calibrated: {describe(cal_errors)}"


@dataclass(frozen=True)
class Outcome:
    mode: str
    seconds: float
    used: tuple[int, int, int]
    refused: int

    def shares(self) -> list[float]:
        allowed = [limit * (1 + self.seconds / 60) for limit in LIMITS]
        return [u / a for u, a in zip(self.used, allowed, strict=True)]

    def binding(self) -> tuple[str, float]:
        shares = self.shares()
        best = max(range(3), key=lambda n: shares[n])
        return DIMS[best], shares[best]

    def describe(self) -> str:
        parts = ", ".join(
            f"{d} {u:,} ({s:.1%})" for d, u, s in zip(DIMS, self.used, self.shares(), strict=True)
        )
        dim, share = self.binding()
        return f"{parts}; binding: {dim} {share:.1%}; 429s: {self.refused}"


async def preload(redis_url: str, prefix: str, trace: list[dict[str, Any]]) -> None:
    client = connect(redis_url)
    try:
        producer = Producer(client, prefix)
        jobs = [
            NewJob(feature=j["feature"], request=j["request"], priority=j["priority"],
                   tenant=j["tenant"], tier="haiku", cache="off")
            for j in trace
        ]  # fmt: skip
        for start in range(0, len(jobs), 500):
            await producer.submit_many(jobs[start : start + 500])
    finally:
        await client.aclose()


def one_run(
    folder: Path, srv: Servers, trace: list[dict[str, Any]], mode: str, a: argparse.Namespace
) -> Outcome:
    limits = 'models."claude-haiku-5-5".limits'
    cfg, path = write_config(folder, srv, f"rl{mode}", {
        "limits.mode": mode, f"{limits}.rpm": LIMITS[0], f"{limits}.itpm": LIMITS[1],
        f"{limits}.otpm": LIMITS[2],
        "batch.priorities": [],  # every job in real time, under the limits being measured
    })  # fmt: skip
    asyncio.run(preload(srv.redis_url, cfg.prefix, trace))
    sim_call(srv.sim_url, "reset", {})
    cmd = [sys.executable, "-m", "worker", "--config", str(path), "--log-level", "error",
           "worker", "--processes", "1", "--concurrency", str(a.concurrency)]  # fmt: skip
    procs = [subprocess.Popen(cmd, cwd=ROOT) for _ in range(a.processes)]
    try:
        # T starts at the fleet's first call: the buckets are full until then, and the
        # processes' start (seconds on a loaded machine) is not what the bench measures.
        started = time.monotonic()
        while not sim_call(srv.sim_url, "ledger")["models"].get(MODEL, {}).get("requests"):
            if time.monotonic() - started > 120:
                raise SystemExit("no call answered 120 s after the workers started")
            time.sleep(0.05)
        say(f"  {mode}: first call {time.monotonic() - started:.1f} s after the start")
        t0 = time.monotonic()
        while (left := a.seconds - (time.monotonic() - t0)) > 0:
            time.sleep(min(10.0, left))  # a fixed-length run: the clock is what is measured
            ledger = sim_call(srv.sim_url, "ledger")
            done = ledger["models"].get(MODEL, {}).get("requests", 0)
            say(f"  {mode}: {time.monotonic() - t0:5.0f} s, {done} calls answered, "
                f"{sum(ledger['rate_limited'].values())} refused")  # fmt: skip
        seconds = time.monotonic() - t0
    finally:
        for proc in procs:
            stop(proc)
    billed = ledger["models"].get(MODEL, {})
    used = (
        int(billed.get("requests", 0)),
        int(billed.get("input_tokens", 0)) + int(billed.get("cache_creation_input_tokens", 0)),
        int(billed.get("output_tokens", 0)),
    )
    return Outcome(mode, seconds, used, int(sum(ledger["rate_limited"].values())))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="length of a run (120)")
    parser.add_argument("--processes", type=int, default=3, help="worker processes (3)")
    parser.add_argument("--concurrency", type=int, default=32, help="per process (32)")
    parser.add_argument("--latency-ms", type=int, default=300, help="simulated latency (300)")
    parser.add_argument("--jobs", type=int, default=2000, help="backlog per run (2000)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    limit = "/".join(str(n) for n in LIMITS)
    sim_args = ("--limit", UNLIMITED, "--limit", f"{MODEL}={limit}",
                "--latency-ms", str(a.latency_ms))  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="tokenq-bench-") as tmp,
        servers(Path(tmp), sim_args) as srv,
    ):
        trace = workload(Path(tmp), a.jobs, 7)
        say(f"estimator on {len(trace)} reference jobs: {estimator_error(trace)}")
        outcomes = []
        for mode in ("fleet", "local"):
            say(f"{mode}: {a.processes} processes x concurrency {a.concurrency} for "
                f"{a.seconds:g} s against {limit} per minute")  # fmt: skip
            outcomes.append(one_run(Path(tmp), srv, trace, mode, a))
    fleet, naive = outcomes
    print(f"workload: bench/workloads/make_workload.py --jobs {a.jobs} --seed 7, tier haiku; "
          f"limits {limit} per minute; {a.processes} processes; {a.latency_ms} ms")  # fmt: skip
    print(f"input estimate vs billed: {estimator_error(trace)}")
    print(f"  if the tokenizer counted 30% more: {estimator_error(trace, 1.3)}")
    print(f"1. tokenq (limits.mode = fleet)            {fleet.describe()}")
    print(f"2. naive per-process aiolimiter (local)    {naive.describe()}")
    dim, share = fleet.binding()
    ndim, nshare = naive.binding()
    print(f"ratelimit: tokenq used {share:.1%} of the binding limit ({dim}) with "
          f"{fleet.refused} 429s; naive per-process aiolimiter {nshare:.1%} ({ndim}) with "
          f"{naive.refused} 429s")  # fmt: skip


if __name__ == "__main__":
    main()
