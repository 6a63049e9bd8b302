# pytest_twisted has no type information: its decorators are untyped.
# mypy: disable-error-code="untyped-decorator"
"""DnsResolver against a real authoritative DNS server on 127.0.0.1, plus unit
tests of nameserver parsing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred

from postfix_mtasts.resolver import TxtAbsent, TxtFailed, TxtFound
from postfix_mtasts.resolver.dns import (
    AddressLookupError,
    DnsResolver,
    parse_nameserver,
)
from tests.support.dns_server import DnsServer

reactor: Any = global_reactor

#: Short enough that the "drop" fault tests stay quick.
TEST_TIMEOUT = 0.5
STS_NAME = "_mta-sts.example.com"


@pytest_twisted.async_yield_fixture()
async def server() -> AsyncIterator[DnsServer]:
    dns_server = await DnsServer.start(reactor)
    yield dns_server
    await dns_server.stop()


@pytest.fixture
def resolver(server: DnsServer) -> DnsResolver:
    return DnsResolver([server.nameserver], timeout=TEST_TIMEOUT, reactor=global_reactor)


# --- parse_nameserver (unit) --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("192.0.2.1:5353", ("192.0.2.1", 5353)),
        (" 127.0.0.1:53 ", ("127.0.0.1", 53)),
        ("2001:db8::1", ("2001:db8::1", 53)),
        ("2001:DB8:0::1", ("2001:db8::1", 53)),
        ("[2001:db8::1]:5353", ("2001:db8::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("192.0.2.1:65535", ("192.0.2.1", 65535)),
    ],
)
def test_parse_nameserver_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "not an IP address"),
        ("dns.example.com", "not an IP address"),
        ("dns.example.com:53", "not an IP address"),
        ("192.0.2.1:", "port ''"),
        ("192.0.2.1:0", "port '0'"),
        ("192.0.2.1:65536", "port '65536'"),
        ("192.0.2.1:53a", "port '53a'"),
        ("192.0.2.1:٥٣", "port"),
        ("192.0.2.300", "not an IP address"),
        ("[2001:db8::1", "unbalanced brackets"),
        ("[2001:db8::1]5353", "unbalanced brackets"),
        ("[192.0.2.1]:53", "only for IPv6"),
        ("[2001:db8::1]:", "port ''"),
    ],
)
def test_parse_nameserver_rejects_with_a_clear_message(text: str, complaint: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_nameserver(text)
    message = str(raised.value)
    assert complaint in message
    assert repr(text) in message
    assert "\n" not in message


def test_bad_nameserver_in_config_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="invalid nameserver 'localhost'"):
        DnsResolver(["localhost"], reactor=global_reactor)


# --- lookup_sts against the loopback server ------------------------------------


@pytest_twisted.ensureDeferred
async def test_found_record_with_id_and_ttl(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=20240101T000000;", ttl=123)
    result = await resolver.lookup_sts("example.com")
    assert result == TxtFound(policy_id="20240101T000000", ttl=123, record="v=STSv1; id=20240101T000000;")
    assert server.queries == [("_mta-sts.example.com", "TXT")]


@pytest_twisted.ensureDeferred
async def test_multi_string_record_is_joined_without_separator(
    server: DnsServer, resolver: DnsResolver
) -> None:
    server.set_txt(STS_NAME, [b"v=STSv1; ", b"id=split", b"Id42;"])
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFound)
    assert result.policy_id == "splitId42"
    assert result.record == "v=STSv1; id=splitId42;"


@pytest_twisted.ensureDeferred
async def test_cname_is_followed_and_ttl_is_the_chain_minimum(
    server: DnsServer, resolver: DnsResolver
) -> None:
    server.set_cname(STS_NAME, "_mta-sts.provider.example.net", ttl=60)
    server.set_txt("_mta-sts.provider.example.net", b"v=STSv1; id=hosted1;", ttl=3600)
    result = await resolver.lookup_sts("example.com")
    assert result == TxtFound(policy_id="hosted1", ttl=60, record="v=STSv1; id=hosted1;")


@pytest_twisted.ensureDeferred
async def test_cname_to_a_missing_name_is_nxdomain(server: DnsServer, resolver: DnsResolver) -> None:
    server.soa_ttl, server.soa_minimum = 900, 450
    server.set_cname(STS_NAME, "_mta-sts.gone.example.net")
    result = await resolver.lookup_sts("example.com")
    assert result == TxtAbsent("NXDOMAIN", negative_ttl=450)


@pytest_twisted.ensureDeferred
async def test_extension_fields_are_ignored(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=ext1; foo=bar; x-vendor=1")
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFound)
    assert result.policy_id == "ext1"


@pytest_twisted.ensureDeferred
async def test_two_sts_records_mean_no_policy(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=one;", b"v=STSv1; id=two;", ttl=77)
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtAbsent)
    assert result.reason
    assert result.negative_ttl == 77


@pytest_twisted.ensureDeferred
async def test_other_txt_records_alongside_are_ignored(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(
        STS_NAME,
        b"v=spf1 -all",
        b"site-verification=abcdef",
        b"v=STSv1; id=mixed;",
        b"v=STSv10; id=not-this-one;",
    )
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFound)
    assert result.policy_id == "mixed"


@pytest_twisted.ensureDeferred
async def test_only_other_txt_records_mean_no_policy(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=spf1 -all", ttl=500)
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtAbsent)
    assert result.negative_ttl == 500


@pytest_twisted.ensureDeferred
async def test_invalid_id_means_no_policy_with_a_reason(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=not_alnum!;")
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtAbsent)
    assert result.reason


@pytest.mark.parametrize(("soa_ttl", "soa_minimum", "expected"), [(900, 120, 120), (60, 600, 60)])
@pytest_twisted.ensureDeferred
async def test_nxdomain_negative_ttl_from_soa(
    server: DnsServer,
    resolver: DnsResolver,
    soa_ttl: int,
    soa_minimum: int,
    expected: int,
) -> None:
    server.soa_ttl, server.soa_minimum = soa_ttl, soa_minimum
    result = await resolver.lookup_sts("nothing.example")
    assert result == TxtAbsent("NXDOMAIN", negative_ttl=expected)


@pytest_twisted.ensureDeferred
async def test_nodata_negative_ttl_from_soa(server: DnsServer, resolver: DnsResolver) -> None:
    server.soa_ttl, server.soa_minimum = 1800, 240
    server.set_a(STS_NAME, "192.0.2.9")
    result = await resolver.lookup_sts("example.com")
    assert result == TxtAbsent("no TXT record", negative_ttl=240)


@pytest_twisted.ensureDeferred
async def test_removing_only_the_txt_records_leaves_nodata(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=short-lived;")
    server.set_a(STS_NAME, "192.0.2.7")
    server.remove(STS_NAME, "TXT")
    result = await resolver.lookup_sts("example.com")
    assert result == TxtAbsent("no TXT record", negative_ttl=server.soa_minimum)


@pytest_twisted.ensureDeferred
async def test_names_are_case_insensitive(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt("_MTA-STS.Example.COM.", b"v=STSv1; id=case;")
    result = await resolver.lookup_sts("EXAMPLE.com")
    assert isinstance(result, TxtFound)
    assert result.policy_id == "case"


@pytest_twisted.ensureDeferred
async def test_zone_edits_apply_to_the_next_lookup_without_caching(
    server: DnsServer, resolver: DnsResolver
) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=first;")
    first = await resolver.lookup_sts("example.com")
    server.set_txt(STS_NAME, b"v=STSv1; id=second;")
    second = await resolver.lookup_sts("example.com")
    server.remove(STS_NAME)
    third = await resolver.lookup_sts("example.com")
    assert isinstance(first, TxtFound) and first.policy_id == "first"
    assert isinstance(second, TxtFound) and second.policy_id == "second"
    assert isinstance(third, TxtAbsent) and third.reason == "NXDOMAIN"
    assert server.count(STS_NAME, "TXT") == 3


@pytest_twisted.ensureDeferred
async def test_servfail_is_a_failure_naming_the_server(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=hidden;")
    server.set_fault(STS_NAME, "servfail")
    result = await resolver.lookup_sts("example.com")
    assert result == TxtFailed(f"SERVFAIL from 127.0.0.1:{server.port}")


@pytest_twisted.ensureDeferred
async def test_refused_is_a_failure(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_fault(STS_NAME, "refused")
    result = await resolver.lookup_sts("example.com")
    assert result == TxtFailed(f"REFUSED from 127.0.0.1:{server.port}")


@pytest_twisted.ensureDeferred
async def test_silence_is_a_timeout_failure(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=hidden;")
    server.set_fault(STS_NAME, "drop")
    result = await resolver.lookup_sts("example.com")
    assert result == TxtFailed(f"DNS timeout after {TEST_TIMEOUT}s")
    assert server.count(STS_NAME) >= 1


@pytest_twisted.ensureDeferred
async def test_healed_fault_answers_again(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=back;")
    server.set_fault(STS_NAME, "servfail")
    assert isinstance(await resolver.lookup_sts("example.com"), TxtFailed)
    server.set_fault(STS_NAME, None)
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFound) and result.policy_id == "back"


@pytest_twisted.ensureDeferred
async def test_forced_truncation_is_retried_over_tcp(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=overtcp;")
    server.set_fault(STS_NAME, "truncate")
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFound) and result.policy_id == "overtcp"
    # One question over UDP (truncated), the same again over TCP.
    assert server.queries == [("_mta-sts.example.com", "TXT")] * 2


@pytest_twisted.ensureDeferred
async def test_answer_too_big_for_udp_comes_over_tcp(server: DnsServer, resolver: DnsResolver) -> None:
    filler = [b"x" * 200 for _ in range(10)]
    server.set_txt(STS_NAME, b"v=STSv1; id=big;", *[[f"{n}".encode(), *filler] for n in range(2)])
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFound) and result.policy_id == "big"
    assert server.count(STS_NAME, "TXT") == 2


@pytest_twisted.ensureDeferred
async def test_edns_carries_an_answer_over_512_bytes_on_udp(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt(STS_NAME, b"v=STSv1; id=edns;", [b"y" * 250, b"y" * 250, b"y" * 250])
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFound) and result.policy_id == "edns"
    assert server.count(STS_NAME, "TXT") == 1


@pytest_twisted.ensureDeferred
async def test_second_nameserver_answers_when_the_first_fails(
    server: DnsServer,
) -> None:
    backup = await DnsServer.start(reactor)
    try:
        server.set_fault(STS_NAME, "servfail")
        backup.set_txt(STS_NAME, b"v=STSv1; id=backup;")
        resolver = DnsResolver(
            [server.nameserver, backup.nameserver], timeout=TEST_TIMEOUT, reactor=global_reactor
        )
        result = await resolver.lookup_sts("example.com")
    finally:
        await backup.stop()
    assert isinstance(result, TxtFound) and result.policy_id == "backup"
    assert server.count(STS_NAME) == 1
    assert backup.count(STS_NAME) == 1


@pytest_twisted.ensureDeferred
async def test_nameserver_not_listening_is_a_failure() -> None:
    gone = await DnsServer.start(reactor)
    await gone.stop()
    resolver = DnsResolver([gone.nameserver], timeout=TEST_TIMEOUT, reactor=global_reactor)
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFailed)
    assert "\n" not in result.reason


@pytest_twisted.ensureDeferred
async def test_no_nameservers_configured_is_a_failure(tmp_path: Path) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("# no nameserver lines\nsearch example.com\n")
    resolver = DnsResolver(timeout=TEST_TIMEOUT, resolv_conf=str(resolv_conf), reactor=global_reactor)
    result = await resolver.lookup_sts("example.com")
    assert isinstance(result, TxtFailed)
    assert result.reason.startswith("no DNS nameservers configured")


def test_system_configuration_is_read_from_resolv_conf(tmp_path: Path) -> None:
    # resolv.conf has no port syntax and nothing may listen on port 53 here,
    # so this only checks which servers the resolver would ask.
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.1\nnameserver ::1\n")
    resolver = DnsResolver(timeout=TEST_TIMEOUT, resolv_conf=str(resolv_conf), reactor=global_reactor)
    assert [str(ns) for ns in resolver._resolver.nameservers] == ["127.0.0.1", "::1"]


@pytest_twisted.ensureDeferred
async def test_invalid_domain_is_absent(resolver: DnsResolver, server: DnsServer) -> None:
    result = await resolver.lookup_sts("a" * 64 + ".example")
    assert isinstance(result, TxtAbsent)
    assert "invalid domain name" in result.reason
    assert server.queries == []


@pytest_twisted.ensureDeferred
async def test_cancelling_a_lookup_cancels_the_query(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_fault(STS_NAME, "drop")
    lookup = Deferred.fromCoroutine(resolver.lookup_sts("example.com"))
    while not server.queries:
        await _next_turn()
    lookup.cancel()
    with pytest.raises(CancelledError):
        await lookup


async def _next_turn() -> None:
    turn: Deferred[None] = Deferred()
    reactor.callLater(0.01, turn.callback, None)
    await turn


# --- addresses ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_addresses_ipv4_first_then_ipv6(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_aaaa("mta-sts.example.com", "2001:db8::25")
    server.set_a("mta-sts.example.com", "192.0.2.25", "192.0.2.26")
    found = await resolver.addresses("mta-sts.example.com")
    assert found[:2] in (["192.0.2.25", "192.0.2.26"], ["192.0.2.26", "192.0.2.25"])
    assert found[2:] == ["2001:db8::25"]
    assert sorted(server.queries) == [
        ("mta-sts.example.com", "A"),
        ("mta-sts.example.com", "AAAA"),
    ]


@pytest_twisted.ensureDeferred
async def test_addresses_only_ipv6_or_only_ipv4(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_aaaa("v6.example.com", "2001:db8::1")
    server.set_a("v4.example.com", "192.0.2.4")
    assert await resolver.addresses("v6.example.com") == ["2001:db8::1"]
    assert await resolver.addresses("v4.example.com.") == ["192.0.2.4"]


@pytest_twisted.ensureDeferred
async def test_addresses_follow_cname(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_cname("mta-sts.example.com", "sts.hoster.example.net")
    server.set_a("sts.hoster.example.net", "192.0.2.80")
    assert await resolver.addresses("mta-sts.example.com") == ["192.0.2.80"]


@pytest_twisted.ensureDeferred
async def test_addresses_nxdomain_raises(server: DnsServer, resolver: DnsResolver) -> None:
    with pytest.raises(AddressLookupError) as raised:
        await resolver.addresses("mta-sts.nowhere.example")
    assert raised.value.reason == "NXDOMAIN"


@pytest_twisted.ensureDeferred
async def test_addresses_nodata_raises(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_txt("mta-sts.example.com", b"not an address")
    with pytest.raises(AddressLookupError) as raised:
        await resolver.addresses("mta-sts.example.com")
    assert raised.value.reason == "no A or AAAA record"


@pytest_twisted.ensureDeferred
async def test_addresses_servfail_raises_naming_it(server: DnsServer, resolver: DnsResolver) -> None:
    server.set_a("mta-sts.example.com", "192.0.2.1")
    server.set_fault("mta-sts.example.com", "servfail")
    with pytest.raises(AddressLookupError) as raised:
        await resolver.addresses("mta-sts.example.com")
    where = f"127.0.0.1:{server.port}"
    assert raised.value.reason == (f"A: SERVFAIL from {where}; AAAA: SERVFAIL from {where}")


# --- the test server itself -----------------------------------------------------


def test_server_rejects_unknown_fault() -> None:
    with pytest.raises(ValueError, match="unknown fault 'slow'"):
        DnsServer().set_fault("example.com", "slow")
