"""Faults a chaos run needs, as the official SDK meets them: the organization's spend cap
(seeded, and held on by a switch), 429 without `retry-after`, 529 on batch create, slow
answers.

The simulator is a process of this module's own (seed 1); each test starts from its
defaults with an empty ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import MessageParam
from anthropic.types.messages.batch_create_params import Request

from simulator.__main__ import main
from tests.helpers import eventually, own_simulator, settings_restored, sim_call

HAIKU = "claude-haiku-5-5"
HI: list[MessageParam] = [{"role": "user", "content": "Say hello to the queue."}]
DEFAULTS: dict[str, Any] = {
    "latency_ms": 0, "fault_rate": {}, "spend_cap_reached": False, "slow_rate": 0.0,
    "slow_ms": 5000,
}  # fmt: skip
ONE_BATCH: list[Request] = [
    {"custom_id": "job-1", "params": {"model": HAIKU, "max_tokens": 20, "messages": HI}}
]


@pytest.fixture(scope="module")
def simulator_url() -> Iterator[str]:
    with own_simulator() as url:
        yield url


@pytest.fixture(autouse=True)
def clean(simulator_url: str) -> Iterator[None]:
    with settings_restored(simulator_url, DEFAULTS):
        yield


async def hello(client: anthropic.AsyncAnthropic) -> anthropic.types.Message:
    return await client.messages.create(model=HAIKU, max_tokens=200, messages=HI)


async def test_the_spend_cap_fault_is_an_enforced_spend_limit_error_without_retry_after(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"fault_rate": {"spend-cap": 1.0}})
    with pytest.raises(anthropic.EnforcedSpendLimitReachedError) as err:
        await hello(client)
    assert isinstance(err.value, anthropic.RateLimitError) and err.value.status_code == 429
    assert err.value.error_code == "enforced_spend_limit_reached"
    assert err.value.type == "rate_limit_error"
    assert "retry-after" not in err.value.response.headers
    assert isinstance(err.value.body, dict)
    assert err.value.body["error"]["details"] == {"error_code": "enforced_spend_limit_reached"}
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["faults"] == {"spend-cap": 1} and ledger["models"] == {}


async def test_a_bare_429_has_no_retry_after_and_is_a_plain_rate_limit_error(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"fault_rate": {"429-bare": 1.0}})
    with pytest.raises(anthropic.RateLimitError) as err:
        await hello(client)
    assert type(err.value) is anthropic.RateLimitError and err.value.error_code is None
    assert "retry-after" not in err.value.response.headers
    assert sim_call(simulator_url, "ledger")["faults"] == {"429-bare": 1}


async def test_the_spend_cap_switch_refuses_messages_and_batch_creates_until_it_is_off(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    shown = sim_call(simulator_url, "config", {"spend_cap_reached": True})
    assert shown["spend_cap_reached"] is True
    for _ in range(3):
        with pytest.raises(anthropic.EnforcedSpendLimitReachedError):
            await hello(client)
    with pytest.raises(anthropic.EnforcedSpendLimitReachedError) as err:
        await client.messages.batches.create(requests=ONE_BATCH)
    assert "retry-after" not in err.value.response.headers
    assert [b async for b in client.messages.batches.list()] == []  # nothing was created
    counted = await client.messages.count_tokens(model=HAIKU, messages=HI)  # free: not capped
    assert counted.input_tokens > 0
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["faults"] == {"spend-cap": 4} and ledger["models"] == {}

    assert "spend_cap_reached" not in sim_call(simulator_url, "config", DEFAULTS)
    assert (await hello(client)).stop_reason == "end_turn"
    assert (await client.messages.batches.create(requests=ONE_BATCH)).id.startswith("msgbatch_")


async def test_a_529_on_batch_create_creates_no_batch(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"fault_rate": {"batch-529": 1.0}})
    with pytest.raises(anthropic.OverloadedError) as err:
        await client.messages.batches.create(requests=ONE_BATCH)
    assert err.value.status_code == 529 and err.value.type == "overloaded_error"
    assert [b async for b in client.messages.batches.list()] == []
    assert (await hello(client)).stop_reason == "end_turn"  # messages are not affected
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["faults"] == {"batch-529": 1} and ledger["models"][HAIKU]["requests"] == 1


async def test_a_seeded_share_of_batch_creates_gets_529_and_only_the_rest_exist(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"fault_rate": {"batch-529": 0.5}})
    made, refused = [], 0
    for _ in range(40):
        try:
            made.append((await client.messages.batches.create(requests=ONE_BATCH)).id)
        except anthropic.OverloadedError:
            refused += 1
    assert 8 <= refused <= 32 and len(made) == 40 - refused
    listed = [b.id async for b in client.messages.batches.list(limit=100)]
    assert sorted(listed) == sorted(made)
    assert sim_call(simulator_url, "ledger")["faults"] == {"batch-529": refused}


async def test_slow_answers_are_slow_and_hold_no_one_else_up(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"slow_rate": 1.0, "slow_ms": 1500})
    started = time.monotonic()
    slow = asyncio.create_task(hello(client))
    await eventually(lambda: in_flight(simulator_url, 1), what="the slow request in flight")
    assert (await client.messages.count_tokens(model=HAIKU, messages=HI)).input_tokens > 0
    assert not slow.done()
    assert (await slow).stop_reason == "end_turn"
    assert time.monotonic() - started >= 1.5


async def test_a_seeded_share_of_answers_is_slow(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"slow_rate": 0.5, "slow_ms": 4000})
    calls = [asyncio.create_task(hello(client)) for _ in range(30)]
    out: list[int] = []

    async def only_the_slow_are_out() -> bool:
        ledger = sim_call(simulator_url, "ledger")
        billed = int(sum(m["requests"] for m in ledger["models"].values()))
        out[:] = [int(ledger["in_flight"])]
        done = sum(c.done() for c in calls)
        return billed > 0 and billed + out[0] == 30 and done == billed

    try:
        # The fast answers are in while the slow ones are still being worked on.
        await eventually(only_the_slow_are_out, what="the fast answers, with the slow still out")
        assert 5 <= out[0] <= 25
        await asyncio.gather(*calls)
    finally:
        for call in calls:
            call.cancel()


async def in_flight(url: str, n: int) -> bool:
    return bool(sim_call(url, "ledger")["in_flight"] == n)


def test_fault_and_slow_flags_are_checked_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, says in (
        (["--fault-rate", "spend-cap=0.6,429-bare=0.6"], "more than 1"),
        (["--fault-rate", "batch-503=0.1"], "'batch-503' cannot be injected"),
        (["--slow-rate", "1.5"], "not a rate between 0 and 1"),
        (["--slow-ms", "-1"], "not a whole number of 0 or more"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert says in capsys.readouterr().err


def test_flags_set_the_faults_at_start() -> None:
    args = ("--fault-rate", "batch-529=1", "--spend-cap-reached", "--slow-rate", "0.25")
    with own_simulator(*args) as url:
        shown = sim_call(url, "config")
    assert shown["fault_rate"] == {"batch-529": 1.0}
    assert shown["spend_cap_reached"] is True and shown["slow_rate"] == 0.25
