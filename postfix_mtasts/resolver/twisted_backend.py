"""A dnspython async I/O backend on the Twisted reactor, for any reactor.

dnspython's resolver logic stays dnspython's; only its sockets become Twisted
ports and connections: UDP through ``listenUDP``, TCP (answers truncated over
UDP) through a client endpoint, timers through ``callLater``. Its coroutines
await Deferreds, so they must be driven by ``Deferred.fromCoroutine`` (or a
coroutine it drives), never by an asyncio task.

dnspython catches ``Exception`` between attempts, and Twisted's CancelledError
is one, so cancelling the Deferred that awaits a query would only end one
attempt. Cancellation therefore travels through dnspython as
:class:`QueryCancelled`, a BaseException as asyncio's own is; wrap each call in
:func:`cancellable` to get Twisted's CancelledError back out.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

# The base classes live here; dns.asyncbackend re-exports them for backends
# to subclass, but not in a way mypy sees.
import dns._asyncbackend
import dns.exception
import dns.inet
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IAddress, IReactorTCP, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

_T = TypeVar("_T")

#: Largest datagram read from a UDP port (Twisted's default is 8192; a DNS
#: answer over UDP may be as large as the EDNS payload size we advertise).
MAX_DATAGRAM = 65_535
#: A TCP connect without a deadline from dnspython gives up after this long.
DEFAULT_CONNECT_TIMEOUT = 30.0


class QueryCancelled(BaseException):
    """The Deferred awaiting a query was cancelled; a BaseException so that
    dnspython's per-attempt ``except Exception`` lets it through."""


async def cancellable(work: Awaitable[_T]) -> _T:
    """Await dnspython ``work`` that runs on a :class:`TwistedBackend`:
    a cancellation inside it comes out as Twisted's CancelledError, which is
    what ``addTimeout`` and the other callers of a cancelled Deferred expect."""
    try:
        return await work
    except QueryCancelled:
        raise CancelledError() from None


def _timeout_error(timeout: float | None) -> dns.exception.Timeout:
    """The exception dnspython's asyncio backend raises when time is up."""
    return dns.exception.Timeout(timeout=timeout)  # type: ignore[no-untyped-call]


def _timed_out(result: object, timeout: float) -> NoReturn:
    raise _timeout_error(timeout)


async def _wait(reactor: Any, waiting: Deferred[_T], timeout: float | None) -> _T:
    """Await ``waiting``: dns.exception.Timeout after ``timeout`` seconds (as
    dnspython's asyncio backend raises), QueryCancelled when the awaiting
    Deferred is cancelled."""
    if timeout is not None:
        waiting.addTimeout(max(timeout, 0.0), reactor, onTimeoutCancel=_timed_out)
    try:
        return await waiting
    except (CancelledError, ConnectingCancelledError):
        raise QueryCancelled() from None


def _sockaddr(address: IAddress) -> tuple[Any, ...]:
    """A socket-module address tuple from a Twisted address object."""
    if isinstance(address, IPv6Address):
        return (address.host, address.port, address.flowInfo, address.scopeID)
    if isinstance(address, IPv4Address):
        return (address.host, address.port)
    raise OSError(errno.EAFNOSUPPORT, f"not an IP address: {address}")


class _Waiter:
    """At most one coroutine waiting for the next event of a protocol."""

    def __init__(self) -> None:
        self._waiting: Deferred[None] | None = None

    def wait(self) -> Deferred[None]:
        waiting: Deferred[None] = Deferred(self._forget)
        self._waiting = waiting
        return waiting

    def wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def _forget(self, waiting: Deferred[None]) -> None:
        if self._waiting is waiting:
            self._waiting = None


class _DatagramReceiver(DatagramProtocol):
    """Queues what arrives on a UDP port: ``(data, address)`` or an error."""

    # No "Starting protocol" / "Stopping protocol" log event for every query.
    noisy = False

    def __init__(self) -> None:
        self.arrived: deque[tuple[bytes, tuple[Any, ...]] | BaseException] = deque()
        self.waiter = _Waiter()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.arrived.append((datagram, addr))
        self.waiter.wake()

    def connectionRefused(self) -> None:
        self.arrived.append(ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)))
        self.waiter.wake()


