"""The simulator's routes: the Anthropic Messages API, and admin routes under /_sim/.

API routes answer as the API does (anthropic-api.md): the same response and error shapes, a
`request-id` on every response, `anthropic-ratelimit-*` headers on 200s and rate-limit 429s,
and `retry-after` on 429s. Only POST /v1/messages gets latency, faults and rate limits
(count_tokens is a fast, free endpoint). In order: validation (invalid requests are always
refused with a 4xx), the spend cap (`spend_cap_reached`: refused at once), the fault dice
and the slow dice (faults.py), the rate limits (limits.py; a refusal is answered at once: the
latency stands for the model's work, which a refused request never reaches), the latency
(plus `slow_ms` for a slow one), the answer, made right or wrong by the ground truth
(truth.py, grades.py) when `quality` is on. Prompt caching (cache.py) is looked up when a
request passes the faults, so the rate limits can count its cache writes, and written when
its answer is made. The Message Batches routes (batches.py) check auth and version, then
answer at once; a create meets the spend cap and the `batch-529` fault first. The Admin
API's usage and cost reports (admin.py) are answered from the ledger.

Admin routes (not part of the Anthropic API):
    GET  /_sim/ledger  -> LedgerReport
    POST /_sim/reset   -> the LedgerReport before the reset (read and clear in one call; it
                          also empties the prompt cache and forgets every batch)
    POST /_sim/advance {"seconds": N} -> ClockState: move the simulator's clock (cache
                          lifetimes) N seconds forward, no sleeping
    GET  /_sim/config, POST /_sim/config {any field of settings.ConfigChange}
                          -> Settings (those added after the first shape shown once changed
                          from their defaults)
    GET  /_sim/grade?ids=..., POST /_sim/grade {"items"?, "ids"?} -> grades.Answer: the truth
                          of answers, for benchmarks (grades.py)
    GET  /_sim/health  -> {"ok": true}
"""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from simulator import admin, batches, cache, embeddings, faults, shapes, tokens, validate
from simulator.batches import Batches
from simulator.cache import Cache, Plan
from simulator.clock import SimClock
from simulator.errors import ApiError
from simulator.faults import BATCH_FAULTS, FaultDice
from simulator.grades import Grader, query_ids
from simulator.ledger import Ledger
from simulator.limits import ModelLimits, Need, OtpmMode, Refusal, limits_for
from simulator.settings import (
    DEFAULT_SETTINGS,
    Settings,
    apply_change,
    check_batch_rates,
    config_error,
    decode_change,
    shown_settings,
)
from simulator.tokens import Body

__all__ = ["DEFAULT_SETTINGS", "SIMULATOR", "Settings", "check_batch_rates", "make_app"]


