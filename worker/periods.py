"""Reading the rollups: which stored periods cover a range of hours, read at one instant.

An hour is live while it has cell hashes (worker.rollups: the set of live hours lists it);
the workers compact it once it is over (worker.compaction) into a finished hour, one hash of
two blocks (worker.cells: views `all` and `cells`), and each finished day into one hash of
five views and its hours' `all` views (cells.HOURS). A late outcome (a worker whose clock
is behind) makes a compacted hour live again, until the next compaction merges it in; its
day then waits to be compacted again (the set of pending days lists it). So a range reads:

- whole days that are over, with no live hour and not pending: the day's view (by hour:
  its HOURS, when the question needs no tenant; a day compacted before days had the view
  is read from its hours or its cells instead, under the same WATCH);
- every other hour: its finished block, and its live cells if it is live.

The view is the smallest that keeps the dimensions the question needs (cells.view_for).

Readers never write. A read is one round trip for the blocks and the live hours (each live
hour read by a script, so at one instant), between a WATCH of the live hours and pending
days and an empty transaction: a compaction in between (it always changes one of those sets)
makes the read start again, so an outcome is never counted in both its live and its
compacted form, nor in neither.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import WatchError

from worker.cells import (
    EMPTY,
    HOURS,
    INDEX,
    VIEWS,
    Block,
    build,
    day_label,
    decode,
    hour_label,
    regroup,
    split,
    view_for,
)
from worker.contract import Keys

GRACE_MS = 3_600_000
"""An hour (a day) is compacted this long after it ended, when no outcome should still
arrive (one that does is merged in by the next compaction)."""
HOUR_VIEWS = ("all", "cells")
DAY_VIEWS = tuple(VIEWS)
NEWER_DAY_VIEWS = (HOURS, "model-tenant")
"""Views days compacted by older versions lack: read from the day's hours or cells instead."""
ATTEMPTS = 20
_INT64 = 2**63

# An hour's live cells at one instant: {cell id, dims, {metric, amount, ...}, ...}. A cell
# hash that is not a hash (another program's key) is left out, not the hour.
READ_HOUR = """
local index = redis.pcall('HGETALL', KEYS[1])
if type(index) ~= 'table' or index.err then return {} end
local out = {}
for i = 1, #index, 2 do
  local name = index[i]
  if name:sub(1, 1) == 'K' then
    local fields = redis.pcall('HGETALL', KEYS[1] .. ':' .. name:sub(2))
    if type(fields) == 'table' and not fields.err then
      out[#out + 1] = name:sub(2)
      out[#out + 1] = index[i + 1]
      out[#out + 1] = fields
    end
  end
end
return out
"""


def text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _valid(dims: str) -> bool:
    """Dims as our writers store them: four parts, valid UTF-8 (not another program's)."""
    if split(dims) is None:
        return False
    try:
        dims.encode()
    except UnicodeEncodeError:
        return False
    return True


def live_block(reply: Any) -> tuple[Block, list[str]]:
    """READ_HOUR's reply as a block, and the ids of its cells."""
    cells: list[tuple[str, list[int]]] = []
    ids: list[str] = []
    for k in range(0, len(reply) - 2, 3):
        dims, fields = text(reply[k + 1]), reply[k + 2]
        if not _valid(dims):
            continue
        pairs: list[int] = []
        for name, value in zip(fields[::2], fields[1::2], strict=True):
            n = INDEX.get(text(name))
            try:
                amount = int(value)
            except ValueError:
                continue
            if n is not None and amount and -_INT64 < amount < _INT64:  # else not ours
                pairs += (n, amount)
        ids.append(text(reply[k]))
        cells.append((dims, pairs))
    return build(cells), ids


@dataclass(frozen=True, slots=True)
class Part:
    """A stored period read: `hours` hours from start_hour (1 or 24), and its cells; with
    `by_hour`, a day's cells.HOURS view (each cell's dims start with its hour of the day)."""

    start_hour: int
    hours: int
    block: Block
    by_hour: bool = False


Read = tuple[Literal["day", "hour", "live", "totals"], int, str]
"""What to read: a day's view, a finished hour's view, a live hour's cells, the running
totals (the number and view unused where they do not apply)."""


def plan(
    start_hour: int, end_hour: int, now_ms: int, live: Collection[int], pending: Collection[int],
    needs: Iterable[str], *, days: bool,
) -> list[Read]:  # fmt: skip
    """The reads that cover hours [start_hour, end_hour) (see the module's docstring); whole
    days only with `days`, or as their hours (cells.HOURS) when the hours' `all` view keeps
    what is needed."""
    wanted = list(needs)
    hour_view, day_view = view_for(wanted, HOUR_VIEWS), view_for(wanted, DAY_VIEWS)
    if not days and hour_view == "all":  # by hour: a day's hours in one view
        day_view = HOURS
    live_hours = set(live)
    out: list[Read] = []
    hour = start_hour
    while hour < end_hour:
        day = hour // 24
        whole = hour % 24 == 0 and hour + 24 <= end_hour
        over = (day + 1) * 86_400_000 + GRACE_MS <= now_ms
        if (
            (days or day_view == HOURS)
            and whole
            and over
            and day not in pending
            and not live_hours & {*range(hour, hour + 24)}
        ):
            out.append(("day", day, day_view))
            hour += 24
            continue
        out.append(("hour", hour, hour_view))
        if hour in live_hours:
            out.append(("live", hour, ""))
        hour += 1
    return out


