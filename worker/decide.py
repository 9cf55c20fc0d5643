"""What a call's outcome means for a job: deliver it, escalate it, downgrade, defer, or give
up; the feature's check and its policies, as functions of the config and the job in hand
(`Work`), with no Redis: worker.process runs the calls and writes what these decide.

The rules, in one place:
- an answer that fails its feature's check goes to the next dearer tier, at most
  router.max_escalations times and while queue.max_attempts allows another call; the answer
  is kept in hand meanwhile (an answer cut at max_tokens also gets twice the room);
- an open breaker or a refused budget follows the feature's policy: `downgrade` (the next
  cheaper tier), `defer` (the job leaves its stream until the breaker may let calls through
  or the cap resets), or `fail`/`reject` (the job ends with circuit_open/budget_exceeded);
- the organization's spend limit defers the job, looking again every STOP_LOOK_MS;
- a deferral past the job's deadline_ms ends it with deadline_exceeded;
- whenever the job cannot go on while an answer is in hand (an escalation refused by a
  budget or breaker, the deadline, attempts spent, a failed call), it ends `check_failed`
  with that answer, `route_reason` saying why (`give_up`): a paid answer is never discarded
  for an error that came after it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import anthropic

from worker import clock, jobs, outcomes
from worker.breakers import Open
from worker.budgets import Refusal
from worker.caching import mark_prompt_cache
from worker.calls import Answered, CallFor, Stopped
from worker.config import Config, FeatureConfig
from worker.errors import BudgetExceeded, CircuitOpen, DeadlineExceeded, JobRejected
from worker.jobs import Defer, check_deadline, exhausted
from worker.outcomes import Ending
from worker.queue import Delivery
from worker.router import CUT, cheaper, check_answer, dearer
from worker.semantic import Lookup

Step = Ending | Defer | None  # what to write: an end, a deferral, or nothing (left pending)
STOP_LOOK_MS = 60_000  # a job stopped by the spend limit looks again this often


@dataclass
class Work:
    """One delivery in a worker and what is known of its job so far (the job boundary reads
    it when something unexpected happens)."""

    d: Delivery
    started_ms: int
    c: CallFor | None = None  # once the job's id is claimed and its run read
    feature: FeatureConfig | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the request as shaped
    held: Answered | None = None  # the last answer in hand, while it is escalated
    token: str = ""  # the job's response-cache claim
    lookup: Lookup | None = None  # what the semantic cache found (worker.semantic)


def why_not(cfg: Config, w: Work) -> tuple[JobRejected, str] | None:
    """Why the job may make no more calls (the error, and a clause for route_reason)."""
    assert w.c is not None
    run = w.c.run
    try:
        check_deadline(w.c.job)
    except DeadlineExceeded as exc:
        return exc, "deadline_ms passed"
    if run.attempts >= cfg.queue.max_attempts:
        return exhausted(run.attempts, run.last_error), "queue.max_attempts reached"
    return None


def call_params(cfg: Config, w: Work) -> dict[str, Any]:
    assert w.c is not None and w.feature is not None
    run = w.c.run
    model = cfg.tiers[run.tier]
    params = {**w.params, "model": model}
    if run.max_tokens:
        params["max_tokens"] = run.max_tokens
    minimum = cfg.models[model].min_cache_tokens
    return mark_prompt_cache(params, w.feature.prompt_cache, minimum)


def decide(cfg: Config, w: Work, got: Answered | Open | Refusal | Stopped) -> Step:
    """What a call's outcome means for the job: None to call again (downgraded or
    escalated), else the job's step."""
    match got:
        case Answered():
            return answered(cfg, w, got)
        case Open():
            return _on_open(cfg, w, got)
        case Refusal():
            return _on_budget(cfg, w, got)
        case Stopped():
            until = min(got.until_ms, clock.now_ms() + STOP_LOOK_MS)
            return defer(cfg, w, until, "the organization's spend limit was reached")


def answered(cfg: Config, w: Work, got: Answered, *, escalate: bool = True) -> Step:
    """Deliver the answer, or escalate it when it fails the feature's check."""
    assert w.c is not None and w.feature is not None
    run, message = w.c.run, got.message
    output_tokens = got.usage.output_tokens
    problem = check_answer(w.feature, jobs.text_of(message), message.stop_reason, output_tokens)
    got.call.check = problem or ""  # what the router and max_tokens learn (worker.learning)
    up = dearer(cfg, run.tier) if problem and escalate else None
    if problem and up and run.escalations < cfg.router.max_escalations:
        if run.attempts < cfg.queue.max_attempts:
            _escalate(cfg, w, got, problem, up)
            return None
        run.route.append(f"not escalated to {up}: queue.max_attempts reached")
    if problem:
        run.route.append(f"check failed: {problem}")
    baseline = cfg.models[cfg.tiers[cfg.router.baseline_tier]]
    return outcomes.answered(
        w.d, w.c.job, run, message, got.usage, got.call, baseline=baseline, problem=problem
    )


