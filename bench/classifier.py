#!/usr/bin/env python3
"""The router classifier's view: how often the tier it would name, judging only what tokenq
shows it, is the right tier for the whole request, on the reference workload.

    .venv/bin/python bench/classifier.py [--jobs 2000] [--seed 7] [--max-chars 4000]
    (or: python3 dev.py bench classifier)

No servers: the simulator's ground truth (simulator/truth.py, its default settings and
--seed) is asked directly. For every job of the trace (bench/workloads/make_workload.py) the
right tier is the cheapest whose skill gives the request's difficulty a p_correct of at least
0.9 (truth.right_tier). The simulator's classifier names, at its accuracy, the right tier *for
the text it is shown*; so the share of jobs where that tier is the request's own right tier
is the best any classifier can do with that view. Two views are compared:
  - head: the request's text cut to router.classifier.max_chars (tokenq before: a long system
    prompt fills the view, and the question is never seen);
  - question: worker.router.classifier_text (the text when it fits, else the opening of the
    text and then the last user turn).
The simulator judges a text's kind by its first 100 characters and its length within the
kind's range, so neither view sees a long request's length: the figures say how much the
question adds, not how good a classifier can be.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from common import ROOT, workload

from simulator.truth import (
    DEFAULT_SKILLS,
    Quality,
    _text_key,
    difficulty_of,
    judge,
    kind_of,
    right_tier,
)
from worker.config import load_config
from worker.router import classifier_text, request_text, tier_order


def right_for(text: str, tiers: list[str], q: Quality) -> int:
    """The right tier for a text, as the simulator's classifier judges what it is shown."""
    key = _text_key(text)
    return right_tier(tiers, q.skills, difficulty_of(text, kind_of(text), q.signal, key))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-chars", type=int, default=4000)
    a = p.parse_args(argv)
    cfg = load_config(ROOT / "config.toml")
    tiers = tier_order(cfg)
    q = Quality(mode="on", seed=a.seed, skills=dict(DEFAULT_SKILLS))
    model = cfg.tiers[tiers[0]]
    agree: dict[str, Counter[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trace = workload(Path(tmp), a.jobs, a.seed)
    for job in trace:
        request = job["request"]
        own = right_tier(tiers, q.skills, judge(request, model, q).grade.difficulty)
        views = {
            "head": request_text(request)[: a.max_chars],
            "question": classifier_text(request, a.max_chars),
        }
        seen = agree.setdefault(job["feature"], Counter())
        seen["jobs"] += 1
        for name, text in views.items():
            seen[name] += right_for(text, tiers, q) == own
    print(f"reference workload --jobs {a.jobs} --seed {a.seed}; max_chars {a.max_chars}: the "
          "share of jobs whose right tier a perfect classifier names from each view")  # fmt: skip
    print(f"{'feature':<16} {'jobs':>5} {'head':>7} {'question':>9}")
    total: Counter[str] = Counter()
    for feature, seen in agree.items():
        total.update(seen)
        n = seen["jobs"]
        print(f"{feature:<16} {n:>5} {seen['head'] / n:>7.1%} {seen['question'] / n:>9.1%}")
    n = total["jobs"]
    print(f"{'all':<16} {n:>5} {total['head'] / n:>7.1%} {total['question'] / n:>9.1%}")


if __name__ == "__main__":
    main()
