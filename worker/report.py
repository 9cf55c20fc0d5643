"""`tokenq report`: the rollups' cells (worker.periods) grouped, filtered and shown as rows.

A period is read as whole finished days where it can (questions by hour read the days'
hours views), then hours, in the smallest views that keep what the question needs
(worker.cells.VIEWS), and summed by group in numpy (_add_up), the rows' columns computed for
all groups at once (rows): 90 days take a few thousand cells for questions without tenants,
about 10,000 for a tenant question, 30,000 for tenants by model.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from numpy.typing import NDArray

from worker.cells import (
    ALL,
    BOUNDS_MS,
    INDEX,
    LATENCY,
    METRICS,
    NANO,
    OTHER,
    SEP,
    UNKNOWN,
    WAIT,
    WIDTH,
    Block,
    split,
)
from worker.periods import Part, read
from worker.rollups import Rollups

DIMENSIONS = ("feature", "model", "tenant", "priority", "day", "hour")
_CELL_DIMENSIONS = ("feature", "model", "priority", "tenant")  # a cell's, in stored order


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


@lru_cache(maxsize=4096)
def _when(start_hour: int) -> tuple[str, str]:
    moment = time.gmtime(start_hour * 3600)
    return time.strftime("%Y-%m-%d", moment), time.strftime("%Y-%m-%d %H:00", moment)


Grouping = Callable[[str], tuple[str, ...] | None]


def _values(q: Query) -> Grouping:
    """The function from a cell's dims to q.by's values (displayed; day and hour left
    empty), None for cells the filters leave out. Worked out once per distinct dims."""
    memo: dict[str, tuple[str, ...] | None] = {}
    at = {name: n for n, name in enumerate(_CELL_DIMENSIONS)}

    def values(dims: str) -> tuple[str, ...] | None:
        try:
            return memo[dims]
        except KeyError:
            pass
        parts = split(dims)
        out: tuple[str, ...] | None = None
        if parts is not None:
            shown = [_SHOWN.get(part, part) for part in parts]  # feature, model, priority, tenant
            if (q.feature is None or shown[0] == q.feature) and (
                    q.tenant is None or shown[3] == q.tenant):  # fmt: skip
                out = tuple(shown[at[name]] if name in at else "" for name in q.by)
        memo[dims] = out
        return out

    return values


_GROUP = (1 << 24) - 1  # the group's bits of a cell's code (the time's are above)


def _add_up(q: Query, parts: Iterable[Part]) -> dict[tuple[str, ...], NDArray[np.int64]]:
    """The metrics of each group of q.by in these parts, filtered: each distinct dims is
    worked out once (a day's HOURS view repeats the same dims every day), each cell's group
    in time (its hour, or day) and in the other dimensions is a number, and the triples are
    added up by group in numpy (int64: exact)."""
    values = _values(q)
    unit = 1 if "hour" in q.by else 24 if "day" in q.by else 0
    groups: dict[tuple[str, ...], int] = {}
    memos: tuple[dict[str, int], dict[str, int]] = ({}, {})

    def slot(dims: str, by_hour: bool) -> int:
        """The cell's hour of its part (0 unless by_hour) << 24 | its group; -1: left out."""
        hour = 0
        if by_hour:
            head, _, dims = dims.partition(SEP)
            if not head.isdecimal():
                return -1
            hour = int(head)
        group = values(dims)
        return -1 if group is None else hour << 24 | groups.setdefault(group, len(groups))

    codes: list[NDArray[np.int64]] = []
    kept: list[tuple[Block, int]] = []
    for part in parts:
        block = part.block
        if not len(block.amount):
            continue
        memo = memos[part.by_hour]
        for dims in set(block.dims).difference(memo):
            memo[dims] = slot(dims, part.by_hour)
        found = np.fromiter(map(memo.__getitem__, block.dims), np.int64, len(block.dims))
        when = (part.start_hour + (found >> 24)) // unit if unit else 0
        codes.append(np.where(found >= 0, when * (1 << 24) + (found & _GROUP), -1))
        kept.append((block, len(found)))
    if not codes:
        return {}
    unique, row_of = np.unique(np.concatenate(codes), return_inverse=True)
    first = int(unique[0] < 0)  # the cells the filters leave out
    flat, amounts, start = [], [], 0
    for block, n in kept:
        rows = row_of[start : start + n][block.cell] - first
        start += n
        wanted = rows >= 0
        flat.append(rows[wanted] * WIDTH + block.metric[wanted])
        amounts.append(block.amount[wanted])
    unique = unique[first:]
    sums = np.zeros(len(unique) * WIDTH, np.int64)
    np.add.at(sums, np.concatenate(flat), np.concatenate(amounts))
    return _named(q, unique.tolist(), sums.reshape(len(unique), WIDTH), groups, unit)


def _named(
    q: Query, codes: list[int], matrix: NDArray[np.int64], groups: dict[tuple[str, ...], int],
    unit: int,
) -> dict[tuple[str, ...], NDArray[np.int64]]:  # fmt: skip
    """_add_up's rows by group: q.by's values, the day or hour of the code's time."""
    names = {n: group for group, n in groups.items()}
    timed = [n for n, name in enumerate(q.by) if name in ("day", "hour")]
    out: dict[tuple[str, ...], NDArray[np.int64]] = {}
    for row_n, code in enumerate(codes):
        group = names[code & _GROUP]
        if timed:
            day, hour = _when((code >> 24) * unit)
            shown = list(group)
            for n in timed:
                shown[n] = day if q.by[n] == "day" else hour
            group = tuple(shown)
        out[group] = matrix[row_n]
    return out


async def _sums(
    redis: aioredis.Redis, rollups: Rollups, q: Query, now_ms: int
) -> dict[tuple[str, ...], NDArray[np.int64]]:
    """The metrics of each group of q.by over q's period, filtered."""
    needs = {name for name in q.by if name in _CELL_DIMENSIONS}
    needs |= {name for name, value in (("feature", q.feature), ("tenant", q.tenant)) if value}
    parts = await read(redis, rollups.keys, q.start_hour, q.end_hour, now_ms, needs,
                       days="hour" not in q.by)  # fmt: skip
    return _add_up(q, parts)


async def query(redis: aioredis.Redis, rollups: Rollups, q: Query, *, now_ms: int) -> Answer:
    """Rows of metrics (see row()) for each group of q.by: in time order when grouped by day
    or hour, else biggest cost first."""
    await rollups.fold_records(redis)  # the outcomes of the last second, if not folded yet
    sums = await _sums(redis, rollups, q, now_ms)
    matrix = np.stack(list(sums.values())) if sums else np.zeros((0, WIDTH), np.int64)
    answer = Answer(total=row(matrix.sum(axis=0).tolist()))
    for group, columns in zip(sums, rows(matrix), strict=True):
        answer.rows.append({**dict(zip(q.by, group, strict=True)), **columns})
    answer.rows.sort(key=lambda r: tuple(r[k] for k in q.by) if {"day", "hour"} & set(q.by)
                     else (-r["cost_usd"], tuple(r[k] for k in q.by)))  # fmt: skip
    retention_days = rollups.settings.retention_days
    oldest_ms = now_ms - retention_days * 86_400_000
    if q.start_hour * 3_600_000 < oldest_ms:
        since = time.strftime("%Y-%m-%d %H:00", time.gmtime(oldest_ms / 1000))
        answer.notes.append(
            f"the period starts before the rollups' retention (report.retention_days = "
            f"{retention_days}): nothing before about {since} UTC is kept"
        )
    return answer


_SHOWN = {OTHER: "(other)", UNKNOWN: "(unknown feature)", ALL: "(all)", "": "(none)"}


def display(slot: str) -> str:
    """A stored dimension value as people read it."""
    return _SHOWN.get(slot, slot)


_LATENCY = [INDEX[name] for name in LATENCY]
_WAIT = [INDEX[name] for name in WAIT]
TOKEN_COLUMNS = (
    ("input_tokens", "ti"),
    ("output_tokens", "to"),
    ("cache_write_tokens", "tw"),
    ("cache_read_tokens", "tr"),
)


def percentiles(hist: NDArray[np.int64], q: float) -> list[float | None]:
    """The q-quantile (0..1) of each row of a (groups x buckets) histogram matrix over
    BOUNDS_MS, interpolated inside its bucket as Prometheus' histogram_quantile does; None
    for a row without observations."""
    if not len(hist):
        return []
    total = hist.sum(axis=1)
    cum = np.cumsum(hist, axis=1)
    rank = q * total
    k = np.argmax((hist > 0) & (cum >= rank[:, None]), axis=1)
    rows = np.arange(len(hist))
    count = hist[rows, k]
    seen = cum[rows, k] - count
    bounds = np.array((0, *BOUNDS_MS, BOUNDS_MS[-1]), np.int64)
    low, high = bounds[k], bounds[k + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = low + (high - low) * np.maximum(0.0, rank - seen) / count
    return [v if t else None for v, t in zip(value.tolist(), total.tolist(), strict=True)]


def _rates(part: list[int], whole: list[int]) -> list[float | None]:
    return [p / w if w else None for p, w in zip(part, whole, strict=True)]


def rows(matrix: NDArray[np.int64]) -> list[dict[str, Any]]:
    """row() of each row of a (groups x METRICS) matrix, computed column by column (a
    report of thousands of groups takes milliseconds, not a row's 100 us each)."""
    m = np.asarray(matrix, np.int64).reshape(-1, WIDTH)

    def col(*names: str) -> NDArray[np.int64]:
        out: NDArray[np.int64] = m[:, [INDEX[name] for name in names]].sum(axis=1)
        return out

    n, ok = col("n"), col("jor", "job", "joc")
    usd, base = col("usd").tolist(), col("base").tolist()
    saved = [b - u for b, u in zip(base, usd, strict=True)]
    tokens = {name: col(code) for name, code in TOKEN_COLUMNS}
    pr = col("pr")
    columns: dict[str, list[Any]] = {
        "jobs": n.tolist(), "ok": ok.tolist(), "errors": (n - ok).tolist(),
        "tokens": col(*(code for _, code in TOKEN_COLUMNS)).tolist(),
        **{name: v.tolist() for name, v in tokens.items()},
        "cost_usd": [u / NANO for u in usd], "baseline_usd": [b / NANO for b in base],
        "saved_usd": [s / NANO for s in saved], "saved_pct": _rates(saved, base),
        "response_cache_hit_rate": _rates(col("rh", "rj").tolist(),
                                          col("rh", "rj", "rm").tolist()),
        "prompt_cache_hit_rate": _rates(pr.tolist(), (pr + col("pw")).tolist()),
        "latency_p50_ms": percentiles(m[:, _LATENCY], 0.5),
        "latency_p95_ms": percentiles(m[:, _LATENCY], 0.95),
        "queue_wait_p95_ms": percentiles(m[:, _WAIT], 0.95),
        "batch_share": _rates(col("job", "jeb").tolist(), n.tolist()),
    }  # fmt: skip
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def row(v: Sequence[int]) -> dict[str, Any]:
    """A vector of metrics as the report's columns."""
    return rows(np.array([v], np.int64))[0]


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
