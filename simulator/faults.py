"""Injected faults: which statuses, at what rates, and the seeded dice that pick them.

Rates are shares of validated POST /v1/messages requests, per status, summing to at most 1.
The dice are rolled once per validated request whatever the rates, so the n-th request of a
run with a given seed meets the same roll however the rates changed in between.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

FAULT_STATUSES = ("429", "500", "504", "529")
FORM = (
    "STATUS=RATE[,STATUS=RATE...] with STATUS one of 429, 500, 504, 529 and each RATE "
    "between 0 and 1, summing to at most 1, e.g. 429=0.1,529=0.05,500=0.01"
)


def check_fault_rates(rates: Mapping[str, float]) -> dict[str, float]:
    """A copy of `rates` if valid; raises ValueError naming the bad entry otherwise."""
    for status, rate in rates.items():
        if status not in FAULT_STATUSES:
            raise ValueError(f"status {status!r} cannot be injected; accepted form: {FORM}")
        if not 0 <= rate <= 1:  # also refuses NaN
            raise ValueError(f"rate {rate!r} for {status} is not between 0 and 1; {FORM}")
    total = sum(rates.values())
    if total > 1:
        raise ValueError(f"fault rates add up to {total:g}, more than 1; {FORM}")
    return dict(rates)


def parse_fault_rates(text: str) -> dict[str, float]:
    """`429=0.1,529=0.05` into {"429": 0.1, "529": 0.05}; raises ValueError naming the bad part."""
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        status, sep, rate_text = (s.strip() for s in part.partition("="))
        try:
            rate = float(rate_text)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{part!r} is not STATUS=RATE; accepted form: {FORM}")
        if status in rates:
            raise ValueError(f"status {status} is given twice in {text!r}; give each once")
        rates[status] = rate
    return check_fault_rates(rates)


class FaultDice:
    """A seeded random.Random that picks a fault status (or none) for each request."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def roll(self, rates: Mapping[str, float]) -> str | None:
        """The status to answer with instead of the normal answer, or None."""
        roll = self._rng.random()
        for status in FAULT_STATUSES:  # a fixed order keeps a seed's outcomes stable
            rate = rates.get(status, 0.0)
            if roll < rate:
                return status
            roll -= rate
        return None
