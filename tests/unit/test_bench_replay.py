"""The replay bench's loop (bench/replay.py): the router's own price rule over a trace, each
answer counted --lag jobs after its decision."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the bench's modules are scripts' siblings, not a package
from oracle import Request  # noqa: E402
from replay import replay  # noqa: E402

from worker.config import AdaptiveConfig  # noqa: E402

COST = (0.001, 0.004, 0.02)  # haiku, sonnet, opus


def trace(rights: tuple[bool, bool, bool], jobs: int) -> list[Request]:
    return [Request("f", COST, rights, (0.5,) * 3, (0.5,) * 3) for _ in range(jobs)]


def test_it_learns_to_step_down_to_a_cheap_tier_that_is_always_right() -> None:
    run = replay(trace((True, True, True), 400), ["k"] * 400, AdaptiveConfig(), 0.1, 10, 1)
    assert run.right == 1.0
    assert run.tiers["haiku"] > 300, run.tiers
    billed = sum(COST[("haiku", "sonnet", "opus").index(t)] * n for t, n in run.tiers.items())
    assert abs(run.cost - billed) < 1e-9


def test_it_learns_to_pay_for_the_one_tier_that_is_right() -> None:
    run = replay(trace((False, False, True), 400), ["k"] * 400, AdaptiveConfig(), 0.1, 10, 1)
    assert run.tiers["opus"] > 300, run.tiers
    assert run.right == run.tiers["opus"] / 400


def test_an_answer_counts_only_after_the_lag() -> None:
    # With every answer counted only after the whole trace, nothing is learnt: the tiers are
    # drawn from their priors alone, so no tier takes nearly every job.
    run = replay(trace((False, False, True), 300), ["k"] * 300, AdaptiveConfig(), 0.1, 300, 1)
    assert max(run.tiers.values()) < 250, run.tiers
