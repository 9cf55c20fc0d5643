"""The semantic cache against a real Valkey and the simulator's embeddings endpoint: hits
and misses, scopes, TTL and bound, forgetting across two workers' caches, bad verdicts, the
CLI, and a Redis restart."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import ConfigFactory
from tests.helpers import eventually, run, sim_call
from worker.caching import CachedAnswer
from worker.config import Config, load_config
from worker.contract import Keys
from worker.embedded import connect, free_port, server_args, wait_until_ready
from worker.embeddings import make_embedder
from worker.semantic import PAUSE_AFTER_FAILURE_MS, Lookup, SemanticCache
from worker.semantic_audit import bad_verdict, forget

ROOT = Path(__file__).resolve().parents[2]
MODEL = "claude-haiku-5-5"
SYSTEM = "You are the support assistant of Acme."


def ask(text: str, system: str = SYSTEM, max_tokens: int = 300) -> dict[str, Any]:
    return {"system": system, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}]}  # fmt: skip


def answer(text: str) -> CachedAnswer:
    return CachedAnswer(text, [{"type": "text", "text": text}], MODEL, "haiku", "end_turn", {})


class Clock:
    """A clock the test moves (ms)."""

    def __init__(self) -> None:
        self.now_ms = int(time.time() * 1000)

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def semantic_config(make_config: ConfigFactory, sim: str) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        settings = {
            "anthropic.simulator_url": sim,
            "embeddings.provider": "simulator",
            "features.support_faq.semantic_cache": {"threshold": 0.92, "ttl_s": 3600,
                                                    "max_entries": 100},
            "features.summarize.semantic_cache": {"threshold": 0.92, "ttl_s": 3600},
            **overrides,
        }  # fmt: skip
        return make_config(**settings)[0]

    return make


Caches = Callable[..., Any]


@pytest.fixture
async def caches(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Caches]:
    """`cache(cfg)`: a SemanticCache as one worker process would have (several stand for
    several workers); closed after the test."""
    made: list[SemanticCache] = []

    def cache(cfg: Config, clock: Clock | None = None) -> SemanticCache:
        c = SemanticCache(redis, keys, make_embedder(cfg), clock or Clock())
        made.append(c)
        return c

    yield cache
    for c in made:
        await c.embedder.aclose()


async def look(cache: SemanticCache, cfg: Config, text: str, *, feature: str = "support_faq",
               tenant: str | None = "acme", **params: Any) -> Lookup:  # fmt: skip
    return await cache.lookup(cfg, feature=feature, tenant=tenant, cache_off=False, model=MODEL,
                              params=ask(text, **params))  # fmt: skip


async def keep(cache: SemanticCache, cfg: Config, found: Lookup, job_id: str, text: str) -> None:
    """What the finishing transaction of the job that missed does."""
    async with cache.redis.pipeline(transaction=True) as tx:
        cache.store_into(tx, cfg, found, job_id=job_id, answer=answer(text),
                         now_ms=cache.clock_ms())  # fmt: skip
        await tx.execute()


async def test_a_paraphrase_is_answered_with_the_first_answer(
    semantic_config: Callable[..., Config], caches: Caches, sim: str
) -> None:
    cfg = semantic_config()
    cache = caches(cfg)
    first = await look(cache, cfg, "How do I cancel my subscription?")
    assert first.outcome == "miss" and first.embedding_tokens > 0
    assert first.embedding_cost_usd == pytest.approx(first.embedding_tokens * 0.02 / 1e6)
    await keep(cache, cfg, first, "job-1", "Go to Settings > Plan > Cancel.")
    hit = await look(cache, cfg, "How can I terminate my membership?")
    assert hit.outcome == "hit"
    assert hit.answer is not None and hit.answer.text == "Go to Settings > Plan > Cancel."
    assert hit.source_job_id == "job-1"
    assert hit.similarity is not None and hit.similarity >= 0.92
    billed = sim_call(sim, "ledger")["embeddings"]["voyage-3.5-lite"]
    assert billed["requests"] == 2
    assert billed["tokens"] == first.embedding_tokens + hit.embedding_tokens


async def test_a_near_miss_is_not_answered(
    semantic_config: Callable[..., Config], caches: Caches
) -> None:
    cfg = semantic_config()
    cache = caches(cfg)
    first = await look(cache, cfg, "How do I cancel my subscription?")
    await keep(cache, cfg, first, "job-1", "Cancel it under Plan.")
    for other in ("How do I pause my subscription?", "How do I cancel my order?"):
        near = await look(cache, cfg, other)
        assert near.outcome == "miss", other
        assert near.similarity is not None and near.similarity < 0.92


async def test_a_different_system_prompt_or_cap_never_shares_an_answer(
    semantic_config: Callable[..., Config], caches: Caches
) -> None:
    cfg = semantic_config()
    cache = caches(cfg)
    first = await look(cache, cfg, "How do I cancel my subscription?")
    await keep(cache, cfg, first, "job-1", "Cancel it under Plan.")
    same_words = "How do I cancel my subscription?"
    other_app = await look(cache, cfg, same_words, system="You answer for Globex, tersely.")
    assert other_app.outcome == "miss" and other_app.similarity is None
    bigger = await look(cache, cfg, same_words, max_tokens=2000)
    assert bigger.outcome == "miss" and bigger.similarity is None
    assert (await look(cache, cfg, same_words, max_tokens=500)).outcome == "hit"


@pytest.mark.parametrize(("a", "b"), [("acme", "globex"), ("acme:1", "acme"), ("a:b", "a:b:")])
async def test_one_tenant_never_gets_another_tenants_answer(
    semantic_config: Callable[..., Config], caches: Caches, a: str, b: str
) -> None:
    cfg = semantic_config(**{"features.summarize.semantic_cache": {"threshold": 0.92}})
    cache = caches(cfg)
    text = "Summarise how I cancel my subscription"
    first = await look(cache, cfg, text, feature="summarize", tenant=a)
    await keep(cache, cfg, first, "job-a", "A's answer")
    assert (await look(cache, cfg, text, feature="summarize", tenant=a)).outcome == "hit"
    other = await look(cache, cfg, text, feature="summarize", tenant=b)
    assert other.outcome == "miss" and other.similarity is None
    nobody = await look(cache, cfg, text, feature="summarize", tenant=None)
    assert nobody.outcome == "no_tenant" and nobody.embedding_tokens == 0


async def test_shared_scope_serves_every_tenant_and_cache_off_skips(
    semantic_config: Callable[..., Config], caches: Caches
) -> None:
    cfg = semantic_config()  # support_faq: response_cache_scope = "shared"
    cache = caches(cfg)
    first = await look(cache, cfg, "How do I reset my password?", tenant="acme")
    await keep(cache, cfg, first, "job-1", "Use the reset link.")
    assert (
        await look(cache, cfg, "How can I recover my passcode?", tenant="globex")
    ).outcome == "hit"
    off = await cache.lookup(cfg, feature="support_faq", tenant="acme", cache_off=True,
                             model=MODEL, params=ask("How do I reset my password?"))  # fmt: skip
    assert off.outcome == "off" and off.embedding_tokens == 0


async def test_entries_expire_after_their_ttl(
    semantic_config: Callable[..., Config], caches: Caches, redis: aioredis.Redis
) -> None:
    cfg = semantic_config(**{"features.support_faq.semantic_cache": {"ttl_s": 1}})
    clock = Clock()
    cache = caches(cfg, clock)
    first = await look(cache, cfg, "How do I cancel my subscription?")
    await keep(cache, cfg, first, "job-1", "Cancel it under Plan.")
    assert (await look(cache, cfg, "How can I terminate my membership?")).outcome == "hit"
    clock.now_ms += 1500  # past the TTL for this process's index...
    assert (await look(cache, cfg, "How can I terminate my membership?")).outcome == "miss"

    async def gone() -> bool:  # ...and for Redis, on its own clock
        return await redis.exists(f"{first.scope}:e:" + "x") == 0 and not await redis.keys(
            f"{first.scope}:e:*"
        )

    await eventually(gone, what="the entry expiring in Redis", timeout_s=10)
    other = caches(cfg)  # a process that starts now finds nothing to serve
    assert (await look(other, cfg, "How can I terminate my membership?")).outcome == "miss"


async def test_a_scope_keeps_at_most_max_entries_the_newest(
    semantic_config: Callable[..., Config], caches: Caches, redis: aioredis.Redis
) -> None:
    cfg = semantic_config(**{"features.support_faq.semantic_cache": {"max_entries": 3}})
    cache = caches(cfg)
    questions = ["How do I cancel my subscription?", "How do I reset my password?",
                 "How do I track my order?", "How do I export my invoice?",
                 "How do I delete my webhook?"]  # fmt: skip
    for n, text in enumerate(questions):
        found = await look(cache, cfg, text)
        assert found.outcome == "miss"
        await keep(cache, cfg, found, f"job-{n}", f"answer {n}")
    assert await redis.zcard(f"{found.scope}:index") == 3
    assert len(await redis.keys(f"{found.scope}:e:*")) == 3
    fresh = caches(cfg)
    for n, text in enumerate(questions):
        again = await look(fresh, cfg, text)
        assert again.outcome == ("hit" if n >= 2 else "miss"), text
        assert (await look(cache, cfg, text)).outcome == again.outcome


async def test_forget_takes_effect_in_every_worker_at_once(
    semantic_config: Callable[..., Config], caches: Caches, redis: aioredis.Redis, keys: Keys
) -> None:
    cfg = semantic_config()
    one, two = caches(cfg), caches(cfg)  # two workers' caches
    first = await look(one, cfg, "How do I cancel my subscription?")
    await keep(one, cfg, first, "job-1", "A wrong answer.")
    hit = await look(two, cfg, "How can I terminate my membership?")
    assert hit.outcome == "hit" and hit.source_job_id == "job-1"
    assert await forget(redis, keys, job_id="job-1") == 1
    for cache in (one, two):
        assert (await look(cache, cfg, "How can I terminate my membership?")).outcome == "miss"


async def test_forget_by_feature_and_by_tenant(
    semantic_config: Callable[..., Config], caches: Caches, redis: aioredis.Redis, keys: Keys
) -> None:
    cfg = semantic_config()
    cache, other_worker = caches(cfg), caches(cfg)
    text = "Summarise how I cancel my subscription"
    for tenant in ("acme", "acme:eu", "globex"):
        found = await look(cache, cfg, text, feature="summarize", tenant=tenant)
        await keep(cache, cfg, found, f"job-{tenant}", tenant)
    assert await forget(redis, keys, tenant="acme:eu") == 1
    outcomes = {t: (await look(other_worker, cfg, text, feature="summarize", tenant=t)).outcome
                for t in ("acme", "acme:eu", "globex")}  # fmt: skip
    assert outcomes == {"acme": "hit", "acme:eu": "miss", "globex": "hit"}
    assert await forget(redis, keys, feature="summarize") == 2
    for t in ("acme", "globex"):
        assert (
            await look(other_worker, cfg, text, feature="summarize", tenant=t)
        ).outcome == "miss"


async def test_a_bad_verdict_removes_the_entry_and_raises_the_threshold(
    semantic_config: Callable[..., Config], caches: Caches, redis: aioredis.Redis, keys: Keys
) -> None:
    cfg = semantic_config()
    cache = caches(cfg)
    first = await look(cache, cfg, "How do I cancel my subscription?")
    await keep(cache, cfg, first, "job-1", "A wrong answer.")
    hit = await look(cache, cfg, "How can I terminate my membership?")
    async with redis.pipeline(transaction=True) as tx:
        cache.record_hit_into(tx, hit, job_id="job-2", ttl_s=60, now_ms=cache.clock_ms())
        await tx.execute()
    assert not await bad_verdict(redis, keys, cfg, "job-1", cache.clock_ms())  # not a hit
    assert await bad_verdict(redis, keys, cfg, "job-2", cache.clock_ms())
    again = await look(cache, cfg, "How can I terminate my membership?")
    assert again.outcome == "miss"
    assert again.threshold == pytest.approx(0.96)


async def test_cache_inspect_shows_the_pair_and_forget_removes_it(
    semantic_config: Callable[..., Config], caches: Caches, redis: aioredis.Redis,
    make_config: ConfigFactory, sim: str,
) -> None:  # fmt: skip
    cfg = semantic_config()
    _, path = make_config(**{"anthropic.simulator_url": sim})
    cache = caches(cfg)
    first = await look(cache, cfg, "How do I cancel my subscription?")
    await keep(cache, cfg, first, "job:1", "Cancel it under Plan.")
    hit = await look(cache, cfg, "How can I terminate my membership?")
    async with redis.pipeline(transaction=True) as tx:
        cache.record_hit_into(tx, hit, job_id="job:2", ttl_s=60, now_ms=cache.clock_ms())
        await tx.execute()
    tokenq = [sys.executable, "-m", "worker", "--config", str(path), "cache"]
    code, out, err = await run(*tokenq, "inspect", "job:2")
    assert code == 0, err
    assert "How can I terminate my membership?" in out
    assert "How do I cancel my subscription?" in out
    assert "source job:  'job:1'" in out and "similarity 0.9" in out
    code, out, _ = await run(*tokenq, "scopes")
    assert "support_faq / shared: 1 entries" in out and "no vector search" in out
    code, out, _ = await run(*tokenq, "forget", "--job", "job:2")
    assert code == 0 and "forgot 1 entry" in out
    assert (await look(cache, cfg, "How can I terminate my membership?")).outcome == "miss"
    code, out, _ = await run(*tokenq, "inspect", "job:2")
    assert "since forgotten or expired" in out


async def test_an_embedding_failure_skips_the_cache_without_raising(
    semantic_config: Callable[..., Config], caches: Caches
) -> None:
    port = free_port()
    cfg = semantic_config(**{"anthropic.simulator_url": f"http://127.0.0.1:{port}",
                             "embeddings.timeout_s": 2.0})  # fmt: skip
    clock = Clock()
    cache = caches(cfg, clock)
    found = await look(cache, cfg, "How do I cancel my subscription?")
    assert found.outcome == "error" and "simulator embeddings" in found.reason

    # A provider that is down is not asked again by every job: lookups skip it for a while
    # (no call made: an answer at that port now would not be seen), then try again.
    async with fake_embeddings(port) as calls:
        found = await look(cache, cfg, "How do I cancel my subscription?")
        assert found.outcome == "error" and "after an embedding failure" in found.reason
        assert calls == []
        clock.now_ms += PAUSE_AFTER_FAILURE_MS
        found = await look(cache, cfg, "How do I cancel my subscription?")
        assert len(calls) == 1 and found.outcome == "miss", found.reason


@asynccontextmanager
async def fake_embeddings(port: int) -> AsyncIterator[list[str]]:
    """An embeddings endpoint on `port` that answers every call with one vector; the texts
    it was asked, in order."""
    calls: list[str] = []

    async def embed(request: web.Request) -> web.Response:
        body = await request.json()
        calls.extend(body["input"])
        rows = [{"object": "embedding", "embedding": [1.0] + [0.0] * 511, "index": i}
                for i in range(len(body["input"]))]  # fmt: skip
        return web.json_response({"data": rows, "usage": {"total_tokens": 5}})

    app = web.Application()
    app.router.add_post("/v1/embeddings", embed)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield calls
    finally:
        await runner.cleanup()


@contextmanager
def own_valkey(data: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The bundled valkey-server with the embedded config's persistence, on `port`."""
    args = server_args(load_config(ROOT / "config.toml"), port=port, data_dir=str(data))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until_ready(port), "valkey-server did not start"
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@asynccontextmanager
async def client(port: int) -> AsyncIterator[aioredis.Redis]:
    c = connect(f"redis://127.0.0.1:{port}/0", retries=0)
    try:
        yield c
    finally:
        await c.aclose()


