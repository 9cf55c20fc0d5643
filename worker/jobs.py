"""A job's parts between the stream and the API: the errors worth another attempt, the API's
answer, the request as the feature shapes it, what a job can end in short of a result (put
off), and trying a Redis step again through an outage without repeating what came before it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anthropic
import msgspec
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import clock
from worker.config import FeatureConfig
from worker.contract import Job, shown
from worker.errors import AttemptsExhausted, DeadlineExceeded, TooLarge
from worker.estimate import raw_estimate
from worker.limiter import Answer

T = TypeVar("T")
log = logging.getLogger("tokenq.worker")

# Failures that are not the job's fault: the job is retried after a backoff.
RETRYABLE: tuple[type[Exception], ...] = (
    anthropic.RateLimitError,
    anthropic.InternalServerError,  # 500, 529 (OverloadedError), 503, 504 ...
    anthropic.APIConnectionError,  # APITimeoutError too
    anthropic.RequestTimeoutError,
    anthropic.ConflictError,
    anthropic.AuthenticationError,  # a key problem: every job would fail, none is malformed
    anthropic.PermissionDeniedError,
    anthropic.PaymentRequiredError,
)

# The organization's spend limit (429 with error.details.error_code *_spend_limit_reached):
# retrying cannot help until the month turns or someone raises it, so the fleet stops calling.
SPEND_LIMIT: tuple[type[Exception], ...] = (
    anthropic.EnforcedSpendLimitReachedError,
    anthropic.ContractSpendLimitReachedError,
    anthropic.LinkedOrganizationSpendLimitReachedError,
)

# The classifier is optional: any API error makes the router fall back to its default tier.
CLASSIFIER_ERRORS: tuple[type[Exception], ...] = (*RETRYABLE, anthropic.APIStatusError)

# Redis errors worth trying the same step again for: the server is away, loading, failing
# over or full. Any other (WRONGTYPE, a script error) would fail again: it goes to the job
# boundary, where it counts toward the job's tries.
TRANSIENT: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    OutOfMemoryError,
    OSError,
)


class ApiMessage(msgspec.Struct, frozen=True):
    """The parts of a Messages API response the worker reads."""

    model: str
    content: list[dict[str, Any]]
    usage: dict[str, Any]
    stop_reason: str | None = None


decode_message = msgspec.json.Decoder(ApiMessage).decode


@dataclass(frozen=True)
class Defer:
    """Put the job off until until_ms (unix ms), for the reason given. `waits`: the job is a
    copy of one still pending in another entry (see worker.claims); it holds no claim."""

    until_ms: int
    why: str
    waits: bool = False


class TakenOver(Exception):
    """Another worker took the job over (this one was presumed dead: its renewals stopped for
    longer than the visibility timeout); this one writes nothing more for it (worker.fence)."""


class GaveUp(Exception):
    """Redis stayed away past half the visibility timeout: the job is left pending, and
    whoever reclaims it finds its run as it was last written."""


async def with_retries(
    step: Callable[[], Awaitable[T]], *, what: str, job_id: str, give_up_s: float
) -> T:
    """step(), tried again after a transient Redis error (a restart, a failover, a full pool)
    with a pause doubling from 0.05 s to 5 s, until give_up_s have passed (then GaveUp).

    Only what step() does is repeated: the caller wraps each step that may be repeated on
    its own (never an API call with what follows it)."""
    give_up = clock.monotonic() + give_up_s
    pause = 0.05
    while True:
        try:
            return await step()
        except TRANSIENT as exc:
            if clock.monotonic() + pause > give_up:
                log.error(
                    "job=%s: %s failed on Redis (%s); left pending for redelivery",
                    shown(job_id),
                    what,
                    exc,
                )
                raise GaveUp(f"{what}: {exc}") from exc
            log.warning(
                "job=%s: %s failed on Redis (%s); trying again in %.2f s",
                shown(job_id),
                what,
                exc,
                pause,
            )
            await asyncio.sleep(pause)  # not interrupted by stop(): a drain wants the write
            pause = min(pause * 2, 5.0)


def shape(job: Job, feature: FeatureConfig, params: dict[str, Any]) -> list[str]:
    """Apply the feature's max_tokens default and cap and its max_input_tokens to params;
    what was changed, for route_reason. Raises TooLarge."""
    notes: list[str] = []
    wanted = int(params.get("max_tokens") or feature.max_tokens)
    cap = feature.max_tokens_cap
    if cap is not None and wanted > cap:
        notes.append(f"max_tokens {wanted} clamped to {cap}")
        wanted = cap
    params["max_tokens"] = wanted
    most = feature.max_input_tokens
    if most is None or (size := raw_estimate(params)) <= most:
        return notes
    name = f"features.{job.feature}"
    if feature.input_overflow == "truncate":
        kept = _newest_turns(params, most)
        if kept is not None:
            dropped = len(params["messages"]) - len(kept)
            params["messages"] = kept
            notes.append(f"kept the newest {len(kept)} messages ({dropped} dropped)")
            return notes
        advice = "; even its last message alone is over it. Shorten the request."
    else:
        advice = (
            f'. Shorten it, or set {name}.input_overflow = "truncate" to keep only the '
            "newest turns."
        )
    raise TooLarge(
        f"the request is about {size} input tokens, over {name}.max_input_tokens = {most}" + advice
    )


def _newest_turns(params: dict[str, Any], most: int) -> list[Any] | None:
    """The newest messages that fit `most` estimated tokens, starting with a user turn."""
    messages = list(params["messages"])
    while len(messages) > 1 and raw_estimate({**params, "messages": messages}) > most:
        messages.pop(0)
        while len(messages) > 1 and messages[0].get("role") != "user":
            messages.pop(0)  # a conversation starts with the user's turn
    return messages if raw_estimate({**params, "messages": messages}) <= most else None


def more_room(feature: FeatureConfig, max_tokens: int) -> int:
    """An answer cut at max_tokens is retried with twice the room, up to max_tokens_cap: a
    dearer model alone writes no shorter."""
    cap = feature.max_tokens_cap
    return max_tokens if cap is None or max_tokens >= cap else min(cap, max_tokens * 2)


def text_of(message: ApiMessage) -> str:
    """The answer's text blocks, joined."""
    return "".join(b.get("text", "") for b in message.content if b.get("type") == "text")


