"""Learnt max_tokens' Redis side against a real Valkey: the finishing transaction's counts,
read back and learnt from."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from worker import maxtokens
from worker.config import parse_config
from worker.contract import Keys

ROOT = Path(__file__).resolve().parents[2]
RAW: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())
T0 = 1_800_000_000_000  # ms


async def test_answer_lengths_are_learnt_from_the_finishing_write(
    redis: aioredis.Redis, keys: Keys
) -> None:
    cfg = parse_config(copy.deepcopy(RAW))
    feature = msgspec.structs.replace(cfg.features["summarize"], max_tokens_learn=True)
    async with redis.pipeline(transaction=True) as tx:
        for n in range(200):
            maxtokens.observe_into(tx, keys, "summarize", 40 + n % 50, cut=False, now_ms=T0)
        maxtokens.observe_into(tx, keys, "summarize", 3000, cut=False, now_ms=T0 - 86_400_000)
        await tx.execute()
    assert await redis.ttl(keys.lengths("summarize", T0 // 86_400_000)) == maxtokens.KEEP_S
    stats = maxtokens.LengthStats(redis, keys)
    lengths = await stats.get("summarize", T0)
    assert sum(lengths.whole.values()) == 201  # today's and yesterday's
    assert maxtokens.learnt(feature, lengths) == (96, "max_tokens 96 learnt (p99 of 201 answers)")
