#!/usr/bin/env python3
"""Cost: the reference workload run naively and through tokenq, both billed by the simulator.

    .venv/bin/python bench/cost.py [--jobs 2000] [--seed 7] [--concurrency 32] [--processes 2]
    (or: python3 dev.py bench cost)

Starts its own Valkey and simulator (0 ms latency, limits far above what the bench sends) and
writes the reference trace (bench/workloads/make_workload.py --jobs N --seed S) into its
temporary folder. Then two runs over the same jobs, each billed by the simulator's ledger
(GET /_sim/ledger; POST /_sim/reset between runs):
  1. naive: the `anthropic` SDK alone (AsyncAnthropic, max_retries=2), --concurrency requests
     in flight, every request on the top tier of config.toml [tiers] (the last, dearest: opus)
     with max_tokens 4096, realtime: what a client without tokenq pays. It goes feature by
     feature, so the ledger's growth over each gives that feature's naive cost.
  2. tokenq, routing: every job preloaded on its priority stream (feature, tenant and priority
     from the trace, no tier), then --processes `tokenq worker` processes (--concurrency each)
     with the repo's config.toml: its feature tiers, router, escalation and max_tokens caps,
     but batch windows off (batch.priorities = []): every job in real time. The models' rate
     limits are raised far above what the bench sends, so the limiter runs but never makes a
     job wait (limits decide when a job runs, not what it costs).
  3. tokenq, + batch windows: the same with config.toml's batch windows (priority `low`, the
     trace's nightly_enrich jobs, goes to Message Batches at the batch price), the flush
     interval and polling shortened to seconds so the run stays short (they decide when a batch
     is sent, not what it costs). The ledger's `batch` section is checked against the models'
     realtime prices: it must bill half.
Checks: every job has a result with status ok and exactly one usage event of kind "job", and
the events' summed cost_usd equals the ledger's total_cost_usd to the cent. tokenq's cost per
feature comes from its usage events (the ledger bills per model, and features run together);
totals come from the ledger. Exits 1 if a check fails. The last line is the headline.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import redis.asyncio as aioredis
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
from worker.config import Config, load_config
from worker.contract import Keys, UsageEvent, from_fields
from worker.embedded import connect

NAIVE_MAX_TOKENS = 4096
Trace = list[dict[str, Any]]


@dataclass
class FeatureCost:
    """One feature's share of a run."""

    jobs: int = 0
    cost_usd: float = 0.0
    tiers: Counter[str] = field(default_factory=Counter)  # tier -> jobs answered on it


@dataclass
class Run:
    """One pass over the trace: what the simulator billed, and each feature's cost.

    `usage_usd` and `baseline_usd` are the sums over tokenq's usage events (0 for a run
    without tokenq); `failures` counts jobs that did not end ok, by error type.
    """

    name: str
    jobs: int
    seconds: float
    ledger: dict[str, Any]
    features: dict[str, FeatureCost] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    events: int = 0
    modes: list[str] = field(default_factory=list)  # each job event's mode
    usage_usd: float = 0.0
    baseline_usd: float = 0.0

    @property
    def ledger_usd(self) -> float:
        return float(self.ledger["total_cost_usd"])

    @property
    def accounting_gap_usd(self) -> float:
        """|tokenq's summed cost_usd - the ledger|, in dollars."""
        return abs(self.usage_usd - self.ledger_usd)

    def billed(self) -> str:
        """Requests and tokens per model, as the ledger has them (realtime, then batch)."""
        parts = []
        for section, label in (("models", ""), ("batch", " batch")):
            for model, t in sorted(self.ledger.get(section, {}).items()):
                parts.append(
                    f"{model}{label} {t['requests']:,} requests, {t['input_tokens']:,} in, "
                    f"{t['output_tokens']:,} out, ${t['cost_usd']:.4f}"
                )
        return "; ".join(parts) or "nothing"


def feature_order(cfg: Config, trace: Trace) -> list[str]:
    """The trace's features in config.toml order (unknown ones last, as the trace has them)."""
    seen = dict.fromkeys(job["feature"] for job in trace)
    return [f for f in cfg.features if f in seen] + [f for f in seen if f not in cfg.features]


def top_model(cfg: Config) -> str:
    """The dearest tier's model: config.toml lists [tiers] cheapest first."""
    return list(cfg.tiers.values())[-1]


def raised_limits(cfg: Config) -> dict[str, object]:
    """Config overrides putting every model's rate limits far above what the bench sends."""
    rpm, itpm, otpm = (int(n) for n in UNLIMITED.split("/"))
    out: dict[str, object] = {}
    for model, prices in cfg.models.items():
        if prices.limits is not None:
            section = f'models."{model}".limits'
            out |= {f"{section}.rpm": rpm, f"{section}.itpm": itpm, f"{section}.otpm": otpm}
    return out


