"""Integration tests of the HTTPS policy fetcher against a hostile policy host on 127.0.0.1."""

from __future__ import annotations

import gzip
import itertools
import logging
import socket
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import idna
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import ContentDecoderAgent, GzipDecoder, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer

from postfix_mtasts.policy.model import Mode, Policy
from postfix_mtasts.policy.policyfile import PolicyError, parse_policy
from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchOK, FetchProblem, FetchResult
from postfix_mtasts.resolver.https import (
    CaFileError,
    HttpsPolicyFetcher,
    _BoundedGunzip,
    _BoundedGzipAgent,
    _FetchError,
    policy_host,
)
from tests.support.https_server import (
    LEGACY_CIPHERS,
    CertKind,
    Drip,
    Hang,
    HostileHttpsServer,
    ListenerMode,
    Oversized,
    Pieces,
    Redirect,
    Serve,
)

pytestmark = pytest.mark.integration

DOMAIN = "example.com"
HOST = "mta-sts.example.com"
POLICY = b"version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.backup.example.com\nmax_age: 86400\n"
EXPECTED = Policy(Mode.ENFORCE, 86400, ("mail.example.com", "*.backup.example.com"))
#: A short deadline so that the slow cases end quickly; tests assert the failure, not the time.
SHORT_DEADLINE = 1.0
#: Decoded size of the gzip bombs: far beyond the body cap, yet a few tens of KB on the wire.
BOMB_SIZE = 50 * 1024 * 1024
#: Most Python memory a refused bomb may cost at its peak: the capped body, buffers and TLS, never
#: the bomb inflated (one 16 KB TLS record of it inflates to some 16 MB).
BOMB_PEAK_LIMIT = 4 * 1024 * 1024
GZIP = (("Content-Encoding", "gzip"),)


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


# --- success ----------------------------------------------------------------


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


@pytest_twisted.ensureDeferred
async def test_good_policy_is_fetched_parsed_and_traced(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))
    resolver = LoopbackResolver()

    result = await fetcher_for(server, resolver).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert result.policy == EXPECTED
    assert result.text == POLICY.decode()
    assert result.tls_version.startswith("TLSv1.")
    assert result.not_after is not None and result.not_after.tzinfo is not None
    assert result.body_bytes == len(POLICY)
    assert resolver.asked == [HOST]
    assert server.requests[HOST] == 1
    assert server.state(HOST).paths == ["/.well-known/mta-sts.txt"]
    assert server.sni_names == [HOST]
    trace = "\n".join(result.trace)
    for expected in (
        "resolved mta-sts.example.com: 127.0.0.1",
        f"connected to 127.0.0.1:{server.port}",
        "TLSv1.",
        "SAN mta-sts.example.com",
        "notAfter",
        "certificate valid for mta-sts.example.com",
        "HTTP 200 OK",
        "Content-Type text/plain",
        f"body {len(POLICY)} bytes",
        "policy valid: mode enforce",
    ):
        assert expected in trace, (expected, result.trace)


@pytest_twisted.ensureDeferred
async def test_request_headers(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))

    assert isinstance(await fetcher_for(server).fetch(DOMAIN), FetchOK)

    (headers,) = server.state(HOST).request_headers
    assert headers["accept-encoding"] == ["gzip"]
    assert headers["host"] == [f"{HOST}:{server.port}"]


@pytest.mark.parametrize("coding", ["gzip", "GZip", "x-gzip", " X-GZIP "])
@pytest_twisted.ensureDeferred
async def test_gzip_body_is_decoded(server: HostileHttpsServer, coding: str) -> None:
    # Content codings are case-insensitive and x-gzip is gzip (RFC 9110 §8.4.1).
    server.set_host(HOST, Serve(gzip.compress(POLICY), headers=(("Content-Encoding", coding),)))

    result = await fetcher_for(server).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert result.policy == EXPECTED


@pytest_twisted.ensureDeferred
async def test_gzip_bomb_is_cut_off_at_the_decoded_limit(server: HostileHttpsServer) -> None:
    # 64 KiB + 1 of decoded policy text compresses to a few hundred bytes.
    bomb = POLICY + b"x" * (65536 + 1 - len(POLICY))
    server.set_host(HOST, Serve(gzip.compress(bomb), headers=(("Content-Encoding", "gzip"),)))

    result = await fetcher_for(server).fetch(DOMAIN)

    assert isinstance(result, FetchFailed), result
    assert "policy body over 65536 bytes" in result.reason


