"""Input tokens of a request, estimated before the call (rate limits reserve them up front).

The rule: a piece of text counts ceil(characters / 4); a non-text content block or tool
definition counts its compact JSON the same way; each message adds 4 and each request 3. That
is a plain approximation of a tokenizer, so each model also gets a correction factor learnt
from what its answers report (`Calibration`): after a few calls the estimate follows the
model's real tokenizer. The limiter settles every reservation to the reported usage anyway;
the estimate only decides how much is held while a call is in flight.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

_json = msgspec.json.Encoder().encode
REQUEST_OVERHEAD = 3
MESSAGE_OVERHEAD = 4


def raw_estimate(params: dict[str, Any]) -> int:
    """Input tokens of Messages API parameters by the rule above (no correction)."""
    chars = _text_chars(params.get("system"))
    messages = params.get("messages") or []
    for message in messages:
        chars += _text_chars(message.get("content"))
    tokens = math.ceil(chars / 4)
    for tool in params.get("tools") or []:
        tokens += math.ceil(len(_json(tool)) / 4)
    return tokens + MESSAGE_OVERHEAD * len(messages) + REQUEST_OVERHEAD


def _text_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    chars = 0
    for block in content:
        if isinstance(block, dict) and block.get("type") == "text":
            chars += len(block.get("text", ""))
        else:
            chars += len(_json({k: v for k, v in block.items() if k != "cache_control"}))
    return chars


class Calibration:
    """Per model: the ratio of reported to estimated input tokens, smoothed (EWMA).

    Starts at 1.0 and stays within [0.25, 4] so one odd answer cannot swing it far.
    """

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = weight
        self.factors: dict[str, float] = {}

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
