"""Tests for the sans-IO tcp_table (%XX line) codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postfix_mtasts.codec import FramingError, MalformedRequest, ReplyTooLong
from postfix_mtasts.codec.tcptable import (
    TCP_TABLE_CODES,
    TcpTableDecoder,
    TcpTableReplyDecoder,
    TcpTableRequest,
    encode_reply,
    encode_request,
    quote,
    unquote,
)
from postfix_mtasts.limits import TCP_TABLE_MAX_LINE
from tests.support.chunks import one_byte_chunks, run, split

# --- quoting ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "quoted"),
    [
        (b"example.com", b"example.com"),
        (b"%", b"%25"),
        (b" ", b"%20"),
        (b"\t\n\r\x0b\x0c", b"%09%0A%0D%0B%0C"),
        (b"\x00\x01\x1f\x7f", b"%00%01%1F%7F"),
        (b"\x80\xc3\xa9\xff", b"%80%C3%A9%FF"),
        (b"!~\"#$&'()*+,-./:;<=>?@[\\]^_`{|}", b"!~\"#$&'()*+,-./:;<=>?@[\\]^_`{|}"),
        (b"secure match=mx", b"secure%20match=mx"),
    ],
)
def test_quote_matches_postfix_hex_quote(raw: bytes, quoted: bytes) -> None:
    assert quote(raw) == quoted
    assert unquote(quoted) == raw


@pytest.mark.parametrize(
    ("quoted", "raw"),
    [
        (b"%c3%A9%aB", b"\xc3\xa9\xab"),  # any case, as hex_unquote accepts
        (b"plain", b"plain"),
        (b"", b""),
        (b"%2525", b"%25"),
    ],
)
def test_unquote(quoted: bytes, raw: bytes) -> None:
    assert unquote(quoted) == raw


@pytest.mark.parametrize(
    "bad", [b"%G1", b"%1G", b"%4", b"%", b"a%", b"%%41", b"%-1", b"% 1"]
)
def test_unquote_refuses_bad_escape(bad: bytes) -> None:
    with pytest.raises(ValueError, match="bad %-escape"):
        unquote(bad)


@given(st.binary(max_size=200))
def test_quote_round_trip_and_alphabet(raw: bytes) -> None:
    quoted = quote(raw)
    assert unquote(quoted) == raw
    assert all(0x21 <= byte <= 0x7E for byte in quoted)


@given(st.binary(max_size=100))
def test_unquote_fuzz_raises_only_value_error(data: bytes) -> None:
    try:
        unquote(data)
    except ValueError:
        pass


# --- request decoding: table-driven ------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"get example.com\n", [TcpTableRequest(b"example.com")]),
        (b"get example.com\r\n", [TcpTableRequest(b"example.com")]),
        (b"get a%20b%25c\n", [TcpTableRequest(b"a b%c")]),
        (b"get %c3%A9\n", [TcpTableRequest(b"\xc3\xa9")]),
        (b"get %00\n", [TcpTableRequest(b"\x00")]),
        (b"get a\nget b\n", [TcpTableRequest(b"a"), TcpTableRequest(b"b")]),
        (b"get incomplete", []),
    ],
)
def test_valid_request(wire: bytes, expected: list[object]) -> None:
    assert TcpTableDecoder().feed(wire) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"put key value", "unsupported command put"),
        (b"put key", "unsupported command put"),
        (b"GET key", "unknown tcp_table command 'GET'"),
        (b"delete key", "unknown tcp_table command 'delete'"),
        (b"", "empty tcp_table request"),
        (b"get", "tcp_table get request has no key"),
        (b"get ", "tcp_table get request has an empty key"),
        (b"get %G1", "tcp_table get key has a bad %-escape '%G1'"),
        (b"get abc%4", "tcp_table get key has a bad %-escape '%4'"),
        (b"get a b", "unquoted whitespace"),
        (b"get a\tb", "unquoted whitespace"),
        (b"get a\rb", "unquoted whitespace"),
        (b"get\tkey", "unknown tcp_table command"),
    ],
)
def test_malformed_request(line: bytes, reason: str) -> None:
    decoder = TcpTableDecoder()
    [event] = decoder.feed(line + b"\n")
    assert isinstance(event, MalformedRequest)
    assert reason in event.reason
    assert "\n" not in event.reason
    # The connection stays usable after a malformed request.
    assert decoder.feed(b"get x\n") == [TcpTableRequest(b"x")]


def test_line_of_exactly_the_limit_is_accepted() -> None:
    # The limit counts the LF, like dict_tcp's 4096-byte reply bound.
    key = b"k" * (TCP_TABLE_MAX_LINE - len(b"get \n"))
    wire = b"get " + key + b"\n"
    assert len(wire) == TCP_TABLE_MAX_LINE
    assert TcpTableDecoder().feed(wire) == [TcpTableRequest(key)]
    assert run(TcpTableDecoder().feed, one_byte_chunks(wire)) == (
        [TcpTableRequest(key)],
        None,
    )


def test_line_one_byte_over_the_limit_is_a_framing_error() -> None:
    wire = b"get " + b"k" * (TCP_TABLE_MAX_LINE + 1 - len(b"get \n")) + b"\n"
    decoder = TcpTableDecoder()
    with pytest.raises(FramingError, match="longer than 4096 bytes"):
        decoder.feed(wire)
    assert decoder.buffered == 0


def test_long_line_without_lf_fails_without_waiting() -> None:
    decoder = TcpTableDecoder()
    assert decoder.feed(b"get " + b"k" * (TCP_TABLE_MAX_LINE - 5)) == []
    assert decoder.buffered == TCP_TABLE_MAX_LINE - 1  # could still end in LF
    with pytest.raises(FramingError, match="tcp_table request line longer than 4096"):
        decoder.feed(b"k")


def test_decoder_stays_broken_after_framing_error() -> None:
    decoder = TcpTableDecoder(max_line=10)
    with pytest.raises(FramingError) as caught:
        decoder.feed(b"get 0123456789")
    with pytest.raises(FramingError) as again:
        decoder.feed(b"get x\n")
    assert str(again.value) == str(caught.value)


def test_events_before_a_framing_error_travel_on_the_error() -> None:
    with pytest.raises(FramingError) as caught:
        TcpTableDecoder(max_line=10).feed(b"get a\nput b\nget 0123456789\n")
    assert caught.value.decoded == (
        TcpTableRequest(b"a"),
        MalformedRequest("unsupported command put"),
    )


def test_buffered_tracks_partial_line() -> None:
    decoder = TcpTableDecoder()
    assert decoder.feed(b"get exam") == []
    assert decoder.buffered == 8
    assert decoder.feed(b"ple.com\r\nget") == [TcpTableRequest(b"example.com")]
    assert decoder.buffered == 3


# --- encoding -----------------------------------------------------------------


def test_encode_request() -> None:
    assert encode_request(b"example.com") == b"get example.com\n"
    assert encode_request(b"a b%\n") == b"get a%20b%25%0A\n"


@pytest.mark.parametrize(
    ("code", "text", "wire"),
    [
        (
            200,
            "secure match=mx servername=hostname",
            b"200 secure%20match=mx%20servername=hostname\n",
        ),
        (500, "not found", b"500 not%20found\n"),
        (400, "", b"400 \n"),
        (400, "caf\u00e9 100%", b"400 caf%C3%A9%20100%25\n"),
        (200, "line\nbreak", b"200 line%0Abreak\n"),
    ],
)
def test_encode_reply(code: int, text: str, wire: bytes) -> None:
    assert encode_reply(code, text) == wire
    assert TcpTableReplyDecoder().feed(wire) == [(code, text)]


@pytest.mark.parametrize("code", [0, 201, 300, 404, 999])
def test_encode_reply_refuses_other_codes(code: int) -> None:
    with pytest.raises(ValueError, match="unknown tcp_table reply code"):
        encode_reply(code, "x")


def test_reply_of_exactly_the_limit_is_accepted() -> None:
    text = "t" * (TCP_TABLE_MAX_LINE - len("200 \n"))
    line = encode_reply(200, text)
    assert len(line) == TCP_TABLE_MAX_LINE
    assert TcpTableReplyDecoder().feed(line) == [(200, text)]


def test_reply_one_byte_over_the_limit_raises() -> None:
    with pytest.raises(ReplyTooLong, match="4097 bytes exceeds the 4096-byte limit"):
        encode_reply(200, "t" * (TCP_TABLE_MAX_LINE + 1 - len("200 \n")))


def test_reply_limit_counts_quoted_bytes() -> None:
    # Each space becomes three bytes on the wire.
    assert len(encode_reply(200, " " * 3, max_line=14)) == 14
    with pytest.raises(ReplyTooLong):
        encode_reply(200, " " * 3, max_line=13)


@pytest.mark.parametrize(
    "wire",
    [b"20 x\n", b"200x\n", b"abc x\n", b"200\n", b"200 %G1\n", b"20a x\n"],
)
def test_reply_decoder_refuses_malformed_reply(wire: bytes) -> None:
    decoder = TcpTableReplyDecoder()
    with pytest.raises(FramingError, match="malformed tcp_table reply"):
        decoder.feed(wire)
    with pytest.raises(FramingError, match="malformed tcp_table reply"):
        decoder.feed(b"200 ok\n")


def test_reply_decoder_refuses_long_line() -> None:
    with pytest.raises(FramingError, match="tcp_table reply line longer than 10"):
        TcpTableReplyDecoder(max_line=10).feed(b"200 123456")


# --- properties ---------------------------------------------------------------

keys = st.binary(min_size=1, max_size=300)
lines = st.one_of(
    keys.map(encode_request),
    st.sampled_from([b"put a b\n", b"get %G1\n", b"\n", b"get a b\r\n", b"\r\n"]),
    st.binary(max_size=12),
)
streams = st.lists(lines, max_size=8).map(b"".join)


@given(keys)
def test_request_round_trip(key: bytes) -> None:
    assert TcpTableDecoder().feed(encode_request(key)) == [TcpTableRequest(key)]


@given(st.lists(keys, max_size=10))
def test_pipelined_round_trip(key_list: list[bytes]) -> None:
    wire = b"".join(encode_request(key) for key in key_list)
    assert TcpTableDecoder().feed(wire) == [TcpTableRequest(key) for key in key_list]


@given(
    stream=streams,
    data=st.data(),
    max_line=st.sampled_from([8, 64, TCP_TABLE_MAX_LINE]),
)
def test_chunking_does_not_change_events(
    stream: bytes, data: st.DataObject, max_line: int
) -> None:
    whole = run(TcpTableDecoder(max_line).feed, [stream])
    assert run(TcpTableDecoder(max_line).feed, one_byte_chunks(stream)) == whole
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    assert run(TcpTableDecoder(max_line).feed, split(stream, cuts)) == whole


@given(stream=st.binary(max_size=200), data=st.data())
def test_fuzz_only_framing_errors(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    decoder = TcpTableDecoder(max_line=50)
    for chunk in split(stream, cuts):
        try:
            events = decoder.feed(chunk)
        except FramingError:
            return
        assert all(isinstance(e, (TcpTableRequest, MalformedRequest)) for e in events)
    assert decoder.buffered < 50


@given(code=st.sampled_from(TCP_TABLE_CODES), text=st.text(max_size=300))
def test_reply_round_trip(code: int, text: str) -> None:
    assert TcpTableReplyDecoder().feed(encode_reply(code, text)) == [(code, text)]


@given(
    replies=st.lists(st.tuples(st.sampled_from(TCP_TABLE_CODES), st.text(max_size=50))),
    data=st.data(),
)
def test_reply_decoder_chunking(
    replies: list[tuple[int, str]], data: st.DataObject
) -> None:
    wire = b"".join(encode_reply(code, text) for code, text in replies)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    assert run(TcpTableReplyDecoder().feed, split(wire, cuts)) == (replies, None)
    assert run(TcpTableReplyDecoder().feed, one_byte_chunks(wire)) == (replies, None)


@given(stream=st.binary(max_size=200))
def test_reply_decoder_fuzz_only_framing_errors(stream: bytes) -> None:
    try:
        TcpTableReplyDecoder(max_line=50).feed(stream)
    except FramingError:
        pass
