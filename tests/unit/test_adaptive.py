"""The adaptive router's decision (worker.adaptive) on synthetic outcome streams, and the
config errors of its keys. Redis is stood in for by MemoryTx, which applies the commands
record_into and verdict_into queue; tests/integration/test_adaptive.py runs them on Valkey."""

from __future__ import annotations

import copy
import random
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest

from worker import adaptive, checks
from worker.adaptive import (
    Answered,
    Decision,
    TierStats,
    bounds,
    decide,
    draw_of,
    kind_of,
    record_into,
    route,
    tally,
)
from worker.config import Config, parse_config
from worker.contract import Keys
from worker.errors import ConfigError
from worker.feedback import revise, verdict_into

ROOT = Path(__file__).resolve().parents[2]
RAW: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())
KEYS = Keys("t")
T0 = 1_800_000_000_000  # ms


def adaptive_config(**settings: Any) -> Config:
    """The repo's config with router.policy = "adaptive" and `summarize` learning its tier
    (target 0.98); `settings` go to [router.adaptive]."""
    raw = copy.deepcopy(RAW)
    raw["router"]["policy"] = "adaptive"
    raw["router"]["adaptive"].update(settings)
    raw["features"]["summarize"].pop("tier")
    raw["features"]["summarize"]["target_pass_rate"] = 0.98
    return parse_config(raw)


def config_error(change: dict[str, Any]) -> str:
    """The error of the repo's config with `change` made ("a/b/c" key paths: values)."""
    raw = copy.deepcopy(RAW)
    for path, value in change.items():
        *parents, last = path.split("/")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    return str(err.value)


