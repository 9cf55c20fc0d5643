"""Hostile input against a real Valkey: one test per way a producer's entry could stop a worker,
lose a job, reach another tenant's answer or write tokenq's own keys (and the fixes' edges).

Hostile entries are written with a client that sends bytes as they are, as a Go or Node
producer would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from functools import partial
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import ConfigFactory
from tests.helpers import (
    FAST_BATCHES,
    add,
    entries,
    eventually,
    pending_count,
    read_result,
    sim_call,
    sim_requests,
    usage_events,
)
from tests.integration.conftest import RunWorker
from worker.contract import GROUP, Keys, Result
from worker.deferred import DeferredSet
from worker.queue import Delivery, Finish, Queue

HELLO = json.dumps({"messages": [{"role": "user", "content": "Hello there"}]})


@pytest.fixture
async def raw(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client that sends and returns bytes as they are."""
    client = aioredis.Redis.from_url(valkey_url)
    yield client
    await client.aclose()


RawEntry = dict[bytes, bytes]


async def raw_dead(raw: aioredis.Redis, keys: Keys) -> list[RawEntry]:
    reply: Any = await raw.xrange(keys.dead)
    return [fields for _, fields in reply]


def text(fields: RawEntry, name: str) -> str:
    return fields[name.encode()].decode("utf-8", "replace")


async def nothing_pending(redis: aioredis.Redis, keys: Keys) -> bool:
    counts = [await pending_count(redis, keys.jobs(p)) for p in ("high", "normal", "low")]
    return sum(counts) == 0


async def outcomes(raw: aioredis.Redis, keys: Keys, n: int) -> bool:
    return int(await raw.xlen(keys.usage)) >= n


def good(n: int) -> RawEntry:
    return {b"feature": b"summarize", b"request": HELLO.encode(), b"id": f"ok-{n}".encode()}


BAD_UTF8: list[tuple[str, RawEntry]] = [
    ("feature", {b"feature": b"summ\xffarize", b"request": HELLO.encode()}),
    ("request", {b"feature": b"summarize", b"request": HELLO.encode()[:-2] + b"\xc3\x28]}"}),
    ("id", {b"feature": b"summarize", b"request": HELLO.encode(), b"id": b"job-\xfe"}),
    ("tenant", {b"feature": b"summarize", b"request": HELLO.encode(), b"tenant": b"\x80acme"}),
    ("reply_to", {b"feature": b"summarize", b"request": HELLO.encode(), b"reply_to": b"r\xff"}),
    ("trace", {b"feature": b"summarize", b"request": HELLO.encode(), b"trace": b"\xed\xa0\x80"}),
]


# -- 1. bytes that are not UTF-8 --


async def test_invalid_utf8_in_any_field_is_dead_lettered_and_the_worker_goes_on(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config()
    for n, (_, fields) in enumerate(BAD_UTF8):
        await raw.xadd(keys.jobs("normal"), fields)  # type: ignore[arg-type]
        await raw.xadd(keys.jobs("normal"), good(n))  # type: ignore[arg-type]
    await raw.xadd(keys.jobs("normal"), {b"feature": b"summarize", b"request": HELLO.encode(),
                                         b"na\xffme": b"1"})  # fmt: skip
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 13), what="13 outcomes", timeout_s=20)
        await eventually(lambda: nothing_pending(redis, keys), what="nothing pending")
    dead = await raw_dead(raw, keys)
    assert len(dead) == 7 and {text(f, "error_type") for f in dead} == {"malformed_job"}
    for field, sent in BAD_UTF8:
        [fields] = [f for f in dead if f"field `{field}` is not valid UTF-8" in text(f, "error")]
        for name, value in sent.items():  # the bytes as they came
            assert fields[name] == value
    assert sum("a field name is not valid UTF-8" in text(f, "error") for f in dead) == 1
    for n in range(len(BAD_UTF8)):
        assert (await read_result(redis, keys, f"ok-{n}")).status == "ok"
    for fields in dead:  # an error result each, in clean UTF-8
        result = await read_result(redis, keys, text(fields, "job_id"))
        assert result.status == "error" and result.error is not None
    events: Any = await raw.xrange(keys.usage)
    for _, event in events:
        for value in event.values():
            value.decode("utf-8")  # usage events are clean UTF-8


