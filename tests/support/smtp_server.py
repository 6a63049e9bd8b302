"""A loopback SMTP server with STARTTLS for the ``check`` tests, whose
behaviour the test sets: STARTTLS offered or not, the certificate per SNI name
(good, wrong name, expired, expiring soon, untrusted), TLS 1.0 only, or a
server that accepts connections and never speaks. It also takes mail (MAIL,
RCPT, DATA) and keeps each message, for tests where a real MTA delivers.

Every MX host of a test world resolves to 127.0.0.1 and the prober connects to
this one port, so the behaviour is the server's (one server per behaviour);
only the certificate differs per MX name, chosen by the SNI name the prober
sends. Certificates come from the CA the test passes in (the world's, so one
CA file serves HTTPS and SMTP).

Usage::

    smtp = SmtpServer(world.https.ca)
    await smtp.start(reactor)
    smtp.set_certificate("mx1.example.test", SmtpCert.EXPIRED)
    ...  # postfix-mtasts check --smtp-port smtp.port
    await smtp.stop()
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import trustme
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IListeningPort, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support.dns_server import DEFAULT_TTL, DnsServer

#: The address the server listens on unless told another.
LOOPBACK = "127.0.0.1"
#: The name the server calls itself in its banner and EHLO reply.
SERVER_NAME = "smtp.loopback.test"
#: Certificate name used when the client sends no SNI.
NO_SNI_NAME = "no-sni.invalid"
#: Prefix that turns a host name into the one a WRONG_NAME certificate names.
WRONG_NAME_PREFIX = "not-"
#: Days left on an EXPIRING certificate (under check's warning threshold).
EXPIRING_DAYS = 5
#: OpenSSL cipher string that lets TLS 1.0 be negotiated (security level 0).
LEGACY_CIPHERS = b"DEFAULT:@SECLEVEL=0"
#: Longest command line the server reads before it gives up on a client.
MAX_LINE = 4096
#: Seconds :meth:`SmtpServer.stop` waits for connections to go (a guard against
#: a hung test run, not a timed assertion).
STOP_WAIT_LIMIT = 10.0


class SmtpCert(enum.Enum):
    """Which certificate the server presents for one SNI name."""

    GOOD = "good"
    #: The SAN names another host.
    WRONG_NAME = "wrong-name"
    #: Name and chain fine, notAfter in the past.
    EXPIRED = "expired"
    #: Name and chain fine, notAfter in EXPIRING_DAYS days.
    EXPIRING = "expiring"
    #: Issued by a CA the client does not trust.
    UNTRUSTED = "untrusted"


class SmtpMode(enum.Enum):
    """What the whole server does."""

    #: Banner, EHLO with STARTTLS, TLS 1.2 or later.
    STARTTLS = "starttls"
    #: Banner and EHLO, but no STARTTLS in the EHLO reply (and 502 to it).
    NO_STARTTLS = "no-starttls"
    #: STARTTLS offered, TLS 1.0 only.
    TLS_1_0_ONLY = "tls-1.0-only"
    #: Accept the TCP connection and never say anything.
    HANG = "hang"


def set_mx(server: DnsServer, domain: str, *records: tuple[int, str], ttl: int = DEFAULT_TTL) -> None:
    """Give ``domain`` the MX records ``(preference, host)``; DnsServer has no
    public setter for MX, so this goes through its generic ``_put``."""
    rdatas = [
        dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, f"{preference} {dns.name.from_text(host)}")
        for preference, host in records
    ]
    server._put(domain, dns.rdatatype.MX, rdatas, ttl)


def openssl_allows_tls10() -> bool:
    """Whether this machine's OpenSSL still completes a TLS 1.0 handshake
    (at security level 0), tried in memory between two connections."""
    ca = trustme.CA()
    server_context = SSL.Context(SSL.TLS_METHOD)
    client_context = SSL.Context(SSL.TLS_METHOD)
    for context in (server_context, client_context):
        try:
            context.set_min_proto_version(SSL.TLS1_VERSION)
            context.set_max_proto_version(SSL.TLS1_VERSION)
            context.set_cipher_list(LEGACY_CIPHERS)
        except SSL.Error:
            return False
    ca.issue_cert("tls10.test").configure_cert(server_context)
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    for _ in range(10):
        for one, other in ((client, server), (server, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return False
            try:
                data = one.bio_read(65536)
            except SSL.WantReadError:
                continue
            other.bio_write(data)
        if client.get_protocol_version_name() == "TLSv1" and server.get_peer_finished() is not None:
            return True
    return False


@dataclass(frozen=True)
class ReceivedMail:
    """One message taken by the server: envelope, data, and whether it came over TLS."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    tls: bool


