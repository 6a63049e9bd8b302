"""A dnspython async I/O backend on the Twisted reactor, for any reactor.

dnspython's resolver logic stays dnspython's; only its sockets and timers
become the reactor's: UDP sockets watched with ``addReader``, TCP (answers
truncated over UDP) through a client endpoint, timers through ``callLater``.
Its coroutines await Deferreds, so they must be driven by
``Deferred.fromCoroutine`` (or a coroutine it drives), never by an asyncio task.

dnspython catches ``Exception`` between attempts, and Twisted's CancelledError
is one, so cancelling the Deferred that awaits a query would only end one
attempt. Cancellation therefore travels through dnspython as
:class:`QueryCancelled`, a BaseException as asyncio's own is; wrap each call in
:func:`cancellable` to get Twisted's CancelledError back out.
"""

from __future__ import annotations

import errno
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
from twisted.internet.interfaces import IAddress, IReactorFDSet, IReactorTCP, IReactorTime, IReadDescriptor
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

_T = TypeVar("_T")

#: Largest datagram read from a UDP socket (a DNS answer over UDP may be as
#: large as the EDNS payload size we advertise, or larger from a careless server).
MAX_DATAGRAM = 65_535
#: Datagrams taken from a UDP socket per readiness event, at most.
MAX_DATAGRAMS_PER_READ = 16
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


@implementer(IReadDescriptor)
class _DatagramReader:
    """Reads a non-blocking UDP socket for the reactor and queues what
    arrives: ``(data, address)`` or an error."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.arrived: deque[tuple[bytes, tuple[Any, ...]] | BaseException] = deque()
        self.waiter = _Waiter()

    def fileno(self) -> int:
        return self.socket.fileno()  # -1 once closed

    def logPrefix(self) -> str:
        return "DNS over UDP"

    def doRead(self) -> None:
        """Take the datagrams waiting (up to MAX_DATAGRAMS_PER_READ), then wake the reader."""
        for _ in range(MAX_DATAGRAMS_PER_READ):
            try:
                self.arrived.append(self.socket.recvfrom(MAX_DATAGRAM))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                # A connected socket learns here of an ICMP "port unreachable".
                self.arrived.append(error)
                break
        self.waiter.wake()

    def connectionLost(self, reason: Failure) -> None:
        self.waiter.wake()


class _DatagramSocket(dns._asyncbackend.DatagramSocket):
    """A non-blocking UDP socket watched by the reactor, connected to
    ``destination`` when one was given.

    A plain socket rather than ``listenUDP``: a Twisted port logs twice and
    takes one more reactor turn to close, for every query.
    """

    def __init__(self, reactor: Any, af: int, reader: _DatagramReader) -> None:
        super().__init__(af, socket.SOCK_DGRAM)
        self._reactor = reactor
        self._reader: _DatagramReader | None = reader
        self._peer: tuple[Any, ...] | None = None

    def connect(self, destination: tuple[Any, ...]) -> None:
        assert self._reader is not None
        self._reader.socket.connect(destination)
        self._peer = dns.inet.low_level_address_tuple((destination[0], destination[1]), self.family)

    async def sendto(self, what: bytes, destination: Any, timeout: float | None) -> int:
        """Send one datagram; a full socket buffer is an OSError, as a lost datagram would be."""
        reader = self._reader
        if reader is None:
            raise OSError(errno.EBADF, "the UDP socket is closed")
        if self._peer is not None:
            return reader.socket.send(what)
        return reader.socket.sendto(what, destination)

    async def recvfrom(self, size: int, timeout: float | None) -> tuple[bytes, tuple[Any, ...]]:
        """The next datagram and its sender; dns.exception.Timeout when none
        arrives within ``timeout`` seconds."""
        reader = self._reader
        if reader is None:
            raise EOFError("EOF")
        arrived = reader.arrived
        if not arrived:
            await _wait(self._reactor, reader.waiter.wait(), timeout)
            if not arrived:  # woken by close()
                raise EOFError("EOF")
        item = arrived.popleft()
        if isinstance(item, BaseException):
            raise item
        data, sender = item
        return data[:size], sender

    async def close(self) -> None:
        """Stop watching the socket and close it, at once."""
        reader, self._reader = self._reader, None
        if reader is None:
            return
        self._reactor.removeReader(reader)
        reader.socket.close()
        reader.waiter.wake()

    async def getpeername(self) -> tuple[Any, ...] | None:
        return self._peer

    async def getsockname(self) -> tuple[Any, ...]:
        if self._reader is None:
            raise OSError(errno.EBADF, "the UDP socket is closed")
        return tuple(self._reader.socket.getsockname())

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
    on ``reactor``."""

    def __init__(self, reactor: Any) -> None:
        for interface in (IReactorFDSet, IReactorTCP, IReactorTime):
            if not interface.providedBy(reactor):
                raise TypeError(f"{reactor!r} does not provide {interface.__name__}")
        self.reactor: Any = reactor

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
        sock = socket.socket(af, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((interface, local_port))
            reader = _DatagramReader(sock)
            datagrams = _DatagramSocket(self.reactor, af, reader)
            if destination is not None:
                datagrams.connect(destination)
        except BaseException:
            sock.close()
            raise
        self.reactor.addReader(reader)
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
