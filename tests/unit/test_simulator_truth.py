"""The simulator's synthetic ground truth (simulator/truth.py): difficulty per request, pass
rates per skill, visible wrong JSON, the classifier's tier guesses. Pure functions, no server.

Rates are checked over a few thousand requests against their expected value, within four
standard errors: a test fails by chance about once in 16,000 runs, and its inputs are fixed,
so a pass or a failure repeats.
"""

from __future__ import annotations

import json
import math
import runpy
from collections.abc import Iterator
from pathlib import Path
from statistics import median, quantiles
from typing import Any

import pytest

from simulator import truth
from simulator.grades import Grader
from simulator.tokens import LABELS, reply, text_tokens
from simulator.truth import Quality, judge, right_tier

ROOT = Path(__file__).resolve().parents[2]
HAIKU, SONNET, OPUS = "claude-haiku-5-5", "claude-sonnet-5-5", "claude-opus-5-5"
ON = Quality(mode="on", seed=3)
WORDS = ("alpha", "beta", "gamma", "delta", "queue", "worker", "stream", "token", "answer",
         "review", "ticket")  # fmt: skip
TIERS = "You route requests to a model tier. Tiers, cheapest first: haiku, sonnet, opus. "


def texts(n: int, *, start: str = "", words: tuple[int, int] = (5, 400)) -> Iterator[str]:
    """n distinct texts of varied lengths, deterministic."""
    low, high = words
    for i in range(n):
        size = low + (i * 7919) % (high - low)
        yield start + " ".join(WORDS[(i + j * j) % len(WORDS)] for j in range(size)) + f" #{i}"


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"max_tokens": 300, "messages": [{"role": "user", "content": text}], **extra}


def reference_jobs(jobs: int, seed: int) -> list[dict[str, Any]]:
    """The reference workload generator's jobs (bench/workloads/make_workload.py)."""
    make = runpy.run_path(str(ROOT / "bench" / "workloads" / "make_workload.py"))["make"]
    made: list[dict[str, Any]] = make(jobs, seed)
    return made


def within_sampling_error(hits: int, chances: list[float]) -> bool:
    """Whether `hits` successes fit independent draws with these chances (4 sigma)."""
    expected = sum(chances)
    sigma = math.sqrt(sum(p * (1 - p) for p in chances))
    return abs(hits - expected) <= 4 * sigma + 1


def test_markers_max_tokens_and_block_form_do_not_change_the_truth() -> None:
    plain = {
        "system": "Classify the ticket into one of the categories below. Reply with JSON only.",
        "messages": [{"role": "user", "content": "My card was declined twice, why?"}],
        "max_tokens": 50,
    }
    marked = {
        "model": OPUS,
        "system": [{"type": "text", "text": plain["system"],
                    "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "My card was declined twice, why?",
             "cache_control": {"type": "ephemeral"}}]}],
        "max_tokens": 4096, "cache_control": {"type": "ephemeral"}, "metadata": {"user_id": "u"},
    }  # fmt: skip
    for model in (HAIKU, SONNET, OPUS):
        grade = judge(plain, model, ON).grade
        assert judge(marked, model, ON).grade == grade == judge(plain, model, ON).grade
        assert grade.kind == "classify_ticket"


def test_the_truth_is_deterministic_and_the_seed_redraws_it() -> None:
    bodies = [ask(t) for t in texts(400)]
    first = [judge(b, HAIKU, ON).grade for b in bodies]
    assert [judge(b, HAIKU, ON).grade for b in bodies] == first
    other = Quality(mode="on", seed=4)
    redrawn = [judge(b, HAIKU, other).grade for b in bodies]
    # The difficulty is the request's own; the draw of right or wrong depends on the seed.
    assert [g.difficulty for g in redrawn] == [g.difficulty for g in first]
    assert [g.correct for g in redrawn] != [g.correct for g in first]


