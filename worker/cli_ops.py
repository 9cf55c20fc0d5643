"""`tokenq` commands over the fleet's state, for operators: consumers, rate limits, budgets
and breakers, Message Batches, reload; and the helpers every command module shares (config_of,
run_with_redis, positive, printable, ago). Argument parsing and printing only; each command
calls one function of the module that owns its concern (worker.operators, worker.limiter,
worker.budgets, worker.breakers, worker.control).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from worker import clock
from worker.breakers import Breakers
from worker.budgets import budget_rows, resume
from worker.config import Config, load_config
from worker.contract import BATCHER, Keys
from worker.control import publish_reload
from worker.embedded import connect, redis_url
from worker.entries import shown
from worker.errors import ConfigError
from worker.limiter import ModelStatus, status
from worker.operators import ConsumerRow, batch_rows, cancel_batch, consumer_rows, prune_consumer
from worker.usage import money

Sub = argparse._SubParsersAction  # argparse names no public type for it


def add_ops_commands(sub: Sub[argparse.ArgumentParser]) -> None:
    """Add consumers, limits, budgets, batches and reload to `tokenq`."""
    _add_consumers(sub)
    _add_limits(sub)
    _add_budgets(sub)
    _add_batches(sub)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def config_of(ns: argparse.Namespace) -> Config:
    return load_config(ns.config)


def read_text(path: str) -> str:
    """A file named on the command line; ConfigError when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def request_text(ns: argparse.Namespace, sources: str) -> str:
    """The request JSON of `submit` and `estimate`: --file, the REQUEST argument, or standard
    input; `sources` names the command's ways to give one, for the error without any."""
    if ns.file:
        return read_text(ns.file)
    if ns.request and ns.request != "-":
        return str(ns.request)
    if sys.stdin.isatty():
        raise ConfigError(f"no request given: pass {sources}, or pipe JSON on stdin")
    return sys.stdin.read()


@asynccontextmanager
async def redis_of(cfg: Config, block_s: float = 0.0) -> AsyncIterator[aioredis.Redis]:
    """A client for the configured Redis (starting the embedded server if need be)."""
    client = connect(redis_url(cfg), block_s=block_s)
    try:
        yield client
    finally:
        await client.aclose()


