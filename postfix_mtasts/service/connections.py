"""The Postfix connections open right now, and how shutdown lets them finish.

The protocols report themselves here as they connect and disconnect
(:class:`~postfix_mtasts.protocol.ConnectionTracker`). At shutdown the daemon
first stops reading new requests and waits (bounded) until every request
received has its answer, and only after the lookup has stopped closes the
connections, once their answers are written.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

log = logging.getLogger("postfix_mtasts.service")

#: At shutdown, how long connections may keep lookups running before they are closed.
SHUTDOWN_GRACE = 30.0
#: How long a closed connection may take to flush its last answers.
CLOSE_GRACE = 5.0
#: How often shutdown looks whether the connections have gone idle.
DRAIN_POLL = 0.05


class ConnectionSet:
    """The Postfix connections open right now."""

    def __init__(self) -> None:
        self.open: set[Any] = set()

    def __len__(self) -> int:
        return len(self.open)

    def opened(self, connection: Any) -> None:
        self.open.add(connection)

    def closed(self, connection: Any) -> None:
        self.open.discard(connection)

    def busy(self) -> list[Any]:
        """The connections with a request still waiting for its answer."""
        return [connection for connection in self.open if connection.busy]

    async def drain(self, clock: IReactorTime) -> None:
        """No new requests; wait (bounded) until every request received has its answer."""
        for connection in list(self.open):
            connection.hold()
        waited = 0.0
        while self.busy() and waited < SHUTDOWN_GRACE:
            await deferLater(clock, DRAIN_POLL, lambda: None)
            waited += DRAIN_POLL
        busy = len(self.busy())
        if busy:
            log.warning("closing %d connections with lookups still running after %gs", busy, SHUTDOWN_GRACE)

    async def close(self, clock: IReactorTime) -> None:
        """Close every connection once its answers are written (loseConnection flushes first)."""
        for connection in list(self.open):
            connection.transport.loseConnection()
        waited = 0.0
        while self.open and waited < CLOSE_GRACE:
            await deferLater(clock, DRAIN_POLL, lambda: None)
            waited += DRAIN_POLL
        for connection in list(self.open):
            connection.transport.abortConnection()
