"""Alerts out: what needs a person, sent to a webhook at most once per condition per period.

`tokenq alerts` (one process or several; started by `tokenq up` when alerts.webhook_url is set,
and listed in the Procfile) watches three things:

- **alert events** on the usage stream (`kind = alert`): a spend cap reaching
  budgets.alert_at, the worker's alert for a spend-cap 429, and any alert a later version
  writes; each is sent as its `message` says, whatever its `error_type`;
- **circuit breakers** whose fleet state (the `<prefix>:breaker:*` hashes) is open, looked
  for every 10 seconds (with SCAN);
- **dead-letter bursts**: alerts.dead_letter_burst dead letters or more within
  alerts.dead_letter_window_s.

The rule: a condition (one alert event's cap and period, one breaker, the burst) is sent at
most once per alerts.period_s by the whole fleet. Before sending, a process takes the
condition's key with `SET <prefix>:alert:<digest> 1 NX EX period_s`; only the process that
set it sends, so two alert processes never both do. A send that fails gives the key back and
is tried again on the next tick, by whichever process gets the key then.

The message is Slack-compatible JSON, `{"text": "..."}`. Without a webhook_url alerts are
only logged. Entries of the usage stream that are not usage events (written by someone else)
are skipped; alert events older than period_s (a process started after a long stop) are not
sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from worker import clock
from worker.breakers import Breakers
from worker.config import Config
from worker.contract import Keys, UsageEvent, as_text, entry_ms
from worker.embedded import connect, redis_url
from worker.usage import event_of

log = logging.getLogger("tokenq.alerts")

TICK_MS = 2000  # the usage stream is read blocking; dead letters every tick
BREAKERS_EVERY_MS = 10_000
SEND_TIMEOUT_S = 10.0
MAX_WAITING = 100  # alerts whose send failed, kept for the next tick

Post = Callable[[str, dict[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class Alert:
    """One condition and what to say about it."""

    condition: str  # what makes two alerts the same one (hashed into the key)
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.condition.encode()).hexdigest()[:24]


def event_alert(event: UsageEvent, fleet: str) -> Alert:
    """An alert event of the usage stream as an alert (its message is the sentence)."""
    who = f"feature {event.feature or '-'}" + (f", tenant {event.tenant}" if event.tenant else "")
    kind = event.error_type or "alert"
    condition = f"event\0{kind}\0{event.feature}\0{event.tenant}\0{event.message}"
    return Alert(condition, f"[{fleet}] {kind}: {event.message or '(no message)'} ({who})")


def breaker_alert(row: dict[str, Any], fleet: str) -> Alert | None:
    """An open breaker's alert, or None for a closed or half-open one."""
    if row.get("state") != "open":
        return None
    name = str(row["breaker"])
    opened_ms = int(row.get("opened_at") or 0)
    since = time.strftime("%H:%M:%S UTC", time.gmtime(opened_ms / 1000)) if opened_ms else "?"
    text = (
        f"[{fleet}] circuit breaker {name} opened at {since} after {row.get('fails', '?')} "
        "API failures in a row; its jobs follow their feature's breaker_policy "
        "(`tokenq budgets` shows the breakers)"
    )
    return Alert(f"breaker\0{name}", text)


def burst_alert(error_types: list[str], cfg: Config, fleet: str) -> Alert | None:
    """The dead-letter burst alert when the window holds enough dead letters."""
    if len(error_types) < cfg.alerts.dead_letter_burst:
        return None
    kinds = ", ".join(f"{k} {n}" for k, n in Counter(error_types).most_common())
    text = (
        f"[{fleet}] {len(error_types)} dead letters in the last "
        f"{cfg.alerts.dead_letter_window_s:g} s ({kinds}); `tokenq dead list` shows why"
    )
    return Alert("dead-letter burst", text)


async def post_json(url: str, body: dict[str, str]) -> None:
    """POST body as JSON; raises aiohttp.ClientError or TimeoutError unless a 2xx comes back."""
    timeout = aiohttp.ClientTimeout(total=SEND_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, json=body) as reply,
    ):
        reply.raise_for_status()


