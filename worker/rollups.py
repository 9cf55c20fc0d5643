"""Rollups: each job outcome added to compact hourly aggregates and running totals in Redis.

The finishing write (Queue.finish_into) appends the job's usage event, in a compact binary
record, to a list (`RPUSH`: one plain command in its MULTI, so it is counted once, with the
outcome). A fold (fold.lua: pop and apply in one script, so each record is counted once)
adds the records up into their hour (UTC): one small hash per cell, a cell being (feature,
model, priority, tenant), kept `report.retention_days` after the hour ends; the hour's index
hash lists its cells and the tenants that have rows. Every worker folds every second, and
every reader folds before it reads, so the rollups are never more than a second behind.
Folding a batch adds up the records of each cell first: a cell costs the server one HMGET
and one HSET per batch, not per outcome.

An hour keeps rows for its first `report.tenants_per_hour` tenants; later ones count under
OTHER, so an hour holds at most (tenants + 2) x features x models x priorities cells
whatever the producers send (unknown features count as UNKNOWN).

When the hour is over, the first reader compacts it (worker.cells) and, in the same
transaction, adds its cells to the running totals (rollup.lua): one hash per (feature,
model, priority) (and tenant, with metrics.tenant_labels) that never expires, so the counters
read from them (with the live hours on top) never go down.

A cell holds integer metrics (METRICS): outcomes by status and mode, tokens by kind, cost and
baseline in nano-dollars (exact sums), response- and prompt-cache counts, and two histograms
with the fixed buckets BOUNDS_MS (API latency of realtime calls, queue wait of every job), so
percentiles of any set of cells merge by adding buckets.

Deltas merge: a Delta adds any number of outcomes, so outcomes that finish together make one
record per cell. Usage events that are not jobs (budget alerts) add nothing. This module reads
the usage event's stream fields only.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import struct
import time
import unicodedata
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from worker import clock
from worker.config import Config
from worker.contract import Keys

BOUNDS_MS = (*(m * 10**e for e in range(8) for m in (1, 2, 5)), 100_000_000)
"""Histogram bucket upper bounds in ms, 1-2-5 steps from 1 ms to 27.8 hours (and above)."""

JOBS = tuple(f"j{s}{m}" for s in "oe" for m in "rbc")
"""Outcomes by status (o: ok, e: error) and mode (r: realtime, b: batch, c: cache)."""
TOKENS = ("ti", "to", "tw", "tr")  # input, output, cache write, cache read
MONEY = ("usd", "base")  # cost and baseline cost, nano-dollars
RCACHE = ("rh", "rj", "rm")  # response cache: hit, joined an identical call, miss
PCACHE = ("pr", "pw")  # calls that read the prompt cache; that only wrote it
LATENCY = tuple(f"l{k}" for k in range(len(BOUNDS_MS) + 1))
WAIT = tuple(f"q{k}" for k in range(len(BOUNDS_MS) + 1))
SUMS = ("ls", "qs")  # the histograms' sums, ms
METRICS = ("n", *JOBS, *TOKENS, *MONEY, *RCACHE, *PCACHE, *LATENCY, *WAIT, *SUMS)
"""Every metric of a cell, in the order of a compacted vector (worker.report)."""
INDEX = {name: n for n, name in enumerate(METRICS)}

OTHER = "\x1eother"
"""The tenant slot of outcomes past an hour's tenant rows (control characters cannot occur in
a stored tenant, see tenant_slot)."""
UNKNOWN = "\x1eunknown"
"""The feature of outcomes whose feature is not in the config (a producer's mistake)."""
SEP = "\x1f"
"""Separates the dimensions of a cell: feature, model, priority, tenant."""
NANO = 1_000_000_000
TENANT_MAX = 64
CELL_BYTES = 1_300
"""The most memory one cell of an hour takes in Redis with every metric set (its hash, key,
expiry and index entry); a typical cell takes 250-400 bytes."""


def max_cells_per_hour(settings: Settings, models: int, priorities: int) -> int:
    """The most cells an hour can have: (tenants + none + other) x (features + unknown) x
    models x priorities. With CELL_BYTES, the bound of an hour's memory."""
    return (settings.tenants_per_hour + 2) * (len(settings.features) + 1) * models * priorities


def _script(name: str) -> str:
    """A script of this folder, with METRICS defined, without comments and indentation."""
    source = Path(__file__).with_name(name).read_text(encoding="utf-8")
    lines = (line.split(" -- ")[0].strip() for line in source.splitlines())
    body = "\n".join(line for line in lines if line and not line.startswith("--"))
    return "local METRICS = {" + ", ".join(f"'{m}'" for m in METRICS) + "}\n" + body


SCRIPT = _script("rollup.lua")
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
FOLD = _script("fold.lua")
FOLD_BATCH = 2000
"""Most records one fold script call takes (it blocks the server while it runs: ~10 ms)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What the writer needs from the config ([report], [metrics], [features])."""

    retention_days: int = 90
    tenants_per_hour: int = 100
    tenant_totals: bool = False
    features: frozenset[str] = frozenset()


def settings_of(cfg: Config) -> Settings:
    """The writer's settings from a config."""
    return Settings(
        retention_days=cfg.report.retention_days,
        tenants_per_hour=cfg.report.tenants_per_hour,
        tenant_totals=cfg.metrics.tenant_labels,
        features=frozenset(cfg.features),
    )


def hour_of(ts_ms: int) -> int:
    """Hours since the epoch (UTC) of a unix time in ms."""
    return ts_ms // 3_600_000


@lru_cache(maxsize=256)
def hour_label(hour: int) -> str:
    """An hour as it appears in key names: YYYYMMDDHH (UTC)."""
    return time.strftime("%Y%m%d%H", time.gmtime(hour * 3600))


def bucket(ms: int) -> int:
    """The histogram bucket of a duration: the first whose upper bound is >= ms."""
    return bisect.bisect_left(BOUNDS_MS, ms)


def nano_usd(text: str) -> int:
    """A usage event's fixed-point dollar string as integer nano-dollars (half up)."""
    whole, _, frac = text.strip().partition(".")
    try:
        units = int(whole or "0") * 10**10 + int((frac + "0" * 10)[:10] or "0")
    except ValueError:
        try:
            return round(float(text) * NANO)
        except ValueError:
            return 0
    return (units + 5) // 10 if units >= 0 else -((-units + 5) // 10)


def _int(text: str | None) -> int:
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


@lru_cache(maxsize=4096)
def tenant_slot(tenant: str) -> str:
    """A tenant as stored: control characters and lone surrogates (bytes that were not UTF-8)
    replaced, long names shortened with a digest (producers may send anything; what is stored
    stays small, printable and valid UTF-8)."""
    clean = "".join("?" if unicodedata.category(c) in ("Cc", "Cs") else c for c in tenant)
    if len(clean) <= TENANT_MAX:
        return clean
    digest = hashlib.sha256(tenant.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{clean[: TENANT_MAX - 17]}~{digest}"


@lru_cache(maxsize=4096)
def cell_id(dims: str) -> str:
    """A short id of a cell's dimensions (72 bits: collisions are negligible per hour)."""
    raw = hashlib.blake2b(dims.encode("utf-8", "surrogateescape"), digest_size=9).digest()
    return base64.urlsafe_b64encode(raw).decode()


def metrics_of(fields: Mapping[str, str]) -> dict[str, int] | None:
    """What one usage event adds to its cell; None for events that are not job outcomes."""
    if fields.get("kind", "job") != "job":
        return None
    ok = fields.get("status") == "ok"
    mode = {"batch": "b", "cache": "c"}.get(fields.get("mode", ""), "r")
    out = {"n": 1, f"j{'o' if ok else 'e'}{mode}": 1}
    tokens = [_int(fields.get(name)) for name in _TOKEN_FIELDS]
    for code, value in zip(TOKENS, tokens, strict=True):
        if value:
            out[code] = value
    for code, name in (("usd", "cost_usd"), ("base", "baseline_cost_usd")):
        value = nano_usd(fields.get(name) or "0")
        if value:
            out[code] = value
    wait = _int(fields.get("queue_ms"))
    out[f"q{bucket(wait)}"] = 1
    if wait:
        out["qs"] = wait
    if ok:
        _answered(out, fields, mode, tokens)
    return out


def _answered(out: dict[str, int], fields: Mapping[str, str], mode: str, tokens: list[int]) -> None:
    """The metrics only answered jobs have: cache hits and the call's latency."""
    answer = fields.get("response_cache", "")
    if answer in ("hit", "joined", "miss"):
        out[f"r{answer[0]}"] = 1
    if tokens[3]:
        out["pr"] = 1
    elif tokens[2]:
        out["pw"] = 1
    if mode == "r":
        latency = _int(fields.get("latency_ms"))
        out[f"l{bucket(latency)}"] = 1
        if latency:
            out["ls"] = latency


_TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _add(into: dict[str, int], more: Mapping[str, int]) -> None:
    for name, value in more.items():
        into[name] = into.get(name, 0) + value


@dataclass(slots=True)
class Delta:
    """Outcomes added up per cell, ready to be written with one script call (mergeable)."""

    settings: Settings
    # (hour, feature, model, priority, tenant) -> metrics; (feature, model, priority[, tenant])
    # -> metrics for the running totals (only compaction adds those, see add_total).
    hours: dict[tuple[int, str, str, str, str], dict[str, int]] = field(default_factory=dict)
    totals: dict[tuple[str, ...], dict[str, int]] = field(default_factory=dict)

    def add(self, fields: Mapping[str, str]) -> None:
        """Add one usage event (its stream fields)."""
        metrics = metrics_of(fields)
        if metrics is None:
            return
        feature = fields.get("feature", "")
        if feature not in self.settings.features:
            feature = UNKNOWN
        model = fields.get("model", "")[:TENANT_MAX]
        priority = fields.get("priority", "")[:TENANT_MAX]
        tenant = tenant_slot(fields.get("tenant", ""))
        hour = hour_of(_int(fields.get("ts_ms")) or clock.now_ms())
        key = (hour, feature, model, priority, tenant)
        if key in self.hours:
            _add(self.hours[key], metrics)
        else:
            self.hours[key] = metrics

    def add_total(self, dims: tuple[str, str, str, str], vector: Iterable[int]) -> None:
        """Add a compacted cell (feature, model, priority, tenant; METRICS order) to the
        running totals (the tenant only with metrics.tenant_labels)."""
        total = dims if self.settings.tenant_totals else dims[:3]
        into = self.totals.setdefault(total, {})
        for name, value in zip(METRICS, vector, strict=True):
            if value:
                into[name] = into.get(name, 0) + value

    def merge(self, other: Delta) -> None:
        """Add another delta's outcomes to this one."""
        for key, metrics in other.hours.items():
            _add(self.hours.setdefault(key, {}), metrics)
        for tkey, metrics in other.totals.items():
            _add(self.totals.setdefault(tkey, {}), metrics)

    def __bool__(self) -> bool:
        return bool(self.hours or self.totals)

    def records(self) -> list[bytes]:
        """The outcomes as fold.lua reads them: one record per cell."""
        out = []
        for (hour, *dims), metrics in self.hours.items():
            head = SEP.join(dims).encode("utf-8", "surrogateescape")
            out.append(_HEAD.pack(hour, hour_label(hour).encode(), len(head)) + head
                       + _packed(metrics))  # fmt: skip
        return out

    def command(self, keys: Keys) -> tuple[list[str], list[Any]]:
        """The running totals' part as rollup.lua's KEYS and ARGV."""
        names: dict[str, int] = {}

        def key(name: str) -> int:
            return names.setdefault(name, len(names) + 1)

        args: list[Any] = []
        for tdims, metrics in self.totals.items():
            dims_text = SEP.join(tdims)
            cid = cell_id(dims_text)
            args += ["t", key(keys.rollup_totals), key(keys.rollup_total(cid)), cid, dims_text,
                     _packed(metrics)]  # fmt: skip
        return list(names), args


_HEAD = struct.Struct("<I10sH")


def _packed(metrics: Mapping[str, int]) -> bytes:
    """A cell's amounts as the script reads them: (metric number, amount) pairs packed as
    little-endian (uint8, double), 'n' first. One argument instead of two per metric: the
    client packs each argument in Python, and the script parses no number text."""
    pairs: list[float] = [0, metrics.get("n", 0)]
    for name, value in metrics.items():
        if name != "n":
            pairs += (INDEX[name], value)
    return _PACKERS[len(pairs) // 2].pack(*pairs)


_PACKERS = [struct.Struct("<" + "Bd" * n) for n in range(len(METRICS) + 1)]


class Rollups:
    """Adds outcomes to the rollups inside a caller's transaction, and folds them.

    The outcomes added to one transaction become one delta, written when the transaction runs
    through execute(): one RPUSH of a record per cell (a batcher chunk of 200 results makes
    one command). The running totals' script (compaction's) goes by its digest; a server that
    restarted or flushed its script cache answers NOSCRIPT inside the MULTI, whose other
    commands still apply: execute() then loads the script and writes those totals on their
    own, so nothing is lost or added twice.
    """

    def __init__(self, keys: Keys, settings: Settings) -> None:
        self.keys = keys
        self.settings = settings
        self._queued: weakref.WeakKeyDictionary[Any, Delta] = weakref.WeakKeyDictionary()

    def reload(self, settings: Settings) -> None:
        self.settings = settings

    async def load(self, redis: aioredis.Redis) -> None:
        """Load the scripts into the server (at start, so nothing needs to recover)."""
        await redis.script_load(SCRIPT)
        await redis.script_load(FOLD)

    def delta(self, outcomes: Iterable[Mapping[str, str]] = ()) -> Delta:
        """A delta of these usage events (more can be added)."""
        out = Delta(self.settings)
        for fields in outcomes:
            out.add(fields)
        return out

    def add_into(self, tx: Any, usage: Mapping[str, str]) -> None:
        """Add one usage event to what the transaction will write (the finishing write's
        hook). The transaction must run through execute()."""
        self._queued.setdefault(tx, Delta(self.settings)).add(usage)

    def write_into(self, tx: Any, delta: Delta) -> None:
        """Add a delta to what the transaction will write (see add_into)."""
        self._queued.setdefault(tx, Delta(self.settings)).merge(delta)

    def flush_into(self, tx: Any) -> Delta | None:
        """Queue the writes of everything added to the transaction; that delta."""
        delta = self._queued.pop(tx, None)
        if not delta:
            return None
        if delta.hours:
            tx.rpush(self.keys.rollup_queue, *delta.records())
        if delta.totals:
            names, args = delta.command(self.keys)
            tx.evalsha(SHA, len(names), *names, *args)
        return delta

    async def fold(self, redis: aioredis.Redis) -> int:
        """Add the queued outcome records to their hours' cells; how many records."""
        script = redis.register_script(FOLD)  # loads itself again after a NOSCRIPT
        keep_s = self.settings.retention_days * 86_400
        done = 0
        while True:
            args: list[Any] = [self.keys.prefix, self.settings.tenants_per_hour, keep_s, FOLD_BATCH]
            took = int(await script(keys=[self.keys.rollup_queue], args=args))
            done += took
            if took < FOLD_BATCH:
                return done


async def execute(redis: aioredis.Redis, tx: Any, rollups: Rollups | None) -> list[Any]:
    """Run a transaction that may hold rollup writes; then raise its first error other than a
    running-totals script's NOSCRIPT, which is recovered (as redis-py's execute() would)."""
    delta = rollups.flush_into(tx) if rollups is not None else None
    results: list[Any] = await tx.execute(raise_on_error=False)
    missed = any(isinstance(r, NoScriptError) for r in results)
    if delta is not None and rollups is not None and missed:
        await rollups.load(redis)  # the rest of the transaction has applied
        names, args = delta.command(rollups.keys)
        await redis.evalsha(SHA, len(names), *names, *args)
    for r in results:
        if isinstance(r, Exception) and not isinstance(r, NoScriptError):
            raise r
    return results
