"""The batch streams as the batcher sees them: a Queue of consumer `batcher` that takes new
entries without blocking, sweeps the ones dead consumers left, lists its own pending ones,
fetches entries by id, and puts a job back at the end of its stream (worker.batcher).

Workers never read these streams (Queue(batched=...)): an entry the batcher has read stays
pending under `batcher` until its result is written, so no worker's XAUTOCLAIM ever sees it.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from worker import fence
from worker.contract import GROUP, as_text
from worker.queue import Delivery, Queue, flat


class BatchQueue(Queue):
    """The batcher's view of the batch streams (see the module docstring)."""

    async def take(self, priority: str, count: int) -> list[Delivery]:
        """Up to `count` new entries of one stream for this consumer, without blocking."""
        return await self._xreadgroup({self.streams[priority]: ">"}, count, None)

    async def stale(self, priority: str, min_idle_ms: int) -> list[Delivery]:
        """Take over the entries other consumers of one stream left idle over min_idle_ms
        (their process died): the batcher's sweep of the batch streams."""
        stream = self.streams[priority]
        try:
            consumers: Any = await self.redis.xinfo_consumers(stream, GROUP)
        except ResponseError:
            return []
        out: list[Delivery] = []
        for c in consumers:
            if c["name"] == self.consumer or c["pending"] == 0:
                continue
            rows: Any = await self.redis.xpending_range(
                stream,
                GROUP,
                min="-",
                max="+",
                count=1000,
                consumername=c["name"],
                idle=min_idle_ms,
            )
            ids = [r["message_id"] for r in rows]
            if not ids:
                continue
            counts = {as_text(r["message_id"]): int(r["times_delivered"]) + 1 for r in rows}
            claimed: Any = await self.redis.xclaim(stream, GROUP, self.consumer, min_idle_ms, ids)
            out += [
                Delivery(priority, stream, i, f, deliveries=counts.get(i, 1))
                for i, f in claimed
                if f
            ]
        return out

    async def own_pending(self, priority: str) -> list[str]:
        """Every entry id of one stream pending for this consumer, oldest first."""
        stream, start, ids = self.streams[priority], "-", list[str]()
        while True:
            rows: Any = await self.redis.xpending_range(
                stream, GROUP, min=start, max="+", count=1000, consumername=self.consumer
            )
            ids += [str(r["message_id"]) for r in rows]
            if len(rows) < 1000:
                return ids
            start = f"({ids[-1]}"

    async def fetch(self, wanted: list[tuple[str, str]]) -> list[Delivery | None]:
        """The entries (priority, entry id) as deliveries; None for one no longer there."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for priority, entry_id in wanted:
                pipe.xrange(self.streams[priority], entry_id, entry_id)
            replies: list[Any] = await pipe.execute()
        return [
            Delivery(p, self.streams[p], i, dict(r[0][1])) if r else None
            for (p, i), r in zip(wanted, replies, strict=True)
        ]

    def requeue_into(self, tx: Any, d: Delivery, job_id: str) -> None:
        """Queue writes that put a job back at the end of its stream under the same job id
        (a new entry; this one acknowledged and deleted). Its run stays in its state hash."""
        w = fence.Writes(d.stream, d.entry_id, self.consumer)
        w.add("XADD", d.stream, "*", *flat({**d.fields, "id": job_id}))
        self._ack(w, d)
        w.into(tx, self._fenced)
