"""`tokenq`: argument parsing and printing only; every command calls one function."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import re
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
from worker.admission import reply_to_of
from worker.api_request import parse_request
from worker.batcher import batch_rows, cancel_batch
from worker.breakers import Breakers
from worker.budgets import budget_rows
from worker.cells import tenant_slot
from worker.cli_cache import EPILOG_LINE as CACHE_EPILOG
from worker.cli_cache import add_cache_command
from worker.cli_tools import EPILOG_LINES as TOOLS_EPILOG
from worker.cli_tools import add_tool_commands
from worker.config import Config, config_path, load_config
from worker.contract import BATCHER, Keys, entry_ms, to_fields
from worker.control import publish_reload
from worker.embedded import connect, ping, redis_url, server_args
from worker.errors import ConfigError, MalformedJob
from worker.fleet import run_fleet
from worker.limiter import ModelStatus, status
from worker.local import up
from worker.queue import (
    ConsumerRow,
    DeadFilter,
    Entry,
    JobEntry,
    consumer_rows,
    dead_job_id,
    delete_dead,
    find_dead,
    find_job_entries,
    prune_consumer,
    remove_job_entry,
    replay,
    shown,
    trim_dead,
)
from worker.report import DIMENSIONS, Query, query, report_csv, table
from worker.rollups import Rollups, settings_of
from worker.usage import HitRates, follow, money, tail_line
from worker.worker import make_client, serve

EPILOG = f"""\
commands, in the order you meet them:
  up          run everything locally: embedded valkey, simulator, workers, demo jobs, usage tail
  worker      process jobs (one process, or --processes N under a supervisor)
  submit      put one job on a priority stream; --wait prints its result
  result      wait for and print a job's result
  tail        follow the usage stream (one line per job outcome, cache hit rates; --json)
  dead        list, purge, trim or replay dead-lettered jobs
  jobs        take a stuck entry out of its stream (with a dead letter)
  consumers   the workers' consumers: pending jobs, idle times, dead ones; prune
  limits      rate limits per model: configured, in use across the fleet, headroom
  budgets     spend caps per feature and tenant: spent, reserved, cap; circuit breakers
  batches     Message Batches of the batch windows: state and counts; cancel one
  report      spend, savings, cache hit rates and latency by feature, model, tenant, day...
  metrics     serve the fleet's metrics to Prometheus (/metrics)
  dashboard   a web page of spend, savings, caches, latency and queues, updating live
{CACHE_EPILOG.rstrip()}
  reload      make every running worker re-read its config file (limits, features, prices)
  config      check a config file
  simulator   a local Anthropic API with a billing ledger (the default without an API key)
  redis       run the embedded valkey-server in the foreground (for the Procfile)
{TOOLS_EPILOG}
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
        sys.stdout.flush()  # here, so a closed pipe is caught below and not at exit
    except ConfigError as exc:
        print(f"tokenq: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = closed_pipe()
    sys.exit(code)


def closed_pipe() -> int:
    """The reader of stdout went away (`tokenq tail | head`): stop quietly, as a tool killed
    by SIGPIPE would (exit 141), instead of a traceback. Python ignores SIGPIPE, so the
    write raised instead; stdout is pointed at /dev/null so the final flush cannot raise."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + 13  # SIGPIPE


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
    _add_jobs(sub)
    _add_consumers(sub)
    _add_limits(sub)
    _add_budgets(sub)
    _add_batches(sub)
    add_cache_command(sub)
    _add_report(sub)
    _add_metrics(sub)
    _add_dashboard(sub)
    _add_config(sub)
    sub.add_parser("simulator", help="a local Anthropic API (see `tokenq simulator --help`)")
    p = sub.add_parser("redis", help="run the embedded valkey-server in the foreground")
    p.add_argument("--stop", action="store_true", help="stop a background embedded server")
    p.set_defaults(run=cmd_redis)
    add_tool_commands(sub)
    return parser


Sub = argparse._SubParsersAction  # argparse names no public type for it


def _add_up(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="run everything locally (the quick start)",
        description="Start the embedded valkey-server (redis.url = embedded), the simulator "
        "when ANTHROPIC_API_KEY is unset, the workers and a demo producer, and tail the usage "
        "stream. Ctrl-C stops everything but the valkey-server, which keeps the data "
        "(`tokenq redis --stop` stops it). The config file is ./config.toml unless --config "
        "PATH (here or before `up`) or $TOKENQ_CONFIG names another; `tokenq config check "
        "PATH` checks one first.",
    )
    # Also accepted after the command word, so `python3 dev.py up --config PATH` works.
    p.add_argument("--config", default=argparse.SUPPRESS,
                   help="config file (default ./config.toml or $TOKENQ_CONFIG)")  # fmt: skip
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
        help="list, purge, trim or replay dead letters",
        description="Jobs that can never succeed as submitted, or that failed "
        "queue.max_attempts times, wait in the dead-letter stream with the reason. `list` "
        "and `purge` take any entry of the stream, whoever wrote it: fields may be missing, "
        "bytes that are not UTF-8 show as \\xNN.",
    )
    dsub = p.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    lp = dsub.add_parser(
        "list",
        help="print dead letters, newest first",
        description="Print dead letters, newest first (--oldest: oldest first): id, "
        "error_type, feature, tenant, job id, attempts, priority and time, then the reason. "
        "Filters combine; a filter given twice accepts either value. Values longer than "
        "queue.max_entry_bytes are cut (--json says so in `cut_bytes`).",
    )
    _add_dead_filters(lp)
    lp.add_argument("--oldest", action="store_true", help="oldest first")
    lp.add_argument("--limit", type=_positive, default=100, help="at most this many (100)")
    lp.add_argument("--json", action="store_true", help="one JSON object per line")
    lp.set_defaults(run=cmd_dead_list)
    pp = dsub.add_parser(
        "purge",
        help="delete the dead letters that match filters, or all of them",
        description="Delete the dead letters matching the filters (or every one with "
        "--all), after showing how many and asking. Without a terminal to ask on it deletes "
        "nothing unless --yes is given. Prints how many it removed.",
    )
    _add_dead_filters(pp)
    pp.add_argument("--all", action="store_true", help="every dead letter")
    pp.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    pp.set_defaults(run=cmd_dead_purge)
    tp = dsub.add_parser(
        "trim",
        help="keep only the newest N dead letters",
        description="Delete all but the newest N dead letters (for a cron job, say); prints "
        "how many it removed.",
    )
    tp.add_argument("--max", type=_positive, required=True, metavar="N", help="dead letters kept")
    tp.set_defaults(run=cmd_dead_trim)
    rp = dsub.add_parser("replay", help="put dead letters back on their priority stream")
    rp.add_argument("ids", nargs="*", help="dead-letter ids from `tokenq dead list`")
    rp.add_argument("--all", action="store_true", help="replay every dead letter")
    rp.set_defaults(run=cmd_dead_replay)


def _add_dead_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--error-type",
        action="append",
        default=[],
        metavar="TYPE",
        help="e.g. too_large, malformed_job, max_attempts",
    )
    p.add_argument("--feature", action="append", default=[], help="the job's feature")
    p.add_argument("--tenant", action="append", default=[], help="the job's tenant")
    p.add_argument(
        "--since",
        type=_moment,
        metavar="WHEN",
        help="dead-lettered at or after: a time ago (30m, 2h, 7d) or an ISO time "
        "(2026-11-30, 2026-11-30T14:00, ...Z; local time without an offset)",
    )
    p.add_argument(
        "--until",
        type=_moment,
        metavar="WHEN",
        help="dead-lettered at or before (same forms as --since)",
    )


def _add_jobs(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "jobs",
        help="take stuck entries out of the job streams",
        description="Operate on the entries of the job streams.",
    )
    jsub = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    rp = jsub.add_parser(
        "remove",
        help="take a stuck entry out of its stream and the pending list, with a dead letter",
        description="Take entries out of their job stream and out of the consumer group's "
        "pending list. Each gets a dead letter (error_type `removed`, replayable with "
        "`tokenq dead replay`), an error result, a usage event and a reply on its reply_to, "
        "so its producer learns at once. An entry a live worker holds (its consumer read or "
        "renewed within queue.visibility_timeout_s) is left alone unless --force.",
    )
    rp.add_argument(
        "ids",
        nargs="+",
        metavar="ID",
        help="an entry id (1763830000000-0, or low:1763830000000-0) or a job id given as `id`",
    )
    rp.add_argument(
        "--priority",
        help="look only in this priority's stream (when an id names entries in several)",
    )
    rp.add_argument(
        "--force",
        action="store_true",
        help="remove it even while a live worker holds it (that worker may still "
        "finish it and write a result of its own)",
    )
    rp.set_defaults(run=cmd_jobs_remove)


def _add_consumers(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "consumers",
        help="the workers' consumers: pending jobs, idle time, dead ones; prune",
        description="Every consumer of the group `workers` on every job stream: the jobs it "
        "holds (pending), how long since it last read or renewed anything (idle) and its "
        "state: live; dead (idle over queue.visibility_timeout_s, its jobs are reclaimed by "
        "the live workers); or dead with nothing pending, which `prune` removes.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per consumer")
    p.set_defaults(run=cmd_consumers)
    csub = p.add_subparsers(dest="consumers_command", metavar="ACTION")
    pp = csub.add_parser(
        "prune",
        help="remove dead consumers that hold nothing",
        description="Remove the consumers idle over queue.visibility_timeout_s that hold no "
        "job (checked again in the same step as the removal); say which were left and why.",
    )
    pp.set_defaults(run=cmd_consumers_prune)


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
    parts = [f"{row['cap']} [{row['period']}]: spent {money(spent)}, reserved {money(held)}"]
    if row["cap_usd"] is not None:
        left = max(0.0, row["cap_usd"] - spent - held)
        parts.append(f"cap {money(row['cap_usd'])} ({(spent + held) / row['cap_usd']:.0%} used, "
                     f"{money(left)} left)")  # fmt: skip
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
            entries = await find_dead(
                redis,
                Keys(cfg.prefix),
                _dead_filter(ns),
                limit=ns.limit,
                newest_first=not ns.oldest,
                cut_bytes=cfg.queue.max_entry_bytes,
            )
        for entry in entries:
            print(json.dumps(_dead_json(entry)) if ns.json else _dead_line(entry))
        if not entries and not ns.json:
            print("no dead letters" + ("" if _dead_filter(ns).everything else " match"))
        return 0

    return _run_async(run)


def _dead_filter(ns: argparse.Namespace) -> DeadFilter:
    return DeadFilter(tuple(ns.error_type), tuple(ns.feature), tuple(ns.tenant), ns.since, ns.until)


def _dead_json(entry: Entry) -> dict[str, Any]:
    out: dict[str, Any] = {"dead_id": entry.entry_id}
    out.update((k, v) for k, v in entry.fields.items() if k not in ("dead_id", "cut_bytes"))
    if entry.cut:
        out["cut_bytes"] = {shown(k): n for k, n in entry.cut.items()}
    return out


def _dead_line(entry: Entry) -> str:
    f = entry.fields
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry_ms(entry.entry_id) / 1000))
    if "error_type" not in f:  # not written by tokenq: show what is there
        shown_fields = " ".join(f"{k}={_short(v)}" for k, v in list(f.items())[:12])
        more = f" (+{len(f) - 12} fields)" if len(f) > 12 else ""
        return _printable(f"{entry.entry_id} (not a tokenq dead letter) {at}: {shown_fields}{more}")
    job_id = dead_job_id(f)
    head = (
        f"{entry.entry_id} {f['error_type']} feature={_short(f.get('feature', '-'))} "
        f"tenant={_short(f.get('tenant', '-'))} job={_short(job_id)} "
        f"attempts={f.get('attempts', '?')} priority={f.get('priority', '?')} {at}"
    )
    return f"{_printable(head)}\n    {_printable(f.get('error', '(no reason given)'))}"


def _short(text: str, most: int = 80) -> str:
    return text if len(text) <= most else f"{text[:most]}... ({len(text):,} chars)"


def _printable(text: str) -> str:
    """Text for a terminal: control characters (newlines, escape sequences, bidi overrides)
    escaped, so that no field of an entry can forge a line or repaint the screen."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _moment(text: str) -> int:
    """A --since/--until value as unix ms: a time ago (90s, 30m, 2h, 7d, 2w) or an ISO time."""
    ago = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d|w)", text.strip())
    if ago:
        seconds = float(ago[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[ago[2]]
        return int((time.time() - seconds) * 1000)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time ago (90s, 30m, 2h, 7d, 2w) nor an ISO time "
            "(2026-11-30, 2026-11-30T14:00, 2026-11-30T14:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a time without an offset is the operator's local time
    return int(when.timestamp() * 1000)


def cmd_dead_purge(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    which = _dead_filter(ns)
    if which.everything and not ns.all:
        raise ConfigError(
            "say which dead letters to purge: --error-type, --feature, --tenant, "
            "--since, --until, or --all for every one"
        )
    if ns.all and not which.everything:
        raise ConfigError("--all purges every dead letter: leave out the filters, or --all")

    async def run() -> int:
        keys = Keys(cfg.prefix)
        async with _redis(cfg) as redis:
            found = await find_dead(redis, keys, which, limit=None, newest_first=False, cut_bytes=0)
            if not found:
                print("no dead letters match; nothing removed")
                return 0
            what = f"{len(found)} dead letter{'s' if len(found) != 1 else ''} in {keys.dead}"
            if not _confirmed(f"delete {what}?", ns.yes):
                print("nothing removed")
                return 1
            removed = await delete_dead(redis, keys, (e.entry_id for e in found))
        print(f"removed {removed} dead letter{'s' if removed != 1 else ''}")
        return 0

    return _run_async(run)


def _confirmed(question: str, yes: bool) -> bool:
    """--yes, or the operator's answer on the terminal; with no terminal to ask on, refuse."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigError(
            f"would {question[:-1]}, but standard input is not a terminal to "
            "confirm on: pass --yes to go ahead"
        )
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_dead_trim(ns: argparse.Namespace) -> int:
    cfg = _config(ns)

    async def run() -> int:
        keys = Keys(cfg.prefix)
        async with _redis(cfg) as redis:
            removed = await trim_dead(redis, keys, ns.max)
            left = int(await redis.xlen(keys.dead))
        print(f"removed {removed} dead letter{'s' if removed != 1 else ''}; {left} kept")
        return 0

    return _run_async(run)


def cmd_dead_replay(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    if not ns.ids and not ns.all:
        raise ConfigError("name dead-letter ids to replay (see `tokenq dead list`), or --all")

    async def run() -> int:
        keys = Keys(cfg.prefix)
        async with _redis(cfg) as redis:
            every = ns.ids or [
                e.entry_id
                for e in await find_dead(redis, keys, limit=None, newest_first=False, cut_bytes=0)
            ]
            for dead_id in every:
                try:
                    job_id = await replay(redis, keys, dead_id, cfg.queue.priorities)
                except LookupError as exc:
                    print(f"tokenq: {exc}", file=sys.stderr)
                    return 1
                print(f"replayed {dead_id} as job {_printable(job_id)}")
        return 0

    return _run_async(run)


def cmd_jobs_remove(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    priorities = cfg.queue.priorities
    if ns.priority is not None and ns.priority not in priorities:
        raise ConfigError(
            f"--priority {ns.priority!r} is not one of queue.priorities: {', '.join(priorities)}"
        )

    async def run() -> int:
        keys, failed = Keys(cfg.prefix), 0
        async with _redis(cfg) as redis:
            for ident in ns.ids:
                failed += not await _remove_one(redis, cfg, keys, ident, ns)
        return 1 if failed else 0

    return _run_async(run)


async def _remove_one(
    redis: aioredis.Redis, cfg: Config, keys: Keys, ident: str, ns: argparse.Namespace
) -> bool:
    """Remove the one entry `ident` names; say what happened. False when nothing was."""
    job = await _one_entry(redis, cfg, keys, ident, ns)
    if job is None:
        return False
    removal = await remove_job_entry(
        redis,
        keys,
        job,
        now_ms=int(time.time() * 1000),
        result_ttl_s=cfg.queue.result_ttl_s,
        usage_maxlen=cfg.queue.usage_maxlen,
        max_entry_bytes=cfg.queue.max_entry_bytes,
        reply_to=reply_to_of(job.entry.lossless, cfg),
    )
    where = f"{job.entry.entry_id} from {job.stream} (job {job.job_id!r})"
    if removal is None:
        print(_printable(f"{where}: its worker finished it meanwhile; nothing removed"))
        return True
    outcome = "error result written" if removal.result_written else "kept the job's result"
    replied = ", replied on its reply_to" if removal.replied else ""
    print(_printable(f"removed {where}: dead letter {removal.dead_id}, {outcome}{replied}"))
    return True


async def _one_entry(
    redis: aioredis.Redis, cfg: Config, keys: Keys, ident: str, ns: argparse.Namespace
) -> JobEntry | None:
    """The one entry `ident` names, unless none does, several do, or a live worker holds it
    (without --force); then say so and return None."""
    where = [ns.priority] if ns.priority else cfg.queue.priorities
    found = await find_job_entries(redis, keys, where, ident, cut_bytes=cfg.queue.max_entry_bytes)
    name = _printable(repr(ident))
    if not found:
        streams = ", ".join(keys.jobs(p) for p in where)
        _say_error(
            f"no entry {name} in {streams}: give an entry id (the worker's log and "
            "XPENDING name them) or the `id` the producer gave the job"
        )
        return None
    if len(found) > 1:
        listed = "; ".join(f"{j.priority} {j.entry.entry_id} (job {j.job_id!r})" for j in found)
        _say_error(
            f"{name} names {len(found)} entries: {_printable(listed)}. Name one by its "
            "entry id, with --priority when the id is on several streams"
        )
        return None
    job, h = found[0], found[0].holder
    live = job.held_by_live_worker(int(cfg.queue.visibility_timeout_s * 1000))
    if h is not None and live and not ns.force:
        times = "once" if h.deliveries == 1 else f"{h.deliveries} times"
        _say_error(
            f"{name} is held by consumer {_printable(h.consumer)}, active "
            f"{_ago(h.consumer_idle_ms)} ago (delivered {times}, the last "
            f"{_ago(h.idle_ms)} ago): a live worker may still finish it. Wait, or --force"
        )
        return None
    return job


def _say_error(text: str) -> None:
    print(f"tokenq: {text}", file=sys.stderr)


def _ago(ms: int) -> str:
    """A duration for people: 850 ms, 12 s, 4 min 12 s, 3 h 05 min, 2 d 4 h."""
    if ms < 1000:
        return f"{ms} ms"
    s = ms // 1000
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def cmd_consumers(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    visibility_ms = int(cfg.queue.visibility_timeout_s * 1000)

    async def run() -> int:
        async with _redis(cfg) as redis:
            rows = await consumer_rows(redis, Keys(cfg.prefix), cfg.queue.priorities)
        for row in rows:
            state = "dead" if row.stale(visibility_ms) else "live"
            if ns.json:
                fields = {"priority": row.priority, "consumer": shown(row.name), "state": state}
                print(json.dumps({**fields, "pending": row.pending, "idle_ms": row.idle_ms}))
                continue
            line = (
                f"{row.priority:<8} {shown(row.name):<36} pending {row.pending:>6}  "
                f"idle {_ago(row.idle_ms):>14}  {state}{_why_dead(row, visibility_ms)}"
            )
            print(_printable(line))
        if not rows and not ns.json:
            print("no consumers: no worker has read the job streams yet")
        return 0

    return _run_async(run)


def _why_dead(row: ConsumerRow, visibility_ms: int) -> str:
    if not row.stale(visibility_ms):
        return ""
    if row.pending == 0:
        return ", nothing pending (`tokenq consumers prune` removes it)"
    if row.name == BATCHER.encode():
        return ": its pending jobs wait for the next batcher (no process holds the lease)"
    return ": its pending jobs are reclaimed by the live workers"


def cmd_consumers_prune(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    visibility_ms = int(cfg.queue.visibility_timeout_s * 1000)

    async def run() -> int:
        removed = left = 0
        async with _redis(cfg) as redis:
            for row in await consumer_rows(redis, Keys(cfg.prefix), cfg.queue.priorities):
                name = _printable(f"{shown(row.name)} on {row.stream}")
                if not row.stale(visibility_ms):
                    why = f"live (active {_ago(row.idle_ms)} ago)"
                elif row.pending:
                    why = (
                        f"{row.pending} pending; they are reclaimed after "
                        "queue.visibility_timeout_s (or `tokenq jobs remove` them)"
                    )
                elif await prune_consumer(redis, row, visibility_ms):
                    removed += 1
                    print(f"removed {name} (idle {_ago(row.idle_ms)}, nothing pending)")
                    continue
                else:
                    why = "it read a job meanwhile"
                left += 1
                print(f"left {name}: {why}")
        print(f"removed {removed} consumer{'s' if removed != 1 else ''}, left {left}")
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
