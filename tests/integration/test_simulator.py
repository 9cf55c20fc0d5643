"""The official SDK cannot tell the simulator from the API: parsing, headers, errors, ledger,
rate limits.

Every test goes through `anthropic.AsyncAnthropic(base_url=...)` or raw HTTP against a
simulator process of this module's own; the autouse fixture gives each test an empty ledger,
no latency, no faults and the standard rate limits in full buckets.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic.types import MessageParam, Usage

from simulator.__main__ import main
from tests.helpers import eventually, own_simulator, settings_restored, sim_call, sim_is

HI: list[MessageParam] = [{"role": "user", "content": "Say hello to the queue."}]
# The price table of anthropic-api.md §8.2, USD per million (input, output), written out here
# so the test does not check the simulator's table against itself.
PRICE_IN_OUT = {
    "claude-haiku-5-5": (0.10, 0.50),
    "claude-sonnet-5-5": (2.0, 10.0),
    "claude-opus-4-8": (5.0, 25.0),
}
HAIKU_55_LONG_IN_OUT = (0.50, 2.50)  # prompts over 100,000 tokens
RATELIMIT_GROUPS = ("requests", "input-tokens", "output-tokens", "tokens")
STANDARD_LIMITS = [1_000, 2_000_000, 400_000]
DEFAULTS: dict[str, Any] = {
    "latency_ms": 0, "fault_rate": {}, "limits": {"*": STANDARD_LIMITS}, "otpm_mode": "actual",
}  # fmt: skip
NO_RATE_LIMITED = {"requests": 0, "input_tokens": 0, "output_tokens": 0}


@pytest.fixture(scope="module")
def simulator_url() -> Iterator[str]:
    """The simulator in its own process (seed 1); its base URL."""
    with own_simulator() as url:
        yield url


@pytest.fixture(autouse=True)
def clean(simulator_url: str) -> Iterator[None]:
    with settings_restored(simulator_url, DEFAULTS):
        yield


async def post_raw(url: str, headers: dict[str, str], body: Any) -> tuple[int, Any, str]:
    """POST JSON without the SDK: (status, decoded body, request-id header)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as reply,
    ):
        return reply.status, await reply.json(), reply.headers.get("request-id", "")


async def test_sdk_parses_a_message(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model="claude-haiku-5-5", max_tokens=200, messages=HI)
    assert message.id.startswith("msg_") and message.model == "claude-haiku-5-5"
    assert message.type == "message" and message.role == "assistant"
    [block] = message.content
    assert block.type == "text" and len(block.text.split()) >= 10
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    usage = message.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0
    assert usage.cache_creation is not None
    assert usage.cache_creation.ephemeral_5m_input_tokens == 0
    assert usage.cache_creation.ephemeral_1h_input_tokens == 0
    assert usage.service_tier == "standard" and usage.inference_geo == "global"
    assert usage.output_tokens_details is not None
    assert usage.output_tokens_details.thinking_tokens == 0
    assert message._request_id is not None and message._request_id.startswith("req_")
    assert len(message._request_id) == len("req_") + 24


async def test_rate_limit_headers_come_with_a_200(client: anthropic.AsyncAnthropic) -> None:
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet-5-5", max_tokens=50, messages=HI
    )
    headers = raw.headers
    limits = {"requests": 1_000, "input-tokens": 2_000_000, "output-tokens": 400_000,
              "tokens": 2_400_000}  # fmt: skip
    for group in RATELIMIT_GROUPS:
        prefix = f"anthropic-ratelimit-{group}-"
        assert int(headers[prefix + "limit"]) == limits[group]
        remaining = int(headers[prefix + "remaining"])
        assert 0 < remaining <= limits[group]
        if group != "requests":
            assert remaining % 1000 == 0, f"{group} remaining is not rounded to thousands"
        datetime.strptime(headers[prefix + "reset"], "%Y-%m-%dT%H:%M:%SZ")
    assert int(headers["anthropic-ratelimit-requests-remaining"]) < 1_000
    assert headers["request-id"].startswith("req_")
    assert (await raw.parse()).usage.input_tokens > 0


async def test_count_tokens_matches_billed_input_and_is_free(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    tools: Any = [
        {
            "name": "lookup",
            "description": "Find a word.",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
        }
    ]
    messages: Any = [
        {"role": "user", "content": "Look up 'queue'."},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Looking it up."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "queue"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a line of waiting"},
            {"type": "text", "text": "Now define it.", "cache_control": {"type": "ephemeral"}},
        ]},
    ]  # fmt: skip
    args: Any = {"model": "claude-opus-5-5", "messages": messages, "system": "Be brief.",
                 "tools": tools}  # fmt: skip
    counted = await client.messages.count_tokens(**args)
    assert sim_call(simulator_url, "ledger")["models"] == {}
    message = await client.messages.create(max_tokens=50, **args)
    assert counted.input_tokens == message.usage.input_tokens
    bare = await client.messages.count_tokens(model="claude-opus-5-5", messages=HI)
    assert counted.input_tokens > bare.input_tokens + 50  # tools and blocks were counted


@pytest.mark.parametrize("name", ["temperature", "top_p", "top_k"])
async def test_sampling_params_are_rejected_as_in_2026_10_21(
    client: anthropic.AsyncAnthropic, simulator_url: str, name: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(
            model="claude-haiku-5-5", max_tokens=10, messages=HI, extra_body={name: 1}
        )
    assert err.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error",
                  "message": f"{name}: Extra inputs are not permitted"},
        "request_id": err.value.request_id,
    }  # fmt: skip
    assert err.value.request_id is not None and err.value.request_id.startswith("req_")
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["rejected"] == 1 and ledger["models"] == {}


async def test_unknown_model_is_not_found(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError, match="model: claude-nope") as err:
        await client.messages.create(model="claude-nope", max_tokens=10, messages=HI)
    assert err.value.type == "not_found_error"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "claude-haiku-5-5", "messages": HI}, "max_tokens: Field required"),
        ({"model": "claude-haiku-5-5", "max_tokens": 5, "messages": []}, "messages:"),
        ({"model": "claude-haiku-5-5", "max_tokens": 5,
          "messages": [{"role": "system", "content": "x"}]}, "messages.0.role:"),
        ({"max_tokens": 5, "messages": HI}, "model: Field required"),
    ],
)  # fmt: skip
async def test_invalid_bodies_name_the_field(
    client: anthropic.AsyncAnthropic, body: dict[str, Any], says: str
) -> None:
    with pytest.raises(anthropic.BadRequestError, match=says):
        await client.post("/v1/messages", body=body, cast_to=object)


async def test_missing_key_is_401_in_the_api_error_shape(simulator_url: str) -> None:
    url = f"{simulator_url}/v1/messages"
    body = {"model": "claude-haiku-5-5", "max_tokens": 5, "messages": HI}
    status, reply, request_id = await post_raw(url, {"anthropic-version": "2026-10-21"}, body)
    assert status == 401
    assert reply["type"] == "error" and reply["error"]["type"] == "authentication_error"
    assert reply["request_id"] == request_id and request_id.startswith("req_")

    status, reply, _ = await post_raw(url, {"x-api-key": "k"}, body)  # no anthropic-version
    assert status == 400 and "anthropic-version" in reply["error"]["message"]
    version = {"x-api-key": "k", "anthropic-version": "2026-10-21"}
    status, reply, _ = await post_raw(url, version, body)
    assert status == 200 and reply["type"] == "message"


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        ("429", anthropic.RateLimitError),
        ("529", anthropic.OverloadedError),
        ("500", anthropic.InternalServerError),
        ("504", anthropic.GatewayTimeoutError),
    ],
)
async def test_faults_raise_the_sdk_error_classes(
    client: anthropic.AsyncAnthropic, simulator_url: str, status: str, error_class: type[Exception]
) -> None:
    sim_call(simulator_url, "config", {"fault_rate": {status: 1.0}})
    with pytest.raises(anthropic.APIStatusError) as err:
        await client.messages.create(model="claude-haiku-5-5", max_tokens=10, messages=HI)
    assert type(err.value) is error_class and err.value.status_code == int(status)
    assert err.value.request_id is not None and err.value.request_id.startswith("req_")
    retry_after = err.value.response.headers.get("retry-after")
    assert retry_after == ("1" if status == "429" else None)
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["faults"] == {status: 1} and ledger["models"] == {}
    assert ledger["rate_limited"] == NO_RATE_LIMITED  # injected faults are not rate limits


async def test_invalid_requests_are_refused_before_faults(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"fault_rate": {"529": 1.0}})
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="claude-nope", max_tokens=10, messages=HI)
    assert sim_call(simulator_url, "ledger")["faults"] == {}


async def test_replies_are_deterministic(client: anthropic.AsyncAnthropic) -> None:
    first = await client.messages.create(model="claude-haiku-5-5", max_tokens=200, messages=HI)
    again = await client.messages.create(model="claude-haiku-5-5", max_tokens=200, messages=HI)
    assert first.content == again.content
    assert first.usage.model_dump() == again.usage.model_dump()
    assert first.id != again.id and first._request_id != again._request_id
    other = await client.messages.create(
        model="claude-haiku-5-5", max_tokens=200, messages=[{"role": "user", "content": "Bye."}]
    )
    assert other.content != first.content