class MemoryTx:
    """The commands record_into and verdict_into queue (HINCRBYFLOAT, EXPIRE, SET), applied
    to dicts at once."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.strings: dict[str, bytes] = {}
        self.in_use: dict[str, str] = {}

    def hincrbyfloat(self, key: str, field: str, by: float) -> None:
        self.hashes[key][field] += by

    def hset(self, key: str, field: str, value: str) -> None:
        self.in_use[field] = value

    def expire(self, key: str, seconds: int) -> None:
        assert seconds > 0

    def set(self, key: str, value: bytes, ex: int | None = None) -> None:
        self.strings[key] = value

    def stats(self, cfg: Config, feature: str, now_ms: int) -> adaptive.Stats:
        """What read_stats would return: the hashes the read plan names, tallied."""
        plan = adaptive._plan(cfg.router.adaptive, now_ms)
        held = {(h, e): self.hashes.get(KEYS.outcomes(feature, h, e), {}) for h, e in plan}
        found = {at: {k: str(v) for k, v in fields.items()} for at, fields in held.items()}
        return tally(cfg.router.adaptive, now_ms, found, self.in_use)


class Fleet:
    """Jobs of `summarize` (input 100 tokens: kind `short`) routed adaptively one after the
    other, `gap_ms` apart. Each tier's answer passes its check with a set probability; an
    answer that fails escalates once to the next dearer tier, as the worker does."""

    def __init__(self, cfg: Config, pass_rates: dict[str, float], gap_ms: int = 1000) -> None:
        self.cfg, self.pass_rates, self.gap_ms = cfg, dict(pass_rates), gap_ms
        self.rng = random.Random(14)
        self.tx = MemoryTx()
        self.now_ms, self.n = T0, 0
        self.decisions: list[Decision] = []

    def job(self) -> Decision:
        self.n += 1
        job_id = f"job-{self.n}"
        stats = self.tx.stats(self.cfg, "summarize", self.now_ms)
        decision = route(self.cfg, "summarize", 100, stats, job_id)
        tiers = list(self.cfg.tiers)
        tier = decision.tier
        answers = [(tier, self._answer(tier))]
        if answers[0][1] is not None and tier != tiers[-1]:
            tier = tiers[tiers.index(tier) + 1]
            answers.append((tier, self._answer(tier)))
        record_into(self.tx, KEYS, self.cfg, feature="summarize", kind=decision.kind,
                    job_id=job_id, answers=answers, now_ms=self.now_ms,
                    in_use=decision.in_use)  # fmt: skip
        self.now_ms += self.gap_ms
        self.decisions.append(decision)
        return decision

    def run(self, n: int) -> list[Decision]:
        return [self.job() for _ in range(n)]

    def _answer(self, tier: str) -> str | None:
        return None if self.rng.random() < self.pass_rates[tier] else "answer is not JSON"


TIERS = ["haiku", "sonnet", "opus"]


def pick(stats: dict[str, TierStats], *, in_use: str | None = None, draw: float = 0.5,
         target: float = 0.98, **settings: Any) -> tuple[str, str, bool]:  # fmt: skip
    """decide() for summarize/long with the default tier as start."""
    a = adaptive_config(**{"explore_share": 0.0, **settings}).router.adaptive
    return decide(TIERS, stats, target=target, start="sonnet", in_use=in_use, draw=draw, a=a,
                  where="summarize/long")  # fmt: skip


def chosen(decisions: list[Decision]) -> list[str]:
    """The tiers of the decisions that were not exploring."""
    return [d.tier for d in decisions if not d.explored]


def test_wilson_bounds_match_the_textbook() -> None:
    low, high = bounds(90, 100, 1.959964)
    assert (round(low, 4), round(high, 4)) == (0.8256, 0.9448)
    assert bounds(0, 0, 1.28) == (0.0, 1.0)
    assert bounds(80, 80, 1.2816)[0] == pytest.approx(80 / (80 + 1.2816**2))


def test_kinds_are_input_length_bands() -> None:
    a = adaptive_config().router.adaptive
    assert [kind_of(a, n) for n in (-1, 0, 499, 500, 1999, 2000, 10**6)] == [
        "short", "short", "short", "medium", "medium", "long", "long",
    ]  # fmt: skip


def test_the_cut_reason_is_the_checks_one() -> None:
    assert adaptive.CUT == checks.CUT


def test_with_nothing_proven_the_default_tier_answers() -> None:
    cfg = adaptive_config(explore_share=0.0)
    decision = route(cfg, "summarize", 100, adaptive.Stats(), "job-1")
    assert decision == Decision("sonnet", "short", "adaptive: no tier proven on summarize/short "
                                "yet; sonnet", in_use="sonnet")  # fmt: skip


def test_the_cheapest_proven_tier_answers_and_says_why() -> None:
    stats = {"haiku": TierStats(995, 5, 50, 0), "sonnet": TierStats(1000, 0, 50, 0)}
    assert pick(stats) == (
        "haiku", "adaptive: haiku passes 0.995 on summarize/long (n=1000, target 0.98)", False,
    )  # fmt: skip


def test_too_few_answers_prove_nothing_however_good() -> None:
    stats = {"haiku": TierStats(49, 0, 49, 0)}
    assert pick(stats, target=0.5, min_samples=50)[0] == "sonnet"
    assert pick(stats, target=0.5, min_samples=49)[0] == "haiku"


def test_a_start_tier_proven_bad_is_stepped_over() -> None:
    tier, reason, _ = pick({"sonnet": TierStats(70, 30, 7, 3)})
    assert tier == "opus"
    assert reason == "adaptive: sonnet passes 0.700 of 100, under 0.98 on summarize/long; opus"
    tier, reason, _ = pick({t: TierStats(70, 30, 7, 3) for t in TIERS})
    assert tier == "opus" and reason.endswith("; opus, the dearest")


def test_the_tier_in_use_stays_until_proven_bad_a_new_one_must_prove_itself() -> None:
    # Good, but one failure short of proof: kept while in use, not taken up otherwise.
    almost = {"haiku": TierStats(190, 2, 80, 1), "sonnet": TierStats(1000, 0, 50, 0)}
    assert pick(almost, in_use="haiku")[:2] == (
        "haiku", "adaptive: haiku passes 0.990 on summarize/long (n=192, in use, target 0.98)",
    )  # fmt: skip
    assert pick(almost, in_use="sonnet")[0] == "sonnet"
    failing = {"haiku": TierStats(900, 20, 40, 10), "sonnet": TierStats(1000, 0, 50, 0)}
    assert pick(failing, in_use="haiku") == (
        "sonnet",
        "adaptive: sonnet passes 1.000 on summarize/long (n=1000, target 0.98); "
        "haiku passes 0.800 of 50 lately",
        False,
    )


def test_a_tier_failing_lately_is_not_taken_up_on_old_evidence() -> None:
    # Thousands of old passes, then failures: too few lately to prove it bad, enough to bar it.
    stats = {"haiku": TierStats(5000, 10, 3, 1), "sonnet": TierStats(1000, 0, 50, 0)}
    assert pick(stats, in_use="sonnet")[0] == "sonnet"
    faded = TierStats(5000, 10, 0.05, 0.04)  # a tenth of an answer's worth lately: too little
    assert pick({**stats, "haiku": faded}, in_use="sonnet")[0] == "haiku"


def test_explores_one_tier_cheaper_at_the_configured_share() -> None:
    cfg = adaptive_config(explore_share=0.1)
    stats = adaptive.Stats({("short", "sonnet"): TierStats(1000, 0, 100, 0)}, {"short": "sonnet"})
    decisions = [route(cfg, "summarize", 100, stats, f"job-{n}") for n in range(20_000)]
    explored = [d for d in decisions if d.explored]
    assert 0.09 < len(explored) / len(decisions) < 0.11
    assert {d.tier for d in explored} == {"haiku"}
    assert {d.tier for d in decisions if not d.explored} == {"sonnet"}
    assert explored[0].reason == "adaptive: exploring haiku on summarize/short (n=0), not sonnet"
    # The draw is the job's: a retry of the same job decides the same way.
    assert [route(cfg, "summarize", 100, stats, f"job-{n}") for n in range(100)] == (
        decisions[:100]
    )
    assert draw_of("job-1") == draw_of("job-1") != draw_of("job-2")


def test_no_exploration_below_the_cheapest_tier() -> None:
    stats = {"haiku": TierStats(1000, 0, 100, 0)}
    assert pick(stats, draw=0.0, explore_share=0.5) == (
        "haiku", "adaptive: haiku passes 1.000 on summarize/long (n=1000, target 0.98)", False,
    )  # fmt: skip


def test_converges_to_the_cheapest_adequate_tier_within_2000_jobs() -> None:
    # haiku is good enough; the router starts on sonnet (router.default_tier) and has to
    # find that out through its 5% exploration.
    fleet = Fleet(adaptive_config(), {"haiku": 0.997, "sonnet": 0.998, "opus": 0.999})
    first = fleet.run(2000)
    assert chosen(first[:100]) == ["sonnet"] * len(chosen(first[:100]))
    settled = chosen(fleet.run(500))
    assert settled.count("haiku") / len(settled) > 0.99
    assert fleet.decisions[-1].reason.startswith("adaptive: haiku passes 0.99")


def test_stays_on_the_adequate_tier_when_the_cheaper_one_is_not() -> None:
    fleet = Fleet(adaptive_config(), {"haiku": 0.85, "sonnet": 0.995, "opus": 0.999})
    fleet.run(2000)
    last = fleet.run(1000)
    assert chosen(last) == ["sonnet"] * len(chosen(last))
    assert 0.03 < sum(d.explored for d in last) / len(last) < 0.07  # still tried now and then
    assert last[-1].reason.startswith("adaptive: sonnet passes 0.99")


def test_steps_up_at_once_when_the_tier_in_use_gets_worse() -> None:
    fleet = Fleet(adaptive_config(), {"haiku": 0.997, "sonnet": 0.998, "opus": 0.999})
    fleet.run(2500)
    assert chosen(fleet.run(50)) == ["haiku"] * len(chosen(fleet.decisions[-50:]))
    fleet.pass_rates["haiku"] = 0.7  # the model got worse
    after = fleet.run(60)
    first_up = next(n for n, d in enumerate(after) if not d.explored and d.tier != "haiku")
    # A job a second: within half the recent half-life (60 s), and for good.
    assert first_up <= 30, f"still on haiku {first_up} jobs after the drop"
    assert chosen(after[first_up:]) == ["sonnet"] * len(chosen(after[first_up:]))
    assert "haiku passes" in after[first_up].reason and "lately" in after[first_up].reason


def test_feedback_turns_passes_into_failures_and_the_router_steps_up() -> None:
    # A text feature: every answer passes its check, so only producers can tell bad ones.
    cfg = adaptive_config()
    fleet = Fleet(cfg, {"haiku": 1.0, "sonnet": 1.0, "opus": 1.0})
    fleet.run(2500)
    assert fleet.decisions[-1].tier == "haiku"
    haiku_jobs = [f"job-{n}" for n, d in enumerate(fleet.decisions, 1) if d.tier == "haiku"]
    for job_id in haiku_jobs[-20:]:  # producers say the last 20 haiku answers were bad
        key = KEYS.answered(job_id)
        record = msgspec.json.decode(fleet.tx.strings[key], type=Answered)
        revised = revise(record, "bad", "wrong", fleet.now_ms)
        verdict_into(fleet.tx, KEYS, cfg.router.adaptive, record, revised, fleet.now_ms)
    decision = fleet.job()
    assert (decision.tier, decision.explored) == ("sonnet", False)


def test_a_verdict_revises_what_the_record_holds() -> None:
    passed = Answered("f", "short", "haiku", "p", "p", T0)
    bad = revise(passed, "bad", "x" * 500, T0 + 5)
    assert (bad.held, bad.at_ms, bad.verdict, len(bad.reason)) == ("f", T0 + 5, "bad", 200)
    assert revise(bad, "good", "", T0 + 9).held == "p"
    assert revise(bad, "bad", "", T0 + 9) == msgspec.structs.replace(bad, reason="")
    failed = Answered("f", "short", "haiku", "f", "f", T0)
    assert revise(failed, "good", "", T0 + 5).held == "p"  # a producer overrules the check
    cached = Answered("f", "short", "haiku", "", "", T0)
    assert revise(cached, "good", "", T0 + 5).held == ""  # counted when it was first written
    assert revise(cached, "bad", "", T0 + 5).held == "f"


def test_taking_back_a_mark_restores_the_counts() -> None:
    cfg = adaptive_config()
    tx = MemoryTx()
    record_into(tx, KEYS, cfg, feature="summarize", kind="short", job_id="j",
                answers=[("haiku", None)], now_ms=T0)  # fmt: skip
    record = msgspec.json.decode(tx.strings[KEYS.answered("j")], type=Answered)
    later = T0 + 600_000
    bad = revise(record, "bad", "", later)
    verdict_into(tx, KEYS, cfg.router.adaptive, record, bad, later)
    [(_, stats)] = tx.stats(cfg, "summarize", later).counts.items()
    assert stats.passed == pytest.approx(0.0, abs=1e-9)
    assert stats.failed == pytest.approx(1.0)  # counted from the verdict's time
    good = revise(bad, "good", "", later)
    verdict_into(tx, KEYS, cfg.router.adaptive, bad, good, later)
    [(_, stats)] = tx.stats(cfg, "summarize", later).counts.items()
    assert stats.passed == pytest.approx(1.0)
    assert stats.failed == pytest.approx(0.0, abs=1e-9)


def test_counts_halve_every_half_life_across_epochs() -> None:
    cfg = adaptive_config(half_life_s=60, recent_half_life_s=10)
    tx = MemoryTx()
    for n in range(3):  # the third lands in the next epoch of the recent counts (16 x 10 s)
        record_into(tx, KEYS, cfg, feature="summarize", kind="short", job_id=f"j{n}",
                    answers=[("haiku", None)], now_ms=T0 + n * 80_000)  # fmt: skip
    now = T0 + 160_000
    [(_, stats)] = tx.stats(cfg, "summarize", now).counts.items()
    ages_s = (160, 80, 0)
    assert stats.passed == pytest.approx(sum(0.5 ** (age / 60) for age in ages_s))
    assert stats.recent_passed == pytest.approx(sum(0.5 ** (age / 10) for age in ages_s))


def test_cut_answers_are_not_counted_and_cache_hits_only_get_a_record() -> None:
    cfg = adaptive_config()
    tx = MemoryTx()
    record_into(tx, KEYS, cfg, feature="summarize", kind="short", job_id="cut",
                answers=[("haiku", checks.CUT), ("sonnet", None)], now_ms=T0)  # fmt: skip
    record_into(tx, KEYS, cfg, feature="summarize", kind="short", job_id="hit",
                answers=[("sonnet", None)], now_ms=T0, from_cache=True)  # fmt: skip
    stats = tx.stats(cfg, "summarize", T0).counts
    assert set(stats) == {("short", "sonnet")}
    assert stats["short", "sonnet"].passed == pytest.approx(1.0)
    hit = msgspec.json.decode(tx.strings[KEYS.answered("hit")], type=Answered)
    assert (hit.tier, hit.counted) == ("sonnet", "")


def test_fields_that_are_not_counts_are_left_out() -> None:
    a = adaptive_config().router.adaptive
    epoch = adaptive._epoch(a.half_life_s * 1000, T0)
    hashes = {("w", epoch): {"short|haiku|p": "3", "junk": "1", "short|haiku|x": "2",
                             "short|haiku|f": "nan?", "|p": "1"}}  # fmt: skip
    stats = tally(a, epoch * 16 * a.half_life_s * 1000, hashes)
    assert stats.counts == {("short", "haiku"): TierStats(passed=3.0)}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"router/policy": "adaptive"},
            'router.policy = "adaptive" but no feature sets target_pass_rate',
        ),
        (
            {"features/summarize/target_pass_rate": 0.98},
            "features.summarize.target_pass_rate has no effect: features.summarize.tier = "
            "'haiku' fixes the tier",
        ),
        (
            {"features/code_review/target_pass_rate": 1.0},
            "features.code_review.target_pass_rate = 1.0 is not allowed: Expected `float` < 1",
        ),
        (
            {"router/adaptive/recent_half_life_s": 7200},
            "router.adaptive.recent_half_life_s = 7200 must be shorter than half_life_s = 3600",
        ),
        (
            {"router/adaptive/bands": {"long": 2000, "short": 0}},
            "router.adaptive.bands = {'long': 2000, 'short': 0}: give 1 to 8 bands",
        ),
        (
            {"router/adaptive/bands": {"short": 10}},
            "the first 0 and each larger than the one before",
        ),
        (
            {"router/adaptive/explore_share": 0.9},
            "router.adaptive.explore_share = 0.9 is not allowed: Expected `float` <= 0.5",
        ),
        ({"router/policy": "clever"}, "router.policy = 'clever' is not allowed"),
        ({"router/adaptive/bands": {"bad name": 0}}, "router.adaptive.bands"),
    ],
)
def test_bad_adaptive_settings_name_the_key_and_what_is_allowed(
    change: dict[str, Any], expected: str
) -> None:
    assert expected in config_error(change)
