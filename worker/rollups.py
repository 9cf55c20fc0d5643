"""Rollups: each job outcome added to compact hourly aggregates in Redis.

The finishing write (Queue.finish_into) appends the job's usage event to a list, inside its
fenced script (worker.fence: the event travels packed, one MessagePack array of its fields,
which the script writes as the usage event (EVENT) and pushes as it is (ROLLUP), so the
client sends and computes nothing more for the rollups, and the outcome is queued once, with
its end). A fold, in the background, reads up to FOLD_BATCH entries, adds them up
by cell in Python (Delta: one compact binary record per cell) and applies the records with
fold.lua, which removes those entries from the queue in the same script: each is counted
once. One process of the fleet folds at a time (a lease the script checks, so a folder that
paused past its lease applies nothing). A cell is (feature, model, priority, tenant) in an
hour (UTC): one small hash (worker.cells), kept `report.retention_days` after the hour ends;
the hour's index hash lists its cells and the tenants that have rows, and the hour joins the
set of live hours. A cell costs the server one HMGET and one HSET per batch, not per outcome.

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

import asyncio
import logging
import secrets
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgspec
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
from worker.lease import Lease


def _script(name: str) -> str:
    """A script of this folder, with METRICS defined, without comments and indentation."""
    source = Path(__file__).with_name(name).read_text(encoding="utf-8")
    lines = (line.split(" -- ")[0].strip() for line in source.splitlines())
    body = "\n".join(line for line in lines if line and not line.startswith("--"))
    return "local METRICS = {" + ", ".join(f"'{m}'" for m in METRICS) + "}\n" + body


FOLD = _script("fold.lua")
FOLD_BATCH = 2000
"""Most queue entries one fold reads and applies at once."""
FOLD_LEASE_MS = 15_000
"""How long the folding lease lasts unless renewed (each applied batch renews it)."""
FOLD_WAIT_S = 5.0
"""How long fold_records() waits for another process's fold before giving up on its own."""

log = logging.getLogger("tokenq.rollups")
_fields = msgspec.msgpack.Decoder(list[str])
_raw_fields = msgspec.msgpack.Decoder(list[msgspec.Raw])
_encode = msgspec.msgpack.Encoder().encode


def entry_of(fields: Mapping[str, str]) -> bytes:
    """A usage event packed as the fenced end script takes it (worker.fence's EVENT) and the
    rollups' queue holds it: a MessagePack array of its field names and values, one after
    the other, each a MessagePack string. A value that is not UTF-8 (read from Redis as
    surrogate escapes) keeps its bytes; outcome_of reads them back the same way."""
    parts = [part for pair in fields.items() for part in pair]
    try:
        return _encode(parts)
    except UnicodeEncodeError:
        raw = [p.encode("utf-8", "surrogateescape") for p in parts]
        return _array_head(len(raw)) + b"".join(_str_head(len(p)) + p for p in raw)


