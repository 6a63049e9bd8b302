# pytest_twisted has no type information: its decorators are untyped.
# mypy: disable-error-code="untyped-decorator"
"""The Twisted I/O backend for dnspython against the real loopback DNS test
server: UDP, TCP after truncation, timeouts, cancellation that closes its
sockets, IPv6, and a whole lookup on the epoll reactor in a child process.

Sockets are followed by their inode in /proc/self/fd: a socket the backend
opened must be gone once the query has ended, however it ended.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorFDSet, IReactorTCP, IReactorTime
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from postfix_mtasts.resolver import TxtFound
from postfix_mtasts.resolver.dns import DnsResolver
from postfix_mtasts.resolver.twisted_backend import TwistedBackend, cancellable
from tests.support.dns_server import DnsServer

reactor: Any = global_reactor

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STS_NAME = "_mta-sts.example.com"
#: Long enough never to expire in a test that ends the query some other way.
PATIENT = 30.0
#: Short, for the tests that wait for a timeout to expire.
IMPATIENT = 0.3


def socket_inode(fd: int) -> str:
    """``socket:[INODE]``: which open socket a descriptor refers to."""
    return os.readlink(f"/proc/self/fd/{fd}")


def open_sockets() -> set[str]:
    found: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


@implementer(IReactorFDSet, IReactorTCP, IReactorTime)
class RecordingReactor:
    """The real reactor, noting every UDP socket watched and TCP connection
    made through it and the socket behind each."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.udp: list[tuple[Any, str, str]] = []  # (reader, local address, socket inode)
        self.tcp: list[tuple[Any, str]] = []  # (connector, socket inode)

    def addReader(self, reader: Any) -> None:
        local = reader.socket.getsockname()[0]
        self.udp.append((reader, local, socket_inode(reader.fileno())))
        self.real.addReader(reader)

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> Any:
        connector = self.real.connectTCP(host, port, factory, timeout=timeout, bindAddress=bindAddress)
        self.tcp.append((connector, socket_inode(connector.transport.fileno())))
        return connector

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def inodes(self) -> set[str]:
        return {inode for _p, _i, inode in self.udp} | {inode for _c, inode in self.tcp}

    def assert_all_closed(self) -> None:
        assert self.inodes(), "the backend opened no socket"
        assert not self.inodes() & open_sockets()
        watched = set(self.real.getReaders())
        assert all(reader not in watched for reader, _a, _inode in self.udp)


@pytest_twisted.async_yield_fixture()
async def server() -> AsyncIterator[DnsServer]:
    dns_server = await DnsServer.start(reactor)
    yield dns_server
    await dns_server.stop()


@pytest.fixture
def recording() -> RecordingReactor:
    return RecordingReactor(reactor)


def make_resolver(address: str, port: int, lifetime: float = PATIENT) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port)]
    resolver.cache = None
    resolver.use_edns(0, 0, 1232)
    resolver.timeout = lifetime
    resolver.lifetime = lifetime
    return resolver


