"""Parsing the MTA-STS policy file (RFC 8461 §3.2) into a :class:`Policy`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from postfix_mtasts import limits
from postfix_mtasts.policy.model import Mode, Policy
from postfix_mtasts.policy.mx import normalise_pattern

#: The only policy version RFC 8461 defines.
POLICY_VERSION = "STSv1"
#: A UTF-8 byte order mark, tolerated (and dropped) at the start of a body.
UTF8_BOM = "\ufeff"
#: Longest piece of a policy quoted in an error message.
QUOTE_LIMIT = 64

# sts-policy-ext-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
# field-delim = ":" *WSP; the value runs to the end of the line, trailing WSP dropped.
_FIELD = re.compile(r"(?P<key>[^:]*):[ \t]*(?P<value>.*?)[ \t]*\Z", re.DOTALL)
# sts-policy-max-age-value = 1*10(DIGIT)
_MAX_AGE = re.compile(r"[0-9]{1,10}\Z")
# sts-policy-ext-value: no controls (C0 or DEL); UTF-8 is allowed.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_MODES = {mode.value: mode for mode in Mode}


class PolicyError(ValueError):
    """A policy body that is not a valid RFC 8461 policy; str() is a one-line reason."""


@dataclass(frozen=True, slots=True)
class ReadPolicy:
    """A parsed policy and what was wrong but forgiven, one line each, for the log."""

    policy: Policy
    warnings: tuple[str, ...] = ()


def parse_policy(body: bytes) -> Policy:
    """The policy in ``body`` (see :func:`read_policy`), without its warnings."""
    return read_policy(body).policy


def read_policy(body: bytes) -> ReadPolicy:
    """Parse and validate a policy body, or raise :class:`PolicyError`.

    Follows RFC 8461 §3.2 with these decisions: lines end in LF or CRLF and
    the last one may lack it; empty (or blank) lines are ignored; a UTF-8 BOM
    at the start is ignored; keys and values are case-sensitive; the first
    occurrence of every key but ``mx`` wins and later ones are only checked for
    syntax; unknown keys are ignored; ``mx`` values are always validated, even
    with ``mode: none``, and compared in lower case; one with a trailing dot
    is read without it, with a warning, rather than refused
    (mx.normalise_pattern). A ``max_age`` above ``limits.MAX_AGE_LIMIT`` is
    accepted but treated as that maximum, so a domain asking for a long cache
    life gets the longest RFC 8461 allows rather than nothing.
    """
    if len(body) > limits.POLICY_BODY_LIMIT:
        raise PolicyError(f"policy is longer than {limits.POLICY_BODY_LIMIT} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyError(
            f"policy is not UTF-8 (bad byte at offset {error.start})"
        ) from None
    text = text.removeprefix(UTF8_BOM)

    fields: dict[str, tuple[int, str]] = {}
    mx: list[str] = []
    warnings: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        key, value = _split_field(number, line)
        if key == "mx":
            try:
                pattern, warning = normalise_pattern(value)
            except ValueError as error:
                raise PolicyError(
                    f'line {number}: mx "{_shorten(value)}" {error}'
                ) from None
            if warning is not None:
                warnings.append(f"line {number}: mx {warning}")
            if pattern not in mx:
                mx.append(pattern)
        elif key not in fields:
            fields[key] = (number, value)

    version = _required(fields, "version")
    if version[1] != POLICY_VERSION:
        raise PolicyError(
            f'line {version[0]}: version "{_shorten(version[1])}" is not {POLICY_VERSION}'
        )
    mode_field = _required(fields, "mode")
    mode = _MODES.get(mode_field[1])
    if mode is None:
        raise PolicyError(
            f'line {mode_field[0]}: mode "{_shorten(mode_field[1])}" is not enforce, testing or none'
        )
    max_age_field = _required(fields, "max_age")
    if not _MAX_AGE.match(max_age_field[1]):
        raise PolicyError(
            f'line {max_age_field[0]}: max_age "{_shorten(max_age_field[1])}" is not 1 to 10 digits'
        )
    max_age = min(int(max_age_field[1]), limits.MAX_AGE_LIMIT)
    if not mx and mode is not Mode.NONE:
        raise PolicyError(f"no mx line (required with mode {mode.value})")
    return ReadPolicy(Policy(mode=mode, max_age=max_age, mx=tuple(mx)), tuple(warnings))


def _split_field(number: int, line: str) -> tuple[str, str]:
    """Split one non-blank line into key and value, checking the generic syntax."""
    match = _FIELD.match(line)
    if match is None:
        raise PolicyError(f'line {number}: "{_shorten(line)}" is not "key: value"')
    key, value = match.group("key"), match.group("value")
    if not _KEY.match(key):
        raise PolicyError(
            f'line {number}: key "{_shorten(key)}" is not a valid field name'
        )
    if not value:
        raise PolicyError(f"line {number}: {key} has an empty value")
    if _CONTROL.search(value):
        raise PolicyError(f"line {number}: {key} value contains a control character")
    return key, value


def _required(fields: dict[str, tuple[int, str]], key: str) -> tuple[int, str]:
    """Return (line number, value) of a required field or raise PolicyError."""
    try:
        return fields[key]
    except KeyError:
        raise PolicyError(f"no {key} line") from None


def _shorten(text: str) -> str:
    """Make ``text`` safe and short enough to quote in a one-line log message."""
    text = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."
