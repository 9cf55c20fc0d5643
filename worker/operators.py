"""Stuck entries, consumers and batches for operators: `tokenq jobs remove`, `tokenq consumers`,
`tokenq batches`.

With worker.queue these are the only places that acknowledge a job entry (XACK): queue.py for
the workers and the batcher, this module for an operator who takes an entry out by hand, in
one script that also writes its dead letter, error result and usage event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from worker import jobrun
from worker.contract import (
    GROUP,
    ErrorInfo,
    Job,
    Keys,
    Result,
    UsageEvent,
    as_text,
    entry_ms,
    fingerprint,
    id_problem,
    to_fields,
    usd_amount,
)
from worker.entries import Entry, raw_command, scan, shown
from worker.jobrun import JobRun

if TYPE_CHECKING:
    import anthropic

ENTRY_ID = re.compile(r"[0-9]+-[0-9]+")


@dataclass(frozen=True, slots=True)
class Holder:
    """The consumer a pending entry was delivered to: how long ago, how often, and how long
    since that consumer last read or renewed anything (its process's sign of life)."""

    consumer: str
    idle_ms: int
    deliveries: int
    consumer_idle_ms: int


@dataclass(frozen=True, slots=True)
class JobEntry:
    """An entry of a job stream, found by `tokenq jobs remove`."""

    priority: str
    stream: str
    entry: Entry
    job_id: str  # the key of its result: the producer's `id`, else its default id
    holder: Holder | None  # None: no worker has it (not delivered, or no group)

    def held_by_live_worker(self, visibility_ms: int) -> bool:
        """Whether the consumer holding it has shown life within the visibility timeout: a
        live worker that may still finish it."""
        return self.holder is not None and self.holder.consumer_idle_ms < visibility_ms


async def find_job_entries(
    redis: aioredis.Redis, keys: Keys, priorities: list[str], ident: str, *, cut_bytes: int
) -> list[JobEntry]:
    """The job-stream entries `ident` names: an entry id (`<ms>-<seq>`, or
    `<priority>:<entry id>` as a default job id), or a job id given as `id` by a producer.
    Looks in every priority stream; values are cut to cut_bytes."""
    found: list[JobEntry] = []
    for priority in priorities:
        stream = keys.jobs(priority)
        named, _, rest = ident.partition(":")
        entry_id = rest if named == priority else ident
        entries = await scan(redis, stream, match={"id": [ident]}, cut_bytes=cut_bytes)
        if ENTRY_ID.fullmatch(entry_id):
            entries += await scan(redis, stream, low=entry_id, high=entry_id, cut_bytes=cut_bytes)
        seen: set[str] = set()
        for entry in entries:
            if entry.entry_id not in seen:
                seen.add(entry.entry_id)
                job_id = await _job_id_of(redis, keys, priority, entry)
                holder = await _holder(redis, stream, entry.entry_id)
                found.append(JobEntry(priority, stream, entry, job_id, holder))
    return found


async def _job_id_of(redis: aioredis.Redis, keys: Keys, priority: str, entry: Entry) -> str:
    """The key of the entry's result, as the worker would choose it (see Delivery.job_id and
    worker.claims): the producer's `id` when it is a usable id that no other job holds, else
    the entry's own `<priority>:<entry id>`; without an `id`, the default id."""
    qualified = f"{priority}:{entry.entry_id}"
    explicit = entry.raw.get(b"id")
    if explicit is not None:
        text = explicit.decode("utf-8", "surrogateescape")
        if not _is_text(explicit) or id_problem(text) is not None:
            return qualified
        held: Any = await redis.hget(keys.state(text), "fp")
        mine = fingerprint(entry.lossless)
        return text if held in (None, mine) else qualified
    owner: Any = await redis.hget(keys.state(entry.entry_id), "owner")
    return entry.entry_id if owner in (None, qualified) else qualified


def _is_text(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


async def _holder(redis: aioredis.Redis, stream: str, entry_id: str) -> Holder | None:
    try:
        rows: Any = await raw_command(
            redis, "XPENDING", stream, GROUP, entry_id, entry_id, 1, parse_detail=True
        )
        consumers: Any = await raw_command(redis, "XINFO", "CONSUMERS", stream, GROUP)
    except ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        return None
    if not rows:
        return None
    row = rows[0]
    idle = {c[b"name"]: int(c[b"idle"]) for c in consumers}
    return Holder(
        shown(row["consumer"]),
        int(row["time_since_delivered"]),
        int(row["times_delivered"]),
        idle.get(row["consumer"], int(row["time_since_delivered"])),
    )


@dataclass(frozen=True, slots=True)
class Removal:
    """What `remove_job_entry` wrote: the dead letter, and whether the job got an error
    result (not when its id already had one) and a reply on its reply_to stream."""

    dead_id: str
    result_written: bool
    replied: bool


# KEYS: the job stream, the dead letters, the result, the usage stream, the done list, the
# state hash[, the reply_to stream]. ARGV: group, entry id, result JSON, result TTL s, usage
# maxlen, n, the dead letter's n names and values, the usage event's. Nothing is written when
# the entry is gone (a worker finished it meanwhile): false. A job whose id already has a
# result keeps it, with no second outcome. The reply goes only to a stream, or a key not there.
_REMOVE = """
if redis.call('XDEL', KEYS[1], ARGV[2]) == 0 then return false end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local n = tonumber(ARGV[6])
local dead_id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 7, 6 + n))
if redis.call('EXISTS', KEYS[3]) == 1 then return {dead_id, 0, 0} end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 7 + n))
redis.call('RPUSH', KEYS[5], 1)
redis.call('EXPIRE', KEYS[5], math.min(tonumber(ARGV[4]), 300))
redis.call('HDEL', KEYS[6], 'run')
redis.call('EXPIRE', KEYS[6], ARGV[4])
if KEYS[7] then
  local kind = redis.call('TYPE', KEYS[7])['ok']
  if kind == 'stream' or kind == 'none' then
    redis.call('XADD', KEYS[7], '*', 'result', ARGV[3])
    return {dead_id, 1, 1}
  end
end
return {dead_id, 1, 0}
"""
KEPT_FIELDS = 1000  # a dead letter of a removed entry keeps at most this many of its fields
KEPT_BYTES = 1024  # ... each cut to this, when the entry is too large to keep whole
_JOB_FIELDS = [name.encode() for name in Job.__struct_fields__]


async def remove_job_entry(
    redis: aioredis.Redis,
    keys: Keys,
    job: JobEntry,
    *,
    now_ms: int,
    result_ttl_s: int,
    usage_maxlen: int,
    max_entry_bytes: int,
    reply_to: str | None,
) -> Removal | None:
    """Take a job entry out of its stream and the group's pending list, with a dead letter
    (error_type `removed`) saying an operator removed it, an error result, a usage event and
    a reply on its reply_to, so that a waiting producer learns at once: one script, so a
    worker finishing the entry meanwhile and this cannot both happen. None when the entry was
    gone already.

    A job whose id already has a result keeps it: only the dead letter is written then.
    `reply_to`: the job's reply stream when the job may write to it (admission.reply_to_of).
    """
    state = keys.state(job.job_id)
    stored: Any = await redis.hget(state, "run")
    run = jobrun.decode(stored, entry_ms(job.entry.entry_id))
    had_result = bool(await redis.exists(keys.result(job.job_id)))
    dead, result, event = _removal_records(job, run, had_result, now_ms, max_entry_bytes)
    reply = reply_to
    names = [job.stream, keys.dead, keys.result(job.job_id), keys.usage, keys.done(job.job_id)]
    names += [state, *([reply] if reply else [])]
    flat_dead = [part for pair in dead.items() for part in pair]
    flat_usage = [part for pair in to_fields(event).items() for part in pair]
    args: list[bytes | str | int] = [GROUP, job.entry.entry_id, result, result_ttl_s]
    args += [usage_maxlen, len(flat_dead)]
    done: Any = await redis.eval(_REMOVE, len(names), *names, *args, *flat_dead, *flat_usage)
    if not done:
        return None
    dead_id, written, replied = done
    return Removal(as_text(dead_id), bool(written), bool(replied))


def _removal_records(
    job: JobEntry, run: JobRun, had_result: bool, now_ms: int, max_entry_bytes: int
) -> tuple[dict[bytes, bytes], bytes, UsageEvent]:
    """The dead letter, error result and usage event of a removed entry (with what the calls
    of its run cost: a job can be removed after paid calls)."""
    from worker import outcomes  # it imports the SDK, seconds to load: only for a removal

    attempts = run.attempts
    kept, note = _kept(job.entry, max_entry_bytes)
    error = _removed_sentence(job, had_result) + note
    where = {"priority": job.priority, "entry_id": job.entry.entry_id, "job_id": job.job_id}
    ours = {"error_type": "removed", "error": error, "attempts": str(attempts), **where}
    dead = {**kept, **{k.encode(): v.encode() for k, v in ours.items()}}
    result = Result(id=job.job_id, status="error", error=ErrorInfo("removed", error),
                    cost_usd=usd_amount(run.cost_usd()))  # fmt: skip
    event = UsageEvent(
        **outcomes.totals(run),
        ts_ms=now_ms,
        job_id=job.job_id,
        feature=job.entry.get("feature") or "",
        tenant=job.entry.get("tenant") or "",
        priority=job.priority,
        status="error",
        queue_ms=max(0, now_ms - run.first_ms),
        error_type="removed",
    )
    return dead, msgspec.json.encode(result), event


def _removed_sentence(job: JobEntry, had_result: bool) -> str:
    where = f"removed by an operator (tokenq jobs remove) from {job.stream}"
    h = job.holder
    if h is None:
        where += ", where no worker had taken it"
    else:
        times = "1 delivery" if h.deliveries == 1 else f"{h.deliveries} deliveries"
        where += f", where consumer {h.consumer} held it for {h.idle_ms / 1000:.0f} s after {times}"
    if had_result:
        return where + f". Job {job.job_id!r} already had a result, left as it was."
    return where + ". Fix what kept it there, then replay it (tokenq dead replay)."


def _kept(entry: Entry, max_bytes: int) -> tuple[dict[bytes, bytes], str]:
    """The fields a dead letter keeps of an entry: all of them, unless the entry is over
    max_bytes or KEPT_FIELDS; then tokenq's job fields first, each value cut to KEPT_BYTES,
    and a sentence saying so."""
    size = sum(len(k) + entry.cut.get(k, len(v)) for k, v in entry.raw.items())
    if size <= max_bytes and len(entry.raw) <= KEPT_FIELDS:
        return dict(entry.raw), ""
    names = sorted(entry.raw, key=lambda name: name not in _JOB_FIELDS)[:KEPT_FIELDS]
    return {name: entry.raw[name][:KEPT_BYTES] for name in names}, (
        f" The entry ({size:,} bytes in {len(entry.raw):,} fields) was too large to keep "
        f"whole: this dead letter keeps {len(names):,} of its fields, each value cut to "
        f"{KEPT_BYTES:,} bytes."
    )


@dataclass(frozen=True, slots=True)
class ConsumerRow:
    """One consumer of the group on one job stream, as XINFO CONSUMERS reports it."""

    priority: str
    stream: str
    name: bytes  # as Redis holds it: `prune_consumer` needs it back exactly
    pending: int
    idle_ms: int  # since it last read, claimed or renewed anything

    def stale(self, visibility_ms: int) -> bool:
        """No sign of life within the visibility timeout: its process is gone (a live worker
        reads every worker.block_ms and renews its jobs every third of the timeout)."""
        return self.idle_ms >= visibility_ms


async def consumer_rows(
    redis: aioredis.Redis, keys: Keys, priorities: list[str]
) -> list[ConsumerRow]:
    """Every consumer of the group on every job stream, priority by priority."""
    rows: list[ConsumerRow] = []
    for priority in priorities:
        stream = keys.jobs(priority)
        try:
            consumers: Any = await raw_command(redis, "XINFO", "CONSUMERS", stream, GROUP)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            continue
        rows += [
            ConsumerRow(priority, stream, c[b"name"], int(c[b"pending"]), int(c[b"idle"]))
            for c in consumers
        ]
    return rows


# KEYS: a job stream. ARGV: group, consumer, least idle ms. Deletes the consumer only when it
# holds nothing and is idle that long, checked in the same step: XGROUP DELCONSUMER discards
# a consumer's pending entries, so a consumer that read a job meanwhile must be left alone.
# Returns {1 deleted or 0 left (-1 not there), pending, idle ms}.
_PRUNE = """
for _, row in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #row, 2 do c[row[i]] = row[i + 1] end
  if c['name'] == ARGV[2] then
    if c['pending'] > 0 or c['idle'] < tonumber(ARGV[3]) then
      return {0, c['pending'], c['idle']}
    end
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return {1, 0, c['idle']}
  end
end
return {-1, 0, 0}
"""


async def prune_consumer(redis: aioredis.Redis, row: ConsumerRow, min_idle_ms: int) -> bool:
    """Delete a consumer that still holds nothing and is still idle min_idle_ms; whether it
    was deleted."""
    reply: Any = await redis.eval(_PRUNE, 1, row.stream, GROUP, row.name, min_idle_ms)
    return int(reply[0]) == 1


# -- Message Batches: `tokenq batches`, `tokenq batches cancel` --


async def batch_rows(redis: aioredis.Redis, keys: Keys, limit: int = 50) -> list[dict[str, Any]]:
    """What `tokenq batches` shows: the newest batches with their state and counts. Two round
    trips whatever the limit: `tokenq metrics` asks for 200 at every scrape."""
    locals_ = [as_text(raw) for raw in await redis.zrevrange(keys.batches, 0, limit - 1)]
    pipe = redis.pipeline(transaction=False)
    for local in locals_:
        pipe.hgetall(keys.batch(local))
        pipe.hlen(keys.batch_members(local))
    replies: list[Any] = await pipe.execute()
    return [
        {
            "batch": local,
            **{as_text(k): as_text(v) for k, v in info.items()},
            "awaiting_results": int(waiting),
        }
        for local, info, waiting in zip(locals_, replies[::2], replies[1::2], strict=True)
        if info
    ]


async def cancel_batch(
    redis: aioredis.Redis, keys: Keys, client: anthropic.AsyncAnthropic, ident: str
) -> tuple[str, str]:
    """Ask the API to cancel a batch, named by its local or API id; (local, API id).

    Its unfinished jobs go back to their streams when it ends. Raises LookupError for a
    batch tokenq does not know or has not submitted.
    """
    local = ident
    if ident.startswith("msgbatch_"):
        found: Any = await redis.hget(keys.batch_ids, ident)
        if found is None:
            raise LookupError(f"tokenq submitted no batch {ident!r}; see `tokenq batches`")
        local = as_text(found)
    api_id: Any = await redis.hget(keys.batch(local), "api_id")
    if api_id is None:
        raise LookupError(f"batch {ident!r} is unknown or not submitted yet; see `tokenq batches`")
    batch = await client.messages.batches.cancel(as_text(api_id))
    return local, f"{batch.id} {batch.processing_status}"
