"""Reading the rollups' cells: of the live hours, of finished hours, of whole days.

The folds (worker.rollups) add an hour's outcomes into one small hash per cell. Once the
hour is over by GRACE_MS, when no outcome can still arrive, the first reader that needs it
compacts it: its cells become fields of one hash (`<dims>` -> the cell's non-zero metrics
as a JSON list of index, value pairs) and the cell hashes go. Likewise a whole finished day
becomes three hashes (DayView): one cell per feature, model and priority (for the questions
that do not ask about tenants), one per tenant and one per feature and tenant, keeping the
day's `report.tenants_per_hour` biggest tenants by spend and counting the others as OTHER.
Compacting an hour also adds its cells to the running totals (worker.rollups), in the same
transaction that deletes them, so each outcome reaches the totals once.

Compaction cannot lose an outcome: an hour's cells are WATCHed while they are read, and an
outcome written meanwhile (a worker whose clock is behind) aborts the compaction, which starts
again. Such a late outcome written after its hour was compacted makes new cells, which the
next reader merges in; a day whose hours have new cells is compacted again. Compacting twice
writes the same hashes, so readers need no lock. Fields that do not parse (another program's
writes) are skipped.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from worker.contract import Keys
from worker.rollups import INDEX, METRICS, OTHER, SEP, Rollups, execute, hour_label

GRACE_MS = 3_600_000
"""An hour (a day) is compacted this long after it ended, when no outcome can still arrive."""
ALL = "\x1eall"
"""The tenant slot of a day's tenant-less cells (every tenant together)."""
Vector = list[int]
Dims = tuple[str, str, str, str]  # feature, model, priority, tenant
Cells = dict[Dims, Vector]

_pairs = msgspec.json.Decoder(list[int])


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def new() -> Vector:
    return [0] * len(METRICS)


def add(into: Vector, more: Sequence[int]) -> None:
    """Add `more` to `into`, metric by metric."""
    into[:] = map(operator.add, into, more)


def _dims(text: str) -> Dims | None:
    parts = text.split(SEP)
    return (parts[0], parts[1], parts[2], parts[3]) if len(parts) == 4 else None


def encode(vector: Vector) -> str:
    """A vector as stored in a compacted hash: its non-zero metrics as a JSON list of index,
    value, index, value... (METRICS order; most of a cell's 72 metrics are 0)."""
    return msgspec.json.encode([x for n, v in enumerate(vector) if v for x in (n, v)]).decode()


def _merge_encoded(into: Cells, dims: Dims, text: str | bytes) -> None:
    try:
        pairs = _pairs.decode(text)
        vector = new()
        for n, value in zip(pairs[::2], pairs[1::2], strict=True):
            vector[n] = value
    except (msgspec.DecodeError, ValueError, IndexError):
        return  # not ours
    if dims in into:
        add(into[dims], vector)
    else:
        into[dims] = vector


def _from_hash(
    fields: dict[Any, Any], into: Cells, keep: Callable[[Dims], bool] | None = None
) -> None:
    for name, value in fields.items():
        dims = _dims(_text(name))
        if dims is not None and (keep is None or keep(dims)):
            _merge_encoded(into, dims, value)


def _vector(fields: dict[Any, Any]) -> Vector:
    out = new()
    for name, value in fields.items():
        n = INDEX.get(_text(name))
        if n is not None:
            try:
                out[n] = int(value)
            except ValueError:
                continue
    return out


async def _index(redis: aioredis.Redis, keys: Keys, label: str) -> list[tuple[str, Dims]]:
    """An hour's live cells: (key, dimensions)."""
    index: dict[Any, Any] = await redis.hgetall(keys.rollup_index(label))
    out = []
    for name, value in index.items():
        dims = _dims(_text(value))
        if _text(name).startswith("K") and dims is not None:
            out.append((keys.rollup_cell(label, _text(name)[1:]), dims))
    return out


async def _read(redis: aioredis.Redis, found: list[tuple[str, Dims]]) -> Cells:
    if not found:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for key, _ in found:
            pipe.hgetall(key)
        replies: list[Any] = await pipe.execute()
    cells: Cells = {}
    for (_, dims), reply in zip(found, replies, strict=True):
        if reply:
            add(cells.setdefault(dims, new()), _vector(reply))
    return cells


async def hour_cells(redis: aioredis.Redis, keys: Keys, hour: int) -> Cells:
    """One hour's live cells (as the workers write them)."""
    return await _read(redis, await _index(redis, keys, hour_label(hour)))


async def finished_hour(redis: aioredis.Redis, rollups: Rollups, hour: int) -> Cells:
    """A finished hour's cells, compacting whatever the workers wrote into it (and adding
    that to the running totals, in the same transaction)."""
    keys, label = rollups.keys, hour_label(hour)
    stored_key, index_key = keys.rollup_hour(label), keys.rollup_index(label)
    for _ in range(20):
        async with redis.pipeline(transaction=True) as tx:
            await tx.watch(index_key)
            found = await _index(redis, keys, label)
            if found:
                await tx.watch(*(key for key, _ in found))  # then read: nothing slips by
            cells: Cells = {}
            _from_hash(await redis.hgetall(stored_key), cells)
            if not found:
                return cells
            totals = rollups.delta()
            for dims, v in (await _read(redis, found)).items():
                add(cells.setdefault(dims, new()), v)
                totals.add_total(dims, v)
            tx.multi()  # type: ignore[no-untyped-call]  # redis-py has no hint
            tx.delete(stored_key, index_key, *(key for key, _ in found))
            mapping = {SEP.join(d): encode(v) for d, v in cells.items()}
            tx.hset(stored_key, mapping=mapping)  # type: ignore[arg-type]
            keep_s = rollups.settings.retention_days * 86_400
            tx.expireat(stored_key, (hour + 1) * 3600 + keep_s)
            rollups.write_into(tx, totals)
            try:
                await execute(redis, tx, rollups)
            except WatchError:
                continue  # an outcome arrived meanwhile: read again
            return cells
    raise RuntimeError(f"hour {label} kept changing while it was compacted")


