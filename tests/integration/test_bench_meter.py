"""The throughput bench's counting (bench/meter.py) against a real valkey-server of its own:
round trips, commands, the bench's own requests taken out, Valkey's CPU, a process's CPU and
peak RSS. Nothing here is timed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the bench's modules are scripts' siblings, not a package
from common import valkey  # noqa: E402
from meter import between, peak_rss_kib, process_cpu_s, valkey_stats  # noqa: E402

SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])"


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    """A fresh valkey-server of this test's own: no other client's requests in its counters."""
    with valkey(tmp_path / "valkey") as (server_url, _):
        yield server_url


@pytest.fixture
def server(url: str) -> Iterator[redis.Redis]:
    """A client of that server, connected before any snapshot is taken."""
    client = redis.Redis.from_url(url)
    client.ping()
    yield client
    client.close()


def test_round_trips_count_a_multi_a_pipeline_and_a_script_once(
    url: str, server: redis.Redis
) -> None:
    info = redis.Redis.from_url(url)  # snapshots on a connection of their own, as the bench
    info.ping()
    before = valkey_stats(info)
    server.set("a", 1)
    server.get("a")
    for key, transaction in (("b", True), ("c", False)):
        with server.pipeline(transaction=transaction) as pipe:
            pipe.set(key, 1)
            pipe.incr(key)
            pipe.get(key)
            pipe.execute()
    server.eval(SCRIPT, 2, "d", "e", "x")
    delta = between(before, valkey_stats(info))
    info.close()

    assert delta.round_trips == 5  # SET, GET, the MULTI block, the pipeline, the script
    # Every command counts, inside the MULTI block and the script too; the INFO that took the
    # first snapshot does not.
    assert delta.calls == {
        "set": 4, "get": 3, "incr": 1, "incrby": 2, "multi": 1, "exec": 1, "eval": 1
    }  # fmt: skip
    assert delta.commands == 13
    assert delta.connections == 0


def test_probes_reported_are_taken_out(server: redis.Redis) -> None:
    before = valkey_stats(server)
    server.xadd("s", {"f": "v"})
    for _ in range(3):
        server.xlen("s")
    after = valkey_stats(server)

    delta = between(before, after, {"xlen": 3})
    assert delta.round_trips == 1
    assert delta.calls == {"xadd": 1}
    with pytest.raises(ValueError, match="4 xlen probe"):
        between(before, after, {"xlen": 4})
    with pytest.raises(ValueError, match="1 xlen_typo probe"):
        between(before, after, {"xlen_typo": 1})


def test_new_connections_and_their_handshakes_are_counted(url: str, server: redis.Redis) -> None:
    before = valkey_stats(server)
    other = redis.Redis.from_url(url)
    other.set("a", 1)
    other.close()
    delta = between(before, valkey_stats(server))

    assert delta.connections == 1
    assert delta.calls["set"] == 1
    assert delta.round_trips >= 2  # the SET and at least one request of the handshake


def test_valkey_cpu_grows_with_the_work_it_does(server: redis.Redis) -> None:
    idle_before = valkey_stats(server)
    idle = between(idle_before, valkey_stats(server))
    busy_before = valkey_stats(server)
    server.eval("local n = 0 for i = 1, 30000000 do n = n + i end return 1", 0)
    busy = between(busy_before, valkey_stats(server))

    assert idle.cpu_s < 0.05
    assert busy.cpu_s > 0.1  # tens of millions of Lua additions: CPU seconds, not wall time


BURN = """
import sys, time
mib = int(sys.argv[1])
block = bytearray(mib * 1024 * 1024)  # zero pages: touch them so they count as resident
for i in range(0, len(block), 4096):
    block[i] = 1
start = time.process_time()
while time.process_time() - start < float(sys.argv[2]):
    pass
print("done", flush=True)
sys.stdin.readline()
"""


def run_burner(mib: int, cpu_s: float) -> tuple[float, int]:
    """A child that holds `mib` MiB and burns `cpu_s` of CPU: (its CPU, its peak RSS KiB)."""
    command = [sys.executable, "-c", BURN, str(mib), str(cpu_s)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None and p.stdin is not None
        try:
            assert p.stdout.readline().strip() == "done"
            return process_cpu_s(p.pid), peak_rss_kib(p.pid)
        finally:
            p.stdin.close()  # it exits when its stdin closes


def test_process_cpu_and_peak_rss_are_the_child_s_own() -> None:
    cpu_small, rss_small = run_burner(1, 0.0)
    cpu_big, rss_big = run_burner(64, 0.4)

    assert cpu_big >= 0.4  # process_time() it burnt is what /proc says it used
    assert cpu_big - cpu_small >= 0.35
    assert rss_big - rss_small >= 60 * 1024  # 64 MiB touched, in KiB
