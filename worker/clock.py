"""The one clock the worker reads: wall time for timestamps, monotonic time for intervals.

Code asks this module (`clock.now_ms()`, `clock.monotonic()`, `clock.utc()`), never
`time.time()` or `time.monotonic()` directly, so that a test can move time instead of
sleeping: `clock.use(MovableClock())` (two users of `Clock`: the system's, and the tests').
Waiting itself (asyncio sleeps and timeouts) stays on the event loop's clock; what a test moves
is what the code *reads*: deadlines, reset times, periods, retry-after marks.

The fleet's rate-limit buckets are the one exception on purpose: their Lua script reads the
Redis server's TIME, so that every process refills the same buckets by the same clock.
"""

from __future__ import annotations

import datetime as dt
import time


class Clock:
    """The system's clock."""

    def time(self) -> float:
        """Unix time in seconds."""
        return time.time()

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals)."""
        return time.monotonic()


class MovableClock(Clock):
    """A clock that stands still until a test moves it."""

    def __init__(self, start_s: float = 1_800_000_000.0) -> None:
        self._wall = start_s
        self._mono = 1_000.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        self._wall += seconds
        self._mono += seconds


_current: Clock = Clock()


def use(clock: Clock) -> Clock:
    """Read time from `clock` from now on; returns the clock used until now (to restore)."""
    global _current
    before, _current = _current, clock
    return before


def time_s() -> float:
    """Unix time in seconds."""
    return _current.time()


def now_ms() -> int:
    """Unix time in milliseconds."""
    return int(_current.time() * 1000)


def monotonic() -> float:
    """Seconds for measuring intervals."""
    return _current.monotonic()


def utc() -> dt.datetime:
    """Now, as an aware datetime in UTC."""
    return dt.datetime.fromtimestamp(_current.time(), dt.UTC)
