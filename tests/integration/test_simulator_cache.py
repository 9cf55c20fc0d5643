"""Prompt caching through the official SDK: usage parsed by the SDK, the ledger, the bill, TTLs
moved with POST /_sim/advance, breakpoint errors, and ITPM counting cache writes only.

The simulator is a process of this module's own, so moving its clock touches no other test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import Message, MessageParam, TextBlockParam, Usage

from tests.helpers import own_simulator, settings_restored, sim_call

HAIKU = "claude-haiku-5-5"
# Haiku 5.5, USD per million (anthropic-api.md §8.2), written out here so the test does not
# check the simulator's table against itself: input, 5m write, 1h write, read, output.
HAIKU_PRICES = (0.10, 0.125, 0.20, 0.01, 0.50)
POLICY = "Refunds are accepted within 30 days of delivery with a receipt. " * 70  # ~1,100 tokens
ASK: list[MessageParam] = [{"role": "user", "content": "Can I return shoes after 20 days?"}]
DEFAULTS: dict[str, Any] = {"latency_ms": 0, "fault_rate": {}, "otpm_mode": "actual",
                            "limits": {"*": [1_000, 2_000_000, 400_000]}}  # fmt: skip


@pytest.fixture(scope="module")
def simulator_url() -> Iterator[str]:
    """The simulator in its own process (seed 1); its base URL."""
    with own_simulator() as url:
        yield url


@pytest.fixture(autouse=True)
def clean(simulator_url: str) -> Iterator[None]:
    with settings_restored(simulator_url, DEFAULTS):
        yield


def system(text: str = POLICY, ttl: str | None = None) -> list[TextBlockParam]:
    cache_control: Any = {"type": "ephemeral"} if ttl is None else {"type": "ephemeral", "ttl": ttl}
    return [{"type": "text", "text": text, "cache_control": cache_control}]


async def ask(
    client: anthropic.AsyncAnthropic, system_: list[TextBlockParam] | None = None, **extra: Any
) -> Usage:
    message: Message = await client.messages.create(
        model=HAIKU, max_tokens=50, system=system_ or system(), messages=ASK, **extra
    )
    return message.usage


def advance(url: str, seconds: float) -> None:
    sim_call(url, "advance", {"seconds": seconds})


def cost(usage: Usage) -> float:
    p_in, p_5m, p_1h, p_read, p_out = HAIKU_PRICES
    creation = usage.cache_creation
    assert creation is not None
    return (
        usage.input_tokens * p_in
        + creation.ephemeral_5m_input_tokens * p_5m
        + creation.ephemeral_1h_input_tokens * p_1h
        + (usage.cache_read_input_tokens or 0) * p_read
        + usage.output_tokens * p_out
    ) / 1e6


async def test_second_call_reads_the_cached_system_prompt(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    total = await client.messages.count_tokens(model=HAIKU, system=system(), messages=ASK)
    first = await ask(client)
    second = await ask(client)
    assert first.cache_read_input_tokens == 0
    assert first.cache_creation_input_tokens is not None and first.cache_creation_input_tokens > 512
    assert first.cache_creation is not None
    assert first.cache_creation.ephemeral_5m_input_tokens == first.cache_creation_input_tokens
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert second.cache_creation_input_tokens == 0
    assert second.input_tokens == first.input_tokens > 0
    for usage in (first, second):
        parts = usage.input_tokens + (usage.cache_creation_input_tokens or 0)
        assert parts + (usage.cache_read_input_tokens or 0) == total.input_tokens
    ledger = sim_call(simulator_url, "ledger")
    haiku = ledger["models"][HAIKU]
    assert haiku["requests"] == 2
    assert haiku["input_tokens"] == first.input_tokens + second.input_tokens
    assert haiku["cache_creation_input_tokens"] == first.cache_creation_input_tokens
    assert haiku["ephemeral_5m_input_tokens"] == first.cache_creation_input_tokens
    assert haiku["ephemeral_1h_input_tokens"] == 0
    assert haiku["cache_read_input_tokens"] == second.cache_read_input_tokens
    assert haiku["cost_usd"] == pytest.approx(cost(first) + cost(second), rel=1e-9)
    assert cost(second) < cost(first)


async def test_a_changed_prefix_misses(client: anthropic.AsyncAnthropic) -> None:
    await ask(client)
    changed = await ask(client, system(POLICY + " Sale items are final."))
    assert changed.cache_read_input_tokens == 0
    assert changed.cache_creation_input_tokens


async def test_a_prompt_below_the_minimum_is_uncached(client: anthropic.AsyncAnthropic) -> None:
    short = system("Be brief.")
    for _ in range(2):
        usage = await ask(client, short)
        assert usage.cache_creation_input_tokens == usage.cache_read_input_tokens == 0
        assert usage.cache_creation is not None
        assert usage.cache_creation.ephemeral_5m_input_tokens == 0


async def test_the_entry_expires_after_five_minutes(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    await ask(client)
    advance(simulator_url, 299)
    assert (await ask(client)).cache_read_input_tokens  # hit: refreshed until 299 + 300
    advance(simulator_url, 299)
    assert (await ask(client)).cache_read_input_tokens  # alive only because of the refresh
    advance(simulator_url, 301)
    expired = await ask(client)
    assert expired.cache_read_input_tokens == 0 and expired.cache_creation_input_tokens


async def test_one_hour_entries_split_from_five_minute_ones(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    turns: list[MessageParam] = [{"role": "user", "content": [
        {"type": "text", "text": "Order history: " + "shoes, " * 500,
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Can I return the shoes?"},
    ]}]  # fmt: skip
    first = (await client.messages.create(
        model=HAIKU, max_tokens=50, system=system(ttl="1h"), messages=turns)).usage  # fmt: skip
    assert first.cache_creation is not None
    one_hour = first.cache_creation.ephemeral_1h_input_tokens
    five_min = first.cache_creation.ephemeral_5m_input_tokens
    assert one_hour > 512 and five_min > 512
    assert first.cache_creation_input_tokens == one_hour + five_min
    advance(simulator_url, 600)  # the 5m entry is gone, the 1h one is not
    later = (await client.messages.create(
        model=HAIKU, max_tokens=50, system=system(ttl="1h"), messages=turns)).usage  # fmt: skip
    assert later.cache_read_input_tokens == one_hour
    assert later.cache_creation is not None
    assert later.cache_creation.ephemeral_5m_input_tokens == five_min
    assert later.cache_creation.ephemeral_1h_input_tokens == 0
    ledger = sim_call(simulator_url, "ledger")["models"][HAIKU]
    assert ledger["ephemeral_1h_input_tokens"] == one_hour
    assert ledger["ephemeral_5m_input_tokens"] == 2 * five_min
    assert ledger["cost_usd"] == pytest.approx(cost(first) + cost(later), rel=1e-9)


async def test_too_many_breakpoints_is_a_bad_request(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    blocks: list[TextBlockParam] = [
        {"type": "text", "text": f"rule {i}", "cache_control": {"type": "ephemeral"}}
        for i in range(5)
    ]
    with pytest.raises(anthropic.BadRequestError) as refused:
        await ask(client, blocks)
    assert refused.value.status_code == 400
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error",
                  "message": "A maximum of 4 blocks with cache_control may be provided. Found 5."},
        "request_id": refused.value.request_id,
    }  # fmt: skip
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["rejected"] == 1 and ledger["models"] == {}


async def test_count_tokens_never_uses_the_cache(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    first = await ask(client)
    counted = await client.messages.count_tokens(model=HAIKU, system=system(), messages=ASK)
    assert counted.input_tokens == first.input_tokens + (first.cache_creation_input_tokens or 0)
    assert (await ask(client)).cache_read_input_tokens  # and it did not disturb the entry
    assert sim_call(simulator_url, "ledger")["models"][HAIKU]["requests"] == 2


async def test_reset_empties_the_cache(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    await ask(client)
    sim_call(simulator_url, "reset", {})
    assert (await ask(client)).cache_read_input_tokens == 0


async def test_itpm_counts_cache_writes_but_not_reads(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    first = await ask(client)
    written = (first.cache_creation_input_tokens or 0) + first.input_tokens
    # Full buckets with room for one write of that size and a few hundred tokens more; the
    # limit refills at a 60th of itself a second, a few tokens in the test's time.
    sim_call(simulator_url, "config", {"limits": {"*": [1_000, written + 200, 400_000]}})
    await ask(client, system(POLICY + " v2"))  # a write: takes `written`
    for _ in range(5):  # reads take only their few input tokens, each far below `written`
        assert (await ask(client)).cache_read_input_tokens
    with pytest.raises(anthropic.RateLimitError, match="input tokens per minute"):
        await ask(client, system(POLICY + " v3"))


async def test_advance_refuses_a_negative_amount(simulator_url: str) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as refused:
        advance(simulator_url, -5)
    assert refused.value.code == 400
    assert "never goes back" in refused.value.read().decode()
