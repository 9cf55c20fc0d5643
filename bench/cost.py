#!/usr/bin/env python3
"""Cost and quality: the reference workload run naively, by the best static config, and
through tokenq, every answer billed by the simulator and graded by its ground truth.

    .venv/bin/python bench/cost.py [--jobs 2000] [--seed 7] [--concurrency 32]
        [--processes 2] [--feedback 1.0] [--levers]
    (or: python3 dev.py bench cost)

Starts its own Valkey and a simulator with its synthetic ground truth on (`--quality on
--seed S`: answers right or wrong by the request's difficulty and the model's skill; README:
Quality), 0 ms latency, limits far above what the bench sends, and writes the reference trace
(bench/workloads/make_workload.py --jobs N --seed S) into its temporary folder. Every run is
billed by the simulator's ledger (GET /_sim/ledger; POST /_sim/reset between runs) and each
answer is graded with POST /_sim/grade (the request as sent, the model that answered): a
job's quality is 1 when the answer it got is right, 0 when it is wrong or it got none.
  1. naive opus, naive sonnet, naive haiku: the `anthropic` SDK alone (max_retries=2),
     --concurrency requests in flight, every request on that tier with max_tokens 4096, in
     real time, feature by feature (the ledger's growth over each is that feature's cost).
  2. the best static config, from those runs: each feature on the cheapest tier whose share
     of right answers is at least 95% of opus's on that feature, as a careful team finds by
     trying every tier and configures by hand, calling the API directly (no run of its own).
  3. tokenq static: `tokenq worker` processes (--processes, --concurrency each) with the
     repo's config.toml, every feature's `tier` set to its best static tier: tokenq's other
     levers (prompt caching, the response cache with de-duplication, batch windows for the
     `low` priority, escalation of answers that fail their check) on top of the same routing.
  4. tokenq classifier: config.toml without feature tiers and with router.classifier on
     (one small haiku call per request names the tier; it is shown the opening of the text
     and the last user turn, worker.router.classifier_text); all levers.
  5. tokenq adaptive, starting cold: config.toml with `router.policy = "adaptive"`, no
     feature `tier`, every feature `target_pass_rate` --target (0.95), router.default_tier opus,
     router.adaptive settings for a trace of minutes (explore_share --explore (0.1),
     confidence 0.8, min_samples 10, half-lives 600 s and 30 s, kinds by the signals a
     request shows: `kinds = "signals"`, no hard words), all levers; with --wrong-usd X
     every feature's wrong_answer_usd = X instead of its target_pass_rate (the router's
     price rule, README: Adaptive routing) and router.adaptive.step_down_doubt
     --step-down-doubt (0).
     The bench plays the producers: for --feedback of the jobs (by a hash of the job id) it
     reports whether the answer was right on tokenq:feedback as results come in (every half
     second), since no check can see a wrong summary; --feedback 0 shows the router alone.
     Then the same trace again ("adaptive, warm", new job ids) with what the first pass left
     in Redis: the router's counts, and the caches (only support_faq's answers are cached,
     and they cost next to nothing either way).
Then the semantic lever: the paraphrase trace (bench/workloads/paraphrase.py: the same trace
with every support_faq question asked in seeded wordings, each line's `group` its intent)
through tokenq static with the exact response cache alone, and with config.toml's semantic
cache: paraphrases answered, false hits (an answer written for another intent), the saving;
and bench/semantic.py's threshold sweep (the cache path driven directly, no API calls).
With --levers, tokenq static again with its levers added one at a time (routing alone,
+ prompt caching, + response cache, + batch windows), for each lever's share.
In tokenq's runs the models' rate limits are raised far above what the bench sends and the
batch windows flush within seconds (they decide when a job runs, not what it costs).
Checks: every job of a tokenq run has a result and exactly one usage event of kind "job",
the events' summed cost_usd equals the ledger's total_cost_usd to the cent, and batches bill
half. Exits 1 if a check fails. The last lines are the headlines.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import redis.asyncio as aioredis
import semantic as semantic_bench  # bench/semantic.py: its threshold sweep
from common import (
    ROOT,
    UNLIMITED,
    Servers,
    raised_limits,
    say,
    servers,
    sim_call,
    stop,
    workload,
    write_config,
)
from quality import Verdicts, grade

sys.path.insert(0, str(Path(__file__).resolve().parent / "workloads"))
from paraphrase import FAQ, derive

from producers import NewJob, Producer
from worker.config import Config, load_config
from worker.contract import Keys, Result, UsageEvent, from_fields
from worker.embedded import connect

NAIVE_MAX_TOKENS = 4096
QUALITY_SHARE = 0.95  # of opus's share of right answers: the quality a feature must keep
Trace = list[dict[str, Any]]


@dataclass
class FeatureCost:
    """One feature's share of a run: jobs, cost, right answers, tiers that answered."""

    jobs: int = 0
    cost_usd: float = 0.0
    right: int = 0
    tiers: Counter[str] = field(default_factory=Counter)  # tier -> jobs answered on it

    @property
    def quality(self) -> float:
        return self.right / self.jobs if self.jobs else 0.0


