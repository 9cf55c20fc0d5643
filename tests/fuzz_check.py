"""Running a fuzz corpus (tests/fuzz_corpus.py) against a fleet of worker processes, and the
invariants that must hold once it has run. Shared by tests/integration/test_fuzz.py and
bench/fuzz.py.

A run: `prepare` (before the fleet starts: the consumer groups, the keys of other types the
corpus names as reply_to, and two jobs put off through the deferred set, due a few seconds
later), then `drive` (the jobs whose ids the corpus reuses, until they have results; then the
corpus; then wait until the job streams and the deferred set are empty, or the deadline), then
`check`. Everything is read back as bytes: entries may hold any bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from tests.fuzz_corpus import Case, Corpus
from worker.contract import GROUP, Keys, UsageEvent
from worker.queue import Delivery, Queue

Raw = dict[bytes, bytes]
# What a fuzz run changes in config.toml so that it is short: quick batch windows, a lease that
# lapses within the run if no batcher renews it, a visibility timeout that lets a crashed
# worker's jobs be reclaimed (and so be seen) within the run.
RUN_SETTINGS: dict[str, object] = {
    "queue.visibility_timeout_s": 3.0,
    "batch.flush_interval_s": 0.5,
    "batch.poll_s": 0.2,
    "batch.lease_s": 3.0,
    "worker.grace_s": 3.0,
}


def raw_client(url: str) -> aioredis.Redis:
    """A client whose replies stay bytes."""
    return aioredis.Redis.from_url(url, decode_responses=False, socket_timeout=30)


@contextmanager
def fleet(
    config: Path, *, processes: int, concurrency: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`tokenq worker --processes N` (a supervisor and its workers) in a process group of its
    own, its output in `log`. On the way out: SIGTERM (each worker drains), then SIGKILL to
    the group after 20 s."""
    options = ["--config", str(config), "--log-level", "warning", "worker"]
    sizes = ["--processes", str(processes), "--concurrency", str(concurrency)]
    command = [sys.executable, "-m", "worker", *options, *sizes]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        proc.terminate()  # the supervisor passes it on to its workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a worker the supervisor left behind


def restarts(log: Path) -> list[str]:
    """The supervisor's lines about a worker process that died and was started again."""
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if "exited (status" in line and "starting a new one" in line]


def tracebacks(log: Path) -> int:
    return log.read_text(errors="replace").count("Traceback (most recent call last)")


@dataclass(frozen=True)
class Sent:
    """A case and the entry id XADD gave it."""

    case: Case
    entry_id: str

    def __str__(self) -> str:
        return f"{self.case.name} [{self.case.priority} {self.entry_id}]"


@dataclass
class Run:
    """What drive() did, for check()."""

    corpus: Corpus
    sent: list[Sent]
    originals: dict[str, bytes | None]  # the results the reused ids had before the corpus
    types_before: dict[bytes, bytes]  # every key under the prefix, and the foreign ones
    settled: bool
    seconds: float  # from the first original to the end of the wait
    originals_s: float  # until the originals had their results (the fleet started meanwhile)


async def prepare(raw: aioredis.Redis, keys: Keys, corpus: Corpus, priorities: list[str]) -> None:
    """Before the fleet starts: the consumer groups, the foreign keys, and the deferred jobs
    read by a consumer of ours and put off through the deferred set (due in 3 s), as a
    budget or breaker policy `defer` does."""
    for priority in priorities:
        with suppress(aioredis.ResponseError):  # BUSYGROUP: it exists
            await raw.xgroup_create(keys.jobs(priority), GROUP, id="0", mkstream=True)
    async with raw.pipeline(transaction=False) as pipe:
        for name, kind in corpus.foreign.items():
            if kind == "string":
                pipe.set(name, "x")
            elif kind == "hash":
                pipe.hset(name, "f", "x")
            elif kind == "list":
                pipe.rpush(name, "x")
            elif kind == "set":
                pipe.sadd(name, "x")
            else:
                pipe.zadd(name, {"x": 1})
        await pipe.execute()
    queue = Queue(raw, keys, priorities, "fuzz-defer", visibility_ms=60_000)
    stream = keys.jobs("normal")
    for case in corpus.deferred:
        await raw.xadd(stream, case.fields)  # type: ignore[arg-type]  # bytes are fine
    reply: Any = await raw.xreadgroup(GROUP, "fuzz-defer", {stream: ">"})
    until = int(time.time() * 1000) + 3000
    for _, rows in reply:
        for entry_id, fields in rows:
            text = {k.decode(): v.decode() for k, v in fields.items()}
            d = Delivery("normal", stream, entry_id.decode(), text)
            await queue.defer(d, d.job_id, until)
    await raw.xgroup_delconsumer(stream, GROUP, "fuzz-defer")


