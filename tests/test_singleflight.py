"""singleflight: one resolution per key however many ask, a deadline per asker
that never cancels the work for the others, and an error carried to each."""

from __future__ import annotations

import logging

import pytest
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.task import Clock, deferLater

from postfix_mtasts.singleflight import SingleFlight
from tests.fakes import result_of

log = logging.getLogger("test")


def flights(clock: Clock, finished: list[str] | None = None) -> SingleFlight[str]:
    return SingleFlight(clock, log, (finished if finished is not None else []).append)


def test_concurrent_askers_share_one_run() -> None:
    clock = Clock()
    runs: list[str] = []

    async def resolve() -> str:
        runs.append("run")
        await deferLater(clock, 1.0, lambda: None)
        return "answer"

    finished: list[str] = []
    flight = flights(clock, finished)
    shared = [flight.join("example.com", resolve) for _ in range(20)]
    waiters = [Deferred.fromCoroutine(flight.wait(d, None)) for d in shared]
    assert "example.com" in flight
    clock.advance(1.0)

    assert runs == ["run"]
    assert [result_of(w) for w in waiters] == ["answer"] * 20
    assert finished == ["example.com"] and "example.com" not in flight


def test_a_deadline_ends_one_wait_not_the_resolution() -> None:
    clock = Clock()

    async def resolve() -> str:
        await deferLater(clock, 5.0, lambda: None)
        return "answer"

    flight = flights(clock)
    shared = flight.join("example.com", resolve)
    impatient = Deferred.fromCoroutine(flight.wait(shared, 1.0))
    patient = Deferred.fromCoroutine(flight.wait(shared, None))
    clock.advance(1.0)

    with pytest.raises(TimeoutError):
        result_of(impatient)
    assert not patient.called
    clock.advance(4.0)
    assert result_of(patient) == "answer"


def test_a_late_joiner_has_only_what_is_left_of_the_deadline() -> None:
    clock = Clock()

    async def resolve() -> str:
        await deferLater(clock, 10.0, lambda: None)
        return "answer"

    flight = flights(clock)
    flight.join("example.com", resolve)
    clock.advance(3.0)

    assert flight.time_left("example.com", 5.0) == 2.0
    assert flight.time_left("other.example", 5.0) == 5.0


def test_an_error_reaches_every_waiter_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()

    async def resolve() -> str:
        await deferLater(clock, 1.0, lambda: None)
        raise RuntimeError("resolver bug")

    flight = flights(clock)
    shared = flight.join("example.com", resolve)
    waiters = [Deferred.fromCoroutine(flight.wait(shared, None)) for _ in range(3)]
    with caplog.at_level(logging.ERROR, "test"):
        clock.advance(1.0)

    for waiter in waiters:
        with pytest.raises(RuntimeError, match="resolver bug"):
            result_of(waiter)
    assert len([r for r in caplog.records if "resolution failed unexpectedly" in r.getMessage()]) == 1
