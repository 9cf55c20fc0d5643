"""`tokenq worker --processes N`: N worker processes under one supervisor.

The supervisor forwards SIGTERM/SIGINT (each child drains its jobs) and restarts a child that
dies on its own (its jobs are reclaimed by the others meanwhile).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from types import FrameType

log = logging.getLogger("tokenq.fleet")


def worker_command(config: str, concurrency: int, log_level: str = "info") -> list[str]:
    """The command line of one worker process."""
    return [
        sys.executable, "-m", "worker", "--config", config, "--log-level", log_level,
        "worker", "--processes", "1", "--concurrency", str(concurrency),
    ]  # fmt: skip


def run_fleet(config: str, processes: int, concurrency: int, log_level: str = "info") -> int:
    """Run `processes` workers until a signal; returns the exit code."""
    command = worker_command(config, concurrency, log_level)
    children = {i: subprocess.Popen(command) for i in range(processes)}
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        _send(children.values(), signum)

    def pass_on(signum: int, _frame: FrameType | None) -> None:
        _send(children.values(), signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, pass_on)  # reload: each child re-reads the config file
    log.info("started %d worker processes: %s", processes, [c.pid for c in children.values()])
    while children:
        try:
            pid, status = os.wait()  # blocks until a child exits; signals are handled meanwhile
        except ChildProcessError:
            break
        i = next((k for k, c in children.items() if c.pid == pid), None)
        if i is None:
            continue
        if stopping:
            del children[i]
            continue
        log.error("worker pid %d exited (status %d); starting a new one", pid, status)
        time.sleep(1.0)  # a child that dies at start must not become a fork loop
        children[i] = subprocess.Popen(command)
    return 0


def _send(children: Iterable[subprocess.Popen[bytes]], signum: int) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signum)