async def test_invalid_utf8_on_the_reclaim_path(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config(**{"queue.visibility_timeout_s": 0.5})
    stream = keys.jobs("normal")
    await raw.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await raw.xadd(stream, BAD_UTF8[1][1])  # type: ignore[arg-type]
    for n in range(3):
        await raw.xadd(stream, good(n))  # type: ignore[arg-type]
    taken: Any = await raw.xreadgroup(GROUP, "ghost", {stream: ">"}, count=10)
    assert len(taken[0][1]) == 4  # a consumer that took them and died
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 4), what="4 outcomes", timeout_s=20)
        await eventually(lambda: nothing_pending(redis, keys), what="nothing pending")
    [dead] = await raw_dead(raw, keys)
    assert "field `request` is not valid UTF-8" in text(dead, "error")
    for n in range(3):
        assert (await read_result(redis, keys, f"ok-{n}")).status == "ok"


async def test_invalid_utf8_on_the_batched_priority_leaves_the_batcher_working(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"batch_seconds": 0.2})
    cfg, _ = make_config(**FAST_BATCHES)
    await raw.xadd(keys.jobs("low"), BAD_UTF8[0][1])  # type: ignore[arg-type]
    for n in range(5):
        await raw.xadd(keys.jobs("low"), good(n))  # type: ignore[arg-type]
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 6), what="6 outcomes", timeout_s=20)
        await eventually(lambda: nothing_pending(redis, keys), what="nothing pending")
        assert await redis.get(keys.batcher_lease)  # still held
    [dead] = await raw_dead(raw, keys)
    assert "field `feature` is not valid UTF-8" in text(dead, "error")
    for n in range(5):
        result = await read_result(redis, keys, f"ok-{n}")
        assert (result.status, result.mode) == ("ok", "batch")


# -- 2. reply_to --


async def test_reply_to_cannot_name_tokenq_keys_nor_another_type(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config()
    await redis.set("replies:a-string", "keep me")
    targets = [keys.deferred, keys.usage, keys.limits("claude-haiku-5-5"), keys.dead,
               f"{keys.prefix}:jobs:high", "replies:a-string"]  # fmt: skip
    for n, target in enumerate(targets):
        await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO,
                                               "id": f"r-{n}", "reply_to": target})  # fmt: skip
    await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO, "id": "fine",
                                           "reply_to": "replies:mine"})  # fmt: skip
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 7), what="7 outcomes", timeout_s=20)
    dead = {text(f, "id"): f for f in await raw_dead(raw, keys)}
    assert sorted(dead) == [f"r-{n}" for n in range(6)]
    for n in range(5):
        assert "names one of tokenq's own keys" in text(dead[f"r-{n}"], "error")
    assert "names an existing key of type string" in text(dead["r-5"], "error")
    assert await redis.get("replies:a-string") == "keep me"
    assert await redis.type(keys.deferred) == "none"
    assert await redis.type(keys.limits("claude-haiku-5-5")) in ("hash", "none")
    usage: Any = await raw.xrange(keys.usage)
    assert all(b"result" not in fields for _, fields in usage)
    [(_, reply)] = await entries(redis, "replies:mine")
    assert msgspec.json.decode(reply["result"], type=Result).status == "ok"


async def test_a_reply_to_turned_into_another_type_never_fails_the_finishing_write(
    redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, ["high", "normal", "low"], "c1", visibility_ms=60_000)
    await queue.ensure_groups()
    entry = await add(redis, keys.jobs("normal"), {"feature": "f", "request": "{}", "id": "j1"})
    await redis.xreadgroup(GROUP, "c1", {keys.jobs("normal"): ">"})
    await redis.hset("replies:became-a-hash", "k", "v")  # after the job was admitted
    d = Delivery("normal", keys.jobs("normal"), entry, {"id": "j1"})
    end = Finish(b'{"id":"j1","status":"ok"}', {"job_id": "j1"}, "replies:became-a-hash")
    await queue.finish(d, "j1", end)  # no WRONGTYPE out of the MULTI
    assert await redis.get(keys.result("j1")) == '{"id":"j1","status":"ok"}'
    assert await redis.hgetall("replies:became-a-hash") == {"k": "v"}
    assert await pending_count(redis, keys.jobs("normal")) == 0


