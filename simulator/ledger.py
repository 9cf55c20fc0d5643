"""What the simulator billed, per model, plus the faults it injected and the requests it refused.

Only 200 answers of POST /v1/messages and succeeded batch items (apart, in `batch`) are
billed, as the API bills them; tests compare these
totals with what tokenq recorded from the `usage` objects it received. Requests refused by the
rate limits are counted apart from injected faults, so a test can tell its own 429s from the
ones tokenq earned.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import msgspec

from simulator.clock import Clock
from simulator.limits import LIMITS, Limit
from simulator.pricing import PRICES, Usage, cost_usd


class ModelTotals(msgspec.Struct, kw_only=True):
    """Sums over one model's billed responses (a running total, hence mutable)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    # cache_creation_input_tokens by TTL, as the API's usage.cache_creation splits it
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class EmbeddingTotals(msgspec.Struct, kw_only=True):
    """Sums over one embedding model's billed requests (POST /v1/embeddings)."""

    requests: int = 0
    texts: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


class LedgerReport(msgspec.Struct, kw_only=True):
    """GET /_sim/ledger. `faults` is keyed by status ("429"), `rate_limited` by the limit that
    refused a request ("requests", "input_tokens", "output_tokens"), `rejected` counts 4xx
    answers to invalid requests, `in_flight` the requests received and not yet answered,
    `peak_in_flight` the most there were at once since the last reset, and `counted` the
    count_tokens requests answered (free, never billed)."""

    models: dict[str, ModelTotals]
    faults: dict[str, int]
    rate_limited: dict[str, int]
    rejected: int
    total_cost_usd: float  # realtime, batch and embeddings
    in_flight: int
    peak_in_flight: int = 0
    # Message Batches items, per model, billed at the batch price (half); not in `models`.
    batch: dict[str, ModelTotals] = {}
    counted: int = 0
    # POST /v1/embeddings, per embedding model (simulator/embeddings.py); not in `models`.
    embeddings: dict[str, EmbeddingTotals] = {}


class Minute(NamedTuple):
    """What the Admin API's reports group by (simulator/admin.py): the minute a response was
    billed in (unix seconds, UTC), its model, service tier and price band."""

    start_s: int
    model: str
    service_tier: str  # "standard" or "batch"
    long_context: bool  # priced at the model's long-context band


class Ledger:
    """The running totals; POST /_sim/reset replaces it with a new one. `clock` (the
    simulator's) dates each bill for the per-minute records."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.models: dict[str, ModelTotals] = {}
        self.batch: dict[str, ModelTotals] = {}
        self.embeddings: dict[str, EmbeddingTotals] = {}
        self.minutes: dict[Minute, ModelTotals] = {}  # the usage and cost reports' source
        self.faults: dict[str, int] = {}
        self.rate_limited: dict[str, int] = dict.fromkeys(LIMITS, 0)
        self.rejected = 0
        self.counted = 0
        self.clock = clock

    def bill(
        self, model: str, usage: Usage, *, batch: bool = False, at: float | None = None
    ) -> None:
        """Record one 200 response, or one succeeded batch item (`batch`, at the batch
        price), billed at unix time `at` (default: now). Raises KeyError for a model without
        prices."""
        cost = cost_usd(model, usage, batch=batch)
        section = self.batch if batch else self.models
        _add(section.setdefault(model, ModelTotals()), usage, cost)
        prices = PRICES[model]
        long = prices.long is not None and usage.prompt_tokens > prices.long_above_tokens
        when = int(self.clock() if at is None else at) // 60 * 60
        key = Minute(when, model, "batch" if batch else "standard", long)
        _add(self.minutes.setdefault(key, ModelTotals()), usage, cost)

    def bill_embeddings(self, model: str, texts: int, tokens: int, usd_per_mtok: float) -> None:
        """Record one answered embeddings request."""
        totals = self.embeddings.setdefault(model, EmbeddingTotals())
        totals.requests += 1
        totals.texts += texts
        totals.tokens += tokens
        totals.cost_usd += tokens * usd_per_mtok / 1_000_000

    def fault(self, status: str) -> None:
        """Record one injected fault answer."""
        self.faults[status] = self.faults.get(status, 0) + 1

    def rate_limit(self, limit: Limit) -> None:
        """Record one request refused (429) because `limit` had too little left."""
        self.rate_limited[limit] += 1

    def report(self, *, in_flight: int, peak_in_flight: int = 0) -> LedgerReport:
        return LedgerReport(
            models={name: msgspec.structs.replace(t) for name, t in self.models.items()},
            faults=dict(self.faults),
            rate_limited=dict(self.rate_limited),
            rejected=self.rejected,
            total_cost_usd=sum(t.cost_usd for t in [*self.models.values(), *self.batch.values()])
            + sum(t.cost_usd for t in self.embeddings.values()),
            in_flight=in_flight,
            peak_in_flight=peak_in_flight,
            batch={name: msgspec.structs.replace(t) for name, t in self.batch.items()},
            counted=self.counted,
            embeddings={name: msgspec.structs.replace(t) for name, t in self.embeddings.items()},
        )


def _add(totals: ModelTotals, usage: Usage, cost: float) -> None:
    totals.requests += 1
    totals.input_tokens += usage.input_tokens
    totals.output_tokens += usage.output_tokens
    totals.cache_creation_input_tokens += usage.cache_creation_input_tokens
    totals.cache_read_input_tokens += usage.cache_read_input_tokens
    totals.ephemeral_5m_input_tokens += usage.ephemeral_5m_input_tokens
    totals.ephemeral_1h_input_tokens += usage.ephemeral_1h_input_tokens
    totals.cost_usd += cost
