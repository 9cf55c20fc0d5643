"""`tokenq reconcile`: tokenq's spend per model and UTC day against the provider's own report.

One row per (day, model), two sides:

- **tokenq's**: the sums of the usage events of the period (`tokenq_totals`, the one place
  that reads tokenq's figures: the usage stream today, the rollups once they exist). A job's
  tokens and cost are counted under the model of its final answer.
- **the provider's**: the Admin API's usage report (tokens) and cost report (cost per model
  and service tier), summed the same way (worker.admin_api; an Admin API key in
  ANTHROPIC_ADMIN_API_KEY; the simulator answers both from its ledger).

A row is over the thresholds when its cost differs by more than max_diff_usd *and* by more
than max_diff_pct percent of the larger side; `tokenq reconcile` then exits 1, so cron can
mail it. Each such row gets its likely causes, from what the two sides show.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from worker import clock
from worker.admin_api import AdminApi, Key, Side
from worker.config import Config
from worker.contract import Keys, entry_ms, usd
from worker.embedded import connect, redis_url
from worker.usage import event_of, money

DAY_MS = 86_400_000


@dataclass
class Hints:
    """What tokenq's events of a (day, model) tell about a difference."""

    jobs: int = 0
    retried: int = 0  # jobs that needed more than one API call attempt
    rerouted: int = 0  # escalated or classified: calls on other models counted here
    batch: int = 0


@dataclass
class TokenqSide:
    totals: dict[Key, Side] = field(default_factory=dict)
    hints: dict[Key, Hints] = field(default_factory=dict)
    first_ms: int | None = None  # the oldest entry of the usage stream (it is trimmed)


