"""MX patterns of RFC 8461 §3.2/§4.1: validating them, matching host names
against them, and writing them as a Postfix ``match=`` list."""

from __future__ import annotations

import re
from collections.abc import Iterable

import idna

#: Longest DNS label, in octets (RFC 1035 §2.3.4).
MAX_LABEL_OCTETS = 63
#: Longest domain name in text form without the trailing dot (RFC 1035 §2.3.4:
#: 255 octets on the wire are 253 characters of text).
MAX_DOMAIN_OCTETS = 253
#: The wildcard prefix RFC 8461 allows in an ``mx`` value.
WILDCARD_PREFIX = "*."
#: The prefix marking an IDNA A-label (RFC 5890 §2.3.2.1).
ACE_PREFIX = "xn--"
#: Separator of Postfix's ``match=`` attribute in a TLS policy.
POSTFIX_MATCH_SEPARATOR = ":"

# RFC 5321 sub-domain = Let-dig [Ldh-str]: letters, digits and inner hyphens.
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")


def check_ascii_domain(name: str) -> str:
    """Return ``name`` lower-cased if it is an RFC 5321 ``Domain`` of A-labels.

    Raises ValueError with a short reason otherwise. A single label is
    accepted (the ABNF allows it); a trailing dot is not.
    """
    if not name:
        raise ValueError("is empty")
    if not name.isascii():
        raise ValueError("is not ASCII (IDNs must be written as A-labels)")
    name = name.lower()
    if len(name) > MAX_DOMAIN_OCTETS:
        raise ValueError(f"is longer than {MAX_DOMAIN_OCTETS} characters")
    if name.endswith("."):
        raise ValueError("ends with a dot")
    for label in name.split("."):
        _check_label(label)
    return name


def _check_label(label: str) -> None:
    """Raise ValueError unless ``label`` (ASCII, lower case) is a valid LDH label."""
    if not label:
        raise ValueError("has an empty label")
    if len(label) > MAX_LABEL_OCTETS:
        raise ValueError(f"has a label longer than {MAX_LABEL_OCTETS} characters")
    if "*" in label:
        raise ValueError('has "*" other than as the whole left-most label')
    if not _LDH_LABEL.match(label):
        raise ValueError(f'has label "{label}" that is not letters, digits and inner hyphens')
    if label.startswith(ACE_PREFIX):
        # idna.ulabel decodes, checks IDNA2008 and that the label round-trips.
        try:
            idna.ulabel(label)
        except (ValueError, UnicodeError) as error:  # idna.IDNAError is a ValueError
            raise ValueError(f'has invalid A-label "{label}": {error}') from None


def validate_pattern(text: str) -> str:
    """Return the MX pattern ``text`` lower-cased, or raise ValueError with a reason.

    RFC 8461 §3.2: ``["*." ] Domain`` of A-labels. ``*`` may only be the whole
    left-most label; one-label names are allowed, as the ABNF allows them.
    """
    domain = text.removeprefix(WILDCARD_PREFIX)
    check_ascii_domain(domain)
    return text.lower()


def normalise_pattern(text: str) -> tuple[str, str | None]:
    """Like :func:`validate_pattern`, but lenient where the meaning is plain.

    One trailing dot (``MX1.Example.COM.``, a fully qualified name as zone
    files write it) is dropped rather than refused: refusing would throw away
    the whole policy, and with it the protection the domain asked for.
    Returns the pattern and, when it was rewritten, a one-line warning for the
    log; anything else invalid still raises ValueError.
    """
    if text.endswith(".") and not text.endswith(".."):
        pattern = validate_pattern(text[:-1])
        return pattern, f'"{text}" ends with a dot (not allowed in a policy); read as "{pattern}"'
    return validate_pattern(text), None


def mx_matches(pattern: str, host: str) -> bool:
    """True if MX ``host`` matches ``pattern`` under RFC 8461 §4.1.

    A ``*.`` wildcard stands for exactly one left-most label; comparison is
    case-insensitive and a trailing dot on ``host`` is ignored.
    """
    pattern = pattern.lower()
    host = host.lower()
    host = host.removesuffix(".")
    if pattern.startswith(WILDCARD_PREFIX):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[len(WILDCARD_PREFIX) :]
    return host == pattern


def postfix_match_list(patterns: Iterable[str]) -> str:
    """Write ``patterns`` as the value of Postfix's ``match=`` attribute.

    ``*.example.com`` becomes ``.example.com``; the list is lower-cased,
    de-duplicated and sorted so that the same policy always gives the same
    string.
    """
    names = set()
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern.startswith(WILDCARD_PREFIX):
            pattern = pattern[1:]
        names.add(pattern)
    return POSTFIX_MATCH_SEPARATOR.join(sorted(names))
