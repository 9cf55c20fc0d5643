"""Rollups: each job outcome added to compact hourly aggregates in Redis.

The finishing write (Queue.finish_into) appends the job's usage event, in a compact binary
record, to a list (`RPUSH`: one plain command in its MULTI, so it is counted once, with the
outcome). A fold (fold.lua: pop and apply in one script, so each record is counted once)
adds the records up into their hour (UTC): one small hash per cell (worker.cells), a cell
being (feature, model, priority, tenant), kept `report.retention_days` after the hour ends;
the hour's index hash lists its cells and the tenants that have rows, and the hour joins the
set of live hours. Folding a batch adds up the records of each cell first: a cell costs the
server one HMGET and one HSET per batch, not per outcome.

An hour keeps rows for its first `report.tenants_per_hour` tenants; later ones count under
OTHER, so an hour holds at most (tenants + 2) x features x models x priorities cells
whatever the producers send (unknown features count as UNKNOWN).

Every worker folds every second (fold()), and in the same duty compacts the hours and days
that are over (worker.compaction), a few a second, one process of the fleet at a time, so
readers find finished periods compacted; readers fold before they read (fold_records()), so
the rollups are never more than a second behind.

Usage events that are not jobs (budget alerts) add nothing. This module reads the usage
event's stream fields only.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from worker import clock
from worker.cells import (
    METRICS,
    SEP,
    TENANT_MAX,
    UNKNOWN,
    Settings,
    hour_label,
    hour_of,
    metric_pairs,
    tenant_slot,
)
from worker.compaction import COMPACT_PER_TICK, compact_due
from worker.config import Config
from worker.contract import Keys


def _script(name: str) -> str:
    """A script of this folder, with METRICS defined, without comments and indentation."""
    source = Path(__file__).with_name(name).read_text(encoding="utf-8")
    lines = (line.split(" -- ")[0].strip() for line in source.splitlines())
    body = "\n".join(line for line in lines if line and not line.startswith("--"))
    return "local METRICS = {" + ", ".join(f"'{m}'" for m in METRICS) + "}\n" + body


FOLD = _script("fold.lua")
FOLD_BATCH = 2000
"""Most records one fold script call takes (it blocks the server while it runs: ~10 ms)."""


def settings_of(cfg: Config) -> Settings:
    """The rollups' settings from a config."""
    return Settings(
        retention_days=cfg.report.retention_days,
        tenants_per_hour=cfg.report.tenants_per_hour,
        tenant_totals=cfg.metrics.tenant_labels,
        features=frozenset(cfg.features),
    )


_HEAD = struct.Struct("<I10sH")
_PACKERS = [struct.Struct("<" + "Bd" * n) for n in range(len(METRICS) + 1)]