@dataclass
class Run:
    """One pass over the trace: what the simulator billed, each feature's cost and quality.

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
    modes: Counter[str] = field(default_factory=Counter)  # each job event's mode
    usage_usd: float = 0.0
    baseline_usd: float = 0.0
    tokenq: bool = False
    by_job: dict[str, UsageEvent] = field(default_factory=dict)  # job id -> its event
    ids: list[str] = field(default_factory=list)  # the jobs, in the trace's order

    @property
    def ledger_usd(self) -> float:
        return float(self.ledger["total_cost_usd"]) if self.ledger else self.cost_usd

    @property
    def cost_usd(self) -> float:
        return sum(f.cost_usd for f in self.features.values())

    @property
    def quality(self) -> float:
        jobs = sum(f.jobs for f in self.features.values())
        return sum(f.right for f in self.features.values()) / jobs if jobs else 0.0

    @property
    def accounting_gap_usd(self) -> float:
        """|tokenq's summed cost_usd - the ledger|, in dollars."""
        return abs(self.usage_usd - self.ledger_usd)


def feature_order(cfg: Config, trace: Trace) -> list[str]:
    """The trace's features in config.toml order (unknown ones last, as the trace has them)."""
    seen = dict.fromkeys(job["feature"] for job in trace)
    return [f for f in cfg.features if f in seen] + [f for f in seen if f not in cfg.features]


# -- naive runs --


async def naive_feature(
    client: anthropic.AsyncAnthropic, jobs: Trace, model: str, concurrency: int,
    failures: Counter[str],
) -> list[str | None]:  # fmt: skip
    """Send one feature's requests as a naive client does: the model of each answer (None
    for a request that failed, counted in `failures` by error class)."""
    gate = asyncio.Semaphore(concurrency)

    async def send(job: dict[str, Any]) -> str | None:
        params = {**job["request"], "model": model, "max_tokens": NAIVE_MAX_TOKENS}
        async with gate:
            try:
                message = await client.messages.create(**params)
                return str(message.model)
            except anthropic.APIError as exc:
                failures[type(exc).__name__] += 1
                return None

    return list(await asyncio.gather(*(send(job) for job in jobs)))


async def naive_calls(srv: Servers, trace: Trace, order: list[str], tier: str, model: str,
                      c: int) -> Run:  # fmt: skip
    """Every job on `model`, feature by feature; each feature's cost is the ledger's growth."""
    client = anthropic.AsyncAnthropic(base_url=srv.sim_url, api_key="bench", max_retries=2)
    run = Run(f"naive {tier}", len(trace), 0.0, {})
    t0, ledger = time.monotonic(), {}
    try:
        before = 0.0
        for feature in order:
            jobs = [job for job in trace if job["feature"] == feature]
            models = await naive_feature(client, jobs, model, c, run.failures)
            ledger = await asyncio.to_thread(sim_call, srv.sim_url, "ledger")
            spent = float(ledger["total_cost_usd"])
            items = [(job["request"], m) for job, m in zip(jobs, models, strict=True)]
            right = sum(await asyncio.to_thread(grade, srv.sim_url, items))
            run.features[feature] = FeatureCost(
                len(jobs), spent - before, right, Counter({tier: len(jobs)})
            )
            before = spent
    finally:
        await client.close()
    run.seconds, run.ledger = time.monotonic() - t0, ledger
    return run


def naive_run(srv: Servers, cfg: Config, trace: Trace, tier: str, a: argparse.Namespace) -> Run:
    """What a client without tokenq pays with every job on `tier`; leaves the simulator reset."""
    model = cfg.tiers[tier]
    say(f"naive {tier}: {len(trace)} jobs on {model}, max_tokens {NAIVE_MAX_TOKENS}, "
        f"concurrency {a.concurrency}")  # fmt: skip
    sim_call(srv.sim_url, "reset", {})
    order = feature_order(cfg, trace)
    run = asyncio.run(naive_calls(srv, trace, order, tier, model, a.concurrency))
    sim_call(srv.sim_url, "reset", {})
    return run


