"""One resolution per domain at a time, shared by every lookup that asks.

When a thousand Postfix processes ask about a new domain at once, one DNS
query and one fetch run; each asker waits for that one result with a
deadline of its own, and a deadline that passes never cancels the work for
the others. Deadlines run from when the resolution began, so a lookup that
joins late does not wait it out again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from postfix_mtasts.errors import is_cancellation, log_failure

T = TypeVar("T")


class FailedValue:
    """A failure carried as a value through a shared Deferred."""

    __slots__ = ("failure",)

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


class SingleFlight(Generic[T]):
    """The resolutions in flight, one per key, on ``reactor``'s clock."""

    def __init__(self, reactor: IReactorTime, log: logging.Logger,
                 finished: Callable[[str], None] = lambda key: None) -> None:
        self.reactor = reactor
        self.log = log
        self._finished = finished
        self._running: dict[str, Deferred[Any]] = {}
        # When each resolution in flight began: a deadline runs from there.
        self._since: dict[str, float] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._running

    def keys(self) -> list[str]:
        return list(self._running)

    def running(self) -> list[Deferred[Any]]:
        return list(self._running.values())

    def join(self, key: str, start: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[Any]:
        """The resolution of ``key`` in flight, or a new one made by ``start()``.

        The returned Deferred never fails: an unexpected error arrives as a
        :class:`Failure` *value* (logged once here), which :meth:`wait` turns
        back into an exception for each waiter, so nothing is left unhandled.
        """
        d = self._running.get(key)
        if d is not None:
            return d
        since = self.reactor.seconds()
        d = Deferred.fromCoroutine(start())

        def done(result: Any) -> Any:
            self._running.pop(key, None)
            self._since.pop(key, None)
            self._finished(key)
            if isinstance(result, Failure):
                if not is_cancellation(result):
                    log_failure(self.log, f"{key}: resolution failed unexpectedly", result)
                return FailedValue(result)
            return result

        d.addBoth(done)
        if not d.called:
            self._running[key] = d
            self._since[key] = since
        return d

    def time_left(self, key: str, deadline: float) -> float:
        """What remains of ``deadline`` for the resolution of ``key`` in flight."""
        since = self._since.get(key)
        if since is None:
            return deadline
        return deadline - (self.reactor.seconds() - since)

    async def wait(self, shared: Deferred[Any], deadline: float | None) -> T:
        """Wait for a shared resolution without letting a timeout cancel it for others."""
        if deadline is not None and deadline <= 0 and not shared.called:
            raise TimeoutError()
        waiter: Deferred[T] = Deferred()

        def relay(result: Any) -> Any:
            if not waiter.called:
                if isinstance(result, FailedValue):
                    waiter.errback(result.failure)
                else:
                    waiter.callback(result)
            return result

        shared.addBoth(relay)
        if deadline is not None:
            waiter.addTimeout(deadline, self.reactor)
        return await waiter