async def drive(raw: aioredis.Redis, keys: Keys, corpus: Corpus, *, settle_s: float) -> Run:
    """The originals until they have results (60 s at most: the fleet is starting meanwhile),
    then the corpus; then wait until nothing is left in the job streams or the deferred set,
    or settle_s has passed."""
    started = time.monotonic()
    sent = await _send(raw, keys, corpus.originals)
    ids = [c.job_id for c in corpus.originals if c.job_id]
    await _until(lambda: _all_exist(raw, [keys.result(i) for i in ids]), 60.0)
    originals_s = time.monotonic() - started
    originals = {i: await _get(raw, keys.result(i)) for i in ids}
    types_before = await _types(raw, keys, corpus)
    sent += await _send(raw, keys, corpus.cases)
    settled = await _until(lambda: _empty(raw, keys, corpus), settle_s)
    seconds = time.monotonic() - started
    return Run(corpus, sent, originals, types_before, settled, seconds, originals_s)


async def _send(raw: aioredis.Redis, keys: Keys, cases: list[Case]) -> list[Sent]:
    out: list[Sent] = []
    for n in range(0, len(cases), 100):
        chunk = cases[n : n + 100]
        async with raw.pipeline(transaction=False) as pipe:
            for case in chunk:
                pipe.xadd(keys.jobs(case.priority), case.fields)  # type: ignore[arg-type]
            ids: list[Any] = await pipe.execute()
        out += [Sent(c, i.decode()) for c, i in zip(chunk, ids, strict=True)]
    return out


async def _until(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)  # the condition is in Redis, written by other processes
    return False


async def _get(raw: aioredis.Redis, key: str) -> bytes | None:
    value: Any = await raw.get(key)
    return value if value is None else bytes(value)


async def _all_exist(raw: aioredis.Redis, names: list[str]) -> bool:
    return int(await raw.exists(*names)) == len(names)


async def _empty(raw: aioredis.Redis, keys: Keys, corpus: Corpus) -> bool:
    streams = {keys.jobs(c.priority) for c in corpus.every}
    lengths = [int(await raw.xlen(s)) for s in streams]
    return not any(lengths) and not await raw.exists(keys.deferred)


async def _types(raw: aioredis.Redis, keys: Keys, corpus: Corpus) -> dict[bytes, bytes]:
    names = [k async for k in raw.scan_iter(match=f"{keys.prefix}:*", count=1000)]
    names += [n.encode() for n in corpus.foreign]
    async with raw.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.type(name)
        kinds: list[Any] = await pipe.execute()
    return dict(zip(names, kinds, strict=True))


@dataclass
class Invariant:
    name: str
    failures: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return not self.failures


@dataclass
class Report:
    invariants: list[Invariant]
    dead_letters: Counter[str]  # error_type -> dead letters of it
    expected: Counter[str]  # error_type -> bad entries expecting it
    restarts: list[str]
    tracebacks: int
    run: Run

    @property
    def held(self) -> bool:
        return all(i.held for i in self.invariants)

    def render(self, most: int = 12) -> str:
        """The invariants (up to `most` failures each), counts per error_type, restarts last."""
        r = self.run
        lines = [
            f"corpus seed {r.corpus.seed}: {len(r.sent)} entries; the first "
            f"{len(r.corpus.originals)} answered after {r.originals_s:.1f} s, the streams "
            f"{'empty' if r.settled else 'NOT empty'} after {r.seconds:.1f} s"
        ]
        for inv in self.invariants:
            lines.append(
                f"{'PASS' if inv.held else 'FAIL'}  {inv.name}"
                + ("" if inv.held else f" ({len(inv.failures)})")
            )
            lines += [f"        {_line(f)}" for f in inv.failures[:most]]
            if len(inv.failures) > most:
                lines.append(f"        ... and {len(inv.failures) - most} more")
        lines.append("dead letters per error_type (expected):")
        for kind in sorted(set(self.dead_letters) | set(self.expected)):
            lines.append(f"  {kind:<20} {self.dead_letters[kind]:>5} ({self.expected[kind]})")
        lines.append(f"tracebacks in the workers' log: {self.tracebacks}")
        lines.append(f"worker restarts: {len(self.restarts)}")
        lines += [f"  {_line(x)}" for x in self.restarts[:most]]
        return "\n".join(lines)


