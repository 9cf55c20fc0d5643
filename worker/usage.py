"""Cost from the usage the API returned, and the usage stream's readers (`tokenq tail`).

Cost follows the invoice: input, 5-minute and 1-hour cache writes, cache reads and output each at
their own price; a request whose prompt is over a model's long-context threshold is priced at the
long-context rates throughout; batch results get the model's batch discount on all of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis

from worker.config import LongContextPrices, ModelConfig
from worker.contract import Keys, UsageEvent, clean, from_fields


class CacheCreation(msgspec.Struct, frozen=True):
    ephemeral_5m_input_tokens: int | None = None
    ephemeral_1h_input_tokens: int | None = None


class ApiUsage(msgspec.Struct, frozen=True):
    """The API's `usage` object. Cache fields may be absent or null: both mean 0."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation: CacheCreation | None = None

    @property
    def cache_write(self) -> int:
        return self.cache_creation_input_tokens or 0

    @property
    def cache_read(self) -> int:
        return self.cache_read_input_tokens or 0

    @property
    def prompt_tokens(self) -> int:
        """Every input token of the request, wherever it was billed."""
        return self.input_tokens + self.cache_write + self.cache_read

    def cache_write_split(self) -> tuple[int, int]:
        """(5-minute, 1-hour) cache-write tokens; without a breakdown all count as 5-minute."""
        if self.cache_creation is None:
            return self.cache_write, 0
        one_hour = self.cache_creation.ephemeral_1h_input_tokens or 0
        return self.cache_write - one_hour, one_hour


def _rates(prices: ModelConfig, prompt_tokens: int) -> ModelConfig | LongContextPrices:
    long = prices.long_context
    if long is not None and prompt_tokens > long.above_prompt_tokens:
        return long
    return prices


def cost_usd(usage: ApiUsage, prices: ModelConfig, *, batch: bool = False) -> float:
    """What the API bills for one response, in USD."""
    rates = _rates(prices, usage.prompt_tokens)
    write_5m, write_1h = usage.cache_write_split()
    micro = (
        usage.input_tokens * rates.input_usd_per_mtok
        + write_5m * rates.cache_write_5m_usd_per_mtok
        + write_1h * rates.cache_write_1h_usd_per_mtok
        + usage.cache_read * rates.cache_read_usd_per_mtok
        + usage.output_tokens * rates.output_usd_per_mtok
    )
    factor = 1.0 - prices.batch_discount if batch else 1.0
    return micro * factor / 1_000_000


def baseline_cost_usd(usage: ApiUsage, prices: ModelConfig) -> float:
    """What the same tokens cost naively: on the baseline model, realtime, no caching."""
    naive = ApiUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.output_tokens)
    return cost_usd(naive, prices)


def _printable(value: str) -> str:
    """A field for a terminal: control characters and line breaks escaped (an entry another
    program wrote may hold anything)."""
    return value if value.isprintable() else repr(value)[1:-1]


def money(usd: float) -> str:
    """A dollar amount for people: cents above a dollar, else four significant digits, so a
    $0.003 cap does not print as $0.00 (e.g. $12.50, $0.50, $0.003, $0.0001234)."""
    size = abs(usd)
    if size >= 1 or size == 0:
        return f"{'-' if usd < 0 else ''}${size:,.2f}"
    decimals = max(2, 3 - math.floor(math.log10(size)))
    text = f"{size:.{decimals}f}".rstrip("0")
    if len(text.partition(".")[2]) < 2:
        text = f"{size:.2f}"
    return f"{'-' if usd < 0 else ''}${text}"


