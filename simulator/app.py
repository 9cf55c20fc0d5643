"""The simulator's routes: the Anthropic Messages API, and admin routes under /_sim/.

API routes answer as the API does (anthropic-api.md): the same response and error shapes, a
`request-id` on every response, `anthropic-ratelimit-*` headers on 200s and `retry-after` on
429s. Only POST /v1/messages gets latency and faults (count_tokens is a fast, free endpoint);
a fault is rolled after validation, so invalid requests are always refused with a 4xx.

Admin routes (not part of the Anthropic API):
    GET  /_sim/ledger  -> LedgerReport
    POST /_sim/reset   -> the LedgerReport before the reset (read and clear in one call)
    GET  /_sim/config, POST /_sim/config {"latency_ms"?, "fault_rate"?, "seed"?} -> Settings
    GET  /_sim/health  -> {"ok": true}
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
from aiohttp import web

from simulator import shapes, tokens, validate
from simulator.errors import ApiError
from simulator.faults import FaultDice, check_fault_rates
from simulator.ledger import Ledger
from simulator.limits import ModelLimits
from simulator.pricing import Usage
from simulator.tokens import Body


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """What the simulator does; POST /_sim/config swaps in a changed copy while it runs."""

    latency_ms: int = 0
    fault_rate: dict[str, float] = {}  # status ("429") -> share of requests; never mutated
    seed: int = 0


class ConfigChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST /_sim/config: the settings to change; `fault_rate` replaces the whole table and
    `seed` restarts the fault dice."""

    latency_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    fault_rate: dict[str, float] | None = None
    seed: int | None = None


_decode_change = msgspec.json.Decoder(ConfigChange).decode
RETRY_AFTER_S = "1"
ROUTES = "POST /v1/messages, POST /v1/messages/count_tokens, /_sim/{ledger,reset,config,health}"


