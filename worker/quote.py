"""`tokenq estimate`: what a request, or a workload of them, would cost before it runs.

Input tokens are counted with the API's free `POST /v1/messages/count_tokens` when the API
(or the simulator) answers, once per request on the model the router would send it to, and
with the worker's local estimate (worker.estimate: four characters a token) otherwise; the
result says which. Output is not knowable before the call: each request is priced at its
`max_tokens` (the feature's when it gives none, clamped to `max_tokens_cap`), the most it can
cost, unless an output size is given.

Each request is priced with the worker's own cost code (worker.usage.cost_usd: every token
kind at its price, the long-context band) on every tier and on its routed tier
(worker.router.static_route; a request the classifier would route goes on
router.default_tier), in four ways:

- real time, no prompt caching;
- with prompt caching: the worker marks the stable prefix (tools and system) when it is at
  least the model's `min_cache_tokens` (worker.caching.mark_prompt_cache). Its first call
  writes the cache, a later call within the cache's lifetime (5 minutes, or 1 hour with
  `prompt_cache = "1h"`; every read extends it) reads it. A single request shows both; a
  workload is replayed in order of its `t_ms`, per model and prefix;
- in a batch window, for priorities in `batch.priorities`: the model's `batch_discount` off;
- both.

The response cache and de-duplication are not counted: they depend on repeats of whole
requests and on timing that a trace only hints at.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from worker.api_request import parse_request
from worker.caching import has_cache_control, mark_prompt_cache
from worker.config import Config, FeatureConfig
from worker.contract import Job
from worker.errors import ConfigError, MalformedJob
from worker.estimate import REQUEST_OVERHEAD, raw_estimate
from worker.router import static_route
from worker.usage import ApiUsage, CacheCreation, cost_usd, money

if TYPE_CHECKING:
    import anthropic

COUNT_FIELDS = ("messages", "system", "tools", "tool_choice", "thinking")
COUNTS_AT_ONCE = 8  # count_tokens requests in flight together


@dataclass(frozen=True)
class Item:
    """One request to price: its parameters and what the worker would do with it."""

    params: dict[str, Any]
    feature: str  # "" when none was given
    priority: str
    t_ms: int = 0


@dataclass
class Priced:
    """A request's tokens and routing."""

    item: Item
    tier: str
    why: str  # the router's reason
    input_tokens: int  # the whole prompt
    prefix_tokens: int  # the part prompt caching would cache (0: none)
    output_tokens: int
    cache_ttl_s: int  # 300 or 3600
    batched: bool  # its priority goes to batch windows


@dataclass
class Totals:
    """A workload's cost per scenario (USD)."""

    requests: int = 0
    per_tier: dict[str, float] = field(default_factory=dict)  # every job on a tier, real time
    routed: float = 0.0
    routed_cached: float = 0.0
    routed_cached_batched: float = 0.0
    routed_batched: float = 0.0
    per_feature: dict[str, list[float]] = field(default_factory=dict)  # [jobs, all levers]
    tiers_used: dict[str, int] = field(default_factory=dict)


def read_workload(lines: Iterable[str], where: str) -> list[Item]:
    """The reference trace's JSONL (bench/workloads/make_workload.py: {"t_ms", "feature",
    "tenant", "priority", "request"} a line); ConfigError naming the line that is not."""
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("request"), dict):
                raise ValueError('not an object with a "request" object')
            items.append(Item(
                _checked(json.dumps(row["request"])), str(row.get("feature") or ""),
                str(row.get("priority") or "normal"), int(row.get("t_ms") or 0),
            ))  # fmt: skip
        except (ValueError, TypeError, MalformedJob) as exc:
            raise ConfigError(f"{where} line {n}: {exc}") from None
    if not items:
        raise ConfigError(f"{where} holds no requests (one JSON object a line)")
    return items


def read_request(text: str, feature: str, priority: str) -> Item:
    """One request (a JSON object of Messages API parameters), checked as the worker would."""
    try:
        return Item(_checked(text), feature, priority)
    except MalformedJob as exc:
        raise ConfigError(str(exc).removesuffix(" Fix the producer.")) from None


def _checked(text: str) -> dict[str, Any]:
    request = parse_request(text)  # the worker's own check
    params: dict[str, Any] = msgspec.to_builtins(request)
    return params


def route(cfg: Config, item: Item) -> tuple[str, str]:
    """The tier the worker would send a request to, and why."""
    feature = cfg.features.get(item.feature)
    if feature is None:
        reason = f"feature {item.feature!r} is not in [features]" if item.feature else "no feature"
        return cfg.router.default_tier, f"{reason}: router.default_tier"
    job = Job(feature=item.feature, request="")
    found = static_route(cfg, job, feature, item.params)
    if found is not None:
        return found
    if cfg.router.classifier.enabled:
        return cfg.router.default_tier, "the classifier decides; shown on router.default_tier"
    return cfg.router.default_tier, "router.default_tier"