async def fetch_with_peak_memory(fetcher: HttpsPolicyFetcher) -> tuple[FetchResult, int]:
    """Fetch, and measure the peak of Python's traced memory while the fetch ran."""
    tracing_already = tracemalloc.is_tracing()
    if not tracing_already:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = await fetcher.fetch(DOMAIN)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing_already:
            tracemalloc.stop()


@pytest.mark.parametrize(("codings", "layers"), [("gzip", 1), ("gzip, gzip", 2)])
@pytest_twisted.ensureDeferred
async def test_gzip_bomb_is_refused_without_being_inflated(
    server: HostileHttpsServer, codings: str, layers: int
) -> None:
    bomb = b"x" * BOMB_SIZE
    for _ in range(layers):
        bomb = gzip.compress(bomb)
    assert len(bomb) < 65536  # so that no Content-Length check can refuse it before it is read
    server.set_host(HOST, Serve(bomb, headers=(("Content-Encoding", codings),)))

    result, peak = await fetch_with_peak_memory(fetcher_for(server))

    assert isinstance(result, FetchFailed), result
    assert "policy body over 65536 bytes" in result.reason
    assert peak < BOMB_PEAK_LIMIT, f"peak of {peak} bytes while refusing the bomb"
    await server.wait_idle()


@pytest_twisted.ensureDeferred
async def test_gzip_body_in_many_small_pieces_is_decoded(server: HostileHttpsServer) -> None:
    compressed = gzip.compress(POLICY)
    pieces = tuple(compressed[start : start + 3] for start in range(0, len(compressed), 3))
    server.set_host(HOST, Pieces(pieces, headers=GZIP))

    result = await fetcher_for(server).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert result.policy == EXPECTED
    assert result.text == POLICY.decode()
    assert f"body {len(POLICY)} bytes" in result.trace


@pytest_twisted.ensureDeferred
async def test_gzip_within_gzip_is_decoded(server: HostileHttpsServer) -> None:
    twice = gzip.compress(gzip.compress(POLICY))
    server.set_host(HOST, Serve(twice, headers=(("Content-Encoding", "gzip, gzip"),)))

    result = await fetcher_for(server).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert result.policy == EXPECTED


def corrupted_crc(data: bytes) -> bytes:
    """The gzip stream ``data`` with a wrong CRC-32 in its trailer."""
    return data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]


@pytest.mark.parametrize(
    "body",
    [
        b"this is not gzip at all\n",
        corrupted_crc(gzip.compress(POLICY)),
        gzip.compress(POLICY)[:10] + b"\xff" * 40,
        gzip.compress(POLICY)[:-8],
        gzip.compress(POLICY) + b"more data after the stream\n",
    ],
    ids=["not-gzip", "bad-crc", "bad-deflate", "truncated", "trailing-data"],
)
@pytest_twisted.ensureDeferred
async def test_corrupt_gzip_is_a_fetch_error(server: HostileHttpsServer, body: bytes) -> None:
    server.set_host(HOST, Serve(body, headers=GZIP))

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.CONTENT_CODING
    assert failed.reason.startswith("gzip body "), failed.reason
    await server.wait_idle()


@pytest_twisted.ensureDeferred
async def test_body_limit_counts_decoded_gzip_bytes_and_is_inclusive(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(gzip.compress(POLICY), headers=GZIP))

    exact = await fetcher_for(server, body_limit=len(POLICY)).fetch(DOMAIN)
    over = await fetch_failed(fetcher_for(server, body_limit=len(POLICY) - 1))

    assert isinstance(exact, FetchOK), exact
    assert over.reason == f"policy body over {len(POLICY) - 1} bytes"