async def _fetch(redis: aioredis.Redis, keys: Keys, reads: list[Read]) -> list[Block | None]:
    """The blocks of these reads, in one round trip (None: no such value)."""
    script = redis.register_script(READ_HOUR)
    async with redis.pipeline(transaction=False) as pipe:
        for kind, n, name in reads:
            if kind == "live":
                await script(keys=[keys.rollup_index(hour_label(n))], client=pipe)
            elif kind == "totals":
                pipe.execute_command("GET", keys.rollup_totals, **{NEVER_DECODE: []})
            else:
                key = keys.rollup_day(day_label(n)) if kind == "day" else keys.rollup_hour(
                    hour_label(n))  # fmt: skip
                pipe.execute_command("HGET", key, name, **{NEVER_DECODE: []})
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    out: list[Block | None] = []
    for (kind, _, _), reply in zip(reads, replies, strict=True):
        if isinstance(reply, Exception):  # not ours (another program's key): nothing there
            out.append(EMPTY)
        elif kind == "live":
            out.append(live_block(reply)[0])
        elif reply is None:
            out.append(None)
        else:
            out.append(decode(reply) or EMPTY)
    return out


def _older(read: Read, block: Block | None) -> bool:
    """Whether a read is of a view its day lacks (compacted by an older version)."""
    return read[0] == "day" and read[2] in NEWER_DAY_VIEWS and block is None


async def _older_days(
    redis: aioredis.Redis, keys: Keys, reads: list[Read], found: list[Block | None]
) -> tuple[list[Read], list[Block | None]]:
    """The reads with those of views their days lack replaced by reads of the day's hours
    (HOURS) or cells (the caller still WATCHes what it read)."""
    more: list[Read] = []
    for read, block in zip(reads, found, strict=True):
        if _older(read, block):
            day = read[1]
            more += ([("hour", h, "all") for h in range(day * 24, day * 24 + 24)]
                     if read[2] == HOURS else [("day", day, "cells")])  # fmt: skip
    if not more:
        return reads, found
    pairs = [(r, b) for r, b in zip(reads, found, strict=True) if not _older(r, b)]
    pairs += zip(more, await _fetch(redis, keys, more), strict=True)
    return [r for r, _ in pairs], [b for _, b in pairs]


def numbers(members: Iterable[Any]) -> set[int]:
    out = set()
    for member in members:
        try:
            out.add(int(member))
        except ValueError:
            continue  # not ours
    return out


async def at_one_instant(
    redis: aioredis.Redis, keys: Keys, make: Callable[[set[int], set[int]], list[Read]]
) -> tuple[list[Read], list[Block]]:
    """Read what make(live hours, pending days) asks for, at one instant (see the module's
    docstring)."""
    for _ in range(ATTEMPTS):
        async with redis.pipeline(transaction=True) as tx:
            await tx.watch(keys.rollup_live, keys.rollup_pending)
            live = numbers(await tx.zrange(keys.rollup_live, 0, -1))
            pending = numbers(await tx.zrange(keys.rollup_pending, 0, -1))
            reads = make(live, pending)
            found = await _fetch(redis, keys, reads)
            reads, found = await _older_days(redis, keys, reads, found)
            blocks = [block or EMPTY for block in found]
            tx.multi()  # type: ignore[no-untyped-call]  # redis-py has no hint
            try:
                await tx.execute()
            except WatchError:
                continue  # a compaction meanwhile: read again
            return reads, blocks
    raise RuntimeError("the rollups kept being compacted while they were read")


async def read(
    redis: aioredis.Redis, keys: Keys, start_hour: int, end_hour: int, now_ms: int,
    needs: Iterable[str] = (), *, days: bool = True,
) -> list[Part]:  # fmt: skip
    """The cells of hours [start_hour, end_hour), in the smallest views that keep the
    dimensions `needs` names: as whole days where it can (with `days`), else hours."""
    wanted = list(needs)

    def make(live: set[int], pending: set[int]) -> list[Read]:
        return plan(start_hour, end_hour, now_ms, live, pending, wanted, days=days)

    reads, blocks = await at_one_instant(redis, keys, make)
    return [Part(n * 24 if kind == "day" else n, 24 if kind == "day" else 1, block, name == HOURS)
            for (kind, n, name), block in zip(reads, blocks, strict=True)]  # fmt: skip


async def read_hours(redis: aioredis.Redis, keys: Keys, hours: Iterable[int]) -> dict[int, Block]:
    """Each of these hours' cells (tenants included), finished and live parts together."""
    wanted = sorted(set(hours))

    def make(live: set[int], _: set[int]) -> list[Read]:
        reads: list[Read] = [("hour", h, "cells") for h in wanted]
        return reads + [("live", h, "") for h in wanted if h in live]

    reads, blocks = await at_one_instant(redis, keys, make)
    parts: dict[int, list[Block]] = {}
    for (_, hour, _), block in zip(reads, blocks, strict=True):
        parts.setdefault(hour, []).append(block)
    return {hour: _together(found) for hour, found in parts.items()}


def _together(blocks: list[Block]) -> Block:
    blocks = [b for b in blocks if b.dims]
    if len(blocks) <= 1:
        return blocks[0] if blocks else EMPTY
    return regroup([(b, lambda d: d) for b in blocks])


async def totals_and_live(redis: aioredis.Redis, keys: Keys) -> tuple[Block, list[Block]]:
    """The running totals (every compacted hour) and the cells of every live hour, at one
    instant: each outcome is in exactly one of them."""

    def make(live: set[int], _: set[int]) -> list[Read]:
        return [("totals", 0, ""), *(("live", h, "") for h in sorted(live))]

    _, (totals, *live) = await at_one_instant(redis, keys, make)
    return totals, live
