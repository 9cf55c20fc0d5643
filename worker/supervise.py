"""Long-lived duties that nothing stops but their end: `supervise` runs one until told to stop,
again after any unexpected error, so that no bad entry and no bug ends a worker's reader,
renewer, deferred mover, control listener or batcher (Worker.run starts them in one
TaskGroup)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from worker import clock

log = logging.getLogger("tokenq.worker")


async def supervise(name: str, duty: Callable[[], Awaitable[None]], until: asyncio.Event) -> None:
    """Run `duty` until `until` is set, again after any unexpected error: logged with its
    traceback, then a pause that doubles from 0.1 s to 30 s (and starts over after a minute of
    health), so that no bad entry and no bug ends the duty or spins it."""
    pause = 0.1
    while not until.is_set():
        started = clock.monotonic()
        try:
            await duty()
        except Exception:  # a long-lived duty's boundary, like the job boundary in _handle
            log.exception("%s failed; it starts again in %.1f s", name, pause)
        else:
            if until.is_set():
                return
            log.warning("%s ended by itself; it starts again in %.1f s", name, pause)
        if clock.monotonic() - started > 60:
            pause = 0.1
        if await stopped_within(until, pause):
            return
        pause = min(pause * 2, 30.0)


async def stopped_within(until: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` unless `until` is set first; whether it is set."""
    try:
        await asyncio.wait_for(until.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True
