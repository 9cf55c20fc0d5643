"""Stream I/O: consumer groups, priority reads, reclaiming, renewing, and the finishing writes.

Only this module says XREADGROUP, XACK or XAUTOCLAIM.

Priorities. Job streams are read highest priority first: a read takes what it can from the
highest stream that has entries before it looks at the next. So that lower priorities are not
starved under sustained load, every `fair_every`-th read (default 10) first takes one entry from a
lower-priority stream, going round the lower streams in turn (normal, low, normal, ...), and then
continues in strict order. Under a full backlog of every priority, each lower stream so gets at
least one job in every `fair_every * (number of priorities - 1)` reads.

Delivery and reclaiming. A delivery stays in the group's pending list (PEL) until the job is
finished. The worker renews its deliveries (XCLAIM JUSTID resets their idle time) every third of
the visibility timeout, so a slow call is never taken away; a delivery whose worker died stops
being renewed, and after the visibility timeout any worker reclaims it with XAUTOCLAIM, before it
reads new entries. Nothing is acknowledged before its result and usage event are written: both
`finish` and `ack_duplicate` run as one MULTI together with the XACK.

Batch priorities (config batch.priorities) are left out of a worker's reads and reclaims: only
the batcher reads them, as consumer `batcher` (see worker.batcher), with `take`, `stale`,
`own_pending` and `fetch`, and finishes them with `finish_into` and `requeue_into` inside its
own transactions.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError, WatchError

from worker.contract import (
    GROUP,
    ErrorInfo,
    Job,
    Keys,
    Result,
    UsageEvent,
    entry_ms,
    fingerprint,
    id_problem,
    to_fields,
)
from worker.rollups import Rollups, execute

log = logging.getLogger("tokenq.queue")


@dataclass(slots=True)
class Delivery:
    """One stream entry handed to this worker."""

    priority: str
    stream: str
    entry_id: str
    fields: dict[str, str]
    # Set by worker.claims when the job cannot use its own id: the bare entry id belongs to
    # another stream's entry, or the `id` to another job.
    qualified: bool = False
    deliveries: int = 1  # times the group delivered the entry (XPENDING), 1 for a new read
    attempt: int = 0  # the attempt worker.claims counted for this delivery (0: none yet)
    claimed: bool = False  # worker.claims settled its job id

    @property
    def owner(self) -> str:
        """`<priority>:<entry id>`: names this entry uniquely across the priority streams."""
        return f"{self.priority}:{self.entry_id}"

    @property
    def job_id(self) -> str:
        """The key of the job's result: the producer's `id`, else the entry id (the contract).

        Each stream numbers its entries on its own, so two priority streams can hand out the
        same entry id in one millisecond. The first of such a pair keeps the bare entry id;
        the other is `qualified` and uses `<priority>:<entry id>` (see worker.claims). So does
        a job whose `id` breaks the id rules or belongs to a different job: its error result
        must not land where another job's result is awaited.
        """
        explicit = self.fields.get("id")
        if self.qualified or (explicit is not None and id_problem(explicit) is not None):
            return self.owner
        return self.entry_id if explicit is None else explicit


# KEYS: the reply stream. ARGV: the result JSON. Written only to a stream or a new key, so a
# reply never fails the finishing MULTI (WRONGTYPE) nor turns another key into a stream.
_REPLY = """
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'stream' and t ~= 'none' then return 0 end
redis.call('XADD', KEYS[1], '*', 'result', ARGV[1])
return 1
"""

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


@dataclass(frozen=True, slots=True)
class Finish:
    """Everything written when a job ends: result, usage event, optional dead letter."""

    result_json: bytes
    usage: dict[str, str]
    reply_to: str | None = None
    dead: dict[str, str] | None = None


class Queue:
    """The job streams as seen by one consumer (one worker process)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        priorities: list[str],
        consumer: str,
        *,
        visibility_ms: int,
        fair_every: int = 10,
        result_ttl_s: int = 86_400,
        usage_maxlen: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
        batched: Collection[str] = (),
        rollups: Rollups | None = None,
    ) -> None:
        self.redis = redis
        self.rollups = rollups
        self.keys = keys
        self.priorities = list(priorities)
        self.streams = {p: keys.jobs(p) for p in priorities}
        # What read() and the reclaims look at: every priority but the batched ones.
        self.readable = [p for p in priorities if p not in batched]
        self._read_streams = {p: self.streams[p] for p in self.readable}
        self.consumer = consumer
        self.visibility_ms = visibility_ms
        self.fair_every = fair_every
        self.result_ttl_s = result_ttl_s
        self.usage_maxlen = usage_maxlen
        self._clock = clock
        self._reads = 0
        self._fair_turn = 0
        self._buffer: list[Delivery] = []
        self._next_reclaim = 0.0
        self._cursors = dict.fromkeys(self.readable, "0-0")
        self._move = redis.register_script(_MOVE_DUE)

    async def ensure_groups(self) -> None:
        """Create the consumer group on every job stream (and the stream) if missing, and
        load the rollups' script."""
        if self.rollups is not None:
            await self.rollups.load(self.redis)
        for stream in self.streams.values():
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` deliveries: held-back ones, reclaimed ones, then new ones by priority.

        Blocks up to block_ms only when nothing at all is waiting.
        """
        out = self._take(count)
        if len(out) < count and self._clock() >= self._next_reclaim:
            self._next_reclaim = self._clock() + self.visibility_ms / 4000
            await self._reclaim(count)
            out += self._take(count - len(out))
        if len(out) < count:
            out += await self._read_new(count - len(out))
        if not out:
            out = self._take_extra(await self._read_blocking(block_ms), count)
        return out

    def _take(self, count: int) -> list[Delivery]:
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        return taken

    def _take_extra(self, got: list[Delivery], count: int) -> list[Delivery]:
        # Entries already delivered to this consumer but over `count` wait in the buffer
        # (they are in our PEL and renewed like in-flight ones).
        self._buffer.extend(got[count:])
        return got[:count]

    @property
    def held(self) -> list[Delivery]:
        """Deliveries this consumer holds but has not handed out yet."""
        return list(self._buffer)

    async def _read_new(self, count: int) -> list[Delivery]:
        self._reads += 1
        readable = self.readable
        order = [(p, count) for p in readable]
        if len(readable) > 1 and self._reads % self.fair_every == 0:
            lower = readable[1 + self._fair_turn % (len(readable) - 1)]
            self._fair_turn += 1
            order.insert(0, (lower, 1))
        out: list[Delivery] = []
        for priority, limit in order:
            want = min(limit, count - len(out))
            if want <= 0:
                break
            reply = await self._xreadgroup({self.streams[priority]: ">"}, want, None)
            out += reply
        return out

    async def _read_blocking(self, block_ms: int) -> list[Delivery]:
        # COUNT is per stream: one entry from each stream at most, priority order restored below.
        got = await self._xreadgroup({s: ">" for s in self._read_streams.values()}, 1, block_ms)
        return sorted(got, key=lambda d: self.priorities.index(d.priority))

    async def _xreadgroup(
        self, streams: dict[str, str], count: int, block_ms: int | None
    ) -> list[Delivery]:
        try:
            reply: Any = await self.redis.xreadgroup(
                GROUP, self.consumer, _map(streams), count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("consumer group missing (stream deleted?); creating it again")
            await self.ensure_groups()
            return []
        by_stream = {s: p for p, s in self.streams.items()}
        return [
            Delivery(by_stream[stream], stream, entry_id, fields or {})
            for stream, entries in reply or []
            for entry_id, fields in entries
        ]

    async def _reclaim(self, count: int) -> None:
        """Take over deliveries idle past the visibility timeout (their worker died)."""
        for priority, stream in self._read_streams.items():
            try:
                cursor, entries, *_deleted = await self.redis.xautoclaim(
                    stream, GROUP, self.consumer, self.visibility_ms,
                    start_id=self._cursors[priority], count=count,
                )  # fmt: skip
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_groups()
                continue
            self._cursors[priority] = cursor
            # Entries deleted from the stream come back as (id, None): nothing left to run.
            found = [Delivery(priority, stream, i, f) for i, f in entries if f]
            if found:
                log.info("reclaimed %d jobs from %s idle over %d ms", len(found), stream,
                         self.visibility_ms)  # fmt: skip
                await self._count_deliveries(found)
            self._buffer.extend(found)
        await self._forget_dead_consumers()

    async def _count_deliveries(self, ds: list[Delivery]) -> None:
        """Set each delivery's `deliveries` from the group's pending list: the count the job
        boundary uses to dead-letter an entry that keeps failing (worker.Worker._handle)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in ds:
                pipe.xpending_range(d.stream, GROUP, min=d.entry_id, max=d.entry_id, count=1)
            replies: list[Any] = await pipe.execute()
        for d, rows in zip(ds, replies, strict=True):
            if rows:
                d.deliveries = int(rows[0]["times_delivered"])

    async def _forget_dead_consumers(self) -> None:
        """Remove consumers with nothing pending that have not read for a long while."""
        idle_ms = max(10 * self.visibility_ms, 3_600_000)
        for stream in self.streams.values():
            try:
                consumers: Any = await self.redis.xinfo_consumers(stream, GROUP)
            except ResponseError:
                continue
            for c in consumers:
                if c["name"] != self.consumer and c["pending"] == 0 and c["idle"] > idle_ms:
                    await self.redis.xgroup_delconsumer(stream, GROUP, c["name"])

    async def renew(self, deliveries: Iterable[Delivery]) -> None:
        """Reset the idle time of deliveries still being worked on, so nobody reclaims them."""
        by_stream: dict[str, list[str]] = {}
        for d in [*deliveries, *self._buffer]:
            by_stream.setdefault(d.stream, []).append(d.entry_id)
        for stream, ids in by_stream.items():
            await self.redis.xclaim(stream, GROUP, self.consumer, 0, list[Any](ids), justid=True)

    async def finish(self, d: Delivery, job_id: str, end: Finish) -> None:
        """Write result, usage event (and dead letter, reply) and acknowledge, in one MULTI."""
        async with self.redis.pipeline(transaction=True) as tx:
            self.finish_into(tx, d, job_id, end)
            await self.execute(tx)

    async def execute(self, tx: Any) -> list[Any]:
        """Run a transaction holding finish_into's writes (see worker.rollups.execute)."""
        return await execute(self.redis, tx, self.rollups)

    def finish_into(self, tx: Any, d: Delivery, job_id: str, end: Finish) -> None:
        """Queue finish()'s writes on a transaction the caller executes (the batcher's)."""
        if end.dead is not None:
            tx.xadd(self.keys.dead, _map(end.dead))
        tx.set(self.keys.result(job_id), end.result_json, ex=self.result_ttl_s)
        tx.xadd(self.keys.usage, _map(end.usage), maxlen=self.usage_maxlen, approximate=True)
        if end.reply_to:
            self.reply_into(tx, end.reply_to, end.result_json)
        # Wakes result() waiters; short-lived, the result key itself is the record.
        tx.rpush(self.keys.done(job_id), 1)
        tx.expire(self.keys.done(job_id), min(self.result_ttl_s, 300))
        if self.rollups is not None:  # the outcome's share of the hourly rollups and totals
            self.rollups.add_into(tx, end.usage)
        self._ack(tx, d, job_id)

    def reply_into(self, tx: Any, reply_to: str, result_json: bytes | str) -> None:
        """Queue the XADD of a result onto a reply_to stream: skipped (atomically, in Lua)
        when the key has become something other than a stream since the job was admitted."""
        tx.eval(_REPLY, 1, reply_to, result_json)

    async def reply_target(self, name: str) -> str:
        """The type of a reply_to key: `none`, `stream`, or another that rules it out."""
        return as_text(await self.redis.type(name))

    def requeue_into(self, tx: Any, d: Delivery, job_id: str, *, refund: bool) -> None:
        """Queue writes that put a job back at the end of its stream under the same job id
        (a new entry; this one acknowledged and deleted). Its attempts are kept, less the
        last one when `refund` (the attempt was not the job's fault: expired, canceled)."""
        tx.xadd(d.stream, _map({**d.fields, "id": job_id}))
        tx.xack(d.stream, GROUP, d.entry_id)
        tx.xdel(d.stream, d.entry_id)
        if refund:
            tx.hincrby(self.keys.state(job_id), "attempts", -1)

    async def take(self, priority: str, count: int) -> list[Delivery]:
        """Up to `count` new entries of one stream for this consumer, without blocking."""
        return await self._xreadgroup({self.streams[priority]: ">"}, count, None)

    async def stale(self, priority: str, min_idle_ms: int) -> list[Delivery]:
        """Take over the entries other consumers of one stream left idle over min_idle_ms
        (their process died): the batcher's sweep of the batch streams."""
        stream = self.streams[priority]
        try:
            consumers: Any = await self.redis.xinfo_consumers(stream, GROUP)
        except ResponseError:
            return []
        out: list[Delivery] = []
        for c in consumers:
            if c["name"] == self.consumer or c["pending"] == 0:
                continue
            rows: Any = await self.redis.xpending_range(
                stream, GROUP, min="-", max="+", count=1000, consumername=c["name"],
                idle=min_idle_ms,
            )  # fmt: skip
            ids = [r["message_id"] for r in rows]
            if not ids:
                continue
            counts = {as_text(r["message_id"]): int(r["times_delivered"]) + 1 for r in rows}
            claimed: Any = await self.redis.xclaim(stream, GROUP, self.consumer, min_idle_ms, ids)
            out += [
                Delivery(priority, stream, i, f, deliveries=counts.get(i, 1))
                for i, f in claimed
                if f
            ]
        return out

    async def own_pending(self, priority: str) -> list[str]:
        """Every entry id of one stream pending for this consumer, oldest first."""
        stream, start, ids = self.streams[priority], "-", list[str]()
        while True:
            rows: Any = await self.redis.xpending_range(
                stream, GROUP, min=start, max="+", count=1000, consumername=self.consumer
            )
            ids += [str(r["message_id"]) for r in rows]
            if len(rows) < 1000:
                return ids
            start = f"({ids[-1]}"

    async def fetch(self, wanted: list[tuple[str, str]]) -> list[Delivery | None]:
        """The entries (priority, entry id) as deliveries; None for one no longer there."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for priority, entry_id in wanted:
                pipe.xrange(self.streams[priority], entry_id, entry_id)
            replies: list[Any] = await pipe.execute()
        return [
            Delivery(p, self.streams[p], i, dict(r[0][1])) if r else None
            for (p, i), r in zip(wanted, replies, strict=True)
        ]

    async def defer(
        self, d: Delivery, job_id: str, until_ms: int, *, owns_claim: bool = True
    ) -> None:
        """Put a job off until until_ms: it leaves its stream (acknowledged) for the deferred
        set, from which move_due() puts it back, under the same job id, when it is due.

        `owns_claim`: the job holds its id's claim (see worker.claims), which must outlive the
        wait; False for a copy of a job whose first entry is still pending (it waits for it).
        """
        async with self.redis.pipeline(transaction=True) as tx:
            self.defer_into(tx, d, job_id, until_ms, owns_claim=owns_claim)
            await tx.execute()

    def defer_into(
        self, tx: Any, d: Delivery, job_id: str, until_ms: int, *, owns_claim: bool = True
    ) -> None:
        """Queue defer()'s writes on a transaction the caller executes (the batcher's)."""
        fields = {**d.fields, "id": job_id}
        # Not ASCII-escaped: a job's text is valid UTF-8 (worker.admission), and Lua's cjson
        # passes its bytes through unchanged.
        member = json.dumps({"p": d.priority, "f": fields}, sort_keys=True, ensure_ascii=False)
        tx.zadd(self.keys.deferred, {member: until_ms})
        if not owns_claim:
            tx.xack(d.stream, GROUP, d.entry_id)
            tx.xdel(d.stream, d.entry_id)
            return
        self._ack(tx, d, job_id)
        # The claim must outlive the wait (a month for a monthly budget), or the entry put
        # back with its id would be a stranger to it.
        tx.pexpireat(self.keys.state(job_id), until_ms + 86_400_000, gt=True)

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
            if not (isinstance(fields, dict) and fields and all(
                isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
            )):  # fmt: skip
                raise ValueError("its fields are not a map of strings")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("a member of %s is not a deferred job (%s); it goes to %s",
                      self.keys.deferred, exc, self.keys.dead)  # fmt: skip
            dead = {
                "error_type": "malformed_job", "member": member[:1024], "attempts": "0",
                "error": f"a member of {self.keys.deferred} is not a deferred job ({exc}); "
                "it was removed from the set, its text (cut to 1024 characters) is kept here.",
            }  # fmt: skip
            async with self.redis.pipeline(transaction=True) as tx:
                tx.xadd(self.keys.dead, _map(dead))
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
                    tx.xadd(stream, _map(fields))
                    tx.zrem(self.keys.deferred, member)
                    await tx.execute()
                    return 1
            except WatchError:
                continue  # the set changed (a deferral elsewhere): look again
        return 0

    async def is_finished(self, d: Delivery) -> bool:
        """True when d's entry is gone from its stream: finish (or ack_duplicate) deleted it."""
        return not await self.redis.xrange(d.stream, d.entry_id, d.entry_id)

    async def ack_duplicate(self, d: Delivery, job_id: str, reply_to: str | None = None) -> None:
        """Acknowledge a delivery whose job already has a result (the same job sent again, or
        a redelivery); its own reply_to, if any, gets a copy of that result. The id's claim
        is not touched: it is the first entry's."""
        result = await self.redis.get(self.keys.result(job_id)) if reply_to else None
        async with self.redis.pipeline(transaction=True) as tx:
            tx.xack(d.stream, GROUP, d.entry_id)
            tx.xdel(d.stream, d.entry_id)
            if reply_to and result is not None:
                self.reply_into(tx, reply_to, result)
            await tx.execute()

    def _ack(self, tx: Any, d: Delivery, job_id: str) -> None:
        # The entry is deleted too: a finished job's fields live on in the result and the
        # usage event (and the dead letter), and the stream stays as small as the backlog.
        tx.xack(d.stream, GROUP, d.entry_id)
        tx.xdel(d.stream, d.entry_id)
        # The owner field stays as long as the result, so a same-numbered entry of another
        # stream is never mistaken for a redelivery of this one.
        state = self.keys.state(job_id)
        tx.hdel(state, "attempts", "last_error")
        tx.expire(state, self.result_ttl_s)

    async def leave(self) -> None:
        """On clean shutdown: drop this consumer from the groups if it holds nothing."""
        for stream in self.streams.values():
            try:
                consumers: Any = await self.redis.xinfo_consumers(stream, GROUP)
            except ResponseError:
                continue
            if any(c["name"] == self.consumer and c["pending"] == 0 for c in consumers):
                await self.redis.xgroup_delconsumer(stream, GROUP, self.consumer)


def as_text(value: Any) -> str:
    """A Redis reply value as str (clients may decode replies or not)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _map(fields: dict[str, str]) -> dict[Any, Any]:
    """redis-py's stubs want invariant dicts of unions; a dict of str is one at runtime."""
    return fields


DEAD_FIELDS = (
    "error_type", "error", "attempts", "priority", "entry_id", "job_id", "truncated",
    "dropped_fields",
)  # fmt: skip
"""Fields a dead letter adds to the job's own; replay removes them again."""


async def dead_letters(
    redis: aioredis.Redis, keys: Keys, *, count: int = 100
) -> list[tuple[str, dict[str, str]]]:
    """The oldest `count` dead letters as (dead-letter id, fields)."""
    reply: Any = await redis.xrange(keys.dead, count=count)
    return [(str(i), dict(f)) for i, f in reply]


async def replay(redis: aioredis.Redis, keys: Keys, dead_id: str, priorities: list[str]) -> str:
    """Put a dead letter back on its priority stream under its old job id; returns that id.

    Its error result is deleted in the same MULTI, so the replayed job runs again (a result
    would make the worker acknowledge it as a duplicate). Raises LookupError for an unknown id.
    """
    reply: Any = await redis.xrange(keys.dead, dead_id, dead_id)
    if not reply:
        raise LookupError(f"no dead letter {dead_id!r} in {keys.dead}; see `tokenq dead list`")
    fields: dict[str, str] = dict(reply[0][1])
    priority = fields.get("priority", "")
    if priority not in priorities:
        priority = priorities[len(priorities) // 2]
    job_id = dead_job_id(fields)
    job = {k: v for k, v in fields.items() if k not in DEAD_FIELDS}
    job["id"] = job_id
    async with redis.pipeline(transaction=True) as tx:
        tx.delete(keys.result(job_id), keys.state(job_id), keys.done(job_id))
        # The job's claim on its id, as the replayed entry will show it (worker.claims): an
        # entry id as `id` is let in only with the fingerprint of the job that had it.
        tx.hset(keys.state(job_id), mapping={"owner": "replay", "fp": fingerprint(job)})
        tx.expire(keys.state(job_id), 7 * 86_400)
        tx.xadd(keys.jobs(priority), _map(job))
        tx.xdel(keys.dead, dead_id)
        await tx.execute()
    return job_id


def dead_job_id(fields: dict[str, str]) -> str:
    """The job id a dead letter was written under."""
    return fields.get("job_id") or fields.get("id") or fields.get("entry_id", "?")


# -- Operator commands: dead letters, stuck entries, consumers ---------------------------------
#
# `tokenq dead`, `tokenq jobs remove` and `tokenq consumers` read entries as bytes: a dead letter
# or a job entry holds whatever a producer sent (any bytes, any fields, any size), and an
# operator command has to show it, not crash on it.


def _raw(redis: aioredis.Redis, *args: Any, **options: Any) -> Awaitable[Any]:
    """A command whose reply stays bytes whatever the client decodes (redis-py's own option,
    the one its DUMP uses)."""
    options[NEVER_DECODE] = []
    return redis.execute_command(*args, **options)  # type: ignore[no-untyped-call]  # no hints


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
        return {_escaped(k): _escaped(v) for k, v in self.raw.items()}

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
        last, rows = await _raw(redis, "EVAL", _SCAN, 1, key, *page)
        for entry_id, flat, cuts in rows:
            raw = dict(zip(flat[::2], flat[1::2], strict=True))
            cut = dict(zip(cuts[::2], (int(n) for n in cuts[1::2]), strict=True))
            out.append(Entry(entry_id.decode(), raw, cut))
        if not last:
            break
        start = f"({last.decode()}"
    return out


@dataclass(frozen=True, slots=True)
class DeadFilter:
    """Which dead letters an operator means: every condition given holds (several values of
    one condition: any of them)."""

    error_types: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None

    @property
    def match(self) -> dict[str, tuple[str, ...]]:
        named = {"error_type": self.error_types, "feature": self.features, "tenant": self.tenants}
        return {name: values for name, values in named.items() if values}

    @property
    def everything(self) -> bool:
        """True when no condition is given."""
        return not self.match and self.since_ms is None and self.until_ms is None


async def find_dead(
    redis: aioredis.Redis,
    keys: Keys,
    which: DeadFilter = DeadFilter(),  # frozen: one shared default is safe
    *,
    limit: int | None = 100,
    newest_first: bool = True,
    cut_bytes: int = 1 << 20,
) -> list[Entry]:
    """Dead letters matching `which`, newest first unless told otherwise, values cut to
    cut_bytes. Any entry of the stream is returned as it is, tokenq's or not."""
    low = "-" if which.since_ms is None else str(which.since_ms)
    high = "+" if which.until_ms is None else str(which.until_ms)  # a bare ms: to its last id
    return await scan(
        redis,
        keys.dead,
        match=which.match,
        low=low,
        high=high,
        newest_first=newest_first,
        limit=limit,
        cut_bytes=cut_bytes,
    )


async def delete_dead(redis: aioredis.Redis, keys: Keys, dead_ids: Iterable[str]) -> int:
    """Delete these dead letters (XDEL, 500 at a time); how many there were."""
    ids, removed = list(dead_ids), 0
    for n in range(0, len(ids), 500):
        removed += int(await redis.xdel(keys.dead, *ids[n : n + 500]))
    return removed


async def trim_dead(redis: aioredis.Redis, keys: Keys, keep: int) -> int:
    """Keep the newest `keep` dead letters, delete the older ones; how many were deleted."""
    return int(await redis.xtrim(keys.dead, maxlen=keep, approximate=False))


ENTRY_ID = re.compile(r"[0-9]+-[0-9]+")


@dataclass(frozen=True, slots=True)
class Holder:
    """The consumer a pending entry was delivered to: how long ago, how often, and how long
    since that consumer last read or renewed anything (its process's sign of life)."""

    consumer: str
    idle_ms: int
    deliveries: int
    consumer_idle_ms: int


@dataclass(frozen=True, slots=True)
class JobEntry:
    """An entry of a job stream, found by `tokenq jobs remove`."""

    priority: str
    stream: str
    entry: Entry
    job_id: str  # the key of its result: the producer's `id`, else its default id
    holder: Holder | None  # None: no worker has it (not delivered, or no group)

    def held_by_live_worker(self, visibility_ms: int) -> bool:
        """Whether the consumer holding it has shown life within the visibility timeout: a
        live worker that may still finish it."""
        return self.holder is not None and self.holder.consumer_idle_ms < visibility_ms


async def find_job_entries(
    redis: aioredis.Redis, keys: Keys, priorities: list[str], ident: str, *, cut_bytes: int
) -> list[JobEntry]:
    """The job-stream entries `ident` names: an entry id (`<ms>-<seq>`, or
    `<priority>:<entry id>` as a default job id), or a job id given as `id` by a producer.
    Looks in every priority stream; values are cut to cut_bytes."""
    found: list[JobEntry] = []
    for priority in priorities:
        stream = keys.jobs(priority)
        named, _, rest = ident.partition(":")
        entry_id = rest if named == priority else ident
        entries = await scan(redis, stream, match={"id": [ident]}, cut_bytes=cut_bytes)
        if ENTRY_ID.fullmatch(entry_id):
            entries += await scan(redis, stream, low=entry_id, high=entry_id, cut_bytes=cut_bytes)
        seen: set[str] = set()
        for entry in entries:
            if entry.entry_id not in seen:
                seen.add(entry.entry_id)
                job_id = await _job_id_of(redis, keys, priority, entry)
                holder = await _holder(redis, stream, entry.entry_id)
                found.append(JobEntry(priority, stream, entry, job_id, holder))
    return found


async def _job_id_of(redis: aioredis.Redis, keys: Keys, priority: str, entry: Entry) -> str:
    """The key of the entry's result, as the worker would choose it (see Delivery.job_id and
    worker.claims): the producer's `id` when it is a usable id that no other job holds, else
    the entry's own `<priority>:<entry id>`; without an `id`, the default id."""
    qualified = f"{priority}:{entry.entry_id}"
    explicit = entry.raw.get(b"id")
    if explicit is not None:
        text = explicit.decode("utf-8", "surrogateescape")
        if not _is_text(explicit) or id_problem(text) is not None:
            return qualified
        held: Any = await redis.hget(keys.state(text), "fp")
        mine = fingerprint(entry.lossless)
        return text if held in (None, mine) else qualified
    owner: Any = await redis.hget(keys.state(entry.entry_id), "owner")
    return entry.entry_id if owner in (None, qualified) else qualified


def _escaped(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _is_text(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


async def _holder(redis: aioredis.Redis, stream: str, entry_id: str) -> Holder | None:
    try:
        rows: Any = await _raw(
            redis, "XPENDING", stream, GROUP, entry_id, entry_id, 1, parse_detail=True
        )
        consumers: Any = await _raw(redis, "XINFO", "CONSUMERS", stream, GROUP)
    except ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        return None
    if not rows:
        return None
    row = rows[0]
    idle = {c[b"name"]: int(c[b"idle"]) for c in consumers}
    return Holder(
        shown(row["consumer"]),
        int(row["time_since_delivered"]),
        int(row["times_delivered"]),
        idle.get(row["consumer"], int(row["time_since_delivered"])),
    )


@dataclass(frozen=True, slots=True)
class Removal:
    """What `remove_job_entry` wrote: the dead letter, and whether the job got an error
    result (not when its id already had one) and a reply on its reply_to stream."""

    dead_id: str
    result_written: bool
    replied: bool


# KEYS: the job stream, the dead letters, the result, the usage stream, the done list, the
# state hash[, the reply_to stream]. ARGV: group, entry id, result JSON, result TTL s, usage
# maxlen, n, the dead letter's n names and values, the usage event's. Nothing is written when
# the entry is gone (a worker finished it meanwhile): false. A job whose id already has a
# result keeps it, with no second outcome. The reply goes only to a stream, or a key not there.
_REMOVE = """
if redis.call('XDEL', KEYS[1], ARGV[2]) == 0 then return false end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local n = tonumber(ARGV[6])
local dead_id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 7, 6 + n))
if redis.call('EXISTS', KEYS[3]) == 1 then return {dead_id, 0, 0} end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 7 + n))
redis.call('RPUSH', KEYS[5], 1)
redis.call('EXPIRE', KEYS[5], math.min(tonumber(ARGV[4]), 300))
redis.call('HDEL', KEYS[6], 'attempts', 'last_error')
redis.call('EXPIRE', KEYS[6], ARGV[4])
if KEYS[7] then
  local kind = redis.call('TYPE', KEYS[7])['ok']
  if kind == 'stream' or kind == 'none' then
    redis.call('XADD', KEYS[7], '*', 'result', ARGV[3])
    return {dead_id, 1, 1}
  end
end
return {dead_id, 1, 0}
"""
KEPT_FIELDS = 1000  # a dead letter of a removed entry keeps at most this many of its fields
KEPT_BYTES = 1024  # ... each cut to this, when the entry is too large to keep whole
_JOB_FIELDS = [name.encode() for name in Job.__struct_fields__]


async def remove_job_entry(
    redis: aioredis.Redis,
    keys: Keys,
    job: JobEntry,
    *,
    now_ms: int,
    result_ttl_s: int,
    usage_maxlen: int,
    max_entry_bytes: int,
    reply_to: str | None,
) -> Removal | None:
    """Take a job entry out of its stream and the group's pending list, with a dead letter
    (error_type `removed`) saying an operator removed it, an error result, a usage event and
    a reply on its reply_to, so that a waiting producer learns at once: one script, so a
    worker finishing the entry meanwhile and this cannot both happen. None when the entry was
    gone already.

    A job whose id already has a result keeps it: only the dead letter is written then.
    `reply_to`: the job's reply stream when the job may write to it (admission.reply_to_of).
    """
    state = keys.state(job.job_id)
    attempts = int(await redis.hget(state, "attempts") or 0)
    had_result = bool(await redis.exists(keys.result(job.job_id)))
    dead, result, event = _removal_records(job, attempts, had_result, now_ms, max_entry_bytes)
    reply = reply_to
    names = [job.stream, keys.dead, keys.result(job.job_id), keys.usage, keys.done(job.job_id)]
    names += [state, *([reply] if reply else [])]
    flat_dead = [part for pair in dead.items() for part in pair]
    flat_usage = [part for pair in to_fields(event).items() for part in pair]
    args: list[bytes | str | int] = [GROUP, job.entry.entry_id, result, result_ttl_s]
    args += [usage_maxlen, len(flat_dead)]
    done: Any = await redis.eval(_REMOVE, len(names), *names, *args, *flat_dead, *flat_usage)
    if not done:
        return None
    dead_id, written, replied = done
    return Removal(as_text(dead_id), bool(written), bool(replied))


def _removal_records(
    job: JobEntry, attempts: int, had_result: bool, now_ms: int, max_entry_bytes: int
) -> tuple[dict[bytes, bytes], bytes, UsageEvent]:
    """The dead letter, error result and usage event of a removed entry."""
    kept, note = _kept(job.entry, max_entry_bytes)
    error = _removed_sentence(job, had_result) + note
    where = {"priority": job.priority, "entry_id": job.entry.entry_id, "job_id": job.job_id}
    ours = {"error_type": "removed", "error": error, "attempts": str(attempts), **where}
    dead = {**kept, **{k.encode(): v.encode() for k, v in ours.items()}}
    result = Result(id=job.job_id, status="error", error=ErrorInfo("removed", error))
    event = UsageEvent(
        ts_ms=now_ms,
        job_id=job.job_id,
        feature=job.entry.get("feature") or "",
        tenant=job.entry.get("tenant") or "",
        priority=job.priority,
        status="error",
        attempt=attempts,
        queue_ms=max(0, now_ms - entry_ms(job.entry.entry_id)),
        error_type="removed",
    )
    return dead, msgspec.json.encode(result), event


def _removed_sentence(job: JobEntry, had_result: bool) -> str:
    where = f"removed by an operator (tokenq jobs remove) from {job.stream}"
    h = job.holder
    if h is None:
        where += ", where no worker had taken it"
    else:
        times = "1 delivery" if h.deliveries == 1 else f"{h.deliveries} deliveries"
        where += f", where consumer {h.consumer} held it for {h.idle_ms / 1000:.0f} s after {times}"
    if had_result:
        return where + f". Job {job.job_id!r} already had a result, left as it was."
    return where + ". Fix what kept it there, then replay it (tokenq dead replay)."


def _kept(entry: Entry, max_bytes: int) -> tuple[dict[bytes, bytes], str]:
    """The fields a dead letter keeps of an entry: all of them, unless the entry is over
    max_bytes or KEPT_FIELDS; then tokenq's job fields first, each value cut to KEPT_BYTES,
    and a sentence saying so."""
    size = sum(len(k) + entry.cut.get(k, len(v)) for k, v in entry.raw.items())
    if size <= max_bytes and len(entry.raw) <= KEPT_FIELDS:
        return dict(entry.raw), ""
    names = sorted(entry.raw, key=lambda name: name not in _JOB_FIELDS)[:KEPT_FIELDS]
    return {name: entry.raw[name][:KEPT_BYTES] for name in names}, (
        f" The entry ({size:,} bytes in {len(entry.raw):,} fields) was too large to keep "
        f"whole: this dead letter keeps {len(names):,} of its fields, each value cut to "
        f"{KEPT_BYTES:,} bytes."
    )


@dataclass(frozen=True, slots=True)
class ConsumerRow:
    """One consumer of the group on one job stream, as XINFO CONSUMERS reports it."""

    priority: str
    stream: str
    name: bytes  # as Redis holds it: `prune_consumer` needs it back exactly
    pending: int
    idle_ms: int  # since it last read, claimed or renewed anything

    def stale(self, visibility_ms: int) -> bool:
        """No sign of life within the visibility timeout: its process is gone (a live worker
        reads every worker.block_ms and renews its jobs every third of the timeout)."""
        return self.idle_ms >= visibility_ms


async def consumer_rows(
    redis: aioredis.Redis, keys: Keys, priorities: list[str]
) -> list[ConsumerRow]:
    """Every consumer of the group on every job stream, priority by priority."""
    rows: list[ConsumerRow] = []
    for priority in priorities:
        stream = keys.jobs(priority)
        try:
            consumers: Any = await _raw(redis, "XINFO", "CONSUMERS", stream, GROUP)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            continue
        rows += [
            ConsumerRow(priority, stream, c[b"name"], int(c[b"pending"]), int(c[b"idle"]))
            for c in consumers
        ]
    return rows


# KEYS: a job stream. ARGV: group, consumer, least idle ms. Deletes the consumer only when it
# holds nothing and is idle that long, checked in the same step: XGROUP DELCONSUMER discards
# a consumer's pending entries, so a consumer that read a job meanwhile must be left alone.
# Returns {1 deleted or 0 left (-1 not there), pending, idle ms}.
_PRUNE = """
for _, row in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #row, 2 do c[row[i]] = row[i + 1] end
  if c['name'] == ARGV[2] then
    if c['pending'] > 0 or c['idle'] < tonumber(ARGV[3]) then
      return {0, c['pending'], c['idle']}
    end
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return {1, 0, c['idle']}
  end
end
return {-1, 0, 0}
"""


async def prune_consumer(redis: aioredis.Redis, row: ConsumerRow, min_idle_ms: int) -> bool:
    """Delete a consumer that still holds nothing and is still idle min_idle_ms; whether it
    was deleted."""
    reply: Any = await redis.eval(_PRUNE, 1, row.stream, GROUP, row.name, min_idle_ms)
    return int(reply[0]) == 1
