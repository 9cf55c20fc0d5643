"""Message Batches (anthropic-api.md §5): objects, a clock-driven lifecycle, and results.

A batch is processed on the simulator's clock, lazily: nothing runs in the background. Its
items finish one after another, evenly spread over `batch_seconds` from creation (item i of
n at created + (i+1)/n x batch_seconds); the batch is `in_progress` until the last one,
then `ended`. As the API says, every request stays in `processing` until the whole batch
ends. At the end each item is answered as POST /v1/messages would answer it (its params
checked then: validation is asynchronous, so a bad item is an `errored` result, not a 400),
through the prompt cache, billed at the batch price and in the ledger's `batch` section,
with `service_tier: "batch"`. Items do not use the realtime rate limits.

Seeded fates: with `batch_error_rate` and `batch_expiry_rate` each item is, by a roll made
when the batch is created (seeded by the seed and the batch's number), answered as an
`errored` api_error or left `expired`. Items still unfinished 24 h after creation expire as
well, and the batch then ends at `expires_at`.

Cancel: the batch goes `canceling`; the item in flight at that moment still finishes (the
API's "in-flight, non-interruptible requests may still finish"), the batch ends when it does,
and every later item is `canceled`.

Results are JSON lines in a seeded shuffled order (the API promises no order).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from simulator import cache, shapes, tokens, validate
from simulator.cache import Cache
from simulator.errors import ApiError, ErrorType
from simulator.grades import Grader
from simulator.ledger import Ledger
from simulator.tokens import Body

MAX_REQUESTS = 100_000  # per batch (§5.3)
MAX_QUEUED = 200_000  # requests in unfinished batches, all models (§3.2)
MAX_BODY_BYTES = 256 * 1024 * 1024  # §2.1
EXPIRY_S = 24 * 3600.0
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
LIST_LIMIT_MAX = 1000
LIST_LIMIT_DEFAULT = 20

Status = Literal["in_progress", "canceling", "ended"]
Fate = Literal["process", "error", "expire"]


class RequestCounts(msgspec.Struct):
    processing: int = 0
    succeeded: int = 0
    errored: int = 0
    canceled: int = 0
    expired: int = 0


class MessageBatch(msgspec.Struct, kw_only=True):
    """The `MessageBatch` object, fields in the API's order."""

    id: str
    type: Literal["message_batch"] = "message_batch"
    processing_status: Status
    request_counts: RequestCounts
    ended_at: str | None
    created_at: str
    expires_at: str
    archived_at: None = None
    cancel_initiated_at: str | None
    results_url: str | None


class BatchPage(msgspec.Struct):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeletedBatch(msgspec.Struct):
    id: str
    type: Literal["message_batch_deleted"] = "message_batch_deleted"


class Succeeded(msgspec.Struct, tag="succeeded", tag_field="type"):
    message: shapes.Message


class Errored(msgspec.Struct, tag="errored", tag_field="type"):
    error: shapes.ErrorBody


class Canceled(msgspec.Struct, tag="canceled", tag_field="type"):
    pass


class Expired(msgspec.Struct, tag="expired", tag_field="type"):
    pass


class ResultLine(msgspec.Struct):
    custom_id: str
    result: Succeeded | Errored | Canceled | Expired


class Batch:
    """One batch: its requests, their fates, its times (simulator clock) and, once ended,
    its result lines."""

    def __init__(
        self, batch_id: str, requests: list[tuple[str, Body]], fates: list[Fate], *,
        created_at: float, seconds: float, version: str, order_seed: str,
    ) -> None:  # fmt: skip
        self.id = batch_id
        self.requests = requests
        self.fates = fates
        self.created_at = created_at
        self.seconds = seconds
        self.version = version
        self.order_seed = order_seed
        self.expires_at = created_at + EXPIRY_S
        self.end = min(self.done_at(len(requests) - 1), self.expires_at)  # cancel moves it
        self.cancel_at: float | None = None
        self.ended_at: float | None = None
        self.counts = RequestCounts(processing=len(requests))
        self.lines: list[bytes] = []

    def done_at(self, i: int) -> float:
        """When item i finishes processing."""
        return self.created_at + (i + 1) / len(self.requests) * self.seconds

    def cancel(self, now: float) -> None:
        """Start canceling at `now`: the batch now ends when the item in flight finishes."""
        self.cancel_at = now
        n = len(self.requests)
        in_flight = int((now - self.created_at) * n / self.seconds) if self.seconds else n - 1
        while in_flight < n - 1 and self.done_at(in_flight) <= now:  # float rounding
            in_flight += 1
        self.end = min(self.end, self.done_at(min(in_flight, n - 1)))

    def status(self) -> Status:
        if self.ended_at is not None:
            return "ended"
        return "in_progress" if self.cancel_at is None else "canceling"


