"""Learnt max_tokens: a feature's answers get the room they need, and not much more.

A cap that cuts answers costs an escalation (the answer is paid twice); one far above the
answers reserves rate-limit and budget capacity for nothing. With a feature's
`max_tokens_learn = true`:

- every answer's output tokens are counted, fleet-wide, in a fixed-bucket histogram per
  feature and UTC day (observe_into: two commands for the job's finishing MULTI; kept three
  days). The buckets (BOUNDS) grow by at most half from 16 tokens up, so a learnt cap is at most
  50% above the answers it covers;
- the max_tokens for a request that gives none (learnt) is the upper bound of the bucket
  holding the 99th percentile of today's and yesterday's answers, once there are
  MIN_ANSWERS of them, within [max_tokens_floor, max_tokens_cap (else max_tokens)];
- an answer cut at max_tokens is counted at its length, but it wanted more: when more than
  1% of answers were cut the 99th percentile is not seen, and the room becomes twice the
  longest cut answer instead (within the same bounds), so the cap climbs until it no longer
  cuts. Without enough answers the feature's max_tokens applies.

A producer's own max_tokens is not replaced (it is clamped to max_tokens_cap as before).
worker.learning wires it into the job run (README: Learnt max_tokens).
"""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import redis.asyncio as aioredis

from worker.config import FeatureConfig
from worker.contract import Keys

BOUNDS = (
    8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
    6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072,
)  # fmt: skip
"""Upper bounds (output tokens) of the histogram's buckets; longer answers count in the last."""

QUANTILE = 0.99
MIN_ANSWERS = 100
DAY_MS = 86_400_000
KEEP_S = 3 * 86_400  # today's and yesterday's days are read; a third covers clock skew


def bucket(output_tokens: int) -> int:
    """The bound of the bucket an answer of this length counts in."""
    return BOUNDS[min(bisect.bisect_left(BOUNDS, output_tokens), len(BOUNDS) - 1)]


def observe_into(
    tx: Any, keys: Keys, feature: str, output_tokens: int, *, cut: bool, now_ms: int
) -> None:
    """Queue on `tx` (the job's finishing MULTI) the count of one answer's length: HINCRBY of
    its bucket (`c<bound>` when it was cut at max_tokens) in today's hash, and its EXPIRE.
    Call it for every answer a job got from a feature with max_tokens_learn."""
    key = keys.lengths(feature, now_ms // DAY_MS)
    tx.hincrby(key, ("c" if cut else "") + str(bucket(output_tokens)), 1)
    tx.expire(key, KEEP_S)


class Lengths(msgspec.Struct, frozen=True):
    """A feature's answers by bucket bound: those that ended on their own, those cut."""

    whole: dict[int, int] = {}
    cut: dict[int, int] = {}


def tally(hashes: Iterable[Mapping[str, str]]) -> Lengths:
    """Sum day hashes into one histogram; fields that are not counts are left out."""
    whole: Counter[int] = Counter()
    cut: Counter[int] = Counter()
    for fields in hashes:
        for name, value in fields.items():
            into, bound = (cut, name[1:]) if name.startswith("c") else (whole, name)
            if bound.isdigit() and value.isdigit() and int(bound) in BOUNDS:
                into[int(bound)] += int(value)
    return Lengths(dict(whole), dict(cut))


async def read_lengths(redis: aioredis.Redis, keys: Keys, feature: str, now_ms: int) -> Lengths:
    """Today's and yesterday's histograms of a feature, summed (one pipelined round trip)."""
    today = now_ms // DAY_MS
    async with redis.pipeline(transaction=False) as pipe:
        for day in (today - 1, today):
            pipe.hgetall(keys.lengths(feature, day))
        replies: list[Any] = await pipe.execute()
    return tally(replies)


def learnt(feature: FeatureConfig, lengths: Lengths) -> tuple[int, str] | None:
    """The max_tokens to send for a request that gives none, and why (for route_reason), or
    None while fewer than MIN_ANSWERS answers were counted."""
    cut_n = sum(lengths.cut.values())
    n = sum(lengths.whole.values()) + cut_n
    if n < MIN_ANSWERS:
        return None
    if cut_n > (1 - QUANTILE) * n:
        longest = max(lengths.cut)
        want, why = 2 * longest, f"{cut_n} of {n} answers cut at up to {longest}, doubled"
    else:
        running, want = 0, BOUNDS[-1]
        for bound in BOUNDS:
            running += lengths.whole.get(bound, 0) + lengths.cut.get(bound, 0)
            if running >= QUANTILE * n:
                want = bound
                break
        why = f"p99 of {n} answers"
    ceiling = feature.max_tokens_cap or feature.max_tokens
    value = min(ceiling, max(feature.max_tokens_floor, want))
    if value != want:
        why += f" is {want}; " + ("max_tokens_floor" if value > want else "at the cap")
    return value, f"max_tokens {value} learnt ({why})"


class LengthStats:
    """A process's view of the fleet's histograms, per feature, read at most every cache_ms.

    Concurrent jobs of a feature whose view is stale wait on one read."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, cache_ms: int = 1000) -> None:
        self.redis, self.keys, self.cache_ms = redis, keys, cache_ms
        self._views: dict[str, tuple[int, Lengths]] = {}
        self._reads: dict[str, asyncio.Task[Lengths]] = {}

    async def get(self, feature: str, now_ms: int) -> Lengths:
        """The feature's histogram; raises RedisError when it cannot be read."""
        held = self._views.get(feature)
        if held is not None and now_ms - held[0] < self.cache_ms:
            return held[1]
        read = self._reads.get(feature)
        if read is None:
            coro = read_lengths(self.redis, self.keys, feature, now_ms)
            read = self._reads[feature] = asyncio.create_task(coro)
            read.add_done_callback(lambda t: self._done(feature, t, now_ms))
        # Shielded: one waiter's cancellation must not cancel the read the others wait on.
        return await asyncio.shield(read)

    def _done(self, feature: str, read: asyncio.Task[Lengths], now_ms: int) -> None:
        self._reads.pop(feature, None)
        if not read.cancelled() and read.exception() is None:  # retrieved: no "never retrieved"
            self._views[feature] = (now_ms, read.result())
