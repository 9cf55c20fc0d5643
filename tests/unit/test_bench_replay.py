"""The replay bench's loop (bench/replay.py): the router's own price rule over a trace, each
answer counted --lag jobs after its decision."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the bench's modules are scripts' siblings, not a package
from oracle import Request  # noqa: E402
from replay import replay, ties  # noqa: E402

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


def test_ties_give_the_price_at_which_two_tiers_cost_the_same_and_what_a_swing_moves() -> None:
    # haiku $0.001 right half the time, sonnet $0.004 always, opus $0.02 always: haiku and
    # sonnet cost the same at $0.006 a wrong answer; opus never pays over sonnet.
    reqs = [Request("f", COST, (True, True, True), (0.5, 1, 1), (0.5, 1.0, 1.0))] * 10
    [k] = ties(reqs, ["k"] * 10)
    assert (k.feature, k.kind, k.jobs) == ("f", "k", 10)
    assert k.ties[0] == pytest.approx(0.006) and k.ties[1] is None
    assert k.ties[2] == pytest.approx(0.038)
    usd, answers = k.stake(0.0065) or (0.0, 0.0)
    assert usd == pytest.approx(0.03) and answers == pytest.approx(5.0)
    assert k.stake(0.02) is None  # no tie within a quarter of $0.02


def test_ties_are_per_feature_and_kind() -> None:
    a = Request("f", COST, (True,) * 3, (1.0,) * 3, (0.9, 0.95, 1.0))
    b = Request("g", COST, (True,) * 3, (1.0,) * 3, (0.5, 0.6, 0.7))
    rows = ties([a, b, a, b], ["x", "x", "y", "x"])
    assert [(k.feature, k.kind, k.jobs) for k in rows] == [("f", "x", 1), ("f", "y", 1),
                                                          ("g", "x", 2)]  # fmt: skip
    assert rows[2].passes == pytest.approx((0.5, 0.6, 0.7))