def test_the_reference_workload_maps_to_its_kinds_and_their_mixes() -> None:
    jobs = reference_jobs(2000, 7)
    by_kind: dict[str, list[float]] = {}
    for job in jobs:
        text = truth.request_text(job["request"])
        kind = truth.kind_of(text)
        assert kind == job["feature"]
        by_kind.setdefault(kind, []).append(
            truth.difficulty_of(text, kind, 0.5, truth._text_key(text))
        )
    easy = {kind: sum(d < 2 for d in ds) / len(ds) for kind, ds in by_kind.items()}
    assert easy["support_faq"] > 0.85 and easy["nightly_enrich"] > 0.85  # mostly easy
    classify = by_kind["classify_ticket"]
    assert easy["classify_ticket"] > 0.7 and quantiles(classify, n=20)[-1] > 4  # a hard tail
    assert 2.5 < median(by_kind["summarize_doc"]) < 4  # medium
    assert median(by_kind["code_review"]) > 4.5  # mostly hard
    assert all(0 <= d <= 10 for ds in by_kind.values() for d in ds)


@pytest.mark.parametrize("skills", [truth.DEFAULT_SKILLS, {HAIKU: 1.5, SONNET: 3.0, OPUS: 9.0}])
def test_pass_rates_per_model_match_the_logistic_curve(skills: dict[str, float]) -> None:
    q = Quality(mode="on", seed=5, skills=skills)
    bodies = [ask(t) for t in texts(2000)]
    for model in (HAIKU, SONNET, OPUS):
        grades = [judge(b, model, q).grade for b in bodies]
        chances = [truth.p_correct(skills[model], g.difficulty) for g in grades]
        assert [g.p_correct for g in grades] == chances
        assert within_sampling_error(sum(g.correct for g in grades), chances), model
    # One draw per request for every model: whatever the weaker one gets right, so does
    # the stronger one.
    weak, strong = (
        (judge(b, HAIKU, q).grade for b in bodies),
        (judge(b, OPUS, q).grade for b in bodies),
    )
    assert all(s.correct for w, s in zip(weak, strong, strict=True) if w.correct)


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = rank
        return out

    rx, ry = ranks(xs), ranks(ys)
    mean = (len(xs) - 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(rx, ry, strict=True))
    var = sum((a - mean) ** 2 for a in rx)
    return cov / var


@pytest.mark.parametrize(("signal", "low", "high"), [(0.0, -0.08, 0.08), (0.5, 0.62, 0.76),
                                                     (1.0, 0.99, 1.0)])  # fmt: skip
def test_signal_is_how_much_the_observable_score_explains(
    signal: float, low: float, high: float
) -> None:
    # Summaries of 2,000 to 6,000 tokens: the observable score is their length.
    summaries = [
        f"Summarize in 3 sentences:\n{'text ' * (1600 + i * 32 // 15)}#{i}" for i in range(1500)
    ]
    seen = [truth.observable(t, "summarize_doc") for t in summaries]
    difficulty = [
        truth.difficulty_of(t, "summarize_doc", signal, truth._text_key(t)) for t in summaries
    ]
    # For normal scores with correlation r, Spearman's is 6/pi asin(r/2): 0.69 at r = 0.71.
    assert low <= spearman(seen, difficulty) <= high


def test_length_hard_words_and_structure_raise_the_observable_score() -> None:
    short, long = "Summarize in 3 sentences:\n" + "word " * 2000, "Summarize:\n" + "word " * 5000
    assert truth.observable(short, "summarize_doc") < truth.observable(long, "summarize_doc")
    # Texts of one length (1,000 tokens, mid-range for "other"), with and without.
    filler = "word " * 800
    hard = " Why is there a race condition? Tell me, and mind the edge cases."  # 3 markers
    fenced = "\n```\ncode\n```\n"  # a code fence pair
    base = truth.observable(filler + "x" * len(hard), "other")
    assert -1 < base < 1
    assert truth.observable(filler + hard, "other") == pytest.approx(base + 3 * truth.MARKER_WEIGHT)
    padded = filler + "x" * (len(hard) - len(fenced)) + fenced
    assert truth.observable(padded, "other") == pytest.approx(base + truth.STRUCTURE_WEIGHT)


