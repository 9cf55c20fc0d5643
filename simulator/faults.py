"""Injected faults: which ones, at what rates, the errors they answer with, and the seeded
dice that pick them.

Faults of POST /v1/messages (shares of validated requests, summing to at most 1):
    429        rate_limit_error with `retry-after: 1`
    429-bare   rate_limit_error without `retry-after`
    spend-cap  rate_limit_error with `error.details.error_code: "enforced_spend_limit_reached"`
               and no `retry-after`: the organization's monthly spend cap (anthropic-api.md
               §2.3); the SDK raises EnforcedSpendLimitReachedError, a RateLimitError
    500        api_error
    504        timeout_error
    529        overloaded_error
Faults of POST /v1/messages/batches (create; a share of valid create requests):
    batch-529  overloaded_error; the batch is not created

Each kind of request rolls its own dice once per validated request whatever the rates, so the
n-th request of a run with a given seed meets the same roll however the rates changed in
between (and however many requests of the other kind came between).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from simulator.errors import ApiError

# The order is fixed (the 4 first as they always were), so a seed's outcomes stay stable.
MESSAGE_FAULTS = ("429", "500", "504", "529", "429-bare", "spend-cap")
BATCH_FAULTS = ("batch-529",)
FAULTS = MESSAGE_FAULTS + BATCH_FAULTS
FORM = (
    "FAULT=RATE[,FAULT=RATE...] with FAULT one of 429, 429-bare, spend-cap, 500, 504, 529 "
    "(shares of /v1/messages requests, summing to at most 1) or batch-529 (a share of batch "
    "creates) and each RATE between 0 and 1, e.g. 429=0.1,529=0.05,500=0.01"
)
SPEND_CAP_CODE = "enforced_spend_limit_reached"
SPEND_CAP_MESSAGE = (
    "Your organization has reached the monthly spend limit of its usage tier. Requests are "
    "refused until 00:00 UTC on the 1st of next month, or until you move to a higher tier."
)
RETRY_AFTER_S = "1"


def check_fault_rates(rates: Mapping[str, float]) -> dict[str, float]:
    """A copy of `rates` if valid; raises ValueError naming the bad entry otherwise."""
    for fault, rate in rates.items():
        if fault not in FAULTS:
            raise ValueError(f"status {fault!r} cannot be injected; accepted form: {FORM}")
        if not 0 <= rate <= 1:  # also refuses NaN
            raise ValueError(f"rate {rate!r} for {fault} is not between 0 and 1; {FORM}")
    total = sum(rate for fault, rate in rates.items() if fault in MESSAGE_FAULTS)
    if total > 1:
        raise ValueError(f"fault rates add up to {total:g}, more than 1; {FORM}")
    return dict(rates)


def parse_fault_rates(text: str) -> dict[str, float]:
    """`429=0.1,529=0.05` into {"429": 0.1, "529": 0.05}; raises ValueError naming the bad part."""
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        fault, sep, rate_text = (s.strip() for s in part.partition("="))
        try:
            rate = float(rate_text)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{part!r} is not FAULT=RATE; accepted form: {FORM}")
        if fault in rates:
            raise ValueError(f"fault {fault} is given twice in {text!r}; give each once")
        rates[fault] = rate
    return check_fault_rates(rates)


def spend_cap_error() -> ApiError:
    """The 429 of the organization's monthly spend cap (§2.2-2.3)."""
    return ApiError(429, SPEND_CAP_MESSAGE, error_code=SPEND_CAP_CODE)


def fault_answer(fault: str) -> tuple[ApiError, dict[str, str]]:
    """The error a fault answers with, and its extra headers."""
    if fault == "spend-cap":
        return spend_cap_error(), {}
    status = int(fault.rpartition("-")[2]) if fault.startswith("batch-") else int(fault[:3])
    message = f"simulated {fault} fault (--fault-rate or POST /_sim/config)"
    return ApiError(status, message), {"retry-after": RETRY_AFTER_S} if fault == "429" else {}


class FaultDice:
    """A seeded random.Random that picks a fault (or none) for each request, among `faults`."""

    def __init__(self, seed: int | str, faults: tuple[str, ...] = MESSAGE_FAULTS) -> None:
        self._rng = random.Random(seed)
        self._faults = faults

    def roll(self, rates: Mapping[str, float]) -> str | None:
        """The fault to answer with instead of the normal answer, or None."""
        roll = self._rng.random()
        for fault in self._faults:  # a fixed order keeps a seed's outcomes stable
            rate = rates.get(fault, 0.0)
            if roll < rate:
                return fault
            roll -= rate
        return None

    def happens(self, rate: float) -> bool:
        """One roll: True with probability `rate` (slow answers)."""
        return self._rng.random() < rate
