"""API rate limits held across every worker process: requests, input and output tokens/minute.

Each limited model has one Redis hash, `<prefix>:limits:<model>`, holding three token buckets
(requests `r`, input tokens `i`, output tokens `o`) that refill continuously at the limit per
minute up to the limit, as the API's own limiter does. A feature with `limit_share` has a
second hash, `<prefix>:limits:<model>:<feature>`, with buckets of that share. A call takes
from every bucket at once or from none (one Lua script, so the whole fleet sees one budget):
one request, the estimated input tokens and `max_tokens` output tokens. After the answer the
reservation is settled to the reported usage, and the answer's `anthropic-ratelimit-*`
headers pull the buckets down when the API has less left than tokenq thinks (another
application on the same key) or a lower limit than configured. A 429 pauses the model for the
whole fleet for its `retry-after`.

Within a process, the calls waiting for one model queue by priority, then arrival; only the
first of them asks Redis, so a backlog waiting for capacity costs one Redis call per retry,
not one per job.

Leases. A busy process does not ask Redis for every call: when it takes capacity for a call it
also takes a lease, capacity for its next calls (about LEASE_S of its own recent use, never
more than LEASE_SHARE of a bucket, and only what the buckets have to spare), and hands calls
out of it without a round trip, topping it up in the background when half of it is gone. What
a call did not use goes back to the lease; what the lease holds over twice its size, and the
latest answer's rate-limit headers, go back to Redis every FLUSH_S; an unused lease goes back
whole after LEASE_IDLE_S (and on reload and close). Capacity in a lease has been taken from
the fleet's buckets, so the fleet stays under each limit as before; the cost is that up to a
lease of capacity per process is held back from other processes for a moment, and a call out
of a lease does not see a higher priority waiting in another process (the lease's next top-up
does). A 429 is settled at once, the lease given back with it. A quiet process (a rate under
one call per LEASE_S) holds no lease: each call asks Redis, as before.

Across processes, a priority that the model's buckets refused within `limits.priority_hold_ms`
keeps every lower priority waiting (a feature refused by its own `limit_share` holds nobody
back). Each process also spreads its own requests and input tokens with aiolimiter over
`limits.smooth_s` (see config.toml), charging input tokens at the share the API has lately
counted of what was reserved (cache reads are not counted), since aiolimiter cannot give
anything back.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiolimiter import AsyncLimiter
from redis.exceptions import RedisError

from worker import trips
from worker.config import Config, RateLimits
from worker.contract import Keys

log = logging.getLogger("tokenq.limiter")

Triple = tuple[int, int, int]  # requests, input tokens, output tokens
DIMS = ("requests", "input tokens", "output tokens")
KEY_TTL_MS = 600_000  # an idle model's buckets are full after 60 s anyway
COUNTED_WEIGHT = 0.1  # EWMA weight of the share of reserved input tokens the API counted
LEASE_S = 0.25  # a lease holds about this long of the process's own use
LEASE_SHARE = 0.02  # and never more than this share of a bucket
LEASE_IDLE_S = 1.0  # a lease unused this long goes back to the buckets
FLUSH_S = 0.1  # a lease's surplus and the answers' headers go to Redis this often
RATE_TAU_S = 1.0  # the time constant of a lease's estimate of its use per second
CONTENDED_S = 5.0  # after the buckets refused this process, it takes no lease this long
NONE: Triple = (0, 0, 0)

# Shared by both scripts: bucket levels of KEYS[j] refilled to `now`, with the caps of ARGV.
_PRELUDE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function load(j, base)
  local h = redis.call('HMGET', KEYS[j], 'r', 'i', 'o', 'ts', 'lr', 'li', 'lo', 'lu')
  local ts = tonumber(h[4]) or now
  local learnt = j == 1 and (tonumber(h[8]) or 0) > now
  local levels, caps = {}, {}
  for n = 1, 3 do
    local cap = tonumber(ARGV[base + n])
    local l = learnt and tonumber(h[4 + n])
    if l and l < cap then cap = l end
    local level = tonumber(h[n]) or cap
    levels[n] = math.min(cap, level + math.max(0, now - ts) * cap / 60000)
    caps[n] = cap
  end
  return levels, caps
end
local function store(j, levels)
  redis.call('HSET', KEYS[j], 'r', tostring(levels[1]), 'i', tostring(levels[2]),
             'o', tostring(levels[3]), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[j], ARGV[2])
end
"""

