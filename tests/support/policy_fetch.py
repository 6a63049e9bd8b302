"""The loopback policy host and fetcher shared by the tests of resolver/https/.

A HostileHttpsServer on 127.0.0.1 with a CA made at run time (the ``server``
fixture, which checks that nothing of a fetch outlives the test), a resolver
that maps every name to 127.0.0.1, and the checks every failed fetch must pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted

from postfix_mtasts.policy.model import Mode, Policy
from postfix_mtasts.resolver import FetchFailed, FetchResult
from postfix_mtasts.resolver.https import HttpsPolicyFetcher
from tests.support.https_server import HostileHttpsServer

DOMAIN = "example.com"
HOST = "mta-sts.example.com"
POLICY = b"version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.backup.example.com\nmax_age: 86400\n"
EXPECTED = Policy(Mode.ENFORCE, 86400, ("mail.example.com", "*.backup.example.com"))
#: A short deadline so that the slow cases end quickly; tests assert the failure, not the time.
SHORT_DEADLINE = 1.0


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def leftover_timers() -> list[Any]:
    """Pending reactor calls, but for pytest-twisted's own (it runs fixtures through one)."""
    return [
        call
        for call in reactor().getDelayedCalls()
        if not getattr(call.func, "__module__", "").startswith("pytest_twisted")
    ]


class LoopbackResolver:
    """Maps every name to 127.0.0.1, except the names it is told do not exist."""

    def __init__(self, missing: tuple[str, ...] = ()) -> None:
        self.missing = missing
        self.asked: list[str] = []

    async def addresses(self, host: str) -> list[str]:
        self.asked.append(host)
        if host in self.missing:
            raise LookupError(f"{host}: no such name (NXDOMAIN)")
        return ["127.0.0.1"]


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[HostileHttpsServer]:
    before = set(leftover_timers())
    started = HostileHttpsServer()
    await started.start(reactor())
    yield started
    await started.stop()
    assert started.open_connections == 0
    # Nothing of the fetcher's or the server's may outlive the test (trial's "dirty reactor").
    assert [call for call in leftover_timers() if call not in before] == []


def fetcher_for(
    server: HostileHttpsServer, resolver: LoopbackResolver | None = None, **options: Any
) -> HttpsPolicyFetcher:
    return HttpsPolicyFetcher(
        reactor(), resolver or LoopbackResolver(), ca_file=server.ca_file, port=server.port, **options
    )


async def fetch_failed(fetcher: HttpsPolicyFetcher, domain: str = DOMAIN) -> FetchFailed:
    result: FetchResult = await fetcher.fetch(domain)
    assert isinstance(result, FetchFailed), result
    assert "\n" not in result.reason
    assert result.trace and result.trace[-1] == f"failed: {result.reason}"
    return result