def _array_head(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


def _str_head(n: int) -> bytes:
    if n < 32:
        return bytes([0xA0 | n])
    if n < 256:
        return b"\xd9" + bytes([n])
    return b"\xda" + n.to_bytes(2, "big") if n < 65_536 else b"\xdb" + n.to_bytes(4, "big")


def outcome_of(entry: bytes | str) -> dict[str, str] | None:
    """A queue entry's usage event (its stream fields); None for anything else. Bytes that
    are not UTF-8 are kept as surrogate escapes, as the Redis client reads them (and gives
    the entry itself: encoding it back gives its bytes)."""
    if isinstance(entry, str):
        entry = entry.encode("utf-8", "surrogateescape")
    try:
        parts = _fields.decode(entry)
    except (msgspec.DecodeError, UnicodeDecodeError):
        try:
            parts = [_text(bytes(raw)) for raw in _raw_fields.decode(entry)]
        except (msgspec.DecodeError, ValueError):
            return None
    if len(parts) % 2:
        return None
    return dict(zip(parts[::2], parts[1::2], strict=True))


def _text(packed: bytes) -> str:
    """A MessagePack string's text, whatever its bytes (ValueError: not a string)."""
    kind = packed[0]
    skip = 1 if 0xA0 <= kind <= 0xBF else {0xD9: 2, 0xDA: 3, 0xDB: 5}.get(kind)
    if skip is None:
        raise ValueError("not a string")
    return packed[skip:].decode("utf-8", "surrogateescape")


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


Cell = tuple[int, str]
"""A cell of an hour: (hour, dims)."""


@dataclass(slots=True)
class Delta:
    """Outcomes added up per cell, applied as one record per cell (fold.lua)."""

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
    """Folds the outcomes the finishing writes queue into the hourly cells."""

    def __init__(self, keys: Keys, settings: Settings) -> None:
        self.keys = keys
        self.settings = settings

    def reload(self, settings: Settings) -> None:
        self.settings = settings

    async def load(self, redis: aioredis.Redis) -> None:
        """Load the fold script into the server (at start, so nothing needs to recover)."""
        await redis.script_load(FOLD)

    def push_into(self, tx: Any, outcomes: Iterable[Mapping[str, str]]) -> None:
        """Queue on a transaction the push of usage events onto the rollups' queue, as a
        job's finishing write pushes its own (for writers other than a job's end)."""
        if entries := [entry_of(fields) for fields in outcomes]:
            tx.rpush(self.keys.rollup_queue, *entries)

    async def fold_records(self, redis: aioredis.Redis, *, wait: bool = True) -> int:
        """Add the queued outcomes to their hours' cells; how many queue entries were folded.

        One process of the fleet folds at a time (a lease); a caller that finds another
        folding waits until it is done (what it read is in the cells then) and folds the rest,
        or with `wait=False` leaves it to that one. Entries that are not usage events (another
        program's) are left out, and logged."""
        lease = Lease(redis, self.keys.rollup_folding, secrets.token_hex(8))
        waited = time.monotonic() + FOLD_WAIT_S
        while not await lease.acquire(FOLD_LEASE_MS):
            if not wait or time.monotonic() > waited:
                return 0  # a folder that died holding the lease: its lease runs out soon
            await asyncio.sleep(0.02)
        try:
            return await self._fold(redis, lease.token)
        finally:
            await asyncio.shield(lease.release())

    async def _fold(self, redis: aioredis.Redis, token: str) -> int:
        script = redis.register_script(FOLD)  # loads itself again after a NOSCRIPT
        keep_s = self.settings.retention_days * 86_400
        keys = [self.keys.rollup_queue, self.keys.rollup_live, self.keys.rollup_folding]
        done = 0
        while entries := await redis.lrange(self.keys.rollup_queue, 0, FOLD_BATCH - 1):
            delta, foreign = Delta(self.settings), 0
            for entry in entries:
                fields = outcome_of(entry)
                if fields is None:
                    foreign += 1
                else:
                    delta.add(fields)
            if foreign:
                log.warning("rollups: left out %d queue entries that are not usage events", foreign)
            args: list[Any] = [self.keys.prefix, self.settings.tenants_per_hour, keep_s, token,
                               len(entries), FOLD_LEASE_MS, *delta.records()]  # fmt: skip
            applied = await script(keys=keys, args=args)
            if int(applied) < 0:
                return done  # the lease ran out (a long pause): its new holder folds them
            done += len(entries)
            if len(entries) < FOLD_BATCH:
                break
        return done

    async def fold(self, redis: aioredis.Redis, now_ms: int | None = None) -> int:
        """The workers' duty, every second: fold_records(), then compact up to
        COMPACT_PER_TICK finished hours or days (worker.compaction; one process of the fleet
        at a time). How many records were folded."""
        done = await self.fold_records(redis, wait=False)  # another worker may be at it
        now = clock.now_ms() if now_ms is None else now_ms
        await compact_due(redis, self.keys, self.settings, now, COMPACT_PER_TICK)
        return done