def best_static(cfg: Config, naive: dict[str, Run]) -> tuple[Run, dict[str, str]]:
    """Each feature on the cheapest tier whose quality is at least QUALITY_SHARE of the
    dearest tier's on it (tiers tried cheapest first), priced as the naive runs billed it."""
    top = naive[list(cfg.tiers)[-1]]
    run, chosen = Run("best static", top.jobs, 0.0, {}), {}
    for feature, best in top.features.items():
        for tier in cfg.tiers:
            got = naive[tier].features[feature]
            if got.quality >= QUALITY_SHARE * best.quality:
                chosen[feature], run.features[feature] = tier, got
                break
    return run, chosen


# -- tokenq runs --


def jobs_of(trace: Trace) -> list[NewJob]:
    """The trace's jobs as a producer submits them, each with an id of its own."""
    return [
        NewJob(feature=j["feature"], request=j["request"], priority=j["priority"],
               tenant=j["tenant"], id=uuid.uuid4().hex)
        for j in trace
    ]  # fmt: skip


async def submit(redis_url: str, prefix: str, trace: Trace, jobs: list[NewJob],
                 speed: float) -> None:  # fmt: skip
    """Submit the jobs at the trace's times (`t_ms`) sped up `speed` times; with speed 0
    all at once, 500 per pipelined round trip."""
    client = connect(redis_url)
    try:
        producer, t0, n = Producer(client, prefix), time.monotonic(), 0
        while n < len(jobs):
            if speed:
                now_ms = (time.monotonic() - t0) * 1000 * speed
                due = next((i for i in range(n, len(jobs)) if trace[i]["t_ms"] > now_ms), len(jobs))
            else:
                due = len(jobs)
            due = min(due, n + 500)
            if due > n:
                await producer.submit_many(jobs[n:due])
                n = due
            else:  # pacing a trace: the next job is due in a few milliseconds
                await asyncio.sleep(0.005)
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


Seen = Callable[[int, Result], None]


async def results(
    redis_url: str, prefix: str, ids: list[str], procs: list[subprocess.Popen[bytes]],
    timeout_s: float, seen: Seen,
) -> Counter[str]:  # fmt: skip
    """Wait for every job's result, each given to `seen` (with its index) as it comes; the
    jobs not ok, counted by error type."""
    client = connect(redis_url, max_connections=40)
    producer, gate = Producer(client, prefix), asyncio.Semaphore(32)  # 32 blocking waits
    deadline, done, failures = time.monotonic() + timeout_s, [0], Counter[str]()

    async def wait(n: int, job_id: str) -> None:
        async with gate:
            try:
                result = await producer.result(job_id, max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                failures[f"no result after {timeout_s:g} s"] += 1
                return
        done[0] += 1
        seen(n, result)
        if result.status != "ok":
            failures[result.error.type if result.error else "error (no type)"] += 1

    async def wait_all() -> None:
        await asyncio.gather(*(wait(n, job_id) for n, job_id in enumerate(ids)))

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
    run.by_job, run.ids = {e.job_id: e for e in jobs}, ids
    run.events = len(jobs)
    run.modes = Counter(e.mode for e in jobs)
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
    cfg: Config, srv: Servers, trace: Trace, jobs: list[NewJob],
    procs: list[subprocess.Popen[bytes]], a: argparse.Namespace, feedback: float,
) -> tuple[Counter[str], list[UsageEvent], list[Result | None]]:  # fmt: skip
    """Submit the jobs (at --speed); the jobs not ok (by error type), every usage event once
    all results are in, and each job's result; producers' verdicts sent meanwhile for
    `feedback` of the jobs."""
    ids = [job.id or "" for job in jobs]
    got: list[Result | None] = [None] * len(ids)
    verdicts = Verdicts(cfg.redis.url, cfg.prefix, srv.sim_url, feedback)

    def seen(n: int, result: Result) -> None:
        got[n] = result
        if feedback:
            verdicts.answered(ids[n], trace[n]["request"], result)

    done = asyncio.Event()
    sending = asyncio.create_task(verdicts.run(done))
    submitting = asyncio.create_task(submit(cfg.redis.url, cfg.prefix, trace, jobs, a.speed))
    try:
        failures = await results(cfg.redis.url, cfg.prefix, ids, procs, a.timeout, seen)
        await submitting
    finally:
        submitting.cancel()
        done.set()
        await sending
    client = connect(cfg.redis.url)
    try:
        return failures, await usage_events(client, Keys(cfg.prefix)), got
    finally:
        await client.aclose()


