"""The public contract: key names, stream entries, results, usage events and dead letters.

Everything another service or an operator depends on is defined here, once, as a `msgspec.Struct`
(the README documents the same fields). The contract only grows: a new field gets a default, no
field is renamed or retyped. This module imports nothing from the project.

Redis Cluster: the worker finishes a job with one MULTI over the job stream, the result key and the
usage stream, and those must share a slot there. With the prefix `{tokenq}` every key carries
the same hash tag; the default `tokenq` is for a single server (or a primary with replicas).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from typing import Annotated, Any, Literal
from urllib.parse import quote

import msgspec

Status = Literal["ok", "error"]
Mode = Literal["realtime", "batch", "cache"]
ErrorType = Literal[
    "malformed_job",
    "unknown_feature",
    "too_large",
    "deadline_exceeded",
    "invalid_request",
    "max_attempts",
    "budget_exceeded",
    "circuit_open",
    "duplicate_id",
    "removed",  # an operator took the entry out (tokenq jobs remove)
    "check_failed",  # the answer failed its feature's check after every escalation (no dead letter)
]
Kind = Literal["job", "alert", "orphan"]

GROUP = "workers"
"""The consumer group every worker reads the job streams with."""

BATCHER = "batcher"
"""The consumer of GROUP that holds the jobs of batch priorities (see worker.batcher)."""


class Keys:
    """Every Redis key name tokenq uses, built from one prefix (default `tokenq`)."""

    def __init__(self, prefix: str = "tokenq") -> None:
        self.prefix = prefix
        self.usage = f"{prefix}:usage"
        self.dead = f"{prefix}:dead"
        self.control = f"{prefix}:control"  # pub/sub channel: `reload` to every worker
        self.deferred = f"{prefix}:deferred"  # sorted set: jobs put off until their score (ms)

    @property
    def batcher_lease(self) -> str:
        """A string: the token of the process whose batcher is active, with a TTL."""
        return f"{self.prefix}:batcher:lease"

    @property
    def batches(self) -> str:
        """A sorted set of local batch ids by creation time (ms): the batcher's index."""
        return f"{self.prefix}:batches"

    @property
    def batch_ids(self) -> str:
        """A hash of the API's batch ids to local ones, for batches tokenq submitted."""
        return f"{self.prefix}:batches:api"

    def batch(self, local_id: str) -> str:
        """A hash: one batch's state, API id, times and counts."""
        return f"{self.prefix}:batch:{local_id}"

    def batch_members(self, local_id: str) -> str:
        """A hash of custom_id to the job it stands for, while the job awaits its result."""
        return f"{self.prefix}:batch:{local_id}:members"

    def alert(self, condition: str) -> str:
        """A string with a TTL: an alert for this condition (a digest) went out in the
        last alerts.period_s; SET NX makes one process of the fleet the one that sends it."""
        return f"{self.prefix}:alert:{condition}"

    @property
    def alerts_cursor(self) -> str:
        """A string: the last usage-stream entry `tokenq alerts` has looked at."""
        return f"{self.prefix}:alerts:cursor"

    def limits(self, model: str, feature: str | None = None) -> str:
        """A hash of rate-limit buckets: a model's, or a feature's share of it."""
        base = f"{self.prefix}:limits:{model}"
        return base if feature is None else f"{base}:{feature}"

    @property
    def rollup_queue(self) -> str:
        """A list: the usage events of finished jobs, which the finishing write appends, until
        a fold adds them to their hour's cells (see worker.rollups)."""
        return f"{self.prefix}:rollup:queue"

    @property
    def rollup_folding(self) -> str:
        """A string with a TTL: the process folding the rollups' queue (worker.rollups)."""
        return f"{self.prefix}:rollup:folding"

    def rollup_index(self, hour: str) -> str:
        """A hash: an hour's (YYYYMMDDHH, UTC) rollup cells (`K<id>` -> dimensions) and the
        tenants with rows of their own (`T<tenant>`, and their count `#T`)."""
        return f"{self.prefix}:rollup:h:{hour}"

    def rollup_cell(self, hour: str, cell: str) -> str:
        """A hash: one cell's metrics in one hour (see worker.rollups)."""
        return f"{self.prefix}:rollup:h:{hour}:{cell}"

    @property
    def rollup_live(self) -> str:
        """A sorted set of hour numbers (since the epoch, UTC): the hours with cells, until
        compacted (see worker.periods)."""
        return f"{self.prefix}:rollup:live"

    def rollup_hour(self, hour: str) -> str:
        """A hash: a finished hour's cells as blocks (worker.cells), views `all` and `cells`,
        compacted by the workers."""
        return f"{self.prefix}:rollup:hour:{hour}"

    @property
    def rollup_pending(self) -> str:
        """A sorted set of day numbers: days with hours compacted since the day was."""
        return f"{self.prefix}:rollup:pending"

    def rollup_day(self, day: str) -> str:
        """A hash: a finished day's (YYYYMMDD, UTC) cells as blocks, one per view (`all`,
        `tenant`, `feature-tenant`, `model-tenant`, `cells`; worker.cells.VIEWS), and its
        hours' `all` views in one (`hours`, worker.cells.HOURS)."""
        return f"{self.prefix}:rollup:day:{day}"

    @property
    def rollup_totals(self) -> str:
        """A string: the running totals of every compacted hour as a block; never expires."""
        return f"{self.prefix}:rollup:totals"

    @property
    def rollup_lease(self) -> str:
        """A string with a TTL: the process compacting the rollups (worker.compaction)."""
        return f"{self.prefix}:rollup:compacting"

    def jobs(self, priority: str) -> str:
        """The stream producers XADD jobs of this priority onto."""
        return f"{self.prefix}:jobs:{priority}"

    def result(self, job_id: str) -> str:
        """The result of a job, as JSON, kept queue.result_ttl_s."""
        return f"{self.prefix}:result:{job_id}"

    def done(self, job_id: str) -> str:
        """A short-lived list pushed when the result is written; result waiters BLPOP it."""
        return f"{self.prefix}:done:{job_id}"

    def state(self, job_id: str) -> str:
        """A hash: the claim on a job id (`owner`, `fp`, `since`) and the job's run (`run`)."""
        return f"{self.prefix}:state:{job_id}"

    def route(self, request_hash: str) -> str:
        """A string: the router classifier's tier for a request, by the request's hash."""
        return f"{self.prefix}:route:{request_hash}"

    def rcache(self, feature: str, scope: str, digest: str) -> str:
        """A string: a cached answer of a feature in a scope (`tenant:<t>` or `shared`)."""
        return f"{self.prefix}:rcache:{feature}:{scope}:{digest}"

    @staticmethod
    def rcache_lease(cached: str) -> str:
        """A string: the de-duplication lease of a response-cache key."""
        return f"{cached}:lease"

    @staticmethod
    def rcache_done(cached: str) -> str:
        """A stream: wakes the jobs waiting for a response-cache key's answer."""
        return f"{cached}:done"

    def budget(self, scope: str, period: str) -> str:
        """A hash: one spend cap's `spent`, `held` and `requests` in one period; scope
        `feature:<f>` or `tenant:<f>:<tenant>`."""
        return f"{self.prefix}:budget:{scope}:{period}"

    def budgets_of_tenants(self, feature: str, period: str) -> str:
        """A SCAN pattern: the tenant caps of a feature in one period."""
        return f"{self.prefix}:budget:tenant:{feature}:*:{period}"

    @staticmethod
    def budget_holds(budget: str) -> str:
        """A sorted set: a cap's live reservations by expiry."""
        return f"{budget}:holds"

    def breaker(self, name: str) -> str:
        """A hash: a circuit breaker's fleet state; name `feature:<f>` or `model:<id>`."""
        return f"{self.prefix}:breaker:{name}"

    def breaker_probes(self, name: str) -> str:
        """A sorted set: a half-open breaker's probe slots by expiry."""
        return f"{self.breaker(name)}:probes"

    @property
    def breakers(self) -> str:
        """A SCAN pattern: every breaker key (and their probe sets)."""
        return f"{self.prefix}:breaker:*"

    @property
    def spend_stop(self) -> str:
        """A string: set while the organization's spend limit stops every call of the fleet
        (a 429 `enforced_spend_limit_reached`); it expires when the month turns."""
        return f"{self.prefix}:spend:stop"

    # The adaptive router's keys (worker.adaptive, worker.maxtokens).
    @property
    def feedback(self) -> str:
        """The stream producers XADD quality verdicts onto (Feedback entries)."""
        return f"{self.prefix}:feedback"

    @property
    def feedback_counts(self) -> str:
        """A hash: feedback entries applied, unchanged, for an unknown job, malformed."""
        return f"{self.prefix}:feedback:counts"

    def outcomes(self, feature: str, horizon: str, epoch: int) -> str:
        """A hash: a feature's decayed counts of answers that passed and failed, per kind and
        tier, for one horizon ("w" or "r") and epoch."""
        return f"{self.prefix}:adaptive:{feature}:{horizon}{epoch}"

    def in_use(self, feature: str) -> str:
        """A hash: the tier the adaptive router sends a feature's jobs to, per kind of job."""
        return f"{self.prefix}:adaptive:{feature}:in_use"

    def answered(self, job_id: str) -> str:
        """A string: where a job's answer came from (feature, kind, tier, time), for feedback."""
        return f"{self.prefix}:answered:{job_id}"

    def lengths(self, feature: str, day: int) -> str:
        """A hash: a feature's answer lengths in one day, counted in fixed buckets."""
        return f"{self.prefix}:outlen:{feature}:{day}"

    # The semantic cache's keys (worker.semantic). A scope's keys share its base; feature
    # and tenant are percent-encoded there, so no name (a `:` in a tenant, say) can make
    # two scopes' keys meet.
    def semantic_scope(self, feature: str, tenant: str | None) -> str:
        """The base of a scope's keys: a feature's shared scope (tenant None) or a tenant's.
        Under it: `:index` (sorted set of entry ids by time), `:ver` (hash: `epoch`, `n`
        changes), `:log` (stream of changes), `:e:<entry id>` (string: an entry)."""
        who = "shared" if tenant is None else "t=" + quote(tenant, safe="")
        return f"{self.prefix}:semantic:{quote(feature, safe='')}:{who}"

    @property
    def semantic_scopes(self) -> str:
        """A set of the scope bases that hold entries (or did): for `tokenq cache`."""
        return f"{self.prefix}:semantic:scopes"

    def semantic_source(self, job_id: str) -> str:
        """A string: the scope base and entry id of the entry a job's answer became."""
        return f"{self.prefix}:semantic:job:{job_id}"

    def semantic_hit(self, job_id: str) -> str:
        """A string: a job answered from the semantic cache: its entry, similarity, pair."""
        return f"{self.prefix}:semantic:hit:{job_id}"

    def semantic_trust(self, feature: str) -> str:
        """A hash: the decayed count of `bad` verdicts on a feature's semantic hits."""
        return f"{self.prefix}:semantic:trust:{quote(feature, safe='')}"


NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """A jobs-stream entry, field for field as the README documents it.

    Fields this struct does not know are ignored, so producers may add their own (a trace id).
    """

    feature: NonEmpty
    request: str  # JSON text; decoded into Request separately
    id: NonEmpty | None = None
    tenant: str | None = None
    tier: NonEmpty | None = None
    reply_to: NonEmpty | None = None
    deadline_ms: int | None = None
    cache: Literal["off"] | None = None  # "off": no response cache or de-duplication


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The Messages API parameters a job may carry (`model` is chosen by tokenq).

    `temperature`, `top_p` and `top_k` are absent on purpose: API version 2026-10-21 rejects them.
    """

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop_sequences: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


REQUEST_FIELDS = tuple(f.name for f in msgspec.structs.fields(Request))


class ErrorInfo(msgspec.Struct, frozen=True):
    type: str
    message: str


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """What `tokenq:result:<id>` holds (JSON) and what `reply_to` receives in field `result`."""

    id: str
    status: Status
    text: str = ""
    content: list[Any] = []
    model: str | None = None
    tier: str | None = None
    stop_reason: str | None = None
    usage: dict[str, Any] | None = None
    cost_usd: float = 0.0
    mode: Mode = "realtime"
    error: ErrorInfo | None = None
    # Added with the semantic cache: a job answered from it (response_cache "semantic") has
    # the similarity of its question to the one whose answer it got, and that job's id.
    semantic_similarity: float | None = None
    semantic_source_job_id: str | None = None


class UsageEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of `tokenq:usage` per job outcome. Never holds prompts or completions."""

    ts_ms: int
    job_id: str
    feature: str
    tenant: str = ""
    priority: str = ""
    tier: str = ""
    model: str = ""
    mode: Mode = "realtime"
    status: Status = "ok"
    attempt: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0
    latency_ms: int = 0
    queue_ms: int = 0
    route_reason: str = ""
    error_type: str = ""
    # Added after DESIGN.md: "alert" entries (a budget reaching budgets.alert_at, the
    # organization's spend limit) share the stream; they carry `message`, and `cost_usd` is
    # the spend so far; job_id is "". "orphan" entries report a call whose answer never came.
    kind: Kind = "job"
    message: str = ""
    # The response cache's part: "hit" (answered from the cache), "joined" (answered by an
    # identical call in flight), "miss" (called the API), "off" (not used), "no_tenant" (the
    # feature's cache is scoped to the tenant and the job has none), "" (not a job).
    response_cache: str = ""
    # Added with the job run: the part of queue_ms the job spent in the deferred set, and for
    # an "orphan" event (a call whose answer never came) the most that call can have cost.
    deferred_ms: int = 0
    reserved_usd: float = 0.0
    # Added with the semantic cache: the tokens its lookups embedded (their cost is in
    # cost_usd), and for a hit (response_cache "semantic") the similarity and the job whose
    # answer was reused; 0 and "" otherwise.
    embedding_tokens: int = 0
    semantic_similarity: float = 0.0
    semantic_source_job_id: str = ""


