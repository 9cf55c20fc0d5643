"""What the throughput bench counts: Valkey's own counters, and a process's CPU and memory.

Valkey's side comes from one `INFO stats cpu commandstats` before a timed window and one after
it (`valkey_stats`, `between`):

- **CPU**: `used_cpu_user + used_cpu_sys` of the server process (its main thread and its
  background threads: the append-only file's fsync included).
- **Commands**: every command `INFO commandstats` counted, the ones run inside a MULTI block
  and inside a Lua script included (each is work the server did), MULTI and EXEC included.
- **Round trips**: requests the server read off its connections, `total_reads_processed`.
  A client writes a MULTI...EXEC block, a pipeline or a script call (EVALSHA and the commands
  it runs) at once, and the server takes it in one read, so each counts once; a plain command
  counts once; a blocking XREADGROUP counts once however long it waits. A request larger than
  Valkey's 16 KiB read buffer would count more than once (none in the bench comes near). A
  new connection's handshake (HELLO, CLIENT SETINFO) counts too: a cold start is paid in
  round trips.

What the bench itself sends between the two snapshots is taken out again: the INFO that took
the first snapshot (counted by the second) and the read of the second, and the probes a
contender reports (e.g. the XLEN polls that tell it all jobs are done), each one command and
one read.

A process's CPU (user + system, all its threads) and peak RSS (VmHWM) are read from /proc, so
a worker is measured from outside, not by the bench's own process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis


@dataclass(frozen=True)
class ValkeyStats:
    """One snapshot of the counters a run is measured by."""

    cpu_s: float  # used_cpu_user + used_cpu_sys
    reads: int  # total_reads_processed
    connections: int  # total_connections_received
    calls: Mapping[str, int]  # command (lower case, "client|setinfo") -> calls


@dataclass(frozen=True)
class ValkeyDelta:
    """What Valkey did between two snapshots, the bench's own requests taken out."""

    cpu_s: float
    round_trips: int
    connections: int
    calls: Mapping[str, int]

    @property
    def commands(self) -> int:
        return sum(self.calls.values())


def valkey_stats(client: redis.Redis) -> ValkeyStats:
    """Take a snapshot with one INFO command (one round trip)."""
    info: dict[str, Any] = client.info("stats", "cpu", "commandstats")
    calls = {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in info.items()
        if key.startswith("cmdstat_")
    }
    return ValkeyStats(
        cpu_s=float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        reads=int(info["total_reads_processed"]),
        connections=int(info["total_connections_received"]),
        calls=calls,
    )


def between(
    before: ValkeyStats, after: ValkeyStats, probes: Mapping[str, int] | None = None
) -> ValkeyDelta:
    """The difference of two snapshots less the bench's own requests.

    `after` counts the INFO command that took `before` (a command is counted once it has run)
    and the read of its own INFO (a request is counted when it is read); `probes` are other
    requests the bench made in between, as command -> how many, each a round trip of its own.
    Raises ValueError if a probe was never counted (a probe misnamed would go unnoticed).
    """
    own = {"info": 1, **(probes or {})}
    calls = {name: after.calls.get(name, 0) - before.calls.get(name, 0) for name in after.calls}
    for name, n in own.items():
        if calls.get(name, 0) < n:
            raise ValueError(f"{n} {name} probe(s) reported, Valkey counted {calls.get(name, 0)}")
        calls[name] -= n
    return ValkeyDelta(
        cpu_s=after.cpu_s - before.cpu_s,
        round_trips=after.reads - before.reads - 1 - sum((probes or {}).values()),
        connections=after.connections - before.connections,
        calls={name: n for name, n in calls.items() if n},
    )


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used so far.

    Raises FileNotFoundError (ProcessLookupError on some kernels) when it has gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])
