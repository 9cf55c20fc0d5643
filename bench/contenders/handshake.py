"""How a contender process and bench/throughput.py talk: lines on stdin and stdout.

The contender sets up (connects, builds its worker, warms what it must), prints `ready` and
waits for `go`; meanwhile the bench loads the backlog and takes its first snapshot of Valkey's
counters and of the contender's CPU. On `go` the contender starts its worker and runs until
all jobs are done, then prints one JSON line (its time and the probes it sent, see `done`) and
waits for `stop`; the bench takes its second snapshot first. After `stop` the contender shuts
its worker down, may check its work, prints a last JSON line and exits.

Standard library only: every contender imports it, each in its own venv. Reading stdin blocks
the event loop on purpose: nothing of the worker runs between `done` and the snapshot.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def wait_for(word: str) -> None:
    """Block until the bench sends `word`; exit if it went away (stdin closed)."""
    line = sys.stdin.readline()
    if not line:
        sys.exit(f"the bench closed stdin while {sys.argv[0]} waited for {word!r}")
    if line.strip() != word:
        sys.exit(f"{sys.argv[0]} expected {word!r} from the bench, got {line.strip()!r}")


def ready() -> None:
    """Say the contender is set up, then block until `go`."""
    print("ready", flush=True)
    wait_for("go")


def done(seconds: float, probes: dict[str, int], **extra: Any) -> None:
    """Report the timed run (`probes`: the commands sent only to watch progress, by name),
    then block until `stop`."""
    print(json.dumps({"seconds": seconds, "probes": probes, **extra}), flush=True)
    wait_for("stop")


def finished(**extra: Any) -> None:
    """The last line: what the contender checked after stopping (failures, calls)."""
    print(json.dumps(extra), flush=True)


def peer_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The command line every peer contender (arq, FastStream, redis-py streams) takes:
    `preload|work --url URL --jobs N [--concurrency C]`; each adds its own options."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("mode", choices=["preload", "work"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    return parser