async def test_reply_to_pattern_limits_where_results_go(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config(**{"queue.reply_to_pattern": "replies:[a-z]+"})
    for job_id, target in (("in", "replies:svc"), ("out", "elsewhere:svc")):
        await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO,
                                               "id": job_id, "reply_to": target})  # fmt: skip
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 2), what="2 outcomes")
    assert (await read_result(redis, keys, "in")).status == "ok"
    error = (await read_result(redis, keys, "out")).error
    assert error is not None and "does not match queue.reply_to_pattern" in error.message
    assert await redis.exists("elsewhere:svc") == 0
    assert len(await entries(redis, "replies:svc")) == 1


async def test_the_usage_readers_tolerate_entries_they_did_not_write(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys
) -> None:
    from worker.usage import HitRates, follow, tail_line

    await raw.xadd(keys.usage, {b"result": b'{"id": "x"}'})
    await raw.xadd(keys.usage, {b"ts_ms": b"1", b"job_id": b"\xff\xfe", b"feature": b"f\x1b[2J"})
    await raw.xadd(keys.usage, {b"ts_ms": b"99999999999999999", b"job_id": b"j", b"feature": b"f"})
    await raw.xadd(keys.usage, {b"ts_ms": b"soon", b"job_id": b"j", b"feature": b"f"})
    seen: list[str] = []

    async def read_all() -> None:
        rates = HitRates()
        async for _, event in follow(redis, keys, from_start=True, block_ms=100):
            seen.append(tail_line(event, rates))
            if len(seen) == 2:
                return

    await asyncio.wait_for(read_all(), timeout=5)
    assert "\x1b" not in seen[0] and "\ufffd" in seen[0]
    for line in seen:
        line.encode("utf-8")


# -- 3. validation holes --


async def test_deep_nesting_and_wrong_block_types_are_dead_lettered_at_once(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config()
    deep = '{"messages":[{"role":"user","content":"x"}],"metadata":' + "[" * 5000 + "]" * 5000
    requests = {
        "deep": deep + "}",
        "number": json.dumps({"messages": [{"role": "user", "content": [
            {"type": "text", "text": 42}]}]}),
        "null": json.dumps({"messages": [{"role": "user", "content": [
            {"type": "text", "text": None}]}]}),
        "system": json.dumps({"messages": [{"role": "user", "content": "x"}], "system": [7]}),
    }  # fmt: skip
    for job_id, request in requests.items():
        await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": request,
                                               "id": job_id})  # fmt: skip
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 4), what="4 outcomes", timeout_s=20)
    dead = {text(f, "id"): f for f in await raw_dead(raw, keys)}
    assert "nested more than 64 levels" in text(dead["deep"], "error")
    assert "`messages[0].content[0].text` must be a string, not the number 42" in text(
        dead["number"], "error"
    )
    assert "not null" in text(dead["null"], "error")
    assert "`system[0]` must be a content block" in text(dead["system"], "error")
    assert all(text(f, "attempts") == "0" for f in dead.values())
    assert sim_requests(sim) == 0


async def test_an_unexpected_error_while_a_job_is_prepared_counts_toward_max_attempts(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from worker import jobs

    shape = jobs.shape

    def buggy(job: Any, feature: Any, params: dict[str, Any]) -> list[str]:
        if job.tenant == "poison":  # a bug that only this job meets
            raise RuntimeError("boom in preparation")
        return shape(job, feature, params)

    monkeypatch.setattr(jobs, "shape", buggy)
    cfg, _ = make_config(**{"queue.visibility_timeout_s": 0.5, "queue.max_attempts": 3})
    await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO,
                                           "id": "poison", "tenant": "poison"})  # fmt: skip
    await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO, "id": "ok"})
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 2), what="2 outcomes", timeout_s=30)
        await eventually(lambda: nothing_pending(redis, keys), what="nothing pending")
    [dead] = await raw_dead(raw, keys)
    assert text(dead, "error_type") == "max_attempts" and text(dead, "attempts") == "3"
    assert "RuntimeError: boom in preparation" in text(dead, "error")
    assert (await read_result(redis, keys, "ok")).status == "ok"


