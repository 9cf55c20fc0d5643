"""worker.jobrun: the record of a job's life, its rules and its stored form."""

from __future__ import annotations

import msgspec

from worker import jobrun
from worker.jobrun import Call, JobRun


def call(**fields: object) -> Call:
    return msgspec.structs.replace(Call(model="m", tier="haiku", started_ms=10), **fields)


def test_attempts_count_the_calls_for_the_answer_and_tries_add_failures() -> None:
    run = JobRun(first_ms=1, failures=1, calls=[
        call(state="failed"), call(state="lost"), call(state="answered"),
        call(counted=False, state="answered"),  # the classifier
        call(counted=False, state="failed"),  # refused by the spend limit
    ])  # fmt: skip
    assert run.attempts == 3 and run.tries == 4
    assert [c.state for c in run.in_flight()] == []
    run.calls.append(call())
    run.calls.append(call(mode="batch"))  # a batch is followed by the batcher, never lost
    assert run.in_flight() == [run.calls[-2]]


def test_cost_sums_the_answered_calls_only() -> None:
    run = JobRun(first_ms=1, calls=[
        call(state="answered", cost_usd=0.25), call(state="lost", estimate_usd=9.0),
        call(state="answered", cost_usd=0.5),
    ])  # fmt: skip
    assert run.cost_usd() == 0.75


def test_deferred_time_runs_from_the_deferral_to_the_entry_that_brings_it_back() -> None:
    run = JobRun(first_ms=1_000)
    run.put_off(5_000)
    run.returned(65_000)
    run.put_off(70_000)
    run.returned(71_500)
    assert (run.deferrals, run.deferred_ms, run.deferred_at_ms) == (2, 61_500, 0)
    run.returned(99_000)  # not back from a deferral: nothing to add
    assert run.deferred_ms == 61_500


def test_the_stored_form_has_short_keys_and_decodes_back() -> None:
    run = JobRun(first_ms=7, tier="sonnet", route=["features.x.tier"],
                 calls=[call(state="answered", cost_usd=0.1, input_tokens=12)])  # fmt: skip
    raw = jobrun.encode(run)
    assert raw.startswith(b'{"t0":7,"c":[{"m":"m","t":"haiku","s":10,"st":"answered"')
    assert jobrun.decode(raw.decode(), 0) == run


def test_a_record_that_does_not_decode_starts_a_new_run() -> None:
    assert jobrun.decode("", 5) == JobRun(first_ms=5)
    assert jobrun.decode('{"t0": "soon"}', 5) == JobRun(first_ms=5)
    assert jobrun.decode(b"not json", 5) == JobRun(first_ms=5)
