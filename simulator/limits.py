"""Per-model rate limits, enforced as the API enforces them (anthropic-api.md §3).

Each model has three token buckets: requests (RPM), input tokens (ITPM) and output tokens
(OTPM). A bucket holds up to `capacity` units and refills at `capacity` per minute,
continuously, not in fixed windows (§3.1). A request takes what it needs when it starts, so
requests arriving while it runs see the smaller buckets; a request that finds a bucket short
takes nothing and is answered 429 with the wait in `retry-after`.

OTPM has two readings (§3.1), chosen by `otpm_mode`:
    "actual"      2026 docs: output is counted as it is generated. A request needs only a
                  non-empty output bucket (at least one token) to start; its output tokens are
                  taken when the answer is made, so a long answer can overdraw the bucket.
    "max_tokens"  2025 docs: a request needs `max_tokens` output tokens to start and takes
                  them then; the unused part is given back when the answer is made.

The clock is injected (unix seconds) so tests move time by hand; resets are wall-clock times.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, NamedTuple

from simulator.pricing import PRICES

Clock = Callable[[], float]
OtpmMode = Literal["actual", "max_tokens"]
Limit = Literal["requests", "input_tokens", "output_tokens"]
LIMITS: tuple[Limit, ...] = ("requests", "input_tokens", "output_tokens")
Triple = tuple[int, int, int]  # RPM, ITPM, OTPM
LimitTable = dict[str, Triple]  # "*" (every other model) or a model id -> its limits

# The standard table's numbers (§3.2): requests, input tokens and output tokens per minute.
DEFAULT_RPM = 1_000
DEFAULT_ITPM = 2_000_000
DEFAULT_OTPM = 400_000
STANDARD: Triple = (DEFAULT_RPM, DEFAULT_ITPM, DEFAULT_OTPM)
EVERY_MODEL = "*"
FORM = (
    "RPM/ITPM/OTPM for every model or MODEL=RPM/ITPM/OTPM for one, each a whole number of 1 "
    "or more, e.g. 600/200000/40000 or claude-haiku-5-5=100/50000/10000"
)
JSON_FORM = (
    '{"*": [RPM, ITPM, OTPM], MODEL: [RPM, ITPM, OTPM], ...}, each a whole number of 1 or '
    'more, e.g. {"*": [600, 200000, 40000], "claude-haiku-5-5": [100, 50000, 10000]}'
)
_SLACK = 1e-9  # float refill arithmetic may land a hair short of a whole unit


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
        """Use `amount` units now. The level may go below zero: actual output is taken after
        the fact, and the bucket pays the debt back before it has anything to give."""
        self._refill()
        self._level -= amount

    def give(self, amount: int) -> None:
        """Return `amount` units taken but not used, never past capacity."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)

    def wait_s(self, amount: int) -> float:
        """Seconds until the bucket holds `amount` units: 0 if it does now, infinity if it
        never will (`amount` is more than the capacity)."""
        if amount > self.capacity:
            return math.inf
        self._refill()
        short = amount - self._level
        return short / self._rate if short > _SLACK else 0.0

    def remaining(self) -> int:
        """Whole units left now, never below 0."""
        self._refill()
        return max(0, math.floor(self._level + _SLACK))

    def full_at(self) -> float:
        """The clock time at which the bucket is full again (now, if it is full)."""
        self._refill()
        return self._at + (self.capacity - self._level) / self._rate


class Need(NamedTuple):
    """What a request must find in the buckets to start; it takes the same, except that in
    "actual" mode it needs one output token and takes none until its answer is made."""

    input_tokens: int  # input plus cache writes: what ITPM counts (§3.1)
    output_tokens: int  # reserved at the start: max_tokens, or 0 in "actual" mode

    @classmethod
    def of(cls, input_tokens: int, max_tokens: int, mode: OtpmMode) -> Need:
        return cls(input_tokens, max_tokens if mode == "max_tokens" else 0)


