"""The simulator's own price table, USD per million tokens (anthropic-api.md §8.2).

The simulator bills like the API, independently of tokenq's config.toml, so a test can check
that tokenq's accounting equals what the "provider" billed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Prices:
    input: float
    output: float
    write_5m: float
    write_1h: float
    read: float


@dataclass(frozen=True, slots=True)
class ModelPrices:
    base: Prices
    long_context: Prices | None = None
    long_above: int = 0  # prompt tokens above which long_context applies to the whole request


PRICES: dict[str, ModelPrices] = {
    "claude-haiku-5-5": ModelPrices(
        Prices(0.10, 0.50, 0.125, 0.20, 0.01),
        long_context=Prices(0.50, 2.50, 0.625, 1.00, 0.05),
        long_above=100_000,
    ),
    "claude-sonnet-5-5": ModelPrices(Prices(2.0, 10.0, 2.50, 4.0, 0.10)),
    "claude-opus-5-5": ModelPrices(Prices(4.0, 20.0, 5.0, 8.0, 0.20)),
    "claude-haiku-4-5": ModelPrices(Prices(1.0, 5.0, 1.25, 2.0, 0.10)),
    "claude-sonnet-4-6": ModelPrices(Prices(3.0, 15.0, 3.75, 6.0, 0.30)),
    "claude-opus-4-8": ModelPrices(Prices(5.0, 25.0, 6.25, 10.0, 0.50)),
}

BATCH_FACTOR = 0.5


@dataclass(frozen=True, slots=True)
class Billed:
    """The token counts of one response, as its `usage` reports them."""

    input_tokens: int
    output_tokens: int
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0


def cost_usd(model: str, billed: Billed, *, batch: bool = False) -> float:
    """What one response costs. Raises KeyError for a model the table does not have."""
    table = PRICES[model]
    prompt = billed.input_tokens + billed.cache_write_5m + billed.cache_write_1h + billed.cache_read
    p = table.base
    if table.long_context is not None and prompt > table.long_above:
        p = table.long_context
    micro = (
        billed.input_tokens * p.input
        + billed.cache_write_5m * p.write_5m
        + billed.cache_write_1h * p.write_1h
        + billed.cache_read * p.read
        + billed.output_tokens * p.output
    )
    return micro * (BATCH_FACTOR if batch else 1.0) / 1_000_000