def _line(text: str) -> str:
    """One line of a report: control characters escaped, at most 300 characters."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return shown if len(shown) <= 300 else shown[:300] + "..."


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "backslashreplace")


async def _entries(raw: aioredis.Redis, key: str) -> list[tuple[str, Raw]]:
    try:
        rows: Any = await raw.xrange(key)
    except aioredis.ResponseError as exc:  # not a stream: reported by the key-type check
        return [("", {b"?": str(exc).encode()})]
    return [(i.decode(), dict(f)) for i, f in rows]


async def _result(raw: aioredis.Redis, keys: Keys, job_id: str) -> dict[str, Any] | str | None:
    """The job's result as JSON, a sentence when it is not JSON in a string key, or None."""
    try:
        value = await _get(raw, keys.result(job_id))
    except aioredis.ResponseError:
        return f"tokenq:result:{job_id} is not a string"
    if value is None:
        return None
    try:
        decoded: dict[str, Any] = json.loads(value)
    except ValueError:
        return f"result of {job_id!r} is not JSON: {_text(value)[:80]}"
    return decoded


async def check(raw: aioredis.Redis, keys: Keys, run: Run, *, log: Path, lease_s: float) -> Report:
    """Read everything back and check the invariants (lease_s: config batch.lease_s)."""
    dead = await _entries(raw, keys.dead)
    usage = await _entries(raw, keys.usage)
    by_entry: dict[tuple[str, str], list[Raw]] = {}
    for _, f in dead:
        at = (_text(f.get(b"priority")), _text(f.get(b"entry_id")))
        by_entry.setdefault(at, []).append(f)
    died = restarts(log)
    bad = [s for s in run.sent if s.case.expect != "ok"]
    good = [s for s in run.sent if s.case.expect == "ok"] + [
        Sent(c, "")
        for c in run.corpus.deferred  # their entry ids changed when they came back
    ]
    invariants = [
        _dead_letters(bad, by_entry, dead, run),
        await _error_results(raw, keys, bad, by_entry),
        await _ok_results(raw, keys, good, bad, dead, run),
        _usage_events(good, bad, usage),
        await _nothing_left(raw, keys, run),
        Invariant("no worker process restarted", died),
        await _lease(raw, keys, lease_s),
        await _key_types(raw, keys, run),
        _own_streams(dead, usage),
        await _deferred(raw, keys, run),
    ]
    counts = Counter(_text(f.get(b"error_type")) for _, f in dead)
    expected = Counter(s.case.expect for s in bad)
    return Report(invariants, counts, expected, died, tracebacks(log), run)


def _dead_letters(
    bad: list[Sent], by_entry: dict[tuple[str, str], list[Raw]], dead: list[Any], run: Run
) -> Invariant:
    inv = Invariant("every bad entry has exactly one dead letter, of its error_type, with a reason")
    for s in bad:
        letters = by_entry.get((s.case.priority, s.entry_id), [])
        if len(letters) != 1:
            inv.failures.append(f"{s}: {len(letters)} dead letters, expected one {s.case.expect}")
            continue
        kind, error = _text(letters[0].get(b"error_type")), _text(letters[0].get(b"error"))
        if kind != s.case.expect:
            inv.failures.append(
                f"{s}: {kind or 'no error_type'}, expected {s.case.expect}: {error[:160]}"
            )
        elif not error.strip():
            inv.failures.append(f"{s}: no reason in `error`")
        elif s.case.mentions and s.case.mentions not in error:
            inv.failures.append(f"{s}: the reason does not name `{s.case.mentions}`: {error}")
    ours = {(s.case.priority, s.entry_id) for s in run.sent}
    wanted = {c.job_id for c in run.corpus.deferred}
    for dead_id, f in dead:
        at = (_text(f.get(b"priority")), _text(f.get(b"entry_id")))
        if at not in ours and _text(f.get(b"job_id")) not in wanted:
            names = ", ".join(sorted(_text(k) for k in f))[:120]
            inv.failures.append(
                f"dead letter {dead_id} is for no entry of the corpus (fields {names})"
            )
    return inv


