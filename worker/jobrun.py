"""A job's run: its whole life from the first read to the finish, in one typed record.

Attempts, every API call with its usage and cost (or, for a call whose answer was lost, its
estimate and worst case), the budget reservation a call in flight holds, the route and its
changes, the first enqueue and the deferrals: one `JobRun`, kept in the job's state hash
(`<prefix>:state:<id>`, field `run`, JSON with short keys) and carried by the job wherever it
goes: put off and back, to and from the batcher, reclaimed by another worker, retried after a
Redis error. Everything that writes a result or a usage event reads it (worker.outcomes).

The rules it keeps:
- `attempts` are the calls started for the job's answer (first tries, retries, escalations,
  batches), whatever happened between them; `queue.max_attempts` bounds them over the whole
  life. A call refused with the organization's spend-limit 429 is not counted (nothing was
  billed and the job is not at fault), nor is the router's classifier call (routing, not an
  answer). Unexpected errors before a call count too (`failures`).
- A call is recorded *before* it is sent (state `sent`), so a worker that takes over a job
  whose owner died mid-call knows it: that call becomes `lost`, reported by a usage event of
  kind `orphan` with its estimate and worst case.
- Writes are whole-record sets (`save_into`, a command for the caller's pipeline or
  transaction): only the worker holding the job writes its run, so nothing needs a
  read-modify-write round trip.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

CallState = Literal["sent", "answered", "failed", "lost"]


# The stored keys: short, since a run is written before every call.
CALL_KEYS = dict(
    model="m",
    tier="t",
    mode="b",
    started_ms="s",
    state="st",
    counted="n",
    input_tokens="i",
    output_tokens="o",
    cache_write="w",
    cache_read="r",
    cost_usd="c",
    estimate_tokens="ei",
    estimate_usd="ec",
    reserved_usd="x",
    hold="h",
    hold_keys="hk",
    latency_ms="l",
    error="e",
    check="k",
)
RUN_KEYS = dict(
    first_ms="t0",
    calls="c",
    failures="f",
    last_error="e",
    tier="t",
    route="r",
    escalations="x",
    max_tokens="mt",
    deferrals="d",
    deferred_ms="dm",
    deferred_at_ms="da",
    response_cache="rc",
    kind="k",
    in_use="u",
    embedding_tokens="et",
    embedding_usd="eu",
)


class Call(msgspec.Struct, kw_only=True, omit_defaults=True, rename=CALL_KEYS):
    """One API call of a job (or one batch the job was in)."""

    model: str
    tier: str
    mode: Literal["realtime", "batch"] = "realtime"
    started_ms: int
    state: CallState = "sent"
    counted: bool = True  # toward queue.max_attempts
    # What the API reported and what it cost (answered calls).
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write: int = 0
    cache_read: int = 0
    cost_usd: float = 0.0
    # Known before the call: the input estimate, the expected cost and the worst case.
    estimate_tokens: int = 0
    estimate_usd: float = 0.0
    reserved_usd: float = 0.0
    # The budget reservation it holds while sent: its id and the caps' keys (for a worker
    # that settles it after the owner died).
    hold: str = ""
    hold_keys: list[str] = []
    latency_ms: int = 0
    error: str = ""
    # Why the answer failed its feature's check ("" when it passed, or was not checked: the
    # router's classifier call), for what the adaptive router and max_tokens learn.
    check: str = ""


class JobRun(msgspec.Struct, kw_only=True, omit_defaults=True, rename=RUN_KEYS):
    """A job's life so far (see the module docstring)."""

    first_ms: int  # the first entry's enqueue time (its stream entry id), unix ms
    calls: list[Call] = []
    failures: int = 0  # unexpected errors before a call (a bug), at the job boundary
    last_error: str = ""  # why the last attempt failed, for the dead letter
    tier: str = ""  # where the job runs now ("" until routed)
    route: list[str] = []  # route_reason's parts so far
    escalations: int = 0
    max_tokens: int = 0  # the room after an escalation for room (0: as the job asked)
    deferrals: int = 0
    deferred_ms: int = 0  # time spent in the deferred set, all deferrals together
    deferred_at_ms: int = 0  # when the deferral under way began (0: none)
    response_cache: str = ""  # what the response cache did ("off", "miss", ...)
    # The adaptive router's kind of job ("" when the feature is not routed adaptively), and
    # the tier the fleet should now use for that kind when this job's route changed it.
    kind: str = ""
    in_use: str = ""
    # The semantic cache's lookups: tokens embedded and their cost (part of the job's cost).
    embedding_tokens: int = 0
    embedding_usd: float = 0.0

    @property
    def attempts(self) -> int:
        """Calls started for the job's answer (see the module docstring)."""
        return sum(1 for c in self.calls if c.counted)

    @property
    def tries(self) -> int:
        """What queue.max_attempts bounds: attempts and unexpected failures together."""
        return self.attempts + self.failures

    def in_flight(self) -> list[Call]:
        """Calls recorded as sent that never came back: their owner died or was cancelled."""
        return [c for c in self.calls if c.state == "sent" and c.mode == "realtime"]

    def answered(self) -> list[Call]:
        return [c for c in self.calls if c.state == "answered"]

    def cost_usd(self) -> float:
        """What the answered calls and the embeddings cost (lost calls are reported apart, as
        orphans)."""
        return self.embedding_usd + sum(c.cost_usd for c in self.calls if c.state == "answered")

    def returned(self, entry_ms: int) -> None:
        """The job is back from the deferred set in an entry enqueued at entry_ms."""
        if self.deferred_at_ms:
            self.deferred_ms += max(0, entry_ms - self.deferred_at_ms)
            self.deferred_at_ms = 0

    def put_off(self, now_ms: int) -> None:
        """The job leaves its stream for the deferred set now."""
        self.deferrals += 1
        self.deferred_at_ms = now_ms


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(JobRun).decode


def encode(run: JobRun) -> bytes:
    return _encode(run)


def decode(raw: str | bytes | None, first_ms: int) -> JobRun:
    """The run stored in a state hash, or a new one for a job first enqueued at first_ms.

    A record that does not decode (written by a newer or older tokenq, or by hand) starts a
    new run: the job is not lost, only its history is."""
    if raw:
        try:
            return _decode(raw)
        except msgspec.DecodeError:
            pass
    return JobRun(first_ms=first_ms)


def save_into(pipe: Any, state_key: str, run: JobRun) -> bytes:
    """Queue the write of the whole run on a pipeline or transaction the caller executes;
    the bytes written."""
    raw = encode(run)
    pipe.hset(state_key, "run", raw)
    return raw
