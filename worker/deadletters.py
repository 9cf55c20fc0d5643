"""Dead letters for operators: list with filters, purge, trim, replay (`tokenq dead ...`).

Workers write dead letters (worker.outcomes) and never trim the stream; these functions are
how a person keeps it manageable and puts a job back on its stream once its cause is fixed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from worker.contract import Keys, fingerprint
from worker.entries import Entry, scan

DEAD_FIELDS = (
    "error_type", "error", "attempts", "priority", "entry_id", "job_id", "truncated",
    "dropped_fields",
)  # fmt: skip
"""Fields a dead letter adds to the job's own; replay removes them again."""


async def dead_letters(
    redis: aioredis.Redis, keys: Keys, *, count: int = 100
) -> list[tuple[str, dict[str, str]]]:
    """The oldest `count` dead letters as (dead-letter id, fields)."""
    reply: Any = await redis.xrange(keys.dead, count=count)
    return [(str(i), dict(f)) for i, f in reply]


async def replay(redis: aioredis.Redis, keys: Keys, dead_id: str, priorities: list[str]) -> str:
    """Put a dead letter back on its priority stream under its old job id; returns that id.

    Its error result is deleted in the same MULTI, so the replayed job runs again (a result
    would make the worker acknowledge it as a duplicate). Raises LookupError for an unknown id.
    """
    reply: Any = await redis.xrange(keys.dead, dead_id, dead_id)
    if not reply:
        raise LookupError(f"no dead letter {dead_id!r} in {keys.dead}; see `tokenq dead list`")
    fields: dict[str, str] = dict(reply[0][1])
    priority = fields.get("priority", "")
    if priority not in priorities:
        priority = priorities[len(priorities) // 2]
    job_id = dead_job_id(fields)
    job = {k: v for k, v in fields.items() if k not in DEAD_FIELDS}
    job["id"] = job_id
    async with redis.pipeline(transaction=True) as tx:
        tx.delete(keys.result(job_id), keys.state(job_id), keys.done(job_id))
        # The job's claim on its id, as the replayed entry will show it (worker.claims): an
        # entry id as `id` is let in only with the fingerprint of the job that had it.
        tx.hset(keys.state(job_id), mapping={"owner": "replay", "fp": fingerprint(job)})
        tx.expire(keys.state(job_id), 7 * 86_400)
        tx.xadd(keys.jobs(priority), _fields(job))
        tx.xdel(keys.dead, dead_id)
        await tx.execute()
    return job_id


def dead_job_id(fields: dict[str, str]) -> str:
    """The job id a dead letter was written under."""
    return fields.get("job_id") or fields.get("id") or fields.get("entry_id", "?")


@dataclass(frozen=True, slots=True)
class DeadFilter:
    """Which dead letters an operator means: every condition given holds (several values of
    one condition: any of them)."""

    error_types: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None

    @property
    def match(self) -> dict[str, tuple[str, ...]]:
        named = {"error_type": self.error_types, "feature": self.features, "tenant": self.tenants}
        return {name: values for name, values in named.items() if values}

    @property
    def everything(self) -> bool:
        """True when no condition is given."""
        return not self.match and self.since_ms is None and self.until_ms is None


async def find_dead(
    redis: aioredis.Redis,
    keys: Keys,
    which: DeadFilter = DeadFilter(),  # frozen: one shared default is safe
    *,
    limit: int | None = 100,
    newest_first: bool = True,
    cut_bytes: int = 1 << 20,
) -> list[Entry]:
    """Dead letters matching `which`, newest first unless told otherwise, values cut to
    cut_bytes. Any entry of the stream is returned as it is, tokenq's or not."""
    low = "-" if which.since_ms is None else str(which.since_ms)
    high = "+" if which.until_ms is None else str(which.until_ms)  # a bare ms: to its last id
    return await scan(
        redis,
        keys.dead,
        match=which.match,
        low=low,
        high=high,
        newest_first=newest_first,
        limit=limit,
        cut_bytes=cut_bytes,
    )


async def delete_dead(redis: aioredis.Redis, keys: Keys, dead_ids: Iterable[str]) -> int:
    """Delete these dead letters (XDEL, 500 at a time); how many there were."""
    ids, removed = list(dead_ids), 0
    for n in range(0, len(ids), 500):
        removed += int(await redis.xdel(keys.dead, *ids[n : n + 500]))
    return removed


async def trim_dead(redis: aioredis.Redis, keys: Keys, keep: int) -> int:
    """Keep the newest `keep` dead letters, delete the older ones; how many were deleted."""
    return int(await redis.xtrim(keys.dead, maxlen=keep, approximate=False))


def _fields(fields: dict[str, str]) -> dict[Any, Any]:
    """redis-py's stubs want invariant dicts of unions; a dict of str is one at runtime."""
    return fields