class Simulator:
    """State the routes share: settings, ledger, rate-limit buckets and the fault dice."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = Ledger()
        self.limits: dict[str, ModelLimits] = {}
        self.dice = FaultDice(settings.seed)
        # Received and not yet answered; a request whose client went away still counts
        # until its answer (and bill) is done, as it would at the API.
        self.in_flight = 0

    async def messages(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            try:
                body = await self._read(request, count_tokens=False)
            except ApiError as exc:
                self.ledger.rejected += 1
                return error_response(exc)
            settings = self.settings
            fault = self.dice.roll(settings.fault_rate)
            if settings.latency_ms:
                await asyncio.sleep(settings.latency_ms / 1000)
            if fault is not None:
                self.ledger.fault(fault)
                extra = {"retry-after": RETRY_AFTER_S} if fault == "429" else None
                message = f"simulated {fault} fault (--fault-rate or POST /_sim/config)"
                return error_response(ApiError(int(fault), message), extra)
            return self._answer(body)
        finally:
            self.in_flight -= 1

    def _answer(self, body: Body) -> web.Response:
        model: str = body["model"]
        text, output_tokens, stop_reason, stop_sequence = tokens.reply(body)
        # Prompt caching comes later: it will split input into cache reads and writes here.
        usage = Usage(input_tokens=tokens.input_tokens(body), output_tokens=output_tokens)
        self.ledger.bill(model, usage)
        limits = self.limits.get(model)
        if limits is None:
            limits = self.limits[model] = ModelLimits()
        limits.record(usage.input_tokens + usage.cache_creation_input_tokens, output_tokens)
        message = shapes.Message(
            id=shapes.new_id("msg_"),
            model=model,
            content=[shapes.TextBlock("text", text)] if text else [],
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            usage=shapes.api_usage(usage),
        )
        headers = limits.headers()
        headers["request-id"] = shapes.new_id("req_")
        return _json(shapes.encode(message), headers)

    async def count_tokens(self, request: web.Request) -> web.Response:
        try:
            body = await self._read(request, count_tokens=True)
        except ApiError as exc:
            self.ledger.rejected += 1
            return error_response(exc)
        count = shapes.TokenCount(tokens.input_tokens(body))
        return _json(shapes.encode(count), {"request-id": shapes.new_id("req_")})

    async def _read(self, request: web.Request, *, count_tokens: bool) -> Body:
        version = validate.check_headers(request.headers)
        if (request.content_length or 0) > validate.MAX_BODY_BYTES:
            raise ApiError(413, validate.TOO_LARGE)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:  # a chunked body past client_max_size
            raise ApiError(413, validate.TOO_LARGE) from None
        body = validate.decode_body(raw)
        validate.check_request(body, version=version, count_tokens=count_tokens)
        return body

    async def unknown_route(self, request: web.Request) -> web.Response:
        message = f"{request.method} {request.path}: no such route; the simulator has {ROUTES}"
        return error_response(ApiError(404, message))

    async def get_ledger(self, _: web.Request) -> web.Response:
        return _json(shapes.encode(self.ledger.report(in_flight=self.in_flight)))

    async def reset(self, _: web.Request) -> web.Response:
        before = self.ledger.report(in_flight=self.in_flight)
        self.ledger = Ledger()
        self.limits.clear()
        return _json(shapes.encode(before))

    async def get_config(self, _: web.Request) -> web.Response:
        return _json(shapes.encode(self.settings))

    async def configure(self, request: web.Request) -> web.Response:
        try:
            change = _decode_change(await request.read() or b"{}")
            settings = apply_change(self.settings, change)
        except (msgspec.DecodeError, ValueError) as exc:
            allowed = ", ".join(f.name for f in msgspec.structs.fields(ConfigChange))
            message = f"POST /_sim/config: {exc}. Send a JSON object with any of: {allowed}."
            return _json(shapes.encode({"error": message}), status=400)
        if change.seed is not None:
            self.dice = FaultDice(change.seed)
        self.settings = settings
        return _json(shapes.encode(settings))

    async def health(self, _: web.Request) -> web.Response:
        return _json(b'{"ok":true}')


def apply_change(settings: Settings, change: ConfigChange) -> Settings:
    """`settings` with the change applied; raises ValueError for bad fault rates."""
    return msgspec.structs.replace(
        settings,
        latency_ms=settings.latency_ms if change.latency_ms is None else change.latency_ms,
        fault_rate=(
            settings.fault_rate if change.fault_rate is None
            else check_fault_rates(change.fault_rate)
        ),
        seed=settings.seed if change.seed is None else change.seed,
    )  # fmt: skip


def error_response(exc: ApiError, extra: dict[str, str] | None = None) -> web.Response:
    """The API's error body (§2.2), with the same request id in the body and the header."""
    request_id = shapes.new_id("req_")
    body = shapes.ErrorBody(error=shapes.ErrorDetail(exc.error_type, exc.message),
                            request_id=request_id)  # fmt: skip
    headers = {"request-id": request_id, **(extra or {})}
    return _json(shapes.encode(body), headers, status=exc.status)


def _json(body: bytes, headers: dict[str, str] | None = None, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


SIMULATOR = web.AppKey("simulator", Simulator)


def make_app(settings: Settings) -> web.Application:
    """The aiohttp application; its Simulator is at app[SIMULATOR]."""
    sim = Simulator(settings)
    # Bodies up to just past 32 MB reach our own 413 check, which answers in the API's shape.
    app = web.Application(client_max_size=validate.MAX_BODY_BYTES + 1024 * 1024)
    app[SIMULATOR] = sim
    add = app.router.add_route
    add("POST", "/v1/messages", sim.messages)
    add("POST", "/v1/messages/count_tokens", sim.count_tokens)
    add("GET", "/_sim/ledger", sim.get_ledger)
    add("POST", "/_sim/reset", sim.reset)
    add("GET", "/_sim/config", sim.get_config)
    add("POST", "/_sim/config", sim.configure)
    add("GET", "/_sim/health", sim.health)
    add("*", "/{tail:.*}", sim.unknown_route)  # last: every other path gets the API's 404
    return app
