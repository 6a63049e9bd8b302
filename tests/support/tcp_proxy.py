"""A loopback TCP proxy that a test can cut and restore, to stage a backend outage.

Clients connect to the proxy's port instead of the server's. ``cut()`` drops
every connection and refuses new ones (the server "goes away");
``cut(hang=True)`` keeps accepting but forwards nothing (the server "hangs",
so only timeouts notice); ``slow_down(seconds)`` forwards everything but
holds each of the server's replies that long (the server "answers late", so a
client that waits for it is late too); ``restore()`` forwards again, at once,
on the same port.
"""

from __future__ import annotations

from collections import deque
from typing import Any, cast

from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IDelayedCall, IListeningPort, ITransport

LOOPBACK = "127.0.0.1"


def _transport(side: protocol.Protocol) -> ITransport:
    assert side.transport is not None, "protocol used before it was connected"
    return side.transport


class _Outbound(protocol.Protocol):
    """The proxy's connection to the real server, paired with one client."""

    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound

    def connectionMade(self) -> None:
        self.inbound.outbound_ready(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.inbound.proxy.hanging:
            self.inbound.reply(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.inbound.server_closed()


class _OutboundFactory(protocol.ClientFactory):
    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound

    def buildProtocol(self, addr: Any) -> _Outbound:
        return _Outbound(self.inbound)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        _transport(self.inbound).loseConnection()


class _Inbound(protocol.Protocol):
    """A client's connection to the proxy; data is held until the server side is up."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.outbound: _Outbound | None = None
        self.buffer: list[bytes] = []
        #: The server's replies held back by ``proxy.delay``: (when due, bytes), in order.
        self.late: deque[tuple[float, bytes]] = deque()
        self._late_call: IDelayedCall | None = None
        self._close_when_sent = False

    def connectionMade(self) -> None:
        self.proxy.connections.add(self)
        if not self.proxy.hanging:
            self.proxy.reactor.connectTCP(
                self.proxy.target_host, self.proxy.target_port, _OutboundFactory(self)
            )

    def outbound_ready(self, outbound: _Outbound) -> None:
        self.outbound = outbound
        for chunk in self.buffer:
            _transport(outbound).write(chunk)
        self.buffer = []

    def dataReceived(self, data: bytes) -> None:
        if self.proxy.hanging:
            return
        if self.outbound is None:
            self.buffer.append(data)
        else:
            _transport(self.outbound).write(data)

    def reply(self, data: bytes) -> None:
        """Pass the server's bytes on to the client, ``proxy.delay`` seconds late."""
        if self.proxy.delay <= 0 and not self.late:
            _transport(self).write(data)
            return
        self.late.append((self.proxy.reactor.seconds() + self.proxy.delay, data))
        self._schedule_late()

    def server_closed(self) -> None:
        """The server hung up: so does the proxy, once the replies held back are sent."""
        if self.late:
            self._close_when_sent = True
        else:
            _transport(self).loseConnection()

    def _schedule_late(self) -> None:
        if self._late_call is None and self.late:
            wait = max(0.0, self.late[0][0] - self.proxy.reactor.seconds())
            self._late_call = self.proxy.reactor.callLater(wait, self._send_late)

    def _send_late(self) -> None:
        self._late_call = None
        now = self.proxy.reactor.seconds()
        while self.late and self.late[0][0] <= now:
            _transport(self).write(self.late.popleft()[1])
        if self.late:
            self._schedule_late()
        elif self._close_when_sent:
            _transport(self).loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.proxy.connections.discard(self)
        self.late.clear()
        if self._late_call is not None and self._late_call.active():
            self._late_call.cancel()
        self._late_call = None
        if self.outbound is not None:
            _transport(self.outbound).loseConnection()

    def abort(self) -> None:
        for side in (self, self.outbound):
            if side is not None:
                transport = _transport(side)
                getattr(transport, "abortConnection", transport.loseConnection)()


class _InboundFactory(protocol.ServerFactory):
    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: Any) -> _Inbound:
        return _Inbound(self.proxy)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target_host:target_port`` until cut."""

    def __init__(self, reactor: Any, target_host: str, target_port: int) -> None:
        self.reactor = reactor
        self.target_host = target_host
        self.target_port = target_port
        self.connections: set[_Inbound] = set()
        self.hanging = False
        #: Seconds each reply of the server is held before the client gets it.
        self.delay = 0.0
        self.port = 0
        self._listening: IListeningPort | None = None
        self._factory = _InboundFactory(self)

    def start(self) -> int:
        """Listen on a free loopback port and return it."""
        self._listening = self.reactor.listenTCP(self.port, self._factory, interface=LOOPBACK)
        self.port = cast(IPv4Address, self._listening.getHost()).port
        return self.port

    async def cut(self, hang: bool = False) -> None:
        """Stage an outage: drop every connection, then refuse (or, with ``hang``, black-hole) new ones."""
        for conn in list(self.connections):
            conn.abort()
        if hang:
            self.hanging = True
        elif self._listening is not None:
            listening, self._listening = self._listening, None
            stopped = listening.stopListening()
            if stopped is not None:
                await stopped

    def slow_down(self, delay: float) -> None:
        """Stage a slow server: from now on every reply reaches its client
        ``delay`` seconds after the server sent it (in order; requests go
        through at once). Connections stay up; ``restore()`` ends it."""
        if delay < 0:
            raise ValueError(f"a delay cannot be negative, got {delay}")
        self.delay = delay

    async def restore(self) -> None:
        """End the outage: forward new connections again, on the same port, without delay."""
        self.delay = 0.0
        if self.hanging:
            self.hanging = False
            for conn in list(self.connections):
                conn.abort()
        if self._listening is None:
            self.start()

    async def stop(self) -> None:
        """Close everything; the proxy cannot be used afterwards."""
        for conn in list(self.connections):
            conn.abort()
        if self._listening is not None:
            listening, self._listening = self._listening, None
            stopped = listening.stopListening()
            if stopped is not None:
                await stopped
