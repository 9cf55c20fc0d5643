"""worker.clock: the one clock the worker reads, which a test can move."""

from __future__ import annotations

import pytest

from worker import clock
from worker.contract import Job
from worker.errors import DeadlineExceeded
from worker.jobs import check_deadline


def test_a_moved_clock_is_what_the_code_reads(moved_clock: clock.MovableClock) -> None:
    start = clock.now_ms()
    assert clock.now_ms() == start  # it stands still
    job = Job(feature="f", request="{}", deadline_ms=start + 1000)
    check_deadline(job)  # not passed yet
    moved_clock.advance(1.5)
    assert clock.now_ms() == start + 1500 and clock.utc().timestamp() * 1000 == start + 1500
    with pytest.raises(DeadlineExceeded, match="500 ms late"):
        check_deadline(job)


def test_the_system_clock_is_back_after_the_test() -> None:
    assert type(clock.use(clock.Clock())) is clock.Clock
