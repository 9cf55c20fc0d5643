"""Spend caps that concurrent workers cannot overspend: reserve the worst case, settle the actual.

Caps (config.toml):
    features.<name>.daily_usd / monthly_usd        the feature's spend per day / month
    features.<name>.tenant_daily_usd / _requests   each tenant's spend / calls per day within it
    budgets.tenant_daily_usd / _requests           the same for every feature without its own

Before each API call the worker reserves, in one Lua script over every cap the call falls
under, the call's worst-case cost: the estimated input (times 1 + budgets.estimate_margin) at
the model's input price (its 1-hour cache-write price when the request marks anything for
caching, its long-context prices when the prompt is over the threshold) plus `max_tokens` at
its output price. The script refuses when spent + held + this reservation would pass a cap, so
fifty workers that each see "under budget" cannot all spend. After the call the reservation is
released and the actual cost (from the usage the API returned) added to `spent`. A call whose
answer never came (cancelled after worker.grace_s, timed out, or its worker died: the worker
that takes the job over settles it) is settled at its reservation, since the API may have
billed it. Settling is idempotent: the cost is added only while the reservation is still held,
so a settlement sent twice after a lost reply counts once. A reservation nobody settles
expires after the call could have ended (anthropic.timeout_s plus a minute).

Each cap has a Redis hash per period, `<prefix>:budget:<scope>:<period>` (scope `feature:<f>`
or `tenant:<f>:<t>`, period the day `YYYY-MM-DD` or month `YYYY-MM` in budgets.timezone) with
`spent` and `held` in nano-dollars (integers: no float drift) and `requests`, and a sorted set
`...:holds` of live reservations by expiry, each `<hold id>:<nano-dollars>` (the hash stays
four fields, however many calls are in flight; a hold written by an older tokenq, `<hold id>`
with its amount in the hash's `h:<hold id>`, is still expired and settled). When `spent`
first reaches budgets.alert_at of a cap, the script says so once per period and the worker
writes an alert to the usage stream.

The organization's own spend limit (a 429 `enforced_spend_limit_reached` from the API) is
`SpendStop`: one key, `<prefix>:spend:stop`, that stops every call of the fleet until the
month turns or an operator clears it (`tokenq budgets resume`).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from worker import clock, trips
from worker.config import Config, FeatureConfig, LongContextPrices, ModelConfig
from worker.contract import Keys, as_text

NANO = 1_000_000_000
DAY_TTL_S = 3 * 86_400
MONTH_TTL_S = 40 * 86_400

# reserve(KEYS, k, n, ARGV, a): n caps, their keys from KEYS[k] (per cap its hash and its
# holds set), their arguments from ARGV[a]: now_ms, hold id, hold expiry ms, then per cap: usd
# cap (nano, -1 none), request cap (-1 none), want (nano), ttl s. Takes want under every cap,
# or under none: nil when taken, else {cap index (1-based), "usd"|"requests", spent, held}.
# A function, so that the run saved before a call takes its reservation in the same script
# (worker.fence's RESERVE).
RESERVE_FUNCTION = """
local function reserve(KEYS, k, n, ARGV, a)
  local now, id, expiry = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  for j = 1, n do
    local h, holds = KEYS[k + 2 * j - 2], KEYS[k + 2 * j - 1]
    local stale = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
    for _, old in ipairs(stale) do
      local amount = string.match(old, ':(%d+)$')
      if not amount then  -- an older tokenq's hold
        amount = redis.call('HGET', h, 'h:' .. old) or '0'
        redis.call('HDEL', h, 'h:' .. old)
      end
      redis.call('HINCRBY', h, 'held', -tonumber(amount))
      redis.call('ZREM', holds, old)
    end
    local base = a + 3 + (j - 1) * 4
    local cap_usd, cap_req = tonumber(ARGV[base]), tonumber(ARGV[base + 1])
    local want = tonumber(ARGV[base + 2])
    local v = redis.call('HMGET', h, 'spent', 'held', 'requests')
    local spent, held = tonumber(v[1] or '0'), tonumber(v[2] or '0')
    local requests = tonumber(v[3] or '0')
    if cap_usd >= 0 and spent + held + want > cap_usd then return {j, 'usd', spent, held} end
    if cap_req >= 0 and requests + 1 > cap_req then return {j, 'requests', spent, held} end
  end
  for j = 1, n do
    local h, holds = KEYS[k + 2 * j - 2], KEYS[k + 2 * j - 1]
    local base = a + 3 + (j - 1) * 4
    local want, ttl = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
    redis.call('HINCRBY', h, 'held', want)
    redis.call('HINCRBY', h, 'requests', 1)
    redis.call('ZADD', holds, expiry, id .. ':' .. ARGV[base + 2])
    redis.call('EXPIRE', h, ttl)
    redis.call('EXPIRE', holds, ttl)
  end
  return nil
