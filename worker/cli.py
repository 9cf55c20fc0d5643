"""`tokenq`: argument parsing and printing only; every command calls one function."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from producers import Producer
from worker import dashboard, metrics
from worker.batcher import batch_rows, cancel_batch
from worker.breakers import Breakers
from worker.budgets import budget_rows
from worker.config import Config, config_path, load_config
from worker.contract import Keys, to_fields
from worker.control import publish_reload
from worker.embedded import connect, ping, redis_url, server_args
from worker.errors import ConfigError, MalformedJob
from worker.fleet import run_fleet
from worker.jobs import parse_request
from worker.limiter import ModelStatus, status
from worker.local import up
from worker.queue import dead_job_id, dead_letters, replay
from worker.report import DIMENSIONS, Query, query, report_csv, table
from worker.rollups import Rollups, settings_of, tenant_slot
from worker.usage import HitRates, follow, tail_line
from worker.worker import make_client, serve

EPILOG = """\
commands, in the order you meet them:
  up          run everything locally: embedded valkey, simulator, workers, demo jobs, usage tail
  worker      process jobs (one process, or --processes N under a supervisor)
  submit      put one job on a priority stream; --wait prints its result
  result      wait for and print a job's result
  tail        follow the usage stream (one line per job outcome, cache hit rates; --json)
  dead        list or replay dead-lettered jobs
  limits      rate limits per model: configured, in use across the fleet, headroom
  budgets     spend caps per feature and tenant: spent, reserved, cap; circuit breakers
  batches     Message Batches of the batch windows: state and counts; cancel one
  report      spend, savings, cache hit rates and latency by feature, model, tenant, day...
  metrics     serve the fleet's metrics to Prometheus (/metrics)
  dashboard   a web page of spend, savings, caches, latency and queues, updating live
  reload      make every running worker re-read its config file (limits, features, prices)
  config      check a config file
  simulator   a local Anthropic API with a billing ledger (the default without an API key)
  redis       run the embedded valkey-server in the foreground (for the Procfile)

