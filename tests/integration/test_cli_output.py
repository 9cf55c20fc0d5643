"""What the CLI prints, as an operator meets it: a closed pipe (`| head`), small caps,
`tokenq redis-cli` against the real server."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
import time
from collections.abc import Iterator

import pytest
import redis as syncredis
import redis.asyncio as aioredis

from tests.conftest import ConfigFactory
from tests.helpers import add
from worker.cli import main
from worker.contract import Keys, UsageEvent, to_fields

TOKENQ = (sys.executable, "-m", "worker")


async def run_into_closed_pipe(*args: str) -> tuple[int, str]:
    """Run tokenq with stdout a pipe nobody reads (its reader closed at once, as `| head`
    does when it has enough): (exit code, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            *TOKENQ, *args, stdout=write_end, stderr=asyncio.subprocess.PIPE
        )
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, err.decode()


# A command that streams (tail) and one whose output waits in stdout's buffer (budgets).
@pytest.mark.parametrize("command", [("tail", "--from-start"), ("budgets",)])
async def test_commands_that_print_stop_quietly_at_a_closed_pipe(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory, command: tuple[str, ...]
) -> None:
    _, path = make_config(**{"features.summarize.daily_usd": 0.5})
    event = UsageEvent(ts_ms=int(time.time() * 1000), job_id="j", feature="summarize")
    await add(redis, keys.usage, to_fields(event))
    code, err = await run_into_closed_pipe("--config", str(path), *command)
    assert code == 141, err  # as a tool killed by SIGPIPE
    assert "Traceback" not in err and "Exception ignored" not in err, err


def tokenq(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`tokenq ARGS` in this process (the SDK's import makes a new process cost seconds):
    (exit code, stdout)."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0), capsys.readouterr().out


@pytest.fixture
def plain(valkey_url: str) -> Iterator[syncredis.Redis]:
    client = syncredis.Redis.from_url(valkey_url, decode_responses=True)
    yield client
    client.close()


def test_budgets_prints_a_small_cap_with_its_digits(
    make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = make_config(**{"features.summarize.daily_usd": 0.003})
    code, out = tokenq(capsys, "--config", str(path), "budgets")
    assert code == 0
    assert "cap $0.003 (0% used, $0.003 left)" in out


def test_redis_cli_runs_one_command_and_prints_replies_as_redis_cli(
    plain: syncredis.Redis, keys: Keys, make_config: ConfigFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    _, path = make_config()
    cli = ("--config", str(path), "redis-cli")
    stream = keys.jobs("normal")
    plain.xadd(stream, {"feature": "summarize", "request": "{}"})
    assert tokenq(capsys, *cli, "XLEN", stream) == (0, "(integer) 1\n")
    code, out = tokenq(capsys, *cli, "XRANGE", stream, "-", "+")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("1) 1) ") and lines[1:] == [
        "   2) 1) feature", "      2) summarize", "      3) request", "      4) {}",
    ]  # fmt: skip
    assert tokenq(capsys, *cli, "GET", f"{keys.prefix}:nothing") == (0, "(nil)\n")
    code, out = tokenq(capsys, *cli, "NOSUCHCOMMAND")
    assert code == 1 and out.startswith("(error) ")


def test_redis_cli_reads_commands_from_standard_input(
    plain: syncredis.Redis, keys: Keys, make_config: ConfigFactory,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _, path = make_config()
    key = f"{keys.prefix}:greeting"
    script = f"SET {key} 'hello there'\nGET {key}\nSET broken 'quote\nquit\nGET {key}\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out = tokenq(capsys, "--config", str(path), "redis-cli")
    assert code == 0
    assert out.splitlines() == [
        "OK", "hello there", "(error) No closing quotation; quote with ' or \"",
    ]  # fmt: skip
    assert plain.get(key) == "hello there"


@pytest.mark.parametrize("command", [("budgets",), ("dead", "list"), ("report",), ("limits",)])
def test_a_command_whose_redis_is_down_says_so_without_a_traceback(
    make_config: ConfigFactory, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        _, path = make_config(**{"redis.url": f"redis://127.0.0.1:{port}"})
        with pytest.raises(SystemExit) as done:
            main(["--config", str(path), *command])
    code, err = done.value.code, capsys.readouterr().err
    assert code == 1
    assert "Redis did not answer" in err and f"redis.url` in {path}" in err, err
    assert "Traceback" not in err
