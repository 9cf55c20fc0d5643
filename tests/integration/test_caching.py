"""Caching end to end (real Valkey, the simulator through the SDK): prompt-cache reads, the
response cache's tenant scope and TTL, one call for identical jobs in flight."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from producers import NewJob, Producer
from tests.conftest import ConfigFactory
from tests.helpers import eventually, sim_call, usage_events
from tests.integration.conftest import RunWorker
from worker.caching import CachedAnswer, Lease, ResponseCache
from worker.contract import Keys

MANUAL = "Policy manual of Acme. " + "Refunds take five days; invoices are monthly. " * 60


def faq(question: str) -> dict[str, Any]:
    return {"system": MANUAL, "max_tokens": 100,
            "messages": [{"role": "user", "content": question}]}  # fmt: skip


def ledger_model(sim: str, model: str = "claude-haiku-5-5") -> dict[str, Any]:
    models: dict[str, Any] = sim_call(sim, "ledger")["models"]
    return dict(models.get(model, {}))


async def test_a_second_call_with_the_same_long_system_prompt_reads_the_prompt_cache(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config()  # summarize: prompt_cache "auto", no response cache
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg, concurrency=1):
        first = await producer.result(await producer.submit("summarize", faq("Refunds?")), 10)
        second = await producer.result(await producer.submit("summarize", faq("Invoices?")), 10)
    assert first.status == second.status == "ok"
    events = {e.job_id: e for e in await usage_events(redis, keys)}
    wrote, read = events[first.id], events[second.id]
    assert wrote.cache_creation_input_tokens > 500 and wrote.cache_read_input_tokens == 0
    assert read.cache_read_input_tokens == wrote.cache_creation_input_tokens
    assert read.cost_usd < wrote.cost_usd / 2  # a read costs a tenth of input, a write 1.25x
    billed = ledger_model(sim)
    assert billed["cache_read_input_tokens"] == read.cache_read_input_tokens
    assert abs(billed["cost_usd"] - (wrote.cost_usd + read.cost_usd)) < 1e-12
    assert read.response_cache == "off"


async def test_a_cached_answer_stays_with_its_tenant_unless_the_feature_shares_it(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.response_cache_ttl_s": 600})
    producer = Producer(redis, keys.prefix)
    ask = faq("Refunds?")
    async with run_worker(cfg, concurrency=1):
        ids = [await producer.submit("summarize", ask, tenant=t) for t in ("acme", "acme")]
        done = [await producer.result(i, 10) for i in ids]
        other = await producer.result(await producer.submit("summarize", ask, tenant="globex"), 10)
        opted_out = await producer.result(
            await producer.submit("summarize", ask, tenant="acme", cache="off"), 10
        )
    assert [r.mode for r in [*done, other, opted_out]] == ["realtime", "cache", "realtime",
                                                          "realtime"]  # fmt: skip
    assert done[1].text == done[0].text and done[1].cost_usd == 0
    assert ledger_model(sim)["requests"] == 3
    events = {e.job_id: e for e in await usage_events(redis, keys)}
    hit = events[done[1].id]
    assert (hit.mode, hit.response_cache, hit.cost_usd) == ("cache", "hit", 0.0)
    assert hit.baseline_cost_usd > 0 and hit.route_reason.endswith("; response cache hit")
    assert events[other.id].response_cache == "miss"
    assert events[opted_out.id].response_cache == "off"

    shared, _ = make_config(**{"features.summarize.response_cache_ttl_s": 600,
                               "features.summarize.response_cache_scope": "shared"})  # fmt: skip
    async with run_worker(shared, concurrency=1):
        first = await producer.result(await producer.submit("summarize", ask, tenant="a"), 10)
        second = await producer.result(await producer.submit("summarize", ask, tenant="b"), 10)
    assert (first.mode, second.mode) == ("realtime", "cache")


async def test_a_cached_answer_expires_after_its_ttl(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.response_cache_ttl_s": 1})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg, concurrency=1):
        # A tenant: the feature's cache is scoped to tenants, and jobs without one skip it.
        first = await producer.result(await producer.submit("summarize", faq("Q?"), tenant="a"), 10)

        async def answers() -> list[str]:
            found = [k async for k in redis.scan_iter(match=f"{keys.prefix}:rcache:*")]
            return [k for k in found if not k.endswith((":lease", ":done"))]

        # On a loaded machine the second may be over before the key is looked at: then it
        # is gone already, which is what this test waits for below.
        for key in await answers():
            assert int(await redis.pttl(key)) <= 1000  # -2 once it has expired

        async def expired() -> bool:
            return not await answers()

        await eventually(expired, what="the cached answer's expiry", timeout_s=5)
        again = await producer.result(await producer.submit("summarize", faq("Q?"), tenant="a"), 10)
    assert (first.mode, again.mode) == ("realtime", "realtime")
    assert ledger_model(sim)["requests"] == 2


async def test_fifty_identical_jobs_in_flight_make_one_api_call(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.dedupe": True})  # no response cache
    sim_call(sim, "config", {"latency_ms": 300})
    producer = Producer(redis, keys.prefix)
    ask = faq("Refunds?")
    ids = await producer.submit_many(
        [NewJob(feature="summarize", request=ask, tenant="acme") for _ in range(50)]
    )
    async with run_worker(cfg, concurrency=32), run_worker(cfg, concurrency=32):
        done = await asyncio.gather(*(producer.result(i, 20) for i in ids))
        assert all(r.status == "ok" for r in done) and len({r.text for r in done}) == 1
        assert ledger_model(sim)["requests"] == 1
        # Without a response cache, a job after the call ended calls again.
        later = await producer.result(await producer.submit("summarize", ask, tenant="acme"), 10)
    assert later.mode == "realtime" and ledger_model(sim)["requests"] == 2
    every = {e.job_id: e for e in await usage_events(redis, keys)}
    events = [every[i] for i in ids]
    assert [e.response_cache for e in events].count("joined") == 49
    [paid] = [e for e in events if e.response_cache == "miss"]
    assert all(e.cost_usd == 0 and e.mode == "cache" for e in events if e is not paid)
    billed = ledger_model(sim)["cost_usd"]
    assert abs(paid.cost_usd + every[later.id].cost_usd - billed) < 1e-12


async def blocked_readers(redis: aioredis.Redis) -> int:
    """Clients of the server blocked in XREAD right now."""
    clients: Any = await redis.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xread" and "b" in c.get("flags", ""))


async def test_a_waiting_job_calls_itself_when_the_leader_gives_up(
    redis: aioredis.Redis, keys: Keys
) -> None:
    one = ResponseCache(redis, lease_ms=60_000, block_ms=5_000)
    two = ResponseCache(redis, lease_ms=60_000, block_ms=5_000)  # another process
    key = f"{keys.prefix}:rcache:f:tenant:a:x"
    leader = await one.claim(key, 10, True, "one")
    assert isinstance(leader, Lease)
    waiting = asyncio.create_task(two.claim(key, 10, True, "two"))

    async def one_waits() -> bool:
        return await blocked_readers(redis) == 1

    await eventually(one_waits, what="the second claim waiting on the leader")
    await one.abandon(leader)
    taken = await asyncio.wait_for(waiting, 5)
    assert isinstance(taken, Lease)  # it holds the lease now and makes the call
    answer = CachedAnswer("hi", [], "m", "haiku", "end_turn", {"output_tokens": 1})
    third = asyncio.create_task(one.claim(key, 10, True, "three"))
    await eventually(one_waits, what="the third claim waiting on the new leader")
    await two.complete(taken, answer)
    assert await asyncio.wait_for(third, 5) == answer
