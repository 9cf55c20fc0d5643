"""What the simulator billed: per model tokens and USD, plus faults it injected."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from simulator.pricing import Billed, cost_usd


@dataclass(slots=True)
class ModelLedger:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(slots=True)
class Ledger:
    models: dict[str, ModelLedger] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    rejected: int = 0

    def bill(self, model: str, billed: Billed, *, batch: bool = False) -> None:
        """Record one successful (billed) response."""
        m = self.models.setdefault(model, ModelLedger())
        m.requests += 1
        m.input_tokens += billed.input_tokens
        m.output_tokens += billed.output_tokens
        m.cache_creation_input_tokens += billed.cache_write_5m + billed.cache_write_1h
        m.cache_read_input_tokens += billed.cache_read
        m.cost_usd += cost_usd(model, billed, batch=batch)

    def as_json(self) -> dict[str, Any]:
        return {
            "models": {name: asdict(m) for name, m in self.models.items()},
            "faults": dict(self.faults),
            "rejected": self.rejected,
            "total_cost_usd": sum(m.cost_usd for m in self.models.values()),
        }
