"""Work that runs behind the lookups: periodic jobs and background coroutines.

Everything started here is tracked, so that stopping the daemon cancels the
timers and waits for what is running, and a job that fails is logged once
with its traceback (a bug) instead of vanishing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from postfix_mtasts.errors import is_cancellation, log_failure


class BackgroundWork:
    """Periodic jobs and background coroutines on ``reactor``, logged to ``log``."""

    def __init__(self, reactor: IReactorTime, log: logging.Logger) -> None:
        self.reactor = reactor
        self.log = log
        self.stopping = False
        self._calls: list[IDelayedCall] = []
        self._running: set[Deferred[Any]] = set()

    def every(self, interval: float, job: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``job()`` every ``interval`` seconds, from one interval from now, until stop()."""
        if self.stopping:
            return

        def run() -> None:
            self._calls[:] = [c for c in self._calls if c.active()]
            self.spawn(job())
            self.every(interval, job)

        self._calls.append(self.reactor.callLater(interval, run))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        """Run a coroutine in the background, keeping a handle for stop()."""
        d: Deferred[Any] = Deferred.fromCoroutine(coro)
        self._running.add(d)

        def done(result: Any) -> None:
            self._running.discard(d)
            if isinstance(result, Failure) and not is_cancellation(result):
                log_failure(self.log, "background task failed", result)
            return None

        d.addBoth(done)
        return d

    async def stop(self, also: Iterable[Deferred[Any]] = ()) -> None:
        """Cancel the timers, then wait for what runs (and ``also``) to finish."""
        self.stopping = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        for d in [*self._running, *also]:
            try:
                await quiet(d)
            except Exception:  # already logged where it failed
                pass


async def quiet(d: Deferred[Any]) -> None:
    """Await ``d`` without adding it a second consumer that could cancel it."""
    waiter: Deferred[None] = Deferred()

    def relay(result: object) -> object:
        waiter.callback(None)
        return result

    d.addBoth(relay)
    await waiter
