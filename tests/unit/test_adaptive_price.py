"""The adaptive router's price rule (features.<f>.wrong_answer_usd, worker.adaptive
decide_by_price): the tier of least expected cost, exploration bounded by the counts, and its
config errors. The counting is the target rule's (tests/unit/test_adaptive.py)."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest

from tests.unit.test_adaptive import RAW, TIERS, Fleet, config_error
from worker.adaptive import Stats, TierStats, decide_by_price, job_cost_usd, route
from worker.config import AdaptiveConfig, Config, parse_config

# The job's cost per tier: haiku is twenty times cheaper than sonnet, opus twice sonnet.
COST = {"haiku": 0.0001, "sonnet": 0.002, "opus": 0.004}


def priced_config(wrong_usd: float = 0.01, **settings: Any) -> Config:
    """The repo's config with router.policy = "adaptive" and `summarize` priced: a wrong
    answer costs `wrong_usd`; `settings` go to [router.adaptive]."""
    raw = copy.deepcopy(RAW)
    raw["router"]["policy"] = "adaptive"
    raw["router"]["adaptive"].update(settings)
    raw["features"]["summarize"].pop("tier")
    raw["features"]["summarize"]["wrong_answer_usd"] = wrong_usd
    return parse_config(raw)


ADAPTIVE = priced_config().router.adaptive


def pick(
    stats: dict[str, TierStats], *, wrong_usd: float = 0.1, draw: float = 0.5,
    a: AdaptiveConfig = ADAPTIVE, where: str = "summarize/long",
) -> tuple[str, str, bool]:  # fmt: skip
    """decide_by_price() for one job (by default summarize/long, the repo's router.adaptive)."""
    return decide_by_price(TIERS, stats, wrong_usd=wrong_usd, cost_usd=COST, draw=draw, a=a,
                           where=where)  # fmt: skip


def decisions(
    stats: dict[str, TierStats], *, wrong_usd: float = 0.1, n: int = 2000,
    a: AdaptiveConfig = ADAPTIVE, where: str = "summarize/long",
) -> list[tuple[str, str, bool]]:  # fmt: skip
    """pick() for `n` jobs' draws, spread evenly over [0, 1)."""
    return [pick(stats, wrong_usd=wrong_usd, draw=(i + 0.5) / n, a=a, where=where)
            for i in range(n)]  # fmt: skip


def shares(
    stats: dict[str, TierStats], *, wrong_usd: float = 0.1, n: int = 2000,
    a: AdaptiveConfig = ADAPTIVE,
) -> Counter[str]:  # fmt: skip
    """How often each tier is picked over `n` jobs' draws."""
    return Counter(tier for tier, _, _ in decisions(stats, wrong_usd=wrong_usd, n=n, a=a))


def test_with_nothing_counted_every_tier_is_tried() -> None:
    tried = shares({})
    assert set(tried) == set(TIERS)
    assert all(count > 300 for count in tried.values())


def test_the_tier_of_least_expected_cost_answers_and_says_why() -> None:
    stats = {t: TierStats(1000, 0, 50, 0) for t in TIERS}
    tier, reason, explored = pick(stats)
    assert (tier, explored) == ("haiku", False)
    assert reason.startswith("adaptive: haiku passes 1.000 on summarize/long (n=1000): $0.0")
    assert reason.endswith(" a job with a wrong answer at $0.1, the least")
    assert shares(stats) == {"haiku": 2000}


def test_a_cheap_wrong_answer_buys_the_cheaper_tier_a_dear_one_does_not() -> None:
    # haiku is right 90% of the time, sonnet 99%: 9 more wrong answers in 100 cost 0.09 *
    # wrong_usd, against 0.0019 a job saved.
    stats = {"haiku": TierStats(900, 100, 90, 10), "sonnet": TierStats(990, 10, 99, 1),
             "opus": TierStats(999, 1, 99, 0)}  # fmt: skip
    assert shares(stats, wrong_usd=0.01)["haiku"] > 1990
    assert shares(stats, wrong_usd=0.1)["sonnet"] > 1950


def test_a_tier_failing_lately_loses_at_once() -> None:
    good = {t: TierStats(5000, 0, 20, 0) for t in TIERS}
    assert pick(good)[0] == "haiku"
    failing = {**good, "haiku": TierStats(5000, 0, 10, 10)}
    assert shares(failing)["haiku"] == 0


def test_a_tier_with_few_answers_is_explored_one_counted_worse_hardly_ever() -> None:
    opus = {"opus": TierStats(1000, 0, 50, 0)}
    # A wrong answer at $0.01: haiku is worth it if it passes 61% (sonnet 80%); 5 answers
    # cannot tell.
    few = shares(
        {**opus, "haiku": TierStats(4, 1, 4, 1), "sonnet": TierStats(5, 0, 5, 0)}, wrong_usd=0.01
    )
    assert few["haiku"] > 100 and few["sonnet"] > 100
    _, reason, explored = next(
        pick({**opus, "haiku": TierStats(3, 2, 3, 2)}, wrong_usd=0.01, draw=d / 100)
        for d in range(100)
        if pick({**opus, "haiku": TierStats(3, 2, 3, 2)}, wrong_usd=0.01, draw=d / 100)[0]
        == "haiku"
    )
    assert explored and reason.startswith("adaptive: exploring haiku on summarize/long (n=5), not")
    bad = {**opus, "haiku": TierStats(100, 100, 10, 10), "sonnet": TierStats(150, 50, 15, 5)}
    assert shares(bad)["opus"] == 2000


def test_a_step_down_doubt_starts_a_cold_kind_on_the_dearest_tier() -> None:
    # A wrong answer at $0.1, nothing counted: every tier starts even without a doubt; with
    # a doubt of 2 a step, haiku starts as if it had failed 4 times and sonnet twice, so opus
    # takes most jobs and the cheaper tiers are still tried.
    a = priced_config(step_down_doubt=2).router.adaptive
    n = 2000
    doubted = shares({}, wrong_usd=0.1, n=n, a=a)
    even = shares({}, wrong_usd=0.1)
    assert even["opus"] < 0.4 * n < 0.5 * n < doubted["opus"]
    assert doubted["haiku"] < even["haiku"] / 2
    assert doubted["haiku"] > 50 and doubted["sonnet"] > 50


def test_a_doubt_fades_as_a_tiers_answers_come_in() -> None:
    # Every tier right every time so far. With 5 answers each the doubt still weighs: opus
    # takes more jobs than without one; with min_samples (20) answers each it is gone, and
    # the draws are the same as without a doubt.
    a = priced_config(step_down_doubt=2).router.adaptive
    few = {t: TierStats(5, 0, 5, 0) for t in TIERS}
    assert shares(few, n=500, a=a)["opus"] > shares(few, n=500)["opus"] + 50
    proven = {t: TierStats(20, 0, 20, 0) for t in TIERS}
    assert shares(proven, n=500, a=a) == shares(proven, n=500)


def test_without_a_doubt_explore_share_does_not_apply() -> None:
    stats = {"haiku": TierStats(3, 2, 3, 2), "sonnet": TierStats(4, 0, 4, 0)}

    def picks(share: float) -> list[tuple[str, str, bool]]:
        a = priced_config(explore_share=share).router.adaptive
        return decisions(stats, wrong_usd=0.01, n=300, a=a)

    assert picks(0.0) == picks(0.5)


def test_with_a_doubt_the_tier_below_is_explored_and_the_reason_says_so() -> None:
    # Opus proven right, sonnet and haiku never tried: with explore_share 0.5, about half the
    # jobs that the draws send to opus go to sonnet instead, as explorations.
    a = priced_config(step_down_doubt=50, explore_share=0.5).router.adaptive
    opus = {"opus": TierStats(100, 0, 100, 0)}
    decided = decisions(opus, wrong_usd=0.1, n=400, a=a, where="x")
    floor = [d for d in decided if d[1].endswith("below opus until it has 20 answers")]
    assert 120 < len(floor) < 280
    assert all(t == "sonnet" and explored for t, _, explored in floor)
    assert (
        floor[0][1] == "adaptive: exploring sonnet on x (n=0), below opus until it has 20 answers"
    )


def test_with_a_step_down_doubt_it_still_steps_down_where_the_saving_is_small() -> None:
    # 100-token jobs save about $0.0004 on haiku against $0.01 a wrong answer: a doubt that
    # did not fade, or no exploration of the doubted tier, would keep them on opus.
    fleet = Fleet(
        priced_config(step_down_doubt=2), {"haiku": 0.997, "sonnet": 0.998, "opus": 0.999}
    )
    first = [d.tier for d in fleet.run(20)]
    assert first.count("opus") > first.count("haiku")
    fleet.run(1000)
    settled = [d.tier for d in fleet.run(500)]
    assert settled.count("haiku") / len(settled) > 0.98


def test_the_job_cost_is_its_input_at_each_tiers_input_price() -> None:
    cfg = priced_config()
    cost = job_cost_usd(cfg, 1_000_000)
    assert cost == {t: cfg.models[m].input_usd_per_mtok for t, m in cfg.tiers.items()}


def test_converges_to_the_cheap_tier_that_is_good_enough_within_500_jobs() -> None:
    fleet = Fleet(priced_config(), {"haiku": 0.997, "sonnet": 0.998, "opus": 0.999})
    fleet.run(500)
    settled = [d.tier for d in fleet.run(500)]
    assert settled.count("haiku") / len(settled) > 0.98


def test_stays_on_sonnet_when_haikus_wrong_answers_cost_more_than_it_saves() -> None:
    # A job of 100 input tokens saves $0.00019 on haiku; 15% wrong at $0.01 costs $0.0015.
    fleet = Fleet(priced_config(), {"haiku": 0.85, "sonnet": 0.995, "opus": 0.999})
    fleet.run(2000)
    last = [d.tier for d in fleet.run(1000)]
    assert last.count("sonnet") / len(last) > 0.98
    assert last.count("haiku") / len(last) < 0.005  # counted worse: hardly tried


def test_steps_up_at_once_when_the_tier_in_use_gets_worse() -> None:
    fleet = Fleet(priced_config(), {"haiku": 0.997, "sonnet": 0.998, "opus": 0.999})
    fleet.run(1000)
    fleet.pass_rates["haiku"] = 0.7
    after = fleet.run(60)
    first_up = next(n for n, d in enumerate(after) if not d.explored and d.tier != "haiku")
    assert first_up <= 30, f"still on haiku {first_up} jobs after the drop"
    later = [d.tier for d in after[first_up:]]
    assert later.count("haiku") / len(later) < 0.1


def test_route_uses_the_price_rule_for_a_priced_feature() -> None:
    cfg = priced_config(explore_share=0.0)
    decision = route(cfg, "summarize", 100, Stats(), "j")
    assert decision.kind == "short"
    assert decision.reason.startswith("adaptive: exploring ")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"features/summarize/wrong_answer_usd": 0.05},
            "features.summarize.wrong_answer_usd has no effect: features.summarize.tier = "
            "'haiku' fixes the tier",
        ),
        (
            {
                "features/code_review/wrong_answer_usd": 0.05,
                "features/code_review/target_pass_rate": 0.9,
            },
            "features.code_review sets both target_pass_rate and wrong_answer_usd",
        ),
        (
            {"features/code_review/wrong_answer_usd": 0},
            "features.code_review.wrong_answer_usd = 0 is not allowed: Expected `float` > 0",
        ),
        (
            {"router/policy": "adaptive"},
            "no feature sets target_pass_rate or wrong_answer_usd",
        ),
        (
            {"router/adaptive/step_down_doubt": -1},
            "router.adaptive.step_down_doubt = -1 is not allowed: Expected `float` >= 0",
        ),
    ],
)
def test_bad_price_settings_name_the_key_and_what_to_do(
    change: dict[str, Any], expected: str
) -> None:
    assert expected in config_error(change)
