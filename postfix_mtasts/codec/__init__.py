"""Sans-IO codecs for Postfix's lookup-table protocols: bytes in, events out.

Nothing here does I/O or imports Twisted; a protocol feeds received bytes to a
decoder, acts on the events it returns and writes the bytes an encoder gives.
The types shared by both codecs live in this module.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FramingError", "MalformedRequest", "ReplyTooLong", "printable"]

#: Longest excerpt of peer-supplied bytes quoted in an error reason.
REASON_EXCERPT_LENGTH = 40


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """A well-framed request whose content is not a valid lookup.

    The connection stays usable: the protocol answers it with an error reply
    (socketmap ``PERM``/``TEMP``, tcp_table ``400``) and reads on.
    """

    reason: str


class FramingError(Exception):
    """The byte stream cannot be split into requests any more; close the connection.

    ``str(error)`` is a one-line reason. ``decoded`` holds the complete events
    that the failing ``feed()`` call decoded before the bad bytes, in order,
    so that a protocol may still answer them before it closes.
    """

    def __init__(self, reason: str, decoded: tuple[object, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decoded = decoded


class ReplyTooLong(ValueError):
    """The reply would exceed what Postfix accepts, so Postfix would reject it."""


def printable(data: bytes, limit: int = REASON_EXCERPT_LENGTH) -> str:
    """Render peer bytes safely for a one-line reason: ASCII, escaped, truncated."""
    text = "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte != 0x5C else f"\\x{byte:02x}"
        for byte in data[:limit]
    )
    return text + ("..." if len(data) > limit else "")
