"""The operator's commands of `tokenq`: top, estimate, reconcile, alerts, redis-cli.

Argument parsing and printing only, as in worker.cli (which adds these commands to its parser
with add_tool_commands); each command calls one function of the module that does the work.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import redis as syncredis

from worker import alerts
from worker.config import Config, load_config
from worker.embedded import redis_url

EPILOG_LINES = """\
  top         a live view of the fleet: queues, rates, limits, breakers, budgets, consumers
  estimate    what a request or a JSONL workload would cost, per tier and as routed
  reconcile   compare tokenq's spend per model and day with the provider's usage report
  alerts      send budget alerts, open breakers and dead-letter bursts to a webhook
  redis-cli   run a Redis command against tokenq's Redis (or a small prompt)
"""

Sub = argparse._SubParsersAction  # argparse names no public type for it


def add_tool_commands(sub: Sub[argparse.ArgumentParser]) -> None:
    """Register the commands of this module on `tokenq`'s subparsers."""
    _add_alerts(sub)
    _add_redis_cli(sub)


def _config(ns: argparse.Namespace) -> Config:
    return load_config(ns.config)


def _run_async(make: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    """Run a coroutine; Ctrl-C ends it quietly."""
    try:
        result = asyncio.run(make())
    except KeyboardInterrupt:
        return 130
    return result or 0


def _add_alerts(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "alerts",
        help="send alerts (budgets, breakers, dead letters) to a webhook",
        description="Watch the usage stream's alert events (a spend cap reaching "
        "budgets.alert_at, a spend-cap 429, any other alert), the circuit breakers and the "
        "dead-letter stream, and POST each condition as Slack-compatible JSON "
        '{"text": ...} to alerts.webhook_url, at most once per alerts.period_s for the whole '
        "fleet (run one or several). Without a webhook_url it only logs them. SIGTERM or "
        "Ctrl-C stops it.",
    )
    p.set_defaults(run=cmd_alerts)


def cmd_alerts(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    return _run_async(lambda: alerts.serve(cfg))


def _add_redis_cli(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "redis-cli",
        help="run a Redis command against tokenq's Redis",
        description="The bundled valkey-server ships without a client: this runs one command "
        "given as arguments against the config's Redis (redis.url, or the embedded server), "
        "e.g. `tokenq redis-cli XLEN tokenq:jobs:normal`, and prints the reply as redis-cli "
        "does. Without arguments it reads commands from a prompt (or standard input), one a "
        "line, until `quit` or end of input. Values that are not UTF-8 are shown with "
        "\\x escapes.",
    )
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND [ARG ...]",
                   help="a Redis command and its arguments (none: a prompt)")  # fmt: skip
    p.set_defaults(run=cmd_redis_cli)


def cmd_redis_cli(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    url = redis_url(cfg)
    client = syncredis.Redis.from_url(url, protocol=2, socket_connect_timeout=5)
    client.response_callbacks.clear()  # the server's reply as it is, as redis-cli shows it
    try:
        if ns.words:
            return _redis_command(client, ns.words)
        return _redis_prompt(client, url)
    finally:
        client.close()


def _redis_command(client: syncredis.Redis, words: list[str]) -> int:
    try:
        # redis-py's sync execute_command has no annotations; the reply is raw (see above).
        reply = client.execute_command(*words)  # type: ignore[no-untyped-call]
    except syncredis.ResponseError as exc:
        print(f"(error) {exc}")
        return 1
    except syncredis.ConnectionError as exc:
        print(f"tokenq: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    print("\n".join(redis_reply(reply)), flush=True)
    return 0


def _redis_prompt(client: syncredis.Redis, url: str) -> int:
    prompt = f"{url.split('://')[-1]}> " if sys.stdin.isatty() else ""
    worst = 0
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            return worst
        try:
            words = shlex.split(line)
        except ValueError as exc:
            print(f"(error) {exc}; quote with ' or \"")
            continue
        if not words:
            continue
        if words[0].lower() in ("quit", "exit"):
            return worst
        worst = max(worst, _redis_command(client, words))


def redis_reply(reply: Any) -> list[str]:
    """A reply in redis-cli's form: (nil), (integer) n, text, numbered nested arrays."""
    if reply is None:
        return ["(nil)"]
    if isinstance(reply, int):
        return [f"(integer) {reply}"]
    if isinstance(reply, bytes):
        return [reply.decode(errors="backslashreplace")]
    if isinstance(reply, list):
        if not reply:
            return ["(empty array)"]
        lines: list[str] = []
        width = len(str(len(reply)))
        for n, item in enumerate(reply, 1):
            head = f"{n:>{width}}) "
            sub = redis_reply(item)
            lines += [head + sub[0], *(" " * len(head) + rest for rest in sub[1:])]
        return lines
    return [str(reply)]
