"""worker.supervise: a long-lived duty survives its unexpected errors."""

from __future__ import annotations

import asyncio
import logging

import pytest

from worker.supervise import supervise


async def test_a_failing_duty_is_logged_with_its_traceback_and_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    until = asyncio.Event()
    runs: list[int] = []

    async def duty() -> None:
        runs.append(len(runs) + 1)
        if len(runs) < 3:
            raise RuntimeError(f"bug number {len(runs)}")
        until.set()  # the third run works, and is told to stop

    with caplog.at_level(logging.ERROR, logger="tokenq"):
        await asyncio.wait_for(supervise("the test duty", duty, until), timeout=10)
    assert runs == [1, 2, 3]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        "the test duty failed; it starts again in 0.1 s",
        "the test duty failed; it starts again in 0.2 s",
    ]
    assert all(r.exc_info is not None for r in failures)  # the traceback is in the log


async def test_a_supervised_duty_ends_when_told_even_during_its_backoff() -> None:
    until = asyncio.Event()

    async def duty() -> None:
        until.set()  # told to stop while failing: no backoff wait follows
        raise RuntimeError("bug")

    await asyncio.wait_for(supervise("the test duty", duty, until), timeout=1)


async def test_a_duty_that_returns_while_not_stopping_is_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    until = asyncio.Event()
    runs: list[int] = []

    async def duty() -> None:
        runs.append(1)
        if len(runs) == 2:
            until.set()

    await asyncio.wait_for(supervise("the test duty", duty, until), timeout=5)
    assert len(runs) == 2
    assert "the test duty ended by itself" in caplog.text