async def tokenq_totals(
    redis: aioredis.Redis, keys: Keys, start_ms: int, end_ms: int
) -> TokenqSide:
    """tokenq's sums per (UTC day, model) over [start_ms, end_ms), from the usage stream.

    `redis` should not decode replies (entries others wrote may not be UTF-8). Entries that
    are not usage events, alerts and cache answers (no call) are left out.
    """
    out = TokenqSide()
    oldest: Any = await redis.xrange(keys.usage, count=1)
    out.first_ms = entry_ms(_text(oldest[0][0])) if oldest else None
    start = f"{start_ms}-0"
    while True:
        page: Any = await redis.xrange(keys.usage, min=start, max=str(end_ms - 1), count=5000)
        for raw_id, fields in page:
            entry_id = _text(raw_id)
            event = event_of(fields)
            if event is None or event.kind != "job" or event.mode == "cache" or not event.model:
                continue
            key = (_day(entry_ms(entry_id)), event.model)
            side = out.totals.setdefault(key, Side())
            side.input_tokens += event.input_tokens
            side.cache_write_tokens += event.cache_creation_input_tokens
            side.cache_read_tokens += event.cache_read_input_tokens
            side.output_tokens += event.output_tokens
            cost = Decimal(usd(event.cost_usd))  # the field's own fixed-point digits
            side.cost_usd += cost
            hint = out.hints.setdefault(key, Hints())
            hint.jobs += 1
            hint.retried += event.attempt > 1
            hint.rerouted += "escalated" in event.route_reason or "classifier" in event.route_reason
            if event.mode == "batch":
                side.batch_cost_usd += cost
                hint.batch += 1
        if len(page) < 5000:
            return out
        start = f"({_text(page[-1][0])}"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _day(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Thresholds:
    max_diff_usd: Decimal
    max_diff_pct: Decimal


@dataclass
class Row:
    """One (day, model) of the comparison."""

    day: str
    model: str
    tokenq: Side
    provider: Side
    hints: Hints
    over: bool = False
    causes: list[str] = field(default_factory=list)

    @property
    def diff_usd(self) -> Decimal:
        """tokenq's cost less the provider's (negative: the provider billed more)."""
        return self.tokenq.cost_usd - self.provider.cost_usd

    @property
    def diff_pct(self) -> Decimal:
        larger = max(self.tokenq.cost_usd, self.provider.cost_usd)
        return abs(self.diff_usd) * 100 / larger if larger else Decimal(0)


def compare(ours: TokenqSide, theirs: dict[Key, Side], limits: Thresholds, today: str) -> list[Row]:
    """A row per (day, model) either side has, oldest day first, with its verdict and likely
    causes. Days before the usage stream's oldest entry (trimmed at queue.usage_maxlen) are
    shown but never over the thresholds: tokenq no longer has their events."""
    trimmed = _day(ours.first_ms) if ours.first_ms is not None else None
    rows = []
    for key in sorted(set(ours.totals) | set(theirs)):
        row = Row(*key, ours.totals.get(key, Side()), theirs.get(key, Side()),
                  ours.hints.get(key, Hints()))  # fmt: skip
        complete = trimmed is None or row.day >= trimmed
        row.over = complete and (
            abs(row.diff_usd) > limits.max_diff_usd and row.diff_pct > limits.max_diff_pct
        )
        if row.diff_usd or row.tokenq.tokens() != row.provider.tokens():
            row.causes = _causes(row, rows_of_day(ours, theirs, row.day), today, complete)
        rows.append(row)
    return rows


def rows_of_day(ours: TokenqSide, theirs: dict[Key, Side], day: str) -> tuple[Decimal, Decimal]:
    """(tokenq's, the provider's) cost of a whole day, all models."""
    mine = sum((s.cost_usd for (d, _), s in ours.totals.items() if d == day), Decimal(0))
    other = sum((s.cost_usd for (d, _), s in theirs.items() if d == day), Decimal(0))
    return mine, other


def _causes(row: Row, day_totals: tuple[Decimal, Decimal], today: str, complete: bool) -> list[str]:
    out: list[str] = []
    h = row.hints
    if not complete:
        out.append("tokenq's usage stream no longer reaches back to this day (it is trimmed at "
                   "queue.usage_maxlen events)")  # fmt: skip
    if row.day == today:
        out.append("today is not over: the provider's report can trail by some minutes")
    same_day = abs(day_totals[0] - day_totals[1]) <= abs(row.diff_usd) / 10
    if h.rerouted and same_day:
        out.append(f"{h.rerouted} job(s) were escalated or routed by the classifier: tokenq "
                   "counts every call of a job under its final model, the provider under the "
                   "model each call used (the day's total agrees)")  # fmt: skip
    if row.diff_usd < 0:
        out.append("the provider billed calls tokenq has no record of: other applications "
                   "on the same organization or workspace (the report covers all of them; "
                   "--workspace-id narrows it)")  # fmt: skip
        if h.retried:
            out.append(f"calls in flight when a worker died: {h.retried} job(s) that day "
                       "needed more than one attempt, and a dead worker's call is billed but "
                       "never recorded")  # fmt: skip
    elif row.diff_usd > 0:
        out.append("tokenq recorded more than the provider billed: prices in config.toml "
                   f'[models."{row.model}"] above the provider\'s, or calls the provider has '
                   "not billed yet")  # fmt: skip
    if row.tokenq.tokens() == row.provider.tokens() and row.diff_usd:
        out.append(f'the tokens agree: the prices differ (config.toml [models."{row.model}"])'
                   + (", or the batch discount (batch_discount)" if h.batch else ""))  # fmt: skip
    if h.batch and row.tokenq.batch_cost_usd != row.provider.batch_cost_usd:
        out.append(f"batch discount: tokenq's batch jobs cost ${row.tokenq.batch_cost_usd:f}, "
                   f"the provider's batch tier ${row.provider.batch_cost_usd:f} (a batch that "
                   "ended around midnight can fall on the other day)")  # fmt: skip
    return out


def admin_url(cfg: Config, env: Mapping[str, str]) -> str:
    """Where the Admin API is: the API when anthropic.base_url is auto and a key is set, the
    simulator when no key is, else anthropic.base_url itself."""
    if cfg.anthropic.base_url != "auto":
        return cfg.anthropic.base_url
    if env.get("ANTHROPIC_ADMIN_API_KEY") or env.get("ANTHROPIC_API_KEY"):
        return "https://api.anthropic.com"
    return cfg.anthropic.simulator_url


async def reconcile(
    cfg: Config, first: dt.date, last: dt.date, limits: Thresholds, *, url: str, key: str,
    workspace: str | None = None, today: dt.date | None = None,
) -> list[Row]:  # fmt: skip
    """Both sides over the UTC days first..last (inclusive), compared (see compare)."""
    start_ms = int(dt.datetime.combine(first, dt.time(), dt.UTC).timestamp() * 1000)
    end_ms = int(dt.datetime.combine(last, dt.time(), dt.UTC).timestamp() * 1000) + DAY_MS
    redis = connect(redis_url(cfg), decode=False)
    try:
        ours = await tokenq_totals(redis, Keys(cfg.prefix), start_ms, end_ms)
    finally:
        await redis.aclose()
    timeout = aiohttp.ClientTimeout(total=cfg.anthropic.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        theirs = await AdminApi(session, url, key).totals(first, last, workspace)
    now = today or clock.utc().date()
    return compare(ours, theirs, limits, now.isoformat())


def row_json(row: Row) -> dict[str, Any]:
    """One row as a JSON object (`--json`): both sides, the difference, verdict, causes."""

    def side(s: Side) -> dict[str, Any]:
        return {
            "cost_usd": str(s.cost_usd), "batch_cost_usd": str(s.batch_cost_usd),
            "input_tokens": s.input_tokens, "cache_write_tokens": s.cache_write_tokens,
            "cache_read_tokens": s.cache_read_tokens, "output_tokens": s.output_tokens,
        }  # fmt: skip

    return {
        "day": row.day, "model": row.model, "tokenq": side(row.tokenq),
        "provider": side(row.provider), "diff_usd": str(row.diff_usd),
        "diff_pct": float(round(row.diff_pct, 2)), "over": row.over, "causes": row.causes,
    }  # fmt: skip


def text(rows: list[Row], limits: Thresholds) -> str:
    """The comparison for people: a line per day and model, its token differences and likely
    causes, the totals, and how many rows are over the thresholds."""
    if not rows:
        return "neither side has any usage in this period"
    head = f"{'day':<11} {'model':<22} {'tokenq':>12} {'provider':>12} {'difference':>22}"
    lines = [head]
    for r in rows:
        diff = f"{_signed(r.diff_usd)} ({r.diff_pct:.1f}%)"
        flag = "  OVER" if r.over else ""
        lines.append(f"{r.day:<11} {r.model:<22} {money(float(r.tokenq.cost_usd)):>12} "
                     f"{money(float(r.provider.cost_usd)):>12} {diff:>22}{flag}")  # fmt: skip
        tokens = _token_diff(r)
        if tokens:
            lines.append(f"{'':<11} tokens, tokenq less provider: {tokens}")
        lines += [f"{'':<11} likely: {cause}" for cause in r.causes]
    ours = sum((r.tokenq.cost_usd for r in rows), Decimal(0))
    theirs = sum((r.provider.cost_usd for r in rows), Decimal(0))
    lines.append(f"{'total':<34} {money(float(ours)):>12} {money(float(theirs)):>12} "
                 f"{_signed(ours - theirs):>22}")  # fmt: skip
    over = sum(r.over for r in rows)
    usd, pct = limits.max_diff_usd, limits.max_diff_pct
    lines.append(f"{over} of {len(rows)} day-and-model rows over the thresholds "
                 f"(more than ${usd} and more than {pct}%)")  # fmt: skip
    return "\n".join(lines)


def _signed(usd: Decimal) -> str:
    return ("+" if usd > 0 else "") + money(float(usd))


def _token_diff(r: Row) -> str:
    names = ("input", "cache writes", "cache reads", "output")
    pairs = zip(names, r.tokenq.tokens(), r.provider.tokens(), strict=True)
    return ", ".join(f"{n} {a - b:+,}" for n, a, b in pairs if a != b)
