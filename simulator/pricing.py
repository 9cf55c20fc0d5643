"""The simulator's own price table, USD per million tokens (anthropic-api.md §8.2).

The simulator bills like the provider, independently of tokenq's config.toml, so a test can
check that tokenq's accounting equals what the "provider" billed.
"""

from __future__ import annotations

import msgspec


class Prices(msgspec.Struct, frozen=True, kw_only=True):
    """USD per million tokens of each billing category."""

    input: float
    write_5m: float
    write_1h: float
    read: float
    output: float


class ModelPrices(msgspec.Struct, frozen=True, kw_only=True):
    """A model's prices; `long` applies to every token of a request whose prompt exceeds
    `long_above_tokens` (Haiku 5.5's band: prompt = input + cache writes + cache reads)."""

    base: Prices
    long: Prices | None = None
    long_above_tokens: int = 0


PRICES: dict[str, ModelPrices] = {
    "claude-haiku-5-5": ModelPrices(
        base=Prices(input=0.10, write_5m=0.125, write_1h=0.20, read=0.01, output=0.50),
        long=Prices(input=0.50, write_5m=0.625, write_1h=1.00, read=0.05, output=2.50),
        long_above_tokens=100_000,
    ),
    "claude-sonnet-5-5": ModelPrices(
        base=Prices(input=2.0, write_5m=2.50, write_1h=4.0, read=0.10, output=10.0)
    ),
    "claude-opus-5-5": ModelPrices(
        base=Prices(input=4.0, write_5m=5.0, write_1h=8.0, read=0.20, output=20.0)
    ),
    "claude-haiku-4-5": ModelPrices(
        base=Prices(input=1.0, write_5m=1.25, write_1h=2.0, read=0.10, output=5.0)
    ),
    "claude-sonnet-4-6": ModelPrices(
        base=Prices(input=3.0, write_5m=3.75, write_1h=6.0, read=0.30, output=15.0)
    ),
    "claude-opus-4-8": ModelPrices(
        base=Prices(input=5.0, write_5m=6.25, write_1h=10.0, read=0.50, output=25.0)
    ),
}

# Batches cost half of every category; cache multipliers stack with it (§8.2).
BATCH_FACTOR = 0.5


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """The token counts of one response by billing category, named as the API's `usage`."""

    input_tokens: int
    output_tokens: int
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def cache_creation_input_tokens(self) -> int:
        return self.ephemeral_5m_input_tokens + self.ephemeral_1h_input_tokens

    @property
    def prompt_tokens(self) -> int:
        """Everything the model read: what picks the price band."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


def cost_usd(model: str, usage: Usage, *, batch: bool = False) -> float:
    """What one response costs. Raises KeyError for a model not in PRICES (the routes answer
    404 for those before anything is billed)."""
    table = PRICES[model]
    p = table.base
    if table.long is not None and usage.prompt_tokens > table.long_above_tokens:
        p = table.long
    micro_usd = (
        usage.input_tokens * p.input
        + usage.ephemeral_5m_input_tokens * p.write_5m
        + usage.ephemeral_1h_input_tokens * p.write_1h
        + usage.cache_read_input_tokens * p.read
        + usage.output_tokens * p.output
    )
    return micro_usd * (BATCH_FACTOR if batch else 1.0) / 1_000_000