# KEYS: model hash[, feature hash]. ARGV: now_ms or "", key TTL ms, rank, hold_ms, then per
# key: cap r, cap i, cap o, want r, want i, want o; then optionally extra r, i, o: a lease's
# top-up, taken besides `want` as far as every bucket has it (the same share of each).
# Returns {1, "0", "r i o"} taken (the extra granted); {0, wait_ms, why} not now; {-1, cap,
# dimension} never fits.
TAKE = (
    _PRELUDE
    + """
local rank, hold = tonumber(ARGV[3]), tonumber(ARGV[4])
local pause = tonumber(redis.call('HGET', KEYS[1], 'pause') or '') or 0
if pause > now then return {0, tostring(pause - now), 'paused'} end
for r = 0, rank - 1 do
  local d = tonumber(redis.call('HGET', KEYS[1], 'd' .. r) or '')
  if d and now - d < hold then return {0, tostring(hold / 4), 'priority'} end
end
local wait, why, all, model_short = 0, '', {}, false
for j = 1, #KEYS do
  local base = 4 + (j - 1) * 6
  local levels, caps = load(j, base)
  for n = 1, 3 do
    local want = tonumber(ARGV[base + 3 + n])
    if want > caps[n] then return {-1, tostring(caps[n]), tostring(n)} end
    if levels[n] < want then
      local w = (want - levels[n]) * 60000 / caps[n]
      if w > wait then wait, why = w, tostring(n) end
      if j == 1 then model_short = true end
    end
  end
  all[j] = levels
end
local tail, share, extra = 4 + #KEYS * 6, 1, {0, 0, 0}
if wait == 0 and #ARGV > tail then
  for n = 1, 3 do
    local e = tonumber(ARGV[tail + n])
    if e > 0 then
      for j = 1, #KEYS do
        local left = all[j][n] - tonumber(ARGV[4 + (j - 1) * 6 + 3 + n])
        share = math.min(share, math.max(0, left) / e)
      end
    end
  end
  for n = 1, 3 do extra[n] = math.floor(tonumber(ARGV[tail + n]) * share) end
end
for j = 1, #KEYS do
  if wait == 0 then
    local base = 4 + (j - 1) * 6
    for n = 1, 3 do all[j][n] = all[j][n] - tonumber(ARGV[base + 3 + n]) - extra[n] end
  end
  store(j, all[j])
end
if wait > 0 then
  -- Only the model's own buckets hold lower priorities back: a feature short of its
  -- limit_share waits alone, other features keep the model's capacity.
  if model_short then redis.call('HSET', KEYS[1], 'd' .. rank, tostring(now)) end
  return {0, tostring(math.ceil(wait)), why}
end
return {1, '0', extra[1] .. ' ' .. extra[2] .. ' ' .. extra[3]}
"""
)

# KEYS as TAKE. ARGV: now_ms or "", key TTL ms, then per key: cap r, cap i, cap o, give r,
# give i, give o (negative: take more); then for the model: remaining r, i, o and limit r, i,
# o from the answer's headers (-1: not sent), learn TTL ms, pause ms (0: none).
SETTLE = (
    _PRELUDE
    + """
local tail = 2 + #KEYS * 6
for j = 1, #KEYS do
  local base = 2 + (j - 1) * 6
  local levels, caps = load(j, base)
  for n = 1, 3 do
    levels[n] = math.min(caps[n], levels[n] + tonumber(ARGV[base + 3 + n]))
    if j == 1 then
      local remaining = tonumber(ARGV[tail + n])
      if remaining >= 0 and remaining < levels[n] then levels[n] = remaining end
    end
  end
  store(j, levels)
end
local learn_ttl, pause = tonumber(ARGV[tail + 7]), tonumber(ARGV[tail + 8])
local names = {'lr', 'li', 'lo'}
for n = 1, 3 do
  local limit = tonumber(ARGV[tail + 3 + n])
  if limit > 0 and limit < tonumber(ARGV[2 + n]) then
    redis.call('HSET', KEYS[1], names[n], tostring(limit), 'lu', tostring(now + learn_ttl))
  end
end
if pause > 0 then
  local old = tonumber(redis.call('HGET', KEYS[1], 'pause') or '') or 0
  if now + pause > old then redis.call('HSET', KEYS[1], 'pause', tostring(now + pause)) end
end
return 1
"""
)


