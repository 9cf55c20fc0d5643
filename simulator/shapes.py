"""The JSON the simulator answers with, field for field as the API sends it (§1.2, §2.2).

Structs, not dicts: msgspec encodes them several times faster, and a missing field is a
type error here instead of an SDK surprise later. Field order is the API's order.
"""

from __future__ import annotations

import base64
import random
from typing import Literal

import msgspec

from simulator.errors import ErrorType
from simulator.pricing import Usage

# Ids need to be unique, not secret: a fast PRNG beats os.urandom's syscall per request.
_ids = random.Random()
_BASE62ISH = bytes.maketrans(b"+/", b"xZ")


def new_id(prefix: str) -> str:
    """`prefix` and 24 base62 characters, like `req_018EeWyXxfu5pfWkrYcMdjWG`."""
    raw = _ids.getrandbits(144).to_bytes(18, "big")
    return prefix + base64.b64encode(raw).translate(_BASE62ISH).decode()


ServiceTier = Literal["standard", "priority", "batch"]


class TextBlock(msgspec.Struct):
    type: Literal["text"]
    text: str


class CacheCreation(msgspec.Struct):
    ephemeral_5m_input_tokens: int
    ephemeral_1h_input_tokens: int


class OutputTokensDetails(msgspec.Struct):
    thinking_tokens: int


class ApiUsage(msgspec.Struct, kw_only=True):
    """The `usage` object; every optional field present, as the API sends it."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cache_creation: CacheCreation
    service_tier: ServiceTier = "standard"
    inference_geo: str = "global"
    output_tokens_details: OutputTokensDetails = msgspec.field(
        default_factory=lambda: OutputTokensDetails(thinking_tokens=0)
    )
    server_tool_use: None = None
    speed: None = None


def api_usage(usage: Usage, service_tier: ServiceTier = "standard") -> ApiUsage:
    return ApiUsage(
        service_tier=service_tier,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        cache_creation=CacheCreation(
            ephemeral_5m_input_tokens=usage.ephemeral_5m_input_tokens,
            ephemeral_1h_input_tokens=usage.ephemeral_1h_input_tokens,
        ),
    )


class Message(msgspec.Struct, kw_only=True):
    """A non-streaming `Message` response."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock]
    stop_reason: str
    stop_sequence: str | None
    stop_details: None = None
    container: None = None
    diagnostics: None = None
    usage: ApiUsage


class TokenCount(msgspec.Struct):
    input_tokens: int


class ErrorCode(msgspec.Struct):
    error_code: str


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    """`error`; `details` only for errors with a code (§2.2), absent otherwise."""

    type: ErrorType
    message: str
    details: ErrorCode | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    type: Literal["error"] = "error"
    error: ErrorDetail
    request_id: str


encode = msgspec.json.Encoder().encode
