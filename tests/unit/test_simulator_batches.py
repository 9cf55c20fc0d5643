"""The simulator's Message Batches: creation checks, the clock-driven lifecycle, fates,
cancel, delete, list pages and batch billing (anthropic-api.md §5).

Time is a number the test passes in; nothing sleeps.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from simulator import validate
from simulator.batches import MAX_BODY_BYTES, Batch, Batches, ResultLine, check_create
from simulator.cache import Cache
from simulator.errors import ApiError
from simulator.grades import Grader
from simulator.ledger import Ledger
from simulator.pricing import Usage, cost_usd
from simulator.truth import Quality

T0 = 1_790_000_000.0
HAIKU = "claude-haiku-5-5"
ORIGIN = "http://sim"


def item(custom_id: str, **params: Any) -> dict[str, Any]:
    base = {"model": HAIKU, "max_tokens": 50, "messages": [{"role": "user", "content": custom_id}]}
    return {"custom_id": custom_id, "params": {**base, **params}}


def body(*items: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"requests": list(items)})


def make(
    batches: Batches, *items: dict[str, Any], seconds: float = 10.0, error_rate: float = 0.0,
    expiry_rate: float = 0.0, now: float = T0,
) -> Batch:  # fmt: skip
    requests = check_create(validate.decode_body(body(*items), max_bytes=MAX_BODY_BYTES))
    return batches.create(
        requests, now=now, seconds=seconds, version="2026-10-21", seed=1,
        error_rate=error_rate, expiry_rate=expiry_rate,
    )  # fmt: skip


def new_batches() -> Batches:
    return Batches(Cache(), Ledger(), Grader(Quality))


def results(batches: Batches, batch: Batch, now: float) -> dict[str, Any]:
    lines = [msgspec.json.decode(line, type=ResultLine) for line in batches.results(batch.id, now)]
    return {line.custom_id: line.result for line in lines}


def kinds(batches: Batches, batch: Batch, now: float) -> dict[str, str]:
    return {cid: type(r).__name__.lower() for cid, r in results(batches, batch, now).items()}


@pytest.fixture
def batches() -> Batches:
    return new_batches()


def test_counts_stay_processing_until_the_whole_batch_ends(batches: Batches) -> None:
    batch = make(batches, item("a"), item("b"), item("c"), seconds=30)
    for now in (T0, T0 + 29.9):
        shown = batches.shown(batches.get(batch.id, now), ORIGIN)
        assert shown.processing_status == "in_progress" and shown.results_url is None
        assert shown.request_counts.processing == 3 and shown.ended_at is None
    shown = batches.shown(batches.get(batch.id, T0 + 30), ORIGIN)
    assert shown.processing_status == "ended"
    assert (shown.request_counts.processing, shown.request_counts.succeeded) == (0, 3)
    assert shown.results_url == f"{ORIGIN}/v1/messages/batches/{batch.id}/results"
    assert shown.expires_at.startswith("2026-09-22T14:13:20")  # created + 24 h


def test_results_are_complete_and_billed_at_half_price(batches: Batches) -> None:
    batch = make(batches, item("a"), item("b"))
    done = results(batches, batch, T0 + 10)
    assert set(done) == {"a", "b"}
    total = 0.0
    for result in done.values():
        usage = result.message.usage
        assert usage.service_tier == "batch"
        full = cost_usd(HAIKU, Usage(input_tokens=usage.input_tokens,
                                     output_tokens=usage.output_tokens))  # fmt: skip
        total += full / 2
    report = batches.ledger.report(in_flight=0)
    assert report.models == {} and report.batch[HAIKU].requests == 2
    assert report.batch[HAIKU].cost_usd == pytest.approx(total, rel=1e-12)


def test_invalid_params_come_back_errored_not_refused(batches: Batches) -> None:
    batch = make(batches, item("ok"), item("zero", max_tokens=0), item("nope", model="claude-x"),
                 item("hot", temperature=0.5))  # fmt: skip
    done = results(batches, batch, T0 + 10)
    assert type(done["ok"]).__name__ == "Succeeded"
    assert done["zero"].error.error.type == "invalid_request_error"
    assert "not allowed in batches" in done["zero"].error.error.message
    assert done["nope"].error.error.type == "not_found_error"
    assert done["hot"].error.error.message == "temperature: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("items", "says"),
    [([], "1 to 100,000 requests"),
     ([{"custom_id": "a b", "params": {}}], "String should match pattern"),
     ([{"custom_id": "x" * 65, "params": {}}], "String should match pattern"),
     ([item("a"), item("a")], "'a' is used twice"),
     ([{"custom_id": "a"}], "requests.0.params: Field required"),
     ([{**item("a"), "extra": 1}], "requests.0.extra: Extra inputs")],
)  # fmt: skip
def test_bad_requests_are_refused_at_once(
    batches: Batches, items: list[dict[str, Any]], says: str
) -> None:
    with pytest.raises(ApiError, match=says) as refused:
        make(batches, *items)
    assert refused.value.status == 400 and batches.batches == {}


def test_error_and_expiry_rates_are_seeded(batches: Batches) -> None:
    items = [item(f"r{i}") for i in range(200)]
    one = kinds(batches, make(batches, *items, error_rate=0.2, expiry_rate=0.1), T0 + 10)
    again = new_batches()
    two = kinds(again, make(again, *items, error_rate=0.2, expiry_rate=0.1), T0 + 10)
    assert one == two
    counted = {k: list(one.values()).count(k) for k in ("succeeded", "errored", "expired")}
    assert 20 <= counted["errored"] <= 60 and 5 <= counted["expired"] <= 35
    assert counted["succeeded"] == 200 - counted["errored"] - counted["expired"]


def test_cancel_finishes_the_item_in_flight_and_cancels_the_rest(batches: Batches) -> None:
    batch = make(batches, *[item(f"r{i}") for i in range(10)], seconds=10)
    shown = batches.shown(batches.cancel(batch.id, T0 + 3.5), ORIGIN)  # items 0-2 done
    assert shown.processing_status == "canceling" and shown.cancel_initiated_at is not None
    assert batches.get(batch.id, T0 + 3.9).status() == "canceling"
    ended = batches.get(batch.id, T0 + 4)  # item 3 was in flight
    assert ended.status() == "ended"
    assert (ended.counts.succeeded, ended.counts.canceled) == (4, 6)
    assert kinds(batches, batch, T0 + 4)["r9"] == "canceled"


def test_items_unfinished_at_24_hours_expire(batches: Batches) -> None:
    batch = make(batches, item("a"), item("b"), seconds=30 * 3600)  # a at 15 h, b at 30 h
    assert batches.get(batch.id, T0 + 24 * 3600).status() == "ended"
    assert kinds(batches, batch, T0 + 24 * 3600) == {"a": "succeeded", "b": "expired"}
    assert batch.ended_at == T0 + 24 * 3600


def test_delete_only_after_the_batch_ended(batches: Batches) -> None:
    batch = make(batches, item("a"))
    with pytest.raises(ApiError, match="cancel it") as refused:
        batches.delete(batch.id, T0 + 1)
    assert refused.value.status == 400
    batches.delete(batch.id, T0 + 10)
    with pytest.raises(ApiError) as gone:
        batches.get(batch.id, T0 + 10)
    assert gone.value.status == 404


def test_results_before_the_end_are_refused(batches: Batches) -> None:
    batch = make(batches, item("a"))
    with pytest.raises(ApiError, match="still in_progress"):
        batches.results(batch.id, T0 + 1)


def test_list_is_newest_first_with_cursors(batches: Batches) -> None:
    ids = [make(batches, item("a"), now=T0 + n).id for n in range(5)]
    newest = list(reversed(ids))
    page = batches.page(T0 + 9, ORIGIN, after_id=None, before_id=None, limit=2)
    assert [b.id for b in page.data] == newest[:2] and page.has_more
    assert (page.first_id, page.last_id) == (newest[0], newest[1])
    page = batches.page(T0 + 9, ORIGIN, after_id=newest[1], before_id=None, limit=2)
    assert [b.id for b in page.data] == newest[2:4] and page.has_more
    page = batches.page(T0 + 9, ORIGIN, after_id=newest[3], before_id=None, limit=2)
    assert [b.id for b in page.data] == newest[4:] and not page.has_more
    page = batches.page(T0 + 9, ORIGIN, after_id=None, before_id=newest[3], limit=2)
    assert [b.id for b in page.data] == newest[1:3] and page.has_more
    page = batches.page(T0 + 9, ORIGIN, after_id=None, before_id=newest[1], limit=2)
    assert [b.id for b in page.data] == newest[:1] and not page.has_more


def test_prompt_caching_applies_inside_batches(batches: Batches) -> None:
    system = [{"type": "text", "text": "rules " * 500, "cache_control": {"type": "ephemeral"}}]
    batch = make(batches, item("a", system=system), item("b", system=system))
    done = results(batches, batch, T0 + 10)
    assert done["a"].message.usage.cache_creation_input_tokens > 0
    assert done["b"].message.usage.cache_read_input_tokens == (
        done["a"].message.usage.cache_creation_input_tokens
    )


def test_the_processing_queue_is_capped(batches: Batches, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("simulator.batches.MAX_QUEUED", 3)
    make(batches, item("a"), item("b"))
    with pytest.raises(ApiError, match="limit of 3") as refused:
        make(batches, item("c"), item("d"))
    assert refused.value.status == 429
    batches.settle_all(T0 + 10)  # the first batch ended: room again
    make(batches, item("c"), item("d"), now=T0 + 10)
