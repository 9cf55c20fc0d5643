"""The simulator's rate-limit buckets: continuous refill, capacity, resets and headers.

Time is a FakeClock the test moves; nothing here sleeps.
"""

from __future__ import annotations

import pytest

from simulator.limits import Bucket, ModelLimits, rfc3339, thousands

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
    bucket.take(90)  # v1 refuses nothing, so the level goes to -30
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
    limits.record(input_tokens=1_499, output_tokens=60_000)
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
        limits.record(input_tokens=2_000, output_tokens=400)
    assert limits.headers()["anthropic-ratelimit-requests-remaining"] == "500"
    clock.now += 15  # a quarter of a minute refills a quarter of each limit
    headers = limits.headers()
    assert headers["anthropic-ratelimit-requests-remaining"] == "750"
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "1500000"
    assert headers["anthropic-ratelimit-output-tokens-remaining"] == "300000"
