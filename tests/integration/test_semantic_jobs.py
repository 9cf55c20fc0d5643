"""The semantic cache through the worker (real Valkey, the simulator's messages and
embeddings, the SDK): a paraphrase is answered from an earlier job's answer, auditable in its
result and usage event; a near miss, another system prompt or another tenant (also one with
`:` in its name) is not; the bound per scope and the TTL hold; `tokenq cache forget` and a
producer's `bad` verdict take effect for every worker; a miss's answer is kept only once it
passed; a Redis restart keeps the entries and the worker goes on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from producers import Producer
from tests.conftest import ROOT, ConfigFactory
from tests.helpers import eventually, run, sim_call, usage_events
from tests.integration.conftest import RunWorker
from worker.config import load_config
from worker.contract import Keys, Result, UsageEvent
from worker.embedded import connect, free_port, server_args, wait_until_ready

SYSTEM = "You are the support assistant of Acme."
QUESTION, PARAPHRASE = "How do I cancel my subscription?", "How can I terminate my membership?"


def ask(text: str, system: str = SYSTEM) -> dict[str, Any]:
    return {"system": system, "messages": [{"role": "user", "content": text}]}


def semantic_settings(sim: str, **more: Any) -> dict[str, Any]:
    """support_faq (shared scope) and summarize (tenant scope) with a semantic cache; no
    exact response cache, so every second answer below can only come from the semantic one."""
    cache = {"threshold": 0.92, "ttl_s": 3600, "max_entries": 100}
    return {
        "anthropic.simulator_url": sim,
        "embeddings.provider": "simulator",
        "features.support_faq.response_cache_ttl_s": 0,
        "features.support_faq.dedupe": False,
        "features.support_faq.semantic_cache": cache,
        "features.summarize.semantic_cache": cache,
        **more,
    }


async def answer(
    producer: Producer, feature: str, request: dict[str, Any], tenant: str | None = None
) -> Result:
    return await producer.result(await producer.submit(feature, request, tenant=tenant), 20)


SemanticWorker = Callable[..., AbstractAsyncContextManager[Producer]]


@pytest.fixture
def semantic_worker(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> SemanticWorker:
    """`async with semantic_worker(**more) as producer:` runs a worker configured with
    semantic_settings(sim, **more) and gives a producer of this test's jobs."""

    @asynccontextmanager
    async def start(**more: Any) -> AsyncIterator[Producer]:
        cfg, _ = make_config(**semantic_settings(sim, **more))
        producer = Producer(redis, keys.prefix)
        async with run_worker(cfg):
            yield producer

    return start


def messages(sim: str) -> int:
    """Messages the simulator answered (embeddings are counted apart)."""
    return int(sum(m["requests"] for m in sim_call(sim, "ledger")["models"].values()))


async def event_of(redis: aioredis.Redis, keys: Keys, job_id: str) -> UsageEvent:
    return next(e for e in await usage_events(redis, keys) if e.job_id == job_id)


