#!/usr/bin/env python3
"""Many cold runs of the adaptive router's price rule in seconds: the reference trace replayed
offline through the router's own decision, to show the spread that one run of bench/cost.py
cannot.

    .venv/bin/python bench/replay.py [--seed 7] [--wrong-usd 0.035] [--step-down-doubt 0]
                                     [--runs 20] [--lag 100]
    .venv/bin/python bench/replay.py --ties [--seed 7] [--wrong-usd 0.035]
    (or: python3 dev.py bench replay ...)

One run of bench/cost.py's adaptive arm is one draw: the router's Thompson sampling and the
order in which its worker processes learn make every run differ (two runs of one seed differ
by points, README: The price rule). This replays the same trace --runs times, each with other
draws, and counts how many runs meet the two targets (README: The price rule).

Each request is billed and graded on every tier offline, as bench/oracle.py does with
--levers (the simulator's own functions: repeated support questions free, system prompts at
the cache-read price, the low priority at the batch discount). Then, job by job in the
trace's order:
- its kind is worker.adaptive.signal_kind of its messages (bench/cost.py's adaptive config:
  kinds by signals, no hard words);
- its tier is what worker.adaptive.decide_by_price picks from the counts so far, with
  bench/cost.py's router.adaptive settings, the job's cost on each tier as its estimate,
  every feature's wrong_answer_usd --wrong-usd and router.adaptive.step_down_doubt
  --step-down-doubt;
- its answer's grade is counted for that tier, as a producer's verdict on every job (the
  bench's --feedback 1.0), --lag jobs later (the answers in flight: bench/cost.py runs two
  processes with 32 jobs each, and a process reuses the counts it read for a second).
Left out, so the figures are the router's alone: escalation of answers that fail their JSON
check (it adds quality to classify_ticket in bench/cost.py), the counts' decay (a trace lasts
under a minute), the recent counts (taken equal to the evidence), and the price estimate's
error (here the job's exact cost).

With --ties it replays nothing and shows why runs differ: per feature and kind, its jobs,
each tier's mean cost and expected pass rate (knowing the observable score, as the oracle
"by what is observable" does) and the price of a wrong answer at which two tiers cost the
same. At that price the rule has nothing to choose between them, so how a kind's jobs split
between the two is left to the draws, and it moves a run's cost and quality along the line
of equal cost at that price: a kind whose tie lies near --wrong-usd is marked.

Against naive opus and the best static config (each feature on the cheapest tier within 95%
of opus's quality on it), both called directly without tokenq's levers, as bench/cost.py
compares them. Prints one line a run, then the share of runs that meet each target and the
spread of the figures; the last line is the headline.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import oracle  # bench/oracle.py: the trace billed and graded offline
from common import ROOT, say, workload
from cost import adaptive_settings, without

from worker import adaptive
from worker.config import AdaptiveConfig, load_config, with_settings
from worker.router import messages_text

TIERS = list(oracle.TIERS)


@dataclass(frozen=True)
class Run:
    """One replay: what it cost, its share of right answers, its jobs per tier."""

    cost: float
    right: float
    tiers: dict[str, int]


def replay(
    reqs: Sequence[oracle.Request], kinds: Sequence[str], a: AdaptiveConfig, wrong_usd: float,
    lag: int, seed: int,
) -> Run:  # fmt: skip
    """One cold run of the price rule over the trace (see the module docstring)."""
    rng = random.Random(seed)
    counts: dict[tuple[str, str, str], list[float]] = {}
    pending: collections.deque[tuple[int, tuple[str, str, str], bool]] = collections.deque()
    cost = right = 0.0
    used = dict.fromkeys(TIERS, 0)
    for n, (r, kind) in enumerate(zip(reqs, kinds, strict=True)):
        while pending and pending[0][0] <= n:
            _, key, ok = pending.popleft()
            counts.setdefault(key, [0.0, 0.0])[0 if ok else 1] += 1
        stats = {}
        for t in TIERS:
            passed, failed = counts.get((r.feature, kind, t), (0.0, 0.0))
            stats[t] = adaptive.TierStats(passed, failed, passed, failed)
        tier, _, _ = adaptive.decide_by_price(
            TIERS, stats, wrong_usd=wrong_usd, cost_usd=dict(zip(TIERS, r.cost, strict=True)),
            draw=rng.random(), a=a, where=f"{r.feature}/{kind}",
        )  # fmt: skip
        i = TIERS.index(tier)
        cost += r.cost[i]
        right += r.right[i]
        used[tier] += 1
        pending.append((n + lag, (r.feature, kind, tier), r.right[i]))
    return Run(cost, right / len(reqs), used)


NEAR = 0.25  # a tie within this share of --wrong-usd is "near"
PAIRS = ((0, 1), (1, 2), (0, 2))  # haiku-sonnet, sonnet-opus, haiku-opus


@dataclass(frozen=True)
class KindTies:
    """One feature's kind: its jobs, per tier the mean cost and expected pass rate, and per
    pair of tiers (PAIRS) the price of a wrong answer at which both cost the same (None: the
    dearer tier is not expected to pass more, so it never pays)."""

    feature: str
    kind: str
    jobs: int
    cost: tuple[float, ...]
    passes: tuple[float, ...]
    ties: tuple[float | None, ...]

    def stake(self, wrong_usd: float) -> tuple[float, float] | None:
        """For the pair whose tie is nearest `wrong_usd`, if within NEAR of it: the dollars
        and the right answers that move when all the kind's jobs go from one to the other."""
        near = [
            (abs(t - wrong_usd), pair)
            for t, pair in zip(self.ties, PAIRS, strict=True)
            if t is not None and abs(t - wrong_usd) <= NEAR * wrong_usd
        ]
        if not near:
            return None
        a, b = min(near)[1]
        return (
            self.jobs * (self.cost[b] - self.cost[a]),
            self.jobs * (self.passes[b] - self.passes[a]),
        )


