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
import weakref
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
    """Outcomes added up per cell, written as one record per cell (mergeable).

    A cell of one outcome keeps that outcome's metric pairs as they are (the finishing write
    makes a delta of one outcome per job: it packs them without adding anything up); a
    second outcome turns them into sums by metric."""

    settings: Settings
    cells: dict[Cell, list[int] | dict[int, int]] = field(default_factory=dict)

    def add(self, fields: Mapping[str, str]) -> None:
        """Add one usage event (its stream fields)."""
        pairs = metric_pairs(fields)
        if pairs is None:
            return
        cell = _place(fields, self.settings)
        into = self.cells.get(cell)
        if into is None:
            self.cells[cell] = pairs
        else:
            self._add(cell, into, zip(pairs[::2], pairs[1::2], strict=True))

    def _add(self, cell: Cell, into: list[int] | dict[int, int],
             pairs: Iterable[tuple[int, int]]) -> None:  # fmt: skip
        if isinstance(into, list):
            into = self.cells[cell] = dict(zip(into[::2], into[1::2], strict=True))
        for n, value in pairs:
            into[n] = into.get(n, 0) + value

    def merge(self, other: Delta) -> None:
        """Add another delta's outcomes to this one."""
        for cell, metrics in other.cells.items():
            into = self.cells.get(cell)
            if into is None:
                self.cells[cell] = metrics.copy()
            else:
                self._add(cell, into, _pairs_of(metrics))

    def __bool__(self) -> bool:
        return bool(self.cells)

    @property
    def hours(self) -> dict[tuple[int, str, str, str, str], dict[int, int]]:
        """The sums: (hour, feature, model, priority, tenant) -> metric number -> amount."""
        out: dict[tuple[int, str, str, str, str], dict[int, int]] = {}
        for (hour, dims), metrics in self.cells.items():
            f, m, p, t = dims.split(SEP)
            out[hour, f, m, p, t] = dict(_pairs_of(metrics))
        return out

    def records(self) -> list[bytes]:
        """The outcomes as fold.lua reads them: one record per cell."""
        out = []
        for (hour, dims), metrics in self.cells.items():
            if isinstance(metrics, list):  # one outcome: 'n' is first already
                out.append(_record(hour, dims, metrics))
                continue
            pairs = [0, metrics.get(0, 0)]  # 'n' first
            for n, value in metrics.items():
                if n:
                    pairs += (n, value)
            out.append(_record(hour, dims, pairs))
        return out


def _pairs_of(metrics: list[int] | dict[int, int]) -> Iterable[tuple[int, int]]:
    if isinstance(metrics, list):
        return zip(metrics[::2], metrics[1::2], strict=True)
    return metrics.items()


class Rollups:
    """Adds outcomes to the rollups inside a caller's transaction, and folds them.

    The outcomes added to one transaction are written when the transaction runs through
    execute(): one RPUSH of their records (a batcher chunk of 200 results makes one command).
    """

    def __init__(self, keys: Keys, settings: Settings) -> None:
        self.keys = keys
        self.settings = settings
        self._queued: weakref.WeakKeyDictionary[Any, list[bytes]] = weakref.WeakKeyDictionary()

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

    def add_into(self, tx: Any, usage: Mapping[str, str]) -> None:
        """Add one usage event to what the transaction will write (the finishing write's
        hook). The transaction must run through execute()."""
        record = record_of(usage, self.settings)
        if record is None:
            return
        queued = self._queued.get(tx)
        if queued is None:
            self._queued[tx] = [record]
        else:
            queued.append(record)

    def write_into(self, tx: Any, delta: Delta) -> None:
        """Add a delta to what the transaction will write (see add_into)."""
        if delta:
            self._queued.setdefault(tx, []).extend(delta.records())

    def flush_into(self, tx: Any) -> int:
        """Queue the write of everything added to the transaction; how many records."""
        records = self._queued.pop(tx, None)
        if records:
            tx.rpush(self.keys.rollup_queue, *records)
        return len(records or ())

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


async def execute(redis: aioredis.Redis, tx: Any, rollups: Rollups | None) -> list[Any]:
    """Run a transaction that may hold rollup writes (add_into, write_into); raise its
    first error. `redis` is the client the transaction came from."""
    if rollups is not None:
        rollups.flush_into(tx)
    results: list[Any] = await tx.execute()
    return results
