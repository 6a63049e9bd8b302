"""A small SMTP STARTTLS prober: what a sending MTA sees at one MX host.

Connect to the MX on port 25, read the banner, EHLO, look for STARTTLS, start
TLS with the MX name as SNI, then note the TLS version and whether the
certificate chains to the trust store and names the MX host (service_identity,
as RFC 8461 §4.2 asks). Unlike a sender, the prober completes the handshake
even with a bad certificate, so it can report every problem at once, and it
accepts TLS 1.0 so that an old server is reported rather than unreachable.
All of it runs under one per-host deadline; the outcome is a value.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from postfix_mtasts.check import PROBE_DEADLINE, SMTP_PORT
from postfix_mtasts.errors import one_line
from postfix_mtasts.resolver.https import VERIFY_ERRORS, ssl_reason

__all__ = ["PROBE_DEADLINE", "SMTP_PORT", "SmtpProbe", "make_probe_context", "probe_smtp"]
#: Longest reply line accepted from a server (RFC 5321 §4.5.3.1.5 says 512;
#: real servers send longer EHLO lines, so allow some room).
MAX_REPLY_LINE = 4096
#: Most lines in one multi-line reply.
MAX_REPLY_LINES = 100
#: OpenSSL cipher string that still negotiates TLS 1.0/1.1, so that such a
#: server is described rather than failing the handshake.
PROBE_CIPHERS = b"DEFAULT:@SECLEVEL=0"
#: The EHLO name used when the caller gives none.
DEFAULT_EHLO_NAME = "postfix-mtasts-check.invalid"
#: The TLS versions a sender should still accept (RFC 8996 deprecates older ones).
MODERN_TLS_VERSIONS = frozenset({"TLSv1.2", "TLSv1.3"})


class _ProbeError(Exception):
    """An expected probe failure: ``str()`` is the one-line reason."""


@dataclass
class SmtpProbe:
    """What the prober learnt about one MX host; ``failure`` says what stopped it, if anything."""

    host: str
    port: int
    address: str = ""
    banner: str = ""
    #: None until the EHLO reply arrived.
    starttls_offered: bool | None = None
    #: E.g. ``TLSv1.3``; None until a handshake completed.
    tls_version: str | None = None
    cipher: str | None = None
    certificate: x509.Certificate | None = None
    #: Why the certificate would not be accepted by a sender, in words.
    certificate_problems: list[str] = field(default_factory=list)
    failure: str | None = None
    #: What the probe was doing (for a deadline message).
    stage: str = "resolving"

    @property
    def peer(self) -> str:
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{address}:{self.port}"


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: the code and the text of each line."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)


def make_probe_context(ca_file: str = "") -> SSL.Context:
    """The client TLS context of every probe: the trust store (``ca_file``, or
    the system's), TLS 1.0 and up; raises ValueError for an unusable CA file."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_VERSION)
    context.set_cipher_list(PROBE_CIPHERS)
    try:
        if ca_file:
            context.load_verify_locations(ca_file)
        else:
            context.set_default_verify_paths()
    except SSL.Error as error:
        raise ValueError(f"cannot load CA file {ca_file}: {ssl_reason(error)}") from None
    return context


async def probe_smtp(
    reactor: Any,
    host: str,
    addresses: list[str],
    context: SSL.Context,
    *,
    port: int = SMTP_PORT,
    deadline: float = PROBE_DEADLINE,
    ehlo_name: str = DEFAULT_EHLO_NAME,
) -> SmtpProbe:
    """Probe ``host`` at the first of ``addresses`` that accepts a TCP
    connection; never raises for network, SMTP or TLS problems."""
    probe = SmtpProbe(host=host.lower().rstrip("."), port=port)
    session = _Session(reactor, probe, context, ehlo_name)

    def too_late(result: object, timeout: float) -> SmtpProbe:
        probe.failure = f"no answer within {timeout:g}s (while {probe.stage})"
        return probe

    work = Deferred.fromCoroutine(session.run(addresses))
    work.addTimeout(deadline, reactor, onTimeoutCancel=too_late)
    try:
        return await work
    finally:
        await session.close()


class _Session:
    """One probe's conversation with one server."""

    def __init__(self, reactor: Any, probe: SmtpProbe, context: SSL.Context, ehlo_name: str) -> None:
        self.reactor = reactor
        self.probe = probe
        self.context = context
        self.ehlo_name = ehlo_name
        self.client: _SmtpClient | None = None

    async def run(self, addresses: list[str]) -> SmtpProbe:
        probe = self.probe
        try:
            await self._converse(addresses)
        except _ProbeError as failure:
            probe.failure = str(failure)
        except CancelledError:
            raise
        except Exception as unexpected:  # a bug here must still give a report
            probe.failure = f"probe failed unexpectedly: {one_line(unexpected)}"
        return probe

    async def _converse(self, addresses: list[str]) -> None:
        probe = self.probe
        client = await self._connect(addresses)
        probe.stage = f"waiting for the banner from {probe.peer}"
        banner = await client.reply()
        probe.banner = banner.text
        if banner.code != 220:
            raise _ProbeError(f"{probe.peer} greeted with {banner.code} {banner.text}, not 220")
        probe.stage = "waiting for the reply to EHLO"
        ehlo = await client.command(f"EHLO {self.ehlo_name}")
        if ehlo.code != 250:
            raise _ProbeError(f"{probe.peer} answered EHLO with {ehlo.code} {ehlo.text}")
        keywords = {line.split(" ", 1)[0].upper() for line in ehlo.lines[1:]}
        probe.starttls_offered = "STARTTLS" in keywords
        if not probe.starttls_offered:
            await self._quit(client)
            return
        probe.stage = "waiting for the reply to STARTTLS"
        ready = await client.command("STARTTLS")
        if ready.code != 220:
            raise _ProbeError(f"{probe.peer} answered STARTTLS with {ready.code} {ready.text}")
        if client.has_pending_input():
            raise _ProbeError(
                f"{probe.peer} sent more after its reply to STARTTLS (a plaintext injection risk)"
            )
        probe.stage = f"in the TLS handshake with {probe.peer}"
        tls = _ProbeTLS(self.context, probe)
        await client.start_tls(tls)
        connection = tls.connection
        assert connection is not None
        probe.tls_version = connection.get_protocol_version_name()
        probe.cipher = connection.get_cipher_name()
        if probe.certificate is None:
            peer = connection.get_peer_certificate(as_cryptography=True)
            probe.certificate = peer
            if peer is None:
                probe.certificate_problems.append("no certificate presented")
        probe.stage = "waiting for the reply to EHLO after STARTTLS"
        again = await client.command(f"EHLO {self.ehlo_name}")
        if again.code != 250:
            raise _ProbeError(f"{probe.peer} answered EHLO over TLS with {again.code} {again.text}")
        await self._quit(client)

    async def _connect(self, addresses: list[str]) -> _SmtpClient:
        probe = self.probe
        problems: list[str] = []
        for address in addresses:
            probe.address = address
            probe.stage = f"connecting to {probe.peer}"
            endpoint: Any = (
                TCP6ClientEndpoint(self.reactor, address, probe.port)  # type: ignore[no-untyped-call]
                if _is_ipv6(address)
                else TCP4ClientEndpoint(self.reactor, address, probe.port)
            )
            try:
                client: _SmtpClient = await endpoint.connect(Factory.forProtocol(_SmtpClient))
            except neterror.ConnectingCancelledError:
                raise CancelledError() from None  # the deadline, while connecting
            except neterror.ConnectionRefusedError:
                problems.append(f"connection refused by {probe.peer}")
                continue
            except neterror.ConnectError as error:
                problems.append(f"cannot connect to {probe.peer}: {one_line(error)}")
                continue
            self.client = client
            return client
        raise _ProbeError("; ".join(problems) or "no address to connect to")

    async def _quit(self, client: _SmtpClient) -> None:
        self.probe.stage = "waiting for the reply to QUIT"
        await client.command("QUIT")

    async def close(self) -> None:
        """Make sure the connection is gone before the probe returns."""
        client = self.client
        if client is not None:
            await client.abort()


@implementer(IHandshakeListener)
class _SmtpClient(Protocol):
    """Reads SMTP replies (multi-line aware) and switches to TLS on request."""

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[str] = []
        self._replies: list[Reply] = []
        self._waiting: Deferred[Reply] | None = None
        self._handshake: Deferred[None] | None = None
        self._lost: Failure | None = None
        self._closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        try:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                self._line(raw.rstrip(b"\r").decode("utf-8", "replace"))
            if len(self._buffer) > MAX_REPLY_LINE:
                raise _ProbeError(f"reply line longer than {MAX_REPLY_LINE} bytes")
        except _ProbeError as problem:
            self._fail(problem)
            transport: Any = self.transport
            transport.abortConnection()
            return
        self._deliver()

    def _line(self, line: str) -> None:
        code, separator = line[:3], line[3:4]
        if not (code.isascii() and code.isdigit()) or separator not in ("", " ", "-"):
            raise _ProbeError(f"not an SMTP reply: {_quote(line)}")
        if self._lines and not self._lines[0].startswith(code):
            raise _ProbeError(f"reply code changed within a multi-line reply: {_quote(line)}")
        self._lines.append(line)
        if len(self._lines) > MAX_REPLY_LINES:
            raise _ProbeError(f"reply of more than {MAX_REPLY_LINES} lines")
        if separator != "-":
            lines, self._lines = self._lines, []
            self._replies.append(Reply(int(code), tuple(entry[4:] for entry in lines)))

    def _deliver(self) -> None:
        if self._waiting is not None and self._replies:
            waiting, self._waiting = self._waiting, None
            waiting.callback(self._replies.pop(0))

    def _fail(self, problem: Exception) -> None:
        for waiter in (self._waiting, self._handshake):
            if waiter is not None and not waiter.called:
                waiter.errback(problem)
        self._waiting = self._handshake = None

    def reply(self) -> Deferred[Reply]:
        """The next complete reply."""
        if self._lost is not None:
            return _failed(self._lost)
        waiter: Deferred[Reply] = Deferred()
        self._waiting = waiter
        self._deliver()
        return waiter

    def command(self, line: str) -> Deferred[Reply]:
        transport: Any = self.transport
        transport.write(line.encode("ascii") + b"\r\n")
        return self.reply()

    def has_pending_input(self) -> bool:
        return bool(self._buffer or self._lines or self._replies)

    def start_tls(self, creator: _ProbeTLS) -> Deferred[None]:
        """Start the TLS handshake; fires once it completed."""
        self._handshake = Deferred()
        transport: Any = self.transport
        transport.startTLS(creator)
        return self._handshake

    def handshakeCompleted(self) -> None:
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason
        if self._handshake is not None:
            self._fail(_ProbeError(f"TLS handshake failed: {_lost_reason(reason)}"))
        else:
            self._fail(_ProbeError(f"connection closed by the server ({_lost_reason(reason)})"))
        self._closed.callback(None)

    async def abort(self) -> None:
        if self._lost is None:
            transport: Any = self.transport
            transport.abortConnection()
            await self._closed


@implementer(IOpenSSLClientConnectionCreator)
class _ProbeTLS:
    """TLS to the MX: SNI is the MX name; chain and name problems are noted, not fatal."""

    def __init__(self, context: SSL.Context, probe: SmtpProbe) -> None:
        self._context = context
        self._probe = probe
        self.connection: SSL.Connection | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if not _is_ip(self._probe.host):
            connection.set_tlsext_host_name(self._probe.host.encode("idna"))
        connection.set_verify(SSL.VERIFY_PEER, self._verify)
        self.connection = connection
        return connection

    def _verify(self, connection: SSL.Connection, certificate: X509, error: int, depth: int, ok: int) -> bool:
        """OpenSSL's verify callback: record its verdict and the name check, and go on."""
        probe = self._probe
        try:
            if not ok:
                problem = VERIFY_ERRORS.get(error, f"certificate not accepted (OpenSSL verify error {error})")
                entry = problem + (f" (chain depth {depth})" if depth else "")
                if entry not in probe.certificate_problems:
                    probe.certificate_problems.append(entry)
            if depth == 0:
                leaf = certificate.to_cryptography()
                probe.certificate = leaf
                try:
                    if _is_ip(probe.host):
                        verify_certificate_ip_address(leaf, probe.host)
                    else:
                        verify_certificate_hostname(leaf, probe.host)
                except (VerificationError, CertificateError):
                    problem = f"certificate not valid for {probe.host} (names: {certificate_names(leaf)})"
                    if problem not in probe.certificate_problems:
                        probe.certificate_problems.append(problem)
        except Exception as unexpected:
            probe.certificate_problems.append(f"certificate check failed: {one_line(unexpected)}")
        return True


def certificate_names(certificate: x509.Certificate) -> str:
    """The DNS names of a certificate's SAN, or ``no DNS names``."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    return ", ".join(names.value.get_values_for_type(x509.DNSName)) or "no DNS names"


def days_left(certificate: x509.Certificate, now: datetime.datetime) -> float:
    """Days from ``now`` until the certificate's notAfter (negative once expired)."""
    return (certificate.not_valid_after_utc - now).total_seconds() / 86_400


def _failed(reason: Failure) -> Deferred[Reply]:
    value = reason.value
    problem = value if isinstance(value, _ProbeError) else _ProbeError(_lost_reason(reason))
    waiter: Deferred[Reply] = Deferred()
    waiter.errback(problem)
    return waiter


def _lost_reason(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, SSL.Error):
        return ssl_reason(value)
    if isinstance(value, neterror.ConnectionDone):
        return "closed cleanly"
    if isinstance(value, BaseException):
        return one_line(value)
    return "connection lost"


def _quote(text: str, limit: int = 80) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr("".join(char if char.isprintable() else "?" for char in shown))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    return _is_ip(text) and ":" in text
