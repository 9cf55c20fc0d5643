"""The worker loop: read jobs, run each through the API, finish or dead-letter it, drain on stop.

Wires the parts together; each part lives in its own module. One process runs one Worker with up
to `concurrency` jobs in flight as asyncio tasks, and its long-lived duties (the reader, the
renewer, the deferred mover, the control listener, the batcher) in one TaskGroup, each under
`supervise`: an unexpected error is logged with its traceback and the duty starts again after a
backoff, so nothing one entry holds can stop a worker. Each job runs inside the job boundary
(`_handle`): it ends finished, dead-lettered or put off, or stays pending for redelivery; an
entry that keeps failing is dead-lettered once it has been delivered queue.max_attempts times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anthropic
import httpx2
import msgspec
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.admission import Admitted, admit, rejection
from worker.breakers import Breakers, Open
from worker.budgets import Budgets
from worker.caching import (
    DEDUPE_KEEP_S,
    CachedAnswer,
    ResponseCache,
    cache_key,
    mark_prompt_cache,
)
from worker.calls import CallPath
from worker.claims import Attempt, Claims
from worker.config import Config, FeatureConfig
from worker.contract import (
    Job,
    Keys,
    Result,
    UsageEvent,
    clean,
    entry_ms,
    shown,
    to_fields,
    usd_amount,
)
from worker.control import listen, reloaded
from worker.embedded import connect, redis_url
from worker.errors import (
    ConfigError,
    DuplicateId,
    InvalidRequest,
    JobRejected,
    MalformedJob,
    TooLarge,
)
from worker.estimate import Calibration, raw_estimate
from worker.jobs import (
    CLASSIFIER_ERRORS,
    RETRYABLE,
    ApiMessage,
    Defer,
    Plan,
    Refused,
    Spend,
    check_deadline,
    describe,
    exhausted,
    more_room,
    now_ms,
    text_of,
)
from worker.limiter import make_limiter
from worker.queue import Delivery, Finish, Queue
from worker.rollups import Rollups, settings_of
from worker.router import (
    CUT,
    check_answer,
    classifier_answer,
    classifier_request,
    dearer,
    request_hash,
    static_route,
)
from worker.usage import ApiUsage, baseline_cost_usd

T = TypeVar("T")
log = logging.getLogger("tokenq.worker")

# Redis errors worth trying the same step again for: the server is away, loading, failing
# over or full. Any other (WRONGTYPE, a script error) would fail again: it goes to the job
# boundary, where it counts toward the entry's deliveries.
TRANSIENT: tuple[type[Exception], ...] = (
    RedisConnectionError, RedisTimeoutError, ReadOnlyError, TryAgainError, ClusterDownError,
    OutOfMemoryError, OSError,
)  # fmt: skip


async def supervise(name: str, duty: Callable[[], Awaitable[None]], until: asyncio.Event) -> None:
    """Run `duty` until `until` is set, again after any unexpected error: logged with its
    traceback, then a pause that doubles from 0.1 s to 30 s (and starts over after a minute of
    health), so that no bad entry and no bug ends the duty or spins it."""
    pause = 0.1
    while not until.is_set():
        started = time.monotonic()
        try:
            await duty()
        except Exception:  # a long-lived duty's boundary, like the job boundary in _handle
            log.exception("%s failed; it starts again in %.1f s", name, pause)
        else:
            if until.is_set():
                return
            log.warning("%s ended by itself; it starts again in %.1f s", name, pause)
        if time.monotonic() - started > 60:
            pause = 0.1
        if await _stopped_within(until, pause):
            return
        pause = min(pause * 2, 30.0)


async def _stopped_within(until: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` unless `until` is set first; whether it is set."""
    try:
        await asyncio.wait_for(until.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


_encode = msgspec.json.Encoder().encode


def make_client(cfg: Config, concurrency: int) -> anthropic.AsyncAnthropic:
    """The API client: the real API with ANTHROPIC_API_KEY, else the simulator (base_url auto)."""
    key = os.environ.get("ANTHROPIC_API_KEY")
    base_url = cfg.anthropic.base_url
    if base_url == "auto":
        base_url = "https://api.anthropic.com" if key else cfg.anthropic.simulator_url
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return anthropic.AsyncAnthropic(
        api_key=key or "simulator",
        base_url=base_url,
        max_retries=cfg.anthropic.max_retries,
        timeout=cfg.anthropic.timeout_s,
        # The SDK's aiohttp transport: 2.7 times the requests/s of its default httpx2 one
        # from one process (1,680 against 611 on this project's benchmark machine).
        http_client=anthropic.DefaultAioHttpClient(limits=limits),
    )


class Worker(CallPath):
    """Processes jobs until stop() is called, then drains in-flight work."""

    def __init__(
        self,
        cfg: Config,
        queue: Queue,
        client: anthropic.AsyncAnthropic,
        *,
        concurrency: int,
        config_file: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_file = config_file  # what reload() re-reads
        self.queue = queue
        self.client = client
        self.concurrency = concurrency
        self._in_flight: dict[asyncio.Task[None], Delivery] = {}
        self._stopping = asyncio.Event()
        self._baseline = cfg.models[cfg.tiers[cfg.router.baseline_tier]]
        self.limiter = make_limiter(queue.redis, cfg)
        self.calibration = Calibration()
        self.budgets = Budgets(queue.redis, cfg)
        self.cache = ResponseCache(
            queue.redis,
            lease_ms=int((cfg.anthropic.timeout_s + 30) * 1000),
            block_ms=cfg.worker.block_ms,
        )
        self.breakers = Breakers(queue.redis, queue.keys, cfg.breakers, cfg.anthropic.timeout_s)
        self.claims = Claims(queue.redis, queue.keys, queue.streams)

    def stop(self) -> None:
        """Stop reading; in-flight jobs get worker.grace_s to finish. Safe to call twice."""
        if not self._stopping.is_set():
            log.info("stopping: %d jobs in flight", len(self._in_flight))
        self._stopping.set()

    def reload(self) -> bool:
        """Re-read the config file and apply it to the next jobs (see worker.control).

        False, with the running config kept, when there is no file or it is not valid.
        """
        if self.config_file is None:
            log.warning("reload: this worker was started without a config file")
            return False
        try:
            cfg = reloaded(self.cfg, self.config_file)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return False
        self.cfg = cfg
        self._baseline = cfg.models[cfg.tiers[cfg.router.baseline_tier]]
        self.limiter.reload(cfg)
        self.budgets.reload(cfg)
        self.breakers.reload(cfg.breakers)
        if self.queue.rollups is not None:
            self.queue.rollups.reload(settings_of(cfg))
        log.info("reloaded %s", self.config_file)
        return True

    async def aclose(self) -> None:
        """Close the API client and the Redis connection."""
        await self.client.close()
        await self.queue.redis.aclose()

    async def run(self) -> None:
        """Process jobs until stop() is called, then drain in-flight work.

        The duties run in one TaskGroup, each supervised. The reader and the batcher stop on
        stop(); the renewer, the deferred mover and the control listener keep serving the jobs
        in flight until the drain is over.
        """
        await self.queue.ensure_groups()
        drained = asyncio.Event()
        async with asyncio.TaskGroup() as duties:
            duties.create_task(supervise("renewer", lambda: self._renew_forever(drained), drained))
            duties.create_task(
                supervise("deferred mover", lambda: self._move_deferred_forever(drained), drained)
            )
            duties.create_task(
                supervise("rollup folder", lambda: self._fold_forever(drained), drained)
            )
            control = duties.create_task(supervise("control listener", self._listen, drained))
            batching = None
            if self.cfg.batch.priorities:
                batching = duties.create_task(supervise("batcher", self._batcher, self._stopping))
            try:
                await supervise("reader", self._read_forever, self._stopping)
            finally:
                await self._drain(batching)
                drained.set()
                control.cancel()  # it waits on the channel; nothing of it needs finishing
        await self.queue.leave()

    async def _read_forever(self) -> None:
        """Read deliveries and start them as jobs, `concurrency` at most in flight."""
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(self._in_flight)
                if free <= 0:
                    waiting = {stop_wait, *self._in_flight}
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    continue
                for delivery in await self._read(free):
                    self.adopt(delivery)
        finally:
            stop_wait.cancel()

    async def _listen(self) -> None:
        await listen(self.queue.redis, self.queue.keys, self.reload)

    @property
    def stopping(self) -> asyncio.Event:
        """Set once stop() was called."""
        return self._stopping

    def adopt(self, d: Delivery) -> None:
        """Run a delivery as a job in flight: one read here, or one the batcher hands over
        (due before its batch window ends, or an errored batch item retried in real time)."""
        task = asyncio.create_task(self._handle(d))
        self._in_flight[task] = d
        task.add_done_callback(self._in_flight.pop)

    async def _batcher(self) -> None:
        """This process's batcher candidate (worker.batcher)."""
        # Imported here: the batcher imports this module (the jobs it hands back run here).
        from worker.batcher import Batcher

        await Batcher(self).run()

    async def _read(self, free: int) -> list[Delivery]:
        try:
            return await self.queue.read(free, self.cfg.worker.block_ms)
        except (RedisError, OSError) as exc:
            log.warning("reading jobs failed (%s); trying again in 1 s", exc)
            await self._pause(1.0)
            return []

    async def _drain(self, batching: asyncio.Task[None] | None) -> None:
        """Give in-flight jobs (and the batcher's step) grace_s; cancel the rest
        (unacknowledged, so they are reclaimed)."""
        if batching is not None:
            _, late = await asyncio.wait({batching}, timeout=self.cfg.worker.grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(batching, return_exceptions=True)
        if not self._in_flight:
            return
        _, late = await asyncio.wait(self._in_flight, timeout=self.cfg.worker.grace_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("cancelled %d jobs after grace_s; another worker reclaims them", len(late))
            await asyncio.wait(late)

    async def _renew_forever(self, until: asyncio.Event) -> None:
        period = self.cfg.queue.visibility_timeout_s / 3
        # A timer, not polling: renewal is due every period.
        while not await _stopped_within(until, period):
            try:
                await self.queue.renew(self._in_flight.values())
            except (RedisError, OSError) as exc:
                log.warning("renewing in-flight jobs failed: %s", exc)

    async def _move_deferred_forever(self, until: asyncio.Event) -> None:
        """Every second, put deferred jobs that are due back on their streams."""
        # A timer: deferrals are due on whole-second boundaries.
        while not await _stopped_within(until, 1.0):
            try:
                moved = await self.queue.move_due(now_ms())
            except (RedisError, OSError) as exc:
                log.warning("moving deferred jobs failed: %s", exc)
                continue
            if moved:
                log.info("%d deferred jobs are due and back on their streams", moved)

    async def _fold_forever(self, until: asyncio.Event) -> None:
        """Every second, add the finished jobs' rollup records to their hours (rollups.py)."""
        rollups = self.queue.rollups
        while rollups is not None and not await _stopped_within(until, 1.0):
            try:
                await rollups.fold(self.queue.redis)
            except (RedisError, OSError) as exc:
                log.warning("folding the rollups failed: %s", exc)

    async def _pause(self, seconds: float) -> bool:
        """Wait, unless stop() comes first. True when the full time passed."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    async def _handle(self, d: Delivery) -> None:
        """Run one delivery to its end: finished, dead-lettered, put off, or left pending.
        The job boundary: nothing raised here goes further."""
        started_ms = now_ms()
        try:
            end = await self._retrying_redis(d, "running", lambda: self._outcome(d, started_ms))
            if end is not None:
                await self._write(d, end)
        except Exception as exc:  # the one catch-all: the job boundary
            try:
                await self._failed(d, exc, started_ms)
            except (RedisError, OSError) as err:
                log.error("job=%s: recording its failure failed too (%s); left pending",
                          shown(d.job_id), err)  # fmt: skip

    async def _write(self, d: Delivery, end: Finish | Defer) -> None:
        """Put the job off, or write its end (result, usage event, acknowledgement)."""
        if isinstance(end, Defer):
            until, claim = end.until_ms, not end.waits
            put_off = await self._retrying_redis(
                d, "deferring it", lambda: self._put_off(d, until, claim)
            )
            if put_off:
                log.info("job=%s deferred until %d: %s", shown(d.job_id), until, end.why)
            return
        tries = 0

        async def write() -> bool:
            nonlocal tries
            tries += 1
            # A failed try may have been applied with only its reply lost: the entry is gone.
            if tries > 1 and await self.queue.is_finished(d):
                return True
            await self.queue.finish(d, d.job_id, end)
            return True

        # Shielded: a cancellation during the finishing write must not half-finish it.
        written = await self._retrying_redis(
            d, "writing its result", lambda: asyncio.shield(write())
        )
        if not written:
            return
        event = end.usage
        log.info(
            "job=%s feature=%s tier=%s status=%s error_type=%s latency_ms=%s queue_ms=%s",
            shown(d.job_id), shown(event["feature"], 80), event["tier"], event["status"],
            event["error_type"] or "-", event["latency_ms"], event["queue_ms"],
        )  # fmt: skip

    async def _failed(self, d: Delivery, exc: Exception, started_ms: int) -> None:
        """An unexpected error at the job boundary (a bug, or a Redis error that would come
        back). It counts: once the entry was delivered, or the job attempted, max_attempts
        times, it is dead-lettered naming this error; until then it stays pending and is
        reclaimed after the visibility timeout."""
        tries = max(d.deliveries, d.attempt)
        error = clean(f"{type(exc).__name__}: {exc}")[:500]
        log.error("job=%s failed unexpectedly (delivery %d, attempt %d)", shown(d.job_id),
                  d.deliveries, d.attempt, exc_info=exc)  # fmt: skip
        if await self.queue.is_finished(d):
            return  # a failed reply after the finishing MULTI was applied
        if tries < self.cfg.queue.max_attempts:
            if d.claimed:
                await self.claims.record_error(d.job_id, error)
            log.warning("job=%s left pending; it is reclaimed after queue.visibility_timeout_s",
                        shown(d.job_id))  # fmt: skip
            return
        exc = exhausted(tries, f"{error} (an unexpected error in tokenq)")
        await self.queue.finish(d, d.job_id, await self._refused(d, exc, started_ms))
        log.error("job=%s dead-lettered after %d unexpected failures", shown(d.job_id), tries)

    async def _put_off(self, d: Delivery, until_ms: int, owns_claim: bool) -> bool:
        await self.queue.defer(d, d.job_id, until_ms, owns_claim=owns_claim)
        return True

    async def _outcome(self, d: Delivery, started_ms: int) -> Finish | Defer | None:
        """Admit the delivery, claim its job id, and run it (see process)."""
        try:
            admitted = await self.admit(d)
        except JobRejected as exc:
            return await self._refused(d, exc, started_ms)
        begun = await self.claims.begin(d, now_ms())
        if begun.outcome == "answered":
            await self.queue.ack_duplicate(d, d.job_id, admitted.job.reply_to)
            log.info("job=%s already has a result; acknowledged entry %s without a call",
                     shown(d.job_id), d.owner)  # fmt: skip
            return None
        try:
            if begun.outcome == "in_flight":
                return self._wait_for_first(d, admitted.job, begun)
            self._check_claim(d, begun)
            return await self.process(d, admitted, begun, started_ms)
        except JobRejected as exc:
            return await self._refused(d, exc, started_ms)

    async def admit(self, d: Delivery) -> Admitted:
        """Check a delivery at the edge (worker.admission), and that its reply_to is a stream
        or a new key. Raises a JobRejected naming what to fix."""
        admitted = admit(d.fields, self.cfg)
        reply_to = admitted.job.reply_to
        if reply_to is not None:
            kind = await self.queue.reply_target(reply_to)
            if kind not in ("none", "stream"):
                raise MalformedJob(
                    f"`reply_to` {shown(reply_to, 60)} names an existing key of type {kind}; "
                    "results go to a stream (or a key that does not exist yet). Fix the "
                    "producer."
                )
        return admitted

    def _check_claim(self, d: Delivery, begun: Attempt) -> None:
        """Raise the JobRejected a claim's outcome calls for, if any."""
        if begun.outcome == "other_job":
            raise DuplicateId(
                f"the id {shown(d.job_id, 80)} was used by another job (a different tenant, "
                "feature or request) within queue.result_ttl_s; this job's error result is "
                f"under {d.owner}, the first job's result is untouched. Give each new job a "
                "new id."
            )
        if begun.outcome == "reserved":
            raise MalformedJob(
                f"`id` {shown(d.job_id, 80)} has the form of a stream entry id (<ms>-<seq>, or "
                "<priority>:<ms>-<seq> for a priority of queue.priorities), which is the id of "
                "a job without one; choose another id, or leave `id` out. Fix the producer."
            )
        if begun.number > self.cfg.queue.max_attempts:
            raise exhausted(begun.number - 1, begun.last_error)

    def _wait_for_first(self, d: Delivery, job: Job, begun: Attempt) -> Defer:
        """The same job (id and fingerprint) is pending in another entry: this copy waits in
        the deferred set, holding no worker slot, and looks again later (sooner while the
        first is young). It gets the result, or the claim if the first entry disappears."""
        check_deadline(job)
        until = begun.look_again_ms(now_ms())
        return Defer(until, "the same job is pending in another entry", waits=True)

    async def _refused(self, d: Delivery, exc: JobRejected, started_ms: int) -> Finish:
        """What a rejected job leaves (worker.admission.rejection), under its own job id when
        that is free or its own, else under `<priority>:<entry id>`."""
        if not d.claimed:
            await self.claims.for_error(d, now_ms())
        return rejection(d, exc, started_ms, self.cfg)

    async def _retrying_redis(
        self, d: Delivery, what: str, step: Callable[[], Awaitable[T]]
    ) -> T | None:
        """step(), tried again after a Redis error (a restart, a failover, a full pool).

        The job stays in flight and renewed meanwhile, so no other worker takes it. Past half
        the visibility timeout it is given up (None) and left pending: another worker, or this
        one, reclaims it once Redis answers again. A result already computed is only written,
        never fetched from the API a second time, while this retries.
        """
        give_up = time.monotonic() + self.cfg.queue.visibility_timeout_s / 2
        pause = 0.05
        while True:
            try:
                return await step()
            except TRANSIENT as exc:
                if time.monotonic() + pause > give_up:
                    log.error("job=%s: %s failed on Redis (%s); left pending for redelivery",
                              shown(d.job_id), what, exc)  # fmt: skip
                    return None
                log.warning("job=%s: %s failed on Redis (%s); trying again in %.2f s",
                            shown(d.job_id), what, exc, pause)  # fmt: skip
                await asyncio.sleep(pause)  # not _pause: a drain still wants the result written
                pause = min(pause * 2, 5.0)

    async def process(
        self, d: Delivery, admitted: Admitted, begun: Attempt, started_ms: int
    ) -> Finish | Defer | None:
        """Run an admitted job whose id this delivery claimed (attempt `begun`). None: nothing
        to write (stopping mid-backoff); Defer: put the job off (an open breaker or a spent
        budget with policy "defer").

        Raises JobRejected when the job can never succeed.
        """
        job, request, feature = admitted.job, admitted.request, admitted.feature
        params: dict[str, Any] = msgspec.to_builtins(request)
        route = self._shape(job, feature, params)
        priorities = self.cfg.queue.priorities
        rank = priorities.index(d.priority) if d.priority in priorities else len(priorities)
        spend = Spend()
        tier, why = await self._route(job, feature, params, rank, spend)
        plan = Plan(tier, [why, *route])
        key, plan.cache = self._cache_key(job, feature, params, plan.tier)
        if key is None:
            return await self._attempts(d, job, feature, params, rank, spend, plan, begun)
        keep_s = feature.response_cache_ttl_s or DEDUPE_KEEP_S
        hit = await self.cache.get(key) if feature.response_cache_ttl_s else None
        if hit is not None:
            return self._cached(d, job, hit, plan, "hit", started_ms)
        found = await self.cache.claim(key, keep_s, feature.dedupe)
        if isinstance(found, CachedAnswer):
            return self._cached(d, job, found, plan, "joined", started_ms)
        plan.cache = "miss"
        try:
            end = await self._attempts(d, job, feature, params, rank, spend, plan, begun)
            if plan.answer is not None:
                if found is None:
                    await self.cache.store(key, plan.answer, keep_s)
                else:
                    await self.cache.complete(found, plan.answer)
            return end
        finally:
            if found is not None:  # a no-op after complete()
                await asyncio.shield(self.cache.abandon(found))

    def _cache_key(
        self, job: Job, feature: FeatureConfig, params: dict[str, Any], tier: str
    ) -> tuple[str | None, str]:
        """The response-cache key of this job and its `response_cache` so far: (None, "off")
        when neither the response cache nor de-duplication applies to it, (None, "no_tenant")
        when they are scoped to the tenant and the job has none (anonymous callers must not
        share answers)."""
        if job.cache == "off" or not (feature.response_cache_ttl_s or feature.dedupe):
            return None, "off"
        if feature.response_cache_scope == "tenant" and not job.tenant:
            return None, "no_tenant"
        model = self.cfg.tiers[tier]
        key = cache_key(self.queue.keys.prefix, job.feature, feature, job.tenant or "", model,
                        params)  # fmt: skip
        return key, "miss"

    async def _attempts(
        self, d: Delivery, job: Job, feature: FeatureConfig, params: dict[str, Any], rank: int,
        spend: Spend, plan: Plan, first: Attempt,
    ) -> Finish | Defer | None:  # fmt: skip
        """The job's attempts (`first` counted already), with backoff between them, until
        one ends it."""
        max_attempts = self.cfg.queue.max_attempts
        begun: Attempt | None = first
        while True:
            check_deadline(job)
            if begun is None:
                begun = await self.claims.begin(d, now_ms())
                if begun.outcome != "go":  # the claim is this entry's: nobody else can answer
                    raise RuntimeError(f"job {d.job_id!r} lost its claim ({begun.outcome})")
            attempt, last_error = begun.number, begun.last_error
            if attempt > max_attempts:
                raise exhausted(attempt - 1, last_error)
            try:
                return await self._attempt(d, job, feature, params, rank, attempt, spend, plan)
            except RETRYABLE as exc:
                begun = None
                error = describe(exc)
                await self.claims.record_error(d.job_id, error)
                log.warning("job=%s attempt=%d failed: %s", shown(d.job_id), attempt, error)
                if attempt >= max_attempts:
                    raise exhausted(attempt, error) from None
                if not await self._pause(self._backoff_s(attempt, exc)):
                    return None  # stopping: the job stays pending and is reclaimed
            except anthropic.APIStatusError as exc:  # any other 4xx: the request itself
                raise InvalidRequest(
                    f"the API rejected the request ({exc.status_code}): {describe(exc)}. "
                    "Fix the producer's request, then replay the job (tokenq dead replay).",
                    attempts=attempt,
                ) from None

    async def _attempt(
        self, d: Delivery, job: Job, feature: FeatureConfig, params: dict[str, Any], rank: int,
        attempt: int, spend: Spend, plan: Plan,
    ) -> Finish | Defer:  # fmt: skip
        """One attempt: through the breakers and budgets to an answer, with the downgrades
        their policies ask for and the escalations the feature's check asks for."""
        while True:
            model = self.cfg.tiers[plan.tier]
            ticket = await self.breakers.admit([f"feature:{job.feature}", f"model:{model}"])
            if isinstance(ticket, Open):
                moved = self._on_open(job, feature, plan.tier, ticket, plan.route, attempt)
                if isinstance(moved, Defer):
                    return moved
                plan.tier = moved
                continue
            try:
                prices = self.cfg.models[model]
                call = mark_prompt_cache({**params, "model": model}, feature.prompt_cache,
                                         prices.min_cache_tokens)  # fmt: skip
                message, usage, latency_ms = await self._paid_call(
                    job, call, rank, attempt, spend, ticket
                )
            except Refused as refused:
                moved = self._on_budget(job, feature, plan.tier, refused.refusal, plan.route,
                                        attempt)  # fmt: skip
                if isinstance(moved, Defer):
                    return moved
                plan.tier = moved
                continue
            problem = check_answer(feature, text_of(message), message.stop_reason)
            up = dearer(self.cfg, plan.tier) if problem else None
            if problem and up and plan.escalations < self.cfg.router.max_escalations:
                plan.escalations += 1
                room = more_room(feature, params) if problem == CUT else ""
                plan.route.append(f"escalated to {up}: {problem}{room}")
                plan.tier = up
                continue
            if problem:
                plan.route.append(f"check failed: {problem}")
            else:
                plan.answer = CachedAnswer(text_of(message), message.content, message.model,
                                     plan.tier, message.stop_reason, message.usage)  # fmt: skip
            return self._succeeded(d, job, plan, message, usage, attempt, latency_ms, spend)

    def _shape(self, job: Job, feature: FeatureConfig, params: dict[str, Any]) -> list[str]:
        """Apply the feature's max_tokens default and cap and its max_input_tokens; what was
        changed, for route_reason."""
        notes: list[str] = []
        wanted = int(params.get("max_tokens") or feature.max_tokens)
        cap = feature.max_tokens_cap
        if cap is not None and wanted > cap:
            notes.append(f"max_tokens {wanted} clamped to {cap}")
            wanted = cap
        params["max_tokens"] = wanted
        most = feature.max_input_tokens
        if most is None or (size := raw_estimate(params)) <= most:
            return notes
        name = f"features.{job.feature}"
        if feature.input_overflow == "truncate":
            messages = list(params["messages"])
            dropped = 0
            while len(messages) > 1 and raw_estimate({**params, "messages": messages}) > most:
                messages.pop(0)
                dropped += 1
                while len(messages) > 1 and messages[0].get("role") != "user":
                    messages.pop(0)  # a conversation starts with the user's turn
                    dropped += 1
            if raw_estimate({**params, "messages": messages}) <= most:
                params["messages"] = messages
                notes.append(f"kept the newest {len(messages)} messages ({dropped} dropped)")
                return notes
        raise TooLarge(
            f"the request is about {size} input tokens, over {name}.max_input_tokens = {most}"
            + (
                "; even its last message alone is over it. Shorten the request."
                if feature.input_overflow == "truncate"
                else f'. Shorten it, or set {name}.input_overflow = "truncate" to keep only '
                "the newest turns."
            )
        )

    async def _route(
        self, job: Job, feature: FeatureConfig, params: dict[str, Any], rank: int, spend: Spend
    ) -> tuple[str, str]:
        """The tier (see worker.router) and why; the classifier call's cost goes to spend."""
        decided = static_route(self.cfg, job, feature, params)
        if decided is not None:
            return decided
        c = self.cfg.router.classifier
        default = self.cfg.router.default_tier, "router.default_tier"
        if not c.enabled:
            return default
        key = f"{self.queue.keys.prefix}:route:{request_hash(params)}"
        cached: Any = await self.queue.redis.get(key)
        if cached:
            tier = cached.decode() if isinstance(cached, bytes) else str(cached)
            if tier in self.cfg.tiers:
                return tier, f"classifier (cached): {tier}"
        try:
            asked = classifier_request(self.cfg, params)
            message, _, _ = await self._paid_call(job, asked, rank, 0, spend, None)
        except Refused as refused:
            return self.cfg.router.default_tier, f"router.default_tier (classifier: {refused})"
        except CLASSIFIER_ERRORS as exc:
            return self.cfg.router.default_tier, f"router.default_tier (classifier failed: {exc})"
        named = classifier_answer(self.cfg, text_of(message))
        if named is None:
            return default[0], "router.default_tier (classifier named no tier)"
        await self.queue.redis.set(key, named, ex=c.cache_ttl_s)
        return named, f"classifier: {named}"

    def _backoff_s(self, attempt: int, exc: Exception) -> float:
        q = self.cfg.queue
        delay = min(q.retry_max_s, q.retry_base_s * 2.0 ** (attempt - 1))
        delay *= 0.5 + random.random() / 2  # jitter: retries of many jobs do not align
        if isinstance(exc, anthropic.APIStatusError):
            after = str(exc.response.headers.get("retry-after", ""))
            if after and after.replace(".", "", 1).isdigit():
                delay = max(delay, min(float(after), q.retry_max_s))
        return delay

    def _succeeded(
        self, d: Delivery, job: Job, plan: Plan, message: ApiMessage, usage: ApiUsage,
        attempt: int, latency_ms: int, spend: Spend,
    ) -> Finish:  # fmt: skip
        """The result and usage event of an answered job. Cost and tokens are the sums over
        every call the job made (a classifier call, escalations); the baseline prices the
        final answer's `usage` on the baseline tier."""
        cost = spend.cost_usd
        result = Result(
            id=d.job_id,
            status="ok",
            text=text_of(message),
            content=message.content,
            model=message.model,
            tier=plan.tier,
            stop_reason=message.stop_reason,
            usage=message.usage,
            cost_usd=usd_amount(cost),
            mode="realtime",
        )
        event = UsageEvent(
            ts_ms=now_ms(),
            job_id=d.job_id,
            feature=job.feature,
            tenant=job.tenant or "",
            priority=d.priority,
            tier=plan.tier,
            model=message.model,
            attempt=attempt,
            input_tokens=spend.input_tokens,
            output_tokens=spend.output_tokens,
            cache_creation_input_tokens=spend.cache_write,
            cache_read_input_tokens=spend.cache_read,
            cost_usd=cost,
            baseline_cost_usd=baseline_cost_usd(usage, self._baseline),
            latency_ms=latency_ms,
            queue_ms=max(0, now_ms() - latency_ms - entry_ms(d.entry_id)),
            route_reason="; ".join(plan.route),
            response_cache=plan.cache,
        )
        return Finish(_encode(result), to_fields(event), job.reply_to)

    def _cached(
        self, d: Delivery, job: Job, answer: CachedAnswer, plan: Plan, how: str, started_ms: int
    ) -> Finish:
        """The result and usage event of a job answered without a call: from the response
        cache ("hit") or by an identical call in flight ("joined"). It costs nothing; its
        baseline is what the answer would have cost naively."""
        result = Result(
            id=d.job_id, status="ok", text=answer.text, content=answer.content,
            model=answer.model, tier=answer.tier, stop_reason=answer.stop_reason,
            usage=answer.usage, cost_usd=0.0, mode="cache",
        )  # fmt: skip
        usage = msgspec.convert(answer.usage, ApiUsage)
        why = "response cache hit" if how == "hit" else "joined an identical call in flight"
        event = UsageEvent(
            ts_ms=now_ms(), job_id=d.job_id, feature=job.feature, tenant=job.tenant or "",
            priority=d.priority, tier=answer.tier, model=answer.model, mode="cache",
            baseline_cost_usd=baseline_cost_usd(usage, self._baseline),
            latency_ms=max(0, now_ms() - started_ms),
            queue_ms=max(0, started_ms - entry_ms(d.entry_id)),
            route_reason="; ".join([*plan.route, why]), response_cache=how,
        )  # fmt: skip
        return Finish(_encode(result), to_fields(event), job.reply_to)


def consumer_name() -> str:
    """A name unique to this process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}-{random.randrange(16**4):04x}"


def build_worker(
    cfg: Config, *, concurrency: int, client: anthropic.AsyncAnthropic | None = None
) -> Worker:
    """A Worker wired to Redis and the API as the config says (starts embedded Redis if needed).

    `client` replaces the API client (the benchmark's in-process transport).
    """
    redis = connect(
        redis_url(cfg),
        block_s=cfg.worker.block_ms / 1000,
        max_connections=cfg.redis.max_connections,
        retries=0,  # _retrying_redis and the read loop retry, knowing what is safe to repeat
    )
    queue = Queue(
        redis,
        Keys(cfg.prefix),
        cfg.queue.priorities,
        consumer_name(),
        visibility_ms=int(cfg.queue.visibility_timeout_s * 1000),
        fair_every=cfg.queue.fair_every,
        result_ttl_s=cfg.queue.result_ttl_s,
        usage_maxlen=cfg.queue.usage_maxlen,
        batched=cfg.batch.priorities,
        rollups=Rollups(Keys(cfg.prefix), settings_of(cfg)),
    )
    client = client or make_client(cfg, concurrency)
    return Worker(cfg, queue, client, concurrency=concurrency)


async def serve(cfg: Config, *, concurrency: int, config_file: str | None = None) -> None:
    """Run one worker process until SIGTERM or SIGINT, then drain and return.

    SIGHUP reloads `config_file` (see worker.control).
    """
    worker = build_worker(cfg, concurrency=concurrency)
    worker.config_file = config_file
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    loop.add_signal_handler(signal.SIGHUP, worker.reload)
    log.info("worker %s started: concurrency=%d api=%s", worker.queue.consumer, concurrency,
             worker.client.base_url)  # fmt: skip
    try:
        await worker.run()
    finally:
        await worker.aclose()
