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
from collections.abc import Callable, Coroutine
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import anthropic
import redis as syncredis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from worker import alerts, quote, reconcile
from worker.config import Config, load_config
from worker.embedded import redis_url
from worker.errors import ConfigError
from worker.jobs import describe
from worker.usage import money
from worker.worker import make_client

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
    _add_estimate(sub)
    _add_reconcile(sub)
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
    p.add_argument("--output-tokens", type=_positive, help="output tokens to assume per request")
    p.add_argument("--local", action="store_true", help="no count_tokens: the local estimate")
    p.add_argument("--json", action="store_true", help="the figures as one JSON object")
    p.set_defaults(run=cmd_estimate)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def cmd_estimate(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    if ns.workload:
        where = "standard input" if ns.workload == "-" else ns.workload
        text = sys.stdin.read() if ns.workload == "-" else _read(ns.workload)
        items = quote.read_workload(text.splitlines(), where)
    else:
        if ns.feature and ns.feature not in cfg.features:
            raise ConfigError(f"--feature {ns.feature!r} is not in [features]: "
                              f"{', '.join(cfg.features)}")  # fmt: skip
        items = [quote.read_request(_request_text(ns), ns.feature, ns.priority)]
    priced, source = asyncio.run(_estimate(cfg, items, ns))
    output = (
        f"{ns.output_tokens:,} output tokens a request (--output-tokens)" if ns.output_tokens
        else "output at max_tokens (the most a request can cost; --output-tokens N for a "
        "figure of your own)"
    )  # fmt: skip
    if ns.json:
        print(json.dumps(_estimate_json(cfg, priced, source)))
    elif ns.workload:
        print(_workload_text(cfg, priced, f"input from {source}; {output}", where))
    else:
        print(_request_text_out(cfg, priced[0], source, output))
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _request_text(ns: argparse.Namespace) -> str:
    if ns.file:
        return _read(ns.file)
    if ns.request and ns.request != "-":
        return str(ns.request)
    if sys.stdin.isatty():
        raise ConfigError("no request given: pass REQUEST, --file FILE, --workload FILE, or "
                          "pipe JSON on stdin")  # fmt: skip
    return sys.stdin.read()


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
        client = make_client(cfg, quote.COUNTS_AT_ONCE)
        try:
            return await price(quote.api_count(client)), f"count_tokens at {client.base_url}"
        except (anthropic.APIConnectionError, anthropic.APIStatusError) as exc:
            why = f"count_tokens at {client.base_url} failed: {describe(exc)}"
        finally:
            await client.close()
        bar.reset(task)
        return await price(quote.local_count), f"the local estimate (4 characters a token; {why})"


def _request_text_out(cfg: Config, p: quote.Priced, source: str, output: str) -> str:
    model = cfg.tiers[p.tier]
    lines = [
        f"input: {p.input_tokens:,} tokens, from {source}"
        + (f" on {model}" if source.startswith("count_tokens") else ""),
        f"  of them {p.prefix_tokens:,} the prefix prompt caching would cache (tools and system)"
        if p.prefix_tokens else
        "  no prompt caching: no tools or system prompt of at least the model's "
        "min_cache_tokens, or the feature's prompt_cache is off",
        f"output: {p.output_tokens:,} tokens; {output}",
        f"routed: {p.tier} ({p.why}); priority {p.item.priority}: "
        + ("a batch window (batch.priorities)" if p.batched else "real time"),
        "",
        f"{'tier':<8} {'model':<20} {'real time':>11} {'cache 1st':>11} {'cache later':>11} "
        f"{'batch':>11} {'batch+cache':>11}",
    ]  # fmt: skip
    for tier, model_id in cfg.tiers.items():
        figures = [quote.cost(cfg, p, tier)]
        if p.prefix_tokens:
            figures += [
                quote.cost(cfg, p, tier, cache="write"),
                quote.cost(cfg, p, tier, cache="read"),
            ]
        cells = [money(f) for f in figures] + ["-"] * (3 - len(figures))
        cells += [money(quote.cost(cfg, p, tier, batch=True))]
        cells += (
            [money(quote.cost(cfg, p, tier, cache="read", batch=True))]
            if p.prefix_tokens
            else ["-"]
        )
        mark = "  <- routed" if tier == p.tier else ""
        lines.append(f"{tier:<8} {model_id:<20} " + " ".join(f"{c:>11}" for c in cells) + mark)
    return "\n".join(lines)


def _workload_text(cfg: Config, priced: list[quote.Priced], how: str, where: str) -> str:
    t = quote.workload_totals(cfg, priced)
    naive_tier = cfg.router.baseline_tier
    naive = t.per_tier[naive_tier]

    def line(label: str, usd: float) -> str:
        saved = f"{1 - usd / naive:>7.1%}" if naive else ""
        return f"  {label:<52} {money(usd):>12} {saved}"

    out = [
        f"workload: {t.requests:,} requests from {where}; {how}",
        f"  {'':<52} {'cost':>12} {'saved':>7} (against every job on {naive_tier}, real time)",
    ]
    for tier in cfg.tiers:
        out.append(line(f"every job on {tier}, real time", t.per_tier[tier]))
    used = ", ".join(f"{tier} {n:,}" for tier, n in t.tiers_used.items())
    out += [
        line(f"as routed ({used}), real time", t.routed),
        line("as routed + prompt caching", t.routed_cached),
        line(f"as routed + batch windows ({', '.join(cfg.batch.priorities) or 'none'})",
             t.routed_batched),
        line("as routed + prompt caching + batch windows", t.routed_cached_batched),
        "",
        f"  {'feature':<24} {'jobs':>7} {'as routed, every lever':>24}",
    ]  # fmt: skip
    for feature, (jobs, usd) in sorted(t.per_feature.items()):
        out.append(f"  {feature:<24} {int(jobs):>7,} {money(usd):>24}")
    out.append("  (not counted: the response cache and de-duplication)")
    return "\n".join(out)


def _estimate_json(cfg: Config, priced: list[quote.Priced], source: str) -> dict[str, Any]:
    t = quote.workload_totals(cfg, priced)
    return {
        "requests": t.requests, "source": source,
        "input_tokens": sum(p.input_tokens for p in priced),
        "output_tokens": sum(p.output_tokens for p in priced),
        "per_tier_usd": t.per_tier, "routed_usd": t.routed,
        "routed_prompt_cache_usd": t.routed_cached, "routed_batch_usd": t.routed_batched,
        "routed_all_levers_usd": t.routed_cached_batched, "tiers_used": t.tiers_used,
        "per_feature": {f: {"jobs": int(j), "usd": u} for f, (j, u) in t.per_feature.items()},
    }  # fmt: skip


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
    cfg = _config(ns)
    today = dt.datetime.now(dt.UTC).date()
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
    except reconcile.ProviderError as exc:
        print(f"tokenq: {exc}", file=sys.stderr)
        return 2
    if ns.json:
        for row in rows:
            print(json.dumps(_row_json(row)))
    else:
        print(f"tokenq reconcile: {first} to {last} (UTC days), tokenq's usage events "
              f"against the Admin API at {url}")  # fmt: skip
        print(_reconcile_text(rows, ns))
    return 1 if any(r.over for r in rows) else 0


def _row_json(row: reconcile.Row) -> dict[str, Any]:
    def side(s: reconcile.Side) -> dict[str, Any]:
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


def _reconcile_text(rows: list[reconcile.Row], ns: argparse.Namespace) -> str:
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
    lines.append(f"{over} of {len(rows)} day-and-model rows over the thresholds "
                 f"(more than ${ns.max_diff_usd} and more than {ns.max_diff_pct}%)")  # fmt: skip
    return "\n".join(lines)


def _signed(usd: Decimal) -> str:
    return ("+" if usd > 0 else "") + money(float(usd))


def _token_diff(r: reconcile.Row) -> str:
    names = ("input", "cache writes", "cache reads", "output")
    pairs = zip(names, r.tokenq.tokens(), r.provider.tokens(), strict=True)
    return ", ".join(f"{n} {a - b:+,}" for n, a, b in pairs if a != b)


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
