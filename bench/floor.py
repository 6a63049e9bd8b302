"""The floor for any Twisted design: a bare NetstringReceiver answering a constant.

No decoding of the key, no lookup: what Twisted itself costs per socketmap
request on the given reactor: "epoll" (postfix-mtasts's own with its default
SQLite cache) or "asyncio" (its reactor with Redis or PostgreSQL).
"epoll-eager" sends each reply on the socket at once when nothing is
buffered, as postfix-mtasts does, instead of through ``transport.write``:
the floor for a design that does that too. "epoll-raw" does that and parses
nothing (each chunk read is taken for one request, as the load generator
sends them): the reactor and the system calls alone.

    python bench/floor.py PORT [asyncio|epoll|epoll-eager|epoll-raw] [BACKLOG]

BACKLOG is the listen backlog (default 256); the connection storms of
``bench/storm.py`` give it the kernel's largest, as the daemon has.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

#: The same size of answer a cached enforce policy gets.
REPLY = b"OK secure match=.mx.p000001.example:mx1.p000001.example servername=hostname"
#: Listen backlog unless one is given.
DEFAULT_BACKLOG = 256


def main() -> int:
    port = int(sys.argv[1])
    kind = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    backlog = int(sys.argv[3]) if len(sys.argv) > 3 else DEFAULT_BACKLOG
    if kind == "asyncio":
        from twisted.internet import asyncioreactor

        asyncioreactor.install(asyncio.new_event_loop())  # type: ignore[no-untyped-call]
    elif kind in ("epoll", "epoll-eager", "epoll-raw"):
        from twisted.internet import epollreactor

        epollreactor.install()  # type: ignore[no-untyped-call]
    else:
        raise SystemExit(f"floor: unknown reactor {kind!r}")
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.basic import NetstringReceiver

    class Constant(NetstringReceiver):
        def stringReceived(self, string: bytes) -> None:
            self.sendString(REPLY)  # type: ignore[no-untyped-call]

    wire = b"%d:%b," % (len(REPLY), REPLY)

    def send_at_once(transport: Any) -> None:
        """The reply on the socket at once when nothing is buffered, the rest
        (or all of it) through ``write``: what postfix-mtasts does."""
        if not transport.dataBuffer and not transport._tempDataBuffer:
            try:
                sent = transport.getHandle().send(wire)
            except BlockingIOError:
                sent = 0
            if sent < len(wire):
                transport.write(wire[sent:])
            return
        transport.write(wire)

    class EagerConstant(NetstringReceiver):
        def stringReceived(self, string: bytes) -> None:
            send_at_once(self.transport)

    class RawConstant(Protocol):
        def dataReceived(self, data: bytes) -> None:
            send_at_once(self.transport)

    protocols: dict[str, type[Protocol]] = {"epoll-eager": EagerConstant, "epoll-raw": RawConstant}
    factory = Factory.forProtocol(protocols.get(kind, Constant))
    factory.noisy = False
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=backlog)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
