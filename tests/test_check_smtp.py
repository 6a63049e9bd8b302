# pytest_twisted has no type information: its decorators are untyped.
# mypy: disable-error-code="untyped-decorator"
"""The SMTP STARTTLS prober against scripted servers on 127.0.0.1 that say
exactly what a test wants: odd replies, refusals, injected plaintext, broken
TLS, silence. Each outcome is a value naming what went wrong."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from postfix_mtasts.check.smtp import SmtpProbe, make_probe_context, probe_smtp
from tests.support.smtp_server import SmtpServer

reactor: Any = global_reactor

LOOPBACK = "127.0.0.1"
HOST = "mx.example.test"
DEADLINE = 5.0
#: For tests whose server never finishes: the probe's own deadline ends them.
SHORT_DEADLINE = 0.3
#: How long teardown waits for the server to see a connection closed.
CLOSE_WAIT_LIMIT = 10.0
EHLO_WITH_STARTTLS = b"250-mx.example.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"

#: What the scripted server answers to a command (by its verb): bytes to send,
#: or None to stay silent.
Script = dict[str, bytes | None]


@dataclass
class Scripted:
    """A server that sends ``banner``, then answers each command from ``script``
    (one byte per reactor turn when ``drip``)."""

    banner: bytes
    script: Script = field(default_factory=dict)
    drip: bool = False
    close_after_banner: bool = False
    #: Answer whatever follows the reply to STARTTLS (the ClientHello) with
    #: this plain-text line, then close.
    plain_after_starttls: bytes | None = None
    received: list[str] = field(default_factory=list)
    port: int = 0
    closed: list[Deferred[None]] = field(default_factory=list)


class _ScriptedSession(Protocol):
    def __init__(self, scripted: Scripted) -> None:
        self.scripted = scripted
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()
        scripted.closed.append(self.closed)

    def connectionMade(self) -> None:
        self.send(self.scripted.banner)
        if self.scripted.close_after_banner:
            transport: Any = self.transport
            transport.loseConnection()

    def send(self, data: bytes) -> None:
        transport: Any = self.transport
        if not self.scripted.drip:
            transport.write(data)
            return
        for index in range(len(data)):
            reactor.callLater(0.001 * index, self._write_if_open, data[index : index + 1])

    def _write_if_open(self, data: bytes) -> None:
        transport: Any = self.transport
        if transport.connected:
            transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        plain = self.scripted.plain_after_starttls
        if plain is not None and "STARTTLS" in self.scripted.received:
            transport: Any = self.transport
            transport.write(plain)
            transport.loseConnection()
            return
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            text = line.decode("latin-1")
            self.scripted.received.append(text)
            answer = self.scripted.script.get(text.split(" ", 1)[0].upper())
            if answer is not None:
                self.send(answer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


@pytest_twisted.async_yield_fixture()
async def serve() -> AsyncIterator[Callable[[Scripted], Scripted]]:
    ports: list[Any] = []
    servers: list[Scripted] = []

    def start(scripted: Scripted) -> Scripted:
        factory = Factory.forProtocol(lambda: _ScriptedSession(scripted))
        port = reactor.listenTCP(0, factory, interface=LOOPBACK)
        ports.append(port)
        servers.append(scripted)
        scripted.port = port.getHost().port
        return scripted

    yield start
    for port in ports:
        await port.stopListening()
    for scripted in servers:
        for closed in scripted.closed:
            # The prober closed every connection (the server sees it a turn
            # later; the limit only turns a leak into a failure, not a hang).
            await closed.addTimeout(CLOSE_WAIT_LIMIT, reactor)


async def probe(scripted: Scripted, deadline: float = DEADLINE) -> SmtpProbe:
    return await probe_smtp(
        reactor, HOST, [LOOPBACK], make_probe_context(), port=scripted.port, deadline=deadline
    )


@pytest_twisted.ensureDeferred
async def test_banner_other_than_220(serve: Callable[[Scripted], Scripted]) -> None:
    server = serve(Scripted(b"554 5.3.2 no service here\r\n"))
    result = await probe(server)
    assert result.failure == f"127.0.0.1:{server.port} greeted with 554 5.3.2 no service here, not 220"
    assert result.starttls_offered is None


@pytest_twisted.ensureDeferred
async def test_multi_line_replies_one_byte_at_a_time(serve: Callable[[Scripted], Scripted]) -> None:
    server = serve(
        Scripted(
            b"220-mx.example.test ESMTP\r\n220 second line\r\n",
            {"EHLO": b"250-mx.example.test\r\n250 8BITMIME\r\n", "QUIT": b"221 bye\r\n"},
            drip=True,
        )
    )
    result = await probe(server)
    assert result.failure is None
    assert result.banner == "mx.example.test ESMTP second line"
    assert result.starttls_offered is False
    assert server.received == ["EHLO postfix-mtasts-check.invalid", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_starttls_refused(serve: Callable[[Scripted], Scripted]) -> None:
    server = serve(
        Scripted(b"220 hi\r\n", {"EHLO": EHLO_WITH_STARTTLS, "STARTTLS": b"454 4.7.0 TLS not available\r\n"})
    )
    result = await probe(server)
    assert result.starttls_offered is True
    assert result.failure == f"127.0.0.1:{server.port} answered STARTTLS with 454 4.7.0 TLS not available"
    assert result.tls_version is None


@pytest_twisted.ensureDeferred
async def test_plaintext_after_the_starttls_reply_is_refused(serve: Callable[[Scripted], Scripted]) -> None:
    server = serve(
        Scripted(b"220 hi\r\n", {"EHLO": EHLO_WITH_STARTTLS, "STARTTLS": b"220 go\r\n250 injected\r\n"})
    )
    result = await probe(server)
    assert result.failure is not None and "sent more after its reply to STARTTLS" in result.failure
    assert result.tls_version is None


@pytest_twisted.ensureDeferred
async def test_not_smtp_at_all(serve: Callable[[Scripted], Scripted]) -> None:
    server = serve(Scripted(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    result = await probe(server)
    assert result.failure is not None and result.failure.startswith("not an SMTP reply: 'HTTP/1.1 400")


@pytest_twisted.ensureDeferred
async def test_server_closes_after_the_banner(serve: Callable[[Scripted], Scripted]) -> None:
    server = serve(Scripted(b"220 hi\r\n", close_after_banner=True))
    result = await probe(server)
    assert result.failure is not None and result.failure.startswith("connection closed by the server")


@pytest_twisted.ensureDeferred
async def test_silence_after_starttls(serve: Callable[[Scripted], Scripted]) -> None:
    server = serve(Scripted(b"220 hi\r\n", {"EHLO": EHLO_WITH_STARTTLS, "STARTTLS": b"220 go\r\n"}))
    # The scripted server takes the ClientHello for a command line it has no
    # answer to, so the deadline ends the handshake; the stage says where.
    result = await probe(server, deadline=SHORT_DEADLINE)
    assert result.failure == (
        f"no answer within {SHORT_DEADLINE:g}s (while in the TLS handshake with 127.0.0.1:{server.port})"
    )


@pytest_twisted.ensureDeferred
async def test_plain_reply_where_tls_is_expected(serve: Callable[[Scripted], Scripted]) -> None:
    server = serve(
        Scripted(
            b"220 hi\r\n",
            {"EHLO": EHLO_WITH_STARTTLS, "STARTTLS": b"220 go\r\n"},
            plain_after_starttls=b"500 5.5.2 what?\r\n",
        )
    )
    result = await probe(server)
    assert result.failure is not None and result.failure.startswith("TLS handshake failed:")


@pytest_twisted.ensureDeferred
async def test_silent_server_is_cut_at_the_deadline(serve: Callable[[Scripted], Scripted]) -> None:
    server = serve(Scripted(b""))
    result = await probe(server, deadline=SHORT_DEADLINE)
    assert result.failure == (
        f"no answer within {SHORT_DEADLINE:g}s (while waiting for the banner from 127.0.0.1:{server.port})"
    )


@pytest_twisted.ensureDeferred
async def test_real_starttls_server_with_an_ip_address_as_host() -> None:
    """Without a name there is no SNI, and the certificate cannot match an address."""
    import trustme

    ca = trustme.CA()
    server = SmtpServer(ca)
    await server.start(reactor)
    try:
        context = make_probe_context()
        result = await probe_smtp(reactor, LOOPBACK, [LOOPBACK], context, port=server.port, deadline=DEADLINE)
    finally:
        await server.stop()
    assert server.sni_names == [None]
    assert result.tls_version is not None
    assert any("not valid for 127.0.0.1" in problem for problem in result.certificate_problems)
    assert any("not trusted" in problem for problem in result.certificate_problems)