async def test_a_redis_restart_loses_nothing_but_cache(
    semantic_config: Callable[..., Config], keys: Keys
) -> None:
    cfg = semantic_config()
    port = free_port()
    text, paraphrase = "How do I cancel my subscription?", "How can I terminate my membership?"
    with tempfile.TemporaryDirectory() as data:
        async with client(port) as redis:
            cache = SemanticCache(redis, keys, make_embedder(cfg))
            with own_valkey(Path(data), port):
                first = await look(cache, cfg, text)
                await keep(cache, cfg, first, "job-1", "Cancel it under Plan.")
                assert (await look(cache, cfg, paraphrase)).outcome == "hit"
            down = await look(cache, cfg, paraphrase)  # Redis is gone: no hit, no exception
            assert down.outcome == "error" and down.embedding_tokens > 0
            with own_valkey(Path(data), port):  # back, with its append-only file
                assert (await look(cache, cfg, paraphrase)).outcome == "hit"
                await redis.flushall()  # a server that came back empty
                assert (await look(cache, cfg, paraphrase)).outcome == "miss"
                again = await look(cache, cfg, text)
                await keep(cache, cfg, again, "job-3", "Cancel it under Plan.")
                assert (await look(cache, cfg, paraphrase)).source_job_id == "job-3"
            await cache.embedder.aclose()
