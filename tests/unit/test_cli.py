"""The command line's shape: where options go, what --help says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_up_takes_config_after_the_command_word_too() -> None:
    parser = build_parser()
    assert parser.parse_args(["up", "--config", "other.toml"]).config == "other.toml"
    assert parser.parse_args(["--config", "first.toml", "up"]).config == "first.toml"
    assert parser.parse_args(["up"]).config is None


def test_up_help_says_how_to_use_another_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--config PATH" in text and "TOKENQ_CONFIG" in text


def test_dev_py_help_says_how_to_use_another_config() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "dev.py"), "--help"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0
    assert "python3 dev.py up --config PATH" in done.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [(["reconcile", "--max-diff-usd", "lots"], "'lots' is not a number of 0 or more"),
     (["reconcile", "--month", "2026-13"], "'2026-13' is not a month as YYYY-MM"),
     (["estimate", "--output-tokens", "0"], "'0' is not a whole number of at least 1")],
)  # fmt: skip
def test_bad_arguments_say_what_is_allowed(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(args)
    assert says in capsys.readouterr().err
