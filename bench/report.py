"""What the rollups cost: memory, report latency, and the finishing write with and without them.

    python3 dev.py bench report [--outcomes 1000000] [--days 90] [--finishes 2000] [--rounds 5]

1. Writes `--outcomes` synthetic job outcomes spread over `--days` days (features, models and
   priorities as config.toml has them, 500 tenants with a long tail, errors, cache hits and
   batches) through the rollups' own code (worker.rollups: the records of a Delta per 100
   outcomes, then folded) into a Valkey of its own.
2. Prints the rollups' memory (MEMORY USAGE of every rollup key), then the latency of
   `tokenq report` queries over the whole period: once cold (the first reader compacts every
   finished day) and then warm (median of 5).
3. Runs the real finishing write (worker.queue.Queue.finish: result, usage event, reply, XACK,
   XDEL, state) on real pending entries, `--finishes` per round, alternating without and
   with rollups for `--rounds` rounds, and prints the medians per finish: client CPU, Valkey
   CPU (INFO cpu of the server process), Redis commands (INFO commandstats) and wall time;
   then what folding the records costs Valkey per outcome; the overhead ratio last.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis
from common import ROOT, say, stop

from worker.config import Config, load_config
from worker.contract import GROUP, Keys, Result, UsageEvent, to_fields
from worker.embedded import free_port, server_args, wait_until_ready
from worker.queue import Delivery, Finish, Queue
from worker.report import Query, query
from worker.rollups import Rollups, settings_of

TENANTS = 500


@contextmanager
def valkey(folder: Path) -> Iterator[tuple[str, int]]:
    """The embedded server's command line (append-only file, fsync every second) on a free
    port: its URL and pid."""
    port = free_port()
    args = server_args(load_config(ROOT / "config.toml"), port=port, data_dir=str(folder))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        if not wait_until_ready(port):
            raise RuntimeError(f"valkey-server did not answer on 127.0.0.1:{port}")
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        stop(proc)


class Outcomes:
    """Synthetic usage events shaped like the reference workload's features."""

    def __init__(self, cfg: Config, seed: int, tenants: int = TENANTS) -> None:
        self.rng = random.Random(seed)
        self.cfg = cfg
        weights = [self.rng.paretovariate(1.1) for _ in range(tenants)]
        self.tenants = [f"tenant-{n:03d}" for n in range(tenants)]
        self.weights = sorted(weights, reverse=True)
        self.features = list(cfg.features)

    def one(self, ts_ms: int) -> dict[str, str]:
        rng, cfg = self.rng, self.cfg
        feature = rng.choice(self.features)
        tier = cfg.features[feature].tier or cfg.router.default_tier
        if rng.random() < 0.05:  # escalated or downgraded
            tier = rng.choice(list(cfg.tiers))
        batch = feature in ("nightly_enrich",)
        cached = feature == "support_faq" and rng.random() < 0.6
        priority = "low" if batch else rng.choice(("high", "normal", "normal"))
        status: Literal["ok", "error"] = "error" if rng.random() < 0.03 else "ok"
        inp, out = int(rng.lognormvariate(6.5, 1.0)), int(rng.lognormvariate(4.5, 0.8))
        read = rng.choice((0, 0, 1024, 4096)) if not cached else 0
        cost = 0.0 if cached or status == "error" else (inp * 1 + out * 5 + read * 0.1) / 1e6
        return to_fields(UsageEvent(
            ts_ms=ts_ms, job_id="j", feature=feature,
            tenant=rng.choices(self.tenants, self.weights)[0], priority=priority, tier=tier,
            model=cfg.tiers[tier], mode="batch" if batch else "cache" if cached else "realtime",
            status=status, attempt=1, input_tokens=0 if cached else inp,
            output_tokens=0 if cached else out, cache_read_input_tokens=read, cost_usd=cost,
            baseline_cost_usd=(inp + read) * 15 / 1e6 + out * 75 / 1e6,
            latency_ms=int(rng.lognormvariate(6.8, 0.6)), queue_ms=int(rng.lognormvariate(4, 2)),
            response_cache="hit" if cached else ("miss" if feature == "support_faq" else "off"),
            error_type="invalid_request" if status == "error" else "",
        ))  # fmt: skip


