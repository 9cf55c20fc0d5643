"""The simulator's prompt cache: prefix order and hashing, breakpoints, minimum lengths, TTLs
and the usage split (anthropic-api.md §4).

Time is a number the test moves: Cache.plan and Cache.commit take the request's start time.
"""

from __future__ import annotations

from typing import Any

import pytest

from simulator.cache import Cache, Plan, Split, prefix_of, uncached
from simulator.clock import SimClock
from simulator.errors import ApiError
from simulator.tokens import Body, input_tokens

T0 = 1_790_000_000.0
HAIKU = "claude-haiku-5-5"  # minimum 512 tokens
LONG = "policy " * 600  # 4,200 characters: 1,050 tokens
EPHEMERAL: dict[str, Any] = {"type": "ephemeral"}
ONE_HOUR: dict[str, Any] = {"type": "ephemeral", "ttl": "1h"}


def body(system: str = LONG, question: str = "What is the refund window?", **extra: Any) -> Body:
    """A request with a long system prompt marked for caching and one user question."""
    return {
        "model": HAIKU,
        "max_tokens": 100,
        "system": [{"type": "text", "text": system, "cache_control": EPHEMERAL}],
        "messages": [{"role": "user", "content": question}],
        **extra,
    }


def run(cache: Cache, request: Body, now: float = T0) -> Split:
    """One request start to answer: plan at `now`, commit; its usage split."""
    plan = planned(cache, request, now)
    cache.commit(plan, now)
    return plan.split


def planned(cache: Cache, request: Body, now: float = T0) -> Plan:
    prefix = prefix_of(request)
    if prefix is None:
        return uncached(input_tokens(request))
    return cache.plan(request["model"], prefix, now)


def system_tokens(request: Body) -> int:
    """Tokens up to and including the system prompt (no tools): the system breakpoint."""
    return input_tokens(request) - input_tokens({**request, "system": None})


def test_a_request_without_cache_control_is_not_hashed() -> None:
    assert prefix_of({"model": HAIKU, "system": LONG, "messages": [
        {"role": "user", "content": "hi"}]}) is None  # fmt: skip


def test_the_split_adds_up_to_what_count_tokens_says() -> None:
    request = body(
        tools=[{"name": "lookup", "input_schema": {"type": "object"}, "cache_control": EPHEMERAL}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "a " * 400}]},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "b", "cache_control": EPHEMERAL}],
            },
        ],
    )
    prefix = prefix_of(request)
    assert prefix is not None and prefix.input_tokens == input_tokens(request)
    cache = Cache()
    for split in (run(cache, request), run(cache, request)):
        total = split.input_tokens + split.write_5m + split.write_1h + split.read
        assert total == input_tokens(request)


def test_first_request_writes_and_the_second_reads() -> None:
    cache = Cache()
    request = body()
    cached = system_tokens(request)
    first = run(cache, request)
    assert first.write_5m == cached and first.read == 0 and first.write_1h == 0
    assert first.input_tokens == input_tokens(request) - cached
    second = run(cache, body(question="And the exchange window?"), T0 + 10)
    assert second.read == cached and second.write_5m == 0
    assert second.input_tokens > 0


def test_a_changed_prefix_misses() -> None:
    cache = Cache()
    run(cache, body())
    changed = run(cache, body(system=LONG + "!"), T0 + 1)
    assert changed.read == 0 and changed.write_5m > 0


def test_changed_tools_invalidate_the_system_prefix() -> None:
    cache = Cache()
    tool = {"name": "lookup", "input_schema": {"type": "object"}}
    run(cache, body(tools=[tool]))
    again = run(cache, body(tools=[{**tool, "description": "finds things"}]), T0 + 1)
    assert again.read == 0