# KEYS as TAKE. ARGV: now_ms or "", key TTL ms (unused), then per key: cap r, cap i, cap o.
# Returns per key {level r, i, o, cap r, i, o} as strings, then {now, pause until}.
STATUS = (
    _PRELUDE
    + """
local out = {}
for j = 1, #KEYS do
  local levels, caps = load(j, 2 + (j - 1) * 3)
  for n = 1, 3 do out[#out + 1] = tostring(levels[n]) end
  for n = 1, 3 do out[#out + 1] = tostring(caps[n]) end
end
out[#out + 1] = tostring(now)
out[#out + 1] = redis.call('HGET', KEYS[1], 'pause') or '0'
return out
"""
)


class Unfit(Exception):
    """The call needs more of a limit than the whole limit: the API could never take it."""

    def __init__(self, model: str, dimension: str, want: int, cap: int) -> None:
        super().__init__(
            f"the request needs {want:,} {dimension} but {model} allows {cap:,} per minute "
            f'(models."{model}".limits in config.toml); the API could never accept it. '
            "Shorten the request or lower max_tokens."
        )


@dataclass(frozen=True)
class Grant:
    """Capacity taken for one call; settle() it exactly once. `leased`: handed out of this
    process's lease, and settled into it. `extra`: a lease's top-up taken with it."""

    model: str
    keys: tuple[str, ...]
    caps: tuple[Triple, ...]
    taken: Triple
    leased: bool = False
    extra: Triple = NONE


@dataclass(frozen=True)
class Answer:
    """What a call's answer (or error) tells the limiter."""

    used: Triple | None  # requests, input + cache-write tokens, output tokens; None: no usage
    headers: Mapping[str, str]
    status: int = 200  # the HTTP status; 0: no answer (never sent, cancelled, connection lost)


@dataclass(order=True)
class _Waiter:
    rank: int
    seq: int
    want: Triple = field(compare=False)
    feature: str = field(compare=False)
    future: asyncio.Future[Grant] = field(compare=False)
    smoothed: bool = field(default=False, compare=False)


@dataclass
class _Lane:
    """The calls of one process waiting for one model, in priority order."""

    heap: list[_Waiter] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    smooth: tuple[AsyncLimiter, AsyncLimiter] | None = None


