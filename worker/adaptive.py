"""The adaptive router: the cheapest tier whose answers are good enough, learnt from outcomes.

Applies to the features that set `target_pass_rate` (or `wrong_answer_usd`: the price rule,
decide_by_price) when `router.policy = "adaptive"`, after the job's tier, the feature's tier
and the rules (router.py), in place of the classifier and `router.default_tier`
(worker.learning wires it into the job run; README: Adaptive routing).

**What is counted.** Per feature, kind of job and tier: the answers that passed their check
and those that failed it. The kind of job is known before the call and free: the band of its
estimated input tokens (`router.adaptive.bands`), or with `kinds = "signals"` what its
messages show (signal_kind: their length by doublings, hard words, code blocks).
An escalated job counts a failure for the tier that failed and the outcome of the next one;
an answer cut at `max_tokens` counts neither way (a matter of room, see worker.maxtokens).
A producer's verdict on `tokenq:feedback` overrides the check's for that job's answer
(worker.feedback reads them). A pass of a check that cannot see a wrong answer (blind) is
counted *unjudged*, and counts only while nothing judged is counted for the feature (judged).
For the price rule, the usage of the feature's answered calls too (usage_into: what a call
reads from the prompt cache and writes, job_cost_usd).

**Where.** Fleet-wide in Redis, as decayed counts: an answer counts 1 when written and half
as much every `half_life_s` (the evidence), and every `recent_half_life_s` in the recent
counts, which notice a drop at once. Per feature, horizon and epoch one hash (fields
`<kind>|<tier>|p` and `<kind>|<tier>|f`), written with the job's finishing transaction
(record_into: one HINCRBYFLOAT and one EXPIRE per horizon and answer); and one hash per feature
of the tier in use by kind, written when a decision changes it. A read is five
HGETALLs in one round trip per feature, which a process reuses for `cache_ms` (OutcomeStats).

**The decision** (decide, a pure function). With the feature's target t and the Wilson score
bounds of each tier's pass rate at the one-sided `confidence` (z = Φ⁻¹(confidence)):
- a tier is *proven bad* when the upper bound of its evidence, or of its recent counts, is
  below t; *proven good* when it is not proven bad, its evidence counts at least
  `min_samples` answers, the lower bound of its evidence is at least t, and its recent pass
  rate (with an answer's worth of recent counts) is at least t;
- the job goes to the cheapest tier that is proven good, or is the one in use (the most
  recent answers) and not proven bad: a tier must prove itself to be chosen, and then stays
  until it is proven bad (hysteresis, so that one unlucky failure does not flap the fleet);
  with neither, to `router.default_tier`, or the first dearer tier not proven bad, or the
  dearest;
- then, for `explore_share` of jobs (a hash of the job id, so a retry decides alike), it goes
  one tier cheaper instead: how the router learns that it may step down.
A proven-good tier whose recent answers fail is proven bad at once, so the next job steps up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis

from worker.config import AdaptiveConfig, Config, FeatureConfig
from worker.contract import Keys

log = logging.getLogger("tokenq.adaptive")

CUT = "stop_reason max_tokens"  # worker.checks.CUT: room, not quality (a test holds them equal)


class TierStats(msgspec.Struct, frozen=True):
    """One tier's decayed counts of answers for one feature and kind: the evidence, and the
    recent counts (which decay faster). `unjudged`: answers that passed a check that cannot
    see a wrong answer, with no verdict yet (see judged)."""

    passed: float = 0.0
    failed: float = 0.0
    recent_passed: float = 0.0
    recent_failed: float = 0.0
    unjudged: float = 0.0
    recent_unjudged: float = 0.0

    @property
    def n(self) -> float:
        """The answers counted in the evidence."""
        return self.passed + self.failed


EMPTY = TierStats()


class Stats(msgspec.Struct, frozen=True):
    """What the fleet knows of a feature: counts by (kind, tier), the tier in use by kind, and
    its answered calls' usage (decayed sums, any tier: calls, cache-read and output tokens)."""

    counts: dict[tuple[str, str], TierStats] = {}
    in_use: dict[str, str] = {}
    calls: float = 0.0
    cache_read_tokens: float = 0.0
    output_tokens: float = 0.0

    def per_call(self) -> tuple[float, float]:
        """Cache-read and output tokens of an answered call, on average (0, 0 with none)."""
        if self.calls < 1:
            return 0.0, 0.0
        return self.cache_read_tokens / self.calls, self.output_tokens / self.calls


