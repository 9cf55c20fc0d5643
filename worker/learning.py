"""What a job's route learns from, and what its end teaches: learnt max_tokens before the
calls, the adaptive router's choice, and the counts a job's end adds to its finishing
transaction (worker.adaptive, worker.maxtokens).

The rules, in one place:
- a request without its own `max_tokens`, of a feature with `max_tokens_learn`, gets the
  learnt one (maxtokens.learnt) once enough answers were counted, noted in route_reason;
- a job of a feature that worker.adaptive applies to, whose tier no static rule decides
  (router.static_route), goes where adaptive.route sends it; the classifier is not asked;
- every answer the job got from the API (the classifier's excepted) is recorded on its run
  with its check's verdict (jobrun.Call.check), so the counts survive a deferral or a
  takeover; at the job's end, `learn_into` queues them on the finishing transaction: the
  adaptive counts (adaptive.record_into) and each answer's length (maxtokens.observe_into).
  An answer from the response cache is recorded for feedback but not counted again.
Reads are one round trip per feature per `router.adaptive.cache_ms` each (OutcomeStats,
LengthStats); the writes add no round trip.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from worker import adaptive, maxtokens
from worker.config import Config, FeatureConfig
from worker.contract import Job, Keys
from worker.estimate import raw_estimate
from worker.jobrun import JobRun
from worker.router import messages_text, static_route

CUT = adaptive.CUT


async def max_tokens_into(
    feature: FeatureConfig, params: dict[str, Any], asked: bool,
    lengths: Callable[[], Awaitable[maxtokens.Lengths]],
) -> str | None:  # fmt: skip
    """Set params["max_tokens"] to the learnt one when the feature learns and the request did
    not ask (`asked`), reading the answer lengths (`lengths`) only then; the note for
    route_reason, or None when nothing changed."""
    if asked or not feature.max_tokens_learn:
        return None
    learnt = maxtokens.learnt(feature, await lengths())
    if learnt is None:
        return None
    params["max_tokens"], note = learnt
    return note


@dataclass(frozen=True, slots=True)
class Route:
    """A job's route before the classifier: the tier and why (None: the classifier or
    router.default_tier decides) and, for a feature the adaptive router applies to, its kind
    of job and the tier the router has in use for that kind ("" otherwise)."""

    decided: tuple[str, str] | None
    kind: str = ""
    in_use: str = ""


async def route(
    cfg: Config, job: Job, feature: FeatureConfig, params: dict[str, Any], job_id: str,
    counts: Callable[[], Awaitable[adaptive.Stats]], *, batched: bool = False,
) -> Route:  # fmt: skip
    """The static rules (router.static_route), then the adaptive router when it applies,
    reading the fleet's counts (`counts`) only then: the one route of realtime and batched
    jobs (worker.process, worker.batcher; `batched`: the job is bound for a Message Batch,
    which the price rule prices at the batch discount)."""
    learns = adaptive.applies(cfg, feature)
    estimate = raw_estimate(params) if learns or cfg.router.rules else None
    decided = static_route(cfg, job, feature, params, estimate)
    if not learns or estimate is None:
        return Route(decided)
    a = cfg.router.adaptive
    kind = adaptive.kind_of(a, estimate, messages_text(params) if a.kinds == "signals" else "")
    if decided is not None:
        return Route(decided, kind)
    stats = await counts()
    chosen = adaptive.route(cfg, job.feature, estimate, stats, job_id, kind=kind, batched=batched)
    return Route((chosen.tier, chosen.reason), kind, chosen.in_use or "")


def answers(run: JobRun) -> list[tuple[str, str | None]]:
    """(tier, the check's problem or None) of every answer the job's calls got, in order."""
    return [(c.tier, c.check or None) for c in run.answered() if c.counted]


def learn_into(
    tx: Any, keys: Keys, cfg: Config, *, feature: str, job_id: str, run: JobRun,
    now_ms: int, cached_tier: str | None = None,
) -> None:  # fmt: skip
    """Queue on the finishing transaction what the job's answers teach: the adaptive counts
    (and the record producers' feedback revises) when the feature is routed adaptively, the
    answers' lengths when it learns max_tokens. `cached_tier`: the job was answered from the
    response cache by an answer of that tier (recorded, not counted again)."""
    f = cfg.features.get(feature)
    if f is None:
        return
    if run.kind and adaptive.applies(cfg, f):
        got = [(cached_tier, None)] if cached_tier is not None else answers(run)
        adaptive.record_into(
            tx, keys, cfg, feature=feature, kind=run.kind, job_id=job_id, answers=got,
            now_ms=now_ms, in_use=run.in_use or None, from_cache=cached_tier is not None,
            blind=adaptive.blind(f),
        )  # fmt: skip
        if cached_tier is None and f.wrong_answer_usd is not None:  # what the price rule reads
            calls = [(c.cache_read, c.output_tokens) for c in run.answered() if c.counted]
            adaptive.usage_into(tx, keys, cfg.router.adaptive, feature, calls, now_ms)
    if f.max_tokens_learn and cached_tier is None:
        for c in run.answered():
            if c.counted:
                observe = maxtokens.observe_into
                observe(tx, keys, feature, c.output_tokens, cut=c.check == CUT, now_ms=now_ms)
