#!/usr/bin/env python3
"""Fuzz: a seeded corpus of hostile job entries against a fleet, and the invariants after it.

    .venv/bin/python bench/fuzz.py [--seed 1] [--entries 400] [--settle-s 60]
    (or: python3 dev.py bench fuzz --seed 1)

Starts its own valkey-server and simulator (0 ms, batches done in 0.2 s) and
`tokenq worker --processes 2` with the repo's config.toml (queue.max_entry_bytes as it is),
its batch windows and timeouts shortened to seconds (tests/fuzz_check.py RUN_SETTINGS). Then
the corpus of tests/fuzz_corpus.py, the same one tests/integration/test_fuzz.py runs: any
bytes in any field name or value, every wrong type, deep nesting, huge and empty values,
thousands of fields, tokenq's own keys and keys of other types as reply_to, ids shaped like
entry ids or reused with another fingerprint, control characters; good jobs in between; on
every priority, `low` (batched) included. Two jobs, one with 5,000 fields, go through the
deferred set first.

Prints each invariant (PASS or FAIL with the entries that break it), the dead letters per
error_type against what the corpus expects, and the worker processes that died and were
restarted, last. Exits 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, say, servers, write_config

sys.path.insert(0, str(ROOT))  # the corpus lives with the tests, which share it
from tests.fuzz_check import RUN_SETTINGS, Report, check, drive, fleet, prepare, raw_client
from tests.fuzz_corpus import make_corpus
from worker.contract import Keys


async def fuzz(folder: Path, a: argparse.Namespace) -> Report:
    with servers(folder, ("--batch-seconds", "0.2")) as srv:
        cfg, path = write_config(folder, srv, "fuzz", RUN_SETTINGS)
        keys = Keys(cfg.prefix)
        corpus = make_corpus(
            a.seed,
            a.entries,
            prefix=cfg.prefix,
            priorities=cfg.queue.priorities,
            max_entry_bytes=cfg.queue.max_entry_bytes,
            now_ms=int(time.time() * 1000),
        )
        say(
            f"corpus seed {a.seed}: {len(corpus.cases)} entries (+{len(corpus.originals)} "
            f"whose ids it reuses, {len(corpus.deferred)} deferred)"
        )
        raw = raw_client(srv.redis_url)
        try:
            await prepare(raw, keys, corpus, cfg.queue.priorities)
            log = folder / "fleet.log"
            with fleet(path, processes=2, concurrency=32, log=log):
                say("tokenq worker --processes 2 started; sending the corpus")
                run = await drive(raw, keys, corpus, settle_s=a.settle_s)
                say("checking the invariants")
                return await check(raw, keys, run, log=log, lease_s=cfg.batch.lease_s)
        finally:
            await raw.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1, help="corpus seed (1)")
    parser.add_argument("--entries", type=int, default=400, help="corpus entries (400)")
    parser.add_argument(
        "--settle-s",
        type=float,
        default=60.0,
        help="how long to wait for the streams to empty before checking (60)",
    )
    a = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenq-fuzz-") as tmp:
        report = asyncio.run(fuzz(Path(tmp), a))
    print(report.render())
    return 0 if report.held else 1


if __name__ == "__main__":
    sys.exit(main())
