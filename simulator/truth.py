"""Ground truth, declared synthetic: answers that are right or wrong, and a difficulty that
explains why (README: The simulator, "Quality: a synthetic ground truth").

Nothing here is a measurement of a real model. It is a model of the world in which routing
by difficulty can pay off, with every number below a setting or a documented constant, so a
benchmark can say exactly what its quality figures rest on.

**Text.** A request's text is what a person wrote into it: the system prompt, then every
text of its messages (string contents, text blocks, tool_result contents), in order, joined
by single spaces: the same text tokenq's router classifier is shown. `cache_control`,
`max_tokens`, the model, tools and metadata are not part of it, so they never change the
truth of a request.

**Kind.** The first 100 characters of the text, lowercased, name the kind (KIND_RULES, the
first that matches): tokenq's classifier prompt is `route`; the reference workload's five
features (bench/workloads) are `code_review`, `classify_ticket`, `summarize_doc`,
`support_faq` and `nightly_enrich`; anything else is `other`.

**Difficulty**, 0 (trivial) to 10 (beyond any model). Two standard-normal scores:
    observable  where the text's length (tokens, 4 characters each) falls in its kind's
                typical range (as a normal quantile), plus 0.75 for each hard marker
                (HARD_MARKERS, e.g. "why", "security", "race condition") beyond its kind's
                baseline, plus 0.5 for each structure point (a code fence pair, 20 lines),
                clipped to +-3: what a router can see;
    hidden      a normal quantile of a hash of the text: what no router can see.
`z = sqrt(signal) * observable + sqrt(1 - signal) * hidden` (`signal`, 0..1, is the share of
the difficulty's variance within a kind that observable signals explain, on the reference
workload), and the difficulty is the kind's quantile curve at Phi(z).

**Correct.** `p_correct = 1 / (1 + exp(-1.5 * (skill - difficulty)))` for the model's skill,
and the answer is right when one uniform draw per request (a hash of the text and the seed)
is below it. The draw is shared by all models, so a request that defeats a stronger model
defeats the weaker ones too: hardness belongs to the request.

**Visibility.** A wrong answer to a request that asks for JSON fails a parse or schema check
with probability `json_visible`: half of those are not JSON, half are JSON without the
required `label` or with `label: "unknown"` (tokens.FORMS). Other wrong answers look like
right ones.

**Classifier.** A `route` request (system prompt opening "You route requests to a model
tier", naming "Tiers, cheapest first: A, B, C.") is answered with one tier name: the
cheapest tier whose skill gives the last user message's text a `p_correct` of at least
LIKELY, with probability `classifier_accuracy`, else a neighbouring tier. A tier name stands
for the first model of the skills table whose id contains it (claude-haiku-5-5 for haiku).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from statistics import NormalDist
from typing import Any, Literal, NamedTuple

import msgspec

from simulator.tokens import Body, Form, asks_for_json

Kind = Literal[
    "route", "code_review", "classify_ticket", "summarize_doc", "support_faq",
    "nightly_enrich", "other",
]  # fmt: skip
Mode = Literal["off", "on"]
# Skills on the difficulty scale. The defaults make haiku right on most easy requests, opus
# on most hard ones (README: the pass rates they give each kind).
DEFAULT_SKILLS: dict[str, float] = {
    "claude-haiku-5-5": 4.0,
    "claude-sonnet-5-5": 5.5,
    "claude-opus-5-5": 7.0,
    "claude-haiku-4-5": 3.5,
    "claude-sonnet-4-6": 5.0,
    "claude-opus-4-8": 6.5,
}
SLOPE = 1.5  # of the logistic curve, per point of skill minus difficulty
LIKELY = 0.9  # the p_correct the classifier's right tier must reach
MAX_DIFFICULTY = 10.0
CURVE_AT = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)  # the quantiles each kind's curve gives


class KindModel(NamedTuple):
    """A kind's difficulty: its typical length range (tokens), the hard markers its own
    prompt carries (not counted against it), and its difficulty at the CURVE_AT quantiles."""

    length: tuple[int, int]
    markers: int
    curve: tuple[float, float, float, float, float, float, float]


KINDS: dict[Kind, KindModel] = {
    # The classifier's own prompt: graded by the text it classifies, never by these.
    "route": KindModel((10, 2000), 0, (0.0, 1.0, 1.8, 3.0, 4.2, 5.5, 9.0)),
    # Mostly hard.
    "code_review": KindModel((3000, 6500), 1, (1.5, 3.5, 4.3, 5.0, 5.8, 6.6, 9.0)),
    # Mostly easy, with a hard tail: one ticket in ten is above haiku's skill.
    "classify_ticket": KindModel((1260, 1420), 0, (0.0, 0.4, 0.7, 1.1, 1.7, 3.5, 8.0)),
    # Medium.
    "summarize_doc": KindModel((2000, 6000), 0, (0.5, 1.8, 2.4, 3.0, 3.7, 4.5, 7.0)),
    # Mostly easy.
    "support_faq": KindModel((2520, 2550), 0, (0.0, 0.4, 0.7, 1.1, 1.6, 2.2, 5.0)),
    # Easy.
    "nightly_enrich": KindModel((30, 90), 0, (0.0, 0.3, 0.5, 0.9, 1.3, 1.8, 4.0)),
    # Anything else: broad and medium.
    "other": KindModel((10, 2000), 0, (0.0, 1.0, 1.8, 3.0, 4.2, 5.5, 9.0)),
}
OPENING_CHARS = 100
KIND_RULES: tuple[tuple[Kind, re.Pattern[str]], ...] = (
    ("route", re.compile(r"you route requests to a model tier")),
    ("code_review", re.compile(r"review")),
    ("classify_ticket", re.compile(r"classif|categor")),
    ("summarize_doc", re.compile(r"summar")),
    ("support_faq", re.compile(r"support|faq|customer")),
    ("nightly_enrich", re.compile(r"product description|enrich")),
)
HARD_MARKERS = (
    "why", "prove", "proof", "explain", "refactor", "architecture", "concurren",
    "race condition", "deadlock", "security", "vulnerab", "optimi", "edge case", "trade-off",
    "step by step", "legal", "regression", "stack trace", "migrat", "debug",
)  # fmt: skip
MARKER_WEIGHT = 0.75
STRUCTURE_WEIGHT = 0.5
LINES_PER_POINT = 20
MAX_OBSERVABLE = 3.0
_TIERS = re.compile(r"Tiers, cheapest first: ([^.\n]+)\.")
_normal = NormalDist()


class Grade(msgspec.Struct, frozen=True, kw_only=True):
    """The truth about one answer: the request's kind and difficulty, the chance the model
    had, and whether its answer is right (for `route`: whether it named the right tier)."""

    kind: Kind
    difficulty: float
    p_correct: float
    correct: bool


class Quality(msgspec.Struct, frozen=True, kw_only=True):
    """The settings the truth depends on (the simulator's Settings hold them)."""

    mode: Mode = "off"
    signal: float = 0.5
    skills: Mapping[str, float] = msgspec.field(default_factory=lambda: dict(DEFAULT_SKILLS))
    json_visible: float = 0.6
    classifier_accuracy: float = 0.8
    seed: int = 0


class Judgement(NamedTuple):
    """How to answer a request: its grade, the shape of a JSON answer, and a whole text that
    replaces the usual words (the classifier's tier), if any."""

    grade: Grade
    form: Form
    text: str | None


def request_text(body: Mapping[str, Any]) -> str:
    """The text a person wrote into a request (see the module docstring)."""
    return " ".join(_texts([body.get("system"), *(body.get("messages") or ())]))


def _texts(values: Iterable[Any]) -> Iterable[str]:
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            if value.get("type", "text") == "text" and isinstance(value.get("text"), str):
                yield value["text"]
            if "content" in value:
                yield from _texts([value["content"]])
        elif isinstance(value, list):
            yield from _texts(value)


def kind_of(text: str) -> Kind:
    """The kind its opening names (KIND_RULES), else "other"."""
    opening = text[:OPENING_CHARS].lower()
    return next((kind for kind, rule in KIND_RULES if rule.search(opening)), "other")


def _uniform(*parts: object) -> float:
    """A uniform draw in (0, 1) from a hash of `parts`."""
    key = "\x1f".join(str(p) for p in parts).encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return (value + 0.5) / 2**64


def _text_key(text: str) -> str:
    """A short stand-in for a text in further hashes (hashing a long text once)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def observable(text: str, kind: Kind) -> float:
    """The observable score (standard normal on the reference workload, clipped to +-3)."""
    model = KINDS[kind]
    low, high = model.length
    tokens = -(-len(text) // 4)
    share = min(max((tokens - low) / (high - low), 0.001), 0.999)
    lowered = text.lower()
    markers = sum(marker in lowered for marker in HARD_MARKERS) - model.markers
    structure = text.count("```") // 2 + text.count("\n") // LINES_PER_POINT
    score = _normal.inv_cdf(share) + MARKER_WEIGHT * markers + STRUCTURE_WEIGHT * structure
    return min(max(score, -MAX_OBSERVABLE), MAX_OBSERVABLE)


def difficulty_of(text: str, kind: Kind, signal: float, key: str) -> float:
    """The difficulty (0..10) of a text of `kind`; `key` is _text_key(text)."""
    hidden = _normal.inv_cdf(_uniform(key, "difficulty"))
    z = math.sqrt(signal) * observable(text, kind) + math.sqrt(1 - signal) * hidden
    return _curve(KINDS[kind].curve, _normal.cdf(z))


def _curve(points: tuple[float, ...], u: float) -> float:
    for i in range(1, len(CURVE_AT)):
        if u <= CURVE_AT[i]:
            left, right = CURVE_AT[i - 1], CURVE_AT[i]
            return points[i - 1] + (points[i] - points[i - 1]) * (u - left) / (right - left)
    return points[-1]


def p_correct(skill: float, difficulty: float) -> float:
    """The chance of a right answer: the logistic curve of skill minus difficulty."""
    return 1 / (1 + math.exp(-SLOPE * (skill - difficulty)))


def judge(body: Body, model: str, q: Quality) -> Judgement:
    """The truth of `model`'s answer to `body`, and how that answer must look."""
    text = request_text(body)
    kind = kind_of(text)
    if kind == "route":
        return _route(body, q)
    key = _text_key(text)
    difficulty = difficulty_of(text, kind, q.signal, key)
    if q.mode == "off":  # every model gives the right answer, as before ground truth
        return Judgement(Grade(kind=kind, difficulty=difficulty, p_correct=1.0, correct=True),
                         "auto", None)  # fmt: skip
    chance = p_correct(q.skills[model], difficulty)
    correct = _uniform(key, q.seed, "correct") < chance
    grade = Grade(kind=kind, difficulty=difficulty, p_correct=chance, correct=correct)
    return Judgement(grade, _form(body, correct, key, model, q), None)


def _form(body: Body, correct: bool, key: str, model: str, q: Quality) -> Form:
    if not asks_for_json(body):
        return "auto"
    if correct:
        return "valid"
    draw = _uniform(key, model, q.seed, "visible")
    if draw >= q.json_visible:
        return "valid"  # wrong, but nothing in it shows
    if draw < q.json_visible / 2:
        return "not_json"
    return "missing_label" if _uniform(key, model, q.seed, "schema") < 0.5 else "bad_label"


def _route(body: Body, q: Quality) -> Judgement:
    """The classifier: a tier guess for the last user message's text."""
    shown = _last_user_text(body)
    key = _text_key(shown)
    kind = kind_of(shown)
    difficulty = difficulty_of(shown, kind, q.signal, key)
    tiers = _tiers(request_text({"system": body.get("system")}))
    if q.mode == "off" or not tiers:
        grade = Grade(kind="route", difficulty=difficulty, p_correct=1.0, correct=True)
        return Judgement(grade, "auto", None)
    right = right_tier(tiers, q.skills, difficulty)
    guess = right
    if _uniform(key, q.seed, "classifier") >= q.classifier_accuracy and len(tiers) > 1:
        up = _uniform(key, q.seed, "neighbour") < 0.5
        guess = right + 1 if right == 0 or (up and right < len(tiers) - 1) else right - 1
    grade = Grade(kind="route", difficulty=difficulty, p_correct=q.classifier_accuracy,
                  correct=guess == right)  # fmt: skip
    return Judgement(grade, "auto", tiers[guess])


def _last_user_text(body: Body) -> str:
    messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    return "" if last is None else " ".join(_texts([last.get("content")]))


def _tiers(system_text: str) -> list[str]:
    found = _TIERS.search(system_text)
    if found is None:
        return []
    return [t.strip() for t in found.group(1).split(",") if t.strip()]


def right_tier(tiers: list[str], skills: Mapping[str, float], difficulty: float) -> int:
    """The index of the cheapest tier likely (LIKELY) to be right, else the last one."""
    skill = min(skills.values())
    for i, tier in enumerate(tiers):
        matched = next((s for m, s in skills.items() if tier.lower() in m), None)
        skill = skill if matched is None else matched  # unknown: as the tier before it
        if p_correct(skill, difficulty) >= LIKELY:
            return i
    return len(tiers) - 1
