"""Quality for the benchmarks: which answers were right, by the simulator's synthetic ground
truth (POST /_sim/grade; README: Quality), and producers' verdicts sent from it.

tokenq never reads the truth; only a benchmark does, to grade what tokenq delivered, and to
play the producers that report, after the fact, whether an answer was right
(`tokenq:feedback`), as a product with a person in the loop does (an agent who corrects a
ticket's label, a reviewer who rejects a summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

from common import say, sim_call

from worker.contract import Keys, Result
from worker.embedded import connect

CHUNK = 500  # items per POST /_sim/grade
Item = tuple[dict[str, Any], str | None]  # a request as the job sent it, the answer's model


def grade(sim_url: str, items: Sequence[Item]) -> list[bool]:
    """Whether each answer was right; an item without a model (no answer) is wrong."""
    right = [False] * len(items)
    asked = [(n, request, model) for n, (request, model) in enumerate(items) if model]
    for start in range(0, len(asked), CHUNK):
        chunk = asked[start : start + CHUNK]
        body = {"items": [{"request": request, "model": model} for _, request, model in chunk]}
        graded = sim_call(sim_url, "grade", body)
        if graded["quality"] != "on":
            raise RuntimeError("the simulator's ground truth is off: start it with --quality on")
        for (n, _, _), g in zip(chunk, graded["items"], strict=True):
            right[n] = bool(g["correct"])
    return right


def reports(job_id: str, share: float) -> bool:
    """Whether the producer of this job reports a verdict (a share of jobs, by id)."""
    digest = hashlib.blake2b(job_id.encode(), digest_size=8, person=b"feedback").digest()
    return int.from_bytes(digest, "big") / 2**64 < share


class Verdicts:
    """Producers' verdicts on a share of the answers, from the truth, sent as they come in
    (every half second) onto tokenq:feedback."""

    def __init__(self, redis_url: str, prefix: str, sim_url: str, share: float) -> None:
        self.redis_url, self.keys, self.sim_url = redis_url, Keys(prefix), sim_url
        self.share = share
        self.waiting: list[tuple[str, dict[str, Any], Result]] = []
        self.sent = {"good": 0, "bad": 0}

    def answered(self, job_id: str, request: dict[str, Any], result: Result) -> None:
        """A job's result came; its producer may report on it."""
        if result.model and reports(job_id, self.share):
            self.waiting.append((job_id, request, result))

    async def run(self, done: asyncio.Event) -> None:
        """Send verdicts until `done`, then the last ones."""
        client = connect(self.redis_url)
        try:
            while not done.is_set():
                await self._send(client)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.5)
            await self._send(client)
        finally:
            await client.aclose()
        say(f"  verdicts sent: {self.sent['good']} good, {self.sent['bad']} bad")

    async def _send(self, client: Any) -> None:
        batch, self.waiting = self.waiting, []
        if not batch:
            return
        items = [(request, result.model) for _, request, result in batch]
        right = await asyncio.to_thread(grade, self.sim_url, items)
        async with client.pipeline(transaction=False) as pipe:
            for (job_id, _, _), ok in zip(batch, right, strict=True):
                verdict = "good" if ok else "bad"
                pipe.xadd(self.keys.feedback, {"job_id": job_id, "verdict": verdict})
                self.sent[verdict] += 1
            await pipe.execute()