def _escalate(cfg: Config, w: Work, got: Answered, problem: str, up: str) -> None:
    """Send the job again on the dearer tier `up`, the answer kept in hand meanwhile; an
    answer cut at max_tokens also gets twice the room (jobs.more_room)."""
    assert w.c is not None and w.feature is not None
    run = w.c.run
    run.escalations += 1
    room = ""
    if problem == CUT:
        had = run.max_tokens or int(w.params["max_tokens"])  # as call_params sends it
        run.max_tokens = jobs.more_room(w.feature, had)
        if run.max_tokens > had:
            room = f" (max_tokens {had} -> {run.max_tokens})"
    run.route.append(f"escalated to {up}: {problem}{room}")
    run.tier, w.held = up, got


def give_up(cfg: Config, w: Work, exc: JobRejected | None, why: str) -> Step:
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
    return answered(cfg, w, held, escalate=False)


def _on_open(cfg: Config, w: Work, open_: Open) -> Step:
    """An open breaker: the feature's breaker_policy decides."""
    assert w.c is not None and w.feature is not None
    run, policy = w.c.run, w.feature.breaker_policy
    down = cheaper(cfg, run.tier)
    if policy == "downgrade" and open_.name.startswith("model:") and down is not None:
        if w.held is not None:  # the cheaper tier is the one whose answer is in hand
            return give_up(cfg, w, None, f"breaker {open_.name} open")
        run.route.append(f"downgraded to {down}: breaker {open_.name} open")
        run.tier = down
        return None
    if policy == "fail":
        error = CircuitOpen(
            f"the circuit breaker {open_.name} is open after repeated API failures, and "
            f'features.{w.c.job.feature}.breaker_policy = "fail". It lets calls through '
            f"again after breakers.reset_timeout_s = {cfg.breakers.reset_timeout_s}; "
            "replay the job then (tokenq dead replay).",
            attempts=run.attempts,
        )
        return give_up(cfg, w, error, f"breaker {open_.name} open")
    return defer(cfg, w, open_.retry_at_ms, f"breaker {open_.name} open")


def _on_budget(cfg: Config, w: Work, refused: Refusal) -> Step:
    """A refused budget reservation: the feature's budget_policy decides."""
    assert w.c is not None and w.feature is not None
    run, policy, cap = w.c.run, w.feature.budget_policy, refused.cap
    down = cheaper(cfg, run.tier)
    if policy == "downgrade" and refused.dimension == "usd" and down is not None:
        if w.held is not None:
            return give_up(cfg, w, None, f"{cap.name} would be passed")
        run.route.append(f"downgraded to {down}: {cap.name}")
        run.tier = down
        return None
    if policy == "defer":
        return defer(cfg, w, int(cap.resets_at.timestamp() * 1000), f"{cap.name} reached")
    error = BudgetExceeded(
        f'{refused.sentence()}. features.{w.c.job.feature}.budget_policy = "{policy}"'
        + (" and there is no cheaper tier" if policy == "downgrade" else "")
        + ". Raise the cap or wait for it to reset, then replay (tokenq dead replay).",
        attempts=run.attempts,
    )
    return give_up(cfg, w, error, f"{cap.name} would be passed")


def defer(cfg: Config, w: Work, until_ms: int, why: str) -> Step:
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
        return give_up(cfg, w, error, f"{why}, past deadline_ms")
    w.held = None
    w.c.run.put_off(clock.now_ms())
    return Defer(until_ms, why)


def backoff_s(cfg: Config, attempt: int, exc: Exception) -> float:
    q = cfg.queue
    delay = min(q.retry_max_s, q.retry_base_s * 2.0 ** (attempt - 1))
    delay *= 0.5 + random.random() / 2  # jitter: retries of many jobs do not align
    if isinstance(exc, anthropic.APIStatusError):
        after = str(exc.response.headers.get("retry-after", ""))
        if after and after.replace(".", "", 1).isdigit():
            delay = max(delay, min(float(after), q.retry_max_s))
    return delay
