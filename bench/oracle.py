#!/usr/bin/env python3
"""What any router can reach on the reference workload: the cost of routing each request by
the simulator's own ground truth, at a given share of opus's quality.

    .venv/bin/python bench/oracle.py [--jobs 2000] [--seed 7] [--of-opus 0.95]
    (or: python3 dev.py bench oracle)

Computed offline, without a server, from the same functions the simulator answers and grades
with (simulator.truth.judge, simulator.tokens), on the trace of bench/workloads/make_workload.py
with the simulator's default quality settings (the ones `bench/cost.py` runs with) and the
prices of config.toml, every request billed as the naive runs bill it (max_tokens 4096, no
prompt cache, no response cache, no batch discount: those levers are the same for every
router and come on top). For each request and tier: its cost and its grade. Then, each router
sends every request to one tier and is scored by the truth's draws:

- **naive opus**, and **best static** (each feature on the cheapest tier that reaches --of-opus
  of opus's quality on that feature, as bench/cost.py picks it);
- **oracle, by the draw**: knows whether each answer would be right (it reads the grades), so
  it spends nothing on a request that no tier gets right and the cheapest right tier on the
  others: no router can beat it, and no honest router can reach it;
- **oracle, by the difficulty**: knows each request's difficulty exactly (the observable and
  the hidden part), so each tier's chance of a right answer, but not the draw: a router with
  a perfect difficulty estimate;
- **oracle, by what is observable**: knows the feature and the observable score (length,
  hard words, structure: simulator.truth.observable) and integrates the hidden part out: the
  best any router can do from what a request shows, on average over the truth's draws. A
  router that learns from outcomes (bench/cost.py's adaptive runs) converges to it at best.
Each oracle picks, per request, the tier minimising cost - λ·P(right) and takes the cheapest
λ that reaches --of-opus of naive opus's quality (by the expected share for the two oracles
that do not see the draw; the share the draws give is printed too).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from common import ROOT, workload

from simulator import tokens, truth
from worker.config import load_config

TIERS = ("haiku", "sonnet", "opus")
NAIVE_MAX_TOKENS = 4096
HIDDEN_POINTS = 64  # midpoint quantiles of the hidden score, for the observable oracle
_normal = NormalDist()


@dataclass(frozen=True)
class Request:
    """One request of the trace: its feature, and per tier its cost, its truth and chances."""

    feature: str
    cost: tuple[float, ...]
    right: tuple[bool, ...]
    p_known: tuple[float, ...]  # chance of a right answer knowing the difficulty
    p_seen: tuple[float, ...]  # chance knowing only the observable score


def _with_levers(body: dict[str, Any], job: dict[str, Any], cost: float, price: Any,
                 repeated: bool) -> float:  # fmt: skip
    """A request's cost about as tokenq bills it: a repeated support question from the
    response cache (free), the system prompt read from the prompt cache, the low priority
    at the batch discount."""
    if repeated and job["feature"] == "support_faq":
        return 0.0
    system = body.get("system")
    if isinstance(system, str):
        cached = tokens.text_tokens(system)
        cost -= cached * (price.input_usd_per_mtok - price.cache_read_usd_per_mtok) / 1e6
    if job["priority"] == "low":
        cost *= 1 - price.batch_discount
    return cost


def requests(jobs: int, seed: int, levers: bool) -> list[Request]:
    """The trace's requests, each billed and graded on every tier; with `levers`, billed as
    tokenq's levers would about bill them (see --levers)."""
    cfg = load_config(ROOT / "config.toml")
    q = truth.Quality(mode="on", seed=seed)
    hidden = [_normal.inv_cdf((i + 0.5) / HIDDEN_POINTS) for i in range(HIDDEN_POINTS)]
    out = []
    seen_before: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        trace = workload(Path(tmp), jobs, seed)
    for job in trace:
        body: dict[str, Any] = {**job["request"], "max_tokens": NAIVE_MAX_TOKENS}
        text = truth.request_text(body)
        kind = truth.kind_of(text)
        seen = truth.observable(text, kind)
        difficulties = [
            truth._curve(  # the truth's own curve, not a copy of it
                truth.KINDS[kind].curve,
                _normal.cdf(math.sqrt(q.signal) * seen + math.sqrt(1 - q.signal) * h),
            )
            for h in hidden
        ]
        costs, rights, known, mean = [], [], [], []
        for tier in TIERS:
            model = cfg.tiers[tier]
            price = cfg.models[model]
            verdict = truth.judge({**body, "model": model}, model, q)
            answer = tokens.reply({**body, "model": model}, verdict.form, verdict.text)
            cost = (
                tokens.input_tokens(body) * price.input_usd_per_mtok
                + answer.output_tokens * price.output_usd_per_mtok
            ) / 1e6
            if levers:
                cost = _with_levers(body, job, cost, price, f"{tier}:{text}" in seen_before)
                seen_before.add(f"{tier}:{text}")
            skill = q.skills[model]
            costs.append(cost)
            rights.append(verdict.grade.correct)
            known.append(verdict.grade.p_correct)
            mean.append(sum(truth.p_correct(skill, d) for d in difficulties) / len(difficulties))
        out.append(Request(job["feature"], tuple(costs), tuple(rights), tuple(known), tuple(mean)))
    return out


