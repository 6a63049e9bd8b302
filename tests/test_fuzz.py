"""Protocol-level fuzzing: arbitrary byte streams into the socketmap and tcp_table
protocols over a StringTransport.

The codec property tests cover decoding alone; these add what the Twisted
protocol does with it: feeding any bytes, in any chunks, never raises; every
request before the first framing error is answered, in request order, even
when their lookups finish in another order; a framing error closes the
connection once those answers are written, and nothing else does; a connection
lost mid-stream stays silent when its lookups finish later.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from postfix_mtasts.codec import FramingError, MalformedRequest, socketmap, tcptable
from postfix_mtasts.policy.model import Answer
from postfix_mtasts.protocol import SocketmapProtocol, TcpTableProtocol

#: Examples per property; each runs a whole connection, so fewer than hypothesis' default.
EXAMPLES = 200
IDLE_TIMEOUT = 300.0

#: Keys a well-formed request may carry (the decoder takes any bytes as a key).
KEYS = st.one_of(
    st.sampled_from([b"example.com", b"[mx.example.net]:25", b"a.example", b"\xc3\xa9.example"]),
    st.binary(min_size=1, max_size=40),
)
#: Map names Postfix could send.
NAMES = st.sampled_from(["postfix", "strict", "x"])
#: Stray bytes: binary junk, almost-netstrings, almost-lines, oversize lengths.
JUNK = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([
        b"0:,", b"3:abc,", b"5:ab", b"x7:garbage,", b"01:a,", b"99999999999:", b":,",
        b"7:nospace,", b"\n", b"put a b\n", b"get \n", b"get %zz\n", b"get a b\n",
        b"get ok.example\r\n", b"\x00\xff\x80", b"x" * 5000,
    ]),
)


def socketmap_streams() -> st.SearchStrategy[bytes]:
    request = st.builds(socketmap.encode_request, NAMES, KEYS)
    return st.lists(st.one_of(request, request, JUNK), max_size=12).map(b"".join)


def tcp_table_streams() -> st.SearchStrategy[bytes]:
    request = st.builds(tcptable.encode_request, KEYS)
    return st.lists(st.one_of(request, request, JUNK), max_size=12).map(b"".join)


def answer_for(key: bytes) -> Answer:
    """A deterministic answer per key, short enough for either protocol."""
    digest = hashlib.sha256(key).hexdigest()
    if digest[0] in "01":
        return Answer.notfound("none")
    if digest[0] == "2":
        return Answer.temp("busy " + digest[:6])
    return Answer.ok(f"secure match=mx-{digest[:10]}.example servername=hostname")


class FuzzResponder:
    """Answers each request now or later, as the drawn schedule says; keeps the late ones."""

    def __init__(self, later: list[bool]) -> None:
        self.later = later or [False]
        self.asked = 0
        self.waiting: list[tuple[Deferred[Answer], Answer]] = []

    def respond(self, profile_name: str, key: bytes) -> Answer | Deferred[Answer]:
        answer = answer_for(key)
        late = self.later[self.asked % len(self.later)]
        self.asked += 1
        if not late:
            return answer
        d: Deferred[Answer] = Deferred()
        self.waiting.append((d, answer))
        return d


def chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(stream), *(min(c, len(stream)) for c in cuts)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def expected_events(decoder: Any, stream: bytes) -> tuple[list[Any], bool]:
    """What a fresh decoder makes of the whole stream: events before any framing
    error, and whether there was one."""
    try:
        return list(decoder.feed(stream)), False
    except FramingError as error:
        return list(error.decoded), True


def run_connection(
    protocol: Any,
    stream: bytes,
    cuts: list[int],
    responder: FuzzResponder,
    order: list[int],
    lose_after: int | None,
) -> tuple[StringTransport, bytes]:
    """Feed ``stream`` in chunks, optionally lose the connection after chunk
    ``lose_after``, then finish the late lookups in the drawn order."""
    transport = StringTransport()  # type: ignore[no-untyped-call]
    protocol.makeConnection(transport)
    written_at_loss = b""
    for index, chunk in enumerate(chunks(stream, cuts)):
        protocol.dataReceived(chunk)
        if lose_after is not None and index == lose_after:
            written_at_loss = transport.value()  # type: ignore[no-untyped-call]
            protocol.connectionLost(None)
            break
    waiting = responder.waiting
    for position in sorted(range(len(waiting)), key=lambda i: order[i % len(order)] if order else 0):
        deferred, answer = waiting[position]
        deferred.callback(answer)
    return transport, written_at_loss


def check_protocol(
    make: Callable[[FuzzResponder], Any],
    new_decoder: Callable[[], Any],
    reply_decoder: Callable[[], Any],
    expected_reply: Callable[[Any], Any],
    stream: bytes,
    data: st.DataObject,
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    later = data.draw(st.lists(st.booleans(), max_size=8), label="later")
    order = data.draw(st.lists(st.integers(0, 100), max_size=16), label="order")
    lose = data.draw(st.one_of(st.none(), st.integers(0, 12)), label="lose_after")
    responder = FuzzResponder(later)
    protocol = make(responder)
    transport, written_at_loss = run_connection(protocol, stream, cuts, responder, order, lose)
    written: bytes = transport.value()  # type: ignore[no-untyped-call]

    events, framing_error = expected_events(new_decoder(), stream)
    replies = reply_decoder().feed(written)
    wanted = [expected_reply(event) for event in events]
    lost = lose is not None and lose < len(chunks(stream, cuts))
    if lost:
        # Nothing is written after the connection is gone, and what was
        # written before is a prefix of the right answers, in order.
        assert written == written_at_loss
        assert replies == wanted[: len(replies)]
        return
    assert replies == wanted
    # Only a framing error closes the connection, and only once all is answered.
    assert bool(transport.disconnecting) == framing_error


@settings(max_examples=EXAMPLES, deadline=None)
@given(stream=socketmap_streams(), data=st.data())
def test_socketmap_any_stream_is_answered_in_order_until_the_first_framing_error(
    stream: bytes, data: st.DataObject
) -> None:
    def expected(event: Any) -> tuple[str, str]:
        if isinstance(event, MalformedRequest):
            return ("PERM", event.reason)
        answer = answer_for(event.key)
        return (answer.kind.value, "" if answer.kind.value == "NOTFOUND" else answer.data)

    check_protocol(
        lambda responder: SocketmapProtocol(responder, IDLE_TIMEOUT, clock=Clock()),  # type: ignore[arg-type]
        socketmap.SocketmapDecoder,
        socketmap.SocketmapReplyDecoder,
        expected,
        stream,
        data,
    )


@settings(max_examples=EXAMPLES, deadline=None)
@given(stream=tcp_table_streams(), data=st.data())
def test_tcp_table_any_stream_is_answered_in_order_until_the_first_framing_error(
    stream: bytes, data: st.DataObject
) -> None:
    codes = {"OK": 200, "NOTFOUND": 500, "TEMP": 400, "PERM": 400}

    def expected(event: Any) -> tuple[int, str]:
        if isinstance(event, MalformedRequest):
            return (400, event.reason)
        answer = answer_for(event.key)
        code = codes[answer.kind.value]
        return (code, answer.data or ("not found" if code == 500 else ""))

    check_protocol(
        lambda responder: TcpTableProtocol(responder, IDLE_TIMEOUT, clock=Clock()),  # type: ignore[arg-type]
        tcptable.TcpTableDecoder,
        tcptable.TcpTableReplyDecoder,
        expected,
        stream,
        data,
    )


@settings(max_examples=EXAMPLES, deadline=None)
@given(stream=st.binary(max_size=300), data=st.data())
def test_pure_binary_junk_never_raises_and_leaves_no_timer_after_close(
    stream: bytes, data: st.DataObject
) -> None:
    """Random bytes into both protocols: no exception escapes, and once the
    connection is lost no idle timer is left on the clock."""
    for kind in (SocketmapProtocol, TcpTableProtocol):
        clock = Clock()
        responder = FuzzResponder(data.draw(st.lists(st.booleans(), max_size=4)))
        protocol: Any = kind(responder, IDLE_TIMEOUT, clock=clock)  # type: ignore[arg-type]
        transport = StringTransport()  # type: ignore[no-untyped-call]
        protocol.makeConnection(transport)
        for chunk in chunks(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=8))):
            protocol.dataReceived(chunk)
        protocol.connectionLost(None)
        for deferred, answer in responder.waiting:
            deferred.callback(answer)
        assert clock.getDelayedCalls() == []