async def naive_feature(
    client: anthropic.AsyncAnthropic, jobs: Trace, model: str, concurrency: int
) -> Counter[str]:
    """Send one feature's requests as a naive client does; failures counted by error class."""
    gate = asyncio.Semaphore(concurrency)
    failures: Counter[str] = Counter()

    async def send(job: dict[str, Any]) -> None:
        params = {**job["request"], "model": model, "max_tokens": NAIVE_MAX_TOKENS}
        async with gate:
            try:
                await client.messages.create(**params)
            except anthropic.APIError as exc:
                failures[type(exc).__name__] += 1

    await asyncio.gather(*(send(job) for job in jobs))
    return failures


async def naive_calls(srv: Servers, trace: Trace, order: list[str], model: str, c: int) -> Run:
    """Every job on `model`, feature by feature; each feature's cost is the ledger's growth."""
    client = anthropic.AsyncAnthropic(base_url=srv.sim_url, api_key="bench", max_retries=2)
    run = Run("naive", len(trace), 0.0, {})
    t0, ledger = time.monotonic(), {}
    try:
        before = 0.0
        for feature in order:
            jobs = [job for job in trace if job["feature"] == feature]
            say(f"  naive: {len(jobs)} {feature} jobs")
            run.failures += await naive_feature(client, jobs, model, c)
            ledger = await asyncio.to_thread(sim_call, srv.sim_url, "ledger")
            spent = float(ledger["total_cost_usd"])
            run.features[feature] = FeatureCost(len(jobs), spent - before)
            before = spent
    finally:
        await client.close()
    run.seconds, run.ledger = time.monotonic() - t0, ledger
    return run


def naive_run(srv: Servers, cfg: Config, trace: Trace, a: argparse.Namespace) -> Run:
    """Run 1: what a client without tokenq pays; leaves the simulator reset."""
    model = top_model(cfg)
    say(f"naive: {len(trace)} jobs on {model}, max_tokens {NAIVE_MAX_TOKENS}, "
        f"concurrency {a.concurrency}")  # fmt: skip
    sim_call(srv.sim_url, "reset", {})
    run = asyncio.run(naive_calls(srv, trace, feature_order(cfg, trace), model, a.concurrency))
    sim_call(srv.sim_url, "reset", {})
    return run


async def preload(redis_url: str, prefix: str, trace: Trace) -> list[str]:
    """Every job of the trace on its priority stream, 500 per pipelined round trip; the ids."""
    client = connect(redis_url)
    try:
        producer = Producer(client, prefix)
        jobs = [
            NewJob(feature=j["feature"], request=j["request"], priority=j["priority"],
                   tenant=j["tenant"])
            for j in trace
        ]  # fmt: skip
        ids: list[str] = []
        for start in range(0, len(jobs), 500):
            ids += await producer.submit_many(jobs[start : start + 500])
        return ids
    finally:
        await client.aclose()


async def watch(procs: list[subprocess.Popen[bytes]], done: list[int], total: int) -> None:
    """Say done/total every 10 s; raise if every worker process has exited."""
    while True:
        await asyncio.sleep(10)  # progress lines only: the results are awaited elsewhere
        say(f"  tokenq: {done[0]}/{total} results")
        if all(proc.poll() is not None for proc in procs):
            codes = ", ".join(str(proc.returncode) for proc in procs)
            raise RuntimeError(f"every worker process exited (codes {codes}) before the end")