class Feedback(msgspec.Struct, frozen=True, kw_only=True):
    """A `tokenq:feedback` entry: a producer's verdict on a job's answer, after the fact."""

    job_id: NonEmpty
    verdict: Literal["good", "bad"]
    reason: str = ""  # free text, for people; kept cut to 200 characters


def usd(value: float) -> str:
    """A dollar amount as a stream field: fixed point, 10 decimals, no exponent."""
    return f"{value:.10f}".rstrip("0").rstrip(".") or "0"


def usd_amount(value: float) -> float:
    """A dollar amount for a result's JSON: the float nearest to usd(value), so the number
    written has the usage event's digits (0.0000221, not 0.000022100000000000002)."""
    return float(usd(value))


def to_fields(event: UsageEvent) -> dict[str, str]:
    """A usage event as flat string fields for XADD."""
    out: dict[str, str] = {}
    for name in event.__struct_fields__:
        value = getattr(event, name)
        out[name] = usd(value) if isinstance(value, float) else str(value)
    return out


def from_fields(fields: dict[str, str]) -> UsageEvent:
    """A usage-stream entry back into a UsageEvent (stream fields are all strings)."""
    return msgspec.convert(fields, UsageEvent, strict=False)


def decode_job(fields: dict[str, str]) -> Job:
    """A jobs-stream entry as a Job; raises msgspec.ValidationError naming the field."""
    return msgspec.convert(fields, Job, strict=False)