@dataclass
class _Lease:
    """Capacity this process took from one plan's buckets (a model's, with a feature's share)
    for calls to come, handed out here (see the module docstring)."""

    model: str
    keys: tuple[str, ...]
    caps: tuple[Triple, ...]
    held: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    rate: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # handed out per s
    last_s: float = 0.0  # when the last call was handed out (monotonic)
    headers: Mapping[str, str] | None = None  # the latest answer's, not yet told to Redis
    flusher: asyncio.Task[None] | None = None
    topping: asyncio.Task[None] | None = None
    contended_s: float = -math.inf  # until when the buckets are short (monotonic)

    @property
    def contended(self) -> bool:
        return time.monotonic() < self.contended_s

    def size(self) -> Triple:
        """What the lease aims to hold: LEASE_S of the recent use, at most LEASE_SHARE of the
        smallest bucket; nothing while the buckets are short (a limit binds: every unit goes
        where the fleet's order of waiting says, as without leases)."""
        if self.contended:
            return NONE
        out = []
        for n in range(3):
            most = min(cap[n] for cap in self.caps) * LEASE_SHARE
            out.append(int(min(most, self.rate[n] * LEASE_S)))
        return out[0], out[1], out[2]

    def top_up(self) -> Triple:
        """What to take besides a call to fill the lease up to its size."""
        size = self.size()
        if size[0] < 1:
            return NONE
        return (
            max(0, math.ceil(size[0] - self.held[0])),
            max(0, math.ceil(size[1] - self.held[1])),
            max(0, math.ceil(size[2] - self.held[2])),
        )

    def covers(self, want: Triple) -> bool:
        return all(self.held[n] >= want[n] for n in range(3))

    def hand_out(self, want: Triple, now_s: float) -> None:
        decay = math.exp(-max(0.0, now_s - self.last_s) / RATE_TAU_S)
        for n in range(3):
            self.held[n] -= want[n]
            self.rate[n] = self.rate[n] * decay + want[n] / RATE_TAU_S
        self.last_s = now_s

    def low(self) -> bool:
        """Half of the lease is gone: time to top it up."""
        size = self.size()
        return size[0] >= 1 and any(self.held[n] < size[n] / 2 for n in range(3))

    def surplus(self, idle: bool) -> Triple:
        """What to give back to the buckets: all of it when idle (a debt too: calls that
        used more than they reserved), else what is over twice the size (give-backs of calls
        that used less than they reserved pile up here), all of it without a lease."""
        if idle:
            return (math.floor(self.held[0]), math.floor(self.held[1]), math.floor(self.held[2]))
        size = self.size()
        keep = NONE if size[0] < 1 else (2 * size[0], 2 * size[1], 2 * size[2])
        return (
            max(0, math.floor(self.held[0] - keep[0])),
            max(0, math.floor(self.held[1] - keep[1])),
            max(0, math.floor(self.held[2] - keep[2])),
        )


def caps_of(limits: RateLimits, fraction: float) -> Triple:
    """The bucket sizes for `fraction` of a model's limits (at least 1 each)."""
    return (
        max(1, math.floor(limits.rpm * fraction)),
        max(1, math.floor(limits.itpm * fraction)),
        max(1, math.floor(limits.otpm * fraction)),
    )


def read_headers(headers: Mapping[str, str]) -> tuple[Triple, Triple, float]:
    """(remaining, limit, retry_after_s) from an answer's headers; -1 where one is missing."""

    def number(name: str) -> int:
        text = headers.get(name, "")
        return int(text) if text.isdigit() else -1

    prefix = "anthropic-ratelimit-"
    kinds = ("requests", "input-tokens", "output-tokens")
    remaining = tuple(number(f"{prefix}{k}-remaining") for k in kinds)
    limit = tuple(number(f"{prefix}{k}-limit") for k in kinds)
    try:
        retry_after = max(0.0, float(headers.get("retry-after", "") or 0))
    except ValueError:
        retry_after = 0.0
    return (remaining[0], remaining[1], remaining[2]), (limit[0], limit[1], limit[2]), retry_after


