"""`tokenq top`: the fleet at a glance, refreshed in place (rich's Live).

Every refresh reads, from Redis only (so it shows every machine's workers):

- per priority stream: its depth (entries in the stream: finished jobs are deleted from it,
  so these are the jobs not finished), those waiting (never delivered: depth less pending),
  the age of the oldest waiting one (the first entry after the group's last-delivered id),
  and those pending (delivered and not acknowledged: in flight at a worker, or held by the
  batcher in a batch window);
- jobs/s and errors/s over the last `window_s` of the usage stream (job events; error events
  are `status = error`); entries that are not usage events are skipped;
- calls in flight: the pending entries of every consumer but the batcher;
- each limited model's rate limits in use (worker.limiter.status), breakers that are not
  closed, spend caps at or past budgets.alert_at (these two found by SCAN, so read every
  5 seconds only), batches not done (worker.batcher);
- consumers of the group, merged over the streams: live (seen within the visibility
  timeout; a live worker renews its jobs every third of it), dead (not seen for that long
  and holding jobs, which another worker will reclaim), idle (not seen for that long,
  holding nothing).

`tokenq top --once` prints one frame (for scripts and tests); live, `q` or Ctrl-C quits and
gives the terminal back as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from worker import clock
from worker.breakers import Breakers
from worker.budgets import budget_rows
from worker.config import Config
from worker.contract import BATCHER, GROUP, Keys, as_text, entry_ms
from worker.limiter import ModelStatus, status
from worker.operators import batch_rows
from worker.usage import event_of, money

PAGE = 5000  # usage entries read per round trip
SCAN_EVERY_MS = 5000
MOST_PER_REFRESH = 100_000  # beyond this a refresh stops reading; the rates say "at least"


@dataclass(frozen=True)
class StreamRow:
    priority: str
    depth: int
    waiting: int
    oldest_waiting_ms: int | None  # entry time of the oldest never-delivered job
    pending: int
    batched: bool  # a priority of batch.priorities


@dataclass(frozen=True)
class ConsumerRow:
    name: str
    pending: int
    idle_ms: int
    state: str  # live, idle, dead


@dataclass
class Snapshot:
    at_ms: int
    streams: list[StreamRow]
    jobs_per_s: float
    errors_per_s: float
    rates_capped: bool
    in_flight: int
    limits: list[ModelStatus]
    breakers: list[dict[str, Any]]
    budgets: list[dict[str, Any]]
    batches: list[dict[str, Any]]
    consumers: list[ConsumerRow]


@dataclass
class RateMeter:
    """Job and error events of the usage stream over a sliding window, read incrementally."""

    window_ms: int
    last_id: str | None = None
    seen: deque[tuple[int, bool]] = field(default_factory=deque)  # (entry ms, error)
    capped: bool = False

    async def update(self, redis: aioredis.Redis, keys: Keys, now_ms: int) -> None:
        start = f"({self.last_id}" if self.last_id else f"{now_ms - self.window_ms}-0"
        read = 0
        self.capped = False
        while True:
            page: Any = await redis.xrange(keys.usage, min=start, count=PAGE)
            for raw_id, fields in page:
                self.last_id = as_text(raw_id)
                event = event_of(fields)
                if event is not None and event.kind == "job":
                    self.seen.append((entry_ms(self.last_id), event.status == "error"))
            read += len(page)
            if len(page) < PAGE:
                break
            if read >= MOST_PER_REFRESH:
                self.capped = True
                break
            start = f"({self.last_id}"
        while self.seen and self.seen[0][0] < now_ms - self.window_ms:
            self.seen.popleft()

    def rates(self) -> tuple[float, float]:
        seconds = self.window_ms / 1000
        errors = sum(1 for _, error in self.seen if error)
        return len(self.seen) / seconds, errors / seconds


@dataclass
class Scanned:
    """What is found with SCAN over the whole keyspace (tenant caps, breakers): read at most
    every SCAN_EVERY_MS, not every frame, so a big Redis is not walked each second."""

    at_ms: int | None = None
    budgets: list[dict[str, Any]] = field(default_factory=list)
    breakers: list[dict[str, Any]] = field(default_factory=list)

    async def update(self, redis: aioredis.Redis, cfg: Config, now_ms: int) -> None:
        if self.at_ms is not None and now_ms - self.at_ms < SCAN_EVERY_MS:
            return
        keys = Keys(cfg.prefix)
        when = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
        self.budgets = await budget_rows(redis, cfg, keys, when)
        self.breakers = await Breakers(redis, keys, cfg.breakers, 0).status()
        self.at_ms = now_ms


async def snapshot(
    redis: aioredis.Redis, cfg: Config, meter: RateMeter, scanned: Scanned, now_ms: int
) -> Snapshot:
    """Everything one frame shows, read from Redis."""
    keys = Keys(cfg.prefix)
    streams: list[StreamRow] = []
    consumers: dict[str, list[int]] = {}  # name -> [pending, idle ms]
    for priority in cfg.queue.priorities:
        row, members = await _stream(redis, keys.jobs(priority), priority, cfg)
        streams.append(row)
        for c in members:
            name = as_text(c["name"])
            merged = consumers.setdefault(name, [0, int(c["idle"])])
            merged[0] += int(c["pending"])
            merged[1] = min(merged[1], int(c["idle"]))
    await meter.update(redis, keys, now_ms)
    jobs, errors = meter.rates()
    visibility_ms = int(cfg.queue.visibility_timeout_s * 1000)
    rows = [ConsumerRow(n, p, i, _state(p, i, visibility_ms)) for n, (p, i) in consumers.items()]
    in_flight = sum(r.pending for r in rows if r.name != BATCHER)
    await scanned.update(redis, cfg, now_ms)
    return Snapshot(
        at_ms=now_ms, streams=streams, jobs_per_s=jobs, errors_per_s=errors,
        rates_capped=meter.capped, in_flight=in_flight,
        limits=await status(redis, cfg),
        breakers=[b for b in scanned.breakers if b.get("state", "closed") != "closed"],
        budgets=[b for b in scanned.budgets if _share(b) >= cfg.budgets.alert_at],
        batches=[b for b in await batch_rows(redis, keys, 50) if b.get("state") != "done"],
        consumers=sorted(rows, key=lambda r: (r.state != "dead", r.name)),
    )  # fmt: skip


async def _stream(
    redis: aioredis.Redis, stream: str, priority: str, cfg: Config
) -> tuple[StreamRow, list[dict[str, Any]]]:
    depth = int(await redis.xlen(stream))
    pending, last_delivered, members = 0, "0-0", []
    try:
        groups: Any = await redis.xinfo_groups(stream)
        group = next((g for g in groups if as_text(g["name"]) == GROUP), None)
        if group is not None:
            pending = int(group["pending"])
            last_delivered = as_text(group["last-delivered-id"])
            members = list(await redis.xinfo_consumers(stream, GROUP))
    except ResponseError:
        pass  # no stream yet
    first: Any = await redis.xrange(stream, min=f"({last_delivered}", count=1)
    oldest = entry_ms(as_text(first[0][0])) if first else None
    row = StreamRow(priority, depth, max(0, depth - pending), oldest, pending,
                    priority in cfg.batch.priorities)  # fmt: skip
    return row, members


def _state(pending: int, idle_ms: int, visibility_ms: int) -> str:
    if idle_ms < visibility_ms:
        return "live"
    return "dead" if pending else "idle"


def _share(row: dict[str, Any]) -> float:
    cap = row.get("cap_usd")
    used = float(row.get("spent_usd", 0)) + float(row.get("reserved_usd", 0))
    share = used / cap if cap else 0.0
    requests = row.get("cap_requests")
    if requests:
        share = max(share, int(row.get("requests", 0)) / requests)
    return share


def render(s: Snapshot, cfg: Config, where: str) -> RenderableType:
    """One frame. Every name from Redis goes in as plain Text: no rich markup from data."""
    clock = time.strftime("%H:%M:%S", time.localtime(s.at_ms / 1000))
    at_least = "at least " if s.rates_capped else ""
    head = Text(f"tokenq top  {clock}  prefix {cfg.prefix}  {where}", style="bold")
    rates = Text(
        f"jobs/s {at_least}{s.jobs_per_s:.1f}   errors/s {at_least}{s.errors_per_s:.1f}   "
        f"in flight {s.in_flight}   consumers: " + _consumer_counts(s.consumers)
    )
    parts: list[RenderableType] = [head, rates]
    for part in [_queues(s), *_optional(s, cfg)]:
        parts += [Text(""), part]
    return Group(*parts)


def _consumer_counts(rows: list[ConsumerRow]) -> str:
    return ", ".join(f"{sum(r.state == k for r in rows)} {k}" for k in ("live", "idle", "dead"))


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=None, pad_edge=False)
    for n, name in enumerate(columns):
        table.add_column(name, justify="left" if n == 0 else "right")
    return table


def _queues(s: Snapshot) -> Table:
    table = _table("queues", "priority", "depth", "waiting", "oldest waiting", "pending")
    for r in s.streams:
        age = _age(s.at_ms - r.oldest_waiting_ms) if r.oldest_waiting_ms else "-"
        label = f"{r.priority} (batch windows)" if r.batched else r.priority
        table.add_row(Text(label), str(r.depth), str(r.waiting), age, str(r.pending))
    return table


def _optional(s: Snapshot, cfg: Config) -> Iterator[RenderableType]:
    yield _limits(s.limits)
    if s.breakers:
        table = _table("breakers not closed", "breaker", "state", "failures", "opened")
        for b in s.breakers:
            opened = int(b.get("opened_at") or 0)
            since = _age(s.at_ms - opened) + " ago" if opened else "-"
            table.add_row(Text(str(b["breaker"])), Text(str(b.get("state"))),
                          str(b.get("fails", 0)), since)  # fmt: skip
        yield table
    else:
        yield Text("breakers: all closed")
    if s.budgets:
        table = _table(f"budgets at {cfg.budgets.alert_at:.0%} of their cap or more", "cap",
                       "period", "used", "spent", "reserved", "cap")  # fmt: skip
        for b in s.budgets:
            cap = money(b["cap_usd"]) if b.get("cap_usd") else f"{b['cap_requests']} requests"
            table.add_row(Text(str(b["cap"])), Text(str(b["period"])), f"{_share(b):.0%}",
                          money(b["spent_usd"]), money(b["reserved_usd"]), cap)  # fmt: skip
        yield table
    else:
        yield Text(f"budgets: none at {cfg.budgets.alert_at:.0%} of its cap")
    if s.batches:
        table = _table("batches in flight", "batch", "state", "requests", "age")
        for b in s.batches:
            age = _age(s.at_ms - int(b.get("planned_ms") or s.at_ms))
            table.add_row(
                Text(str(b["batch"])), Text(str(b.get("state"))), str(b.get("count")), age
            )
        yield table
    dead = [c for c in s.consumers if c.state == "dead"]
    if dead:
        table = _table("dead consumers", "consumer", "pending (to be reclaimed)", "not seen for")
        for c in dead:
            table.add_row(Text(c.name), str(c.pending), _age(c.idle_ms))
        yield table


def _limits(models: list[ModelStatus]) -> RenderableType:
    if not models:
        return Text("rate limits: no model has limits in the config")
    table = _table("rate limits in use", "model", "requests/min", "input tokens/min",
                   "output tokens/min", "paused")  # fmt: skip
    for m in models:
        bucket = m.buckets[0]
        used = [f"{1 - max(0.0, level) / cap:.0%}" if cap else "-"
                for level, cap in zip(bucket.level, bucket.cap, strict=True)]  # fmt: skip
        table.add_row(Text(m.model), *used, f"{m.paused_s:.0f} s" if m.paused_s else "")
    return table


def _age(ms: int) -> str:
    seconds = max(0, ms) / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


async def once(redis: aioredis.Redis, cfg: Config, console: Console, where: str,
               window_s: float) -> None:  # fmt: skip
    """Print one frame."""
    at = clock.now_ms()
    frame = await snapshot(redis, cfg, RateMeter(int(window_s * 1000)), Scanned(), at)
    console.print(render(frame, cfg, where))


async def live(redis: aioredis.Redis, cfg: Config, console: Console, where: str,
               interval_s: float, window_s: float) -> None:  # fmt: skip
    """Refresh in place every interval_s until `q` (when stdin is a terminal) or Ctrl-C."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    meter, scanned = RateMeter(int(window_s * 1000)), Scanned()

    def on_key(key: str) -> None:
        if key in ("q", "Q"):
            stop.set()

    with (
        _keys_pressed(on_key),
        Live(Text("tokenq top: reading..."), console=console, auto_refresh=False) as view,
    ):
        while not stop.is_set():
            at = clock.now_ms()
            try:
                frame = await snapshot(redis, cfg, meter, scanned, at)
                view.update(render(frame, cfg, where), refresh=True)
            except (RedisError, OSError) as exc:  # a restart, a failover: keep trying
                view.update(Text(f"tokenq top: cannot read Redis ({where}): {exc}"), refresh=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


@contextlib.contextmanager
def _keys_pressed(on_key: Callable[[str], object]) -> Iterator[None]:
    """Hear single key presses on a terminal stdin (cbreak mode, no echo), and give the
    terminal back as it was, however the view ends."""
    stdin = sys.stdin
    if not stdin.isatty():
        yield
        return
    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()
    tty.setcbreak(fd)
    loop.add_reader(fd, lambda: on_key(stdin.read(1)))
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
