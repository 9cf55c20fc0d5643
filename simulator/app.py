"""The simulator's HTTP routes: the Anthropic Messages API, and admin routes under /_sim/.

It answers as the API does (anthropic-api.md): the same response and error shapes, a
`request-id` on every response, `anthropic-ratelimit-*` headers, `retry-after` on 429, and the
2026-10-21 validation rules (no temperature, top_p or top_k).
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from simulator import tokens
from simulator.ledger import Ledger
from simulator.limits import ModelLimits
from simulator.pricing import PRICES, Billed

MAX_BODY = 32 * 1024 * 1024
FAULT_TYPES = {
    "429": "rate_limit_error",
    "500": "api_error",
    "504": "timeout_error",
    "529": "overloaded_error",
}
STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "request_too_large"}  # fmt: skip
ALLOWED = {
    "model", "max_tokens", "messages", "system", "stop_sequences", "tools", "tool_choice",
    "metadata", "thinking", "cache_control", "container", "diagnostics", "inference_geo",
    "output_config", "service_tier", "speed", "stream",
}  # fmt: skip
DEFAULT_LIMITS = (1_000, 2_000_000, 400_000)  # RPM, ITPM, OTPM (anthropic-api.md §3.2)


@dataclass(slots=True)
class Settings:
    """What the simulator does; POST /_sim/config changes it while it runs."""

    latency_ms: int = 0
    fault_rate: dict[str, float] = field(default_factory=dict)
    seed: int = 0


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type or STATUS_TYPES.get(status, "invalid_request_error")


def check_fault_rates(rates: dict[str, float]) -> dict[str, float]:
    """Validate fault rates; raises ValueError naming the bad part."""
    for status, rate in rates.items():
        if status not in FAULT_TYPES:
            raise ValueError(f"status {status!r} cannot be injected; use {', '.join(FAULT_TYPES)}")
        if not 0 <= rate <= 1:
            raise ValueError(f"rate {rate!r} for {status} is not between 0 and 1")
    if sum(rates.values()) > 1:
        raise ValueError(f"fault rates add up to {sum(rates.values()):g}, more than 1")
    return dict(rates)


class Simulator:
    """State shared by the routes: settings, ledger, rate-limit buckets, the fault dice."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = Ledger()
        self.limits: dict[str, ModelLimits] = {}
        self.rng = random.Random(settings.seed)
        self.in_flight = 0  # requests between arrival and answer (an abandoned one still counts)

    def _headers(self) -> dict[str, str]:
        return {"request-id": "req_" + os.urandom(12).hex()}

    def error(self, exc: ApiError, extra: dict[str, str] | None = None) -> web.Response:
        headers = {**self._headers(), **(extra or {})}
        body = {
            "type": "error",
            "error": {"type": exc.error_type, "message": str(exc)},
            "request_id": headers["request-id"],
        }
        return web.Response(status=exc.status, body=msgspec.json.encode(body), headers=headers,
                            content_type="application/json")  # fmt: skip

    async def _parse(self, request: web.Request, *, needs_max_tokens: bool) -> dict[str, Any]:
        if not (request.headers.get("x-api-key") or request.headers.get("authorization")):
            raise ApiError(401, "x-api-key header is required")
        raw = await request.read()
        if len(raw) > MAX_BODY:
            raise ApiError(413, "Request exceeds the maximum allowed number of bytes.")
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise ApiError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        validate(body, needs_max_tokens=needs_max_tokens)
        return body

    async def messages(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            return await self._messages(request)
        finally:
            self.in_flight -= 1

    async def _messages(self, request: web.Request) -> web.Response:
        try:
            body = await self._parse(request, needs_max_tokens=True)
        except ApiError as exc:
            self.ledger.rejected += 1
            return self.error(exc)
        if self.settings.latency_ms:
            await asyncio.sleep(self.settings.latency_ms / 1000)
        fault = self._roll_fault()
        if fault:
            self.ledger.faults[fault] += 1
            extra = {"retry-after": "1"} if fault == "429" else {}
            return self.error(ApiError(int(fault), f"simulated {fault}", FAULT_TYPES[fault]), extra)
        return self._answer(body)

    def _roll_fault(self) -> str | None:
        roll = self.rng.random()
        for status, rate in sorted(self.settings.fault_rate.items()):
            if roll < rate:
                return status
            roll -= rate
        return None

    def _answer(self, body: dict[str, Any]) -> web.Response:
        model = body["model"]
        text, out_tokens, stop_reason, stop_sequence = tokens.reply(body)
        billed = Billed(input_tokens=tokens.input_tokens(body), output_tokens=out_tokens)
        self.ledger.bill(model, billed)
        limits = self.limits.setdefault(model, ModelLimits(*DEFAULT_LIMITS))
        limits.record(billed.input_tokens, billed.output_tokens)
        message = {
            "id": "msg_" + os.urandom(12).hex(),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}] if text else [],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "stop_details": None,
            "container": None,
            "usage": usage_json(billed),
        }
        headers = {**self._headers(), **limits.headers()}
        return web.Response(body=msgspec.json.encode(message), headers=headers,
                            content_type="application/json")  # fmt: skip

    async def count_tokens(self, request: web.Request) -> web.Response:
        try:
            body = await self._parse(request, needs_max_tokens=False)
        except ApiError as exc:
            self.ledger.rejected += 1
            return self.error(exc)
        return web.json_response(
            {"input_tokens": tokens.input_tokens(body)}, headers=self._headers()
        )

    async def get_ledger(self, _: web.Request) -> web.Response:
        return web.json_response({**self.ledger.as_json(), "in_flight": self.in_flight})

    async def reset(self, _: web.Request) -> web.Response:
        self.ledger = Ledger()
        self.limits.clear()
        return web.json_response({"reset": True})

    async def configure(self, request: web.Request) -> web.Response:
        change = await request.json()
        try:
            if "fault_rate" in change:
                rates = {str(k): float(v) for k, v in change["fault_rate"].items()}
                self.settings.fault_rate = check_fault_rates(rates)
            if "latency_ms" in change:
                self.settings.latency_ms = max(0, int(change["latency_ms"]))
        except (ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(
            {"latency_ms": self.settings.latency_ms, "fault_rate": self.settings.fault_rate}
        )

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True})


