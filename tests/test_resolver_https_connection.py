"""The connection to the policy host (resolver/https/connection.py): resolution
through the daemon's resolver and its failures, refused connections, the
addresses tried in order (IPv6 too), and a caller cancelling while still connecting."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchOK, FetchProblem
from postfix_mtasts.resolver.https import HttpsPolicyFetcher
from tests.support import policy_fetch
from tests.support.https_server import HostileHttpsServer, Serve
from tests.support.policy_fetch import (
    DOMAIN,
    HOST,
    POLICY,
    LoopbackResolver,
    fetch_failed,
    fetcher_for,
    reactor,
)

pytestmark = pytest.mark.integration

#: The loopback policy host, fresh for each test (a fixture).
server = policy_fetch.server


@pytest_twisted.ensureDeferred
async def test_unresolvable_host_is_a_fetch_error(server: HostileHttpsServer) -> None:
    resolver = LoopbackResolver(missing=("mta-sts.nowhere.example",))

    failed = await fetch_failed(fetcher_for(server, resolver), "nowhere.example")

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.RESOLVE
    assert "cannot resolve mta-sts.nowhere.example: mta-sts.nowhere.example: no such name" in failed.reason
    assert server.connections_accepted == 0


@pytest_twisted.ensureDeferred
async def test_resolver_without_usable_address_is_a_fetch_error(server: HostileHttpsServer) -> None:
    class Garbage:
        async def addresses(self, host: str) -> list[str]:
            return ["not-an-address"]

    fetcher = HttpsPolicyFetcher(reactor(), Garbage(), ca_file=server.ca_file, port=server.port)

    failed = await fetch_failed(fetcher)

    assert "mta-sts.example.com has no usable address" in failed.reason
    assert failed.problem == FetchProblem.RESOLVE


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_a_fetch_error(server: HostileHttpsServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    fetcher = HttpsPolicyFetcher(reactor(), LoopbackResolver(), ca_file=server.ca_file, port=closed_port)

    failed = await fetch_failed(fetcher)

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.CONNECT
    assert failed.reason == f"connection refused by 127.0.0.1:{closed_port}"


@pytest_twisted.ensureDeferred
async def test_ipv6_address_is_tried_before_the_next_address(server: HostileHttpsServer) -> None:
    # The server listens on 127.0.0.1 only: [::1] refuses (or, without IPv6, fails at once).
    class V6ThenV4:
        async def addresses(self, host: str) -> list[str]:
            return ["::1", "127.0.0.1"]

    server.set_host(HOST, Serve(POLICY))
    fetcher = HttpsPolicyFetcher(reactor(), V6ThenV4(), ca_file=server.ca_file, port=server.port)

    result = await fetcher.fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert any(step.endswith(f"[::1]:{server.port}") for step in result.trace), result.trace
    assert f"connected to 127.0.0.1:{server.port}" in result.trace


@pytest_twisted.ensureDeferred
async def test_addresses_are_tried_in_order_until_one_connects() -> None:
    # A memory reactor: these documentation addresses are only strings here, never contacted.
    clock = MemoryReactorClock()

    class TwoAddresses:
        async def addresses(self, host: str) -> list[str]:
            return ["192.0.2.1", "192.0.2.2"]

    fetcher = HttpsPolicyFetcher(clock, TwoAddresses(), timeout=30.0)
    fetching = Deferred.fromCoroutine(fetcher.fetch(DOMAIN))
    (first,) = clock.tcpClients
    assert first[:2] == ("192.0.2.1", 443)
    first[2].clientConnectionFailed(clock.connectors[0], Failure(ConnectionRefusedError()))
    second = clock.tcpClients[1]
    assert second[:2] == ("192.0.2.2", 443)

    clock.advance(30.0)
    failed = await fetching

    assert isinstance(failed, FetchFailed)
    assert failed.reason == "no answer within 30.0s (while connecting to 192.0.2.2:443)"
    assert "connection refused by 192.0.2.1:443" in failed.trace
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_caller_cancelling_while_still_connecting_gets_a_cancellation(
    server: HostileHttpsServer,
) -> None:
    # A memory reactor never completes the TCP connection.
    clock = MemoryReactorClock()
    fetcher = HttpsPolicyFetcher(clock, LoopbackResolver(), ca_file=server.ca_file, port=server.port)
    fetching = Deferred.fromCoroutine(fetcher.fetch(DOMAIN))
    assert len(clock.tcpClients) == 1 and not fetching.called

    fetching.cancel()

    with pytest.raises(CancelledError):
        await fetching
    assert clock.connectors[0].stoppedConnecting