async def finished_hours(
    redis: aioredis.Redis, rollups: Rollups, hours: Iterable[int]
) -> dict[int, Cells]:
    """Several finished hours' cells in one round trip, compacting those that need it."""
    keys, hours = rollups.keys, list(hours)
    async with redis.pipeline(transaction=False) as pipe:
        for hour in hours:
            pipe.hgetall(keys.rollup_hour(hour_label(hour)))
            pipe.exists(keys.rollup_index(hour_label(hour)))
        replies: list[Any] = await pipe.execute()
    out: dict[int, Cells] = {}
    for n, hour in enumerate(hours):
        stored, live = replies[2 * n], replies[2 * n + 1]
        if live:
            out[hour] = await finished_hour(redis, rollups, hour)
        else:
            out[hour] = {}
            _from_hash(stored, out[hour])
    return out


def day_label(day: int) -> str:
    """A day (days since the epoch, UTC) as it appears in key names: YYYYMMDD."""
    return time.strftime("%Y%m%d", time.gmtime(day * 86_400))


def fold_tenants(cells: Cells, keep: int) -> Cells:
    """Keep the `keep` biggest tenants by spend (then outcomes); the others become OTHER."""
    spend: dict[str, tuple[int, int]] = {}
    for (_, _, _, tenant), v in cells.items():
        if tenant not in ("", OTHER):
            old = spend.get(tenant, (0, 0))
            spend[tenant] = (old[0] + v[INDEX["usd"]], old[1] + v[INDEX["n"]])
    kept = set(sorted(spend, key=lambda t: spend[t], reverse=True)[:keep])
    out: Cells = {}
    for (f, m, p, tenant), v in cells.items():
        slot = tenant if tenant in kept or tenant == "" else OTHER
        add(out.setdefault((f, m, p, slot), new()), v)
    return out


DayView = Literal["all", "tenant", "feature-tenant"]
"""A finished day's hashes: cells per feature, model and priority (tenant ALL); per tenant
(feature, model and priority ALL); per feature and tenant (model and priority ALL)."""


async def compact_day(redis: aioredis.Redis, rollups: Rollups, day: int) -> dict[str, Cells]:
    """Add a finished day's hours up into its hashes; their cells by DayView."""
    keys, settings = rollups.keys, rollups.settings
    cells: Cells = {}
    hours = await finished_hours(redis, rollups, range(day * 24, day * 24 + 24))
    for hour_cells_ in hours.values():
        for dims, v in hour_cells_.items():
            add(cells.setdefault(dims, new()), v)
    views: dict[str, Cells] = {"all": {}, "tenant": {}, "feature-tenant": {}}
    for (f, m, p, _), v in cells.items():
        add(views["all"].setdefault((f, m, p, ALL), new()), v)
    for (f, _, _, t), v in fold_tenants(cells, settings.tenants_per_hour).items():
        add(views["tenant"].setdefault((ALL, ALL, ALL, t), new()), v)
        add(views["feature-tenant"].setdefault((f, ALL, ALL, t), new()), v)
    label, expire_at = day_label(day), (day + 1 + settings.retention_days) * 86_400
    async with redis.pipeline(transaction=True) as tx:
        for view, part in views.items():
            key = keys.rollup_day(label, view)
            tx.delete(key)
            mapping: dict[Any, Any] = {SEP.join(d): encode(v) for d, v in part.items()}
            tx.hset(key, mapping={"~": "1", **mapping})  # "~": compacted, even when empty
            tx.expireat(key, expire_at)
        await tx.execute()
    return views


async def day_cells(
    redis: aioredis.Redis, rollups: Rollups, day: int, view: DayView,
    keep: Callable[[Dims], bool] | None = None,
) -> Cells:  # fmt: skip
    """A finished day's cells of one view (the cells `keep` accepts, when given). Compacts
    the day if nobody has, or if outcomes arrived in it since."""
    keys, label = rollups.keys, day_label(day)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.rollup_day(label, view))
        for hour in range(day * 24, day * 24 + 24):
            pipe.exists(keys.rollup_index(hour_label(hour)))
        stored, *late = await pipe.execute()
    if not stored or any(late):
        cells = (await compact_day(redis, rollups, day))[view]
        return {d: v for d, v in cells.items() if keep is None or keep(d)}
    out: Cells = {}
    _from_hash(stored, out, keep)
    return out


def periods(
    start_hour: int, end_hour: int, now_ms: int, *, days: bool
) -> Iterable[tuple[str, int]]:
    """The range as ("day", day) for whole finished days (with `days`), ("hour", hour) for
    finished hours and ("live", hour) for the others."""
    hour = start_hour
    while hour < end_hour:
        day = hour // 24
        whole = hour % 24 == 0 and hour + 24 <= end_hour
        if days and whole and (day + 1) * 86_400_000 + GRACE_MS <= now_ms:
            yield "day", day
            hour += 24
            continue
        yield ("hour" if (hour + 1) * 3_600_000 + GRACE_MS <= now_ms else "live"), hour
        hour += 1
