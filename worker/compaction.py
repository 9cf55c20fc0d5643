"""Compaction: the rollups' finished hours and days stored as blocks, by the workers.

The workers' fold duty (Rollups.fold, every second) calls compact_due(): when an hour is over
by GRACE_MS it is compacted, then, once its hours are, its day. One process of the fleet
compacts at a time (a lease), a few periods a tick (COMPACT_PER_TICK), oldest first, so a
backlog (a fleet that was down, an upgrade) is worked off in the background and a reader
finds finished periods compacted.

Compacting an hour turns its cell hashes into one hash of two blocks (worker.cells: views
`all` and `cells`, its tenants kept to `report.tenants_per_hour`), merging what an earlier
compaction stored (late outcomes), adds its cells to the running totals (one block, never
expiring: the Prometheus counters), deletes the cells, takes the hour off the live set and
marks its day pending, all in one transaction. The hour's index, cells and the totals are
WATCHed while they are read, so a fold meanwhile (a late outcome) aborts the compaction, which
the next tick does again: nothing is lost or counted twice.

Compacting a day adds its hours' cells up, keeps its `report.tenants_per_hour` biggest
tenants by spend (the others count as OTHER) and stores the five views (cells.VIEWS) and its
hours' `all` views together (cells.HOURS, for questions by hour) in one hash; it WATCHes the
live set and the pending days, so an hour of the day compacted meanwhile aborts it.
Everything expires `report.retention_days` after its hour or day.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError, WatchError

from worker.cells import (
    ALL,
    EMPTY,
    HOURS,
    SEP,
    VIEWS,
    Block,
    Settings,
    day_label,
    decode,
    hour_label,
    hours_view,
    keep_tenants,
    regroup,
    view,
)
from worker.contract import Keys
from worker.periods import GRACE_MS, READ_HOUR, live_block, numbers, text

COMPACT_PER_TICK = 4
"""Most hours and days one tick compacts (an hour of 300 cells takes a few ms)."""
LEASE_MS = 30_000
"""How long one process may hold the compaction lease (it gives it back when its tick ends;
a process that died holding it delays compaction by this long)."""


def _same(dims: str) -> str:
    return dims


def _total_of(settings: Settings) -> Callable[[str], str]:
    """A cell's running-totals cell: its tenant as ALL, unless metrics.tenant_labels."""
    if settings.tenant_totals:
        return _same
    return lambda dims: f"{dims.rpartition(SEP)[0]}{SEP}{ALL}"


def _block(reply: Any) -> Block:
    return EMPTY if isinstance(reply, Exception) else decode(reply) or EMPTY