async def test_a_short_max_tokens_cuts_the_reply(client: anthropic.AsyncAnthropic) -> None:
    full = await client.messages.create(model="claude-haiku-5-5", max_tokens=500, messages=HI)
    short = await client.messages.create(model="claude-haiku-5-5", max_tokens=3, messages=HI)
    assert full.stop_reason == "end_turn" and full.usage.output_tokens > 3
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3
    assert short.content[0].type == "text" and full.content[0].type == "text"
    assert full.content[0].text.startswith(short.content[0].text)


async def test_a_request_for_json_gets_a_json_object(client: anthropic.AsyncAnthropic) -> None:
    for kwargs in (
        {"system": "Reply with JSON only.", "messages": HI},
        {"messages": [{"role": "user", "content": "Answer as JSON: what is a queue?"}]},
    ):
        message = await client.messages.create(model="claude-haiku-5-5", max_tokens=200, **kwargs)
        assert message.content[0].type == "text"
        assert isinstance(json.loads(message.content[0].text), dict)


async def test_ledger_bills_what_the_usage_said(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    usages: list[tuple[str, Usage]] = []
    for model in ("claude-haiku-5-5", "claude-haiku-5-5", "claude-sonnet-5-5", "claude-opus-4-8"):
        prompt: list[MessageParam] = [
            {"role": "user", "content": f"Tell {model} about {len(usages)} queues."}
        ]
        message = await client.messages.create(model=model, max_tokens=100, messages=prompt)
        usages.append((model, message.usage))
    ledger = sim_call(simulator_url, "ledger")
    assert set(ledger["models"]) == set(PRICE_IN_OUT)
    for model, (price_in, price_out) in PRICE_IN_OUT.items():
        mine = [u for m, u in usages if m == model]
        totals = ledger["models"][model]
        assert totals["requests"] == len(mine)
        assert totals["input_tokens"] == sum(u.input_tokens for u in mine)
        assert totals["output_tokens"] == sum(u.output_tokens for u in mine)
        assert totals["cache_creation_input_tokens"] == totals["cache_read_input_tokens"] == 0
        cost = sum(u.input_tokens * price_in + u.output_tokens * price_out for u in mine) / 1e6
        assert totals["cost_usd"] == pytest.approx(cost, rel=1e-9)
    assert ledger["total_cost_usd"] == pytest.approx(
        sum(t["cost_usd"] for t in ledger["models"].values()), rel=1e-9
    )
    assert ledger["faults"] == {} and ledger["rejected"] == 0


async def test_haiku_5_5_prompts_over_100k_tokens_bill_the_higher_band(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    long: list[MessageParam] = [{"role": "user", "content": "word " * 84_000}]  # 420,000 chars
    message = await client.messages.create(model="claude-haiku-5-5", max_tokens=50, messages=long)
    usage = message.usage
    assert usage.input_tokens > 100_000
    price_in, price_out = HAIKU_55_LONG_IN_OUT
    cost = (usage.input_tokens * price_in + usage.output_tokens * price_out) / 1e6
    assert sim_call(simulator_url, "ledger")["total_cost_usd"] == pytest.approx(cost, rel=1e-9)


async def test_a_body_over_32_mb_is_413(client: anthropic.AsyncAnthropic) -> None:
    huge: list[MessageParam] = [{"role": "user", "content": "x" * (32 * 1024 * 1024)}]
    with pytest.raises(anthropic.ContentTooLargeError) as err:
        await client.messages.create(model="claude-haiku-5-5", max_tokens=5, messages=huge)
    assert isinstance(err.value.body, dict)
    assert err.value.body["error"]["type"] == "request_too_large"


async def test_latency_delays_the_answer_without_blocking_others(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"latency_ms": 1_000})
    slow = asyncio.create_task(
        client.messages.create(model="claude-haiku-5-5", max_tokens=5, messages=HI)
    )
    await eventually(lambda: sim_is(simulator_url, in_flight=1), what="the slow request in flight")
    counted = await client.messages.count_tokens(model="claude-haiku-5-5", messages=HI)
    assert counted.input_tokens > 0 and not slow.done()
    assert (await slow).stop_reason is not None
    assert sim_call(simulator_url, "ledger")["in_flight"] == 0


async def test_latency_applies_to_every_answer(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"latency_ms": 300, "fault_rate": {"529": 1.0}})
    started = time.monotonic()
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.create(model="claude-haiku-5-5", max_tokens=5, messages=HI)
    assert time.monotonic() - started >= 0.3


