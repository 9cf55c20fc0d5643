"""Reading stream entries as bytes, whoever wrote them: the operator's commands' reader.

`tokenq dead`, `tokenq jobs remove` and `tokenq consumers` read entries as bytes: a dead letter
or a job entry holds whatever a producer sent (any bytes, any fields, any size), and an
operator command has to show it, not crash on it. `scan` reads and filters a stream in pages
inside a server-side script and cuts every value, so a huge entry never travels.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE


def raw_command(redis: aioredis.Redis, *args: Any, **options: Any) -> Awaitable[Any]:
    """A command whose reply stays bytes whatever the client decodes (redis-py's own option,
    the one its DUMP uses)."""
    options[NEVER_DECODE] = []
    return redis.execute_command(*args, **options)  # type: ignore[no-untyped-call]  # no hints


def escaped(raw: bytes) -> str:
    """Bytes as the worker reads them: what is not UTF-8 kept as surrogate escapes."""
    return raw.decode("utf-8", "surrogateescape")


def shown(raw: bytes) -> str:
    """Bytes from a stream as text: what is not UTF-8 shows as \\xNN."""
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class Entry:
    """A stream entry read back as bytes, whoever wrote it."""

    entry_id: str
    raw: dict[bytes, bytes]
    # Values longer than the reader asked for were cut: field name -> full length in bytes.
    cut: dict[bytes, int] = field(default_factory=dict)

    @property
    def fields(self) -> dict[str, str]:
        """Names and values as text (see shown)."""
        return {shown(k): shown(v) for k, v in self.raw.items()}

    @property
    def lossless(self) -> dict[str, str]:
        """Names and values as the worker reads them: bytes that are not UTF-8 kept as
        surrogate escapes (worker.admission finds them)."""
        return {escaped(k): escaped(v) for k, v in self.raw.items()}

    def get(self, name: str) -> str | None:
        """One field's value as text; None when the entry has no such field."""
        value = self.raw.get(name.encode())
        return None if value is None else shown(value)


# KEYS: a stream. ARGV: XRANGE or XREVRANGE, then its two bounds in the command's order, the
# most entries to look at, the most to return, the longest value returned (longer ones are
# cut), then filters: a field name, a count n and n accepted values, repeated; an entry is
# returned when, for every filter, it has the field with one of the values. Returns {the last
# id looked at ('' at the stream's end), rows}, a row being {id, fields, cuts} with cuts
# {name, full length, ...}. One entry per XRANGE, cut at once: a huge entry never travels.
_SCAN = """
local filters, i = {}, 7
while i <= #ARGV do
  local accepted = {}
  for j = 1, tonumber(ARGV[i + 1]) do accepted[ARGV[i + 1 + j]] = true end
  filters[ARGV[i]] = accepted
  i = i + 2 + tonumber(ARGV[i + 1])
end
local examine, want, cut = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local from, rows, seen = ARGV[2], {}, 0
while seen < examine and #rows < want do
  local got = redis.call(ARGV[1], KEYS[1], from, ARGV[3], 'COUNT', 1)
  if #got == 0 then return {'', rows} end
  local id, flat = got[1][1], got[1][2]
  seen = seen + 1
  from = '(' .. id
  local match = true
  for name, accepted in pairs(filters) do
    local value = false
    for k = 1, #flat, 2 do
      if flat[k] == name then value = flat[k + 1] break end
    end
    if not (value and accepted[value]) then match = false break end
  end
  if match then
    local cuts = {}
    for k = 2, #flat, 2 do
      if #flat[k] > cut then
        cuts[#cuts + 1] = flat[k - 1]
        cuts[#cuts + 1] = #flat[k]
        flat[k] = string.sub(flat[k], 1, cut)
      end
    end
    rows[#rows + 1] = {id, flat, cuts}
  end
end
return {string.sub(from, 2), rows}
"""
SCAN_PAGE = 500  # entries one script call looks at: a few milliseconds of the server's time


async def scan(
    redis: aioredis.Redis,
    key: str,
    *,
    match: Mapping[str, Collection[str]] | None = None,
    low: str = "-",
    high: str = "+",
    newest_first: bool = False,
    limit: int | None = None,
    cut_bytes: int,
) -> list[Entry]:
    """The entries of a stream whose fields match (`match`: field -> accepted values), with
    ids from `low` to `high` (XRANGE bounds), oldest or newest first, at most `limit`, each
    value cut to cut_bytes. Reads pages of SCAN_PAGE entries in a server-side script."""
    command, start, stop = ("XREVRANGE", high, low) if newest_first else ("XRANGE", low, high)
    filters: list[bytes | str | int] = []
    for name, accepted in (match or {}).items():
        filters += [name, len(accepted), *(v.encode("utf-8", "surrogateescape") for v in accepted)]
    out: list[Entry] = []
    while limit is None or len(out) < limit:
        want = SCAN_PAGE if limit is None else min(SCAN_PAGE, limit - len(out))
        page = [command, start, stop, SCAN_PAGE, want, cut_bytes, *filters]
        last, rows = await raw_command(redis, "EVAL", _SCAN, 1, key, *page)
        for entry_id, flat, cuts in rows:
            raw = dict(zip(flat[::2], flat[1::2], strict=True))
            cut = dict(zip(cuts[::2], (int(n) for n in cuts[1::2]), strict=True))
            out.append(Entry(entry_id.decode(), raw, cut))
        if not last:
            break
        start = f"({last.decode()}"
    return out
