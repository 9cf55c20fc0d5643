"""Auditing the semantic cache: what a hit was served from, removing entries, bad verdicts.

- inspect(job id): for a job answered from the semantic cache, its hit record (the question
  asked, the question whose answer it got, the similarity and the threshold then) and the
  source entry if it still exists; for a job whose answer became an entry, that entry.
- forget(job id | feature | tenant): removes entries for every process of the fleet at once
  (worker.semantic.forget_entries). By job id: the entry a hit was served from, and the entry
  the job's own answer became.
- bad_verdict(job id): what a producer's `bad` on `tokenq:feedback` does to a semantic hit:
  the entry goes, and the feature's threshold is trusted less (worker.semantic, "Trust").
- vector_search(): whether the server could search vectors itself (FT.SEARCH of RediSearch or
  valkey-search, VSIM of Redis 8's vector sets). The bundled valkey-server 9.1 has neither.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import unquote

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from worker.config import Config
from worker.contract import Keys
from worker.semantic import Entry, HitRecord, Source, distrust, forget_entries, stored

_hit = msgspec.json.Decoder(HitRecord).decode
_entry = msgspec.json.Decoder(Entry).decode
_source = msgspec.json.Decoder(Source).decode


class Scope(NamedTuple):
    """A scope of the semantic cache: its key base, feature, tenant (None: shared) and the
    entries it holds."""

    base: str
    feature: str
    tenant: str | None
    entries: int


def scope_of(keys: Keys, base: str) -> tuple[str, str | None] | None:
    """(feature, tenant) of a scope's key base, or None for a name that is not one."""
    head = f"{keys.prefix}:semantic:"
    if not base.startswith(head):
        return None
    feature, _, who = base[len(head) :].partition(":")
    if who == "shared":
        return unquote(feature), None
    if who.startswith("t=") and ":" not in who:
        return unquote(feature), unquote(who[2:])
    return None


async def scopes(redis: aioredis.Redis, keys: Keys) -> list[Scope]:
    """Every scope the registry names, with its entry count (0 once all expired)."""
    members: Any = await redis.smembers(keys.semantic_scopes)
    bases = sorted(str(b) for b in members)
    async with redis.pipeline(transaction=False) as pipe:
        for base in bases:
            pipe.zcard(f"{base}:index")
        counts = await pipe.execute()
    out = []
    for base, count in zip(bases, counts, strict=True):
        named = scope_of(keys, base)
        if named is not None:
            out.append(Scope(base, named[0], named[1], int(count)))
    return out


class Inspection(NamedTuple):
    """What `tokenq cache inspect` shows of a job."""

    hit: HitRecord | None  # the job was answered from the semantic cache
    served_from: Entry | None  # the entry it was served from, if it still exists
    became: Entry | None  # the entry the job's own answer became, if it still exists


async def _entry_at(redis: aioredis.Redis, scope: str, entry_id: str) -> Entry | None:
    return stored(_entry, await redis.get(f"{scope}:e:{entry_id}"))


async def _records(
    redis: aioredis.Redis, keys: Keys, job_id: str
) -> tuple[HitRecord | None, Source | None]:
    raw_hit, raw_source = await redis.mget(
        [keys.semantic_hit(job_id), keys.semantic_source(job_id)]
    )
    return stored(_hit, raw_hit), stored(_source, raw_source)


async def inspect(redis: aioredis.Redis, keys: Keys, job_id: str) -> Inspection:
    """A job's part in the semantic cache (see the module docstring)."""
    hit, source = await _records(redis, keys, job_id)
    served = None if hit is None else await _entry_at(redis, hit.scope, hit.entry_id)
    became = None if source is None else await _entry_at(redis, source.scope, source.entry_id)
    return Inspection(hit, served, became)


async def forget(
    redis: aioredis.Redis, keys: Keys, *, job_id: str | None = None,
    feature: str | None = None, tenant: str | None = None,
) -> int:  # fmt: skip
    """Remove entries: those a job was served from or became (`job_id`), or every entry of
    the scopes of `feature` and/or `tenant` (a tenant's scopes of every feature; the shared
    scopes only by feature). Returns how many entries went."""
    if job_id is not None:
        hit, source = await _records(redis, keys, job_id)
        removed = 0
        for scope, entry_id in {(r.scope, r.entry_id) for r in (hit, source) if r is not None}:
            removed += await forget_entries(redis, scope, [entry_id])
        return removed
    if feature is None and tenant is None:
        raise ValueError("forget needs a job id, a feature or a tenant")
    removed = 0
    for row in await scopes(redis, keys):
        if feature is not None and row.feature != feature:
            continue
        if tenant is not None and row.tenant != tenant:
            continue
        removed += await forget_entries(redis, row.base)
        done: Any = redis.srem(keys.semantic_scopes, row.base)
        await done
    return removed


async def bad_verdict(
    redis: aioredis.Redis, keys: Keys, cfg: Config, job_id: str, now_ms: int
) -> bool:
    """A producer's `bad` on a job: when it was a semantic hit, remove the entry it was served
    from and count one bad hit against its feature's threshold. False when the job was no
    semantic hit (or its record expired), or its feature has no semantic cache any more."""
    hit, _ = await _records(redis, keys, job_id)
    feature = None if hit is None else cfg.features.get(hit.feature)
    if hit is None or feature is None or feature.semantic_cache is None:
        return False
    await forget_entries(redis, hit.scope, [hit.entry_id])
    await distrust(redis, keys, hit.feature, feature.semantic_cache, now_ms)
    return True


async def vector_search(redis: aioredis.Redis, probe_key: str) -> str:
    """The server's own vector search ("FT.SEARCH" of RediSearch or valkey-search, "VSIM" of
    Redis 8's vector sets), or "" for none: each is asked a harmless question (FT._LIST,
    VCARD of `probe_key`, a key that holds nothing) and an "unknown command" means absent.
    (COMMAND INFO would do, but redis-py cannot parse its answer for an unknown command.)"""
    found = ""
    for command, probe in (("FT.SEARCH", ["FT._LIST"]), ("VSIM", ["VCARD", probe_key])):
        try:
            await redis.execute_command(*probe)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            if "unknown command" in str(exc).lower():
                continue
        found = found or command
    return found
