"""The ``_mta-sts`` TXT record of RFC 8461 §3.1: choosing the one STSv1 record
among a name's TXT records and reading its policy id."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from postfix_mtasts import limits

#: Discovery rule of RFC 8461 §3.1: records not beginning with this (then
#: *WSP ";") are discarded before counting.
_STS_PREFIX = re.compile(rb"v=STSv1[ \t]*;")
_VERSION = b"v=STSv1"
_WSP = " \t"
# sts-ext-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
# sts-ext-value = 1*(%x21-3A / %x3C / %x3E-7E): visible ASCII except ";" and "="
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")
# sts-id = %s"id=" 1*32(ALPHA / DIGIT)
_ID_VALUE = re.compile(rf"[A-Za-z0-9]{{1,{limits.POLICY_ID_MAX_LENGTH}}}\Z")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
#: Longest piece of a record quoted in a reason.
QUOTE_LIMIT = 40


@dataclass(frozen=True, slots=True)
class TxtParse:
    """Outcome of reading a name's TXT records.

    ``policy_id`` is set when exactly one valid STSv1 record exists; otherwise
    ``reason`` says why the domain counts as having no MTA-STS. ``record`` is
    the chosen record (escaped for logs) when there was exactly one.
    """

    policy_id: str | None
    reason: str = ""
    record: str = ""


def parse_sts_records(records: Sequence[bytes]) -> TxtParse:
    """Pick the single ``v=STSv1`` record from ``records`` and read its id.

    Each element is one TXT record with its character-strings already joined.
    Never raises: bad bytes make a record invalid (or discarded).
    """
    candidates = [record for record in records if _STS_PREFIX.match(record)]
    if not candidates:
        return TxtParse(policy_id=None, reason="no v=STSv1 record")
    if len(candidates) > 1:
        return TxtParse(
            policy_id=None,
            reason=f"{len(candidates)} v=STSv1 records; exactly one is allowed",
        )
    raw = candidates[0]
    record = _printable(raw)
    try:
        policy_id = _read_id(raw)
    except ValueError as error:
        return TxtParse(policy_id=None, reason=f"invalid v=STSv1 record: {error}", record=record)
    return TxtParse(policy_id=policy_id, record=record)


def _read_id(raw: bytes) -> str:
    """Check ``raw`` (known to begin with v=STSv1 *WSP ";") and return its id.

    Follows RFC 8461 §3.1's ABNF, except that trailing WSP after the last
    field is tolerated. Unknown ``name=value`` fields are ignored; every field
    named ``id`` must be a valid id and the first one counts.
    """
    if not raw.isascii():
        raise ValueError("not US-ASCII")
    text = raw[len(_VERSION) :].decode("ascii")
    # The prefix check guarantees text begins with *WSP ";", so pieces[0] is WSP.
    pieces = text.split(";")[1:]
    if pieces and not pieces[-1].strip(_WSP):
        pieces.pop()  # one trailing sts-field-delim
    if not pieces:
        raise ValueError("missing id")
    policy_id: str | None = None
    for piece in pieces:
        field = piece.strip(_WSP)
        if not field:
            raise ValueError("empty field between semicolons")
        name, equals, value = field.partition("=")
        if not equals:
            raise ValueError(f'field "{_quote(field)}" is not name=value')
        if name == "id":
            if not _ID_VALUE.match(value):
                raise ValueError(
                    f'id "{_quote(value)}" is not 1 to {limits.POLICY_ID_MAX_LENGTH} letters or digits'
                )
            if policy_id is None:
                policy_id = value
        elif not _EXT_NAME.match(name):
            raise ValueError(f'field name "{_quote(name)}" is invalid')
        elif not _EXT_VALUE.match(value):
            raise ValueError(f'field {name} has invalid value "{_quote(value)}"')
    if policy_id is None:
        raise ValueError("missing id")
    return policy_id


def _printable(raw: bytes) -> str:
    """The record as text for a log line: bytes outside printable ASCII become ``\\xNN``."""
    return _UNPRINTABLE.sub(lambda byte: f"\\x{ord(byte.group()):02x}", raw.decode("latin-1"))


def _quote(text: str) -> str:
    """Shorten ``text`` for a reason, escaping anything unprintable."""
    text = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."
