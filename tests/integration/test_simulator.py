"""The official SDK cannot tell the simulator from the API: parsing, headers, errors, ledger."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest

from simulator.pricing import Billed, cost_usd
from tests.helpers import sim_call

HI: list[Any] = [{"role": "user", "content": "Say hello to the queue."}]


@pytest.fixture
async def client(sim: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=sim, api_key="test", max_retries=0) as c:
        yield c


async def test_sdk_parses_a_message(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model="claude-haiku-5-5", max_tokens=200, messages=HI)
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.usage.cache_read_input_tokens == 0
    assert message._request_id is not None and message._request_id.startswith("req_")


async def test_rate_limit_headers_are_sent(client: anthropic.AsyncAnthropic) -> None:
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet-5-5", max_tokens=50, messages=HI
    )
    headers = raw.headers
    assert headers["anthropic-ratelimit-requests-limit"] == "1000"
    assert int(headers["anthropic-ratelimit-requests-remaining"]) < 1000
    assert headers["anthropic-ratelimit-input-tokens-reset"].endswith("Z")
    assert int(headers["anthropic-ratelimit-tokens-remaining"]) % 1000 == 0


async def test_count_tokens_matches_billed_input(client: anthropic.AsyncAnthropic) -> None:
    counted = await client.messages.count_tokens(model="claude-opus-5-5", messages=HI, system="s")
    message = await client.messages.create(
        model="claude-opus-5-5", max_tokens=50, messages=HI, system="s"
    )
    assert counted.input_tokens == message.usage.input_tokens


async def test_replies_are_deterministic_and_cut_at_max_tokens(
    client: anthropic.AsyncAnthropic,
) -> None:
    first = await client.messages.create(model="claude-haiku-5-5", max_tokens=200, messages=HI)
    again = await client.messages.create(model="claude-haiku-5-5", max_tokens=200, messages=HI)
    assert first.content == again.content and first.usage.output_tokens == again.usage.output_tokens
    short = await client.messages.create(model="claude-haiku-5-5", max_tokens=3, messages=HI)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


async def test_json_is_answered_with_json(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model="claude-haiku-5-5", max_tokens=200, messages=HI, system="Reply with JSON only."
    )
    assert message.content[0].type == "text"
    assert isinstance(json.loads(message.content[0].text), dict)


async def test_temperature_is_rejected_as_the_2026_api_does(
    client: anthropic.AsyncAnthropic,
) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(
            model="claude-haiku-5-5", max_tokens=10, messages=HI, extra_body={"temperature": 0.2}
        )
    assert "temperature: Extra inputs are not permitted" in str(err.value)
    assert err.value.request_id is not None


async def test_unknown_model_is_not_found(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError, match="model: claude-nope"):
        await client.messages.create(model="claude-nope", max_tokens=10, messages=HI)


def test_missing_key_is_401_with_the_error_body(sim: str) -> None:
    request = urllib.request.Request(
        f"{sim}/v1/messages", data=b"{}", method="POST",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    body = json.loads(err.value.read())
    err.value.close()
    assert err.value.code == 401
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert body["request_id"].startswith("req_")


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        ("429", anthropic.RateLimitError),
        ("529", anthropic.OverloadedError),
        ("500", anthropic.InternalServerError),
    ],
)
async def test_faults_raise_the_sdk_error_classes(
    client: anthropic.AsyncAnthropic, sim: str, status: str, error_class: type[Exception]
) -> None:
    sim_call(sim, "config", {"fault_rate": {status: 1.0}})
    with pytest.raises(error_class) as err:
        await client.messages.create(model="claude-haiku-5-5", max_tokens=10, messages=HI)
    assert isinstance(err.value, anthropic.APIStatusError)
    assert err.value.status_code == int(status)
    if status == "429":
        assert err.value.response.headers["retry-after"] == "1"
    ledger = sim_call(sim, "ledger")
    assert ledger["faults"] == {status: 1} and ledger["models"] == {}


async def test_ledger_bills_what_the_usage_says(client: anthropic.AsyncAnthropic, sim: str) -> None:
    usages = []
    for model in ("claude-haiku-5-5", "claude-haiku-5-5", "claude-opus-5-5"):
        message = await client.messages.create(model=model, max_tokens=100, messages=HI)
        usages.append((model, message.usage))
    ledger = sim_call(sim, "ledger")
    haiku = ledger["models"]["claude-haiku-5-5"]
    assert haiku["requests"] == 2
    assert haiku["input_tokens"] == sum(
        u.input_tokens for m, u in usages if m == "claude-haiku-5-5"
    )
    expected = sum(cost_usd(m, Billed(u.input_tokens, u.output_tokens)) for m, u in usages)
    assert ledger["total_cost_usd"] == pytest.approx(expected)