def test_tool_choice_invalidates_messages_but_not_system() -> None:
    cache = Cache()
    turns = [{"role": "user", "content": [
        {"type": "text", "text": "c " * 300, "cache_control": EPHEMERAL}]}]  # fmt: skip
    request = body(messages=turns)
    first = run(cache, request)
    assert first.write_5m == input_tokens(request) - 3  # everything before the overhead
    changed = run(cache, {**request, "tool_choice": {"type": "auto"}}, T0 + 1)
    assert changed.read == system_tokens(request)  # the system breakpoint still hits
    assert changed.write_5m == input_tokens(request) - 3 - system_tokens(request)


def test_a_prefix_below_the_minimum_is_uncached_without_error() -> None:
    cache = Cache()
    short = body(system="short system prompt " * 20)  # about 100 tokens, minimum 512
    for now in (T0, T0 + 1):
        split = run(cache, short, now)
        assert split == Split(input_tokens(short))


def test_the_minimum_is_per_model() -> None:
    cache = Cache()
    request = body()  # about 1,050 tokens: over Haiku 5.5's 512, under Haiku 4.5's 4,096
    assert run(cache, {**request, "model": "claude-haiku-4-5"}).write_5m == 0
    assert run(cache, request).write_5m == system_tokens(request)


def test_five_minute_entry_expires_300_s_after_the_request_started() -> None:
    cache = Cache()
    run(cache, body())
    assert planned(cache, body(), T0 + 299.9).split.read > 0
    assert planned(cache, body(), T0 + 300).split.read == 0


def test_a_hit_refreshes_the_lifetime_from_its_own_start() -> None:
    cache = Cache()
    run(cache, body())
    assert run(cache, body(), T0 + 200).read > 0  # now lives until T0 + 500
    assert planned(cache, body(), T0 + 499).split.read > 0
    assert planned(cache, body(), T0 + 500).split.read == 0


def test_one_hour_entries_outlive_five_minutes() -> None:
    cache = Cache()
    request = body()
    request["system"][0]["cache_control"] = ONE_HOUR
    first = run(cache, request)
    assert first.write_1h == system_tokens(request) and first.write_5m == 0
    assert planned(cache, request, T0 + 3599).split.read > 0
    assert planned(cache, request, T0 + 3600).split.read == 0


def test_mixed_ttls_bill_each_stretch_at_its_breakpoints_ttl() -> None:
    cache = Cache()
    turns = [{"role": "user", "content": [
        {"type": "text", "text": "d " * 400, "cache_control": EPHEMERAL}]}]  # fmt: skip
    request = body(messages=turns)
    request["system"][0]["cache_control"] = ONE_HOUR
    split = run(cache, request)
    assert split.write_1h == system_tokens(request)
    assert split.write_5m == input_tokens(request) - 3 - system_tokens(request)
    # Six minutes on, the 5m entry is gone and the 1h one is read: the rest is written again.
    later = run(cache, request, T0 + 360)
    assert later.read == system_tokens(request) and later.write_5m == split.write_5m


def test_a_one_hour_breakpoint_after_a_five_minute_one_is_refused() -> None:
    turns = [{"role": "user", "content": [
        {"type": "text", "text": "e", "cache_control": ONE_HOUR}]}]  # fmt: skip
    with pytest.raises(ApiError, match="must not come after a ttl='5m'") as refused:
        prefix_of(body(messages=turns))
    assert refused.value.status == 400


def test_a_fifth_breakpoint_is_refused_with_the_apis_message() -> None:
    blocks = [{"type": "text", "text": f"part {i}", "cache_control": EPHEMERAL} for i in range(4)]
    request = body(messages=[{"role": "user", "content": blocks}])  # 1 system + 4
    with pytest.raises(ApiError) as refused:
        prefix_of(request)
    assert refused.value.status == 400
    assert refused.value.message == (
        "A maximum of 4 blocks with cache_control may be provided. Found 5."
    )


