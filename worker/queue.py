"""Stream I/O: consumer groups, priority reads, reclaiming, renewing, and the finishing writes.

Only this module says XREADGROUP or XAUTOCLAIM, and only it acknowledges a job (XACK), but for
an operator's `tokenq jobs remove` (worker.operators). The deferred set's mover is
worker.deferred; the dead letters' and stuck entries' commands are worker.deadletters and
worker.operators.

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
the batcher reads them, as consumer `batcher` (worker.batch_streams), and finishes them with
`finish_into` inside its own transactions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from worker import clock, fence
from worker.budgets import Reservation, Settlement
from worker.contract import (
    GROUP,
    Keys,
    as_text,
    id_problem,
)
from worker.rollups import Rollups
from worker.trips import Trips, raise_first

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


@dataclass(frozen=True, slots=True)
class Finish:
    """Everything written when a job ends: result, usage event, optional dead letter; with
    `rollup`, the usage event also joins the rollups' queue (worker.rollups); `settle`: the
    budget settlements of its answered calls (worker.budgets)."""

    result_json: bytes
    usage: dict[str, str]
    reply_to: str | None = None
    dead: dict[str, str] | None = None
    rollup: bool = False
    settle: tuple[Settlement, ...] = ()  # budget holds of the job's answered calls


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
        self._reads = 0
        self._fair_turn = 0
        self._buffer: list[Delivery] = []
        self._next_reclaim = 0.0
        self._cursors = dict.fromkeys(self.readable, "0-0")
        self._fenced, self._renew = fence.scripts(redis)
        self.trips = Trips(redis)  # the jobs' writes, shared round trips (worker.trips)

    async def ensure_groups(self, warm: int = 1) -> None:
        """Create the consumer group on every job stream (and the stream) if missing; load
        every script (the rollups' too) and open `warm` connections (worker.trips)."""
        await self.trips.load(warm)
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
        if len(out) < count and clock.monotonic() >= self._next_reclaim:
            self._next_reclaim = clock.monotonic() + self.visibility_ms / 4000
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
                    stream,
                    GROUP,
                    self.consumer,
                    self.visibility_ms,
                    start_id=self._cursors[priority],
                    count=count,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_groups()
                continue
            self._cursors[priority] = cursor
            # Entries deleted from the stream come back as (id, None): nothing left to run.
            found = [Delivery(priority, stream, i, f) for i, f in entries if f]
            if found:
                log.info(
                    "reclaimed %d jobs from %s idle over %d ms",
                    len(found),
                    stream,
                    self.visibility_ms,
                )
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
        """Reset the idle time of deliveries still being worked on, so nobody reclaims them;
        one another consumer has taken over stays with it (worker.fence)."""
        by_stream: dict[str, list[str]] = {}
        for d in [*deliveries, *self._buffer]:
            by_stream.setdefault(d.stream, []).append(d.entry_id)
        for stream, ids in by_stream.items():
            await fence.renew(self._renew, stream, self.consumer, ids)

    async def finish(self, d: Delivery, job_id: str, end: Finish) -> bool:
        """Write result, usage event (and dead letter, reply, rollup entry) and acknowledge,
        in one script on the next shared trip; False when the entry is no longer this
        consumer's (finished, or taken over)."""
        w = self._ending(d, job_id, end)
        trip = await self.trips.run(lambda tx: w.into(tx, self._fenced), atomic=True)
        return fence.applied(raise_first(trip)[0]) is not None

    def finish_into(self, tx: Any, d: Delivery, job_id: str, end: Finish) -> None:
        """Queue finish()'s writes on a transaction the caller executes (the batcher's)."""
        self._ending(d, job_id, end).into(tx, self._fenced)

    def _ending(self, d: Delivery, job_id: str, end: Finish) -> fence.Writes:
        w, ttl = fence.Writes(d.stream, d.entry_id, self.consumer), self.result_ttl_s
        if end.dead is not None:
            w.add("XADD", self.keys.dead, "*", *flat(end.dead))
        w.add("SET", self.keys.result(job_id), end.result_json, "EX", ttl)
        w.event(self.keys.usage, self.usage_maxlen, end.usage)
        if end.rollup:
            w.add("ROLLUP", self.keys.rollup_queue)
        if end.reply_to:
            w.add("REPLY", end.reply_to, end.result_json)
        # Wakes result() waiters; short-lived, the result key itself is the record.
        w.add("RPUSH", self.keys.done(job_id), 1)
        w.add("EXPIRE", self.keys.done(job_id), min(ttl, 300))
        self._ack(w, d)
        # The claim stays as long as the result, so a same-numbered entry of another stream is
        # never mistaken for a redelivery of this one; the job's run is no longer needed.
        state = self.keys.state(job_id)
        w.add("HDEL", state, "run")
        w.add("EXPIRE", state, ttl)
        for settlement in end.settle:
            w.settle(settlement)
        return w

    async def save_run(
        self, d: Delivery, run: bytes, reservation: Reservation | None = None
    ) -> bool | list[Any]:
        """Write a job's run (worker.jobrun) while d is this consumer's; whether it was. With
        a budget reservation (worker.budgets), it is taken in the same script, first: when
        it is refused nothing is written, and the refusal comes back (Budgets.refusal)."""
        w = fence.Writes(d.stream, d.entry_id, self.consumer)
        if reservation is not None:
            w.reserve(reservation)
        w.add("HSET", self.keys.state(d.job_id), "run", run)
        replies = raise_first(await self.trips.run(lambda pipe: w.into(pipe, self._fenced)))
        if isinstance(replies[0], list):
            return list(replies[0][1:])
        return bool(int(replies[0]))

    def reply_into(self, tx: Any, reply_to: str, result_json: bytes | str) -> None:
        """Queue the XADD of a result onto a reply_to stream: skipped (atomically, in Lua)
        when the key has become something other than a stream since the job was admitted."""
        tx.eval(_REPLY, 1, reply_to, result_json)

    async def reply_target(self, name: str) -> str:
        """The type of a reply_to key: `none`, `stream`, or another that rules it out."""
        return as_text(await self.redis.type(name))

    async def defer(
        self,
        d: Delivery,
        job_id: str,
        until_ms: int,
        *,
        owns_claim: bool = True,
        run: bytes | None = None,
    ) -> bool:
        """Put a job off until until_ms: it leaves its stream (acknowledged) for the deferred
        set, from which worker.deferred puts it back, under the same job id, when it is due;
        with its run, when given. False when the entry is no longer this consumer's.

        `owns_claim`: the job holds its id's claim (see worker.claims), which must outlive the
        wait; False for a copy of a job whose first entry is still pending (it waits for it).
        """
        w = self._deferral(d, job_id, until_ms, owns_claim, run)
        return await w.run(self._fenced)

    def defer_into(
        self, tx: Any, d: Delivery, job_id: str, until_ms: int, *, owns_claim: bool = True
    ) -> None:
        """Queue defer()'s writes on a transaction the caller executes (the batcher's)."""
        self._deferral(d, job_id, until_ms, owns_claim, None).into(tx, self._fenced)

    def _deferral(
        self, d: Delivery, job_id: str, until_ms: int, owns_claim: bool, run: bytes | None
    ) -> fence.Writes:
        fields = {**d.fields, "id": job_id}
        # Not ASCII-escaped: a job's text is valid UTF-8 (worker.admission), and Lua's cjson
        # passes its bytes through unchanged.
        member = json.dumps({"p": d.priority, "f": fields}, sort_keys=True, ensure_ascii=False)
        w = fence.Writes(d.stream, d.entry_id, self.consumer)
        w.add("ZADD", self.keys.deferred, until_ms, member)
        self._ack(w, d)
        if owns_claim:
            state = self.keys.state(job_id)
            if run is not None:
                w.add("HSET", state, "run", run)
            # The claim must outlive the wait (a month for a monthly budget), or the entry put
            # back with its id would be a stranger to it.
            w.add("PEXPIREAT", state, until_ms + 86_400_000, "GT")
        return w

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

    def _ack(self, w: fence.Writes, d: Delivery) -> None:
        # The entry is deleted too: a finished job's fields live on in the result and the
        # usage event (and the dead letter), and the stream stays as small as the backlog.
        w.add("XACK", d.stream, GROUP, d.entry_id)
        w.add("XDEL", d.stream, d.entry_id)

    async def leave(self) -> None:
        """On clean shutdown: drop this consumer from the groups if it holds nothing."""
        for stream in self.streams.values():
            try:
                consumers: Any = await self.redis.xinfo_consumers(stream, GROUP)
            except ResponseError:
                continue
            if any(c["name"] == self.consumer and c["pending"] == 0 for c in consumers):
                await self.redis.xgroup_delconsumer(stream, GROUP, self.consumer)


# -- another stream read as a member of group `workers`: tokenq:feedback (worker.feedback) --

Entry = tuple[bytes, dict[bytes, bytes]]  # an entry id and its fields, as bytes


async def ensure_group(redis: aioredis.Redis, stream: str) -> None:
    """Create group `workers` on `stream` (and the stream), reading from its start."""
    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def read_group(
    redis: aioredis.Redis, stream: str, consumer: str, *, count: int, block_ms: int
) -> list[Entry]:
    """New entries for `consumer`, blocking up to block_ms, as bytes (a producer's entry may
    hold any bytes); [] with the group created again when it is missing."""
    try:
        reply: Any = await redis.execute_command(  # type: ignore[no-untyped-call]
            "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count, "BLOCK", block_ms,
            "STREAMS", stream, ">", **{NEVER_DECODE: True},
        )  # fmt: skip
    except ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        await ensure_group(redis, stream)
        return []
    return [(i, f or {}) for _, entries in reply or [] for i, f in entries]


async def claim_idle(
    redis: aioredis.Redis, stream: str, consumer: str, *, idle_ms: int, cursor: str, count: int
) -> tuple[str, list[Entry]]:
    """Entries pending longer than idle_ms (their reader died), taken over by `consumer`
    (XAUTOCLAIM from `cursor`): the next cursor and the entries."""
    try:
        reply: Any = await redis.execute_command(  # type: ignore[no-untyped-call]
            "XAUTOCLAIM", stream, GROUP, consumer, idle_ms, cursor, "COUNT", count,
            **{NEVER_DECODE: True},
        )  # fmt: skip
    except ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        return cursor, []
    return reply[0].decode(), [(i, f or {}) for i, f in reply[1]]


def ack_into(tx: Any, stream: str, entry_id: bytes | str) -> None:
    """Queue the acknowledgement and deletion of an entry on the caller's transaction."""
    tx.xack(stream, GROUP, entry_id)
    tx.xdel(stream, entry_id)


async def leave_group(redis: aioredis.Redis, stream: str, consumer: str) -> None:
    """Drop `consumer` from the group when nothing is pending on it."""
    try:
        pending: Any = await redis.xpending_range(stream, GROUP, "-", "+", 1, consumername=consumer)
        if not pending:
            await redis.xgroup_delconsumer(stream, GROUP, consumer)
    except ResponseError:  # no stream or group: nothing to leave
        pass


def flat(fields: dict[str, str]) -> list[str]:
    """A stream entry's fields as XADD's arguments: name, value, name, value, ..."""
    return [part for pair in fields.items() for part in pair]


def _map(fields: dict[str, str]) -> dict[Any, Any]:
    """redis-py's stubs want invariant dicts of unions; a dict of str is one at runtime."""
    return fields
