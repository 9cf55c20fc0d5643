"""A demo producer: submits a mix of jobs like a small product's, then waits for every result.

    python -m producers.demo --redis-url redis://127.0.0.1:6399/0 --jobs 200 --rate 20

The mix: a support FAQ bot (high priority), ticket classification, document summaries and code
review (normal), a bulk enrichment job (low), and a few malformed jobs that the workers must
dead-letter (an unknown feature, a request that is not JSON, a job without a feature).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from producers.client import NewJob, Producer

FEATURES = (
    # feature, priority, weight, system prompt, max_tokens
    ("support_faq", "high", 35, "You are Acme's support assistant. Answer briefly.", 300),
    ("classify_ticket", "normal", 25, "Classify the ticket. Reply with JSON only.", 50),
    ("summarize_doc", "normal", 15, None, 400),
    ("code_review", "normal", 5, "You are a senior reviewer. Find bugs.", 1500),
    ("nightly_enrich", "low", 17, None, 100),
)
MALFORMED_WEIGHT = 3
WORDS = [
    "order",
    "refund",
    "invoice",
    "login",
    "error",
    "shipping",
    "plan",
    "upgrade",
    "api",
    "latency",
    "report",
    "export",
]


def demo_job(rng: random.Random, n: int) -> NewJob | dict[str, str]:
    """One job of the mix; a plain field map for the malformed ones."""
    weights = [f[2] for f in FEATURES] + [MALFORMED_WEIGHT]
    pick = rng.choices(range(len(FEATURES) + 1), weights)[0]
    if pick == len(FEATURES):
        return rng.choice(
            [
                {"feature": "no_such_feature", "request": '{"messages":[]}'},
                {"feature": "summarize", "request": "this is not JSON"},
                {"request": '{"messages":[{"role":"user","content":"hi"}]}'},
            ]
        )
    feature, priority, _, system, max_tokens = FEATURES[pick]
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 80)))
    request: dict[str, object] = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
    }
    if system:
        request["system"] = system
    return NewJob(
        feature=feature,
        request=request,
        priority=priority,
        tenant=f"tenant-{rng.randrange(8)}",
        id=f"demo-{int(time.time())}-{n}",
    )


def job_kwargs(job: NewJob) -> dict[str, Any]:
    return {f: getattr(job, f) for f in job.__struct_fields__}


async def run(url: str, prefix: str, jobs: int, rate: float, seed: int) -> int:
    """Submit `jobs` at `rate` per second, wait for all results, print a summary."""
    redis = aioredis.Redis.from_url(url, decode_responses=True)
    producer = Producer(redis, prefix)
    rng = random.Random(seed)
    ids: list[str] = []
    share = MALFORMED_WEIGHT / (sum(f[2] for f in FEATURES) + MALFORMED_WEIGHT)
    print(
        f"demo: submitting {jobs} jobs at {rate:g}/s; about {share:.0%} of them are malformed "
        "on purpose (an unknown feature, a request that is not JSON, no feature) to show "
        "dead letters: expect `error` lines for them (`tokenq dead list` shows them)",
        flush=True,
    )
    t0 = time.monotonic()
    for n in range(jobs):
        job = demo_job(rng, n)
        if isinstance(job, NewJob):
            ids.append(await producer.submit(**job_kwargs(job)))
        else:  # malformed on purpose: written raw, as a buggy service would
            job["id"] = f"demo-{int(time.time())}-{n}"
            await redis.xadd(producer.keys.jobs("normal"), dict(job.items()))
            ids.append(job["id"])
        # Paced by the clock, not by sleeping a fixed step: late submits catch up.
        await asyncio.sleep(max(0.0, t0 + (n + 1) / rate - time.monotonic()))
    print(f"demo: submitted {jobs} jobs; waiting for their results", flush=True)
    outcomes: Counter[str] = Counter()
    for job_id in ids:
        result = await producer.result(job_id, timeout_s=120)
        outcomes[result.status if result.error is None else result.error.type] += 1
    summary = ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items()))
    print(f"demo: all {jobs} jobs have a result: {summary}", flush=True)
    await redis.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m producers.demo", description=__doc__)
    parser.add_argument("--redis-url", required=True, help="redis://host:port/db of tokenq")
    parser.add_argument("--prefix", default="tokenq", help="key prefix (config.toml prefix)")
    parser.add_argument("--jobs", type=int, default=200, help="how many jobs (default 200)")
    parser.add_argument("--rate", type=float, default=20.0, help="jobs per second (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the mix")
    a = parser.parse_args(argv)
    if a.jobs < 1 or a.rate <= 0:
        parser.error("--jobs must be at least 1 and --rate above 0")
    return asyncio.run(run(a.redis_url, a.prefix, a.jobs, a.rate, a.seed))


if __name__ == "__main__":
    sys.exit(main())
