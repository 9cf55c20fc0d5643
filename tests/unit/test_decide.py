"""worker.decide: what a call's outcome means for a job, as pure functions of the config and
the job in hand (no Redis, no API)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import msgspec
import pytest

from worker import clock, decide
from worker.breakers import Open
from worker.budgets import Cap, Refusal
from worker.calls import Answered, CallFor, Stopped
from worker.config import Config, load_config
from worker.contract import Job
from worker.decide import Work
from worker.errors import CircuitOpen, DeadlineExceeded
from worker.jobrun import Call, JobRun
from worker.jobs import ApiMessage, Defer
from worker.outcomes import Ending
from worker.queue import Delivery
from worker.usage import ApiUsage

ROOT = Path(__file__).resolve().parents[2]


def config(**feature: object) -> Config:
    cfg = load_config(ROOT / "config.toml")
    summarize = msgspec.structs.replace(cfg.features["summarize"], expect="json", **feature)
    return msgspec.structs.replace(cfg, features={**cfg.features, "summarize": summarize})


def work(cfg: Config, deadline_ms: int | None = None) -> Work:
    d = Delivery("normal", "t:jobs:normal", "1-0", {"feature": "summarize", "request": "{}"})
    job = Job(feature="summarize", request="{}", deadline_ms=deadline_ms)
    run = JobRun(first_ms=1, tier="haiku", route=["features.summarize.tier"])
    w = Work(d, 0, CallFor(d, job, run, 1), cfg.features["summarize"])
    w.params = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    return w


def answer(w: Work, text: str) -> Answered:
    assert w.c is not None
    call = Call(model="claude-haiku-5-5", tier=w.c.run.tier, started_ms=5, state="answered")
    call.cost_usd = 0.001
    w.c.run.calls.append(call)
    usage = {"input_tokens": 10, "output_tokens": 5}
    message = ApiMessage("claude-haiku-5-5", [{"type": "text", "text": text}], usage, "end_turn")
    return Answered(message, ApiUsage(10, 5), call)


def refusal() -> Refusal:
    resets = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
    cap = Cap("features.summarize.daily_usd", "k", "2030-01-01", 0.001, None, 60, resets)
    return Refusal(cap, "usd", 0.0, 0.0, 0.01)


def test_a_failing_answer_is_escalated_and_kept_in_hand() -> None:
    cfg = config()
    w = work(cfg)
    got = answer(w, "not json")
    assert decide.decide(cfg, w, got) is None  # call again
    assert w.c is not None and w.c.run.tier == "sonnet" and w.held is got
    assert w.c.run.route[-1] == "escalated to sonnet: answer is not JSON"


def test_an_escalation_a_budget_refuses_delivers_the_answer_in_hand() -> None:
    cfg = config()
    w = work(cfg)
    decide.decide(cfg, w, answer(w, "not json"))
    end = decide.decide(cfg, w, refusal())
    assert isinstance(end, Ending) and w.c is not None
    assert (end.result.status, end.result.tier, end.result.text) == ("error", "haiku", "not json")
    assert end.result.error is not None and end.result.error.type == "check_failed"
    assert end.event.route_reason.endswith(
        "not escalated to sonnet: features.summarize.daily_usd would be passed; "
        "check failed: answer is not JSON"
    )
    assert end.event.cost_usd == 0.001 and end.dead is None  # paid, and no dead letter


def test_a_deferred_escalation_keeps_its_new_tier_and_drops_the_answer(
    moved_clock: clock.MovableClock,
) -> None:
    cfg = config(budget_policy="defer")
    w = work(cfg)
    decide.decide(cfg, w, answer(w, "not json"))
    step = decide.decide(cfg, w, refusal())
    resets_ms = int(refusal().cap.resets_at.timestamp() * 1000)
    assert isinstance(step, Defer) and step.until_ms == resets_ms
    assert w.held is None and w.c is not None
    run = w.c.run
    assert (run.tier, run.deferrals, run.deferred_at_ms) == ("sonnet", 1, clock.now_ms())


def test_an_open_breaker_with_policy_fail_and_no_answer_ends_the_job() -> None:
    cfg = config(breaker_policy="fail")
    with pytest.raises(CircuitOpen, match="breaker feature:summarize is open"):
        decide.decide(cfg, work(cfg), Open("feature:summarize", 0))


def test_a_deferral_past_the_deadline_ends_the_job(moved_clock: clock.MovableClock) -> None:
    cfg = config()
    w = work(cfg, deadline_ms=clock.now_ms() + 1000)
    with pytest.raises(DeadlineExceeded, match="past its deadline_ms"):
        decide.decide(cfg, w, Open("feature:summarize", clock.now_ms() + 5000))


def test_the_spend_limit_defers_and_looks_again_each_minute(
    moved_clock: clock.MovableClock,
) -> None:
    cfg = config()
    month_end = clock.now_ms() + 10 * 86_400_000
    step = decide.decide(cfg, work(cfg), Stopped(month_end))
    assert isinstance(step, Defer) and step.until_ms == clock.now_ms() + decide.STOP_LOOK_MS


def test_no_call_past_max_attempts_but_an_answer_in_hand_is_delivered() -> None:
    cfg = config()
    w = work(cfg)
    decide.decide(cfg, w, answer(w, "not json"))
    assert w.c is not None
    w.c.run.calls += [Call(model="m", tier="sonnet", started_ms=6, state="failed")] * 4
    why_not = decide.why_not(cfg, w)
    assert why_not is not None and why_not[1] == "queue.max_attempts reached"
    end = decide.give_up(cfg, w, *why_not)
    assert isinstance(end, Ending) and end.event.attempt == 5
    assert end.result.error is not None and end.result.error.type == "check_failed"