end
"""

# KEYS and ARGV as reserve()'s from the first. Returns {1} taken, or {0, cap index,
# "usd"|"requests", spent, held}.
RESERVE = (
    RESERVE_FUNCTION
    + """
local refused = reserve(KEYS, 1, #KEYS / 2, ARGV, 1)
if refused then return {0, unpack(refused)} end
return {1}
"""
)

# settle(KEYS, k, n, ARGV, a): n caps, their keys from KEYS[k] as reserve()'s, their
# arguments from ARGV[a]: hold id, actual cost (nano), 1 when no call was made (the request
# is not counted), the hold's amount (nano), then per cap: usd cap (-1 none), alert threshold
# (nano, -1 none). Returns the 1-based indexes of caps whose alert threshold was crossed just
# now. A cap whose reservation is gone (settled already, or expired) is left as it is:
# settling is idempotent. A function, so that a job's end settles its last call in the same
# script (worker.fence's SETTLE).
SETTLE_FUNCTION = """
local function settle(KEYS, k, n, ARGV, a)
  local id, actual, want = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 3]
  local uncounted = ARGV[a + 2] == '1'
  local alerts = {}
  for j = 1, n do
    local h, holds = KEYS[k + 2 * j - 2], KEYS[k + 2 * j - 1]
    local amount = nil
    if redis.call('ZREM', holds, id .. ':' .. want) == 1 then
      amount = want
    else  -- an older tokenq's hold, or none
      amount = redis.call('HGET', h, 'h:' .. id)
      if amount then
        redis.call('HDEL', h, 'h:' .. id)
        redis.call('ZREM', holds, id)
      end
    end
    if amount then
      redis.call('HINCRBY', h, 'held', -tonumber(amount))
      if uncounted then redis.call('HINCRBY', h, 'requests', -1) end
      local spent = redis.call('HINCRBY', h, 'spent', actual)
      local threshold = tonumber(ARGV[a + 4 + (j - 1) * 2 + 1])
      if threshold >= 0 and spent >= threshold and redis.call('HSETNX', h, 'alerted', 1) == 1 then
        alerts[#alerts + 1] = j
      end
    end
  end
  return alerts
end
"""

# KEYS and ARGV as settle()'s from the first; its reply.
SETTLE = SETTLE_FUNCTION + "return settle(KEYS, 1, #KEYS / 2, ARGV, 1)\n"


@dataclass(frozen=True)
class Cap:
    """One cap a call falls under, in one period."""

    name: str  # the config key, e.g. features.summarize.daily_usd
    key: str
    period: str  # 2026-11-30 or 2026-11, in budgets.timezone
    usd: float | None
    requests: int | None
    ttl_s: int
    resets_at: dt.datetime  # the start of the next period

    @property
    def holds(self) -> str:
        return Keys.budget_holds(self.key)


@dataclass(frozen=True)
class Hold:
    """A reservation made before a call; settle() it after."""

    id: str
    caps: tuple[Cap, ...]
    want_usd: float


@dataclass(frozen=True)
class Reservation:
    """A reservation to make (Budgets.reservation): the caps, the hold's id and amount, and
    the script's keys and arguments."""

    caps: tuple[Cap, ...]
    hold_id: str
    want_usd: float
    keys: list[str]
    args: list[Any]

    @property
    def hold(self) -> Hold:
        """The hold it makes when taken."""
        return Hold(self.hold_id, self.caps, self.want_usd)


@dataclass(frozen=True)
class Settlement:
    """A settlement to make (Budgets.settlement): the hold's caps and the script's keys and
    arguments; the script names the caps that reached their alert fraction by index."""

    caps: tuple[Cap, ...]
    keys: list[str]
    args: list[Any]


@dataclass
class Refusal:
    """Why a reservation was refused: which cap, what is spent and held, when it resets."""

    cap: Cap
    dimension: str  # "usd" or "requests"
    spent_usd: float
    held_usd: float
    want_usd: float
    tz: str = field(default="UTC")

    def sentence(self) -> str:
        c = self.cap
        if self.dimension == "requests":
            return (
                f"{c.name} = {c.requests} reached: {c.requests} calls already in {c.period} "
                f"({self.tz}); it resets at {c.resets_at.isoformat()}"
            )
        return (
            f"{c.name} = {c.usd} would be passed: ${self.spent_usd:.4f} spent and "
            f"${self.held_usd:.4f} reserved in {c.period} ({self.tz}), and this call may cost "
            f"up to ${self.want_usd:.4f}; it resets at {c.resets_at.isoformat()}"
        )


def worst_case_usd(
    prices: ModelConfig, input_tokens: int, max_tokens: int, *, caches: bool, margin: float
) -> float:
    """The most one call can cost: padded input estimate plus max_tokens of output."""
    padded = int(input_tokens * (1 + margin)) + 1
    rates: ModelConfig | LongContextPrices = prices
    if prices.long_context is not None and padded > prices.long_context.above_prompt_tokens:
        rates = prices.long_context
    per_input = rates.input_usd_per_mtok
    if caches:
        per_input = max(
            per_input, rates.cache_write_1h_usd_per_mtok, rates.cache_write_5m_usd_per_mtok
        )
    return float(padded * per_input + max_tokens * rates.output_usd_per_mtok) / 1_000_000


def expected_usd(prices: ModelConfig, input_tokens: int, output_tokens: int) -> float:
    """What one call is expected to cost: the input estimate at the input price (a marked
    prefix may be written to the prompt cache or read from it: dearer or far cheaper) and
    the output expected, at the model's prices."""
    rates: ModelConfig | LongContextPrices = prices
    if prices.long_context is not None and input_tokens > prices.long_context.above_prompt_tokens:
        rates = prices.long_context
    per_input, per_output = rates.input_usd_per_mtok, rates.output_usd_per_mtok
    return float(input_tokens * per_input + output_tokens * per_output) / 1e6


def _next_day(local: dt.datetime) -> dt.datetime:
    day = (local + dt.timedelta(days=1)).date()
    return dt.datetime.combine(day, dt.time(), tzinfo=local.tzinfo)


def _next_month(local: dt.datetime) -> dt.datetime:
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return dt.datetime(year, month, 1, tzinfo=local.tzinfo)


def caps_for(
    cfg: Config,
    keys: Keys,
    feature_name: str,
    feature: FeatureConfig,
    tenant: str,
    now: dt.datetime,
) -> list[Cap]:
    """Every cap a call of this feature and tenant falls under right now."""
    tz = zoneinfo.ZoneInfo(cfg.budgets.timezone)
    local = now.astimezone(tz)
    day, month = local.strftime("%Y-%m-%d"), local.strftime("%Y-%m")
    mine, by_day, by_month = f"feature:{feature_name}", _next_day(local), _next_month(local)
    out: list[Cap] = []
    f = f"features.{feature_name}"
    if feature.daily_usd is not None:
        key = keys.budget(mine, day)
        out.append(Cap(f"{f}.daily_usd", key, day, feature.daily_usd, None, DAY_TTL_S, by_day))
    if feature.monthly_usd is not None:
        key = keys.budget(mine, month)
        usd = feature.monthly_usd
        out.append(Cap(f"{f}.monthly_usd", key, month, usd, None, MONTH_TTL_S, by_month))
    t_usd, t_req = feature.tenant_daily_usd, feature.tenant_daily_requests
    usd_name = f"{f}.tenant_daily_usd" if t_usd is not None else "budgets.tenant_daily_usd"
    req_name = (
        f"{f}.tenant_daily_requests" if t_req is not None else "budgets.tenant_daily_requests"
    )
    t_usd = t_usd if t_usd is not None else cfg.budgets.tenant_daily_usd
    t_req = t_req if t_req is not None else cfg.budgets.tenant_daily_requests
    if tenant and (t_usd is not None or t_req is not None):
        name = (
            " and ".join(n for n, v in ((usd_name, t_usd), (req_name, t_req)) if v is not None)
            + f" (tenant {tenant})"
        )
        key = keys.budget(f"tenant:{feature_name}:{tenant}", day)
        out.append(Cap(name, key, day, t_usd, t_req, DAY_TTL_S, by_day))
    return out


def _nano(usd: float) -> int:
    return round(usd * NANO)


class Budgets:
    """Reservations and settlements against the caps in Redis. With shared trips (a worker's,
    worker.trips) the reservations and settlements of the jobs in flight share round trips;
    each is still its own script, so each is decided on its own as before."""

    def __init__(
        self, redis: aioredis.Redis, cfg: Config, shared: trips.Trips | None = None
    ) -> None:
        self.redis = redis
        self.cfg = cfg
        self.trips = shared
        self._reserve = trips.register(redis, RESERVE)
        self._settle = trips.register(redis, SETTLE)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        if self.trips is None:
            return await script(keys=keys, args=args)
        queued: trips.Queued = lambda pipe: trips.evalsha_into(pipe, script, keys, args)  # noqa: E731
        return trips.raise_first(await self.trips.run(queued))[0]

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg

    def reservation(
        self, caps: list[Cap], hold_id: str, want_usd: float, now_ms: int
    ) -> Reservation:
        """The keys and arguments of a reservation of want_usd under every cap at once (the
        RESERVE script's, and worker.fence's RESERVE before a run saved with it)."""
        keys: list[str] = []
        args: list[Any] = [
            now_ms,
            hold_id,
            now_ms + int((self.cfg.anthropic.timeout_s + 60) * 1000),
        ]
        for c in caps:
            keys += [c.key, c.holds]
            usd = -1 if c.usd is None else _nano(c.usd)
            req = -1 if c.requests is None else c.requests
            args += [usd, req, _nano(want_usd), c.ttl_s]
        return Reservation(tuple(caps), hold_id, want_usd, keys, args)

    def refusal(self, r: Reservation, refused: list[Any]) -> Refusal:
        """The Refusal of a reservation the script refused ({cap index, dimension, spent,
        held})."""
        cap, dimension = r.caps[int(refused[0]) - 1], as_text(refused[1])
        spent, held = int(refused[2]) / NANO, int(refused[3]) / NANO
        return Refusal(cap, dimension, spent, held, r.want_usd, self.cfg.budgets.timezone)

    async def reserve(
        self, caps: list[Cap], hold_id: str, want_usd: float, now_ms: int
    ) -> Hold | Refusal:
        """Reserve want_usd under every cap at once, or refuse naming the cap."""
        r = self.reservation(caps, hold_id, want_usd, now_ms)
        reply: Any = await self._run(self._reserve, r.keys, r.args)
        if int(reply[0]) == 1:
            return r.hold
        return self.refusal(r, reply[1:])

    def settlement(self, hold: Hold, actual_usd: float, *, called: bool) -> Settlement:
        """The keys and arguments that release the hold and add the actual cost (the SETTLE
        script's, and worker.fence's SETTLE in a job's end)."""
        alert_at = self.cfg.budgets.alert_at
        limits = [(-1, -1) if c.usd is None else (_nano(c.usd), _nano(c.usd * alert_at))
                  for c in hold.caps]  # fmt: skip
        keys = _settle_keys([c.key for c in hold.caps])
        args = _settle_args(hold.id, actual_usd, hold.want_usd, called=called, limits=limits)
        return Settlement(hold.caps, keys, args)

    async def settle(self, hold: Hold, actual_usd: float, *, called: bool) -> list[Cap]:
        """Release the hold and add the actual cost; the caps whose alert fraction was just
        reached (each once per period)."""
        s = self.settlement(hold, actual_usd, called=called)
        reply: Any = await self._run(self._settle, s.keys, s.args)
        return [hold.caps[int(j) - 1] for j in reply]

    async def settle_lost_into(
        self, pipe: Any, hold_id: str, cap_keys: list[str], usd: float
    ) -> None:
        """Queue, on the caller's transaction, the settlement of a call whose answer never
        came, at `usd` (its reservation): the API may have billed it. No alerts."""
        args = _settle_args(hold_id, usd, usd, called=True, limits=[(-1, -1)] * len(cap_keys))
        await self._settle(keys=_settle_keys(cap_keys), args=args, client=pipe)


def _settle_keys(cap_keys: list[str]) -> list[str]:
    """SETTLE's keys: per cap its hash and its holds set."""
    return [name for key in cap_keys for name in (key, Keys.budget_holds(key))]


def _settle_args(hold_id: str, actual_usd: float, want_usd: float, *, called: bool,
                 limits: list[tuple[int, int]]) -> list[Any]:  # fmt: skip
    """SETTLE's arguments (see settle() in SETTLE_FUNCTION): the hold, the actual cost,
    whether a call was made, the hold's amount, then per cap (usd cap, alert threshold) in
    nano-dollars, -1 for none."""
    args: list[Any] = [hold_id, _nano(actual_usd), "0" if called else "1", _nano(want_usd)]
    for usd, threshold in limits:
        args += [usd, threshold]
    return args


async def budget_rows(
    redis: aioredis.Redis, cfg: Config, keys: Keys, now: dt.datetime
) -> list[dict[str, Any]]:
    """What `tokenq budgets` shows: each configured feature cap and every tenant seen today."""
    rows: list[dict[str, Any]] = []
    for name, feature in cfg.features.items():
        for cap in caps_for(cfg, keys, name, feature, "", now):
            rows.append(await _row(redis, cap, name, ""))
        tz = zoneinfo.ZoneInfo(cfg.budgets.timezone)
        day = now.astimezone(tz).strftime("%Y-%m-%d")
        pattern = keys.budgets_of_tenants(name, day)
        async for raw in redis.scan_iter(match=pattern, count=500):
            key = as_text(raw)
            head = keys.budget(f"tenant:{name}", "")  # <prefix>:budget:tenant:<f>:
            tenant = key[len(head) : -len(day) - 1]
            for cap in caps_for(cfg, keys, name, feature, tenant, now):
                if cap.key == key:
                    rows.append(await _row(redis, cap, name, tenant))
    return rows


async def _row(redis: aioredis.Redis, cap: Cap, feature: str, tenant: str) -> dict[str, Any]:
    values: Any = await redis.hmget(cap.key, ["spent", "held", "requests"])
    spent, held, requests = (int(v) if v is not None else 0 for v in values)
    return {
        "cap": cap.name,
        "feature": feature,
        "tenant": tenant,
        "period": cap.period,
        "spent_usd": spent / NANO,
        "reserved_usd": held / NANO,
        "requests": requests,
        "cap_usd": cap.usd,
        "cap_requests": cap.requests,
        "resets_at": cap.resets_at.isoformat(),
    }


# KEYS: the stop key, the usage stream. ARGV: until (unix ms), usage maxlen, then the alert
# event's fields. The first process to stop the fleet writes the alert: 1; already stopped: 0.
STOP = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PXAT', ARGV[1]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
  return 1
end
return 0
"""


def month_end_ms(now: dt.datetime) -> int:
    """00:00 UTC on the 1st of the next month, when the API lifts its spend limit."""
    return int(_next_month(now.astimezone(dt.UTC)).timestamp() * 1000)


class SpendStop:
    """The organization's spend limit, fleet-wide: while `<prefix>:spend:stop` exists (its
    value: until when, unix ms) no process makes a call. Each process looks at most every
    `look_every_s`, so a stop reaches the fleet within that (a call or two more may meet the
    API's own refusal, which is not billed)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, look_every_s: float = 1.0) -> None:
        self.redis = redis
        self.keys = keys
        self.look_every_s = look_every_s
        self._until: int | None = None
        self._looked = -1e9
        self._stop = trips.register(redis, STOP)

    async def until_ms(self) -> int | None:
        """When the stop ends (unix ms), or None when calls may go."""
        if clock.monotonic() - self._looked >= self.look_every_s:
            raw: Any = await self.redis.get(self.keys.spend_stop)
            self._until = int(raw) if raw is not None and as_text(raw).isdigit() else None
            self._looked = clock.monotonic()
        if self._until is not None and self._until <= clock.now_ms():
            self._until = None
        return self._until

    async def stop(self, until_ms: int, alert: dict[str, str], usage_maxlen: int) -> bool:
        """Stop the fleet until until_ms; the alert event goes onto the usage stream when this
        process is the one that stopped it (True)."""
        flat = [part for pair in alert.items() for part in pair]
        keys = [self.keys.spend_stop, self.keys.usage]
        done: Any = await self._stop(keys=keys, args=[until_ms, usage_maxlen, *flat])
        self._until, self._looked = until_ms, clock.monotonic()
        return bool(done)


async def resume(redis: aioredis.Redis, keys: Keys) -> int | None:
    """Lift the fleet's spend stop (`tokenq budgets resume`); when it would have ended, or
    None when there was none."""
    raw: Any = await redis.getdel(keys.spend_stop)
    return None if raw is None else int(as_text(raw))
