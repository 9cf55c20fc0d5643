"""The semantic cache: a rephrased question answered from an earlier answer (README: Semantic
cache). Opt-in per feature (`features.<f>.semantic_cache`); worker.process looks it up after
the exact response cache misses.

**What must match.** Only the last user turn is compared by meaning (the cosine of its
embedding, worker.embeddings). Everything else is an exact part of the key, the *context*:
the system prompt, tools, tool_choice, earlier turns, stop sequences, thinking, the model,
the `max_tokens` class (the power of two at or above it: 300 and 512 share one, 513 does
not), and the embedder (provider, model, dimensions), so a different system prompt can never
share an answer. The feature and the scope are in the key names. Scope rules are the
response cache's: the tenant's own (`response_cache_scope = "tenant"`, the default; a job
without a tenant skips the semantic cache), or the feature's `shared` one; a job with
`cache = off` skips it. A last user turn that is not plain text (images, tool results), an
assistant turn last, or a turn over `embeddings.max_chars` skips it too.

**Where.** Per scope, under `Keys.semantic_scope(feature, tenant)`: each entry is a string
`:e:<id>` (the vector, the context, the answer, the producing job's id, the time, the
question), kept `ttl_s`; `:index` lists the ids by time, bounded to `max_entries` (the oldest
go first; ids are made by the store script and sort in the order entries were added);
`:ver` counts changes (`n`) under an `epoch` token, and `:log` is a stream of the changes
(`add`/`del` of an id). One Lua script adds an entry (dropping expired and surplus ones,
each noted in the log) and is queued on the job's finishing transaction (store_into).

**Search.** The bundled Valkey has no vector search (no FT.SEARCH, no VSIM; see
vector_search), so each process keeps a copy of a scope's vectors in memory
(worker.semantic_index) and searches that. Before every search it reads `:ver` and the log
since its last look, in one round trip made while the question is being embedded, and
applies the changes; a new epoch, or a gap in the
log, makes it load the scope again. An entry forgotten (forget) is gone from Redis and noted
in the log in one script, and a hit is only served after its entry is read back from Redis,
so a forgotten entry is never served by any process, even one whose copy lags.

**Trust.** A producer's `bad` verdict on a semantic hit removes the entry and adds one to the
feature's decayed count of bad hits (`semantic:trust:<f>`, halving every
`trust_half_life_s`). The threshold in force is `1 - (1 - threshold) * 0.5 ** bad`: each bad
hit halves the room between the configured threshold and 1, for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker import clock
from worker.caching import CachedAnswer, normalised
from worker.config import Config, SemanticCacheConfig
from worker.contract import Keys
from worker.embeddings import Embedder, EmbeddingError, cost_usd
from worker.semantic_index import ScopeIndex

log = logging.getLogger("tokenq.semantic")

Outcome = Literal["hit", "miss", "off", "no_tenant", "not_text", "too_long", "error"]
QUESTION_CHARS = 1000  # of a question kept with its entry and hit record, for `cache inspect`
LOG_MAXLEN = 10_000  # changes kept per scope; a process further behind loads the scope again
LOAD_CHUNK = 500
# After a failed embedding call the process skips its semantic lookups this long, so a
# provider that is down or slow (each call may wait embeddings.timeout_s) does not slow
# every job of a semantic feature: the jobs call the API as on a miss.
PAUSE_AFTER_FAILURE_MS = 30_000


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """What a scope's `:e:<id>` holds. `vector`: float32, little-endian (base64 in JSON)."""

    context: str
    vector: bytes
    answer: CachedAnswer
    job_id: str
    at_ms: int
    question: str
    feature: str
    tenant: str | None


class Lookup(msgspec.Struct, frozen=True, kw_only=True):
    """What a lookup found. `embedding_tokens` and `embedding_cost_usd` are billed whatever
    the outcome (part of the job's cost); `similarity` is the nearest entry's, `threshold`
    the one in force. A hit carries the answer and its source; a miss what store_into keeps."""

    outcome: Outcome
    embedding_tokens: int = 0
    embedding_cost_usd: float = 0.0
    similarity: float | None = None
    threshold: float | None = None
    answer: CachedAnswer | None = None
    source_job_id: str = ""
    source_question: str = ""
    entry_id: str = ""
    feature: str = ""
    tenant: str | None = None
    scope: str = ""
    context: str = ""
    question: str = ""
    vector: bytes = b""
    reason: str = ""  # why: for "error", and the skips


class HitRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What `semantic:hit:<job id>` holds: a job answered from the cache, and the pair."""

    job_id: str
    feature: str
    tenant: str | None
    scope: str
    entry_id: str
    source_job_id: str
    similarity: float
    threshold: float
    question: str
    source_question: str
    at_ms: int


class Source(msgspec.Struct, frozen=True, array_like=True):
    """What `semantic:job:<job id>` holds: the entry the job's answer became."""

    scope: str
    entry_id: str


_encode = msgspec.json.Encoder().encode
_entry = msgspec.json.Decoder(Entry).decode


def max_tokens_class(max_tokens: int) -> int:
    """The power of two at or above max_tokens: requests whose caps differ within one class
    may share answers."""
    return 1 << max(0, max_tokens - 1).bit_length()


def last_user_text(params: dict[str, Any]) -> str | None:
    """The text of the last turn when it is the user's and all text, else None."""
    messages = params.get("messages") or []
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content or None
    if not isinstance(content, list) or not content:
        return None
    texts = [b.get("text") for b in content if isinstance(b, dict) and b.get("type") == "text"]
    if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
        return None
    return "\n".join(t for t in texts if isinstance(t, str)) or None


def context_of(embedder: str, model: str, params: dict[str, Any]) -> str:
    """The digest of everything that must match exactly (see the module docstring)."""
    body = dict(params)
    body["messages"] = [*params["messages"][:-1], {"role": "user", "content": "\x00"}]
    body["max_tokens"] = max_tokens_class(int(params.get("max_tokens") or 1))
    digest = hashlib.sha256(f"{embedder}\n{model}\n".encode() + normalised(body))
    return digest.hexdigest()[:40]


def trusted(threshold: float, bad: float) -> float:
    """The threshold in force after `bad` (decayed) bad verdicts."""
    return float(1 - (1 - threshold) * 0.5 ** max(0.0, bad))


def decayed(bad: float, at_ms: int, now_ms: int, half_life_s: int) -> float:
    """A count of bad verdicts made at `at_ms`, at `now_ms`."""
    return float(bad * 0.5 ** (max(0, now_ms - at_ms) / (1000 * half_life_s)))


# KEYS: index, ver, log, source, scopes. ARGV: entry, ttl_s, max_entries, now_ms, scope base,
# new epoch, log maxlen. The entry's id is made here: the scope's change count in 12 hex
# digits, then the epoch's first 8, so ids sort in the order entries were added (the index
# evicts the lowest score, ties by id: the oldest) and never repeat.
_STORE = """
local base, ttl, now = ARGV[5], tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('HSETNX', KEYS[2], 'epoch', ARGV[6])
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local function note(op, id)
  local n = redis.call('HINCRBY', KEYS[2], 'n', 1)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'op', op, 'id', id, 'n', n)
  return n
end
local function drop(id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('DEL', base .. ':e:' .. id)
  note('del', id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - ttl * 1000))) do
  drop(id)
end
local n = tonumber(redis.call('HGET', KEYS[2], 'n') or '0') + 1
local id = string.format('%012x', n) .. '-' .. string.sub(epoch, 1, 8)
redis.call('SET', base .. ':e:' .. id, ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[1], now, id)
note('add', id)
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do drop(old) end
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
redis.call('SET', KEYS[4], cjson.encode({base, id}), 'EX', ttl)
redis.call('SADD', KEYS[5], base)
return id
"""

# KEYS: index, ver, log. ARGV: scope base, new epoch, log maxlen, ids... (none: every entry).
_FORGET = """
local base = ARGV[1]
if #ARGV == 3 then
  local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
  for _, id in ipairs(ids) do redis.call('DEL', base .. ':e:' .. id) end
  redis.call('DEL', KEYS[1], KEYS[3])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], 'epoch', ARGV[2])
    redis.call('HINCRBY', KEYS[2], 'n', 1)
  end
  return #ids
end
local removed = 0
for i = 4, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('DEL', base .. ':e:' .. ARGV[i])
    removed = removed + 1
    local n = redis.call('HINCRBY', KEYS[2], 'n', 1)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'op', 'del', 'id', ARGV[i], 'n', n)
  end
end
return removed
"""

