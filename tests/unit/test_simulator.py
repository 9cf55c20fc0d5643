"""Simulator arithmetic: continuous-refill buckets, token counting, fault-rate parsing."""

from __future__ import annotations

import argparse

import pytest

from simulator.__main__ import parse_fault_rates
from simulator.limits import Bucket, ModelLimits, thousands
from simulator.tokens import input_tokens, reply


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_continuously_up_to_capacity() -> None:
    clock = FakeClock()
    bucket = Bucket(60, clock)  # 60 a minute: one a second
    bucket.take(30)
    assert bucket.remaining() == 30
    clock.now += 10
    assert bucket.remaining() == 40
    assert bucket.full_at() == pytest.approx(clock.now + 20)
    clock.now += 3600
    assert bucket.remaining() == 60


def test_headers_round_tokens_to_thousands() -> None:
    limits = ModelLimits(1000, 2_000_000, 400_000, FakeClock())
    limits.record(input_tokens=1_499, output_tokens=10)
    headers = limits.headers()
    assert headers["anthropic-ratelimit-requests-remaining"] == "999"
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "1999000"
    assert headers["anthropic-ratelimit-tokens-limit"] == "2400000"
    assert thousands(1_499) == 1000 and thousands(1_500) == 2000


def test_input_tokens_count_four_characters_a_token() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 40}], "system": "y" * 8}
    assert input_tokens(body) == 3 + 2 + (4 + 10)


def test_stop_sequence_cuts_the_reply() -> None:
    body = {"model": "m", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]}
    text, _, _, _ = reply(body)
    word = text.split()[5]
    cut, tokens, stop_reason, stop = reply({**body, "stop_sequences": [word]})
    assert stop_reason == "stop_sequence" and stop == word
    assert word not in cut and len(cut) < len(text) and tokens > 0


@pytest.mark.parametrize(
    ("text", "says"),
    [("429", "is not STATUS=RATE"), ("418=0.1", "cannot be injected"), ("500=2", "between 0 and 1"),
     ("500=0.6,529=0.6", "more than 1")],
)  # fmt: skip
def test_bad_fault_rates_say_what_is_allowed(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        parse_fault_rates(text)
