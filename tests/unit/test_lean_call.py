"""The lean API call: what it sends and what it raises are the SDK's own."""

from __future__ import annotations

import anthropic
import httpx2
import msgspec
import pytest

from worker import calls
from worker.calls import lean_client, post_message, tracing_configured

PARAMS = {
    "model": "claude-haiku-5-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": 'héllo \u2028 "quoted"'}],
    "metadata": {"user_id": "u1"},
}
ANSWER = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-5-5",
    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
    "usage": {"input_tokens": 5, "output_tokens": 1},
}  # fmt: skip


def client_answering(
    status: int, body: object, seen: list[httpx2.Request]
) -> anthropic.AsyncAnthropic:
    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(status, json=body, headers={"request-id": "req_1"})

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    return anthropic.AsyncAnthropic(
        api_key="k-test",
        base_url="http://api.invalid",
        max_retries=1,
        timeout=30.0,
        http_client=http,
    )


async def test_sends_what_messages_create_sends() -> None:
    lean: list[httpx2.Request] = []
    sdk: list[httpx2.Request] = []
    client = lean_client(client_answering(200, ANSWER, lean))
    reference = client_answering(200, ANSWER, sdk)
    response = await post_message(client, PARAMS)
    await reference.messages.create(**PARAMS)  # type: ignore[call-overload]
    assert response.status_code == 200
    assert msgspec.json.decode(response.content)["content"][0]["text"] == "hi"
    [mine], [theirs] = lean, sdk
    assert (mine.method, mine.url) == (theirs.method, theirs.url)
    assert msgspec.json.decode(mine.content) == msgspec.json.decode(theirs.content) == PARAMS
    mine_h, theirs_h = dict(mine.headers), dict(theirs.headers)
    for varies in ("idempotency-key", "content-length"):  # a key per call; the encoding's size
        mine_h.pop(varies, None), theirs_h.pop(varies, None)
    assert mine_h == theirs_h  # auth, API version, content type, the SDK's own headers


async def test_error_status_raises_the_sdks_error_after_its_retries() -> None:
    seen: list[httpx2.Request] = []
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    client = lean_client(client_answering(529, overloaded, seen))
    with pytest.raises(anthropic.APIStatusError) as caught:
        await post_message(client, PARAMS)
    assert caught.value.status_code == 529
    assert len(seen) == 2  # max_retries=1: the SDK's retries policy still applies
    seen.clear()
    invalid = {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}
    with pytest.raises(anthropic.BadRequestError):
        await post_message(lean_client(client_answering(400, invalid, seen)), PARAMS)
    assert len(seen) == 1  # a 400 is not retried
    assert calls._POST_OPTIONS == {"headers": {"Content-Type": "application/json"}}  # shared


def test_no_per_call_span_without_a_tracer_provider() -> None:
    client = client_answering(200, ANSWER, [])
    assert not tracing_configured()
    lean = lean_client(client)
    assert lean._tracer is None  # the SDK makes no span per call
    assert lean._client is client._client  # one HTTP client, closed with the worker's
    assert (lean.api_key, lean.base_url, lean.max_retries) == (
        client.api_key,
        client.base_url,
        client.max_retries,
    )
