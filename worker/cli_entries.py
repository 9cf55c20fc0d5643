"""`tokenq dead`, `tokenq jobs remove`: the stream entries an operator looks after (dead
letters, stuck entries; `tokenq consumers`, in worker.cli_ops, shows who holds them). Argument
parsing and printing only; each command calls one function of worker.deadletters or
worker.operators.
Entries are read as bytes and shown escaped: they hold whatever a producer sent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from worker import clock
from worker.admission import reply_to_of
from worker.cli_ops import Sub, ago, config_of, positive, printable, run_with_redis
from worker.config import Config
from worker.contract import Keys, entry_ms
from worker.deadletters import DeadFilter, dead_job_id, delete_dead, find_dead, replay, trim_dead
from worker.entries import Entry, shown
from worker.errors import ConfigError
from worker.operators import (
    JobEntry,
    find_job_entries,
    remove_job_entry,
)


def add_entry_commands(sub: Sub[argparse.ArgumentParser]) -> None:
    """Add dead and jobs to `tokenq`."""
    _add_dead(sub)
    _add_jobs(sub)


def _add_dead(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dead",
        help="list, purge, trim or replay dead letters",
        description="Jobs that can never succeed as submitted, or that failed "
        "queue.max_attempts times, wait in the dead-letter stream with the reason. `list` "
        "and `purge` take any entry of the stream, whoever wrote it: fields may be missing, "
        "bytes that are not UTF-8 show as \\xNN.",
    )
    dsub = p.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    lp = dsub.add_parser(
        "list",
        help="print dead letters, newest first",
        description="Print dead letters, newest first (--oldest: oldest first): id, "
        "error_type, feature, tenant, job id, attempts, priority and time, then the reason. "
        "Filters combine; a filter given twice accepts either value. Values longer than "
        "queue.max_entry_bytes are cut (--json says so in `cut_bytes`).",
    )
    _add_dead_filters(lp)
    lp.add_argument("--oldest", action="store_true", help="oldest first")
    lp.add_argument("--limit", type=positive, default=100, help="at most this many (100)")
    lp.add_argument("--json", action="store_true", help="one JSON object per line")
    lp.set_defaults(run=cmd_dead_list)
    pp = dsub.add_parser(
        "purge",
        help="delete the dead letters that match filters, or all of them",
        description="Delete the dead letters matching the filters (or every one with "
        "--all), after showing how many and asking. Without a terminal to ask on it deletes "
        "nothing unless --yes is given. Prints how many it removed.",
    )
    _add_dead_filters(pp)
    pp.add_argument("--all", action="store_true", help="every dead letter")
    pp.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    pp.set_defaults(run=cmd_dead_purge)
    tp = dsub.add_parser(
        "trim",
        help="keep only the newest N dead letters",
        description="Delete all but the newest N dead letters (for a cron job, say); prints "
        "how many it removed.",
    )
    tp.add_argument("--max", type=positive, required=True, metavar="N", help="dead letters kept")
    tp.set_defaults(run=cmd_dead_trim)
    rp = dsub.add_parser("replay", help="put dead letters back on their priority stream")
    rp.add_argument("ids", nargs="*", help="dead-letter ids from `tokenq dead list`")
    rp.add_argument("--all", action="store_true", help="replay every dead letter")
    rp.set_defaults(run=cmd_dead_replay)


def _add_dead_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--error-type",
        action="append",
        default=[],
        metavar="TYPE",
        help="e.g. too_large, malformed_job, max_attempts",
    )
    p.add_argument("--feature", action="append", default=[], help="the job's feature")
    p.add_argument("--tenant", action="append", default=[], help="the job's tenant")
    p.add_argument(
        "--since",
        type=_moment,
        metavar="WHEN",
        help="dead-lettered at or after: a time ago (30m, 2h, 7d) or an ISO time "
        "(2026-11-30, 2026-11-30T14:00, ...Z; local time without an offset)",
    )
    p.add_argument(
        "--until",
        type=_moment,
        metavar="WHEN",
        help="dead-lettered at or before (same forms as --since)",
    )


def _add_jobs(sub: Sub[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "jobs",
        help="take stuck entries out of the job streams",
        description="Operate on the entries of the job streams.",
    )
    jsub = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    rp = jsub.add_parser(
        "remove",
        help="take a stuck entry out of its stream and the pending list, with a dead letter",
        description="Take entries out of their job stream and out of the consumer group's "
        "pending list. Each gets a dead letter (error_type `removed`, replayable with "
        "`tokenq dead replay`), an error result, a usage event and a reply on its reply_to, "
        "so its producer learns at once. An entry a live worker holds (its consumer read or "
        "renewed within queue.visibility_timeout_s) is left alone unless --force.",
    )
    rp.add_argument(
        "ids",
        nargs="+",
        metavar="ID",
        help="an entry id (1763830000000-0, or low:1763830000000-0) or a job id given as `id`",
    )
    rp.add_argument(
        "--priority",
        help="look only in this priority's stream (when an id names entries in several)",
    )
    rp.add_argument(
        "--force",
        action="store_true",
        help="remove it even while a live worker holds it (that worker may still "
        "finish it and write a result of its own)",
    )
    rp.set_defaults(run=cmd_jobs_remove)


def cmd_dead_list(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)

    which = _dead_filter(ns)

    async def run(redis: aioredis.Redis) -> None:
        entries = await find_dead(
            redis,
            Keys(cfg.prefix),
            which,
            limit=ns.limit,
            newest_first=not ns.oldest,
            cut_bytes=cfg.queue.max_entry_bytes,
        )
        for entry in entries:
            print(json.dumps(_dead_json(entry)) if ns.json else _dead_line(entry))
        if not entries and not ns.json:
            print("no dead letters" + ("" if which.everything else " match"))

    return run_with_redis(cfg, run)


def _dead_filter(ns: argparse.Namespace) -> DeadFilter:
    return DeadFilter(tuple(ns.error_type), tuple(ns.feature), tuple(ns.tenant), ns.since, ns.until)


def _dead_json(entry: Entry) -> dict[str, Any]:
    out: dict[str, Any] = {"dead_id": entry.entry_id}
    out.update((k, v) for k, v in entry.fields.items() if k not in ("dead_id", "cut_bytes"))
    if entry.cut:
        out["cut_bytes"] = {shown(k): n for k, n in entry.cut.items()}
    return out


def _dead_line(entry: Entry) -> str:
    f = entry.fields
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry_ms(entry.entry_id) / 1000))
    if "error_type" not in f:  # not written by tokenq: show what is there
        shown_fields = " ".join(f"{k}={_short(v)}" for k, v in list(f.items())[:12])
        more = f" (+{len(f) - 12} fields)" if len(f) > 12 else ""
        return printable(f"{entry.entry_id} (not a tokenq dead letter) {at}: {shown_fields}{more}")
    job_id = dead_job_id(f)
    head = (
        f"{entry.entry_id} {f['error_type']} feature={_short(f.get('feature', '-'))} "
        f"tenant={_short(f.get('tenant', '-'))} job={_short(job_id)} "
        f"attempts={f.get('attempts', '?')} priority={f.get('priority', '?')} {at}"
    )
    return f"{printable(head)}\n    {printable(f.get('error', '(no reason given)'))}"


def _short(text: str, most: int = 80) -> str:
    return text if len(text) <= most else f"{text[:most]}... ({len(text):,} chars)"


def _moment(text: str) -> int:
    """A --since/--until value as unix ms: a time ago (90s, 30m, 2h, 7d, 2w) or an ISO time."""
    ago = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d|w)", text.strip())
    if ago:
        seconds = float(ago[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[ago[2]]
        return int((clock.time_s() - seconds) * 1000)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time ago (90s, 30m, 2h, 7d, 2w) nor an ISO time "
            "(2026-11-30, 2026-11-30T14:00, 2026-11-30T14:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a time without an offset is the operator's local time
    return int(when.timestamp() * 1000)


def cmd_dead_purge(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    which = _dead_filter(ns)
    if which.everything and not ns.all:
        raise ConfigError(
            "say which dead letters to purge: --error-type, --feature, --tenant, "
            "--since, --until, or --all for every one"
        )
    if ns.all and not which.everything:
        raise ConfigError("--all purges every dead letter: leave out the filters, or --all")

    async def run(redis: aioredis.Redis) -> int:
        keys = Keys(cfg.prefix)
        found = await find_dead(redis, keys, which, limit=None, newest_first=False, cut_bytes=0)
        if not found:
            print("no dead letters match; nothing removed")
            return 0
        what = f"{len(found)} dead letter{'s' if len(found) != 1 else ''} in {keys.dead}"
        if not _confirmed(f"delete {what}?", ns.yes):
            print("nothing removed")
            return 1
        removed = await delete_dead(redis, keys, (e.entry_id for e in found))
        print(f"removed {removed} dead letter{'s' if removed != 1 else ''}")
        return 0

    return run_with_redis(cfg, run)


def _confirmed(question: str, yes: bool) -> bool:
    """--yes, or the operator's answer on the terminal; with no terminal to ask on, refuse."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigError(
            f"would {question[:-1]}, but standard input is not a terminal to "
            "confirm on: pass --yes to go ahead"
        )
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_dead_trim(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)

    async def run(redis: aioredis.Redis) -> None:
        keys = Keys(cfg.prefix)
        removed = await trim_dead(redis, keys, ns.max)
        left = int(await redis.xlen(keys.dead))
        print(f"removed {removed} dead letter{'s' if removed != 1 else ''}; {left} kept")

    return run_with_redis(cfg, run)


