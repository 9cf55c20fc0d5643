"""config.toml validation: every error names the key, the value and what is allowed."""

from __future__ import annotations

import copy
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from worker.config import load_config, parse_config
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
RAW: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())


def broken(path: str, value: Any) -> dict[str, Any]:
    """The repo's config with one key set (or removed, for value=...)."""
    raw = copy.deepcopy(RAW)
    *parents, last = path.split("/")
    node = raw
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return raw


def test_shipped_config_is_valid() -> None:
    cfg = load_config(ROOT / "config.toml")
    assert cfg.redis.url == "embedded"
    assert Path(cfg.redis.data_dir).is_absolute()
    assert cfg.router.baseline_tier in cfg.tiers


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("queue/max_attempts", 0, "queue.max_attempts = 0 is not allowed: Expected `int` >= 1"),
        ("queue/visibilty_timeout_s", 3, "unknown key 'queue.visibilty_timeout_s'"),
        (
            "models/claude-opus-5-5/input_usd_per_mtok",
            "x",
            "models.claude-opus-5-5.input_usd_per_mtok = 'x' is not allowed",
        ),
        (
            "models/claude-haiku-5-5/output_usd_per_mtok",
            ...,
            "models.claude-haiku-5-5.output_usd_per_mtok is required but missing",
        ),
        ("features/summarize/tier", "gpt", "features.summarize.tier = 'gpt' is not a tier"),
        ("redis/url", "http://x", "redis.url = 'http://x' is not allowed: use \"embedded\""),
        ("router/default_tier", "mini", "router.default_tier = 'mini' is not a tier"),
        ("tiers/opus", "claude-nope", 'has no prices: add a [models."claude-nope"] table'),
    ],
)
def test_bad_config_names_key_value_and_fix(path: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(broken(path, value))
    assert expected in str(err.value)


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(broken("models/claude-haiku-5-5/long_context/zz", 1))
    assert "unknown key 'models.claude-haiku-5-5.long_context.zz'" in str(err.value)
    assert "above_prompt_tokens" in str(err.value)


def test_config_check_command_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        (ROOT / "config.toml").read_text().replace("max_attempts = 5", "max_attempt = 5")
    )
    tokenq = [sys.executable, "-m", "worker"]
    ok = subprocess.run([*tokenq, "config", "check", str(ROOT / "config.toml")],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "ok." in ok.stdout
    fail = subprocess.run([*tokenq, "config", "check", str(bad)], capture_output=True, text=True)
    assert fail.returncode == 2
    assert "unknown key 'queue.max_attempt'" in fail.stderr


def test_missing_config_file_says_how_to_name_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config PATH or set TOKENQ_CONFIG"):
        load_config(tmp_path / "nope.toml")


def test_with_settings_replaces_adds_under_the_header_or_adds_the_section() -> None:
    from worker.config import with_settings

    text = 'prefix = "t"\n\n[queue]\nmax_attempts = 5\n\n[features.a]\ntier = "haiku"\n'
    out = with_settings(text, {
        "queue.max_attempts": 2, "features.a.expect": "json", "features.b.max_tokens": 9,
        "router.rules": [{"tier": "opus", "keywords": ["x"]}], "prefix": "u",
    })  # fmt: skip
    parsed = tomllib.loads(out)
    assert parsed["prefix"] == "u" and parsed["queue"]["max_attempts"] == 2
    assert parsed["features"]["a"] == {"expect": "json", "tier": "haiku"}
    assert parsed["features"]["b"] == {"max_tokens": 9}
    assert parsed["router"]["rules"] == [{"tier": "opus", "keywords": ["x"]}]
    with pytest.raises(ConfigError, match="top-level key 'nope'"):
        with_settings(text, {"nope": 1})


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    raw = broken("queue/max_attempts", 0)
    raw["queue"]["visibilty_timeout_s"] = 3
    raw["features"]["summarize"]["tier"] = "gpt"  # a cross-check, found despite the others
    raw["models"]["claude-opus-5-5"]["batch_discount"] = "x"
    raw["router"]["rules"] = [{"tier": "haiku", "min_input_tokens": -1}, {"tier": "nope"}]
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "6 problems:" in text
    for expected in [
        "queue.max_attempts = 0 is not allowed",
        "unknown key 'queue.visibilty_timeout_s'",
        "features.summarize.tier = 'gpt' is not a tier",
        "models.claude-opus-5-5.batch_discount = 'x' is not allowed",
        "router.rules.0.min_input_tokens = -1 is not allowed",
        "router.rules[1].tier = 'nope' is not a tier",
    ]:
        assert expected in text


def test_settings_of_a_disabled_section_are_checked() -> None:
    raw = broken("router/classifier/tier", "tiny")
    assert raw["router"]["classifier"]["enabled"] is False
    with pytest.raises(ConfigError, match=r"router.classifier.tier = 'tiny' is not a tier.*off"):
        parse_config(raw)


def test_config_check_lists_every_problem_of_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    text = (ROOT / "config.toml").read_text()
    bad.write_text(text.replace("max_attempts = 5", "max_attempt = 5").replace(
        "fair_every = 10", "fair_every = 1"))  # fmt: skip
    fail = subprocess.run([sys.executable, "-m", "worker", "config", "check", str(bad)],
                          capture_output=True, text=True)  # fmt: skip
    assert fail.returncode == 2
    assert "2 problems:" in fail.stderr
    assert "unknown key 'queue.max_attempt'" in fail.stderr
    assert "queue.fair_every = 1 is not allowed" in fail.stderr
