"""What the rollups cost: memory, compaction, report latency, and the finishing write with and
without them.

    python3 dev.py bench report [--outcomes 1000000] [--days 90] [--block 50] [--pairs 200]
                               [--finishing-only]

1. Writes `--outcomes` synthetic job outcomes spread over `--days` days (features, models and
   priorities as config.toml has them, 500 tenants with a long tail, errors, cache hits and
   batches) through the rollups' own code (worker.rollups: queued as the finishing write
   queues them, folded 5,000 at a time) into a Valkey of its own: every hour live, as if no
   worker had compacted anything.
2. Prints the rollups' memory (MEMORY USAGE of every rollup key), times one report over the
   whole period read from the live hours, then compacts every hour and day with the workers'
   own tick (worker.compaction.compact_due, COMPACT_PER_TICK at a time) and prints what that
   cost and the memory after.
3. Times `tokenq report` queries over the period (in-process, as the CLI runs them): the
   first from a new client, then the median and the 95th percentile of `--runs`.
4. Runs the real finishing write (worker.queue.Queue.finish: result, usage event, reply, XACK,
   XDEL, state, and with rollups the outcome queued for them) on real pending entries,
   in short runs of `--block`, paired: a run without rollups and, right before or after it
   (alternating), a run of one arm: without rollups again (the method's noise), with rollups
   for 20 tenants, for a long tail of 500; `--pairs` pairs per arm, the arms in rotating
   order, all in one process against one server. Per finish it measures the client's CPU
   (this thread's), Valkey's (its main thread's, INFO cpu), Redis commands (INFO
   commandstats) and wall time, and prints the medians; the overhead is the median over the
   pairs of each pair's (client + Valkey CPU) ratio, with a 95% confidence interval of that
   median and the quartiles. Then what folding the queued outcomes costs per outcome, in the
   background: the folding worker's CPU and Valkey's. `--finishing-only` runs this part alone
   (2-3 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis
from common import ROOT, say, valkey

from worker.compaction import COMPACT_PER_TICK, compact_due
from worker.config import Config, load_config
from worker.contract import GROUP, Keys, Result, UsageEvent, to_fields
from worker.embedded import connect
from worker.queue import Delivery, Finish, Queue
from worker.report import Query, query
from worker.rollups import Rollups, settings_of

TENANTS = 500


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
            rollups.push_into(pipe, (outcomes.one(int(end_ms - span + (n + 0.5) * step))
                                     for n in range(first, min(count, first + 5000))))  # fmt: skip
            await pipe.execute()
        await rollups.fold_records(redis)
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


@dataclass
class Compaction:
    hours: int
    days: int
    ticks: int
    wall_s: float
    client_s: float
    valkey_s: float


async def compact_everything(redis: aioredis.Redis, rollups: Rollups, now_ms: int) -> Compaction:
    """Compact every finished hour and day as the workers' fold duty does, tick after tick."""
    keys = rollups.keys
    hours, days = int(await redis.zcard(keys.rollup_live)), 0
    cpu0, client0, wall0 = await server_cpu(redis), time.thread_time(), time.perf_counter()
    ticks = 0
    while True:
        days = max(days, int(await redis.zcard(keys.rollup_pending)))
        if not await compact_due(redis, keys, rollups.settings, now_ms, COMPACT_PER_TICK):
            break
        ticks += 1
    wall, client = time.perf_counter() - wall0, time.thread_time() - client0
    hours -= int(await redis.zcard(keys.rollup_live))
    return Compaction(hours, days, ticks, wall, client, await server_cpu(redis) - cpu0)


def shapes(days: int, end: int) -> list[tuple[str, Query]]:
    """The report queries timed: (as typed, the query)."""
    start = end - days * 24
    return [
        (f"--since {days}d --by feature", Query(start, end, ("feature",))),
        (f"--since {days}d --by tenant", Query(start, end, ("tenant",))),
        (f"--since {days}d --by feature,day", Query(start, end, ("feature", "day"))),
        (f"--since {days}d --by model,priority", Query(start, end, ("model", "priority"))),
        (f"--since {days}d --feature summarize_doc --by tenant",
         Query(start, end, ("tenant",), feature="summarize_doc")),
        (f"--since {days}d --by tenant,model", Query(start, end, ("tenant", "model"))),
        (f"--since {days}d --by hour", Query(start, end, ("hour",))),
        ("--since 7d --by hour", Query(end - 7 * 24, end, ("hour",))),
        ("--since 7d --by tenant,day", Query(end - 7 * 24, end, ("tenant", "day"))),
    ]  # fmt: skip


