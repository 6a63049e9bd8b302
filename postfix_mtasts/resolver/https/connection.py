"""The connection to the policy host, below the HTTP client.

The Agent of one fetch (:func:`policy_host_agent`) connects only through our
endpoint, which resolves the policy host with the daemon's own resolver (never
the system's), tries the addresses in order, one TCP connection attempt each,
and puts TLS (see :mod:`.tls`) right on the first TCP connection made, with no
protocol layer in between; the fetch can drop that connection at once and wait
until it is gone.
"""

from __future__ import annotations

import ipaddress
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from postfix_mtasts.errors import one_line
from postfix_mtasts.resolver import FetchProblem
from postfix_mtasts.resolver.https.attempt import AWAITING_RESPONSE, _Attempt, _FetchError
from postfix_mtasts.resolver.https.tls import _PolicyHostTLS

#: Seconds one TCP connection attempt to one address may take before the next
#: address is tried; the whole fetch is still bounded by its own deadline.
CONNECT_ATTEMPT_TIMEOUT = 10.0


def policy_host_agent(reactor: Any, attempt: _Attempt, context: SSL.Context) -> IAgent:
    """The Agent of one fetch: it reaches the policy host only through our
    endpoint (the daemon's resolver, TLS with ``context`` and our checks), on
    a connection of its own that no pool keeps."""
    tls = _PolicyHostTLS(context, attempt)
    pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    agent: IAgent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
        reactor, _PolicyHostEndpointFactory(attempt, tls), pool=pool
    )
    return agent


@implementer(IAgentEndpointFactory)
class _PolicyHostEndpointFactory:
    """Gives the Agent our endpoint for the one URI it will ever ask about."""

    def __init__(self, attempt: _Attempt, tls: _PolicyHostTLS) -> None:
        self._attempt = attempt
        self._tls = tls

    def endpointForURI(self, uri: URI) -> _PolicyHostEndpoint:
        return _PolicyHostEndpoint(self._attempt, self._tls)


@implementer(IStreamClientEndpoint)
class _PolicyHostEndpoint:
    """Resolves the policy host with the daemon's resolver, then TCP to each address in turn, then TLS."""

    def __init__(self, attempt: _Attempt, tls: _PolicyHostTLS) -> None:
        self._attempt = attempt
        self._tls = tls

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        """Resolve, then connect to the addresses in order; the first TCP connection wins."""
        attempt = self._attempt
        host = attempt.host
        attempt.stage = f"resolving {host}"
        try:
            found = await attempt.addresses.addresses(host)
        except CancelledError:
            raise
        except Exception as error:
            raise _FetchError(f"cannot resolve {host}: {one_line(error)}", FetchProblem.RESOLVE) from None
        addresses = [address for address in found if _is_ip(address)]
        if not addresses:
            raise _FetchError(f"{host} has no usable address", FetchProblem.RESOLVE)
        attempt.step(f"resolved {host}: {' '.join(addresses)}")

        creator = cast(IOpenSSLClientConnectionCreator, self._tls)
        # The Agent's factory serves this one connection: no "Starting factory"
        # and "Stopping factory" log events for every fetch.
        cast(Any, protocolFactory).noisy = False
        problems: list[str] = []
        for address in addresses:
            peer = f"[{address}]:{attempt.port}" if ":" in address else f"{address}:{attempt.port}"
            attempt.stage = f"connecting to {peer}"
            connector = _PolicyHostConnector(creator, protocolFactory, attempt)
            attempt.reactor.connectTCP(address, attempt.port, connector, timeout=CONNECT_ATTEMPT_TIMEOUT)
            try:
                connection = await connector.connected
            except neterror.ConnectError as error:
                problem = _connect_problem(error, peer)
                attempt.step(problem)
                problems.append(problem)
                continue
            attempt.peer = peer
            attempt.step(f"connected to {peer}")
            attempt.stage = AWAITING_RESPONSE
            # The Agent wants its own protocol back, from under our TLS.
            http_protocol: IProtocol = connection.wrappedProtocol
            return http_protocol
        raise _FetchError("; ".join(problems), FetchProblem.CONNECT)


class _PolicyHostConnection(TLSMemoryBIOProtocol):
    """TLS right on the TCP connection, which the fetch can abort and wait for until it is gone.

    One protocol object per connection (no wrapper between TCP and TLS, nor
    Twisted's buffering of small writes: the request is one write).
    """

    factory: _PolicyHostConnector

    def __init__(self, factory: _PolicyHostConnector, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)  # type: ignore[no-untyped-call]
        self._tcp_lost = False
        self._close_waiters: list[Deferred[None]] = []

    def makeConnection(self, transport: Any) -> None:
        self.factory.attempt.connection = self
        super().makeConnection(transport)  # type: ignore[no-untyped-call]
        self.factory.made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tcp_lost = True
        waiting, self._close_waiters = self._close_waiters, []
        try:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
        finally:
            for waiter in waiting:
                waiter.callback(None)

    def abort(self) -> None:
        """Drop the TCP connection at once, under the TLS layer."""
        transport: Any = self.transport  # a TCP transport: ITCPTransport has abortConnection
        if not self._tcp_lost and transport is not None:
            transport.abortConnection()

    def closed(self) -> Deferred[None]:
        """Fires once the TCP connection is closed (at once if it already is)."""
        waiter: Deferred[None] = Deferred()
        if self._tcp_lost:
            waiter.callback(None)
        else:
            self._close_waiters.append(waiter)
        return waiter


class _PolicyHostConnector(TLSMemoryBIOFactory):
    """The client factory of one TCP connection attempt: :attr:`connected` fires with its TLS protocol.

    Does what an endpoint's wrapping factory would (fail on a failed or
    cancelled connection attempt) without another protocol layer.
    """

    protocol = _PolicyHostConnection

    def __init__(
        self, creator: IOpenSSLClientConnectionCreator, http_factory: IProtocolFactory, attempt: _Attempt
    ) -> None:
        super().__init__(creator, True, http_factory, clock=attempt.reactor)
        self.attempt = attempt
        self.connected: Deferred[_PolicyHostConnection] = Deferred(self._cancel)
        self._connector: Any = None

    def startedConnecting(self, connector: Any) -> None:
        self._connector = connector

    def buildProtocol(self, addr: Any) -> _PolicyHostConnection | None:  # type: ignore[override]
        try:
            return cast(_PolicyHostConnection, super().buildProtocol(addr))
        except Exception:
            self.connected.errback()
            return None

    def made(self, connection: _PolicyHostConnection) -> None:
        if not self.connected.called:
            self.connected.callback(connection)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.connected.called:
            self.connected.errback(reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass

    def _cancel(self, connected: Deferred[_PolicyHostConnection]) -> None:
        cancelled = neterror.ConnectingCancelledError(self._connector.getDestination())  # type: ignore[no-untyped-call]
        connected.errback(cancelled)
        self._connector.stopConnecting()


def _connect_problem(error: neterror.ConnectError, peer: str) -> str:
    if isinstance(error, neterror.ConnectionRefusedError):
        return f"connection refused by {peer}"
    if isinstance(error, neterror.TimeoutError):
        return f"no TCP connection to {peer} within {CONNECT_ATTEMPT_TIMEOUT}s"
    return f"cannot connect to {peer}: {one_line(error)}"


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