# -- producer-supplied text: ids, fingerprints, showing it in logs --

MAX_ID_CHARS = 255
_ENTRY_ID = re.compile(r"[0-9]+-[0-9]+")


def is_reserved_id(value: str, priorities: Collection[str]) -> bool:
    """Whether `value` has the form of the id of a job without `id`: a stream entry id
    (`<ms>-<seq>`), or `<priority>:<entry id>` for one of `priorities`. Such an `id` is
    accepted only from tokenq itself (a deferred, requeued or replayed job keeps its id),
    which worker.claims tells apart by the job's fingerprint."""
    head, colon, tail = value.partition(":")
    if not colon:
        return _ENTRY_ID.fullmatch(value) is not None
    return head in priorities and _ENTRY_ID.fullmatch(tail) is not None


def id_problem(value: str) -> str | None:
    """Why `value` cannot be a job id (a sentence), or None: 1 to 255 printable characters,
    no spaces, valid UTF-8 (the rules of the README's Jobs table)."""
    if not value:
        return "`id` is empty; leave the field out for a default id, or give 1 to 255 characters"
    if len(value) > MAX_ID_CHARS:
        return f"`id` is {len(value)} characters long; at most {MAX_ID_CHARS} are allowed"
    # str.isprintable() is False for every whitespace character but the ASCII space, so the
    # id is walked char by char only when it has a bad one (a job reads its id a dozen times).
    if not value.isprintable() or " " in value:
        bad = next(c for c in value if not c.isprintable() or c.isspace())
        return (
            f"`id` {shown(value, 60)} contains {bad!a}; ids are printable characters "
            "without spaces or control characters"
        )
    return None


def fingerprint(fields: dict[str, str]) -> str:
    """What makes two jobs the same job for their `id`: tenant, feature and request, as sent.

    Hex SHA-256 (40 digits) of the raw field values, so a job with invalid JSON or invalid
    UTF-8 has one too (the bytes are recovered from surrogate escapes).
    """
    digest = hashlib.sha256()
    for name in ("tenant", "feature", "request"):
        value = fields.get(name)
        raw = b"-" if value is None else b"=" + value.encode("utf-8", "surrogateescape")
        digest.update(b"%d:" % len(raw) + raw)
    return digest.hexdigest()[:40]


def clean(text: str) -> str:
    """`text` as valid UTF-8: bytes that were not (kept as surrogate escapes by the Redis
    client) become U+FFFD. Everything tokenq writes besides a job's own copy goes through it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no undecodable byte stands for
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def shown(text: str, limit: int = 200) -> str:
    """Producer-supplied text for a log line or an error sentence: quoted, at most `limit`
    characters, control characters and line breaks escaped, so no field can forge a line."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return repr(clean(cut))


def entry_ms(entry_id: str) -> int:
    """The unix time in ms at which Redis assigned a stream entry id (`<ms>-<seq>`)."""
    return int(entry_id.partition("-")[0])


def as_text(value: Any) -> str:
    """A Redis reply value as str (clients may decode replies or not)."""
    return value.decode() if isinstance(value, bytes) else str(value)
