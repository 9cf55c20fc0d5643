"""The worker loop: read jobs, run each (worker.process), write what it ends in, drain on stop.

One process runs one Worker with up to `concurrency` jobs in flight as asyncio tasks, and its
long-lived duties (the reader with its reclaims, the renewer, the deferred mover, the control
listener, the batcher) in one TaskGroup, each under `supervise`: an unexpected error is logged
with its traceback and the duty starts again after a backoff, so nothing one entry holds can
stop a worker. Each job runs inside the job boundary (`_handle`): it ends finished, dead-
lettered or put off, or stays pending for redelivery; a job that keeps failing is dead-
lettered once it has been delivered or tried queue.max_attempts times.

The parts it wires: Queue (stream I/O), Runner (one job's run), Caller (one API call inside
the limits), ResponseCache, Claims, DeferredSet, and the Batcher, which hands jobs to real
time through `adopt`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable

import anthropic
import httpx2
from redis.exceptions import RedisError

from worker import clock, jobrun, outcomes, semantic_audit
from worker.batcher import Batcher
from worker.caching import ResponseCache
from worker.calls import Caller
from worker.claims import Claims
from worker.config import Config
from worker.contract import Keys, clean, shown
from worker.control import listen, reloaded
from worker.decide import Work
from worker.deferred import DeferredSet
from worker.embedded import connect, redis_url
from worker.embeddings import make_embedder
from worker.errors import ConfigError
from worker.feedback import FeedbackReader
from worker.jobs import Defer, GaveUp, TakenOver, exhausted
from worker.process import Runner
from worker.queue import Delivery, Queue
from worker.rollups import Rollups, settings_of
from worker.semantic import SemanticCache
from worker.supervise import stopped_within, supervise

log = logging.getLogger("tokenq.worker")
# Connections opened at start: the reader, the two shared trips (worker.trips), the limiter.
WARM_CONNECTIONS = 4


class Worker:
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
        self._running: set[str] = set()  # the entries of the jobs in flight (Delivery.owner)
        self._stopping = asyncio.Event()
        redis, keys = queue.redis, queue.keys
        self.caller = Caller(cfg, queue, client)
        self.claims = Claims(redis, keys, queue.streams, queue.trips)
        lease_ms = int((cfg.anthropic.timeout_s + 30) * 1000)
        cache = ResponseCache(redis, lease_ms=lease_ms, block_ms=cfg.worker.block_ms)
        # The semantic cache (worker.semantic); the embedder makes no call until a feature
        # with semantic_cache looks something up.
        self.semantic = SemanticCache(redis, keys, make_embedder(cfg), clock.now_ms)
        self.runner = Runner(
            cfg, queue, self.claims, self.caller, cache, self._stopping, self.semantic
        )
        self.deferred = DeferredSet(redis, keys, queue.priorities)

    def stop(self) -> None:
        """Stop reading; in-flight jobs get worker.grace_s to finish. Safe to call twice."""
        if not self._stopping.is_set():
            log.info("stopping: %d jobs in flight", len(self._in_flight))
        self._stopping.set()

    @property
    def stopping(self) -> asyncio.Event:
        """Set once stop() was called."""
        return self._stopping

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
        self.caller.reload(cfg)
        self.runner.reload(cfg)
        if self.queue.rollups is not None:
            self.queue.rollups.reload(settings_of(cfg))
        log.info("reloaded %s", self.config_file)
        return True

    async def aclose(self) -> None:
        """Give back the rate-limit leases; close the API client, the embedder and the Redis
        connection."""
        await self.caller.limiter.close()
        await self.client.close()
        await self.semantic.embedder.aclose()
        await self.queue.redis.aclose()

    async def run(self) -> None:
        """Process jobs until stop() is called, then drain in-flight work.

        The duties run in one TaskGroup, each supervised. The reader and the batcher stop on
        stop(); the renewer, the deferred mover and the control listener keep serving the jobs
        in flight until the drain is over.
        """
        if not await self._redis_ready():
            return
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
            if reads_feedback(self.cfg):  # producers' verdicts (worker.adaptive)
                duties.create_task(
                    supervise("feedback reader", self._read_feedback, self._stopping)
                )
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

    async def _redis_ready(self) -> bool:
        """Create the consumer groups (and load the scripts), waiting for Redis while it is
        away: a worker started during a restart or a failover must not exit, since nothing
        may start it again. False when the worker is stopped first."""
        delay = 0.5
        while True:
            try:
                await self.queue.ensure_groups(warm=WARM_CONNECTIONS)
                return True
            except (RedisError, OSError) as exc:
                log.warning("Redis does not answer (%s); trying again in %.1f s", exc, delay)
            if await stopped_within(self._stopping, delay):
                return False
            delay = min(delay * 2, 5.0)

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

    async def _read(self, free: int) -> list[Delivery]:
        try:
            return await self.queue.read(free, self.cfg.worker.block_ms)
        except (RedisError, OSError) as exc:
            log.warning("reading jobs failed (%s); trying again in 1 s", exc)
            await stopped_within(self._stopping, 1.0)
            return []

    def adopt(self, d: Delivery) -> None:
        """Run a delivery as a job in flight: one read here, or one the batcher hands over
        (due before its batch window ends, or an errored batch item retried in real time).

        An entry this process is running already is not started again: after an outage
        longer than the visibility timeout the reclaim hands a worker back its own jobs in
        flight, and the writes' fence (worker.fence) cannot tell two tasks of one consumer
        apart. Such a reclaim only renewed the entry."""
        if d.owner in self._running:
            log.info("job=%s is running here already; reclaimed entry %s left to it",
                     shown(d.job_id), d.owner)  # fmt: skip
            return
        task = asyncio.create_task(self._handle(d))
        self._in_flight[task] = d
        self._running.add(d.owner)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        d = self._in_flight.pop(task)
        self._running.discard(d.owner)

    async def _read_feedback(self) -> None:
        """Apply producers' verdicts on tokenq:feedback to the adaptive router's counts and
        the semantic cache's entries."""
        redis, keys = self.queue.redis, self.queue.keys

        async def on_bad(job_id: str, now_ms: int) -> None:  # a semantic hit loses its entry
            await semantic_audit.bad_verdict(redis, keys, self.cfg, job_id, now_ms)

        reader = FeedbackReader(
            redis, keys, self.queue.consumer, config=lambda: self.cfg, clock_ms=clock.now_ms,
            on_bad=on_bad,
        )  # fmt: skip
        await reader.ensure_group()
        try:  # blocks no longer than a job read: the Redis client's socket timeout covers it
            await reader.run(self._stopping, block_ms=self.cfg.worker.block_ms)
        finally:
            await asyncio.shield(reader.close())

    async def _listen(self) -> None:
        await listen(self.queue.redis, self.queue.keys, self.reload)

    async def _batcher(self) -> None:
        """This process's batcher candidate (worker.batcher)."""
        batcher = Batcher(self.queue, self.client, lambda: self.cfg, self.adopt, self._stopping)
        await batcher.run()

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
        while not await stopped_within(until, period):
            try:
                await self.queue.renew(self._in_flight.values())
            except (RedisError, OSError) as exc:
                log.warning("renewing in-flight jobs failed: %s", exc)

    async def _move_deferred_forever(self, until: asyncio.Event) -> None:
        """Every second, put deferred jobs that are due back on their streams."""
        # A timer: deferrals are due on whole-second boundaries.
        while not await stopped_within(until, 1.0):
            try:
                moved = await self.deferred.move_due(clock.now_ms())
            except (RedisError, OSError) as exc:
                log.warning("moving deferred jobs failed: %s", exc)
                continue
            if moved:
                log.info("%d deferred jobs are due and back on their streams", moved)

    async def _fold_forever(self, until: asyncio.Event) -> None:
        """Every second, add the finished jobs' rollup records to their hours (rollups.py)."""
        rollups = self.queue.rollups
        # A timer: the rollups are promised no more than a second behind.
        while rollups is not None and not await stopped_within(until, 1.0):
            try:
                await rollups.fold(self.queue.redis)
            except (RedisError, OSError) as exc:
                log.warning("folding the rollups failed: %s", exc)

    # -- one job --

    async def _handle(self, d: Delivery) -> None:
        """Run one delivery to its end: finished, dead-lettered, put off, or left pending.
        The job boundary: nothing raised here goes further."""
        w = Work(d, clock.now_ms(), token=uuid.uuid4().hex)
        try:
            step = await self.runner.run(w)
            if isinstance(step, Defer):
                await self.caller.settle_unsettled(w.c)  # before its run is written
                await self._put_off(w, step)
            elif step is not None:
                await self._finish(w, step)
        except GaveUp:
            pass  # logged where Redis failed; the job is reclaimed once Redis answers
        except TakenOver:
            log.warning("job=%s: taken over by another worker; left to it", shown(d.job_id))
        except Exception as exc:  # the one catch-all: the job boundary
            try:
                await self._failed(w, exc)
            except (RedisError, OSError, GaveUp) as err:
                log.error(
                    "job=%s: recording its failure failed too (%s); left pending",
                    shown(d.job_id),
                    err,
                )
        finally:
            # Answered calls whose holds the job's end did not settle (it was not written by
            # this worker, or the job did not end): settled on their own (idempotent).
            await self.caller.settle_unsettled(w.c)

    async def _written(self, w: Work, what: str, write: Callable[[], Awaitable[bool]]) -> bool:
        """write(), shielded and tried again through a Redis outage; whether it applied. The
        writes are fenced by the entry's holder (worker.fence), so a try whose reply was lost
        and a job another worker took over both leave nothing to write again: False."""
        # Shielded: a cancellation during the finishing write must not half-finish it.
        return bool(await self.caller.retrying(w.d.job_id, what, lambda: asyncio.shield(write())))

    async def _finish(self, w: Work, ending: outcomes.Ending) -> None:
        """Write the job's end: result, usage event (dead letter, reply), acknowledgement,
        and the budget settlements of its answered calls."""
        d, e, c = w.d, ending.event, w.c
        if c is not None and c.unsettled:
            ending = dataclasses.replace(ending, settle=self.caller.settlements(c))
        crossed: list[int] = []

        async def write() -> bool:
            got = await outcomes.finish(self.queue, d, d.job_id, ending)
            crossed[:] = got or []
            return got is not None

        if not await self._written(w, "writing its result", write):
            log.warning("job=%s: ended already, or taken over by another worker; this worker "
                        "wrote nothing for it", shown(d.job_id))  # fmt: skip
            return
        if c is not None and ending.settle:
            await self.caller.settled(c, crossed)
        log.info(
            "job=%s feature=%s tier=%s status=%s error_type=%s attempt=%d latency_ms=%d "
            "queue_ms=%d", shown(d.job_id), shown(e.feature, 80), e.tier, e.status,
            e.error_type or "-", e.attempt, e.latency_ms, e.queue_ms,
        )  # fmt: skip

    async def _put_off(self, w: Work, defer: Defer) -> None:
        """Move the job to the deferred set with its run (a copy waiting for its first entry
        has no run of its own)."""
        d, owns = w.d, not defer.waits
        run = jobrun.encode(w.c.run) if owns and w.c is not None else None
        if await self._written(w, "deferring it", lambda: self.queue.defer(
            d, d.job_id, defer.until_ms, owns_claim=owns, run=run
        )):  # fmt: skip
            log.info("job=%s deferred until %d: %s", shown(d.job_id), defer.until_ms, defer.why)

    async def _failed(self, w: Work, exc: Exception) -> None:
        """An unexpected error at the job boundary (a bug, or a Redis error that would come
        back). It counts: once the entry was delivered, or the job tried, max_attempts times,
        it is dead-lettered naming this error; until then it stays pending (its run says why)
        and is reclaimed after the visibility timeout."""
        d, run = w.d, w.c.run if w.c is not None else None
        error = clean(f"{type(exc).__name__}: {exc}")[:500]
        log.error(
            "job=%s failed unexpectedly (delivery %d)", shown(d.job_id), d.deliveries, exc_info=exc
        )
        if await self.queue.is_finished(d):
            return  # a failed reply after the finishing write was applied
        if run is not None:
            run.failures += 1
            run.last_error = error
        tries = max(d.deliveries, run.tries if run is not None else 0)
        if tries < self.cfg.queue.max_attempts:
            if run is not None and not await self.queue.save_run(d, jobrun.encode(run)):
                return  # another worker took the job over
            log.warning(
                "job=%s left pending; it is reclaimed after queue.visibility_timeout_s",
                shown(d.job_id),
            )
            return
        failure = exhausted(tries, f"{error} (an unexpected error in tokenq)")
        ending = await self.runner.refused(w, failure)
        await outcomes.finish(self.queue, d, d.job_id, ending)
        log.error("job=%s dead-lettered after %d unexpected failures", shown(d.job_id), tries)


def reads_feedback(cfg: Config) -> bool:
    """Whether workers read tokenq:feedback: for the adaptive router, or the semantic cache
    (a `bad` verdict on a hit removes its entry). Decided at start: a reload that turns
    either on needs a restart for feedback to be read."""
    adaptive = cfg.router.policy == "adaptive"
    return adaptive or any(f.semantic_cache is not None for f in cfg.features.values())


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
        retries=0,  # jobs.with_retries and the read loop retry, knowing what is safe to repeat
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
    log.info(
        "worker %s started: concurrency=%d api=%s",
        worker.queue.consumer,
        concurrency,
        worker.client.base_url,
    )
    try:
        await worker.run()
    finally:
        await worker.aclose()