async def test_an_unexpected_error_in_the_batcher_leaves_it_batching_the_others(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from worker import jobs

    shape = jobs.shape

    def buggy(job: Any, feature: Any, params: dict[str, Any]) -> list[str]:
        if job.tenant == "poison":
            raise RuntimeError("boom in preparation")
        return shape(job, feature, params)

    monkeypatch.setattr(jobs, "shape", buggy)
    sim_call(sim, "config", {"batch_seconds": 0.2})
    cfg, _ = make_config(**FAST_BATCHES, **{"queue.visibility_timeout_s": 0.5,
                                          "queue.max_attempts": 2})  # fmt: skip
    await add(redis, keys.jobs("low"), {"feature": "summarize", "request": HELLO,
                                        "id": "poison", "tenant": "poison"})  # fmt: skip
    for n in range(5):
        await raw.xadd(keys.jobs("low"), good(n))  # type: ignore[arg-type]
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 6), what="6 outcomes", timeout_s=30)
        await eventually(lambda: nothing_pending(redis, keys), what="nothing pending")
        assert await redis.get(keys.batcher_lease)
    [dead] = await raw_dead(raw, keys)
    assert text(dead, "error_type") == "max_attempts"
    assert "RuntimeError: boom in preparation" in text(dead, "error")
    for n in range(5):
        assert (await read_result(redis, keys, f"ok-{n}")).mode == "batch"


# -- 4. deferred jobs of any size --


async def test_the_deferred_mover_moves_a_job_of_thousands_of_fields_and_the_others(
    redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, ["high", "normal", "low"], "c1", visibility_ms=60_000)
    await queue.ensure_groups()
    wide = {"feature": "summarize", "request": HELLO, **{f"f{n}": "v" for n in range(5000)}}
    ids = []
    for n, fields in enumerate([wide, {"feature": "summarize", "request": HELLO}]):
        ids.append(await add(redis, keys.jobs("normal"), fields))
        d = Delivery("normal", keys.jobs("normal"), ids[-1], fields)
        await redis.xreadgroup(GROUP, "c1", {keys.jobs("normal"): ">"}, count=1)
        await queue.defer(d, f"d-{n}", 1000 + n)
    await redis.zadd(keys.deferred, {"not a job": 999, '{"p": "normal", "f": []}': 999})
    assert await DeferredSet(redis, keys, queue.priorities).move_due(2000) == 2
    back = {fields["id"]: fields for _, fields in await entries(redis, keys.jobs("normal"))}
    assert sorted(back) == ["d-0", "d-1"] and len(back["d-0"]) == 5003
    assert await redis.zcard(keys.deferred) == 0
    dead = [fields for _, fields in await entries(redis, keys.dead)]
    assert len(dead) == 2 and all(f["error_type"] == "malformed_job" for f in dead)


# -- 5. ids are idempotency keys --


