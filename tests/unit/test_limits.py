"""Rate-limit pieces that need no server: the input estimate, header reading, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_config import broken
from worker.config import parse_config
from worker.errors import ConfigError
from worker.estimate import Calibration, raw_estimate
from worker.limiter import caps_of, read_headers

ROOT = Path(__file__).resolve().parents[2]


def test_estimate_counts_text_four_characters_a_token_plus_overheads() -> None:
    params = {
        "system": "s" * 40,
        "messages": [
            {"role": "user", "content": "u" * 80},
            {"role": "assistant", "content": [{"type": "text", "text": "a" * 40}]},
        ],
    }
    assert raw_estimate(params) == (40 + 80 + 40) // 4 + 2 * 4 + 3


def test_estimate_counts_other_blocks_and_tools_as_compact_json() -> None:
    block = {"type": "tool_result", "tool_use_id": "t1", "content": "x" * 20}
    tool = {"name": "f", "input_schema": {"type": "object"}}
    params = {"messages": [{"role": "user", "content": [block]}], "tools": [tool]}
    expected = -(-len(json.dumps(block, separators=(",", ":"))) // 4)
    expected += -(-len(json.dumps(tool, separators=(",", ":"))) // 4) + 4 + 3
    assert raw_estimate(params) == expected


def test_calibration_learns_the_model_ratio_and_stays_bounded() -> None:
    cal = Calibration(weight=0.5)
    params = {"messages": [{"role": "user", "content": "x" * 396}]}  # 99 + 4 + 3 = 106 raw
    assert cal.estimate("m", params) == (106, 106)
    cal.learn("m", 106, 212)  # the model's tokenizer counts twice as many
    assert cal.estimate("m", params) == (212, 106)
    cal.learn("m", 106, 106)
    assert cal.estimate("m", params)[0] == 159  # halfway back: an EWMA, not a jump
    cal.learn("m", 100, 10_000)
    assert cal.factors["m"] <= 4.0
    assert cal.estimate("other", params) == (106, 106)


def test_headers_give_remaining_limits_and_retry_after() -> None:
    headers = {
        "anthropic-ratelimit-requests-remaining": "12",
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-input-tokens-remaining": "30000",
        "retry-after": "7",
    }
    assert read_headers(headers) == ((12, 30000, -1), (50, -1, -1), 7.0)
    assert read_headers({"retry-after": "soon"}) == ((-1, -1, -1), (-1, -1, -1), 0.0)


def test_caps_take_the_target_fraction_and_never_reach_zero() -> None:
    cfg = parse_config(broken("limits/target", 0.5))
    limits = cfg.models["claude-haiku-5-5"].limits
    assert limits is not None
    assert caps_of(limits, cfg.limits.target) == (500, 1_000_000, 200_000)
    assert caps_of(limits, 0.0001) == (1, 200, 40)


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        ("limits/mode", "cluster", "limits.mode = 'cluster' is not allowed"),
        ("limits/target", 1.5, "limits.target = 1.5 is not allowed"),
        ("models/claude-haiku-5-5/limits/rpm", 0, "models.claude-haiku-5-5.limits.rpm = 0"),
        ("models/claude-haiku-5-5/limits/itpm", ..., "limits.itpm is required but missing"),
        ("features/summarize/limit_share", 2, "features.summarize.limit_share = 2"),
    ],
)  # fmt: skip
def test_bad_limit_settings_name_the_key(path: str, value: object, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace(".", r"\.").replace("(", r"\(")):
        parse_config(broken(path, value))