async def test_config_refuses_bad_settings_and_keeps_the_old_ones(simulator_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for change, says in (
            ({"fault_rate": {"418": 0.5}}, "'418' cannot be injected"),
            ({"fault_rate": {"429": 0.7, "529": 0.7}}, "more than 1"),
            ({"latency_ms": -5}, "latency_ms"),
            ({"latncy_ms": 5}, "unknown field `latncy_ms`"),
            ({"limits": {"claude-nope": [1, 2, 3]}}, "'claude-nope' is not a model"),
            ({"limits": {"*": [600, 0, 1]}}, "are not 3 whole numbers of 1 or more"),
            ({"limits": {"*": "600/200000/40000"}}, 'limits is {"*": [RPM, ITPM, OTPM]'),
            ({"otpm_mode": "estimate"}, 'otpm_mode is "actual"'),
        ):
            async with session.post(f"{simulator_url}/_sim/config", json=change) as reply:
                assert reply.status == 400
                assert says in (await reply.json())["error"]
    assert sim_call(simulator_url, "config", {}) == {**DEFAULTS, "seed": 1}


def test_bad_fault_rate_on_the_command_line_names_the_part(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--fault-rate", "429=0.1,503=0.2"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "--fault-rate" in error and "'503' cannot be injected" in error
    assert "429=0.1,529=0.05,500=0.01" in error  # the accepted form, by example


def test_bad_limit_on_the_command_line_names_the_part(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--limit", "600/200000/40000", "--limit", "claude-haiku-5-5=100/50000"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "--limit" in error and "'claude-haiku-5-5=100/50000' is not RPM/ITPM/OTPM" in error
    assert "claude-haiku-5-5=100/50000/10000" in error  # the accepted form, by example


# Rate limits. The buckets refill continuously at capacity/60 a second, so a test that must
# see a refusal uses a small limit and counts what got through instead of assuming a timing.
HAIKU = "claude-haiku-5-5"


def error_message(err: anthropic.APIStatusError) -> str:
    assert isinstance(err.body, dict)
    return str(err.body["error"]["message"])


async def hello(client: anthropic.AsyncAnthropic, max_tokens: int = 5) -> anthropic.types.Message:
    return await client.messages.create(model=HAIKU, max_tokens=max_tokens, messages=HI)


async def burst(
    client: anthropic.AsyncAnthropic, n: int
) -> tuple[int, list[anthropic.RateLimitError]]:
    """`n` requests at once: (how many were answered, the refusals)."""
    results = await asyncio.gather(*(hello(client) for _ in range(n)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, anthropic.RateLimitError)]
    answered = [r for r in results if isinstance(r, anthropic.types.Message)]
    assert len(answered) + len(refused) == n, results
    return len(answered), refused


async def test_exceeding_rpm_raises_rate_limit_error_with_retry_after_and_headers(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"limits": {"*": [6, 1_000_000, 100_000]}})
    answered = 0
    with pytest.raises(anthropic.RateLimitError) as err:
        while answered < 20:  # 6 at once, then one every 10 s
            await hello(client)
            answered += 1
    assert answered >= 6
    assert err.value.status_code == 429 and err.value.type == "rate_limit_error"
    assert error_message(err.value).startswith(
        "This request would exceed your organization's rate limit of 6 requests per minute "
        "for claude-haiku-5-5."
    )
    headers = err.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 10
    assert headers["anthropic-ratelimit-requests-limit"] == "6"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    for group in RATELIMIT_GROUPS:
        datetime.strptime(headers[f"anthropic-ratelimit-{group}-reset"], "%Y-%m-%dT%H:%M:%SZ")
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["rate_limited"] == {**NO_RATE_LIMITED, "requests": 1}
    assert ledger["models"][HAIKU]["requests"] == answered  # the refusal was not billed
    assert ledger["faults"] == {}


async def test_requests_in_flight_already_hold_their_share_of_the_limit(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config",
             {"limits": {"*": [6, 1_000_000, 100_000]}, "latency_ms": 1_000})  # fmt: skip
    answered, refused = await burst(client, 10)
    # Counted when they start: had the 6 been counted at their answers, a second later, the
    # other 4 would have found a full bucket.
    assert answered >= 6 and len(refused) == 10 - answered >= 1
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["rate_limited"] == {**NO_RATE_LIMITED, "requests": len(refused)}
    assert ledger["models"][HAIKU]["requests"] == answered


async def test_waiting_out_retry_after_lets_a_request_through(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"limits": {"*": [60, 1_000_000, 100_000]}})
    _, refused = await burst(client, 90)  # 60 a minute: 60 at once, then one a second
    assert refused, "90 requests at once against 60 a minute: some must be refused"
    retry_after = max(int(e.response.headers["retry-after"]) for e in refused)
    assert retry_after == 1
    # The wait is what retry-after promises, not a guess: nobody else uses these buckets.
    await asyncio.sleep(retry_after)
    assert (await hello(client)).stop_reason is not None


async def test_limits_are_set_per_model_by_config_and_changing_them_refills(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    table = {"*": [600, 200_000, 40_000], HAIKU: [60, 50_000, 10_000]}
    assert sim_call(simulator_url, "config", {"limits": table})["limits"] == table
    assert sim_call(simulator_url, "config")["limits"] == table  # GET shows them too

    async def limit_and_left(model: str) -> tuple[str, str]:
        raw = await client.messages.with_raw_response.create(model=model, max_tokens=5, messages=HI)
        prefix = "anthropic-ratelimit-requests-"
        return raw.headers[prefix + "limit"], raw.headers[prefix + "remaining"]

    assert await limit_and_left(HAIKU) == ("60", "59")
    assert await limit_and_left("claude-sonnet-5-5") == ("600", "599")
    assert await limit_and_left(HAIKU) == ("60", "58")
    only_haiku = {HAIKU: [100, 50_000, 10_000]}  # no "*": the standard table for the rest
    changed = sim_call(simulator_url, "config", {"limits": only_haiku})
    assert changed["limits"] == {"*": STANDARD_LIMITS, **only_haiku}
    assert await limit_and_left(HAIKU) == ("100", "99")  # a new, full bucket
    assert await limit_and_left("claude-sonnet-5-5") == ("1000", "999")


async def test_a_prompt_over_the_itpm_limit_can_never_fit(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"limits": {"*": [60, 100, 100_000]}})
    long: list[MessageParam] = [{"role": "user", "content": "word " * 200}]  # ~250 tokens
    with pytest.raises(anthropic.RateLimitError) as err:
        await client.messages.create(model=HAIKU, max_tokens=5, messages=long)
    assert "rate limit of 100 input tokens per minute" in error_message(err.value)
    assert "more than the limit, so it can never be accepted" in error_message(err.value)
    headers = err.value.response.headers
    assert "retry-after" not in headers  # no wait helps
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "100"
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["rate_limited"] == {**NO_RATE_LIMITED, "input_tokens": 1}
    assert ledger["models"] == {}


async def test_max_tokens_counts_only_in_max_tokens_mode(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"limits": {"*": [600, 1_000_000, 1_000]}})
    assert (await hello(client, max_tokens=5_000)).usage.output_tokens < 1_000  # actual: fine
    sim_call(simulator_url, "config", {"otpm_mode": "max_tokens"})
    with pytest.raises(anthropic.RateLimitError) as err:
        await hello(client, max_tokens=5_000)
    assert "1,000 output tokens per minute" in error_message(err.value)
    assert "Lower max_tokens" in error_message(err.value)
    assert sim_call(simulator_url, "ledger")["rate_limited"]["output_tokens"] == 1


