"""The worker loop: read jobs, run each through the API, finish or dead-letter it, drain on stop.

Wires the parts together; each part lives in its own module. One process runs one Worker with up
to `concurrency` jobs in flight as asyncio tasks.
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
from redis.exceptions import RedisError

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
from worker.config import Config, FeatureConfig
from worker.contract import (
    ErrorInfo,
    Job,
    Keys,
    Request,
    Result,
    UsageEvent,
    entry_ms,
    to_fields,
)
from worker.control import listen, reloaded
from worker.embedded import connect, redis_url
from worker.errors import (
    ConfigError,
    InvalidRequest,
    JobRejected,
    MalformedJob,
    TooLarge,
    UnknownFeature,
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
    parse_job,
    parse_request,
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
        """Process jobs until stop() is called, then drain in-flight work."""
        await self.queue.ensure_groups()
        renewer = asyncio.create_task(self._renew_forever())
        mover = asyncio.create_task(self._move_deferred_forever())
        folder = asyncio.create_task(self._fold_forever())
        control = asyncio.create_task(listen(self.queue.redis, self.queue.keys, self.reload))
        batching = asyncio.create_task(self._batcher())
        stop_wait = asyncio.create_task(self._stopping.wait())
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
            await self._drain(batching)
            renewer.cancel()
            mover.cancel()
            folder.cancel()
            control.cancel()
            await asyncio.gather(control, return_exceptions=True)
            await self.queue.leave()

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
        """This process's batcher candidate (worker.batcher), while batching is configured."""
        if not self.cfg.batch.priorities:
            return
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

    async def _drain(self, batching: asyncio.Task[None]) -> None:
        """Give in-flight jobs (and the batcher's step) grace_s; cancel the rest
        (unacknowledged, so they are reclaimed)."""
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

    async def _renew_forever(self) -> None:
        period = self.cfg.queue.visibility_timeout_s / 3
        while True:
            await asyncio.sleep(period)  # a timer, not polling: renewal is due every period
            try:
                await self.queue.renew(self._in_flight.values())
            except (RedisError, OSError) as exc:
                log.warning("renewing in-flight jobs failed: %s", exc)

    async def _move_deferred_forever(self) -> None:
        """Every second, put deferred jobs that are due back on their streams."""
        while True:
            await asyncio.sleep(1.0)  # a timer: deferrals are due on whole-second boundaries
            try:
                moved = await self.queue.move_due(now_ms())
            except (RedisError, OSError) as exc:
                log.warning("moving deferred jobs failed: %s", exc)
                continue
            if moved:
                log.info("%d deferred jobs are due and back on their streams", moved)

    async def _fold_forever(self) -> None:
        """Every second, add the finished jobs' rollup records to their hours (rollups.py)."""
        rollups = self.queue.rollups
        while rollups is not None:
            await asyncio.sleep(1.0)
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
        started_ms = now_ms()
        try:
            end = await self._retrying_redis(d, "running", lambda: self._outcome(d, started_ms))
        except Exception:  # the one catch-all: the job boundary
            log.exception("job=%s failed; left pending for redelivery", d.job_id)
            return
        if end is None:
            return
        if isinstance(end, Defer):
            until = end.until_ms
            if await self._retrying_redis(d, "deferring it", lambda: self._put_off(d, until)):
                log.info("job=%s deferred until %d: %s", d.job_id, until, end.why)
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
            d.job_id, event["feature"], event["tier"], event["status"],
            event["error_type"] or "-", event["latency_ms"], event["queue_ms"],
        )  # fmt: skip

    async def _put_off(self, d: Delivery, until_ms: int) -> bool:
        await self.queue.defer(d, d.job_id, until_ms)
        return True

    async def _outcome(self, d: Delivery, started_ms: int) -> Finish | Defer | None:
        try:
            return await self.process(d, started_ms)
        except JobRejected as exc:
            return self._rejected(d, exc, started_ms)

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
            except (RedisError, OSError) as exc:
                if time.monotonic() + pause > give_up:
                    log.error("job=%s: %s failed on Redis (%s); left pending for redelivery",
                              d.job_id, what, exc)  # fmt: skip
                    return None
                log.warning("job=%s: %s failed on Redis (%s); trying again in %.2f s",
                            d.job_id, what, exc, pause)  # fmt: skip
                await asyncio.sleep(pause)  # not _pause: a drain still wants the result written
                pause = min(pause * 2, 5.0)

    async def process(self, d: Delivery, started_ms: int) -> Finish | Defer | None:
        """Run one delivery. None: nothing to write (a duplicate, or stopping mid-backoff);
        Defer: put the job off (an open breaker or a spent budget with policy "defer").

        Raises JobRejected when the job can never succeed.
        """
        job, request, feature = self._admit(d)
        params: dict[str, Any] = msgspec.to_builtins(request)
        route = self._shape(job, feature, params)
        priorities = self.cfg.queue.priorities
        rank = priorities.index(d.priority) if d.priority in priorities else len(priorities)
        spend = Spend()
        tier, why = await self._route(job, feature, params, rank, spend)
        plan = Plan(tier, [why, *route])
        key = self._cache_key(job, feature, params, plan.tier)
        if key is None:
            return await self._attempts(d, job, feature, params, rank, spend, plan)
        keep_s = feature.response_cache_ttl_s or DEDUPE_KEEP_S
        hit = await self.cache.get(key) if feature.response_cache_ttl_s else None
        if hit is not None:
            return self._cached(d, job, hit, plan, "hit", started_ms)
        found = await self.cache.claim(key, keep_s, feature.dedupe)
        if isinstance(found, CachedAnswer):
            return self._cached(d, job, found, plan, "joined", started_ms)
        plan.cache = "miss"
        try:
            end = await self._attempts(d, job, feature, params, rank, spend, plan)
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
    ) -> str | None:
        """The response-cache key of this job, or None when neither the response cache nor
        de-duplication applies to it."""
        if job.cache == "off" or not (feature.response_cache_ttl_s or feature.dedupe):
            return None
        model = self.cfg.tiers[tier]
        return cache_key(self.queue.keys.prefix, job.feature, feature, job.tenant or "", model,
                         params)  # fmt: skip

    async def _attempts(
        self, d: Delivery, job: Job, feature: FeatureConfig, params: dict[str, Any], rank: int,
        spend: Spend, plan: Plan,
    ) -> Finish | Defer | None:  # fmt: skip
        """The job's attempts, with backoff between them, until one ends it."""
        max_attempts = self.cfg.queue.max_attempts
        while True:
            check_deadline(job)
            begun = await self.queue.begin_attempt(d)
            attempt, last_error = begun.number, begun.last_error
            if begun.has_result:
                await self.queue.ack_duplicate(d, d.job_id)
                log.info("job=%s already has a result; acknowledged the redelivery", d.job_id)
                return None
            if attempt > max_attempts:
                raise exhausted(attempt - 1, last_error)
            try:
                return await self._attempt(d, job, feature, params, rank, attempt, spend, plan)
            except RETRYABLE as exc:
                error = describe(exc)
                await self.queue.record_error(d.job_id, error)
                log.warning("job=%s attempt=%d failed: %s", d.job_id, attempt, error)
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

    def _admit(self, d: Delivery) -> tuple[Job, Request, FeatureConfig]:
        """Validate a delivery once, at the edge. Raises a JobRejected naming what to fix."""
        size = sum(len(k.encode()) + len(v.encode()) for k, v in d.fields.items())
        if size > self.cfg.queue.max_entry_bytes:
            raise TooLarge(
                f"the job entry is {size} bytes, over queue.max_entry_bytes = "
                f"{self.cfg.queue.max_entry_bytes}; shorten the request or raise the limit"
            )
        job = parse_job(d.fields)
        feature = self.cfg.features.get(job.feature)
        if feature is None:
            raise UnknownFeature(
                f"feature {job.feature!r} is not defined in config.toml [features]; "
                f"defined: {', '.join(sorted(self.cfg.features))}. "
                "Add it there or fix the producer."
            )
        if job.tier is not None and job.tier not in self.cfg.tiers:
            raise MalformedJob(
                f"tier {job.tier!r} is not defined in config.toml [tiers]; "
                f"defined: {', '.join(self.cfg.tiers)}. Name one of them or leave `tier` out."
            )
        return job, parse_request(job.request), feature

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
            cost_usd=cost,
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

    def _rejected(self, d: Delivery, exc: JobRejected, started_ms: int) -> Finish:
        f = d.fields
        error = ErrorInfo(exc.error_type, str(exc))
        result = Result(id=d.job_id, status="error", error=error)
        event = UsageEvent(
            ts_ms=now_ms(),
            job_id=d.job_id,
            feature=f.get("feature", ""),
            tenant=f.get("tenant", ""),
            priority=d.priority,
            status="error",
            attempt=exc.attempts,
            queue_ms=max(0, started_ms - entry_ms(d.entry_id)),
            error_type=exc.error_type,
        )
        dead = {
            **f,
            "error_type": exc.error_type,
            "error": str(exc),
            "attempts": str(exc.attempts),
            "priority": d.priority,
            "entry_id": d.entry_id,
            "job_id": d.job_id,
        }
        return Finish(_encode(result), to_fields(event), f.get("reply_to") or None, dead)


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
