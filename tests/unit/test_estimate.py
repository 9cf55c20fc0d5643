"""The input estimate against the simulator's count (what it bills and count_tokens answers):
an upper bound for every request shape, since budgets reserve from it."""

from __future__ import annotations

from typing import Any

import pytest

from simulator.tokens import input_tokens
from worker.estimate import needs_count, raw_estimate

TINY = [{"type": "text", "text": "a"} for _ in range(300)]
SHAPES: dict[str, dict[str, Any]] = {
    "many tiny text blocks": {"messages": [{"role": "user", "content": TINY}]},
    "many one-character turns": {
        "messages": [
            {"role": "user" if n % 2 == 0 else "assistant", "content": "x"} for n in range(41)
        ],
    },
    "system blocks": {
        "system": [{"type": "text", "text": "b" * n} for n in range(1, 30)],
        "messages": [{"role": "user", "content": "hi"}],
    },
    "tool use and results": {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "c"},
                    {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "d"}] * 7,
                    },
                ],
            },
        ],
    },
    "tools marked for caching": {
        "tools": [
            {
                "name": f"f{n}",
                "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"},
            }
            for n in range(9)
        ],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "e", "cache_control": {"type": "ephemeral"}}],
            }
        ],
    },
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_the_estimate_is_never_below_what_the_request_bills(shape: str) -> None:
    params = SHAPES[shape]
    assert raw_estimate(params) >= input_tokens(params)


def test_text_is_rounded_per_block_as_billing_does() -> None:
    params = SHAPES["many tiny text blocks"]
    assert raw_estimate(params) == 300 + 4 + 3 == input_tokens(params)


def test_blocks_the_rule_cannot_count_ask_the_api() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}  # fmt: skip
    nested = {"type": "tool_result", "tool_use_id": "t1", "content": [image]}
    for content in ([image], [nested]):
        params = {"messages": [{"role": "user", "content": content}]}
        assert needs_count(params, raw_estimate(params))
    plain = SHAPES["tool use and results"]
    assert not needs_count(plain, raw_estimate(plain))
    assert needs_count(plain, 100_001)  # very large: a wrong estimate would cost the most
