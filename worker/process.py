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
import dataclasses
import logging
from typing import Any

import anthropic
import msgspec

from worker import adaptive, clock, decide, jobrun, jobs, learning, maxtokens, outcomes
from worker.admission import Admitted, admit
from worker.budgets import Refusal
from worker.caching import DEDUPE_KEEP_S, CachedAnswer, ResponseCache, cache_key
from worker.calls import Answered, Caller, CallFor
from worker.claims import Claims, refusal
from worker.config import Config
from worker.contract import as_text, entry_ms, shown
from worker.decide import Step, Work
from worker.errors import (
    DeadlineExceeded,
    InvalidRequest,
    JobRejected,
    MalformedJob,
)
from worker.jobs import CLASSIFIER_ERRORS, RETRYABLE, Defer, check_deadline, describe, exhausted
from worker.outcomes import Ending
from worker.queue import Delivery, Queue
from worker.router import (
    classifier_answer,
    classifier_request,
    request_hash,
)
from worker.semantic import SemanticCache

log = logging.getLogger("tokenq.worker")


class _Go:
    """The claim is this entry's: the job runs."""


GO = _Go()


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
        self,
        cfg: Config,
        queue: Queue,
        claims: Claims,
        caller: Caller,
        cache: ResponseCache,
        stopping: asyncio.Event,
        semantic: SemanticCache | None = None,
    ) -> None:
        self.cfg = cfg
        self.semantic = semantic
        self.queue = queue
        self.claims = claims
        self.caller = caller
        self.cache = cache
        self.stopping = stopping
        # The fleet's counts, read at most every router.adaptive.cache_ms (worker.learning).
        self.outcome_stats = adaptive.OutcomeStats(queue.redis, queue.keys)
        self.lengths = maxtokens.LengthStats(
            queue.redis, queue.keys, cache_ms=cfg.router.adaptive.cache_ms
        )

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
            return self._with_writes(w, await self._answer(w))
        except JobRejected as exc:
            return outcomes.rejected(w.d, exc, started_ms=w.started_ms, cfg=self.cfg, run=w.c.run)

    def _with_writes(self, w: Work, step: Step) -> Step:
        """An answered job's end, with the writes that belong to it joining its finishing
        transaction: what its answers teach (worker.learning), and the semantic cache's
        record of a hit or the entry an answer that passed its check becomes."""
        if not isinstance(step, Ending) or step.dead is not None or w.c is None:
            return step
        cfg, keys, c, semantic, lookup = self.cfg, self.queue.keys, w.c, self.semantic, w.lookup
        cached = step.result.tier if step.result.mode == "cache" else None
        keep = _worth_keeping(step)
        feature = cfg.features.get(c.job.feature)  # gone after a reload: nothing to store
        sc = feature.semantic_cache if feature is not None else None
        stores = lookup is not None and keep is not None and lookup.outcome == "miss"

        def also(tx: Any) -> None:
            now_ms = clock.now_ms()
            learning.learn_into(
                tx, keys, cfg, feature=c.job.feature, job_id=c.d.job_id, run=c.run,
                now_ms=now_ms, cached_tier=cached,
            )  # fmt: skip
            if semantic is None or lookup is None:
                return
            if lookup.outcome == "hit" and step.result.mode == "cache":
                ttl_s = cfg.queue.result_ttl_s
                semantic.record_hit_into(tx, lookup, job_id=c.d.job_id, ttl_s=ttl_s, now_ms=now_ms)
            elif stores and keep is not None and sc is not None:
                semantic.store_into(tx, cfg, lookup, job_id=c.d.job_id, answer=keep, now_ms=now_ms)

        return dataclasses.replace(step, also=also)

    async def _retry(self, w: Work, what: str, step: Any) -> Any:
        return await self.caller.retrying(w.d.job_id, what, step)

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
            log.info(
                "job=%s already has a result; acknowledged entry %s without a call",
                shown(d.job_id),
                d.owner,
            )
            return None
        try:
            if claim.outcome == "in_flight":  # the same job pending in another entry: wait
                check_deadline(checked.job)
                return Defer(
                    claim.look_again_ms(clock.now_ms()),
                    "the same job is pending in another entry",
                    waits=True,
                )
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
            return outcomes.rejected(
                d,
                exhausted(run.attempts, run.last_error),
                started_ms=w.started_ms,
                cfg=self.cfg,
                run=run,
            )
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
        run, job, feature = w.c.run, w.c.job, w.feature
        asked = w.params.get("max_tokens") is not None
        notes = jobs.shape(job, w.feature, w.params)
        learnt = await learning.max_tokens_into(
            w.feature, w.params, asked,
            lambda: self._retry(w, "reading answer lengths",
                                lambda: self.lengths.get(job.feature, clock.now_ms())),
        )  # fmt: skip
        notes += [learnt] if learnt else []
        if not run.tier:  # a new job (one back from a deferral keeps its route)
            tier, why = await self._route(w)
            run.tier, run.route = tier, [why, *notes]
        key, run.response_cache = self._cache_key(w)
        if key is None:
            return await self._similar(w) or await self._attempts(w)
        keep_s = w.feature.response_cache_ttl_s or DEDUPE_KEEP_S
        if w.feature.response_cache_ttl_s:
            hit = await self._retry(w, "reading the cache", lambda: self.cache.get(key))
            if hit is not None:
                return self._cached(w, hit, "hit")
        if (similar := await self._similar(w)) is not None:
            return similar
        found = await self._retry(
            w,
            "claiming the cache",
            lambda: self.cache.claim(key, keep_s, feature.dedupe, w.token),
        )
        if isinstance(found, CachedAnswer):
            return self._cached(w, found, "joined")
        run.response_cache = "miss"
        try:
            step = await self._attempts(w)
            answer = _worth_keeping(step)
            if answer is not None:
                store = (
                    (lambda: self.cache.store(key, answer, keep_s))
                    if found is None
                    else (lambda: self.cache.complete(found, answer))
                )
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

    def _cached(
        self, w: Work, answer: CachedAnswer, how: str, similar: tuple[float, str] | None = None
    ) -> Ending:
        assert w.c is not None
        baseline = self.cfg.models[self.cfg.tiers[self.cfg.router.baseline_tier]]
        return outcomes.from_cache(
            w.d, w.c.job, w.c.run, answer, how=how, started_ms=w.started_ms, baseline=baseline,
            similar=similar,
        )  # fmt: skip

    async def _similar(self, w: Work) -> Ending | None:
        """The semantic cache, after the exact response cache missed (worker.semantic): the
        job's end when an earlier answer to a question of the same meaning is found, else
        None (the lookup kept on `w` for the finishing write). Its embedding is the job's
        cost either way. A lookup never raises: an embedding or Redis failure is a miss."""
        assert w.c is not None
        c = w.c
        feature = self.cfg.features.get(c.job.feature)
        if self.semantic is None or feature is None or feature.semantic_cache is None:
            return None
        w.lookup = lookup = await self.semantic.lookup(
            self.cfg, feature=c.job.feature, tenant=c.job.tenant, cache_off=c.job.cache == "off",
            model=self.cfg.tiers[c.run.tier], params=w.params,
        )  # fmt: skip
        c.run.embedding_tokens += lookup.embedding_tokens
        c.run.embedding_usd += lookup.embedding_cost_usd
        if lookup.outcome != "hit" or lookup.answer is None or lookup.similarity is None:
            return None
        similar = (round(lookup.similarity, 6), lookup.source_job_id)
        return self._cached(w, lookup.answer, "semantic", similar)

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
        c, params, cfg = w.c, w.params, self.cfg
        routed = await learning.route(
            cfg, c.job, w.feature, params, c.d.job_id,
            lambda: self._retry(w, "reading the router's counts",
                                lambda: self.outcome_stats.get(cfg, c.job.feature, clock.now_ms())),
        )  # fmt: skip
        c.run.kind = routed.kind or c.run.kind
        c.run.in_use = routed.in_use or c.run.in_use
        if routed.decided is not None:  # the adaptive router's: the classifier is not asked
            return routed.decided
        classifier, default = self.cfg.router.classifier, self.cfg.router.default_tier
        if not classifier.enabled:
            return default, "router.default_tier"
        key = self.queue.keys.route(request_hash(params))
        cached: Any = await self._retry(w, "reading the route", lambda: self.queue.redis.get(key))
        if cached and as_text(cached) in self.cfg.tiers:
            return as_text(cached), f"classifier (cached): {as_text(cached)}"
        c.run.tier = classifier.tier  # the classifier call's own tier, in the run
        try:
            got = await self.caller.call(
                c, classifier_request(self.cfg, params), counted=False, guarded=False
            )
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
            if (why_not := decide.why_not(self.cfg, w)) is not None:
                return decide.give_up(self.cfg, w, *why_not)
            try:
                got = await self.caller.call(w.c, decide.call_params(self.cfg, w))
            except RETRYABLE as exc:
                run.last_error = describe(exc)
                log.warning(
                    "job=%s attempt=%d failed: %s", shown(w.d.job_id), run.attempts, run.last_error
                )
                if run.attempts >= self.cfg.queue.max_attempts:
                    spent = exhausted(run.attempts, run.last_error)
                    return decide.give_up(self.cfg, w, spent, "queue.max_attempts reached")
                if not await self._pause(decide.backoff_s(self.cfg, run.attempts, exc)):
                    return decide.give_up(self.cfg, w, None, "the worker is stopping")
                continue
            except anthropic.APIStatusError as exc:  # any other 4xx: the request itself
                invalid = InvalidRequest(
                    f"the API rejected the request ({exc.status_code}): {describe(exc)}. "
                    "Fix the producer's request, then replay the job (tokenq dead replay).",
                    attempts=run.attempts,
                )
                why = f"the API rejected it ({exc.status_code})"
                return decide.give_up(self.cfg, w, invalid, why)
            except DeadlineExceeded as exc:
                return decide.give_up(self.cfg, w, exc, "deadline_ms passed")
            step = decide.decide(self.cfg, w, got)
            if step is not None:
                return step

    async def _pause(self, seconds: float) -> bool:
        """Wait, unless the worker stops first. True when the full time passed."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False


def _worth_keeping(step: Step) -> CachedAnswer | None:
    """The answer a finished job leaves for the response cache: only one that passed."""
    if not isinstance(step, Ending) or step.result.status != "ok" or step.result.mode != "realtime":
        return None
    r = step.result
    return CachedAnswer(
        r.text, r.content, r.model or "", r.tier or "", r.stop_reason, r.usage or {}
    )
