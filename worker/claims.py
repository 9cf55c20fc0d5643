"""Job ids as idempotency keys: who may run a job id, and where a job's result goes.

A job's id is the producer's `id`, else its stream entry id (see Delivery.job_id). The first
entry to begin a job claims its id in `<prefix>:state:<id>`: `owner` (the entry,
`<priority>:<entry id>`), `fp` (the job's fingerprint: tenant, feature and request, see
contract.fingerprint) and `since`; the same hash keeps the job's run (worker.jobrun), which
the claim hands back.
The claim outlives the job for as long as its result (queue.result_ttl_s). The rules, Stripe's:

- a second entry with the same `id` and the same fingerprint is the same job: it gets the
  result once there is one and never calls the API itself; while the first entry is still
  pending (in flight, waiting or reclaimed) it waits in the deferred set, holding no worker
  slot, and takes the claim over if the first entry disappears without a result;
- with another fingerprint it is `duplicate_id`, dead-lettered under its own entry's id
  `<priority>:<entry id>`, so the first job's result is never overwritten or shared;
- a stream entry id (`<ms>-<seq>`, `<priority>:<ms>-<seq>`) is the id of a job without `id`,
  so a producer may not send one. tokenq itself writes one when it puts such a job back on a
  stream (deferred, requeued, replayed); that entry is let in because its fingerprint equals
  the claim's.

Every check and the claim happen in one Lua script, so two workers never both win; the same
script returns the job's run, so beginning a job costs one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from worker import trips
from worker.contract import Keys, as_text, fingerprint, id_problem, is_reserved_id, shown
from worker.errors import DuplicateId, JobRejected, MalformedJob
from worker.queue import Delivery

STATE_TTL_S = 7 * 86_400  # a claim of a job in progress, renewed at each delivery

Outcome = Literal["go", "answered", "in_flight", "other_job", "reserved"]
_OUTCOMES: dict[int, Outcome] = {
    1: "go",
    2: "answered",
    -2: "other_job",
    -3: "in_flight",
    -4: "reserved",
}


@dataclass(frozen=True, slots=True)
class Claim:
    """What Claims.begin found. `go`: this entry holds the id; `run` is the job's stored run
    (worker.jobrun; "" for a new job). `answered`: the id has a result (this is the same job
    again). `in_flight`: the same job is pending in another entry, claimed since `since_ms`.
    `other_job`: the id belongs to a job with another fingerprint. `reserved`: an `id` of a
    reserved form that tokenq did not write."""

    outcome: Outcome
    run: str = ""
    since_ms: int = 0

    def look_again_ms(self, now_ms: int) -> int:
        """When a copy waiting for an `in_flight` job looks again: a quarter of the first's
        age from now, between 1 and 30 seconds (soon for a young job, rarely for an old one)."""
        return now_ms + min(30_000, max(1_000, (now_ms - self.since_ms) // 4))


# KEYS: state, result, then the job streams in the order of ARGV[7..] (their priorities).
# ARGV: me (this entry), fingerprint, id kind (Claims.kind), state TTL s, now ms, mode
# ("run": claim and read the run; "error": only settle where an error result goes),
# priorities...
# Run replies {code, run, detail}: 1 go (run: the stored run, or ''), 2 a result exists, -1
# the bare entry id is another entry's (use the qualified id), -2 another job's id, -3 the
# same job is pending in a live entry (detail: since ms), -4 a reserved id tokenq did not write.
# Error replies {1} (write under this id, now claimed) or {-1} (use the qualified id).
_BEGIN = """
local me, fp, kind, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[6]
local function alive(owner)
  local p, id = string.match(owner, '^([^:]+):([0-9]+-[0-9]+)$')
  if not p then return false end
  for j = 7, #ARGV do
    if ARGV[j] == p then
      local found = redis.pcall('XRANGE', KEYS[j - 4], id, id)
      return type(found) == 'table' and #found > 0
    end
  end
  return false
end
local h = redis.call('HMGET', KEYS[1], 'owner', 'fp', 'since', 'run')
local owner, stored = h[1], h[2]
local answered = redis.call('EXISTS', KEYS[2]) == 1
local others = owner and owner ~= me
if kind == 'default' then
  if others then return {-1, '', owner} end
elseif mode == 'error' then
  if stored ~= fp and (kind == 'readded' or stored) then return {-1} end
  if others and (answered or alive(owner)) then return {-1} end
else
  if kind == 'readded' and stored ~= fp then return {-4, '', ''} end
  if stored and stored ~= fp then return {-2, '', owner or ''} end
  if others and answered then return {2, '', owner} end
  if others and alive(owner) then
    return {-3, '', h[3] or ARGV[5]}
  end
