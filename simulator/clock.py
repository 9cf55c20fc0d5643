"""The simulator's clock: the wall clock plus an offset that POST /_sim/advance moves forward.

Prompt-cache lifetimes and batch processing read it, so a test can let five minutes or a day
pass at once instead of sleeping. (The rate-limit buckets keep the wall clock: their reset
headers are wall-clock times a client compares with its own.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]  # unix seconds


class SimClock:
    """Unix seconds that run with `base` and jump forward on advance(); never backwards."""

    def __init__(self, base: Clock = time.time) -> None:
        self._base = base
        self.offset_s = 0.0

    def __call__(self) -> float:
        return self._base() + self.offset_s

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` forward; raises ValueError for a negative or NaN amount."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be 0 or more (the clock never goes back): {seconds}")
        self.offset_s += seconds