async def report_times(
    url: str, rollups: Rollups, days: int, now_ms: int, runs: int
) -> list[tuple[str, float, float, float]]:
    """(query, seconds of the first from a new client, median and 95th percentile of `runs`)."""
    out = []
    for label, q in shapes(days, now_ms // 3_600_000 + 1):
        redis = connect(url)
        timings = []
        for _ in range(runs + 1):
            started = time.perf_counter()
            await query(redis, rollups, q, now_ms=now_ms)
            timings.append(time.perf_counter() - started)
        await redis.aclose()
        first, rest = timings[0], sorted(timings[1:])
        p95 = rest[min(len(rest) - 1, round(0.95 * len(rest)) - 1)]
        out.append((label, first, statistics.median(rest), p95))
    return out


@dataclass
class Cost:
    client_us: float
    valkey_us: float
    commands: float
    wall_us: float


Prepared = tuple[list[Delivery], list[Finish]]


async def prepare(redis: aioredis.Redis, queue: Queue, outcomes: Outcomes, n: int) -> Prepared:
    """n real pending entries of this consumer, and the endings to finish them with."""
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
        ends.append(Finish(msgspec.json.encode(result), usage, rollup=queue.rollups is not None))
    return deliveries, ends


async def finishes(redis: aioredis.Redis, queue: Queue, prepared: Prepared, tag: str) -> Cost:
    """The finishing writes of prepared entries, one after the other (with the outcome for
    the rollups when the queue has rollups, as worker.outcomes asks for it); what each cost."""
    deliveries, ends = prepared
    n = len(deliveries)
    await redis.config_resetstat()
    cpu0 = await server_cpu(redis)
    client0, wall0 = time.thread_time(), time.perf_counter()
    for d, end in zip(deliveries, ends, strict=True):
        await queue.finish(d, f"{tag}-{d.entry_id}", end)
    wall, client = time.perf_counter() - wall0, time.thread_time() - client0
    valkey_s = await server_cpu(redis) - cpu0
    stats: Any = await redis.info("commandstats")
    skip = ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_exec", "cmdstat_evalsha")
    calls = sum(int(v["calls"]) for k, v in stats.items() if k not in skip)
    return Cost(client / n * 1e6, valkey_s / n * 1e6, calls / n, wall / n * 1e6)


async def server_cpu(redis: aioredis.Redis) -> float:
    """Seconds of CPU Valkey's main thread used (not its background threads: the AOF's
    fsync every second would add noise)."""
    info: Any = await redis.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def median_cost(costs: list[Cost]) -> Cost:
    return Cost(*(statistics.median(getattr(c, f) for c in costs)
                  for f in ("client_us", "valkey_us", "commands", "wall_us")))  # fmt: skip


async def run(a: argparse.Namespace, folder: Path) -> None:
    cfg = load_config(ROOT / "config.toml")
    with valkey(folder) as (url, _pid):
        redis = connect(url)
        if not a.finishing_only:
            await rollup_figures(redis, url, cfg, a)
        say("timing the finishing write")
        costs, ratios = await finishing_costs(redis, cfg, a)
        folding = await fold_costs(redis, cfg)
        await redis.aclose()
    print_finishing(a, costs, ratios, folding)


async def rollup_figures(redis: aioredis.Redis, url: str, cfg: Config, a: argparse.Namespace
                         ) -> None:  # fmt: skip
    """Write, measure, compact and report on `--outcomes` outcomes; print the figures."""
    keys = Keys("bench")
    rollups = Rollups(keys, settings_of(cfg))
    outcomes = Outcomes(cfg, a.seed)
    now = int(time.time() * 1000)
    say(f"writing {a.outcomes:,} outcomes over {a.days} days")
    took = await fill(redis, rollups, outcomes, a.outcomes, a.days, now)
    written = await memory(redis, keys)
    say("one report over the live hours, then compacting")
    end = now // 3_600_000 + 1
    started = time.perf_counter()
    await query(redis, rollups, Query(end - a.days * 24, end, ("feature",)), now_ms=now)
    uncompacted = time.perf_counter() - started
    compaction = await compact_everything(redis, rollups, now)
    compacted = await memory(redis, keys)
    say("timing reports")
    reports = await report_times(url, rollups, a.days, now, a.runs)
    hours = a.days * 24
    print(f"\nrollups of {a.outcomes:,} outcomes over {a.days} days ({a.outcomes / hours:,.0f} an "
          f"hour; {len(cfg.features)} features, {TENANTS} tenants with a long tail), written "
          f"in {took:.0f} s queued and folded 5,000 at a time")  # fmt: skip
    count, size = written
    print(f"  memory as written (every hour live): {size / 2**20:,.1f} MiB in {count:,} keys "
          f"({size / hours / 1024:,.1f} KiB an hour, {size / count:,.0f} bytes a key)")  # fmt: skip
    print(f"  --since {a.days}d --by feature read from the {hours:,} live hours (no worker "
          f"compacted them): {uncompacted:,.1f} s")  # fmt: skip
    c = compaction
    print(f"  compacting {c.hours:,} hours and {c.days} days as the workers' fold duty does "
          f"({COMPACT_PER_TICK} a tick, {c.ticks:,} ticks): {c.wall_s:,.1f} s, client CPU "
          f"{c.client_s * 1000 / max(1, c.hours + c.days):,.1f} ms and Valkey CPU "
          f"{c.valkey_s * 1000 / max(1, c.hours + c.days):,.1f} ms a period")  # fmt: skip
    print(f"  memory once compacted (finished hours, days, running totals): "
          f"{compacted[1] / 2**20:,.1f} MiB in {compacted[0]:,} keys "
          f"({compacted[1] / hours / 1024:,.1f} KiB an hour)")  # fmt: skip
    print(f"  tokenq report latency (in-process query): the first from a new client, then the "
          f"median and 95th percentile of {a.runs}:")  # fmt: skip
    for label, first, median, p95 in reports:
        print(f"    {label:<48} {first * 1000:>6,.0f} ms  {median * 1000:>6,.0f} ms  "
              f"{p95 * 1000:>6,.0f} ms")  # fmt: skip


def print_finishing(
    a: argparse.Namespace, costs: dict[str, Cost], ratios: Ratios,
    folding: dict[str, tuple[float, float]],
) -> None:  # fmt: skip
    print(f"\nfinishing write (Queue.finish: one fenced script per job), medians of runs of "
          f"{a.block} in {a.pairs} pairs per arm (client CPU of this thread, Valkey main-thread "
          "CPU, Redis commands, wall):")  # fmt: skip
    for name, cost in costs.items():
        print(f"  {name:<40} client {cost.client_us:5.0f} us  Valkey {cost.valkey_us:5.1f} us  "
              f"commands {cost.commands:4.1f}  wall {cost.wall_us:5.0f} us")  # fmt: skip
    print("\nfolding the queued outcomes into the hours' cells (one worker of the fleet every "
          "second, readers before reading; batches of up to 2,000), CPU per outcome of the "
          "folding process and of Valkey:")  # fmt: skip
    for name, (client_us, valkey_us) in folding.items():
        print(f"  {name:<24} client {client_us:5.1f} us  Valkey {valkey_us:5.1f} us")
    print(f"\nclient + Valkey CPU of a finishing write against the run without rollups of the "
          f"same pair: median of {a.pairs} pairs (95% confidence interval of the median; "
          "quartiles):")  # fmt: skip
    for name, (low, mid, high, ci_low, ci_high) in ratios.items():
        print(f"  {name:<40} {mid:+6.1%}  ({ci_low:+.1%} to {ci_high:+.1%}; quartiles "
              f"{low:+.1%} to {high:+.1%})")  # fmt: skip


Ratios = dict[str, tuple[float, float, float, float, float]]


def median_interval(values: list[float]) -> tuple[float, float]:
    """A 95% confidence interval of the median of these values (order statistics: no
    assumption about their distribution)."""
    ranked, n = sorted(values), len(values)
    half = 1.96 * math.sqrt(n) / 2
    return ranked[max(0, math.floor(n / 2 - half))], ranked[min(n - 1, math.ceil(n / 2 + half))]


async def finishing_costs(
    redis: aioredis.Redis, cfg: Config, a: argparse.Namespace
) -> tuple[dict[str, Cost], Ratios]:
    """Pairs of short runs (`--block` finishing writes each) without rollups and with, one
    right after the other in alternating order, in the same process against the same server:
    each pair's (client + Valkey CPU per job) ratio shares the load of its moment, so its
    median over `--pairs` pairs is precise where whole runs minutes apart are not. A pair of
    two runs without rollups measures the method's own noise. The median costs, and per arm
    the median ratio, its quartiles and a 95% confidence interval of the median."""

    def queue(prefix: str, rollups: bool) -> Queue:
        writer = Rollups(Keys(prefix), settings_of(cfg)) if rollups else None
        return Queue(redis, Keys(prefix), cfg.queue.priorities, "bench", visibility_ms=60_000,
                     rollups=writer)  # fmt: skip

    base = "without rollups"
    runs = {
        base: (queue("plain", False), Outcomes(cfg, 1, 20)),
        "without rollups, again (the noise)": (queue("plain2", False), Outcomes(cfg, 1, 20)),
        "with rollups, 20 tenants": (queue("few", True), Outcomes(cfg, 1, 20)),
        "with rollups, 500 tenants (long tail)": (queue("many", True), Outcomes(cfg, 1, 500)),
    }
    for q, outcomes in runs.values():
        await q.ensure_groups()
        await finishes(redis, q, await prepare(redis, q, outcomes, 500), "warm")
    arms = [name for name in runs if name != base]
    found: dict[str, list[Cost]] = {name: [] for name in runs}
    each: dict[str, list[float]] = {name: [] for name in arms}
    for n in range(a.pairs):
        for arm in arms[n % len(arms) :] + arms[: n % len(arms)]:
            order = (base, arm) if n % 2 == 0 else (arm, base)
            ready = {name: await prepare(redis, runs[name][0], runs[name][1], a.block)
                     for name in order}  # fmt: skip
            costs = {name: await finishes(redis, runs[name][0], ready[name], f"p{n}{arm[:9]}")
                     for name in order}  # fmt: skip
            for name, cost in costs.items():
                found[name].append(cost)
            with_, without = costs[arm], costs[base]
            each[arm].append((with_.client_us + with_.valkey_us)
                             / (without.client_us + without.valkey_us) - 1)  # fmt: skip
            await redis.delete(*(q.keys.rollup_queue for q, _ in runs.values()))  # as folded
    ratios: Ratios = {}
    for name, values in each.items():
        low, mid, high = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        ratios[name] = (low, mid, high, *median_interval(values))
    return {name: median_cost(c) for name, c in found.items()}, ratios


async def fold_costs(redis: aioredis.Redis, cfg: Config) -> dict[str, tuple[float, float]]:
    """What folding 20,000 queued outcomes in the current hour costs per outcome: (the
    folding process's CPU, Valkey's main-thread CPU) in us, for two tenant spreads."""
    out = {}
    for name, tenants in (("20 tenants", 20), ("500 tenants, long tail", 500)):
        rollups = Rollups(Keys(f"fold{tenants}"), settings_of(cfg))
        outcomes = Outcomes(cfg, 3, tenants)
        now = int(time.time() * 1000)
        for round_ in range(2):  # the first round makes the hour's cells
            async with redis.pipeline(transaction=False) as pipe:
                rollups.push_into(pipe, (outcomes.one(now) for _ in range(20_000)))
                await pipe.execute()
            started, client = await server_cpu(redis), time.thread_time()
            await rollups.fold_records(redis)
            if round_:
                out[name] = ((time.thread_time() - client) / 20_000 * 1e6,
                             (await server_cpu(redis) - started) / 20_000 * 1e6)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--outcomes", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--runs", type=int, default=20, help="timed runs of each report query")
    p.add_argument("--block", type=int, default=50, help="finishing writes a run")
    p.add_argument("--pairs", type=int, default=200,
                   help="pairs of runs (without rollups, with) per arm")  # fmt: skip
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--finishing-only", action="store_true",
                   help="only the finishing write and folding (2-3 minutes)")  # fmt: skip
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenq-bench-report-") as folder:
        asyncio.run(run(a, Path(folder)))


if __name__ == "__main__":
    main()