def without(text: str, key: str) -> str:
    """A config file's text without any feature's `key` line (`tier`: the router decides;
    `semantic_cache`: no semantic cache)."""
    section, out = "", []
    for line in text.splitlines():
        if line.startswith("["):
            section = line
        if not (section.startswith("[features.") and re.match(rf"{key}\s*=", line)):
            out.append(line)
    return "\n".join(out) + "\n"


def tokenq_run(
    folder: Path, srv: Servers, trace: Trace, a: argparse.Namespace, name: str,
    settings: dict[str, object], *, routed: bool = False, feedback: float = 0.0,
    names: tuple[str, ...] = (), semantic: bool = True,
) -> list[Run]:  # fmt: skip
    """The trace through `tokenq worker` processes with the repo's config.toml plus
    `settings` (routed: no feature tiers, the router decides), once, and again under each of
    `names` with what Redis kept from the passes before (the adaptive router's counts, the
    caches)."""
    base = load_config(ROOT / "config.toml")
    overrides = {**raised_limits(base), **QUICK_BATCH, **settings}
    prefix = "cost-" + re.sub(r"[^a-z0-9]+", "-", name.lower())
    text = (ROOT / "config.toml").read_text()
    text = without(text, "tier") if routed else text
    text = text if semantic else without(text, "semantic_cache")
    overrides |= {"anthropic.simulator_url": srv.sim_url, "embeddings.provider": "simulator"}
    cfg, path = write_config(folder, srv, prefix, overrides, text)
    return [one_pass(srv, trace, a, cfg, path, label, feedback) for label in (name, *names)]


def one_pass(srv: Servers, trace: Trace, a: argparse.Namespace, cfg: Config, path: Path,
             name: str, feedback: float) -> Run:  # fmt: skip
    """One pass of the trace through tokenq, billed (the simulator reset before) and graded."""
    jobs = jobs_of(trace)
    ids = [job.id or "" for job in jobs]
    sim_call(srv.sim_url, "reset", {})
    pace = f"at {a.speed:g}x the trace's pace" if a.speed else "all at once"
    say(f"{name}: {len(ids)} jobs, submitted {pace}; {a.processes} worker processes x "
        f"concurrency {a.concurrency}")  # fmt: skip
    cmd = [sys.executable, "-m", "worker", "--config", str(path), "--log-level", "error",
           "worker", "--processes", "1", "--concurrency", str(a.concurrency)]  # fmt: skip
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=ROOT) for _ in range(a.processes)]
    try:
        failures, events, got = asyncio.run(collect(cfg, srv, trace, jobs, procs, a, feedback))
        seconds = time.monotonic() - t0
    finally:
        for proc in procs:
            stop(proc)
    run = Run(name, len(ids), seconds, sim_call(srv.sim_url, "ledger"), failures=failures)
    run.tokenq = True
    mine = set(ids)
    account(run, [e for e in events if e.job_id in mine], ids)
    items = [(job["request"], r.model if r else None) for job, r in zip(trace, got, strict=True)]
    for job, right in zip(trace, grade(srv.sim_url, items), strict=True):
        run.features.setdefault(job["feature"], FeatureCost()).right += right
    return run


# Batch windows as config.toml has them, but flushed and polled within seconds.
QUICK_BATCH: dict[str, object] = {"batch.flush_interval_s": 2.0, "batch.poll_s": 0.5}
NO_BATCH: dict[str, object] = {"batch.priorities": []}


def tiers_of(chosen: dict[str, str]) -> dict[str, object]:
    return {f"features.{feature}.tier": tier for feature, tier in chosen.items()}


def without_prompt_cache(cfg: Config) -> dict[str, object]:
    return {f"features.{name}.prompt_cache": "off" for name in cfg.features}


def without_response_cache(cfg: Config) -> dict[str, object]:
    settings: dict[str, object] = {}
    for name in cfg.features:
        settings |= {f"features.{name}.response_cache_ttl_s": 0, f"features.{name}.dedupe": False}
    return settings


