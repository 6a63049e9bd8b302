"""DANE precedence over MTA-STS.

Unit tests (a Clock, a scripted check) prove the precedence rules and the
TTL cache; the rest run against a real validating resolver: Debian's unbound
on 127.0.0.1 with a zone signed at test time (tests/support/unbound.py), and
a real PolicyLookup + Responder + protocols with scripted MTA-STS discovery.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from postfix_mtasts.cache.memory import MemoryStore
from postfix_mtasts.codec import socketmap, tcptable
from postfix_mtasts.config import PolicyConfig, Profile
from postfix_mtasts.lookup import LookupSettings, PolicyLookup
from postfix_mtasts.policy.model import Answer
from postfix_mtasts.policy.policyfile import parse_policy
from postfix_mtasts.protocol import SocketmapProtocol, TcpTableProtocol
from postfix_mtasts.resolver import FetchOK, TxtAbsent
from postfix_mtasts.resolver.dane import (
    DANE_FAILURE_RETRY,
    DaneCache,
    DaneResolver,
    DaneResult,
    DaneStatus,
    dane_precedence,
)
from postfix_mtasts.responder import Responder
from tests.conftest import require
from tests.fakes import FakeFetcher, FakeTxtResolver, opened, result_of, run
from tests.support import unbound
from tests.support.daemon import ensure_deferred

T0 = 1_700_000_000.0
STS = Answer.ok("secure match=mx1.all.dane.test servername=hostname")
ZONE = "dane.test"
HASH_A = "a" * 64
HASH_B = "b" * 64
HASH_C = "c" * 64
RECORDS = [
    # Every MX host has usable TLSA (DANE-EE, DANE-TA); one RRset has a short TTL.
    "all IN MX 10 mx1.all",
    "all IN MX 20 mx2.all",
    f"_25._tcp.mx1.all 120 IN TLSA 3 1 1 {HASH_A}",
    f"_25._tcp.mx2.all IN TLSA 2 0 1 {HASH_B}",
    # One of two MX hosts has TLSA.
    "some IN MX 10 mx1.some",
    "some IN MX 20 mx2.some",
    f"_25._tcp.mx1.some IN TLSA 3 1 1 {HASH_A}",
    # Signed, but no TLSA at all; and only unusable (PKIX-EE) TLSA.
    "notlsa IN MX 10 mx.notlsa",
    "pkix IN MX 10 mx.pkix",
    f"_25._tcp.mx.pkix IN TLSA 1 1 1 {HASH_A}",
    # A TLSA record changed after signing: bogus.
    "bogus IN MX 10 mx.bogus",
    f"_25._tcp.mx.bogus IN TLSA 3 1 1 {HASH_C}",
]
TAMPER = ((HASH_C, "d" * 64),)
#: A zone outside the trust anchor: its answers never carry the AD bit.
PLAIN = unbound.SignedZone("plain.test", ["all IN MX 10 mx.all", f"_25._tcp.mx.all IN TLSA 3 1 1 {HASH_A}"])


# --- precedence and cache, no DNS ------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (DaneStatus.ALL, Answer.ok("dane-only")),
        (DaneStatus.SOME, Answer.ok("dane")),
        (DaneStatus.NONE, STS),
        (DaneStatus.BOGUS, Answer.temp("DANE check failed: why")),
        (DaneStatus.FAILED, Answer.temp("DANE check failed: why")),
    ],
)
def test_precedence(status: DaneStatus, expected: Answer) -> None:
    assert dane_precedence(STS, DaneResult(status, "why", 60)) == expected
    # Only an MTA-STS answer is ever replaced.
    assert dane_precedence(Answer.notfound("none"), DaneResult(status, "why", 60)) == Answer.notfound("none")


def test_cache_keeps_a_result_for_its_ttl_and_shares_one_check() -> None:
    clock = Clock()
    clock.advance(T0)
    pending: list[Deferred[DaneResult]] = []
    calls: Counter[str] = Counter()

    async def check(domain: str) -> DaneResult:
        calls[domain] += 1
        d: Deferred[DaneResult] = Deferred()
        pending.append(d)
        return await d

    cache = DaneCache(clock, check)
    first, second = run(cache.get("a.example")), run(cache.get("a.example"))
    assert calls["a.example"] == 1 and cache.cached("a.example") is None
    pending[0].callback(DaneResult(DaneStatus.ALL, "ok", 120))
    assert result_of(first) == result_of(second) == DaneResult(DaneStatus.ALL, "ok", 120)
    clock.advance(119.9)
    assert cache.cached("a.example") == DaneResult(DaneStatus.ALL, "ok", 120)
    clock.advance(0.1)
    assert cache.cached("a.example") is None
    run(cache.get("a.example"))
    assert calls["a.example"] == 2


def test_cache_answers_failed_for_an_unexpected_error(caplog: pytest.LogCaptureFixture) -> None:
    async def check(domain: str) -> DaneResult:
        raise RuntimeError("boom")

    cache = DaneCache(Clock(), check)
    with caplog.at_level(logging.ERROR, logger="postfix_mtasts.dane"):
        result = result_of(run(cache.get("a.example")))
    assert (result.status, result.ttl) == (DaneStatus.FAILED, DANE_FAILURE_RETRY)
    assert "DANE check failed unexpectedly" in caplog.text


def test_resolver_needs_a_nameserver() -> None:
    with pytest.raises(ValueError, match="DNSSEC-validating resolver"):
        DaneResolver([], reactor=global_reactor)


# --- a real validating resolver ----------------------------------------------------


@pytest.fixture(scope="module")
def validating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[unbound.ValidatingResolver]:
    require("unbound and ldns-signzone (Debian: unbound, ldnsutils)", unbound.available())
    directory = Path(tmp_path_factory.mktemp("unbound"))
    zone = unbound.SignedZone(ZONE, RECORDS)
    server = unbound.ValidatingResolver(directory, zone, tamper=TAMPER, unsigned=(PLAIN,))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("name", "status", "ttl"),
    [
        ("all", DaneStatus.ALL, 120.0),
        ("some", DaneStatus.SOME, 300.0),
        ("notlsa", DaneStatus.NONE, 300.0),
        ("pkix", DaneStatus.NONE, 300.0),
        ("bogus", DaneStatus.BOGUS, DANE_FAILURE_RETRY),
        ("absent", DaneStatus.NONE, 300.0),
    ],
)
@ensure_deferred
async def test_resolver_reads_what_dnssec_proves(
    validating: unbound.ValidatingResolver, name: str, status: DaneStatus, ttl: float
) -> None:
    resolver = DaneResolver([validating.nameserver], timeout=5, reactor=global_reactor)
    result = await resolver.check(f"{name}.{ZONE}")
    assert (result.status, result.ttl) == (status, ttl), result.reason


@ensure_deferred
async def test_resolver_reasons_name_hosts_and_failures(validating: unbound.ValidatingResolver) -> None:
    resolver = DaneResolver([validating.nameserver], timeout=5, reactor=global_reactor)
    some = await resolver.check(f"some.{ZONE}")
    assert some.reason == f"usable TLSA for mx1.some.{ZONE} only"
    bogus = await resolver.check(f"bogus.{ZONE}")
    assert bogus.reason == (
        f"TLSA _25._tcp.mx.bogus.{ZONE}: SERVFAIL from the validating resolver (DNSSEC bogus?)"
    )


@ensure_deferred
async def test_no_answer_is_a_failure_not_no_dane(validating: unbound.ValidatingResolver) -> None:
    """Nothing answers on this port: no answer at all is a failure, not 'no DANE'."""
    from tests.support.daemon import free_port

    resolver = DaneResolver([f"127.0.0.1:{free_port()}"], timeout=0.5, reactor=global_reactor)
    result = await resolver.check(f"all.{ZONE}")
    assert result.status is DaneStatus.FAILED and "timeout" in result.reason


@ensure_deferred
async def test_tlsa_without_dnssec_is_not_dane(validating: unbound.ValidatingResolver) -> None:
    resolver = DaneResolver([validating.nameserver], timeout=5, reactor=global_reactor)
    result = await resolver.check("all.plain.test")
    assert (result.status, result.reason) == (DaneStatus.NONE, "MX of all.plain.test not DNSSEC-validated")


# --- end to end: lookup, responder and protocols --------------------------------------


class CountingResolver:
    """The real resolver, counting which domains it was asked about."""

    def __init__(self, inner: DaneResolver) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    async def check(self, domain: str) -> DaneResult:
        self.calls[domain] += 1
        return await self.inner.check(domain)


def _policy(domain: str) -> str:
    return f"version: STSv1\nmode: enforce\nmx: *.{domain}\nmax_age: 86400\n"


Rig = tuple[Responder, CountingResolver, FakeTxtResolver]


@pytest.fixture
def rig(validating: unbound.ValidatingResolver) -> Iterator[Rig]:
    dns = FakeTxtResolver()
    https = FakeFetcher()
    for name in ("all", "some", "notlsa", "bogus"):
        domain = f"{name}.{ZONE}"
        dns.set_id(domain, "1")
        body = _policy(domain)
        https.set(domain, FetchOK(policy=parse_policy(body.encode()), text=body))
    dns.set(f"nosts.{ZONE}", TxtAbsent("no record"))
    counting = CountingResolver(DaneResolver([validating.nameserver], timeout=5, reactor=global_reactor))
    lookup = PolicyLookup(
        global_reactor, dns, https, opened(MemoryStore()),
        LookupSettings(PolicyConfig(recheck_interval=10.0**9)),
        dane=DaneCache(global_reactor, counting.check),
    )
    profiles = {"postfix": Profile(), "dane": Profile(dane=True), "danerpt": Profile(dane=True, tlsrpt=True)}
    yield Responder(lookup, profiles), counting, dns


async def _socketmap(responder: Responder, profile: str, domain: str) -> tuple[str, str]:
    protocol = SocketmapProtocol(responder, clock=global_reactor)
    transport = _transport(protocol)
    protocol.dataReceived(socketmap.encode_request(profile, domain.encode()))
    reply: tuple[str, str] = (await _replies(transport, socketmap.SocketmapReplyDecoder().feed))[0]
    return reply


async def _tcp_table(responder: Responder, profile: str, domain: str) -> tuple[int, str]:
    protocol = TcpTableProtocol(responder, profile=profile, clock=global_reactor)
    transport = _transport(protocol)
    protocol.dataReceived(tcptable.encode_request(domain.encode()))
    reply: tuple[int, str] = (await _replies(transport, tcptable.TcpTableReplyDecoder().feed))[0]
    return reply


def _transport(protocol: Any) -> StringTransport:
    transport = StringTransport()  # type: ignore[no-untyped-call]
    protocol.makeConnection(transport)
    return transport


async def _replies(transport: StringTransport, decode: Any) -> list[Any]:
    from twisted.internet.task import deferLater

    for _ in range(200):  # the DANE check runs on the real reactor: wait for the reply
        data = transport.value()  # type: ignore[no-untyped-call]
        if data:
            replies: list[Any] = decode(data)
            return replies
        await deferLater(global_reactor, 0.05)
    raise AssertionError("no reply within 10 s")


@ensure_deferred
async def test_dane_takes_precedence_end_to_end(rig: Rig) -> None:
    responder, counting, _ = rig
    assert await _socketmap(responder, "dane", f"all.{ZONE}") == ("OK", "dane-only")
    assert await _tcp_table(responder, "dane", f"some.{ZONE}") == (200, "dane")
    assert await _socketmap(responder, "dane", f"notlsa.{ZONE}") == (
        "OK", f"secure match=.notlsa.{ZONE} servername=hostname"
    )
    assert await _socketmap(responder, "dane", f"bogus.{ZONE}") == (
        "TEMP", f"DANE check failed: TLSA _25._tcp.mx.bogus.{ZONE}: SERVFAIL from the validating resolver "
        "(DNSSEC bogus?)"
    )
    # TLSRPT attributes belong to MTA-STS answers only: a DANE answer has none.
    assert await _socketmap(responder, "danerpt", f"all.{ZONE}") == ("OK", "dane-only")
    assert (await _socketmap(responder, "danerpt", f"notlsa.{ZONE}"))[1].startswith(
        f"secure match=.notlsa.{ZONE} servername=hostname policy_type=sts policy_domain=notlsa.{ZONE}"
    )
    # A profile without dane never asks, and keeps the MTA-STS answer.
    assert await _socketmap(responder, "postfix", f"all.{ZONE}") == (
        "OK", f"secure match=.all.{ZONE} servername=hostname"
    )
    # One DANE check per domain; later answers (both dane profiles) from memory.
    assert counting.calls == Counter({f"{name}.{ZONE}": 1 for name in ("all", "some", "notlsa", "bogus")})
    assert responder.respond("dane", f"all.{ZONE}".encode()) == Answer.ok("dane-only")


@ensure_deferred
async def test_no_dane_queries_for_domains_without_mta_sts(rig: Rig) -> None:
    responder, counting, _ = rig
    assert await _socketmap(responder, "dane", f"nosts.{ZONE}") == ("NOTFOUND", "")
    assert counting.calls == Counter()


def test_service_wires_the_configured_validating_resolver() -> None:
    from postfix_mtasts.config import parse_config
    from postfix_mtasts.service import build_lookup

    config = parse_config('[profiles.strict]\ndane = true\n[dane]\nnameservers = ["127.0.0.1:8053"]\n')
    assert isinstance(build_lookup(global_reactor, config, MemoryStore()).dane, DaneCache)
    assert build_lookup(global_reactor, parse_config(""), MemoryStore()).dane is None
