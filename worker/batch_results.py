"""The members of the batcher's batches: the jobs they stand for, their runs, and delivering
a batch's results (worker.batches follows the batches; this module ends or returns their jobs).

Each member's job carries the batch as a call of its run (worker.jobrun, recorded when the
batch was planned): an answer settles it at the batch price; an `errored` item is a failed
attempt (tried again in the next window or in real time, per batch.retry, until
queue.max_attempts; a fault of the request is dead-lettered at once); an `expired` or
`canceled` one is not counted (not the job's fault) and the job goes back on its stream.
Results are delivered CHUNK at a time; each chunk's transaction also deletes the chunk's
members, so a batcher that takes over mid-delivery delivers only what is left. Every write is
fenced by the batcher lease.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anthropic
import msgspec
import redis.asyncio as aioredis

from worker import clock, jobrun, learning, outcomes
from worker.batch_streams import BatchQueue
from worker.config import Config
from worker.contract import as_text, entry_ms, shown
from worker.errors import InvalidRequest, JobRejected
from worker.jobrun import Call, JobRun
from worker.jobs import ApiMessage, exhausted, text_of
from worker.lease import Lease
from worker.queue import Delivery
from worker.router import check_answer
from worker.usage import ApiUsage, cost_usd

log = logging.getLogger("tokenq.batcher")
CHUNK = 200  # results written per transaction
# Error types of an errored item that are the request's own fault: retrying cannot help.
REQUEST_ERRORS = ("invalid_request_error", "not_found_error", "request_too_large")
Write = Callable[[Any], Any]


MEMBER_KEYS = dict(priority="p", entry_id="e", job_id="j", attempt="a", tier="t", route="r")


class Member(msgspec.Struct, frozen=True, kw_only=True, rename=MEMBER_KEYS):
    """What `<prefix>:batch:<local>:members` holds per custom_id: the job it stands for."""

    priority: str
    entry_id: str
    job_id: str
    attempt: int  # the job's attempts with this batch
    tier: str
    route: str  # route_reason so far


member = msgspec.json.Decoder(Member).decode


class ApiError(msgspec.Struct, frozen=True):
    """An errored item's `error.error`: the API's error type and message."""

    type: str = ""
    message: str = ""


class ApiErrorBody(msgspec.Struct, frozen=True):
    error: ApiError = ApiError()


class ItemResult(msgspec.Struct, frozen=True):
    """A result line's `result`: `message` when it succeeded, `error` when it errored."""

    type: str  # succeeded, errored, canceled, expired
    message: ApiMessage | None = None
    error: ApiErrorBody = ApiErrorBody()


class Item(msgspec.Struct, frozen=True):
    """A line of a batch's results (JSONL), decoded as read: the SDK's own models cost
    some 70 times as much per line, on the event loop, for the few fields read here."""

    custom_id: str
    result: ItemResult


_item = msgspec.json.Decoder(Item).decode


async def hash_of(redis: aioredis.Redis, key: str) -> dict[str, str]:
    """HGETALL as str to str."""
    raw: Any = await redis.hgetall(key)
    return {as_text(k): as_text(v) for k, v in raw.items()}


