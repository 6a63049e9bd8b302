"""Tests for the sans-IO socketmap (netstring) codec."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postfix_mtasts.codec import FramingError, MalformedRequest, ReplyTooLong
from postfix_mtasts.codec.socketmap import (
    SOCKETMAP_STATUSES,
    SocketmapDecoder,
    SocketmapReplyDecoder,
    SocketmapRequest,
    encode_reply,
    encode_request,
)
from postfix_mtasts.limits import SOCKETMAP_MAX_REPLY, SOCKETMAP_MAX_REQUEST
from tests.support.chunks import one_byte_chunks, run, split

# --- request decoding: table-driven ------------------------------------------

VALID_REQUESTS = [
    (b"19:postfix example.com,", [SocketmapRequest("postfix", b"example.com")]),
    # The key is everything after the first space, spaces included.
    (b"13:map a b  c d ,", [SocketmapRequest("map", b"a b  c d ")]),
    (b"6:m \x00\xff\r\n,", [SocketmapRequest("m", b"\x00\xff\r\n")]),
    (b"3:m k,3:n j,", [SocketmapRequest("m", b"k"), SocketmapRequest("n", b"j")]),
    (b"19:postfix example.com", []),  # incomplete: waits for ','
]


@pytest.mark.parametrize(("wire", "expected"), VALID_REQUESTS)
def test_valid_request(wire: bytes, expected: list[object]) -> None:
    assert SocketmapDecoder().feed(wire) == expected


def test_undecodable_name_is_replaced_not_refused() -> None:
    [event] = SocketmapDecoder().feed(b"9:p\xffstfix k,")
    assert event == SocketmapRequest("p\ufffdstfix", b"k")


@pytest.mark.parametrize(
    ("payload", "reason_part"),
    [
        (b"", "is empty"),
        (b"postfix", "no space"),
        (b" example.com", "empty map name"),
        (b"postfix ", "empty key"),
    ],
)
def test_malformed_request(payload: bytes, reason_part: str) -> None:
    wire = b"%d:%b," % (len(payload), payload)
    decoder = SocketmapDecoder()
    [event] = decoder.feed(wire)
    assert isinstance(event, MalformedRequest)
    assert reason_part in event.reason
    # A malformed request does not break the stream.
    assert decoder.feed(encode_request("postfix", b"x")) == [
        SocketmapRequest("postfix", b"x")
    ]


def test_pipelined_requests_all_come_out_in_order() -> None:
    keys = [b"a.example", b"b.example", b"c.example"]
    wire = b"".join(encode_request("postfix", key) for key in keys) + b"9:pos"
    decoder = SocketmapDecoder()
    events = decoder.feed(wire)
    assert events == [SocketmapRequest("postfix", key) for key in keys]
    assert decoder.buffered == len(b"pos")
    assert decoder.feed(b"tfix k,") == [SocketmapRequest("postfix", b"k")]


FRAMING_ERRORS = [
    (b"x", "contains 'x'"),
    (b"12a:", "contains 'a'"),
    (b"-1:", "contains '-'"),
    (b" 3:abc,", "contains ' '"),
    (b":", "length is empty"),
    (b"00:,", "leading zero"),
    (b"01:a,", "leading zero"),
    (b"3:abc;", "not followed by ','"),
    (b"3:abcd,", "not followed by ','"),
    (b"10001:", "longer than 10000 bytes"),
    (b"99999999999999999999", "longer than 10000 bytes"),
    (b"3:a b,\n", "contains '\\x0a'"),
]


@pytest.mark.parametrize(("wire", "reason_part"), FRAMING_ERRORS)
def test_framing_error(wire: bytes, reason_part: str) -> None:
    decoder = SocketmapDecoder()
    with pytest.raises(FramingError) as caught:
        decoder.feed(wire)
    assert reason_part in str(caught.value)
    assert "\n" not in str(caught.value)
    assert decoder.buffered == 0
    # The decoder stays broken, even for valid input.
    with pytest.raises(FramingError) as again:
        decoder.feed(encode_request("postfix", b"example.com"))
    assert str(again.value) == str(caught.value)


@pytest.mark.parametrize(("wire", "reason_part"), FRAMING_ERRORS)
def test_framing_error_byte_by_byte(wire: bytes, reason_part: str) -> None:
    _events, error = run(SocketmapDecoder().feed, one_byte_chunks(wire))
    assert error is not None and reason_part in error


def test_oversized_length_is_refused_before_payload_is_buffered() -> None:
    decoder = SocketmapDecoder()
    assert decoder.feed(b"1000") == []
    assert decoder.buffered == 4
    with pytest.raises(FramingError, match="longer than 10000"):
        decoder.feed(b"1")  # 10001: refused on its fifth digit, no ':' needed


def test_custom_limit_refuses_early() -> None:
    decoder = SocketmapDecoder(max_request=50)
    assert decoder.feed(b"5") == []
    with pytest.raises(FramingError, match="longer than 50"):
        decoder.feed(b"1")


def test_request_of_exactly_the_limit_is_accepted() -> None:
    key = b"k" * (SOCKETMAP_MAX_REQUEST - len(b"postfix "))
    wire = encode_request("postfix", key)
    assert wire.startswith(b"%d:" % SOCKETMAP_MAX_REQUEST)
    assert SocketmapDecoder().feed(wire) == [SocketmapRequest("postfix", key)]


def test_request_one_byte_over_the_limit_is_refused() -> None:
    key = b"k" * (SOCKETMAP_MAX_REQUEST + 1 - len(b"postfix "))
    with pytest.raises(FramingError, match="longer than 10000"):
        SocketmapDecoder().feed(encode_request("postfix", key))


def test_events_before_a_framing_error_travel_on_the_error() -> None:
    good = encode_request("postfix", b"a.example") + encode_request(
        "postfix", b"b.example"
    )
    with pytest.raises(FramingError) as caught:
        SocketmapDecoder().feed(good + b"x:")
    assert caught.value.decoded == (
        SocketmapRequest("postfix", b"a.example"),
        SocketmapRequest("postfix", b"b.example"),
    )


def test_buffered_tracks_partial_request() -> None:
    decoder = SocketmapDecoder()
    wire = encode_request("postfix", b"example.com")
    assert decoder.feed(wire[:-1]) == []
    assert decoder.buffered == len(wire) - 1 - len(b"19:")  # header consumed
    assert decoder.feed(wire[-1:]) == [SocketmapRequest("postfix", b"example.com")]
    assert decoder.buffered == 0


# --- request encoding ---------------------------------------------------------


def test_encode_request() -> None:
    assert encode_request("postfix", b"example.com") == b"19:postfix example.com,"
    assert encode_request("m", b"") == b"2:m ,"


@pytest.mark.parametrize("name", ["", "two words", "n\u00e4me"])
def test_encode_request_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="socketmap name"):
        encode_request(name, b"k")


# --- replies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "data", "wire"),
    [
        ("NOTFOUND", "", b"9:NOTFOUND ,"),
        ("OK", "secure match=mx", b"18:OK secure match=mx,"),
        ("TEMP", "policy fetch failed", b"24:TEMP policy fetch failed,"),
        ("PERM", "", b"5:PERM ,"),
        ("OK", "caf\u00e9", b"8:OK caf\xc3\xa9,"),
    ],
)
def test_encode_reply(status: str, data: str, wire: bytes) -> None:
    assert encode_reply(status, data) == wire
    assert SocketmapReplyDecoder().feed(wire) == [(status, data)]


@pytest.mark.parametrize("status", ["ok", "TIMEOUT", "NOT FOUND", ""])
def test_encode_reply_refuses_unknown_status(status: str) -> None:
    with pytest.raises(ValueError, match="unknown socketmap status"):
        encode_reply(status, "x")


def test_reply_of_exactly_the_limit_is_accepted() -> None:
    data = "d" * (SOCKETMAP_MAX_REPLY - len("OK "))
    wire = encode_reply("OK", data)
    assert wire.startswith(b"%d:" % SOCKETMAP_MAX_REPLY)
    assert SocketmapReplyDecoder().feed(wire) == [("OK", data)]


def test_reply_one_byte_over_the_limit_raises() -> None:
    with pytest.raises(ReplyTooLong, match="exceeds the 100000-byte limit"):
        encode_reply("OK", "d" * (SOCKETMAP_MAX_REPLY + 1 - len("OK ")))


def test_reply_limit_counts_utf8_bytes() -> None:
    # "é" is two bytes: 4 of them plus "OK " is 11 bytes.
    assert (
        encode_reply("OK", "\u00e9" * 4, max_reply=11)
        == b"11:OK " + "\u00e9".encode() * 4 + b","
    )
    with pytest.raises(ReplyTooLong):
        encode_reply("OK", "\u00e9" * 4, max_reply=10)


def test_reply_decoder_reads_other_statuses_and_bare_status() -> None:
    decoder = SocketmapReplyDecoder()
    assert decoder.feed(b"16:TIMEOUT too slow,8:NOTFOUND,") == [
        ("TIMEOUT", "too slow"),
        ("NOTFOUND", ""),
    ]


def test_reply_decoder_refuses_oversized_reply() -> None:
    decoder = SocketmapReplyDecoder(max_reply=10)
    with pytest.raises(FramingError, match="socketmap reply longer than 10"):
        decoder.feed(b"11:")


# --- properties ---------------------------------------------------------------

keys = st.binary(min_size=1, max_size=300)
names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=20
)
requests = st.builds(encode_request, names, keys)
# Streams mixing valid requests with stray bytes reach both the request and
# the error paths.
streams = st.lists(st.one_of(requests, st.binary(max_size=8)), max_size=8).map(b"".join)


@given(name=names, key=keys)
def test_request_round_trip(name: str, key: bytes) -> None:
    assert SocketmapDecoder().feed(encode_request(name, key)) == [
        SocketmapRequest(name, key)
    ]


@given(st.lists(st.tuples(names, keys), max_size=10))
def test_pipelined_round_trip(pairs: list[tuple[str, bytes]]) -> None:
    wire = b"".join(encode_request(name, key) for name, key in pairs)
    assert SocketmapDecoder().feed(wire) == [SocketmapRequest(n, k) for n, k in pairs]


@given(stream=streams, data=st.data())
def test_chunking_does_not_change_events(stream: bytes, data: st.DataObject) -> None:
    whole = run(SocketmapDecoder().feed, [stream])
    assert run(SocketmapDecoder().feed, one_byte_chunks(stream)) == whole
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    assert run(SocketmapDecoder().feed, split(stream, cuts)) == whole


@given(stream=st.binary(max_size=200), data=st.data())
def test_fuzz_only_framing_errors(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    decoder = SocketmapDecoder(max_request=100)
    for chunk in split(stream, cuts):
        try:
            events = decoder.feed(chunk)
        except FramingError:
            return
        assert all(isinstance(e, (SocketmapRequest, MalformedRequest)) for e in events)
    assert decoder.buffered <= len(stream)


@given(status=st.sampled_from(SOCKETMAP_STATUSES), text=st.text(max_size=300))
def test_reply_round_trip(status: str, text: str) -> None:
    assert SocketmapReplyDecoder().feed(encode_reply(status, text)) == [(status, text)]


@given(
    replies=st.lists(
        st.tuples(st.sampled_from(SOCKETMAP_STATUSES), st.text(max_size=50))
    ),
    data=st.data(),
)
def test_reply_decoder_chunking(
    replies: list[tuple[str, str]], data: st.DataObject
) -> None:
    wire = b"".join(encode_reply(status, text) for status, text in replies)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    assert run(SocketmapReplyDecoder().feed, split(wire, cuts)) == (replies, None)
    assert run(SocketmapReplyDecoder().feed, one_byte_chunks(wire)) == (replies, None)


@given(stream=st.binary(max_size=200))
def test_reply_decoder_fuzz_only_framing_errors(stream: bytes) -> None:
    try:
        SocketmapReplyDecoder(max_reply=100).feed(stream)
    except FramingError:
        pass


def test_codec_imports_no_twisted_or_network() -> None:
    code = (
        "import sys, postfix_mtasts.codec.socketmap, postfix_mtasts.codec.tcptable;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('twisted', 'socket', 'asyncio', 'treq', 'dns')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# One netstring in one chunk takes a shortcut in the decoder; these near-misses
# (leading zeros, wrong lengths, a missing comma, a limit just crossed, a
# second request or a partial one behind) must come out exactly as when the
# same bytes arrive one at a time, and leave the decoder in the same state.
@given(
    payload=st.binary(max_size=40) | st.sampled_from([b"postfix example.com", b"postfix", b" x"]),
    prefix=st.sampled_from(
        ["{n}", "0{n}", "00{n}", "{m}", "{p}", "", "+{n}", " {n}", "{n} ", "\u0665", "1_0"]
    ),
    end=st.sampled_from([b",", b"", b";", b",,", b",4:a b,", b",4:a"]),
    limit=st.integers(0, 40),
    then=st.sampled_from([b"", b"3:a b,", b"x"]),
)
def test_one_chunk_shortcut_matches_byte_by_byte(
    payload: bytes, prefix: str, end: bytes, limit: int, then: bytes
) -> None:
    n = len(payload)
    header = prefix.format(n=n, m=max(n - 1, 0), p=n + 1).encode()
    chunk = header + b":" + payload + end
    whole_decoder = SocketmapDecoder(max_request=limit)
    drip_decoder = SocketmapDecoder(max_request=limit)
    whole = run(whole_decoder.feed, [chunk])
    assert run(drip_decoder.feed, one_byte_chunks(chunk)) == whole
    assert whole_decoder.buffered == drip_decoder.buffered
    assert run(whole_decoder.feed, [then]) == run(drip_decoder.feed, [then])


def test_one_chunk_shortcut_gives_the_request() -> None:
    decoder = SocketmapDecoder()
    assert decoder.feed(b"19:postfix example.com,") == [SocketmapRequest("postfix", b"example.com")]
    assert decoder.buffered == 0
    assert decoder.feed(b"19:postfix example.org,") == [SocketmapRequest("postfix", b"example.org")]


def _feed_outcome(data: bytes) -> object:
    try:
        return SocketmapDecoder().feed(data)
    except FramingError as e:
        return ("framing error", e.reason)


@given(stream=st.one_of(streams, st.binary(max_size=60),
                        st.builds(lambda n, k: encode_request(n, k), names, keys)))
def test_whole_request_agrees_with_feed(stream: bytes) -> None:
    """The protocol's one-request shortcut gives what feed gives, or steps aside."""
    quick = SocketmapDecoder().whole_request(stream)
    if quick is not None:
        assert _feed_outcome(stream) == [SocketmapRequest(name=quick[0], key=quick[1])]


@given(name=names, key=keys)
def test_whole_request_takes_every_single_request(name: str, key: bytes) -> None:
    assert SocketmapDecoder().whole_request(encode_request(name, key)) == (name, key)


def test_whole_request_steps_aside_while_a_request_is_half_read() -> None:
    decoder = SocketmapDecoder()
    assert decoder.feed(b"15:postfix exa") == []
    assert decoder.whole_request(b"11:postfix a.b,") is None
    assert decoder.feed(b"mple,") == [SocketmapRequest(name="postfix", key=b"example")]
    assert decoder.whole_request(b"11:postfix a.b,") == ("postfix", b"a.b")


def test_a_remembered_request_is_not_taken_while_another_is_half_read() -> None:
    wire = encode_request("postfix", b"again.example")
    assert SocketmapDecoder().whole_request(wire) == ("postfix", b"again.example")  # now remembered
    decoder = SocketmapDecoder()
    assert decoder.feed(wire[:5]) == []
    assert decoder.whole_request(wire) is None
    with pytest.raises(FramingError):
        decoder.feed(wire)  # the general path sees the bytes as they really stand
