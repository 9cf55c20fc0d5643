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
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from worker.contract import GROUP, Keys
from worker.rollups import Rollups, execute

log = logging.getLogger("tokenq.queue")


@dataclass(slots=True)
class Delivery:
    """One stream entry handed to this worker."""

    priority: str
    stream: str
    entry_id: str
    fields: dict[str, str]
    # Set by Queue.begin_attempt when the bare entry id belongs to another stream's entry.
    qualified: bool = False

    @property
    def owner(self) -> str:
        """`<priority>:<entry id>`: names this entry uniquely across the priority streams."""
        return f"{self.priority}:{self.entry_id}"

    @property
    def job_id(self) -> str:
        """The key of the job's result: the producer's `id`, else the entry id (the contract).

        Each stream numbers its entries on its own, so two priority streams can hand out the
        same entry id in one millisecond. The first of such a pair keeps the bare entry id;
        the other is `qualified` and uses `<priority>:<entry id>` (see begin_attempt).
        """
        explicit = self.fields.get("id")
        if explicit:
            return explicit
        return self.owner if self.qualified else self.entry_id


@dataclass(frozen=True, slots=True)
class Attempt:
    """What begin_attempt found: a result already there, attempts so far, the last error."""

    has_result: bool
    number: int
    last_error: str


# KEYS: state, result. ARGV: owner ("" when the producer gave an id), state TTL in seconds.
# A default id (the bare entry id) belongs to the first entry that claims it; any other entry
# with that id (same number, other stream) gets {-1} and runs under its qualified id instead.
_BEGIN_ATTEMPT = """
if ARGV[1] ~= '' then
  redis.call('HSETNX', KEYS[1], 'owner', ARGV[1])
  if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return {-1, 0, ''} end
end
local exists = redis.call('EXISTS', KEYS[2])
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local last = redis.call('HGET', KEYS[1], 'last_error') or ''
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {exists, attempts, last}
"""
STATE_TTL_S = 7 * 86_400

# KEYS: the deferred set, then the job streams in the order of ARGV[3..] (their priorities).
# ARGV: now ms, most to move. A member is {"p": priority, "f": fields}; an unknown priority
# goes to the middle stream.
_MOVE_DUE = """
local streams = {}
for j = 3, #ARGV do streams[ARGV[j]] = KEYS[j - 1] end
local fallback = KEYS[2 + math.floor((#KEYS - 1) / 2)]
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local job = cjson.decode(member)
  local args = {}
  for k, v in pairs(job.f) do
    args[#args + 1] = k
    args[#args + 1] = v
  end
  redis.call('XADD', streams[job.p] or fallback, '*', unpack(args))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


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
        self._begin = redis.register_script(_BEGIN_ATTEMPT)
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
            self._buffer.extend(found)
        await self._forget_dead_consumers()

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

    async def begin_attempt(self, d: Delivery) -> Attempt:
        """Count an attempt at d's job, first settling d's job id (see Delivery.job_id)."""
        while True:
            owner = "" if d.fields.get("id") else d.owner
            keys = [self.keys.state(d.job_id), self.keys.result(d.job_id)]
            reply: Any = await self._begin(keys=keys, args=[owner, STATE_TTL_S])
            exists, attempts, last_error = reply
            if int(exists) >= 0:
                return Attempt(bool(exists), int(attempts), str(last_error))
            if d.qualified:  # cannot happen: a qualified id is unique to its entry
                raise RuntimeError(f"job id {d.job_id!r} is owned by another entry")
            log.warning(
                "entry %s on %s has the same id as an entry of another priority stream; "
                "its result is tokenq:result:%s",
                d.entry_id, d.stream, d.owner,
            )  # fmt: skip
            d.qualified = True

    async def record_error(self, job_id: str, message: str) -> None:
        """Remember why the last attempt failed (for the dead letter if attempts run out)."""
        await self.redis.hset(self.keys.state(job_id), "last_error", message)

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
            tx.xadd(end.reply_to, {"result": end.result_json})
        # Wakes result() waiters; short-lived, the result key itself is the record.
        tx.rpush(self.keys.done(job_id), 1)
        tx.expire(self.keys.done(job_id), min(self.result_ttl_s, 300))
        if self.rollups is not None:  # the outcome's share of the hourly rollups and totals
            self.rollups.add_into(tx, end.usage)
        self._ack(tx, d, job_id)

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
            claimed: Any = await self.redis.xclaim(stream, GROUP, self.consumer, min_idle_ms, ids)
            out += [Delivery(priority, stream, i, f) for i, f in claimed if f]
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

    async def begin_attempts(self, ds: list[Delivery]) -> list[Attempt]:
        """begin_attempt for many deliveries in one round trip (two when ids collide)."""
        out: list[Attempt | None] = [None] * len(ds)
        todo = list(range(len(ds)))
        while todo:
            async with self.redis.pipeline(transaction=False) as pipe:
                for n in todo:
                    d = ds[n]
                    owner = "" if d.fields.get("id") else d.owner
                    keys = [self.keys.state(d.job_id), self.keys.result(d.job_id)]
                    await self._begin(keys=keys, args=[owner, STATE_TTL_S], client=pipe)
                replies: list[Any] = await pipe.execute()
            again = []
            for n, (exists, attempts, last_error) in zip(todo, replies, strict=True):
                if int(exists) >= 0:
                    out[n] = Attempt(bool(exists), int(attempts), as_text(last_error))
                elif not ds[n].qualified:
                    ds[n].qualified = True  # see begin_attempt
                    again.append(n)
                else:
                    raise RuntimeError(f"job id {ds[n].job_id!r} is owned by another entry")
            todo = again
        return [a for a in out if a is not None]

    async def defer(self, d: Delivery, job_id: str, until_ms: int) -> None:
        """Put a job off until until_ms: it leaves its stream (acknowledged) for the deferred
        set, from which move_due() puts it back, under the same job id, when it is due."""
        fields = {**d.fields, "id": job_id}
        member = json.dumps({"p": d.priority, "f": fields}, sort_keys=True)
        async with self.redis.pipeline(transaction=True) as tx:
            tx.zadd(self.keys.deferred, {member: until_ms})
            self._ack(tx, d, job_id)
            await tx.execute()

    async def move_due(self, now_ms: int, count: int = 500) -> int:
        """Put deferred jobs that are due back on their streams; how many were moved."""
        keys = [self.keys.deferred, *self.streams.values()]
        moved: Any = await self._move(keys=keys, args=[now_ms, count, *self.priorities])
        return int(moved)

    async def is_finished(self, d: Delivery) -> bool:
        """True when d's entry is gone from its stream: finish (or ack_duplicate) deleted it."""
        return not await self.redis.xrange(d.stream, d.entry_id, d.entry_id)

    async def ack_duplicate(self, d: Delivery, job_id: str) -> None:
        """Acknowledge a delivery whose job already has a result (a redelivery)."""
        async with self.redis.pipeline(transaction=True) as tx:
            self._ack(tx, d, job_id)
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


DEAD_FIELDS = ("error_type", "error", "attempts", "priority", "entry_id", "job_id")
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
        tx.xadd(keys.jobs(priority), _map(job))
        tx.xdel(keys.dead, dead_id)
        await tx.execute()
    return job_id


def dead_job_id(fields: dict[str, str]) -> str:
    """The job id a dead letter was written under."""
    return fields.get("job_id") or fields.get("id") or fields.get("entry_id", "?")
