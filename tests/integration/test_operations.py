"""Operator commands against a real Valkey: `tokenq dead list/purge/trim`, `tokenq jobs remove`
and `tokenq consumers [prune]`, on entries tokenq wrote and on entries it did not."""

from __future__ import annotations

import asyncio
import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.client import NEVER_DECODE

from producers import Producer
from tests.conftest import ConfigFactory
from tests.helpers import (
    add,
    entries,
    eventually,
    pending_count,
    raw_entries,
    read_result,
    usage_events,
)
from worker.cli import main
from worker.contract import GROUP, Keys
from worker.operators import ConsumerRow, consumer_rows, prune_consumer

HELLO = json.dumps({"messages": [{"role": "user", "content": "Hello there"}]})


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


async def tokenq(path: Path, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr). In a thread, since each
    command runs an event loop of its own."""
    return await asyncio.to_thread(_cli, ["--config", str(path), "--log-level", "warning", *args])


class Terminal(io.StringIO):
    """Standard input that is a terminal, with the operator's answers typed in."""

    def isatty(self) -> bool:
        return True


def _dead(error_type: str, feature: str, tenant: str | None = None, n: int = 0) -> dict[str, str]:
    """A dead letter as the worker writes it."""
    fields = {
        "feature": feature,
        "request": HELLO,
        "id": f"{error_type}-{feature}-{n}",
        "error_type": error_type,
        "error": f"it was {error_type}",
        "attempts": "0",
        "priority": "normal",
        "entry_id": f"1-{n}",
        "job_id": f"{error_type}-{feature}-{n}",
    }
    return fields | ({"tenant": tenant} if tenant else {})


async def _dead_letters(redis: aioredis.Redis, keys: Keys) -> dict[str, str]:
    """Writes a mixed dead-letter stream (oldest first); returns a name for each id."""
    now = int(time.time() * 1000)
    names: dict[str, str] = {}
    for name, at, old in [
        ("3 days old", now - 3 * 86_400_000, _dead("too_large", "summarize", "acme", 1)),
        ("3 hours old", now - 3 * 3_600_000, _dead("malformed_job", "summarize", "acme", 2)),
    ]:
        names[str(await redis.xadd(keys.dead, cast("dict[Any, Any]", old), id=f"{at}-0"))] = name
    for name, fields in [
        ("unknown", _dead("unknown_feature", "nope", None, 3)),
        ("tenant beta", _dead("malformed_job", "classify_ticket", "beta", 4)),
    ]:
        names[await add(redis, keys.dead, fields)] = name
    # Not written by tokenq: a reply that landed here, bytes that are not UTF-8 in names and
    # values, a feature forging a line and repainting the screen, a value over max_entry_bytes.
    foreign: list[tuple[str, dict[Any, Any]]] = [
        ("a reply", {"result": '{"id":"x","status":"ok"}'}),
        ("bad bytes", {b"fe\xffature": b"\xfe\xff", "error_type": b"malformed\xc3", "error": "x"}),
        (
            "escapes",
            {
                "feature": "a\nFORGED 1-1 ok\x1b[2J",
                "error_type": "malformed_job",
                "error": "line one\nline two",
            },
        ),
        ("huge", _dead("too_large", "summarize", "acme", 5) | {"request": "x" * 300_000}),
    ]
    for name, raw in foreign:
        names[str(await redis.xadd(keys.dead, raw))] = name
    return names


