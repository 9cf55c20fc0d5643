"""tokenq estimate's arithmetic: routing, the prompt-cache replay, batch windows, workloads."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from worker import quote
from worker.config import load_config, parse_config
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CFG = load_config(ROOT / "config.toml")
POLICY = "You are the support assistant of Acme. " * 100  # about 1,000 tokens: cacheable
FAQ = {"system": POLICY, "messages": [{"role": "user", "content": "Where is my order?"}]}


def priced(item: quote.Item, tokens: int = 1100, output: int | None = None) -> quote.Priced:
    tier, why = quote.route(CFG, item)
    return quote._priced(CFG, item, tier, why, tokens, output)


def test_a_request_is_routed_as_the_worker_would_and_priced_at_its_max_tokens() -> None:
    p = priced(quote.Item(FAQ, "support_faq", "high"))
    assert (p.tier, p.why) == ("haiku", "features.support_faq.tier")
    assert p.output_tokens == 300  # the feature's max_tokens
    big = priced(quote.Item({**FAQ, "max_tokens": 5000}, "support_faq", "high"))
    assert big.output_tokens == 600  # clamped to max_tokens_cap
    assert priced(quote.Item(FAQ, "", "normal")).why == "no feature: router.default_tier"


def test_real_time_cache_and_batch_prices_on_a_tier() -> None:
    p = priced(quote.Item(FAQ, "support_faq", "low"), tokens=1100, output=100)
    assert 900 < p.prefix_tokens < 1100 and p.batched
    plain = quote.cost(CFG, p, "sonnet")
    assert plain == pytest.approx((1100 * 2.0 + 100 * 10.0) / 1e6)
    rest = 1100 - p.prefix_tokens
    write = quote.cost(CFG, p, "sonnet", cache="write")
    assert write == pytest.approx((rest * 2.0 + p.prefix_tokens * 2.5 + 100 * 10.0) / 1e6)
    read = quote.cost(CFG, p, "sonnet", cache="read")
    assert read == pytest.approx((rest * 2.0 + p.prefix_tokens * 0.10 + 100 * 10.0) / 1e6)
    assert quote.cost(CFG, p, "sonnet", batch=True) == pytest.approx(plain / 2)


def test_a_short_prefix_is_not_cached() -> None:
    p = priced(
        quote.Item({"system": "Be brief.", "messages": FAQ["messages"]}, "support_faq", "high")
    )
    assert p.prefix_tokens == 0
    assert quote.cost(CFG, p, "haiku", cache="read") == quote.cost(CFG, p, "haiku")


def test_the_workload_replays_the_prompt_cache_by_time() -> None:
    at = [0, 60_000, 60_000 + 301_000, 60_000 + 301_000 + 200_000]  # the third comes too late
    items = [quote.Item(FAQ, "support_faq", "high", t) for t in at]
    t = quote.workload_totals(CFG, [priced(i, output=10) for i in items])
    p = priced(items[0], output=10)
    write, read = (quote.cost(CFG, p, "haiku", cache=c) for c in ("write", "read"))
    assert t.routed_cached == pytest.approx(2 * write + 2 * read)
    assert t.routed == pytest.approx(4 * quote.cost(CFG, p, "haiku"))
    assert t.routed_cached_batched == pytest.approx(t.routed_cached)  # high is real time


def test_one_hour_cache_and_batch_windows_in_a_workload() -> None:
    cfg = parse_config({**_raw(), "features": {**_raw()["features"],
                        "support_faq": {"tier": "haiku", "prompt_cache": "1h"}}})  # fmt: skip
    items = [quote.Item(FAQ, "support_faq", "low", t) for t in (0, 1_800_000)]
    rows = [quote._priced(cfg, i, "haiku", "x", 1100, 10) for i in items]
    t = quote.workload_totals(cfg, rows)
    write_1h = quote.cost(cfg, rows[0], "haiku", cache="write", batch=True)
    read = quote.cost(cfg, rows[0], "haiku", cache="read", batch=True)
    assert t.routed_cached_batched == pytest.approx(write_1h + read)
    assert t.per_feature["support_faq"] == [2, pytest.approx(write_1h + read)]


def _raw() -> dict[str, Any]:
    return tomllib.loads((ROOT / "config.toml").read_text())


def test_workload_lines_are_checked_naming_the_line() -> None:
    good = json.dumps({"t_ms": 5, "feature": "summarize", "priority": "low", "request": FAQ})
    [item] = quote.read_workload([good, ""], "w.jsonl")
    assert (item.feature, item.priority, item.t_ms) == ("summarize", "low", 5)
    with pytest.raises(ConfigError, match=r"w.jsonl line 2: .*temperature"):
        quote.read_workload([good, json.dumps({"request": {**FAQ, "temperature": 1}})], "w.jsonl")
    with pytest.raises(ConfigError, match=r"w\.jsonl line 1: "):
        quote.read_workload(["not json"], "w.jsonl")
    with pytest.raises(ConfigError, match="holds no requests"):
        quote.read_workload([], "w.jsonl")
