"""Sans-IO codec for Postfix's socketmap protocol (socketmap_table(5)).

Each request and reply is one netstring, ``<decimal length>:<payload>,``.
A request's payload is ``NAME SP KEY``; a reply's is ``STATUS SP DATA``.

Framing rules, chosen to match what Postfix sends and to bound memory early:

* The length must be decimal digits without leading zeros (``0`` alone is
  allowed). Postfix writes lengths with ``%ld`` and so never sends a leading
  zero; refusing them also keeps the length prefix at most as long as the
  decimal form of the limit.
* A length is refused as soon as its digits read so far exceed the limit, so a
  hostile ``99999999...`` prefix is rejected after a few bytes, before any
  payload is buffered.
* The limits count the payload only, not the netstring encapsulation, as
  Postfix's own ``netstring_get`` limit does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from postfix_mtasts.codec import FramingError, MalformedRequest, ReplyTooLong, printable
from postfix_mtasts.limits import SOCKETMAP_MAX_REPLY, SOCKETMAP_MAX_REQUEST

__all__ = [
    "SOCKETMAP_STATUSES",
    "FramingError",
    "MalformedRequest",
    "ReplyTooLong",
    "SocketmapDecoder",
    "SocketmapEvent",
    "SocketmapReplyDecoder",
    "SocketmapRequest",
    "encode_reply",
    "encode_request",
]

#: The reply statuses this daemon sends. Postfix also knows ``TIMEOUT``, which
#: it treats like ``TEMP``; we never need it.
SOCKETMAP_STATUSES: Final = ("OK", "NOTFOUND", "TEMP", "PERM")

#: Whole requests already decoded by :meth:`SocketmapDecoder.whole_request`,
#: shared by every connection: Postfix asks for the same next hops again and
#: again. Cleared when full; the hot ones come back at once.
WHOLE_REQUESTS_KEPT = 4096
_WHOLE_REQUESTS: dict[bytes, tuple[str, bytes]] = {}

_COLON: Final = ord(":")
_COMMA: Final = ord(",")
_ZERO: Final = ord("0")
_NINE: Final = ord("9")


@dataclass(frozen=True, slots=True)
class SocketmapRequest:
    """One lookup: ``key`` in the socketmap called ``name`` (e.g. ``postfix``).

    The name is decoded as ASCII with undecodable bytes replaced, so a name
    with such bytes simply matches no configured map.
    """

    name: str
    key: bytes


SocketmapEvent = SocketmapRequest | MalformedRequest


class _NetstringReader:
    """Incremental netstring splitter with a payload size limit."""

    def __init__(self, limit: int, what: str) -> None:
        self._limit = limit
        self._what = what
        self._buffer = bytearray()
        # Header parse state: digits seen so far and their value. Once the
        # ':' has been read, _payload_length is set and the header is gone
        # from the buffer.
        self._digits = 0
        self._value = 0
        self._payload_length: int | None = None
        self._error: str | None = None
        # Longest length prefix within the limit, for the one-chunk path.
        self._max_digits = len(str(limit))

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def idle(self) -> bool:
        """Nothing buffered, no length half read, no error: a fresh start."""
        return not self._buffer and self._payload_length is None and self._error is None

    def whole_if_idle(self, data: bytes) -> bytes | None:
        """The payload when nothing is buffered and ``data`` is exactly one
        valid netstring; None otherwise (``feed`` then handles ``data``)."""
        if not self.idle:
            return None
        return self._whole(data)

    def feed(self, data: bytes) -> tuple[list[bytes], str | None]:
        """Return the complete payloads in ``data`` and the framing error met, if any."""
        if self._error is not None:
            return [], self._error
        if not self._buffer and self._payload_length is None:
            # Postfix sends each request whole: take the one-netstring case
            # without copying through the buffer; anything else goes below.
            payload = self._whole(data)
            if payload is not None:
                return [payload], None
        self._buffer += data
        payloads: list[bytes] = []
        while True:
            if self._payload_length is None and not self._read_header():
                break
            length = self._payload_length
            assert length is not None
            if len(self._buffer) < length + 1:
                break
            if self._buffer[length] != _COMMA:
                self._fail(
                    f"netstring of length {length} not followed by ',' "
                    f"(got '{printable(bytes(self._buffer[length : length + 1]))}')"
                )
                break
            payloads.append(bytes(self._buffer[:length]))
            del self._buffer[: length + 1]
            self._payload_length = None
        return payloads, self._error

    def _whole(self, data: bytes) -> bytes | None:
        """The payload when ``data`` is exactly one valid netstring, else None.

        Accepts precisely what the incremental path accepts for such a chunk
        (digits, no leading zero, within the limit), so both give the same result.
        """
        colon = data.find(b":", 0, self._max_digits + 1)
        if colon < 1:
            return None
        head = data[:colon]
        if not head.isdigit() or (colon > 1 and data[0] == _ZERO):
            return None
        length = int(head)
        if length > self._limit or len(data) != colon + length + 2 or data[-1] != _COMMA:
            return None
        return data[colon + 1 : -1]

    def _read_header(self) -> bool:
        """Consume the length prefix if complete; False when more bytes are needed."""
        buffer = self._buffer
        position = self._digits
        while position < len(buffer):
            byte = buffer[position]
            if byte == _COLON:
                if self._digits == 0:
                    self._fail("netstring length is empty")
                    return False
                self._payload_length = self._value
                del buffer[: position + 1]
                self._digits = 0
                self._value = 0
                return True
            if not _ZERO <= byte <= _NINE:
                self._fail(
                    f"netstring length contains '{printable(bytes([byte]))}', "
                    "expected a digit or ':'"
                )
                return False
            if self._digits == 1 and self._value == 0:
                self._fail("netstring length has a leading zero")
                return False
            self._value = self._value * 10 + (byte - _ZERO)
            self._digits += 1
            if self._value > self._limit:
                self._fail(f"{self._what} longer than {self._limit} bytes")
                return False
            position += 1
        return False

    def _fail(self, reason: str) -> None:
        self._error = reason
        self._buffer.clear()


class SocketmapDecoder:
    """Server side: turns bytes from Postfix into requests.

    ``feed`` returns every complete request in order, pipelined ones included.
    It raises :class:`FramingError` when the stream is broken; the decoder then
    stays broken and every later ``feed`` raises the same error.
    """

    def __init__(self, max_request: int = SOCKETMAP_MAX_REQUEST) -> None:
        self._reader = _NetstringReader(max_request, "socketmap request")

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a request."""
        return self._reader.buffered

    def whole_request(self, data: bytes) -> tuple[str, bytes] | None:
        """``(name, key)`` when ``data`` is exactly one well-formed request and
        nothing is buffered, as Postfix sends them; None for anything else,
        which :meth:`feed` must then be given. Decodes like :meth:`feed`."""
        known = _WHOLE_REQUESTS.get(data)
        reader = self._reader
        # NetstringReader.idle spelt out: this runs for every request.
        if (known is not None and not reader._buffer
                and reader._payload_length is None and reader._error is None):
            return known
        payload = reader.whole_if_idle(data)
        if payload is None:
            return None
        name, space, key = payload.partition(b" ")
        if not (space and name and key):
            return None
        request = name.decode("ascii", "replace"), key
        if len(_WHOLE_REQUESTS) >= WHOLE_REQUESTS_KEPT:
            _WHOLE_REQUESTS.clear()
        _WHOLE_REQUESTS[data] = request
        return request

    def feed(self, data: bytes) -> list[SocketmapEvent]:
        payloads, error = self._reader.feed(data)
        events = [_parse_request(payload) for payload in payloads]
        if error is not None:
            raise FramingError(error, tuple(events))
        return events


