#!/usr/bin/env python3
"""Semantic cache: hit rate on paraphrases, false hits, saving, threshold sweep, lookup time.

    .venv/bin/python bench/semantic.py [--jobs 2000] [--seed 7] [--thresholds 0.8,0.84,...]
    (or: python3 dev.py bench semantic)

Starts its own Valkey and simulator and writes the paraphrase trace
(bench/workloads/paraphrase.py: the reference trace --jobs/--seed with every support_faq
question asked in seeded wordings; each line's `group` is its intent, for grading). The
bench drives the job's cache path itself, in the worker's order (worker.caching's response
cache first, then worker.semantic; bench/cost.py measures it through the worker), over the
trace's support_faq jobs in time order, with config.toml's
support_faq settings (shared scope, haiku, prompt caching) and embeddings from the
simulator's POST /v1/embeddings:
  1. exact cache alone: each job looks up the response cache; a miss calls the simulator
     through the anthropic SDK (the request marked for prompt caching as the worker marks it)
     and keeps the answer.
  2. exact + semantic cache at the configured threshold: a response-cache miss embeds the
     question and looks up the semantic cache; a semantic miss calls, and keeps the answer
     in both (the semantic entry queued on one MULTI, as the finishing write will).
  3. the threshold sweep: 2. again in fresh scopes at each --thresholds value, without API
     calls (a miss's answer is a placeholder; its cost is the mean call cost of run 2).
Graded by the trace: a *paraphrase* is a job whose intent an earlier job asked in other
words (not answered by the exact cache); a semantic hit is *false* when the entry it served
was written for another intent. Costs come from the simulator's ledger (answers and
embeddings). Then the lookup's own time: a scope filled with 10,000 entries, 500 lookups
timed with the embedding call (the simulator, on this machine) and without it (the sync with
Redis, the search of the in-process index, the read of the entry): p50 and p99.
Exits 1 when the configured threshold misses the target: at least half the paraphrases
answered, false hits under 1% of semantic hits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import msgspec
from common import Servers, say, servers, sim_call, workload, write_config

sys.path.insert(0, str(Path(__file__).resolve().parent / "workloads"))
from paraphrase import FAQ, derive

from worker.caching import CachedAnswer, ResponseCache, cache_key, mark_prompt_cache
from worker.config import Config
from worker.contract import Keys
from worker.embedded import connect
from worker.embeddings import Embedded, make_embedder
from worker.semantic import Lookup, SemanticCache

TARGET_HIT_RATE, TARGET_FALSE_RATE = 0.5, 0.01
PLACEHOLDER = CachedAnswer("(sweep)", [], "", "", "end_turn", {})


@dataclass
class Pass:
    """One pass over the FAQ jobs."""

    name: str
    jobs: int = 0
    exact_hits: int = 0
    paraphrases: int = 0
    semantic_hits: int = 0
    right_hits: int = 0  # semantic hits on a paraphrase of the same intent
    false_hits: int = 0
    calls: int = 0
    embedding_tokens: int = 0
    ledger: dict[str, Any] | None = None

    @property
    def hit_rate(self) -> float:
        return self.right_hits / self.paraphrases if self.paraphrases else 0.0

    @property
    def false_rate(self) -> float:
        return self.false_hits / self.semantic_hits if self.semantic_hits else 0.0


@dataclass(frozen=True)
class FaqJob:
    group: str
    tenant: str
    params: dict[str, Any]


def faq_jobs(trace: list[dict[str, Any]]) -> list[FaqJob]:
    return [FaqJob(j["group"], j["tenant"], j["request"]) for j in trace if j["feature"] == FAQ]


def with_threshold(cfg: Config, threshold: float) -> Config:
    faq = cfg.features[FAQ]
    assert faq.semantic_cache is not None, "config.toml gives support_faq a semantic_cache"
    sc = msgspec.structs.replace(faq.semantic_cache, threshold=threshold)
    features = {**cfg.features, FAQ: msgspec.structs.replace(faq, semantic_cache=sc)}
    return msgspec.structs.replace(cfg, features=features)


class Run:
    """What one pass needs: the config, the Redis client, the SDK client."""

    def __init__(self, cfg: Config, srv: Servers, sdk: anthropic.AsyncAnthropic | None) -> None:
        self.cfg, self.sdk = cfg, sdk
        self.redis = connect(srv.redis_url, max_connections=32)
        self.keys = Keys(f"sem{uuid.uuid4().hex[:8]}")
        self.model = cfg.tiers[cfg.features[FAQ].tier or cfg.router.default_tier]
        self.exact = ResponseCache(self.redis, lease_ms=10_000, block_ms=1000)

    async def call(self, params: dict[str, Any]) -> CachedAnswer:
        if self.sdk is None:
            return PLACEHOLDER
        f, m = self.cfg.features[FAQ], self.cfg.models[self.model]
        sent = mark_prompt_cache(
            {**params, "model": self.model}, f.prompt_cache, m.min_cache_tokens
        )
        reply = await self.sdk.messages.create(**sent)
        text = "".join(getattr(b, "text", "") for b in reply.content)
        usage = reply.usage.model_dump()
        return CachedAnswer(
            text,
            [b.model_dump() for b in reply.content],
            self.model,
            "haiku",
            reply.stop_reason,
            usage,
        )


async def one_pass(
    run: Run, jobs: Sequence[FaqJob], semantic: SemanticCache | None, name: str
) -> Pass:
    out, seen, f = Pass(name), set(), run.cfg.features[FAQ]
    for n, job in enumerate(jobs):
        out.jobs += 1
        key = cache_key(run.keys, FAQ, f, job.tenant, run.model, job.params)
        if await run.exact.get(key) is not None:
            out.exact_hits += 1
            continue
        asked_before = job.group in seen
        out.paraphrases += asked_before
        found = None
        if semantic is not None:
            found = await semantic.lookup(
                run.cfg,
                feature=FAQ,
                tenant=job.tenant,
                cache_off=False,
                model=run.model,
                params=job.params,
            )
            out.embedding_tokens += found.embedding_tokens
            if found.outcome == "hit":
                out.semantic_hits += 1
                source_group = groups[found.source_job_id]
                out.right_hits += source_group == job.group and asked_before
                out.false_hits += source_group != job.group
                continue
        answer = await run.call(job.params)
        out.calls += 1
        seen.add(job.group)
        job_id = f"job-{n}"
        groups[job_id] = job.group
        async with run.redis.pipeline(transaction=True) as tx:
            tx.set(key, msgspec.json.encode(answer), ex=f.response_cache_ttl_s)
            if semantic is not None and found is not None and found.outcome == "miss":
                semantic.store_into(
                    tx, run.cfg, found, job_id=job_id, answer=answer, now_ms=int(time.time() * 1000)
                )
            await tx.execute()
    return out


groups: dict[str, str] = {}  # job id of an entry's answer -> its intent


async def passes(
    srv: Servers, cfg: Config, jobs: list[FaqJob], thresholds: list[float]
) -> list[Pass]:
    out = []
    async with anthropic.AsyncAnthropic(
        base_url=srv.sim_url, api_key="bench", max_retries=2
    ) as sdk:
        for semantic_on in (False, True):
            run = Run(cfg, srv, sdk)
            sim_call(srv.sim_url, "reset", {})
            cache = SemanticCache(run.redis, run.keys, make_embedder(cfg)) if semantic_on else None
            name = "exact + semantic" if semantic_on else "exact cache alone"
            say(f"{name}: {len(jobs)} support_faq jobs")
            done = await one_pass(run, jobs, cache, name)
            done.ledger = sim_call(srv.sim_url, "ledger")
            out.append(done)
            if cache is not None:
                await cache.embedder.aclose()
            await run.redis.aclose()
    return out + await sweep(srv, cfg, jobs, thresholds)


async def sweep(
    srv: Servers, cfg: Config, jobs: list[FaqJob], thresholds: list[float]
) -> list[Pass]:
    """The jobs through the cache path at each threshold, without API calls (a miss's answer
    is a placeholder), each in fresh scopes."""
    out = []
    for threshold in thresholds:
        run = Run(with_threshold(cfg, threshold), srv, None)
        cache = SemanticCache(run.redis, run.keys, make_embedder(run.cfg))
        out.append(await one_pass(run, jobs, cache, f"{threshold:.2f}"))
        await cache.embedder.aclose()
        await run.redis.aclose()
    say(f"sweep of {len(thresholds)} thresholds done")
    return out


class Fixed:
    """An embedder that answers at once with given vectors: to time the lookup without the
    embedding call."""

    name = "bench:fixed"

    def __init__(self) -> None:
        self.next: Any = None

    async def embed(self, texts: Sequence[str]) -> Embedded:
        return Embedded(self.next, 0)

    async def aclose(self) -> None:
        pass


class Named:
    """A real embedder under another name (the fixed one's, so its lookups find the entries
    the fixed one filled)."""

    def __init__(self, real: Any, name: str) -> None:
        self.real, self.name = real, name

    async def embed(self, texts: Sequence[str]) -> Embedded:
        got: Embedded = await self.real.embed(texts)
        return got

    async def aclose(self) -> None:
        pass


def percentiles(samples: list[float]) -> str:
    import numpy as np  # after worker, whose import sets one BLAS thread

    p50, p99 = np.percentile(np.array(samples) * 1000, [50, 99])
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"


async def lookup_times(srv: Servers, cfg: Config, entries: int, lookups: int) -> list[str]:
    """Fill one scope with `entries`, then time lookups with and without the embedding call."""
    import numpy as np  # after worker, whose import sets one BLAS thread (see worker/__init__)

    run = Run(cfg, srv, None)
    real = make_embedder(cfg)
    texts = [f"Question {i} on order {i % 97}, invoice {i % 89}, plan {i}" for i in range(entries)]
    vectors = np.concatenate(
        [(await real.embed(texts[i : i + 1000])).vectors for i in range(0, entries, 1000)]
    )
    fixed = Fixed()
    cache = SemanticCache(run.redis, run.keys, fixed)
    params = {
        "system": "Acme support.",
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "x"}],
    }

    async def lookup(cache: SemanticCache, asked: dict[str, Any] = params) -> Lookup:
        """A lookup of `asked` in the filled scope (one tenant, the cache on)."""
        return await cache.lookup(
            cfg, feature=FAQ, tenant="t", cache_off=False, model=run.model, params=asked
        )

    t0 = time.perf_counter()
    for start in range(0, entries, 500):
        async with run.redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(entries, start + 500)):
                fixed.next = vectors[i : i + 1]
                if i == 0:
                    found = await lookup(cache)
                miss = msgspec.structs.replace(
                    found, outcome="miss", vector=vectors[i].astype("<f4").tobytes()
                )
                cache.store_into(
                    pipe,
                    cfg,
                    miss,
                    job_id=f"fill-{i}",
                    answer=PLACEHOLDER,
                    now_ms=int(time.time() * 1000),
                )
            await pipe.execute()
    fill_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    other = SemanticCache(run.redis, run.keys, fixed)  # a second process: loads 10k entries
    fixed.next = vectors[:1]
    t0 = time.perf_counter()
    await lookup(other)
    load_s = time.perf_counter() - t0
    bare, calls = [], []
    for k in range(lookups):
        t0 = time.perf_counter()
        await real.embed([texts[k]])
        calls.append(time.perf_counter() - t0)
        fixed.next = vectors[int(rng.integers(entries))][None, :]
        t0 = time.perf_counter()
        found = await lookup(other)
        bare.append(time.perf_counter() - t0)
        assert found.outcome == "hit", found.outcome  # its own vector: similarity 1
    whole = [a + b for a, b in zip(bare, calls, strict=True)]
    # The lookup as a job makes it: the embedding call and the scope's sync overlap.
    overlapped = SemanticCache(run.redis, run.keys, Named(real, fixed.name))
    await lookup(overlapped)  # its first lookup loads the scope
    jobs = []
    for k in range(lookups):
        asked = {**params, "messages": [{"role": "user", "content": texts[k]}]}
        t0 = time.perf_counter()
        found = await lookup(overlapped, asked)
        jobs.append(time.perf_counter() - t0)
        assert found.outcome == "hit", found.outcome
    await real.aclose()
    await run.redis.aclose()
    return [
        f"scope of {entries:,} entries ({cfg.embeddings.dimensions} dimensions): filled in "
        f"{fill_s:.1f} s; a new process's first lookup loads it in {load_s * 1000:.0f} ms",
        f"lookup without the embedding call ({lookups} lookups): {percentiles(bare)}",
        f"the simulator's embedding call alone: {percentiles(calls)}; both one after the "
        f"other: {percentiles(whole)}",
        f"a job's lookup (the embedding call and the scope's sync at once, then the search and "
        f"the hit's read): {percentiles(jobs)}",
    ]


def report(cfg: Config, out: list[Pass], times: list[str], a: argparse.Namespace) -> bool:
    exact, both, sweep = out[0], out[1], out[2:]
    threshold = cfg.features[FAQ].semantic_cache.threshold  # type: ignore[union-attr]
    assert exact.ledger is not None and both.ledger is not None
    exact_usd, both_usd = exact.ledger["total_cost_usd"], both.ledger["total_cost_usd"]
    embed_usd = sum(e["cost_usd"] for e in both.ledger.get("embeddings", {}).values())
    print(
        f"paraphrase trace: --jobs {a.jobs} --seed {a.seed}: {exact.jobs} support_faq jobs, "
        f"{len(set(groups.values()))} intents answered"
    )
    print()
    print("| run | calls | exact hits | semantic hits (false) | paraphrases answered | cost |")
    print("|---|---|---|---|---|---|")
    for p, usd in ((exact, exact_usd), (both, both_usd)):
        print(
            f"| {p.name} | {p.calls} | {p.exact_hits} | {p.semantic_hits} ({p.false_hits}) | "
            f"{p.right_hits}/{p.paraphrases} ({p.hit_rate:.1%}) | ${usd:.5f} |"
        )
    saving = 1 - both_usd / exact_usd if exact_usd else 0.0
    print()
    print(
        f"at threshold {threshold}: {both.hit_rate:.1%} of paraphrases answered from the "
        f"semantic cache, false hits {both.false_hits} of {both.semantic_hits} "
        f"({both.false_rate:.2%}); cost ${both_usd:.5f} against ${exact_usd:.5f} with the "
        f"exact cache alone ({saving:.1%} saved; embeddings ${embed_usd:.6f} of it, "
        f"{both.embedding_tokens:,} tokens)"
    )
    mean_call = (both_usd - embed_usd) / both.calls if both.calls else 0.0
    print()
    print(
        "| threshold | calls | semantic hits | paraphrases answered | false hits (of hits) "
        "| est. cost |"
    )
    print("|---|---|---|---|---|---|")
    for p in sweep:
        est = p.calls * mean_call + embed_usd
        print(
            f"| {p.name} | {p.calls} | {p.semantic_hits} | {p.hit_rate:.1%} | {p.false_hits} "
            f"({p.false_rate:.2%}) | ${est:.5f} |"
        )
    print()
    for line in times:
        print(line)
    ok = both.hit_rate >= TARGET_HIT_RATE and both.false_rate < TARGET_FALSE_RATE
    print()
    print(
        f"target (>= {TARGET_HIT_RATE:.0%} of paraphrases, < {TARGET_FALSE_RATE:.0%} false): "
        f"{'met' if ok else 'NOT met'} at {threshold}"
    )
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--thresholds", default="0.80,0.84,0.86,0.88,0.90,0.92,0.94,0.96")
    p.add_argument("--entries", type=int, default=10_000, help="scope size for the lookup times")
    p.add_argument("--times-only", action="store_true", help="only the lookup times")
    p.add_argument("--dimensions", type=int, help="embeddings.dimensions (config.toml's)")
    a = p.parse_args()
    thresholds = [float(t) for t in a.thresholds.split(",") if t]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with servers(folder) as srv:
            cfg, _ = write_config(
                folder,
                srv,
                "bench",
                {
                    "anthropic.simulator_url": srv.sim_url,
                    "embeddings.provider": "simulator",
                    **({"embeddings.dimensions": a.dimensions} if a.dimensions else {}),
                },
            )
            out = []
            if not a.times_only:
                jobs = faq_jobs(derive(workload(folder, a.jobs, a.seed), a.seed))
                out = asyncio.run(passes(srv, cfg, jobs, thresholds))
            say(f"timing lookups in a scope of {a.entries:,} entries")
            times = asyncio.run(lookup_times(srv, cfg, a.entries, 500))
    if a.times_only:
        print("\n".join(times))
        sys.exit(0)
    sys.exit(0 if report(cfg, out, times, a) else 1)


if __name__ == "__main__":
    main()