class _DatagramSocket(dns._asyncbackend.DatagramSocket):
    """A Twisted UDP port, connected to ``destination`` when one was given."""

    def __init__(self, reactor: Any, af: int, port: Any, receiver: _DatagramReceiver) -> None:
        super().__init__(af, socket.SOCK_DGRAM)
        self._reactor = reactor
        self._port: Any = port
        self._receiver = receiver
        self._peer: tuple[Any, ...] | None = None
        # Twisted reports IPv6 senders as (host, port); dnspython compares the
        # full (host, port, flowinfo, scope_id) with where it sent the query.
        self._sent_to: dict[tuple[bytes, int], tuple[Any, ...]] = {}

    def connect(self, destination: tuple[Any, ...]) -> None:
        self._port.connect(destination[0], destination[1])
        self._peer = dns.inet.low_level_address_tuple((destination[0], destination[1]), self.family)

    async def sendto(self, what: bytes, destination: Any, timeout: float | None) -> int:
        """Send one datagram (Twisted's write never blocks, so no timeout)."""
        if self._port is None:
            raise OSError(errno.EBADF, "the UDP socket is closed")
        if self._peer is not None:
            self._port.write(what)
            return len(what)
        target = tuple(destination)
        if self.family == socket.AF_INET6:
            self._sent_to[(dns.inet.inet_pton(self.family, target[0]), target[1])] = target
        self._port.write(what, target)
        return len(what)

    async def recvfrom(self, size: int, timeout: float | None) -> tuple[bytes, tuple[Any, ...]]:
        """The next datagram and its sender; dns.exception.Timeout when none
        arrives within ``timeout`` seconds."""
        arrived = self._receiver.arrived
        if not arrived:
            if self._port is None:
                raise EOFError("EOF")
            await _wait(self._reactor, self._receiver.waiter.wait(), timeout)
            if not arrived:  # woken by close()
                raise EOFError("EOF")
        item = arrived.popleft()
        if isinstance(item, BaseException):
            raise item
        data, sender = item
        if self.family == socket.AF_INET6 and len(sender) == 2:
            sender = self._full_ipv6(sender)
        return data[:size], sender

    def _full_ipv6(self, sender: tuple[Any, ...]) -> tuple[Any, ...]:
        try:
            key = (dns.inet.inet_pton(self.family, sender[0].partition("%")[0]), sender[1])
        except dns.exception.SyntaxError:
            return (*sender, 0, 0)
        return self._sent_to.get(key, (*sender, 0, 0))

    async def close(self) -> None:
        """Stop listening; returns once the port's socket is closed."""
        port, self._port = self._port, None
        if port is None:
            return
        self._receiver.waiter.wake()
        stopped = port.stopListening()
        if isinstance(stopped, Deferred):
            await _wait(self._reactor, stopped, None)

    async def getpeername(self) -> tuple[Any, ...] | None:
        return self._peer

    async def getsockname(self) -> tuple[Any, ...]:
        if self._port is None:
            raise OSError(errno.EBADF, "the UDP socket is closed")
        return _sockaddr(self._port.getHost())

    async def getpeercert(self, timeout: float | None) -> Any:
        raise NotImplementedError("UDP has no peer certificate")


