"""One job's run, from its claim to what is written: admit, claim the id and read the job's
run, report the calls a dead owner left, route (with the classifier), the response cache,
the attempts with their backoff, escalation, downgrade, deferral. `Runner.run` returns what
to write (an outcomes.Ending, a Defer, or nothing) and never writes a job's end itself.

The job's run (worker.jobrun) is the memory: it is read once with the claim and carried in
`Work` while the job runs, and every write of the job (a call's record, a deferral, the end)
writes it whole. Each Redis step here is tried again on its own through an outage
(jobs.with_retries); none repeats an API call. An answer in hand is never thrown away for an
error that comes after it: a job that holds a paid answer and cannot escalate (a budget or
breaker refuses, the deadline passes, attempts run out, the escalation fails) ends
`check_failed` with that answer (`_give_up`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import anthropic
import msgspec

from worker import clock, jobrun, jobs, outcomes
from worker.admission import Admitted, admit
from worker.breakers import Open
from worker.budgets import Refusal
from worker.caching import DEDUPE_KEEP_S, CachedAnswer, ResponseCache, cache_key, mark_prompt_cache
from worker.calls import Answered, Caller, CallFor, Stopped
from worker.claims import Claims, refusal
from worker.config import Config, FeatureConfig
from worker.contract import as_text, entry_ms, shown
from worker.errors import (
    BudgetExceeded,
    CircuitOpen,
    DeadlineExceeded,
    InvalidRequest,
    JobRejected,
    MalformedJob,
)
from worker.jobs import CLASSIFIER_ERRORS, RETRYABLE, Defer, check_deadline, describe, exhausted
from worker.outcomes import Ending
from worker.queue import Delivery, Queue
from worker.router import (
    CUT,
    cheaper,
    check_answer,
    classifier_answer,
    classifier_request,
    dearer,
    request_hash,
    static_route,
)

log = logging.getLogger("tokenq.worker")
Step = Ending | Defer | None  # what to write: an end, a deferral, or nothing (left pending)


class _Go:
    """The claim is this entry's: the job runs."""


GO = _Go()
STOP_LOOK_MS = 60_000  # a job stopped by the spend limit looks again this often


@dataclass
class Work:
    """One delivery in this worker and what is known of its job so far (the job boundary
    reads it when something unexpected happens)."""

    d: Delivery
    started_ms: int
    c: CallFor | None = None  # once the job's id is claimed and its run read
    feature: FeatureConfig | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the request as shaped
    held: Answered | None = None  # the last answer in hand, while it is escalated
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # its response-cache claim


async def admitted(d: Delivery, cfg: Config, queue: Queue) -> Admitted:
    """Check a delivery at the edge (worker.admission), and that its reply_to is a stream
    or a new key. Raises a JobRejected naming what to fix."""
    checked = admit(d.fields, cfg)
    reply_to = checked.job.reply_to
    if reply_to is not None:
        kind = await queue.reply_target(reply_to)
        if kind not in ("none", "stream"):
            raise MalformedJob(
                f"`reply_to` {shown(reply_to, 60)} names an existing key of type {kind}; "
                "results go to a stream (or a key that does not exist yet). Fix the producer."
            )
    return checked


