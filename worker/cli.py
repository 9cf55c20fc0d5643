"""`tokenq`: argument parsing and printing only; every command calls one function."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producers import Producer
from worker.api_request import parse_request
from worker.cli_cache import EPILOG_LINE as CACHE_EPILOG
from worker.cli_cache import add_cache_command
from worker.cli_entries import add_entry_commands
from worker.cli_ops import (
    Sub,
    add_ops_commands,
    config_of,
    positive,
    request_text,
    run_async,
    run_with_redis,
)
from worker.cli_report import add_report_commands, report_query
from worker.cli_tools import EPILOG_LINES as TOOLS_EPILOG
from worker.cli_tools import add_tool_commands
from worker.config import config_path, load_config
from worker.contract import Keys, to_fields
from worker.embedded import ping, redis_url, server_args
from worker.errors import ConfigError, MalformedJob
from worker.fleet import run_fleet
from worker.local import up
from worker.usage import HitRates, follow, tail_line

__all__ = ["build_parser", "main", "report_query"]

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
    except (RedisConnectionError, RedisTimeoutError, AuthenticationError) as exc:
        where = config_path(getattr(ns, "config", None))
        print(f"tokenq: Redis did not answer ({type(exc).__name__}: {exc}); is the server "
              f"running? Check `redis.url` in {where}.", file=sys.stderr)  # fmt: skip
        code = 1
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
    add_entry_commands(sub)  # dead, jobs
    add_ops_commands(sub)  # consumers, limits, budgets, batches, reload
    add_cache_command(sub)
    add_report_commands(sub)  # report, metrics, dashboard
    _add_config(sub)
    sub.add_parser("simulator", help="a local Anthropic API (see `tokenq simulator --help`)")
    p = sub.add_parser("redis", help="run the embedded valkey-server in the foreground")
    p.add_argument("--stop", action="store_true", help="stop a background embedded server")
    p.set_defaults(run=cmd_redis)
    add_tool_commands(sub)
    return parser


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
    p.add_argument("--processes", type=positive, default=2, help="worker processes (2)")
    p.add_argument("--demo-jobs", type=positive, default=200, help="demo jobs to submit (200)")
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
    p.add_argument("--processes", type=positive, help="processes (config worker.processes)")
    p.add_argument(
        "--concurrency", type=positive, help="jobs in flight per process (worker.concurrency)"
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


def _add_config(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="check a config file")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cp = csub.add_parser("check", help="validate a config file and summarise it")
    cp.add_argument("path", nargs="?", help="the file (default: --config or ./config.toml)")
    cp.set_defaults(run=cmd_config_check)


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
    cfg = config_of(ns)
    processes = ns.processes or cfg.worker.processes
    concurrency = ns.concurrency or cfg.worker.concurrency
    if processes > 1:
        redis_url(cfg)  # start the embedded server once, before the children race to
        return run_fleet(str(config_path(ns.config)), processes, concurrency, ns.log_level)
    config_file = str(config_path(ns.config))
    from worker.worker import serve  # the SDK's import takes seconds: only the worker's

    return run_async(lambda: serve(cfg, concurrency=concurrency, config_file=config_file))


def cmd_up(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    return up(
        cfg,
        str(config_path(ns.config)),
        processes=ns.processes,
        demo_jobs=ns.demo_jobs,
        demo_rate=ns.demo_rate,
        latency_ms=ns.latency_ms,
        exit_when_done=ns.exit_when_done,
    )


def cmd_submit(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    if ns.feature not in cfg.features:
        raise ConfigError(
            f"feature {ns.feature!r} is not in config.toml [features]: {', '.join(cfg.features)}"
        )
    text = request_text(ns, "REQUEST, --file FILE")
    try:
        parse_request(text)  # the worker's own check: refuse here what it would dead-letter
    except MalformedJob as exc:
        raise ConfigError(str(exc).removesuffix(" Fix the producer.")) from None
    request: dict[str, object] = json.loads(text)
    return run_with_redis(
        cfg, lambda redis: _submit(Producer(redis, cfg.prefix, cfg.queue.priorities), ns, request)
    )


async def _submit(producer: Producer, ns: argparse.Namespace, request: dict[str, object]) -> int:
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
    cfg = config_of(ns)
    return run_with_redis(
        cfg, lambda redis: _print_result(Producer(redis, cfg.prefix), ns.id, ns.timeout)
    )


async def _print_result(producer: Producer, job_id: str, timeout_s: float) -> int:
    try:
        result = await producer.result(job_id, timeout_s=timeout_s)
    except TimeoutError as exc:
        print(f"tokenq: {exc}; is a worker running (tokenq worker)?", file=sys.stderr)
        return 1
    print(msgspec.json.format(msgspec.json.encode(result)).decode())
    return 0 if result.status == "ok" else 1


def cmd_tail(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)

    async def run(redis: aioredis.Redis) -> None:
        rates = HitRates()
        async for _, event in follow(redis, Keys(cfg.prefix), from_start=ns.from_start):
            line = json.dumps(to_fields(event)) if ns.json else tail_line(event, rates)
            print(line, flush=True)

    return run_with_redis(cfg, run, block_s=5.0)


def cmd_redis(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
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