def run_async(make: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    """Run a coroutine; Ctrl-C ends it quietly."""
    try:
        result = asyncio.run(make())
    except KeyboardInterrupt:
        return 130
    return result or 0


def run_with_redis(
    cfg: Config, work: Callable[[aioredis.Redis], Awaitable[int | None]], *, block_s: float = 0.0
) -> int:
    """Run `work` with a client for the configured Redis (redis_of), as run_async does."""

    async def run() -> int | None:
        async with redis_of(cfg, block_s) as redis:
            return await work(redis)

    return run_async(run)


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
        "today; then the state of every circuit breaker the fleet has used, and whether the "
        "organization's spend limit (a 429 enforced_spend_limit_reached from the API) has "
        "stopped every call of the fleet. `resume` lifts that stop once the limit is raised "
        "(otherwise it lasts until the month turns, 00:00 UTC on the 1st).",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per cap and breaker")
    p.set_defaults(run=cmd_budgets)
    bsub = p.add_subparsers(dest="budgets_command", metavar="ACTION")
    rp = bsub.add_parser(
        "resume",
        help="lift the fleet's stop after the organization's spend limit",
        description="Lift the stop the fleet put on every call when the API answered 429 "
        "enforced_spend_limit_reached. Do it once the organization's limit is raised; the "
        "jobs that wait come back within a minute. Without it the stop ends when the month "
        "turns.",
    )
    rp.set_defaults(run=cmd_budgets_resume)


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
    p.add_argument("--limit", type=positive, default=50, help="at most this many (50)")
    p.set_defaults(run=cmd_batches)
    bsub = p.add_subparsers(dest="batches_command", metavar="ACTION")
    cp = bsub.add_parser("cancel", help="cancel a submitted batch")
    cp.add_argument("id", help="a batch id from `tokenq batches` (local or msgbatch_...)")
    cp.set_defaults(run=cmd_batches_cancel)


def cmd_limits(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)

    async def run(redis: aioredis.Redis) -> None:
        models = await status(redis, cfg)
        if not models:
            print('no model has limits; add [models."<id>".limits] to the config file')
        for model in models:
            print(json.dumps(msgspec.to_builtins(model)) if ns.json else _limits_text(model))

    return run_with_redis(cfg, run)


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
    cfg = config_of(ns)

    async def run(redis: aioredis.Redis) -> int:
        keys = Keys(cfg.prefix)
        rows = await budget_rows(redis, cfg, keys, clock.utc())
        breakers = await Breakers(redis, keys, cfg.breakers, 0).status()
        stopped: Any = await redis.get(keys.spend_stop)
        stop = [{"spend_stop_until_ms": int(stopped)}] if stopped is not None else []
        if ns.json:
            for row in [*rows, *breakers, *stop]:
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
        if stopped is not None:
            print(f"spend limit reached: every call of the fleet is stopped until "
                  f"{_utc(int(stopped))} (the API's 429 enforced_spend_limit_reached); "
                  "`tokenq budgets resume` lifts it once the limit is raised")  # fmt: skip
        return 0

    return run_with_redis(cfg, run)


def _utc(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def cmd_budgets_resume(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)

    async def run(redis: aioredis.Redis) -> None:
        until = await resume(redis, Keys(cfg.prefix))
        if until is None:
            print("no spend stop: calls are not stopped")
        else:
            print(f"spend stop lifted (it would have lasted until {_utc(until)}); the waiting "
                  "jobs come back within a minute")  # fmt: skip

    return run_with_redis(cfg, run)


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
    cfg = config_of(ns)

    async def run(redis: aioredis.Redis) -> None:
        rows = await batch_rows(redis, Keys(cfg.prefix), ns.limit)
        for row in rows:
            print(json.dumps(row) if ns.json else _batch_text(row))
        if not rows and not ns.json:
            batched = ", ".join(cfg.batch.priorities) or "none (batch.priorities = [])"
            print(f"no batches yet; batched priorities: {batched}")

    return run_with_redis(cfg, run)


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
    cfg = config_of(ns)

    async def run() -> int:
        from worker.worker import make_client  # the SDK, only when a command calls the API

        client = make_client(cfg, 1)
        try:
            async with redis_of(cfg) as redis:
                local, answer = await cancel_batch(redis, Keys(cfg.prefix), client, ns.id)
        except LookupError as exc:
            print(f"tokenq: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.close()
        print(f"batch {local}: {answer}")
        return 0

    return run_async(run)


def cmd_reload(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)  # a file that does not load is reported here, before any worker sees it

    async def run(redis: aioredis.Redis) -> int:
        keys = Keys(cfg.prefix)
        listening = await publish_reload(redis, keys)
        print(f"reload sent to {listening} worker process(es) on {keys.control}")
        return 0 if listening else 1

    return run_with_redis(cfg, run)


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


def ago(ms: int) -> str:
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
    cfg = config_of(ns)
    visibility_ms = int(cfg.queue.visibility_timeout_s * 1000)

    async def run(redis: aioredis.Redis) -> None:
        rows = await consumer_rows(redis, Keys(cfg.prefix), cfg.queue.priorities)
        for row in rows:
            state = "dead" if row.stale(visibility_ms) else "live"
            if ns.json:
                fields = {"priority": row.priority, "consumer": shown(row.name), "state": state}
                print(json.dumps({**fields, "pending": row.pending, "idle_ms": row.idle_ms}))
                continue
            line = (
                f"{row.priority:<8} {shown(row.name):<36} pending {row.pending:>6}  "
                f"idle {ago(row.idle_ms):>14}  {state}{_why_dead(row, visibility_ms)}"
            )
            print(printable(line))
        if not rows and not ns.json:
            print("no consumers: no worker has read the job streams yet")

    return run_with_redis(cfg, run)


def _why_dead(row: ConsumerRow, visibility_ms: int) -> str:
    if not row.stale(visibility_ms):
        return ""
    if row.pending == 0:
        return ", nothing pending (`tokenq consumers prune` removes it)"
    if row.name == BATCHER.encode():
        return ": its pending jobs wait for the next batcher (no process holds the lease)"
    return ": its pending jobs are reclaimed by the live workers"


def cmd_consumers_prune(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    visibility_ms = int(cfg.queue.visibility_timeout_s * 1000)

    async def run(redis: aioredis.Redis) -> None:
        removed = left = 0
        for row in await consumer_rows(redis, Keys(cfg.prefix), cfg.queue.priorities):
            name = printable(f"{shown(row.name)} on {row.stream}")
            if not row.stale(visibility_ms):
                why = f"live (active {ago(row.idle_ms)} ago)"
            elif row.pending:
                why = (
                    f"{row.pending} pending; they are reclaimed after "
                    "queue.visibility_timeout_s (or `tokenq jobs remove` them)"
                )
            elif await prune_consumer(redis, row, visibility_ms):
                removed += 1
                print(f"removed {name} (idle {ago(row.idle_ms)}, nothing pending)")
                continue
            else:
                why = "it read a job meanwhile"
            left += 1
            print(f"left {name}: {why}")
        print(f"removed {removed} consumer{'s' if removed != 1 else ''}, left {left}")

    return run_with_redis(cfg, run)


def printable(text: str) -> str:
    """Text for a terminal: control characters (newlines, escape sequences, bidi overrides)
    escaped, so that no field of an entry can forge a line or repaint the screen."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
