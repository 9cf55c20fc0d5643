"""`tokenq dashboard`: one web page of the fleet, for people who would rather look than read.

GET / is dashboard.html, a page with hand-written SVG charts and no outside resource (it works
offline); it asks GET /api/state every few seconds and redraws, so it updates without a
reload. The state is read from Redis: the hourly rollups of the last hours (spend and saving
by feature, cost per tenant, cache hit rates, latency percentiles), and the live state of the
queues, rate limits, breakers, spend caps and batches. Hours that are over are read once and
kept in memory; only the live hours are read at every refresh.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from aiohttp import web
from numpy.typing import NDArray
from redis.exceptions import RedisError

from worker import clock
from worker.breakers import Breakers
from worker.budgets import budget_rows
from worker.cells import INDEX, METRICS, NANO, Block, split, sum_by
from worker.config import Config
from worker.contract import Keys
from worker.limiter import status
from worker.metrics import LIMIT_KINDS, queue_rows, run_app
from worker.operators import batch_rows
from worker.periods import GRACE_MS, read_hours
from worker.report import display, row, rows
from worker.rollups import Rollups, settings_of

log = logging.getLogger("tokenq.dashboard")
PAGE = Path(__file__).with_name("dashboard.html")
TOP_TENANTS = 10


def _dimension(n: int) -> Callable[[str], str | None]:
    """A cell's n-th dimension (feature 0, model, priority, tenant 3), displayed."""

    def of(dims: str) -> str | None:
        parts = split(dims)
        return None if parts is None else display(parts[n])

    return of


def _constant(hour: int) -> Callable[[str], int]:
    return lambda _: hour


def _feature_at(hour: int) -> Callable[[str], tuple[int, str] | None]:
    feature = _dimension(0)

    def of(dims: str) -> tuple[int, str] | None:
        f = feature(dims)
        return None if f is None else (hour, f)

    return of


def _rows(vectors: Iterable[NDArray[np.int64]]) -> list[dict[str, Any]]:
    """report.rows() of these metric vectors, computed together."""
    matrix = list(vectors)
    return rows(np.stack(matrix)) if matrix else []


class State:
    """Reads what the page shows; keeps the cells of hours that are over."""

    def __init__(self, redis: aioredis.Redis, cfg: Config) -> None:
        self.redis, self.cfg = redis, cfg
        self.keys = Keys(cfg.prefix)
        self.rollups = Rollups(self.keys, settings_of(cfg))
        self._hours: dict[int, Block] = {}

    async def cells(self, hours: range, now_ms: int) -> dict[int, Block]:
        """The hours' cells: those over by GRACE_MS read once, the others each time."""
        done = {h for h in hours if (h + 1) * 3_600_000 + GRACE_MS <= now_ms}
        found = await read_hours(self.redis, self.keys, [h for h in hours if h not in self._hours])
        self._hours.update((h, block) for h, block in found.items() if h in done)
        for old in [h for h in self._hours if h < hours.start - 24]:
            del self._hours[old]
        return {h: self._hours[h] if h in self._hours else found[h] for h in hours}

    async def snapshot(self, hours: int) -> dict[str, Any]:
        """Everything the page draws, as JSON-ready values."""
        await self.rollups.fold_records(self.redis)
        now_ms = clock.now_ms()
        current = now_ms // 3_600_000
        window = await self.cells(range(current - hours + 1, current + 1), now_ms)

        per_hour = sum_by((block, _constant(hour)) for hour, block in window.items())
        spend = sum_by((block, _feature_at(hour)) for hour, block in window.items())
        by_feature = sum_by((block, _dimension(0)) for block in window.values())
        by_tenant = sum_by((block, _dimension(3)) for block in window.values())
        zero = np.zeros(len(METRICS), np.int64)
        series: list[dict[str, Any]] = []
        for hour, hour_row in zip(window, _rows(per_hour.get(h, zero) for h in window),
                                  strict=True):  # fmt: skip
            series.append({
                "hour": time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(hour * 3600)),
                "cost_usd": {f: int(v[INDEX["usd"]]) / NANO for (h, f), v in spend.items()
                             if h == hour},
                "baseline_usd": hour_row["baseline_usd"], "jobs": hour_row["jobs"],
                "errors": hour_row["errors"], "latency_p50_ms": hour_row["latency_p50_ms"],
                "latency_p95_ms": hour_row["latency_p95_ms"],
                "queue_wait_p95_ms": hour_row["queue_wait_p95_ms"],
            })  # fmt: skip
        tenants = sorted(zip(by_tenant, _rows(by_tenant.values()), strict=True),
                         key=lambda tr: -tr[1]["cost_usd"])  # fmt: skip
        everything = sum(per_hour.values(), zero)
        features = sorted(by_feature)
        return {
            "generated_at": dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).isoformat(),
            "hours": hours, "series": series, "total": row(everything.tolist()),
            "features": dict(zip(features, _rows(by_feature[f] for f in features), strict=True)),
            "tenants": [{"tenant": t, **r} for t, r in tenants[:TOP_TENANTS]],
            "tenants_more": max(0, len(tenants) - TOP_TENANTS),
            **await self.live(now_ms),
        }  # fmt: skip

    async def live(self, now_ms: int) -> dict[str, Any]:
        """Queues, rate limits, breakers, spend caps and batches right now."""
        limits = []
        if self.cfg.limits.mode == "fleet":
            for m in await status(self.redis, self.cfg):
                b = m.buckets[0]
                for n, kind in enumerate(LIMIT_KINDS):
                    cap = b.cap[n]
                    used = max(0.0, cap - max(0.0, b.level[n]))
                    limits.append({"model": m.model, "kind": kind, "in_use": used, "usable": cap,
                                   "paused_s": m.paused_s})  # fmt: skip
        now = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
        return {
            "queues": await queue_rows(self.redis, self.cfg, now_ms),
            "limits": limits,
            "breakers": await Breakers(self.redis, self.keys, self.cfg.breakers, 0).status(),
            "budgets": await budget_rows(self.redis, self.cfg, self.keys, now),
            "batches": await batch_rows(self.redis, self.keys, 10),
            "dead_letters": int(await self.redis.xlen(self.keys.dead)),
        }


def app(cfg: Config, redis: aioredis.Redis, refresh_s: float) -> web.Application:
    """GET / (the page), GET /api/state?hours=24 (what it draws)."""
    state = State(redis, cfg)
    page = PAGE.read_text(encoding="utf-8").replace("__REFRESH_MS__", str(int(refresh_s * 1000)))

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def api(request: web.Request) -> web.Response:
        try:
            hours = min(24 * 7, max(1, int(request.query.get("hours", "24"))))
        except ValueError:
            return web.json_response({"error": "hours must be a whole number"}, status=400)
        try:
            return web.json_response(await state.snapshot(hours))
        except (RedisError, OSError) as exc:
            log.warning("reading the state failed: %s", exc)
            return web.json_response({"error": f"Redis is not reachable: {exc}"}, status=503)

    application = web.Application()
    application.router.add_get("/", index)
    application.router.add_get("/api/state", api)
    return application


async def serve(cfg: Config, redis: aioredis.Redis, host: str, port: int, refresh_s: float) -> None:
    """Serve the dashboard until cancelled."""
    await run_app(app(cfg, redis, refresh_s), host, port, "dashboard", "/")
