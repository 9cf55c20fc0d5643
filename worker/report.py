"""Reading the rollups: cells of hours and days, grouped and filtered, as `tokenq report` rows.

An hour's cells are read from its index and cell hashes (worker.rollups). A whole day that
ended more than GRACE_MS ago is read from its compacted hash instead: the first reader that
needs it adds the day's hours up and writes them as one hash, one field per cell (`<dims>` ->
its metrics as text), plus one tenant-less cell per (feature, model, priority) for queries
that do not ask about tenants. A day keeps rows for its `report.tenants_per_hour` biggest
tenants by spend; the rest count under "(other)". Compacting a day twice writes the same hash,
so readers need no lock. Anything in these keys that does not parse (another program's
writes) is skipped.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from worker.contract import Keys
from worker.rollups import (
    BOUNDS_MS,
    INDEX,
    LATENCY,
    METRICS,
    NANO,
    OTHER,
    SEP,
    UNKNOWN,
    WAIT,
    hour_label,
)

GRACE_MS = 3_600_000
"""A day is compacted this long after it ended, when no outcome can still be written to it."""
ALL = "\x1eall"
"""The tenant slot of a day's tenant-less cells (every tenant together)."""
DIMENSIONS = ("feature", "model", "tenant", "priority", "day", "hour")
Vector = list[int]
Dims = tuple[str, str, str, str]  # feature, model, priority, tenant


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _vector(fields: dict[Any, Any]) -> Vector:
    out = [0] * len(METRICS)
    for name, value in fields.items():
        n = INDEX.get(_text(name))
        if n is not None:
            try:
                out[n] = int(value)
            except ValueError:
                continue
    return out


def _add(into: Vector, more: Sequence[int]) -> None:
    for n, value in enumerate(more):
        if value:
            into[n] += value


def _dims(text: str) -> Dims | None:
    parts = text.split(SEP)
    return (parts[0], parts[1], parts[2], parts[3]) if len(parts) == 4 else None


async def hour_cells(redis: aioredis.Redis, keys: Keys, hour: int) -> dict[Dims, Vector]:
    """One hour's cells by their dimensions."""
    label = hour_label(hour)
    index: dict[Any, Any] = await redis.hgetall(keys.rollup_index(label))
    cells = {_text(k)[1:]: _dims(_text(v)) for k, v in index.items() if _text(k).startswith("K")}
    found = [(cid, dims) for cid, dims in cells.items() if dims is not None]
    if not found:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for cid, _ in found:
            pipe.hgetall(keys.rollup_cell(label, cid))
        replies: list[Any] = await pipe.execute()
    out: dict[Dims, Vector] = {}
    for (_, dims), reply in zip(found, replies, strict=True):
        if dims is not None and reply:
            _add(out.setdefault(dims, [0] * len(METRICS)), _vector(reply))
    return out


def day_label(day: int) -> str:
    """A day (days since the epoch, UTC) as it appears in key names: YYYYMMDD."""
    return time.strftime("%Y%m%d", time.gmtime(day * 86_400))


def _encode(vector: Vector) -> str:
    return ",".join(map(str, vector))


def _decode(text: str) -> Vector | None:
    try:
        vector = [int(v) for v in text.split(",")]
    except ValueError:
        return None
    return vector if len(vector) == len(METRICS) else None


def fold_tenants(cells: dict[Dims, Vector], keep: int) -> dict[Dims, Vector]:
    """Keep the `keep` biggest tenants by spend (then outcomes); the others become OTHER."""
    spend: dict[str, tuple[int, int]] = {}
    for (_, _, _, tenant), v in cells.items():
        if tenant not in ("", OTHER):
            old = spend.get(tenant, (0, 0))
            spend[tenant] = (old[0] + v[INDEX["usd"]], old[1] + v[INDEX["n"]])
    kept = set(sorted(spend, key=lambda t: spend[t], reverse=True)[:keep])
    out: dict[Dims, Vector] = {}
    for (f, m, p, tenant), v in cells.items():
        slot = tenant if tenant in kept or tenant == "" else OTHER
        _add(out.setdefault((f, m, p, slot), [0] * len(METRICS)), v)
    return out


