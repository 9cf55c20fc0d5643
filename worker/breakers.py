"""Circuit breakers per feature and per model, one state for the whole fleet.

Each breaker is a `pybreaker.CircuitBreaker` (its state machine: consecutive failures up to
`fail_max` open it; after `reset_timeout_s` it goes half-open; `success_threshold` successes
close it, a failure opens it again). Two things pybreaker does not do are added here:

- **Fleet state.** pybreaker's Redis storage is synchronous and blocking, so each breaker gets
  `MirrorStorage`, an in-memory copy of the Redis hash `<prefix>:breaker:<name>` that
  remembers what changed locally. `Breakers.sync()` sends those changes and reads the fleet's
  state back in one Lua script (counters add up across processes; a transition applies only
  from the state it was made in, except that "open" always wins). A closed breaker is synced
  at most every `breakers.sync_ms`, an open or half-open one before every call, and any
  failure or transition right after the call.
- **Probes, and neutral outcomes.** In half-open, pybreaker admits every caller; here at most
  `half_open_probes` calls run at once across the fleet (a sorted set of probe slots that
  expire if their worker dies), so a recovering API gets a trickle, not a wave. The await is
  not wrapped in `breaker.calling()` (a cancelled call would count as a failure, and an
  excluded 4xx as a success): the call runs first, then its outcome is replayed into
  `breaker.call()`: API failures (5xx, 529, timeouts, connection errors) as failures,
  answers as successes, and nothing at all for 429s (the rate limiter's business), 4xx
  caused by the request, and cancellations.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

import pybreaker
import redis.asyncio as aioredis

from worker import clock, trips
from worker.config import BreakersConfig
from worker.contract import Keys, as_text

log = logging.getLogger("tokenq.breakers")

STATES = (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN)

# KEYS: per breaker its hash and its probe set. ARGV: now_ms, probe id, probe expiry ms, probe
# max, then per breaker 8 values: fail delta, fail reset (0/1), success delta, success reset,
# from state, to state ("" none), opened_at ms, probe (0 none, 1 take, 2 release).
# Returns per breaker: state, fails, successes, opened_at ms, probe taken (0/1).
SYNC = """
local now, pid, pexp, pmax = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for j = 1, #KEYS / 2 do
  local h, probes = KEYS[2 * j - 1], KEYS[2 * j]
  local b = 4 + (j - 1) * 8
  local v = redis.call('HMGET', h, 'state', 'fails', 'successes', 'opened_at')
  local state = v[1] or 'closed'
  local fails, succ, opened = tonumber(v[2] or '0'), tonumber(v[3] or '0'), tonumber(v[4] or '0')
  local from, to = ARGV[b + 5], ARGV[b + 6]
  if to ~= '' and (to == 'open' or from == state) then
    state = to
    if to == 'open' then opened = tonumber(ARGV[b + 7]) end
    if to ~= 'half-open' then redis.call('DEL', probes) end
  end
  if ARGV[b + 2] == '1' then fails = 0 end
  fails = fails + tonumber(ARGV[b + 1])
  if ARGV[b + 4] == '1' then succ = 0 end
  succ = succ + tonumber(ARGV[b + 3])
  redis.call('HSET', h, 'state', state, 'fails', fails, 'successes', succ, 'opened_at', opened)
  redis.call('ZREMRANGEBYSCORE', probes, '-inf', now)
  local probe, took = ARGV[b + 8], 0
  if probe == '2' then redis.call('ZREM', probes, pid) end
  if probe == '1' and state == 'half-open' and redis.call('ZCARD', probes) < pmax then
    redis.call('ZADD', probes, pexp, pid)
    took = 1
  end
  redis.call('PEXPIRE', probes, 3600000)
  out[j] = {state, fails, succ, opened, took}
