# pytest_twisted has no type information: its decorators are untyped.
# mypy: disable-error-code="untyped-decorator"
"""DnsResolver's record reads for ``check`` (TXT as published, MX) against a
real DNS server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor

from postfix_mtasts.resolver.dns import DnsResolver, RecordLookupError
from tests.support.dns_server import DnsServer
from tests.support.smtp_server import set_mx

reactor: Any = global_reactor

TEST_TIMEOUT = 0.5


@pytest_twisted.async_yield_fixture()
async def server() -> AsyncIterator[DnsServer]:
    dns_server = await DnsServer.start(reactor)
    yield dns_server
    await dns_server.stop()


@pytest.fixture
def resolver(server: DnsServer) -> DnsResolver:
    return DnsResolver([server.nameserver], timeout=TEST_TIMEOUT, reactor=reactor)


@pytest_twisted.ensureDeferred
async def test_txt_records_joins_strings_and_keeps_every_record(
    server: DnsServer, resolver: DnsResolver
) -> None:
    server.set_txt("_smtp._tls.example.com", ["v=TLSRPTv1; ", "rua=mailto:a@example.com"], "other")
    records = await resolver.txt_records("_smtp._tls.example.com")
    assert sorted(records) == [b"other", b"v=TLSRPTv1; rua=mailto:a@example.com"]


@pytest_twisted.ensureDeferred
async def test_txt_records_absent_and_failed_are_told_apart(server: DnsServer, resolver: DnsResolver) -> None:
    with pytest.raises(RecordLookupError) as absent:
        await resolver.txt_records("_smtp._tls.example.com")
    assert absent.value.absent and absent.value.reason == "NXDOMAIN"
    server.set_a("example.com", "127.0.0.1")
    with pytest.raises(RecordLookupError) as nodata:
        await resolver.txt_records("example.com")
    assert nodata.value.absent and nodata.value.reason == "no TXT record"
    server.set_fault("example.com", "servfail")
    with pytest.raises(RecordLookupError) as failed:
        await resolver.txt_records("example.com")
    assert not failed.value.absent


@pytest_twisted.ensureDeferred
async def test_mx_hosts_sorted_by_preference_lower_case(server: DnsServer, resolver: DnsResolver) -> None:
    set_mx(server, "example.com", (20, "MX2.Example.COM."), (10, "mx1.example.com."))
    assert await resolver.mx_hosts("example.com.") == [(10, "mx1.example.com"), (20, "mx2.example.com")]


@pytest_twisted.ensureDeferred
async def test_null_mx_is_an_empty_host(server: DnsServer, resolver: DnsResolver) -> None:
    set_mx(server, "example.com", (0, "."))
    assert await resolver.mx_hosts("example.com") == [(0, "")]


@pytest_twisted.ensureDeferred
async def test_mx_hosts_absent(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_a("example.com", "127.0.0.1")
    with pytest.raises(RecordLookupError) as nodata:
        await resolver.mx_hosts("example.com")
    assert nodata.value.absent and nodata.value.reason == "no MX record"