def schema_check(text: str) -> str:
    """ "ok", "not_json" or "schema": the check a feature's JSON Schema (tokens.JSON_SCHEMA)
    makes."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return "not_json"
    ok = (
        isinstance(value, dict)
        and isinstance(value.get("answer"), str)
        and value.get("label") in LABELS
    )
    return "ok" if ok else "schema"


def test_wrong_json_answers_fail_their_check_at_the_documented_rate() -> None:
    q = Quality(mode="on", seed=2, skills={HAIKU: 1.0}, json_visible=0.6)
    grader = Grader(lambda: q)
    checks: dict[str, list[str]] = {"right": [], "wrong": []}
    for text in texts(3000, start="Reply with JSON only. "):
        body = {**ask(text), "model": HAIKU}
        (answer, tokens, stop_reason, _), grade = grader.reply(body, HAIKU)
        assert grade is not None and stop_reason == "end_turn"
        # Right or wrong, the answer costs what the answer without ground truth costs.
        assert tokens == reply(body).output_tokens == text_tokens(answer)
        checks["right" if grade.correct else "wrong"].append(schema_check(answer))
    assert set(checks["right"]) == {"ok"}
    wrong = checks["wrong"]
    assert len(wrong) > 1000
    failed = sum(c != "ok" for c in wrong)
    assert within_sampling_error(failed, [0.6] * len(wrong))
    assert within_sampling_error(wrong.count("not_json"), [0.3] * len(wrong))


def test_answers_not_asked_for_json_look_the_same_right_or_wrong() -> None:
    right, poor = Quality(mode="on", skills={HAIKU: 20.0}), Quality(mode="on", skills={HAIKU: 0})
    wrong = 0
    for text in texts(100):
        body = {**ask(text), "model": HAIKU}
        assert judge(body, HAIKU, right).grade.correct
        wrong += not judge(body, HAIKU, poor).grade.correct
        answers = {Grader(lambda: right).reply(body, HAIKU)[0],
                   Grader(lambda: poor).reply(body, HAIKU)[0]}  # fmt: skip
        assert answers == {reply(body)}
    assert wrong > 20


def classify(text: str, q: Quality) -> truth.Judgement:
    body = {"model": HAIKU, "max_tokens": 5, "system": TIERS + "Reply with exactly one tier.",
            "messages": [{"role": "user", "content": text}]}  # fmt: skip
    return judge(body, HAIKU, q)


@pytest.mark.parametrize("accuracy", [1.0, 0.8, 0.5])
def test_the_classifier_names_the_right_tier_at_its_accuracy(accuracy: float) -> None:
    q = Quality(mode="on", seed=9, classifier_accuracy=accuracy)
    tiers = ["haiku", "sonnet", "opus"]
    right_guesses, seen_right = 0, set()
    requests = [*texts(1000, start="Review this change: "), *texts(1000, words=(5, 60))]
    for text in requests:
        judged = classify(text, q)
        # The right tier for the request the classifier is shown, as graded on its own.
        grade = judge(ask(text), OPUS, q).grade
        right = right_tier(tiers, q.skills, grade.difficulty)
        assert judged.text is not None and judged.grade.kind == "route"
        guess = tiers.index(judged.text)
        assert abs(guess - right) <= 1 and judged.grade.correct == (guess == right)
        right_guesses += guess == right
        seen_right.add(right)
    assert seen_right == {0, 1, 2}  # the requests need every tier
    assert within_sampling_error(right_guesses, [accuracy] * len(requests))


def test_the_right_tier_is_the_cheapest_likely_to_be_right() -> None:
    skills = {HAIKU: 4.0, SONNET: 5.5, OPUS: 7.0}
    assert right_tier(["haiku", "sonnet", "opus"], skills, 0.5) == 0
    assert right_tier(["haiku", "sonnet", "opus"], skills, 4.5) == 2  # sonnet gives 0.82
    assert right_tier(["haiku", "sonnet", "opus"], skills, 9.5) == 2  # none: the last
    # A name no model id contains is as skilled as the tier before it.
    assert right_tier(["haiku", "medium", "opus"], skills, 2.0) == 0
    assert right_tier(["small", "sonnet"], skills, 3.0) == 1


def test_with_quality_off_every_answer_is_right_and_unchanged() -> None:
    off = Quality(mode="off", skills={HAIKU: 0})
    for text in texts(50, start="Answer in JSON: "):
        judged = judge({**ask(text), "model": HAIKU}, HAIKU, off)
        assert judged.grade.correct and judged.grade.p_correct == 1 and judged.form == "auto"
    assert classify("Review this.", off).text is None  # the words of old, naming no tier
