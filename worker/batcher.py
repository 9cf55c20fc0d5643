"""Batch windows: jobs of the batch priorities go to the API as Message Batches, at half price.

One batcher is active across every worker process on every machine: each process runs a
candidate (Worker.run starts it), and the one holding the lease `<prefix>:batcher:lease` works
while the others wait to take over (worker.lease: the lease, and the fenced writes every step
of the active batcher makes). If it dies, the lease expires and another candidate takes it
within batch.lease_s. The batcher knows nothing of the Worker: it is given the process's
queue, API client, config and an `adopt` callable that runs a job in real time.

Pending entries. Workers do not read the batch streams (Queue(batched=...)); only the batcher
does, as consumer `batcher` of the group. An entry it has read stays in the group's pending
list under `batcher` until its result is written (in the same MULTI as its acknowledgement),
so no XAUTOCLAIM of a worker ever sees it and it cannot run twice. The states of such an entry:
    waiting    read, held in the batcher's memory until its window closes
    member     recorded in `<prefix>:batch:<local>:members` (custom_id -> job), in a batch
               (worker.batches submits, follows and delivers batches)
    handed     given to this process to run in real time: moved to the worker's consumer in
               one fenced script (Lease.hand_over), renewed there; the batcher's sweep of dead
               consumers takes it back if that process dies, and hands it over again
A new batcher (after a crash or a takeover) finds the waiting ones again: entries pending under
`batcher` that are members of no open batch.

Windows. A window closes (its jobs are submitted) batch.flush_interval_s after its oldest job
arrived, or when it reaches batch.max_requests or batch.max_bytes, and only within
batch.windows (times of day) when they are given. A window's end is its close plus
batch.completion_s, when the results are due at the latest; a job whose deadline_ms is before
that runs in real time instead, and a batch still processing at its end is canceled.

A job in a batch carries its run (worker.jobrun) like any other: the batch is one call of it,
recorded when the batch is planned, and its result reads the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import msgspec
from redis.exceptions import RedisError

from worker import adaptive, clock, jobrun, jobs, learning, maxtokens, outcomes
from worker.batch_results import Member
from worker.batch_streams import BatchQueue
from worker.batches import Batches
from worker.budgets import SpendStop, caps_for
from worker.caching import mark_prompt_cache
from worker.claims import Claim, Claims, refusal
from worker.config import BatchConfig, Config, FeatureConfig
from worker.contract import BATCHER, Job, entry_ms, shown
from worker.errors import JobRejected
from worker.jobrun import Call
from worker.lease import Lease, LeaseLost
from worker.process import admitted
from worker.queue import Delivery, Queue

log = logging.getLogger("tokenq.batcher")
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_encode = msgspec.json.Encoder().encode


@dataclass
class Waiting:
    """A job read from a batch stream, waiting for its window to close."""

    d: Delivery
    job: Job
    params: dict[str, Any]
    tier: str
    why: str
    size: int  # bytes of its request in the create body (with the longest custom_id)
    kind: str = ""  # the adaptive router's kind of job and its tier in use (worker.learning)
    in_use: str = ""


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


class Batcher:
    """Collects the jobs of the batch priorities into Message Batches and delivers them."""

    def __init__(
        self,
        queue: Queue,
        client: anthropic.AsyncAnthropic,
        config: Callable[[], Config],
        adopt: Callable[[Delivery], None],
        stopping: asyncio.Event,
    ) -> None:
        q = queue
        self.keys = q.keys
        self.config = config  # the worker's config of the moment: reloads apply
        self.adopt = adopt
        self.stopping = stopping
        self.consumer = q.consumer  # the worker's own, for hand-overs
        self.priorities = [p for p in q.priorities if p not in q.readable]
        self.queue = BatchQueue(
            q.redis,
            q.keys,
            q.priorities,
            BATCHER,
            visibility_ms=q.visibility_ms,
            result_ttl_s=q.result_ttl_s,
            usage_maxlen=q.usage_maxlen,
            rollups=q.rollups,
        )
        self.lease = Lease(q.redis, q.keys.batcher_lease, f"{q.consumer}-{uuid.uuid4().hex[:8]}")
        self.claims = Claims(q.redis, q.keys, q.streams)
        self.stop = SpendStop(q.redis, q.keys)
        client = client.with_options(max_retries=0)  # a re-sent create could make two batches
        self.batches = Batches(
            self.queue, self.lease, client, config, self._hand_over, self._request_of
        )
        self.waiting: list[Waiting] = []
        self._next_sweep = 0.0
        self.outcome_stats = adaptive.OutcomeStats(q.redis, q.keys)
        self.lengths = maxtokens.LengthStats(
            q.redis, q.keys, cache_ms=config().router.adaptive.cache_ms
        )

    @property
    def cfg(self) -> Config:
        return self.config()

    async def run(self) -> None:
        """Be the candidate: take the lease when it is free, work while holding it; return
        soon after the worker stops (the step under way is finished, the lease released)."""
        while not self.stopping.is_set():
            ttl_ms = int(self.cfg.batch.lease_s * 1000)
            try:
                if await self.lease.acquire(ttl_ms):
                    await self._lead()
            except (LeaseLost, RedisError, OSError, anthropic.APIError) as exc:
                log.warning("batcher stepped down: %s", exc)
            finally:
                self.waiting.clear()  # still pending under `batcher`: the next one finds them
                self.batches.forget()
                await asyncio.shield(self._release())
            await self._sleep(self.cfg.batch.lease_s / 3)  # a timer: the lease's own period

    async def _sleep(self, seconds: float) -> None:
        """Wait, unless the worker stops first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def _release(self) -> None:
        try:
            await self.lease.release()
        except (RedisError, OSError) as exc:
            log.warning("releasing the batcher lease failed (it expires by itself): %s", exc)

    async def _lead(self) -> None:
        log.info("batcher active in %s", self.consumer)
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
        while not self.stopping.is_set():
            await self._intake()
            while self._due() and await self._flush():
                pass
            await self.batches.follow()
            b = self.cfg.batch
            await self._sleep(max(0.02, min(1.0, b.flush_interval_s / 4, b.poll_s / 2)))

    # -- intake: read the batch streams, sort each job into a window or real time --

    async def _find_waiting(self) -> None:
        """Entries pending under `batcher` that no open batch holds: a former batcher's
        waiting jobs, or ones it was handing over when it died."""
        held = {(m.priority, m.entry_id) for m in await self.batches.open_members()}
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
        if clock.monotonic() >= self._next_sweep:
            self._next_sweep = clock.monotonic() + self.queue.visibility_ms / 4000
            for priority in self.priorities:
                # A dead worker's jobs were in real time already (handed over): they go back
                # there, where a call its worker left in flight is reported.
                for d in await self.queue.stale(priority, self.queue.visibility_ms):
                    await self._hand_over(d)

    async def _sort(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            waiting = await self._prepared(d)
            if waiting is None:
                await self._hand_over(d)
            else:
                self.waiting.append(waiting)

    async def _prepared(self, d: Delivery) -> Waiting | None:
        """_prepare: the job waiting for a window, or None for real time. One entry's
        boundary: whatever it holds must not end the batcher (the entry would stop the
        next batcher too), so an unexpected error sends it to real time, where its tries
        count and it is dead-lettered once they are spent."""
        try:
            return await self._prepare(d)
        except (RedisError, OSError):
            raise  # the batcher steps down; the entry waits for the next one
        except Exception:
            log.exception(
                "job=%s could not be prepared for a batch; it runs in real time", shown(d.job_id)
            )
            return None

    async def _prepare(self, d: Delivery) -> Waiting | None:
        """The job's API params as the realtime path would send them; None when it cannot
        be batched as it is (the realtime path dead-letters, truncates or classifies it, or
        it is not _batchable). One config throughout, though a reload may land meanwhile."""
        cfg = self.cfg
        try:
            # The worker's own checks and shaping, so a batch request equals a realtime one.
            checked = await admitted(d, cfg, self.queue)
            job, feature = checked.job, checked.feature
            params: dict[str, Any] = msgspec.to_builtins(checked.request)
            asked = params.get("max_tokens") is not None
            notes = jobs.shape(job, feature, params)
        except JobRejected:
            return None
        if any(note.startswith("kept the newest") for note in notes):
            return None
        if not self._batchable(cfg, d, job, feature):  # before the reads below
            return None
        learnt = await learning.max_tokens_into(
            feature, params, asked, lambda: self.lengths.get(job.feature, clock.now_ms())
        )
        notes += [learnt] if learnt else []
        routed = await learning.route(
            cfg, job, feature, params, d.job_id,
            lambda: self.outcome_stats.get(cfg, job.feature, clock.now_ms()), batched=True,
        )  # fmt: skip
        if routed.decided is None and cfg.router.classifier.enabled:
            return None  # the classifier is a realtime call of its own
        tier, why = routed.decided or (cfg.router.default_tier, "router.default_tier")
        params["model"] = cfg.tiers[tier]
        # Prompt caching works inside batches too (best effort, as the API says).
        minimum = cfg.models[params["model"]].min_cache_tokens
        params = mark_prompt_cache(params, feature.prompt_cache, minimum)
        size = len(_encode({"custom_id": "x" * 64, "params": params})) + 1
        why = "; ".join([why, *notes])
        return Waiting(d, job, params, tier, why, size, routed.kind, routed.in_use)

    async def _request_of(self, d: Delivery) -> tuple[str, dict[str, Any]] | None:
        """A member's create request again (its tier and params), for a batch created anew;
        None when it can no longer go into a batch."""
        w = await self._prepared(d)
        return None if w is None else (w.tier, w.params)

    def _batchable(self, cfg: Config, d: Delivery, job: Job, feature: FeatureConfig) -> bool:
        """Not when its deadline falls before its window's end, nor under a spend cap (the
        realtime path reserves and settles each call against the caps)."""
        end = window_end_ms(cfg.batch, max(entry_ms(d.entry_id), clock.now_ms()))
        if job.deadline_ms is not None and job.deadline_ms < end:
            return False
        return not caps_for(cfg, self.keys, job.feature, feature, job.tenant or "", clock.utc())

    async def _hand_over(self, d: Delivery) -> None:
        """Run the job in real time in this process: its entry moves to the worker's consumer
        in one fenced script (worker.lease), or not at all when this batcher lost its lease
        (LeaseLost) or the entry is no longer the batcher's."""
        if not await self.lease.hand_over(d.stream, d.entry_id, self.consumer):
            log.info("job=%s: no longer the batcher's; not handed over", shown(d.job_id))
            return
        log.info("job=%s runs in real time, not in a batch", shown(d.job_id))
        self.adopt(d)

    # -- windows: close them into planned batches, submit --

    def _due(self) -> bool:
        b = self.cfg.batch
        if not self.waiting or not window_open(b, clock.now_ms()):
            return False
        oldest = min(entry_ms(w.d.entry_id) for w in self.waiting)
        full = len(self.waiting) >= b.max_requests or self._bytes() >= b.max_bytes
        return full or clock.now_ms() - oldest >= b.flush_interval_s * 1000

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

    async def _flush(self) -> bool:
        """Close a window: claim its jobs' ids, record the batch (planned) with each job's
        run carrying the batch as a call, then create it. False when it did not: under the
        organization's spend limit no batch is created until it lifts (and the window stays
        due, so the caller must not ask again in the same turn)."""
        if await self.stop.until_ms() is not None:
            return False
        window = self._window()
        self.waiting = self.waiting[len(window) :]  # the window is their oldest prefix
        claims = await self.claims.begin_many([w.d for w in window], clock.now_ms())
        plan = _Plan()
        for w, claim in zip(window, claims, strict=True):
            await self._plan(plan, w, claim)
        local = f"{clock.utc():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        size = self._bytes([w for _, w in plan.members.values()])
        await self.batches.record_planned(local, plan.members, plan.write, size)
        if plan.members:
            requests = [{"custom_id": c, "params": w.params} for c, (_, w) in plan.members.items()]
            await self.batches.create(local, requests)
        return True

    async def _plan(self, plan: _Plan, w: Waiting, claim: Claim) -> None:
        """Put one claimed job into the plan: a member, or its end, or a wait."""
        d = w.d
        if claim.outcome == "answered":
            await self.queue.ack_duplicate(d, d.job_id, w.job.reply_to)
            return
        if claim.outcome == "in_flight":  # the same job pending in another entry: wait
            until = claim.look_again_ms(clock.now_ms())
            plan.write.append(
                lambda tx: self.queue.defer_into(tx, d, d.job_id, until, owns_claim=False)
            )
            return
        run = jobrun.decode(claim.run, first_ms=entry_ms(d.entry_id))
        run.returned(entry_ms(d.entry_id))
        problem = refusal(d, claim)
        if problem is None and run.tries >= self.cfg.queue.max_attempts:
            problem = jobs.exhausted(run.attempts, run.last_error)
        if problem is not None:
            if not d.claimed:
                await self.claims.for_error(d, clock.now_ms())
            end = outcomes.rejected(d, problem, started_ms=clock.now_ms(), cfg=self.cfg, run=run)
            plan.write.append(lambda tx: outcomes.finish_into(tx, self.queue, d, d.job_id, end))
            return
        cid = custom_id(d.job_id)
        if cid in plan.members:
            self.waiting.append(w)  # the same job id twice: the next window settles it
            return
        run.tier, run.kind, run.in_use = w.tier, w.kind, w.in_use
        run.calls.append(
            Call(model=w.params["model"], tier=w.tier, mode="batch", started_ms=clock.now_ms())
        )
        state = self.keys.state(d.job_id)
        plan.write.append(lambda tx: jobrun.save_into(tx, state, run))
        member = Member(
            priority=d.priority,
            entry_id=d.entry_id,
            job_id=d.job_id,
            attempt=run.attempts,
            tier=w.tier,
            route=w.why,
        )
        plan.members[cid] = (member, w)


@dataclass
class _Plan:
    """A window as it is closed: its members and the other writes of its transaction."""

    members: dict[str, tuple[Member, Waiting]] = field(default_factory=dict)
    write: list[Callable[[Any], Any]] = field(default_factory=list)