async def compact_day(
    redis: aioredis.Redis, keys: Keys, day: int, *, keep_tenants: int, retention_days: int
) -> dict[Dims, Vector]:
    """Add a day's hours up and write them as the day's hash; returns its cells."""
    cells: dict[Dims, Vector] = {}
    for hour in range(day * 24, day * 24 + 24):
        for dims, v in (await hour_cells(redis, keys, hour)).items():
            _add(cells.setdefault(dims, [0] * len(METRICS)), v)
    cells = fold_tenants(cells, keep_tenants)
    everyone: dict[Dims, Vector] = {}
    for (f, m, p, _), v in cells.items():
        _add(everyone.setdefault((f, m, p, ALL), [0] * len(METRICS)), v)
    cells.update(everyone)
    mapping = {SEP.join(dims): _encode(v) for dims, v in cells.items()}
    mapping["~"] = "1"  # compacted, even when the day had no outcomes
    key = keys.rollup_day(day_label(day))
    async with redis.pipeline(transaction=True) as tx:
        tx.delete(key)
        tx.hset(key, mapping=mapping)  # type: ignore[arg-type]
        tx.expireat(key, (day + 1) * 86_400 + retention_days * 86_400)
        await tx.execute()
    return cells


async def day_cells(
    redis: aioredis.Redis, keys: Keys, day: int, *, keep_tenants: int, retention_days: int
) -> dict[Dims, Vector]:
    """A whole, finished day's cells (with the ALL cells), compacting it if nobody has."""
    stored: dict[Any, Any] = await redis.hgetall(keys.rollup_day(day_label(day)))
    if not stored:
        return await compact_day(
            redis, keys, day, keep_tenants=keep_tenants, retention_days=retention_days
        )
    out: dict[Dims, Vector] = {}
    for name, value in stored.items():
        dims, vector = _dims(_text(name)), _decode(_text(value))
        if dims is not None and vector is not None:
            out[dims] = vector
    return out


@dataclass(frozen=True, slots=True)
class Query:
    """What to report: hours [start_hour, end_hour), grouped by `by`, filtered."""

    start_hour: int
    end_hour: int
    by: tuple[str, ...] = ()
    feature: str | None = None
    tenant: str | None = None


@dataclass(slots=True)
class Answer:
    """The report's rows (group values, then row()'s columns), all of them together (total)
    and notes for the reader."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    total: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _periods(q: Query, now_ms: int) -> Iterable[tuple[str, int]]:
    """("day", day) for whole compactable days in the range (unless grouping by hour), else
    ("hour", hour)."""
    hour = q.start_hour
    while hour < q.end_hour:
        day = hour // 24
        whole = hour % 24 == 0 and hour + 24 <= q.end_hour
        done = (day + 1) * 86_400_000 + GRACE_MS <= now_ms
        if whole and done and "hour" not in q.by:
            yield "day", day
            hour += 24
        else:
            yield "hour", hour
            hour += 1


def _group(dims: Dims, start_hour: int, by: tuple[str, ...]) -> tuple[str, ...]:
    f, m, p, t = dims
    values = {
        "feature": f, "model": m, "priority": p, "tenant": t,
        "day": time.strftime("%Y-%m-%d", time.gmtime(start_hour * 3600)),
        "hour": time.strftime("%Y-%m-%d %H:00", time.gmtime(start_hour * 3600)),
    }  # fmt: skip
    return tuple(values[name] for name in by)


async def query(
    redis: aioredis.Redis, keys: Keys, q: Query, *, now_ms: int, keep_tenants: int,
    retention_days: int,
) -> Answer:  # fmt: skip
    """Rows of metrics (see row()) for each group of q.by, biggest cost first."""
    tenants = "tenant" in q.by or q.tenant is not None
    sums: dict[tuple[str, ...], Vector] = {}
    everything = [0] * len(METRICS)
    for kind, n in _periods(q, now_ms):
        if kind == "day":
            cells = await day_cells(redis, keys, n, keep_tenants=keep_tenants,
                                    retention_days=retention_days)  # fmt: skip
            start = n * 24
        else:
            cells, start = await hour_cells(redis, keys, n), n
        for dims, v in cells.items():
            if kind == "day" and (dims[3] == ALL) == tenants:
                continue  # a day has tenant rows and ALL rows: use one kind
            if q.feature is not None and display(dims[0]) != q.feature:
                continue
            if q.tenant is not None and display(dims[3]) != q.tenant:
                continue
            _add(sums.setdefault(_group(dims, start, q.by), [0] * len(METRICS)), v)
            _add(everything, v)
    answer = Answer(total=row(everything))
    for group, v in sums.items():
        answer.rows.append({**{k: display(g) for k, g in zip(q.by, group, strict=True)},
                            **row(v)})  # fmt: skip
    answer.rows.sort(key=lambda r: tuple(r[k] for k in q.by) if {"day", "hour"} & set(q.by)
                     else (-r["cost_usd"], tuple(r[k] for k in q.by)))  # fmt: skip
    oldest_ms = now_ms - retention_days * 86_400_000
    if q.start_hour * 3_600_000 < oldest_ms:
        since = time.strftime("%Y-%m-%d %H:00", time.gmtime(oldest_ms / 1000))
        answer.notes.append(
            f"the period starts before the rollups' retention (report.retention_days = "
            f"{retention_days}): nothing before about {since} UTC is kept"
        )
    return answer


def display(slot: str) -> str:
    """A stored dimension value as people read it."""
    return {OTHER: "(other)", UNKNOWN: "(unknown feature)", ALL: "(all)", "": "(none)"}.get(
        slot, slot
    )


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram over BOUNDS_MS, interpolated inside its bucket as
    Prometheus' histogram_quantile does; None without observations."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for k, count in enumerate(counts):
        if count and seen + count >= rank:
            low = BOUNDS_MS[k - 1] if k else 0
            high = BOUNDS_MS[k] if k < len(BOUNDS_MS) else low
            return low + (high - low) * max(0.0, rank - seen) / count
        seen += count
    return float(BOUNDS_MS[-1])


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


TOKEN_COLUMNS = (
    ("input_tokens", "ti"),
    ("output_tokens", "to"),
    ("cache_write_tokens", "tw"),
    ("cache_read_tokens", "tr"),
)


def row(v: Sequence[int]) -> dict[str, Any]:
    """A vector of metrics as the report's columns."""
    g = {name: v[n] for n, name in enumerate(METRICS)}
    ok = g["jor"] + g["job"] + g["joc"]
    tokens = {name: g[code] for name, code in TOKEN_COLUMNS}
    asked = g["rh"] + g["rj"] + g["rm"]
    lat = [v[INDEX[name]] for name in LATENCY]
    wait = [v[INDEX[name]] for name in WAIT]
    return {
        "jobs": g["n"], "ok": ok, "errors": g["n"] - ok,
        "tokens": sum(tokens.values()), **tokens,
        "cost_usd": g["usd"] / NANO, "baseline_usd": g["base"] / NANO,
        "saved_usd": (g["base"] - g["usd"]) / NANO,
        "saved_pct": _rate(g["base"] - g["usd"], g["base"]),
        "response_cache_hit_rate": _rate(g["rh"] + g["rj"], asked),
        "prompt_cache_hit_rate": _rate(g["pr"], g["pr"] + g["pw"]),
        "latency_p50_ms": percentile(lat, 0.5), "latency_p95_ms": percentile(lat, 0.95),
        "queue_wait_p95_ms": percentile(wait, 0.95),
        "batch_share": _rate(g["job"] + g["jeb"], g["n"]),
    }  # fmt: skip