class SmtpServer:
    """One listening port on loopback; see the module docstring."""

    def __init__(self, ca: trustme.CA, *, mode: SmtpMode = SmtpMode.STARTTLS) -> None:
        self.mode = mode
        self.ca = ca
        self.untrusted_ca = trustme.CA()
        self.port = 0
        #: Every command line received (after TLS too), in order.
        self.commands: list[str] = []
        #: SNI names of the TLS handshakes, in order (None: no SNI).
        self.sni_names: list[str | None] = []
        #: TCP connections accepted so far.
        self.connections_accepted = 0
        #: TLS sessions that completed their handshake.
        self.handshakes = 0
        #: Messages taken, in order.
        self.mail: list[ReceivedMail] = []
        self._certificates: dict[str, SmtpCert] = {}
        self._contexts: dict[tuple[str, SmtpCert], SSL.Context] = {}
        self._listening: IListeningPort | None = None
        self._open: set[_SmtpSession] = set()
        self._reactor: Any = None
        self.tls: _SniSelector | None = None

    def set_certificate(self, name: str, kind: SmtpCert) -> None:
        """Present a ``kind`` certificate to clients asking (SNI) for ``name``."""
        self._certificates[name.lower().rstrip(".")] = kind

    async def start(self, reactor: Any, *, interface: str = LOOPBACK, port: int = 0) -> None:
        """Listen on ``interface``, on ``port`` or (0) a free one."""
        self._reactor = reactor
        self.tls = _SniSelector(self)
        listening: Any = reactor.listenTCP(port, _SmtpFactory(self), interface=interface)
        self._listening = listening
        self.port = listening.getHost().port

    async def stop(self) -> None:
        """Stop listening, drop every connection and wait until they are gone."""
        if self._listening is not None:
            stopped: Any = self._listening.stopListening()
            self._listening = None
            if isinstance(stopped, Deferred):
                await stopped
        waiting = [session.closed for session in self._open]
        for session in list(self._open):
            transport: Any = session.transport
            transport.abortConnection()
        for closed in waiting:
            await closed.addTimeout(STOP_WAIT_LIMIT, self._reactor)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def wait_idle(self) -> None:
        """Return once no client connection is open; fail after STOP_WAIT_LIMIT
        (the client never closing is then a test failure, not a hung run)."""
        for session in list(self._open):
            await session.closed.addTimeout(STOP_WAIT_LIMIT, self._reactor)

    def context(self, name: str | None) -> SSL.Context:
        """The TLS context for an SNI name, built once per (name, certificate kind)."""
        host = name or NO_SNI_NAME
        kind = self._certificates.get(host, SmtpCert.GOOD)
        key = (host, kind)
        if key not in self._contexts:
            self._contexts[key] = self._build_context(host, kind)
        return self._contexts[key]

    def _build_context(self, host: str, kind: SmtpCert) -> SSL.Context:
        now = datetime.datetime.now(datetime.UTC)
        if kind is SmtpCert.WRONG_NAME:
            leaf = self.ca.issue_cert(WRONG_NAME_PREFIX + host)
        elif kind is SmtpCert.EXPIRED:
            leaf = self.ca.issue_cert(
                host, not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
            )
        elif kind is SmtpCert.EXPIRING:
            leaf = self.ca.issue_cert(
                host,
                not_before=now - datetime.timedelta(days=30),
                not_after=now + datetime.timedelta(days=EXPIRING_DAYS, hours=12),
            )
        elif kind is SmtpCert.UNTRUSTED:
            leaf = self.untrusted_ca.issue_cert(host)
        else:
            leaf = self.ca.issue_cert(host)
        context = SSL.Context(SSL.TLS_METHOD)
        if self.mode is SmtpMode.TLS_1_0_ONLY:
            context.set_min_proto_version(SSL.TLS1_VERSION)
            context.set_max_proto_version(SSL.TLS1_VERSION)
            context.set_cipher_list(LEGACY_CIPHERS)
        else:
            context.set_min_proto_version(SSL.TLS1_2_VERSION)
        leaf.configure_cert(context)
        return context


@implementer(IOpenSSLServerConnectionCreator)
class _SniSelector:
    """Starts each handshake on the no-SNI context and switches to the SNI name's."""

    def __init__(self, server: SmtpServer) -> None:
        self._server = server
        self._default = server.context(None)
        self._default.set_tlsext_servername_callback(self._switch)

    def _switch(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii").lower() if raw else None
        self._server.sni_names.append(name)
        connection.set_context(self._server.context(name))

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._default, None)