Count = Callable[[str, dict[str, Any]], Awaitable[int]]


async def local_count(model: str, params: dict[str, Any]) -> int:
    """The worker's local estimate (no API call)."""
    return raw_estimate(params)


def api_count(client: anthropic.AsyncAnthropic) -> Count:
    """count_tokens on the API (free; no cache is read or written)."""

    async def count(model: str, params: dict[str, Any]) -> int:
        body = {k: params[k] for k in COUNT_FIELDS if k in params}
        answer = await client.messages.count_tokens(model=model, **body)
        return int(answer.input_tokens)

    return count


async def price_all(
    cfg: Config, items: list[Item], count: Count, *, output_tokens: int | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> list[Priced]:  # fmt: skip
    """Count and route every item (at most COUNTS_AT_ONCE counts at once; `progress` hears
    of each one done). Raises what `count` raises (the caller falls back to local_count)."""
    gate = asyncio.Semaphore(COUNTS_AT_ONCE)

    async def one(item: Item) -> Priced:
        tier, why = route(cfg, item)
        model = cfg.tiers[tier]
        async with gate:
            tokens = await count(model, item.params)
        progress(1)
        return _priced(cfg, item, tier, why, tokens, output_tokens)

    return list(await asyncio.gather(*(one(i) for i in items)))


def _priced(cfg: Config, item: Item, tier: str, why: str, tokens: int,
            output_tokens: int | None) -> Priced:  # fmt: skip
    feature = cfg.features.get(item.feature) or FeatureConfig()
    model = cfg.models[cfg.tiers[tier]]
    marked = mark_prompt_cache(item.params, feature.prompt_cache, model.min_cache_tokens)
    prefix = 0
    if has_cache_control(marked):
        head: dict[str, Any] = {k: item.params[k] for k in ("system", "tools") if k in item.params}
        raw_prefix = raw_estimate({**head, "messages": []}) - REQUEST_OVERHEAD
        # The count covers the whole request; the prefix keeps its local share of it.
        prefix = min(tokens, math.ceil(tokens * raw_prefix / max(1, raw_estimate(item.params))))
    wanted = item.params.get("max_tokens") or feature.max_tokens
    cap = feature.max_tokens_cap
    out = output_tokens if output_tokens is not None else min(wanted, cap or wanted)
    ttl = 3600 if feature.prompt_cache == "1h" else 300
    return Priced(item, tier, why, tokens, prefix, out, ttl, item.priority in cfg.batch.priorities)


def cost(cfg: Config, p: Priced, tier: str, *, cache: str = "off", batch: bool = False) -> float:
    """One request's cost on a tier: cache "off", "write" (its first call) or "read"."""
    prices = cfg.models[cfg.tiers[tier]]
    cached = p.prefix_tokens if cache != "off" else 0
    write_1h = cached if cache == "write" and p.cache_ttl_s == 3600 else 0
    usage = ApiUsage(
        input_tokens=p.input_tokens - cached,
        output_tokens=p.output_tokens,
        cache_creation_input_tokens=cached if cache == "write" else 0,
        cache_read_input_tokens=cached if cache == "read" else 0,
        cache_creation=CacheCreation(cached - write_1h if cache == "write" else 0, write_1h),
    )
    return cost_usd(usage, prices, batch=batch)


def workload_totals(cfg: Config, priced: list[Priced]) -> Totals:
    """A workload's cost in each scenario; prompt caching replayed in `t_ms` order."""
    totals = Totals(requests=len(priced))
    last_use: dict[tuple[str, str], int] = {}  # (model, prefix digest) -> ms
    for p in sorted(priced, key=lambda p: p.item.t_ms):
        for tier in cfg.tiers:
            totals.per_tier[tier] = totals.per_tier.get(tier, 0.0) + cost(cfg, p, tier)
        state = "off"
        if p.prefix_tokens:
            key = (cfg.tiers[p.tier], _prefix_digest(p.item.params))
            seen = last_use.get(key)
            state = (
                "read"
                if seen is not None and p.item.t_ms - seen <= p.cache_ttl_s * 1000
                else "write"
            )
            last_use[key] = p.item.t_ms  # a read refreshes the entry's lifetime
        plain = cost(cfg, p, p.tier)
        cached = cost(cfg, p, p.tier, cache=state)
        totals.routed += plain
        totals.routed_cached += cached
        totals.routed_batched += cost(cfg, p, p.tier, batch=p.batched)
        levers = cost(cfg, p, p.tier, cache=state, batch=p.batched)
        totals.routed_cached_batched += levers
        row = totals.per_feature.setdefault(p.item.feature or "(none)", [0.0, 0.0])
        row[0] += 1
        row[1] += levers
        totals.tiers_used[p.tier] = totals.tiers_used.get(p.tier, 0) + 1
    return totals


def _prefix_digest(params: dict[str, Any]) -> str:
    head = {k: params[k] for k in ("tools", "system") if k in params}
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:24]


