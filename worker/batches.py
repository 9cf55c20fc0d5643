"""The batcher's Message Batches: record, create, recover, follow, deliver (worker.batcher).

Crash safety. A batch and its members are recorded in Redis (state `planned`) before the
create call, and every write is fenced by the batcher lease (worker.lease). A `planned` batch
whose create call had no answer is recovered by listing the API's recent batches for one
created after it was planned with exactly its number of requests, and not known to tokenq
under another id; found, it is adopted (its results are checked against the members'
custom_ids before anything is delivered), otherwise it is created again, but only once
anthropic.timeout_s has passed since the last create call began, so that call cannot still
land. A create *answered* with an error made no batch: it is created again after a backoff.
Results are delivered in chunks; each chunk's transaction also deletes the chunk's members, so
a batcher that takes over mid-delivery delivers only what is left.

Each member's job carries the batch as a call of its run (worker.jobrun, recorded when the
batch was planned): an answer settles it at the batch price; an `errored` item is a failed
attempt; an `expired` or `canceled` one is not counted (not the job's fault) and the job goes
back on its stream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import msgspec
import redis.asyncio as aioredis

from worker import clock, jobrun, outcomes
from worker.config import Config
from worker.contract import Keys, as_text, entry_ms
from worker.errors import InvalidRequest, JobRejected
from worker.jobrun import Call, JobRun
from worker.jobs import ApiMessage, exhausted, text_of
from worker.lease import Lease
from worker.queue import Delivery, Queue
from worker.router import check_answer
from worker.usage import ApiUsage, cost_usd

log = logging.getLogger("tokenq.batcher")
CHUNK = 200  # results written per transaction
OPEN = ("planned", "submitted")
# Error types of an errored item that are the request's own fault: retrying cannot help.
REQUEST_ERRORS = ("invalid_request_error", "not_found_error", "request_too_large")
_encode = msgspec.json.Encoder().encode
Write = Callable[[Any], Any]
Request = Callable[[Delivery], Awaitable[tuple[str, dict[str, Any]] | None]]


MEMBER_KEYS = dict(priority="p", entry_id="e", job_id="j", attempt="a", tier="t", route="r")


class Member(msgspec.Struct, frozen=True, kw_only=True, rename=MEMBER_KEYS):
    """What `<prefix>:batch:<local>:members` holds per custom_id: the job it stands for."""

    priority: str
    entry_id: str
    job_id: str
    attempt: int  # the job's attempts with this batch
    tier: str
    route: str  # route_reason so far


_member = msgspec.json.Decoder(Member).decode


async def _hash(redis: aioredis.Redis, key: str) -> dict[str, str]:
    """HGETALL as str to str."""
    raw: Any = await redis.hgetall(key)
    return {as_text(k): as_text(v) for k, v in raw.items()}


class Batches:
    """The active batcher's batches: see the module docstring. `request` rebuilds a member's
    create request from its entry ((tier, params), None when it can no longer be batched);
    `hand_over` runs a job in real time."""

    def __init__(
        self, queue: Queue, lease: Lease, client: anthropic.AsyncAnthropic,
        config: Callable[[], Config], hand_over: Callable[[Delivery], Awaitable[None]],
        request: Request,
    ) -> None:  # fmt: skip
        self.queue, self.lease, self.client = queue, lease, client
        self.redis, self.keys = queue.redis, queue.keys
        self.config = config
        self.hand_over = hand_over
        self.request = request
        self._next_poll: dict[str, float] = {}

    @property
    def cfg(self) -> Config:
        return self.config()

    def forget(self) -> None:
        """Stepping down: the next leadership polls every batch afresh."""
        self._next_poll.clear()

    async def _commit(self, write: Write, local: str | None = None,
                      done: list[str] | None = None) -> None:  # fmt: skip
        """write(tx), and the deletion of `done` from the batch's members, fenced."""

        def both(tx: Any) -> None:
            write(tx)
            if local is not None and done:
                tx.hdel(self.keys.batch_members(local), *done)

        await self.lease.commit(both)

    # -- recording and creating --

    async def record_planned(
        self, local: str, members: dict[str, tuple[Member, Any]], writes: list[Write], size: int
    ) -> None:
        """One fenced transaction: the window's other writes (ends, waits, runs), and the
        batch with its members, state `planned`."""
        stamp = clock.now_ms()

        def write(tx: Any) -> None:
            for step in writes:
                step(tx)
            if not members:
                return
            batch = self.keys.batch(local)
            tx.hset(batch, mapping={"state": "planned", "count": len(members), "bytes": size,
                                    "planned_ms": stamp, "tried_ms": stamp})  # fmt: skip
            encoded = {c: _encode(m) for c, (m, _) in members.items()}
            tx.hset(self.keys.batch_members(local), mapping=encoded)
            tx.zadd(self.keys.batches, {local: stamp})

        await self._commit(write)

    async def create(self, local: str, requests: list[dict[str, Any]]) -> None:
        """One create call; on any failure the batch stays planned and _recover decides:
        the call may have reached the API even when no answer came back, but an error
        answer (a 529, a 5xx, a 429) means no batch was created, so it is tried again
        after a backoff instead of anthropic.timeout_s."""
        try:
            batch = await self.client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        except anthropic.APIStatusError as exc:
            await self._create_refused(local, exc)
            return
        except anthropic.APIError as exc:
            log.warning("batch %s: create failed (%s); it stays planned and is looked for, "
                        "then created again", local, exc)  # fmt: skip
            return
        await self._submitted(local, batch.id, verify=False)

    async def _create_refused(self, local: str, exc: anthropic.APIStatusError) -> None:
        """The API answered the create with an error: try again after 1 s doubling to 60 s
        (or its retry-after), counting the refusals in the batch's hash."""
        refused = int(await self.redis.hget(self.keys.batch(local), "refused") or 0) + 1
        wait_s = float(min(60, 2 ** (refused - 1)))
        after = str(exc.response.headers.get("retry-after", ""))
        if after.replace(".", "", 1).isdigit():
            wait_s = max(wait_s, min(float(after), 600.0))
        retry_ms = clock.now_ms() + int(wait_s * 1000)
        log.warning("batch %s: create refused (%s %s); created again in %.0f s", local,
                    exc.status_code, type(exc).__name__, wait_s)  # fmt: skip
        mapping = {"refused": refused, "retry_ms": retry_ms}
        await self._commit(lambda tx: tx.hset(self.keys.batch(local), mapping=mapping))

    async def _submitted(self, local: str, api_id: str, *, verify: bool) -> None:
        mapping = {"state": "submitted", "api_id": api_id, "submitted_ms": clock.now_ms(),
                   "verify": int(verify)}  # fmt: skip

        def write(tx: Any) -> None:
            tx.hset(self.keys.batch(local), mapping=mapping)
            tx.hset(self.keys.batch_ids, api_id, local)

        await self._commit(write)
        log.info("batch %s submitted as %s", local, api_id)

    # -- following submitted batches --

    async def open(self) -> list[str]:
        """The local ids of the batches planned or submitted, oldest first."""
        locals_: Any = await self.redis.zrange(self.keys.batches, 0, -1)
        states: list[Any] = []
        if locals_:
            async with self.redis.pipeline(transaction=False) as pipe:
                for local in locals_:
                    pipe.hget(self.keys.batch(as_text(local)), "state")
                states = await pipe.execute()
        return [as_text(lo) for lo, s in zip(locals_, states, strict=True) if s in OPEN]

    async def open_members(self) -> list[Member]:
        """The members of every open batch."""
        out: list[Member] = []
        for local in await self.open():
            raw: Any = await self.redis.hvals(self.keys.batch_members(local))
            out += [_member(v) for v in raw]
        return out

    async def follow(self) -> None:
        """Poll each open batch every batch.poll_s: recover planned ones, deliver ended ones,
        cancel those past batch.completion_s."""
        for local in await self.open():
            if clock.monotonic() < self._next_poll.get(local, 0.0):
                continue
            self._next_poll[local] = clock.monotonic() + self.cfg.batch.poll_s
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
        return clock.now_ms() > int(info["submitted_ms"]) + self.cfg.batch.completion_s * 1000

    async def _recover(self, local: str, info: dict[str, str]) -> None:
        """A planned batch whose create call had no answer: adopt the API's batch if it
        made one, else create it again once that call can no longer land."""
        if "retry_ms" in info:  # the last create was refused: no batch to look for
            if clock.now_ms() < int(info["retry_ms"]):
                return
        else:
            found = await self._find(int(info["planned_ms"]), int(info["count"]))
            if found is not None:
                log.warning("batch %s: found it at the API as %s; not submitting again", local,
                            found)  # fmt: skip
                await self._submitted(local, found, verify=True)
                return
            if clock.now_ms() < int(info["tried_ms"]) + (self.cfg.anthropic.timeout_s + 1) * 1000:
                return  # the last create call may still be on its way
        requests = await self._rebuild(local)
        if requests:
            tried = clock.now_ms()

            def again(tx: Any) -> None:
                tx.hset(self.keys.batch(local), "tried_ms", tried)
                tx.hdel(self.keys.batch(local), "retry_ms")

            await self._commit(again)
            await self.create(local, requests)

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
        """The create requests of a planned batch again, from its members' entries; a member
        that can no longer go as it was goes back on its stream."""
        members = await self._members(local)
        found = await self.queue.fetch([(m.priority, m.entry_id) for _, m in members])
        runs = await self._runs([m for _, m in members])
        requests, gone = [], []
        for (cid, m), d, run in zip(members, found, runs, strict=True):
            again = await self.request(d) if d is not None else None
            if again is None or again[0] != m.tier:
                gone.append((cid, m, d, run))
            else:
                requests.append({"custom_id": cid, "params": again[1]})

        def write(tx: Any) -> None:
            for _, m, d, run in gone:
                if d is not None:
                    self._back_into(tx, d, m, run, "not submitted")
            if not requests:
                tx.hset(self.keys.batch(local), "state", "dropped")

        if gone:
            await self._commit(write, local, [c for c, _, _, _ in gone])
        return requests

    async def _members(self, local: str) -> list[tuple[str, Member]]:
        raw = await _hash(self.redis, self.keys.batch_members(local))
        return [(c, _member(v)) for c, v in raw.items()]

    async def _runs(self, members: list[Member]) -> list[JobRun]:
        """The members' runs, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in members:
                pipe.hget(self.keys.state(m.job_id), "run")
            raw: list[Any] = await pipe.execute()
        return [jobrun.decode(r, entry_ms(m.entry_id)) for m, r in zip(members, raw, strict=True)]

    def _back_into(self, tx: Any, d: Delivery, m: Member, run: JobRun, why: str) -> None:
        """The job back at the end of its stream, its batch not counted as an attempt."""
        call = _batch_call(run, m)
        call.state, call.counted, call.error = "failed", False, why
        jobrun.save_into(tx, self.keys.state(m.job_id), run)
        self.queue.requeue_into(tx, d, m.job_id)

    # -- delivering results --

    async def _deliver(self, local: str, info: dict[str, str], batch: Any) -> None:
        started = clock.monotonic()
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
                 c.canceled, (clock.monotonic() - started) * 1000)  # fmt: skip

    async def _ours(self, local: str, api_id: str) -> bool:
        """Whether an adopted batch's results are exactly our members' custom_ids."""
        ids = {line.custom_id async for line in await self.client.messages.batches.results(api_id)}
        mine: Any = await self.redis.hkeys(self.keys.batch_members(local))
        return ids == {as_text(c) for c in mine}

    async def _close(self, local: str, batch: Any) -> None:
        """Jobs left without a result line go back to their streams; the batch is done."""
        left = await self._members(local)
        found = await self.queue.fetch([(m.priority, m.entry_id) for _, m in left])
        runs = await self._runs([m for _, m in left])
        c = batch.request_counts
        ttl = self.cfg.queue.result_ttl_s
        done = {"state": "done", "ended_ms": clock.now_ms(), "succeeded": c.succeeded,
                "errored": c.errored, "expired": c.expired, "canceled": c.canceled}  # fmt: skip

        def write(tx: Any) -> None:
            for (_, m), d, run in zip(left, found, runs, strict=True):
                if d is not None:
                    self._back_into(tx, d, m, run, "no result in its batch")
            tx.hset(self.keys.batch(local), mapping=done)
            tx.expire(self.keys.batch(local), ttl)
            tx.zremrangebyscore(self.keys.batches, "-inf", clock.now_ms() - ttl * 1000)

        await self._commit(write, local, [cid for cid, _ in left])

    async def _deliver_chunk(self, local: str, info: dict[str, str], lines: list[Any]) -> None:
        if not lines:
            return
        cids = [line.custom_id for line in lines]
        raw: list[Any] = await self.redis.hmget(self.keys.batch_members(local), cids)
        mine = [(line, _member(r)) for line, r in zip(lines, raw, strict=True) if r is not None]
        found = await self.queue.fetch([(m.priority, m.entry_id) for _, m in mine])
        runs = await self._runs([m for _, m in mine])
        writes: list[Write] = []
        realtime: list[Delivery] = []
        for (line, m), d, run in zip(mine, found, runs, strict=True):
            if d is None:
                continue  # already finished (a redelivered result of an earlier chunk)
            d.qualified = m.job_id != d.job_id
            call = _batch_call(run, m)
            call.started_ms = int(info["submitted_ms"])
            call.latency_ms = max(0, clock.now_ms() - call.started_ms)
            writes.append(self._outcome(local, line.result, m, d, run, realtime))

        def write(tx: Any) -> None:
            for step in writes:
                step(tx)

        await self._commit(write, local, [line.custom_id for line, _ in mine])
        for d in realtime:
            await self.hand_over(d)

    def _outcome(
        self, local: str, result: Any, m: Member, d: Delivery, run: JobRun,
        realtime: list[Delivery],
    ) -> Write:  # fmt: skip
        """The writes for one result line (a function of the transaction)."""
        kind = result.type
        if kind == "succeeded":
            end = self._succeeded(local, result.message.to_dict(), m, d, run)
            return lambda tx: outcomes.finish_into(tx, self.queue, d, m.job_id, end)
        if kind != "errored":  # expired, canceled: not the job's fault
            return lambda tx: self._back_into(tx, d, m, run, f"batch item {kind}")
        error = result.error.error
        text = f"batch item errored: {error.type}: {error.message}"
        call = _batch_call(run, m)
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
        self, local: str, body: dict[str, Any], m: Member, d: Delivery, run: JobRun
    ) -> outcomes.Ending:
        cfg = self.cfg
        message = msgspec.convert(body, ApiMessage)
        usage = msgspec.convert(message.usage, ApiUsage)
        prices = cfg.models.get(message.model) or cfg.models[cfg.tiers[m.tier]]
        call = _batch_call(run, m)
        call.state, call.cost_usd = "answered", cost_usd(usage, prices, batch=True)
        call.input_tokens, call.output_tokens = usage.input_tokens, usage.output_tokens
        call.cache_write, call.cache_read = usage.cache_write, usage.cache_read
        feature = cfg.features.get(d.fields.get("feature", ""))
        problem = feature and check_answer(feature, text_of(message), message.stop_reason)
        run.route = [m.route]
        baseline = cfg.models[cfg.tiers[cfg.router.baseline_tier]]
        return outcomes.batch_answered(d, run, message, call, local=local, baseline=baseline,
                                       problem=problem or None)  # fmt: skip


def _batch_call(run: JobRun, m: Member) -> Call:
    """The batch a member is in, as a call of its run (recorded when it was planned; added
    now for a run that has none, e.g. one that could not be read)."""
    for call in reversed(run.calls):
        if call.mode == "batch" and call.state == "sent":
            return call
    call = Call(model="", tier=m.tier, mode="batch", started_ms=clock.now_ms())
    run.calls.append(call)
    return call


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
