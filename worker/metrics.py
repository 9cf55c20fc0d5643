"""`tokenq metrics`: the fleet's state as Prometheus metrics, read from Redis at each scrape.

Counters come from the rollups (worker.rollups): the running totals, which never expire,
plus the hours not compacted into them yet (see Counters), so they survive worker restarts
and never go down. Gauges
come from the live state: the job streams and their consumer group, the fleet's rate-limit
buckets (worker.limiter), the spend caps (worker.budgets), the breakers (worker.breakers) and
the batcher's batches (worker.batcher). Names follow Prometheus' conventions: `_total` on
counters, base units (seconds), `tokenq_cost_usd_total` for money. Labels stay bounded:
features, models, priorities and caps come from the config; a tenant label only with
`metrics.tenant_labels = true`.

This module wires the parts' readers together; it only reads Redis.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from redis.exceptions import RedisError, ResponseError

from worker import clock
from worker.breakers import Breakers
from worker.budgets import budget_rows
from worker.cells import BOUNDS_MS, INDEX, LATENCY, NANO, WAIT, split, sum_by
from worker.config import Config
from worker.contract import GROUP, Keys, as_text, entry_ms
from worker.limiter import status
from worker.operators import batch_rows
from worker.periods import totals_and_live
from worker.report import display
from worker.rollups import Rollups, settings_of

Vector = list[int]

log = logging.getLogger("tokenq.metrics")
KINDS = (("input", "ti"), ("output", "to"), ("cache_write", "tw"), ("cache_read", "tr"))
LIMIT_KINDS = ("requests", "input_tokens", "output_tokens")
STATES = ("closed", "open", "half-open")


class Counters:
    """Where the counters come from: the running totals, plus the live hours.

    Compacting an hour (worker.compaction, the workers' duty) moves its cells into the
    totals, so an outcome counts in its live hour until then and in the totals after, once
    either way: both are read at one instant (worker.periods). Counters never go down (unless
    an hour expired before it was compacted: no worker ran for report.retention_days).
    """

    def __init__(self, rollups: Rollups) -> None:
        self.rollups = rollups

    async def read(self, redis: aioredis.Redis) -> list[tuple[list[str], Vector]]:
        """Each counted (feature, model, priority[, tenant]) and its metrics."""
        await self.rollups.fold_records(redis)
        totals, live = await totals_and_live(redis, self.rollups.keys)
        width = 4 if self.rollups.settings.tenant_totals else 3

        def labels(dims: str) -> tuple[str, ...] | None:
            parts = split(dims)
            return None if parts is None else tuple(map(display, parts[:width]))

        sums = sum_by((block, labels) for block in (totals, *live))
        return [(list(dims), v.tolist()) for dims, v in sums.items()]


def counter_families(
    cells: list[tuple[list[str], Vector]], tenant_labels: bool
) -> Iterator[Metric]:
    """The counters and histograms of the running totals."""
    base = ["feature", "model", "priority"] + (["tenant"] if tenant_labels else [])
    jobs = CounterMetricFamily("tokenq_jobs", "Job outcomes.", labels=[*base, "status", "mode"])
    tokens = CounterMetricFamily("tokenq_tokens", "Tokens billed, by kind.", labels=[*base, "kind"])
    cost = CounterMetricFamily("tokenq_cost_usd", "What the API billed, in USD.", labels=base)
    naive = CounterMetricFamily(
        "tokenq_baseline_cost_usd",
        "What the same jobs would have cost naively (router.baseline_tier, realtime, uncached).",
        labels=base,
    )
    response = CounterMetricFamily(
        "tokenq_response_cache", "Answered jobs that asked the response cache, by result.",
        labels=[*base, "result"],
    )  # fmt: skip
    prompt = CounterMetricFamily(
        "tokenq_prompt_cache_calls", "Calls that used the prompt cache: read it, or only wrote.",
        labels=[*base, "result"],
    )  # fmt: skip
    latency = HistogramMetricFamily(
        "tokenq_api_latency_seconds", "Latency of the API call of realtime jobs.", labels=base
    )
    wait = HistogramMetricFamily(
        "tokenq_queue_wait_seconds", "From XADD to the job's start (to its call, if any).",
        labels=base,
    )  # fmt: skip
    for dims, v in cells:
        labels = dims[: len(base)] + [""] * (len(base) - len(dims))
        for status_, s in (("ok", "o"), ("error", "e")):
            for mode, m in (("realtime", "r"), ("batch", "b"), ("cache", "c")):
                jobs.add_metric([*labels, status_, mode], v[INDEX[f"j{s}{m}"]])
        for kind, code in KINDS:
            tokens.add_metric([*labels, kind], v[INDEX[code]])
        cost.add_metric(labels, v[INDEX["usd"]] / NANO)
        naive.add_metric(labels, v[INDEX["base"]] / NANO)
        for result, code in (("hit", "rh"), ("joined", "rj"), ("miss", "rm")):
            response.add_metric([*labels, result], v[INDEX[code]])
        for result, code in (("read", "pr"), ("write", "pw")):
            prompt.add_metric([*labels, result], v[INDEX[code]])
        latency.add_metric(labels, _buckets(v, LATENCY), v[INDEX["ls"]] / 1000)
        wait.add_metric(labels, _buckets(v, WAIT), v[INDEX["qs"]] / 1000)
    yield from (jobs, tokens, cost, naive, response, prompt, latency, wait)


def _buckets(v: Vector, names: tuple[str, ...]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets (upper bounds in seconds) of a rollup histogram."""
    out, seen = [], 0
    for bound, name in zip((*BOUNDS_MS, None), names, strict=True):
        seen += v[INDEX[name]]
        out.append(("+Inf" if bound is None else repr(bound / 1000), float(seen)))
    return out


async def queue_rows(redis: aioredis.Redis, cfg: Config, now_ms: int) -> list[dict[str, Any]]:
    """Per priority stream: depth (waiting to be read), pending, oldest waiting age (s),
    consumers active (read or renewed within the visibility timeout) and stale."""
    keys, out = Keys(cfg.prefix), []
    stale_ms = cfg.queue.visibility_timeout_s * 1000
    for priority in cfg.queue.priorities:
        stream = keys.jobs(priority)
        group = await _group(redis, stream)
        held = int(group.get("pending", 0)) if group else 0
        after = f"({as_text(group['last-delivered-id'])}" if group else "-"
        first: Any = await redis.xrange(stream, after, "+", count=1)
        age = (now_ms - entry_ms(as_text(first[0][0]))) / 1000 if first else 0.0
        idle = [int(c.get("idle", 0)) for c in await _consumers(redis, stream)] if group else []
        out.append({
            "priority": priority, "depth": max(0, int(await redis.xlen(stream)) - held),
            "pending": held, "oldest_age_s": max(0.0, age),
            "consumers_active": sum(1 for i in idle if i <= stale_ms),
            "consumers_stale": sum(1 for i in idle if i > stale_ms),
        })  # fmt: skip
    return out


async def _consumers(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    try:
        rows: Any = await redis.xinfo_consumers(stream, GROUP)
    except ResponseError:
        return []
    return list(rows)


async def queue_families(redis: aioredis.Redis, cfg: Config, now_ms: int) -> list[Metric]:
    """Depth, oldest waiting age, pending and consumers of every priority stream."""
    keys = Keys(cfg.prefix)
    depth = GaugeMetricFamily("tokenq_queue_depth", "Jobs waiting to be read.", labels=["priority"])
    oldest = GaugeMetricFamily(
        "tokenq_queue_oldest_age_seconds", "Age of the oldest job waiting to be read.",
        labels=["priority"],
    )  # fmt: skip
    pending = GaugeMetricFamily(
        "tokenq_queue_pending", "Jobs read and not yet finished (in flight, or held by the "
        "batcher).", labels=["priority"],
    )  # fmt: skip
    consumers = GaugeMetricFamily(
        "tokenq_queue_consumers", "Consumers of the stream: active (read or renewed within "
        "queue.visibility_timeout_s) or stale.", labels=["priority", "state"],
    )  # fmt: skip
    for row in await queue_rows(redis, cfg, now_ms):
        p = row["priority"]
        depth.add_metric([p], row["depth"])
        pending.add_metric([p], row["pending"])
        oldest.add_metric([p], row["oldest_age_s"])
        consumers.add_metric([p, "active"], row["consumers_active"])
        consumers.add_metric([p, "stale"], row["consumers_stale"])
    dead = GaugeMetricFamily("tokenq_dead_letters", "Entries in the dead-letter stream.")
    dead.add_metric([], int(await redis.xlen(keys.dead)))
    deferred = GaugeMetricFamily("tokenq_deferred_jobs", "Jobs put off by a defer policy.")
    deferred.add_metric([], int(await redis.zcard(keys.deferred)))
    return [depth, oldest, pending, consumers, dead, deferred]


async def _group(redis: aioredis.Redis, stream: str) -> dict[str, Any]:
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:
        return {}  # no stream yet
    return next((g for g in groups if as_text(g["name"]) == GROUP), {})


async def limit_families(redis: aioredis.Redis, cfg: Config) -> list[Metric]:
    """The fleet's rate-limit buckets per model (and feature share) and kind."""
    labels = ["model", "bucket", "kind"]
    limit = GaugeMetricFamily(
        "tokenq_ratelimit_limit_per_minute", "The API limit per minute from the config.",
        labels=["model", "kind"],
    )  # fmt: skip
    usable = GaugeMetricFamily(
        "tokenq_ratelimit_usable_per_minute", "The part of the limit tokenq uses (limits.target, "
        "limit_share, or a lower limit learnt from the API).", labels=labels,
    )  # fmt: skip
    in_use = GaugeMetricFamily(
        "tokenq_ratelimit_in_use", "Capacity held right now: calls in flight and what has not "
        "refilled yet.", labels=labels,
    )  # fmt: skip
    headroom = GaugeMetricFamily(
        "tokenq_ratelimit_headroom_ratio", "Share of the usable capacity left.", labels=labels
    )
    paused = GaugeMetricFamily(
        "tokenq_ratelimit_paused_seconds", "Time left of the fleet's pause after a 429.",
        labels=["model"],
    )  # fmt: skip
    if cfg.limits.mode == "fleet":
        for m in await status(redis, cfg):
            paused.add_metric([m.model], m.paused_s)
            for n, kind in enumerate(LIMIT_KINDS):
                limit.add_metric([m.model, kind], m.configured[n])
            for b in m.buckets:
                bucket = "model" if b is m.buckets[0] else b.key.rsplit(":", 1)[-1]
                for n, kind in enumerate(LIMIT_KINDS):
                    cap, left = b.cap[n], max(0.0, b.level[n])
                    usable.add_metric([m.model, bucket, kind], cap)
                    in_use.add_metric([m.model, bucket, kind], max(0.0, cap - left))
                    headroom.add_metric([m.model, bucket, kind], left / cap if cap else 0.0)
    return [limit, usable, in_use, headroom, paused]


async def spend_families(redis: aioredis.Redis, cfg: Config, now: dt.datetime) -> list[Metric]:
    """Spend caps in their current period, circuit breakers, and the batcher's batches."""
    keys = Keys(cfg.prefix)
    labels = ["cap", "feature", "period"] + (["tenant"] if cfg.metrics.tenant_labels else [])
    spent = GaugeMetricFamily(
        "tokenq_budget_spent_usd", "Spent in the cap's current period.", labels=labels
    )
    held = GaugeMetricFamily(
        "tokenq_budget_reserved_usd", "Reserved by calls in flight (their worst case).",
        labels=labels,
    )  # fmt: skip
    cap = GaugeMetricFamily("tokenq_budget_cap_usd", "The cap.", labels=labels)
    for row in await budget_rows(redis, cfg, keys, now):
        if row["tenant"] and not cfg.metrics.tenant_labels:
            continue  # one series per tenant only when asked for
        values = [row["cap"], row["feature"], row["period"]]
        values += [row["tenant"]] if cfg.metrics.tenant_labels else []
        spent.add_metric(values, row["spent_usd"])
        held.add_metric(values, row["reserved_usd"])
        if row["cap_usd"] is not None:
            cap.add_metric(values, row["cap_usd"])
    breaker = GaugeMetricFamily(
        "tokenq_breaker_state", "1 for the breaker's current state.", labels=["breaker", "state"]
    )
    for b in await Breakers(redis, keys, cfg.breakers, 0).status():
        current = str(b.get("state") or "closed")
        for state in STATES:
            breaker.add_metric([str(b["breaker"]), state], 1.0 if current == state else 0.0)
    batches = GaugeMetricFamily(
        "tokenq_batches", "The newest 200 Message Batches by state.", labels=["state"]
    )
    awaiting = GaugeMetricFamily(
        "tokenq_batch_jobs_awaiting", "Jobs in submitted batches whose results are not back."
    )
    rows = await batch_rows(redis, keys, 200)
    for state in ("planned", "submitted", "done"):
        batches.add_metric([state], sum(1 for r in rows if r.get("state") == state))
    awaiting.add_metric([], sum(int(r["awaiting_results"]) for r in rows))
    return [spent, held, cap, breaker, batches, awaiting]


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


async def scrape(redis: aioredis.Redis, cfg: Config, counters: Counters | None = None) -> bytes:
    """Every metric, in Prometheus' text format."""
    now = clock.time_s()
    counters = counters or Counters(Rollups(Keys(cfg.prefix), settings_of(cfg)))
    cells = await counters.read(redis)
    families = [
        *counter_families(cells, cfg.metrics.tenant_labels),
        *await queue_families(redis, cfg, int(now * 1000)),
        *await limit_families(redis, cfg),
        *await spend_families(redis, cfg, dt.datetime.fromtimestamp(now, dt.UTC)),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def app(cfg: Config, redis: aioredis.Redis) -> web.Application:
    """The exporter: GET /metrics scrapes Redis; a Redis error answers 503 with the reason."""
    counters = Counters(Rollups(Keys(cfg.prefix), settings_of(cfg)))

    async def metrics(_: web.Request) -> web.Response:
        try:
            body = await scrape(redis, cfg, counters)
        except (RedisError, OSError) as exc:
            log.warning("scrape failed: %s", exc)
            return web.Response(status=503, text=f"tokenq metrics: Redis is not reachable: {exc}")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def index(_: web.Request) -> web.Response:
        return web.Response(text="tokenq metrics: scrape /metrics\n")

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/", index)
    return application


async def serve(cfg: Config, redis: aioredis.Redis, host: str, port: int) -> None:
    """Serve `app` until cancelled."""
    await run_app(app(cfg, redis), host, port, "metrics", "/metrics")


async def run_app(application: web.Application, host: str, port: int, what: str, path: str) -> None:
    """Run an aiohttp application until cancelled, saying where (also for the dashboard)."""
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][:2] if runner.addresses else (host, port)
        print(f"tokenq {what}: http://{bound[0]}:{bound[1]}{path}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
