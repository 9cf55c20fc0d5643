"""The API's request checks, in the API's words: each raises ApiError naming the field.

Order, as the API applies it: auth (401), `anthropic-version` (400), body size (413), JSON
(400), fields (400), then the model (404). Under API version 2026-10-21 (what SDK 2.x sends)
`temperature`, `top_p` and `top_k` are refused like any unknown field (§0); older versions
accept and ignore them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from simulator.errors import ApiError
from simulator.pricing import PRICES
from simulator.tokens import Body

MAX_BODY_BYTES = 32 * 1024 * 1024  # Messages and count_tokens (§2.1)
TOO_LARGE = f"Request exceeds the maximum allowed number of bytes ({MAX_BODY_BYTES})"  # Messages
MAX_MESSAGES = 100_000
SAMPLING_VERSION_CUTOFF = "2026-10-21"  # versions from this date on refuse sampling params
SAMPLING = frozenset({"temperature", "top_p", "top_k"})
COUNT_TOKENS_FIELDS = frozenset({
    "model", "messages", "system", "tools", "tool_choice", "thinking", "cache_control",
    "output_config", "speed",
})  # fmt: skip
MESSAGES_FIELDS = COUNT_TOKENS_FIELDS | {
    "max_tokens", "stop_sequences", "metadata", "container", "diagnostics", "inference_geo",
    "service_tier", "stream",
}  # fmt: skip
_decode = msgspec.json.Decoder().decode


def check_headers(headers: Mapping[str, str]) -> str:
    """The request's API version; raises 401 without a key, 400 without a version."""
    bearer = headers.get("authorization", "")
    if not headers.get("x-api-key") and not (bearer.startswith("Bearer ") and bearer[7:].strip()):
        raise ApiError(
            401,
            "x-api-key header is required: send x-api-key: <key> or Authorization: Bearer "
            "<key> (the simulator accepts any key)",
        )
    version = headers.get("anthropic-version")
    if not version:
        raise ApiError(400, "anthropic-version: header is required (e.g. 2026-10-21)")
    return version


def too_large(max_bytes: int) -> str:
    return f"Request exceeds the maximum allowed number of bytes ({max_bytes})"


def decode_body(raw: bytes, max_bytes: int = MAX_BODY_BYTES) -> Body:
    """The JSON object of a request body; raises 413 over `max_bytes` (32 MB for Messages),
    400 if not an object."""
    if len(raw) > max_bytes:
        raise ApiError(413, too_large(max_bytes))
    try:
        body = _decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    return body


def check_request(body: Body, *, version: str, count_tokens: bool = False) -> None:
    """A Messages (or count_tokens) body as the API checks it; raises ApiError."""
    allowed = COUNT_TOKENS_FIELDS if count_tokens else MESSAGES_FIELDS
    if version < SAMPLING_VERSION_CUTOFF:
        allowed = allowed | SAMPLING
    for name in body:
        if name not in allowed:
            raise ApiError(400, f"{name}: Extra inputs are not permitted")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: Field required (a model id such as claude-haiku-5-5)")
    if not count_tokens:
        _check_max_tokens(body)
    _check_system(body.get("system"))
    _check_messages(body.get("messages"))
    _check_list(body, "tools", dict, "an object")
    _check_list(body, "stop_sequences", str, "a string")
    if model not in PRICES:
        raise ApiError(404, f"model: {model}")


def _check_max_tokens(body: Body) -> None:
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise ApiError(400, "max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ApiError(
            400, "max_tokens: Input should be an integer of at least 1 (0 pre-warms the cache)"
        )
    if body.get("stream"):
        raise ApiError(
            400, "stream: the simulator answers non-streaming requests only; omit stream"
        )
    if max_tokens == 0 and (
        _sub(body, "thinking", "type") == "enabled"
        or _sub(body, "output_config", "format")
        or _sub(body, "tool_choice", "type") in ("any", "tool")
    ):
        # 0 only pre-warms the cache (§1.1), which nothing that must generate output allows.
        raise ApiError(
            400,
            "max_tokens: 0 only pre-warms the cache; it is not allowed with enabled thinking, "
            "output_config.format or a forced tool_choice",
        )


def _sub(body: Body, name: str, key: str) -> Any:
    value = body.get(name)
    return value.get(key) if isinstance(value, dict) else None


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list) or not all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        for b in system
    ):
        raise ApiError(400, "system: Input should be a string or a list of text blocks")


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise ApiError(400, "messages: Field required")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: Input should be a non-empty list of messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"messages: at most {MAX_MESSAGES} messages are allowed")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages.{i}: Input should be an object with role and content")
        for name in message:
            if name not in ("role", "content"):
                raise ApiError(400, f"messages.{i}.{name}: Extra inputs are not permitted")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if not isinstance(content, str):
            _check_blocks(content, role, f"messages.{i}.content")


def _check_blocks(content: Any, role: str, where: str) -> None:
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: Input should be a string or a list of content blocks")
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(kind, str):
            raise ApiError(400, f"{where}.{j}.type: Field required (e.g. text)")
        if kind == "text" and not isinstance(block.get("text"), str):
            raise ApiError(400, f"{where}.{j}.text: Field required")
        # Two more 2026-10-21 rules (§0).
        if kind == "document" and role == "assistant":
            raise ApiError(400, f"{where}.{j}: document blocks are not allowed in assistant turns")
        if kind == "text" and role == "user" and block.get("citations"):
            raise ApiError(400, f"{where}.{j}.citations: not allowed in user turns")


def _check_list(body: Body, name: str, item: type, what: str) -> None:
    value = body.get(name)
    if value is not None and (
        not isinstance(value, list) or not all(isinstance(v, item) for v in value)
    ):
        raise ApiError(400, f"{name}: Input should be a list, each item {what}")