def adaptive_settings(
    cfg: Config, target: float, explore: float, wrong_usd: float | None = None,
    doubt: float = 0.0,
) -> dict[str, object]:  # fmt: skip
    """Adaptive routing for every feature, cold on the dearest tier, tuned for a trace of
    minutes rather than days (see the module docstring); with `wrong_usd`, every feature's
    wrong_answer_usd in place of its target_pass_rate, and the price rule's step_down_doubt
    `doubt`."""
    settings: dict[str, object] = {
        "router.policy": "adaptive", "router.default_tier": list(cfg.tiers)[-1],
        "router.adaptive.explore_share": explore, "router.adaptive.confidence": 0.8,
        "router.adaptive.min_samples": 10, "router.adaptive.half_life_s": 600,
        "router.adaptive.recent_half_life_s": 30, "router.adaptive.kinds": "signals",
        "router.adaptive.step_down_doubt": doubt,
    }  # fmt: skip
    for name in cfg.features:
        if wrong_usd is None:
            settings[f"features.{name}.target_pass_rate"] = target
        else:
            settings[f"features.{name}.wrong_answer_usd"] = wrong_usd
    return settings


# The router's classifier for every feature: one small haiku call per distinct request, which
# names the tier; the fallback router.default_tier (sonnet) when it names none.
CLASSIFIER: dict[str, object] = {"router.classifier.enabled": True}


# The levers, added one at a time on the best static tiers: (name, what it adds, the
# settings switching off the levers not added yet). The last is all of them.
LEVERS: list[tuple[str, str, Callable[[Config], dict[str, object]]]] = [
    ("routing", "the best static tiers, escalation, max_tokens caps",
     lambda cfg: {**without_prompt_cache(cfg), **without_response_cache(cfg), **NO_BATCH}),
    ("prompt cache", "cache breakpoints on the stable prefix",
     lambda cfg: {**without_response_cache(cfg), **NO_BATCH}),
    ("response cache", "answers kept and shared (support_faq), one call in flight",
     lambda cfg: dict(NO_BATCH)),
    ("batch windows", "low priority as Message Batches at half price", lambda cfg: {}),
]  # fmt: skip


def lever_runs(folder: Path, srv: Servers, trace: Trace, cfg: Config, chosen: dict[str, str],
               a: argparse.Namespace) -> list[Run]:  # fmt: skip
    """tokenq static once per lever, each adding one to the ones before."""
    return [
        tokenq_run(folder, srv, trace, a, f"+{name}", {**tiers_of(chosen), **settings(cfg)})[0]
        for name, _, settings in LEVERS
    ]


# -- the semantic lever, on the paraphrase trace --


# A tokenq run of the paraphrase trace and its support_faq jobs graded as bench/semantic.py
# grades a pass: exact hits, paraphrases (an intent asked before in other words, not answered
# by the exact cache), semantic hits on them, and false hits (an answer written for another
# intent), by the trace's `group`.
Lever = tuple[Run, semantic_bench.Pass]


def lever_of(run: Run, trace: Trace) -> Lever:
    """Grade the support_faq jobs of a run by the trace's intent groups, in trace order."""
    out, seen = semantic_bench.Pass(run.name), set()
    group_of = {job_id: job.get("group") for job_id, job in zip(run.ids, trace, strict=True)}
    for job_id, job in zip(run.ids, trace, strict=True):
        event = run.by_job.get(job_id)
        if job["feature"] != FAQ or event is None:
            continue
        out.jobs += 1
        out.embedding_tokens += event.embedding_tokens
        if event.response_cache in ("hit", "joined"):
            out.exact_hits += 1
            seen.add(job["group"])
            continue
        before = job["group"] in seen
        out.paraphrases += before
        if event.response_cache == "semantic":
            out.semantic_hits += 1
            same = group_of.get(event.semantic_source_job_id) == job["group"]
            out.right_hits += same and before
            out.false_hits += not same
        seen.add(job["group"])
    return run, out


def semantic_lever(
    folder: Path, srv: Servers, reference: Trace, chosen: dict[str, str], a: argparse.Namespace
) -> tuple[list[Lever], list[semantic_bench.Pass]]:
    """tokenq static on the paraphrase trace with the exact cache alone, then with the
    semantic cache as config.toml has it; and the threshold sweep without API calls
    (bench/semantic.py's passes, the cache path driven directly)."""
    trace = derive(reference, a.seed)
    runs = [
        tokenq_run(folder, srv, trace, a, name, tiers_of(chosen), semantic=on)[0]
        for name, on in (("exact alone", False), ("exact+semantic", True))
    ]
    cfg, _ = write_config(folder, srv, "sweep", {
        "anthropic.simulator_url": srv.sim_url, "embeddings.provider": "simulator",
    })  # fmt: skip
    jobs = semantic_bench.faq_jobs(trace)
    semantic_bench.groups.clear()
    sweep = asyncio.run(semantic_bench.sweep(srv, cfg, jobs, THRESHOLDS))
    return [lever_of(run, trace) for run in runs], sweep


