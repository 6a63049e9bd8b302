"""TLS to the policy host and its verdicts (resolver/https/tls.py), against a hostile
policy host on 127.0.0.1: the classical key exchange, certificate problems as
WebPKI failures with their reasons, verdicts kept apart between concurrent
fetches, the trust root, the CA file, and handshakes refused (plain HTTP, TLS 1.1)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchOK, FetchProblem
from postfix_mtasts.resolver.https import HttpsPolicyFetcher
from postfix_mtasts.resolver.https.tls import CaFileError
from tests.support import policy_fetch
from tests.support.https_server import LEGACY_CIPHERS, CertKind, HostileHttpsServer, ListenerMode, Serve
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
async def test_key_exchange_is_classical_x25519(server: HostileHttpsServer) -> None:
    """The policy is public, so no post-quantum key share is generated (it costs a
    fifth of the handshake): X25519 is used even with a server that offers the
    hybrid group, which OpenSSL 3.5+ would otherwise pick."""
    server.set_host(HOST, Serve(POLICY))

    result = await fetcher_for(server).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    tls_line = next(line for line in result.trace if line.startswith("TLS "))
    assert tls_line.lower().endswith(", x25519"), tls_line


# --- certificates ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected", "problem"),
    [
        (CertKind.WRONG_NAME, "certificate not valid for mta-sts.example.com", FetchProblem.CERTIFICATE_NAME),
        (CertKind.CN_ONLY, "certificate not valid for mta-sts.example.com", FetchProblem.CERTIFICATE_NAME),
        (CertKind.EXPIRED, "certificate has expired", FetchProblem.CERTIFICATE_EXPIRED),
        (CertKind.UNTRUSTED, "certificate issuer is not trusted", FetchProblem.CERTIFICATE_UNTRUSTED),
    ],
)
@pytest_twisted.ensureDeferred
async def test_certificate_problems_are_webpki_errors(
    server: HostileHttpsServer, kind: CertKind, expected: str, problem: str
) -> None:
    server.set_host(HOST, Serve(POLICY), certificate=kind)

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.WEBPKI
    assert failed.problem == problem
    assert expected in failed.reason, failed.reason
    assert server.sni_names == [HOST]
    assert server.requests[HOST] == 0
    assert any(step.startswith("certificate subject") for step in failed.trace), failed.trace


@pytest_twisted.ensureDeferred
async def test_concurrent_fetches_of_one_fetcher_keep_their_certificate_verdicts_apart(
    server: HostileHttpsServer,
) -> None:
    # One fetcher shares its TLS context (and verify callback) between fetches:
    # each verdict and certificate must still land on its own fetch.
    server.set_host(HOST, Serve(POLICY))
    server.set_host("mta-sts.wrong.example", Serve(POLICY), certificate=CertKind.WRONG_NAME)
    server.set_host("mta-sts.expired.example", Serve(POLICY), certificate=CertKind.EXPIRED)
    fetcher = fetcher_for(server)

    good, wrong, expired = await DeferredList(
        [
            Deferred.fromCoroutine(fetcher.fetch(domain))
            for domain in (DOMAIN, "wrong.example", "expired.example")
        ],
        consumeErrors=True,
    )

    assert isinstance(good[1], FetchOK), good
    assert any("SAN mta-sts.example.com," in step for step in good[1].trace), good[1].trace
    assert isinstance(wrong[1], FetchFailed), wrong
    assert wrong[1].reason == "certificate not valid for mta-sts.wrong.example"
    assert any("SAN not-mta-sts.wrong.example," in step for step in wrong[1].trace), wrong[1].trace
    assert isinstance(expired[1], FetchFailed), expired
    assert expired[1].reason == "certificate has expired"
    assert any("SAN mta-sts.expired.example," in step for step in expired[1].trace), expired[1].trace
    again = await fetcher.fetch(DOMAIN)
    assert isinstance(again, FetchOK), again


@pytest_twisted.ensureDeferred
async def test_platform_trust_does_not_trust_the_test_ca(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))
    fetcher = HttpsPolicyFetcher(reactor(), LoopbackResolver(), port=server.port)

    failed = await fetch_failed(fetcher)

    assert failed.category == FailureCategory.WEBPKI
    assert failed.problem == FetchProblem.CERTIFICATE_UNTRUSTED
    assert "not trusted" in failed.reason


def test_unreadable_ca_file_is_a_one_line_error(tmp_path: Any) -> None:
    with pytest.raises(CaFileError, match="cannot read CA file"):
        HttpsPolicyFetcher(reactor(), LoopbackResolver(), ca_file=str(tmp_path / "missing.pem"))
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(CaFileError, match="holds no PEM certificate"):
        HttpsPolicyFetcher(reactor(), LoopbackResolver(), ca_file=str(empty))


# --- the handshake -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_plain_http_instead_of_tls_is_a_handshake_failure() -> None:
    plain = HostileHttpsServer(mode=ListenerMode.PLAIN_HTTP)
    await plain.start(reactor())
    try:
        failed = await fetch_failed(fetcher_for(plain, timeout=5.0))
    finally:
        await plain.stop()

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.TLS_HANDSHAKE
    assert f"TLS handshake with 127.0.0.1:{plain.port} failed" in failed.reason


@implementer(IOpenSSLClientConnectionCreator)
class _AnyVersionClient:
    """A client that accepts TLS 1.0 and anything else, to prove what the server speaks."""

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_VERSION)
        context.set_cipher_list(LEGACY_CIPHERS)
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        connection.set_tlsext_host_name(HOST.encode())
        return connection


@implementer(IHandshakeListener)
class _VersionProbe(Protocol):
    def __init__(self) -> None:
        self.version: Deferred[str] = Deferred()

    def handshakeCompleted(self) -> None:
        self.version.callback(self.transport.getHandle().get_protocol_version_name())
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.version.called:
            self.version.errback(reason)


@pytest_twisted.ensureDeferred
async def test_tls_1_1_only_host_is_refused() -> None:
    legacy = HostileHttpsServer(mode=ListenerMode.TLS_1_1_MAX)
    await legacy.start(reactor())
    try:
        legacy.set_host(HOST, Serve(POLICY))
        endpoint = wrapClientTLS(_AnyVersionClient(), TCP4ClientEndpoint(reactor(), "127.0.0.1", legacy.port))
        probe = _VersionProbe()
        await endpoint.connect(Factory.forProtocol(lambda: probe))
        spoken = await probe.version
        await legacy.wait_idle()

        failed = await fetch_failed(fetcher_for(legacy, timeout=5.0))
    finally:
        await legacy.stop()

    assert spoken == "TLSv1.1"
    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.TLS_HANDSHAKE
    assert f"TLS handshake with 127.0.0.1:{legacy.port} failed" in failed.reason
    assert "TLS 1.2 or later required" in failed.reason
    assert legacy.requests[HOST] == 0