async def test_an_id_shaped_like_an_entry_id_cannot_take_another_jobs_place(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config()
    future = "1900000000000-0"  # the entry id the victim's job will get
    attack = json.dumps({"messages": [{"role": "user", "content": "Something else"}]})
    for job_id in (future, f"normal:{future}"):
        await add(redis, keys.jobs("high"), {"feature": "summarize", "request": attack,
                                             "id": job_id})  # fmt: skip
    await redis.xadd(keys.jobs("normal"), {"feature": "summarize", "request": HELLO,
                                           "tenant": "victim"}, id=future)  # fmt: skip
    async with run_worker(cfg, concurrency=1):  # high first: the attacks run before the victim
        await eventually(lambda: outcomes(raw, keys, 3), what="3 outcomes", timeout_s=20)
    dead = await raw_dead(raw, keys)
    assert len(dead) == 2
    for fields in dead:
        assert text(fields, "error_type") == "malformed_job"
        assert "has the form of a stream entry id" in text(fields, "error")
        assert text(fields, "job_id").startswith("high:")
    [ok] = [e for e in await usage_events(redis, keys) if e.status == "ok"]
    assert (ok.job_id, ok.tenant) == (future, "victim")
    assert (await read_result(redis, keys, future)).status == "ok"


async def test_the_same_id_with_another_tenant_is_duplicate_id_and_never_sees_the_answer(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config()
    first = {"feature": "summarize", "request": HELLO, "id": "order-1", "tenant": "acme"}
    async with run_worker(cfg):
        await add(redis, keys.jobs("normal"), first)
        await eventually(lambda: outcomes(raw, keys, 1), what="the first outcome")
        answer = await redis.get(keys.result("order-1"))
        entry = await add(redis, keys.jobs("normal"), {**first, "tenant": "globex",
                                                       "reply_to": "replies:globex"})  # fmt: skip
        await eventually(lambda: outcomes(raw, keys, 2), what="the second outcome")
    assert await redis.get(keys.result("order-1")) == answer  # not overwritten
    [dead] = await raw_dead(raw, keys)
    assert text(dead, "error_type") == "duplicate_id"
    assert text(dead, "job_id") == f"normal:{entry}"
    [(_, reply)] = await entries(redis, "replies:globex")
    got = msgspec.json.decode(reply["result"], type=Result)
    assert got.status == "error" and got.error is not None and got.error.type == "duplicate_id"
    assert got.text == "" and got.id == f"normal:{entry}"
    assert sim_requests(sim) == 1


async def test_two_copies_of_a_job_in_flight_make_one_call_and_both_get_the_answer(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    sim_call(sim, "config", {"latency_ms": 1500})
    cfg, _ = make_config()
    job = {"feature": "summarize", "request": HELLO, "id": "retry-me", "tenant": "acme"}
    await add(redis, keys.jobs("normal"), {**job, "reply_to": "replies:one"})
    await add(redis, keys.jobs("normal"), {**job, "reply_to": "replies:two"})

    async def both_replied() -> bool:
        return int(await redis.exists("replies:one", "replies:two")) == 2

    async with run_worker(cfg, concurrency=4):
        await eventually(both_replied, what="a reply to each", timeout_s=20)
        await eventually(lambda: nothing_pending(redis, keys), what="nothing pending")
    assert sim_requests(sim) == 1
    replies = [await entries(redis, f"replies:{n}") for n in ("one", "two")]
    assert [len(r) for r in replies] == [1, 1] and replies[0][0][1] == replies[1][0][1]
    assert await raw_dead(raw, keys) == []
    assert len(await usage_events(redis, keys)) == 1  # the copy shares the first's outcome


async def test_a_copy_takes_over_when_the_first_entry_disappears(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    from worker.claims import Claims

    cfg, _ = make_config()
    job = {"feature": "summarize", "request": HELLO, "id": "lost-first"}
    stream = keys.jobs("normal")
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    first = await add(redis, stream, job)
    await redis.xreadgroup(GROUP, "ghost", {stream: ">"})
    claims = Claims(redis, keys, {p: keys.jobs(p) for p in ("high", "normal", "low")})
    begun = await claims.begin(Delivery("normal", stream, first, job), 1)
    assert begun.outcome == "go"  # the ghost holds the claim ...
    await redis.xack(stream, GROUP, first)
    await redis.xdel(stream, first)  # ... and its entry is removed (an operator, a trim)
    await add(redis, stream, job)
    async with run_worker(cfg):
        await eventually(lambda: redis.exists(keys.result("lost-first")), what="the result")
    assert (await read_result(redis, keys, "lost-first")).status == "ok"
    assert sim_requests(sim) == 1


async def test_ids_and_other_producer_text_cannot_forge_a_log_line(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    cfg, _ = make_config()
    forged = "x\n2026-01-01 00:00:00 INFO tokenq.worker job=admin status=ok"
    await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO,
                                           "id": forged})  # fmt: skip
    await add(redis, keys.jobs("normal"), {"feature": forged, "request": HELLO})
    with caplog.at_level(logging.INFO, logger="tokenq"):
        async with run_worker(cfg):
            await eventually(lambda: outcomes(raw, keys, 2), what="2 outcomes")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("tokenq")]
    assert any("x\\n2026" in line for line in lines), lines
    assert not any("\n" in line for line in lines), lines
    [bad_id] = [f for f in await raw_dead(raw, keys) if b"id" in f]
    assert "contains '\\n'" in text(bad_id, "error")
    assert text(bad_id, "job_id").startswith("normal:")


# -- 6. a tenant-scoped feature without a tenant --


async def test_jobs_without_a_tenant_do_not_share_a_tenant_scoped_cache(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.response_cache_ttl_s": 600,
                            "features.summarize.dedupe": True})  # fmt: skip
    jobs = [("anon-0", ""), ("anon-1", ""), ("acme-0", "acme"), ("acme-1", "acme")]
    async with run_worker(cfg, concurrency=1):
        for n, (job_id, tenant) in enumerate(jobs, 1):  # in turn: a second may hit the first
            fields = {"feature": "summarize", "request": HELLO, "id": job_id, "tenant": tenant}
            await add(redis, keys.jobs("normal"), fields)
            await eventually(partial(outcomes, redis, keys, n), what=f"{job_id}'s outcome")
    events = {e.job_id: e for e in await usage_events(redis, keys)}
    assert [events[job_id].response_cache for job_id, _ in jobs] == [
        "no_tenant", "no_tenant", "miss", "hit"
    ]  # fmt: skip
    assert sim_requests(sim) == 3


# -- 7. dead letters stay small --


async def test_a_too_large_dead_letter_keeps_a_prefix_length_and_hash_not_the_payload(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config()  # queue.max_entry_bytes = 1 MiB
    big = json.dumps({"messages": [{"role": "user", "content": "y" * 3_000_000}]})
    await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": big, "id": "huge"})
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 1), what="the outcome")
    [dead] = await raw_dead(raw, keys)
    assert sum(len(k) + len(v) for k, v in dead.items()) < 16_000
    assert text(dead, "error_type") == "too_large"
    import hashlib

    cut = json.loads(text(dead, "truncated"))
    assert cut["request"] == {"bytes": len(big), "sha256": hashlib.sha256(big.encode()).hexdigest()}
    assert big.startswith(text(dead, "request"))