end
return out
"""


class MirrorStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker storage in memory that remembers what changed since the last sync."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._state = pybreaker.STATE_CLOSED
        self._fails = 0
        self._successes = 0
        self._opened_at: dt.datetime | None = None
        self.synced_at = 0.0  # monotonic time of the last sync
        self.clear()

    def clear(self) -> None:
        self.fail_delta = 0
        self.fail_reset = False
        self.success_delta = 0
        self.success_reset = False
        self.transition: tuple[str, str] | None = None

    @property
    def dirty(self) -> bool:
        return bool(
            self.fail_delta
            or self.fail_reset
            or self.success_delta
            or self.success_reset
            or self.transition
        )

    def load(self, state: str, fails: int, successes: int, opened_ms: int) -> None:
        self._state, self._fails, self._successes = state, fails, successes
        self._opened_at = dt.datetime.fromtimestamp(opened_ms / 1000, dt.UTC) if opened_ms else None
        self.synced_at = clock.monotonic()
        self.clear()

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        if state != self._state:
            start = self.transition[0] if self.transition else self._state
            self.transition = (start, state)
        self._state = state

    def increment_counter(self) -> None:
        self._fails += 1
        self.fail_delta += 1

    def reset_counter(self) -> None:
        if self._fails or self.fail_delta:
            self.fail_reset = True
        self._fails = 0
        self.fail_delta = 0

    def increment_success_counter(self) -> None:
        self._successes += 1
        self.success_delta += 1

    def reset_success_counter(self) -> None:
        if self._successes or self.success_delta:
            self.success_reset = True
        self._successes = 0
        self.success_delta = 0

    @property
    def counter(self) -> int:
        return self._fails

    @property
    def success_counter(self) -> int:
        return self._successes

    @property
    def opened_at(self) -> dt.datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: dt.datetime) -> None:
        self._opened_at = value


class _Logger(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
        log.warning("breaker %s: %s -> %s", cb.name, getattr(old, "name", old), new.name)


def is_failure(exc: BaseException | None) -> bool | None:
    """True: an API failure the breaker counts; False: a success; None: neutral."""
    if exc is None:
        return False
    import anthropic  # here, not at the top: operators' commands import this module too

    if isinstance(exc, anthropic.RateLimitError):
        return None
    if isinstance(exc, anthropic.InternalServerError | anthropic.APIConnectionError):
        return True
    return None  # 4xx caused by the request, cancellations, anything else


class _Failed(Exception):
    """Stands for a failed call when its outcome is replayed into pybreaker."""


def _fail() -> None:
    raise _Failed


def _ok() -> None:
    return None


@dataclass(frozen=True)
class Ticket:
    """Admission for one call: the breakers it passed and whether it holds a probe slot."""

    names: tuple[str, ...]
    probes: tuple[str, ...]  # names of the breakers in which this call is a probe
    probe_id: str


@dataclass(frozen=True)
class Open:
    """A call refused: the breaker that is open and when it may let calls through."""

    name: str
    retry_at_ms: int


class Breakers:
    """The breakers of one worker process, their state kept with the fleet's in Redis."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, cfg: BreakersConfig, probe_ttl_s: float
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.cfg = cfg
        self.probe_ttl_ms = int(probe_ttl_s * 1000)
        self._breakers: dict[str, pybreaker.CircuitBreaker] = {}
        self._sync = trips.register(redis, SYNC)
        self._counter = 0

    def reload(self, cfg: BreakersConfig) -> None:
        self.cfg = cfg
        for b in self._breakers.values():
            b.fail_max = cfg.fail_max
            b.reset_timeout = cfg.reset_timeout_s
            b.success_threshold = cfg.success_threshold

    def breaker(self, name: str) -> pybreaker.CircuitBreaker:
        b = self._breakers.get(name)
        if b is None:
            b = pybreaker.CircuitBreaker(
                fail_max=self.cfg.fail_max,
                reset_timeout=self.cfg.reset_timeout_s,
                success_threshold=self.cfg.success_threshold,
                state_storage=MirrorStorage(name),
                listeners=[_Logger()],
                name=name,
                throw_new_error_on_trip=False,
            )
            self._breakers[name] = b
        return b

    def _storage(self, name: str) -> MirrorStorage:
        storage = self.breaker(name)._state_storage
        assert isinstance(storage, MirrorStorage)
        return storage

    async def sync(
        self, names: list[str], probe: dict[str, int] | None = None, probe_id: str = ""
    ) -> dict[str, bool]:
        """Send local changes of these breakers and load the fleet's state; take (1) or
        release (2) probe slots. Returns which probe slots were taken."""
        probe = probe or {}
        now = clock.now_ms()
        keys: list[str] = []
        args: list[Any] = [now, probe_id, now + self.probe_ttl_ms, self.cfg.half_open_probes]
        for name in names:
            s = self._storage(name)
            keys += [self.keys.breaker(name), self.keys.breaker_probes(name)]
            start, end = s.transition or ("", "")
            opened = int(s.opened_at.timestamp() * 1000) if s.opened_at else 0
            args += [
                s.fail_delta,
                int(s.fail_reset),
                s.success_delta,
                int(s.success_reset),
                start,
                end,
                opened,
                probe.get(name, 0),
            ]
        reply: Any = await self._sync(keys=keys, args=args)
        taken: dict[str, bool] = {}
        for name, row in zip(names, reply, strict=True):
            state = as_text(row[0])
            storage = self._storage(name)
            storage.load(state, int(row[1]), int(row[2]), int(row[3]))
            # pybreaker notices a state changed elsewhere and, doing so, resets the counters
            # of the new state; the fleet's counters are the truth, so load them again.
            self.breaker(name).state  # noqa: B018
            storage.load(state, int(row[1]), int(row[2]), int(row[3]))
            taken[name] = bool(int(row[4]))
        return taken

    async def admit(self, names: list[str]) -> Ticket | Open:
        """Whether a call may go through every breaker named (feature's and model's)."""
        if not self.cfg.enabled:
            return Ticket((), (), "")
        stale = [n for n in names if self._needs_sync(n)]
        if stale:
            await self.sync(stale)
        now_ms = clock.now_ms()
        want_probe: list[str] = []
        for name in names:
            b = self.breaker(name)
            state = b.current_state
            if state == pybreaker.STATE_OPEN:
                opened = self._storage(name).opened_at
                ready_ms = int(opened.timestamp() * 1000 + b.reset_timeout * 1000) if opened else 0
                if now_ms < ready_ms:
                    return Open(name, ready_ms)
                b.half_open()
                want_probe.append(name)
            elif state == pybreaker.STATE_HALF_OPEN:
                want_probe.append(name)
        if not want_probe:
            return Ticket(tuple(names), (), "")
        self._counter += 1
        probe_id = f"{id(self):x}-{self._counter}"
        taken = await self.sync(want_probe, dict.fromkeys(want_probe, 1), probe_id)
        got = [n for n, ok in taken.items() if ok]
        missing = [n for n, ok in taken.items() if not ok]
        if missing:
            if got:
                await self.sync(got, dict.fromkeys(got, 2), probe_id)
            # The fleet's probes are out: try again after a short while.
            return Open(missing[0], now_ms + max(200, self.cfg.sync_ms))
        return Ticket(tuple(names), tuple(got), probe_id)

    def _needs_sync(self, name: str) -> bool:
        s = self._storage(name)
        if s.state != pybreaker.STATE_CLOSED or s.dirty:
            return True
        return (clock.monotonic() - s.synced_at) * 1000 >= self.cfg.sync_ms

    async def record(self, ticket: Ticket, exc: BaseException | None) -> None:
        """Tell the breakers how the admitted call went (see is_failure)."""
        if not ticket.names:
            return
        verdict = is_failure(exc)
        if verdict is not None:
            for name in ticket.names:
                b = self.breaker(name)
                with contextlib.suppress(_Failed, pybreaker.CircuitBreakerError):
                    b.call(_fail if verdict else _ok)
        changed = [n for n in ticket.names if self._storage(n).dirty or n in ticket.probes]
        if changed:
            release = dict.fromkeys(ticket.probes, 2)
            await self.sync(changed, release, ticket.probe_id)

    async def release(self, ticket: Ticket) -> None:
        """A ticket whose call was never made (a budget refused it, the wait for capacity
        failed): free its probe slots at once and count nothing."""
        if ticket.probes:
            probes = list(ticket.probes)
            await self.sync(probes, dict.fromkeys(probes, 2), ticket.probe_id)

    async def status(self) -> list[dict[str, Any]]:
        """Every breaker the fleet has state for (for `tokenq budgets`)."""
        out: list[dict[str, Any]] = []
        async for raw in self.redis.scan_iter(match=self.keys.breakers, count=500):
            key = as_text(raw)
            if key.endswith(":probes"):
                continue
            values: Any = await self.redis.hgetall(key)
            row = {as_text(k): as_text(v) for k, v in values.items()}
            out.append({"breaker": key.removeprefix(self.keys.breaker("")), **row})
        return sorted(out, key=lambda r: str(r["breaker"]))