The config file is ./config.toml, or --config PATH, or $TOKENQ_CONFIG.
"""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `tokenq` console script."""
    args = sys.argv[1:] if argv is None else argv
    command = _command_index(args)
    if command is not None and args[command] == "simulator":
        # The simulator is a separate program that the worker only meets over HTTP.
        os.execv(sys.executable, [sys.executable, "-m", "simulator", *args[command + 1 :]])
    parser = build_parser()
    ns = parser.parse_args(args)
    logging.basicConfig(
        level=ns.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if logging.getLogger().level > logging.DEBUG:
        # The SDK's HTTP client logs every request at INFO; tokenq logs each job already.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        code = ns.run(ns)
    except ConfigError as exc:
        print(f"tokenq: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _command_index(args: list[str]) -> int | None:
    """Where the command word is, past the global options."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 1 if "=" in args[i] or args[i] in ("-h", "--help") else 2
    return i if i < len(args) else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenq",
        description="Keeps LLM bills small and LLM traffic safe: a Redis-streams job queue "
        "for the Anthropic API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="config file (default ./config.toml or $TOKENQ_CONFIG)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_up(sub)
    _add_worker(sub)
    _add_submit(sub)
    _add_result(sub)
    _add_tail(sub)
    _add_dead(sub)
    _add_limits(sub)
    _add_budgets(sub)
    _add_batches(sub)
    _add_report(sub)
    _add_metrics(sub)
    _add_dashboard(sub)
    _add_config(sub)
    sub.add_parser("simulator", help="a local Anthropic API (see `tokenq simulator --help`)")
    p = sub.add_parser("redis", help="run the embedded valkey-server in the foreground")
    p.add_argument("--stop", action="store_true", help="stop a background embedded server")
    p.set_defaults(run=cmd_redis)
    return parser


Sub = argparse._SubParsersAction  # argparse names no public type for it


def _add_up(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="run everything locally (the quick start)",
        description="Start the embedded valkey-server (redis.url = embedded), the simulator "
        "when ANTHROPIC_API_KEY is unset, the workers and a demo producer, and tail the usage "
        "stream. Ctrl-C stops everything but the valkey-server, which keeps the data "
        "(`tokenq redis --stop` stops it).",
    )
    p.add_argument("--processes", type=_positive, default=2, help="worker processes (2)")
    p.add_argument("--demo-jobs", type=_positive, default=200, help="demo jobs to submit (200)")
    p.add_argument("--demo-rate", type=float, default=20.0, help="demo jobs per second (20)")
    p.add_argument("--latency-ms", type=int, default=300, help="simulated API latency in ms (300)")
    p.add_argument(
        "--exit-when-done", action="store_true", help="stop once every demo job has a result"
    )
    p.set_defaults(run=cmd_up)


def _add_worker(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "worker",
        help="process jobs",
        description="Read jobs from the priority streams and run them through the API. "
        "SIGTERM or SIGINT stops reading and gives in-flight jobs worker.grace_s to finish.",
    )
    p.add_argument("--processes", type=_positive, help="processes (config worker.processes)")
    p.add_argument(
        "--concurrency", type=_positive, help="jobs in flight per process (worker.concurrency)"
    )
    p.set_defaults(run=cmd_worker)


def _add_submit(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "submit",
        help="submit one job",
        description="Submit a job and print its id. The request (a JSON object of Messages "
        "API parameters) comes from the REQUEST argument, from --file, or from standard input.",
    )
    p.add_argument("feature", help="a feature of config.toml [features]")
    p.add_argument("request", nargs="?", help='JSON, e.g. \'{"messages":[...]}\'; "-" = stdin')
    p.add_argument("-f", "--file", help="read the request JSON from this file")
    p.add_argument("--priority", default="normal", help="priority stream (default normal)")
    p.add_argument("--id", help="job id and idempotency key (default: the stream entry id)")
    p.add_argument("--tenant", help="end user or customer the job is for")
    p.add_argument("--tier", help="force a tier of config.toml [tiers]")
    p.add_argument("--reply-to", help="also XADD the result onto this stream")
    p.add_argument("--deadline-ms", type=int, help="unix time in ms after which the job fails")
    p.add_argument("--no-cache", action="store_true",
                   help="skip the response cache and de-duplication for this job")  # fmt: skip
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits (120)")
    p.set_defaults(run=cmd_submit)


def _add_result(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("result", help="wait for a job's result and print it")
    p.add_argument("id", help="the job id `tokenq submit` printed")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (120)")
    p.set_defaults(run=cmd_result)


def _add_tail(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tail",
        help="follow the usage stream",
        description="Print usage events as they arrive: one line per job outcome with tokens, "
        "cost, naive cost, latency and queue time. Ctrl-C stops.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line (for jq)")
    p.add_argument("--from-start", action="store_true", help="begin at the oldest event")
    p.set_defaults(run=cmd_tail)


def _add_limits(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "limits",
        help="rate limits: configured, in use, headroom",
        description="Per limited model: the configured requests, input and output tokens per "
        "minute, how much of each the fleet holds right now (calls in flight and what has not "
        "refilled yet), the headroom, any lower limit learnt from the API's headers, and a "
        "pause after a 429. Feature shares (limit_share) follow their model.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p.set_defaults(run=cmd_limits)
    r = sub.add_parser(
        "reload",
        help="make running workers re-read config.toml",
        description="Check the config file, then tell every worker of the fleet (every "
        "machine, over Redis) to re-read its own config file. Limits, features, tiers, models "
        "and prices change for the next jobs; no job is dropped. SIGHUP does the same for one "
        "process (or a `tokenq worker --processes N` supervisor and its children).",
    )
    r.set_defaults(run=cmd_reload)


def _add_budgets(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "budgets",
        help="spend caps: spent, reserved, cap, per feature and tenant; breakers",
        description="Every spend cap of the config file in its current period (day or month "
        "in budgets.timezone): what was spent, what calls in flight have reserved (their "
        "worst case), the cap and what is left, for each feature and for each tenant seen "
        "today; then the state of every circuit breaker the fleet has used.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per cap and breaker")
    p.set_defaults(run=cmd_budgets)


def _add_batches(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "batches",
        help="Message Batches: state and counts; cancel one",
        description="The newest batches the batcher made from the batch priorities "
        "(batch.priorities), newest first: local id, the API's id, state (planned, "
        "submitted, done), requests, bytes, and once done the API's counts. `cancel ID` asks "
        "the API to cancel one (local or msgbatch_ id); its unfinished jobs go back to their "
        "stream when it ends, and into the next window.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per batch")
    p.add_argument("--limit", type=_positive, default=50, help="at most this many (50)")
    p.set_defaults(run=cmd_batches)
    bsub = p.add_subparsers(dest="batches_command", metavar="ACTION")
    cp = bsub.add_parser("cancel", help="cancel a submitted batch")
    cp.add_argument("id", help="a batch id from `tokenq batches` (local or msgbatch_...)")
    cp.set_defaults(run=cmd_batches_cancel)


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


def _add_dead(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dead",
        help="list or replay dead letters",
        description="Jobs that can never succeed as submitted, or that failed "
        "queue.max_attempts times, wait in the dead-letter stream with the reason.",
    )
    dsub = p.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    lp = dsub.add_parser("list", help="print dead letters, oldest first")
    lp.add_argument("--limit", type=_positive, default=100, help="at most this many (100)")
    lp.add_argument("--json", action="store_true", help="one JSON object per line")
    lp.set_defaults(run=cmd_dead_list)
    rp = dsub.add_parser("replay", help="put dead letters back on their priority stream")
    rp.add_argument("ids", nargs="*", help="dead-letter ids from `tokenq dead list`")
    rp.add_argument("--all", action="store_true", help="replay every dead letter")
    rp.set_defaults(run=cmd_dead_replay)


def _add_config(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="check a config file")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cp = csub.add_parser("check", help="validate a config file and summarise it")
    cp.add_argument("path", nargs="?", help="the file (default: --config or ./config.toml)")
    cp.set_defaults(run=cmd_config_check)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _config(ns: argparse.Namespace) -> Config:
    return load_config(ns.config)


@asynccontextmanager
async def _redis(cfg: Config, block_s: float = 0.0) -> AsyncIterator[aioredis.Redis]:
    """A client for the configured Redis (starting the embedded server if need be)."""
    client = connect(redis_url(cfg), block_s=block_s)
    try:
        yield client
    finally:
        await client.aclose()


def _run_async(make: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    """Run a coroutine; Ctrl-C ends it quietly."""
    try:
        result = asyncio.run(make())
    except KeyboardInterrupt:
        return 130
    return result or 0


def cmd_config_check(ns: argparse.Namespace) -> int:
    cfg = load_config(ns.path or ns.config)
    path = config_path(ns.path or ns.config)
    print(
        f"{path}: ok. prefix={cfg.prefix!r} redis={cfg.redis.url} "
        f"priorities={','.join(cfg.queue.priorities)} tiers={','.join(cfg.tiers)} "
        f"features={','.join(cfg.features)}"
    )
    return 0


def cmd_worker(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    processes = ns.processes or cfg.worker.processes
    concurrency = ns.concurrency or cfg.worker.concurrency
    if processes > 1:
        redis_url(cfg)  # start the embedded server once, before the children race to
        return run_fleet(str(config_path(ns.config)), processes, concurrency, ns.log_level)
    config_file = str(config_path(ns.config))
    return _run_async(lambda: serve(cfg, concurrency=concurrency, config_file=config_file))


def cmd_up(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    return up(
        cfg,
        str(config_path(ns.config)),
        processes=ns.processes,
        demo_jobs=ns.demo_jobs,
        demo_rate=ns.demo_rate,
        latency_ms=ns.latency_ms,
        exit_when_done=ns.exit_when_done,
    )


def _request_text(ns: argparse.Namespace) -> str:
    if ns.file:
        return Path(ns.file).read_text(encoding="utf-8")
    if ns.request and ns.request != "-":
        return str(ns.request)
    if sys.stdin.isatty():
        raise ConfigError("no request given: pass REQUEST, --file FILE, or pipe JSON on stdin")
    return sys.stdin.read()


def cmd_submit(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    if ns.feature not in cfg.features:
        raise ConfigError(
            f"feature {ns.feature!r} is not in config.toml [features]: {', '.join(cfg.features)}"
        )
    text = _request_text(ns)
    try:
        parse_request(text)  # the worker's own check: refuse here what it would dead-letter
    except MalformedJob as exc:
        raise ConfigError(str(exc).removesuffix(" Fix the producer.")) from None
    request: dict[str, object] = json.loads(text)
    return _run_async(lambda: _submit(cfg, ns, request))


async def _submit(cfg: Config, ns: argparse.Namespace, request: dict[str, object]) -> int:
    async with _redis(cfg) as redis:
        producer = Producer(redis, cfg.prefix, cfg.queue.priorities)
        try:
            job_id = await producer.submit(
                ns.feature,
                request,
                priority=ns.priority,
                id=ns.id,
                tenant=ns.tenant,
                tier=ns.tier,
                reply_to=ns.reply_to,
                deadline_ms=ns.deadline_ms,
                cache="off" if ns.no_cache else None,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        print(job_id, flush=True)
        return await _print_result(producer, job_id, ns.timeout) if ns.wait else 0


def cmd_result(ns: argparse.Namespace) -> int:
    cfg = _config(ns)

    async def run() -> int:
        async with _redis(cfg) as redis:
            return await _print_result(Producer(redis, cfg.prefix), ns.id, ns.timeout)

    return _run_async(run)


async def _print_result(producer: Producer, job_id: str, timeout_s: float) -> int:
    try:
        result = await producer.result(job_id, timeout_s=timeout_s)
    except TimeoutError as exc:
        print(f"tokenq: {exc}; is a worker running (tokenq worker)?", file=sys.stderr)
        return 1
    print(msgspec.json.format(msgspec.json.encode(result)).decode())
    return 0 if result.status == "ok" else 1


def cmd_tail(ns: argparse.Namespace) -> int:
    cfg = _config(ns)

    async def run() -> int:
        async with _redis(cfg, block_s=5.0) as redis:
            rates = HitRates()
            async for _, event in follow(redis, Keys(cfg.prefix), from_start=ns.from_start):
                line = json.dumps(to_fields(event)) if ns.json else tail_line(event, rates)
                print(line, flush=True)
        return 0

    return _run_async(run)


def cmd_limits(ns: argparse.Namespace) -> int:
    cfg = _config(ns)

    async def run() -> int:
        async with _redis(cfg) as redis:
            models = await status(redis, cfg)
        if not models:
            print('no model has limits; add [models."<id>".limits] to the config file')
        for model in models:
            print(json.dumps(msgspec.to_builtins(model)) if ns.json else _limits_text(model))
        return 0

    return _run_async(run)


def _limits_text(m: ModelStatus) -> str:
    names = ("requests/min", "input tokens/min", "output tokens/min")
    lines = [m.model + (f"  (paused {m.paused_s:.1f} s after a 429)" if m.paused_s else "")]
    for bucket in m.buckets:
        share = bucket.key.rsplit(":", 1)[-1] if bucket is not m.buckets[0] else ""
        if share:
            lines.append(f"  feature {share} (limit_share):")
        for n, name in enumerate(names):
            cap, left = bucket.cap[n], max(0.0, bucket.level[n])
            learnt = " (learnt from the API)" if cap < bucket.planned[n] else ""
            lines.append(
                f"    {name:<18} configured {m.configured[n]:>11,}  usable {cap:>11,}{learnt}  "
                f"in use {cap - left:>11,.0f}  headroom {left / cap:>4.0%}"
            )
    return "\n".join(lines)


def cmd_budgets(ns: argparse.Namespace) -> int:
    cfg = _config(ns)

    async def run() -> int:
        keys = Keys(cfg.prefix)
        async with _redis(cfg) as redis:
            rows = await budget_rows(redis, cfg, keys, dt.datetime.now(dt.UTC))
            breakers = await Breakers(redis, keys, cfg.breakers, 0).status()
        if ns.json:
            for row in [*rows, *breakers]:
                print(json.dumps(row))
            return 0
        if not rows:
            print("no spend caps: set daily_usd, monthly_usd or tenant caps in [features.<name>] "
                  "or [budgets]")  # fmt: skip
        for row in rows:
            print(_budget_text(row))
        for b in breakers:
            opened = int(b.get("opened_at") or 0)
            since = f", opened {time.strftime('%H:%M:%S', time.localtime(opened / 1000))}"
            print(f"breaker {b['breaker']}: {b.get('state', 'closed')}"
                  f" (failures in a row {b.get('fails', 0)}{since if opened else ''})")  # fmt: skip
        return 0

    return _run_async(run)


def _budget_text(row: dict[str, Any]) -> str:
    spent, held = row["spent_usd"], row["reserved_usd"]
    parts = [f"{row['cap']} [{row['period']}]: spent ${spent:.4f}, reserved ${held:.4f}"]
    if row["cap_usd"] is not None:
        left = max(0.0, row["cap_usd"] - spent - held)
        parts.append(f"cap ${row['cap_usd']:.2f} ({(spent + held) / row['cap_usd']:.0%} used, "
                     f"${left:.4f} left)")  # fmt: skip
    if row["cap_requests"] is not None:
        parts.append(f"requests {row['requests']} of {row['cap_requests']}")
    return "; ".join(parts) + f"; resets {row['resets_at']}"


def cmd_batches(ns: argparse.Namespace) -> int:
    cfg = _config(ns)

    async def run() -> int:
        async with _redis(cfg) as redis:
            rows = await batch_rows(redis, Keys(cfg.prefix), ns.limit)
        for row in rows:
            print(json.dumps(row) if ns.json else _batch_text(row))
        if not rows and not ns.json:
            batched = ", ".join(cfg.batch.priorities) or "none (batch.priorities = [])"
            print(f"no batches yet; batched priorities: {batched}")
        return 0

    return _run_async(run)


def _batch_text(row: dict[str, Any]) -> str:
    planned = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(row["planned_ms"]) / 1000))
    counts = ", ".join(f"{k} {row[k]}" for k in ("succeeded", "errored", "expired", "canceled")
                       if k in row)  # fmt: skip
    waiting = f", {row['awaiting_results']} awaiting results" if row["awaiting_results"] else ""
    return (
        f"{row['batch']} {row.get('api_id', '-')} {row['state']}: {row['count']} requests, "
        f"{int(row['bytes']):,} bytes, planned {planned}{waiting}"
        + (f"; {counts}" if counts else "")
    )


def cmd_batches_cancel(ns: argparse.Namespace) -> int:
    cfg = _config(ns)

    async def run() -> int:
        client = make_client(cfg, 1)
        try:
            async with _redis(cfg) as redis:
                local, answer = await cancel_batch(redis, Keys(cfg.prefix), client, ns.id)
        except LookupError as exc:
            print(f"tokenq: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.close()
        print(f"batch {local}: {answer}")
        return 0

    return _run_async(run)


def cmd_reload(ns: argparse.Namespace) -> int:
    cfg = _config(ns)  # a file that does not load is reported here, before any worker sees it

    async def run() -> int:
        async with _redis(cfg) as redis:
            listening = await publish_reload(redis, Keys(cfg.prefix))
        print(f"reload sent to {listening} worker process(es) on {Keys(cfg.prefix).control}")
        return 0 if listening else 1

    return _run_async(run)


def cmd_dead_list(ns: argparse.Namespace) -> int:
    cfg = _config(ns)

    async def run() -> int:
        async with _redis(cfg) as redis:
            entries = await dead_letters(redis, Keys(cfg.prefix), count=ns.limit)
        for dead_id, fields in entries:
            if ns.json:
                print(json.dumps({"dead_id": dead_id, **fields}))
            else:
                print(_dead_line(dead_id, fields))
        if not entries and not ns.json:
            print("no dead letters")
        return 0

    return _run_async(run)


def _dead_line(dead_id: str, fields: dict[str, str]) -> str:
    job_id = dead_job_id(fields)
    return (
        f"{dead_id} {fields['error_type']} feature={fields.get('feature', '-')} job={job_id} "
        f"attempts={fields['attempts']}\n    {fields['error']}"
    )


def cmd_dead_replay(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    if not ns.ids and not ns.all:
        raise ConfigError("name dead-letter ids to replay (see `tokenq dead list`), or --all")

    async def run() -> int:
        keys = Keys(cfg.prefix)
        async with _redis(cfg) as redis:
            ids = ns.ids or [i for i, _ in await dead_letters(redis, keys, count=1_000_000)]
            for dead_id in ids:
                try:
                    job_id = await replay(redis, keys, dead_id, cfg.queue.priorities)
                except LookupError as exc:
                    print(f"tokenq: {exc}", file=sys.stderr)
                    return 1
                print(f"replayed {dead_id} as job {job_id}")
        return 0

    return _run_async(run)


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
    cfg = _config(ns)
    now = int(time.time() * 1000)
    q = report_query(ns, now)

    async def run() -> int:
        async with _redis(cfg) as redis:
            rollups = Rollups(Keys(cfg.prefix), settings_of(cfg))
            answer = await query(redis, rollups, q, now_ms=now)
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
        return 0

    return _run_async(run)


def cmd_metrics(ns: argparse.Namespace) -> int:
    cfg = _config(ns)

    async def run() -> int:
        async with _redis(cfg) as redis:
            await metrics.serve(cfg, redis, ns.host, ns.port)
        return 0

    return _run_async(run)


def cmd_dashboard(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    if ns.refresh < 0.5:
        raise ConfigError(f"--refresh {ns.refresh} is too often; use 0.5 seconds or more")

    async def run() -> int:
        async with _redis(cfg) as redis:
            await dashboard.serve(cfg, redis, ns.host, ns.port, ns.refresh)
        return 0

    return _run_async(run)


def cmd_redis(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    port = cfg.redis.embedded_port
    if ns.stop:
        if not ping(port):
            print(f"no server answers on 127.0.0.1:{port}")
            return 0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"SHUTDOWN\r\n")
            conn.recv(64)
        print(f"stopped the embedded valkey-server on 127.0.0.1:{port}")
        return 0
    if ping(port):
        # Another tokenq command started it in the background first (a Procfile starts its
        # processes at once): keep this process up for as long as that server runs.
        print(f"the embedded valkey-server already runs on 127.0.0.1:{port}; following it")
        while ping(port):
            time.sleep(1.0)
        return 0
    args = server_args(cfg)
    os.execv(args[0], args)
