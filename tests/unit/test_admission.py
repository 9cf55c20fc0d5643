"""The edge: every bad-input class becomes a JobRejected with an error_type and a sentence a
producer can act on; what a dead letter keeps stays bounded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from producers import NewJob, Producer
from worker.admission import DEAD_VALUE_CHARS, admit, dead_copy, reply_to_of
from worker.api_request import MAX_DEPTH, parse_request
from worker.config import Config, load_config, with_settings
from worker.contract import clean, decode_job, fingerprint, id_problem, is_reserved_id, shown
from worker.errors import JobRejected

ROOT = Path(__file__).resolve().parent.parent.parent
HELLO = '{"messages":[{"role":"user","content":"Hi"}]}'


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    settings = {"prefix": "tq", "queue.reply_to_pattern": "", "queue.max_entry_bytes": 4096}
    path.write_text(with_settings((ROOT / "config.toml").read_text(), settings))
    return load_config(path)


def rejected(fields: dict[str, str], cfg: Config) -> JobRejected:
    with pytest.raises(JobRejected) as err:
        admit(fields, cfg)
    return err.value


def test_stream_fields_decode_laxly() -> None:
    job = decode_job({"feature": "f", "request": HELLO, "deadline_ms": "1700000000000", "x": "y"})
    assert job.deadline_ms == 1_700_000_000_000
    assert job.tenant is None


def test_a_valid_job_is_admitted_with_its_fields(cfg: Config) -> None:
    fields = {"feature": "summarize", "request": HELLO, "id": "job-1", "tenant": "acme",
              "tier": "opus", "reply_to": "replies:svc", "deadline_ms": "1700000000000",
              "cache": "off", "trace": "abc"}  # fmt: skip
    got = admit(fields, cfg)
    assert (got.job.id, got.job.tenant, got.job.tier, got.job.cache) == ("job-1", "acme", "opus",
                                                                        "off")  # fmt: skip
    assert got.job.deadline_ms == 1_700_000_000_000 and got.job.reply_to == "replies:svc"
    assert got.request.messages[0].content == "Hi"


@pytest.mark.parametrize(
    ("fields", "error_type", "says"),
    [
        ({"request": HELLO}, "malformed_job", "no `feature` field"),
        ({"feature": "summarize"}, "malformed_job", "no `request` field"),
        ({"feature": "", "request": HELLO}, "malformed_job", "`feature` is empty"),
        ({"feature": "nope", "request": HELLO}, "unknown_feature", "config.toml [features]"),
        ({"feature": "summarize", "request": HELLO, "tier": "gpt"}, "malformed_job", "[tiers]"),
        ({"feature": "summarize", "request": HELLO, "tier": ""}, "malformed_job",
         "`tier` is empty"),
        ({"feature": "summarize", "request": HELLO, "deadline_ms": "soon"}, "malformed_job",
         "`deadline_ms` 'soon' is not a unix time"),
        ({"feature": "summarize", "request": HELLO, "deadline_ms": "9" * 50}, "malformed_job",
         "`deadline_ms`"),
        ({"feature": "summarize", "request": HELLO, "cache": "on"}, "malformed_job",
         'only "off"'),
        ({"feature": "summarize", "request": HELLO, "tenant": "a\nb"}, "malformed_job",
         "`tenant` 'a\\nb'"),
        ({"feature": "summarize", "request": HELLO, "tenant": "t" * 300}, "malformed_job",
         "at most 256"),
        ({"feature": "summarize", "request": "x" * 5000}, "too_large", "queue.max_entry_bytes"),
    ],
)  # fmt: skip
def test_bad_job_fields(fields: dict[str, str], error_type: str, says: str, cfg: Config) -> None:
    err = rejected(fields, cfg)
    assert err.error_type == error_type
    assert says in str(err), str(err)


@pytest.mark.parametrize("field", ["feature", "request", "id", "tenant", "reply_to", "trace"])
def test_invalid_utf8_in_any_value_names_the_field(field: str, cfg: Config) -> None:
    fields = {"feature": "summarize", "request": HELLO}
    fields[field] = b"ok\xff\xfe".decode("utf-8", "surrogateescape")  # as the client reads it
    err = rejected(fields, cfg)
    assert err.error_type == "malformed_job"
    assert f"field `{field}` is not valid UTF-8 (byte 0xff at offset 2)" in str(err)


def test_invalid_utf8_in_a_field_name(cfg: Config) -> None:
    name = b"tr\xc3ace".decode("utf-8", "surrogateescape")
    err = rejected({"feature": "summarize", "request": HELLO, name: "1"}, cfg)
    assert "a field name is not valid UTF-8" in str(err)
    str(err).encode("utf-8")  # the sentence itself is clean UTF-8


@pytest.mark.parametrize(
    ("job_id", "says"),
    [
        ("", "`id` is empty"),
        ("x" * 256, "at most 255"),
        ("a\nFAKE log line", "contains '\\n'"),
        ("with space", "contains ' '"),
        ("bidi\u202eevil", "contains '\\u202e'"),
    ],
)
def test_ids_are_bounded_printable_text(job_id: str, says: str, cfg: Config) -> None:
    err = rejected({"feature": "summarize", "request": HELLO, "id": job_id}, cfg)
    assert err.error_type == "malformed_job" and says in str(err), str(err)
    assert "\n" not in str(err)


def test_id_rules() -> None:
    assert id_problem("order-1234/attempt.2@eu") is None
    assert id_problem("задача-7") is None  # printable non-ASCII is fine
    assert id_problem("x" * 255) is None


@pytest.mark.parametrize(
    ("reply_to", "says"),
    [
        ("tq:usage", "names one of tokenq's own keys"),
        ("tq:deferred", "names one of tokenq's own keys"),
        ("tq", "names one of tokenq's own keys"),
        ("", "`reply_to` is empty"),
        ("r\n", "printable"),
        ("r" * 600, "printable"),
    ],
)
def test_reply_to_must_be_outside_the_prefix(reply_to: str, says: str, cfg: Config) -> None:
    fields = {"feature": "summarize", "request": HELLO, "reply_to": reply_to}
    err = rejected(fields, cfg)
    assert err.error_type == "malformed_job" and says in str(err), str(err)
    assert reply_to_of(fields, cfg) is None  # its error result goes nowhere but the result key


def test_reply_to_pattern(cfg: Config, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    settings = {"prefix": "tq", "queue.reply_to_pattern": "replies:[a-z]+"}
    path.write_text(with_settings((ROOT / "config.toml").read_text(), settings))
    strict = load_config(path)
    fields = {"feature": "summarize", "request": HELLO, "reply_to": "replies:svc"}
    assert admit(fields, strict).job.reply_to == "replies:svc"
    err = rejected({**fields, "reply_to": "other:svc"}, strict)
    assert "does not match queue.reply_to_pattern" in str(err)
    assert admit({**fields, "reply_to": "tqx:svc"}, cfg).job.reply_to == "tqx:svc"


def request_error(request: Any) -> str:
    text = request if isinstance(request, str) else json.dumps(request)
    with pytest.raises(JobRejected) as err:
        parse_request(text)
    assert err.value.error_type == "malformed_job"
    assert str(err.value).endswith("Fix the producer."), str(err.value)
    return str(err.value)


def msg(*content: Any, role: str = "user") -> dict[str, Any]:
    return {"messages": [{"role": role, "content": list(content)}]}


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        ("not json", "is not valid JSON"),
        ('["a"]', "must be a JSON object of Messages API parameters, not an array"),
        ("7", "not the number 7"),
        ({}, "it has no `messages`"),
        ({"messages": []}, "`messages` is empty"),
        ({"messages": "hi"}, "`messages` must be an array of messages, not the string 'hi'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, '`messages[0].role` must be "user"'),
        ({"messages": [{"role": "user"}]}, "`messages[0]` has no `content`"),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "`messages[0].name`"),
        ({"messages": [{"role": "user", "content": 5}]}, "`messages[0].content` must be a string"),
        ({**msg(), "max_tokens": "ten"}, "`max_tokens` must be a whole number from 1 to"),
        ({**msg(), "max_tokens": 10**30}, "`max_tokens` must be a whole number from 1 to"),
        ({**msg(), "max_tokens": 0}, "`max_tokens` must be a whole number"),
        ({**msg(), "max_tokens": True}, "`max_tokens` must be a whole number"),
        ({**msg(), "temperature": 0.2}, "2026-10-21"),
        ({**msg(), "model": "x"}, "`model` is chosen by tokenq"),
        ({**msg(), "modle": "x"}, "allowed: messages"),
        (msg({"type": "text", "text": 7}), "`messages[0].content[0].text` must be a string, "
         "not the number 7"),
        (msg({"type": "text", "text": None}), "`messages[0].content[0].text` must be a string, "
         "not null"),
        (msg({"type": "text"}), 'a "text" block) has no `text`'),
        (msg({"type": "video", "url": "x"}), "`messages[0].content[0].type` is 'video'; the "
         "API accepts content blocks of type text, image, document"),
        (msg({"text": "x"}), "`messages[0].content[0].type` must be a string"),
        (msg("just text"), "`messages[0].content[0]` must be a content block"),
        (msg({"type": "image", "source": {"type": "base64", "data": "x"}}),
         "`messages[0].content[0].source` has no `media_type`"),
        (msg({"type": "image", "source": {"type": "ftp"}}), "a image source is one of base64"),
        (msg({"type": "image", "source": {"type": ["x"]}}), "a image source is one of base64"),
        (msg({"type": "document", "source": {"type": "url", "url": "u"}}, role="assistant"),
         "document block in an assistant turn"),
        (msg({"type": "tool_use", "id": "t", "name": "n", "input": []}, role="assistant"),
         "`messages[0].content[0].input` must be an object, not an array"),
        (msg({"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text"}]}),
         "`messages[0].content[0].content[0]` (a \"text\" block) has no `text`"),
        (msg({"type": "tool_result", "tool_use_id": "t", "content": [{"type": "tool_use"}]}),
         "accepts content blocks of type text, image, search_result, document, tool_reference"),
        (msg({"type": "text", "text": "x", "cache_control": {"type": "forever"}}),
         'must be {"type": "ephemeral"}'),
        (msg({"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "9d"}}),
         '.ttl` must be "5m" or "1h"'),
        (msg({"type": "thinking", "thinking": "t"}, role="assistant"), "has no `signature`"),
        (msg({"type": "search_result", "source": "s", "title": "t", "content": [{"type": "x"}]}),
         "content[0].type` is 'x'"),
        ({**msg(), "system": 3}, "`system` must be a string or an array of text blocks"),
        ({**msg(), "system": [{"type": "image"}]}, "`system[0].type` is 'image'"),
        ({**msg(), "stop_sequences": ["a", 1]}, "`stop_sequences[1]` must be a string"),
        ({**msg(), "tools": [{"name": "t"}]}, "`tools[0].input_schema` must be a JSON Schema"),
        ({**msg(), "tools": [{"input_schema": {}}]}, "`tools[0].name` must be a non-empty"),
        ({**msg(), "tools": "x"}, "`tools` must be an array"),
        ({**msg(), "tool_choice": {"type": "maybe"}}, "`tool_choice` must be an object"),
        ({**msg(), "tool_choice": {"type": "tool"}}, "`tool_choice.name`"),
        ({**msg(), "metadata": {"email": "x"}}, "`metadata.email` is not accepted"),
        ({**msg(), "metadata": {"user_id": 5}}, "`metadata.user_id` must be a string"),
        ({**msg(), "thinking": {"type": "enabled", "budget_tokens": 10}},
         "`thinking.budget_tokens` must be a whole number of at least 1024"),
        ({**msg(), "thinking": {"type": "sometimes"}}, "`thinking` must be an object"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}] * 5}]},
         "marks 5 cache_control breakpoints; the API accepts at most 4"),
    ],
)  # fmt: skip
def test_bad_requests_are_malformed_with_a_sentence(request_: Any, says: str) -> None:
    error = request_error(request_)
    assert says in error, error
    assert "Expected `" not in error  # no library messages


def test_every_block_type_the_api_accepts_passes() -> None:
    img = {"type": "base64", "media_type": "image/png", "data": "AAAA"}
    user = [
        {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "image", "source": img},
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "d"},
            "title": "t",
            "citations": {"enabled": True},
        },
        {"type": "document", "source": {"type": "content", "content": "c"}},
        {
            "type": "search_result",
            "source": "s",
            "title": "t",
            "content": [{"type": "text", "text": "x"}],
        },
        {
            "type": "tool_result",
            "tool_use_id": "t1",
            "is_error": False,
            "content": [
                {"type": "text", "text": "r"},
                {"type": "tool_reference", "tool_name": "n"},
            ],
        },
        {"type": "tool_result", "tool_use_id": "t2", "content": "plain"},
        {"type": "container_upload", "file_id": "f"},
    ]
    assistant = [
        {"type": "thinking", "thinking": "t", "signature": "s"},
        {"type": "redacted_thinking", "data": "d"},
        {"type": "tool_use", "id": "t1", "name": "n", "input": {}},
        {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {"q": "x"}},
        {"type": "web_search_tool_result", "tool_use_id": "s1", "content": []},
        {"type": "text", "text": "y", "citations": []},
    ]
    request = {
        "messages": [{"role": "user", "content": user},
                     {"role": "assistant", "content": assistant}],
        "system": [{"type": "text", "text": "s"}], "max_tokens": 10, "stop_sequences": ["\n\n"],
        "tools": [{"name": "n", "input_schema": {"type": "object"}},
                  {"type": "web_search_20250305", "name": "web_search"}],
        "tool_choice": {"type": "tool", "name": "n"}, "metadata": {"user_id": "u"},
        "thinking": {"type": "enabled", "budget_tokens": 2048},
    }  # fmt: skip
    parsed = parse_request(json.dumps(request))
    assert len(parsed.messages) == 2


def test_nesting_is_bounded_without_recursion() -> None:
    ok = {"messages": [{"role": "user", "content": "x"}], "metadata": {}}
    deep: Any = "leaf"
    for _ in range(MAX_DEPTH - 3):  # request, tools, tool, input_schema: 4 levels around it
        deep = {"a": deep}
    tools = [{"name": "n", "input_schema": deep}]
    parse_request(json.dumps({**ok, "tools": tools}))
    too_deep = {**ok, "tools": [{"name": "n", "input_schema": {"a": deep}}]}
    assert f"nested more than {MAX_DEPTH} levels" in request_error(too_deep)
    # Deeper than msgspec's own limit: its RecursionError is caught and said the same way.
    assert f"nested more than {MAX_DEPTH} levels" in request_error("[" * 100_000 + "]" * 100_000)


def test_dead_copy_of_a_too_large_entry_is_bounded() -> None:
    big = "é" * 2_000_000
    fields = {"feature": "summarize", "request": big, "tenant": "acme"}
    fields.update({f"extra{n}": "v" * 5000 for n in range(5000)})
    dead = dead_copy(fields, too_large=True)
    assert sum(len(k) + len(v) for k, v in dead.items()) < 64_000
    assert dead["request"] == big[:DEAD_VALUE_CHARS] and dead["tenant"] == "acme"
    cut = json.loads(dead["truncated"])
    raw = big.encode()
    assert cut["request"] == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert int(dead["dropped_fields"]) == 5000 - 32


def test_dead_copy_keeps_known_fields_whole_and_bytes_as_they_came() -> None:
    request = json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]})
    bad = b"\xff\xfe".decode("utf-8", "surrogateescape")
    dead = dead_copy({"feature": "summarize", "request": request, "note": bad}, too_large=False)
    assert dead["request"] == request and dead["note"] == bad
    assert "truncated" not in dead and "dropped_fields" not in dead


def test_fingerprint_is_tenant_feature_and_request() -> None:
    base = {"feature": "f", "request": HELLO, "tenant": "a", "id": "1", "reply_to": "r"}
    same = {**base, "id": "2", "reply_to": "s", "trace": "t"}
    assert fingerprint(base) == fingerprint(same)
    for name, value in (("tenant", "b"), ("feature", "g"), ("request", HELLO + " ")):
        assert fingerprint({**base, name: value}) != fingerprint(base)
    assert fingerprint({"feature": "f", "request": HELLO}) != fingerprint(
        {"feature": "f", "request": HELLO, "tenant": ""}
    )


def test_clean_and_shown_make_producer_text_safe() -> None:
    raw = b"a\xffb".decode("utf-8", "surrogateescape")
    assert clean(raw) == "a\ufffdb"
    assert shown("x\ny\x1b[2J" + raw) == "'x\\ny\\x1b[2Ja\ufffdb'"
    assert shown("z" * 500, 10) == repr("z" * 10 + "...")


def test_reserved_ids_are_entry_ids_and_priority_entry_ids() -> None:
    priorities = ("high", "normal", "low")
    for value in ("1763830000000-0", "5-1", "low:5-1", "normal:1763830000000-12"):
        assert is_reserved_id(value, priorities), value
    for value in ("invoice:2024-001x", "invoice:2024-001", "5-1a", "job-1", "low:abc", "x:low:5-1"):
        assert not is_reserved_id(value, priorities), value


def test_the_python_client_refuses_what_the_worker_would_dead_letter() -> None:
    producer = Producer(fakeredis.FakeAsyncRedis(), "tq")
    for kw, says in (
        ({"id": "1763830000000-0"}, "form of a stream entry id"),
        ({"id": "high:5-1"}, "form of a stream entry id"),
        ({"id": "a b"}, "contains ' '"),
        ({"reply_to": "tq:usage"}, "names one of tokenq's own keys"),
    ):
        with pytest.raises(ValueError, match=says):
            producer.fields(NewJob(feature="f", request=HELLO, **kw))  # type: ignore[arg-type]
    fields = producer.fields(NewJob(feature="f", request=HELLO, id="invoice:2024-001"))
    assert fields["id"] == "invoice:2024-001"
