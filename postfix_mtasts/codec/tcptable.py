"""Sans-IO codec for Postfix's tcp_table protocol (tcp_table(5), dict_tcp.c).

Requests are lines ``get SP key LF`` and replies ``CODE SP text LF``, with key
and text %XX-quoted the way Postfix's ``hex_quote`` does it: ``%``, whitespace,
control characters and every byte outside printable ASCII become ``%XX``.

Line limit: Postfix reads a reply of at most 4096 bytes *including* its
newline. The decoder applies the same count to requests, so a request line of
``max_line - 1`` bytes plus LF is accepted and one byte more is a
:class:`FramingError`, whether or not its LF has arrived yet. A CR before the
LF is tolerated and dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from postfix_mtasts.codec import FramingError, MalformedRequest, ReplyTooLong, printable
from postfix_mtasts.limits import TCP_TABLE_MAX_LINE

__all__ = [
    "TCP_TABLE_CODES",
    "FramingError",
    "MalformedRequest",
    "ReplyTooLong",
    "TcpTableDecoder",
    "TcpTableEvent",
    "TcpTableReplyDecoder",
    "TcpTableRequest",
    "encode_reply",
    "encode_request",
    "quote",
    "unquote",
]

#: Reply codes: found, temporary error, not found.
TCP_TABLE_CODES: Final = (200, 400, 500)

_GET_PREFIX: Final = b"get "
_UNQUOTED: Final = frozenset(byte for byte in range(0x21, 0x7F) if byte != ord("%"))
_QUOTED_FORM: Final = tuple(
    bytes([byte]) if byte in _UNQUOTED else b"%%%02X" % byte for byte in range(256)
)
_ESCAPE: Final = re.compile(rb"%(.{0,2})", re.DOTALL)
_HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")
_REPLY_LINE: Final = re.compile(rb"([0-9]{3}) (.*)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class TcpTableRequest:
    """One lookup of ``key`` (already %XX-decoded)."""

    key: bytes


TcpTableEvent = TcpTableRequest | MalformedRequest


def quote(data: bytes) -> bytes:
    """%XX-encode every byte Postfix's hex_quote encodes (upper-case hex)."""
    return b"".join(_QUOTED_FORM[byte] for byte in data)


def unquote(data: bytes) -> bytes:
    """Decode %XX escapes (any case); raise ``ValueError`` on a bad escape.

    Other bytes pass through unchanged, as in Postfix's hex_unquote.
    """

    def replace(match: re.Match[bytes]) -> bytes:
        digits = match.group(1)
        if len(digits) != 2 or not all(byte in _HEX_DIGITS for byte in digits):
            raise ValueError(f"bad %-escape '{printable(match.group(0))}'")
        return bytes([int(digits, 16)])

    return _ESCAPE.sub(replace, data)


class _LineReader:
    """Incremental LF splitter with a line length limit (LF included)."""

    def __init__(self, max_line: int, what: str) -> None:
        self._max_line = max_line
        self._what = what
        self._buffer = bytearray()
        self._scanned = 0
        self._error: str | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[list[bytes], str | None]:
        """Return the complete lines (without CR LF) and the framing error met, if any."""
        if self._error is not None:
            return [], self._error
        self._buffer += data
        lines: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buffer)
                if len(self._buffer) >= self._max_line:
                    self._fail()
                break
            if end + 1 > self._max_line:
                self._fail()
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            lines.append(line[:-1] if line.endswith(b"\r") else line)
        return lines, self._error

    def _fail(self) -> None:
        self._error = f"{self._what} line longer than {self._max_line} bytes"
        self._buffer.clear()
        self._scanned = 0