async def results(
    redis_url: str, prefix: str, ids: list[str], procs: list[subprocess.Popen[bytes]],
    timeout_s: float,
) -> Counter[str]:  # fmt: skip
    """Wait for every job's result; the jobs not ok, counted by error type."""
    client = connect(redis_url, max_connections=40)
    producer, gate = Producer(client, prefix), asyncio.Semaphore(32)  # 32 blocking waits
    deadline, done, failures = time.monotonic() + timeout_s, [0], Counter[str]()

    async def wait(job_id: str) -> None:
        async with gate:
            try:
                result = await producer.result(job_id, max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                failures[f"no result after {timeout_s:g} s"] += 1
                return
        done[0] += 1
        if result.status != "ok":
            failures[result.error.type if result.error else "error (no type)"] += 1

    async def wait_all() -> None:
        await asyncio.gather(*(wait(job_id) for job_id in ids))

    progress = asyncio.create_task(watch(procs, done, len(ids)))
    waits = asyncio.create_task(wait_all())
    try:
        await asyncio.wait([waits, progress], return_when=asyncio.FIRST_COMPLETED)
        if progress.done():
            progress.result()  # re-raises why the workers are gone
        await waits
    finally:
        for task in (progress, waits):
            task.cancel()
        await client.aclose()
    return failures


async def usage_events(client: aioredis.Redis, keys: Keys) -> list[UsageEvent]:
    """Every event of the usage stream, oldest first, read 1,000 at a time."""
    events: list[UsageEvent] = []
    start = "-"
    while True:
        chunk: Any = await client.xrange(keys.usage, min=start, count=1000)
        events += [from_fields(fields) for _, fields in chunk]
        if len(chunk) < 1000:
            return events
        start = f"({chunk[-1][0]}"


def account(run: Run, events: list[UsageEvent], ids: list[str]) -> None:
    """Fill `run` from tokenq's usage events (kind "job"; alerts are skipped)."""
    jobs = [e for e in events if e.kind == "job"]
    run.events = len(jobs)
    run.modes = [e.mode for e in jobs]
    for event in jobs:
        cost = run.features.setdefault(event.feature, FeatureCost())
        cost.jobs += 1
        cost.cost_usd += event.cost_usd
        if event.tier:
            cost.tiers[event.tier] += 1
        run.usage_usd += event.cost_usd
        run.baseline_usd += event.baseline_cost_usd
    per_job = Counter(e.job_id for e in jobs)
    if extra := sum(n - 1 for n in per_job.values() if n > 1):
        run.failures["usage events beyond one per job"] += extra
    if missing := len(set(ids) - set(per_job)):
        run.failures["no usage event"] += missing


async def collect(
    cfg: Config, ids: list[str], procs: list[subprocess.Popen[bytes]], timeout_s: float
) -> tuple[Counter[str], list[UsageEvent]]:
    """The jobs not ok (by error type), then every usage event once all results are in."""
    failures = await results(cfg.redis.url, cfg.prefix, ids, procs, timeout_s)
    client = connect(cfg.redis.url)
    try:
        return failures, await usage_events(client, Keys(cfg.prefix))
    finally:
        await client.aclose()


def tokenq_run(
    folder: Path, srv: Servers, trace: Trace, a: argparse.Namespace, name: str = "tokenq",
    settings: dict[str, object] | None = None,
) -> Run:  # fmt: skip
    """Run 2 (and the later levers, through `settings`): the trace through `tokenq worker`
    processes with the repo's config.toml plus `settings`; resets the simulator before."""
    base = load_config(ROOT / "config.toml")
    overrides = {**raised_limits(base), **(settings or {})}
    cfg, path = write_config(folder, srv, f"cost-{name.replace('+', '-')}", overrides)
    ids = asyncio.run(preload(srv.redis_url, cfg.prefix, trace))
    sim_call(srv.sim_url, "reset", {})
    say(f"{name}: {len(ids)} jobs preloaded; {a.processes} worker processes x concurrency "
        f"{a.concurrency}")  # fmt: skip
    cmd = [sys.executable, "-m", "worker", "--config", str(path), "--log-level", "error",
           "worker", "--processes", "1", "--concurrency", str(a.concurrency)]  # fmt: skip
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=ROOT) for _ in range(a.processes)]
    try:
        failures, events = asyncio.run(collect(cfg, ids, procs, a.timeout))
        seconds = time.monotonic() - t0
    finally:
        for proc in procs:
            stop(proc)
    run = Run(name, len(ids), seconds, sim_call(srv.sim_url, "ledger"), failures=failures)
    account(run, events, ids)
    return run


NO_BATCH: dict[str, object] = {"batch.priorities": []}
# Batch windows as config.toml has them, but flushed and polled within seconds.
QUICK_BATCH: dict[str, object] = {"batch.flush_interval_s": 2.0, "batch.poll_s": 0.5}


def without_prompt_cache(cfg: Config) -> dict[str, object]:
    return {f"features.{name}.prompt_cache": "off" for name in cfg.features}


def without_response_cache(cfg: Config) -> dict[str, object]:
    settings: dict[str, object] = {}
    for name in cfg.features:
        settings |= {f"features.{name}.response_cache_ttl_s": 0, f"features.{name}.dedupe": False}
    return settings


