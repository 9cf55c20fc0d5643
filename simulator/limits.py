"""Per-model token buckets with continuous refill, as the API's rate limiter works.

v1 only reports them in the `anthropic-ratelimit-*` headers; nothing is refused yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime


class Bucket:
    """`capacity` units, refilled continuously at capacity per minute."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self._rate = capacity / 60.0
        self._clock = clock
        self._level = float(capacity)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self._rate)
        self._at = now

    def take(self, amount: int) -> None:
        """Use `amount` units (the level may go below zero: v1 does not refuse)."""
        self._refill()
        self._level -= amount

    def remaining(self) -> int:
        self._refill()
        return max(0, int(self._level))

    def full_at(self) -> float:
        """Unix time at which the bucket is full again."""
        self._refill()
        return self._at + max(0.0, self.capacity - self._level) / self._rate


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def thousands(n: int) -> int:
    """Remaining tokens are reported rounded to the nearest thousand."""
    return round(n / 1000) * 1000


class ModelLimits:
    """The RPM, ITPM and OTPM buckets of one model."""

    def __init__(
        self, rpm: int, itpm: int, otpm: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.requests = Bucket(rpm, clock)
        self.input = Bucket(itpm, clock)
        self.output = Bucket(otpm, clock)

    def record(self, input_tokens: int, output_tokens: int) -> None:
        self.requests.take(1)
        self.input.take(input_tokens)
        self.output.take(output_tokens)

    def headers(self) -> dict[str, str]:
        tokens_remaining = thousands(self.input.remaining() + self.output.remaining())
        tokens_reset = max(self.input.full_at(), self.output.full_at())
        return {
            "anthropic-ratelimit-requests-limit": str(self.requests.capacity),
            "anthropic-ratelimit-requests-remaining": str(self.requests.remaining()),
            "anthropic-ratelimit-requests-reset": rfc3339(self.requests.full_at()),
            "anthropic-ratelimit-input-tokens-limit": str(self.input.capacity),
            "anthropic-ratelimit-input-tokens-remaining": str(thousands(self.input.remaining())),
            "anthropic-ratelimit-input-tokens-reset": rfc3339(self.input.full_at()),
            "anthropic-ratelimit-output-tokens-limit": str(self.output.capacity),
            "anthropic-ratelimit-output-tokens-remaining": str(thousands(self.output.remaining())),
            "anthropic-ratelimit-output-tokens-reset": rfc3339(self.output.full_at()),
            "anthropic-ratelimit-tokens-limit": str(self.input.capacity + self.output.capacity),
            "anthropic-ratelimit-tokens-remaining": str(tokens_remaining),
            "anthropic-ratelimit-tokens-reset": rfc3339(tokens_reset),
        }