async def test_dead_list_is_newest_first_filters_and_shows_entries_it_did_not_write(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    _, path = make_config(**{"queue.max_entry_bytes": 65536})
    names = await _dead_letters(redis, keys)
    order = list(names)

    async def listed(*args: str) -> list[str]:
        code, out, err = await tokenq(path, "dead", "list", "--json", *args)
        assert code == 0, err
        return [names[json.loads(line)["dead_id"]] for line in out.splitlines()]

    assert await listed() == [names[i] for i in reversed(order)]
    assert await listed("--oldest", "--limit", "2") == ["3 days old", "3 hours old"]
    assert await listed("--error-type", "malformed_job") == [
        "escapes",
        "tenant beta",
        "3 hours old",
    ]
    assert await listed("--error-type", "unknown_feature", "--error-type", "too_large") == [
        "huge",
        "unknown",
        "3 days old",
    ]
    assert await listed("--feature", "summarize", "--tenant", "acme", "--since", "1d") == [
        "huge",
        "3 hours old",
    ]
    assert await listed("--until", "2h") == ["3 hours old", "3 days old"]
    a_day_ago = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 86_400))
    assert await listed("--until", a_day_ago, "--oldest") == ["3 days old"]
    assert await listed("--feature", "nobody") == []

    code, out, _ = await tokenq(
        path, "dead", "list", "--json", "--error-type", "too_large", "--limit", "1"
    )
    huge = json.loads(out)
    assert huge["cut_bytes"] == {"request": 300_000} and len(huge["request"]) == 65536

    code, out, err = await tokenq(path, "dead", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 * len(names) - 1  # the foreign reply has no reason line
    assert "\x1b" not in out and not any(line.startswith("FORGED") for line in lines)
    assert any(r"feature=a\nFORGED 1-1 ok\x1b[2J" in line for line in lines)
    assert any(line.endswith(r"line one\nline two") for line in lines)
    assert any(r"malformed\xc3" in line for line in lines)
    assert any("(not a tokenq dead letter)" in line and "result=" in line for line in lines)

    code, out, err = await tokenq(path, "dead", "list", "--since", "yesterday")
    assert code == 2 and "neither a time ago" in err


async def test_dead_purge_asks_on_a_terminal_and_refuses_without_one(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = make_config()
    names = await _dead_letters(redis, keys)
    malformed = ("--error-type", "malformed_job")

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # a pipe, a cron job: nobody to ask
    code, out, err = await tokenq(path, "dead", "purge", *malformed)
    assert code == 2 and "would delete 3 dead letters" in err and "--yes" in err
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    code, out, _ = await tokenq(path, "dead", "purge", *malformed)
    assert code == 1 and "delete 3 dead letters" in out and "nothing removed" in out
    assert len(await raw_entries(redis, keys.dead)) == len(names)
    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    code, out, _ = await tokenq(path, "dead", "purge", *malformed, "--since", "2h")
    assert code == 0 and out.endswith("removed 2 dead letters\n")
    code, out, _ = await tokenq(path, "dead", "purge", *malformed, "--yes")
    assert code == 0 and "removed 1 dead letter\n" in out
    left = {names[i] for i, _ in await raw_entries(redis, keys.dead)}
    assert left == {"3 days old", "unknown", "a reply", "bad bytes", "huge"}

    code, _, err = await tokenq(path, "dead", "purge")
    assert code == 2 and "--all for every one" in err
    code, _, err = await tokenq(path, "dead", "purge", "--all", "--feature", "x")
    assert code == 2
    code, out, _ = await tokenq(path, "dead", "purge", "--all", "--yes")
    assert code == 0 and "removed 5 dead letters" in out
    assert await raw_entries(redis, keys.dead) == []


async def test_dead_trim_keeps_the_newest(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    _, path = make_config()
    ids = [await add(redis, keys.dead, _dead("too_large", "summarize", n=n)) for n in range(7)]
    code, out, _ = await tokenq(path, "dead", "trim", "--max", "3")
    assert code == 0 and out == "removed 4 dead letters; 3 kept\n"
    assert [i for i, _ in await entries(redis, keys.dead)] == ids[4:]
    code, _, err = await tokenq(path, "dead", "trim", "--max", "0")
    assert code == 2 and "at least 1" in err


async def _deliver(redis: aioredis.Redis, stream: str, consumer: str) -> None:
    """Read everything new on a stream as `consumer` (a worker that then dies)."""
    await redis.execute_command(  # type: ignore[no-untyped-call]  # no hints
        "XREADGROUP", "GROUP", GROUP, consumer, "STREAMS", stream, ">", **{NEVER_DECODE: []}
    )


async def _idle_over(redis: aioredis.Redis, keys: Keys, name: str, ms: int) -> bool:
    rows = await consumer_rows(redis, keys, ["high", "normal", "low"])
    return any(r.name == name.encode() and r.idle_ms >= ms for r in rows)


async def test_jobs_remove_takes_a_stuck_entry_out_and_tells_its_producer(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    _, path = make_config(**{"queue.visibility_timeout_s": 2})
    stream = keys.jobs("normal")
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    reply_to = f"replies-{keys.prefix}"
    poison = {
        "feature": "summarize",
        "request": b"{\xff}",
        "id": "stuck-1",
        "tenant": "acme",
        "reply_to": reply_to,
        "trace": "t-1",
    }
    entry_id = str(await redis.xadd(stream, poison))  # type: ignore[arg-type]
    await _deliver(redis, stream, "worker-a")

    # Its consumer is alive (it keeps reading, as a worker does) while the command starts,
    # however long that takes: a live worker may still finish the entry.
    async def alive() -> None:
        while True:
            await redis.xreadgroup(GROUP, "worker-a", {stream: ">"}, count=1)
            await asyncio.sleep(0.1)

    beating = asyncio.create_task(alive())
    code, _, err = await tokenq(path, "jobs", "remove", "stuck-1")
    beating.cancel()
    await asyncio.gather(beating, return_exceptions=True)
    assert code == 1 and "held by consumer worker-a" in err and "--force" in err
    await eventually(lambda: _idle_over(redis, keys, "worker-a", 2000), what="worker-a idle")

    waiting = asyncio.create_task(Producer(redis, keys.prefix).result("stuck-1", timeout_s=30))
    code, out, err = await tokenq(path, "jobs", "remove", "stuck-1")
    assert code == 0, err
    assert f"removed {entry_id} from {stream} (job 'stuck-1')" in out
    assert "error result written, replied on its reply_to" in out
    result = await waiting
    assert result.status == "error" and result.error is not None
    assert result.error.type == "removed" and "tokenq jobs remove" in result.error.message
    assert await entries(redis, stream) == []
    assert await pending_count(redis, stream) == 0

    [(_, dead)] = await raw_entries(redis, keys.dead)
    assert dead[b"request"] == b"{\xff}" and dead[b"trace"] == b"t-1"  # kept byte for byte
    assert dead[b"error_type"] == b"removed" and dead[b"entry_id"] == entry_id.encode()
    assert b"consumer worker-a held it" in dead[b"error"]
    [event] = await usage_events(redis, keys)
    assert (event.job_id, event.error_type, event.status) == ("stuck-1", "removed", "error")
    assert (event.feature, event.tenant, event.priority) == ("summarize", "acme", "normal")
    [(_, reply)] = await entries(redis, reply_to)
    assert json.loads(reply["result"])["error"]["type"] == "removed"

    code, _, err = await tokenq(path, "jobs", "remove", "stuck-1")
    assert code == 1 and "no entry 'stuck-1'" in err


async def test_jobs_remove_asks_which_when_an_id_names_several_entries(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    _, path = make_config()
    now = int(time.time() * 1000)
    same = f"{now}-0"
    for priority in ("high", "low"):  # one entry id on two streams, never delivered
        await redis.xadd(keys.jobs(priority), {"feature": "summarize", "request": HELLO}, id=same)

    code, _, err = await tokenq(path, "jobs", "remove", same)
    assert code == 1 and "names 2 entries" in err and "--priority" in err
    code, out, err = await tokenq(path, "jobs", "remove", same, "--priority", "low")
    assert code == 0, err
    assert "error result written" in out
    assert await entries(redis, keys.jobs("low")) == []
    assert len(await entries(redis, keys.jobs("high"))) == 1
    # Its default job id is the entry id, or low:<entry id> once the other owns the bare one.
    assert (await read_result(redis, keys, same)).error is not None

    code, _, err = await tokenq(path, "jobs", "remove", same, "--priority", "urgent")
    assert code == 2 and "not one of queue.priorities" in err


async def test_jobs_remove_keeps_a_result_the_job_already_has(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    _, path = make_config()
    await redis.set(keys.result("done-1"), '{"id":"done-1","status":"ok"}')
    await add(
        redis, keys.jobs("normal"), {"feature": "summarize", "request": HELLO, "id": "done-1"}
    )
    code, out, err = await tokenq(path, "jobs", "remove", "done-1")
    assert code == 0, err
    assert "kept the job's result" in out
    assert (await read_result(redis, keys, "done-1")).status == "ok"
    assert await usage_events(redis, keys) == []
    [(_, dead)] = await entries(redis, keys.dead)
    assert dead["error_type"] == "removed" and "already had a result" in dead["error"]


async def test_consumers_shows_dead_ones_and_prune_removes_those_holding_nothing(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    # A live worker reads every block_ms: 2 s is far beyond what the CLI takes to look.
    _, path = make_config(**{"queue.visibility_timeout_s": 2.0})
    stream = keys.jobs("normal")
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await add(redis, stream, {"feature": "summarize", "request": HELLO})
    await _deliver(redis, stream, "crashed")  # holds one job, then never comes back
    await redis.xgroup_createconsumer(stream, GROUP, "gone")  # holds nothing
    await eventually(lambda: _idle_over(redis, keys, "gone", 2000), what="idle consumers")
    await add(redis, stream, {"feature": "summarize", "request": HELLO})
    await _deliver(redis, stream, "busy")  # live: just read

    code, out, _ = await tokenq(path, "consumers")
    assert code == 0
    state = {line.split()[1]: line for line in out.splitlines()}
    assert state["busy"].endswith("live") and " 1  idle" in state["busy"]
    assert "dead: its pending jobs are reclaimed" in state["crashed"]
    assert "dead, nothing pending" in state["gone"]

    await _deliver(redis, stream, "busy")  # still reading
    code, out, _ = await tokenq(path, "consumers", "prune")
    assert code == 0
    assert f"removed gone on {stream}" in out
    assert f"left crashed on {stream}: 1 pending" in out
    assert f"left busy on {stream}: live" in out
    assert out.endswith("removed 1 consumer, left 2\n")
    names = {r.name for r in await consumer_rows(redis, keys, ["normal"])}
    assert names == {b"crashed", b"busy"}


async def test_prune_leaves_a_consumer_that_read_a_job_since_it_was_listed(
    redis: aioredis.Redis, keys: Keys
) -> None:
    stream = keys.jobs("normal")
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await redis.xgroup_createconsumer(stream, GROUP, "late")
    [row] = await consumer_rows(redis, keys, ["normal"])
    await add(redis, stream, {"feature": "summarize", "request": HELLO})
    await _deliver(redis, stream, "late")
    stale = ConsumerRow(row.priority, row.stream, row.name, 0, 10**9)  # as listed long ago
    assert not await prune_consumer(redis, stale, 0)
    assert await pending_count(redis, stream) == 1  # its job was not discarded with it


async def test_jobs_remove_keeps_a_bounded_copy_of_a_huge_entry(
    redis: aioredis.Redis, keys: Keys, make_config: ConfigFactory
) -> None:
    _, path = make_config(**{"queue.max_entry_bytes": 65536})
    wide = {f"x{n:05}": "1" for n in range(1500)}
    huge = {"feature": "summarize", "request": "x" * 100_000, "id": "huge-1", **wide}
    await add(redis, keys.jobs("normal"), huge)
    code, _, err = await tokenq(path, "jobs", "remove", "huge-1")
    assert code == 0, err
    [(_, dead)] = await raw_entries(redis, keys.dead)
    assert dead[b"request"] == b"x" * 1024 and dead[b"feature"] == b"summarize"
    assert len(dead) == 1000 + 6  # the job's own fields first, then the dead letter's
    assert b"keeps 1,000 of its fields, each value cut to 1,024 bytes" in dead[b"error"]