THRESHOLDS = [0.80, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94, 0.96]


def semantic_table(cfg: Config, levers: list[Lever], sweep: list[semantic_bench.Pass]) -> None:
    """The semantic lever's figures: the two runs, the saving, the sweep."""
    sc = cfg.features[FAQ].semantic_cache
    threshold = sc.threshold if sc is not None else 0.0
    (exact, graded), (both, _) = levers
    print(f"semantic cache, paraphrase trace (support_faq asked in many wordings; "
          f"{graded.jobs} support_faq jobs of {exact.jobs}), threshold {threshold}:"
          )  # fmt: skip
    for run, p in levers:
        faq = run.features.get(FAQ, FeatureCost())
        print(f"  {run.name:<15} whole trace ${run.ledger_usd:.4f}, support_faq "
              f"${faq.cost_usd:.5f}; exact hits {p.exact_hits}; paraphrases answered "
              f"{p.right_hits}/{p.paraphrases} ({p.hit_rate:.1%}); false hits "
              f"{p.false_hits}/{p.semantic_hits} ({p.false_rate:.2%}); {p.embedding_tokens:,} "
              "tokens embedded")  # fmt: skip
    saved = exact.ledger_usd - both.ledger_usd
    faq_saved = exact.features[FAQ].cost_usd - both.features[FAQ].cost_usd
    print(f"  semantic lever saves ${saved:.5f} of the trace ({saved / exact.ledger_usd:.2%})"
          f", ${faq_saved:.5f} of support_faq "
          f"({faq_saved / exact.features[FAQ].cost_usd:.1%})")  # fmt: skip
    print("  sweep (no API calls; bench/semantic.py's path): "
          + "; ".join(f"{p.name}: {p.hit_rate:.1%} answered, {p.false_rate:.2%} false"
                      for p in sweep))  # fmt: skip


# -- the report --


def cell(cost: FeatureCost | None) -> str:
    if cost is None or not cost.jobs:
        return f"{'-':>17}"
    return f"{cost.cost_usd:>9.4f} {cost.quality:>6.1%}"


def tiers(cost: FeatureCost) -> str:
    return ", ".join(f"{tier} {n}" for tier, n in cost.tiers.most_common()) or "-"


def table(runs: list[Run], order: list[str]) -> None:
    """Per feature and in total: each run's cost ($) and quality (share of right answers)."""
    width = max(len(f) for f in [*order, "total (ledger)"])
    print(f"{'':<{width}}  {'':>5}" + "".join(f"  {run.name:>17}" for run in runs))
    print(f"{'feature':<{width}}  {'jobs':>5}" + "  {:>9} {:>7}".format("$", "right") * len(runs))
    for feature in order:
        jobs = runs[0].features[feature].jobs
        print(f"{feature:<{width}}  {jobs:>5}"
              + "".join(f"  {cell(run.features.get(feature))}" for run in runs))  # fmt: skip
    total = "".join(f"  {run.ledger_usd:>9.4f} {run.quality:>6.1%}" for run in runs)
    print(f"{'total (ledger)':<{width}}  {runs[0].jobs:>5}{total}")


def compare(run: Run, than: Run) -> str:
    """`run` against `than`: the saving, and the quality reached in points and as a share."""
    saving = 1 - run.ledger_usd / than.ledger_usd
    return (f"{saving:.1%} cheaper than {than.name} (${run.ledger_usd:.4f} vs "
            f"${than.ledger_usd:.4f}) at {run.quality:.1%} right vs {than.quality:.1%} "
            f"({run.quality / than.quality:.1%} of its quality)")  # fmt: skip


