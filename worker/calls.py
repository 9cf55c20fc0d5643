"""One API call of a job, inside the fleet's limits, recorded in the job's run before it goes.

`Caller` (one per worker process, held by the Worker and the batcher's hand-overs alike) makes
a call in three steps:

1. *ready*: the fleet's spend stop, the circuit breakers (a probe slot when half-open), rate-
   limit capacity, then the budget reservation of the call's worst case and the call recorded
   in the job's run as `sent` (worker.jobrun), in one fenced script. Nothing is paid yet, so
   a Redis error here repeats the whole step; what it took is given back first (the
   reservation too, which the script may have taken though its reply was lost). A refusal
   (an open breaker, a budget, the spend stop) is returned, not raised, for the job's
   policies to decide (worker.process), and a probe slot that made no call is freed at once.
2. *send*: the call itself, never repeated by this module. It is posted lean through the SDK's
   own client (`post`: its auth, base URL, retries policy and errors): the request already
   checked (worker.api_request) and encoded once with msgspec, prebuilt headers, no per-call
   OpenTelemetry span unless a tracer provider is configured (`lean_client`); the answer is
   decoded with msgspec.
3. *settle*: capacity and the reservation settled to the usage the API reported, the breakers
   told. An answer is never lost to a Redis error here: settling is best effort (budgets'
   settlement is idempotent, and tried again).

A call whose answer never comes (cancelled after worker.grace_s, timed out) is `lost`: its
budget reservation is settled at the reservation (the API may have billed it) and an `orphan`
usage event says what it may have cost, in one transaction with the run. A worker that takes
over a job whose owner died mid-call does the same (`report_lost`). The organization's spend
limit (a 429 `enforced_spend_limit_reached`) stops every call of the fleet (budgets.SpendStop)
and is not counted as an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2
import msgspec
from opentelemetry import trace
from redis.exceptions import RedisError, WatchError

from worker import clock, jobrun, outcomes
from worker.breakers import Breakers, Open, Ticket
from worker.budgets import (
    Budgets,
    Cap,
    Hold,
    Refusal,
    Reservation,
    Settlement,
    SpendStop,
    caps_for,
    expected_usd,
    month_end_ms,
    worst_case_usd,
)
from worker.caching import has_cache_control
from worker.config import Config
from worker.contract import GROUP, Job, as_text, shown, to_fields
from worker.errors import TooLarge
from worker.estimate import Calibration, needs_count
from worker.jobrun import Call, JobRun
from worker.jobs import (
    SPEND_LIMIT,
    ApiMessage,
    GaveUp,
    TakenOver,
    check_deadline,
    decode_message,
    describe,
    failure_answer,
    with_retries,
)
from worker.limiter import Answer, Grant, Unfit, make_limiter
from worker.queue import Delivery, Queue
from worker.usage import ApiUsage, cost_usd

log = logging.getLogger("tokenq.worker")
COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking")
MESSAGES_PATH = "/v1/messages"
# The SDK's RequestOptions of every call, built once (the timeout is the client's own).
_POST_OPTIONS: Any = {"headers": {"Content-Type": "application/json"}}
_encode_body = msgspec.json.Encoder().encode


def tracing_configured() -> bool:
    """Whether OpenTelemetry has a tracer provider of its own (set by the application or named
    by OTEL_PYTHON_TRACER_PROVIDER): only then do the SDK's per-call spans record anything."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def lean_client(client: anthropic.AsyncAnthropic) -> anthropic.AsyncAnthropic:
    """The client calls are made with: `client` itself when tracing is configured, else a copy
    (same HTTP client, key, base URL, retries and timeout) that makes no per-call span, which
    otherwise costs about a third of the SDK's work per call on a no-op tracer."""
    return client if tracing_configured() else client.copy(open_telemetry=False)


async def post_message(api: anthropic.AsyncAnthropic, params: dict[str, Any]) -> httpx2.Response:
    """POST a checked request to /v1/messages through the SDK's low-level method: its headers,
    retries and errors (an error status raises its anthropic.APIStatusError), none of the
    per-call building of `messages.create`. The response is read."""
    response: httpx2.Response = await api.post(
        MESSAGES_PATH, cast_to=httpx2.Response, content=_encode_body(params), options=_POST_OPTIONS
    )
    return response


