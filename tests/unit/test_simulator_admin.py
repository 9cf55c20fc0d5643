"""The simulator's Admin API reports from its ledger: buckets, pages, grouping, cents."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from multidict import MultiDict

from simulator.admin import (
    COST_GROUPS,
    COST_LIMITS,
    USAGE_GROUPS,
    USAGE_LIMITS,
    Query,
    cost_report,
    parse_query,
    usage_report,
)
from simulator.errors import ApiError
from simulator.ledger import Ledger
from simulator.pricing import Usage, cost_usd

DAY = 86_400
START = "starting_at=2026-11-28T00:00:00Z"
T0 = int(dt.datetime(2026, 11, 28, tzinfo=dt.UTC).timestamp())
NOW = T0 + 3 * DAY + 3600  # 2026-12-01 01:00 UTC


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def ledger_of(*bills: tuple[float, str, Usage, bool]) -> Ledger:
    clock = Clock(T0)
    ledger = Ledger(clock)
    for at, model, usage, batch in bills:
        clock.at = at
        ledger.bill(model, usage, batch=batch)
    return ledger


def query(text: str, *, cost: bool = False) -> Query:
    pairs = [(k, v) for k, _, v in (p.partition("=") for p in text.split("&"))]
    limits, groups = (COST_LIMITS, COST_GROUPS) if cost else (USAGE_LIMITS, USAGE_GROUPS)
    return parse_query(MultiDict(pairs), limits, groups, NOW)


HAIKU = Usage(input_tokens=1000, output_tokens=200, ephemeral_5m_input_tokens=600,
              cache_read_input_tokens=5000)  # fmt: skip
SONNET = Usage(input_tokens=300, output_tokens=40)


def test_usage_is_bucketed_by_utc_day_and_grouped_by_model() -> None:
    ledger = ledger_of(
        (T0 + 10, "claude-haiku-5-5", HAIKU, False), (T0 + 20, "claude-haiku-5-5", HAIKU, False),
        (T0 + DAY + 5, "claude-sonnet-5-5", SONNET, False),
    )  # fmt: skip
    report = usage_report(ledger, query("starting_at=2026-11-28T07:00:00Z&group_by[]=model"))
    assert [b.starting_at for b in report.data] == [
        "2026-11-28T00:00:00Z", "2026-11-29T00:00:00Z", "2026-11-30T00:00:00Z",
        "2026-12-01T00:00:00Z",
    ]  # fmt: skip
    [haiku] = report.data[0].results
    assert haiku.model == "claude-haiku-5-5" and haiku.uncached_input_tokens == 2000
    assert haiku.cache_creation.ephemeral_5m_input_tokens == 1200
    assert haiku.cache_read_input_tokens == 10_000 and haiku.output_tokens == 400
    assert [r.model for r in report.data[1].results] == ["claude-sonnet-5-5"]
    assert report.data[2].results == [] and not report.has_more


def test_pages_follow_next_page_to_the_end() -> None:
    ledger = ledger_of((T0 + 2 * DAY, "claude-sonnet-5-5", SONNET, False))
    first = usage_report(ledger, query("starting_at=2026-11-28T00:00:00Z&limit=2"))
    assert len(first.data) == 2 and first.has_more and first.next_page is not None
    second = usage_report(
        ledger, query(f"starting_at=2026-11-28T00:00:00Z&limit=2&page={first.next_page}")
    )
    assert [b.starting_at[:10] for b in second.data] == ["2026-11-30", "2026-12-01"]
    assert second.data[0].results[0].uncached_input_tokens == 300 and not second.has_more


def test_cost_by_description_prices_each_token_type_in_cents_batch_at_half() -> None:
    ledger = ledger_of(
        (T0 + 10, "claude-haiku-5-5", HAIKU, False), (T0 + 11, "claude-haiku-5-5", HAIKU, True),
    )  # fmt: skip
    report = cost_report(ledger, query(
        "starting_at=2026-11-28T00:00:00Z&ending_at=2026-11-29T00:00:00Z&group_by[]=description",
        cost=True,
    ))  # fmt: skip
    rows = report.data[0].results
    total = sum(Decimal(r.amount) for r in rows) / 100
    expected = cost_usd("claude-haiku-5-5", HAIKU) + cost_usd("claude-haiku-5-5", HAIKU, batch=True)
    assert float(total) == pytest.approx(expected, rel=1e-12)
    by = {(r.service_tier, r.token_type): r for r in rows}
    standard = by["standard", "uncached_input_tokens"]
    assert standard.amount == "0.01"  # 1000 tokens at $0.10 per million = 0.01 cents
    assert standard.description == "Claude Haiku 5.5 Usage - Input Tokens"
    assert by["batch", "uncached_input_tokens"].amount == "0.005"
    assert (
        by["batch", "output_tokens"].description == "Claude Haiku 5.5 Batch Usage - Output Tokens"
    )
    assert all(r.currency == "USD" and r.cost_type == "tokens" for r in rows)


def test_cost_without_grouping_is_one_row_a_bucket() -> None:
    ledger = ledger_of((T0 + 10, "claude-sonnet-5-5", SONNET, False))
    report = cost_report(ledger, query("starting_at=2026-11-28T00:00:00Z&limit=1", cost=True))
    [row] = report.data[0].results
    assert row.model is None and row.description is None
    assert row.amount == "0.1"  # 300 x $2/M + 40 x $10/M = $0.001, in cents


@pytest.mark.parametrize(
    ("text", "cost", "says"),
    [("bucket_width=1d", False, "starting_at: Field required"),
     ("starting_at=yesterday", False, "not an RFC 3339 time"),
     (f"{START}&bucket_width=1h", True, "bucket_width: Input should be '1d'"),
     (f"{START}&limit=32", False, "limit: Input should be a whole number from 1 to 31"),
     (f"{START}&group_by[]=tenant", False, "group_by: 'tenant' is not one of")],
)  # fmt: skip
def test_bad_queries_are_refused_naming_the_parameter(text: str, cost: bool, says: str) -> None:
    with pytest.raises(ApiError, match=says) as err:
        query(text, cost=cost)
    assert err.value.status == 400