def failure_answer(exc: BaseException) -> Answer:
    """What a failed call tells the limiter: its status and headers, if it got an answer."""
    if isinstance(exc, anthropic.APIStatusError):
        return Answer(None, exc.response.headers, exc.status_code)
    return Answer(None, {}, 0)


def check_deadline(job: Job) -> None:
    """Raise DeadlineExceeded once the job's deadline_ms has passed."""
    now = clock.now_ms()
    if job.deadline_ms is not None and now > job.deadline_ms:
        raise DeadlineExceeded(
            f"deadline_ms {job.deadline_ms} passed before the job could run "
            f"({now - job.deadline_ms} ms late); submit it again with a later deadline"
        )


def exhausted(attempts: int, last_error: str) -> AttemptsExhausted:
    return AttemptsExhausted(
        f"the job failed {attempts} attempts (queue.max_attempts); last error: "
        f"{last_error or 'its worker stopped mid-call each time'}. Replay it when the cause "
        "is fixed (tokenq dead replay).",
        attempts=attempts,
    )


def describe(exc: Exception) -> str:
    """An SDK error in one line: class, status, the API's message and request id. Control
    characters are escaped: an API message may quote the request, and it goes into logs."""
    if isinstance(exc, anthropic.APIStatusError):
        request_id = exc.response.headers.get("request-id", "-")
        text = f"{type(exc).__name__} {exc.status_code}: {exc.message} (request-id {request_id})"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text if text.isprintable() else repr(text)[1:-1]
