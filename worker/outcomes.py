"""The one place that turns a job's run into what is written: its result, its usage event,
its dead letter, and the usage events that are not a job's outcome (a lost call, an alert).

Everything here is typed (`Ending`: a Result, a UsageEvent, the dead letter's fields) until
the finishing write (`finish_into`), and reads the job's run (worker.jobrun) for what the job
cost, how often it was tried, how long it waited and where it was routed:

- `cost_usd` and the token fields sum every answered call of the job: a router classifier
  call, escalations, and answers it did not deliver (an escalation refused, a deadline); a
  call whose answer never came is reported once, by an `orphan` event, not here;
- `attempt` is the calls started for the job's answer over its whole life (worker.jobrun);
- `queue_ms` runs from the first enqueue to the start of the answering call (from the first
  enqueue to this delivery's start for a job answered without a call, or one that failed),
  deferrals included; `deferred_ms` is the part of it spent in the deferred set.

`finish_into` is where the finishing transaction is assembled: per-job commands that must be
written with a job's end join it there, so that they are written exactly when the job ends:
the outcome's rollup entry (issue 13) today; the adaptive router's counts and learnt
max_tokens when they are wired in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from worker import clock
from worker.admission import dead_copy, reply_to_of
from worker.budgets import Cap, Settlement
from worker.caching import CachedAnswer
from worker.config import BudgetsConfig, Config, ModelConfig
from worker.contract import (
    ErrorInfo,
    Job,
    Result,
    UsageEvent,
    clean,
    to_fields,
    usd_amount,
)
from worker.errors import JobRejected, TooLarge
from worker.fence import applied
from worker.jobrun import Call, JobRun
from worker.jobs import ApiMessage, text_of
from worker.queue import Delivery, Finish, Queue
from worker.rollups import Rollups
from worker.trips import raise_first
from worker.usage import ApiUsage, baseline_cost_usd

MESSAGE_CHARS = 500  # of the reason, in an error's usage event
ERROR_CHARS = 2000  # of the reason, in a dead letter and an error result
CHECK_FAILED = "check_failed"
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Ending:
    """What a job's end writes: its result, its usage event, and for a job that can never
    succeed its dead letter (the job's bounded fields and why); `reply_to` gets the result.
    `also`: commands that belong to the job's end (what the router learns from it), queued
    on the finishing transaction after the end's own writes (finish_into). `settle`: the
    budget settlements of the job's answered calls, written in the fenced end itself."""

    result: Result
    event: UsageEvent
    reply_to: str | None = None
    dead: dict[str, str] | None = None
    also: Callable[[Any], None] | None = None
    settle: tuple[Settlement, ...] = ()

    def encoded(self, rollups: Rollups | None = None) -> Finish:
        """The stream fields and JSON that Queue writes; with rollups, the usage event also
        joins the rollups' queue (a job's outcome always does)."""
        usage, rollup = to_fields(self.event), rollups is not None and self.event.kind == "job"
        return Finish(_encode(self.result), usage, self.reply_to, self.dead, rollup, self.settle)


def finish_into(tx: Any, queue: Queue, d: Delivery, job_id: str, ending: Ending) -> None:
    """Queue a job's end on the finishing transaction the caller executes: result, usage
    event, dead letter, reply, the outcome for the rollups (worker.rollups: the event's
    fields, pushed by the script, so the outcome is counted with its end and only then) and
    acknowledgement, in one script
    fenced by the entry's holder (Queue.finish_into, worker.fence): a worker whose job was
    taken over writes none of them. Other commands that belong to a job's end (learnt
    routing, learnt max_tokens) join here, after it: in the one case the fence stops the end
    they would be written by both workers, so they must be idempotent or tolerate it (or go
    into the fenced script, as the rollup entry does)."""
    queue.finish_into(tx, d, job_id, ending.encoded(queue.rollups))
    if ending.also is not None:  # the hook: per-job counts that join the finishing write
        ending.also(tx)


async def finish(queue: Queue, d: Delivery, job_id: str, ending: Ending) -> list[int] | None:
    """Write a job's end in one transaction, shared with the ends of the other jobs that end
    in the same loop turn (worker.trips: one round trip for all); None when the entry was no
    longer this worker's (finished already, or taken over by another worker): then nothing
    was written; else the places of the settled caps that reached their alert fraction
    (queue.applied)."""
    trip = await queue.trips.run(lambda tx: finish_into(tx, queue, d, job_id, ending), atomic=True)
    return applied(raise_first(trip)[0])


def event_into(tx: Any, queue: Queue, event: UsageEvent) -> None:
    """Queue a usage event that is not a job's end (an orphan, an alert)."""
    fields: dict[Any, Any] = to_fields(event)
    tx.xadd(queue.keys.usage, fields, maxlen=queue.usage_maxlen, approximate=True)


def totals(run: JobRun | None) -> dict[str, Any]:
    """The event fields summed over the answered calls of a run."""
    if run is None:
        return {}
    calls = run.answered()
    return {
        "attempt": run.attempts,
        "input_tokens": sum(c.input_tokens for c in calls),
        "output_tokens": sum(c.output_tokens for c in calls),
        "cache_creation_input_tokens": sum(c.cache_write for c in calls),
        "cache_read_input_tokens": sum(c.cache_read for c in calls),
        "cost_usd": run.cost_usd(),
        "deferred_ms": run.deferred_ms,
        "route_reason": "; ".join(run.route),
        "response_cache": run.response_cache,
        "embedding_tokens": run.embedding_tokens,
    }


def answered(
    d: Delivery,
    job: Job,
    run: JobRun,
    message: ApiMessage,
    usage: ApiUsage,
    call: Call,
    *,
    baseline: ModelConfig,
    problem: str | None,
) -> Ending:
    """A job answered by an API call (`call`, the last of its run; `usage`, the message's
    usage as the call decoded it). `problem`: why the answer still fails its feature's
    check: then the job ends `check_failed`, the answer in its result. The baseline prices
    the delivered answer's usage on the baseline tier."""
    error = None
    if problem is not None:
        error = ErrorInfo(CHECK_FAILED, clean(f"the answer fails its check: {problem}"))
    result = Result(
        id=d.job_id,
        status="ok" if error is None else "error",
        text=text_of(message),
        content=message.content,
        model=message.model,
        tier=call.tier,
        stop_reason=message.stop_reason,
        usage=message.usage,
        cost_usd=usd_amount(run.cost_usd()),
        mode=call.mode,
        error=error,
    )
    event = UsageEvent(
        **totals(run),
        ts_ms=clock.now_ms(),
        job_id=d.job_id,
        feature=job.feature,
        tenant=job.tenant or "",
        priority=d.priority,
        tier=call.tier,
        model=message.model,
        mode=call.mode,
        status=result.status,
        baseline_cost_usd=baseline_cost_usd(usage, baseline),
        latency_ms=call.latency_ms,
        queue_ms=max(0, call.started_ms - run.first_ms),
        error_type="" if error is None else CHECK_FAILED,
        message="" if error is None else error.message[:MESSAGE_CHARS],
    )
    return Ending(result, event, job.reply_to)


def from_cache(
    d: Delivery,
    job: Job,
    run: JobRun,
    answer: CachedAnswer,
    *,
    how: str,
    started_ms: int,
    baseline: ModelConfig,
    similar: tuple[float, str] | None = None,
) -> Ending:
    """A job answered without a call: from the response cache ("hit"), by an identical
    call in flight ("joined") or from the semantic cache ("semantic", `similar` the
    similarity and the job whose answer it got). Its own calls (a classifier's) and
    embeddings are its cost; its baseline is what the answer would have cost naively."""
    similarity, source = similar if similar is not None else (None, None)
    result = Result(
        id=d.job_id,
        status="ok",
        text=answer.text,
        content=answer.content,
        model=answer.model,
        tier=answer.tier,
        stop_reason=answer.stop_reason,
        usage=answer.usage,
        cost_usd=usd_amount(run.cost_usd()),
        mode="cache",
        semantic_similarity=similarity,
        semantic_source_job_id=source,
    )
    usage = msgspec.convert(answer.usage, ApiUsage)
    why = {"hit": "response cache hit", "joined": "joined an identical call in flight"}.get(
        how, f"semantic cache hit: similarity {similarity or 0:.4f} to job {source}"
    )
    summed = {**totals(run), "route_reason": "; ".join([*run.route, why]), "response_cache": how}
    if similar is not None:
        summed |= {"semantic_similarity": similarity, "semantic_source_job_id": source}
    event = UsageEvent(
        **summed,
        ts_ms=clock.now_ms(),
        job_id=d.job_id,
        feature=job.feature,
        tenant=job.tenant or "",
        priority=d.priority,
        tier=answer.tier,
        model=answer.model,
        mode="cache",
        baseline_cost_usd=baseline_cost_usd(usage, baseline),
        latency_ms=max(0, clock.now_ms() - started_ms),
        queue_ms=max(0, started_ms - run.first_ms),
    )
    return Ending(result, event, job.reply_to)


def rejected(
    d: Delivery, exc: JobRejected, *, started_ms: int, cfg: Config, run: JobRun | None = None
) -> Ending:
    """A job that can never succeed: an error result under its job id, a usage event with
    the reason in `message` (and what its calls cost), and a dead letter of its fields
    (bounded, see admission.dead_copy) with the reason; its reply_to, when it may be written
    to, gets the result too. Everything but the dead letter's copy is clean UTF-8."""
    f = d.fields
    sentence = clean(str(exc))[:ERROR_CHARS]
    job_id = clean(d.job_id)
    attempts = max(exc.attempts, run.attempts if run is not None else 0)
    first_ms = run.first_ms if run is not None else int(d.entry_id.partition("-")[0])
    result = Result(
        id=job_id,
        status="error",
        error=ErrorInfo(exc.error_type, sentence),
        cost_usd=usd_amount(run.cost_usd()) if run is not None else 0.0,
    )
    event = UsageEvent(
        **{**totals(run), "attempt": attempts},
        ts_ms=clock.now_ms(),
        job_id=job_id,
        feature=_label(f.get("feature")),
        tenant=_label(f.get("tenant")),
        priority=d.priority,
        status="error",
        queue_ms=max(0, started_ms - first_ms),
        error_type=exc.error_type,
        message=sentence[:MESSAGE_CHARS],
    )
    dead = {
        **dead_copy(f, too_large=isinstance(exc, TooLarge)),
        "error_type": exc.error_type,
        "error": sentence,
        "attempts": str(attempts),
        "priority": d.priority,
        "entry_id": d.entry_id,
        "job_id": job_id,
    }
    return Ending(result, event, reply_to_of(f, cfg), dead)


def batch_answered(
    d: Delivery,
    run: JobRun,
    message: ApiMessage,
    call: Call,
    *,
    local: str,
    baseline: ModelConfig,
    problem: str | None,
) -> Ending:
    """A batch item that succeeded (`call`: the batch, answered): as `answered`, with the
    batch in route_reason and `latency_ms` from submission to delivery. Batch answers are
    not escalated; one that fails its check ends `check_failed`."""
    f = d.fields
    job = Job(
        feature=f.get("feature", ""),
        request="",
        tenant=f.get("tenant") or None,
        reply_to=f.get("reply_to") or None,
    )
    run.route.append(f"batch {local}")
    if problem is not None:
        run.route.append(f"check failed: {problem} (batch answers are not escalated)")
    usage = msgspec.convert(message.usage, ApiUsage)
    return answered(d, job, run, message, usage, call, baseline=baseline, problem=problem)


def orphan(d: Delivery, job: Job, run: JobRun, call: Call) -> UsageEvent:
    """A call whose answer never came (its worker died or was stopped mid-call, or it timed
    out): the API may have billed it. `cost_usd` is its expected cost (the input estimate
    and the output its model's answers have had lately), `reserved_usd` the most it can have
    cost (what its budget reservation held); the token fields are the estimate's."""
    return UsageEvent(
        ts_ms=clock.now_ms(),
        job_id=d.job_id,
        feature=job.feature,
        tenant=job.tenant or "",
        priority=d.priority,
        tier=call.tier,
        model=call.model,
        status="error",
        attempt=run.attempts,
        input_tokens=call.estimate_tokens,
        cost_usd=call.estimate_usd,
        reserved_usd=call.reserved_usd,
        latency_ms=max(0, clock.now_ms() - call.started_ms),
        queue_ms=max(0, call.started_ms - run.first_ms),
        deferred_ms=run.deferred_ms,
        kind="orphan",
        error_type="lost_call",
        message="the call's answer never came (its worker died, was stopped after "
        "worker.grace_s, or the call timed out); the API may have billed it: cost_usd is "
        "its estimate, reserved_usd the most it can have cost",
    )


def alert(feature: str, tenant: str, text: str, *, error_type: str, cost_usd: float) -> UsageEvent:
    """An alert on the usage stream (kind `alert`)."""
    return UsageEvent(
        ts_ms=clock.now_ms(),
        job_id="",
        feature=feature,
        tenant=tenant,
        status="ok",
        kind="alert",
        message=text,
        error_type=error_type,
        cost_usd=cost_usd,
    )


def budget_alert(job: Job, cap: Cap, budgets: BudgetsConfig) -> UsageEvent:
    """A cap whose spend just reached budgets.alert_at in its period (`budget_alert`);
    `cost_usd` is the spend at the alert fraction."""
    share = budgets.alert_at
    text = f"{cap.name} reached {share:.0%} of {cap.usd} USD in {cap.period} ({budgets.timezone})"
    usd = (cap.usd or 0.0) * share
    return alert(job.feature, job.tenant or "", text, error_type="budget_alert", cost_usd=usd)


def spend_limit_alert(job: Job, error: str, until_ms: int) -> UsageEvent:
    """The organization's spend limit stopped every call of the fleet (`spend_limit`)."""
    until = dt.datetime.fromtimestamp(until_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"the organization's spend limit was reached ({error[:200]}); every call of the "
        f"fleet is stopped until {until}, when the month turns; run `tokenq budgets resume` "
        "once the limit is raised"
    )
    return alert(job.feature, "", text, error_type="spend_limit", cost_usd=0.0)


def _label(value: str | None) -> str:
    """A producer's feature or tenant for a usage event: clean UTF-8, at most 200 characters."""
    return clean(value or "")[:200]
