"""Answer checks (worker.checks) and the config errors of their keys."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from worker.checks import CUT, check_answer
from worker.config import FeatureConfig, load_config, parse_config
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
RAW: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())

LABEL = {
    "type": "object",
    "required": ["label", "confidence"],
    "properties": {
        "label": {"enum": ["billing", "bug", "other"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
}


def feature(**settings: Any) -> FeatureConfig:
    """A feature as config.toml would give it (expect_schema already loaded)."""
    return msgspec.convert(settings, FeatureConfig)


def with_feature(**settings: Any) -> dict[str, Any]:
    """The repo's config with features.summarize changed."""
    raw = copy.deepcopy(RAW)
    raw["features"]["summarize"].update(settings)
    return raw


def test_an_answer_cut_at_max_tokens_fails_first() -> None:
    f = feature(expect="json", min_output_tokens=5)
    assert check_answer(f, '{"a": 1}', "max_tokens") == CUT


def test_min_output_tokens_counts_the_usage_or_else_estimates_from_the_text() -> None:
    f = feature(min_output_tokens=20)
    assert check_answer(f, "x" * 400, "end_turn", output_tokens=19) == (
        "answer has 19 output tokens, under min_output_tokens 20"
    )
    assert check_answer(f, "x" * 10, "end_turn", output_tokens=20) is None
    assert check_answer(f, "x" * 40, "end_turn") == (
        "answer has about 10 output tokens, under min_output_tokens 20"
    )
    assert check_answer(f, "x" * 80, "end_turn") is None


def test_json_answers_parse_plain_or_in_a_fence() -> None:
    f = feature(expect="json")
    assert check_answer(f, '{"answer": "hi"}', "end_turn") is None
    assert check_answer(f, '```json\n{"answer": "hi"}\n```', "end_turn") is None
    assert check_answer(f, "Sure! Here it is: {}", "end_turn") == "answer is not JSON"


def test_an_answer_nested_too_deeply_fails_instead_of_raising() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    assert check_answer(feature(expect="json"), deep, "end_turn") == (
        "answer is JSON nested too deeply to check"
    )
    recursive = {"type": "array", "items": {"$ref": "#"}}
    shallow_enough_to_parse = "[" * 900 + "]" * 900
    f = feature(expect="json", expect_schema=recursive)
    assert check_answer(f, shallow_enough_to_parse, "end_turn") == (
        "answer is JSON nested too deeply to check against expect_schema"
    )


def test_a_schema_failure_names_the_missing_property_or_the_schema_path() -> None:
    f = feature(expect="json", expect_schema=LABEL)
    assert check_answer(f, '{"label": "bug", "confidence": 0.9}', "end_turn") is None
    assert check_answer(f, '{"label": "bug"}', "end_turn") == (
        "answer fails expect_schema: 'confidence' is a required property"
    )
    assert check_answer(f, '{"label": "refund", "confidence": 0.9}', "end_turn") == (
        "answer fails expect_schema at #/properties/label/enum"
    )
    assert check_answer(f, "[1, 2]", "end_turn") == "answer fails expect_schema at #/type"


def test_a_reason_never_quotes_the_answer() -> None:
    f = feature(expect="json", expect_schema=LABEL)
    secret = "the customer's card is 4111 1111"
    answers = [
        json.dumps({"label": secret, "confidence": 2}),
        json.dumps({"label": "bug", "confidence": secret}),
        json.dumps(secret),
        secret,
    ]
    for answer in answers:
        reason = check_answer(f, answer, "end_turn")
        assert reason is not None and "4111" not in reason and "card" not in reason


def test_expect_regex_searches_the_text() -> None:
    f = feature(expect_regex=r"^(yes|no)\b")
    assert check_answer(f, "yes, it is", "end_turn") is None
    assert check_answer(f, "maybe", "end_turn") == "answer does not match expect_regex"
    both = feature(expect="json", expect_regex=r'"answer"')
    assert check_answer(both, '{"reply": 1}', "end_turn") == "answer does not match expect_regex"


def test_each_feature_config_checks_with_its_own_schema() -> None:
    one = feature(expect="json", expect_schema={"type": "object"})
    other = feature(expect="json", expect_schema={"type": "array"})
    assert check_answer(one, "{}", "end_turn") is None
    assert check_answer(other, "{}", "end_turn") == "answer fails expect_schema at #/type"
    assert check_answer(one, "[]", "end_turn") == "answer fails expect_schema at #/type"


def test_a_schema_file_is_read_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "label.json").write_text(json.dumps(LABEL))
    head = "[features.classify_ticket]\n"
    schema = head + 'expect_schema = "schemas/label.json"\n'
    text = (ROOT / "config.toml").read_text().replace(head, schema)
    (tmp_path / "config.toml").write_text(text)
    cfg = load_config(tmp_path / "config.toml")
    f = cfg.features["classify_ticket"]
    assert f.expect_schema == LABEL
    assert check_answer(f, '{"label": "bug"}', "end_turn") == (
        "answer fails expect_schema: 'confidence' is a required property"
    )


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"expect": "json", "expect_schema": {"type": "objekt"}},
            "features.summarize.expect_schema: not a valid JSON Schema at type: 'objekt' is "
            "not valid under any of the given schemas",
        ),
        (
            {"expect": "json", "expect_schema": {"$ref": "https://example.com/s.json"}},
            "features.summarize.expect_schema: $ref 'https://example.com/s.json' does not "
            "point inside the schema",
        ),
        (
            {"expect": "json", "expect_schema": {"items": {"$ref": "#/$defs/nope"}}},
            "$ref '#/$defs/nope' does not point inside the schema",
        ),
        (
            {"expect_schema": {"type": "object"}},
            'features.summarize.expect_schema needs features.summarize.expect = "json"',
        ),
        (
            {"expect": "json", "expect_schema": "nope/missing.json"},
            "features.summarize.expect_schema = 'nope/missing.json': cannot read a JSON Schema",
        ),
        (
            {"expect": "json", "expect_schema": 5},
            "features.summarize.expect_schema = 5 is not allowed",
        ),
        (
            {"expect_regex": "(yes"},
            "features.summarize.expect_regex = '(yes' is not a regular expression: missing )",
        ),
        (
            {"min_output_tokens": 5000},
            "features.summarize.min_output_tokens = 5000 is over the most an answer may have "
            "(4096, max_tokens_cap or max_tokens)",
        ),
        (
            {"min_output_tokens": 0},
            "features.summarize.min_output_tokens = 0 is not allowed: Expected `int` >= 1",
        ),
    ],
)
def test_bad_check_settings_name_the_key_and_what_is_allowed(
    settings: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(with_feature(**settings))
    assert expected in str(err.value)


def test_a_schema_file_that_is_not_json_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1]")
    for name, says in [("bad.json", "cannot read a JSON Schema"), ("list.json", "no JSON object")]:
        raw = with_feature(expect="json", expect_schema=name)
        with pytest.raises(ConfigError, match=says):
            parse_config(raw, where=str(tmp_path / "config.toml"))