def judged(stats: Stats) -> Stats:
    """The counts the router goes by. An answer whose check cannot see a wrong one (blind)
    is counted `unjudged` until a producer's verdict judges it. While the feature's counts
    hold at least one judged answer (a verdict, or a check that can fail), only those count:
    the share of wrong answers among the judged ones is the best estimate there is, where
    unjudged passes would hide the wrong answers nobody reported. With none, the unjudged
    count as passes (nothing else to go by: the cheapest tier, README: What it cannot see)."""
    if not any(s.unjudged or s.recent_unjudged for s in stats.counts.values()):
        return stats
    evidence = sum(s.n for s in stats.counts.values())
    counts = {
        key: TierStats(
            s.passed if evidence >= 1 else s.passed + s.unjudged,
            s.failed,
            s.recent_passed if evidence >= 1 else s.recent_passed + s.recent_unjudged,
            s.recent_failed,
        )
        for key, s in stats.counts.items()
    }
    return msgspec.structs.replace(stats, counts=counts)


class Decision(msgspec.Struct, frozen=True):
    """Where the adaptive router sends a job, the kind it counts under, and why. `in_use`:
    the tier to record as in use for the kind (record_into), when that changes."""

    tier: str
    kind: str
    reason: str
    explored: bool = False
    in_use: str | None = None


def applies(cfg: Config, feature: FeatureConfig) -> bool:
    """Whether the adaptive router chooses (and learns) for this feature's jobs."""
    learns = feature.target_pass_rate is not None or feature.wrong_answer_usd is not None
    return cfg.router.policy == "adaptive" and learns


def kind_of(a: AdaptiveConfig, input_tokens: int, text: str = "") -> str:
    """A job's kind: with `kinds = "bands"`, the band of router.adaptive.bands its estimated
    input falls in; with "signals", signal_kind of its messages' text (`text`)."""
    if a.kinds == "signals":
        return signal_kind(text, a.hard_words)
    return [name for name, least in a.bands.items() if max(0, input_tokens) >= least][-1]


MAX_STEPS = 3  # hard words and code blocks move a job at most this many kinds up