@dataclass
class CallFor:
    """The job a call is made for: its delivery, fields, run, rank, and the run's bytes as
    last written (what a transaction that reports lost calls expects to find)."""

    d: Delivery
    job: Job
    run: JobRun
    rank: int
    stored: str = ""
    # Answered calls whose budget holds are still to be settled: with the job's end, in its
    # fenced script, or by the job's next call first (Caller.settlements, settle_unsettled).
    unsettled: list[tuple[Hold, Call]] = field(default_factory=list)


@dataclass(frozen=True)
class Answered:
    """The API answered: the answer, its usage, and the call as the run records it."""

    message: ApiMessage
    usage: ApiUsage
    call: Call


@dataclass(frozen=True)
class Stopped:
    """The organization's spend limit stops every call until until_ms (or a resume)."""

    until_ms: int


@dataclass(frozen=True)
class _Estimate:
    """A call's input tokens: what the rate limits reserve (the learnt estimate, or the API's
    count), what a budget reserves (an upper bound) and the raw estimate (to learn from)."""

    limiter: int
    budget: int
    raw: int


@dataclass(frozen=True)
class _Ready:
    grant: Grant | None
    hold: Hold | None
    ticket: Ticket | None
    call: Call
    raw_estimate: int


class Caller:
    """The calls of one worker process: see the module docstring."""

    def __init__(self, cfg: Config, queue: Queue, client: anthropic.AsyncAnthropic) -> None:
        self.cfg = cfg
        self.queue = queue
        self.client = client
        self.api = lean_client(client)  # the calls' client (the HTTP client is shared)
        redis, keys = queue.redis, queue.keys
        self.limiter = make_limiter(redis, cfg)
        self.calibration = Calibration()
        self.budgets = Budgets(redis, cfg, queue.trips)
        self.breakers = Breakers(redis, keys, cfg.breakers, cfg.anthropic.timeout_s)
        self.stop = SpendStop(redis, keys)

    def reload(self, cfg: Config) -> None:
        """Use a newly loaded config from the next call on."""
        self.cfg = cfg
        self.limiter.reload(cfg)
        self.budgets.reload(cfg)
        self.breakers.reload(cfg.breakers)

    async def retrying(self, job_id: str, what: str, step: Callable[[], Awaitable[Any]]) -> Any:
        """step() tried again through a Redis outage (jobs.with_retries) for half the
        visibility timeout; then the job is left pending (GaveUp). Every Redis step of a job
        goes through here."""
        give_up_s = self.cfg.queue.visibility_timeout_s / 2
        return await with_retries(step, what=what, job_id=job_id, give_up_s=give_up_s)

    async def call(
        self, c: CallFor, params: dict[str, Any], *, counted: bool = True, guarded: bool = True
    ) -> Answered | Open | Refusal | Stopped:
        """One call of c's job (see the module docstring). `counted`: an attempt of the job's
        answer (the router's classifier call is not); `guarded`: through the breakers.

        Raises the SDK's error when the call failed (recorded in the run), TooLarge when it
        could never fit the rate limits, DeadlineExceeded when the job's deadline passed while
        it waited for capacity, GaveUp when Redis stayed away before the call."""
        await self.settle_unsettled(c)  # a call before: its cost counts for this one
        ready: _Ready | Open | Refusal | Stopped = await self.retrying(
            c.d.job_id, "preparing a call", lambda: self._ready(c, params, counted, guarded)
        )
        if not isinstance(ready, _Ready):
            return ready
        return await self._send(c, params, ready)

    # -- 1. ready --

    async def _ready(
        self, c: CallFor, params: dict[str, Any], counted: bool, guarded: bool
    ) -> _Ready | Open | Refusal | Stopped:
        until = await self.stop.until_ms()
        if until is not None:
            return Stopped(until)
        ticket = None
        if guarded:
            names = [f"feature:{c.job.feature}", f"model:{params['model']}"]
            admitted = await self.breakers.admit(names)
            if isinstance(admitted, Open):
                return admitted
            ticket = admitted
        try:
            got = await self._hold(c, params, counted, ticket)
        except BaseException:
            if ticket is not None:
                await asyncio.shield(self._release(ticket))
            raise
        if isinstance(got, Refusal) and ticket is not None:
            await self._release(ticket)
        return got

    async def _hold(
        self, c: CallFor, params: dict[str, Any], counted: bool, ticket: Ticket | None
    ) -> _Ready | Refusal:
        """Capacity, the reservation, and the call recorded as sent; given back on failure."""
        model, max_tokens = params["model"], int(params["max_tokens"])
        feature = self.cfg.features[c.job.feature]
        caps = caps_for(
            self.cfg, self.queue.keys, c.job.feature, feature, c.job.tenant or "", clock.utc()
        )
        est = await self._estimate(params, counts=bool(caps))
        grant = await self._capacity(c, model, (1, est.limiter, max_tokens))
        reservation: Reservation | None = None
        try:
            prices, caches = self.cfg.models[model], has_cache_control(params)
            worst = worst_case_usd(prices, est.budget, max_tokens, caches=caches,
                                   margin=self.cfg.budgets.estimate_margin)  # fmt: skip
            if caps:
                reservation = self.budgets.reservation(caps, uuid.uuid4().hex, worst,
                                                       clock.now_ms())  # fmt: skip
            output = self.calibration.expected_output(model, max_tokens)
            call = Call(
                model=model, tier=c.run.tier, started_ms=clock.now_ms(), counted=counted,
                estimate_tokens=est.budget, reserved_usd=worst,
                estimate_usd=expected_usd(prices, est.budget, output),
                hold=reservation.hold_id if reservation else "",
                hold_keys=[k.key for k in caps] if reservation else [],
            )  # fmt: skip
            c.run.calls.append(call)
            try:
                # Before the call, with its reservation: a worker taking over knows of both.
                refused = await self._save(c, reservation)
            except BaseException:
                c.run.calls.remove(call)
                raise
            if refused is not None:
                c.run.calls.remove(call)
                await self._settle_capacity(grant, Answer(None, {}, 0))
                return refused
        except BaseException:
            # The reservation too: the script may have taken it though its reply was lost
            # (settling is idempotent: a reservation it never took is left as it is).
            hold = reservation.hold if reservation else None
            await asyncio.shield(self._give_back(grant, hold))
            raise
        hold = reservation.hold if reservation else None
        return _Ready(grant, hold, ticket, call, est.raw)

    async def _estimate(self, params: dict[str, Any], *, counts: bool) -> _Estimate:
        """The input tokens of a call: the learnt estimate for the rate limits; for budgets
        the larger of the learnt and the raw one, or, under a spend cap, the API's own count
        where the rule cannot be an upper bound (estimate.needs_count)."""
        learnt, raw = self.calibration.estimate(params["model"], params)
        est = _Estimate(limiter=learnt, budget=max(learnt, raw), raw=raw)
        if counts and needs_count(params, raw):
            asked = {k: params[k] for k in COUNT_FIELDS if k in params}
            try:
                counted = (await self.client.messages.count_tokens(**asked)).input_tokens
            except anthropic.APIError as exc:
                log.warning("count_tokens failed (%s); reserving the estimate", describe(exc))
            else:
                est = _Estimate(limiter=counted, budget=max(est.budget, counted), raw=raw)
        return est

    async def _capacity(self, c: CallFor, model: str, want: tuple[int, int, int]) -> Grant | None:
        """Wait for rate-limit capacity for one call, no longer than the job's deadline."""
        deadline = c.job.deadline_ms
        try:
            if deadline is None:
                return await self.limiter.acquire(model, c.job.feature, c.rank, want)
            async with asyncio.timeout(max(0.0, (deadline - clock.now_ms()) / 1000)):
                return await self.limiter.acquire(model, c.job.feature, c.rank, want)
        except Unfit as exc:
            raise TooLarge(str(exc), attempts=c.run.attempts) from None
        except TimeoutError:
            check_deadline(c.job)
            raise

    async def _save(self, c: CallFor, reservation: Reservation | None = None) -> Refusal | None:
        """Write the run, fenced by the entry's holder: a job another worker took over makes
        no more calls here (TakenOver). With the call's budget reservation, in the same
        script: refused, nothing is written and the Refusal is returned."""
        raw = jobrun.encode(c.run)
        saved = await self.queue.save_run(c.d, raw, reservation)
        if isinstance(saved, list):
            assert reservation is not None
            return self.budgets.refusal(reservation, saved)
        if not saved:
            raise TakenOver(f"job {c.d.job_id!r} was taken over by another worker")
        c.stored = raw.decode()
        return None

    # -- 2. send --

    async def _send(self, c: CallFor, params: dict[str, Any], r: _Ready) -> Answered | Stopped:
        started = clock.monotonic()
        try:
            raw = await post_message(self.api, params)
            body = raw.content
        except BaseException as exc:
            # Shielded: a cancelled job still gives capacity back and reports its call.
            return await asyncio.shield(self._failed(c, r, exc))
        call = r.call
        call.latency_ms = int((clock.monotonic() - started) * 1000)
        message = decode_message(body)
        usage = msgspec.convert(message.usage, ApiUsage)
        model = params["model"]
        self.calibration.learn(model, r.raw_estimate, usage.prompt_tokens)
        self.calibration.learn_output(model, usage.output_tokens)
        call.state = "answered"
        call.cost_usd = cost_usd(usage, self.cfg.models[model])
        call.input_tokens, call.output_tokens = usage.input_tokens, usage.output_tokens
        call.cache_write, call.cache_read = usage.cache_write, usage.cache_read
        used = (1, usage.input_tokens + usage.cache_write, usage.output_tokens)
        await self._settle_capacity(r.grant, Answer(used, raw.headers))
        await self._record_breakers(r.ticket, None)
        if r.hold is not None:  # settled with the job's end, one script less (settlements)
            c.unsettled.append((r.hold, call))
        return Answered(message, usage, call)

    # -- 3. settle --

    async def _failed(self, c: CallFor, r: _Ready, exc: BaseException) -> Stopped:
        """Settle a call that got no answer; raise its error again, or return Stopped for the
        spend limit."""
        call = r.call
        await self._settle_capacity(r.grant, failure_answer(exc))
        await self._record_breakers(r.ticket, exc)
        if isinstance(exc, asyncio.CancelledError | anthropic.APITimeoutError):
            await self.retrying(
                c.d.job_id, "reporting a lost call", lambda: self.report_lost(c, [call])
            )
            raise exc
        call.state, call.error = "failed", describe(exc) if isinstance(exc, Exception) else ""
        await self._settle_budget(c, r.hold, call, called=False)
        if isinstance(exc, SPEND_LIMIT):
            call.counted = False  # not billed, and not the job's fault
            return Stopped(await self._stop_fleet(c, call.error))
        raise exc

    async def _settle_capacity(self, grant: Grant | None, answer: Answer) -> None:
        """A Redis error here only costs capacity until the buckets refill; it must not fail
        a call that was made (a retry would call the API again)."""
        if grant is None:
            return
        try:
            await self.limiter.settle(grant, answer)
        except (RedisError, OSError) as exc:
            log.warning("settling %s's rate-limit reservation failed: %s", grant.model, exc)

    async def _record_breakers(self, ticket: Ticket | None, exc: BaseException | None) -> None:
        if ticket is None:
            return
        try:
            await self.breakers.record(ticket, exc)
        except (RedisError, OSError) as err:
            log.warning("updating the circuit breakers failed: %s", err)

    async def _release(self, ticket: Ticket) -> None:
        try:
            await self.breakers.release(ticket)
        except (RedisError, OSError) as err:
            log.warning("freeing a probe slot failed (it expires by itself): %s", err)

    async def _give_back(self, grant: Grant | None, hold: Hold | None) -> None:
        """What a call that was never sent took: capacity and its reservation."""
        await self._settle_capacity(grant, Answer(None, {}, 0))
        if hold is not None:
            try:
                await self.budgets.settle(hold, 0.0, called=False)
            except (RedisError, OSError) as exc:
                log.warning("releasing a budget reservation failed (it expires): %s", exc)

    async def _settle_budget(
        self, c: CallFor, hold: Hold | None, call: Call, *, called: bool
    ) -> None:
        """Settle a reservation at the call's cost; write an alert for each cap that just
        reached budgets.alert_at. Idempotent, so tried again through a Redis outage; given up,
        the reservation expires (see worker.budgets)."""
        if hold is None:
            return
        cost = call.cost_usd if called else 0.0
        try:
            alerts = await self.retrying(
                c.d.job_id,
                "settling a budget",
                lambda: self.budgets.settle(hold, cost, called=called),
            )
            call.hold, call.hold_keys = "", []
            for cap in alerts:
                await self._alert(c, cap)
        except (GaveUp, RedisError, OSError) as exc:
            log.warning("settling a budget reservation failed: %s", exc)

    def settlements(self, c: CallFor) -> tuple[Settlement, ...]:
        """The settlements of c's answered calls, at their cost, for its end to write."""
        return tuple(
            self.budgets.settlement(hold, call.cost_usd, called=True) for hold, call in c.unsettled
        )

    async def settled(self, c: CallFor, crossed: list[int]) -> None:
        """c's end wrote its settlements: the calls' holds are gone; an alert for each cap
        that reached its alert fraction (`crossed`: places among the settlements' caps)."""
        caps = [cap for hold, _ in c.unsettled for cap in hold.caps]
        for _, call in c.unsettled:
            call.hold, call.hold_keys = "", []
        c.unsettled.clear()
        try:  # the job has ended: an alert that cannot be written is not the job's failure
            for place in crossed:
                await self._alert(c, caps[place - 1])
        except (RedisError, OSError) as exc:
            log.warning("job=%s: writing a budget alert failed: %s", shown(c.d.job_id), exc)

    async def settle_unsettled(self, c: CallFor | None) -> None:
        """Settle c's answered calls now, each on its own (a job that ends without its end
        written by this worker, or makes another call)."""
        while c is not None and c.unsettled:
            hold, call = c.unsettled.pop(0)
            await self._settle_budget(c, hold, call, called=True)

    async def _alert(self, c: CallFor, cap: Cap) -> None:
        event = outcomes.budget_alert(c.job, cap, self.cfg.budgets)
        log.warning("budget alert: %s", event.message)
        async with self.queue.redis.pipeline(transaction=False) as pipe:
            outcomes.event_into(pipe, self.queue, event)
            await pipe.execute()

    async def _stop_fleet(self, c: CallFor, error: str) -> int:
        """The organization's spend limit: stop every call of the fleet until the month turns
        (or `tokenq budgets resume`); the process that stops it writes the alert."""
        until = month_end_ms(clock.utc())
        fields = to_fields(outcomes.spend_limit_alert(c.job, error, until))
        maxlen = self.queue.usage_maxlen
        try:
            first = await self.retrying(
                c.d.job_id, "stopping the fleet", lambda: self.stop.stop(until, fields, maxlen)
            )
        except GaveUp:
            return until
        if first:
            log.error(
                "spend limit reached: every call stops until %d (tokenq budgets resume)", until
            )
        return until

    async def report_lost(self, c: CallFor, calls: list[Call]) -> None:
        """Calls whose answers never came: in one transaction, their budget reservations
        settled at the reservation, the run with them `lost`, and an orphan usage event each.
        Skipped when the job's entry is not this worker's (another worker took it over: it
        reports them), or the stored run is not the one this worker last read or wrote
        (another worker reported them). A takeover after the check changes the state hash
        (its claim) before the taker reads the run, so the transaction fails or the taker
        finds them reported: either way once. Raises a Redis error for the caller to try
        again."""
        state = self.queue.keys.state(c.d.job_id)
        before = [(call.state, call.hold) for call in calls]
        async with self.queue.redis.pipeline(transaction=True) as tx:
            await tx.watch(state)
            stored: Any = await tx.hget(state, "run")
            if as_text(stored or "") != c.stored or not await self._holds(tx, c.d):
                return
            tx.multi()  # type: ignore[no-untyped-call]  # redis-py has no hint
            for call in calls:
                if call.hold:
                    await self.budgets.settle_lost_into(
                        tx, call.hold, call.hold_keys, call.reserved_usd
                    )
                call.state, call.hold, call.hold_keys = "lost", "", []
                outcomes.event_into(tx, self.queue, outcomes.orphan(c.d, c.job, c.run, call))
            raw = jobrun.save_into(tx, state, c.run)
            try:
                await tx.execute()
            except WatchError:
                return
            except BaseException:
                for call, (was, hold) in zip(calls, before, strict=True):
                    call.state, call.hold = was, hold
                raise
        c.stored = raw.decode()
        log.warning(
            "job=%s: %d calls whose answers never came reported as orphans",
            shown(c.d.job_id),
            len(calls),
        )

    async def _holds(self, client: Any, d: Delivery) -> bool:
        """Whether d's entry is pending under this worker's consumer."""
        rows: Any = await client.xpending_range(d.stream, GROUP, d.entry_id, d.entry_id, 1)
        return bool(rows) and as_text(rows[0]["consumer"]) == self.queue.consumer
