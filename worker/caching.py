"""Caching that pays: prompt-cache breakpoints, the response cache, one call for identical
requests in flight.

**Prompt caching.** A feature's `prompt_cache` ("auto" = a 5-minute breakpoint, "5m", "1h",
"off") marks the stable prefix of each request for the API's prompt cache: one
`cache_control` breakpoint at the end of the system prompt (or, without one, on the last
tool), so tools and system are cached together, when that prefix is estimated at the model's
`min_cache_tokens` or more. A request that already carries `cache_control` is the producer's
choice and is sent as it is, so tokenq never adds to the API's four breakpoints.

**Response cache.** With `response_cache_ttl_s > 0` an answer is kept under a key made of
the feature, the scope (the tenant by default; "shared" across tenants when the feature says
so), the model and the normalised request (sorted keys; a string `content` or `system` as the
text block it stands for; `cache_control` and `metadata` left out, as they do not change the
answer). An identical job in the same scope within the TTL gets that answer with
`mode=cache`, costs nothing and calls nothing. A job with `cache = "off"` skips it. Answers
that failed the feature's check are not kept.

**In-flight de-duplication** (a feature's `dedupe = true`; off by default): of identical jobs
(same key) in flight at once, one calls the API and the others wait for its answer. Within a
process they wait on one future; across processes one holds a lease (`<key>:lease`, SET NX
with an expiry) and the others block on the key's `:done` stream until the answer is stored
(kept `response_cache_ttl_s`, or DEDUPE_KEEP_S when the feature has no response cache, and then
only for the jobs that waited). A leader that fails, is put off or dies releases (or loses)
the lease and a waiting job calls instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis

from worker.config import FeatureConfig
from worker.contract import Keys

DEDUPE_KEEP_S = 10  # an answer shared only by de-duplication is kept this long
CACHED = {"type": "ephemeral"}


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return len(str(value))


def has_cache_control(value: Any) -> bool:
    """Whether a request (or any part of it) marks a cache breakpoint."""
    if isinstance(value, dict):
        return "cache_control" in value or any(has_cache_control(v) for v in value.values())
    if isinstance(value, list):
        return any(has_cache_control(v) for v in value)
    return False


def mark_prompt_cache(params: dict[str, Any], mode: str, min_tokens: int) -> dict[str, Any]:
    """params with one cache breakpoint at the end of tools + system, when worth it."""
    if mode == "off" or has_cache_control(params):
        return params
    system, tools = params.get("system"), params.get("tools") or []
    prefix_tokens = (_chars(system) + len(json.dumps(tools))) // 4 if system or tools else 0
    if prefix_tokens < min_tokens:
        return params
    control = {"type": "ephemeral", "ttl": "1h"} if mode == "1h" else dict(CACHED)
    marked = dict(params)
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else list(system or [])
    if blocks and blocks[-1].get("type", "text") == "text" and blocks[-1].get("text"):
        marked["system"] = [*blocks[:-1], {**blocks[-1], "cache_control": control}]
    elif tools:
        marked["tools"] = [*tools[:-1], {**tools[-1], "cache_control": control}]
    else:
        return params
    return marked


def _normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _blocks(content: Any) -> Any:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def normalised(params: dict[str, Any]) -> bytes:
    """The request as the cache compares it (see the module docstring)."""
    body = {k: v for k, v in params.items() if k not in ("model", "metadata")}
    body["messages"] = [{**m, "content": _blocks(m.get("content"))} for m in body["messages"]]
    if "system" in body:
        body["system"] = _blocks(body["system"])
    return json.dumps(_normal(body), sort_keys=True, separators=(",", ":")).encode()


def cache_key(
    keys: Keys,
    feature_name: str,
    feature: FeatureConfig,
    tenant: str,
    model: str,
    params: dict[str, Any],
) -> str:
    """The response-cache key of a request in its scope."""
    digest = hashlib.sha256(model.encode() + b"\n" + normalised(params)).hexdigest()[:40]
    who = "shared" if feature.response_cache_scope == "shared" else "tenant:" + tenant
    return keys.rcache(feature_name, who, digest)


class CachedAnswer(msgspec.Struct, frozen=True):
    """What the response cache keeps of an answer."""

    text: str
    content: list[Any]
    model: str
    tier: str
    stop_reason: str | None
    usage: dict[str, Any]


_decode = msgspec.json.Decoder(CachedAnswer).decode
_encode = msgspec.json.Encoder().encode


@dataclass
class Lease:
    """This job calls the API for its key; complete() or abandon() it."""

    key: str
    token: str
    local: asyncio.Future[CachedAnswer | None]
    keep_s: int
    done: bool = field(default=False)


# KEYS: answer, lease, done stream. ARGV: answer JSON, keep s, lease token.
_COMPLETE = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10, '*', 'answer', 'ok')
redis.call('EXPIRE', KEYS[3], 120)
return 1
"""

