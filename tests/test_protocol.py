"""The socketmap and tcp_table protocols over a StringTransport, with a scripted responder.

They prove the connection-level rules: replies in request order even when a
later one is ready first, a framing error answers what came before and closes,
idle connections close on a Clock, and an over-long reply becomes TEMP.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from postfix_mtasts import limits
from postfix_mtasts.codec import socketmap, tcptable
from postfix_mtasts.policy.model import Answer
from postfix_mtasts.protocol import (
    MAX_PENDING_PER_CONNECTION,
    SocketmapFactory,
    SocketmapProtocol,
    TcpTableFactory,
    TcpTableProtocol,
)

OK_A = Answer.ok("secure match=mx.a.example servername=hostname")
OK_B = Answer.ok("secure match=mx.b.example servername=hostname")


class ScriptedResponder:
    """Responder-like: answers each key from a script (an Answer or a Deferred)."""

    def __init__(self, script: dict[bytes, Answer | Deferred[Answer] | Exception]) -> None:
        self.script = script
        self.asked: list[tuple[str, bytes]] = []

    def respond(self, profile_name: str, key: bytes) -> Answer | Deferred[Answer]:
        self.asked.append((profile_name, key))
        reply = self.script[key]
        if isinstance(reply, Exception):
            raise reply
        return reply


def new_transport(protocol: Any) -> StringTransport:
    """A StringTransport connected to ``protocol`` (Twisted's testing helpers are untyped)."""
    transport = StringTransport()  # type: ignore[no-untyped-call]
    protocol.makeConnection(transport)
    return transport


def written(transport: StringTransport) -> bytes:
    data: bytes = transport.value()  # type: ignore[no-untyped-call]
    return data


def closed(transport: StringTransport) -> bool:
    """Whether the protocol asked to close (a function, so mypy does not narrow it)."""
    return bool(transport.disconnecting)


def connect_socketmap(responder: Any, clock: Clock | None = None, idle: float = 300.0) -> tuple[
    SocketmapProtocol, StringTransport
]:
    protocol = SocketmapProtocol(responder, idle, clock=clock or Clock())
    return protocol, new_transport(protocol)


def connect_tcp_table(responder: Any, clock: Clock | None = None, idle: float = 60.0) -> tuple[
    TcpTableProtocol, StringTransport
]:
    protocol = TcpTableProtocol(responder, idle, profile="postfix", clock=clock or Clock())
    return protocol, new_transport(protocol)


def socketmap_replies(transport: StringTransport) -> list[tuple[str, str]]:
    return socketmap.SocketmapReplyDecoder().feed(written(transport))


def tcp_replies(transport: StringTransport) -> list[tuple[int, str]]:
    return tcptable.TcpTableReplyDecoder().feed(written(transport))


def feed_in_chunks(protocol: Any, data: bytes, size: int) -> None:
    for start in range(0, len(data), size):
        protocol.dataReceived(data[start:start + size])


@pytest.mark.parametrize("chunk", range(1, 10))
def test_socketmap_answers_requests_fed_in_small_chunks(chunk: int) -> None:
    responder = ScriptedResponder({b"a.example": OK_A, b"b.example": Answer.notfound("none")})
    protocol, transport = connect_socketmap(responder)
    data = socketmap.encode_request("postfix", b"a.example") + socketmap.encode_request(
        "strict", b"b.example"
    )
    feed_in_chunks(protocol, data, chunk)
    assert socketmap_replies(transport) == [("OK", OK_A.data), ("NOTFOUND", "")]
    assert responder.asked == [("postfix", b"a.example"), ("strict", b"b.example")]
    assert not closed(transport)


def test_socketmap_pipelined_replies_keep_request_order() -> None:
    slow: Deferred[Answer] = Deferred()
    responder = ScriptedResponder({b"slow.example": slow, b"fast.example": OK_B})
    protocol, transport = connect_socketmap(responder)
    protocol.dataReceived(
        socketmap.encode_request("postfix", b"slow.example")
        + socketmap.encode_request("postfix", b"fast.example")
        + socketmap.encode_request("postfix", b"fast.example")
    )
    assert written(transport) == b""  # the fast answers wait for the slow one
    slow.callback(OK_A)
    assert socketmap_replies(transport) == [("OK", OK_A.data), ("OK", OK_B.data), ("OK", OK_B.data)]


def test_later_deferred_finishing_first_still_waits_its_turn() -> None:
    first: Deferred[Answer] = Deferred()
    second: Deferred[Answer] = Deferred()
    responder = ScriptedResponder({b"one.example": first, b"two.example": second})
    protocol, transport = connect_tcp_table(responder)
    protocol.dataReceived(b"get one.example\nget two.example\n")
    second.callback(OK_B)
    assert written(transport) == b""
    first.callback(OK_A)
    assert tcp_replies(transport) == [(200, OK_A.data), (200, OK_B.data)]


def test_socketmap_framing_error_answers_earlier_requests_then_closes() -> None:
    slow: Deferred[Answer] = Deferred()
    responder = ScriptedResponder({b"slow.example": slow, b"a.example": OK_A})
    protocol, transport = connect_socketmap(responder)
    protocol.dataReceived(
        socketmap.encode_request("postfix", b"slow.example")
        + socketmap.encode_request("postfix", b"a.example")
        + b"x7:garbage,"
    )
    assert not closed(transport)  # still owes two answers
    protocol.dataReceived(socketmap.encode_request("postfix", b"a.example"))  # ignored
    slow.callback(OK_A)
    assert socketmap_replies(transport) == [("OK", OK_A.data), ("OK", OK_A.data)]
    assert closed(transport)
    assert len(responder.asked) == 2


def test_tcp_table_framing_error_with_nothing_pending_closes_at_once() -> None:
    protocol, transport = connect_tcp_table(ScriptedResponder({b"a.example": OK_A}))
    protocol.dataReceived(b"get a.example\n" + b"get " + b"x" * limits.TCP_TABLE_MAX_LINE)
    assert tcp_replies(transport) == [(200, OK_A.data)]
    assert closed(transport)


def test_malformed_but_framed_request_gets_an_error_reply_and_the_connection_stays() -> None:
    protocol, transport = connect_socketmap(ScriptedResponder({b"a.example": OK_A}))
    protocol.dataReceived(b"7:nospace," + socketmap.encode_request("postfix", b"a.example"))
    replies = socketmap_replies(transport)
    assert replies[0][0] == "PERM"
    assert replies[1] == ("OK", OK_A.data)
    assert not closed(transport)


def test_tcp_table_maps_answer_kinds_to_codes() -> None:
    responder = ScriptedResponder({
        b"ok.example": OK_A,
        b"none.example": Answer.notfound(),
        b"temp.example": Answer.temp("busy"),
        b"perm.example": Answer.perm("bad"),
    })
    protocol, transport = connect_tcp_table(responder)
    protocol.dataReceived(b"get ok.example\nget none.example\nget temp.example\nget perm.example\n")
    assert tcp_replies(transport) == [(200, OK_A.data), (500, "not found"), (400, "busy"), (400, "bad")]


def test_idle_connection_closes_after_the_timeout() -> None:
    clock = Clock()
    protocol, transport = connect_socketmap(ScriptedResponder({b"a.example": OK_A}), clock, idle=300)
    clock.advance(299)
    protocol.dataReceived(socketmap.encode_request("postfix", b"a.example"))  # resets the timer
    clock.advance(299)
    assert not closed(transport)
    clock.advance(1)
    assert closed(transport)


def test_requests_keep_one_idle_timer_and_each_pushes_the_close_back() -> None:
    clock = Clock()
    protocol, transport = connect_socketmap(ScriptedResponder({b"a.example": OK_A}), clock, idle=300)
    for _ in range(100):
        clock.advance(250)
        protocol.dataReceived(socketmap.encode_request("postfix", b"a.example"))
        assert len(clock.getDelayedCalls()) == 1
    clock.advance(299.5)
    assert not closed(transport)
    clock.advance(0.5)
    assert closed(transport)


def test_a_request_dripped_byte_by_byte_does_not_keep_the_connection_open() -> None:
    clock = Clock()
    protocol, transport = connect_socketmap(ScriptedResponder({b"a.example": OK_A}), clock, idle=300)
    request = socketmap.encode_request("postfix", b"a.example")
    for byte in request[:-1]:
        clock.advance(100)
        protocol.dataReceived(bytes([byte]))
        if closed(transport):
            break
    assert closed(transport)
    assert written(transport) == b""


def test_connection_waiting_for_a_lookup_is_not_idle() -> None:
    clock = Clock()
    slow: Deferred[Answer] = Deferred()
    protocol, transport = connect_tcp_table(ScriptedResponder({b"slow.example": slow}), clock, idle=60)
    protocol.dataReceived(b"get slow.example\n")
    clock.advance(61)
    assert not closed(transport)
    slow.callback(OK_A)
    assert tcp_replies(transport) == [(200, OK_A.data)]
    clock.advance(60)
    assert closed(transport)


def test_connection_lost_cancels_the_idle_timer_and_drops_late_answers() -> None:
    clock = Clock()
    slow: Deferred[Answer] = Deferred()
    protocol, transport = connect_socketmap(ScriptedResponder({b"slow.example": slow}), clock)
    protocol.dataReceived(socketmap.encode_request("postfix", b"slow.example"))
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []
    slow.callback(OK_A)
    assert written(transport) == b""


def test_socketmap_reply_too_long_becomes_temp() -> None:
    huge = Answer.ok("x" * (limits.SOCKETMAP_MAX_REPLY + 1))
    protocol, transport = connect_socketmap(ScriptedResponder({b"big.example": huge}))
    protocol.dataReceived(socketmap.encode_request("postfix", b"big.example"))
    [(status, _)] = socketmap_replies(transport)
    assert status == "TEMP"


def test_tcp_table_reply_too_long_becomes_temp_also_when_deferred() -> None:
    slow: Deferred[Answer] = Deferred()
    protocol, transport = connect_tcp_table(ScriptedResponder({b"big.example": slow}))
    protocol.dataReceived(b"get big.example\n")
    slow.callback(Answer.ok("y" * limits.TCP_TABLE_MAX_LINE))
    [(code, _)] = tcp_replies(transport)
    assert code == 400


def test_responder_errors_become_temp_and_the_connection_goes_on() -> None:
    failing: Deferred[Answer] = Deferred()
    responder = ScriptedResponder({
        b"raises.example": RuntimeError("boom"),
        b"fails.example": failing,
        b"a.example": OK_A,
    })
    protocol, transport = connect_tcp_table(responder)
    protocol.dataReceived(b"get raises.example\nget fails.example\nget a.example\n")
    failing.errback(RuntimeError("late boom"))
    assert [code for code, _ in tcp_replies(transport)] == [400, 400, 200]
    assert not closed(transport)


def test_too_many_pending_requests_close_the_connection() -> None:
    never: Deferred[Answer] = Deferred()
    protocol, transport = connect_tcp_table(ScriptedResponder({b"slow.example": never}))
    protocol.dataReceived(b"get slow.example\n" * MAX_PENDING_PER_CONNECTION)
    assert not closed(transport)
    protocol.dataReceived(b"get slow.example\n")
    assert closed(transport)


def test_factories_build_protocols_sharing_the_responder_and_clock() -> None:
    responder = ScriptedResponder({b"a.example": OK_A})
    clock = Clock()
    socketmap_protocol = SocketmapFactory(responder, 5.0, clock=clock).buildProtocol(None)  # type: ignore[arg-type]
    tcp_protocol = TcpTableFactory(responder, 7.0, "strict", clock=clock).buildProtocol(None)  # type: ignore[arg-type]
    assert socketmap_protocol.responder is cast(Any, responder) and socketmap_protocol.idle_timeout == 5.0
    assert tcp_protocol.profile == "strict" and tcp_protocol.idle_timeout == 7.0
    transport = new_transport(tcp_protocol)
    tcp_protocol.dataReceived(b"get a.example\n")
    assert responder.asked == [("strict", b"a.example")]
    clock.advance(7)
    assert closed(transport)


def test_reply_cache_gives_the_same_bytes_as_encoding_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from postfix_mtasts import protocol as protocol_module

    monkeypatch.setattr(protocol_module, "REPLY_CACHE_ENTRIES", 3)
    monkeypatch.setattr(SocketmapProtocol, "_replies", {})
    answers = {f"d{i}.example".encode(): Answer.ok(f"secure match=mx.d{i}.example") for i in range(5)}
    answers[b"none.example"] = Answer.notfound("no policy")
    proto, transport = connect_socketmap(ScriptedResponder(dict(answers)))
    keys = list(answers) * 3
    for key in keys:
        proto.dataReceived(socketmap.encode_request("postfix", key))
        assert len(SocketmapProtocol._replies) <= 3
    expected = [socketmap.encode_reply(answers[k].kind.value, "" if k == b"none.example" else answers[k].data)
                for k in keys]
    assert written(transport) == b"".join(expected)
    # Each protocol class keeps its own: a tcp_table reply is never sent on socketmap.
    assert TcpTableProtocol._replies is not SocketmapProtocol._replies


def test_reply_cache_is_keyed_by_the_answer_object_not_its_address() -> None:
    first = Answer.ok("secure match=mx.first.example")
    responder = ScriptedResponder({b"a.example": first})
    proto, transport = connect_socketmap(responder)
    proto.dataReceived(socketmap.encode_request("postfix", b"a.example"))
    # An equal-looking cache slot for another object must not be used.
    other = Answer.ok("secure match=mx.other.example")
    SocketmapProtocol._replies[id(other)] = (first, b"wrong")
    responder.script[b"b.example"] = other
    proto.dataReceived(socketmap.encode_request("postfix", b"b.example"))
    assert socketmap_replies(transport) == [("OK", first.data), ("OK", other.data)]