# The levers, added one at a time: (name, what it adds, config.toml settings switching off the
# levers not added yet). The last run is config.toml as it is.
LEVERS: list[tuple[str, str, Callable[[Config], dict[str, object]]]] = [
    ("routing", "tiers per feature, escalation, max_tokens caps",
     lambda cfg: {**without_prompt_cache(cfg), **without_response_cache(cfg), **NO_BATCH}),
    ("prompt cache", "cache breakpoints on the stable prefix",
     lambda cfg: {**without_response_cache(cfg), **NO_BATCH}),
    ("response cache", "answers kept and shared (support_faq), one call in flight",
     lambda cfg: dict(NO_BATCH)),
    ("batch windows", "low priority as Message Batches at half price",
     lambda cfg: dict(QUICK_BATCH)),
]  # fmt: skip


def lever_runs(folder: Path, srv: Servers, trace: Trace, cfg: Config,
               a: argparse.Namespace) -> list[Run]:  # fmt: skip
    """tokenq over the trace once per lever, each adding one to the ones before."""
    return [
        tokenq_run(folder, srv, trace, a, name.replace(" ", ""), settings(cfg))
        for name, _, settings in LEVERS
    ]


def levers_table(naive: Run, runs: list[Run]) -> None:
    """Each lever's cost and its share of the saving (of the naive cost)."""
    print(f"{'levers (added in turn)':<64}  {'tokenq $':>9}  {'saving':>7}  lever's share")
    before = naive.ledger_usd
    for (name, what, _), run in zip(LEVERS, runs, strict=True):
        share = (before - run.ledger_usd) / naive.ledger_usd
        saving = 1 - run.ledger_usd / naive.ledger_usd
        print(f"{'+ ' + name + ': ' + what:<64.64}  {run.ledger_usd:>9.4f}  {saving:>7.1%}  "
              f"{share:+.1%}")  # fmt: skip
        before = run.ledger_usd


def batch_discount(run: Run, cfg: Config) -> tuple[float, float, int]:
    """(ledger's batch cost, the same tokens at realtime prices, batch requests)."""
    billed = realtime = 0.0
    requests = 0
    for model, t in run.ledger.get("batch", {}).items():
        p = cfg.models[model]
        realtime += (
            t["input_tokens"] * p.input_usd_per_mtok
            + t["output_tokens"] * p.output_usd_per_mtok
            + t.get("ephemeral_5m_input_tokens", 0) * p.cache_write_5m_usd_per_mtok
            + t.get("ephemeral_1h_input_tokens", 0) * p.cache_write_1h_usd_per_mtok
            + t.get("cache_read_input_tokens", 0) * p.cache_read_usd_per_mtok
        ) / 1_000_000
        billed += float(t["cost_usd"])
        requests += int(t["requests"])
    return billed, realtime, requests


def batch_lines(routed: Run, batched: Run, cfg: Config) -> list[str]:
    """What the batch lever adds, and the ledger's word on the discount."""
    billed, realtime, requests = batch_discount(batched, cfg)
    share = billed / realtime if realtime else 0.0
    saved = routed.ledger_usd - batched.ledger_usd
    modes = Counter(e for e in batched.modes)
    return [
        f"batch windows: {requests:,} requests billed in the ledger's batch section, "
        f"${billed:.6f} against ${realtime:.6f} for the same tokens at realtime prices: "
        f"{share:.1%} of the price ({'half price' if abs(share - 0.5) < 1e-6 else 'NOT half'})",
        f"batch windows add: ${routed.ledger_usd:.4f} -> ${batched.ledger_usd:.4f}, "
        f"${saved:.4f} saved ({saved / routed.ledger_usd:.1%} of the cost without them); "
        f"results by mode: {', '.join(f'{m} {n}' for m, n in sorted(modes.items()))}",
    ]


def tiers(cost: FeatureCost) -> str:
    return ", ".join(f"{tier} {n}" for tier, n in cost.tiers.most_common()) or "-"