# KEYS: lease, done stream. ARGV: lease token.
_ABANDON = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10, '*', 'answer', 'none')
redis.call('EXPIRE', KEYS[2], 120)
return 1
"""


class ResponseCache:
    """The response cache and de-duplication of one worker process."""

    def __init__(self, redis: aioredis.Redis, *, lease_ms: int, block_ms: int) -> None:
        self.redis = redis
        self.lease_ms = lease_ms
        self.block_ms = block_ms
        self._local: dict[str, asyncio.Future[CachedAnswer | None]] = {}
        self._complete = redis.register_script(_COMPLETE)
        self._abandon = redis.register_script(_ABANDON)

    async def get(self, key: str) -> CachedAnswer | None:
        raw: Any = await self.redis.get(key)
        return None if raw is None else _decode(raw)

    async def claim(
        self, key: str, keep_s: int, dedupe: bool, token: str
    ) -> CachedAnswer | Lease | None:
        """An answer an identical job made while this one waited, or the lease to call.
        None when de-duplication is off (call, then complete nothing but the cache).

        `token` names this job's claim: a claim tried again after a Redis error (its SET may
        have been applied with only the reply lost) finds the lease its own."""
        if not dedupe:
            return None
        while True:
            waiting = self._local.get(key)
            if waiting is not None:  # another job of this process has this key
                answer = await asyncio.shield(waiting)
                if answer is not None:
                    return answer
                continue  # it failed: try to call
            future: asyncio.Future[CachedAnswer | None] = asyncio.get_running_loop().create_future()
            self._local[key] = future
            try:
                answer = await self._fleet(key, token)
            except BaseException:
                self._resolve(key, future, None)
                raise
            if answer is not None:
                self._resolve(key, future, answer)
                return answer
            return Lease(key, token, future, keep_s)

    async def _fleet(self, key: str, token: str) -> CachedAnswer | None:
        """None once this process holds the fleet lease; an answer another process made."""
        while True:
            lease = Keys.rcache_lease(key)
            if await self.redis.set(lease, token, nx=True, px=self.lease_ms):
                return None
            if await self.redis.get(lease) == token:
                return None  # ours: an earlier try took it
            newest: Any = await self.redis.xrevrange(Keys.rcache_done(key), count=1)
            last = str(newest[0][0]) if newest else "0-0"
            answer = await self.get(key)
            if answer is not None:
                return answer
            await self.redis.xread({Keys.rcache_done(key): last}, count=1, block=self.block_ms)
            answer = await self.get(key)
            if answer is not None:
                return answer

    async def store(self, key: str, answer: CachedAnswer, keep_s: int) -> None:
        """Keep an answer (no de-duplication lease involved)."""
        await self.redis.set(key, _encode(answer), ex=keep_s)

    async def complete(self, lease: Lease, answer: CachedAnswer) -> None:
        """Store the leader's answer, free the lease and wake every waiting job."""
        keys = [lease.key, Keys.rcache_lease(lease.key), Keys.rcache_done(lease.key)]
        await self._complete(keys=keys, args=[_encode(answer), lease.keep_s, lease.token])
        lease.done = True
        self._resolve(lease.key, lease.local, answer)

    async def abandon(self, lease: Lease) -> None:
        """The leader has no answer to share: a waiting job calls instead."""
        if lease.done:
            return
        lease.done = True
        self._resolve(lease.key, lease.local, None)
        names = [Keys.rcache_lease(lease.key), Keys.rcache_done(lease.key)]
        await self._abandon(keys=names, args=[lease.token])

    def _resolve(
        self, key: str, future: asyncio.Future[CachedAnswer | None], answer: CachedAnswer | None
    ) -> None:
        if self._local.get(key) is future:
            del self._local[key]
        if not future.done():
            future.set_result(answer)
