"""The synthetic ground truth through the official SDK: answers right or wrong by skill and
difficulty, wrong JSON that shows, skills changed mid-run, tokenq's own classifier prompt
answered with a tier it can read, and the back door (/_sim/grade) that tells a benchmark
which answers were right.

The simulator is a process of this module's own, started with `--quality on`.
"""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from anthropic.types import Message

from simulator.__main__ import main
from simulator.tokens import LABELS
from simulator.truth import DEFAULT_SKILLS, right_tier
from tests.helpers import own_simulator, settings_restored, sim_call
from worker.config import load_config
from worker.router import classifier_answer, classifier_request, tier_order

HAIKU, SONNET = "claude-haiku-5-5", "claude-sonnet-5-5"
ROOT = Path(__file__).resolve().parents[2]
TAXONOMY = "Classify the ticket into one of the categories below. Reply with JSON only."
DEFAULTS: dict[str, Any] = {
    "quality": "on", "signal": 0.5, "skills": {}, "json_visible": 0.6,
    "classifier_accuracy": 0.8, "seed": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def simulator_url() -> Iterator[str]:
    with own_simulator("--quality", "on") as url:
        yield url


@pytest.fixture(autouse=True)
def clean(simulator_url: str) -> Iterator[None]:
    with settings_restored(simulator_url, DEFAULTS):
        yield


def ticket(i: int) -> dict[str, Any]:
    """A classification job's request, as a producer writes it (no model)."""
    words = " ".join(["refund", "login", "invoice", "outage", "card"][j % 5] for j in range(i))
    return {"system": TAXONOMY, "messages": [{"role": "user", "content": f"Ticket {i}: {words}"}]}


def as_sent(request: dict[str, Any], model: str, max_tokens: int = 300) -> dict[str, Any]:
    """The request as tokenq sends it: a model, max_tokens, the system prompt marked for the
    prompt cache."""
    system = [{"type": "text", "text": request["system"], "cache_control": {"type": "ephemeral"}}]
    return {**request, "model": model, "max_tokens": max_tokens, "system": system}


def passes_schema(text: str) -> bool:
    """The check a feature with tokens.JSON_SCHEMA makes."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (
        isinstance(value, dict)
        and isinstance(value.get("answer"), str)
        and (value.get("label") in LABELS)
    )


def text_of(message: Message) -> str:
    [block] = message.content
    assert block.type == "text"
    return block.text


def grade(url: str, body: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = sim_call(url, "grade", body)
    return answer


async def test_json_answers_pass_their_schema_exactly_when_right_and_grades_agree(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"skills": {HAIKU: 1.5}, "json_visible": 1.0})
    jobs = [ticket(i) for i in range(1, 61)]
    answers = [await client.messages.create(**as_sent(job, HAIKU)) for job in jobs]
    ids = ",".join(m.id for m in answers)
    recorded = sim_call(simulator_url, f"grade?ids={ids}")["ids"]
    # The benchmark's way: the job's request and its answer's model; no markers, no max_tokens.
    items = grade(simulator_url, {"items": [{"request": j, "model": HAIKU} for j in jobs]})
    assert items["quality"] == "on"
    for message, item in zip(answers, items["items"], strict=True):
        truth = recorded[message.id]
        assert truth["model"] == HAIKU and truth["kind"] == item["kind"] == "classify_ticket"
        assert truth["correct"] == item["correct"]
        assert truth["difficulty"] == item["difficulty"]
        assert passes_schema(text_of(message)) == truth["correct"]  # every wrong one shows
    rights = sum(recorded[m.id]["correct"] for m in answers)
    assert 0 < rights < len(answers)


async def test_lowering_a_skill_mid_run_makes_that_model_wrong_and_no_other(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    jobs = [ticket(i) for i in range(1, 31)]

    async def rights(model: str) -> int:
        answers = [await client.messages.create(**as_sent(job, model)) for job in jobs]
        ids = ",".join(m.id for m in answers)
        return sum(
            t["correct"] for t in sim_call(simulator_url, f"grade?ids={ids}")["ids"].values()
        )

    sim_call(simulator_url, "config", {"skills": {HAIKU: 12.0}})
    assert await rights(HAIKU) == 30
    sonnet_before = await rights(SONNET)
    shown = sim_call(simulator_url, "config", {"skills": {HAIKU: 0.0}})
    assert shown["skills"] == {**DEFAULT_SKILLS, HAIKU: 0.0}
    assert await rights(HAIKU) < 20
    assert await rights(SONNET) == sonnet_before


async def test_tokenqs_classifier_prompt_gets_a_tier_it_reads_and_the_grade_knows_why(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"classifier_accuracy": 1.0})
    cfg = load_config(ROOT / "config.toml")
    tiers = tier_order(cfg)
    named: set[str] = set()
    for i in range(1, 40):
        # Under router.classifier.max_chars (4,000): the classifier is shown the whole text.
        job = {
            "messages": [{"role": "user", "content": f"Review this change {i}: " + "x " * 40 * i}]
        }
        call = classifier_request(cfg, job)
        message = await client.messages.create(**call)
        tier = classifier_answer(cfg, text_of(message))
        assert tier is not None, text_of(message)
        named.add(tier)
        difficulty = grade(simulator_url, {"items": [{"request": job, "model": HAIKU}]})["items"][
            0
        ]["difficulty"]
        assert tiers.index(tier) == right_tier(tiers, DEFAULT_SKILLS, difficulty)
        recorded = sim_call(simulator_url, f"grade?ids={message.id}")["ids"][message.id]
        assert recorded["kind"] == "route" and recorded["correct"] is True
    assert len(named) >= 2


async def test_batch_answers_are_judged_and_recorded_like_realtime_ones(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"skills": {HAIKU: 1.5}, "json_visible": 1.0})
    requests: Any = [
        {"custom_id": f"t{i}", "params": as_sent(ticket(i), HAIKU)} for i in range(1, 21)
    ]
    batch = await client.messages.batches.create(requests=requests)
    sim_call(simulator_url, "advance", {"seconds": 5})
    lines = [line async for line in await client.messages.batches.results(batch.id)]
    messages = {line.custom_id: line.result.message for line in lines
                if line.result.type == "succeeded"}  # fmt: skip
    assert len(messages) == 20
    ids = ",".join(m.id for m in messages.values())
    recorded = sim_call(simulator_url, f"grade?ids={ids}")["ids"]
    for message in messages.values():
        assert passes_schema(text_of(message)) == recorded[message.id]["correct"]
    realtime = await client.messages.create(**as_sent(ticket(1), HAIKU))
    assert recorded[messages["t1"].id]["correct"] == passes_schema(text_of(realtime))


def test_grade_refuses_what_it_cannot_grade_naming_the_item(simulator_url: str) -> None:
    for body, says in (
        ({"items": [{"request": ticket(1), "model": "claude-nope"}]}, "items[0].model:"),
        ({"items": [{"request": {"system": "x"}, "model": HAIKU}]}, "items[0].request: messages"),
        ({"items": [{"request": {"messages": "hi"}, "model": HAIKU}]}, "items[0].request:"),
        ({"itms": []}, "unknown field `itms`"),
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            sim_call(simulator_url, "grade", body)
        assert err.value.code == 400
        assert says in json.loads(err.value.read())["error"]


async def test_with_quality_off_every_answer_is_right_and_nothing_is_recorded(
    client: anthropic.AsyncAnthropic, simulator_url: str
) -> None:
    sim_call(simulator_url, "config", {"quality": "off", "skills": {HAIKU: 0.0}})
    message = await client.messages.create(**as_sent(ticket(7), HAIKU))
    assert json.loads(text_of(message)).keys() == {"answer"}  # the answer of old
    answer = grade(simulator_url, {"items": [{"request": ticket(7), "model": HAIKU}],
                                   "ids": [message.id]})  # fmt: skip
    assert answer["quality"] == "off" and answer["ids"] == {message.id: None}
    [item] = answer["items"]
    assert item["correct"] is True and item["p_correct"] == 1.0
    assert item["kind"] == "classify_ticket"


def test_quality_settings_are_checked_at_run_time(simulator_url: str) -> None:
    for change, says in (
        ({"quality": "maybe"}, 'quality is "on"'),
        ({"signal": 1.5}, "signal"),
        ({"skills": {"claude-nope": 3}}, "'claude-nope' is not a model"),
        ({"skills": {HAIKU: -1}}, "is not a skill from 0 to 20"),
        ({"classifier_accuracy": -0.1}, "classifier_accuracy"),
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            sim_call(simulator_url, "config", change)
        assert err.value.code == 400
        assert says in json.loads(err.value.read())["error"]
    assert sim_call(simulator_url, "config")["quality"] == "on"


def test_quality_flags_set_it_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, says in (
        (["--skill", "claude-haiku-5-5"], "is not MODEL=SKILL"),
        (["--skill", "claude-nope=3"], "'claude-nope' is not a model"),
        (["--signal", "2"], "not a rate between 0 and 1"),
        (["--quality", "maybe"], "invalid choice"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert says in capsys.readouterr().err
    args = ("--quality", "on", "--skill", f"{HAIKU}=3", "--signal", "0.8", "--json-visible", "1")
    with own_simulator(*args, "--classifier-accuracy", "0.9") as url:
        shown = sim_call(url, "config")
    assert shown["quality"] == "on" and shown["skills"] == {**DEFAULT_SKILLS, HAIKU: 3.0}
    assert shown["signal"] == 0.8 and shown["json_visible"] == 1.0
    assert shown["classifier_accuracy"] == 0.9
