"""The batcher lease and the batcher's fenced writes.

One batcher is active across the fleet: the process whose token is in `<prefix>:batcher:lease`
(a string with a TTL of batch.lease_s, renewed every third of it). Every write the active
batcher makes is fenced: `commit` runs it in a transaction that WATCHes the lease and aborts
unless this process still holds it, and `hand_over` moves a job to a worker's consumer only
while the lease is held and the entry is still the batcher's, in one script. A batcher that lost
its lease (a long pause, a partition) learns it only at its next renewal or write; meanwhile
the next batcher may find the same pending entries, so nothing it does in between may reach
Redis unfenced: two hand-overs of one entry would be two calls and two usage events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from worker.contract import BATCHER, GROUP, as_text

# KEYS: the lease. ARGV: token, ttl ms. Renew only while it is still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: the lease, a job stream. ARGV: token, group, entry id, the batcher's consumer, the
# worker's consumer. -1: the lease is not ours; 0: the entry is no longer the batcher's (gone,
# or another batcher handed it over already); 1: moved to the worker's consumer, its idle time
# reset (the worker renews it from now on).
_HAND_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local rows = redis.call('XPENDING', KEYS[2], ARGV[2], ARGV[3], ARGV[3], 1)
if #rows == 0 or rows[1][2] ~= ARGV[4] then return 0 end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[5], 0, ARGV[3], 'JUSTID')
return 1
"""


class LeaseLost(Exception):
    """Another process holds the batcher lease now; this batcher must stop writing."""


class Lease:
    """The batcher lease: a key holding the active process's token, with a TTL."""

    def __init__(self, redis: aioredis.Redis, key: str, token: str) -> None:
        self.redis, self.key, self.token = redis, key, token
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._hand_over = redis.register_script(_HAND_OVER)

    async def acquire(self, ttl_ms: int) -> bool:
        """Take the lease if nobody holds it (or keep it if we do)."""
        if await self.redis.set(self.key, self.token, nx=True, px=ttl_ms):
            return True
        return await self.renew(ttl_ms)

    async def renew(self, ttl_ms: int) -> bool:
        return bool(await self._renew(keys=[self.key], args=[self.token, ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])

    async def hand_over(self, stream: str, entry_id: str, consumer: str) -> bool:
        """Move an entry pending under the batcher to `consumer`, fenced; False when it is
        no longer the batcher's. Raises LeaseLost when this process does not hold the lease."""
        keys = [self.key, stream]
        moved: Any = await self._hand_over(
            keys=keys, args=[self.token, GROUP, entry_id, BATCHER, consumer]
        )
        if int(moved) < 0:
            raise LeaseLost("another process holds the batcher lease")
        return bool(int(moved))

    async def commit(self, write: Callable[[Any], None]) -> None:
        """Run write(tx) in one MULTI that aborts unless this process holds the lease.
        Shielded from cancellation. Raises LeaseLost."""
        await asyncio.shield(self._fenced(write))

    async def _fenced(self, write: Callable[[Any], None]) -> None:
        for _ in range(20):
            try:
                async with self.redis.pipeline(transaction=True) as tx:
                    await tx.watch(self.key)
                    if as_text(await tx.get(self.key)) != self.token:
                        raise LeaseLost("another process holds the batcher lease")
                    tx.multi()  # type: ignore[no-untyped-call]  # redis-py has no hint
                    write(tx)
                    await tx.execute()
                    return
            except WatchError:
                continue  # the lease key changed: our own renewal, or a takeover; look again
        raise LeaseLost("the batcher lease kept changing during a write")