def format_event(event: UsageEvent) -> str:
    """One line per event for people: time, outcome, who, where, tokens, cost, timing."""
    try:
        clock = time.strftime("%H:%M:%S", time.localtime(event.ts_ms / 1000))
    except (OverflowError, ValueError, OSError):  # a time no clock shows
        clock = "--:--:--"
    feature, tenant = _printable(event.feature), _printable(event.tenant) or "-"
    if event.kind == "alert":
        return f"{clock} ALERT {feature} tenant={tenant}: {_printable(event.message)}"
    cache = ""
    if event.cache_read_input_tokens or event.cache_creation_input_tokens:
        cache = (
            f" cache_read={event.cache_read_input_tokens}"
            f" cache_write={event.cache_creation_input_tokens}"
        )
    error = f" error={event.error_type}" if event.error_type else ""
    if event.message:  # why it failed (or what happened), in the worker's words
        error += f" message={event.message!r}"
    return (
        f"{clock} {event.status:<5} {feature} tenant={tenant}"
        f" {_printable(event.priority)} {_printable(event.tier) or '-'}/{event.mode}"
        f" in={event.input_tokens}"
        f" out={event.output_tokens}{cache} ${event.cost_usd:.6f}"
        f" (naive ${event.baseline_cost_usd:.6f}) {event.latency_ms}ms"
        f" queued={event.queue_ms}ms attempt={event.attempt}{_printable(error)}"
        f" job={_printable(event.job_id)}"
        + (f" route={event.route_reason!r}" if event.route_reason else "")
    )


class HitRates:
    """Cache hit rates per feature over the events seen so far (for `tokenq tail`).

    response: jobs answered without a call (response cache "hit" or "joined") among the jobs
    the response cache was asked for; prompt: calls that read from the prompt cache among the
    calls that read or wrote it.
    """

    def __init__(self) -> None:
        self.response: dict[str, list[int]] = {}  # feature -> [answered without a call, asked]
        self.prompt: dict[str, list[int]] = {}  # feature -> [read, read or wrote]

    def add(self, event: UsageEvent) -> None:
        if event.kind != "job" or event.status != "ok":
            return
        if event.response_cache in ("hit", "joined", "miss"):
            r = self.response.setdefault(event.feature, [0, 0])
            r[0] += event.response_cache != "miss"
            r[1] += 1
        if event.cache_read_input_tokens or event.cache_creation_input_tokens:
            p = self.prompt.setdefault(event.feature, [0, 0])
            p[0] += event.cache_read_input_tokens > 0
            p[1] += 1

    def describe(self, feature: str) -> str:
        """e.g. "hits: response 12/40 30%, prompt 38/40 95%", or "" before any."""
        parts = []
        for name, table in (("response", self.response), ("prompt", self.prompt)):
            got, of = table.get(feature, (0, 0))
            if of:
                parts.append(f"{name} {got}/{of} {got / of:.0%}")
        return ("hits: " + ", ".join(parts)) if parts else ""


def tail_line(event: UsageEvent, rates: HitRates) -> str:
    """format_event, with the feature's cache hit rates so far (rates learns the event)."""
    rates.add(event)
    hits = rates.describe(event.feature) if event.kind == "job" else ""
    return format_event(event) + (f"  [{event.feature} {hits}]" if hits else "")


def event_of(fields: Any) -> UsageEvent | None:
    """A usage-stream entry (str or bytes fields) as a UsageEvent, or None when it is not one
    (an entry someone else wrote: readers skip it). Invalid UTF-8 is replaced, not fatal."""
    try:
        text = {_text(k): _text(v) for k, v in dict(fields or {}).items()}
        return from_fields(text)
    except (msgspec.ValidationError, TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    """Clean UTF-8 text of a reply value, bytes or str (undecodable bytes as U+FFFD)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else clean(str(value))


async def follow(
    redis: aioredis.Redis, keys: Keys, *, from_start: bool = False, block_ms: int = 5000
) -> AsyncIterator[tuple[str, UsageEvent]]:
    """Yield usage events as they arrive (a blocking XREAD, no polling), forever.

    Starts at the newest entry, or at the oldest with from_start. Entries that do not decode
    as usage events (written by something else) are skipped; text is made clean UTF-8.
    """
    last = "0-0"
    if not from_start:
        newest = await redis.xrevrange(keys.usage, count=1)
        last = str(newest[0][0]) if newest else "0-0"
    while True:
        reply: Any = await redis.xread({keys.usage: last}, count=500, block=block_ms)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                event = event_of(fields)
                if event is not None:
                    yield entry_id, event
