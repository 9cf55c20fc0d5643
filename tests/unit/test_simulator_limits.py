"""The simulator's rate limits: continuous refill, refusal and retry-after, both OTPM modes,
the limit table, resets and headers.

Time is a FakeClock the test moves; nothing here sleeps.
"""

from __future__ import annotations

import argparse
import re

import pytest

from simulator.__main__ import build_parser
from simulator.__main__ import parse_limit as parse_limit_option
from simulator.limits import (
    STANDARD,
    Bucket,
    ModelLimits,
    Need,
    Refusal,
    check_table,
    limits_for,
    parse_limit,
    rfc3339,
    table_of,
    thousands,
)

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z


class FakeClock:
    """Unix seconds that move only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_new_bucket_is_full_and_full_now() -> None:
    clock = FakeClock()
    bucket = Bucket(600, clock)
    assert bucket.remaining() == 600
    assert bucket.full_at() == T0


def test_bucket_refills_continuously_not_per_window() -> None:
    clock = FakeClock()
    bucket = Bucket(60, clock)  # 60 a minute: one a second
    bucket.take(30)
    assert bucket.remaining() == 30
    clock.now += 0.5
    assert bucket.remaining() == 30  # half a unit back; whole units are reported
    clock.now += 0.5
    assert bucket.remaining() == 31
    clock.now += 9
    assert bucket.remaining() == 40
    assert bucket.full_at() == pytest.approx(clock.now + 20)


def test_bucket_never_refills_past_capacity() -> None:
    clock = FakeClock()
    bucket = Bucket(60, clock)
    bucket.take(10)
    clock.now += 3_600
    assert bucket.remaining() == 60
    bucket.take(1)
    assert bucket.remaining() == 59  # the hour of idling did not bank extra units


def test_an_overdrawn_bucket_reports_zero_and_pays_back_first() -> None:
    clock = FakeClock()
    bucket = Bucket(60, clock)
    bucket.take(90)  # actual output is taken after the fact, so the level goes to -30
    assert bucket.remaining() == 0
    clock.now += 30
    assert bucket.remaining() == 0
    clock.now += 10
    assert bucket.remaining() == 10
    assert bucket.full_at() == pytest.approx(clock.now + 50)


def test_thousands_round_to_nearest_halves_up() -> None:
    assert [thousands(n) for n in (0, 499, 500, 1_499, 1_500, 2_500)] == [
        0, 0, 1_000, 1_000, 2_000, 3_000,
    ]  # fmt: skip


def test_rfc3339_is_utc_seconds_rounded_up() -> None:
    assert rfc3339(T0) == "2026-09-21T14:13:20Z"
    assert rfc3339(T0 + 0.2) == "2026-09-21T14:13:21Z"


def test_model_limits_headers_after_one_request() -> None:
    clock = FakeClock()
    limits = ModelLimits(1_000, 2_000_000, 400_000, clock)
    assert limits.admit(Need(input_tokens=1_499, output_tokens=0)) is None
    limits.settle(reserved=0, output_tokens=60_000)
    headers = limits.headers()
    prefix = "anthropic-ratelimit-"
    assert {k.removeprefix(prefix): v for k, v in headers.items()} == {
        "requests-limit": "1000",
        "requests-remaining": "999",
        "requests-reset": "2026-09-21T14:13:21Z",  # 0.06 s to refill one request
        "input-tokens-limit": "2000000",
        "input-tokens-remaining": "1999000",  # 1,998,501 rounded
        "input-tokens-reset": "2026-09-21T14:13:21Z",  # 1,499 / 33,333.3 a second = 0.045 s
        "output-tokens-limit": "400000",
        "output-tokens-remaining": "340000",
        "output-tokens-reset": "2026-09-21T14:13:29Z",  # 60,000 / 6,666.7 a second = 9 s
        "tokens-limit": "2400000",
        "tokens-remaining": "2339000",  # 1,998,501 + 340,000 rounded
        "tokens-reset": "2026-09-21T14:13:29Z",  # the later of the two
    }


def test_model_limits_recover_as_the_clock_moves() -> None:
    clock = FakeClock()
    limits = ModelLimits(1_000, 2_000_000, 400_000, clock)
    for _ in range(500):
        assert limits.admit(Need(input_tokens=2_000, output_tokens=0)) is None
        limits.settle(reserved=0, output_tokens=400)
    assert limits.headers()["anthropic-ratelimit-requests-remaining"] == "500"
    clock.now += 15  # a quarter of a minute refills a quarter of each limit
    headers = limits.headers()
    assert headers["anthropic-ratelimit-requests-remaining"] == "750"
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "1500000"
    assert headers["anthropic-ratelimit-output-tokens-remaining"] == "300000"


def fill(limits: ModelLimits, n: int, need: Need) -> None:
    """Admit `n` requests that must all fit."""
    for i in range(n):
        assert limits.admit(need) is None, f"request {i + 1} of {n} was refused"


SMALL = Need(input_tokens=10, output_tokens=0)


def test_a_full_requests_bucket_refuses_until_the_wait_is_over() -> None:
    clock = FakeClock()
    limits = ModelLimits(6, 1_000, 1_000, clock)  # 6 a minute: one request every 10 s
    fill(limits, 6, SMALL)
    assert limits.admit(SMALL) == Refusal("requests", 6, 1, retry_after_s=10)
    clock.now += 9.5
    assert limits.admit(SMALL) == Refusal("requests", 6, 1, retry_after_s=1)  # 0.5 s, rounded up
    clock.now += 0.5
    assert limits.admit(SMALL) is None
    assert limits.admit(SMALL) == Refusal("requests", 6, 1, retry_after_s=10)


def test_a_refused_request_takes_nothing() -> None:
    clock = FakeClock()
    limits = ModelLimits(60, 600, 600, clock)
    assert limits.admit(Need(input_tokens=500, output_tokens=0)) is None
    before = (limits.requests.remaining(), limits.input.remaining(), limits.output.remaining())
    refusal = limits.admit(Need(input_tokens=200, output_tokens=0))
    assert refusal == Refusal("input_tokens", 600, 200, retry_after_s=10)  # 100 short, 10 a s
    after = (limits.requests.remaining(), limits.input.remaining(), limits.output.remaining())
    assert after == before == (59, 100, 600)


def test_retry_after_is_the_longest_wait_of_the_short_buckets() -> None:
    clock = FakeClock()
    limits = ModelLimits(60, 600, 6_000, clock)
    fill(limits, 60, SMALL)  # both empty: a request back in 1 s, 10 input tokens a second
    long_prompt = limits.admit(Need(input_tokens=100, output_tokens=0))
    assert long_prompt == Refusal("input_tokens", 600, 100, retry_after_s=10)
    short_prompt = limits.admit(Need(input_tokens=5, output_tokens=0))  # 0.5 s of input
    assert short_prompt == Refusal("requests", 60, 1, retry_after_s=1)


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    clock = FakeClock()
    limits = ModelLimits(60_000, 600, 1_000, clock)  # 10 input tokens a second
    assert limits.admit(Need(input_tokens=600, output_tokens=0)) is None
    clock.now += 0.6  # 6 tokens back: 2 short of 8 is 0.2 s
    assert limits.admit(Need(8, 0)) == Refusal("input_tokens", 600, 8, retry_after_s=1)
    assert limits.admit(Need(61, 0)) == Refusal("input_tokens", 600, 61, retry_after_s=6)


def test_a_request_larger_than_a_limit_can_never_fit() -> None:
    clock = FakeClock()
    limits = ModelLimits(60, 1_000, 1_000, clock)
    refusal = limits.admit(Need(input_tokens=1_001, output_tokens=0))
    assert refusal == Refusal("input_tokens", 1_000, 1_001, retry_after_s=None)
    message = refusal.message("claude-haiku-5-5", "actual")
    assert message.startswith(
        "This request would exceed your organization's rate limit of 1,000 input tokens per "
        "minute for claude-haiku-5-5: it needs 1,001 input tokens, more than the limit, so it "
        "can never be accepted."
    )
    assert limits.requests.remaining() == 60  # nothing was taken
    too_long = limits.admit(Need(input_tokens=10, output_tokens=1_500))  # max_tokens mode
    assert too_long == Refusal("output_tokens", 1_000, 1_500, retry_after_s=None)
    assert "Lower max_tokens" in too_long.message("claude-haiku-5-5", "max_tokens")


def test_the_message_names_the_limit_and_the_model_like_the_api() -> None:
    refusal = Refusal("requests", 600, 1, retry_after_s=4)
    assert refusal.message("claude-haiku-5-5", "actual").startswith(
        "This request would exceed your organization's rate limit of 600 requests per minute "
        "for claude-haiku-5-5. Try again in 4 s (retry-after)"
    )
    output = Refusal("output_tokens", 40_000, 1, retry_after_s=2).message("m", "actual")
    assert "rate limit of 40,000 output tokens per minute for m." in output


def test_actual_mode_needs_a_non_empty_output_bucket_and_takes_the_output_at_the_answer() -> None:
    clock = FakeClock()
    limits = ModelLimits(600, 100_000, 600, clock)  # OTPM 600: 10 output tokens a second
    need = Need.of(input_tokens=10, max_tokens=5_000, mode="actual")
    assert need == Need(10, 0)  # max_tokens does not count in 2026
    assert limits.admit(need) is None and limits.admit(need) is None  # 2 at once, 0 taken yet
    assert limits.output.remaining() == 600
    limits.settle(reserved=0, output_tokens=500)
    limits.settle(reserved=0, output_tokens=300)  # 800 of 600: overdrawn by 200
    assert limits.output.remaining() == 0
    assert limits.admit(need) == Refusal("output_tokens", 600, 1, retry_after_s=21)  # 201 / 10
    clock.now += 19.9
    assert limits.admit(need) == Refusal("output_tokens", 600, 1, retry_after_s=1)  # at -1
    clock.now += 0.6
    assert limits.admit(need) is None  # a few tokens back are enough to start


def test_max_tokens_mode_reserves_max_tokens_and_refunds_the_unused_part() -> None:
    clock = FakeClock()
    limits = ModelLimits(600, 100_000, 1_000, clock)  # 1,000 output tokens a minute
    need = Need.of(input_tokens=10, max_tokens=600, mode="max_tokens")
    assert need == Need(10, 600)
    assert limits.admit(need) is None
    assert limits.output.remaining() == 400  # reserved while the request runs
    assert limits.admit(need) == Refusal("output_tokens", 1_000, 600, retry_after_s=12)
    limits.settle(reserved=600, output_tokens=20)  # the answer used 20: 580 come back
    assert limits.output.remaining() == 980
    assert limits.admit(need) is None
    limits.settle(reserved=600, output_tokens=600)
    assert limits.output.remaining() == 380


def test_a_refund_never_fills_past_capacity() -> None:
    clock = FakeClock()
    limits = ModelLimits(600, 100_000, 1_000, clock)
    assert limits.admit(Need(10, 600)) is None
    clock.now += 60  # refilled to 1,000 while the request ran
    limits.settle(reserved=600, output_tokens=0)
    assert limits.output.remaining() == 1_000


def test_limit_table_falls_back_to_star_then_to_the_standard_table() -> None:
    table = check_table({"claude-haiku-5-5": [100, 50_000, 10_000]})
    assert table == {"*": STANDARD, "claude-haiku-5-5": (100, 50_000, 10_000)}
    assert limits_for(table, "claude-sonnet-5-5") == STANDARD
    table = check_table({"*": [600, 200_000, 40_000]})
    assert limits_for(table, "claude-haiku-5-5") == (600, 200_000, 40_000)


@pytest.mark.parametrize(
    ("table", "says"),
    [({"claude-nope": [1, 2, 3]}, "'claude-nope' is not a model the simulator knows"),
     ({"*": [1, 2]}, "the limits of '*', [1, 2], are not 3 whole numbers of 1 or more"),
     ({"*": [0, 2, 3]}, 'accepted form: {"*": [RPM, ITPM, OTPM]')],
)  # fmt: skip
def test_bad_limit_tables_name_the_row(table: dict[str, list[int]], says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        check_table(table)


def test_limit_options_build_the_table() -> None:
    args = build_parser().parse_args(
        ["--limit", "600/200000/40000", "--limit", "claude-haiku-5-5=100/50000/10000",
         "--otpm-mode", "max_tokens"]
    )  # fmt: skip
    assert table_of(args.limit) == {
        "*": (600, 200_000, 40_000), "claude-haiku-5-5": (100, 50_000, 10_000)
    }  # fmt: skip
    assert args.otpm_mode == "max_tokens"
    assert table_of(build_parser().parse_args([]).limit) == {"*": STANDARD}
    with pytest.raises(ValueError, match="claude-haiku-5-5 is given twice"):
        table_of([parse_limit("claude-haiku-5-5=1/2/3"), parse_limit("claude-haiku-5-5=4/5/6")])


@pytest.mark.parametrize(
    ("text", "says"),
    [("600/200000", "is not RPM/ITPM/OTPM"), ("0/1/1", "each a whole number of 1 or more"),
     ("=1/2/3", "no model before '='"), ("claude-x=1/2/3", "'claude-x' is not a model")],
)  # fmt: skip
def test_bad_limit_options_say_what_is_allowed(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        parse_limit_option(text)
