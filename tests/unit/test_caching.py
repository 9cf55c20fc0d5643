"""Prompt-cache breakpoints, the response cache's key and the tail's hit rates."""

from __future__ import annotations

from typing import Any

from worker.caching import cache_key, mark_prompt_cache, normalised
from worker.config import FeatureConfig
from worker.contract import Keys, UsageEvent
from worker.usage import HitRates, tail_line

LONG = "policy " * 400  # 2,800 characters: about 700 tokens


def req(system: Any = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi?"}], **extra}
    if system is not None:
        body["system"] = system
    return body


def test_a_long_system_prompt_gets_one_breakpoint_at_its_end() -> None:
    marked = mark_prompt_cache(req(LONG), "auto", 512)
    assert marked["system"] == [
        {"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}
    ]
    blocks = [{"type": "text", "text": "a"}, {"type": "text", "text": LONG}]
    marked = mark_prompt_cache(req(blocks), "1h", 512)
    assert marked["system"][0] == {"type": "text", "text": "a"}
    assert marked["system"][1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}


def test_no_breakpoint_when_short_off_or_already_marked() -> None:
    short = req("Be brief.")
    assert mark_prompt_cache(short, "auto", 512) is short
    assert mark_prompt_cache(req(LONG), "off", 512)["system"] == LONG
    assert mark_prompt_cache(req(LONG), "auto", 1024)["system"] == LONG  # 700 < 1,024
    mine = req([{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}],
               cache_control={"type": "ephemeral"})  # fmt: skip
    assert mark_prompt_cache(mine, "auto", 512) is mine  # the producer's breakpoints stay


def test_tools_alone_are_marked_on_the_last_tool() -> None:
    tools = [{"name": f"t{n}", "description": LONG, "input_schema": {}} for n in range(2)]
    marked = mark_prompt_cache(req(tools=tools), "5m", 512)
    assert "cache_control" not in marked["tools"][0]
    assert marked["tools"][1]["cache_control"] == {"type": "ephemeral"}


def test_equivalent_requests_share_a_key_and_different_ones_do_not() -> None:
    as_text = req("Sys", metadata={"user_id": "u1"})
    as_blocks = {
        "system": [{"type": "text", "text": "Sys", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}],
    }
    assert normalised(as_text) == normalised(as_blocks)
    assert normalised(req("Sys")) != normalised(req("Sys", max_tokens=5))
    assert normalised(req("Sys")) != normalised(req("Other"))


def test_the_key_is_scoped_to_the_tenant_unless_shared() -> None:
    own, shared = FeatureConfig(), FeatureConfig(response_cache_scope="shared")
    keys = Keys("t")
    a = cache_key(keys, "faq", own, "acme", "m", req())
    assert a.startswith("t:rcache:faq:tenant:acme:")
    assert a != cache_key(keys, "faq", own, "globex", "m", req())
    assert a != cache_key(keys, "faq", own, "acme", "other-model", req())
    assert cache_key(keys, "faq", shared, "acme", "m", req()) == cache_key(
        keys, "faq", shared, "globex", "m", req()
    )


def event(feature: str, response: str, read: int = 0, write: int = 0) -> UsageEvent:
    return UsageEvent(ts_ms=0, job_id="j", feature=feature, response_cache=response,
                      cache_read_input_tokens=read, cache_creation_input_tokens=write)  # fmt: skip


def test_tail_hit_rates_per_feature() -> None:
    rates = HitRates()
    for e in [event("faq", "miss", write=900), event("faq", "hit"), event("faq", "joined"),
              event("faq", "miss", read=900), event("doc", "off", read=10)]:  # fmt: skip
        rates.add(e)
    assert rates.describe("faq") == "hits: response 2/4 50%, prompt 1/2 50%"
    assert rates.describe("doc") == "hits: prompt 1/1 100%"
    assert rates.describe("none") == ""


def test_tail_lines_carry_the_features_hit_rates() -> None:
    rates = HitRates()
    first = tail_line(event("faq", "miss", write=900), rates)
    second = tail_line(event("faq", "hit"), rates)
    assert first.endswith("  [faq hits: response 0/1 0%, prompt 0/1 0%]")
    assert second.endswith("  [faq hits: response 1/2 50%, prompt 0/1 0%]")
    alert = UsageEvent(ts_ms=0, job_id="", feature="faq", kind="alert", message="80% of cap")
    assert "[" not in tail_line(alert, rates) and "ALERT faq" in tail_line(alert, rates)
