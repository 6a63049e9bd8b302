# pytest_twisted has no type information: its decorators are untyped.
# mypy: disable-error-code="untyped-decorator"
"""SystemAddressResolver: the policy host's addresses from getaddrinfo, in threads of its own."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred

from postfix_mtasts.config import parse_config
from postfix_mtasts.resolver import system
from postfix_mtasts.resolver.dns import AddressLookupError, DnsResolver
from postfix_mtasts.resolver.system import SystemAddressResolver
from postfix_mtasts.service import build_resolvers

reactor: Any = global_reactor


@pytest.fixture
def resolver() -> Iterator[SystemAddressResolver]:
    made = SystemAddressResolver(reactor, threads=2)
    yield made
    made.stop()


@pytest_twisted.ensureDeferred
async def test_localhost_comes_from_the_hosts_file(resolver: SystemAddressResolver) -> None:
    found = await resolver.addresses("localhost.")
    assert "127.0.0.1" in found or "::1" in found
    assert len(found) == len(set(found))


@pytest.mark.parametrize(("errno", "reason"), [
    (socket.EAI_NONAME, "no such host or no A or AAAA record"),
    (socket.EAI_AGAIN, "temporary DNS failure"),
])
@pytest_twisted.ensureDeferred
async def test_resolver_errors_become_one_line(
    resolver: SystemAddressResolver, monkeypatch: pytest.MonkeyPatch, errno: int, reason: str
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(errno, "from the test")

    monkeypatch.setattr(system.socket, "getaddrinfo", refuse)
    with pytest.raises(AddressLookupError) as caught:
        await resolver.addresses("mta-sts.example.com")
    assert caught.value.reason == reason


@pytest_twisted.ensureDeferred
async def test_addresses_are_listed_once_in_the_resolver_order(
    resolver: SystemAddressResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0)),
    ]
    monkeypatch.setattr(system.socket, "getaddrinfo", lambda *a, **k: answers)
    assert await resolver.addresses("mta-sts.example.com") == ["2001:db8::1", "192.0.2.1"]


@pytest_twisted.ensureDeferred
async def test_a_caller_that_gives_up_is_not_held_by_a_stuck_lookup(
    resolver: SystemAddressResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def stuck(*args: object, **kwargs: object) -> list[Any]:
        release.wait(30)
        return []

    monkeypatch.setattr(system.socket, "getaddrinfo", stuck)
    waiting: Deferred[list[str]] = Deferred.fromCoroutine(resolver.addresses("mta-sts.example.com"))
    waiting.cancel()
    with pytest.raises(CancelledError):
        await waiting
    release.set()


def test_invalid_names_are_refused_without_a_thread() -> None:
    resolver = SystemAddressResolver(reactor)
    for bad in (".", "", "a\x00b"):
        d = Deferred.fromCoroutine(resolver.addresses(bad))
        failures: list[Any] = []
        d.addErrback(failures.append)
        assert failures and failures[0].check(AddressLookupError)
    assert resolver._pool is None


def test_the_fetcher_asks_the_system_only_without_configured_nameservers() -> None:
    _, fetcher = build_resolvers(reactor, parse_config("", source="<test>"))
    assert isinstance(fetcher._addresses, SystemAddressResolver)
    configured = parse_config('[resolver]\nnameservers = ["127.0.0.1:5353"]\n', source="<test>")
    _, fetcher = build_resolvers(reactor, configured)
    assert isinstance(fetcher._addresses, DnsResolver)


def test_a_given_system_resolver_is_reused_so_reloads_make_no_new_threads() -> None:
    shared = SystemAddressResolver(reactor)
    config = parse_config("", source="<test>")
    first = build_resolvers(reactor, config, shared)[1]
    again = build_resolvers(reactor, config, shared)[1]
    assert first._addresses is shared and again._addresses is shared
