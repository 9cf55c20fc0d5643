"""`tokenq report`, `tokenq metrics` and `tokenq dashboard`: what the fleet did, read from
the rollups every finished job adds to (worker.rollups, worker.report)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

import redis.asyncio as aioredis

from worker import clock, dashboard, metrics
from worker.cells import tenant_slot
from worker.cli_ops import Sub, config_of, run_with_redis
from worker.contract import Keys
from worker.errors import ConfigError
from worker.report import DIMENSIONS, Query, query, report_csv, table
from worker.rollups import Rollups, settings_of


def add_report_commands(sub: Sub[argparse.ArgumentParser]) -> None:
    """report, metrics, dashboard."""
    _add_report(sub)
    _add_metrics(sub)
    _add_dashboard(sub)


def _add_report(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="spend and savings by feature, model, tenant, priority, day or hour",
        description="What the fleet did in a period, from the hourly rollups every finished "
        "job adds to (kept report.retention_days): jobs, ok, errors, tokens, cost, the naive "
        "baseline and the saving, response- and prompt-cache hit rates, p50/p95 API latency "
        "(realtime calls), p95 queue wait and the share of jobs run as Message Batches. "
        "Periods are whole hours in UTC.",
        epilog="examples:\n  tokenq report --since 7d --by feature\n"
        "  tokenq report --feature summarize --by tenant,day --csv > week.csv\n"
        "  tokenq report --from 2026-11-01 --to 2026-12-01 --by model --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--since", help="a period up to now: 12h, 7d, 4w (default 7d)")
    p.add_argument("--from", dest="start", help="start, UTC: 2026-11-30 or 2026-11-30T14:00")
    p.add_argument("--to", dest="end", help="end (excluded), UTC; default now")
    dims = ", ".join(DIMENSIONS)
    p.add_argument("--by", action="append", default=[],
                   help=f"group by {dims}; comma-separated or repeated")  # fmt: skip
    p.add_argument("--feature", help="only this feature")
    p.add_argument("--tenant", help="only this tenant")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON document")
    out.add_argument("--csv", action="store_true", help="comma-separated values with a header")
    p.set_defaults(run=cmd_report)


def _add_metrics(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "metrics",
        help="serve the fleet's metrics to Prometheus",
        description="Serve /metrics in Prometheus' text format, read from Redis at each "
        "scrape, so one exporter covers the whole fleet and its counters survive worker "
        "restarts: jobs, tokens, cost and baseline by feature, model, priority, status and "
        "mode, cache hits, API latency and queue wait histograms, queue depth, oldest age, "
        "pending and consumers per priority, rate limits per model, spend caps, breakers and "
        "batches. ops/grafana/tokenq.json is a Grafana board of them.",
    )
    p.add_argument("--port", type=int, default=9464, help="port (9464)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address (127.0.0.1; 0.0.0.0 for a remote Prometheus)"
    )
    p.set_defaults(run=cmd_metrics)


def _add_dashboard(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dashboard",
        help="a web page of spend, savings, caches, latency and queues, updating live",
        description="Serve a web page (no outside resources: it works offline) of the last "
        "hours: spend and saving over time by feature, cost per tenant, cache hit rates, "
        "latency percentiles, queue depth, rate limits in use, breakers, spend caps and "
        "batches. It updates itself every few seconds.",
    )
    p.add_argument("--port", type=int, default=8780, help="port (8780)")
    p.add_argument("--host", default="127.0.0.1", help="address (127.0.0.1)")
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between updates (5)")
    p.set_defaults(run=cmd_dashboard)


def report_query(ns: argparse.Namespace, now_ms: int) -> Query:
    """The report's Query from its arguments; ConfigError names a bad one."""
    by = tuple(name.strip() for part in ns.by for name in part.split(",") if name.strip())
    wrong = [name for name in by if name not in DIMENSIONS]
    if wrong:
        raise ConfigError(f"--by {','.join(wrong)} is not a dimension; use {', '.join(DIMENSIONS)}")
    if ns.since and (ns.start or ns.end):
        raise ConfigError("give --since or --from/--to, not both")
    end_ms = _when(ns.end, "--to") if ns.end else now_ms
    start_ms = _when(ns.start, "--from") if ns.start else end_ms - _span_ms(ns.since or "7d")
    if start_ms >= end_ms:
        raise ConfigError("the period is empty: --from must be before --to")
    tenant = tenant_slot(ns.tenant) if ns.tenant is not None else None
    return Query(start_ms // 3_600_000, -(-end_ms // 3_600_000), by, ns.feature, tenant)


def _when(text: str, flag: str) -> int:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r} is not a date or time; use e.g. 2026-11-30 or 2026-11-30T14:00 (UTC)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def _span_ms(text: str) -> int:
    units = {"h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit() or int(number) < 1:
        raise ConfigError(f"--since {text!r} is not a period; use e.g. 12h, 7d or 4w")
    return int(number) * units[unit]


def cmd_report(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    now = clock.now_ms()
    q = report_query(ns, now)

    async def run(redis: aioredis.Redis) -> None:
        answer = await query(redis, Rollups(Keys(cfg.prefix), settings_of(cfg)), q, now_ms=now)
        start = dt.datetime.fromtimestamp(q.start_hour * 3600, dt.UTC).isoformat()
        end = dt.datetime.fromtimestamp(q.end_hour * 3600, dt.UTC).isoformat()
        if ns.json:
            doc = {"from": start, "to": end, "by": list(q.by), "rows": answer.rows,
                   "total": answer.total, "notes": answer.notes}  # fmt: skip
            print(json.dumps(doc, indent=2))
        elif ns.csv:
            print(report_csv(answer, q.by), end="")
        else:
            print(f"{start} to {end} (UTC)")
            print(table(answer, q.by))
        for note in answer.notes:
            print(f"note: {note}", file=sys.stderr)

    return run_with_redis(cfg, run)


def cmd_metrics(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    return run_with_redis(cfg, lambda redis: metrics.serve(cfg, redis, ns.host, ns.port))


def cmd_dashboard(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    if ns.refresh < 0.5:
        raise ConfigError(f"--refresh {ns.refresh} is too often; use 0.5 seconds or more")
    return run_with_redis(
        cfg, lambda redis: dashboard.serve(cfg, redis, ns.host, ns.port, ns.refresh)
    )
