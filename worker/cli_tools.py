"""The operator's commands of `tokenq`: top, estimate, reconcile, alerts, redis-cli.

Argument parsing and printing only, as in worker.cli (which adds these commands to its parser
with add_tool_commands); each command calls one function of the module that does the work.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import sys
from decimal import Decimal
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import redis as syncredis
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from worker import alerts, clock, quote, reconcile, top
from worker.admin_api import ProviderError
from worker.cli_ops import Sub, config_of, positive, read_text, request_text, run_async
from worker.config import Config
from worker.embedded import connect, redis_url
from worker.errors import ConfigError

EPILOG_LINES = """\
  top         a live view of the fleet: queues, rates, limits, breakers, budgets, consumers
  estimate    what a request or a JSONL workload would cost, per tier and as routed
  reconcile   compare tokenq's spend per model and day with the provider's usage report
  alerts      send budget alerts, open breakers and dead-letter bursts to a webhook
  redis-cli   run a Redis command against tokenq's Redis (or a small prompt)
"""


def add_tool_commands(sub: Sub[argparse.ArgumentParser]) -> None:
    """Register the commands of this module on `tokenq`'s subparsers."""
    _add_top(sub)
    _add_estimate(sub)
    _add_reconcile(sub)
    _add_alerts(sub)
    _add_redis_cli(sub)


def _add_top(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "top",
        help="a live view of the fleet: queues, rates, limits, breakers, budgets, consumers",
        description="A view of the whole fleet from Redis, refreshed in place: each priority "
        "stream's depth, waiting jobs, oldest waiting age and pending jobs; jobs/s and "
        "errors/s from the usage stream; calls in flight; rate limits in use per model; "
        "breakers that are not closed; spend caps at budgets.alert_at or more; batches in "
        "flight; consumers live, idle (seen within queue.visibility_timeout_s or not) and "
        "dead (not seen, holding jobs). q or Ctrl-C quits.",
    )
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (1)")
    p.add_argument("--window", type=float, default=10.0,
                   help="seconds of usage events the rates are over (10)")  # fmt: skip
    p.set_defaults(run=cmd_top)