class Alerter:
    """Watches the fleet's streams and hashes and sends each condition once per period.

    `redis` should not decode replies (embedded.connect(decode=False)): entries of the
    streams may hold bytes that are not UTF-8, and each is decoded on its own here.
    """

    def __init__(
        self, redis: aioredis.Redis, cfg: Config, *, post: Post = post_json,
        clock_ms: Callable[[], int] = clock.now_ms, tick_ms: int = TICK_MS,
    ) -> None:  # fmt: skip
        self.redis = redis
        self.cfg = cfg
        self.keys = Keys(cfg.prefix)
        self.post = post
        self.clock_ms = clock_ms
        self.tick_ms = tick_ms
        self.fleet = cfg.prefix
        self.breakers = Breakers(redis, self.keys, cfg.breakers, 0)
        self.waiting: dict[str, Alert] = {}  # sends that failed, by digest
        self.breakers_at: int | None = None
        self.sent = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until stop is set. One bad entry or a failed send never ends the loop; a
        Redis error is logged and the tick tried again."""
        last = await self._start_at()
        while not stop.is_set():
            try:
                last = await self.tick(last)
            except (aioredis.RedisError, OSError) as exc:
                log.warning("alerts: Redis error, trying again: %s", exc)
                await _wait(stop, self.tick_ms / 1000)

    async def _start_at(self) -> str:
        """Where the usage stream is read from: where a process left off (within the last
        period), else its newest entry."""
        oldest = f"{max(0, self.clock_ms() - self.cfg.alerts.period_s * 1000)}-0"
        cursor = await self.redis.get(self.keys.alerts_cursor)
        if cursor is not None:
            return max(as_text(cursor), oldest, key=_entry_key)
        newest: Any = await self.redis.xrevrange(self.keys.usage, count=1)
        return as_text(newest[0][0]) if newest else oldest

    async def tick(self, last: str) -> str:
        """One round: new usage entries (blocking up to tick_ms), breakers, the dead-letter
        window, and sends that failed before. Returns where the usage stream was read to."""
        again = list(self.waiting.values())  # failed on an earlier tick: tried again last
        usage: dict[Any, Any] = {self.keys.usage: last}  # redis-py's stubs want a union
        reply: Any = await self.redis.xread(usage, count=500, block=self.tick_ms)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last = as_text(entry_id)
                alert = self._from_entry(last, fields)
                if alert is not None:
                    await self.notify(alert)
            await self.redis.set(self.keys.alerts_cursor, last, ex=self.cfg.alerts.period_s)
        now = self.clock_ms()
        if self.breakers_at is None or now - self.breakers_at >= BREAKERS_EVERY_MS:
            self.breakers_at = now  # found with SCAN: not every tick on a big keyspace
            for row in await self.breakers.status():
                alert = breaker_alert(row, self.fleet)
                if alert is not None:
                    await self.notify(alert)
        burst = burst_alert(await self._recent_dead(), self.cfg, self.fleet)
        if burst is not None:
            await self.notify(burst)
        for alert in again:
            await self.notify(alert)
        return last

    def _from_entry(self, entry_id: str, fields: Any) -> Alert | None:
        event = event_of(fields)  # None: not a usage event (someone else's entry)
        stale = entry_ms(entry_id) < self.clock_ms() - self.cfg.alerts.period_s * 1000
        if event is None or event.kind != "alert" or stale:
            return None
        return event_alert(event, self.fleet)

    async def _recent_dead(self) -> list[str]:
        """The error types of the dead letters of the burst window (at most the burst)."""
        since = self.clock_ms() - int(self.cfg.alerts.dead_letter_window_s * 1000)
        entries: Any = await self.redis.xrange(
            self.keys.dead, min=f"{since}-0", count=self.cfg.alerts.dead_letter_burst
        )
        return [_text(dict(fields or {}).get(b"error_type", b"?")) for _, fields in entries]

    async def notify(self, alert: Alert) -> bool:
        """Send alert unless the fleet sent this condition within the period; True if this
        process sent it now."""
        key = self.keys.alert(alert.digest)
        if not await self.redis.set(key, self.clock_ms(), nx=True, ex=self.cfg.alerts.period_s):
            self.waiting.pop(alert.digest, None)
            return False
        url = self.cfg.alerts.webhook_url
        try:
            if url:
                await self.post(url, {"text": alert.text})
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Give the condition back so that the next tick (here or elsewhere) sends it.
            await self.redis.delete(key)
            if len(self.waiting) < MAX_WAITING:
                self.waiting[alert.digest] = alert
            log.warning("alert not delivered to alerts.webhook_url (%s); will retry: %s",
                        exc, alert.text)  # fmt: skip
            return False
        self.waiting.pop(alert.digest, None)
        self.sent += 1
        log.warning("alert%s: %s", " sent" if url else "", alert.text)
        return True


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def serve(cfg: Config) -> None:
    """`tokenq alerts`: watch until SIGTERM or SIGINT (finishing the tick under way, so a
    condition taken is also sent)."""
    redis = connect(redis_url(cfg), block_s=TICK_MS / 1000, decode=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = cfg.alerts.webhook_url or "the log only (alerts.webhook_url is empty)"
    log.warning("tokenq alerts: watching prefix %r; alerts go to %s", cfg.prefix, where)
    try:
        await Alerter(redis, cfg).run(stop)
    finally:
        await redis.aclose()
