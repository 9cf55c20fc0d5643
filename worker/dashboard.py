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
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from worker import clock
from worker.breakers import Breakers
from worker.budgets import budget_rows
from worker.cells import GRACE_MS, Cells, Vector, finished_hours, hour_cells
from worker.config import Config
from worker.contract import Keys
from worker.limiter import status
from worker.metrics import LIMIT_KINDS, queue_rows, run_app
from worker.operators import batch_rows
from worker.report import display, row
from worker.rollups import METRICS, Rollups, settings_of

log = logging.getLogger("tokenq.dashboard")
PAGE = Path(__file__).with_name("dashboard.html")
TOP_TENANTS = 10


def _sum(vectors: list[Vector]) -> Vector:
    out = [0] * len(METRICS)
    for v in vectors:
        for n, value in enumerate(v):
            out[n] += value
    return out


class State:
    """Reads what the page shows; keeps the cells of hours that are over."""

    def __init__(self, redis: aioredis.Redis, cfg: Config) -> None:
        self.redis, self.cfg = redis, cfg
        self.keys = Keys(cfg.prefix)
        self.rollups = Rollups(self.keys, settings_of(cfg))
        self._hours: dict[int, Cells] = {}

    async def cells(self, hours: range, now_ms: int) -> dict[int, Cells]:
        """The hours' cells: finished ones read (and compacted) once, live ones each time."""
        done = [h for h in hours if (h + 1) * 3_600_000 + GRACE_MS <= now_ms]
        missing = [h for h in done if h not in self._hours]
        if missing:
            self._hours.update(await finished_hours(self.redis, self.rollups, missing))
        for old in [h for h in self._hours if h < hours.start - 24]:
            del self._hours[old]
        return {h: self._hours[h] if h in self._hours else
                await hour_cells(self.redis, self.keys, h) for h in hours}  # fmt: skip

    async def snapshot(self, hours: int) -> dict[str, Any]:
        """Everything the page draws, as JSON-ready values."""
        await self.rollups.fold(self.redis)
        now_ms = clock.now_ms()
        current = now_ms // 3_600_000
        series: list[dict[str, Any]] = []
        by_feature: dict[str, list[Vector]] = {}
        by_tenant: dict[str, list[Vector]] = {}
        everything: list[Vector] = []
        window = await self.cells(range(current - hours + 1, current + 1), now_ms)
        for hour, cells in window.items():
            features: dict[str, list[Vector]] = {}
            for (feature, _, _, tenant), v in cells.items():
                features.setdefault(display(feature), []).append(v)
                by_feature.setdefault(display(feature), []).append(v)
                by_tenant.setdefault(display(tenant), []).append(v)
                everything.append(v)
            hour_row = row(_sum(list(cells.values())))
            series.append({
                "hour": time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(hour * 3600)),
                "cost_usd": {f: row(_sum(vs))["cost_usd"] for f, vs in features.items()},
                "baseline_usd": hour_row["baseline_usd"], "jobs": hour_row["jobs"],
                "errors": hour_row["errors"], "latency_p50_ms": hour_row["latency_p50_ms"],
                "latency_p95_ms": hour_row["latency_p95_ms"],
                "queue_wait_p95_ms": hour_row["queue_wait_p95_ms"],
            })  # fmt: skip
        tenants = sorted(((t, row(_sum(vs))) for t, vs in by_tenant.items()),
                         key=lambda tr: -tr[1]["cost_usd"])  # fmt: skip
        return {
            "generated_at": dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).isoformat(),
            "hours": hours, "series": series, "total": row(_sum(everything)),
            "features": {f: row(_sum(vs)) for f, vs in sorted(by_feature.items())},
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
