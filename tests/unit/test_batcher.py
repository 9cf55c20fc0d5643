"""Batch windows without a server: custom_ids, time-of-day windows, deadlines, config errors."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

import pytest

from worker.batcher import CUSTOM_ID, custom_id, flush_at_ms, window_end_ms, window_open
from worker.config import BatchConfig, parse_config
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent.parent


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


@pytest.mark.parametrize(
    "job_id", ["1763830000000-0", "3f2b8c1e-9a4d-4c1e-8f00-0a1b2c3d4e5f", "low:5-1", "a" * 65, "é"]
)
def test_custom_ids_fit_the_api_and_keep_ids_that_fit(job_id: str) -> None:
    cid = custom_id(job_id)
    assert CUSTOM_ID.fullmatch(cid)
    assert (cid == job_id) == bool(CUSTOM_ID.fullmatch(job_id))
    assert custom_id(job_id) == cid  # derivable again after a restart


def test_without_windows_a_job_is_flushed_after_the_interval() -> None:
    b = BatchConfig(flush_interval_s=60, completion_s=3600)
    at = ms("2026-11-30T12:00:00+00:00")
    assert window_open(b, at)
    assert flush_at_ms(b, at) == at + 60_000
    assert window_end_ms(b, at) == at + 60_000 + 3_600_000


def test_time_of_day_windows_wrap_midnight_and_follow_the_time_zone() -> None:
    b = BatchConfig(windows=["22:00-02:00"], timezone="Europe/Berlin", flush_interval_s=60)
    assert window_open(b, ms("2026-11-30T23:30:00+01:00"))
    assert window_open(b, ms("2026-12-01T01:59:00+01:00"))
    assert not window_open(b, ms("2026-11-30T12:00:00+01:00"))
    # Arriving at noon: submitted when the window opens at 22:00 Berlin time.
    assert flush_at_ms(b, ms("2026-11-30T12:00:00+01:00")) == ms("2026-11-30T22:00:00+01:00")


def test_a_deadline_is_compared_with_the_window_end() -> None:
    b = BatchConfig(windows=["01:00-05:00"], flush_interval_s=60, completion_s=86_400)
    end = window_end_ms(b, ms("2026-11-30T12:00:00+00:00"))
    assert end == ms("2026-12-02T01:00:00+00:00")


@pytest.mark.parametrize(
    ("batch", "says"),
    [
        ({"priorities": ["urgent"]}, "batch.priorities names 'urgent', which is not in queue"),
        ({"priorities": ["high", "normal", "low"]}, "leave at least one for realtime jobs"),
        ({"max_requests": 100_001}, "batch.max_requests = 100001 is not allowed"),
        ({"max_bytes": 300_000_000}, "batch.max_bytes = 300000000 is not allowed"),
        ({"windows": ["1am-5am"]}, "batch.windows.0 = '1am-5am' is not allowed"),
        ({"windows": ["05:00-05:00"]}, "batch.windows has '05:00-05:00', which is empty"),
        ({"timezone": "Mars/Base"}, "batch.timezone = 'Mars/Base' is not a time zone"),
        ({"retry": "never"}, "batch.retry = 'never' is not allowed"),
        ({"flush_intervall_s": 1}, "unknown key 'batch.flush_intervall_s'"),
    ],
)
def test_batch_config_errors_name_key_value_and_what_is_allowed(
    batch: dict[str, Any], says: str
) -> None:
    raw = tomllib.loads((ROOT / "config.toml").read_text())
    raw["batch"] = {**raw["batch"], **batch}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert says in str(caught.value), str(caught.value)
