"""Submit jobs and wait for their results. Imports worker.contract and nothing else of tokenq.

A plain XADD from any language is just as good; this client adds validation, pipelining and a
result() that wakes as soon as the worker writes the result.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis

from worker.contract import Keys, Result, id_problem, is_reserved_id

DEFAULT_PRIORITIES = ("high", "normal", "low")
_WAKE_SLICE_S = 2.0  # below redis-py's default 5 s socket timeout, so any client can wait

_decode_result = msgspec.json.Decoder(Result).decode


class NewJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job to submit. `request` is a dict of Messages API parameters or its JSON text."""

    feature: str
    request: Mapping[str, Any] | str
    priority: str = "normal"
    id: str | None = None
    tenant: str | None = None
    tier: str | None = None
    reply_to: str | None = None
    deadline_ms: int | None = None
    cache: Literal["off"] | None = None  # "off": no response cache or de-duplication


class Producer:
    """Puts jobs on tokenq's priority streams and reads their results.

    `priorities` are the stream names workers read (config.toml queue.priorities); a job for
    any other priority is refused here, since no worker would ever take it.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str = "tokenq",
        priorities: Iterable[str] = DEFAULT_PRIORITIES,
    ) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.priorities = tuple(priorities)

    def fields(self, job: NewJob) -> dict[str, str]:
        """The stream fields of a job, checked. Raises ValueError naming the bad field."""
        if job.priority not in self.priorities:
            raise ValueError(
                f"priority {job.priority!r} is not one of {', '.join(self.priorities)} "
                "(config.toml queue.priorities)"
            )
        if not job.feature:
            raise ValueError("feature is empty; name a feature of config.toml [features]")
        self._check_id_and_reply_to(job)
        request = job.request
        if not isinstance(request, str):
            request = msgspec.json.encode(request).decode()
        out = {"feature": job.feature, "request": request}
        for name in ("id", "tenant", "tier", "reply_to", "deadline_ms", "cache"):
            value = getattr(job, name)
            if value is not None:
                out[name] = str(value)
        return out

    def _check_id_and_reply_to(self, job: NewJob) -> None:
        """The README's rules for `id` and `reply_to`, so the worker need not dead-letter."""
        if job.id is not None:
            problem = id_problem(job.id)
            if problem is None and is_reserved_id(job.id, self.priorities):
                problem = (
                    f"id {job.id!r} has the form of a stream entry id, which is the id of a job "
                    "without one; choose another id or leave it out"
                )
            if problem is not None:
                raise ValueError(problem)
        prefix = self.keys.prefix
        if job.reply_to is not None and (
            job.reply_to == prefix or job.reply_to.startswith(prefix + ":")
        ):
            raise ValueError(
                f"reply_to {job.reply_to!r} names one of tokenq's own keys (prefix {prefix!r}); "
                "name a stream of yours outside it"
            )

    async def submit(self, feature: str, request: Mapping[str, Any] | str, **kw: Any) -> str:
        """Submit one job; returns its id (the given `id`, else a new unique one)."""
        job = _with_id(NewJob(feature=feature, request=request, **kw))
        await self.redis.xadd(self.keys.jobs(job.priority), _map(self.fields(job)))
        return job.id or ""

    async def submit_many(self, jobs: Iterable[NewJob]) -> list[str]:
        """Submit many jobs in one pipelined round trip; ids in the same order."""
        batch = [_with_id(job) for job in jobs]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in batch:
                pipe.xadd(self.keys.jobs(job.priority), _map(self.fields(job)))
            await pipe.execute()
        return [job.id or "" for job in batch]

    async def result(self, job_id: str, timeout_s: float = 60.0) -> Result:
        """The job's result, waiting up to timeout_s for it. Raises TimeoutError.

        Waits on a blocking pop of the job's wake-up list, which the worker pushes in the same
        transaction that writes the result: no polling, it returns as soon as the result exists.
        """
        deadline = time.monotonic() + timeout_s
        done = self.keys.done(job_id)
        while True:
            raw = await self.redis.get(self.keys.result(job_id))
            if raw is not None:
                return _decode_result(raw)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no result for job {job_id!r} after {timeout_s:g} s")
            popped = await self.redis.blpop([done], timeout=min(left, _WAKE_SLICE_S))
            if popped:
                # Pass the wake-up on, so every other waiter for this job wakes too.
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.rpush(done, 1)
                    pipe.expire(done, 300)
                    await pipe.execute()


def _with_id(job: NewJob) -> NewJob:
    """The job with an id of its own. A plain XADD defaults to the entry id, but entry ids of
    different priority streams can be equal, and the client must know the id before XADD to
    hand it back without a second round trip."""
    return job if job.id else msgspec.structs.replace(job, id=uuid.uuid4().hex)


def _map(fields: dict[str, str]) -> dict[Any, Any]:
    """redis-py's stubs want invariant dicts of unions; a dict of str is one at runtime."""
    return fields
