"""Running one in-process measurement (hotpath.py, memtrace.py, coldpath.py)
on a freshly installed Twisted reactor until it finishes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.python.failure import Failure


def run(
    reactor_name: str, work: Callable[[Any], Coroutine[Any, Any, dict[str, Any]]]
) -> tuple[dict[str, Any], Failure | None]:
    """Install the ``reactor_name`` reactor ("asyncio" or "epoll"), run
    ``work(reactor)`` from the loop's first turn until it is done, then stop.
    Returns its figures, or ``({}, failure)`` when it failed."""
    if reactor_name == "asyncio":
        from twisted.internet import asyncioreactor

        asyncioreactor.install(asyncio.new_event_loop())  # type: ignore[no-untyped-call]
    else:
        from twisted.internet import epollreactor

        epollreactor.install()  # type: ignore[no-untyped-call]
    from twisted.internet import reactor as global_reactor
    from twisted.internet.defer import Deferred

    reactor: Any = global_reactor
    figures: dict[str, Any] = {}
    failed: list[Failure] = []

    def start() -> None:
        d = Deferred.fromCoroutine(work(reactor))
        d.addCallbacks(figures.update, failed.append)
        d.addBoth(lambda _: reactor.stop())

    # From the loop's first turn: under the asyncio reactor, callWhenRunning
    # fires before the asyncio loop itself runs.
    reactor.callWhenRunning(reactor.callLater, 0, start)
    reactor.run()
    return figures, (failed[0] if failed else None)