class RecordingBody(Protocol):
    """A body protocol that keeps what it is given and how its delivery ended (once only)."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        assert self.ended is None, "data after the end"
        self.pieces.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        assert self.ended is None, "ended twice"
        self.ended = reason

    def refusal(self) -> str:
        """The reason the decoder refused the body with."""
        assert self.ended is not None and self.ended.check(_FetchError), self.ended
        return str(self.ended.value)


def gunzip(pieces: list[bytes], limit: int = 65536, layers: int = 1) -> tuple[RecordingBody, int]:
    """Feed ``pieces`` through ``layers`` decoders and end the body; the body and the abort count."""
    body = RecordingBody()
    aborts: list[None] = []
    protocol: Protocol = body
    for _ in range(layers):
        protocol = _BoundedGunzip(protocol, limit, lambda: aborts.append(None))
    protocol.makeConnection(StringTransport())
    for piece in pieces:
        protocol.dataReceived(piece)
    protocol.connectionLost(Failure(ResponseDone()))
    return body, len(aborts)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def test_gunzip_decodes_a_body_fed_one_byte_at_a_time() -> None:
    body, aborts = gunzip(split(gzip.compress(POLICY), 1))

    assert b"".join(body.pieces) == POLICY
    assert body.ended is not None and body.ended.check(ResponseDone)
    assert aborts == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0, max_value=3100), max_size=12))
def test_gunzip_decodes_whatever_the_piece_boundaries(data: bytes, cuts: list[int]) -> None:
    compressed = gzip.compress(data)
    bounds = sorted({0, len(compressed), *(cut for cut in cuts if cut < len(compressed))})
    pieces = [compressed[start:end] for start, end in itertools.pairwise(bounds)]

    body, aborts = gunzip(pieces, limit=len(data))

    assert b"".join(body.pieces) == data
    assert aborts == 0


@pytest.mark.parametrize("piece_size", [1 << 30, 16 * 1024, 7])
def test_gunzip_refuses_a_bomb_without_handing_on_more_than_the_cap(piece_size: int) -> None:
    bomb = gzip.compress(b"x" * BOMB_SIZE)
    limit = 1000

    body, aborts = gunzip(split(bomb, piece_size), limit=limit)

    assert sum(map(len, body.pieces)) <= limit
    assert body.refusal() == f"policy body over {limit} bytes"
    assert aborts == 1


def test_gunzip_within_gzip_is_bounded_at_every_layer() -> None:
    limit = 1000
    twice = gzip.compress(gzip.compress(b"x" * BOMB_SIZE))

    decoded, _ = gunzip([gzip.compress(gzip.compress(POLICY))], limit=limit, layers=2)
    bomb, aborts = gunzip([twice], limit=limit, layers=2)

    assert b"".join(decoded.pieces) == POLICY
    assert sum(map(len, bomb.pieces)) <= limit
    assert bomb.refusal() == f"policy body over {limit} bytes"
    assert aborts == 1


CORRUPT = "gzip body is corrupt: Error -3 while decompressing data"


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        ([b"this is not gzip at all\n"], f"{CORRUPT}: incorrect header check"),
        ([corrupted_crc(gzip.compress(POLICY))], f"{CORRUPT}: incorrect data check"),
        (split(gzip.compress(POLICY)[:-8], 5), "gzip body ends before its gzip stream does"),
        ([gzip.compress(POLICY), b"x"], "gzip body goes on after the end of its gzip stream"),
        ([gzip.compress(POLICY) + b"x"], "gzip body goes on after the end of its gzip stream"),
        ([], "gzip body ends before its gzip stream does"),
    ],
)
def test_gunzip_refuses_anything_but_one_whole_gzip_stream(pieces: list[bytes], expected: str) -> None:
    body, aborts = gunzip(pieces)

    assert body.refusal() == expected
    assert aborts == 1


class CannedResponse:
    """Just enough of an IResponse for the agents: headers, and a body delivered at once."""

    def __init__(self, body: bytes, content_encoding: str) -> None:
        self.headers = Headers({b"Content-Encoding": [content_encoding.encode()]})
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


@implementer(IAgent)
class CannedAgent:
    """Answers every request with its one response, and keeps the request headers."""

    def __init__(self, response: CannedResponse) -> None:
        self.response = response
        self.headers: Headers | None = None

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[CannedResponse]:
        self.headers = headers
        answer: Deferred[CannedResponse] = Deferred()
        answer.callback(self.response)
        return answer


@pytest.mark.parametrize(
    ("coding", "layers", "left"),
    [
        ("gzip", 1, None),
        (" gzip , gzip", 2, None),
        ("br, gzip", 1, b"br"),
        ("gzip, br", 0, b"gzip,br"),
        ("GZIP", 1, None),
        ("x-gzip, GZip", 2, None),
        ("x-compress, x-gzip", 1, b"x-compress"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bounded_agent_leaves_treqs_decoder_nothing_to_inflate(
    coding: str, layers: int, left: bytes | None
) -> None:
    bomb = b"x" * BOMB_SIZE
    for _ in range(layers):
        bomb = gzip.compress(bomb)
    raw = bomb if layers else b"not decoded by anyone"
    canned = CannedAgent(CannedResponse(raw, coding))
    limit = 500
    # treq puts its ContentDecoderAgent over the agent it is given: so does this test.
    agent = ContentDecoderAgent(_BoundedGzipAgent(canned, limit, lambda: None), [(b"gzip", GzipDecoder)])

    response: IResponse = await agent.request(b"GET", b"https://mta-sts.example.com/")
    body = RecordingBody()
    response.deliverBody(body)

    assert canned.headers is not None and canned.headers.getRawHeaders(b"Accept-Encoding") == [b"gzip"]
    # (treq's decoder leaves an empty Content-Encoding where there is none, as for any plain response.)
    codings = [value.replace(b" ", b"") for value in response.headers.getRawHeaders(b"Content-Encoding", [])]
    assert [coding for coding in codings if coding] == ([left] if left else [])
    if layers:
        assert response.length is UNKNOWN_LENGTH
        assert sum(map(len, body.pieces)) <= limit
        assert body.refusal() == f"policy body over {limit} bytes"
    else:
        assert response.length == len(raw)
        assert body.pieces == [raw]
        assert body.ended is not None and body.ended.check(ResponseDone)


@pytest_twisted.ensureDeferred
async def test_domain_is_normalised_to_the_policy_host(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))

    result = await fetcher_for(server).fetch("Example.COM.")

    assert isinstance(result, FetchOK), result
    assert server.sni_names == [HOST]


@pytest.mark.parametrize(
    "content_type", ["text/plain; charset=utf-8", 'Text/Plain;charset="UTF-8"', "TEXT/PLAIN"]
)
@pytest_twisted.ensureDeferred
async def test_text_plain_with_parameters_and_any_case_is_accepted(
    server: HostileHttpsServer, content_type: str
) -> None:
    server.set_host(HOST, Serve(POLICY, content_type=content_type))

    result = await fetcher_for(server).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert result.policy == EXPECTED


@pytest_twisted.ensureDeferred
async def test_identity_content_encoding_is_accepted(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY, headers=(("Content-Encoding", "identity"),)))

    assert isinstance(await fetcher_for(server).fetch(DOMAIN), FetchOK)


# --- HTTP-level failures -------------------------------------------------------


MEDIA, STATUS, CODING = FetchProblem.MEDIA_TYPE, FetchProblem.HTTP_STATUS, FetchProblem.CONTENT_CODING


@pytest.mark.parametrize(
    ("serve", "expected", "problem"),
    [
        (Serve(POLICY, content_type="text/html"), "media type text/html, not text/plain", MEDIA),
        (Serve(POLICY, content_type="text/plainish"), "media type text/plainish, not text/plain", MEDIA),
        (Serve(POLICY, content_type=None), "no Content-Type headers", MEDIA),
        (Serve(POLICY, status=404), "HTTP 404 Not Found, not 200", STATUS),
        (Serve(POLICY, status=500), "HTTP 500", STATUS),
        (Serve(POLICY, status=204), "HTTP 204", STATUS),
        (
            Serve(POLICY, headers=(("Content-Encoding", "br"),)),
            "content coding br refused",
            CODING,
        ),
        (
            Serve(gzip.compress(POLICY), headers=(("Content-Encoding", "br, gzip"),)),
            "content coding br refused",
            CODING,
        ),
        (
            Serve(POLICY, headers=(("Content-Encoding", "gzip, br"),)),
            "content coding gzip, br refused",
            CODING,
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_http_answers_are_fetch_errors(
    server: HostileHttpsServer, serve: Serve, expected: str, problem: str
) -> None:
    server.set_host(HOST, serve)

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == problem
    assert expected in failed.reason, failed.reason
    assert server.requests[HOST] == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest_twisted.ensureDeferred
async def test_redirect_is_not_followed(server: HostileHttpsServer, status: int) -> None:
    target = "https://mta-sts.elsewhere.example/.well-known/mta-sts.txt"
    server.set_host(HOST, Redirect(target, status=status))
    server.set_host("mta-sts.elsewhere.example", Serve(POLICY))

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.REDIRECT
    assert f"HTTP {status} redirect to {target} (not followed)" in failed.reason
    assert server.requests[HOST] == 1
    assert server.requests["mta-sts.elsewhere.example"] == 0
    assert server.connections_accepted == 1


@pytest_twisted.ensureDeferred
async def test_mx_with_a_trailing_dot_is_forgiven_and_logged(
    server: HostileHttpsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A fully qualified ``mx: MX1.Example.COM.`` keeps the domain protected:
    the policy is used, the warning is in the trace, the FetchOK and the log."""
    server.set_host(HOST, Serve(b"version: STSv1\nmode: enforce\nmx: MX1.Example.COM.\nmax_age: 86400\n"))

    with caplog.at_level(logging.WARNING, logger="postfix_mtasts.resolver.https"):
        result = await fetcher_for(server).fetch(DOMAIN)

    assert isinstance(result, FetchOK), result
    assert result.policy.mx == ("mx1.example.com",)
    assert len(result.warnings) == 1 and "ends with a dot" in result.warnings[0]
    assert f"policy {result.warnings[0]}" in result.trace
    logged = [r.getMessage() for r in caplog.records if r.name == "postfix_mtasts.resolver.https"]
    assert logged == [f"{HOST}: policy {result.warnings[0]}"]


