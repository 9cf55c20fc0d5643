"""Learnt max_tokens (worker.maxtokens): the histogram's buckets, the p99 within bounds, the
climb out of cut answers, and the config errors of its keys."""

from __future__ import annotations

import copy
import itertools
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from worker.config import FeatureConfig, parse_config
from worker.errors import ConfigError
from worker.maxtokens import BOUNDS, MIN_ANSWERS, Lengths, bucket, learnt, tally

ROOT = Path(__file__).resolve().parents[2]
RAW: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())


def feature(**settings: Any) -> FeatureConfig:
    return msgspec.convert({"max_tokens_learn": True, **settings}, FeatureConfig)


def lengths(whole: dict[int, int], cut: dict[int, int] | None = None) -> Lengths:
    return Lengths(
        {bucket(k): v for k, v in whole.items()}, {bucket(k): v for k, v in (cut or {}).items()}
    )


def test_buckets_are_upper_bounds_that_grow_by_at_most_half() -> None:
    assert [bucket(n) for n in (0, 1, 8, 9, 100, 131_072, 10**9)] == [
        8, 8, 8, 16, 128, 131_072, 131_072,
    ]  # fmt: skip
    assert all(b / a <= (2 if a < 16 else 1.5) for a, b in itertools.pairwise(BOUNDS))


def test_nothing_is_learnt_from_too_few_answers() -> None:
    assert learnt(feature(), lengths({40: MIN_ANSWERS - 1})) is None
    assert learnt(feature(), lengths({40: MIN_ANSWERS})) == (
        48, "max_tokens 48 learnt (p99 of 100 answers)",
    )  # fmt: skip


def test_the_p99_bucket_is_sent() -> None:
    # 990 answers of about 60 tokens, 10 of about 500: the 99th percentile is in the first.
    assert learnt(feature(max_tokens=1024), lengths({60: 990, 500: 10})) == (
        64, "max_tokens 64 learnt (p99 of 1000 answers)",
    )  # fmt: skip
    assert learnt(feature(max_tokens=1024), lengths({60: 989, 500: 11}))[0] == 512  # type: ignore[index]


def test_the_learnt_value_stays_within_the_floor_and_the_cap() -> None:
    few_words = lengths({5: 500})
    assert learnt(feature(max_tokens_floor=32), few_words) == (
        32, "max_tokens 32 learnt (p99 of 500 answers is 8; max_tokens_floor)",
    )  # fmt: skip
    long_ones = lengths({3000: 500})
    assert learnt(feature(max_tokens=1024, max_tokens_cap=2048), long_ones) == (
        2048, "max_tokens 2048 learnt (p99 of 500 answers is 3072; at the cap)",
    )  # fmt: skip
    assert learnt(feature(max_tokens=1024), long_ones)[0] == 1024  # type: ignore[index]


def test_answers_cut_short_double_the_room_until_they_no_longer_are() -> None:
    # Cut at 50: the length of the answers is not known, only that it is more.
    f = feature(max_tokens=50, max_tokens_cap=4096)
    assert learnt(f, lengths({30: 180}, cut={50: 20})) == (
        128, "max_tokens 128 learnt (20 of 200 answers cut at up to 64, doubled)",
    )  # fmt: skip
    # Next day, at 128: only 1% are cut, so the p99 is seen again.
    assert learnt(f, lengths({30: 180, 110: 18}, cut={128: 2}))[0] == 128  # type: ignore[index]


def test_fields_that_are_not_counts_are_left_out() -> None:
    counted = tally([{"64": "3", "c64": "2", "junk": "1", "65": "1", "64x": "1", "c": "1"},
                     {"64": "-1", "128": "x", "8": "4"}])  # fmt: skip
    assert counted == Lengths({64: 3, 8: 4}, {64: 2})


def test_a_floor_above_max_tokens_is_no_error_without_learning() -> None:
    raw = copy.deepcopy(RAW)
    raw["features"]["classify_ticket"].update({"max_tokens": 8, "max_tokens_cap": 10})
    assert parse_config(raw).features["classify_ticket"].max_tokens_floor == 16


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"max_tokens_learn": True, "max_tokens_floor": 8000},
            "features.summarize.max_tokens_floor = 8000 is over max_tokens_cap or max_tokens",
        ),
        (
            {"max_tokens_learn": True, "min_output_tokens": 50, "max_tokens_floor": 20},
            "features.summarize.max_tokens_floor = 20 is below its min_output_tokens = 50",
        ),
        ({"max_tokens_floor": 0}, "features.summarize.max_tokens_floor = 0 is not allowed"),
        ({"max_tokens_learn": "yes"}, "features.summarize.max_tokens_learn = 'yes' is not allowed"),
    ],
)
def test_bad_learning_settings_name_the_key(settings: dict[str, Any], expected: str) -> None:
    raw = copy.deepcopy(RAW)
    raw["features"]["summarize"].update(settings)
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert expected in str(err.value)
