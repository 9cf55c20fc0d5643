"""Writes fenced by who holds an entry: a job's end, its deferral, its run and its renewal
apply only while the entry is pending under the consumer that writes them.

A worker whose renewals stopped for longer than the visibility timeout (a Redis outage, a long
pause) is presumed dead, and another worker takes its jobs over (XAUTOCLAIM), though it may be
alive and still working on them. Without a fence both would end such a job: two results, two
usage events, and one of the two runs' calls in neither. With it the presumed-dead worker
writes nothing for a job it no longer holds (Queue.finish and friends return False): the
worker that took it over reports the call that was in flight as an orphan (worker.calls) and
ends the job once.

`Writes` collects Redis commands for one entry; `_FENCED` checks the entry's holder in the
group's pending list and runs them, all or none, in one script (on its own, or queued on a
transaction the caller executes: the batcher's, fenced by its lease besides).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from worker import trips
from worker.budgets import RESERVE_FUNCTION, SETTLE_FUNCTION, Reservation, Settlement
from worker.contract import GROUP
from worker.rollups import entry_of

# KEYS[1]: the job stream, then the key of each write, in order. ARGV: group, entry id,
# consumer, then the writes, each a count n, the command's name and its n arguments after its
# key (every write names one key, its first argument: KEYS[1 + the write's place]); the values
# pass untouched, no per-argument tag. Pseudo-commands: REPLY <key> <result> XADDs a result to
# a stream, or to a key that does not exist, and to nothing else (a reply never fails the write
# nor turns another key into a stream). EVENT <key> <maxlen> <packed> XADDs (MAXLEN ~) an
# entry whose fields are `packed`, one MessagePack array of field names and values. ROLLUP
# <key> RPUSHes onto a list the packed fields of the EVENT just before it, those very bytes (a
# job's outcome for worker.rollups: the client sends nothing twice). RESERVE <keys> <caps>
# <arguments>, the first write when there is one, is a budget reservation (worker.budgets
# reserve(): 2 keys a cap): when it refuses, nothing is written and the script returns {0,
# the refusal: cap index, dimension, spent, held}. SETTLE <keys> <caps> <arguments> settles a
# hold (worker.budgets settle()). Nothing is written unless the entry is pending under the
# consumer: 0; else every write: 1, or {1, caps...} when settling brought caps to their alert
# fraction (their 1-based places among the caps of every SETTLE, in order).
_FENCED = (
    RESERVE_FUNCTION
    + SETTLE_FUNCTION
    + """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #rows == 0 or rows[1][2] ~= ARGV[3] then return 0 end
local i, k, event, alerts, settled = 4, 2, nil, {1}, 0
while i <= #ARGV do
  local n, name, key = tonumber(ARGV[i]), ARGV[i + 1], KEYS[k]
  if name == 'EVENT' then
    event = ARGV[i + 3]
    redis.call('XADD', key, 'MAXLEN', '~', ARGV[i + 2], '*', unpack(cmsgpack.unpack(event)))
  elseif name == 'ROLLUP' then
    redis.call('RPUSH', key, event)
  elseif name == 'RESERVE' then
    local caps = tonumber(ARGV[i + 2])
    local refused = reserve(KEYS, k, caps, ARGV, i + 3)
    if refused then return {0, unpack(refused)} end
    k = k + 2 * caps - 1
  elseif name == 'SETTLE' then
    local caps = tonumber(ARGV[i + 2])
    for _, j in ipairs(settle(KEYS, k, caps, ARGV, i + 3)) do alerts[#alerts + 1] = settled + j end
    settled, k = settled + caps, k + 2 * caps - 1
  elseif name == 'REPLY' then
    local t = redis.call('TYPE', key).ok
    if t == 'stream' or t == 'none' then redis.call('XADD', key, '*', 'result', ARGV[i + 2]) end
  else
    redis.call(name, key, unpack(ARGV, i + 2, i + 1 + n))
  end
  i, k = i + 2 + n, k + 1
end
if #alerts > 1 then return alerts end
return 1
"""
)

# KEYS: a job stream. ARGV: group, consumer, entry ids. Resets the idle time of the entries
# still pending under the consumer (XCLAIM JUSTID); one another consumer holds is left to it.
_RENEW = """
local renewed = 0
for j = 3, #ARGV do
  local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[j], ARGV[j], 1)
  if #rows == 1 and rows[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[j], 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
"""


class Writes:
    """Commands to run only while one entry is pending under one consumer (see the module
    docstring). Build them with add(), then run() or into()."""

    def __init__(self, stream: str, entry_id: str, consumer: str) -> None:
        self.keys: list[str] = [stream]
        self.args: list[Any] = [GROUP, entry_id, consumer]

    def add(self, command: str, key: str, *args: str | bytes | int | float) -> None:
        """One write: a command (or a pseudo-command of the script), the one key it writes,
        then its other arguments."""
        self.keys.append(key)
        self.args += [len(args), command, *args]

    def event(self, key: str, maxlen: int, fields: dict[str, str]) -> None:
        """XADD (MAXLEN ~) of an entry whose fields go packed in one argument (EVENT: one
        instead of two a field, and a ROLLUP after it pushes those same bytes)."""
        self.add("EVENT", key, maxlen, entry_of(fields))

    def reserve(self, r: Reservation) -> None:
        """A budget reservation, taken with the writes that follow or refused without any
        (the first write: nothing may come before it)."""
        if len(self.keys) > 1:
            raise ValueError("a reservation must be the first of the writes")
        self._budget("RESERVE", r)

    def settle(self, s: Settlement) -> None:
        """A budget settlement (its caps that reach their alert fraction are named in the
        reply: see the script)."""
        self._budget("SETTLE", s)

    def _budget(self, name: str, b: Reservation | Settlement) -> None:
        # Two keys and the arguments of each cap, after the count of caps (see the script).
        self.keys += b.keys
        self.args += [len(b.args) + 1, name, len(b.caps), *b.args]

    def into(self, tx: Any, script: AsyncScript) -> None:
        """Queue the fenced script on a pipeline or transaction the caller executes."""
        tx.scripts.add(script)  # the pipeline loads it before it executes, as Script does
        tx.evalsha(script.sha, len(self.keys), *self.keys, *self.args)

    async def run(self, script: AsyncScript) -> bool:
        """Run them now; whether they applied (False: the entry is not the consumer's)."""
        applied: Any = await script(keys=self.keys, args=self.args)
        return bool(int(applied))


def scripts(redis: aioredis.Redis) -> tuple[AsyncScript, AsyncScript]:
    """The fenced writes' script and the fenced renewal's, registered on a client."""
    return trips.register(redis, _FENCED), trips.register(redis, _RENEW)


async def renew(script: AsyncScript, stream: str, consumer: str, ids: list[str]) -> int:
    """Reset the idle time of the entries still pending under `consumer`; how many."""
    renewed: Any = await script(keys=[stream], args=[GROUP, consumer, *ids])
    return int(renewed)


def applied(reply: Any) -> list[int] | None:
    """What the fenced script said of a job's end: None, not written (the entry is not the
    consumer's); else the places of the settled caps that reached their alert fraction (see
    the script), usually none."""
    if isinstance(reply, list):
        return [int(j) for j in reply[1:]]
    return [] if int(reply) else None
