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
not one per job. Across processes, a priority that the model's buckets refused within
`limits.priority_hold_ms` keeps every lower priority waiting (a feature refused by its own
`limit_share` holds nobody back). Each process also spreads its
own requests and input tokens with aiolimiter over `limits.smooth_s` (see config.toml),
charging input tokens at the share the API has lately counted of what was reserved (cache
reads are not counted), since aiolimiter cannot give anything back.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiolimiter import AsyncLimiter

from worker.config import Config, RateLimits
from worker.contract import Keys

log = logging.getLogger("tokenq.limiter")

Triple = tuple[int, int, int]  # requests, input tokens, output tokens
DIMS = ("requests", "input tokens", "output tokens")
KEY_TTL_MS = 600_000  # an idle model's buckets are full after 60 s anyway
COUNTED_WEIGHT = 0.1  # EWMA weight of the share of reserved input tokens the API counted

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
# key: cap r, cap i, cap o, want r, want i, want o.
# Returns {1, "0", ""} taken; {0, wait_ms, why} not now; {-1, cap, dimension} never fits.
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
for j = 1, #KEYS do
  if wait == 0 then
    local base = 4 + (j - 1) * 6
    for n = 1, 3 do all[j][n] = all[j][n] - tonumber(ARGV[base + 3 + n]) end
  end
  store(j, all[j])
end
if wait > 0 then
  -- Only the model's own buckets hold lower priorities back: a feature short of its
  -- limit_share waits alone, other features keep the model's capacity.
  if model_short then redis.call('HSET', KEYS[1], 'd' .. rank, tostring(now)) end
  return {0, tostring(math.ceil(wait)), why}
end
return {1, '0', ''}
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
    """Capacity taken for one call; settle() it exactly once."""

    model: str
    keys: tuple[str, ...]
    caps: tuple[Triple, ...]
    taken: Triple


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
        self._take = redis.register_script(TAKE)
        self._settle = redis.register_script(SETTLE)
        self._lanes: dict[str, _Lane] = {}
        self._seq = itertools.count()
        # Per model: the share of reserved input tokens the API counted (EWMA), for pacing.
        self.counted: dict[str, float] = {}

    def reload(self, cfg: Config) -> None:
        """Use the limits of a newly loaded config from the next call on."""
        self.cfg = cfg
        for lane in self._lanes.values():
            lane.smooth = None  # rebuilt at the new rates
        self.nudge()

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
        """Take capacity for w (after this process's smoothing): see take_now."""
        if not w.smoothed:
            await self._smooth(model, lane, w.want)
            w.smoothed = True
        return await self.take_now(model, w.feature, w.rank, w.want)

    def nudge(self) -> None:
        """Make every waiting lane ask Redis again now (after a reload; tests move clock_ms)."""
        for lane in self._lanes.values():
            lane.wake.set()

    async def take_now(self, model: str, feature: str, rank: int, want: Triple) -> Grant | float:
        """One atomic try at the fleet's buckets: the Grant, or the seconds until it could
        succeed. Raises Unfit when it never could."""
        keys, caps = self._plan(model, feature)
        args: list[int | str] = ["" if self.clock_ms is None else self.clock_ms, KEY_TTL_MS]
        args += [rank, self.cfg.limits.priority_hold_ms]
        # max_tokens over the output limit is not refused by the API (it counts what is
        # generated), so the reservation is capped at the bucket.
        want = (want[0], want[1], min(want[2], *(c[2] for c in caps)))
        for cap in caps:
            args += [*cap, *want]
        code, value, why = await self._take(keys=list(keys), args=args)
        if int(code) == 1:
            return Grant(model, keys, caps, want)
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
        """Give back what the call did not use; learn from the answer's headers and status."""
        if answer.used is not None and grant.taken[1] > 0:
            share = min(1.5, max(0.02, answer.used[1] / grant.taken[1]))
            old = self.counted.get(grant.model, 1.0)
            self.counted[grant.model] = old + COUNTED_WEIGHT * (share - old)
        used = answer.used if answer.used is not None else (0, 0, 0)
        if answer.used is None and answer.status not in (0, 429):
            used = (1, 0, 0)  # an error answer may have counted as a request
        remaining, limit, retry_after = read_headers(answer.headers)
        target = self.cfg.limits.target
        limit = (_part(limit[0], target), _part(limit[1], target), _part(limit[2], target))
        pause_ms = math.ceil(retry_after * 1000) if answer.status == 429 else 0
        if answer.status == 429 and pause_ms == 0:
            pause_ms = 1000
        args: list[int | str] = ["" if self.clock_ms is None else self.clock_ms, KEY_TTL_MS]
        for cap in grant.caps:
            args += [*cap, *(t - u for t, u in zip(grant.taken, used, strict=True))]
        learn_ms = math.ceil(self.cfg.limits.learn_ttl_s * 1000)
        args += [*remaining, *limit, learn_ms, pause_ms]
        await self._settle(keys=list(grant.keys), args=args)
        if pause_ms:
            log.warning("%s: 429 from the API; the fleet pauses it for %.1f s", grant.model,
                        pause_ms / 1000)  # fmt: skip


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


class NoLimiter:
    """Mode "off"."""

    def reload(self, cfg: Config) -> None:
        pass

    async def acquire(self, model: str, feature: str, rank: int, want: Triple) -> Grant | None:
        return None

    async def settle(self, grant: Grant, answer: Answer) -> None:
        pass


Limiter = FleetLimiter | LocalLimiter | NoLimiter


def make_limiter(redis: aioredis.Redis, cfg: Config) -> Limiter:
    if cfg.limits.mode == "fleet":
        return FleetLimiter(redis, cfg)
    if cfg.limits.mode == "local":
        return LocalLimiter(cfg)
    return NoLimiter()