COLUMNS = (
    ("jobs", "jobs"), ("ok", "ok"), ("errors", "errors"), ("tokens", "tokens"),
    ("cost", "cost_usd"), ("baseline", "baseline_usd"), ("saved", "saved_usd"),
    ("saved%", "saved_pct"), ("resp.cache", "response_cache_hit_rate"),
    ("prompt.cache", "prompt_cache_hit_rate"), ("p50 ms", "latency_p50_ms"),
    ("p95 ms", "latency_p95_ms"), ("wait p95 ms", "queue_wait_p95_ms"),
    ("batch", "batch_share"),
)  # fmt: skip
"""The table's columns: heading and row key."""


def report_csv(answer: Answer, by: Sequence[str]) -> str:
    """The rows as CSV: the group columns, then every column of row()."""
    out = io.StringIO()
    names = [*by, *(answer.total or row([0] * len(METRICS)))]
    writer = csv.DictWriter(out, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(answer.rows)
    return out.getvalue()


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_usd"):
        if abs(value) >= 1000:
            return f"${value:,.0f}"
        return f"${value:,.2f}" if abs(value) >= 1 else f"${value:.6f}"
    if key.endswith(("_pct", "_rate", "_share")):
        return f"{value:.0%}"
    if key.endswith("_ms"):
        return f"{value:,.0f}"
    return f"{value:,}"


def table(answer: Answer, by: Sequence[str]) -> str:
    """The rows as an aligned text table, with a total line when there are several rows."""
    heads = [*by, *(h for h, _ in COLUMNS)]
    lines = [[str(r[k]) for k in by] + [_cell(k, r[k]) for _, k in COLUMNS] for r in answer.rows]
    if len(answer.rows) > 1 and by:
        lines.append(["total", *[""] * (len(by) - 1)] + [
            _cell(k, answer.total[k]) for _, k in COLUMNS])  # fmt: skip
    if not lines:
        return "no job outcomes in this period"
    widths = [max(len(x) for x in col) for col in zip(heads, *lines, strict=True)]

    def aligned(line: list[str]) -> str:
        pairs = enumerate(zip(line, widths, strict=True))
        return "  ".join(x.ljust(w) if n < len(by) else x.rjust(w) for n, (x, w) in pairs)

    return "\n".join(aligned(line) for line in [heads, *lines])
