"""Router decisions, answer checks, worst-case cost, budget periods and breaker bookkeeping."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import anthropic
import httpx2
import pybreaker
import pytest

from worker.breakers import MirrorStorage, is_failure
from worker.budgets import caps_for, worst_case_usd
from worker.config import Config, FeatureConfig, RouteRule, load_config, parse_config
from worker.contract import Job, Keys
from worker.errors import ConfigError
from worker.router import (
    cheaper,
    check_answer,
    classifier_answer,
    classifier_text,
    dearer,
    request_hash,
    static_route,
)


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config("config.toml")


def with_rules(cfg: Config, *rules: RouteRule) -> Config:
    import msgspec

    return msgspec.structs.replace(
        cfg, router=msgspec.structs.replace(cfg.router, rules=list(rules))
    )


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 10}


FREE = FeatureConfig()  # no fixed tier


def test_forced_tier_beats_feature_tier_beats_rules(cfg: Config) -> None:
    rules = with_rules(cfg, RouteRule(tier="opus", keywords=["refactor"]))
    job = Job(feature="f", request="{}", tier="haiku")
    assert static_route(rules, job, FeatureConfig(tier="sonnet"), ask("refactor"), 5) == (
        "haiku", "forced by job.tier",
    )  # fmt: skip
    job = Job(feature="f", request="{}")
    assert static_route(rules, job, FeatureConfig(tier="sonnet"), ask("refactor"), 5) == (
        "sonnet", "features.f.tier",
    )  # fmt: skip
    assert static_route(rules, job, FREE, ask("Please REFACTOR this"), 5) == (
        "opus", "rule 0 (keywords)",
    )  # fmt: skip
    assert static_route(rules, job, FREE, ask("hello"), 5) is None


def test_rules_match_on_every_condition_given_and_the_first_match_wins(cfg: Config) -> None:
    rules = with_rules(
        cfg,
        RouteRule(tier="opus", features=["review"], min_input_tokens=1000, name="big reviews"),
        RouteRule(tier="sonnet", min_input_tokens=1000),
        RouteRule(tier="haiku", max_input_tokens=999),
    )
    review, other = Job(feature="review", request="{}"), Job(feature="other", request="{}")
    assert static_route(rules, review, FREE, ask("x"), 5000) == ("opus", "rule 0 (big reviews)")
    assert static_route(rules, other, FREE, ask("x"), 5000) == ("sonnet", "rule 1 (input >= 1000)")
    assert static_route(rules, review, FREE, ask("x"), 10) == ("haiku", "rule 2 (input <= 999)")


def test_keywords_are_found_in_system_prompt_and_text_blocks(cfg: Config) -> None:
    rules = with_rules(cfg, RouteRule(tier="opus", keywords=["proof"]))
    job = Job(feature="f", request="{}")
    blocks = {
        "system": [{"type": "text", "text": "Check the PROOF."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    assert static_route(rules, job, FREE, blocks, 5) == ("opus", "rule 0 (keywords)")


def test_tiers_are_ordered_cheapest_first(cfg: Config) -> None:
    assert list(cfg.tiers) == ["haiku", "sonnet", "opus"]
    assert dearer(cfg, "haiku") == "sonnet" and dearer(cfg, "opus") is None
    assert cheaper(cfg, "opus") == "sonnet" and cheaper(cfg, "haiku") is None


def test_answer_checks() -> None:
    json_feature = FeatureConfig(expect="json")
    assert check_answer(json_feature, '{"a": 1}', "end_turn") is None
    assert check_answer(json_feature, '```json\n{"a": 1}\n```', "end_turn") is None
    assert check_answer(json_feature, "sure! here", "end_turn") == "answer is not JSON"
    assert check_answer(FREE, "cut", "max_tokens") == "stop_reason max_tokens"
    assert check_answer(FREE, "anything", "end_turn") is None


def test_classifier_answer_and_request_hash(cfg: Config) -> None:
    assert classifier_answer(cfg, "Sonnet.") == "sonnet"
    assert classifier_answer(cfg, "I think opus, maybe") == "opus"
    assert classifier_answer(cfg, "no idea") is None
    assert request_hash({"model": "a", **ask("x")}) == request_hash({"model": "b", **ask("x")})
    assert request_hash(ask("x")) != request_hash(ask("y"))


def test_the_classifier_sees_the_question_behind_a_long_system_prompt() -> None:
    short = {"system": "Sort tickets.", "messages": [{"role": "user", "content": "Refund?"}]}
    assert classifier_text(short, 100) == "Sort tickets. Refund?"  # it fits: the whole text
    long = {
        "system": "Classify the ticket. " + "policy " * 500,
        "messages": [
            {"role": "user", "content": "old turn " * 50},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "Why was my card charged twice?"},
        ],
    }
    shown = classifier_text(long, 400)
    assert len(shown) <= 400
    assert shown.startswith("Classify the ticket. policy")
    assert shown.endswith(" [...] Why was my card charged twice?")
    huge_question = {"messages": [{"role": "user", "content": "q" * 1000}]}
    assert classifier_text(huge_question, 400) == "q" * 400


def test_worst_case_pads_the_input_and_takes_the_dearest_applicable_prices(cfg: Config) -> None:
    haiku = cfg.models["claude-haiku-5-5"]
    plain = worst_case_usd(haiku, 1000, 100, caches=False, margin=0.2)
    assert plain == pytest.approx((1201 * 0.10 + 100 * 0.50) / 1e6)
    cached = worst_case_usd(haiku, 1000, 100, caches=True, margin=0.2)
    assert cached == pytest.approx((1201 * 0.20 + 100 * 0.50) / 1e6)  # the 1-hour write price
    long = worst_case_usd(haiku, 90_000, 100, caches=False, margin=0.2)  # 108,001 > 100,000
    assert long == pytest.approx((108_001 * 0.50 + 100 * 2.50) / 1e6)


def test_budget_periods_follow_the_configured_time_zone(cfg: Config) -> None:
    import msgspec

    berlin = msgspec.structs.replace(
        cfg, budgets=msgspec.structs.replace(cfg.budgets, timezone="Europe/Berlin")
    )
    feature = FeatureConfig(daily_usd=1.0, monthly_usd=10.0, tenant_daily_requests=5)
    late = dt.datetime(2026, 11, 30, 23, 30, tzinfo=dt.UTC)  # 00:30 on Dec 1st in Berlin
    caps = caps_for(berlin, Keys("t"), "f", feature, "acme", late)
    assert [c.name for c in caps] == [
        "features.f.daily_usd", "features.f.monthly_usd",
        "features.f.tenant_daily_requests (tenant acme)",
    ]  # fmt: skip
    assert [c.period for c in caps] == ["2026-12-01", "2026-12", "2026-12-01"]
    assert caps[0].key == "t:budget:feature:f:2026-12-01"
    assert caps[0].resets_at.isoformat() == "2026-12-02T00:00:00+01:00"
    assert caps[1].resets_at.isoformat() == "2027-01-01T00:00:00+01:00"
    assert caps[2].key == "t:budget:tenant:f:acme:2026-12-01"
    in_utc = caps_for(cfg, Keys("t"), "f", feature, "", late)
    assert [c.period for c in in_utc] == ["2026-11-30", "2026-11"]  # no tenant: no tenant cap


def test_mirror_storage_remembers_what_pybreaker_changed() -> None:
    storage = MirrorStorage("feature:x")
    breaker = pybreaker.CircuitBreaker(fail_max=2, state_storage=storage,
                                       throw_new_error_on_trip=False)  # fmt: skip

    def fail() -> None:
        raise RuntimeError("529")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            breaker.call(fail)
    assert breaker.current_state == "open"
    assert storage.transition == ("closed", "open") and storage.opened_at is not None
    assert storage.fail_delta == 2 and storage.dirty
    storage.load("half-open", 0, 0, 1_800_000_000_000)
    assert not storage.dirty and breaker.state.name == "half-open"
    breaker.call(lambda: None)  # success_threshold 1: closes
    assert breaker.current_state == "closed" and storage.transition == ("half-open", "closed")


def _status_error(cls: type[anthropic.APIStatusError], status: int) -> anthropic.APIStatusError:
    request = httpx2.Request("POST", "http://sim/v1/messages")
    return cls("x", response=httpx2.Response(status, request=request), body=None)


def test_only_api_failures_count_against_a_breaker() -> None:
    request = httpx2.Request("POST", "http://sim/v1/messages")
    assert is_failure(None) is False
    assert is_failure(_status_error(anthropic.InternalServerError, 529)) is True
    assert is_failure(anthropic.APIConnectionError(request=request)) is True
    assert is_failure(anthropic.APITimeoutError(request=request)) is True
    assert is_failure(_status_error(anthropic.RateLimitError, 429)) is None
    assert is_failure(_status_error(anthropic.BadRequestError, 400)) is None
    assert is_failure(asyncio.CancelledError()) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"budgets": {"timezone": "Mars/Olympus"}}, "budgets.timezone = 'Mars/Olympus'"),
        ({"router": {"rules": [{"tier": "gpt"}]}}, "router.rules[0].tier = 'gpt' is not a tier"),
        ({"features": {"f": {"max_tokens": 500, "max_tokens_cap": 100}}},
         "features.f.max_tokens_cap = 100 is below its max_tokens = 500"),
        ({"features": {"f": {"budget_policy": "pray"}}}, "features.f.budget_policy = 'pray'"),
    ],
)  # fmt: skip
def test_spend_settings_are_checked(raw: dict[str, Any], message: str) -> None:
    import tomllib
    from pathlib import Path

    base = tomllib.loads(Path("config.toml").read_text())
    for section, values in raw.items():
        if section == "features":
            base["features"] = {**base["features"], **values}
        else:
            base[section] = {**base[section], **values}
    with pytest.raises(ConfigError) as caught:
        parse_config(base)
    assert message in str(caught.value)