# KEYS: trust hash. ARGV: now_ms, half-life ms, ttl_s. Returns the new count (a string).
_DISTRUST = """
local v = redis.call('HMGET', KEYS[1], 'bad', 'at_ms')
local now = tonumber(ARGV[1])
local bad, at = tonumber(v[1]) or 0, tonumber(v[2]) or now
bad = bad * math.pow(2, -math.max(0, now - at) / tonumber(ARGV[2])) + 1
redis.call('HSET', KEYS[1], 'bad', tostring(bad), 'at_ms', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return tostring(bad)
"""


def _parts(scope: str) -> tuple[str, str, str]:
    return f"{scope}:index", f"{scope}:ver", f"{scope}:log"


class SemanticCache:
    """One process's semantic cache: lookups against every scope, the scripts that change
    Redis. Concurrent lookups of one scope share its sync (one at a time per scope)."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, embedder: Embedder,
        clock_ms: Callable[[], int] = clock.now_ms,
    ) -> None:  # fmt: skip
        self.redis, self.keys, self.embedder, self.clock_ms = redis, keys, embedder, clock_ms
        self._indexes: dict[str, ScopeIndex] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._store = redis.register_script(_STORE)
        self._paused_until_ms = 0  # after an embedding failure (PAUSE_AFTER_FAILURE_MS)
        self._failure = ""

    def _question(self, cfg: Config, feature: str, tenant: str | None, cache_off: bool,
                  params: dict[str, Any]) -> str | Lookup:  # fmt: skip
        """The question a job asks the semantic cache; or the outcome of a job that does not
        use it."""
        f = cfg.features[feature]
        if f.semantic_cache is None or cache_off:
            return Lookup(outcome="off")
        if f.response_cache_scope == "tenant" and not tenant:
            return Lookup(outcome="no_tenant")
        text = last_user_text(params)
        if text is None:
            return Lookup(outcome="not_text", reason="the last turn is not the user's text")
        if len(text) > cfg.embeddings.max_chars:
            why = f"the last user turn has {len(text):,} characters, over embeddings.max_chars"
            return Lookup(outcome="too_long", reason=why)
        return text

    async def lookup(self, cfg: Config, *, feature: str, tenant: str | None, cache_off: bool,
                     model: str, params: dict[str, Any]) -> Lookup:  # fmt: skip
        """Embed the job's last user turn and look for an answer in its scope. Never raises
        for an embedding or Redis failure: the outcome is "error" (the job calls the API)."""
        text = self._question(cfg, feature, tenant, cache_off, params)
        if isinstance(text, Lookup):
            return text
        sc = cfg.features[feature].semantic_cache
        assert sc is not None
        shared = cfg.features[feature].response_cache_scope == "shared"
        who = None if shared else tenant
        if self.clock_ms() < self._paused_until_ms:
            why = f"skipped after an embedding failure: {self._failure}"
            return Lookup(outcome="error", reason=why, feature=feature, tenant=who)
        scope = self.keys.semantic_scope(feature, who)
        # The scope's sync with Redis runs while the question is embedded: its round trip
        # hides under the embedding call's, so a lookup adds the search and, on a hit, the
        # read of the entry.
        syncing = asyncio.ensure_future(self._synced(scope, feature))
        try:
            embedded = await self.embedder.embed([text])
        except EmbeddingError as exc:
            await _settled(syncing)
            self._paused_until_ms = self.clock_ms() + PAUSE_AFTER_FAILURE_MS
            self._failure = str(exc)
            log.warning("semantic cache skipped for %d s: %s", PAUSE_AFTER_FAILURE_MS // 1000, exc)
            return Lookup(outcome="error", reason=str(exc), feature=feature, tenant=who)
        except BaseException:
            await _settled(syncing)
            raise
        vector = embedded.vectors[0]
        found = Lookup(
            outcome="miss", embedding_tokens=embedded.tokens,
            embedding_cost_usd=cost_usd(cfg.embeddings, embedded.tokens), feature=feature,
            tenant=who, scope=scope, context=context_of(self.embedder.name, model, params),
            question=text[:QUESTION_CHARS], vector=vector.astype("<f4").tobytes(),
        )  # fmt: skip
        try:
            return await self._search(found, sc, vector, await syncing)
        except RedisError as exc:
            log.warning("semantic cache of %s skipped: Redis: %s", feature, exc)
            return msgspec.structs.replace(found, outcome="error", reason=f"Redis: {exc}")

    async def _synced(self, scope: str, feature: str) -> tuple[ScopeIndex, tuple[float, int]]:
        """The scope's index brought up to date (one sync at a time per scope)."""
        async with self._locks.setdefault(scope, asyncio.Lock()):
            return await self._sync(scope, feature, self.clock_ms())

    async def _search(
        self, found: Lookup, sc: SemanticCacheConfig, vector: np.ndarray,
        synced: tuple[ScopeIndex, tuple[float, int]],
    ) -> Lookup:  # fmt: skip
        now = self.clock_ms()
        index, bad = synced
        nearest = index.nearest(found.context, vector, now - 1000 * sc.ttl_s)
        threshold = trusted(sc.threshold, decayed(bad[0], bad[1], now, sc.trust_half_life_s))
        if nearest is None:
            return msgspec.structs.replace(found, threshold=threshold)
        miss = msgspec.structs.replace(found, similarity=nearest.similarity, threshold=threshold)
        if nearest.similarity < threshold:
            return miss
        raw: Any = await self.redis.get(f"{found.scope}:e:{nearest.entry_id}")
        entry = stored(_entry, raw)
        if entry is None or entry.context != found.context:  # forgotten or expired meanwhile
            index.remove(nearest.entry_id)
            return miss
        return msgspec.structs.replace(
            miss, outcome="hit", answer=entry.answer, source_job_id=entry.job_id,
            source_question=entry.question, entry_id=nearest.entry_id,
        )  # fmt: skip

    async def _sync(
        self, scope: str, feature: str, now_ms: int
    ) -> tuple[ScopeIndex, tuple[float, int]]:
        """The scope's index brought up to date with Redis, and the feature's bad count."""
        index = self._indexes.setdefault(scope, ScopeIndex())
        _, ver, changes = _parts(scope)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(ver, "epoch", "n")
            pipe.xrange(changes, f"({index.log_id}", "+", count=1000)
            pipe.hmget(self.keys.semantic_trust(feature), "bad", "at_ms")
            (epoch, n), entries, (bad, at_ms) = await pipe.execute()
        trust = (float(bad or 0), int(at_ms or now_ms))
        if epoch is None:  # nothing stored (or it all expired): nothing to find
            index.clear()
            index.epoch, index.n, index.log_id = None, 0, "0-0"
        elif epoch != index.epoch or not await self._apply(scope, index, entries, int(n)):
            await self._load(scope, index)
        return index, trust

    async def _apply(self, scope: str, index: ScopeIndex, entries: Sequence[Any], n: int) -> bool:
        """Apply logged changes; False when the log has a gap (load the scope instead)."""
        added: list[str] = []
        for log_id, fields in entries:
            step = int(fields["n"])
            if step <= index.n:
                index.log_id = str(log_id)
                continue
            if step != index.n + 1:
                return False
            if fields["op"] == "add":
                added.append(fields["id"])
            else:
                index.remove(fields["id"])
                added = [i for i in added if i != fields["id"]]
            index.n, index.log_id = step, str(log_id)
        if index.n != n:
            return False
        await self._fetch(scope, index, added)
        return True

    async def _load(self, scope: str, index: ScopeIndex) -> None:
        """Copy the whole scope: a snapshot of its version, log position and ids, then the
        entries (one that goes meanwhile is skipped; its `del` in the log is a no-op)."""
        ids_key, ver, changes = _parts(scope)
        async with self.redis.pipeline(transaction=True) as tx:
            tx.hmget(ver, "epoch", "n")
            tx.xrevrange(changes, count=1)
            tx.zrange(ids_key, 0, -1)
            (epoch, n), last, ids = await tx.execute()
        index.clear()
        index.epoch, index.n = epoch, int(n or 0)
        index.log_id = str(last[0][0]) if last else "0-0"
        await self._fetch(scope, index, list(ids))

    async def _fetch(self, scope: str, index: ScopeIndex, ids: list[str]) -> None:
        for start in range(0, len(ids), LOAD_CHUNK):
            chunk = ids[start : start + LOAD_CHUNK]
            raws: Any = await self.redis.mget([f"{scope}:e:{i}" for i in chunk])
            for entry_id, raw in zip(chunk, raws, strict=True):
                entry = stored(_entry, raw)
                if entry is not None:
                    vector = np.frombuffer(entry.vector, dtype="<f4")
                    index.add(entry_id, entry.context, vector, entry.at_ms)

    def store_into(self, tx: Any, cfg: Config, lookup: Lookup, *, job_id: str,
                   answer: CachedAnswer, now_ms: int) -> None:  # fmt: skip
        """Queue on `tx` (the job's finishing MULTI) the entry a miss's answer becomes: one
        EVALSHA of the store script (the pipeline loads the script before the MULTI, as
        redis-py's Script does for a pipeline; the reply, the new entry's id, is the
        script's). Does no I/O of its own."""
        assert lookup.outcome == "miss", "only a miss has a vector to keep"
        sc = cfg.features[lookup.feature].semantic_cache
        assert sc is not None
        entry = Entry(
            context=lookup.context, vector=lookup.vector, answer=answer, job_id=job_id,
            at_ms=now_ms, question=lookup.question, feature=lookup.feature,
            tenant=lookup.tenant,
        )  # fmt: skip
        keys = [*_parts(lookup.scope), self.keys.semantic_source(job_id), self.keys.semantic_scopes]
        args: list[str | bytes | int] = [
            _encode(entry), sc.ttl_s, sc.max_entries, now_ms, lookup.scope, uuid.uuid4().hex,
            LOG_MAXLEN,
        ]  # fmt: skip
        tx.scripts.add(self._store)  # loaded (SCRIPT LOAD) before the MULTI is sent
        tx.evalsha(self._store.sha, len(keys), *keys, *args)

    def record_hit_into(
        self, tx: Any, lookup: Lookup, *, job_id: str, ttl_s: int, now_ms: int
    ) -> None:
        """Queue on `tx` the record of a hit, for `tokenq cache inspect` and feedback; kept
        `ttl_s` (queue.result_ttl_s: as long as the job's result)."""
        assert lookup.outcome == "hit" and lookup.similarity is not None
        record = HitRecord(
            job_id=job_id, feature=lookup.feature, tenant=lookup.tenant, scope=lookup.scope,
            entry_id=lookup.entry_id, source_job_id=lookup.source_job_id,
            similarity=round(lookup.similarity, 6), threshold=round(lookup.threshold or 0, 6),
            question=lookup.question, source_question=lookup.source_question, at_ms=now_ms,
        )  # fmt: skip
        tx.set(self.keys.semantic_hit(job_id), _encode(record), ex=ttl_s)