async def fill(redis: aioredis.Redis, rollups: Rollups, outcomes: Outcomes, count: int,
               days: int, end_ms: int) -> float:  # fmt: skip
    """Write `count` outcomes spread evenly over `days` before end_ms; seconds taken."""
    started = time.perf_counter()
    await rollups.load(redis)
    span = days * 86_400_000
    step = span / count
    for first in range(0, count, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for start in range(first, min(count, first + 5000), 100):
                delta = rollups.delta(
                    outcomes.one(int(end_ms - span + (n + 0.5) * step))
                    for n in range(start, min(count, start + 100))
                )
                rollups.write_into(pipe, delta)
                rollups.flush_into(pipe)  # the records of 100 outcomes
            await pipe.execute()
        await rollups.fold(redis)
        if first and first % 100_000 == 0:
            say(f"{first:,} outcomes written")
    return time.perf_counter() - started


async def memory(redis: aioredis.Redis, keys: Keys) -> tuple[int, int]:
    """(keys, bytes) of every rollup key."""
    names = [k async for k in redis.scan_iter(match=f"{keys.prefix}:rollup:*", count=5000)]
    total = 0
    for first in range(0, len(names), 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for name in names[first : first + 5000]:
                pipe.memory_usage(name, samples=0)
            sizes: list[Any] = await pipe.execute()
        total += sum(int(s or 0) for s in sizes)
    return len(names), total


async def report_times(
    redis: aioredis.Redis, rollups: Rollups, days: int, now_ms: int
) -> tuple[float, list[tuple[str, float]]]:
    """Seconds the first report over the period took (it compacts every finished hour and
    day), then (query, median seconds of 5) for reports over the whole period."""
    end = now_ms // 3_600_000 + 1
    started = time.perf_counter()
    await query(redis, rollups, Query(end - days * 24, end, ("feature",)), now_ms=now_ms)
    cold = time.perf_counter() - started
    shapes = [
        (f"--since {days}d --by feature", Query(end - days * 24, end, ("feature",))),
        (f"--since {days}d --by tenant", Query(end - days * 24, end, ("tenant",))),
        (f"--since {days}d --by feature,day", Query(end - days * 24, end, ("feature", "day"))),
        (f"--since {days}d --by model,priority",
         Query(end - days * 24, end, ("model", "priority"))),
        (f"--since {days}d --feature summarize_doc --by tenant",
         Query(end - days * 24, end, ("tenant",), feature="summarize_doc")),
        ("--since 7d --by hour", Query(end - 7 * 24, end, ("hour",))),
    ]  # fmt: skip
    out = []
    for label, q in shapes:
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            await query(redis, rollups, q, now_ms=now_ms)
            timings.append(time.perf_counter() - started)
        out.append((label, statistics.median(timings)))
    return cold, out


@dataclass
class Cost:
    client_us: float
    valkey_us: float
    commands: float
    wall_us: float


async def finishes(
    redis: aioredis.Redis, queue: Queue, outcomes: Outcomes, n: int, tag: str
) -> Cost:
    """n real finishing writes of pending entries; what each cost."""
    stream = queue.streams["normal"]
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(n):
            pipe.xadd(stream, {"feature": "summarize", "tenant": "t", "request": "{}"})
        await pipe.execute()
    got: Any = await redis.xreadgroup(GROUP, queue.consumer, {stream: ">"}, count=n)
    deliveries = [Delivery("normal", stream, str(i), dict(f)) for i, f in got[0][1]]
    now = int(time.time() * 1000)
    ends = []
    for d in deliveries:
        usage = outcomes.one(now)
        result = Result(id=d.entry_id, status="ok", text="x" * 200, model=usage["model"])
        ends.append(Finish(msgspec.json.encode(result), usage))
    await redis.config_resetstat()
    cpu0, client0, wall0 = await server_cpu(redis), time.process_time(), time.perf_counter()
    rollups = queue.rollups
    for d, end in zip(deliveries, ends, strict=True):
        if rollups is not None:  # as worker.outcomes does: the records join the fenced end
            end = dataclasses.replace(end, records=tuple(rollups.delta([end.usage]).records()))
        await queue.finish(d, f"{tag}-{d.entry_id}", end)
    wall, client = time.perf_counter() - wall0, time.process_time() - client0
    valkey_s = await server_cpu(redis) - cpu0
    stats: Any = await redis.info("commandstats")
    skip = ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_exec", "cmdstat_evalsha")
    calls = sum(int(v["calls"]) for k, v in stats.items() if k not in skip)
    return Cost(client / n * 1e6, valkey_s / n * 1e6, calls / n, wall / n * 1e6)


async def server_cpu(redis: aioredis.Redis) -> float:
    info: Any = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def median_cost(costs: list[Cost]) -> Cost:
    return Cost(*(statistics.median(getattr(c, f) for c in costs)
                  for f in ("client_us", "valkey_us", "commands", "wall_us")))  # fmt: skip


async def run(a: argparse.Namespace, folder: Path) -> None:
    cfg = load_config(ROOT / "config.toml")
    with valkey(folder) as (url, _pid):
        redis = aioredis.Redis.from_url(url, decode_responses=True)
        keys = Keys("bench")
        rollups = Rollups(keys, settings_of(cfg))
        outcomes = Outcomes(cfg, a.seed)
        now = int(time.time() * 1000)
        say(f"writing {a.outcomes:,} outcomes over {a.days} days")
        took = await fill(redis, rollups, outcomes, a.outcomes, a.days, now)
        count, size = await memory(redis, keys)
        say("timing reports")
        cold, reports = await report_times(redis, rollups, a.days, now)
        compacted = await memory(redis, keys)
        say("timing the finishing write")
        costs = await finishing_costs(redis, cfg, a)
        folding = await fold_costs(redis, cfg)
        await redis.aclose()
    hours = a.days * 24
    print(f"\nrollups of {a.outcomes:,} outcomes over {a.days} days ({a.outcomes / hours:,.0f} an "
          f"hour; {len(cfg.features)} features, {TENANTS} tenants with a long tail), written "
          f"in {took:.0f} s as deltas of 100 outcomes")  # fmt: skip
    print(f"  memory as written: {size / 2**20:,.1f} MiB in {count:,} keys "
          f"({size / hours / 1024:,.1f} KiB an hour, {size / count:,.0f} bytes a key)")  # fmt: skip
    print(f"  memory once compacted (finished hours, days, running totals): "
          f"{compacted[1] / 2**20:,.1f} MiB in {compacted[0]:,} keys "
          f"({compacted[1] / hours / 1024:,.1f} KiB an hour)")  # fmt: skip
    print(f"  the first report compacted every finished hour and day in {cold:,.1f} s (in use, "
          "the first reader of each hour does it: a few ms each)")  # fmt: skip
    print("  tokenq report latency (in-process query, median of 5):")
    for label, took in reports:
        print(f"    {label:<52} {took * 1000:>7,.0f} ms")
    print(f"\nfinishing write (Queue.finish, one MULTI per job), medians of {a.rounds} rounds of "
          f"{a.finishes:,} (client CPU, Valkey CPU, Redis commands counted inside the script too, "
          "wall):")  # fmt: skip
    for name, c in costs.items():
        print(f"  {name:<44} client {c.client_us:5.0f} us  Valkey {c.valkey_us:5.1f} us  "
              f"commands {c.commands:4.1f}  wall {c.wall_us:5.0f} us")  # fmt: skip
    base = costs["without rollups"]
    ratios = {}
    for name in ("with rollups, 20 tenants (cells exist)", "with rollups, 500 tenants (long tail)"):
        c = costs[name]
        ratios[name] = (c.client_us + c.valkey_us) / (base.client_us + base.valkey_us) - 1
        print(f"  {name}: Valkey +{c.valkey_us - base.valkey_us:.1f} us, "
              f"+{c.commands - base.commands:.1f} commands a finish")  # fmt: skip
    print("\nfolding the records into the hours' cells (workers every second, readers before "
          "reading), Valkey CPU per outcome, batches of up to 2,000 records:")  # fmt: skip
    for name, us in folding.items():
        print(f"  {name:<24} {us:5.1f} us")
    steady, tail = ratios.values()
    print(
        f"\nrollup overhead on the finishing write (client + Valkey CPU): {steady:+.1%} with "
        f"20 tenants, {tail:+.1%} with a long tail of 500"
    )


async def finishing_costs(
    redis: aioredis.Redis, cfg: Config, a: argparse.Namespace
) -> dict[str, Cost]:
    """Interleaved rounds of real finishing writes without and with rollups."""

    def queue(prefix: str, rollups: bool) -> Queue:
        writer = Rollups(Keys(prefix), settings_of(cfg)) if rollups else None
        return Queue(redis, Keys(prefix), cfg.queue.priorities, "bench", visibility_ms=60_000,
                     rollups=writer)  # fmt: skip

    runs = {
        "without rollups": (queue("plain", False), Outcomes(cfg, 1, 20)),
        "with rollups, 20 tenants (cells exist)": (queue("few", True), Outcomes(cfg, 1, 20)),
        "with rollups, 500 tenants (long tail)": (queue("many", True), Outcomes(cfg, 1, 500)),
    }
    for q, outcomes in runs.values():
        await q.ensure_groups()
        await finishes(redis, q, outcomes, 500, "warm")  # connections, scripts, cells
    found: dict[str, list[Cost]] = {name: [] for name in runs}
    for n in range(a.rounds):
        for name, (q, outcomes) in runs.items():
            found[name].append(await finishes(redis, q, outcomes, a.finishes, f"r{n}"))
    return {name: median_cost(c) for name, c in found.items()}


async def fold_costs(redis: aioredis.Redis, cfg: Config) -> dict[str, float]:
    """Valkey CPU per outcome of folding the records of 20,000 finished jobs (one record
    each, as one-job finishes write them) in the current hour, for two tenant spreads."""
    out = {}
    for name, tenants in (("20 tenants", 20), ("500 tenants, long tail", 500)):
        rollups = Rollups(Keys(f"fold{tenants}"), settings_of(cfg))
        outcomes = Outcomes(cfg, 3, tenants)
        now = int(time.time() * 1000)
        for round_ in range(2):  # the first round makes the hour's cells
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(20_000):
                    rollups.add_into(pipe, outcomes.one(now))
                    rollups.flush_into(pipe)
                await pipe.execute()
            started = await server_cpu(redis)
            await rollups.fold(redis)
            if round_:
                out[name] = (await server_cpu(redis) - started) / 20_000 * 1e6
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--outcomes", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--finishes", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenq-bench-report-") as folder:
        asyncio.run(run(a, Path(folder)))


if __name__ == "__main__":
    main()