def test_automatic_caching_takes_one_of_the_four_slots() -> None:
    blocks = [{"type": "text", "text": f"part {i}", "cache_control": EPHEMERAL} for i in range(3)]
    request = body(messages=[{"role": "user", "content": [*blocks, {"type": "text", "text": "x"}]}])
    assert prefix_of(request) is not None  # 4 explicit
    with pytest.raises(ApiError, match="Found 5"):
        prefix_of({**request, "cache_control": EPHEMERAL})


def test_automatic_caching_follows_a_growing_conversation() -> None:
    cache = Cache()
    turns: list[dict[str, Any]] = [{"role": "user", "content": "f " * 1200}]
    auto = {"model": HAIKU, "max_tokens": 10, "messages": turns, "cache_control": EPHEMERAL}
    first = run(cache, auto)
    assert first.write_5m == input_tokens(auto) - 3 and first.input_tokens == 3
    longer = {**auto, "messages": [*turns, {"role": "assistant", "content": "ok"},
                                   {"role": "user", "content": "more"}]}  # fmt: skip
    second = run(cache, longer, T0 + 1)
    assert second.read == first.write_5m  # found by walking back from the new last block
    assert second.write_5m == input_tokens(longer) - input_tokens(auto)


def test_lookback_stops_after_twenty_blocks() -> None:
    cache = Cache()
    first_turn = [{"type": "text", "text": "g " * 1200, "cache_control": EPHEMERAL}]
    base = {"model": HAIKU, "max_tokens": 10, "messages": [{"role": "user", "content": first_turn}]}
    run(cache, base)

    def grown(extra_blocks: int) -> Body:
        extra: list[dict[str, Any]] = [
            {"type": "text", "text": f"h{i}"} for i in range(extra_blocks)
        ]
        extra[-1]["cache_control"] = EPHEMERAL
        plain = [{"type": "text", "text": "g " * 1200}]
        return {**base, "messages": [{"role": "user", "content": plain + extra}]}

    assert planned(cache, grown(19), T0 + 1).split.read > 0  # 20 blocks back from the last
    assert planned(cache, grown(20), T0 + 1).split.read == 0


def test_automatic_ttl_differing_from_the_last_blocks_own_is_refused() -> None:
    turns = [{"role": "user", "content": [
        {"type": "text", "text": "i", "cache_control": EPHEMERAL}]}]  # fmt: skip
    with pytest.raises(ApiError, match="same ttl"):
        prefix_of(body(messages=turns, cache_control=ONE_HOUR))


def test_cache_control_on_an_empty_text_block_is_refused() -> None:
    empty = {"type": "text", "text": "", "cache_control": EPHEMERAL}
    turns = [{"role": "user", "content": [{"type": "text", "text": "j"}, empty]}]
    with pytest.raises(ApiError, match=r"messages\.0\.content\.1\.cache_control"):
        prefix_of(body(messages=turns))


@pytest.mark.parametrize(
    ("cache_control", "says"),
    [({"type": "persistent"}, "'ephemeral'"), ({"type": "ephemeral", "ttl": "2h"}, "'5m' or '1h'"),
     ({"type": "ephemeral", "scope": "org"}, "scope: Extra inputs")],
)  # fmt: skip
def test_bad_cache_control_names_the_field(cache_control: dict[str, Any], says: str) -> None:
    request = body()
    request["system"][0]["cache_control"] = cache_control
    with pytest.raises(ApiError, match=says):
        prefix_of(request)


def test_parallel_first_requests_all_miss() -> None:
    cache = Cache()
    one, two = planned(cache, body()), planned(cache, body(question="other"))
    assert one.split.read == two.split.read == 0
    cache.commit(one, T0)
    cache.commit(two, T0)
    assert planned(cache, body(), T0 + 1).split.read > 0


def test_sim_clock_moves_forward_only() -> None:
    clock = SimClock(lambda: T0)
    clock.advance(301)
    assert clock() == T0 + 301
    with pytest.raises(ValueError, match="never goes back"):
        clock.advance(-1)