class Runner:
    """Runs one job at a time per call of `run`; one per worker process."""

    def __init__(
        self, cfg: Config, queue: Queue, claims: Claims, caller: Caller, cache: ResponseCache,
        stopping: asyncio.Event,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.queue = queue
        self.claims = claims
        self.caller = caller
        self.cache = cache
        self.stopping = stopping

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg

    async def run(self, w: Work) -> Step:
        """Run a delivery's job to what should be written. Raises GaveUp when Redis stays
        away; anything else unexpected goes to the caller's job boundary."""
        begun = await self._begin(w)
        if not isinstance(begun, _Go):
            return begun
        assert w.c is not None
        try:
            return await self._answer(w)
        except JobRejected as exc:
            return outcomes.rejected(w.d, exc, started_ms=w.started_ms, cfg=self.cfg, run=w.c.run)

    async def _retry(self, w: Work, what: str, step: Any) -> Any:
        give_up_s = self.cfg.queue.visibility_timeout_s / 2
        return await jobs.with_retries(step, what=what, job_id=w.d.job_id, give_up_s=give_up_s)

    # -- the claim --

    async def _begin(self, w: Work) -> Step | _Go:
        """Admit the delivery and claim its job id; read the job's run and report the calls
        a dead owner left. Sets w.c and returns GO when the job may run."""
        d = w.d
        try:
            checked = await self._retry(w, "admitting", lambda: admitted(d, self.cfg, self.queue))
        except JobRejected as exc:
            return await self.refused(w, exc)
        claim = await self._retry(w, "claiming", lambda: self.claims.begin(d, clock.now_ms()))
        if claim.outcome == "answered":
            reply_to = checked.job.reply_to
            await self._retry(
                w, "acknowledging", lambda: self.queue.ack_duplicate(d, d.job_id, reply_to)
            )
            log.info("job=%s already has a result; acknowledged entry %s without a call",
                     shown(d.job_id), d.owner)  # fmt: skip
            return None
        try:
            if claim.outcome == "in_flight":  # the same job pending in another entry: wait
                check_deadline(checked.job)
                return Defer(claim.look_again_ms(clock.now_ms()), "the same job is pending in "
                             "another entry", waits=True)  # fmt: skip
            if (problem := refusal(d, claim)) is not None:
                raise problem
        except JobRejected as exc:
            return await self.refused(w, exc)
        run = jobrun.decode(claim.run, first_ms=entry_ms(d.entry_id))
        run.returned(entry_ms(d.entry_id))
        priorities = self.cfg.queue.priorities
        rank = priorities.index(d.priority) if d.priority in priorities else len(priorities)
        w.c = CallFor(d, checked.job, run, rank, stored=claim.run)
        w.feature = checked.feature
        w.params = msgspec.to_builtins(checked.request)
        lost = run.in_flight()
        if lost:
            c = w.c
            await self._retry(w, "reporting lost calls", lambda: self.caller.report_lost(c, lost))
        if run.tries >= self.cfg.queue.max_attempts:
            return outcomes.rejected(d, exhausted(run.attempts, run.last_error),
                                     started_ms=w.started_ms, cfg=self.cfg, run=run)  # fmt: skip
        return GO

    async def refused(self, w: Work, exc: JobRejected) -> Ending:
        """What a rejected job leaves, under its own job id when that is free or its own,
        else under `<priority>:<entry id>` (worker.claims)."""
        d = w.d
        if not d.claimed:
            await self._retry(w, "claiming", lambda: self.claims.for_error(d, clock.now_ms()))
        run = w.c.run if w.c is not None else None
        return outcomes.rejected(d, exc, started_ms=w.started_ms, cfg=self.cfg, run=run)

    # -- route and response cache --

    async def _answer(self, w: Work) -> Step:
        assert w.c is not None and w.feature is not None
        run, job = w.c.run, w.c.job
        notes = jobs.shape(job, w.feature, w.params)
        if not run.tier:  # a new job (one back from a deferral keeps its route)
            tier, why = await self._route(w)
            run.tier, run.route = tier, [why, *notes]
        key, run.response_cache = self._cache_key(w)
        if key is None:
            return await self._attempts(w)
        keep_s = w.feature.response_cache_ttl_s or DEDUPE_KEEP_S
        if w.feature.response_cache_ttl_s:
            hit = await self._retry(w, "reading the cache", lambda: self.cache.get(key))
            if hit is not None:
                return self._cached(w, hit, "hit")
        found = await self._retry(w, "claiming the cache", lambda: self.cache.claim(
            key, keep_s, w.feature.dedupe if w.feature else False, w.token))  # fmt: skip
        if isinstance(found, CachedAnswer):
            return self._cached(w, found, "joined")
        run.response_cache = "miss"
        try:
            step = await self._attempts(w)
            answer = _worth_keeping(step)
            if answer is not None:
                store = (lambda: self.cache.store(key, answer, keep_s)) if found is None else (
                    lambda: self.cache.complete(found, answer))  # fmt: skip
                await self._retry(w, "storing the answer", store)  # only the write again
            return step
        finally:
            if found is not None:  # a no-op after complete()
                await asyncio.shield(self._abandon(found))

    async def _abandon(self, lease: Any) -> None:
        try:
            await self.cache.abandon(lease)
        except jobs.TRANSIENT as exc:
            log.warning("releasing a cache lease failed (it expires by itself): %s", exc)

    def _cached(self, w: Work, answer: CachedAnswer, how: str) -> Ending:
        assert w.c is not None
        baseline = self.cfg.models[self.cfg.tiers[self.cfg.router.baseline_tier]]
        return outcomes.from_cache(w.d, w.c.job, w.c.run, answer, how=how,
                                   started_ms=w.started_ms, baseline=baseline)  # fmt: skip

    def _cache_key(self, w: Work) -> tuple[str | None, str]:
        """The response-cache key of this job and its `response_cache` so far: (None, "off")
        when neither the response cache nor de-duplication applies to it, (None, "no_tenant")
        when they are scoped to the tenant and the job has none (anonymous callers must not
        share answers)."""
        assert w.c is not None and w.feature is not None
        job, feature = w.c.job, w.feature
        if job.cache == "off" or not (feature.response_cache_ttl_s or feature.dedupe):
            return None, "off"
        if feature.response_cache_scope == "tenant" and not job.tenant:
            return None, "no_tenant"
        model = self.cfg.tiers[w.c.run.tier]
        key = cache_key(self.queue.keys, job.feature, feature, job.tenant or "", model, w.params)
        return key, "miss"

    async def _route(self, w: Work) -> tuple[str, str]:
        """The tier (see worker.router) and why; the classifier's call goes into the run."""
        assert w.c is not None and w.feature is not None
        c, params = w.c, w.params
        decided = static_route(self.cfg, c.job, w.feature, params)
        if decided is not None:
            return decided
        classifier, default = self.cfg.router.classifier, self.cfg.router.default_tier
        if not classifier.enabled:
            return default, "router.default_tier"
        key = self.queue.keys.route(request_hash(params))
        cached: Any = await self._retry(w, "reading the route", lambda: self.queue.redis.get(key))
        if cached and as_text(cached) in self.cfg.tiers:
            return as_text(cached), f"classifier (cached): {as_text(cached)}"
        c.run.tier = classifier.tier  # the classifier call's own tier, in the run
        try:
            got = await self.caller.call(c, classifier_request(self.cfg, params), counted=False,
                                         guarded=False)  # fmt: skip
        except CLASSIFIER_ERRORS as exc:
            return default, f"router.default_tier (classifier failed: {exc})"
        if not isinstance(got, Answered):
            why = got.sentence() if isinstance(got, Refusal) else "the spend limit"
            return default, f"router.default_tier (classifier: {why})"
        named = classifier_answer(self.cfg, jobs.text_of(got.message))
        if named is None:
            return default, "router.default_tier (classifier named no tier)"
        try:
            await self.queue.redis.set(key, named, ex=classifier.cache_ttl_s)
        except jobs.TRANSIENT as exc:  # the answer is kept for this job; the cache can wait
            log.warning("caching the classifier's answer failed: %s", exc)
        return named, f"classifier: {named}"

    # -- attempts --

    async def _attempts(self, w: Work) -> Step:
        """The job's calls, with backoff between failed ones, until one ends it."""
        assert w.c is not None
        run = w.c.run
        while True:
            if (why_not := self._why_not(w)) is not None:
                return self._give_up(w, *why_not)
            try:
                got = await self.caller.call(w.c, self._call_params(w))
            except RETRYABLE as exc:
                run.last_error = describe(exc)
                log.warning("job=%s attempt=%d failed: %s", shown(w.d.job_id), run.attempts,
                            run.last_error)  # fmt: skip
                if run.attempts >= self.cfg.queue.max_attempts:
                    return self._give_up(w, exhausted(run.attempts, run.last_error),
                                         "queue.max_attempts reached")  # fmt: skip
                if not await self._pause(self._backoff_s(run.attempts, exc)):
                    return self._give_up(w, None, "the worker is stopping")
                continue
            except anthropic.APIStatusError as exc:  # any other 4xx: the request itself
                error = InvalidRequest(
                    f"the API rejected the request ({exc.status_code}): {describe(exc)}. "
                    "Fix the producer's request, then replay the job (tokenq dead replay).",
                    attempts=run.attempts,
                )
                return self._give_up(w, error, f"the API rejected it ({exc.status_code})")
            except DeadlineExceeded as exc:
                return self._give_up(w, exc, "deadline_ms passed")
            step = self._decide(w, got)
            if step is not None:
                return step

    def _why_not(self, w: Work) -> tuple[JobRejected, str] | None:
        """Why the job may make no more calls (the error, and a clause for route_reason)."""
        assert w.c is not None
        run = w.c.run
        try:
            check_deadline(w.c.job)
        except DeadlineExceeded as exc:
            return exc, "deadline_ms passed"
        if run.attempts >= self.cfg.queue.max_attempts:
            return exhausted(run.attempts, run.last_error), "queue.max_attempts reached"
        return None

    def _call_params(self, w: Work) -> dict[str, Any]:
        assert w.c is not None and w.feature is not None
        run = w.c.run
        model = self.cfg.tiers[run.tier]
        params = {**w.params, "model": model}
        if run.max_tokens:
            params["max_tokens"] = run.max_tokens
        minimum = self.cfg.models[model].min_cache_tokens
        return mark_prompt_cache(params, w.feature.prompt_cache, minimum)

    def _decide(self, w: Work, got: Answered | Open | Refusal | Stopped) -> Step:
        """What a call's outcome means for the job: None to call again (downgraded or
        escalated), else the job's step."""
        match got:
            case Answered():
                return self._answered(w, got)
            case Open():
                return self._on_open(w, got)
            case Refusal():
                return self._on_budget(w, got)
            case Stopped():
                until = min(got.until_ms, clock.now_ms() + STOP_LOOK_MS)
                return self._defer(w, until, "the organization's spend limit was reached")

    def _answered(self, w: Work, got: Answered, *, escalate: bool = True) -> Step:
        """Deliver the answer, or escalate it when it fails the feature's check."""
        assert w.c is not None and w.feature is not None
        run, message = w.c.run, got.message
        problem = check_answer(w.feature, jobs.text_of(message), message.stop_reason)
        up = dearer(self.cfg, run.tier) if problem and escalate else None
        if problem and up and run.escalations < self.cfg.router.max_escalations:
            if run.attempts < self.cfg.queue.max_attempts:
                self._escalate(w, got, problem, up)
                return None
            run.route.append(f"not escalated to {up}: queue.max_attempts reached")
        if problem:
            run.route.append(f"check failed: {problem}")
        baseline = self.cfg.models[self.cfg.tiers[self.cfg.router.baseline_tier]]
        return outcomes.answered(w.d, w.c.job, run, message, got.call, baseline=baseline,
                                 problem=problem)  # fmt: skip

    def _escalate(self, w: Work, got: Answered, problem: str, up: str) -> None:
        """Send the job again on the dearer tier `up`, the answer kept in hand meanwhile; an
        answer cut at max_tokens also gets twice the room (jobs.more_room)."""
        assert w.c is not None and w.feature is not None
        run = w.c.run
        run.escalations += 1
        room = ""
        if problem == CUT:
            had = int(self._call_params(w)["max_tokens"])
            run.max_tokens = jobs.more_room(w.feature, had)
            if run.max_tokens > had:
                room = f" (max_tokens {had} -> {run.max_tokens})"
        run.route.append(f"escalated to {up}: {problem}{room}")
        run.tier, w.held = up, got

    def _give_up(self, w: Work, exc: JobRejected | None, why: str) -> Step:
        """The job can go no further. With an answer in hand (an escalation that did not
        happen), that answer is delivered as `check_failed`, noting why; else the job ends
        with exc (None: left pending, the worker is stopping)."""
        held = w.held
        if held is None:
            if exc is None:
                return None
            raise exc
        assert w.c is not None
        run = w.c.run
        run.route.append(f"not escalated to {run.tier}: {why}")
        w.held, run.tier = None, held.call.tier
        return self._answered(w, held, escalate=False)

    def _on_open(self, w: Work, open_: Open) -> Step:
        """An open breaker: the feature's breaker_policy decides."""
        assert w.c is not None and w.feature is not None
        run, policy = w.c.run, w.feature.breaker_policy
        down = cheaper(self.cfg, run.tier)
        if policy == "downgrade" and open_.name.startswith("model:") and down is not None:
            if w.held is not None:  # the cheaper tier is the one whose answer is in hand
                return self._give_up(w, None, f"breaker {open_.name} open")
            run.route.append(f"downgraded to {down}: breaker {open_.name} open")
            run.tier = down
            return None
        if policy == "fail":
            error = CircuitOpen(
                f"the circuit breaker {open_.name} is open after repeated API failures, and "
                f'features.{w.c.job.feature}.breaker_policy = "fail". It lets calls through '
                f"again after breakers.reset_timeout_s = {self.cfg.breakers.reset_timeout_s}; "
                "replay the job then (tokenq dead replay).",
                attempts=run.attempts,
            )
            return self._give_up(w, error, f"breaker {open_.name} open")
        return self._defer(w, open_.retry_at_ms, f"breaker {open_.name} open")

    def _on_budget(self, w: Work, refused: Refusal) -> Step:
        """A refused budget reservation: the feature's budget_policy decides."""
        assert w.c is not None and w.feature is not None
        run, policy, cap = w.c.run, w.feature.budget_policy, refused.cap
        down = cheaper(self.cfg, run.tier)
        if policy == "downgrade" and refused.dimension == "usd" and down is not None:
            if w.held is not None:
                return self._give_up(w, None, f"{cap.name} would be passed")
            run.route.append(f"downgraded to {down}: {cap.name}")
            run.tier = down
            return None
        if policy == "defer":
            return self._defer(w, int(cap.resets_at.timestamp() * 1000), f"{cap.name} reached")
        error = BudgetExceeded(
            f'{refused.sentence()}. features.{w.c.job.feature}.budget_policy = "{policy}"'
            + (" and there is no cheaper tier" if policy == "downgrade" else "")
            + ". Raise the cap or wait for it to reset, then replay (tokenq dead replay).",
            attempts=run.attempts,
        )
        return self._give_up(w, error, f"{cap.name} would be passed")

    def _defer(self, w: Work, until_ms: int, why: str) -> Step:
        """Put the job off until until_ms, unless that is past its deadline. An answer in
        hand is not kept (its cost is in the run); the job comes back on its new tier."""
        assert w.c is not None
        deadline = w.c.job.deadline_ms
        if deadline is not None and until_ms > deadline:
            error = DeadlineExceeded(
                f"{why}: the job would wait until {until_ms}, past its deadline_ms "
                f"{deadline}; submit it again with a later deadline",
                attempts=w.c.run.attempts,
            )
            return self._give_up(w, error, f"{why}, past deadline_ms")
        w.held = None
        w.c.run.put_off(clock.now_ms())
        return Defer(until_ms, why)

    async def _pause(self, seconds: float) -> bool:
        """Wait, unless the worker stops first. True when the full time passed."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    def _backoff_s(self, attempt: int, exc: Exception) -> float:
        q = self.cfg.queue
        delay = min(q.retry_max_s, q.retry_base_s * 2.0 ** (attempt - 1))
        delay *= 0.5 + random.random() / 2  # jitter: retries of many jobs do not align
        if isinstance(exc, anthropic.APIStatusError):
            after = str(exc.response.headers.get("retry-after", ""))
            if after and after.replace(".", "", 1).isdigit():
                delay = max(delay, min(float(after), q.retry_max_s))
        return delay


def _worth_keeping(step: Step) -> CachedAnswer | None:
    """The answer a finished job leaves for the response cache: only one that passed."""
    if not isinstance(step, Ending) or step.result.status != "ok" or step.result.mode != "realtime":
        return None
    r = step.result
    return CachedAnswer(r.text, r.content, r.model or "", r.tier or "", r.stop_reason,
                        r.usage or {})  # fmt: skip
