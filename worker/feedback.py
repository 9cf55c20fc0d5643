"""Producers' verdicts on answers, after the fact: the `tokenq:feedback` stream applied to the
adaptive router's counts (worker.adaptive) as check results.

A verdict revises the job's answered record (`tokenq:answered:<id>`, written with its
finishing transaction): `bad` holds the answer as a failure, `good` as a pass when it was
counted; the counts change by the difference, in one MULTI watched on the record, with the
entry's acknowledgement, so a verdict counts once. Stream I/O is worker.queue's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import RedisError, WatchError

from worker.adaptive import Answered, Mark, add_into, decode_answered, encode
from worker.config import AdaptiveConfig, Config
from worker.contract import Feedback, Keys
from worker.queue import Entry, ack_into, claim_idle, ensure_group, leave_group, read_group

log = logging.getLogger("tokenq.adaptive")


def revise(record: Answered, verdict: Literal["good", "bad"], reason: str, now_ms: int) -> Answered:
    """The record after a verdict. It holds "bad" as a failure; "good" as a pass for an answer
    that was counted (a failed check overruled, an unjudged pass judged), as nothing for one
    that was not (a cache hit or a cut answer: counted when first written, or never). A
    changed mark counts from now: a verdict is fresh evidence."""
    held: Mark = "f" if verdict == "bad" else ("p" if record.counted else "")
    at_ms = record.at_ms if held == record.held else now_ms
    return msgspec.structs.replace(
        record, held=held, at_ms=at_ms, verdict=verdict, reason=reason[:200]
    )


def verdict_into(
    tx: Any, keys: Keys, a: AdaptiveConfig, old: Answered, new: Answered, now_ms: int
) -> None:
    """Queue on `tx` the counts' change from a revised record: the old mark taken back at the
    weight it was added with, the new one added."""
    if (old.held, old.at_ms) == (new.held, new.at_ms):
        return
    for record, sign in ((old, -1), (new, 1)):
        if record.held:
            field = f"{record.kind}|{record.tier}|{record.held}"
            add_into(tx, keys, a, record.feature, field, record.at_ms, sign, now_ms)


FEEDBACK_IDLE_MS = 60_000  # an entry pending this long: its reader died; another takes it
FEEDBACK_COUNT = 32  # entries per read: bounds the memory a flood of huge entries can take


class FeedbackReader:
    """Applies producers' verdicts from `tokenq:feedback` to the counts, as check results.

    Reads as a consumer of group `workers` (the entry stays pending until applied, and an
    entry whose reader died is taken over after `idle_ms`). Each entry is applied in
    one MULTI, watched on the job's record, with its XACK and XDEL, so it counts once. An
    entry that is not a Feedback, or names a job without a record (expired, unknown, not
    adaptive), is logged, counted in `tokenq:feedback:counts` and dropped: no entry stops it.
    """

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, consumer: str,
        config: Callable[[], Config], clock_ms: Callable[[], int],
        idle_ms: int = FEEDBACK_IDLE_MS,
        on_bad: Callable[[str, int], Awaitable[object]] | None = None,
    ) -> None:  # fmt: skip
        self.redis, self.keys, self.consumer = redis, keys, consumer
        self.config, self.clock_ms, self.idle_ms = config, clock_ms, idle_ms
        # Called with (job id, now_ms) for every `bad` verdict before it is applied (the
        # semantic cache's: worker.semantic_audit.bad_verdict); a Redis error leaves the
        # entry pending, to be taken over and applied again.
        self.on_bad = on_bad
        self.counts: Counter[str] = Counter()
        self._cursor = "0-0"

    async def run(self, stopping: asyncio.Event, *, block_ms: int = 1000) -> None:
        """Apply entries until `stopping` is set (a worker duty). A Redis error is logged and
        retried a second later; this returns only when stopping."""
        while not stopping.is_set():
            try:
                await self.step(block_ms)
            except RedisError as exc:
                log.warning("feedback reader: %s; trying again in 1 s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 1.0)

    async def step(self, block_ms: int) -> Counter[str]:
        """One read (taking over abandoned entries first, then blocking up to block_ms for
        new ones) and the entries applied; returns what became of them."""
        entries = await self._reclaim() + await self._read(block_ms)
        done: Counter[str] = Counter()
        for entry_id, fields in entries:
            done[await self._apply(entry_id, fields)] += 1
        self.counts.update(done)
        return done

    async def ensure_group(self) -> None:
        """Create the group on the feedback stream (and the stream), reading from its start."""
        await ensure_group(self.redis, self.keys.feedback)

    async def close(self) -> None:
        """Leave the group when nothing is pending on this consumer."""
        await leave_group(self.redis, self.keys.feedback, self.consumer)

    async def _read(self, block_ms: int) -> list[Entry]:
        return await read_group(
            self.redis, self.keys.feedback, self.consumer, count=FEEDBACK_COUNT, block_ms=block_ms
        )

    async def _reclaim(self) -> list[Entry]:
        self._cursor, entries = await claim_idle(
            self.redis, self.keys.feedback, self.consumer, idle_ms=self.idle_ms,
            cursor=self._cursor, count=FEEDBACK_COUNT,
        )  # fmt: skip
        return entries

    async def _apply(self, entry_id: bytes, fields: dict[bytes, bytes]) -> str:
        try:
            text = {k.decode(): v.decode() for k, v in fields.items()}
            feedback = msgspec.convert(text, Feedback, strict=False)
        except (UnicodeDecodeError, msgspec.ValidationError) as exc:
            return await self._drop(entry_id, "malformed", str(exc))
        if feedback.verdict == "bad" and self.on_bad is not None:
            await self.on_bad(feedback.job_id, self.clock_ms())
        for _ in range(5):  # another reader changed the record: read it again
            try:
                return await self._apply_to_record(entry_id, feedback)
            except WatchError:
                continue
        log.warning("feedback entry %s left pending: its record kept changing", entry_id)
        return "retry"

    async def _apply_to_record(self, entry_id: bytes, feedback: Feedback) -> str:
        key = self.keys.answered(feedback.job_id)
        async with self.redis.pipeline(transaction=True) as tx:
            await tx.watch(key)
            # Raw bytes: a value that is not ours (nor UTF-8) must not stop the reader.
            raw: Any = await tx.execute_command("GET", key, **{NEVER_DECODE: True})
            try:
                record = decode_answered(raw) if raw is not None else None
            except (msgspec.DecodeError, msgspec.ValidationError):
                record = None
            tx.multi()  # type: ignore[no-untyped-call]  # redis-py has no hint
            outcome = "unknown_job"
            if record is not None:
                a = self.config().router.adaptive
                now_ms = self.clock_ms()
                revised = revise(record, feedback.verdict, feedback.reason, now_ms)
                outcome = "applied" if revised.held != record.held else "unchanged"
                verdict_into(tx, self.keys, a, record, revised, now_ms)
                tx.set(key, encode(revised), keepttl=True)
            self._ack_into(tx, entry_id, outcome)
            await tx.execute()
        if outcome == "unknown_job":
            log.warning(
                "feedback entry %s: no record of job %.200r (expired, unknown, or not routed "
                "adaptively); dropped", entry_id, feedback.job_id,
            )  # fmt: skip
        return outcome

    async def _drop(self, entry_id: bytes, outcome: str, why: str) -> str:
        log.warning("feedback entry %s dropped (%s): %.200s", entry_id, outcome, why)
        async with self.redis.pipeline(transaction=True) as tx:
            self._ack_into(tx, entry_id, outcome)
            await tx.execute()
        return outcome

    def _ack_into(self, tx: Any, entry_id: bytes, outcome: str) -> None:
        ack_into(tx, self.keys.feedback, entry_id)
        tx.hincrby(self.keys.feedback_counts, outcome, 1)