def signal_kind(text: str, hard_words: Sequence[str]) -> str:
    """The kind of a job from what its messages show (`text`: their text, the system prompt
    and tools left out, since a feature sends the same ones with every job): the doubling its
    length falls in (tokens at 4 characters each: "32-64", "2k-4k"), then "+n" for n steps up
    (at most MAX_STEPS), one for each of `hard_words` found in it (case-insensitive) and one
    for each code block (a pair of ``` fences). A generic heuristic: within a feature, longer
    requests, and those that say "why" or carry code, tend to be harder; each kind learns its
    own tier, so a wrong guess costs learning, not quality."""
    tokens = max(1, -(-len(text) // 4))
    low = 1 << (tokens.bit_length() - 1)
    lowered = text.lower() if hard_words else ""
    steps = sum(word.lower() in lowered for word in hard_words) + text.count("```") // 2
    name = f"{_size(low)}-{_size(2 * low)}"
    return f"{name}+{min(steps, MAX_STEPS)}" if steps else name


def _size(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 else str(tokens)


def draw_of(job_id: str) -> float:
    """A number in [0, 1) fixed by the job id: the job explores when it is below the share."""
    digest = hashlib.blake2b(job_id.encode(errors="replace"), digest_size=8, person=b"explore")
    return int.from_bytes(digest.digest(), "big") / 2**64


def bounds(passed: float, n: float, z: float) -> tuple[float, float]:
    """The Wilson score interval of a pass rate from `passed` of `n` ((0, 1) when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p, zz = passed / n, z * z
    centre = (p + zz / (2 * n)) / (1 + zz / n)
    half = z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)) / (1 + zz / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class _View(msgspec.Struct, frozen=True):
    n: float
    rate: float
    recent_n: float
    recent_rate: float
    good: bool
    bad: bool

    def describe(self, tier: str) -> str:
        if self.recent_n and self.recent_rate < self.rate:
            return f"{tier} passes {self.recent_rate:.3f} of {self.recent_n:.0f} lately"
        return f"{tier} passes {self.rate:.3f} of {self.n:.0f}"


def _view(s: TierStats, z: float, target: float, min_samples: int) -> _View:
    n, recent_n = s.n, s.recent_passed + s.recent_failed
    lower, upper = bounds(s.passed, n, z)
    recent_upper = bounds(s.recent_passed, recent_n, z)[1]
    rate, recent_rate = s.passed / n if n else 0.0, s.recent_passed / recent_n if recent_n else 0.0
    bad = upper < target or recent_upper < target
    # Also meeting the target lately: a tier just proven bad cannot come back on old evidence
    # once its recent counts thin out (less than one answer's worth does not count).
    lately = recent_n < 1 or recent_rate >= target
    good = not bad and n >= min_samples and lower >= target and lately
    return _View(n, rate, recent_n, recent_rate, good=good, bad=bad)


def decide(
    tiers: Sequence[str], stats: Mapping[str, TierStats], *, target: float, start: str,
    in_use: str | None, draw: float, a: AdaptiveConfig, where: str,
) -> tuple[str, str, bool]:  # fmt: skip
    """The tier for one job, why, and whether it explores (see the module docstring).

    `tiers` cheapest first; `stats` by tier for the job's feature and kind; `start` the tier
    while none is proven (router.default_tier); `in_use` the tier the fleet sends these jobs
    to now, if any; `draw` in [0, 1) (draw_of); `where` names the feature and kind in the
    reason ("summarize/long")."""
    z = NormalDist().inv_cdf(a.confidence)
    views = {t: _view(stats.get(t, EMPTY), z, target, a.min_samples) for t in tiers}
    kept = [t for t in tiers if views[t].good or (t == in_use and not views[t].bad)]
    if kept:
        choice, v = kept[0], views[kept[0]]
        how = f"n={v.n:.0f}{'' if v.good else ', in use'}, target {target:g}"
        reason = f"adaptive: {choice} passes {v.rate:.3f} on {where} ({how})"
        cheaper = [views[t].describe(t) for t in tiers[: tiers.index(choice)] if views[t].bad]
        reason += "".join(f"; {c}" for c in cheaper)  # why not a cheaper tier, when known
    else:
        choice, reason = _fallback(tiers, views, start, target, where)
    at = tiers.index(choice)
    if at > 0 and draw < a.explore_share:
        below = tiers[at - 1]
        return _exploring(below, where, views[below].n, f"not {choice}")
    return choice, reason, False


def _exploring(tier: str, where: str, n: float, why: str) -> tuple[str, str, bool]:
    """An exploring job's tier, reason and flag (both rules)."""
    return tier, f"adaptive: exploring {tier} on {where} (n={n:.0f}), {why}", True


def _fallback(
    tiers: Sequence[str], views: Mapping[str, _View], start: str, target: float, where: str
) -> tuple[str, str]:
    """Nothing proven good nor in use: the start tier, or the first dearer one not proven
    bad, or the dearest."""
    above = list(tiers[tiers.index(start) :])
    choice = next((t for t in above if not views[t].bad), tiers[-1])
    failing = [views[t].describe(t) for t in tiers[: tiers.index(choice) + 1] if views[t].bad]
    if not failing:
        return choice, f"adaptive: no tier proven on {where} yet; {choice}"
    dearest = ", the dearest" if views[choice].bad else ""
    return choice, f"adaptive: {', '.join(failing)}, under {target:g} on {where}; {choice}{dearest}"


def decide_by_price(
    tiers: Sequence[str], stats: Mapping[str, TierStats], *, wrong_usd: float,
    cost_usd: Mapping[str, float], draw: float, a: AdaptiveConfig, where: str,
) -> tuple[str, str, bool]:  # fmt: skip
    """The tier for one job when a wrong answer costs `wrong_usd`; why; and whether it
    explores (README: Adaptive routing, "A price on a wrong answer").

    A tier's cost for the job is `cost_usd[tier]` (the job's estimate) plus `wrong_usd` times
    its share of wrong answers. That share is not known, only counted, so the job goes where
    one draw from what the counts allow makes the cost least (Thompson sampling): per tier a
    pass rate drawn from Beta(1 + passed, 1 + failed + doubt), seeded by `draw` (the job's),
    and no higher than the upper Wilson bound of its recent pass rate at `confidence`, so a
    drop shows at once. A tier with few answers draws widely and is tried now and then; one
    whose counts show it costs more is drawn there ever more rarely: exploration stops by
    itself. The job explores when its tier is not the one of least cost at the counts' mean
    pass rates.

    `doubt` is `step_down_doubt` times the number of tiers above the tier (`tiers` lists the
    cheapest first, as [tiers] does), fading to none as its answers come in, at
    `min_samples`: with a doubt, a cold kind starts on the dearest tier and steps down as the
    counts prove a cheaper one. Then, and only then, while the tier below the draws' choice
    has fewer than `min_samples` answers (decayed: a tier whose answers have faded is tried
    again), `explore_share` of the jobs go to it whatever its few answers say, since a
    doubted tier whose saving is small beside `wrong_usd` would hardly ever be drawn, so
    never learnt."""
    z = NormalDist().inv_cdf(a.confidence)
    rng = random.Random(draw)
    drawn: dict[str, float] = {}
    mean: dict[str, float] = {}
    counted = {t: stats.get(t, EMPTY) for t in tiers}
    for i, (t, s) in enumerate(counted.items()):
        fading = max(0.0, 1 - s.n / max(1, a.min_samples))
        failed = s.failed + a.step_down_doubt * (len(tiers) - 1 - i) * fading
        ceiling = bounds(s.recent_passed, s.recent_passed + s.recent_failed, z)[1]
        rate = min(rng.betavariate(1 + s.passed, 1 + failed), ceiling)
        drawn[t] = cost_usd[t] + wrong_usd * (1 - rate)
        expected = min((1 + s.passed) / (2 + s.passed + failed), ceiling)
        mean[t] = cost_usd[t] + wrong_usd * (1 - expected)
    choice, best = min(tiers, key=drawn.__getitem__), min(tiers, key=mean.__getitem__)
    at = tiers.index(choice)
    below = counted[tiers[at - 1]] if at > 0 else None
    if (
        a.step_down_doubt > 0 and below is not None and below.n < a.min_samples
        and rng.random() < a.explore_share
    ):  # fmt: skip
        why = f"below {choice} until it has {a.min_samples} answers"
        return _exploring(tiers[at - 1], where, below.n, why)
    n = counted[choice].n
    if choice != best:
        return _exploring(choice, where, n, f"not {best}")
    passes = counted[choice].passed / n if n else 0.0
    return (
        choice,
        (
            f"adaptive: {choice} passes {passes:.3f} on {where} (n={n:.0f}): ${mean[choice]:.4f} a "
            f"job with a wrong answer at ${wrong_usd:g}, the least"
        ),
        False,
    )


def job_cost_usd(
    cfg: Config, input_tokens: int, stats: Stats | None = None, batched: bool = False
) -> dict[str, float]:
    """A job's cost on each tier as the price rule sees it, billed as the feature's calls
    are: of its estimated input tokens, as many as the feature's answered calls read from
    the prompt cache on average at the tier's cache-read price and the rest at its input
    price, plus their average output tokens at its output price (Stats.per_call: the
    feature's last calls, any tier, since its prompt is cached alike on every model that
    takes its jobs); at the batch discount for a job bound for a Message Batch."""
    cached, output = stats.per_call() if stats is not None else (0.0, 0.0)
    cached = min(cached, max(0, input_tokens))
    out = {}
    for tier, model in cfg.tiers.items():
        p = cfg.models.get(model)
        if p is None:
            out[tier] = 0.0
            continue
        usd = (input_tokens - cached) * p.input_usd_per_mtok + cached * p.cache_read_usd_per_mtok
        usd = (usd + output * p.output_usd_per_mtok) / 1e6
        out[tier] = usd * (1 - p.batch_discount) if batched else usd
    return out


def route(
    cfg: Config, feature: str, input_tokens: int, stats: Stats, job_id: str, *,
    kind: str | None = None, batched: bool = False,
) -> Decision:  # fmt: skip
    """decide() (or decide_by_price() for a feature with wrong_answer_usd) for one job of an
    adaptive feature, from its kind (kind_of; by default its band of input tokens), its
    estimated input tokens and the feature's counts (as judged() takes them); `batched`:
    bound for a Message Batch."""
    a = cfg.router.adaptive
    kind = kind_of(a, input_tokens) if kind is None else kind
    stats = judged(stats)  # a no-op on OutcomeStats' views: judged when read
    f = cfg.features[feature]
    tiers = list(cfg.tiers)
    by_tier = {t: stats.counts.get((kind, t), EMPTY) for t in tiers}
    in_use = stats.in_use.get(kind)
    where = f"{feature}/{kind}"
    if f.wrong_answer_usd is not None:
        tier, reason, explored = decide_by_price(
            tiers, by_tier, wrong_usd=f.wrong_answer_usd,
            cost_usd=job_cost_usd(cfg, input_tokens, stats, batched), draw=draw_of(job_id),
            a=a, where=where,
        )  # fmt: skip
    else:
        assert f.target_pass_rate is not None, "route() is for features that applies() accepts"
        tier, reason, explored = decide(
            tiers, by_tier, target=f.target_pass_rate, start=cfg.router.default_tier,
            in_use=in_use if in_use in tiers else None, draw=draw_of(job_id), a=a, where=where,
        )  # fmt: skip
    moved = not explored and tier != in_use
    return Decision(tier, kind, reason, explored, tier if moved else None)


# Counting: decayed counts in Redis, written as commands on the caller's transaction.
#
# An answer counts 1 when written and half as much every half-life. Redis cannot decay a
# stored count, so each answer adds a weight that grows instead: 2^((t - t0) / half-life)
# from the start t0 of an epoch of EPOCH_HALF_LIVES half-lives, and a reader multiplies by
# 2^(-(now - t0) / half-life). One hash per feature, horizon ("w" the evidence, "r" the recent
# counts) and epoch; the current epoch and the one before are read, older ones weigh < 2^-16.

EPOCH_HALF_LIVES = 16
HORIZONS = ("w", "r")
Mark = Literal["p", "f", "u", ""]  # passed, failed, unjudged (a blind check passed), none


def _half_life_ms(a: AdaptiveConfig, horizon: str) -> int:
    return 1000 * (a.half_life_s if horizon == "w" else a.recent_half_life_s)


def _epoch(half_life_ms: int, t_ms: int) -> int:
    return t_ms // (EPOCH_HALF_LIVES * half_life_ms)


def _weight(half_life_ms: int, t_ms: int, epoch: int) -> float:
    """An answer's weight at t_ms in an epoch: its count at the epoch's start times 2^16."""
    return float(2 ** ((t_ms - epoch * EPOCH_HALF_LIVES * half_life_ms) / half_life_ms))


def _counted_at(keys: Keys, a: AdaptiveConfig, feature: str, horizon: str,
                t_ms: int) -> tuple[int, str, float, int]:  # fmt: skip
    """Where a count at t_ms goes on a horizon: its epoch, the epoch's hash, the weight a
    count adds there (_weight) and the hash's time to live in seconds."""
    half_life = _half_life_ms(a, horizon)
    epoch = _epoch(half_life, t_ms)
    ttl_s = (2 * EPOCH_HALF_LIVES + 1) * half_life // 1000
    return epoch, keys.outcomes(feature, horizon, epoch), _weight(half_life, t_ms, epoch), ttl_s


def add_into(tx: Any, keys: Keys, a: AdaptiveConfig, feature: str, field: str, t_ms: int,
              sign: int, now_ms: int) -> None:  # fmt: skip
    """Queue the count of one answer at t_ms (sign 1) or its removal (-1) on both horizons;
    nothing in an epoch too old to be read at now_ms."""
    for horizon in HORIZONS:
        epoch, key, weight, ttl_s = _counted_at(keys, a, feature, horizon, t_ms)
        if epoch < _epoch(_half_life_ms(a, horizon), now_ms) - 1:
            continue
        tx.hincrbyfloat(key, field, sign * weight)
        tx.expire(key, ttl_s)


class Answered(msgspec.Struct, frozen=True, array_like=True):
    """What `tokenq:answered:<job id>` holds: where the job's answer came from, what it added
    to the counts then (`counted`), what they hold for it now (`held`) since `at_ms`, and the
    last verdict on it."""

    feature: str
    kind: str
    tier: str
    counted: Mark
    held: Mark
    at_ms: int
    verdict: str = ""
    reason: str = ""


def _mark(problem: str | None, blind: bool) -> Mark:
    if problem is None:
        return "u" if blind else "p"
    return "" if problem.startswith(CUT) else "f"


def blind(feature: FeatureConfig) -> bool:
    """Whether the feature's check cannot see a wrong answer: plain text with no expect_regex
    and no min_output_tokens (only an answer cut at max_tokens fails it, and that is room)."""
    return feature.expect == "text" and not feature.expect_regex and not feature.min_output_tokens


def record_into(
    tx: Any, keys: Keys, cfg: Config, *, feature: str, kind: str, job_id: str,
    answers: Sequence[tuple[str, str | None]], now_ms: int, in_use: str | None = None,
    from_cache: bool = False, blind: bool = False,
) -> None:  # fmt: skip
    """Queue on `tx` (the job's finishing MULTI) what the router learns from a job's answers:
    (tier, the check's problem or None) of each, in order, the last one delivered. Per answer
    that is evidence, one HINCRBYFLOAT on each horizon's hash (and its EXPIRE); the job's
    answered record for feedback (SET EX router.adaptive.feedback_ttl_s; about 60 bytes plus
    the key); and with `in_use` (Decision.in_use: the kind's tier in use changed), HSET and
    EXPIRE of the feature's in-use hash. An answer from the response cache (`from_cache`)
    gets its record but is not counted again. With `blind` (the feature's check cannot see a
    wrong answer), an answer that passed is counted unjudged (see judged). Never blocks: the
    caller executes `tx`."""
    a = cfg.router.adaptive
    marks = [] if from_cache else [_mark(problem, blind) for _, problem in answers]
    for (tier, _), mark in zip(answers, marks, strict=False):
        if mark:
            add_into(tx, keys, a, feature, f"{kind}|{tier}|{mark}", now_ms, 1, now_ms)
    if in_use is not None:
        tx.hset(keys.in_use(feature), kind, in_use)
        tx.expire(keys.in_use(feature), 2 * EPOCH_HALF_LIVES * a.half_life_s)
    if a.feedback_ttl_s and answers:
        last = marks[-1] if marks else ""
        record = Answered(feature, kind, answers[-1][0], last, last, now_ms)
        tx.set(keys.answered(job_id), encode(record), ex=a.feedback_ttl_s)


USAGE = "*|*|"  # the usage fields' prefix: kind and tier "*", then n, r or o


def usage_into(tx: Any, keys: Keys, a: AdaptiveConfig, feature: str,
               calls: Sequence[tuple[int, int]], now_ms: int) -> None:  # fmt: skip
    """Queue the usage of a job's answered calls, (cache-read tokens, output tokens) each,
    on the evidence horizon's hash (summed over the calls: at most three HINCRBYFLOAT and an
    EXPIRE a job): what job_cost_usd prices a call by."""
    if not calls:
        return
    _, key, weight, ttl_s = _counted_at(keys, a, feature, "w", now_ms)
    sums = (("n", len(calls)), ("r", sum(r for r, _ in calls)), ("o", sum(o for _, o in calls)))
    for mark, amount in sums:
        if amount:
            tx.hincrbyfloat(key, USAGE + mark, amount * weight)
    tx.expire(key, ttl_s)


encode = msgspec.json.Encoder().encode
decode_answered = msgspec.json.Decoder(Answered).decode


# Reading.


MARKS = ("wp", "wf", "rp", "rf", "wu", "ru")  # horizon + mark, in TierStats' order


def _plan(a: AdaptiveConfig, now_ms: int) -> list[tuple[str, int]]:
    """The (horizon, epoch) hashes a read takes."""
    return [
        (h, e)
        for h in HORIZONS
        for e in (_epoch(_half_life_ms(a, h), now_ms) - 1, _epoch(_half_life_ms(a, h), now_ms))
    ]


def tally(
    a: AdaptiveConfig, now_ms: int, hashes: Mapping[tuple[str, int], Mapping[str, str]],
    in_use: Mapping[str, str] | None = None,
) -> Stats:  # fmt: skip
    """A feature's counts at now_ms from its hashes by (horizon, epoch), and its in-use hash.
    Fields that are not counts are left out; a count taken below zero (rounding) is zero."""
    sums: dict[tuple[str, str, str], float] = {}
    usage = {"n": 0.0, "r": 0.0, "o": 0.0}
    for (horizon, epoch), fields in hashes.items():
        half_life = _half_life_ms(a, horizon)
        decay = 2 ** ((epoch * EPOCH_HALF_LIVES * half_life - now_ms) / half_life)
        for name, value in fields.items():
            kind, _, rest = name.partition("|")
            tier, _, mark = rest.rpartition("|")
            try:
                count = float(value) * decay
            except ValueError:
                continue
            if not math.isfinite(count):
                continue
            if kind == "*" and tier == "*" and mark in usage and horizon == "w":
                usage[mark] += count
            elif mark in ("p", "f", "u") and tier and tier != "*":
                key = (kind, tier, horizon + mark)
                sums[key] = sums.get(key, 0.0) + count
    pairs = {(k, t) for k, t, _ in sums}
    counts = {
        (k, t): TierStats(*(max(0.0, sums.get((k, t, m), 0.0)) for m in MARKS)) for k, t in pairs
    }
    n, r, o = (max(0.0, usage[m]) for m in ("n", "r", "o"))
    return Stats(counts, dict(in_use or {}), n, r, o)


async def read_stats(
    redis: aioredis.Redis, keys: Keys, a: AdaptiveConfig, feature: str, now_ms: int
) -> Stats:
    """A feature's counts from Redis: five HGETALLs in one pipelined round trip."""
    plan = _plan(a, now_ms)
    async with redis.pipeline(transaction=False) as pipe:
        for horizon, epoch in plan:
            pipe.hgetall(keys.outcomes(feature, horizon, epoch))
        pipe.hgetall(keys.in_use(feature))
        *replies, in_use = await pipe.execute()
    return tally(a, now_ms, dict(zip(plan, replies, strict=True)), in_use)


class OutcomeStats:
    """A process's view of the fleet's counts, per feature, read at most every cache_ms.

    Concurrent jobs of a feature whose view is stale wait on one read."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self._views: dict[str, tuple[int, Stats]] = {}
        self._reads: dict[str, asyncio.Task[Stats]] = {}

    async def get(self, cfg: Config, feature: str, now_ms: int) -> Stats:
        """The feature's counts as the router goes by them (judged(): once a read, not once
        a job); raises RedisError when they cannot be read."""
        held = self._views.get(feature)
        if held is not None and now_ms - held[0] < cfg.router.adaptive.cache_ms:
            return held[1]
        read = self._reads.get(feature)
        if read is None:
            coro = self._read(cfg.router.adaptive, feature, now_ms)
            read = self._reads[feature] = asyncio.create_task(coro)
            read.add_done_callback(lambda t: self._done(feature, t, now_ms))
        # Shielded: one waiter's cancellation must not cancel the read the others wait on.
        return await asyncio.shield(read)

    async def _read(self, a: AdaptiveConfig, feature: str, now_ms: int) -> Stats:
        return judged(await read_stats(self.redis, self.keys, a, feature, now_ms))

    def _done(self, feature: str, read: asyncio.Task[Stats], now_ms: int) -> None:
        self._reads.pop(feature, None)
        if not read.cancelled() and read.exception() is None:  # retrieved: no "never retrieved"
            self._views[feature] = (now_ms, read.result())
