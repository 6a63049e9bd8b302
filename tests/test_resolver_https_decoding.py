"""The gzip content coding undone within the body cap (resolver/https/decoding.py):
gzip in any spelling, in pieces and nested, is decoded; bombs are refused without
being inflated; corrupt, truncated or over-long gzip fails the fetch; and, under
treq's own decoder, the bounded agent leaves it nothing to inflate."""

from __future__ import annotations

import gzip
import itertools
import tracemalloc
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ContentDecoderAgent, GzipDecoder, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer

from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchOK, FetchProblem, FetchResult
from postfix_mtasts.resolver.https import HttpsPolicyFetcher
from postfix_mtasts.resolver.https.attempt import _FetchError
from postfix_mtasts.resolver.https.decoding import _BoundedGunzip, _BoundedGzipAgent
from tests.support import policy_fetch
from tests.support.https_server import HostileHttpsServer, Pieces, Serve
from tests.support.policy_fetch import DOMAIN, EXPECTED, HOST, POLICY, fetch_failed, fetcher_for

pytestmark = pytest.mark.integration

#: The loopback policy host, fresh for each test (a fixture).
server = policy_fetch.server


#: Decoded size of the gzip bombs: far beyond the body cap, yet a few tens of KB on the wire.
BOMB_SIZE = 50 * 1024 * 1024
#: Most Python memory a refused bomb may cost at its peak: the capped body, buffers and TLS, never
#: the bomb inflated (one 16 KB TLS record of it inflates to some 16 MB).
BOMB_PEAK_LIMIT = 4 * 1024 * 1024
GZIP = (("Content-Encoding", "gzip"),)


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


# --- the decoder alone ---------------------------------------------------------


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


# --- under treq's decoder -------------------------------------------------------


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
