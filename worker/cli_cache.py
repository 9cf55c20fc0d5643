"""`tokenq cache`: the semantic cache's scopes, a hit's pair, removing entries.

Argument parsing and printing only (worker.cli adds the command with add_cache_command); the
work is in worker.semantic_audit. Producer text (questions, tenants) is printed through
contract.shown: quoted, cut, control characters escaped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker import semantic_audit
from worker.cli_ops import Sub, config_of, run_with_redis
from worker.config import Config
from worker.contract import Keys, shown
from worker.errors import ConfigError

EPILOG_LINE = "  cache       the semantic cache: scopes, a hit's source and pair, forget entries\n"


def add_cache_command(sub: Sub[argparse.ArgumentParser]) -> None:
    """Register `tokenq cache` on `tokenq`'s subparsers."""
    p = sub.add_parser(
        "cache",
        help="the semantic cache: scopes, a hit's source and pair, forget entries",
        description="The semantic cache (features.<name>.semantic_cache; README: Semantic "
        "cache). `scopes` lists each scope (a feature's shared one, or a tenant's) with its "
        "entries, and whether the Redis server could search vectors itself. `inspect ID` shows "
        "a job answered from the semantic cache: its question, the question whose answer it "
        "got, the similarity, the threshold, and the job that answered first; or the entry a "
        "job's answer became. `forget` removes entries for every worker at once: by job id "
        "(the entry a hit came from and the one the job's answer became), by feature, by "
        "tenant, or both.",
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    s = verbs.add_parser("scopes", help="each scope and its entries")
    s.add_argument("--json", action="store_true", help="one JSON object a line")
    s.set_defaults(run=cmd_scopes)
    i = verbs.add_parser("inspect", help="a job's semantic hit (source job, similarity, pair)")
    i.add_argument("job_id", metavar="ID", help="the job id (its result's `id`)")
    i.add_argument("--json", action="store_true", help="one JSON object")
    i.set_defaults(run=cmd_inspect)
    f = verbs.add_parser(
        "forget", help="remove entries by job id, feature or tenant, fleet-wide at once"
    )
    f.add_argument("--job", help="a job id: the entry it was served from and the one it made")
    f.add_argument("--feature", help="every entry of this feature (its scopes)")
    f.add_argument("--tenant", help="every entry of this tenant (with --feature: of that one)")
    f.set_defaults(run=cmd_forget)


def _run(cfg: Config, work: Callable[[aioredis.Redis], Awaitable[int]]) -> int:
    try:
        return run_with_redis(cfg, work)
    except (RedisError, OSError) as exc:
        print(f"tokenq: cannot reach Redis: {exc}", file=sys.stderr)
        return 1


def cmd_scopes(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)

    async def run(redis: aioredis.Redis) -> int:
        rows = await semantic_audit.scopes(redis, Keys(cfg.prefix))
        search = await semantic_audit.vector_search(redis, f"{cfg.prefix}:semantic:probe")
        if ns.json:
            for row in rows:
                print(json.dumps(row._asdict()))
            return 0
        where = (
            f"the server has {search}, but tokenq searches its own in-process index"
            if search
            else "the server has no vector search (no FT.SEARCH, no VSIM): each worker "
            "searches its own in-process index"
        )
        print(f"semantic cache: {len(rows)} scope(s); {where}")
        for row in rows:
            who = "shared" if row.tenant is None else f"tenant {shown(row.tenant, 80)}"
            print(f"  {row.feature} / {who}: {row.entries:,} entries")
        return 0

    return _run(cfg, run)


def cmd_inspect(ns: argparse.Namespace) -> int:
    cfg = config_of(ns)

    async def run(redis: aioredis.Redis) -> int:
        found = await semantic_audit.inspect(redis, Keys(cfg.prefix), ns.job_id)
        if ns.json:
            print(json.dumps({
                "hit": None if found.hit is None else _plain(found.hit),
                "served_from": None if found.served_from is None else _entry(found.served_from),
                "became": None if found.became is None else _entry(found.became),
            }))  # fmt: skip
            return 0 if found.hit or found.became else 1
        return _print_inspection(ns.job_id, found)

    return _run(cfg, run)


def _plain(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(value)
    return out


def _entry(entry: Any) -> dict[str, Any]:
    out = _plain(entry)
    out.pop("vector", None)
    return out


def _print_inspection(job_id: str, found: semantic_audit.Inspection) -> int:
    if found.hit is None and found.became is None:
        print(f"job {shown(job_id, 80)}: no semantic hit and no entry on record (not a "
              "semantic-cache job, or its record expired)")  # fmt: skip
        return 1
    hit = found.hit
    if hit is not None:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(hit.at_ms / 1000))
        print(f"job {shown(job_id, 80)} was answered from the semantic cache at {at}")
        print(f"  feature {hit.feature}, scope {'shared' if hit.tenant is None else 'tenant'}"
              f"{'' if hit.tenant is None else ' ' + shown(hit.tenant, 80)}")  # fmt: skip
        print(f"  similarity {hit.similarity:.4f} (threshold then {hit.threshold:.4f})")
        print(f"  asked:       {shown(hit.question, 300)}")
        print(f"  answer of:   {shown(hit.source_question, 300)}")
        print(f"  source job:  {shown(hit.source_job_id, 80)} (entry {hit.entry_id}"
              f"{'' if found.served_from else ', since forgotten or expired'})")  # fmt: skip
    if found.became is not None:
        e = found.became
        print(f"job {shown(job_id, 80)}'s answer became an entry of {e.feature}: "
              f"{shown(e.question, 300)}")  # fmt: skip
    return 0


def cmd_forget(ns: argparse.Namespace) -> int:
    if ns.job is None and ns.feature is None and ns.tenant is None:
        raise ConfigError("tokenq cache forget needs --job ID, --feature NAME or --tenant NAME")
    if ns.job is not None and (ns.feature is not None or ns.tenant is not None):
        raise ConfigError("tokenq cache forget: give --job alone, or --feature and/or --tenant")
    cfg = config_of(ns)

    async def run(redis: aioredis.Redis) -> int:
        removed = await semantic_audit.forget(
            redis, Keys(cfg.prefix), job_id=ns.job, feature=ns.feature, tenant=ns.tenant
        )
        print(f"forgot {removed} entr{'y' if removed == 1 else 'ies'} (every worker at once)")
        return 0

    return _run(cfg, run)