# -- 10. error events say why; results carry the usage event's decimal --


async def test_error_events_carry_the_reason_in_message(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config()
    await add(redis, keys.jobs("normal"), {"feature": "nope", "request": HELLO, "id": "bad"})
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, 1), what="the outcome")
    [event] = await usage_events(redis, keys)
    [dead] = await raw_dead(raw, keys)
    assert event.message == text(dead, "error")
    assert "config.toml [features]" in event.message


async def test_results_carry_the_usage_events_decimal_cost_as_a_number(
    redis: aioredis.Redis, raw: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    cfg, _ = make_config()
    asks = [f"Summarise item {n}: " + "words " * n for n in range(1, 21)]
    for n, ask in enumerate(asks):
        request = json.dumps({"messages": [{"role": "user", "content": ask}]})
        await add(redis, keys.jobs("normal"), {"feature": "summarize", "request": request,
                                               "id": f"c-{n}"})  # fmt: skip
    async with run_worker(cfg):
        await eventually(lambda: outcomes(raw, keys, len(asks)), what="the outcomes")
    events = {e.job_id: e for e in await usage_events(redis, keys)}
    usage: Any = await raw.xrange(keys.usage)
    written = {f[b"job_id"].decode(): f[b"cost_usd"].decode() for _, f in usage}
    for n in range(len(asks)):
        raw_result: Any = await redis.get(keys.result(f"c-{n}"))
        cost = json.loads(raw_result, parse_float=Decimal)["cost_usd"]  # the digits as written
        assert cost == Decimal(written[f"c-{n}"]) > 0, raw_result
        assert isinstance(msgspec.json.decode(raw_result, type=Result).cost_usd, float)
        assert events[f"c-{n}"].cost_usd == float(cost)
