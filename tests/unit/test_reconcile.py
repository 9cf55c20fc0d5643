"""reconcile.compare: verdicts against the thresholds, and the likely causes it names."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal as D

from worker.admin_api import Side
from worker.reconcile import Hints, Thresholds, TokenqSide, compare

LIMITS = Thresholds(max_diff_usd=D("0.01"), max_diff_pct=D(1))
DAY = "2026-11-20"


def side(usd: str, tokens: int = 1000, batch: str = "0") -> Side:
    return Side(input_tokens=tokens, output_tokens=tokens // 10, cost_usd=D(usd),
                batch_cost_usd=D(batch))  # fmt: skip


def ours(totals: dict[tuple[str, str], Side], hints: dict[tuple[str, str], Hints] | None = None,
         first_ms: int | None = 0) -> TokenqSide:  # fmt: skip
    return TokenqSide(totals, hints or {}, first_ms)


def test_agreeing_sides_have_no_causes_and_pass() -> None:
    [row] = compare(ours({(DAY, "m"): side("1.00")}), {(DAY, "m"): side("1.00")}, LIMITS, "x")
    assert not row.over and row.causes == [] and row.diff_usd == 0


def test_a_difference_must_pass_both_thresholds_to_fail() -> None:
    theirs = {(DAY, "small"): side("0.0002"), (DAY, "near"): side("100.05"),
              (DAY, "big"): side("2.00")}  # fmt: skip
    mine = {(DAY, "small"): side("0.0001"), (DAY, "near"): side("100.00"),
            (DAY, "big"): side("1.00")}  # fmt: skip
    rows = {r.model: r for r in compare(ours(mine), theirs, LIMITS, "x")}
    assert not rows["small"].over  # 50% but $0.0001
    assert not rows["near"].over  # $0.05 but 0.05%
    assert rows["big"].over and rows["big"].diff_usd == D("-1.00")


def test_provider_billing_more_names_other_applications_and_dead_workers() -> None:
    hints = {(DAY, "m"): Hints(jobs=10, retried=3)}
    [row] = compare(ours({(DAY, "m"): side("1.00")}, hints), {(DAY, "m"): side("1.50", 1500)},
                    LIMITS, "x")  # fmt: skip
    assert any("other applications on the same organization" in c for c in row.causes)
    assert any("calls in flight when a worker died: 3 job(s)" in c for c in row.causes)


def test_rerouted_jobs_explain_a_per_model_split_when_the_day_agrees() -> None:
    mine = {(DAY, "haiku"): side("0.10"), (DAY, "sonnet"): side("0.90")}
    theirs = {(DAY, "haiku"): side("0.20"), (DAY, "sonnet"): side("0.80")}
    hints = {(DAY, "sonnet"): Hints(jobs=5, rerouted=5)}
    rows = {r.model: r for r in compare(ours(mine, hints), theirs, LIMITS, "x")}
    assert any("5 job(s) were escalated" in c for c in rows["sonnet"].causes)


def test_same_tokens_other_cost_points_at_prices_and_the_batch_discount() -> None:
    hints = {(DAY, "m"): Hints(jobs=4, batch=4)}
    [row] = compare(ours({(DAY, "m"): side("1.00", batch="1.00")}, hints),
                    {(DAY, "m"): side("2.00", batch="2.00")}, LIMITS, "x")  # fmt: skip
    assert any('the tokens agree: the prices differ (config.toml [models."m"])' in c
               and "batch_discount" in c for c in row.causes)  # fmt: skip
    assert any(c.startswith("batch discount: tokenq's batch jobs cost $1.00") for c in row.causes)


def test_days_the_trimmed_usage_stream_no_longer_has_never_fail() -> None:
    first_ms = int(dt.datetime(2026, 11, 21, tzinfo=dt.UTC).timestamp() * 1000)
    [row] = compare(ours({}, first_ms=first_ms), {(DAY, "m"): side("5.00")}, LIMITS, "x")
    assert not row.over
    assert row.causes[0].startswith("tokenq's usage stream no longer reaches back")


def test_today_is_said_to_be_unfinished() -> None:
    [row] = compare(ours({(DAY, "m"): side("1.00")}), {(DAY, "m"): side("0.50")}, LIMITS, DAY)
    assert row.causes[0].startswith("today is not over")
    assert any("tokenq recorded more than the provider billed" in c for c in row.causes)
