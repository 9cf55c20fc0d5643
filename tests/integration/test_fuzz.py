"""The whole path under hostile input: a seeded corpus of several hundred entries (any bytes,
every wrong type, deep nesting, huge and empty values, thousands of fields, tokenq's own keys
as reply_to, ids shaped like entry ids or reused, control characters) mixed with good jobs on
every priority, run by `tokenq worker --processes 2` against real Valkey and the simulator.

The corpus and the invariants live in tests/fuzz_corpus.py and tests/fuzz_check.py, which
`python3 dev.py bench fuzz` runs too.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import ConfigFactory
from tests.fuzz_check import RUN_SETTINGS, check, drive, fleet, prepare, raw_client
from tests.fuzz_corpus import make_corpus
from tests.helpers import sim_call
from worker.contract import Keys

SETTINGS = {**RUN_SETTINGS, "queue.max_entry_bytes": 65_536}  # small entries: a quick run
SEED = 11
ENTRIES = 400


async def test_a_hostile_corpus_gets_dead_letters_and_results_and_harms_no_worker(
    valkey_url: str, sim: str, keys: Keys, make_config: ConfigFactory, tmp_path: Path
) -> None:
    cfg, path = make_config(**SETTINGS)
    sim_call(sim, "config", {"batch_seconds": 0.2})
    corpus = make_corpus(
        SEED,
        ENTRIES,
        prefix=cfg.prefix,
        priorities=cfg.queue.priorities,
        max_entry_bytes=cfg.queue.max_entry_bytes,
        now_ms=int(time.time() * 1000),
    )
    raw = raw_client(valkey_url)
    try:
        await prepare(raw, keys, corpus, cfg.queue.priorities)
        log = tmp_path / "fleet.log"
        with fleet(path, processes=2, concurrency=32, log=log):
            run = await drive(raw, keys, corpus, settle_s=30.0)
            report = await check(raw, keys, run, log=log, lease_s=cfg.batch.lease_s)
    finally:
        await raw.aclose()
    assert report.held, "\n" + report.render(most=40)