def request_table(cfg: Config, p: Priced, source: str, output: str) -> str:
    """One request for people: tokens, routing, and a row per tier."""
    model = cfg.tiers[p.tier]
    lines = [
        f"input: {p.input_tokens:,} tokens, from {source}"
        + (f" on {model}" if source.startswith("count_tokens") else ""),
        f"  of them {p.prefix_tokens:,} the prefix prompt caching would cache (tools and system)"
        if p.prefix_tokens else
        "  no prompt caching: no tools or system prompt of at least the model's "
        "min_cache_tokens, or the feature's prompt_cache is off",
        f"output: {p.output_tokens:,} tokens; {output}",
        f"routed: {p.tier} ({p.why}); priority {p.item.priority}: "
        + ("a batch window (batch.priorities)" if p.batched else "real time"),
        "",
        f"{'tier':<8} {'model':<20} {'real time':>11} {'cache 1st':>11} {'cache later':>11} "
        f"{'batch':>11} {'batch+cache':>11}",
    ]  # fmt: skip
    for tier, model_id in cfg.tiers.items():
        figures = [cost(cfg, p, tier)]
        if p.prefix_tokens:
            figures += [
                cost(cfg, p, tier, cache="write"),
                cost(cfg, p, tier, cache="read"),
            ]
        cells = [money(f) for f in figures] + ["-"] * (3 - len(figures))
        cells += [money(cost(cfg, p, tier, batch=True))]
        cells += [money(cost(cfg, p, tier, cache="read", batch=True))] if p.prefix_tokens else ["-"]
        mark = "  <- routed" if tier == p.tier else ""
        lines.append(f"{tier:<8} {model_id:<20} " + " ".join(f"{c:>11}" for c in cells) + mark)
    return "\n".join(lines)


def workload_table(cfg: Config, priced: list[Priced], how: str, where: str) -> str:
    """A workload for people: each scenario's cost and saving, then a line per feature."""
    t = workload_totals(cfg, priced)
    naive_tier = cfg.router.baseline_tier
    naive = t.per_tier[naive_tier]

    def line(label: str, usd: float) -> str:
        saved = f"{1 - usd / naive:>7.1%}" if naive else ""
        return f"  {label:<52} {money(usd):>12} {saved}"

    out = [
        f"workload: {t.requests:,} requests from {where}; {how}",
        f"  {'':<52} {'cost':>12} {'saved':>7} (against every job on {naive_tier}, real time)",
    ]
    for tier in cfg.tiers:
        out.append(line(f"every job on {tier}, real time", t.per_tier[tier]))
    used = ", ".join(f"{tier} {n:,}" for tier, n in t.tiers_used.items())
    out += [
        line(f"as routed ({used}), real time", t.routed),
        line("as routed + prompt caching", t.routed_cached),
        line(f"as routed + batch windows ({', '.join(cfg.batch.priorities) or 'none'})",
             t.routed_batched),
        line("as routed + prompt caching + batch windows", t.routed_cached_batched),
        "",
        f"  {'feature':<24} {'jobs':>7} {'as routed, every lever':>24}",
    ]  # fmt: skip
    for feature, (jobs, usd) in sorted(t.per_feature.items()):
        out.append(f"  {feature:<24} {int(jobs):>7,} {money(usd):>24}")
    out.append("  (not counted: the response cache and de-duplication)")
    return "\n".join(out)


def as_json(cfg: Config, priced: list[Priced], source: str) -> dict[str, Any]:
    """The figures as one JSON object (`--json`)."""
    t = workload_totals(cfg, priced)
    return {
        "requests": t.requests, "source": source,
        "input_tokens": sum(p.input_tokens for p in priced),
        "output_tokens": sum(p.output_tokens for p in priced),
        "per_tier_usd": t.per_tier, "routed_usd": t.routed,
        "routed_prompt_cache_usd": t.routed_cached, "routed_batch_usd": t.routed_batched,
        "routed_all_levers_usd": t.routed_cached_batched, "tiers_used": t.tiers_used,
        "per_feature": {f: {"jobs": int(j), "usd": u} for f, (j, u) in t.per_feature.items()},
    }  # fmt: skip