class TcpTableDecoder:
    """Server side: turns bytes from Postfix into requests.

    ``feed`` returns every complete request in order. Lines that are not a
    valid ``get`` (``put``, unknown commands, bad escapes) come out as
    :class:`MalformedRequest`, to be answered with a 400 reply. An over-long
    line raises :class:`FramingError`, and the decoder stays broken.
    """

    def __init__(self, max_line: int = TCP_TABLE_MAX_LINE) -> None:
        self._reader = _LineReader(max_line, "tcp_table request")

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a line."""
        return self._reader.buffered

    def feed(self, data: bytes) -> list[TcpTableEvent]:
        lines, error = self._reader.feed(data)
        events = [_parse_request(line) for line in lines]
        if error is not None:
            raise FramingError(error, tuple(events))
        return events


def _parse_request(line: bytes) -> TcpTableEvent:
    if not line.startswith(_GET_PREFIX):
        command = line.split(b" ", 1)[0]
        if command == b"put":
            return MalformedRequest("unsupported command put")
        if not line:
            return MalformedRequest("empty tcp_table request")
        if line == _GET_PREFIX.rstrip():
            return MalformedRequest("tcp_table get request has no key")
        return MalformedRequest(f"unknown tcp_table command '{printable(command)}'")
    quoted = line[len(_GET_PREFIX) :]
    if not quoted:
        return MalformedRequest("tcp_table get request has an empty key")
    if any(byte <= 0x20 or byte == 0x7F for byte in quoted):
        # Postfix quotes all whitespace and controls, so raw ones mean a
        # second parameter or a broken client.
        return MalformedRequest(
            f"tcp_table get key contains unquoted whitespace or control bytes: "
            f"'{printable(quoted)}'"
        )
    try:
        key = unquote(quoted)
    except ValueError as error:
        return MalformedRequest(f"tcp_table get key has a {error}")
    return TcpTableRequest(key=key)


def encode_reply(code: int, text: str, max_line: int = TCP_TABLE_MAX_LINE) -> bytes:
    """Encode ``CODE SP quoted-text LF``; text is UTF-8, then %XX-quoted.

    Raises ``ValueError`` for a code other than 200, 400 or 500, and
    :class:`ReplyTooLong` when the line with its LF exceeds ``max_line``,
    which Postfix would reject.
    """
    if code not in TCP_TABLE_CODES:
        raise ValueError(
            f"unknown tcp_table reply code {code!r}; use one of {TCP_TABLE_CODES}"
        )
    line = b"%d %b\n" % (code, quote(text.encode()))
    if len(line) > max_line:
        raise ReplyTooLong(
            f"tcp_table reply line of {len(line)} bytes exceeds the {max_line}-byte limit"
        )
    return line


def encode_request(key: bytes) -> bytes:
    """Encode a lookup of ``key`` as Postfix sends it."""
    return _GET_PREFIX + quote(key) + b"\n"


class TcpTableReplyDecoder:
    """Client side: turns a server's bytes into ``(code, text)`` pairs.

    Used by tests, the benchmark client and health probes. The text is
    unquoted and decoded as UTF-8 with bad bytes replaced. A reply that is not
    ``DDD SP text`` with valid escapes raises :class:`FramingError`, since
    Postfix drops the connection on such a reply too.
    """

    def __init__(self, max_line: int = TCP_TABLE_MAX_LINE) -> None:
        self._reader = _LineReader(max_line, "tcp_table reply")
        self._error: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a reply."""
        return self._reader.buffered

    def feed(self, data: bytes) -> list[tuple[int, str]]:
        if self._error is not None:
            raise FramingError(self._error)
        lines, error = self._reader.feed(data)
        replies: list[tuple[int, str]] = []
        for line in lines:
            match = _REPLY_LINE.fullmatch(line)
            try:
                if match is None:
                    raise ValueError(f"not 'CODE SP text': '{printable(line)}'")
                text = unquote(match.group(2))
            except ValueError as problem:
                error = f"malformed tcp_table reply: {problem}"
                break
            replies.append((int(match.group(1)), text.decode("utf-8", "replace")))
        if error is not None:
            self._error = error
            raise FramingError(error, tuple(replies))
        return replies
