"""Per-model rate-limit buckets with continuous refill, as the API's limiter works (§3.1).

A bucket holds up to `capacity` units and refills at `capacity` per minute, continuously, not
in fixed windows. v1 only reports the buckets in the `anthropic-ratelimit-*` headers (§3.3);
nothing is refused yet, so a bucket may go below zero and reports 0 remaining.

The clock is injected (unix seconds) so tests move time by hand; resets are wall-clock times.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

Clock = Callable[[], float]

# The standard table's numbers (§3.2): requests, input tokens and output tokens per minute.
DEFAULT_RPM = 1_000
DEFAULT_ITPM = 2_000_000
DEFAULT_OTPM = 400_000


class Bucket:
    """`capacity` units, refilled continuously at `capacity` per minute up to `capacity`."""

    __slots__ = ("_at", "_clock", "_level", "_rate", "capacity")

    def __init__(self, capacity: int, clock: Clock = time.time) -> None:
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
        """Use `amount` units now; the level may go below zero (v1 refuses nothing)."""
        self._refill()
        self._level -= amount

    def remaining(self) -> int:
        """Whole units left now, never below 0."""
        self._refill()
        return max(0, math.floor(self._level))

    def full_at(self) -> float:
        """The clock time at which the bucket is full again (now, if it is full)."""
        self._refill()
        return self._at + (self.capacity - self._level) / self._rate


def rfc3339(ts: float) -> str:
    """`2026-10-21T12:40:59Z`: second precision, rounded up so a reset is never early."""
    return _format_second(math.ceil(ts))


@functools.lru_cache(maxsize=256)  # a busy second formats the same few resets many times
def _format_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def thousands(n: int) -> int:
    """Token counts in the headers are rounded to the nearest thousand, halves up."""
    return (n + 500) // 1000 * 1000


class ModelLimits:
    """The RPM, ITPM and OTPM buckets of one model."""

    def __init__(
        self,
        rpm: int = DEFAULT_RPM,
        itpm: int = DEFAULT_ITPM,
        otpm: int = DEFAULT_OTPM,
        clock: Clock = time.time,
    ) -> None:
        self.requests = Bucket(rpm, clock)
        self.input = Bucket(itpm, clock)
        self.output = Bucket(otpm, clock)

    def record(self, input_tokens: int, output_tokens: int) -> None:
        """Count one answered request. `input_tokens` is what ITPM counts: input plus cache
        writes, not cache reads (§3.1)."""
        self.requests.take(1)
        self.input.take(input_tokens)
        self.output.take(output_tokens)

    def headers(self) -> dict[str, str]:
        """The `anthropic-ratelimit-*` headers of a 200 answer. With no workspace limit the
        `tokens-*` group is input and output combined (§3.3)."""
        in_left, in_full = self.input.remaining(), self.input.full_at()
        out_left, out_full = self.output.remaining(), self.output.full_at()
        prefix = "anthropic-ratelimit-"
        return {
            prefix + "requests-limit": str(self.requests.capacity),
            prefix + "requests-remaining": str(self.requests.remaining()),
            prefix + "requests-reset": rfc3339(self.requests.full_at()),
            prefix + "input-tokens-limit": str(self.input.capacity),
            prefix + "input-tokens-remaining": str(thousands(in_left)),
            prefix + "input-tokens-reset": rfc3339(in_full),
            prefix + "output-tokens-limit": str(self.output.capacity),
            prefix + "output-tokens-remaining": str(thousands(out_left)),
            prefix + "output-tokens-reset": rfc3339(out_full),
            prefix + "tokens-limit": str(self.input.capacity + self.output.capacity),
            prefix + "tokens-remaining": str(thousands(in_left + out_left)),
            prefix + "tokens-reset": rfc3339(max(in_full, out_full)),
        }