@implementer(IHandshakeListener)
class _SmtpSession(Protocol):
    """Just enough of an SMTP server for a STARTTLS probe (EHLO/HELO, STARTTLS,
    NOOP, RSET, QUIT) and for taking mail (MAIL, RCPT, DATA)."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server
        self.buffer = b""
        self.tls = False
        self.closed: Deferred[None] = Deferred()
        self.sender = ""
        self.recipients: list[str] = []
        #: Lines of the message while DATA is being read, else None.
        self.data: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.server.connections_accepted += 1
        self.server._open.add(self)
        if self.server.mode is not SmtpMode.HANG:
            self.reply(220, [f"{SERVER_NAME} ESMTP loopback test server"])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server._open.discard(self)
        closed, self.closed = self.closed, Deferred()
        self.closed.callback(None)
        closed.callback(None)

    def handshakeCompleted(self) -> None:
        self.server.handshakes += 1

    def reply(self, code: int, lines: Sequence[str]) -> None:
        text = b"".join(
            f"{code}{'-' if index < len(lines) - 1 else ' '}{line}\r\n".encode("ascii")
            for index, line in enumerate(lines)
        )
        transport: Any = self.transport
        transport.write(text)

    def dataReceived(self, data: bytes) -> None:
        if self.server.mode is SmtpMode.HANG:
            return
        self.buffer += data
        while b"\n" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\n", 1)
            if self.data is not None:
                self.data_line(raw.rstrip(b"\r"))
                continue
            line = raw.rstrip(b"\r").decode("latin-1")
            self.server.commands.append(line)
            if not self.command(line):
                return
        if len(self.buffer) > MAX_LINE:
            self.reply(500, ["line too long"])
            self.close()

    def command(self, line: str) -> bool:
        """Answer one command; False when the session switched to TLS or ended."""
        verb = line.split(" ", 1)[0].upper()
        offers_tls = self.server.mode is not SmtpMode.NO_STARTTLS and not self.tls
        if verb == "EHLO":
            self.reply(250, [SERVER_NAME, "PIPELINING", "8BITMIME", *(["STARTTLS"] if offers_tls else [])])
        elif verb == "HELO":
            self.reply(250, [SERVER_NAME])
        elif verb == "STARTTLS":
            if not offers_tls:
                self.reply(502, ["5.5.1 command not implemented"])
                return True
            self.reply(220, ["2.0.0 ready to start TLS"])
            self.buffer = b""
            self.tls = True
            transport: Any = self.transport
            transport.startTLS(self.server.tls)
            return False
        elif verb in ("NOOP", "RSET"):
            if verb == "RSET":
                self.sender, self.recipients = "", []
            self.reply(250, ["2.0.0 OK"])
        elif verb == "MAIL":
            self.sender, self.recipients = _address(line), []
            self.reply(250, ["2.1.0 OK"])
        elif verb == "RCPT":
            self.recipients.append(_address(line))
            self.reply(250, ["2.1.5 OK"])
        elif verb == "DATA":
            if not self.recipients:
                self.reply(503, ["5.5.1 no valid recipients"])
                return True
            self.data = []
            self.reply(354, ["end data with <CR><LF>.<CR><LF>"])
        elif verb == "QUIT":
            self.reply(221, ["2.0.0 bye"])
            self.close()
            return False
        else:
            self.reply(502, ["5.5.2 command not recognised"])
        return True

    def data_line(self, line: bytes) -> None:
        """One line of a message; the lone dot ends it (RFC 5321 §4.1.1.4)."""
        assert self.data is not None
        if line != b".":
            self.data.append(line[1:] if line.startswith(b".") else line)
            return
        mail = ReceivedMail(self.sender, tuple(self.recipients), b"\r\n".join(self.data) + b"\r\n", self.tls)
        self.server.mail.append(mail)
        self.data, self.sender, self.recipients = None, "", []
        self.reply(250, ["2.0.0 message taken"])

    def close(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()


def _address(command: str) -> str:
    """The address in ``MAIL FROM:<a>`` or ``RCPT TO:<a>`` (parameters after it ignored)."""
    start, end = command.find("<"), command.find(">")
    return command[start + 1 : end] if 0 <= start < end else ""


class _SmtpFactory(Factory):
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> _SmtpSession:
        return _SmtpSession(self.server)