def report(naive: Run, runs: list[Run], cfg: Config, a: argparse.Namespace) -> bool:
    """Print the figures, the headline last; whether every check passed."""
    tokenq = runs[-1]
    model = top_model(cfg)
    print(f"workload: bench/workloads/make_workload.py --jobs {a.jobs} --seed {a.seed}; "
          f"naive: {model}, max_tokens {NAIVE_MAX_TOKENS}, realtime, concurrency "
          f"{a.concurrency}; tokenq: {a.processes} x `tokenq worker` (concurrency "
          f"{a.concurrency}), config.toml (rate limits raised)")  # fmt: skip
    width = max(len(f) for f in naive.features)
    print(f"{'feature':<{width}}  {'jobs':>5}  {'naive $':>10}  {'tokenq $':>10}  saving  "
          f"tokenq tiers (jobs)")  # fmt: skip
    for feature, n in naive.features.items():
        t = tokenq.features.get(feature, FeatureCost())
        # Rounded first: float sums of equal costs must not print as -0.0%.
        saving = f"{round(1 - t.cost_usd / n.cost_usd, 4) + 0.0:6.1%}" if n.cost_usd else "     -"
        print(f"{feature:<{width}}  {n.jobs:>5}  {n.cost_usd:>10.4f}  {t.cost_usd:>10.4f}  "
              f"{saving}  {tiers(t)}")  # fmt: skip
    ratio = tokenq.ledger_usd / naive.ledger_usd
    print(f"{'total (ledger)':<{width}}  {naive.jobs:>5}  {naive.ledger_usd:>10.4f}  "
          f"{tokenq.ledger_usd:>10.4f}  {1 - ratio:6.1%}")  # fmt: skip
    for run in (naive, tokenq):
        print(f"ledger, {run.name} ({run.seconds:.0f} s): {run.billed()}")
    levers_table(naive, runs)
    for line in batch_lines(runs[-2], tokenq, cfg):
        print(line)
    gaps = [run.accounting_gap_usd for run in runs]
    gap = max(gaps, key=abs)
    to_the_cent = all(round(g, 2) == 0 for g in gaps)
    print(f"accounting: tokenq's usage events sum to ${tokenq.usage_usd:.6f} over "
          f"{tokenq.events} events of kind job ({tokenq.jobs} jobs); ledger "
          f"${tokenq.ledger_usd:.6f}; largest gap over the {len(runs)} tokenq runs ${gap:.6f}: "
          f"{'matches to the cent' if to_the_cent else 'DOES NOT match to the cent'}")  # fmt: skip
    print(baseline_line(naive, tokenq, cfg))
    failed = sum((run.failures for run in runs), naive.failures)
    for run in (naive, *runs):
        for why, count in run.failures.most_common():
            print(f"NOT ok, {run.name}: {count} x {why}")
    billed, realtime, _ = batch_discount(tokenq, cfg)
    half = realtime > 0 and abs(billed / realtime - 0.5) < 1e-6
    ok = to_the_cent and half and not failed and all(run.events == run.jobs for run in runs)
    note = "" if ok else f"; CHECKS FAILED ({sum(failed.values())} jobs not ok)"
    apart = "matches the ledger to the cent" if to_the_cent else "is off the ledger"
    print(f"cost: tokenq ${tokenq.ledger_usd:.2f} vs naive ${naive.ledger_usd:.2f} on the "
          f"reference workload: saving {1 - ratio:.1%} (ratio {ratio:.2f}); accounting "
          f"{apart} (${gap:.6f} apart){note}")  # fmt: skip
    return ok


def baseline_line(naive: Run, tokenq: Run, cfg: Config) -> str:
    """tokenq's own claim of the naive cost next to what the naive run was billed."""
    diff = tokenq.baseline_usd - naive.ledger_usd
    line = (
        f"baseline: tokenq's usage events claim a naive ${tokenq.baseline_usd:.4f} "
        f"(router.baseline_tier {cfg.router.baseline_tier}); the naive run was billed "
        f"${naive.ledger_usd:.4f}"
    )
    if round(diff, 2) == 0:
        return line + ": the same to the cent"
    # Inputs are the same requests on both sides; the baseline prices the tokens of tokenq's
    # final answers at the baseline tier, while the simulator's reply length depends on the
    # model that answers, so the output tokens differ.
    out_price = cfg.models[cfg.tiers[cfg.router.baseline_tier]].output_usd_per_mtok
    return (
        f"{line} ({diff:+.4f}, {diff / naive.ledger_usd:+.1%}): the baseline prices the tokens "
        f"of tokenq's final answers, whose length depends on the model that answered (the "
        f"simulator's replies do) and on the feature's max_tokens; {diff / out_price * 1e6:+,.0f} "
        f"output tokens at ${out_price:g}/MTok would explain it)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000, help="jobs of the trace (2000)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the trace (7)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="naive requests in flight; per process (32)"
    )
    parser.add_argument("--processes", type=int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds the tokenq run may take (600)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    cfg = load_config(ROOT / "config.toml")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tokenq-bench-") as tmp, servers(Path(tmp)) as srv:
        trace = workload(Path(tmp), a.jobs, a.seed)
        naive = naive_run(srv, cfg, trace, a)
        runs = lever_runs(Path(tmp), srv, trace, cfg, a)
    say(f"whole run {time.monotonic() - t0:.0f} s")
    if not report(naive, runs, cfg, a):
        sys.exit(1)


if __name__ == "__main__":
    main()
