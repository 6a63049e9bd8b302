"""The gzip content coding, undone within the body cap.

treq asks for gzip, but its decoder inflates each piece of the body whole, so
one 16 KB TLS record of a gzip bomb would become some 16 MB in memory before
any cap could count it. The gzip coding is therefore taken off the response
below treq (:class:`_BoundedGzipAgent`) and undone by :class:`_BoundedGunzip`,
which never inflates more than the body cap plus one byte: the cap counts
*decoded* bytes, and a bomb is cut off like any other oversized body without
ever being inflated. Corrupt or truncated gzip data, or data after the end of
the gzip stream, fails the fetch; the fetch refuses other content codings.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from postfix_mtasts.errors import one_line
from postfix_mtasts.resolver import FetchProblem
from postfix_mtasts.resolver.https.attempt import _FetchError

#: The one content coding we undo, in its spellings: content codings are
#: case-insensitive, and "x-gzip" is to be taken for "gzip" (RFC 9110 §8.4.1).
GZIP_CODINGS = frozenset({b"gzip", b"x-gzip"})
#: zlib's window bits for a gzip stream (header and CRC trailer) with the largest window.
GZIP_WBITS = 16 + zlib.MAX_WBITS


@implementer(IAgent)
class _BoundedGzipAgent:
    """Takes the trailing gzip codings off each response and undoes them within the body cap.

    Goes under treq's ``ContentDecoderAgent`` (which still sends ``Accept-Encoding:
    gzip``): it takes off the trailing run of ``gzip`` codings, in any case and
    spelt ``x-gzip`` too, which that decoder would leave alone or inflate
    unbounded. The codings before that run stay in the header, where the
    fetcher refuses them.
    """

    def __init__(self, agent: IAgent, limit: int, abort: Callable[[], None]) -> None:
        self._agent = agent
        self._limit = limit
        self._abort = abort

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        requested: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        return requested.addCallback(self._take_gzip)

    def _take_gzip(self, response: IResponse) -> IResponse:
        values = response.headers.getRawHeaders(b"Content-Encoding")
        if not values:
            return response
        codings = b",".join(values).split(b",")
        layers = 0
        while codings and codings[-1].strip().lower() in GZIP_CODINGS:
            codings.pop()
            layers += 1
        if not layers:
            return response
        if codings:
            response.headers.setRawHeaders(b"Content-Encoding", [b",".join(codings)])
        else:
            response.headers.removeHeader(b"Content-Encoding")
        return _GunzippedResponse(response, layers, self._limit, self._abort)


class _GunzippedResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """A response whose body is delivered with ``layers`` gzip codings undone, each within the cap."""

    #: The Content-Length, if any, counts the gzip data, not the body.
    length = UNKNOWN_LENGTH

    def __init__(self, original: IResponse, layers: int, limit: int, abort: Callable[[], None]) -> None:
        super().__init__(original)
        self._layers = layers
        self._limit = limit
        self._abort = abort

    def deliverBody(self, protocol: IProtocol) -> None:
        for _ in range(self._layers):
            protocol = _BoundedGunzip(protocol, self._limit, self._abort)
        self.original.deliverBody(protocol)


class _BoundedGunzip(Protocol):
    """Undoes one gzip coding of a body on its way to ``body``, producing at most ``limit`` + 1 bytes.

    zlib inflates each piece of input no further than the room left under the
    cap plus one byte and keeps the rest of the piece (``unconsumed_tail``) for
    the next round, so whatever the pieces the network hands over, a bomb is
    refused once it passes the cap rather than inflated. The body must be one
    whole gzip stream: corrupt data, a stream cut short and data after its end
    are refused too. A refused body is a :class:`_FetchError` handed to
    ``body`` as its connection loss, and the connection is dropped.
    """

    def __init__(self, body: IProtocol, limit: int, abort: Callable[[], None]) -> None:
        self._body = body
        self._limit = limit
        self._abort = abort
        self._inflater = zlib.decompressobj(wbits=GZIP_WBITS)
        self._produced = 0
        self._refused = False

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)  # type: ignore[no-untyped-call]
        self._body.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        inflater = self._inflater
        pending = data
        while pending and not self._refused:
            if inflater.eof:
                self._refuse(
                    "gzip body goes on after the end of its gzip stream", FetchProblem.CONTENT_CODING
                )
                return
            room = self._limit + 1 - self._produced  # at least 1: a max_length of 0 would mean "all"
            try:
                decoded = inflater.decompress(pending, room)
            except zlib.error as error:
                self._refuse(f"gzip body is corrupt: {one_line(error)}", FetchProblem.CONTENT_CODING)
                return
            self._produced += len(decoded)
            if self._produced > self._limit:
                self._refuse(f"policy body over {self._limit} bytes", FetchProblem.TOO_LARGE)
                return
            if decoded:
                self._body.dataReceived(decoded)
            # Input zlib held back for want of room, or (past the end of the stream) left over.
            pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._refused:
            return
        ended = reason.check(ResponseDone, PotentialDataLoss)  # type: ignore[no-untyped-call]
        if ended and not self._inflater.eof:
            self._refuse("gzip body ends before its gzip stream does", FetchProblem.CONTENT_CODING)
            return
        self._body.connectionLost(reason)

    def _refuse(self, reason: str, problem: str) -> None:
        self._refused = True
        self._abort()
        self._body.connectionLost(Failure(_FetchError(reason, problem)))  # type: ignore[no-untyped-call]