async def compact_hour(redis: aioredis.Redis, keys: Keys, settings: Settings, hour: int) -> bool:
    """Compact one finished hour (see the module's docstring); False when it changed
    meanwhile (it is left as it was)."""
    label = hour_label(hour)
    index_key, hour_key = keys.rollup_index(label), keys.rollup_hour(label)
    async with redis.pipeline(transaction=True) as tx:
        await tx.watch(index_key, keys.rollup_totals)
        try:
            names: list[Any] = await tx.hkeys(index_key)
        except ResponseError:  # not a hash: another program's key, left alone
            names = []
        cell_keys = [keys.rollup_cell(label, text(n)[1:]) for n in names if text(n).startswith("K")]
        if cell_keys:
            await tx.watch(*cell_keys)  # then read: a fold meanwhile aborts the transaction
        async with redis.pipeline(transaction=False) as pipe:
            await redis.register_script(READ_HOUR)(keys=[index_key], client=pipe)
            pipe.execute_command("HGET", hour_key, "cells", **{NEVER_DECODE: []})
            pipe.execute_command("GET", keys.rollup_totals, **{NEVER_DECODE: []})
            live_reply, stored, totals = await pipe.execute(raise_on_error=False)
        live = EMPTY if isinstance(live_reply, Exception) else live_block(live_reply)[0]
        tx.multi()  # type: ignore[no-untyped-call]  # redis-py has no hint
        if live.dims:
            cells = keep_tenants(regroup([(_block(stored), _same), (live, _same)]),
                                 settings.tenants_per_hour)  # fmt: skip
            tx.delete(hour_key)
            tx.hset(hour_key, mapping={"all": view(cells, "all").encode(),
                                       "cells": cells.encode()})  # fmt: skip
            tx.expireat(hour_key, (hour + 1) * 3600 + settings.retention_days * 86_400)
            added = regroup([(_block(totals), _same), (live, _total_of(settings))])
            tx.set(keys.rollup_totals, added.encode())
            tx.zadd(keys.rollup_pending, {str(hour // 24): hour // 24})
        if names:
            tx.delete(index_key, *cell_keys)
        tx.zrem(keys.rollup_live, hour)
        try:
            await tx.execute()
        except WatchError:
            return False
    return True


async def compact_day(redis: aioredis.Redis, keys: Keys, settings: Settings, day: int) -> bool:
    """Compact one finished day whose hours are compacted (see the module's docstring);
    False when one of its hours is live or changed meanwhile (it is left as it was)."""
    first = day * 24
    async with redis.pipeline(transaction=True) as tx:
        await tx.watch(keys.rollup_live, keys.rollup_pending)
        if await tx.zrangebyscore(keys.rollup_live, first, first + 23, start=0, num=1):
            return False  # its hours first
        async with redis.pipeline(transaction=False) as pipe:
            for hour in range(first, first + 24):
                key = keys.rollup_hour(hour_label(hour))
                pipe.execute_command("HMGET", key, "cells", "all", **{NEVER_DECODE: []})
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        found = [(hour, _block(reply[0]), _block(reply[1])) for hour, reply in enumerate(replies)
                 if not isinstance(reply, Exception)]  # fmt: skip
        hours = [(block, _same) for _, block, _ in found if block.dims]
        day_key = keys.rollup_day(day_label(day))
        tx.multi()  # type: ignore[no-untyped-call]  # redis-py has no hint
        if hours:
            cells = keep_tenants(regroup(hours), settings.tenants_per_hour)
            by_hour = hours_view((hour, every if every.dims else view(block, "all"))
                                 for hour, block, every in found if block.dims)  # fmt: skip
            tx.delete(day_key)
            tx.hset(day_key, mapping={**{name: view(cells, name).encode() for name in VIEWS},
                                      HOURS: by_hour.encode()})  # fmt: skip
            tx.expireat(day_key, (day + 1 + settings.retention_days) * 86_400)
        tx.zrem(keys.rollup_pending, day)
        try:
            await tx.execute()
        except WatchError:
            return False
    return True


async def compact_due(
    redis: aioredis.Redis, keys: Keys, settings: Settings, now_ms: int, limit: int
) -> int:
    """Compact up to `limit` hours and days that are over by GRACE_MS, oldest first, unless
    another process holds the lease; how many were compacted."""
    last_hour = (now_ms - GRACE_MS) // 3_600_000 - 1
    last_day = (now_ms - GRACE_MS) // 86_400_000 - 1
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(keys.rollup_live, "-inf", last_hour, start=0, num=limit)
        pipe.zrangebyscore(keys.rollup_pending, "-inf", last_day, start=0, num=limit)
        hours, days = await pipe.execute()
    if not hours and not days:
        return 0
    if not await redis.set(keys.rollup_lease, "1", nx=True, px=LEASE_MS):
        return 0
    done = 0
    try:
        for hour in sorted(numbers(hours)):
            done += await compact_hour(redis, keys, settings, hour)
        for day in sorted(numbers(days)):
            if done >= limit:
                break
            done += await compact_day(redis, keys, settings, day)
    finally:
        # If this tick outlasted the lease, another process may hold it now and lose it
        # here: two compactions at once are safe (each WATCHes what it reads), only wasteful.
        await redis.delete(keys.rollup_lease)
    return done