@dataclass(frozen=True)
class Outcome:
    """A router's choices scored: cost, the share the draws make right, the expected share."""

    name: str
    cost: float
    right: float
    expected: float
    by_feature: dict[str, tuple[float, float, str]]  # cost, right share, tier mix


def score(name: str, reqs: Sequence[Request], chosen: Sequence[int],
          chance: Callable[[Request], tuple[float, ...]]) -> Outcome:  # fmt: skip
    pairs = list(zip(reqs, chosen, strict=True))
    by_feature = {}
    for f in sorted({r.feature for r in reqs}):
        mine = [(r, t) for r, t in pairs if r.feature == f]
        mix = "/".join(f"{sum(t == i for _, t in mine) / len(mine):.0%}" for i in range(len(TIERS)))
        by_feature[f] = (
            sum(r.cost[t] for r, t in mine),
            sum(r.right[t] for r, t in mine) / len(mine),
            mix,
        )
    return Outcome(
        name,
        sum(r.cost[t] for r, t in pairs),
        sum(r.right[t] for r, t in pairs) / len(pairs),
        sum(chance(r)[t] for r, t in pairs) / len(pairs),
        by_feature,
    )


def by_lambda(reqs: Sequence[Request], chance: Callable[[Request], tuple[float, ...]],
              goal: float) -> list[int]:  # fmt: skip
    """Per request the tier minimising cost - λ·chance, for the least λ whose expected share
    of right answers reaches `goal` (bisection on λ; the share grows with λ)."""

    def cheapest(r: Request, lam: float) -> int:
        p = chance(r)
        return min(range(len(TIERS)), key=lambda t: r.cost[t] - lam * p[t])

    def pick(lam: float) -> list[int]:
        return [cheapest(r, lam) for r in reqs]

    def share(chosen: list[int]) -> float:
        return sum(chance(r)[t] for r, t in zip(reqs, chosen, strict=True)) / len(reqs)

    low, high = 0.0, 10.0
    if share(pick(high)) < goal:
        return pick(high)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if share(pick(mid)) < goal else (low, mid)
    return pick(high)


def best_static(reqs: Sequence[Request], of_opus: float) -> dict[str, int]:
    """Each feature's cheapest tier whose draws reach `of_opus` of opus's on it."""
    opus = len(TIERS) - 1
    static: dict[str, int] = {}
    for f in sorted({r.feature for r in reqs}):
        mine = [r for r in reqs if r.feature == f]
        best = sum(r.right[opus] for r in mine)
        static[f] = next(t for t in range(len(TIERS))
                         if sum(r.right[t] for r in mine) >= of_opus * best)  # fmt: skip
    return static


