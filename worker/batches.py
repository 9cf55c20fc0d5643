"""The batcher's Message Batches: record, create, recover, follow (worker.batcher).

Crash safety. A batch and its members are recorded in Redis (state `planned`) before the
create call, and every write is fenced by the batcher lease (worker.lease). A `planned` batch
whose create call had no answer is recovered by listing the API's recent batches for one
created after it was planned with exactly its number of requests, and not known to tokenq
under another id; found, it is adopted (its results are checked against the members'
custom_ids before anything is delivered), otherwise it is created again, but only once
anthropic.timeout_s has passed since the last create call began, so that call cannot still
land. A create *answered* with an error made no batch: it is created again after a backoff.
Delivering a batch's results, and what each does to its member's job, is
worker.batch_results.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import msgspec

from worker import clock
from worker.batch_results import Member, Members, Write, hash_of, member
from worker.batch_streams import BatchQueue
from worker.config import Config
from worker.contract import as_text
from worker.lease import Lease
from worker.queue import Delivery

log = logging.getLogger("tokenq.batcher")
OPEN = ("planned", "submitted")
_encode = msgspec.json.Encoder().encode
Request = Callable[[Delivery], Awaitable[tuple[str, dict[str, Any]] | None]]


class Batches:
    """The active batcher's batches: see the module docstring. `request` rebuilds a member's
    create request from its entry ((tier, params), None when it can no longer be batched);
    `hand_over` runs a job in real time."""

    def __init__(
        self,
        queue: BatchQueue,
        lease: Lease,
        client: anthropic.AsyncAnthropic,
        config: Callable[[], Config],
        hand_over: Callable[[Delivery], Awaitable[None]],
        request: Request,
    ) -> None:
        self.queue, self.lease, self.client = queue, lease, client
        self.redis, self.keys = queue.redis, queue.keys
        self.config = config
        self.request = request
        self.members = Members(queue, lease, client, config, hand_over)
        self._next_poll: dict[str, float] = {}

    @property
    def cfg(self) -> Config:
        return self.config()

    def forget(self) -> None:
        """Stepping down: the next leadership polls every batch afresh."""
        self._next_poll.clear()

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
            tx.hset(
                batch,
                mapping={
                    "state": "planned",
                    "count": len(members),
                    "bytes": size,
                    "planned_ms": stamp,
                    "tried_ms": stamp,
                },
            )
            encoded = {c: _encode(m) for c, (m, _) in members.items()}
            tx.hset(self.keys.batch_members(local), mapping=encoded)
            tx.zadd(self.keys.batches, {local: stamp})

        await self.members.commit(write)

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
            log.warning(
                "batch %s: create failed (%s); it stays planned and is looked for, "
                "then created again",
                local,
                exc,
            )
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
        log.warning(
            "batch %s: create refused (%s %s); created again in %.0f s",
            local,
            exc.status_code,
            type(exc).__name__,
            wait_s,
        )
        mapping = {"refused": refused, "retry_ms": retry_ms}
        await self.members.commit(lambda tx: tx.hset(self.keys.batch(local), mapping=mapping))

    async def _submitted(self, local: str, api_id: str, *, verify: bool) -> None:
        mapping = {
            "state": "submitted",
            "api_id": api_id,
            "submitted_ms": clock.now_ms(),
            "verify": int(verify),
        }

        def write(tx: Any) -> None:
            tx.hset(self.keys.batch(local), mapping=mapping)
            tx.hset(self.keys.batch_ids, api_id, local)

        await self.members.commit(write)
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
            out += [member(v) for v in raw]
        return out

    async def follow(self) -> None:
        """Poll each open batch every batch.poll_s: recover planned ones, deliver ended ones,
        cancel those past batch.completion_s."""
        for local in await self.open():
            if clock.monotonic() < self._next_poll.get(local, 0.0):
                continue
            self._next_poll[local] = clock.monotonic() + self.cfg.batch.poll_s
            info = await hash_of(self.redis, self.keys.batch(local))
            if info.get("state") == "planned":
                await self._recover(local, info)
                continue
            batch = await self.client.messages.batches.retrieve(info["api_id"])
            if batch.processing_status == "ended":
                await self.members.deliver(local, info, batch)
                self._next_poll.pop(local, None)
            elif self._overdue(info) and batch.processing_status == "in_progress":
                log.warning(
                    "batch %s (%s) passed batch.completion_s; canceling it", local, batch.id
                )
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
                log.warning(
                    "batch %s: found it at the API as %s; not submitting again", local, found
                )
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

            await self.members.commit(again)
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
        members = await self.members.of(local)
        entries = await self.members.entries([m for _, m in members])
        requests, gone = [], []
        for (cid, m), (d, run) in zip(members, entries, strict=True):
            again = await self.request(d) if d is not None else None
            if again is None or again[0] != m.tier:
                gone.append((cid, m, d, run))
            else:
                requests.append({"custom_id": cid, "params": again[1]})

        def write(tx: Any) -> None:
            for _, m, d, run in gone:
                if d is not None:
                    self.members.back_into(tx, d, m, run, "not submitted")
            if not requests:
                tx.hset(self.keys.batch(local), "state", "dropped")

        if gone:
            await self.members.commit(write, local, [c for c, _, _, _ in gone])
        return requests
