"""Batch windows: jobs of the batch priorities go to the API as Message Batches, at half price.

One batcher is active across every worker process on every machine: each process runs a
candidate (Worker.run starts it), and the one holding the lease `<prefix>:batcher:lease` works
while the others wait to take over. The holder renews the lease every third of batch.lease_s;
if it dies, the lease expires and another candidate takes it within batch.lease_s.

Pending entries. Workers do not read the batch streams (Queue(batched=...)); only the batcher
does, as consumer `batcher` of the group. An entry it has read stays in the group's pending
list under `batcher` until its result is written (Queue.finish_into, which acknowledges it in
the same MULTI), so no XAUTOCLAIM of a worker ever sees it and it cannot run twice. The states
of such an entry:
    waiting    read, held in the batcher's memory until its window closes
    member     recorded in `<prefix>:batch:<local>:members` (custom_id -> job), in a batch
    handed     given to this process's Worker to run in real time (it moves to the worker's
               consumer at once; the batcher's sweep reclaims it if that process dies)
A new batcher (after a crash or a takeover) finds the waiting ones again: entries pending under
`batcher` that are members of no open batch.

Crash safety. A batch and its members are recorded in Redis (state `planned`) before the
create call, and every write of the batcher is fenced: a transaction that WATCHes the lease and
aborts unless this process still holds it. A `planned` batch is recovered by listing the API's
recent batches for one created after it was planned with exactly its number of requests, and
not known to tokenq under another id; found, it is adopted (its results are checked against the
members' custom_ids before anything is delivered), otherwise it is created again, but only once
anthropic.timeout_s has passed since the last create call began, so that call cannot still land.
Results are delivered in chunks; each chunk's transaction also deletes the chunk's members, so a
batcher that takes over mid-delivery delivers only what is left.

Windows. A window closes (its jobs are submitted) batch.flush_interval_s after its oldest job
arrived, or when it reaches batch.max_requests or batch.max_bytes, and only within
batch.windows (times of day) when they are given. A window's end is its close plus
batch.completion_s, when the results are due at the latest; a job whose deadline_ms is before
that runs in real time instead, and a batch still processing at its end is canceled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
import time
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from worker.admission import Admitted, rejection
from worker.budgets import caps_for
from worker.caching import mark_prompt_cache
from worker.config import BatchConfig, Config
from worker.contract import (
    BATCHER,
    Keys,
    Result,
    UsageEvent,
    entry_ms,
    shown,
    to_fields,
    usd_amount,
)
from worker.errors import InvalidRequest, JobRejected
from worker.jobs import ApiMessage, exhausted, now_ms, text_of
from worker.queue import Delivery, Finish, Queue, as_text
from worker.router import check_answer, static_route
from worker.usage import ApiUsage, baseline_cost_usd, cost_usd
from worker.worker import Worker

log = logging.getLogger("tokenq.batcher")
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CHUNK = 200  # results written per transaction
OPEN = ("planned", "submitted")
# Error types of an errored item that are the request's own fault: retrying cannot help.
REQUEST_ERRORS = ("invalid_request_error", "not_found_error", "request_too_large")
_encode = msgspec.json.Encoder().encode


class LeaseLost(Exception):
    """Another process holds the batcher lease now; this batcher must stop writing."""


class Member(msgspec.Struct, frozen=True):
    """What `<prefix>:batch:<local>:members` holds per custom_id: the job it stands for."""

    p: str  # priority
    e: str  # entry id
    j: str  # job id
    a: int  # the attempt this batch is
    t: str  # tier
    r: str  # route_reason


_member = msgspec.json.Decoder(Member).decode


@dataclass
class Waiting:
    """A job read from a batch stream, waiting for its window to close."""

    d: Delivery
    admitted: Admitted
    params: dict[str, Any]
    tier: str
    why: str
    size: int  # bytes of its request in the create body (with the longest custom_id)


def custom_id(job_id: str) -> str:
    """The job id when the API accepts it as a custom_id (^[a-zA-Z0-9_-]{1,64}$), else a hash
    of it (`h-` and 40 hex digits). The members hash maps it back either way."""
    if CUSTOM_ID.fullmatch(job_id):
        return job_id
    return "h-" + hashlib.sha256(job_id.encode()).hexdigest()[:40]


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def window_open(b: BatchConfig, at_ms: int) -> bool:
    """Whether batches may be submitted at this time (always, without batch.windows)."""
    if not b.windows:
        return True
    local = dt.datetime.fromtimestamp(at_ms / 1000, zoneinfo.ZoneInfo(b.timezone))
    now = local.hour * 60 + local.minute
    for window in b.windows:
        start, end = (_minutes(t) for t in window.split("-"))
        inside = start <= now < end if start < end else (now >= start or now < end)
        if inside:
            return True
    return False


def flush_at_ms(b: BatchConfig, arrived_ms: int) -> int:
    """When a job that arrived at arrived_ms is submitted at the latest: flush_interval_s
    later, or when the next of batch.windows opens after that (minute steps)."""
    at = arrived_ms + int(b.flush_interval_s * 1000)
    for _ in range(24 * 60 + 1):
        if window_open(b, at):
            return at
        at = (at // 60_000 + 1) * 60_000
    return at


def window_end_ms(b: BatchConfig, arrived_ms: int) -> int:
    """When the results of a job arriving at arrived_ms are due at the latest."""
    return flush_at_ms(b, arrived_ms) + int(b.completion_s * 1000)


async def _hash(redis: aioredis.Redis, key: str) -> dict[str, str]:
    """HGETALL as str to str."""
    raw: Any = await redis.hgetall(key)
    return {as_text(k): as_text(v) for k, v in raw.items()}


# KEYS: the lease. ARGV: token, ttl ms. Renew only while it is still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """The batcher lease: a key holding the active process's token, with a TTL."""

    def __init__(self, redis: aioredis.Redis, key: str, token: str) -> None:
        self.redis, self.key, self.token = redis, key, token
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self, ttl_ms: int) -> bool:
        """Take the lease if nobody holds it (or keep it if we do)."""
        if await self.redis.set(self.key, self.token, nx=True, px=ttl_ms):
            return True
        return await self.renew(ttl_ms)

    async def renew(self, ttl_ms: int) -> bool:
        return bool(await self._renew(keys=[self.key], args=[self.token, ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])


class Batcher:
    """Collects the jobs of the batch priorities into Message Batches and delivers them."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        q = worker.queue
        self.redis, self.keys = q.redis, q.keys
        self.priorities = [p for p in q.priorities if p not in q.readable]
        self.queue = Queue(
            q.redis, q.keys, q.priorities, BATCHER, visibility_ms=q.visibility_ms,
            result_ttl_s=q.result_ttl_s, usage_maxlen=q.usage_maxlen, rollups=q.rollups,
        )  # fmt: skip
        self.lease = Lease(q.redis, q.keys.batcher_lease, f"{q.consumer}-{uuid.uuid4().hex[:8]}")
        self.client = worker.client.with_options(max_retries=0)
        self.waiting: list[Waiting] = []
        self._next_poll: dict[str, float] = {}
        self._next_sweep = 0.0

    @property
    def cfg(self) -> Config:
        return self.worker.cfg  # reloads apply

    async def run(self) -> None:
        """Be the candidate: take the lease when it is free, work while holding it; return
        soon after the worker stops (the step under way is finished, the lease released)."""
        while not self.worker.stopping.is_set():
            ttl_ms = int(self.cfg.batch.lease_s * 1000)
            try:
                if await self.lease.acquire(ttl_ms):
                    await self._lead()
            except (LeaseLost, RedisError, OSError, anthropic.APIError) as exc:
                log.warning("batcher stepped down: %s", exc)
            finally:
                self.waiting.clear()  # still pending under `batcher`: the next one finds them
                self._next_poll.clear()
                await asyncio.shield(self._release())
            await self._sleep(self.cfg.batch.lease_s / 3)  # a timer: the lease's own period

    async def _sleep(self, seconds: float) -> None:
        """Wait, unless the worker stops first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.worker.stopping.wait(), timeout=seconds)

    async def _release(self) -> None:
        try:
            await self.lease.release()
        except (RedisError, OSError) as exc:
            log.warning("releasing the batcher lease failed (it expires by itself): %s", exc)

    async def _lead(self) -> None:
        log.info("batcher active in %s", self.worker.queue.consumer)
        renewing = asyncio.create_task(self._renew_forever())
        working = asyncio.create_task(self._work())
        try:
            done, _ = await asyncio.wait({renewing, working}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raises why it ended
        finally:
            for task in (renewing, working):
                task.cancel()
            await asyncio.gather(renewing, working, return_exceptions=True)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.batch.lease_s / 3)  # ends with _work (cancelled)
            if not await self.lease.renew(int(self.cfg.batch.lease_s * 1000)):
                raise LeaseLost("the batcher lease expired before it was renewed")

    async def _work(self) -> None:
        await self._find_waiting()
        while not self.worker.stopping.is_set():
            await self._intake()
            while self._due():
                await self._flush()
            await self._follow()
            b = self.cfg.batch
            await self._sleep(max(0.02, min(1.0, b.flush_interval_s / 4, b.poll_s / 2)))

    # -- intake: read the batch streams, sort each job into a window or real time --

    async def _find_waiting(self) -> None:
        """Entries pending under `batcher` that no open batch holds: a former batcher's
        waiting jobs, or ones it handed over and died before the worker took them."""
        held = {(m.p, m.e) for local in await self._open() for m in await self._members(local)}
        for priority in self.priorities:
            ids = await self.queue.own_pending(priority)
            wanted = [(priority, i) for i in ids if (priority, i) not in held]
            found = [d for d in await self.queue.fetch(wanted) if d is not None]
            if found:
                log.info("batcher: %d %s jobs were waiting for a window", len(found), priority)
            await self._sort(found)

    async def _intake(self) -> None:
        room = self.cfg.batch.max_requests - len(self.waiting)
        for priority in self.priorities:
            while room > 0:
                got = await self.queue.take(priority, min(room, 1000))
                if not got:
                    break
                room -= len(got)
                await self._sort(got)
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.queue.visibility_ms / 4000
            for priority in self.priorities:
                await self._sort(await self.queue.stale(priority, self.queue.visibility_ms))

    async def _sort(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            waiting = await self._prepared(d)
            if waiting is None:
                await self._hand_over(d)
            else:
                self.waiting.append(waiting)

    async def _prepared(self, d: Delivery) -> Waiting | None:
        """_prepare, when the job may go into a batch (_batchable); None for real time. One
        entry's boundary: whatever it holds must not end the batcher (the entry would stop the
        next batcher too), so an unexpected error sends it to real time, where its attempts
        count and it is dead-lettered once they are spent."""
        try:
            waiting = await self._prepare(d)
            return waiting if waiting is not None and self._batchable(d, waiting) else None
        except (RedisError, OSError):
            raise  # the batcher steps down; the entry waits for the next one
        except Exception:
            log.exception("job=%s could not be prepared for a batch; it runs in real time",
                          shown(d.job_id))  # fmt: skip
            return None

    async def _prepare(self, d: Delivery) -> Waiting | None:
        """The job's API params as the realtime path would send them; None when it cannot
        be batched as it is (the realtime path dead-letters, truncates or classifies it)."""
        try:
            # The worker's own checks and shaping, so a batch request equals a realtime one.
            admitted = await self.worker.admit(d)
            job, feature = admitted.job, admitted.feature
            params: dict[str, Any] = msgspec.to_builtins(admitted.request)
            notes = self.worker._shape(job, feature, params)
        except JobRejected:
            return None
        if any(note.startswith("kept the newest") for note in notes):
            return None
        decided = static_route(self.cfg, job, feature, params)
        if decided is None and self.cfg.router.classifier.enabled:
            return None  # the classifier is a realtime call of its own
        tier, why = decided or (self.cfg.router.default_tier, "router.default_tier")
        params["model"] = self.cfg.tiers[tier]
        # Prompt caching works inside batches too (best effort, as the API says).
        minimum = self.cfg.models[params["model"]].min_cache_tokens
        params = mark_prompt_cache(params, feature.prompt_cache, minimum)
        size = len(_encode({"custom_id": "x" * 64, "params": params})) + 1
        return Waiting(d, admitted, params, tier, "; ".join([why, *notes]), size)

    def _batchable(self, d: Delivery, w: Waiting) -> bool:
        """Not when its deadline falls before its window's end, nor under a spend cap (the
        realtime path reserves and settles each call against the caps)."""
        job = w.admitted.job
        end = window_end_ms(self.cfg.batch, max(entry_ms(d.entry_id), now_ms()))
        if job.deadline_ms is not None and job.deadline_ms < end:
            return False
        feature = self.cfg.features[job.feature]
        moment = dt.datetime.now(dt.UTC)
        return not caps_for(self.cfg, self.keys, job.feature, feature, job.tenant or "", moment)

    async def _hand_over(self, d: Delivery) -> None:
        """Run the job in real time in this process. Its entry moves to the worker's consumer
        at once (renewed there from now on), so that if the job is left pending (its process
        died, or it failed) the batcher's sweep of other consumers takes it back."""
        log.info("job=%s runs in real time, not in a batch", shown(d.job_id))
        await self.worker.queue.renew([d])
        self.worker.adopt(d)

    # -- windows: close them into planned batches, submit --

    def _due(self) -> bool:
        b = self.cfg.batch
        if not self.waiting or not window_open(b, now_ms()):
            return False
        oldest = min(entry_ms(w.d.entry_id) for w in self.waiting)
        full = len(self.waiting) >= b.max_requests or self._bytes() >= b.max_bytes
        return full or now_ms() - oldest >= b.flush_interval_s * 1000

    def _bytes(self, waiting: list[Waiting] | None = None) -> int:
        """The create body's size for these jobs (all waiting ones by default)."""
        return 20 + sum(w.size for w in (self.waiting if waiting is None else waiting))

    def _window(self) -> list[Waiting]:
        """The oldest waiting jobs that fit one batch (at least one)."""
        b, taken, size = self.cfg.batch, list[Waiting](), 20
        for w in self.waiting:
            if taken and (len(taken) >= b.max_requests or size + w.size > b.max_bytes):
                break
            taken.append(w)
            size += w.size
        return taken

    async def _flush(self) -> None:
        window = self._window()
        taken = {id(w) for w in window}
        self.waiting = [w for w in self.waiting if id(w) not in taken]
        attempts = await self.worker.claims.begin_many([w.d for w in window], now_ms())
        members: dict[str, tuple[Member, Waiting]] = {}
        ends: list[tuple[Delivery, Finish]] = []
        waits: list[tuple[Delivery, int]] = []
        for w, begun in zip(window, attempts, strict=True):
            d = w.d
            if begun.outcome == "answered":
                await self.queue.ack_duplicate(d, d.job_id, w.admitted.job.reply_to)
            elif begun.outcome == "in_flight":
                # The same job pending in another entry: wait for it off the stream.
                waits.append((d, begun.look_again_ms(now_ms())))
            elif begun.outcome != "go" or begun.number > self.cfg.queue.max_attempts:
                ends.append((d, await self._refused(d, begun)))
            elif (cid := custom_id(d.job_id)) in members:
                self.waiting.append(w)  # the same job id twice: the next window settles it
            else:
                members[cid] = (Member(d.priority, d.entry_id, d.job_id, begun.number, w.tier,
                                       w.why), w)  # fmt: skip
        local = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        await self._record_planned(local, members, ends, waits)
        if members:
            requests = [{"custom_id": c, "params": w.params} for c, (_, w) in members.items()]
            await self._create(local, requests)

    async def _refused(self, d: Delivery, begun: Any) -> Finish:
        """The end of a batch job its claim refuses: the id is another job's or reserved
        (see worker.claims), or its attempts are spent."""
        try:
            self.worker._check_claim(d, begun)
            raise exhausted(begun.number - 1, begun.last_error)
        except JobRejected as exc:
            await self.worker.claims.for_error(d, now_ms())
            return self._rejected(d, exc)

    async def _record_planned(
        self, local: str, members: dict[str, tuple[Member, Waiting]], ends: list[Any],
        waits: list[tuple[Delivery, int]],
    ) -> None:  # fmt: skip
        stamp = now_ms()

        def write(tx: Any) -> None:
            for d, end in ends:
                self.queue.finish_into(tx, d, d.job_id, end)
            for d, until in waits:
                self.queue.defer_into(tx, d, d.job_id, until, owns_claim=False)
            if not members:
                return
            size = self._bytes([w for _, w in members.values()])
            tx.hset(self.keys.batch(local), mapping={
                "state": "planned", "count": len(members), "bytes": size,
                "planned_ms": stamp, "tried_ms": stamp,
            })  # fmt: skip
            tx.hset(self.keys.batch_members(local),
                    mapping={c: _encode(m) for c, (m, _) in members.items()})  # fmt: skip
            tx.zadd(self.keys.batches, {local: stamp})

        await self._commit(write)

    async def _create(self, local: str, requests: list[dict[str, Any]]) -> None:
        """One create call; on any failure the batch stays planned and _recover decides
        (the call may have reached the API even when no answer came back)."""
        try:
            batch = await self.client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        except anthropic.APIError as exc:
            log.warning("batch %s: create failed (%s); it stays planned and is looked for, "
                        "then created again", local, exc)  # fmt: skip
            return
        await self._submitted(local, batch.id, verify=False)

    async def _submitted(self, local: str, api_id: str, *, verify: bool) -> None:
        def write(tx: Any) -> None:
            tx.hset(self.keys.batch(local), mapping={
                "state": "submitted", "api_id": api_id, "submitted_ms": now_ms(),
                "verify": int(verify),
            })  # fmt: skip
            tx.hset(self.keys.batch_ids, api_id, local)

        await self._commit(write)
        log.info("batch %s submitted as %s", local, api_id)

    # -- following submitted batches --

    async def _open(self) -> list[str]:
        locals_: Any = await self.redis.zrange(self.keys.batches, 0, -1)
        states: list[Any] = []
        if locals_:
            async with self.redis.pipeline(transaction=False) as pipe:
                for local in locals_:
                    pipe.hget(self.keys.batch(as_text(local)), "state")
                states = await pipe.execute()
        return [as_text(lo) for lo, s in zip(locals_, states, strict=True) if s in OPEN]

    async def _members(self, local: str) -> list[Member]:
        raw: Any = await self.redis.hvals(self.keys.batch_members(local))
        return [_member(v) for v in raw]

    async def _follow(self) -> None:
        for local in await self._open():
            if time.monotonic() < self._next_poll.get(local, 0.0):
                continue
            self._next_poll[local] = time.monotonic() + self.cfg.batch.poll_s
            info = await _hash(self.redis, self.keys.batch(local))
            if info.get("state") == "planned":
                await self._recover(local, info)
                continue
            batch = await self.client.messages.batches.retrieve(info["api_id"])
            if batch.processing_status == "ended":
                await self._deliver(local, info, batch)
                self._next_poll.pop(local, None)
            elif self._overdue(info) and batch.processing_status == "in_progress":
                log.warning("batch %s (%s) passed batch.completion_s; canceling it", local,
                            batch.id)  # fmt: skip
                await self.client.messages.batches.cancel(batch.id)

    def _overdue(self, info: dict[str, str]) -> bool:
        return now_ms() > int(info["submitted_ms"]) + self.cfg.batch.completion_s * 1000

    async def _recover(self, local: str, info: dict[str, str]) -> None:
        """A planned batch whose create call had no answer: adopt the API's batch if it
        made one, else create it again once that call can no longer land."""
        found = await self._find(int(info["planned_ms"]), int(info["count"]))
        if found is not None:
            log.warning("batch %s: found it at the API as %s; not submitting again", local, found)
            await self._submitted(local, found, verify=True)
            return
        if now_ms() < int(info["tried_ms"]) + (self.cfg.anthropic.timeout_s + 1) * 1000:
            return  # the last create call may still be on its way
        requests = await self._rebuild(local)
        if requests:
            await self._commit(lambda tx: tx.hset(self.keys.batch(local), "tried_ms", now_ms()))
            await self._create(local, requests)

    async def _find(self, planned_ms: int, count: int) -> str | None:
        """The newest API batch created since planned_ms (2 minutes of clock skew allowed)
        with `count` requests that tokenq does not know under another local id."""
        since = planned_ms - 120_000
        async for batch in self.client.messages.batches.list(limit=100):
            created = int(batch.created_at.timestamp() * 1000)
            if created < since:
                break
            c = batch.request_counts
            total = c.processing + c.succeeded + c.errored + c.canceled + c.expired
            if total == count and not await self.redis.hexists(self.keys.batch_ids, batch.id):
                return batch.id
        return None

    async def _rebuild(self, local: str) -> list[dict[str, Any]]:
        """The create requests of a planned batch again, from its members' entries."""
        raw = await _hash(self.redis, self.keys.batch_members(local))
        members = {c: _member(v) for c, v in raw.items()}
        found = await self.queue.fetch([(m.p, m.e) for m in members.values()])
        requests, gone = [], []
        for (cid, m), d in zip(members.items(), found, strict=True):
            w = await self._prepared(d) if d is not None else None
            if w is None or w.tier != m.t:
                gone.append((cid, m, d))
            else:
                requests.append({"custom_id": cid, "params": w.params})

        def write(tx: Any) -> None:
            for _, m, d in gone:
                if d is not None:
                    self.queue.requeue_into(tx, d, m.j, refund=True)
            if not requests:
                tx.hset(self.keys.batch(local), "state", "dropped")

        if gone:
            await self._commit(write, local, [c for c, _, _ in gone])
        return requests

    # -- delivering results --

    async def _deliver(self, local: str, info: dict[str, str], batch: Any) -> None:
        started = time.monotonic()
        if info.get("verify") == "1" and not await self._ours(local, batch.id):
            log.error("batch %s: %s does not hold its custom_ids; its jobs go back to their "
                      "streams", local, batch.id)  # fmt: skip
        else:
            chunk: list[Any] = []
            async for line in await self.client.messages.batches.results(batch.id):
                chunk.append(line)
                if len(chunk) == CHUNK:
                    await self._deliver_chunk(local, info, chunk)
                    chunk = []
            await self._deliver_chunk(local, info, chunk)
        await self._close(local, batch)
        c = batch.request_counts
        log.info("batch %s (%s) ended: succeeded=%d errored=%d expired=%d canceled=%d "
                 "delivered_ms=%d", local, batch.id, c.succeeded, c.errored, c.expired,
                 c.canceled, (time.monotonic() - started) * 1000)  # fmt: skip

    async def _ours(self, local: str, api_id: str) -> bool:
        """Whether an adopted batch's results are exactly our members' custom_ids."""
        ids = {line.custom_id async for line in await self.client.messages.batches.results(api_id)}
        mine: Any = await self.redis.hkeys(self.keys.batch_members(local))
        return ids == {as_text(c) for c in mine}

    async def _close(self, local: str, batch: Any) -> None:
        """Jobs left without a result line go back to their streams; the batch is done."""
        raw = await _hash(self.redis, self.keys.batch_members(local))
        left = [(c, _member(v)) for c, v in raw.items()]
        found = await self.queue.fetch([(m.p, m.e) for _, m in left])
        c = batch.request_counts
        ttl = self.cfg.queue.result_ttl_s

        def write(tx: Any) -> None:
            for (_, m), d in zip(left, found, strict=True):
                if d is not None:
                    self.queue.requeue_into(tx, d, m.j, refund=True)
            tx.hset(self.keys.batch(local), mapping={
                "state": "done", "ended_ms": now_ms(), "succeeded": c.succeeded,
                "errored": c.errored, "expired": c.expired, "canceled": c.canceled,
            })  # fmt: skip
            tx.expire(self.keys.batch(local), ttl)
            tx.zremrangebyscore(self.keys.batches, "-inf", now_ms() - ttl * 1000)

        await self._commit(write, local, [cid for cid, _ in left])

    async def _deliver_chunk(self, local: str, info: dict[str, str], lines: list[Any]) -> None:
        if not lines:
            return
        cids = [line.custom_id for line in lines]
        raw: list[Any] = await self.redis.hmget(self.keys.batch_members(local), cids)
        mine = [(line, _member(r)) for line, r in zip(lines, raw, strict=True) if r is not None]
        found = await self.queue.fetch([(m.p, m.e) for _, m in mine])
        writes: list[Callable[[Any], None]] = []
        realtime: list[Delivery] = []
        for (line, m), d in zip(mine, found, strict=True):
            if d is None:
                continue  # already finished (a redelivered result of an earlier chunk)
            d.qualified = m.j != d.job_id
            writes.append(self._outcome(local, info, line.result, m, d, realtime))

        def write(tx: Any) -> None:
            for step in writes:
                step(tx)

        await self._commit(write, local, [line.custom_id for line, _ in mine])
        for d in realtime:
            await self._hand_over(d)

    def _outcome(
        self, local: str, info: dict[str, str], result: Any, m: Member, d: Delivery,
        realtime: list[Delivery],
    ) -> Callable[[Any], None]:  # fmt: skip
        """The writes for one result line (a function of the transaction)."""
        kind = result.type
        if kind == "succeeded":
            end = self._succeeded(local, info, result.message.to_dict(), m, d)
            return lambda tx: self.queue.finish_into(tx, d, m.j, end)
        if kind != "errored":  # expired, canceled: not the job's fault
            return lambda tx: self.queue.requeue_into(tx, d, m.j, refund=True)
        error = result.error.error
        text = f"batch item errored: {error.type}: {error.message}"
        if error.type in REQUEST_ERRORS or m.a >= self.cfg.queue.max_attempts:
            exc: JobRejected = exhausted(m.a, text)
            if error.type in REQUEST_ERRORS:
                exc = InvalidRequest(
                    f"the API rejected the request in batch {local}: {error.message}. Fix the "
                    "producer's request, then replay the job (tokenq dead replay).",
                    attempts=m.a,
                )
            dead = self._rejected(d, exc)
            return lambda tx: self.queue.finish_into(tx, d, m.j, dead)
        state = self.keys.state(m.j)
        if self.cfg.batch.retry == "realtime":
            realtime.append(d)
            return lambda tx: tx.hset(state, "last_error", text)

        def again(tx: Any) -> None:
            tx.hset(state, "last_error", text)
            self.queue.requeue_into(tx, d, m.j, refund=False)

        return again

    def _rejected(self, d: Delivery, exc: JobRejected) -> Finish:
        return rejection(d, exc, now_ms(), self.cfg)

    def _succeeded(
        self, local: str, info: dict[str, str], body: dict[str, Any], m: Member, d: Delivery
    ) -> Finish:
        message = msgspec.convert(body, ApiMessage)
        usage = msgspec.convert(message.usage, ApiUsage)
        cfg, f = self.cfg, d.fields
        prices = cfg.models.get(message.model) or cfg.models[cfg.tiers[m.t]]
        cost = cost_usd(usage, prices, batch=True)
        route = f"{m.r}; batch {local}"
        feature = cfg.features.get(f.get("feature", ""))
        problem = feature and check_answer(feature, text_of(message), message.stop_reason)
        if problem:
            route += f"; check failed: {problem} (batch answers are not escalated)"
        result = Result(
            id=m.j, status="ok", text=text_of(message), content=message.content,
            model=message.model, tier=m.t, stop_reason=message.stop_reason, usage=message.usage,
            cost_usd=usd_amount(cost), mode="batch",
        )  # fmt: skip
        submitted = int(info["submitted_ms"])
        event = UsageEvent(
            ts_ms=now_ms(), job_id=m.j, feature=f.get("feature", ""), tenant=f.get("tenant", ""),
            priority=d.priority, tier=m.t, model=message.model, mode="batch", attempt=m.a,
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cache_creation_input_tokens=usage.cache_write,
            cache_read_input_tokens=usage.cache_read, cost_usd=cost,
            baseline_cost_usd=baseline_cost_usd(
                usage, cfg.models[cfg.tiers[cfg.router.baseline_tier]]
            ),
            latency_ms=max(0, now_ms() - submitted),
            queue_ms=max(0, submitted - entry_ms(d.entry_id)), route_reason=route,
        )  # fmt: skip
        return Finish(_encode(result), to_fields(event), f.get("reply_to") or None)

    # -- fenced writes --

    async def _commit(
        self, write: Callable[[Any], None], local: str | None = None,
        done: list[str] | None = None,
    ) -> None:  # fmt: skip
        """Run write(tx) (and delete `done` from the batch's members) in one MULTI that
        aborts unless this process holds the lease. Shielded from cancellation."""
        await asyncio.shield(self._fenced(write, local, done or []))

    async def _fenced(
        self, write: Callable[[Any], None], local: str | None, done: list[str]
    ) -> None:
        for _ in range(20):
            try:
                async with self.redis.pipeline(transaction=True) as tx:
                    await tx.watch(self.keys.batcher_lease)
                    if as_text(await tx.get(self.keys.batcher_lease)) != self.lease.token:
                        raise LeaseLost("another process holds the batcher lease")
                    tx.multi()  # type: ignore[no-untyped-call]  # redis-py has no hint
                    write(tx)
                    if local is not None and done:
                        tx.hdel(self.keys.batch_members(local), *done)
                    await self.queue.execute(tx)
                    return
            except WatchError:
                continue  # the lease key changed: our own renewal, or a takeover; look again
        raise LeaseLost("the batcher lease kept changing during a write")


async def batch_rows(redis: aioredis.Redis, keys: Keys, limit: int = 50) -> list[dict[str, Any]]:
    """What `tokenq batches` shows: the newest batches with their state and counts."""
    locals_: Any = await redis.zrevrange(keys.batches, 0, limit - 1)
    rows = []
    for raw in locals_:
        local = as_text(raw)
        info = await _hash(redis, keys.batch(local))
        if not info:
            continue
        waiting = int(await redis.hlen(keys.batch_members(local)))
        rows.append({"batch": local, **info, "awaiting_results": waiting})
    return rows


async def cancel_batch(
    redis: aioredis.Redis, keys: Keys, client: anthropic.AsyncAnthropic, ident: str
) -> tuple[str, str]:
    """Ask the API to cancel a batch, named by its local or API id; (local, API id).

    Its unfinished jobs go back to their streams when it ends. Raises LookupError for a
    batch tokenq does not know or has not submitted.
    """
    local = ident
    if ident.startswith("msgbatch_"):
        found: Any = await redis.hget(keys.batch_ids, ident)
        if found is None:
            raise LookupError(f"tokenq submitted no batch {ident!r}; see `tokenq batches`")
        local = as_text(found)
    api_id: Any = await redis.hget(keys.batch(local), "api_id")
    if api_id is None:
        raise LookupError(f"batch {ident!r} is unknown or not submitted yet; see `tokenq batches`")
    batch = await client.messages.batches.cancel(as_text(api_id))
    return local, f"{batch.id} {batch.processing_status}"
