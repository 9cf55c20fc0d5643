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
from worker.contract import GROUP

# KEYS[1]: the job stream, then every key the writes name. ARGV: group, entry id, consumer,
# then the writes, each a count n and n arguments; an argument is 'k' and the index of a key
# in KEYS, or 'v' and the value itself. The pseudo-command REPLY k<i> v<result> XADDs a result
# to a stream, or to a key that does not exist, and to nothing else (a reply never fails the
# write nor turns another key into a stream). The pseudo-command ROLLUP k<i> RPUSHes onto a
# list the fields of the XADD just before it (after its '*'), as one MessagePack array of
# strings (a job's outcome for worker.rollups: the client sends nothing twice). Nothing is
# written unless the entry is pending under the consumer: 0; else every write: 1.
_FENCED = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #rows == 0 or rows[1][2] ~= ARGV[3] then return 0 end
local i, prev = 4, nil
while i <= #ARGV do
  local n, cmd = tonumber(ARGV[i]), {}
  for j = 1, n do
    local a = ARGV[i + j]
    if string.byte(a, 1) == 107 then cmd[j] = KEYS[tonumber(string.sub(a, 2))]
    else cmd[j] = string.sub(a, 2) end
  end
  if cmd[1] == 'REPLY' then
    local t = redis.call('TYPE', cmd[2]).ok
    if t == 'stream' or t == 'none' then redis.call('XADD', cmd[2], '*', 'result', cmd[3]) end
  elseif cmd[1] == 'ROLLUP' then
    local s = 3
    while prev[s] ~= '*' do s = s + 1 end
    redis.call('RPUSH', cmd[2], cmsgpack.pack({unpack(prev, s + 1)}))
  else
    redis.call(unpack(cmd))
    prev = cmd
  end
  i = i + n + 1
end
return 1
"""

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


class Key(str):
    """A key name in Writes.add (every other argument is a value)."""


class Writes:
    """Commands to run only while one entry is pending under one consumer (see the module
    docstring). Build them with add(), then run() or into()."""

    def __init__(self, stream: str, entry_id: str, consumer: str) -> None:
        self.keys: list[str] = [stream]
        self.args: list[Any] = [GROUP, entry_id, consumer]

    def add(self, *parts: Key | str | bytes | int | float) -> None:
        """One command: its name and arguments; Key(...) marks the key names among them."""
        self.args.append(len(parts))
        for part in parts:
            if isinstance(part, Key):
                self.keys.append(part)
                self.args.append(f"k{len(self.keys)}")
            elif isinstance(part, bytes):
                self.args.append(b"v" + part)
            else:
                self.args.append(f"v{part}")

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
