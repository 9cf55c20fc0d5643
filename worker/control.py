"""Reloading config.toml in running workers without dropping a job.

SIGHUP reloads one process (a `tokenq worker --processes N` supervisor passes it on to its
children); `tokenq reload` reaches every worker of the fleet, on every machine, through the
Redis pub/sub channel `<prefix>:control`. Each worker re-reads its own config file. What can
change while running: limits, features, tiers, models and prices, the router. The rest
(`prefix`, `[redis]`, `[anthropic]`, `[queue]`, `[worker]`) is kept until a restart, and the
worker says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.config import Config, load_config
from worker.contract import Keys

log = logging.getLogger("tokenq.control")
RELOAD = "reload"
RESTART_ONLY = ("prefix", "redis", "anthropic", "queue", "worker")


def reloaded(running: Config, path: str) -> Config:
    """The config in `path` with the restart-only sections of `running` kept.

    Raises ConfigError when the file is not valid (the running config stays in force).
    """
    fresh = load_config(path)
    kept = [name for name in RESTART_ONLY if getattr(fresh, name) != getattr(running, name)]
    if kept:
        log.warning("reload: %s changed in %s; that takes effect on restart",
                    ", ".join(kept), path)  # fmt: skip
    return msgspec.structs.replace(fresh, **{name: getattr(running, name) for name in RESTART_ONLY})


async def publish_reload(redis: aioredis.Redis, keys: Keys) -> int:
    """Ask every worker to reload; returns how many were listening."""
    return int(await redis.publish(keys.control, RELOAD))


async def listen(redis: aioredis.Redis, keys: Keys, on_reload: Callable[[], object]) -> None:
    """Call on_reload for each `reload` on the control channel, until cancelled."""
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.control)
            async for message in pubsub.listen():
                if message.get("data") == RELOAD:
                    on_reload()
        except (RedisError, OSError) as exc:
            log.warning("control channel lost (%s); subscribing again in 1 s", exc)
            await asyncio.sleep(1.0)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py has no hint
