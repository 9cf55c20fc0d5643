"""Simulator arithmetic: token counting, replies, fault-rate parsing."""

from __future__ import annotations

import argparse

import pytest

from simulator.__main__ import parse_fault_rates
from simulator.tokens import input_tokens, reply


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
    [("429", "is not FAULT=RATE"), ("418=0.1", "cannot be injected"), ("500=2", "between 0 and 1"),
     ("500=0.6,529=0.6", "more than 1")],
)  # fmt: skip
def test_bad_fault_rates_say_what_is_allowed(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        parse_fault_rates(text)
