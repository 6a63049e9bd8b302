"""What a fetch reports about itself (resolver/https/attempt.py), against a hostile
policy host on 127.0.0.1: the one deadline names the stage the fetch was in
(resolving, the TLS handshake, the response headers, the body); a cancelled or
timed-out fetch drops its connection; no connection or timer outlives a fetch."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred

from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchOK, FetchProblem
from postfix_mtasts.resolver.https import HttpsPolicyFetcher
from tests.support import policy_fetch
from tests.support.https_server import Drip, Hang, HostileHttpsServer, ListenerMode, Serve
from tests.support.policy_fetch import (
    DOMAIN,
    HOST,
    POLICY,
    SHORT_DEADLINE,
    fetch_failed,
    fetcher_for,
    reactor,
)

pytestmark = pytest.mark.integration

#: The loopback policy host, fresh for each test (a fixture).
server = policy_fetch.server


# --- the one deadline ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slow_drip_fails_at_the_deadline_and_is_dropped(server: HostileHttpsServer) -> None:
    # 4 bytes a second: the whole policy would take about 20 s.
    server.set_host(HOST, Drip(POLICY, interval=0.25))

    failed = await fetch_failed(fetcher_for(server, timeout=SHORT_DEADLINE))

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.TIMEOUT
    assert f"no answer within {SHORT_DEADLINE}s (while reading the body)" in failed.reason
    await server.wait_idle()
    state = server.state(HOST)
    assert state.aborted == 1
    assert 0 < state.bytes_sent < len(POLICY)


@pytest_twisted.ensureDeferred
async def test_hang_after_request_fails_at_the_deadline(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Hang())

    failed = await fetch_failed(fetcher_for(server, timeout=SHORT_DEADLINE))

    assert f"no answer within {SHORT_DEADLINE}s" in failed.reason
    assert "response headers" in failed.reason
    await server.wait_idle()
    assert server.requests[HOST] == 1
    assert server.state(HOST).aborted == 1


@pytest_twisted.ensureDeferred
async def test_slow_resolver_fails_at_the_deadline(server: HostileHttpsServer) -> None:
    class NeverAnswers:
        async def addresses(self, host: str) -> list[str]:
            return await Deferred()

    fetcher = HttpsPolicyFetcher(
        reactor(), NeverAnswers(), ca_file=server.ca_file, port=server.port, timeout=SHORT_DEADLINE
    )

    failed = await fetch_failed(fetcher)

    assert f"no answer within {SHORT_DEADLINE}s (while resolving {HOST})" in failed.reason
    assert failed.problem == FetchProblem.TIMEOUT
    assert server.connections_accepted == 0


@pytest_twisted.ensureDeferred
async def test_tcp_accept_without_tls_fails_at_the_deadline() -> None:
    silent = HostileHttpsServer(mode=ListenerMode.TCP_SILENT)
    await silent.start(reactor())
    try:
        failed = await fetch_failed(fetcher_for(silent, timeout=SHORT_DEADLINE))
        await silent.wait_idle()
    finally:
        await silent.stop()

    assert failed.category == FailureCategory.FETCH
    assert f"no answer within {SHORT_DEADLINE}s" in failed.reason
    assert silent.connections_accepted == 1


# --- cancellation and clean-up -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_caller_cancelling_a_fetch_closes_its_connection(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Hang())
    seen = server.next_request()
    fetching = Deferred.fromCoroutine(fetcher_for(server).fetch(DOMAIN))
    assert await seen == HOST

    fetching.cancel()

    with pytest.raises(CancelledError):
        await fetching
    await server.wait_idle()
    assert server.state(HOST).aborted == 1


@pytest_twisted.ensureDeferred
async def test_fetches_leave_no_connection_or_timer_behind(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))
    server.set_host("mta-sts.hang.example", Hang())
    fetcher = fetcher_for(server, timeout=SHORT_DEADLINE)

    ok = await fetcher.fetch(DOMAIN)
    hung = await fetcher.fetch("hang.example")
    await server.wait_idle()

    assert isinstance(ok, FetchOK) and isinstance(hung, FetchFailed)
    assert server.open_connections == 0
