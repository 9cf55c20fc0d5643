"""Cost arithmetic: every token kind at its own price, long-context band, batch, baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import load_config
from worker.contract import UsageEvent, from_fields, to_fields, usd
from worker.usage import (
    ApiUsage,
    CacheCreation,
    baseline_cost_usd,
    cost_usd,
    format_event,
    money,
)

CFG = load_config(Path(__file__).resolve().parents[2] / "config.toml")
HAIKU = CFG.models["claude-haiku-5-5"]
SONNET = CFG.models["claude-sonnet-5-5"]
OPUS = CFG.models["claude-opus-5-5"]


def test_plain_input_and_output() -> None:
    usage = ApiUsage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert cost_usd(usage, SONNET) == pytest.approx(2.0 + 10.0)


def test_null_cache_fields_count_as_zero() -> None:
    usage = ApiUsage(input_tokens=100, output_tokens=10, cache_creation_input_tokens=None,
                     cache_read_input_tokens=None)  # fmt: skip
    assert cost_usd(usage, SONNET) == pytest.approx((100 * 2.0 + 10 * 10.0) / 1e6)


def test_cache_writes_priced_per_ttl_and_reads_at_read_price() -> None:
    usage = ApiUsage(
        input_tokens=10,
        output_tokens=0,
        cache_creation_input_tokens=300,
        cache_read_input_tokens=1000,
        cache_creation=CacheCreation(ephemeral_5m_input_tokens=200, ephemeral_1h_input_tokens=100),
    )
    expected = (10 * 2.0 + 200 * 2.5 + 100 * 4.0 + 1000 * 0.10) / 1e6
    assert cost_usd(usage, SONNET) == pytest.approx(expected)


def test_cache_writes_without_breakdown_count_as_5m() -> None:
    usage = ApiUsage(cache_creation_input_tokens=1000)
    assert cost_usd(usage, SONNET) == pytest.approx(1000 * 2.5 / 1e6)


def test_long_context_band_prices_the_whole_request() -> None:
    small = ApiUsage(input_tokens=100_000, output_tokens=1000)
    large = ApiUsage(input_tokens=60_000, cache_read_input_tokens=40_001, output_tokens=1000)
    assert cost_usd(small, HAIKU) == pytest.approx((100_000 * 0.10 + 1000 * 0.50) / 1e6)
    assert cost_usd(large, HAIKU) == pytest.approx(
        (60_000 * 0.50 + 40_001 * 0.05 + 1000 * 2.50) / 1e6
    )


def test_batch_discount_applies_to_everything() -> None:
    usage = ApiUsage(input_tokens=1000, output_tokens=1000, cache_read_input_tokens=1000)
    assert cost_usd(usage, OPUS, batch=True) == pytest.approx(cost_usd(usage, OPUS) / 2)


def test_baseline_prices_all_input_as_uncached_on_the_baseline_model() -> None:
    usage = ApiUsage(input_tokens=10, cache_read_input_tokens=990, output_tokens=100)
    assert baseline_cost_usd(usage, OPUS) == pytest.approx((1000 * 4.0 + 100 * 20.0) / 1e6)


def test_usage_event_round_trips_through_stream_fields() -> None:
    event = UsageEvent(ts_ms=1, job_id="j", feature="f", tier="haiku", input_tokens=5,
                       cost_usd=0.00001234, baseline_cost_usd=1.5, error_type="")  # fmt: skip
    fields = to_fields(event)
    assert fields["cost_usd"] == "0.00001234"
    assert all(isinstance(v, str) for v in fields.values())
    assert from_fields(fields) == event


def test_usd_has_no_exponent() -> None:
    assert usd(1e-7) == "0.0000001"
    assert usd(0.0) == "0"
    assert usd(12.5) == "12.5"


def test_format_event_shows_cost_and_outcome() -> None:
    line = format_event(UsageEvent(ts_ms=0, job_id="j1", feature="summarize", status="error",
                                   error_type="unknown_feature"))  # fmt: skip
    assert "summarize" in line and "error=unknown_feature" in line and "job=j1" in line


def test_format_event_shows_an_error_events_message() -> None:
    event = UsageEvent(
        ts_ms=0, job_id="j1", feature="f", status="error", error_type="max_attempts",
        message="5 calls failed; last: 529 overloaded",
    )  # fmt: skip
    line = format_event(event)
    assert "error=max_attempts message='5 calls failed; last: 529 overloaded'" in line


@pytest.mark.parametrize(
    ("usd_", "shown"),
    [(0.003, "$0.003"), (0.00294, "$0.00294"), (0.0001234, "$0.0001234"), (12.5, "$12.50"),
     (1234.5, "$1,234.50"), (0.5, "$0.50"), (0.0, "$0.00"), (-0.02, "-$0.02")],
)  # fmt: skip
def test_money_keeps_the_digits_of_small_amounts(usd_: float, shown: str) -> None:
    assert money(usd_) == shown