class Advance(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST /_sim/advance: move the simulator's clock forward."""

    seconds: float


class ClockState(msgspec.Struct, frozen=True):
    """The answer of POST /_sim/advance: the clock now (unix seconds) and how far it has
    been moved past the wall clock in all."""

    now: float
    advanced_s: float


_decode_advance = msgspec.json.Decoder(Advance).decode
ROUTES = (
    "POST /v1/messages, POST /v1/messages/count_tokens, POST /v1/embeddings, "
    "/v1/messages/batches[/ID[/cancel|"
    "/results]], GET /v1/organizations/{usage_report/messages,cost_report}, "
    "/_sim/{ledger,reset,advance,config,grade,health}"
)


class Simulator:
    """State the routes share: settings, ledger, rate-limit buckets and the fault dice."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clock = SimClock()  # cache lifetimes, the ledger's dates; POST /_sim/advance moves it
        self.ledger = Ledger(self.clock)
        self.limits: dict[str, ModelLimits] = {}  # made on a model's first request
        self._seed_dice(settings.seed)
        self.cache = Cache()
        self.grader = Grader(lambda: self.settings.truth())
        self.batches = Batches(self.cache, self.ledger, self.grader)
        # Received and not yet answered; a request whose client went away still counts
        # until its answer (and bill) is done, as it would at the API.
        self.in_flight = 0
        self.peak_in_flight = 0  # since the last reset: tests read it instead of sampling

    def _seed_dice(self, seed: int) -> None:
        """One set of dice per kind of roll, so that none shifts another's sequence."""
        self.dice = FaultDice(seed)
        self.batch_dice = FaultDice(f"{seed}/batch", BATCH_FAULTS)
        self.slow_dice = FaultDice(f"{seed}/slow")

    async def messages(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            try:
                body = await self._read(request, count_tokens=False)
                prefix = cache.prefix_of(body)
            except ApiError as exc:
                self.ledger.rejected += 1
                return error_response(exc)
            settings = self.settings
            fault = self.dice.roll(settings.fault_rate)
            slow = self.slow_dice.happens(settings.slow_rate)
            if settings.spend_cap_reached:  # answered at once: no model work is done
                return self._fault("spend-cap")
            if fault is not None:  # instead of the answer: the limits are not consulted
                await _latency(settings, slow=slow)
                return self._fault(fault)
            limits = self._model_limits(body["model"])
            started = self.clock()  # cache lifetimes run from the start of the request
            if prefix is None:
                plan = cache.uncached(tokens.input_tokens(body))
            else:
                plan = self.cache.plan(body["model"], prefix, started)
            split = plan.split
            # ITPM counts input and cache writes, not cache reads (§3.1).
            counted = split.input_tokens + split.write_5m + split.write_1h
            need = Need.of(counted, body["max_tokens"], settings.otpm_mode)
            refusal = limits.admit(need)  # taken now: requests during the latency see it
            if refusal is not None:
                return self._refuse(body["model"], limits, refusal, settings.otpm_mode)
            await _latency(settings, slow=slow)
            return self._answer(body, limits, need, plan, started)
        finally:
            self.in_flight -= 1

    def _model_limits(self, model: str) -> ModelLimits:
        limits = self.limits.get(model)
        if limits is None:
            rpm, itpm, otpm = limits_for(self.settings.limits, model)
            limits = self.limits[model] = ModelLimits(rpm, itpm, otpm)
        return limits

    def _fault(self, fault: str) -> web.Response:
        """An injected fault (or the spend cap): not billed, counted in the ledger's
        `faults` under its name."""
        self.ledger.fault(fault)
        return error_response(*faults.fault_answer(fault))

    def _refuse(
        self, model: str, limits: ModelLimits, refusal: Refusal, mode: OtpmMode
    ) -> web.Response:
        """429 rate_limit_error naming the limit, with the ratelimit headers and, unless the
        request can never fit, `retry-after`. Not billed; counted in the ledger's
        `rate_limited`."""
        self.ledger.rate_limit(refusal.limit)
        headers = limits.headers()
        if refusal.retry_after_s is not None:
            headers["retry-after"] = str(refusal.retry_after_s)
        return error_response(ApiError(429, refusal.message(model, mode)), headers)

    def _answer(
        self, body: Body, limits: ModelLimits, need: Need, plan: Plan, started: float
    ) -> web.Response:
        model: str = body["model"]
        (text, output_tokens, stop_reason, stop_sequence), grade = self.grader.reply(body, model)
        self.cache.commit(plan, started)  # readable from now on: the answer has begun
        usage = cache.usage_of(plan.split, output_tokens)
        self.ledger.bill(model, usage)
        limits.settle(need.output_tokens, output_tokens)
        message_id = shapes.new_id("msg_")
        if grade is not None:
            self.grader.remember(message_id, model, grade)
        message = shapes.Message(
            id=message_id,
            model=model,
            content=[shapes.TextBlock("text", text)] if text else [],
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            usage=shapes.api_usage(usage),
        )
        headers = limits.headers()
        headers["request-id"] = shapes.new_id("req_")
        return _json(shapes.encode(message), headers)

    async def embed(self, request: web.Request) -> web.Response:
        """Voyage AI's POST /v1/embeddings (embeddings.py); billed in the ledger's
        `embeddings`. No latency, faults or rate limits: tokenq skips the semantic cache when
        an embedding fails, which its unit tests cover without a server."""
        try:
            body, texts, dimensions = embeddings.check_request(
                request.headers, await request.read()
            )
        except embeddings.VoyageError as exc:
            return embeddings.error_response(exc)
        reply = embeddings.answer(body, texts, dimensions)
        price = embeddings.EMBEDDING_PRICES[body.model]
        self.ledger.bill_embeddings(body.model, len(texts), reply.usage.total_tokens, price)
        return _json(shapes.encode(reply), {"request-id": shapes.new_id("req_")})

    async def count_tokens(self, request: web.Request) -> web.Response:
        try:
            body = await self._read(request, count_tokens=True)
            cache.prefix_of(body)  # checked as for messages, but never read or written
        except ApiError as exc:
            self.ledger.rejected += 1
            return error_response(exc)
        count = shapes.TokenCount(tokens.input_tokens(body))
        self.ledger.counted += 1
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

    # Message Batches (§5; batches.py). Not rate limited: the API's batch limits are an HTTP
    # RPM and the processing-queue cap, and only the cap is enforced here.
    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            version = validate.check_headers(request.headers)
            if (request.content_length or 0) > batches.MAX_BODY_BYTES:
                raise ApiError(413, validate.too_large(batches.MAX_BODY_BYTES))
            requests = batches.check_create(
                validate.decode_body(await request.read(), max_bytes=batches.MAX_BODY_BYTES)
            )
        except ApiError as exc:
            self.ledger.rejected += 1
            return error_response(exc)
        s = self.settings
        fault = self.batch_dice.roll(s.fault_rate)
        if s.spend_cap_reached:
            fault = "spend-cap"
        if fault is not None:  # the batch is not created
            return self._fault(fault)
        try:
            batch = self.batches.create(
                requests, now=self.clock(), seconds=s.batch_seconds, version=version,
                seed=s.seed, error_rate=s.batch_error_rate, expiry_rate=s.batch_expiry_rate,
            )  # fmt: skip
        except ApiError as exc:  # the processing-queue cap
            self.ledger.rejected += 1
            return error_response(exc)
        return self._batch_json(self.batches.shown(batch, _origin(request)))

    async def retrieve_batch(self, request: web.Request) -> web.Response:
        try:
            validate.check_headers(request.headers)
            batch = self.batches.get(request.match_info["batch_id"], self.clock())
        except ApiError as exc:
            return error_response(exc)
        return self._batch_json(self.batches.shown(batch, _origin(request)))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        try:
            validate.check_headers(request.headers)
            batch = self.batches.cancel(request.match_info["batch_id"], self.clock())
        except ApiError as exc:
            return error_response(exc)
        return self._batch_json(self.batches.shown(batch, _origin(request)))

    async def delete_batch(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        try:
            validate.check_headers(request.headers)
            self.batches.delete(batch_id, self.clock())
        except ApiError as exc:
            return error_response(exc)
        return self._batch_json(batches.DeletedBatch(batch_id))

    async def list_batches(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            validate.check_headers(request.headers)
            limit = _list_limit(query.get("limit"))
            page = self.batches.page(
                self.clock(), _origin(request), after_id=query.get("after_id"),
                before_id=query.get("before_id"), limit=limit,
            )  # fmt: skip
        except ApiError as exc:
            return error_response(exc)
        return self._batch_json(page)

    async def batch_results(self, request: web.Request) -> web.StreamResponse:
        try:
            validate.check_headers(request.headers)
            lines = self.batches.results(request.match_info["batch_id"], self.clock())
        except ApiError as exc:
            return error_response(exc)
        reply = web.StreamResponse(headers={"request-id": shapes.new_id("req_")})
        reply.content_type = "application/binary"
        await reply.prepare(request)
        chunk: list[bytes] = []
        for line in lines:  # streamed in chunks, as a large .jsonl file would be
            chunk.append(line)
            if len(chunk) == 1000:
                await reply.write(b"".join(chunk))
                chunk = []
        await reply.write(b"".join(chunk))
        await reply.write_eof()
        return reply

    def _batch_json(self, value: object) -> web.Response:
        return _json(shapes.encode(value), {"request-id": shapes.new_id("req_")})

    async def get_ledger(self, _: web.Request) -> web.Response:
        self.batches.settle_all(self.clock())  # bills the batches that have ended by now
        report = self.ledger.report(in_flight=self.in_flight, peak_in_flight=self.peak_in_flight)
        return _json(shapes.encode(report))

    async def reset(self, _: web.Request) -> web.Response:
        self.batches.settle_all(self.clock())
        before = self.ledger.report(in_flight=self.in_flight, peak_in_flight=self.peak_in_flight)
        self.ledger = Ledger(self.clock)
        self.peak_in_flight = self.in_flight
        self.limits = {}  # full buckets; requests in flight settle with the old ones
        self.cache = Cache()  # the clock keeps its time: it never goes back
        self.batches = Batches(self.cache, self.ledger, self.grader)  # grades are kept
        return _json(shapes.encode(before))

    async def advance(self, request: web.Request) -> web.Response:
        try:
            change = _decode_advance(await request.read() or b"{}")
            self.clock.advance(change.seconds)
        except (msgspec.DecodeError, ValueError) as exc:
            message = f'POST /_sim/advance: {exc}. Send {{"seconds": N}} with N >= 0.'
            return _json(shapes.encode({"error": message}), status=400)
        return _json(shapes.encode(ClockState(now=self.clock(), advanced_s=self.clock.offset_s)))

    async def get_config(self, _: web.Request) -> web.Response:
        return _json(shapes.encode(shown_settings(self.settings)))

    async def configure(self, request: web.Request) -> web.Response:
        try:
            change = decode_change(await request.read() or b"{}")
            settings = apply_change(self.settings, change)
        except (msgspec.DecodeError, ValueError) as exc:
            return _json(shapes.encode({"error": config_error(exc)}), status=400)
        if change.seed is not None:
            self._seed_dice(change.seed)
        if change.limits is not None:
            self.limits = {}  # full buckets at the new capacities
        self.settings = settings
        return _json(shapes.encode(shown_settings(settings)))

    async def grade(self, request: web.Request) -> web.Response:
        try:
            raw = await request.read() if request.method == "POST" else None
            answer = self.grader.answer(raw, query_ids(request.query.getall("ids", [])))
        except ValueError as exc:
            message = f"{request.method} /_sim/grade: {exc}"
            return _json(shapes.encode({"error": message}), status=400)
        return _json(shapes.encode(answer))

    async def health(self, _: web.Request) -> web.Response:
        return _json(b'{"ok":true}')


def _origin(request: web.Request) -> str:
    """scheme://host:port as the client addressed us: results_url is absolute (§5.1)."""
    return f"{request.scheme}://{request.host}"


def _list_limit(text: str | None) -> int:
    if text is None:
        return batches.LIST_LIMIT_DEFAULT
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= batches.LIST_LIMIT_MAX:
        raise ApiError(
            400, f"limit: Input should be a whole number from 1 to {batches.LIST_LIMIT_MAX}"
        )
    return limit


async def _latency(settings: Settings, *, slow: bool = False) -> None:
    delay_ms = settings.latency_ms + (settings.slow_ms if slow else 0)
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)


def error_response(exc: ApiError, extra: dict[str, str] | None = None) -> web.Response:
    """The API's error body (§2.2), with the same request id in the body and the header."""
    request_id = shapes.new_id("req_")
    details = None if exc.error_code is None else shapes.ErrorCode(exc.error_code)
    body = shapes.ErrorBody(error=shapes.ErrorDetail(exc.error_type, exc.message, details),
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
    app = web.Application(client_max_size=batches.MAX_BODY_BYTES + 1024 * 1024)
    app[SIMULATOR] = sim
    add = app.router.add_route
    add("POST", "/v1/messages", sim.messages)
    add("POST", "/v1/messages/count_tokens", sim.count_tokens)
    add("POST", "/v1/embeddings", sim.embed)
    add("GET", "/_sim/ledger", sim.get_ledger)
    add("POST", "/_sim/reset", sim.reset)
    add("POST", "/_sim/advance", sim.advance)
    add("GET", "/_sim/config", sim.get_config)
    add("POST", "/_sim/config", sim.configure)
    add("GET", "/_sim/health", sim.health)
    add("GET", "/_sim/grade", sim.grade)
    add("POST", "/_sim/grade", sim.grade)
    add("POST", "/v1/messages/batches", sim.create_batch)
    add("GET", "/v1/messages/batches", sim.list_batches)
    add("GET", "/v1/messages/batches/{batch_id}", sim.retrieve_batch)
    add("DELETE", "/v1/messages/batches/{batch_id}", sim.delete_batch)
    add("POST", "/v1/messages/batches/{batch_id}/cancel", sim.cancel_batch)
    add("GET", "/v1/messages/batches/{batch_id}/results", sim.batch_results)
    admin.add_routes(app, lambda: sim.ledger, sim.clock, error_response)
    add("*", "/{tail:.*}", sim.unknown_route)  # last: every other path gets the API's 404
    return app