def cmd_dead_replay(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    if not ns.ids and not ns.all:
        raise ConfigError("name dead-letter ids to replay (see `tokenq dead list`), or --all")

    async def run(redis: aioredis.Redis) -> int:
        keys = Keys(cfg.prefix)
        every = ns.ids or [
            e.entry_id
            for e in await find_dead(redis, keys, limit=None, newest_first=False, cut_bytes=0)
        ]
        for dead_id in every:
            try:
                job_id = await replay(redis, keys, dead_id, cfg.queue.priorities)
            except LookupError as exc:
                print(f"tokenq: {exc}", file=sys.stderr)
                return 1
            print(f"replayed {dead_id} as job {printable(job_id)}")
        return 0

    return run_with_redis(cfg, run)


def cmd_jobs_remove(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)
    priorities = cfg.queue.priorities
    if ns.priority is not None and ns.priority not in priorities:
        raise ConfigError(
            f"--priority {ns.priority!r} is not one of queue.priorities: {', '.join(priorities)}"
        )

    async def run(redis: aioredis.Redis) -> int:
        keys, failed = Keys(cfg.prefix), 0
        for ident in ns.ids:
            failed += not await _remove_one(redis, cfg, keys, ident, ns)
        return 1 if failed else 0

    return run_with_redis(cfg, run)


async def _remove_one(
    redis: aioredis.Redis, cfg: Config, keys: Keys, ident: str, ns: argparse.Namespace
) -> bool:
    """Remove the one entry `ident` names; say what happened. False when nothing was."""
    job = await _one_entry(redis, cfg, keys, ident, ns)
    if job is None:
        return False
    removal = await remove_job_entry(
        redis,
        keys,
        job,
        now_ms=clock.now_ms(),
        result_ttl_s=cfg.queue.result_ttl_s,
        usage_maxlen=cfg.queue.usage_maxlen,
        max_entry_bytes=cfg.queue.max_entry_bytes,
        reply_to=reply_to_of(job.entry.lossless, cfg),
    )
    where = f"{job.entry.entry_id} from {job.stream} (job {job.job_id!r})"
    if removal is None:
        print(printable(f"{where}: its worker finished it meanwhile; nothing removed"))
        return True
    outcome = "error result written" if removal.result_written else "kept the job's result"
    replied = ", replied on its reply_to" if removal.replied else ""
    print(printable(f"removed {where}: dead letter {removal.dead_id}, {outcome}{replied}"))
    return True


async def _one_entry(
    redis: aioredis.Redis, cfg: Config, keys: Keys, ident: str, ns: argparse.Namespace
) -> JobEntry | None:
    """The one entry `ident` names, unless none does, several do, or a live worker holds it
    (without --force); then say so and return None."""
    where = [ns.priority] if ns.priority else cfg.queue.priorities
    found = await find_job_entries(redis, keys, where, ident, cut_bytes=cfg.queue.max_entry_bytes)
    name = printable(repr(ident))
    if not found:
        streams = ", ".join(keys.jobs(p) for p in where)
        _say_error(
            f"no entry {name} in {streams}: give an entry id (the worker's log and "
            "XPENDING name them) or the `id` the producer gave the job"
        )
        return None
    if len(found) > 1:
        listed = "; ".join(f"{j.priority} {j.entry.entry_id} (job {j.job_id!r})" for j in found)
        _say_error(
            f"{name} names {len(found)} entries: {printable(listed)}. Name one by its "
            "entry id, with --priority when the id is on several streams"
        )
        return None
    job, h = found[0], found[0].holder
    live = job.held_by_live_worker(int(cfg.queue.visibility_timeout_s * 1000))
    if h is not None and live and not ns.force:
        times = "once" if h.deliveries == 1 else f"{h.deliveries} times"
        _say_error(
            f"{name} is held by consumer {printable(h.consumer)}, active "
            f"{ago(h.consumer_idle_ms)} ago (delivered {times}, the last "
            f"{ago(h.idle_ms)} ago): a live worker may still finish it. Wait, or --force"
        )
        return None
    return job


def _say_error(text: str) -> None:
    print(f"tokenq: {text}", file=sys.stderr)