async def forget_entries(redis: aioredis.Redis, scope: str, entry_ids: Sequence[str] = ()) -> int:
    """Remove entries of a scope (every one when `entry_ids` is empty) for every process at
    once: gone from Redis and noted in the scope's log (or a new epoch) in one script.
    Returns how many were removed."""
    script = redis.register_script(_FORGET)
    args: list[str | int] = [scope, uuid.uuid4().hex, LOG_MAXLEN, *entry_ids]
    return int(await script(keys=list(_parts(scope)), args=args))


async def distrust(redis: aioredis.Redis, keys: Keys, feature: str, sc: SemanticCacheConfig,
                   now_ms: int) -> float:  # fmt: skip
    """Count one more bad semantic hit of `feature`; returns the decayed count now."""
    script = redis.register_script(_DISTRUST)
    ttl_s = 16 * sc.trust_half_life_s  # by then a count has decayed below 2^-16
    args = [now_ms, 1000 * sc.trust_half_life_s, ttl_s]
    return float(await script(keys=[keys.semantic_trust(feature)], args=args))


async def _settled(task: asyncio.Future[Any]) -> None:
    """Wait for a task whose result is not needed; its error (Redis) is not this caller's."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, RedisError):
        await task


T = TypeVar("T")


def stored(decode: Callable[[Any], T], raw: Any) -> T | None:
    """A stored record (an entry, a hit record...) decoded; None for a missing value or one
    that is not such a record (another program's: skipped, never trusted)."""
    if raw is None:
        return None
    try:
        return decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
