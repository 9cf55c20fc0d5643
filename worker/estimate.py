"""Input tokens of a request, estimated before the call (rate limits reserve them up front).

The rule: each piece of text counts ceil(characters / 4), rounded per piece as billing rounds
per block (a string content or system prompt, each text block); a non-text content block or a
tool definition counts its compact JSON (without `cache_control`) the same way; each message
adds 4 and each request 3. That is a plain approximation of a tokenizer, so each model also
gets a correction factor learnt from what its answers report (`Calibration`): after a few calls
the estimate follows the model's real tokenizer. The limiter settles every reservation to the
reported usage anyway; the estimate decides how much is held while a call is in flight, and
a budget reserves the larger of the raw and the corrected estimate.

What the rule cannot count from the request's text (images, documents and other blocks it
does not know, or a request of more than COUNT_ABOVE tokens, where an error costs most) is
`needs_count`: the worker asks the API's free count_tokens endpoint instead before it
reserves against a spend cap.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

_json = msgspec.json.Encoder().encode
REQUEST_OVERHEAD = 3
MESSAGE_OVERHEAD = 4


COUNT_ABOVE = 100_000  # tokens: past this, ask count_tokens rather than trust the rule
# Content blocks the rule counts from their text or JSON as the API does; any other (image,
# document, search_result, container_upload, ...) is counted by the API's own rules.
COUNTABLE = frozenset({"text", "tool_use", "tool_result", "thinking", "redacted_thinking"})


def raw_estimate(params: dict[str, Any]) -> int:
    """Input tokens of Messages API parameters by the rule above (no correction)."""
    tokens = _content_tokens(params.get("system"))
    messages = params.get("messages") or []
    for message in messages:
        tokens += _content_tokens(message.get("content"))
    for tool in params.get("tools") or []:
        tokens += _json_tokens(tool)
    return tokens + MESSAGE_OVERHEAD * len(messages) + REQUEST_OVERHEAD


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _json_tokens(value: Any) -> int:
    if isinstance(value, dict) and "cache_control" in value:
        value = {k: v for k, v in value.items() if k != "cache_control"}
    return _tokens(_json(value).decode())


def _content_tokens(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _tokens(content)
    total = 0
    for block in content:
        if isinstance(block, dict) and block.get("type") == "text":
            total += _tokens(str(block.get("text", "")))
        else:
            total += _json_tokens(block)
    return total


def needs_count(params: dict[str, Any], estimate: int) -> bool:
    """Whether the rule cannot be trusted as an upper bound for this request: a content
    block it does not know (anywhere, tool results included), or a very large request."""
    if estimate > COUNT_ABOVE:
        return True
    return _unknown(params.get("system")) or any(
        _unknown(m.get("content")) for m in params.get("messages") or []
    )


def _unknown(content: Any) -> bool:
    if not isinstance(content, list):
        return False
    for block in content:
        if not isinstance(block, dict) or block.get("type") not in COUNTABLE:
            return True
        if block.get("type") == "tool_result" and _unknown(block.get("content")):
            return True
    return False


class Calibration:
    """Per model: the ratio of reported to estimated input tokens, smoothed (EWMA), and the
    output tokens of its answers (for a lost call's expected cost).

    The factor starts at 1.0 and stays within [0.25, 4] so one odd answer cannot swing it far.
    """

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = weight
        self.factors: dict[str, float] = {}
        self.outputs: dict[str, float] = {}

    def expected_output(self, model: str, max_tokens: int) -> int:
        """The output tokens a call is expected to have: what the model's answers had lately,
        at most max_tokens; max_tokens before any answer."""
        seen = self.outputs.get(model)
        return max_tokens if seen is None else min(max_tokens, math.ceil(seen))

    def learn_output(self, model: str, output_tokens: int) -> None:
        old = self.outputs.get(model)
        self.outputs[model] = (
            float(output_tokens) if old is None else old + self.weight * (output_tokens - old)
        )

    def estimate(self, model: str, params: dict[str, Any]) -> tuple[int, int]:
        """(corrected estimate, raw estimate) for a call to `model`."""
        raw = raw_estimate(params)
        return math.ceil(raw * self.factors.get(model, 1.0)), raw

    def learn(self, model: str, raw: int, reported: int) -> None:
        """Fold in one answer: `reported` input tokens (input + cache writes + cache reads)."""
        if raw <= 0 or reported <= 0:
            return
        ratio = min(4.0, max(0.25, reported / raw))
        old = self.factors.get(model)
        self.factors[model] = ratio if old is None else old + self.weight * (ratio - old)