async def _error_results(
    raw: aioredis.Redis, keys: Keys, bad: list[Sent], by_entry: dict[tuple[str, str], list[Raw]]
) -> Invariant:
    inv = Invariant(
        "every bad entry has an error result of its error_type (duplicate_id: on "
        "its reply_to, the first job's result untouched)"
    )
    for s in bad:
        if s.case.expect == "duplicate_id":
            problem = await _reply_problem(raw, s.case, "error", "duplicate_id")
            if problem:
                inv.failures.append(f"{s}: {problem}")
            continue
        letters = by_entry.get((s.case.priority, s.entry_id), [])
        named = [_text(letters[0].get(b"job_id"))] if len(letters) == 1 else []
        # The dead letter names the job id; without one (or with a cut one: a huge id), the
        # producer's id, else the default ids (which may be another stream's job's).
        given = [s.case.job_id] if s.case.job_id else _default_ids(s)
        where = [*named, *given]
        found = [r for r in [await _result(raw, keys, i) for i in where] if r is not None]
        if not found:
            inv.failures.append(f"{s}: no result under {', '.join(map(repr, where))}")
            continue
        result = found[0]
        error = result.get("error") if isinstance(result, dict) else None
        if not isinstance(result, dict) or result.get("status") != "error":
            inv.failures.append(f"{s}: result is not an error: {str(result)[:160]}")
        elif not isinstance(error, dict) or error.get("type") != s.case.expect:
            inv.failures.append(f"{s}: error result of type {error}, expected {s.case.expect}")
    return inv


ANSWERED = "answered"  # a status for _reply_problem: ok, or check_failed with the answer


def answered(result: object) -> bool:
    """Whether a result is a good job's: ok, or an answer that failed its feature's check
    (check_failed: the job was answered, with an error status; JSON-checked features)."""
    if not isinstance(result, dict):
        return False
    error = (result.get("error") or {}).get("type")
    return result.get("status") == "ok" or (error == "check_failed" and bool(result.get("text")))


async def _reply_problem(raw: aioredis.Redis, case: Case, status: str, kind: str | None) -> str:
    """Why the case's reply stream does not hold exactly one reply of this status (and error
    type; ANSWERED: an answer); "" when it does."""
    assert case.reply_to is not None
    replies = await _entries(raw, case.reply_to)
    if len(replies) != 1:
        return f"{len(replies)} replies on {case.reply_to}, expected one"
    try:
        result = json.loads(replies[0][1].get(b"result", b""))
    except ValueError:
        return f"the reply on {case.reply_to} is not a result: {replies[0][1]!r:.160}"
    error = (result.get("error") or {}).get("type")
    if status == ANSWERED:
        return "" if answered(result) else f"the reply is {result.get('status')} ({error})"
    if result.get("status") != status or (kind is not None and error != kind):
        return f"the reply is {result.get('status')} ({error}), expected {status} ({kind})"
    return ""


async def _ok_results(
    raw: aioredis.Redis, keys: Keys, good: list[Sent], bad: list[Sent], dead: list[Any], run: Run
) -> Invariant:
    inv = Invariant("every good job has exactly one answered result (ok, or check_failed)")
    theirs = {(s.case.priority, s.entry_id) for s in bad}  # a reused id's duplicate_id letter
    dead_jobs = {
        _text(f.get(b"job_id")): f
        for _, f in dead
        if (_text(f.get(b"priority")), _text(f.get(b"entry_id"))) not in theirs
    }
    for job_id, sents in _by_job(good).items():
        s = sents[0]
        where = [job_id] if not job_id.startswith("\0") else _default_ids(s)
        found = [r for r in [await _result(raw, keys, i) for i in where] if r is not None]
        letter = next((dead_jobs[i] for i in where if i in dead_jobs), None)
        if letter is not None:
            inv.failures.append(
                f"{s}: dead-lettered as {_text(letter.get(b'error_type'))}: "
                f"{_text(letter.get(b'error'))[:160]}"
            )
        elif not found:
            inv.failures.append(f"{s}: no result")
        elif not answered(found[0]):
            inv.failures.append(f"{s}: result is not an answer: {str(found[0])[:160]}")
        elif (
            job_id in run.originals
            and await _get(raw, keys.result(job_id)) != run.originals[job_id]
        ):
            inv.failures.append(f"{s}: its result changed after the corpus reused its id")
        for x in sents:
            problem = await _reply_problem(raw, x.case, ANSWERED, None) if x.case.reply_to else ""
            if problem:
                inv.failures.append(f"{x}: {problem}")
    return inv


