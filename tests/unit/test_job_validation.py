"""Every bad-input class becomes a JobRejected with an error_type and a sentence to act on."""

from __future__ import annotations

import pytest

from worker.contract import decode_job
from worker.errors import JobRejected
from worker.jobs import parse_job, parse_request

HELLO = '{"messages":[{"role":"user","content":"Hi"}]}'


def test_stream_fields_decode_laxly() -> None:
    job = decode_job({"feature": "f", "request": HELLO, "deadline_ms": "1700000000000", "x": "y"})
    assert job.deadline_ms == 1_700_000_000_000
    assert job.tenant is None


@pytest.mark.parametrize(
    ("fields", "error_type", "says"),
    [
        ({"request": HELLO}, "malformed_job", "no `feature` field"),
        ({"feature": "f"}, "malformed_job", "no `request` field"),
        ({"feature": "", "request": HELLO}, "malformed_job", "feature"),
        ({"feature": "f", "request": HELLO, "deadline_ms": "soon"}, "malformed_job", "deadline_ms"),
    ],
)
def test_bad_job_fields(fields: dict[str, str], error_type: str, says: str) -> None:
    with pytest.raises(JobRejected) as err:
        parse_job(fields)
    assert err.value.error_type == error_type
    assert says in str(err.value)


@pytest.mark.parametrize(
    ("request_text", "says"),
    [
        ("not json", "not valid JSON"),
        ('["a"]', "must be a JSON object"),
        ("{}", "missing required field `messages`"),
        ('{"messages": []}', "messages"),
        ('{"messages": "hi"}', "Expected `array`"),
        ('{"messages":[{"role":"robot","content":"x"}]}', "role"),
        ('{"messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}', "max_tokens"),
        ('{"messages":[{"role":"user","content":"x"}],"max_tokens":0}', "max_tokens"),
        ('{"messages":[{"role":"user","content":"x"}],"temperature":0.2}', "2026-10-21"),
        ('{"messages":[{"role":"user","content":"x"}],"modle":"x"}', "allowed: messages"),
    ],
)
def test_bad_requests_are_malformed_with_reason(request_text: str, says: str) -> None:
    with pytest.raises(JobRejected) as err:
        parse_request(request_text)
    assert err.value.error_type == "malformed_job"
    assert says in str(err.value)
    assert "Fix the producer" in str(err.value)


def test_valid_request_keeps_only_given_fields() -> None:
    request = parse_request('{"messages":[{"role":"user","content":"x"}],"system":"s"}')
    assert request.system == "s"
    assert request.max_tokens is None
