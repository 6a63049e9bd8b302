"""The daemon as a tree of Twisted services, stopped in reverse order.

Each part that has something to undo at shutdown (a listener, the control
socket, the HTTP listener, the report watch, the lookup's background work,
the open connections, the store) is a child of one
:class:`OrderedServices`, added in the order it started; reload adds and
removes listener children. Twisted's ``MultiService`` stops its children in
reverse order but all at once; here each child's stop is waited for before
the next begins, because the order is the point: stop accepting, let the
lookups in flight answer, close the connections, then close the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort


class OrderedServices(MultiService):
    """A ``MultiService`` whose children stop one after another, the last added first."""

    # Typed doors to Twisted's untyped service API.

    def add(self, child: Service) -> None:
        """Add ``child`` (started at once if the tree runs)."""
        child.setServiceParent(self)  # type: ignore[no-untyped-call]

    def start(self) -> None:
        self.startService()  # type: ignore[no-untyped-call]

    async def remove(self, child: Service) -> None:
        """Take ``child`` out of the tree and wait until it has stopped."""
        stopped = child.disownServiceParent()  # type: ignore[no-untyped-call]
        if stopped is None:
            stopped = child.stopService()  # type: ignore[no-untyped-call]
        if stopped is not None:
            await stopped

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop_in_turn())

    async def _stop_in_turn(self) -> None:
        # Children that never started (a start that failed half way) are
        # stopped too: what they opened must be closed all the same.
        for child in reversed(list(self)):
            await maybeDeferred(child.stopService)


class Step(Service):
    """A child whose stop is ``stop()``, run once however often it is asked."""

    def __init__(self, name: str, stop: Callable[[], Awaitable[Any]]) -> None:
        self.setName(name)  # type: ignore[no-untyped-call]
        self._stop = stop
        self._stopped = False

    def stopService(self) -> Deferred[Any] | None:
        Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._stopped:
            return None
        self._stopped = True
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        await self._stop()


class ListeningService(Step):
    """A child holding one listening port; stopping it closes the port."""

    def __init__(self, name: str, port: IListeningPort) -> None:
        super().__init__(name, self._close)
        self.port = port

    async def _close(self) -> None:
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped
