"""MTA-STS discovery end to end: a real in-process daemon answers over
real sockets, from a loopback DNS server and a hostile loopback policy host.

Every rule has a test that fails if the rule breaks: the answer strings, the
key forms Postfix sends, the TXT record rules, each way a policy host can
misbehave, and the protocol behaviour under pipelining, abuse and load.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from postfix_mtasts.cache import Source
from postfix_mtasts.codec import socketmap as socketmap_codec
from postfix_mtasts.limits import SOCKETMAP_MAX_REQUEST
from tests.support.daemon import async_yield_fixture, ensure_deferred
from tests.support.https_server import (
    Behaviour,
    CertKind,
    Drip,
    Hang,
    Oversized,
    Redirect,
    Serve,
)
from tests.support.world import (
    RawConnection,
    RunningDaemon,
    World,
    socketmap_query,
    start_daemon,
    tcp_table_query,
)

pytestmark = pytest.mark.integration

#: A profile (socketmap NAME) that treats testing policies as enforced.
STRICT_PROFILE = "strict"
POLICY_MX = ("mx2.example.com", "*.backup.example.com", "mx1.example.com")
SECURE = "secure match=.backup.example.com:mx1.example.com:mx2.example.com servername=hostname"
#: Concurrent client connections in the load test.
CONNECTIONS = 100


@async_yield_fixture
async def world() -> AsyncIterator[World]:
    started = await World.start(reactor)
    yield started
    await started.stop()


@async_yield_fixture
async def daemon(world: World) -> AsyncIterator[RunningDaemon]:
    running = await start_daemon(
        reactor, world.config(profiles={STRICT_PROFILE: {"enforce_testing": True}})
    )
    yield running
    await running.stop()


@pytest.fixture
def daemon_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="postfix_mtasts")
    return caplog


async def ask(daemon: RunningDaemon, key: bytes | str, name: str = "postfix") -> tuple[str, str]:
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return await socketmap_query(daemon.socketmap_port, name, raw)


def publish(world: World, domain: str, mode: str = "enforce", policy_id: str = "id1") -> None:
    world.publish(domain, World.policy_text(mode=mode, mx=POLICY_MX), policy_id)


# --- answers -------------------------------------------------------------------


@ensure_deferred
async def test_enforce_answers_secure_with_sorted_patterns_and_servername(
    world: World, daemon: RunningDaemon
) -> None:
    publish(world, "example.com")
    assert await ask(daemon, "example.com") == ("OK", SECURE)


@ensure_deferred
async def test_testing_is_not_found_except_under_an_enforce_testing_profile(
    world: World, daemon: RunningDaemon
) -> None:
    publish(world, "testing.example", mode="testing")
    assert await ask(daemon, "testing.example") == ("NOTFOUND", "")
    assert await ask(daemon, "testing.example", STRICT_PROFILE) == ("OK", SECURE)


@ensure_deferred
async def test_mode_none_is_not_found_under_every_profile(world: World, daemon: RunningDaemon) -> None:
    publish(world, "none.example", mode="none")
    assert await ask(daemon, "none.example") == ("NOTFOUND", "")
    assert await ask(daemon, "none.example", STRICT_PROFILE) == ("NOTFOUND", "")
    assert world.https.requests["mta-sts.none.example"] == 1


@ensure_deferred
async def test_unknown_socketmap_name_is_perm_naming_it(world: World, daemon: RunningDaemon) -> None:
    publish(world, "example.com")
    status, reason = await ask(daemon, "example.com", "nosuchmap")
    assert status == "PERM"
    assert "nosuchmap" in reason and "postfix" in reason
    assert world.dns.queries == []


# --- keys ----------------------------------------------------------------------


@ensure_deferred
async def test_key_in_upper_case_with_trailing_dot_is_the_same_domain(
    world: World, daemon: RunningDaemon
) -> None:
    publish(world, "example.com")
    assert await ask(daemon, "EXAMPLE.COM.") == ("OK", SECURE)
    assert world.dns.count("_mta-sts.example.com", "TXT") == 1


@pytest.mark.parametrize(
    "key",
    [
        b".example.com",
        b"192.0.2.1",
        b"[192.0.2.1]",
        b"[192.0.2.1]:25",
        b"[ipv6:2001:db8::1]",
        b"2001:db8::1",
        b"\xff\xfeexample.com",
        b"exa\xc3mple.com",
    ],
    ids=["parent-probe", "ipv4", "bracketed-ipv4", "bracketed-ipv4-port", "ipv6-literal",
         "bare-ipv6", "invalid-utf8", "truncated-utf8"],
)
@ensure_deferred
async def test_keys_without_a_policy_domain_are_not_found_without_dns(
    world: World, daemon: RunningDaemon, key: bytes
) -> None:
    publish(world, "example.com")
    assert await ask(daemon, key) == ("NOTFOUND", "")
    assert world.dns.queries == []
    assert sum(world.https.requests.values()) == 0


@ensure_deferred
async def test_bracketed_next_hop_is_ignored_by_default(world: World, daemon: RunningDaemon) -> None:
    publish(world, "relay.example.net")
    assert await ask(daemon, "[relay.example.net]") == ("NOTFOUND", "")
    assert await ask(daemon, "[relay.example.net]:587") == ("NOTFOUND", "")
    assert world.dns.queries == []
    # The same name unbracketed (MX lookups happen) is a policy domain.
    assert await ask(daemon, "relay.example.net:587") == ("OK", SECURE)


@ensure_deferred
async def test_bracketed_next_hop_is_a_policy_domain_in_host_mode(world: World) -> None:
    publish(world, "relay.example.net")
    running = await start_daemon(reactor, world.config(policy={"bracketed_next_hop": "host"}))
    try:
        assert await socketmap_query(running.socketmap_port, "postfix", b"[relay.example.net]") == (
            "OK",
            SECURE,
        )
        assert await socketmap_query(running.socketmap_port, "postfix", b"[Relay.Example.Net]:587") == (
            "OK",
            SECURE,
        )
        assert world.dns.count("_mta-sts.relay.example.net", "TXT") == 1
    finally:
        await running.stop()


@ensure_deferred
async def test_u_label_key_resolves_the_a_label_domain(world: World, daemon: RunningDaemon) -> None:
    publish(world, "xn--bcher-kva.example")
    assert await ask(daemon, "bücher.example") == ("OK", SECURE)
    assert await ask(daemon, "BÜCHER.example.") == ("OK", SECURE)
    assert world.dns.count("_mta-sts.xn--bcher-kva.example", "TXT") == 1
    assert world.https.requests["mta-sts.xn--bcher-kva.example"] == 1


# --- the TXT record ------------------------------------------------------------


@ensure_deferred
async def test_txt_record_behind_a_cname_is_followed(world: World, daemon: RunningDaemon) -> None:
    publish(world, "alias.example")
    world.dns.remove("_mta-sts.alias.example")
    world.dns.set_cname("_mta-sts.alias.example", "_mta-sts.provider.example")
    world.dns.set_txt("_mta-sts.provider.example", "v=STSv1; id=viacname;")
    assert await ask(daemon, "alias.example") == ("OK", SECURE)


@ensure_deferred
async def test_txt_record_of_several_strings_is_joined(world: World, daemon: RunningDaemon) -> None:
    publish(world, "split.example")
    # Neither string alone is a valid record; only their concatenation is.
    world.dns.set_txt("_mta-sts.split.example", ("v=STSv1; i", "d=joined1;"))
    assert await ask(daemon, "split.example") == ("OK", SECURE)


@ensure_deferred
async def test_two_sts_records_mean_no_policy(world: World, daemon: RunningDaemon) -> None:
    publish(world, "twice.example")
    world.dns.set_txt("_mta-sts.twice.example", "v=STSv1; id=one;", "v=STSv1; id=two;")
    assert await ask(daemon, "twice.example") == ("NOTFOUND", "")
    assert world.https.requests["mta-sts.twice.example"] == 0


@pytest.mark.parametrize(
    "record",
    ["v=STSv1; id=not-alnum;", "v=STSv1; id=" + "a" * 33 + ";", "v=STSv1;", "v=STSv2; id=abc;"],
    ids=["punctuation", "too-long", "missing", "wrong-version"],
)
@ensure_deferred
async def test_txt_record_with_a_bad_id_means_no_policy(
    world: World, daemon: RunningDaemon, record: str
) -> None:
    publish(world, "badid.example")
    world.dns.set_txt("_mta-sts.badid.example", record)
    assert await ask(daemon, "badid.example") == ("NOTFOUND", "")
    assert world.https.requests["mta-sts.badid.example"] == 0


@ensure_deferred
async def test_txt_extension_fields_are_ignored(world: World, daemon: RunningDaemon) -> None:
    publish(world, "ext.example")
    world.dns.set_txt("_mta-sts.ext.example", "v=STSv1; id=ext1; ext-field=some.value; x=1")
    assert await ask(daemon, "ext.example") == ("OK", SECURE)


# --- hostile policy hosts --------------------------------------------------------

GOOD_POLICY = World.policy_text(mx=POLICY_MX).encode("ascii")

HOSTILE: dict[str, tuple[Behaviour, CertKind, str]] = {
    "redirect": (
        Redirect("https://mta-sts.elsewhere.example/.well-known/mta-sts.txt"),
        CertKind.GOOD,
        "redirect",
    ),
    "wrong-name-certificate": (Serve(GOOD_POLICY), CertKind.WRONG_NAME, "certificate not valid for"),
    "cn-only-certificate": (Serve(GOOD_POLICY), CertKind.CN_ONLY, "certificate not valid for"),
    "expired-certificate": (Serve(GOOD_POLICY), CertKind.EXPIRED, "expired"),
    "untrusted-ca": (Serve(GOOD_POLICY), CertKind.UNTRUSTED, "not trusted"),
    "oversized-body": (Oversized(), CertKind.GOOD, "over 65536 bytes"),
    "slow-drip": (Drip(GOOD_POLICY, interval=0.5), CertKind.GOOD, "no answer within"),
    "hang": (Hang(), CertKind.GOOD, "no answer within"),
    "wrong-media-type": (Serve(GOOD_POLICY, content_type="text/html"), CertKind.GOOD, "text/html"),
    "status-404": (Serve(GOOD_POLICY, status=404), CertKind.GOOD, "404"),
    "invalid-policy": (
        Serve(b"version: STSv2\r\nmode: enforce\r\nmx: mx1.example.com\r\nmax_age: 86400\r\n"),
        CertKind.GOOD,
        "invalid policy",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@ensure_deferred
async def test_hostile_policy_host_gives_not_found_caches_no_policy_and_logs_why(
    world: World, daemon: RunningDaemon, daemon_log: pytest.LogCaptureFixture, case: str
) -> None:
    behaviour, certificate, reason = HOSTILE[case]
    publish(world, "hostile.example")
    world.https.set_host("mta-sts.hostile.example", behaviour, certificate=certificate)

    assert await ask(daemon, "hostile.example") == ("NOTFOUND", "")

    store: Any = daemon.daemon.store
    stored = await store.get("hostile.example")
    assert stored is None or stored.source is not Source.FETCHED
    front_entry = daemon.daemon.lookup.front.peek("hostile.example") if daemon.daemon.lookup else None
    assert front_entry is None or front_entry.policy is None
    lines = [
        record.getMessage()
        for record in daemon_log.records
        if record.name.startswith("postfix_mtasts") and "hostile.example" in record.getMessage()
    ]
    assert any("fetch failed" in line and reason in line for line in lines), lines


# --- tcp_table -------------------------------------------------------------------


@ensure_deferred
async def test_tcp_table_answers_200_and_500(world: World, daemon: RunningDaemon) -> None:
    publish(world, "example.com")
    assert await tcp_table_query(daemon.tcp_table_port, b"example.com") == (200, SECURE)
    code, _ = await tcp_table_query(daemon.tcp_table_port, b"nothing-published.example")
    assert code == 500


@ensure_deferred
async def test_tcp_table_reply_and_key_are_percent_encoded_on_the_wire(
    world: World, daemon: RunningDaemon
) -> None:
    publish(world, "example.com")
    connection = await RawConnection.open(daemon.tcp_table_port)
    try:
        # "%2E" is a dot, as Postfix may quote it; the reply's spaces must be %20.
        connection.send(b"get example%2Ecom\n")
        await connection.tcp_table_replies(1)
    finally:
        connection.close()
    assert connection.received == b"200 " + SECURE.replace(" ", "%20").encode("ascii") + b"\n"


# --- the socketmap protocol --------------------------------------------------------


@ensure_deferred
async def test_pipelined_requests_are_answered_in_order(world: World, daemon: RunningDaemon) -> None:
    publish(world, "slow.example")
    publish(world, "testing.example", mode="testing")
    world.https.set_host("mta-sts.slow.example", Drip(GOOD_POLICY, interval=0.005))
    connection = await RawConnection.open(daemon.socketmap_port)
    try:
        # The first needs discovery and a slow fetch; the others are answered
        # at once, so only ordering keeps the replies in request order.
        connection.send(
            socketmap_codec.encode_request("postfix", b"slow.example")
            + socketmap_codec.encode_request("postfix", b"[192.0.2.1]")
            + socketmap_codec.encode_request("nosuchmap", b"slow.example")
            + socketmap_codec.encode_request(STRICT_PROFILE, b"testing.example")
        )
        replies = await connection.socketmap_replies(4)
    finally:
        connection.close()
    assert [status for status, _ in replies] == ["OK", "NOTFOUND", "PERM", "OK"]
    assert replies[0] == ("OK", SECURE)
    assert replies[3] == ("OK", SECURE)


@ensure_deferred
async def test_malformed_netstring_closes_only_that_connection(
    world: World, daemon: RunningDaemon
) -> None:
    publish(world, "example.com")
    bad = await RawConnection.open(daemon.socketmap_port)
    good = await RawConnection.open(daemon.socketmap_port)
    try:
        bad.send(b"12:postfix example.com;")  # ';' where the netstring needs ','
        await bad.closed()
        assert bad.received == b""
        good.send(socketmap_codec.encode_request("postfix", b"example.com"))
        assert await good.socketmap_replies(1) == [("OK", SECURE)]
        assert not good.is_closed
    finally:
        good.close()
        bad.close()


@ensure_deferred
async def test_request_over_the_size_limit_closes_the_connection(
    world: World, daemon: RunningDaemon
) -> None:
    connection = await RawConnection.open(daemon.socketmap_port)
    try:
        key = b"a" * (SOCKETMAP_MAX_REQUEST - len(b"postfix "))
        # Exactly at the limit still works; one byte more closes the connection.
        connection.send(socketmap_codec.encode_request("postfix", key))
        assert await connection.socketmap_replies(1) == [("NOTFOUND", "")]
        connection.send(socketmap_codec.encode_request("postfix", key + b"a"))
        await connection.closed()
        assert connection.received == socketmap_codec.encode_reply("NOTFOUND")
    finally:
        connection.close()
    assert world.dns.queries == []


@ensure_deferred
async def test_hundred_concurrent_connections_each_get_the_right_answer(
    world: World, daemon: RunningDaemon
) -> None:
    domains = [f"d{index}.example" for index in range(5)]
    expected: dict[str, tuple[str, str]] = {}
    for index, domain in enumerate(domains):
        mx = (f"mx.{domain}",)
        world.publish(domain, World.policy_text(mode="enforce", mx=mx), f"id{index}")
        expected[domain] = ("OK", f"secure match=mx.{domain} servername=hostname")
    expected["absent.example"] = ("NOTFOUND", "")
    expected["[192.0.2.7]"] = ("NOTFOUND", "")
    keys = [list(expected)[index % len(expected)] for index in range(CONNECTIONS)]

    connections = await gatherResults(
        [Deferred.fromCoroutine(RawConnection.open(daemon.socketmap_port)) for _ in keys]
    )
    try:
        for connection, key in zip(connections, keys, strict=True):
            connection.send(socketmap_codec.encode_request("postfix", key.encode("ascii")))
        replies = await gatherResults(
            [Deferred.fromCoroutine(connection.socketmap_replies(1)) for connection in connections]
        )
    finally:
        for connection in connections:
            connection.close()
    assert [reply[0] if reply else None for reply in replies] == [expected[key] for key in keys]
    for domain in domains:
        assert world.https.requests[f"mta-sts.{domain}"] == 1

