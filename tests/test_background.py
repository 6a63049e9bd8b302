"""background: periodic jobs and background coroutines, all tracked, so that
stopping cancels the timers and waits for what runs, and a job that fails is
logged once instead of vanishing."""

from __future__ import annotations

import logging

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from postfix_mtasts.background import BackgroundWork
from tests.fakes import result_of

log = logging.getLogger("test")


def test_a_job_runs_every_interval_until_stopped() -> None:
    clock = Clock()
    work = BackgroundWork(clock, log)
    runs: list[float] = []

    async def job() -> None:
        runs.append(clock.seconds())

    work.every(10.0, job)
    clock.pump([10.0] * 3)
    result_of(Deferred.fromCoroutine(work.stop()))
    clock.pump([10.0] * 3)

    assert runs == [10.0, 20.0, 30.0]
    assert clock.getDelayedCalls() == []


def test_stop_waits_for_what_runs() -> None:
    clock = Clock()
    work = BackgroundWork(clock, log)
    done: list[str] = []

    async def slow() -> None:
        await deferLater(clock, 5.0, lambda: None)
        done.append("slow")

    work.spawn(slow())
    stopping = Deferred.fromCoroutine(work.stop())
    assert not stopping.called
    clock.advance(5.0)

    result_of(stopping)
    assert done == ["slow"]


def test_a_failing_job_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    work = BackgroundWork(clock, log)

    async def broken() -> None:
        raise RuntimeError("bug in a job")

    with caplog.at_level(logging.ERROR, "test"):
        work.spawn(broken())

    [record] = [r for r in caplog.records if "background task failed" in r.getMessage()]
    assert record.exc_info is not None and "bug in a job" in record.getMessage()