async def test_max_tokens_mode_reserves_max_tokens_until_the_answer_then_refunds(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {
        "limits": {"*": [600, 1_000_000, 1_000]}, "otpm_mode": "max_tokens", "latency_ms": 3_000,
    })  # fmt: skip
    first = asyncio.create_task(hello(client, max_tokens=600))
    await eventually(lambda: sim_is(simulator_url, in_flight=1), what="the first request")
    with pytest.raises(anthropic.RateLimitError, match="1,000 output tokens per minute"):
        await hello(client, max_tokens=600)  # 400 left while the first holds 600
    assert (await first).usage.output_tokens < 100
    sim_call(simulator_url, "config", {"latency_ms": 0})
    await hello(client, max_tokens=600)  # the first gave back the 500+ it did not use
    ledger = sim_call(simulator_url, "ledger")
    assert ledger["rate_limited"] == {**NO_RATE_LIMITED, "output_tokens": 1}
    assert ledger["models"][HAIKU]["requests"] == 2


async def test_count_tokens_is_not_rate_limited(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"limits": {"*": [1, 1_000_000, 100_000]}})
    await hello(client)  # the one request of the minute
    for _ in range(3):
        counted = await client.messages.count_tokens(model=HAIKU, messages=HI)
        assert counted.input_tokens > 0
    with pytest.raises(anthropic.RateLimitError, match="1 requests per minute"):
        await hello(client)
