"""The ground truth's back door (truth.py): how a benchmark learns which answers were right.
tokenq never reads it; it sees only the answers.

    POST /_sim/grade {"items": [{"request": {...}, "model": MODEL}, ...], "ids": [...]}
        items: the truth of MODEL's answer to each request, as the job sent it (no model
               needed in it; cache_control, max_tokens and the like change nothing), with
               the settings of the moment: {"kind", "difficulty", "p_correct", "correct"}
        ids:   what was recorded for answered messages, as GET ?ids= gives it
    GET /_sim/grade?ids=msg_a,msg_b
        {"ids": {ID: {"model", "kind", "difficulty", "p_correct", "correct"} or null}}

Both answer {"quality": "on"|"off", "items": [...], "ids": {...}}. The record keeps the last
MAX_RECORDS answers with the ground truth on (realtime and batch items), across
POST /_sim/reset (ids never repeat); with it off nothing is recorded, as every answer is right.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from simulator import validate
from simulator.errors import ApiError
from simulator.tokens import Body, Reply, reply
from simulator.truth import Grade, Judgement, Kind, Mode, Quality, judge

MAX_RECORDS = 100_000
MAX_IDS = 100_000


class Recorded(msgspec.Struct, frozen=True, kw_only=True):
    """The truth of one answered message."""

    model: str
    kind: Kind
    difficulty: float
    p_correct: float
    correct: bool


class Item(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One request to grade, as a job sent it, and the model that answered it (else the
    request's own `model`)."""

    request: dict[str, Any]
    model: str | None = None


class Query(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST /_sim/grade."""

    items: list[Item] = []
    ids: list[str] = []


class Answer(msgspec.Struct, frozen=True):
    quality: Mode
    items: list[Grade]
    ids: dict[str, Recorded | None]


_decode_query = msgspec.json.Decoder(Query).decode


class Grader:
    """Judges answers with the settings of the moment and remembers them by message id."""

    def __init__(self, quality: Callable[[], Quality]) -> None:
        self._quality = quality
        self._record: OrderedDict[str, Recorded] = OrderedDict()

    def judge(self, body: Body, model: str) -> Judgement | None:
        """How `model` answers `body`; None with the ground truth off (the usual answer)."""
        q = self._quality()
        return None if q.mode == "off" else judge(body, model, q)

    def reply(self, body: Body, model: str) -> tuple[Reply, Grade | None]:
        """`model`'s reply to `body`, and its grade (None with the ground truth off)."""
        judged = self.judge(body, model)
        if judged is None:
            return reply(body), None
        return reply(body, judged.form, judged.text), judged.grade

    def remember(self, message_id: str, model: str, grade: Grade) -> None:
        """Record an answer's truth; the oldest record goes past MAX_RECORDS."""
        self._record[message_id] = Recorded(
            model=model, kind=grade.kind, difficulty=grade.difficulty,
            p_correct=grade.p_correct, correct=grade.correct,
        )  # fmt: skip
        if len(self._record) > MAX_RECORDS:
            self._record.popitem(last=False)

    def recorded(self, ids: Iterable[str]) -> dict[str, Recorded | None]:
        return {i: self._record.get(i) for i in ids}

    def answer(self, raw: bytes | None, ids: list[str]) -> Answer:
        """The answer to POST (`raw`) or GET (`ids`); raises ValueError with the message of
        the 400 for a body that is not a Query or an item that cannot be graded."""
        q = self._quality()
        items: list[Grade] = []
        if raw is not None:
            try:
                query = _decode_query(raw or b"{}")
            except msgspec.DecodeError as exc:
                raise ValueError(
                    f'{exc}. Send {{"items": [{{"request": {{...}}, "model": MODEL}}, ...], '
                    '"ids": ["msg_...", ...]}, either or both.'
                ) from None
            items = [_grade(item, i, q) for i, item in enumerate(query.items)]
            ids = ids + query.ids
        if len(ids) > MAX_IDS:
            raise ValueError(f"{len(ids):,} ids asked for; at most {MAX_IDS:,} at once")
        return Answer(quality=q.mode, items=items, ids=self.recorded(ids))


def _grade(item: Item, i: int, q: Quality) -> Grade:
    model = item.model or item.request.get("model")
    if not isinstance(model, str) or model not in q.skills:
        known = ", ".join(q.skills)
        raise ValueError(
            f"items[{i}].model: {model!r} is not a model the simulator serves; give one of "
            f"{known} (the model of the answer to grade)"
        )
    # Checked as /v1/messages checks it (without the model and max_tokens it may lack).
    body = {"max_tokens": 1, **item.request, "model": model}
    try:
        validate.check_request(body, version=validate.SAMPLING_VERSION_CUTOFF)
    except ApiError as exc:
        raise ValueError(f"items[{i}].request: {exc.message}") from None
    return judge(body, model, q).grade


def query_ids(values: list[str]) -> list[str]:
    """The ids of GET ?ids=a,b&ids=c, in order."""
    return [i for value in values for i in value.split(",") if i]