class Refusal(NamedTuple):
    """Why a request may not start: the limit (the bucket that takes longest to allow it),
    its capacity, what the request needs of it, and whole seconds to wait (None: never)."""

    limit: Limit
    capacity: int
    needed: int
    retry_after_s: int | None

    def message(self, model: str, mode: OtpmMode) -> str:
        """The error message, worded as the API's: it names the limit and the model."""
        unit = self.limit.replace("_", " ")
        head = (
            f"This request would exceed your organization's rate limit of {self.capacity:,} "
            f"{unit} per minute for {model}"
        )
        if self.retry_after_s is not None:
            return (
                f"{head}. Try again in {self.retry_after_s} s (retry-after); the "
                "anthropic-ratelimit-* headers show what is left. The simulator's limits are "
                "set with --limit or POST /_sim/config."
            )
        what = "max_tokens" if self.limit == "output_tokens" and mode == "max_tokens" else unit
        return (
            f"{head}: it needs {self.needed:,} {unit}, more than the limit, so it can never be "
            f"accepted. Lower {what} or raise the limit (--limit or POST /_sim/config)."
        )


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

    def admit(self, need: Need) -> Refusal | None:
        """Take what the request needs and answer None, or take nothing and say why not."""
        checks: tuple[tuple[Limit, Bucket, int], ...] = (
            ("requests", self.requests, 1),
            ("input_tokens", self.input, need.input_tokens),
            ("output_tokens", self.output, max(1, need.output_tokens)),
        )
        waits = [(bucket.wait_s(amount), limit, bucket, amount) for limit, bucket, amount in checks]
        wait, limit, bucket, amount = max(waits, key=lambda w: w[0])  # the first of equals
        if wait > 0:
            # Whole seconds, rounded up: retrying after retry-after finds every bucket ready
            # (unless other requests got there first).
            after = None if math.isinf(wait) else max(1, math.ceil(wait))
            return Refusal(limit, bucket.capacity, amount, after)
        self.requests.take(1)
        self.input.take(need.input_tokens)
        self.output.take(need.output_tokens)
        return None

    def settle(self, reserved: int, output_tokens: int) -> None:
        """Count an admitted request's answer: its `output_tokens` replace the `reserved`
        output (Need.output_tokens): the rest is taken now, or the unused part given back."""
        if output_tokens >= reserved:
            self.output.take(output_tokens - reserved)
        else:
            self.output.give(reserved - output_tokens)

    def headers(self) -> dict[str, str]:
        """The `anthropic-ratelimit-*` headers, sent with 200s and rate-limit 429s. With no
        workspace limit the `tokens-*` group is input and output combined (§3.3)."""
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


def rfc3339(ts: float) -> str:
    """`2026-10-21T12:40:59Z`: second precision, rounded up so a reset is never early."""
    return _format_second(math.ceil(ts))


@functools.lru_cache(maxsize=256)  # a busy second formats the same few resets many times
def _format_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def thousands(n: int) -> int:
    """Token counts in the headers are rounded to the nearest thousand, halves up."""
    return (n + 500) // 1000 * 1000


def limits_for(table: Mapping[str, Triple], model: str) -> Triple:
    """A model's limits: its own row, else the "*" row, else the standard table's."""
    return table.get(model) or table.get(EVERY_MODEL) or STANDARD


def check_table(table: Mapping[str, Sequence[int]]) -> LimitTable:
    """A valid limit table, "*" first (the standard limits if it has none); raises ValueError
    naming the bad row and giving the accepted form otherwise."""
    checked: LimitTable = {EVERY_MODEL: STANDARD}
    for model, row in table.items():
        if model != EVERY_MODEL and model not in PRICES:
            raise ValueError(
                f"{model!r} is not a model the simulator knows: limits are for '*' (every "
                f"model) or one of {', '.join(PRICES)}"
            )
        if len(row) != 3 or any(isinstance(n, bool) or n < 1 for n in row):
            raise ValueError(
                f"the limits of {model!r}, {list(row)}, are not 3 whole numbers of 1 or more; "
                f"accepted form: {JSON_FORM}"
            )
        checked[model] = (row[0], row[1], row[2])
    return checked


def parse_limit(text: str) -> tuple[str, Triple]:
    """One --limit: `600/200000/40000` into ("*", (600, 200000, 40000)), or
    `claude-haiku-5-5=100/50000/10000` for one model; raises ValueError naming the part."""
    model, sep, numbers = text.rpartition("=")
    model = model.strip() if sep else EVERY_MODEL
    try:
        row = [int(n) for n in numbers.split("/")]
    except ValueError:
        row = []
    if len(row) != 3 or min(row) < 1:
        raise ValueError(f"{text!r} is not {FORM}")
    if not model:
        raise ValueError(f"{text!r} has no model before '='; {FORM}")
    return model, check_table({model: row})[model]


def table_of(rows: Iterable[tuple[str, Triple]]) -> LimitTable:
    """The table of several --limit options; raises ValueError for a model given twice."""
    table: LimitTable = {}
    for model, row in rows:
        if model in table:
            shown = "the default (RPM/ITPM/OTPM)" if model == EVERY_MODEL else model
            raise ValueError(f"{shown} is given twice; give each once")
        table[model] = row
    return check_table(table)