end
local set = {'owner', me}
if not stored then set[3], set[4] = 'fp', fp end
if not h[3] then set[#set + 1], set[#set + 2] = 'since', ARGV[5] end
redis.call('HSET', KEYS[1], unpack(set))
redis.call('EXPIRE', KEYS[1], ARGV[4])
if mode == 'error' then return {1} end
if answered then return {2, '', me} end
return {1, h[4] or '', ''}
"""


class Claims:
    """The claims on job ids (see the module docstring) for one set of priority streams."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        streams: dict[str, str],
        shared: trips.Trips | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.streams = streams  # priority -> stream, for telling a live owner from a gone one
        self._script = trips.register(redis, _BEGIN)
        self.trips = shared  # begin() rides the worker's shared trips when given

    def _call(self, d: Delivery, mode: str, now_ms: int, client: Any = None) -> Any:
        return self._script(*self._keys_args(d, mode, now_ms), client=client)

    def _keys_args(self, d: Delivery, mode: str, now_ms: int) -> tuple[list[Any], list[Any]]:
        keys = [self.keys.state(d.job_id), self.keys.result(d.job_id), *self.streams.values()]
        args: list[Any] = [
            d.owner,
            fingerprint(d.fields),
            self.kind(d),
            STATE_TTL_S,
            now_ms,
            mode,
            *self.streams,
        ]
        return keys, args

    def kind(self, d: Delivery) -> str:
        """How d's job id is treated: `default` (an entry's own; the first claim wins),
        `explicit` (the producer's idempotency key) or `readded` (an `id` of a reserved form,
        which only tokenq writes, on a job it puts back on a stream)."""
        explicit = d.fields.get("id")
        if d.qualified or explicit is None or id_problem(explicit) is not None:
            return "default"
        return "readded" if is_reserved_id(explicit, self.streams) else "explicit"

    async def begin(self, d: Delivery, now_ms: int) -> Claim:
        """Claim d's job id and read the job's run, first settling its job id: a bare entry
        id another entry claimed first makes d `qualified` (see Delivery.job_id). With shared
        trips, the claims of the jobs that begin in the same loop turn take one round trip."""
        if self.trips is None:
            [claim] = await self.begin_many([d], now_ms)
            return claim
        while True:
            reply = trips.raise_first(await self.trips.run(self._queued(d, now_ms)))[0]
            if int(reply[0]) == -1 and not d.qualified:
                d.qualified = True  # the bare entry id is another stream's entry's
                continue
            return self._claim(d, reply)

    async def begin_many(self, ds: list[Delivery], now_ms: int) -> list[Claim]:
        """begin for many deliveries in one round trip (two when entry ids collide)."""
        out: list[Claim | None] = [None] * len(ds)
        todo = list(range(len(ds)))
        while todo:
            async with self.redis.pipeline(transaction=False) as pipe:
                for n in todo:
                    await self._call(ds[n], "run", now_ms, client=pipe)
                replies: list[Any] = await pipe.execute()
            again = []
            for n, reply in zip(todo, replies, strict=True):
                if int(reply[0]) == -1 and not ds[n].qualified:
                    ds[n].qualified = True  # the bare entry id is another stream's entry's
                    again.append(n)
                    continue
                out[n] = self._claim(ds[n], reply)
            todo = again
        return [a for a in out if a is not None]

    def _queued(self, d: Delivery, now_ms: int) -> trips.Queued:
        keys, args = self._keys_args(d, "run", now_ms)
        return lambda pipe: trips.evalsha_into(pipe, self._script, keys, args)

    def _claim(self, d: Delivery, reply: Any) -> Claim:
        code = int(reply[0])
        if code == -1:  # cannot happen: a qualified id is unique to its entry
            raise RuntimeError(f"job id {d.job_id!r} is owned by another entry")
        outcome = _OUTCOMES[code]
        since = int(as_text(reply[2])) if outcome == "in_flight" else 0
        d.claimed = outcome in ("go", "answered")
        return Claim(outcome, as_text(reply[1]), since)

    async def for_error(self, d: Delivery, now_ms: int) -> None:
        """Settle where d's error result goes: its own job id when that is free or already
        d's, else (the id is another job's, or of a reserved form) its qualified id."""
        while not d.claimed:
            reply: Any = await self._call(d, "error", now_ms)
            if int(reply[0]) == 1:
                d.claimed = True
            elif d.qualified:  # cannot happen: a qualified id is unique to its entry
                raise RuntimeError(f"job id {d.job_id!r} is owned by another entry")
            else:
                d.qualified = True


def refusal(d: Delivery, claim: Claim) -> JobRejected | None:
    """The JobRejected a claim's outcome calls for, if any: the id is another job's
    (`duplicate_id`), or of a reserved form tokenq did not write (`malformed_job`)."""
    if claim.outcome == "other_job":
        return DuplicateId(
            f"the id {shown(d.job_id, 80)} was used by another job (a different tenant, "
            "feature or request) within queue.result_ttl_s; this job's error result is "
            f"under {d.owner}, the first job's result is untouched. Give each new job a "
            "new id."
        )
    if claim.outcome == "reserved":
        return MalformedJob(
            f"`id` {shown(d.job_id, 80)} has the form of a stream entry id (<ms>-<seq>, or "
            "<priority>:<ms>-<seq> for a priority of queue.priorities), which is the id of "
            "a job without one; choose another id, or leave `id` out. Fix the producer."
        )
    return None
