"""Spend control end to end (real Valkey, the simulator, the SDK): budgets that concurrent
workers cannot overspend, breaker and budget policies, the router and its escalations."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from producers import NewJob, Producer
from tests.conftest import ConfigFactory
from tests.helpers import eventually, run, sim_call, usage_events
from tests.integration.conftest import RunWorker
from worker.contract import Keys, Result, UsageEvent
from worker.deadletters import dead_letters
from worker.usage import money

SMALL = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 100}


def ledger_cost(sim: str) -> float:
    return float(sim_call(sim, "ledger")["total_cost_usd"])


def job_events(events: list[UsageEvent]) -> list[UsageEvent]:
    return [e for e in events if e.kind == "job"]


async def results(producer: Producer, ids: list[str], timeout_s: float = 30) -> list[Result]:
    return [await producer.result(i, timeout_s=timeout_s) for i in ids]


async def test_concurrent_jobs_never_bill_more_than_the_cap(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cap = 0.003  # about a hundred of these calls
    cfg, _ = make_config(**{"features.summarize.daily_usd": cap})
    producer = Producer(redis, keys.prefix)
    ids = await producer.submit_many(
        [NewJob(feature="summarize", request=SMALL) for _ in range(300)]
    )
    async with run_worker(cfg, concurrency=64), run_worker(cfg, concurrency=64):
        done = await results(producer, ids)
    ok = [r for r in done if r.status == "ok"]
    refused = [r for r in done if r.status == "error"]
    assert 50 < len(ok) < 300 and len(ok) + len(refused) == 300
    assert all(r.error is not None and r.error.type == "budget_exceeded" for r in refused)
    assert refused[0].error is not None and "features.summarize.daily_usd = 0.003" in (
        refused[0].error.message
    )
    billed = ledger_cost(sim)
    assert billed <= cap, f"the simulator billed {billed} against a cap of {cap}"
    events = job_events(await usage_events(redis, keys))
    assert abs(sum(e.cost_usd for e in events) - billed) < 1e-9
    assert len(await dead_letters(redis, keys, count=1000)) == len(refused)


async def test_an_alert_goes_onto_the_usage_stream_once_at_the_alert_fraction(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.daily_usd": 0.001, "budgets.alert_at": 0.02})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg, concurrency=1):
        await results(producer, [await producer.submit("summarize", SMALL) for _ in range(4)])
    alerts = [e for e in await usage_events(redis, keys) if e.kind == "alert"]
    assert len(alerts) == 1
    assert alerts[0].error_type == "budget_alert" and alerts[0].feature == "summarize"
    assert "features.summarize.daily_usd reached 2% of 0.001 USD" in alerts[0].message


async def test_tenant_request_caps_count_per_tenant(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"budgets.tenant_daily_requests": 3})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg, concurrency=1):
        acme = [await producer.submit("summarize", SMALL, tenant="acme") for _ in range(5)]
        other = await producer.submit("summarize", SMALL, tenant="globex")
        done = await results(producer, [*acme, other])
    assert [r.status for r in done] == ["ok", "ok", "ok", "error", "error", "ok"]
    error = done[3].error
    assert error is not None and error.type == "budget_exceeded"
    assert "budgets.tenant_daily_requests (tenant acme) = 3 reached" in error.message


async def test_budget_downgrade_moves_to_a_cheaper_tier(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # One sonnet call may cost up to 100 x $10/M = $0.001: over the cap; on haiku it fits.
    cfg, _ = make_config(**{"features.summarize_doc.daily_usd": 0.0003,
                            "features.summarize_doc.tier": "sonnet",
                            "features.summarize_doc.budget_policy": "downgrade"})  # fmt: skip
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        result = await producer.result(await producer.submit("summarize_doc", SMALL), timeout_s=10)
    assert result.status == "ok" and result.tier == "haiku"
    [event] = job_events(await usage_events(redis, keys))
    assert event.route_reason == (
        "features.summarize_doc.tier; downgraded to haiku: features.summarize_doc.daily_usd"
    )
    assert set(sim_call(sim, "ledger")["models"]) == {"claude-haiku-5-5"}


async def test_budget_defer_puts_the_job_off_until_the_cap_resets(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, path = make_config(**{"features.summarize.daily_usd": 0.00001,
                               "features.summarize.budget_policy": "defer"})  # fmt: skip
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg) as worker:
        job_id = await producer.submit("summarize", SMALL)

        async def deferred() -> bool:
            return int(await redis.zcard(keys.deferred)) == 1

        await eventually(deferred, what="the job in the deferred set")
        reply: Any = await redis.zrange(keys.deferred, 0, -1, withscores=True)
        [(member, until)] = reply
        assert json.loads(member)["f"]["id"] == job_id
        midnight = (int(time.time()) // 86_400 + 1) * 86_400 * 1000  # next 00:00 UTC
        assert int(until) == midnight
        assert sim_call(sim, "ledger")["models"] == {}
        # The operator raises the cap; when the job is due again, it runs.
        path.write_text(path.read_text().replace("daily_usd = 1e-05", "daily_usd = 1.0"))
        worker.config_file = str(path)
        assert worker.reload()
        await redis.zadd(keys.deferred, {member: 0})
        result = await producer.result(job_id, timeout_s=10)
    assert result.status == "ok"


async def test_a_529_storm_opens_the_breaker_traffic_stops_then_recovers_through_half_open(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{
        "breakers.fail_max": 3, "breakers.reset_timeout_s": 1.0, "breakers.half_open_probes": 1,
        "breakers.success_threshold": 1, "queue.max_attempts": 50,
    })  # fmt: skip
    sim_call(sim, "config", {"fault_rate": {"529": 1.0}})
    producer = Producer(redis, keys.prefix)
    concurrency = 4
    async with run_worker(cfg, concurrency=concurrency):
        ids = await producer.submit_many(
            [NewJob(feature="summarize", request=SMALL) for _ in range(20)]
        )
        started = time.monotonic()

        async def all_deferred() -> bool:
            return int(await redis.zcard(keys.deferred)) == 20

        await eventually(all_deferred, what="all 20 jobs deferred by the open breaker")
        storm_s = time.monotonic() - started
        faults = int(sim_call(sim, "ledger")["faults"]["529"])
        # Without a breaker 20 jobs x 50 attempts would hammer the API; with it, the calls
        # are the run that opened it, those already in flight, and one probe per reset.
        assert faults <= 3 + concurrency + int(storm_s / 1.0) + 1, (faults, storm_s)
        state = await redis.hget(f"{keys.prefix}:breaker:feature:summarize", "state")
        assert state in ("open", "half-open")
        sim_call(sim, "config", {"fault_rate": {}})
        done = await results(producer, ids)
    assert all(r.status == "ok" for r in done)
    assert await redis.hget(f"{keys.prefix}:breaker:feature:summarize", "state") == "closed"
    ledger = sim_call(sim, "ledger")
    assert int(ledger["models"]["claude-haiku-5-5"]["requests"]) == 20
    # Every call counts once over a job's life, deferrals or not: its failed calls and the
    # one that was answered (attempts no longer start over when the breaker defers a job).
    attempts = [e.attempt for e in job_events(await usage_events(redis, keys))]
    assert sum(attempts) == 20 + int(ledger["faults"]["529"]), attempts


async def open_breaker(redis: aioredis.Redis, keys: Keys, name: str) -> None:
    await redis.hset(f"{keys.prefix}:breaker:{name}", mapping={
        "state": "open", "fails": 5, "successes": 0, "opened_at": int(time.time() * 1000),
    })  # fmt: skip


async def test_breaker_policy_fail_dead_letters_circuit_open(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.breaker_policy": "fail",
                            "breakers.reset_timeout_s": 30.0})  # fmt: skip
    await open_breaker(redis, keys, "feature:summarize")
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        result = await producer.result(await producer.submit("summarize", SMALL), timeout_s=10)
    assert result.error is not None and result.error.type == "circuit_open"
    assert "circuit breaker feature:summarize is open" in result.error.message
    [(_, dead)] = await dead_letters(redis, keys)
    assert dead["error_type"] == "circuit_open"
    assert sim_call(sim, "ledger")["models"] == {}


async def test_breaker_policy_downgrade_avoids_the_failing_model(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize_doc.breaker_policy": "downgrade",
                            "features.summarize_doc.tier": "sonnet",
                            "breakers.reset_timeout_s": 30.0})  # fmt: skip
    await open_breaker(redis, keys, "model:claude-sonnet-5-5")
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        job_id = await producer.submit("summarize_doc", SMALL)
        result = await producer.result(job_id, timeout_s=10)
    assert result.status == "ok" and result.tier == "haiku"
    [event] = job_events(await usage_events(redis, keys))
    assert "downgraded to haiku: breaker model:claude-sonnet-5-5 open" in event.route_reason


async def test_rules_route_a_feature_without_a_fixed_tier(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    rules: list[dict[str, Any]] = [
        {"name": "hard", "keywords": ["refactor"], "tier": "opus"},
        {"min_input_tokens": 500, "tier": "sonnet"},
    ]
    cfg, _ = make_config(**{"features.free.max_tokens": 200, "router.rules": rules,
                            "router.default_tier": "haiku"})  # fmt: skip
    producer = Producer(redis, keys.prefix)
    texts = ["Please refactor this", "word " * 600, "hi"]
    async with run_worker(cfg):
        ids = [
            await producer.submit("free", {"messages": [{"role": "user", "content": t}]})
            for t in texts
        ]
        done = await results(producer, ids)
    reasons = {e.job_id: e.route_reason for e in await usage_events(redis, keys)}
    assert [r.tier for r in done] == ["opus", "sonnet", "haiku"]
    assert [reasons[i] for i in ids] == [
        "rule 0 (hard)", "rule 1 (input >= 500)", "router.default_tier",
    ]  # fmt: skip


async def test_an_answer_failing_the_check_escalates_and_every_call_is_paid_for(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.expect": "json"})
    producer = Producer(redis, keys.prefix)
    plain = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 200}
    asks_json = {"messages": [{"role": "user", "content": "Say hello in JSON"}]}
    async with run_worker(cfg):
        escalated = await producer.result(await producer.submit("summarize", plain), 10)
        passed = await producer.result(await producer.submit("summarize", asks_json), 10)
    # The sonnet answer is no JSON either: delivered, but as an error (check_failed).
    assert escalated.status == "error" and escalated.tier == "sonnet" and escalated.text
    assert escalated.error is not None and escalated.error.type == "check_failed"
    assert passed.status == "ok" and passed.tier == "haiku" and json.loads(passed.text)
    events = {e.job_id: e for e in await usage_events(redis, keys)}
    first = events[escalated.id]
    assert first.route_reason == (
        "features.summarize.tier; escalated to sonnet: answer is not JSON; "
        "check failed: answer is not JSON"
    )
    assert events[passed.id].route_reason == "features.summarize.tier"
    ledger = sim_call(sim, "ledger")["models"]
    assert ledger["claude-haiku-5-5"]["requests"] == 2
    assert ledger["claude-sonnet-5-5"]["requests"] == 1
    billed = ledger["claude-sonnet-5-5"]["cost_usd"] + ledger["claude-haiku-5-5"]["cost_usd"]
    assert abs(first.cost_usd - (billed - events[passed.id].cost_usd)) < 1e-12


async def test_the_classifier_call_is_made_and_paid_for_and_falls_back_to_the_default(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.free.max_tokens": 200, "router.classifier.enabled": True,
                            "router.default_tier": "sonnet"})  # fmt: skip
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        result = await producer.result(await producer.submit("free", SMALL), timeout_s=10)
    assert result.status == "ok" and result.tier == "sonnet"
    [event] = await usage_events(redis, keys)
    # The simulator's classifier answer names no tier, so the default applies.
    assert event.route_reason == "router.default_tier (classifier named no tier)"
    assert abs(event.cost_usd - ledger_cost(sim)) < 1e-12
    assert sim_call(sim, "ledger")["models"]["claude-haiku-5-5"]["requests"] == 1


async def test_max_tokens_is_clamped_and_long_inputs_are_rejected_or_truncated(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{
        "features.summarize.max_input_tokens": 100,
        "features.summarize_doc.max_input_tokens": 100,
        "features.summarize_doc.input_overflow": "truncate",
    })  # fmt: skip
    producer = Producer(redis, keys.prefix)
    long_turns = [
        {"role": "user", "content": "old " * 200},
        {"role": "assistant", "content": "noted"},
        {"role": "user", "content": "What now?"},
    ]
    async with run_worker(cfg):
        clamped = await producer.submit(
            "summarize", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}
        )
        rejected = await producer.submit("summarize", {"messages": long_turns})
        truncated = await producer.submit("summarize_doc", {"messages": long_turns})
        done = await results(producer, [clamped, rejected, truncated])
    assert [r.status for r in done] == ["ok", "error", "ok"]
    assert done[1].error is not None and done[1].error.type == "too_large"
    assert "over features.summarize.max_input_tokens = 100" in done[1].error.message
    reasons = {e.job_id: e.route_reason for e in await usage_events(redis, keys)}
    assert reasons[clamped] == "features.summarize.tier; max_tokens 9000 clamped to 4096"
    assert reasons[truncated] == (
        "features.summarize_doc.tier; kept the newest 1 messages (2 dropped)"
    )
    events = {e.job_id: e for e in await usage_events(redis, keys)}
    assert events[truncated].input_tokens < 30


async def test_tokenq_budgets_shows_spend_reservations_caps_and_breakers(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, path = make_config(**{"features.summarize.daily_usd": 0.5,
                               "features.summarize.tenant_daily_requests": 10})  # fmt: skip
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        ids = [await producer.submit("summarize", SMALL, tenant="acme") for _ in range(3)]
        await results(producer, ids)
    await open_breaker(redis, keys, "model:claude-opus-5-5")
    spent = sum(e.cost_usd for e in job_events(await usage_events(redis, keys)))
    code, out, err = await run(sys.executable, "-m", "worker", "--config", str(path), "budgets")
    assert code == 0, err
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert f"features.summarize.daily_usd [{day}]: spent {money(spent)}, reserved $0.00" in out
    assert "cap $0.50" in out
    assert "features.summarize.tenant_daily_requests (tenant acme)" in out
    assert "requests 3 of 10" in out
    assert "breaker model:claude-opus-5-5: open" in out
    code, out, _ = await run(sys.executable, "-m", "worker", "--config", str(path), "budgets",
                             "--json")  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines()]
    [daily] = [r for r in rows if r.get("cap") == "features.summarize.daily_usd"]
    assert abs(daily["spent_usd"] - spent) < 1e-9 and daily["reserved_usd"] == 0


async def test_an_answer_cut_at_max_tokens_escalates_with_more_room_up_to_the_cap(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cfg, _ = make_config(**{"features.summarize.max_tokens_cap": 1024})
    producer = Producer(redis, keys.prefix)
    cut = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 3}
    async with run_worker(cfg):
        result = await producer.result(await producer.submit("summarize", cut), 10)
    assert result.tier == "sonnet" and result.usage is not None
    assert result.usage["output_tokens"] <= 6
    [event] = await usage_events(redis, keys)
    assert event.route_reason.startswith(
        "features.summarize.tier; escalated to sonnet: stop_reason max_tokens (max_tokens 3 -> 6)"
    )


def adversarial(n: int) -> dict[str, Any]:
    """Requests whose text is spread over many tiny pieces: each piece is billed at least a
    token, so summing characters first would under-estimate them up to four times."""
    tiny = [{"type": "text", "text": "a"} for _ in range(2000 + n % 7)]
    turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": "x"} for k in range(401)]
    system = [{"type": "text", "text": "s" * (1 + k % 3)} for k in range(600)]
    shapes: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": tiny}]},
        {"messages": turns},
        {"system": system, "messages": [{"role": "user", "content": "hi"}]},
    ]
    return {**shapes[n % 3], "max_tokens": 100}  # room for every answer: none is escalated


async def test_requests_of_adversarial_shapes_never_bill_more_than_the_cap(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    cap = 0.003
    cfg, _ = make_config(**{"features.summarize.daily_usd": cap})
    producer = Producer(redis, keys.prefix)
    ids = await producer.submit_many(
        [NewJob(feature="summarize", request=adversarial(n)) for n in range(300)]
    )
    async with run_worker(cfg, concurrency=150), run_worker(cfg, concurrency=150):
        done = await results(producer, ids, timeout_s=60)
    assert {r.status for r in done} == {"ok", "error"}
    billed = ledger_cost(sim)
    assert billed <= cap, f"the simulator billed {billed} against a cap of {cap}"
    events = job_events(await usage_events(redis, keys))
    assert abs(sum(e.cost_usd for e in events) - billed) < 1e-9


PIXEL = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


async def test_a_request_the_estimate_cannot_bound_is_counted_by_the_api_under_a_cap(
    redis: aioredis.Redis, keys: Keys, sim: str, make_config: ConfigFactory, run_worker: RunWorker
) -> None:
    # An image is billed by its pixels, not by its JSON: the worker asks count_tokens before it
    # reserves against a cap. A text request, or one under no cap, is not counted.
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PIXEL},
    }
    question = {"type": "text", "text": "What is it?"}
    with_image = {"messages": [{"role": "user", "content": [image, question]}]}
    cfg, _ = make_config(**{"features.summarize.daily_usd": 1.0})
    producer = Producer(redis, keys.prefix)
    async with run_worker(cfg):
        capped = await producer.submit("summarize", with_image)
        plain = await producer.submit("summarize", SMALL)
        free = await producer.submit("summarize_doc", with_image)  # no cap
        done = await results(producer, [capped, plain, free])
    assert [r.status for r in done] == ["ok", "ok", "ok"]
    assert sim_call(sim, "ledger")["counted"] == 1
