"""Shared round trips: the Redis writes of the jobs in flight sent together, and the scripts
loaded once.

A worker process runs many jobs at once, and each of them claims its id, records a call before
sending it and writes its end. Sent one by one, each of those is a round trip of its own, and
most of a job's cost on both sides is the round trips, not the commands. `Trips` collects what
the jobs queue in the same loop turn, and while the previous trip is on the wire, and sends it
as one pipeline: one round trip for all of them. Each job gets back the replies to its own
commands, an error reply as an exception instance (`raise_first`), so one job's error is not
another's. A trip is `atomic` (one MULTI/EXEC: every job's writes apply, or none of them, as a
job's end needs) or plain (a pipeline). Nothing waits for a batch to fill: a trip leaves on the
next loop turn, or as soon as the one before it is answered.

Scripts. Every script of the worker is registered here (`register`) and loaded once when the
worker starts (`load`, with the connection pool warmed), so jobs send EVALSHA alone: no SCRIPT
EXISTS before each pipeline, and no NOSCRIPT storm when a worker starts with many jobs at once.
Scripts queued with `evalsha_into`, or with redis-py's `pipe.scripts.add` and EVALSHA (as
`fence.Writes.into` does) on a trip's pipeline, are sent as EVALSHA alone; one that was not
registered here is loaded the first time a trip carries it, and with the others afterwards. A
job whose script was missing all the same (Valkey restarted, SCRIPT FLUSH) finds nothing of
that script written; its part of the trip is run again, alone, after the scripts are loaded
again. In an atomic trip its other commands ran already: like the commands added to a job's end
(worker.outcomes.finish_into), they must tolerate being applied twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

log = logging.getLogger("tokenq.trips")

MAX_JOBS = 256  # per trip: a bigger batch waits for the next one
_SOURCES: dict[str, str] = {}  # sha -> source of every script registered in this process


def register(redis: aioredis.Redis, source: str) -> AsyncScript:
    """redis.register_script, and the script is loaded by `load`."""
    script = redis.register_script(source)
    _SOURCES[script.sha] = source
    return script


def evalsha_into(pipe: Any, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
    """Queue a registered script on a pipeline without redis-py's SCRIPT EXISTS before it
    (the scripts were loaded at start: see the module docstring)."""
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def raise_first(replies: list[Any]) -> list[Any]:
    """The replies, once none of them is an error (the first error is raised)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


Queued = Callable[[Any], object]  # queues one job's commands on the trip's pipeline


@dataclass
class _Part:
    queue_into: Queued
    start: int
    end: int
    future: asyncio.Future[list[Any]]


@dataclass
class _Batch:
    pipe: Any
    parts: list[_Part] = field(default_factory=list)


@dataclass
class _Lane:
    atomic: bool
    batches: list[_Batch] = field(default_factory=list)  # the first leaves next
    task: asyncio.Task[None] | None = None


class Trips:
    """The shared round trips of one worker process (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._lanes = {True: _Lane(True), False: _Lane(False)}
        self._seen: dict[str, str] = {}  # sha -> source of scripts trips carried, unregistered

    async def load(self, warm: int = 1) -> None:
        """Load every registered script (one pipelined round trip) and open `warm` connections
        of the pool at once, so the first jobs find both ready."""
        await self._load({**_SOURCES, **self._seen})
        if warm > 1:
            await asyncio.gather(*(self.redis.ping() for _ in range(warm)))

    async def _load(self, sources: dict[str, str]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for source in sources.values():
                pipe.script_load(source)
            await pipe.execute()

    async def run(self, queue_into: Queued, *, atomic: bool = False) -> list[Any]:
        """Queue one job's commands (queue_into(pipe)) on the next trip; its replies, errors
        included as exception instances. Raises what failed the whole trip (a connection
        error): nothing of an atomic trip applied then; of a plain one, maybe a part.
        Cancelling the wait does not take the commands back."""
        lane = self._lanes[atomic]
        if not lane.batches or len(lane.batches[-1].parts) >= MAX_JOBS:
            lane.batches.append(_Batch(self.redis.pipeline(transaction=atomic)))
        batch = lane.batches[-1]
        start = len(batch.pipe.command_stack)
        queue_into(batch.pipe)
        future = asyncio.get_running_loop().create_future()
        batch.parts.append(_Part(queue_into, start, len(batch.pipe.command_stack), future))
        if lane.task is None:
            lane.task = asyncio.create_task(self._send(lane))
        replies: list[Any] = await future
        return replies

    async def _send(self, lane: _Lane) -> None:
        """Send what the lane holds, trip after trip, until nothing is left."""
        try:
            await asyncio.sleep(0)  # the rest of this loop turn joins the first trip
            while lane.batches:
                batch = lane.batches.pop(0)
                await self._trip(batch.pipe, batch.parts, lane.atomic)
        finally:
            lane.task = None

    async def _trip(self, pipe: Any, parts: list[_Part], atomic: bool) -> None:
        new = {
            s.sha: s.script
            for s in pipe.scripts
            if s.sha not in _SOURCES and s.sha not in self._seen
        }
        pipe.scripts.clear()  # loaded at start: no SCRIPT EXISTS (a missing one: _again)
        try:
            if new:  # a script registered elsewhere, first seen here: loaded once
                await self._load(new)
                self._seen.update(new)
            async with pipe:
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for part in parts:
                if not part.future.done():
                    part.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        missing = [p for p in parts if _missed(replies[p.start : p.end])]
        for part in parts:
            if part not in missing and not part.future.done():
                part.future.set_result(replies[part.start : part.end])
        if missing:
            await self._again(missing, atomic)

    async def _again(self, parts: list[_Part], atomic: bool) -> None:
        """Load the scripts again and run each part whose script was missing on its own."""
        log.warning("a script was missing from Redis (restarted?); loading them again")
        try:
            await self.load()
        except Exception as exc:
            for part in parts:
                if not part.future.done():
                    part.future.set_exception(exc)
            return
        for part in parts:
            try:
                async with self.redis.pipeline(transaction=atomic) as pipe:
                    part.queue_into(pipe)
                    pipe.scripts.clear()  # loaded just now
                    replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                if not part.future.done():
                    part.future.set_exception(exc)
                continue
            if not part.future.done():
                part.future.set_result(replies)


def _missed(replies: list[Any]) -> bool:
    return any(isinstance(r, NoScriptError) for r in replies)