def ties(reqs: Sequence[oracle.Request], kinds: Sequence[str]) -> list[KindTies]:
    """Per feature and kind (sorted), where two tiers cost the same (see the docstring)."""
    groups: dict[tuple[str, str], list[oracle.Request]] = {}
    for r, kind in zip(reqs, kinds, strict=True):
        groups.setdefault((r.feature, kind), []).append(r)
    out = []
    for (feature, kind), rs in sorted(groups.items()):
        cost = tuple(sum(r.cost[t] for r in rs) / len(rs) for t in range(len(TIERS)))
        passes = tuple(sum(r.p_seen[t] for r in rs) / len(rs) for t in range(len(TIERS)))
        even = tuple(
            (cost[b] - cost[a]) / (passes[b] - passes[a]) if passes[b] > passes[a] else None
            for a, b in PAIRS
        )
        out.append(KindTies(feature, kind, len(rs), cost, passes, even))
    return out


def print_ties(rows: Sequence[KindTies], wrong_usd: float, opus_usd: float) -> None:
    """The --ties table, then what the kinds near a tie at `wrong_usd` leave to the draws,
    against naive opus's cost `opus_usd`."""
    print("| feature | kind | jobs | cost haiku / sonnet / opus | expected pass rate "
          "| equal at (haiku = sonnet, sonnet = opus, haiku = opus) "
          f"| near ${wrong_usd:g}: a full swing moves |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for k in rows:
        even = ", ".join("never" if t is None else f"${t:.3f}" for t in k.ties)
        stake = k.stake(wrong_usd)
        moves = "" if stake is None else f"${stake[0]:.2f}, {stake[1]:.1f} right answers"
        print(f"| {k.feature} | {k.kind} | {k.jobs} | "
              + " / ".join(f"${c:.4f}" for c in k.cost) + " | "
              + " / ".join(f"{p:.3f}" for p in k.passes) + f" | {even} | {moves} |")  # fmt: skip
    stakes = [stake for k in rows if (stake := k.stake(wrong_usd)) is not None]
    usd, answers = sum(u for u, _ in stakes), sum(n for _, n in stakes)
    jobs = sum(k.jobs for k in rows)
    print(f"at ${wrong_usd:g} a wrong answer, the kinds near a tie leave to the draws up to "
          f"${usd:.2f} ({usd / opus_usd:.1%} of naive opus's cost) and {answers:.0f} right "
          f"answers ({answers / jobs:.1%} of the jobs)")  # fmt: skip


def spread(values: Sequence[float]) -> str:
    """The median and the range of a figure over the runs."""
    return f"{statistics.median(values):.1%} ({min(values):.1%} to {max(values):.1%})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
    )  # fmt: skip
    p.add_argument("--jobs", type=int, default=2000, help="jobs in the trace (2000)")
    p.add_argument("--seed", type=int, default=7, help="the trace's and the truth's seed (7)")
    p.add_argument("--wrong-usd", type=float, default=0.035,
                   help="every feature's wrong_answer_usd (0.035)")  # fmt: skip
    p.add_argument("--step-down-doubt", type=float, default=0.0,
                   help="router.adaptive.step_down_doubt (0)")  # fmt: skip
    p.add_argument("--ties", action="store_true",
                   help="replay nothing: where two tiers cost the same (see above)")  # fmt: skip
    p.add_argument("--runs", type=int, default=20, help="cold runs, each with its own draws (20)")
    p.add_argument("--lag", type=int, default=100,
                   help="jobs decided before an answer is counted (100)")  # fmt: skip
    a = p.parse_args(argv)
    if a.runs < 1 or a.jobs < 1 or a.lag < 0 or a.wrong_usd < 0 or a.step_down_doubt < 0:
        p.error(
            "--runs and --jobs must be at least 1; --lag, --wrong-usd and --step-down-doubt "
            "at least 0"
        )
    base = load_config(ROOT / "config.toml")
    # explore_share 0.1: with a doubt, the share of jobs that try the tier below
    settings = adaptive_settings(base, 0.95, 0.1, a.wrong_usd, a.step_down_doubt)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "replay.toml"
        text = without((ROOT / "config.toml").read_text(), "tier")  # routed, as bench/cost.py
        path.write_text(with_settings(text, settings))
        cfg = load_config(path)
        say(f"billing and grading {a.jobs} requests on every tier (seed {a.seed})")
        reqs = oracle.requests(a.jobs, a.seed, True)
        naive = oracle.requests(a.jobs, a.seed, False)
        trace = workload(Path(tmp), a.jobs, a.seed)
    kinds = [adaptive.signal_kind(messages_text(job["request"]), []) for job in trace]
    opus = oracle.score("naive opus", naive, [len(TIERS) - 1] * len(naive), lambda r: r.p_known)
    opus_usd, opus_right = opus.cost, opus.right
    if a.ties:
        print(f"seed {a.seed}, {a.jobs} jobs: where two tiers cost the same")
        print_ties(ties(reqs, kinds), a.wrong_usd, opus_usd)
        return
    chosen = oracle.best_static(naive, 0.95)
    static = oracle.score("best static", naive, [chosen[r.feature] for r in naive],
                          lambda r: r.p_known)  # fmt: skip
    static_usd, static_right = static.cost, static.right
    print(f"seed {a.seed}, {a.jobs} jobs, wrong_answer_usd ${a.wrong_usd:g}, step_down_doubt "
          f"{a.step_down_doubt:g}, lag {a.lag}: "
          f"naive opus ${opus_usd:.2f} at {opus_right:.1%} right; best static "
          f"${static_usd:.2f} at {static_right:.1%}")  # fmt: skip
    runs: list[Run] = []
    for n in range(a.runs):
        run = replay(reqs, kinds, cfg.router.adaptive, a.wrong_usd, a.lag, n)
        runs.append(run)
        mix = ", ".join(f"{t} {k}" for t, k in run.tiers.items())
        print(f"run {n + 1:>3}: ${run.cost:.2f} at {run.right:.1%} right: "
              f"{1 - run.cost / opus_usd:.1%} cheaper than opus at "
              f"{run.right / opus_right:.1%} of its quality, {1 - run.cost / static_usd:.1%} "
              f"cheaper than best static; {mix}")  # fmt: skip
        say(f"run {n + 1} of {a.runs} done")
    first = sum(1 - r.cost / opus_usd >= 0.85 and r.right >= 0.95 * opus_right for r in runs)
    second = sum(1 - r.cost / static_usd >= 0.30 and r.right >= static_right for r in runs)
    off_opus = [1 - r.cost / opus_usd for r in runs]
    of_quality = [r.right / opus_right for r in runs]
    off_static = [1 - r.cost / static_usd for r in runs]
    print(f"cheaper than naive opus: {spread(off_opus)}; at {spread(of_quality)} of its quality")
    print(f"cheaper than best static: {spread(off_static)}; right "
          f"{spread([r.right for r in runs])} against its {static_right:.1%}")  # fmt: skip
    print(f"seed {a.seed}, ${a.wrong_usd:g}, doubt {a.step_down_doubt:g}: of {len(runs)} cold "
          f"runs, {first} meet >= 85% cheaper than naive opus at >= 95% of its quality, "
          f"{second} meet >= 30% cheaper than best static at equal or better quality")  # fmt: skip


if __name__ == "__main__":
    main()
