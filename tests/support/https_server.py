"""A hostile MTA-STS policy host on 127.0.0.1 for integration tests.

One listening port serves every policy host name: the certificate is chosen
per SNI name and the HTTP behaviour per Host header, both set by the test.
Certificates come from a CA made at run time with trustme, whose PEM file the
fetcher under test is given as its ``ca_file``. Behaviours that act before the
TLS handshake (silence after the TCP accept, plain HTTP, TLS 1.1 at most) are
modes of a whole server: start one server per such mode.

Usage::

    server = HostileHttpsServer()
    await server.start(reactor)
    server.set_host("mta-sts.example.com", Serve(body=POLICY))
    server.set_host("mta-sts.expired.example", Serve(body=POLICY), certificate=CertKind.EXPIRED)
    fetcher = HttpsPolicyFetcher(reactor, resolver, ca_file=server.ca_file, port=server.port)
    ...
    await server.stop()

TLS 1.1: this machine's OpenSSL still negotiates TLS 1.1 at security level 0,
which :attr:`ListenerMode.TLS_1_1_MAX` sets; where an OpenSSL build has dropped
it, such a server fails every handshake, which a TLS 1.2+ client sees the same
way (the tests check the server really speaks TLS 1.1 first).
"""

from __future__ import annotations

import datetime
import enum
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trustme
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IPullProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

#: The only address the server listens on.
LOOPBACK = "127.0.0.1"
#: Name on the certificate offered to a client that sends no SNI.
NO_SNI_NAME = "no-sni.invalid"
#: Prefix that turns a host name into one its WRONG_NAME certificate names instead.
WRONG_NAME_PREFIX = "not-"
#: OpenSSL cipher string that re-enables TLS 1.0/1.1 (security level 0).
LEGACY_CIPHERS = b"DEFAULT:@SECLEVEL=0"
#: What a plain HTTP server says to a TLS ClientHello.
PLAIN_HTTP_ERROR = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
#: Default size of an oversized body, far beyond the socket buffers of loopback,
#: so a client that aborts is seen aborting rather than the server finishing.
OVERSIZED_TOTAL = 64 * 1024 * 1024
#: Seconds :meth:`HostileHttpsServer.wait_idle` waits before calling a connection leaked.
IDLE_WAIT_LIMIT = 10.0
#: Size of each chunk of an oversized body.
OVERSIZED_CHUNK = 16 * 1024


class CertKind(enum.Enum):
    """Which certificate a host presents."""

    GOOD = "good"
    #: SAN names another host.
    WRONG_NAME = "wrong-name"
    #: SAN names another host, the subject CN names this one (must still fail).
    CN_ONLY = "cn-only"
    #: Valid name and chain, notAfter in the past.
    EXPIRED = "expired"
    #: Valid name, issued by a CA the client does not trust.
    UNTRUSTED = "untrusted"


class ListenerMode(enum.Enum):
    """What the listening port does before any HTTP happens."""

    HTTPS = "https"
    #: Accept TCP, then say nothing and ignore everything.
    TCP_SILENT = "tcp-silent"
    #: A plain-text HTTP error where TLS is expected, then close.
    PLAIN_HTTP = "plain-http"
    #: HTTPS, but no TLS version above 1.1.
    TLS_1_1_MAX = "tls-1.1-max"


@dataclass
class Serve:
    """Answer with this status, Content-Type (None: no header at all), body and headers."""

    body: bytes = b""
    status: int = 200
    content_type: str | None = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class Redirect:
    """Answer with a redirect to ``location``."""

    location: str
    status: int = 301


@dataclass
class Oversized:
    """A ``text/plain`` body of ``total`` bytes, chunked unless ``declare_length``."""

    total: int = OVERSIZED_TOTAL
    declare_length: bool = False


@dataclass
class Drip:
    """Send ``body`` one byte every ``interval`` seconds (Content-Length declared)."""

    body: bytes
    interval: float = 0.25


@dataclass
class Hang:
    """Read the request, then never answer."""


@dataclass
class Pieces:
    """A ``text/plain`` body sent chunked as these raw pieces, one write per reactor turn.

    Each write is its own TLS record, so the client gets the body in many small
    reads whose boundaries fall wherever the pieces end (e.g. inside a gzip header).
    """

    pieces: tuple[bytes, ...]
    headers: tuple[tuple[str, str], ...] = ()


Behaviour = Serve | Redirect | Oversized | Drip | Hang | Pieces


