"""The deferred set: jobs put off by a policy (`defer`), and copies of a job waiting for its
first entry to finish, back on their streams when they are due.

`<prefix>:deferred` is a sorted set of `{"p": priority, "f": fields}` members scored by the
time (ms) they are due (worker.queue writes them, acknowledging the entry in the same MULTI).
Every worker moves the due ones back every second: one script moves a page; a member the
script cannot move (more fields than one XADD takes, or not readable) is moved from Python on
its own, or dead-lettered when it is not a job, so that one member never blocks the rest.
Two movers never move one member twice: the script removes what it adds, and the Python path
WATCHes the set.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from worker.contract import Keys, as_text

log = logging.getLogger("tokenq.queue")

# KEYS: the deferred set, then the job streams in the order of ARGV[3..] (their priorities).
# ARGV: now ms, most to move. A member is {"p": priority, "f": fields}; an unknown priority
# goes to the middle stream. A member the script cannot move in one call (more fields than
# Lua passes to one XADD, or not readable) is left to the caller: reply {moved, left members}.
_MOVE_DUE = """
local streams = {}
for j = 3, #ARGV do streams[ARGV[j]] = KEYS[j - 1] end
local fallback = KEYS[2 + math.floor((#KEYS - 1) / 2)]
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved, left = 0, {}
for _, member in ipairs(due) do
  local ok, job = pcall(cjson.decode, member)
  local args = {}
  local fits = ok and type(job) == 'table' and type(job.f) == 'table'
  if fits then
    for k, v in pairs(job.f) do
      if type(k) ~= 'string' or type(v) ~= 'string' or #args >= LUA_MAX_ARGS then
        fits = false
        break
      end
      args[#args + 1] = k
      args[#args + 1] = v
    end
  end
  if fits and #args > 0 then
    redis.call('XADD', streams[job.p] or fallback, '*', unpack(args))
    redis.call('ZREM', KEYS[1], member)
    moved = moved + 1
  else
    left[#left + 1] = member
  end
end
return {moved, left}
""".replace("LUA_MAX_ARGS", "2000")  # unpack() fails past ~8000 values; stay well below


class DeferredSet:
    """The deferred set of one key prefix, moving jobs back onto these priorities' streams."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, priorities: list[str]) -> None:
        self.redis = redis
        self.keys = keys
        self.priorities = list(priorities)
        self.streams = {p: keys.jobs(p) for p in priorities}
        self._move = redis.register_script(_MOVE_DUE)

    async def move_due(self, now_ms: int, count: int = 500) -> int:
        """Put deferred jobs that are due back on their streams; how many were moved.

        One script moves them; a member it leaves (a job of thousands of fields, or one that
        does not decode) is moved here on its own, so that one member never blocks the rest.
        """
        keys = [self.keys.deferred, *self.streams.values()]
        reply: Any = await self._move(keys=keys, args=[now_ms, count, *self.priorities])
        moved, left = int(reply[0]), [as_text(m) for m in reply[1]]
        for member in left:
            moved += await self._move_one(member)
        return moved

    async def _move_one(self, member: str) -> int:
        """Move one deferred member from Python: 1 when it went back on a stream, 0 when it
        was not a job (it goes to the dead letters with its text, cut) or changed meanwhile."""
        try:
            job = json.loads(member)
            priority, fields = job["p"], job["f"]
            if not (
                isinstance(fields, dict)
                and fields
                and all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
            ):
                raise ValueError("its fields are not a map of strings")
        except (ValueError, KeyError, TypeError) as exc:
            log.error(
                "a member of %s is not a deferred job (%s); it goes to %s",
                self.keys.deferred,
                exc,
                self.keys.dead,
            )
            dead = {
                "error_type": "malformed_job",
                "member": member[:1024],
                "attempts": "0",
                "error": f"a member of {self.keys.deferred} is not a deferred job ({exc}); "
                "it was removed from the set, its text (cut to 1024 characters) is kept here.",
            }
            async with self.redis.pipeline(transaction=True) as tx:
                tx.xadd(self.keys.dead, _fields(dead))
                tx.zrem(self.keys.deferred, member)
                await tx.execute()
            return 0
        middle = self.streams[self.priorities[len(self.priorities) // 2]]
        stream = self.streams.get(str(priority), middle)
        for _ in range(20):
            try:
                async with self.redis.pipeline(transaction=True) as tx:
                    await tx.watch(self.keys.deferred)  # another mover must not move it too
                    if await tx.zscore(self.keys.deferred, member) is None:
                        return 0
                    tx.multi()  # type: ignore[no-untyped-call]  # redis-py has no hint
                    tx.xadd(stream, _fields(fields))
                    tx.zrem(self.keys.deferred, member)
                    await tx.execute()
                    return 1
            except WatchError:
                continue  # the set changed (a deferral elsewhere): look again
        return 0


def _fields(fields: dict[str, str]) -> dict[Any, Any]:
    """redis-py's stubs want invariant dicts of unions; a dict of str is one at runtime."""
    return fields
