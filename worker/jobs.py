"""A job's parts between the stream and the API: its fields parsed and checked, the errors
worth another attempt, the API's answer, what the job's calls spent, how it was routed, and
the outcomes a job can have short of a result (put off, refused by a budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anthropic
import msgspec

from worker import clock
from worker.budgets import Refusal
from worker.caching import CachedAnswer
from worker.config import FeatureConfig
from worker.contract import Job
from worker.errors import AttemptsExhausted, DeadlineExceeded
from worker.limiter import Answer
from worker.usage import ApiUsage

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


# The classifier is optional: any API error makes the router fall back to its default tier.
CLASSIFIER_ERRORS: tuple[type[Exception], ...] = (*RETRYABLE, anthropic.APIStatusError)


class ApiMessage(msgspec.Struct, frozen=True):
    """The parts of a Messages API response the worker reads."""

    model: str
    content: list[dict[str, Any]]
    usage: dict[str, Any]
    stop_reason: str | None = None


decode_message = msgspec.json.Decoder(ApiMessage).decode


@dataclass
class Spend:
    """What a job's calls used, summed: a classifier call, escalations, the answer."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_write: int = 0
    cache_read: int = 0
    cost_usd: float = 0.0

    def add(self, usage: ApiUsage, cost: float) -> None:
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cache_write += usage.cache_write
        self.cache_read += usage.cache_read
        self.cost_usd += cost


@dataclass
class Plan:
    """Where a job is routed, how it got there (route_reason's parts), and what the
    response cache did: "off", "miss" (and then the answer worth keeping)."""

    tier: str
    route: list[str]
    escalations: int = 0
    cache: str = "off"
    answer: CachedAnswer | None = None


@dataclass(frozen=True)
class Defer:
    """Put the job off until until_ms (unix ms), for the reason given. `waits`: the job is a
    copy of one still pending in another entry (see worker.claims); it holds no claim."""

    until_ms: int
    why: str
    waits: bool = False


class Refused(Exception):
    """A budget cap refused a call's reservation."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.sentence())
        self.refusal = refusal


def more_room(feature: FeatureConfig, params: dict[str, Any]) -> str:
    """An answer cut at max_tokens is retried with twice the room, up to max_tokens_cap: a
    dearer model alone writes no shorter. Changes params; says what it did."""
    cap, wanted = feature.max_tokens_cap, int(params["max_tokens"])
    if cap is None or wanted >= cap:
        return ""
    params["max_tokens"] = min(cap, wanted * 2)
    return f" (max_tokens {wanted} -> {params['max_tokens']})"


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