class Batches:
    """Every batch, oldest first; settles (processes) each one when the clock passes its end.
    POST /_sim/reset replaces it, with the new cache and ledger. Items are answered right or
    wrong by the `grader`'s ground truth of the moment they are settled."""

    def __init__(self, cache_: Cache, ledger: Ledger, grader: Grader) -> None:
        self.cache = cache_
        self.ledger = ledger
        self.grader = grader
        self.batches: dict[str, Batch] = {}
        self.created = 0  # numbers the batches, for their seeded rolls

    def create(
        self, requests: list[tuple[str, Body]], *, now: float, seconds: float, version: str,
        seed: int, error_rate: float, expiry_rate: float,
    ) -> Batch:  # fmt: skip
        """A new batch of checked requests (check_create); raises ApiError 429 when the
        processing queue cannot take them, as the API does."""
        queued = sum(b.counts.processing for b in self.batches.values() if b.ended_at is None)
        if queued + len(requests) > MAX_QUEUED:
            raise ApiError(
                429,
                f"Your organization has {queued:,} batch requests waiting to be processed; "
                f"{len(requests):,} more would exceed the limit of {MAX_QUEUED:,}. Wait for "
                "batches to end, then retry.",
            )  # wording a guess: §3.2 gives only the number
        self.created += 1
        rng = random.Random(f"{seed}/{self.created}")
        fates = [_fate(rng.random(), error_rate, expiry_rate) for _ in requests]
        batch = Batch(
            shapes.new_id("msgbatch_"), requests, fates, created_at=now, seconds=seconds,
            version=version, order_seed=f"{seed}/{self.created}/order",
        )  # fmt: skip
        self.batches[batch.id] = batch
        return batch

    def get(self, batch_id: str, now: float) -> Batch:
        """The batch, settled up to `now`; raises ApiError 404 for an unknown id."""
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"message_batch_id: no batch {batch_id!r} (deleted, or never made)")
        self.settle(batch, now)
        return batch

    def settle_all(self, now: float) -> None:
        for batch in self.batches.values():
            self.settle(batch, now)

    def settle(self, batch: Batch, now: float) -> None:
        """End the batch if the clock has passed its end: answer, bill and count each item."""
        if batch.ended_at is not None or now < batch.end:
            return
        end = batch.end
        counts = RequestCounts()
        lines: list[bytes] = []
        for i, (custom_id, params) in enumerate(batch.requests):
            result = self._result(batch, i, params, end)
            setattr(counts, _COUNT[type(result)], getattr(counts, _COUNT[type(result)]) + 1)
            lines.append(shapes.encode(ResultLine(custom_id, result)) + b"\n")
        random.Random(batch.order_seed).shuffle(lines)
        batch.counts, batch.lines, batch.ended_at = counts, lines, end

    def _result(
        self, batch: Batch, i: int, params: Body, end: float
    ) -> Succeeded | Errored | Canceled | Expired:
        done_at = batch.done_at(i)
        if done_at > end:  # not reached: canceled, or still waiting at 24 h
            canceled = batch.cancel_at is not None and done_at <= batch.expires_at
            return Canceled() if canceled else Expired()
        try:  # an invalid item is errored whatever its roll
            validate.check_request(params, version=batch.version)
            if params["max_tokens"] == 0:
                raise ApiError(400, "max_tokens: 0 (cache pre-warming) is not allowed in batches")
            prefix = cache.prefix_of(params)
        except ApiError as exc:
            return _errored(exc.status, exc.message, exc.error_type)
        fate = batch.fates[i]
        if fate == "expire":
            return Expired()
        if fate == "error":
            return _errored(500, "simulated batch item error (--batch-error-rate)")
        return Succeeded(self._answer(params, prefix, done_at))

    def _answer(self, params: Body, prefix: cache.Prefix | None, now: float) -> shapes.Message:
        model: str = params["model"]
        if prefix is None:
            plan = cache.uncached(tokens.input_tokens(params))
        else:
            plan = self.cache.plan(model, prefix, now)  # best effort at the API; always here
            self.cache.commit(plan, now)
        (text, output_tokens, stop_reason, stop_sequence), grade = self.grader.reply(params, model)
        usage = cache.usage_of(plan.split, output_tokens)
        self.ledger.bill(model, usage, batch=True, at=now)
        message_id = shapes.new_id("msg_")
        if grade is not None:
            self.grader.remember(message_id, model, grade)
        return shapes.Message(
            id=message_id,
            model=model,
            content=[shapes.TextBlock("text", text)] if text else [],
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            usage=shapes.api_usage(usage, service_tier="batch"),
        )

    def cancel(self, batch_id: str, now: float) -> Batch:
        """Start canceling; a batch already ended or canceling is left as it is (a guess:
        §5 does not say what the API answers then)."""
        batch = self.get(batch_id, now)
        if batch.ended_at is None and batch.cancel_at is None:
            batch.cancel(now)
            self.settle(batch, now)
        return batch

    def delete(self, batch_id: str, now: float) -> None:
        """Forget an ended batch; raises ApiError 400 while it is still processing."""
        batch = self.get(batch_id, now)
        if batch.ended_at is None:
            # Status and wording a guess (§5.3 UNCONFIRMED); the docs say: cancel it first.
            raise ApiError(
                400,
                f"Batch {batch_id} cannot be deleted while it is {batch.status()}; cancel it "
                "and wait for it to end first",
            )
        del self.batches[batch_id]

    def page(
        self, now: float, origin: str, *, after_id: str | None, before_id: str | None, limit: int
    ) -> BatchPage:
        """A page of batches, newest first, after (older than) or before (newer than) a
        cursor. A cursor that names no batch gives an empty page (a guess)."""
        self.settle_all(now)
        newest_first = list(reversed(self.batches.values()))
        ids = [b.id for b in newest_first]
        if before_id is not None:
            end = ids.index(before_id) if before_id in ids else 0
            chosen = newest_first[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            start = 0
            if after_id is not None:
                start = ids.index(after_id) + 1 if after_id in ids else len(ids)
            chosen = newest_first[start : start + limit]
            has_more = start + limit < len(ids)
        objects = [self.shown(b, origin) for b in chosen]
        first = chosen[0].id if chosen else None
        return BatchPage(objects, has_more, first, chosen[-1].id if chosen else None)

    def shown(self, batch: Batch, origin: str) -> MessageBatch:
        """The MessageBatch object; `origin` (scheme://host:port) makes results_url absolute."""
        ended = batch.ended_at is not None
        return MessageBatch(
            id=batch.id,
            processing_status=batch.status(),
            request_counts=msgspec.structs.replace(batch.counts),
            ended_at=rfc3339(batch.ended_at) if batch.ended_at is not None else None,
            created_at=rfc3339(batch.created_at),
            expires_at=rfc3339(batch.expires_at),
            cancel_initiated_at=rfc3339(batch.cancel_at) if batch.cancel_at is not None else None,
            results_url=f"{origin}/v1/messages/batches/{batch.id}/results" if ended else None,
        )

    def results(self, batch_id: str, now: float) -> Iterator[bytes]:
        """The result lines of an ended batch; raises ApiError 400 before it ends (a guess:
        §5.3 UNCONFIRMED; the SDK never asks that early)."""
        batch = self.get(batch_id, now)
        if batch.ended_at is None:
            raise ApiError(
                400,
                f"Batch {batch_id} is still {batch.status()}; results are available once "
                "processing_status is 'ended' (results_url is set then)",
            )
        return iter(batch.lines)


_COUNT: dict[type, str] = {
    Succeeded: "succeeded", Errored: "errored", Canceled: "canceled", Expired: "expired",
}  # fmt: skip


def _fate(roll: float, error_rate: float, expiry_rate: float) -> Fate:
    if roll < error_rate:
        return "error"
    return "expire" if roll < error_rate + expiry_rate else "process"


def _errored(status: int, message: str, error_type: ErrorType | None = None) -> Errored:
    detail_type = error_type or ApiError(status, message).error_type
    return Errored(
        shapes.ErrorBody(
            error=shapes.ErrorDetail(detail_type, message), request_id=shapes.new_id("req_")
        )
    )


def check_create(body: Any) -> list[tuple[str, Body]]:
    """The `requests` of a create body, as (custom_id, params); raises ApiError 400 naming
    the field for a shape the API refuses at once (params are checked later, per item)."""
    for name in body:
        if name != "requests":
            raise ApiError(400, f"{name}: Extra inputs are not permitted")
    requests = body.get("requests")
    if not isinstance(requests, list):
        raise ApiError(400, "requests: Field required (a list of {custom_id, params})")
    if not 1 <= len(requests) <= MAX_REQUESTS:
        raise ApiError(
            400, f"requests: a batch holds 1 to {MAX_REQUESTS:,} requests, not {len(requests):,}"
        )
    checked: list[tuple[str, Body]] = []
    seen: set[str] = set()
    for i, item in enumerate(requests):
        custom_id, params = _check_item(item, f"requests.{i}")
        if custom_id in seen:
            raise ApiError(
                400, f"requests.{i}.custom_id: {custom_id!r} is used twice; custom_id values "
                "must be unique within a batch",
            )  # fmt: skip
        seen.add(custom_id)
        checked.append((custom_id, params))
    return checked


def _check_item(item: Any, where: str) -> tuple[str, Body]:
    if not isinstance(item, dict):
        raise ApiError(400, f"{where}: Input should be an object with custom_id and params")
    for name in item:
        if name not in ("custom_id", "params"):
            raise ApiError(400, f"{where}.{name}: Extra inputs are not permitted")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str):
        raise ApiError(400, f"{where}.custom_id: Field required")
    if not CUSTOM_ID.fullmatch(custom_id):
        raise ApiError(
            400, f"{where}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
        )
    params = item.get("params")
    if not isinstance(params, dict):
        raise ApiError(400, f"{where}.params: Field required (an object of Messages params)")
    return custom_id, params


def rfc3339(ts: float) -> str:
    """`2026-10-21T12:40:59.123456Z`, as the API writes batch times."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