class FleetLimiter:
    """The Redis-held limits (mode "fleet"). One per worker process."""

    def __init__(self, redis: aioredis.Redis, cfg: Config, *, clock_ms: int | None = None):
        self.redis = redis
        self.cfg = cfg
        self.keys = Keys(cfg.prefix)
        self.clock_ms = clock_ms  # tests: a fixed "now" instead of the server's TIME
        self._take = trips.register(redis, TAKE)
        self._settle = trips.register(redis, SETTLE)
        self._lanes: dict[str, _Lane] = {}
        self._leases: dict[tuple[str, ...], _Lease] = {}
        self._seq = itertools.count()
        # Per model: the share of reserved input tokens the API counted (EWMA), for pacing.
        self.counted: dict[str, float] = {}

    def reload(self, cfg: Config) -> None:
        """Use the limits of a newly loaded config from the next call on; the leases go back
        (at their next flush) and new ones are taken at the new sizes."""
        self.cfg = cfg
        for lane in self._lanes.values():
            lane.smooth = None  # rebuilt at the new rates
        for lease in self._leases.values():
            lease.last_s = -math.inf  # idle: its flusher gives it all back
            self._flush_later(lease)
        self._leases.clear()
        self.nudge()

    async def close(self) -> None:
        """Give every lease back to the buckets (a worker that stops)."""
        leases, self._leases = list(self._leases.values()), {}
        for lease in leases:
            for task in (lease.flusher, lease.topping):
                if task is not None:
                    task.cancel()
            give = lease.surplus(idle=True)
            lease.held = [0.0, 0.0, 0.0]
            headers, lease.headers = lease.headers or {}, None
            if any(give) or headers:
                try:
                    await self._send_settle(lease.keys, lease.caps, give, headers, 0)
                except (RedisError, OSError) as exc:
                    log.warning("giving back %s's lease failed (the buckets refill): %s",
                                lease.model, exc)  # fmt: skip

    def _plan(self, model: str, feature: str) -> tuple[tuple[str, ...], tuple[Triple, ...]]:
        limits = self.cfg.models[model].limits
        assert limits is not None
        keys, caps = [self.keys.limits(model)], [caps_of(limits, self.cfg.limits.target)]
        share = self.cfg.features[feature].limit_share if feature in self.cfg.features else None
        if share is not None:
            keys.append(self.keys.limits(model, feature))
            caps.append(caps_of(limits, self.cfg.limits.target * share))
        return tuple(keys), tuple(caps)

    def limited(self, model: str) -> bool:
        config = self.cfg.models.get(model)
        return config is not None and config.limits is not None

    async def acquire(self, model: str, feature: str, rank: int, want: Triple) -> Grant | None:
        """Wait for capacity for one call; None when the model has no limits.

        Raises Unfit when the call could never fit. Cancelling the wait gives nothing back
        because nothing was taken.
        """
        if not self.limited(model):
            return None
        lane = self._lanes.setdefault(model, _Lane())
        loop = asyncio.get_running_loop()
        waiter = _Waiter(rank, next(self._seq), want, feature, loop.create_future())
        heapq.heappush(lane.heap, waiter)
        lane.wake.set()  # a higher priority may have arrived: the head looks again
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._serve(model, lane))
        try:
            return await waiter.future
        finally:
            if not waiter.future.done():
                waiter.future.cancel()  # the lane skips it

    async def _serve(self, model: str, lane: _Lane) -> None:
        """Hand capacity to this process's waiters for `model`, best priority first."""
        while lane.heap:
            head = lane.heap[0]
            if head.future.done():
                heapq.heappop(lane.heap)
                continue
            lane.wake.clear()
            try:
                outcome = await self._try(model, lane, head)
            # Served waiters leave the heap at the top of the loop: others may have arrived
            # ahead of them while Redis answered.
            except Exception as exc:  # Unfit, or Redis trouble: the waiter decides
                if not head.future.done():
                    head.future.set_exception(exc)
                continue
            if isinstance(outcome, Grant):
                if head.future.done():  # cancelled while Redis answered: give it back
                    await self.settle(outcome, Answer(None, {}, status=0))
                else:
                    head.future.set_result(outcome)
                continue
            # Ask again in time to renew a priority claim; a new arrival or a reload wakes
            # the head early.
            wait_s = min(outcome, max(0.01, self.cfg.limits.priority_hold_ms / 2000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wake.wait(), timeout=wait_s)

    async def _try(self, model: str, lane: _Lane, w: _Waiter) -> Grant | float:
        """Take capacity for w (after this process's smoothing): out of the plan's lease when
        it covers the call, else from the buckets (see take_now) with a top-up of the lease."""
        if not w.smoothed:
            await self._smooth(model, lane, w.want)
            w.smoothed = True
        keys, caps = self._plan(model, w.feature)
        lease = self._leases.get(keys)
        if lease is None or lease.caps != caps:
            lease = self._leases[keys] = _Lease(model, keys, caps)
        want = (w.want[0], w.want[1], min(w.want[2], *(c[2] for c in caps)))
        now_s = time.monotonic()
        if lease.covers(want):
            lease.hand_out(want, now_s)
            self._after_hand_out(lease, w.feature, w.rank)
            return Grant(model, keys, caps, want, leased=True)
        got = await self.take_now(model, w.feature, w.rank, want, extra=lease.top_up())
        if isinstance(got, float):
            self._contended(lease)
            return got
        if self._leases.get(keys) is lease:
            for n in range(3):
                lease.held[n] += got.extra[n] + want[n]
            lease.hand_out(want, now_s)
            self._flush_later(lease)
            return Grant(model, keys, caps, want, leased=True)
        return got  # reloaded meanwhile: this call settles to the buckets itself

    def _after_hand_out(self, lease: _Lease, feature: str, rank: int) -> None:
        """Top the lease up in the background once half of it is gone."""
        if lease.low() and lease.topping is None:
            lease.topping = asyncio.create_task(self._top_up(lease, feature, rank))

    async def _top_up(self, lease: _Lease, feature: str, rank: int) -> None:
        try:
            got = await self.take_now(lease.model, feature, rank, NONE, extra=lease.top_up())
            if isinstance(got, float):
                self._contended(lease)
            elif isinstance(got, Grant) and self._leases.get(lease.keys) is lease:
                for n in range(3):
                    lease.held[n] += got.extra[n]
                self._flush_later(lease)
            elif isinstance(got, Grant) and any(got.extra):  # reloaded meanwhile
                await self._send_settle(lease.keys, lease.caps, got.extra, {}, 0)
        except (RedisError, OSError, Unfit) as exc:
            log.warning("topping up %s's lease failed: %s", lease.model, exc)
        finally:
            lease.topping = None

    def _contended(self, lease: _Lease) -> None:
        """The buckets refused: no lease for CONTENDED_S, and what it holds goes back now."""
        lease.contended_s = time.monotonic() + CONTENDED_S
        if any(lease.surplus(idle=False)):
            self._flush_later(lease, now=True)

    def _flush_later(self, lease: _Lease, *, now: bool = False) -> None:
        if now and lease.flusher is not None:
            lease.flusher.cancel()
            lease.flusher = None
        if lease.flusher is None:
            first_s = 0.0 if now else FLUSH_S
            lease.flusher = asyncio.create_task(self._flush_forever(lease, first_s))

    async def _flush_forever(self, lease: _Lease, first_s: float = FLUSH_S) -> None:
        """Every FLUSH_S (the first time after first_s), send the lease's surplus and the
        latest headers to Redis; once the lease is idle, give it all back and stop."""
        try:
            wait_s = first_s
            while True:
                await asyncio.sleep(wait_s)
                wait_s = FLUSH_S
                idle = time.monotonic() - lease.last_s > LEASE_IDLE_S
                give = lease.surplus(idle)
                headers, lease.headers = lease.headers, None
                if any(give) or headers:
                    for n in range(3):
                        lease.held[n] -= give[n]
                    try:
                        await self._send_settle(lease.keys, lease.caps, give, headers or {}, 0)
                    except (RedisError, OSError) as exc:  # the buckets refill meanwhile
                        log.warning("settling %s's lease failed: %s", lease.model, exc)
                if idle and lease.topping is None:
                    return
        finally:
            lease.flusher = None

    def nudge(self) -> None:
        """Make every waiting lane ask Redis again now (after a reload; tests move clock_ms)."""
        for lane in self._lanes.values():
            lane.wake.set()

    async def take_now(
        self, model: str, feature: str, rank: int, want: Triple, extra: Triple = NONE
    ) -> Grant | float:
        """One atomic try at the fleet's buckets: the Grant, or the seconds until it could
        succeed. Raises Unfit when it never could. `extra`: a lease's top-up, taken besides
        as far as the buckets have it (in Grant.extra)."""
        keys, caps = self._plan(model, feature)
        args: list[int | str] = ["" if self.clock_ms is None else self.clock_ms, KEY_TTL_MS]
        args += [rank, self.cfg.limits.priority_hold_ms]
        # max_tokens over the output limit is not refused by the API (it counts what is
        # generated), so the reservation is capped at the bucket.
        want = (want[0], want[1], min(want[2], *(c[2] for c in caps)))
        for cap in caps:
            args += [*cap, *want]
        if any(extra):
            args += [*extra]
        code, value, why = await self._take(keys=list(keys), args=args)
        if int(code) == 1:
            got = [int(n) for n in str(why).split()] or [0, 0, 0]
            return Grant(model, keys, caps, want, extra=(got[0], got[1], got[2]))
        if int(code) == -1:
            n = int(why) - 1
            raise Unfit(model, DIMS[n], want[n], int(float(value)))
        return float(value) / 1000

    async def _smooth(self, model: str, lane: _Lane, want: Triple) -> None:
        """This process's own pacing (aiolimiter): requests and input tokens over smooth_s."""
        if lane.smooth is None:
            limits = self.cfg.models[model].limits
            assert limits is not None
            window = self.cfg.limits.smooth_s
            rpm, itpm, _ = caps_of(limits, self.cfg.limits.target * window / 60)
            lane.smooth = (AsyncLimiter(rpm, window), AsyncLimiter(itpm, window))
        requests, tokens = lane.smooth
        await requests.acquire(min(want[0], requests.max_rate))
        # aiolimiter cannot give back, so it is charged what the API is expected to count:
        # the reservation times the share of reservations the API counted lately (prompt-
        # cache reads are not counted, and can be most of a prompt).
        counted = math.ceil(want[1] * self.counted.get(model, 1.0))
        await tokens.acquire(min(counted, tokens.max_rate))

    async def settle(self, grant: Grant, answer: Answer) -> None:
        """Give back what the call did not use; learn from the answer's headers and status.
        A leased grant gives back into its lease (no round trip; the headers go with the
        lease's next flush), but for a 429, which is settled at once with the lease."""
        if answer.used is not None and grant.taken[1] > 0:
            share = min(1.5, max(0.02, answer.used[1] / grant.taken[1]))
            old = self.counted.get(grant.model, 1.0)
            self.counted[grant.model] = old + COUNTED_WEIGHT * (share - old)
        used = answer.used if answer.used is not None else (0, 0, 0)
        if answer.used is None and answer.status not in (0, 429):
            used = (1, 0, 0)  # an error answer may have counted as a request
        give = (grant.taken[0] - used[0], grant.taken[1] - used[1], grant.taken[2] - used[2])
        lease = self._leases.get(grant.keys) if grant.leased else None
        if lease is not None and lease.caps == grant.caps:
            if answer.status != 429 and not lease.contended:
                for n in range(3):
                    lease.held[n] += give[n]
                if any(name.startswith("anthropic-ratelimit-") for name in answer.headers):
                    lease.headers = answer.headers
                self._flush_later(lease)
                return
            # A limit binds (or a 429 pauses the model): settled at once, as without leases,
            # with what the lease holds.
            back = lease.surplus(idle=True)
            for n in range(3):
                lease.held[n] -= back[n]
            give = (give[0] + back[0], give[1] + back[1], give[2] + back[2])
        _, _, retry_after = read_headers(answer.headers)
        pause_ms = math.ceil(retry_after * 1000) if answer.status == 429 else 0
        if answer.status == 429 and pause_ms == 0:
            pause_ms = 1000
        await self._send_settle(grant.keys, grant.caps, give, answer.headers, pause_ms)
        if pause_ms:
            log.warning("%s: 429 from the API; the fleet pauses it for %.1f s", grant.model,
                        pause_ms / 1000)  # fmt: skip

    async def _send_settle(
        self,
        keys: tuple[str, ...],
        caps: tuple[Triple, ...],
        give: Triple,
        headers: Mapping[str, str],
        pause_ms: int,
    ) -> None:
        """One SETTLE: `give` back to every bucket of the plan (negative: take more), the
        headers' remaining and lower limits learnt, the model paused for pause_ms."""
        remaining, limit, _ = read_headers(headers)
        target = self.cfg.limits.target
        limit = (_part(limit[0], target), _part(limit[1], target), _part(limit[2], target))
        args: list[int | str] = ["" if self.clock_ms is None else self.clock_ms, KEY_TTL_MS]
        for cap in caps:
            args += [*cap, *give]
        learn_ms = math.ceil(self.cfg.limits.learn_ttl_s * 1000)
        args += [*remaining, *limit, learn_ms, pause_ms]
        await self._settle(keys=list(keys), args=args)


def _part(limit: int, fraction: float) -> int:
    return limit if limit <= 0 else max(1, math.floor(limit * fraction))


@dataclass(frozen=True)
class BucketStatus:
    """One hash's buckets now: what is left and how big they are (learnt limits applied)."""

    key: str
    level: tuple[float, float, float]
    cap: Triple  # in force now: lower than `planned` where the API showed a lower limit
    planned: Triple  # from config: the limit x target (x limit_share)


@dataclass(frozen=True)
class ModelStatus:
    model: str
    configured: Triple
    buckets: tuple[BucketStatus, ...]  # the model's, then each feature share's
    paused_s: float


async def status(redis: aioredis.Redis, cfg: Config) -> list[ModelStatus]:
    """The fleet's buckets of every limited model, as `tokenq limits` shows them."""
    keys_of = Keys(cfg.prefix)
    script = redis.register_script(STATUS)
    out: list[ModelStatus] = []
    for model, config in sorted(cfg.models.items()):
        if config.limits is None:
            continue
        keys, caps = [keys_of.limits(model)], [caps_of(config.limits, cfg.limits.target)]
        for name, feature in sorted(cfg.features.items()):
            tier = feature.tier or cfg.router.default_tier
            if feature.limit_share is not None and cfg.tiers.get(tier) == model:
                keys.append(keys_of.limits(model, name))
                caps.append(caps_of(config.limits, cfg.limits.target * feature.limit_share))
        args: list[int | str] = ["", KEY_TTL_MS, *(n for cap in caps for n in cap)]
        reply = [float(v) for v in await script(keys=keys, args=args)]
        buckets = tuple(
            BucketStatus(
                key,
                (reply[6 * j], reply[6 * j + 1], reply[6 * j + 2]),
                (int(reply[6 * j + 3]), int(reply[6 * j + 4]), int(reply[6 * j + 5])),
                caps[j],
            )
            for j, key in enumerate(keys)
        )
        now, pause = reply[-2], reply[-1]
        limits = config.limits
        configured = (limits.rpm, limits.itpm, limits.otpm)
        out.append(ModelStatus(model, configured, buckets, max(0.0, (pause - now) / 1000)))
    return out


class LocalLimiter:
    """Mode "local": each process keeps the full limits alone with aiolimiter (no refunds).

    This is what a fleet of independent processes does; kept to compare against.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._limiters: dict[str, tuple[AsyncLimiter, AsyncLimiter, AsyncLimiter]] = {}

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        self._limiters.clear()

    async def acquire(self, model: str, feature: str, rank: int, want: Triple) -> Grant | None:
        config = self.cfg.models.get(model)
        if config is None or config.limits is None:
            return None
        if model not in self._limiters:
            caps = caps_of(config.limits, 1.0)
            self._limiters[model] = (
                AsyncLimiter(caps[0], 60), AsyncLimiter(caps[1], 60), AsyncLimiter(caps[2], 60)
            )  # fmt: skip
        for limiter, amount in zip(self._limiters[model], want, strict=True):
            await limiter.acquire(min(amount, limiter.max_rate))
        return None

    async def settle(self, grant: Grant, answer: Answer) -> None:
        """aiolimiter cannot give anything back."""

    async def close(self) -> None:
        pass


class NoLimiter:
    """Mode "off"."""

    def reload(self, cfg: Config) -> None:
        pass

    async def acquire(self, model: str, feature: str, rank: int, want: Triple) -> Grant | None:
        return None

    async def settle(self, grant: Grant, answer: Answer) -> None:
        pass

    async def close(self) -> None:
        pass


Limiter = FleetLimiter | LocalLimiter | NoLimiter


def make_limiter(redis: aioredis.Redis, cfg: Config) -> Limiter:
    if cfg.limits.mode == "fleet":
        return FleetLimiter(redis, cfg)
    if cfg.limits.mode == "local":
        return LocalLimiter(cfg)
    return NoLimiter()