@dataclass
class HostState:
    """What happened to one host name's requests."""

    requests: int = 0
    #: Responses written to the end.
    finished: int = 0
    #: Responses cut short because the client closed the connection.
    aborted: int = 0
    #: Bytes of body written before the end or the abort.
    bytes_sent: int = 0
    paths: list[str] = field(default_factory=list)
    request_headers: list[dict[str, list[str]]] = field(default_factory=list)


class HostileHttpsServer:
    """A policy host that misbehaves on request; see the module docstring."""

    def __init__(self, *, mode: ListenerMode = ListenerMode.HTTPS, ca: trustme.CA | None = None) -> None:
        self.mode = mode
        self.ca = ca if ca is not None else trustme.CA()
        #: A CA nobody trusts, for :attr:`CertKind.UNTRUSTED`.
        self.untrusted_ca = trustme.CA()
        self.port = 0
        self.ca_file = ""
        #: Request count per Host name (port removed, lower case).
        self.requests: Counter[str] = Counter()
        self.hosts: dict[str, HostState] = {}
        #: SNI names of every TLS handshake, in order (None: no SNI).
        self.sni_names: list[str | None] = []
        #: TCP connections accepted so far.
        self.connections_accepted = 0
        self._behaviours: dict[str, Behaviour] = {}
        self._certificates: dict[str, CertKind] = {}
        self._contexts: dict[tuple[str, CertKind], SSL.Context] = {}
        self._listening: IListeningPort | None = None
        self._open: set[_TrackedServerConnection] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self._request_waiters: list[Deferred[str]] = []
        self._calls: set[IDelayedCall] = set()
        self._directory = ""
        self._reactor: Any = None

    # --- configuration -------------------------------------------------------

    def set_host(self, name: str, behaviour: Behaviour, *, certificate: CertKind = CertKind.GOOD) -> None:
        """Decide what ``name`` (the policy host, e.g. ``mta-sts.example.com``) does."""
        key = name.lower().rstrip(".")
        self._behaviours[key] = behaviour
        self._certificates[key] = certificate

    def state(self, name: str) -> HostState:
        """The counters of ``name`` (all zero if it never got a request)."""
        return self.hosts.setdefault(name.lower().rstrip("."), HostState())

    def next_request(self) -> Deferred[str]:
        """Fires with the Host name of the next request the server receives."""
        waiter: Deferred[str] = Deferred()
        self._request_waiters.append(waiter)
        return waiter

    @property
    def open_connections(self) -> int:
        return len(self._open)

    # --- life cycle ----------------------------------------------------------

    async def start(self, reactor: Any) -> None:
        """Write the CA file and listen on 127.0.0.1, port chosen by the system."""
        self._reactor = reactor
        self._directory = tempfile.mkdtemp(prefix="mtasts-https-")
        self.ca_file = os.path.join(self._directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

        site = _QuietSite(_PolicyResource(self))
        inner: Factory
        if self.mode is ListenerMode.TCP_SILENT:
            inner = Factory.forProtocol(_Silent)
        elif self.mode is ListenerMode.PLAIN_HTTP:
            inner = Factory.forProtocol(_PlainTextError)
        else:
            inner = TLSMemoryBIOFactory(_SniSelector(self), False, site)
        self._listening = reactor.listenTCP(0, _ServerTracker(inner, self), interface=LOOPBACK)
        self.port = self._listening.getHost().port

    async def stop(self) -> None:
        """Stop listening, drop every open connection and wait until all are gone."""
        if self._listening is not None:
            await self._listening.stopListening()
            self._listening = None
        for connection in list(self._open):
            connection.transport.abortConnection()
        await self.wait_idle()
        for call in list(self._calls):
            if call.active():
                call.cancel()
        self._calls.clear()
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = ""

    def wait_idle(self, limit: float = IDLE_WAIT_LIMIT) -> Deferred[None]:
        """Fires once no client connection is open; fails if one is still open after ``limit`` s.

        The limit only turns a connection the client never closes into a test
        failure instead of a hung test run.
        """
        waiter: Deferred[None] = Deferred()
        if not self._open:
            waiter.callback(None)
            return waiter
        self._idle_waiters.append(waiter)

        def still_open(result: object, timeout: float) -> Failure:
            return Failure(
                AssertionError(f"{len(self._open)} client connection(s) still open after {timeout}s")
            )

        return waiter.addTimeout(limit, self._reactor, onTimeoutCancel=still_open)

    # --- internals -----------------------------------------------------------

    def _opened(self, connection: _TrackedServerConnection) -> None:
        self.connections_accepted += 1
        self._open.add(connection)

    def _closed(self, connection: _TrackedServerConnection) -> None:
        self._open.discard(connection)
        if not self._open:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    def _call_later(self, delay: float, function: Any, *args: Any) -> IDelayedCall:
        call: IDelayedCall

        def run() -> None:
            self._calls.discard(call)
            function(*args)

        call = self._reactor.callLater(delay, run)
        self._calls.add(call)
        return call

    def _cancel_call(self, call: IDelayedCall | None) -> None:
        if call is not None:
            self._calls.discard(call)
            if call.active():
                call.cancel()

    def _context(self, name: str | None) -> SSL.Context:
        """The TLS context for an SNI name, built once per (name, certificate kind)."""
        host = name or NO_SNI_NAME
        kind = self._certificates.get(host, CertKind.GOOD)
        key = (host, kind)
        if key not in self._contexts:
            self._contexts[key] = self._build_context(host, kind)
        return self._contexts[key]

    def _build_context(self, host: str, kind: CertKind) -> SSL.Context:
        now = datetime.datetime.now(datetime.UTC)
        if kind is CertKind.GOOD:
            leaf = self.ca.issue_cert(host)
        elif kind is CertKind.WRONG_NAME:
            leaf = self.ca.issue_cert(WRONG_NAME_PREFIX + host)
        elif kind is CertKind.CN_ONLY:
            leaf = self.ca.issue_cert(WRONG_NAME_PREFIX + host, common_name=host)
        elif kind is CertKind.EXPIRED:
            leaf = self.ca.issue_cert(
                host,
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            )
        else:
            leaf = self.untrusted_ca.issue_cert(host)
        context = SSL.Context(SSL.TLS_METHOD)
        if self.mode is ListenerMode.TLS_1_1_MAX:
            context.set_min_proto_version(SSL.TLS1_VERSION)
            context.set_max_proto_version(SSL.TLS1_1_VERSION)
            context.set_cipher_list(LEGACY_CIPHERS)
        leaf.configure_cert(context)
        return context


@implementer(IOpenSSLServerConnectionCreator)
class _SniSelector:
    """Starts every handshake on the no-SNI context and switches to the one for the SNI name."""

    def __init__(self, server: HostileHttpsServer) -> None:
        self._server = server
        self._default = server._context(None)
        self._default.set_tlsext_servername_callback(self._switch)

    def _switch(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii").lower() if raw else None
        self._server.sni_names.append(name)
        connection.set_context(self._server._context(name))

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._default, None)


class _TrackedServerConnection(ProtocolWrapper):
    """A TCP connection the server knows about, so :meth:`HostileHttpsServer.stop` can end it."""

    factory: _ServerTracker

    def connectionMade(self) -> None:
        self.factory.server._opened(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        try:
            super().connectionLost(reason)
        finally:
            self.factory.server._closed(self)


class _ServerTracker(WrappingFactory):
    protocol = _TrackedServerConnection

    def __init__(self, wrapped: Factory, server: HostileHttpsServer) -> None:
        super().__init__(wrapped)
        self.server = server


class _Silent(Protocol):
    """Accepts a connection and never answers."""

    def dataReceived(self, data: bytes) -> None:
        pass


class _PlainTextError(Protocol):
    """Answers whatever arrives (a TLS ClientHello) as a plain HTTP server would, then closes."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(PLAIN_HTTP_ERROR)
        self.transport.loseConnection()


class _QuietSite(Site):
    """A Site that writes no access log."""

    def log(self, request: Request) -> None:
        pass


class _PolicyResource(Resource):
    """Answers every path of every host according to the host's behaviour."""

    isLeaf = True

    def __init__(self, server: HostileHttpsServer) -> None:
        super().__init__()
        self._server = server

    def render(self, request: Request) -> bytes | int:
        host = request.getRequestHostname().decode("ascii", "replace").lower()
        server = self._server
        server.requests[host] += 1
        state = server.state(host)
        state.requests += 1
        state.paths.append(request.uri.decode("ascii", "replace"))
        state.request_headers.append(
            {
                name.decode("latin-1").lower(): [value.decode("latin-1") for value in values]
                for name, values in request.requestHeaders.getAllRawHeaders()
            }
        )
        waiters, server._request_waiters = server._request_waiters, []
        for waiter in waiters:
            waiter.callback(host)
        behaviour = server._behaviours.get(host)
        request.defaultContentType = None
        if behaviour is None:
            behaviour = Serve(b"no such policy host\n", status=404)
        if isinstance(behaviour, Serve):
            return self._serve(request, state, behaviour)
        if isinstance(behaviour, Redirect):
            request.setResponseCode(behaviour.status)
            request.setHeader(b"Location", behaviour.location.encode("ascii"))
            request.setHeader(b"Content-Type", b"text/plain")
            state.finished += 1
            return b"moved\n"
        if isinstance(behaviour, Oversized):
            _OversizedBody(server, request, state, behaviour).start()
            return NOT_DONE_YET
        if isinstance(behaviour, Drip):
            _Dripper(server, request, state, behaviour).start()
            return NOT_DONE_YET
        if isinstance(behaviour, Pieces):
            _PieceWriter(server, request, state, behaviour).start()
            return NOT_DONE_YET
        self._watch(request, state)
        return NOT_DONE_YET

    def _serve(self, request: Request, state: HostState, behaviour: Serve) -> bytes:
        request.setResponseCode(behaviour.status)
        if behaviour.content_type is not None:
            request.setHeader(b"Content-Type", behaviour.content_type.encode("latin-1"))
        for name, value in behaviour.headers:
            request.responseHeaders.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        state.finished += 1
        state.bytes_sent += len(behaviour.body)
        return behaviour.body

    @staticmethod
    def _watch(request: Request, state: HostState) -> None:
        def lost(_: Failure) -> None:
            state.aborted += 1

        request.notifyFinish().addErrback(lost)


@implementer(IPullProducer)
class _OversizedBody:
    """Writes a huge body as fast as the client reads it (a pull producer)."""

    def __init__(
        self, server: HostileHttpsServer, request: Request, state: HostState, behaviour: Oversized
    ) -> None:
        self._request = request
        self._state = state
        self._left = behaviour.total
        self._declare = behaviour.declare_length
        self._chunk = b"x" * OVERSIZED_CHUNK
        self._stopped = False

    def start(self) -> None:
        request = self._request
        request.setHeader(b"Content-Type", b"text/plain")
        if self._declare:
            request.setHeader(b"Content-Length", str(self._left).encode("ascii"))
        request.notifyFinish().addErrback(self._lost)
        request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        piece = self._chunk[: self._left]
        self._left -= len(piece)
        self._state.bytes_sent += len(piece)
        self._request.write(piece)
        if self._left == 0:
            self._stopped = True
            self._request.unregisterProducer()
            self._request.finish()
            self._state.finished += 1

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self._stopped = True

    def _lost(self, _: Failure) -> None:
        self._stopped = True
        self._state.aborted += 1


class _Dripper:
    """Writes a body one byte per interval until done or the client goes away."""

    def __init__(
        self, server: HostileHttpsServer, request: Request, state: HostState, behaviour: Drip
    ) -> None:
        self._server = server
        self._request = request
        self._state = state
        self._body = behaviour.body
        self._interval = behaviour.interval
        self._sent = 0
        self._call: IDelayedCall | None = None
        self._gone = False

    def start(self) -> None:
        request = self._request
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"Content-Length", str(len(self._body)).encode("ascii"))
        request.notifyFinish().addErrback(self._lost)
        self._call = self._server._call_later(self._interval, self._next)

    def _next(self) -> None:
        self._call = None
        if self._gone:
            return
        self._request.write(self._body[self._sent : self._sent + 1])
        self._sent += 1
        self._state.bytes_sent += 1
        if self._sent == len(self._body):
            self._request.finish()
            self._state.finished += 1
        else:
            self._call = self._server._call_later(self._interval, self._next)

    def _lost(self, _: Failure) -> None:
        self._gone = True
        self._server._cancel_call(self._call)
        self._call = None
        self._state.aborted += 1


class _PieceWriter:
    """Writes a body piece by piece, one piece per reactor turn, until done or the client goes away."""

    def __init__(
        self, server: HostileHttpsServer, request: Request, state: HostState, behaviour: Pieces
    ) -> None:
        self._server = server
        self._request = request
        self._state = state
        self._pieces = list(behaviour.pieces)
        self._headers = behaviour.headers
        self._call: IDelayedCall | None = None
        self._gone = False

    def start(self) -> None:
        request = self._request
        request.setHeader(b"Content-Type", b"text/plain")
        for name, value in self._headers:
            request.responseHeaders.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        request.notifyFinish().addErrback(self._lost)
        self._call = self._server._call_later(0, self._next)

    def _next(self) -> None:
        self._call = None
        if self._gone:
            return
        if not self._pieces:
            self._request.finish()
            self._state.finished += 1
            return
        piece = self._pieces.pop(0)
        self._request.write(piece)
        self._state.bytes_sent += len(piece)
        self._call = self._server._call_later(0, self._next)

    def _lost(self, _: Failure) -> None:
        self._gone = True
        self._server._cancel_call(self._call)
        self._call = None
        self._state.aborted += 1