def _default_ids(s: Sent) -> list[str]:
    return [s.entry_id, f"{s.case.priority}:{s.entry_id}"]


def _by_job(good: list[Sent]) -> dict[str, list[Sent]]:
    """Good entries by job id; one without an id stands alone (key: NUL + its entry)."""
    out: dict[str, list[Sent]] = {}
    for s in good:
        key = s.case.job_id or f"\0{s.case.priority}:{s.entry_id}"
        out.setdefault(key, []).append(s)
    return out


def _usage_events(good: list[Sent], bad: list[Sent], usage: list[tuple[str, Raw]]) -> Invariant:
    inv = Invariant("every good job has exactly one usage event (a repeated id: none more)")
    reused = Counter((s.case.job_id, s.case.expect) for s in bad if s.case.job_id)
    events: dict[str, list[Raw]] = {}
    for _, f in usage:
        if _text(f.get(b"kind")) in ("job", ""):  # not an alert, nor a lost call's orphan
            events.setdefault(_text(f.get(b"job_id")), []).append(f)
    for job_id, sents in _by_job(good).items():
        s = sents[0]
        if job_id.startswith("\0"):
            mine = [
                f
                for i in _default_ids(s)
                for f in events.get(i, [])
                if _text(f.get(b"priority")) == s.case.priority
            ]
        else:
            mine = events.get(job_id, [])
        answers = [f for f in mine if _text(f.get(b"error_type")) in ("", "check_failed")]
        oks = len(answers)
        errors = Counter((job_id, _text(f.get(b"error_type"))) for f in mine if f not in answers)
        # A bad entry reusing the id (duplicate_id) has an error event of its own.
        if oks != 1 or errors - reused:
            kinds = [f"{_text(f.get(b'status'))} {_text(f.get(b'error_type'))}" for f in mine]
            inv.failures.append(f"{s}: usage events {kinds or 'none'}, expected one ok")
    return inv


async def _nothing_left(raw: aioredis.Redis, keys: Keys, run: Run) -> Invariant:
    inv = Invariant("no entry is pending or left in a job stream")
    names = {(s.case.priority, s.entry_id): str(s) for s in run.sent}
    for priority in sorted({s.case.priority for s in run.sent}):
        stream = keys.jobs(priority)
        summary: Any = await raw.xpending(stream, GROUP)
        if summary["pending"]:
            inv.failures.append(f"{stream}: {summary['pending']} pending")
        for entry_id, _ in await _entries(raw, stream):
            inv.failures.append(f"left in {stream}: {names.get((priority, entry_id), entry_id)}")
    return inv


async def _lease(raw: aioredis.Redis, keys: Keys, lease_s: float) -> Invariant:
    """Held now, or again within two lease periods (a takeover between holders)."""

    async def held() -> bool:
        try:
            return await _get(raw, keys.batcher_lease) is not None
        except aioredis.ResponseError:  # WRONGTYPE: a reply turned it into a stream
            return False

    ok = await _until(held, 2 * lease_s)
    kind: Any = await raw.type(keys.batcher_lease)
    kind = _text(kind)
    why = "no process holds it" + ("" if kind == "none" else f" (the key is a {kind})")
    return Invariant("the batcher lease is held", [] if ok else [why])


# The type of each key of the contract (README: The contract), by its second part.
KEY_TYPES = {
    "jobs": b"stream",
    "usage": b"stream",
    "dead": b"stream",
    "deferred": b"zset",
    "result": b"string",
    "done": b"list",
    "state": b"hash",
    "limits": b"hash",
    "route": b"string",
    "batch": b"hash",
    "spend": b"string",
    "rollup": b"hash",  # hours, their cells, days (worker.rollups, worker.compaction)
    "answered": b"string",  # a job's answer, for feedback (worker.adaptive)
    "adaptive": b"hash",  # the router's counts and tiers in use
    "outlen": b"hash",  # answer lengths (worker.maxtokens)
}
SUFFIXED = {
    "budget": (b":holds", b"zset", b"hash"),
    "breaker": (b":probes", b"zset", b"hash"),
    "rcache": (b":done", b"stream", b"string"),
    "feedback": (b":counts", b"hash", b"stream"),  # read when a feature has a semantic cache
}