def headlines(opus: Run, best: Run, static: Run, routers: list[Run]) -> list[str]:
    """The claims: savings at the quality reached, each part's share, the targets."""
    lines = [f"{run.name}: {compare(run, opus)}" for run in (best, static, *routers)]
    lines += [f"{run.name}: {compare(run, best)}" for run in (static, *routers)]
    routing = opus.ledger_usd - best.ledger_usd
    levers = best.ledger_usd - static.ledger_usd
    total = opus.ledger_usd
    learnt = ", ".join(
        f"{run.name} {(static.ledger_usd - run.ledger_usd) / total:+.1%}" for run in routers
    )
    lines.append(
        f"where the saving comes from (of naive opus's ${total:.4f}): routing by hand "
        f"(best static) {routing / total:.1%}; tokenq's levers on the same tiers (prompt "
        f"cache, response cache, batches, escalation) {levers / total:.1%}; a router instead of "
        f"the hand-set tiers: {learnt}"
    )
    for run in (static, *routers):
        cheap = 1 - run.ledger_usd / opus.ledger_usd >= 0.85
        kept = run.quality >= 0.95 * opus.quality
        beats = run.ledger_usd <= 0.7 * best.ledger_usd and run.quality >= best.quality
        lines.append(
            f"target, {run.name}: >= 85% cheaper than naive opus at >= 95% of its quality: "
            f"{'met' if cheap and kept else 'NOT met'}; >= 30% cheaper than best static at "
            f"equal or better quality: {'met' if beats else 'NOT met'}"
        )
    return lines


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


def levers_table(best: Run, runs: list[Run], opus: Run) -> None:
    """Each lever's cost, quality and share of the saving (of naive opus's cost)."""
    print(f"{'tokenq static, levers added in turn':<64}  {'tokenq $':>9}  {'right':>6}  "
          f"{'vs opus':>7}  lever's share")  # fmt: skip
    before = opus.ledger_usd
    for (name, what, _), run in zip(LEVERS, runs, strict=True):
        share = (before - run.ledger_usd) / opus.ledger_usd
        saving = 1 - run.ledger_usd / opus.ledger_usd
        print(f"{'+ ' + name + ': ' + what:<64.64}  {run.ledger_usd:>9.4f}  {run.quality:>6.1%}"
              f"  {saving:>7.1%}  {share:+.1%}")  # fmt: skip
        before = run.ledger_usd


def checks(runs: list[Run], cfg: Config) -> tuple[bool, list[str]]:
    """Accounting to the cent, one event per job, batches at half price; the lines."""
    lines, ok = [], True
    for run in runs:
        gap_ok = round(run.accounting_gap_usd, 2) == 0
        billed, realtime, requests = batch_discount(run, cfg)
        half = realtime == 0 or abs(billed / realtime - 0.5) < 1e-6
        whole = run.events == run.jobs and not run.failures
        ok = ok and gap_ok and half and run.events == run.jobs
        modes = ", ".join(f"{m} {n}" for m, n in sorted(run.modes.items()))
        lines.append(
            f"accounting, {run.name} ({run.seconds:.0f} s): usage events ${run.usage_usd:.6f}, "
            f"ledger ${run.ledger_usd:.6f}: {'to the cent' if gap_ok else 'NOT to the cent'}; "
            f"{run.events} job events for {run.jobs} jobs ({modes}); "
            f"{requests} batch requests at {billed / realtime if realtime else 0.5:.1%} of the "
            f"realtime price{'' if whole else '; NOT all ok'}"
        )
        lines += [f"NOT ok, {run.name}: {n} x {why}" for why, n in run.failures.most_common()]
    return ok, lines