def _parse_request(payload: bytes) -> SocketmapEvent:
    if not payload:
        return MalformedRequest("socketmap request is empty")
    name, space, key = payload.partition(b" ")
    if not space:
        return MalformedRequest(
            f"socketmap request has no space between name and key: '{printable(payload)}'"
        )
    if not name:
        return MalformedRequest("socketmap request has an empty map name")
    if not key:
        return MalformedRequest(
            f"socketmap request for map '{printable(name)}' has an empty key"
        )
    return SocketmapRequest(name=name.decode("ascii", "replace"), key=key)


def _netstring(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)


def encode_reply(
    status: str, data: str = "", max_reply: int = SOCKETMAP_MAX_REPLY
) -> bytes:
    """Encode ``STATUS SP DATA`` as a netstring; NOTFOUND becomes ``NOTFOUND `` (with space).

    Raises :class:`ReplyTooLong` when the payload exceeds ``max_reply`` bytes,
    which Postfix would treat as an error, and ``ValueError`` for a status
    outside :data:`SOCKETMAP_STATUSES`.
    """
    if status not in SOCKETMAP_STATUSES:
        raise ValueError(
            f"unknown socketmap status {status!r}; use one of {SOCKETMAP_STATUSES}"
        )
    payload = f"{status} {data}".encode()
    if len(payload) > max_reply:
        raise ReplyTooLong(
            f"socketmap reply of {len(payload)} bytes exceeds the {max_reply}-byte limit"
        )
    return _netstring(payload)


def encode_request(name: str, key: bytes) -> bytes:
    """Encode a lookup of ``key`` in map ``name`` as Postfix sends it."""
    if not name or " " in name or not name.isascii():
        raise ValueError(
            f"socketmap name must be non-empty ASCII without spaces: {name!r}"
        )
    return _netstring(name.encode("ascii") + b" " + key)


class SocketmapReplyDecoder:
    """Client side: turns a server's bytes into ``(status, data)`` pairs.

    Used by tests, the benchmark client and health probes. The status is the
    text before the first space and data the rest (``""`` when there is no
    space), both decoded as UTF-8 with bad bytes replaced.
    """

    def __init__(self, max_reply: int = SOCKETMAP_MAX_REPLY) -> None:
        self._reader = _NetstringReader(max_reply, "socketmap reply")

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a reply."""
        return self._reader.buffered

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        payloads, error = self._reader.feed(data)
        replies = []
        for payload in payloads:
            status, _, text = payload.partition(b" ")
            replies.append(
                (status.decode("utf-8", "replace"), text.decode("utf-8", "replace"))
            )
        if error is not None:
            raise FramingError(error, tuple(replies))
        return replies