def _record(hour: int, dims: str, pairs: list[int]) -> bytes:
    """A record as fold.lua reads it: uint32 hour, its label, uint16 length and the dims,
    then (metric number, amount) pairs packed as little-endian (uint8, double), 'n' first.
    One argument instead of two per metric: the client packs each argument in Python, and
    the script parses no number text."""
    head = dims.encode()
    return (_HEAD.pack(hour, hour_label(hour).encode(), len(head)) + head
            + _PACKERS[len(pairs) // 2].pack(*pairs))  # fmt: skip


def _place(fields: Mapping[str, str], settings: Settings) -> tuple[int, str]:
    """The hour and the cell (dims) a usage event belongs to."""
    get = fields.get
    text = get("ts_ms")
    try:
        ts_ms = int(text) if text else 0
    except ValueError:
        ts_ms = 0
    dims = _dims(get("feature", ""), get("model", ""), get("priority", ""), get("tenant", ""),
                 settings.features)  # fmt: skip
    return hour_of(ts_ms if ts_ms > 0 else clock.now_ms()), dims


@lru_cache(maxsize=8192)
def _dims(feature: str, model: str, priority: str, tenant: str, features: frozenset[str]) -> str:
    """A cell's dims as stored (see _place; features: the configured ones)."""
    return SEP.join((feature if feature in features else UNKNOWN,
                     tenant_slot(model[:TENANT_MAX]), tenant_slot(priority[:TENANT_MAX]),
                     tenant_slot(tenant)))  # fmt: skip


def record_of(fields: Mapping[str, str], settings: Settings) -> bytes | None:
    """The record of one usage event; None for events that are not job outcomes."""
    pairs = metric_pairs(fields)
    if pairs is None:
        return None
    hour, dims = _place(fields, settings)
    return _record(hour, dims, pairs)


Cell = tuple[int, str]
"""A cell of an hour: (hour, dims)."""


@dataclass(slots=True)
class Delta:
    """Outcomes added up per cell, written as one record per cell (mergeable)."""

    settings: Settings
    cells: dict[Cell, dict[int, int]] = field(default_factory=dict)

    def add(self, fields: Mapping[str, str]) -> None:
        """Add one usage event (its stream fields)."""
        pairs = metric_pairs(fields)
        if pairs is not None:
            _add(self.cells.setdefault(_place(fields, self.settings), {}),
                 zip(pairs[::2], pairs[1::2], strict=True))  # fmt: skip

    def merge(self, other: Delta) -> None:
        """Add another delta's outcomes to this one."""
        for cell, metrics in other.cells.items():
            _add(self.cells.setdefault(cell, {}), metrics.items())

    def __bool__(self) -> bool:
        return bool(self.cells)

    @property
    def hours(self) -> dict[tuple[int, str, str, str, str], dict[int, int]]:
        """The sums: (hour, feature, model, priority, tenant) -> metric number -> amount."""
        out: dict[tuple[int, str, str, str, str], dict[int, int]] = {}
        for (hour, dims), metrics in self.cells.items():
            f, m, p, t = dims.split(SEP)
            out[hour, f, m, p, t] = dict(metrics)
        return out

    def records(self) -> list[bytes]:
        """The outcomes as fold.lua reads them: one record per cell."""
        out = []
        for (hour, dims), metrics in self.cells.items():
            pairs = [0, metrics.get(0, 0)]  # 'n' first
            for n, value in metrics.items():
                if n:
                    pairs += (n, value)
            out.append(_record(hour, dims, pairs))
        return out


def _add(into: dict[int, int], pairs: Iterable[tuple[int, int]]) -> None:
    for n, value in pairs:
        into[n] = into.get(n, 0) + value


class Rollups:
    """Adds outcomes to the rollups inside a caller's transaction (one RPUSH of their records
    onto the queue), and folds them."""

    def __init__(self, keys: Keys, settings: Settings) -> None:
        self.keys = keys
        self.settings = settings

    def reload(self, settings: Settings) -> None:
        self.settings = settings

    async def load(self, redis: aioredis.Redis) -> None:
        """Load the fold script into the server (at start, so nothing needs to recover)."""
        await redis.script_load(FOLD)

    def delta(self, outcomes: Iterable[Mapping[str, str]] = ()) -> Delta:
        """A delta of these usage events (more can be added)."""
        out = Delta(self.settings)
        for fields in outcomes:
            out.add(fields)
        return out

    def records_of(self, usage: Mapping[str, str]) -> tuple[bytes, ...]:
        """The records of one outcome, as a job's finishing write carries them (none for a
        usage event that is not a job outcome)."""
        record = record_of(usage, self.settings)
        return () if record is None else (record,)

    def add_into(self, tx: Any, usage: Mapping[str, str]) -> None:
        """Queue on the transaction the write of one usage event's record."""
        if records := self.records_of(usage):
            tx.rpush(self.keys.rollup_queue, *records)

    def write_into(self, tx: Any, delta: Delta) -> None:
        """Queue on the transaction the write of a delta's records."""
        if delta:
            tx.rpush(self.keys.rollup_queue, *delta.records())

    async def fold_records(self, redis: aioredis.Redis) -> int:
        """Add the queued outcome records to their hours' cells; how many records."""
        script = redis.register_script(FOLD)  # loads itself again after a NOSCRIPT
        keep_s = self.settings.retention_days * 86_400
        keys = [self.keys.rollup_queue, self.keys.rollup_live]
        done = 0
        while True:
            args: list[Any] = [self.keys.prefix, self.settings.tenants_per_hour, keep_s, FOLD_BATCH]
            took = int(await script(keys=keys, args=args))
            done += took
            if took < FOLD_BATCH:
                return done

    async def fold(self, redis: aioredis.Redis, now_ms: int | None = None) -> int:
        """The workers' duty, every second: fold_records(), then compact up to
        COMPACT_PER_TICK finished hours or days (worker.compaction; one process of the fleet
        at a time). How many records were folded."""
        done = await self.fold_records(redis)
        now = clock.now_ms() if now_ms is None else now_ms
        await compact_due(redis, self.keys, self.settings, now, COMPACT_PER_TICK)
        return done