def oracles(reqs: Sequence[Request], drawn_goal: float, expected_goal: float) -> list[Outcome]:
    """The three oracles: by the draw at `drawn_goal` (a share the draws give), the other
    two at `expected_goal` (a share expected over the draws)."""

    def drawn(r: Request) -> tuple[float, ...]:
        return tuple(float(x) for x in r.right)

    def known(r: Request) -> tuple[float, ...]:
        return r.p_known

    def seen(r: Request) -> tuple[float, ...]:
        return r.p_seen

    return [
        score("oracle, by the draw", reqs, by_lambda(reqs, drawn, drawn_goal), drawn),
        score("oracle, by the difficulty", reqs, by_lambda(reqs, known, expected_goal), known),
        score("oracle, by what is observable", reqs, by_lambda(reqs, seen, expected_goal), seen),
    ]


def print_table(title: str, outcomes: Sequence[Outcome], opus_usd: float,
                static: Outcome) -> None:  # fmt: skip
    print(f"\n{title}")
    print("| router | cost | right (draws) | right (expected) | cheaper than naive opus "
          "| cheaper than best static called directly |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.name} | ${o.cost:.2f} | {o.right:.1%} | {o.expected:.1%} | "
              f"{1 - o.cost / opus_usd:.1%} | {1 - o.cost / static.cost:.1%} |")  # fmt: skip
    print("\nBy feature: cost, right share (draws), share of jobs on haiku/sonnet/opus")
    print("| feature | " + " | ".join(o.name for o in outcomes) + " |")
    print("|---|" + "---|" * len(outcomes))
    for f in outcomes[0].by_feature:
        cells = [f"${c:.2f} {r:.1%} {m}" for c, r, m in (o.by_feature[f] for o in outcomes)]
        print(f"| {f} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=2000, help="jobs in the trace (2000)")
    p.add_argument("--seed", type=int, default=7, help="the trace's and the truth's seed (7)")
    p.add_argument("--of-opus", type=float, default=0.95,
                   help="the share of naive opus's quality to reach (0.95)")  # fmt: skip
    p.add_argument("--levers", action="store_true",
                   help="bill each request about as tokenq's levers would: repeated support "
                   "questions free (response cache), system prompts at the cache-read price "
                   "(prompt caching, the first write ignored), the low priority at the batch "
                   "discount")  # fmt: skip
    a = p.parse_args(argv)
    reqs = requests(a.jobs, a.seed, a.levers)
    naive_reqs = requests(a.jobs, a.seed, False) if a.levers else reqs
    opus_tier = [len(TIERS) - 1] * len(reqs)
    opus = score("naive opus", naive_reqs, opus_tier, lambda r: r.p_known)
    chosen = best_static(naive_reqs, a.of_opus)
    static_tiers = [chosen[r.feature] for r in reqs]
    static = score("best static", reqs, static_tiers, lambda r: r.p_known)
    # The bench's best static calls the API directly: the saving is counted against that.
    direct = score("best static", naive_reqs, static_tiers, lambda r: r.p_known)
    pricing = "billed about as tokenq's levers would" if a.levers else "naive pricing"
    print(f"seed {a.seed}, {a.jobs} jobs, {pricing}; naive opus ${opus.cost:.2f} "
          f"{opus.right:.1%} right ({opus.expected:.1%} expected)")  # fmt: skip
    at_opus = oracles(reqs, a.of_opus * opus.right, a.of_opus * opus.expected)
    mine = score("opus", reqs, opus_tier, lambda r: r.p_known)
    print_table(f"At {a.of_opus:.0%} of opus's quality", [mine, static, *at_opus], opus.cost,
                direct)  # fmt: skip
    at_static = oracles(reqs, static.right, static.expected)
    print_table("At the best static config's quality", [static, *at_static], opus.cost, direct)


if __name__ == "__main__":
    main()