def usage_json(billed: Billed) -> dict[str, Any]:
    """The `usage` object of a response, every field the API sends."""
    return {
        "input_tokens": billed.input_tokens,
        "output_tokens": billed.output_tokens,
        "cache_creation_input_tokens": billed.cache_write_5m + billed.cache_write_1h,
        "cache_read_input_tokens": billed.cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": billed.cache_write_5m,
            "ephemeral_1h_input_tokens": billed.cache_write_1h,
        },
        "service_tier": "standard",
        "inference_geo": "global",
        "output_tokens_details": {"thinking_tokens": 0},
        "server_tool_use": None,
        "speed": None,
    }


def validate(body: dict[str, Any], *, needs_max_tokens: bool) -> None:
    """The API's request checks; raises ApiError with the API's kind of message."""
    for name in ("temperature", "top_p", "top_k"):
        if name in body:
            raise ApiError(400, f"{name}: Extra inputs are not permitted")
    allowed = ALLOWED if needs_max_tokens else ALLOWED - {"max_tokens", "stop_sequences"}
    for name in body:
        if name not in allowed:
            raise ApiError(400, f"{name}: Extra inputs are not permitted")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: Field required")
    if body.get("stream"):
        raise ApiError(400, "stream: the simulator answers non-streaming requests only")
    if needs_max_tokens:
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ApiError(400, "max_tokens: Field required (an integer of at least 0)")
    _validate_messages(body.get("messages"))
    if model not in PRICES:
        raise ApiError(404, f"model: {model}")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: at least one message is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
            isinstance(b, dict) and isinstance(b.get("type"), str) for b in content
        ):
            raise ApiError(400, f"messages.{i}.content: Input should be a string or a list of "
                           "content blocks")  # fmt: skip


def make_app(settings: Settings) -> web.Application:
    """The aiohttp application; its Simulator is at app["simulator"]."""
    sim = Simulator(settings)
    app = web.Application(client_max_size=MAX_BODY + 1024 * 1024)
    app["simulator"] = sim
    app.router.add_post("/v1/messages", sim.messages)
    app.router.add_post("/v1/messages/count_tokens", sim.count_tokens)
    app.router.add_get("/_sim/ledger", sim.get_ledger)
    app.router.add_post("/_sim/reset", sim.reset)
    app.router.add_post("/_sim/config", sim.configure)
    app.router.add_get("/_sim/health", sim.health)
    return app