def start(work: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(cancellable(work))


async def connect_stream(reactor: Any, port: int) -> Any:
    """A TCP socket of the backend on ``reactor``, connected to 127.0.0.1:``port``."""
    return await TwistedBackend(reactor).make_socket(
        socket.AF_INET, socket.SOCK_STREAM, destination=("127.0.0.1", port), timeout=PATIENT
    )


async def next_turn() -> None:
    turn: Deferred[None] = Deferred()
    reactor.callLater(0.01, turn.callback, None)
    await turn


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await next_turn()


def delayed_calls() -> set[Any]:
    return set(reactor.getDelayedCalls())


# --- answers ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_udp_answer(server: DnsServer, recording: RecordingReactor) -> None:
    server.set_txt(STS_NAME, f"v=STSv1; id=udp{server.port};")
    answer = await start(
        make_resolver("127.0.0.1", server.port).resolve(STS_NAME, "TXT", backend=TwistedBackend(recording))
    )
    assert [b"".join(rdata.strings) for rdata in answer.rrset] == [f"v=STSv1; id=udp{server.port};".encode()]
    assert server.count(STS_NAME, "TXT") == 1
    assert [local for _r, local, _i in recording.udp] == ["0.0.0.0"]
    assert recording.tcp == []
    recording.assert_all_closed()


@pytest_twisted.ensureDeferred
async def test_a_udp_query_logs_nothing(server: DnsServer, recording: RecordingReactor) -> None:
    # A Twisted UDP port logs when it starts and when it closes: two log
    # events for every query, all thrown away by the daemon's log filter.
    server.set_txt(STS_NAME, b"v=STSv1; id=quiet;")
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        result = await DnsResolver([server.nameserver], reactor=recording).lookup_sts("example.com")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert isinstance(result, TxtFound) and result.policy_id == "quiet"
    assert events == []
    recording.assert_all_closed()


@pytest_twisted.ensureDeferred
async def test_dns_resolver_takes_the_reactor(server: DnsServer, recording: RecordingReactor) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=given;")
    result = await DnsResolver([server.nameserver], reactor=recording).lookup_sts("example.com")
    assert isinstance(result, TxtFound) and result.policy_id == "given"
    assert len(recording.udp) == 1
    recording.assert_all_closed()


@pytest_twisted.ensureDeferred
async def test_truncated_answer_is_retried_over_tcp(server: DnsServer, recording: RecordingReactor) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=overtcp;")
    server.set_fault(STS_NAME, "truncate")
    answer = await start(
        make_resolver("127.0.0.1", server.port).resolve(STS_NAME, "TXT", backend=TwistedBackend(recording))
    )
    assert [b"".join(rdata.strings) for rdata in answer.rrset] == [b"v=STSv1; id=overtcp;"]
    assert server.count(STS_NAME, "TXT") == 2  # once over UDP, again over TCP
    assert len(recording.udp) == 1 and len(recording.tcp) == 1
    recording.assert_all_closed()


@pytest_twisted.ensureDeferred
async def test_answer_too_big_for_udp_comes_whole_over_tcp(
    server: DnsServer, recording: RecordingReactor
) -> None:
    # Different records, about 4 KB in all: more than the 1232-byte EDNS payload.
    records = [bytes([ord("a") + i]) * 200 for i in range(20)]
    server.set_txt("big.example.com", *records)
    answer = await start(
        make_resolver("127.0.0.1", server.port).resolve(
            "big.example.com", "TXT", backend=TwistedBackend(recording)
        )
    )
    assert sorted(b"".join(rdata.strings) for rdata in answer.rrset) == records
    assert len(recording.tcp) == 1
    recording.assert_all_closed()


# --- timeouts and cancellation -------------------------------------------------


class Silent(DatagramProtocol):
    """A UDP port that takes every datagram and never answers."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append(datagram)


@pytest_twisted.ensureDeferred
async def test_silent_port_times_out(recording: RecordingReactor) -> None:
    silent = Silent()
    port = reactor.listenUDP(0, silent, interface="127.0.0.1")
    try:
        before = delayed_calls()
        resolver = make_resolver("127.0.0.1", port.getHost().port, lifetime=IMPATIENT)
        with pytest.raises(dns.exception.Timeout):
            await start(resolver.resolve(STS_NAME, "TXT", backend=TwistedBackend(recording)))
    finally:
        await port.stopListening()
    assert silent.received, "the query never reached the port"
    recording.assert_all_closed()
    assert delayed_calls() - before == set()


@pytest_twisted.ensureDeferred
async def test_receive_timeout_raises_dnspythons_timeout(recording: RecordingReactor) -> None:
    backend = TwistedBackend(recording)
    datagrams = await backend.make_socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(dns.exception.Timeout):
            await start(datagrams.recvfrom(65535, IMPATIENT))
    finally:
        await start(datagrams.close())
    recording.assert_all_closed()


@pytest_twisted.ensureDeferred
async def test_cancelling_a_udp_query_closes_its_port(server: DnsServer, recording: RecordingReactor) -> None:
    server.set_fault(STS_NAME, "drop")
    before = delayed_calls()
    resolver = make_resolver("127.0.0.1", server.port)
    query = start(resolver.resolve(STS_NAME, "TXT", backend=TwistedBackend(recording)))
    await until(lambda: bool(server.queries))
    assert recording.inodes() <= open_sockets()  # the query's port is open while it waits
    query.cancel()
    with pytest.raises(CancelledError):
        await query
    recording.assert_all_closed()
    assert delayed_calls() - before == set()


@pytest_twisted.ensureDeferred
async def test_a_callers_timeout_stops_the_lookup(server: DnsServer, recording: RecordingReactor) -> None:
    # As the lookup uses it: addTimeout on the Deferred of lookup_sts.
    server.set_fault(STS_NAME, "drop")
    before = delayed_calls()
    lookup = Deferred.fromCoroutine(
        DnsResolver([server.nameserver], timeout=PATIENT, reactor=recording).lookup_sts("example.com")
    )
    lookup.addTimeout(IMPATIENT, reactor)
    with pytest.raises(DeferredTimeoutError):
        await lookup
    assert server.count(STS_NAME) == 1
    recording.assert_all_closed()
    assert delayed_calls() - before == set()


class Mute(Protocol):
    """Accepts a TCP connection and never says anything."""

    def connectionMade(self) -> None:
        self.factory.connected.append(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.append(self)  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_cancelling_a_tcp_query_closes_its_connection(recording: RecordingReactor) -> None:
    factory = Factory.forProtocol(Mute)
    factory.connected, factory.lost = [], []  # type: ignore[attr-defined]
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        before = delayed_calls()
        resolver = make_resolver("127.0.0.1", listening.getHost().port)
        query = start(resolver.resolve(STS_NAME, "TXT", tcp=True, backend=TwistedBackend(recording)))
        await until(lambda: bool(factory.connected))  # type: ignore[attr-defined]
        query.cancel()
        with pytest.raises(CancelledError):
            await query
        recording.assert_all_closed()
        assert delayed_calls() - before == set()
        await until(lambda: bool(factory.lost))  # type: ignore[attr-defined]
    finally:
        await listening.stopListening()


# --- the stream socket itself --------------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class SpeakThenHangUp(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"abcdef")
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_stream_recv_returns_what_has_arrived_without_waiting_for_more(
    recording: RecordingReactor,
) -> None:
    listening = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    try:
        stream = await start(connect_stream(recording, listening.getHost().port))
        await start(stream.sendall(b"hello", PATIENT))
        # The echo stays open: a recv that waited for 100 bytes or EOF would time out.
        received = b""
        while len(received) < 5:
            chunk = await start(stream.recv(100, PATIENT))
            assert chunk
            received += chunk
        assert received == b"hello"
        assert (await start(stream.getpeername()))[:2] == ("127.0.0.1", listening.getHost().port)
        await start(stream.close())
    finally:
        await listening.stopListening()
    recording.assert_all_closed()


@pytest_twisted.ensureDeferred
async def test_stream_recv_takes_at_most_size_bytes_then_empty_at_eof(recording: RecordingReactor) -> None:
    listening = reactor.listenTCP(0, Factory.forProtocol(SpeakThenHangUp), interface="127.0.0.1")
    try:
        stream = await start(connect_stream(recording, listening.getHost().port))
        chunks = []
        while chunk := await start(stream.recv(4, PATIENT)):
            chunks.append(chunk)
        assert b"".join(chunks) == b"abcdef"
        assert all(len(chunk) <= 4 for chunk in chunks)
        assert await start(stream.recv(4, PATIENT)) == b""
        await start(stream.close())
    finally:
        await listening.stopListening()
    recording.assert_all_closed()


@pytest_twisted.ensureDeferred
async def test_tcp_connect_refused_is_an_error_not_a_hang(recording: RecordingReactor) -> None:
    listening = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    port = listening.getHost().port
    await listening.stopListening()
    with pytest.raises(Exception, match="refused"):
        await start(connect_stream(recording, port))
    assert not recording.inodes() & open_sockets()


# --- what the backend does not do ------------------------------------------------


def test_backend_refuses_what_is_not_a_reactor() -> None:
    with pytest.raises(TypeError, match="IReactorFDSet"):
        TwistedBackend(object())


@pytest_twisted.ensureDeferred
async def test_tls_and_https_say_they_are_not_supported() -> None:
    backend = TwistedBackend(reactor)
    with pytest.raises(NotImplementedError, match="DNS over TLS"):
        await start(
            backend.make_socket(
                socket.AF_INET, socket.SOCK_STREAM, destination=("127.0.0.1", 853), ssl_context=object()
            )
        )
    with pytest.raises(NotImplementedError, match="DNS over HTTPS"):
        backend.get_transport_class()


# --- IPv6 --------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture()
async def server6() -> AsyncIterator[DnsServer]:
    try:
        started = await DnsServer.start(reactor, interface="::1")
    except (CannotListenError, OSError) as error:
        pytest.skip(f"the test DNS server cannot listen on [::1]: {error}")
    yield started
    await started.stop()


@pytest_twisted.ensureDeferred
async def test_ipv6_nameserver_over_udp_and_tcp(server6: DnsServer, recording: RecordingReactor) -> None:
    server6.set_txt(STS_NAME, b"v=STSv1; id=six;")
    resolver = DnsResolver([f"[::1]:{server6.port}"], timeout=PATIENT, reactor=recording)
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFound) and result.policy_id == "six"
    server6.set_fault(STS_NAME, "truncate")
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFound) and result.policy_id == "six"
    assert server6.count(STS_NAME) == 3  # UDP; then UDP truncated and TCP
    assert [local for _r, local, _i in recording.udp] == ["::", "::"]
    assert len(recording.tcp) == 1
    recording.assert_all_closed()


# --- another reactor ----------------------------------------------------------------

EPOLL_PROGRAM = textwrap.dedent(
    """
    import asyncio
    import sys

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred

    from postfix_mtasts.resolver.dns import DnsResolver


    async def main(_reactor):
        try:
            asyncio.get_running_loop()
            loop = "asyncio loop running"
        except RuntimeError:
            loop = "no asyncio loop"
        result = await DnsResolver([sys.argv[1]], timeout=10, reactor=_reactor).lookup_sts("example.com")
        print(type(reactor).__name__, loop, repr(result), sep="\\n")


    task.react(lambda r: Deferred.fromCoroutine(main(r)))
    """
)


@pytest_twisted.ensureDeferred
async def test_lookup_on_the_epoll_reactor_in_a_child_process(server: DnsServer) -> None:
    policy_id = f"epoll{server.port}"
    server.set_txt(STS_NAME, f"v=STSv1; id={policy_id};")
    environment = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        ["-c", EPOLL_PROGRAM, server.nameserver],
        env=environment,
        path=str(PROJECT_ROOT),
        reactor=reactor,
    )
    assert code == 0, err.decode(errors="replace")
    lines = out.decode().splitlines()
    assert lines[:2] == ["EPollReactor", "no asyncio loop"]
    assert lines[2] == repr(TxtFound(policy_id=policy_id, ttl=300, record=f"v=STSv1; id={policy_id};"))
    assert server.count(STS_NAME, "TXT") == 1