class _StreamReceiver(Protocol):
    """Buffers what arrives on a TCP connection and remembers how it ended."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ended: Failure | None = None
        self.waiter = _Waiter()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self.waiter.wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = reason
        self.waiter.wake()


class _StreamSocket(dns._asyncbackend.StreamSocket):
    """A Twisted TCP client connection."""

    def __init__(self, reactor: Any, af: int, receiver: _StreamReceiver) -> None:
        super().__init__(af, socket.SOCK_STREAM)
        self._reactor = reactor
        self._receiver = receiver
        self._transport: Any = receiver.transport

    async def sendall(self, what: bytes, timeout: float | None) -> None:
        """Hand ``what`` to the transport, which writes it as the socket takes
        it (a DNS message is small enough never to need flow control)."""
        if self._receiver.ended is not None:
            raise ConnectionError(f"the TCP connection is closed: {self._receiver.ended.getErrorMessage()}")
        self._transport.write(what)

    async def recv(self, size: int, timeout: float | None) -> bytes:
        """Up to ``size`` bytes as soon as any have arrived; b"" at the end of
        a cleanly closed stream."""
        receiver = self._receiver
        while True:
            if receiver.buffer:
                chunk = bytes(receiver.buffer[:size])
                del receiver.buffer[:size]
                return chunk
            if receiver.ended is not None:
                if isinstance(receiver.ended.value, ConnectionDone):
                    return b""
                raise ConnectionError(f"the TCP connection was lost: {receiver.ended.getErrorMessage()}")
            await _wait(self._reactor, receiver.waiter.wait(), timeout)

    async def close(self) -> None:
        """Drop the connection; returns once it is closed."""
        if self._receiver.ended is not None:
            return
        ended = self._receiver.waiter.wait()
        self._transport.abortConnection()
        await _wait(self._reactor, ended, None)

    async def getpeername(self) -> tuple[Any, ...]:
        return _sockaddr(self._transport.getPeer())

    async def getsockname(self) -> tuple[Any, ...]:
        return _sockaddr(self._transport.getHost())

    async def getpeercert(self, timeout: float | None) -> Any:
        raise NotImplementedError("DNS over TLS is not supported by the Twisted DNS backend")


class TwistedBackend(dns._asyncbackend.Backend):
    """dnspython's ``backend`` for ``Resolver.resolve``: UDP and TCP (Do53)
    on ``reactor`` (the global reactor when None, looked up at first use)."""

    def __init__(self, reactor: Any = None) -> None:
        if reactor is not None:
            for interface in (IReactorUDP, IReactorTCP, IReactorTime):
                if not interface.providedBy(reactor):
                    raise TypeError(f"{reactor!r} does not provide {interface.__name__}")
        self._reactor: Any = reactor

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def name(self) -> str:
        return "twisted"

    async def make_socket(
        self,
        af: int,
        socktype: int,
        proto: int = 0,
        source: Any = None,
        destination: Any = None,
        timeout: float | None = None,
        ssl_context: Any = None,
        server_hostname: str | None = None,
    ) -> _DatagramSocket | _StreamSocket:
        if ssl_context is not None:
            raise NotImplementedError("DNS over TLS is not supported by the Twisted DNS backend")
        if af not in (socket.AF_INET, socket.AF_INET6):
            raise NotImplementedError(f"the Twisted DNS backend has no address family {af}")
        if socktype == socket.SOCK_DGRAM:
            return self._udp(af, source, destination)
        if socktype == socket.SOCK_STREAM:
            if destination is None:
                raise ValueError("a TCP socket needs a destination")
            return await self._tcp(af, source, destination, timeout)
        raise NotImplementedError(f"the Twisted DNS backend has no socket type {socktype}")

    def _udp(self, af: int, source: Any, destination: Any) -> _DatagramSocket:
        if source is None:
            interface, local_port = ("::" if af == socket.AF_INET6 else ""), 0
        else:
            interface, local_port = source[0], source[1]
        receiver = _DatagramReceiver()
        port = self.reactor.listenUDP(local_port, receiver, interface=interface, maxPacketSize=MAX_DATAGRAM)
        datagrams = _DatagramSocket(self.reactor, af, port, receiver)
        if destination is not None:
            try:
                datagrams.connect(destination)
            except BaseException:
                port.stopListening()
                raise
        return datagrams

    async def _tcp(self, af: int, source: Any, destination: Any, timeout: float | None) -> _StreamSocket:
        endpoint_type = TCP6ClientEndpoint if af == socket.AF_INET6 else TCP4ClientEndpoint
        endpoint = endpoint_type(
            self.reactor,
            destination[0],
            destination[1],
            timeout=DEFAULT_CONNECT_TIMEOUT if timeout is None else max(timeout, 0.0),
            bindAddress=None if source is None else (source[0], source[1]),
        )
        try:
            receiver = await _wait(self.reactor, endpoint.connect(Factory.forProtocol(_StreamReceiver)), None)
        except ConnectTimeoutError:
            raise _timeout_error(timeout) from None
        assert isinstance(receiver, _StreamReceiver)
        return _StreamSocket(self.reactor, af, receiver)

    def datagram_connection_required(self) -> bool:
        # Unconnected, as dnspython's asyncio backend: a nameserver that is
        # not listening times out instead of failing at once.
        return False

    async def sleep(self, interval: float) -> None:
        await _wait(self.reactor, deferLater(self.reactor, max(interval, 0.0)), None)

    def get_transport_class(self) -> Any:
        raise NotImplementedError("DNS over HTTPS is not supported by the Twisted DNS backend")

    async def wait_for(self, awaitable: Awaitable[_T], timeout: float | None) -> _T:
        async def run() -> _T:
            return await awaitable

        return await _wait(self.reactor, Deferred.fromCoroutine(run()), timeout)