class Members:
    """The active batcher's batch members: see the module docstring. `hand_over` runs a job
    in real time (fenced, worker.lease)."""

    def __init__(
        self, queue: BatchQueue, lease: Lease, client: anthropic.AsyncAnthropic,
        config: Callable[[], Config], hand_over: Callable[[Delivery], Awaitable[None]],
    ) -> None:  # fmt: skip
        self.queue, self.lease, self.client = queue, lease, client
        self.redis, self.keys = queue.redis, queue.keys
        self.config = config
        self.hand_over = hand_over

    @property
    def cfg(self) -> Config:
        return self.config()

    async def commit(
        self, write: Write, local: str | None = None, done: list[str] | None = None
    ) -> None:
        """write(tx), and the deletion of `done` from the batch's members, fenced."""

        def both(tx: Any) -> None:
            write(tx)
            if local is not None and done:
                tx.hdel(self.keys.batch_members(local), *done)

        await self.lease.commit(both)

    async def of(self, local: str) -> list[tuple[str, Member]]:
        raw = await hash_of(self.redis, self.keys.batch_members(local))
        return [(c, member(v)) for c, v in raw.items()]

    async def entries(self, members: list[Member]) -> list[tuple[Delivery | None, JobRun]]:
        """Each member's entry (None when it is no longer on its stream) and its job's run."""
        found = await self.queue.fetch([(m.priority, m.entry_id) for m in members])
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in members:
                pipe.hget(self.keys.state(m.job_id), "run")
            raw: list[Any] = await pipe.execute()
        runs = (jobrun.decode(r, entry_ms(m.entry_id)) for m, r in zip(members, raw, strict=True))
        return list(zip(found, runs, strict=True))

    def back_into(self, tx: Any, d: Delivery, m: Member, run: JobRun, why: str) -> None:
        """The job back at the end of its stream, its batch not counted as an attempt."""
        call = batch_call(run, m)
        call.state, call.counted, call.error = "failed", False, why
        jobrun.save_into(tx, self.keys.state(m.job_id), run)
        self.queue.requeue_into(tx, d, m.job_id)

    # -- delivering results --

    async def deliver(self, local: str, info: dict[str, str], batch: Any) -> None:
        started = clock.monotonic()
        if info.get("verify") == "1" and not await self._ours(local, batch.id):
            log.error(
                "batch %s: %s does not hold its custom_ids; its jobs go back to their streams",
                local,
                batch.id,
            )
        else:
            chunk: list[Item] = []
            async with contextlib.aclosing(self._items(batch.id)) as items:
                async for line in items:
                    chunk.append(line)
                    if len(chunk) == CHUNK:
                        await self._deliver_chunk(local, info, chunk)
                        chunk = []
            await self._deliver_chunk(local, info, chunk)
        await self._close(local, batch)
        c = batch.request_counts
        log.info(
            "batch %s (%s) ended: succeeded=%d errored=%d expired=%d canceled=%d delivered_ms=%d",
            local,
            batch.id,
            c.succeeded,
            c.errored,
            c.expired,
            c.canceled,
            (clock.monotonic() - started) * 1000,
        )

    async def _ours(self, local: str, api_id: str) -> bool:
        """Whether an adopted batch's results are exactly our members' custom_ids."""
        ids = {line.custom_id async for line in self._items(api_id)}
        mine: Any = await self.redis.hkeys(self.keys.batch_members(local))
        return ids == {as_text(c) for c in mine}

    async def _items(self, api_id: str) -> AsyncGenerator[Item]:
        """The batch's result lines."""
        results = self.client.messages.batches.with_streaming_response.results(api_id)
        async with results as response:
            async for line in response.iter_lines():
                if line.strip():
                    yield _item(line)

    async def _close(self, local: str, batch: Any) -> None:
        """Jobs left without a result line go back to their streams; the batch is done."""
        left = await self.of(local)
        entries = await self.entries([m for _, m in left])
        c = batch.request_counts
        ttl = self.cfg.queue.result_ttl_s
        done = {
            "state": "done",
            "ended_ms": clock.now_ms(),
            "succeeded": c.succeeded,
            "errored": c.errored,
            "expired": c.expired,
            "canceled": c.canceled,
        }

        def write(tx: Any) -> None:
            for (_, m), (d, run) in zip(left, entries, strict=True):
                if d is not None:
                    self.back_into(tx, d, m, run, "no result in its batch")
            tx.hset(self.keys.batch(local), mapping=done)
            tx.expire(self.keys.batch(local), ttl)
            tx.zremrangebyscore(self.keys.batches, "-inf", clock.now_ms() - ttl * 1000)

        await self.commit(write, local, [cid for cid, _ in left])

    async def _deliver_chunk(self, local: str, info: dict[str, str], lines: list[Item]) -> None:
        if not lines:
            return
        cids = [line.custom_id for line in lines]
        raw: list[Any] = await self.redis.hmget(self.keys.batch_members(local), cids)
        mine = [(line, member(r)) for line, r in zip(lines, raw, strict=True) if r is not None]
        entries = await self.entries([m for _, m in mine])
        writes: list[Write] = []
        realtime: list[Delivery] = []
        for (line, m), (d, run) in zip(mine, entries, strict=True):
            if d is None:
                continue  # already finished (a redelivered result of an earlier chunk)
            d.qualified = m.job_id != d.job_id
            call = batch_call(run, m)
            call.started_ms = int(info["submitted_ms"])
            call.latency_ms = max(0, clock.now_ms() - call.started_ms)
            writes.append(self._outcome(local, line.result, m, d, run, realtime))

        def write(tx: Any) -> None:
            for step in writes:
                step(tx)

        await self.commit(write, local, [line.custom_id for line, _ in mine])
        for d in realtime:
            await self.hand_over(d)

    def _outcome(
        self,
        local: str,
        result: ItemResult,
        m: Member,
        d: Delivery,
        run: JobRun,
        realtime: list[Delivery],
    ) -> Write:
        """The writes for one result line (a function of the transaction)."""
        kind = result.type
        if kind == "succeeded":
            if result.message is None:  # not per the API: fails as an unreadable answer does
                raise ValueError(f"batch {local}: job={shown(m.job_id)} has no message")
            end = self._succeeded(local, result.message, m, d, run)
            return lambda tx: outcomes.finish_into(tx, self.queue, d, m.job_id, end)
        if kind != "errored":  # expired, canceled: not the job's fault
            return lambda tx: self.back_into(tx, d, m, run, f"batch item {kind}")
        error = result.error.error
        text = f"batch item errored: {error.type}: {error.message}"
        call = batch_call(run, m)
        call.state, call.error, run.last_error = "failed", text, text
        if error.type in REQUEST_ERRORS or run.attempts >= self.cfg.queue.max_attempts:
            exc: JobRejected = exhausted(run.attempts, text)
            if error.type in REQUEST_ERRORS:
                exc = InvalidRequest(
                    f"the API rejected the request in batch {local}: {error.message}. Fix the "
                    "producer's request, then replay the job (tokenq dead replay).",
                    attempts=run.attempts,
                )
            dead = outcomes.rejected(d, exc, started_ms=clock.now_ms(), cfg=self.cfg, run=run)
            return lambda tx: outcomes.finish_into(tx, self.queue, d, m.job_id, dead)
        state = self.keys.state(m.job_id)
        if self.cfg.batch.retry == "realtime":
            realtime.append(d)
            return lambda tx: jobrun.save_into(tx, state, run)

        def again(tx: Any) -> None:
            jobrun.save_into(tx, state, run)
            self.queue.requeue_into(tx, d, m.job_id)

        return again

    def _succeeded(
        self, local: str, message: ApiMessage, m: Member, d: Delivery, run: JobRun
    ) -> outcomes.Ending:
        cfg = self.cfg
        usage = msgspec.convert(message.usage, ApiUsage)
        prices = cfg.models.get(message.model) or cfg.models[cfg.tiers[m.tier]]
        call = batch_call(run, m)
        call.state, call.cost_usd = "answered", cost_usd(usage, prices, batch=True)
        call.input_tokens, call.output_tokens = usage.input_tokens, usage.output_tokens
        call.cache_write, call.cache_read = usage.cache_write, usage.cache_read
        name = d.fields.get("feature", "")
        feature = cfg.features.get(name)
        problem = feature and check_answer(
            feature, text_of(message), message.stop_reason, usage.output_tokens
        )
        call.check = problem or ""
        run.route = [m.route]
        baseline = cfg.models[cfg.tiers[cfg.router.baseline_tier]]
        ending = outcomes.batch_answered(
            d, run, message, call, local=local, baseline=baseline, problem=problem or None
        )
        keys, job_id = self.keys, m.job_id

        def learn(tx: Any) -> None:  # as a realtime answer teaches (worker.learning)
            learning.learn_into(
                tx, keys, cfg, feature=name, job_id=job_id, run=run, now_ms=clock.now_ms()
            )

        return dataclasses.replace(ending, also=learn)


def batch_call(run: JobRun, m: Member) -> Call:
    """The batch a member is in, as a call of its run (recorded when it was planned; added
    now for a run that has none, e.g. one that could not be read)."""
    for call in reversed(run.calls):
        if call.mode == "batch" and call.state == "sent":
            return call
    call = Call(model="", tier=m.tier, mode="batch", started_ms=clock.now_ms())
    run.calls.append(call)
    return call