async def test_a_paraphrase_is_answered_from_the_first_jobs_answer(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, path = make_config(**semantic_settings(sim))
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        first = await answer(producer, "support_faq", ask(QUESTION))
        second = await answer(producer, "support_faq", ask(PARAPHRASE))
    assert messages(sim) == 1, "the paraphrase made no call"
    assert first.mode == "realtime" and first.semantic_similarity is None
    assert second.mode == "cache" and second.text == first.text
    assert second.semantic_source_job_id == first.id
    assert second.semantic_similarity is not None and second.semantic_similarity >= 0.92
    event = await event_of(redis, keys, second.id)
    assert event.response_cache == "semantic" and event.mode == "cache"
    assert event.semantic_source_job_id == first.id
    assert event.semantic_similarity == second.semantic_similarity
    assert event.embedding_tokens > 0 and event.input_tokens == 0
    billed = sim_call(sim, "ledger")["embeddings"]["voyage-3.5-lite"]
    per_token = cfg.embeddings.usd_per_mtok / 1e6
    assert event.cost_usd == round(event.embedding_tokens * per_token, 10) > 0
    assert billed["requests"] == 2, "both jobs embedded their question"
    first_event = await event_of(redis, keys, first.id)
    assert first_event.response_cache == "off" and first_event.semantic_source_job_id == ""
    assert first_event.embedding_tokens > 0, "a miss pays its embedding too"
    code, out, _ = await run(sys.executable, "-m", "worker", "--config", str(path),
                             "cache", "inspect", second.id)  # fmt: skip
    assert code == 0 and first.id in out, out


async def test_a_near_miss_another_system_prompt_or_tenant_makes_a_call(
    redis: aioredis.Redis, keys: Keys, sim: str, semantic_worker: SemanticWorker
) -> None:
    async with semantic_worker() as producer:
        await answer(producer, "support_faq", ask(QUESTION))
        near = await answer(producer, "support_faq", ask("How do I pause my subscription?"))
        other = await answer(producer, "support_faq", ask(PARAPHRASE, "You are Globex's bot."))
        # summarize is scoped to the tenant: `acme:eu` is not `acme`, nor `acme:` + `eu`.
        mine = await answer(producer, "summarize", ask(QUESTION), tenant="acme")
        same = await answer(producer, "summarize", ask(PARAPHRASE), tenant="acme")
        theirs = await answer(producer, "summarize", ask(PARAPHRASE), tenant="acme:eu")
        anonymous = await answer(producer, "summarize", ask(PARAPHRASE))
    assert near.mode == other.mode == theirs.mode == anonymous.mode == "realtime"
    assert same.mode == "cache" and same.semantic_source_job_id == mine.id
    assert messages(sim) == 6
    assert (await event_of(redis, keys, anonymous.id)).embedding_tokens == 0, "no tenant: no lookup"


async def test_a_scope_keeps_at_most_max_entries(semantic_worker: SemanticWorker) -> None:
    bound = {"threshold": 0.92, "ttl_s": 3600, "max_entries": 2}
    async with semantic_worker(**{"features.support_faq.semantic_cache": bound}) as producer:
        await answer(producer, "support_faq", ask(QUESTION))
        await answer(producer, "support_faq", ask("How do I track my order?"))
        await answer(producer, "support_faq", ask("Where is my order?"))
        evicted = await answer(producer, "support_faq", ask(PARAPHRASE))
        kept = await answer(producer, "support_faq", ask("Where's my order?"))
    assert evicted.mode == "realtime", "the oldest entry went when the third came"
    assert kept.mode == "cache"


async def test_forget_and_a_bad_verdict_take_effect_for_every_worker(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, path = make_config(**semantic_settings(sim))
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg), run_worker(cfg):  # two workers: either may take a job
        first = await answer(producer, "support_faq", ask(QUESTION))
        hit = await answer(producer, "support_faq", ask(PARAPHRASE))
        assert hit.mode == "cache"
        # A producer says the reused answer was wrong: its entry goes, for every worker.
        await redis.xadd(keys.feedback, {"job_id": hit.id, "verdict": "bad"})
        await eventually(
            lambda: gone(redis, keys, hit.id), what="the bad verdict applied", timeout_s=10
        )
        again = await answer(producer, "support_faq", ask(PARAPHRASE))
        assert again.mode == "realtime", "the entry was removed"
        code, out, err = await run(sys.executable, "-m", "worker", "--config", str(path),
                                   "cache", "forget", "--feature", "support_faq")  # fmt: skip
        assert code == 0, out + err
        gone_too = await answer(producer, "support_faq", ask(PARAPHRASE))
    assert gone_too.mode == "realtime"
    assert first.mode == "realtime"


async def gone(redis: aioredis.Redis, keys: Keys, job_id: str) -> bool:
    counts: Any = await redis.hgetall(keys.feedback_counts)
    return sum(int(n) for n in counts.values()) >= 1


async def test_an_answer_that_fails_its_check_is_not_kept(semantic_worker: SemanticWorker) -> None:
    more = {"features.support_faq.expect_regex": "^never$", "router.max_escalations": 0}
    async with semantic_worker(**more) as producer:
        first = await answer(producer, "support_faq", ask(QUESTION))
        second = await answer(producer, "support_faq", ask(PARAPHRASE))
    assert first.status == "error" and first.error is not None
    assert first.error.type == "check_failed"
    assert second.mode == "realtime"


async def test_an_entry_is_not_served_after_its_ttl(
    sim: str, semantic_worker: SemanticWorker
) -> None:
    short = {"threshold": 0.92, "ttl_s": 5, "max_entries": 100}
    async with semantic_worker(**{"features.support_faq.semantic_cache": short}) as producer:

        async def called() -> bool:
            again = await answer(producer, "support_faq", ask(PARAPHRASE))
            return again.mode == "realtime"

        first = await answer(producer, "support_faq", ask(QUESTION))
        hit = await answer(producer, "support_faq", ask(PARAPHRASE))
        assert hit.mode == "cache" and hit.semantic_source_job_id == first.id
        await eventually(called, what="a paraphrase answered by a call after ttl_s", timeout_s=30)
    assert messages(sim) == 2


async def test_a_redis_restart_keeps_the_entries_and_the_worker_goes_on(
    tmp_path: Path, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    port, data = free_port(), tmp_path / "valkey"  # a server this test stops and starts
    url = f"redis://127.0.0.1:{port}/0"
    cfg, _ = make_config(**semantic_settings(sim, **{"redis.url": url}))
    server = start_valkey(port, data)
    redis = connect(url, block_s=5)
    try:
        producer = Producer(redis, cfg.prefix)
        async with run_worker(cfg):
            first = await answer(producer, "support_faq", ask(QUESTION))
            server.terminate()  # a restart: the worker keeps its copy of the scope meanwhile
            server.wait(timeout=10)
            server = start_valkey(port, data)
            after = await answer(producer, "support_faq", ask(PARAPHRASE))
            new = await answer(producer, "support_faq", ask("How do I track my order?"))
            its_paraphrase = await answer(
                producer, "support_faq", ask("How can I locate my package?")
            )
        assert after.mode == "cache" and after.semantic_source_job_id == first.id
        assert new.mode == "realtime"
        assert its_paraphrase.mode == "cache", "entries written after the restart are found"
        assert its_paraphrase.semantic_source_job_id == new.id
    finally:
        await redis.aclose()
        server.terminate()
        server.wait(timeout=10)


def start_valkey(port: int, data: Path) -> subprocess.Popen[bytes]:
    """A valkey-server writing every acknowledged write to its append-only file."""
    args = server_args(load_config(ROOT / "config.toml"), port=port, data_dir=str(data))
    args[args.index("everysec")] = "always"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_until_ready(port), "valkey-server did not start"
    return proc