@pytest_twisted.ensureDeferred
async def test_invalid_policy_is_invalid_with_the_parsers_reason(server: HostileHttpsServer) -> None:
    body = b"version: STSv1\nmode: sometimes\nmx: mail.example.com\nmax_age: 86400\n"
    with pytest.raises(PolicyError) as parsed:
        parse_policy(body)
    server.set_host(HOST, Serve(body))

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.INVALID
    assert failed.problem == FetchProblem.INVALID_POLICY
    assert str(parsed.value) in failed.reason
    assert any("body" in step for step in failed.trace)


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


# --- size limits ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_oversized_chunked_body_is_cut_off(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Oversized())

    failed = await fetch_failed(fetcher_for(server))

    assert failed.category == FailureCategory.FETCH
    assert failed.problem == FetchProblem.TOO_LARGE
    assert "policy body over 65536 bytes" in failed.reason
    await server.wait_idle()
    state = server.state(HOST)
    assert state.aborted == 1
    assert state.finished == 0
    assert state.bytes_sent < Oversized().total


@pytest_twisted.ensureDeferred
async def test_oversized_declared_length_is_refused_before_reading(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Oversized(declare_length=True))

    failed = await fetch_failed(fetcher_for(server))

    assert f"policy body over 65536 bytes (Content-Length {Oversized().total})" in failed.reason
    assert failed.problem == FetchProblem.TOO_LARGE
    await server.wait_idle()
    assert server.state(HOST).aborted == 1


@pytest_twisted.ensureDeferred
async def test_body_limit_is_configurable_and_inclusive(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))

    exact = await fetcher_for(server, body_limit=len(POLICY)).fetch(DOMAIN)
    over = await fetch_failed(fetcher_for(server, body_limit=len(POLICY) - 1))

    assert isinstance(exact, FetchOK)
    assert f"policy body over {len(POLICY) - 1} bytes" in over.reason


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


# --- transport failures --------------------------------------------------------


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
async def test_fetches_leave_no_connection_or_timer_behind(server: HostileHttpsServer) -> None:
    server.set_host(HOST, Serve(POLICY))
    server.set_host("mta-sts.hang.example", Hang())
    fetcher = fetcher_for(server, timeout=SHORT_DEADLINE)

    ok = await fetcher.fetch(DOMAIN)
    hung = await fetcher.fetch("hang.example")
    await server.wait_idle()

    assert isinstance(ok, FetchOK) and isinstance(hung, FetchFailed)
    assert server.open_connections == 0
    # The fixture then checks that no timer of the fetcher is left.


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


def test_policy_host_names() -> None:
    assert policy_host("Example.COM.") == "mta-sts.example.com"
    assert policy_host("bücher.example") == "mta-sts.xn--bcher-kva.example"


def idna_policy_host(domain: str) -> str | None:
    """What policy_host must answer, straight from idna (None: not a valid name)."""
    name = domain.strip().rstrip(".")
    try:
        return "mta-sts." + idna.encode(name, uts46=True).decode("ascii").lower() if name else None
    except idna.IDNAError:
        return None


def policy_host_or_none(domain: str) -> str | None:
    try:
        return policy_host(domain)
    except Exception:
        return None


@pytest.mark.parametrize(
    "domain",
    [
        "example.com",
        "EXAMPLE.com.",
        " a.b ",
        "a-b.c9",
        "123.456",
        "-a.example",
        "a-.example",
        "ab--c.example",
        "xn--bcher-kva.example",
        "xn--zz.example",
        "a..b",
        ".a",
        "a_b.example",
        "a b.example",
        "\u212a.example",  # KELVIN SIGN: lower-cases to an ASCII "k"
        "x" * 63 + ".example",
        "x" * 64 + ".example",
        ".".join(["a" * 63] * 4)[:253],
        ".".join(["a" * 63] * 4)[:254],
    ],
)
def test_policy_host_agrees_with_idna_on_edge_cases(domain: str) -> None:
    assert policy_host_or_none(domain) == idna_policy_host(domain)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="aZ09-._.xn\u00fc\u212a ", max_size=80))
def test_policy_host_agrees_with_idna(domain: str) -> None:
    assert policy_host_or_none(domain) == idna_policy_host(domain)


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