def cmd_top(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    if not ns.interval > 0 or not ns.window > 0:
        raise ConfigError("--interval and --window are seconds above 0, e.g. --interval 2")
    url = redis_url(cfg)
    where = urlsplit(url)  # never the password
    shown = f"redis {where.hostname}:{where.port or 6379}{where.path or ''}"
    console = Console(width=None if sys.stdout.isatty() else 120)

    async def run() -> int:
        redis = connect(url, decode=False)
        try:
            if ns.once:
                await top.once(redis, cfg, console, shown, ns.window)
            else:
                await top.live(redis, cfg, console, shown, ns.interval, ns.window)
        except (RedisError, OSError) as exc:
            print(f"tokenq: cannot read Redis ({shown}): {exc}", file=sys.stderr)
            return 1
        finally:
            await redis.aclose()
        return 0

    return run_async(run)


def _add_estimate(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "estimate",
        help="what a request or a JSONL workload would cost, per tier and as routed",
        description="Price one request (a JSON object of Messages API parameters: the "
        "REQUEST argument, --file, or standard input) or a workload (--workload FILE: JSON "
        'lines of {"t_ms", "feature", "tenant", "priority", "request"}, the reference '
        "trace's format) on every tier and as the router would send it, in real time, with "
        "prompt caching, in batch windows and with both. Input tokens come from the API's "
        "free count_tokens when the API (or the simulator) answers, else from the local "
        "estimate; the output says which. Output is priced at max_tokens (the most a request "
        "can cost) unless --output-tokens says otherwise.",
    )
    p.add_argument("request", nargs="?", help='JSON, e.g. \'{"messages":[...]}\'; "-" = stdin')
    p.add_argument("-f", "--file", help="read the request JSON from this file")
    p.add_argument("--workload", metavar="FILE", help='a JSONL workload ("-" = stdin)')
    p.add_argument("--feature", default="", help="the request's feature (its tier, caps, cache)")
    p.add_argument("--priority", default="normal", help="its priority stream (default normal)")
    p.add_argument("--output-tokens", type=positive, help="output tokens to assume per request")
    p.add_argument("--local", action="store_true", help="no count_tokens: the local estimate")
    p.add_argument("--json", action="store_true", help="the figures as one JSON object")
    p.set_defaults(run=cmd_estimate)


def cmd_estimate(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    if ns.workload:
        where = "standard input" if ns.workload == "-" else ns.workload
        text = sys.stdin.read() if ns.workload == "-" else read_text(ns.workload)
        items = quote.read_workload(text.splitlines(), where)
    else:
        if ns.feature and ns.feature not in cfg.features:
            raise ConfigError(f"--feature {ns.feature!r} is not in [features]: "
                              f"{', '.join(cfg.features)}")  # fmt: skip
        items = [
            quote.read_request(
                request_text(ns, "REQUEST, --file FILE, --workload FILE"), ns.feature, ns.priority
            )
        ]
    priced, source = asyncio.run(_estimate(cfg, items, ns))
    output = (
        f"{ns.output_tokens:,} output tokens a request (--output-tokens)" if ns.output_tokens
        else "output at max_tokens (the most a request can cost; --output-tokens N for a "
        "figure of your own)"
    )  # fmt: skip
    if ns.json:
        print(json.dumps(quote.as_json(cfg, priced, source)))
    elif ns.workload:
        print(quote.workload_table(cfg, priced, f"input from {source}; {output}", where))
    else:
        print(quote.request_table(cfg, priced[0], source, output))
    return 0


async def _estimate(
    cfg: Config, items: list[quote.Item], ns: argparse.Namespace
) -> tuple[list[quote.Priced], str]:
    """Price with count_tokens, or the local estimate when asked or when it fails."""
    with Progress(
        TextColumn("counting input tokens"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), transient=True,
        disable=len(items) < 50 or not sys.stderr.isatty(),
    ) as bar:  # fmt: skip
        task = bar.add_task("count", total=len(items))
        price = partial(quote.price_all, cfg, items, output_tokens=ns.output_tokens,
                        progress=partial(bar.advance, task))  # fmt: skip
        if ns.local:
            return await price(
                quote.local_count
            ), "the local estimate (--local; 4 characters a token)"
        import anthropic  # the SDK's import takes seconds: only when the API is asked

        from worker.jobs import describe
        from worker.worker import make_client

        client = make_client(cfg, quote.COUNTS_AT_ONCE)
        try:
            return await price(quote.api_count(client)), f"count_tokens at {client.base_url}"
        except (anthropic.APIConnectionError, anthropic.APIStatusError) as exc:
            why = f"count_tokens at {client.base_url} failed: {describe(exc)}"
        finally:
            await client.close()
        bar.reset(task)
        return await price(quote.local_count), f"the local estimate (4 characters a token; {why})"


def _add_reconcile(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "reconcile",
        help="compare tokenq's spend per model and day with the provider's report",
        description="Sum tokenq's usage events per model and UTC day and compare them with "
        "the provider's own usage and cost report (the Admin API's usage_report/messages and "
        "cost_report; an Admin API key in ANTHROPIC_ADMIN_API_KEY; the simulator answers "
        "them without one). Prints each difference with its likely causes. Exits 1 when a "
        "difference is over both thresholds, so it can run from cron; 2 when a side cannot "
        "be read.",
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument("--month", type=_month, help="YYYY-MM (default: this month, UTC)")
    when.add_argument("--from", dest="first", type=_date, help="first day, YYYY-MM-DD")
    p.add_argument("--to", dest="last", type=_date, help="last day (with --from; default today)")
    p.add_argument("--max-diff-usd", type=_amount, default=Decimal("0.01"),
                   help="a day and model off by more than this many USD (0.01) ...")  # fmt: skip
    p.add_argument("--max-diff-pct", type=_amount, default=Decimal(1),
                   help="... and more than this percent of the larger side fails (1)")  # fmt: skip
    p.add_argument("--workspace-id", help="compare with this workspace's usage only")
    p.add_argument("--admin-url", help="the Admin API's base URL (default: from [anthropic])")
    p.add_argument("--json", action="store_true", help="one JSON object per day and model")
    p.set_defaults(run=cmd_reconcile)


def _amount(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except ArithmeticError:
        value = Decimal(-1)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of 0 or more, e.g. 0.05")
    return value


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day as YYYY-MM-DD") from None


def _month(text: str) -> dt.date:
    try:
        return dt.datetime.strptime(text, "%Y-%m").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a month as YYYY-MM") from None


def _period(ns: argparse.Namespace, today: dt.date) -> tuple[dt.date, dt.date]:
    if ns.last is not None and ns.first is None:
        raise ConfigError("--to needs --from (or use --month)")
    if ns.first is not None:
        last = ns.last or today
        if last < ns.first:
            raise ConfigError(f"--to {last} is before --from {ns.first}")
        return ns.first, last
    first = ns.month or today.replace(day=1)
    following = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return first, min(following - dt.timedelta(days=1), today)


def cmd_reconcile(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    today = clock.utc().date()
    first, last = _period(ns, today)
    url = ns.admin_url or reconcile.admin_url(cfg, os.environ)
    key = os.environ.get("ANTHROPIC_ADMIN_API_KEY", "none")
    limits = reconcile.Thresholds(ns.max_diff_usd, ns.max_diff_pct)

    async def run() -> list[reconcile.Row]:
        return await reconcile.reconcile(
            cfg, first, last, limits, url=url, key=key, workspace=ns.workspace_id
        )

    try:
        rows = asyncio.run(run())
    except ProviderError as exc:
        print(f"tokenq: {exc}", file=sys.stderr)
        return 2
    except (RedisError, OSError) as exc:
        print(f"tokenq: cannot read the usage stream from Redis: {exc}", file=sys.stderr)
        return 2
    if ns.json:
        for row in rows:
            print(json.dumps(reconcile.row_json(row)))
    else:
        print(f"tokenq reconcile: {first} to {last} (UTC days), tokenq's usage events "
              f"against the Admin API at {url}")  # fmt: skip
        print(reconcile.text(rows, limits))
    return 1 if any(r.over for r in rows) else 0


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
    cfg = config_of(ns)
    return run_async(lambda: alerts.serve(cfg))


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
    cfg = config_of(ns)
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