def semantic_type(rest: bytes) -> bytes:
    """The type of a semantic-cache key (worker.semantic): its scope's entry ids, change count,
    change log and entries; the scopes' set; a job's hit and source records; trust."""
    if rest == b"semantic:scopes":
        return b"set"
    if rest.startswith((b"semantic:job:", b"semantic:hit:")) or b":e:" in rest:
        return b"string"
    if rest.startswith(b"semantic:trust:") or rest.endswith(b":ver"):
        return b"hash"
    return b"stream" if rest.endswith(b":log") else b"zset"


WHOLE = {
    b"batcher:lease": b"string",
    b"batches": b"zset",
    b"batches:api": b"hash",
    b"rollup:queue": b"list",
    b"rollup:live": b"zset",
    b"rollup:pending": b"zset",
    b"rollup:totals": b"string",
    b"rollup:compacting": b"string",
}


def expected_type(key: bytes, prefix: str) -> bytes | None:
    """The type a key under the prefix has by the contract; None for one it does not list."""
    rest = key[len(prefix) + 1 :]
    if rest in WHOLE:
        return WHOLE[rest]
    kind = rest.partition(b":")[0].decode("utf-8", "replace")
    if kind == "semantic":
        return semantic_type(rest)
    if kind in SUFFIXED:
        suffix, with_it, without = SUFFIXED[kind]
        return with_it if rest.endswith(suffix) else without
    bare = ("usage", "dead", "deferred", "feedback")
    return KEY_TYPES.get(kind) if b":" in rest or kind in bare else None


async def _key_types(raw: aioredis.Redis, keys: Keys, run: Run) -> Invariant:
    inv = Invariant("no key under the prefix changed type (nor the foreign ones)")
    now = await _types(raw, keys, run.corpus)
    ours = f"{keys.prefix}:".encode()
    for name, kind in now.items():
        want = expected_type(name, keys.prefix) if name.startswith(ours) else None
        before = run.types_before.get(name)
        if name.startswith(ours) and want is None:
            inv.failures.append(
                f"{_text(name)} ({_text(kind)}) is no key of the contract (a "
                "new one? add it to KEY_TYPES in tests/fuzz_check.py)"
            )
        elif want is not None and kind not in (want, b"none"):
            inv.failures.append(f"{_text(name)} is a {_text(kind)}, not a {_text(want)}")
        elif before not in (None, b"none") and kind not in (before, b"none"):
            inv.failures.append(f"{_text(name)} was a {_text(before)}, is a {_text(kind)}")
    return inv


def _own_streams(dead: list[tuple[str, Raw]], usage: list[tuple[str, Raw]]) -> Invariant:
    inv = Invariant("tokenq's own streams hold only their own entries (no reply landed there)")
    for entry_id, f in usage:
        text = {_text(k): _text(v) for k, v in f.items()}
        try:
            msgspec.convert(text, UsageEvent, strict=False)
        except msgspec.ValidationError:
            inv.failures.append(
                f"usage entry {entry_id} is not a usage event: {', '.join(text)[:120]}"
            )
    for entry_id, f in dead:
        if b"result" in f and b"error_type" not in f:
            inv.failures.append(
                f"dead-letter entry {entry_id} is a reply: {_text(f[b'result'])[:80]}"
            )
    return inv


async def _deferred(raw: aioredis.Redis, keys: Keys, run: Run) -> Invariant:
    inv = Invariant("the deferred set works: put-off jobs came back and finished")
    left = int(await raw.zcard(keys.deferred)) if await raw.type(keys.deferred) == b"zset" else 0
    if left:
        inv.failures.append(f"{left} jobs still in {keys.deferred}")
    for case in run.corpus.deferred:
        assert case.job_id is not None
        result = await _result(raw, keys, case.job_id)
        if not isinstance(result, dict) or result.get("status") != "ok":
            inv.failures.append(f"{case.name}: result {str(result)[:120]}")
    return inv