def report(cfg: Config, order: list[str], naive: dict[str, Run], best: Run,
           chosen: dict[str, str], static: Run, routers: list[Run], levers: list[Run],
           semantic: tuple[list[Lever], list[semantic_bench.Pass]] | None,
           a: argparse.Namespace) -> bool:  # fmt: skip
    """Print the figures, the headlines last; whether every check passed."""
    tops = list(cfg.tiers)
    opus = naive[tops[-1]]
    print(f"workload: bench/workloads/make_workload.py --jobs {a.jobs} --seed {a.seed}; "
          f"simulator --quality on --seed {a.seed} (synthetic ground truth); naive: "
          f"max_tokens {NAIVE_MAX_TOKENS}, realtime; tokenq: {a.processes} x `tokenq worker` "
          f"(concurrency {a.concurrency}); producers' verdicts on {a.feedback:.0%} of "
          "tokenq adaptive's jobs")  # fmt: skip
    runs = [naive[t] for t in reversed(tops)] + [best, static, *routers]
    table(runs, order)
    print("best static tiers (quality >= 95% of opus's per feature): "
          + ", ".join(f"{f} {t}" for f, t in chosen.items()))  # fmt: skip
    for run in (static, *routers):
        print(f"{run.name}, answered on: "
              + "; ".join(f"{f} {tiers(run.features[f])}" for f in order))  # fmt: skip
    small = [f"{f} {1 - static.features[f].cost_usd / best.features[f].cost_usd:.1%}"
             for f in order if best.features[f].cost_usd]  # fmt: skip
    print("tokenq static over best static, per feature: " + ", ".join(small))
    if levers:
        levers_table(best, levers, opus)
    if semantic is not None:
        semantic_table(cfg, *semantic)
    paraphrased = [run for run, _ in semantic[0]] if semantic is not None else []
    ok, lines = checks([static, *routers, *levers, *paraphrased], cfg)
    for line in lines:
        print(line)
    for run in naive.values():
        for why, n in run.failures.most_common():
            print(f"naive failures, {run.name}: {n} x {why}")
    for line in headlines(opus, best, static, routers):
        print(line)
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000, help="jobs of the trace (2000)")
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the trace and the simulator's truth (7)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="naive requests in flight; per process (32)"
    )
    parser.add_argument("--processes", type=int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--feedback", type=float, default=1.0,
        help="share of tokenq adaptive's jobs whose producer reports a verdict (1.0)",
    )  # fmt: skip
    parser.add_argument(
        "--target", type=float, default=0.95,
        help="target_pass_rate of every feature in tokenq adaptive (0.95)",
    )  # fmt: skip
    parser.add_argument(
        "--wrong-usd", type=float, default=None,
        help="tokenq adaptive prices a wrong answer instead: every feature's wrong_answer_usd "
        "(README: Adaptive routing) in place of --target",
    )  # fmt: skip
    parser.add_argument(
        "--step-down-doubt", type=float, default=0.0,
        help="with --wrong-usd: router.adaptive.step_down_doubt, the failures a cheaper tier "
        "starts with per tier above it (0, as config.toml)",
    )  # fmt: skip
    parser.add_argument(
        "--explore", type=float, default=0.1,
        help="router.adaptive.explore_share in tokenq adaptive (0.1)",
    )  # fmt: skip
    parser.add_argument(
        "--no-classifier", dest="classifier", action="store_false",
        help="skip the run with the router's classifier",
    )  # fmt: skip
    parser.add_argument(
        "--speed", type=float, default=2.0,
        help="tokenq's jobs arrive at the trace's times sped up this much; 0: all at once (2)",
    )  # fmt: skip
    parser.add_argument(
        "--no-semantic", dest="semantic", action="store_false",
        help="skip the semantic lever (the paraphrase trace, twice, and the threshold sweep)",
    )  # fmt: skip
    parser.add_argument(
        "--levers", action="store_true", help="also run tokenq static lever by lever"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a tokenq run may take (600)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    cfg = load_config(ROOT / "config.toml")
    t0 = time.monotonic()
    sim_args = ("--limit", UNLIMITED, "--quality", "on", "--seed", str(a.seed))
    with (
        tempfile.TemporaryDirectory(prefix="tokenq-bench-") as tmp,
        servers(Path(tmp), sim_args) as srv,
    ):
        folder = Path(tmp)
        trace = workload(folder, a.jobs, a.seed)
        order = feature_order(cfg, trace)
        naive = {tier: naive_run(srv, cfg, trace, tier, a) for tier in cfg.tiers}
        best, chosen = best_static(cfg, naive)
        [static] = tokenq_run(folder, srv, trace, a, "tokenq static", tiers_of(chosen))
        classified = (
            tokenq_run(folder, srv, trace, a, "tokenq classifier", CLASSIFIER, routed=True)
            if a.classifier
            else []
        )
        learning = adaptive_settings(cfg, a.target, a.explore, a.wrong_usd, a.step_down_doubt)
        adaptive, warm = tokenq_run(
            folder, srv, trace, a, "tokenq adaptive", learning, routed=True,
            feedback=a.feedback, names=("adaptive, warm",),
        )  # fmt: skip
        levers = lever_runs(folder, srv, trace, cfg, chosen, a) if a.levers else []
        semantic = semantic_lever(folder, srv, trace, chosen, a) if a.semantic else None
    say(f"whole run {time.monotonic() - t0:.0f} s")
    routers = [*classified, adaptive, warm]
    if not report(cfg, order, naive, best, chosen, static, routers, levers, semantic, a):
        sys.exit(1)


if __name__ == "__main__":
    main()
