"""Turning a Postfix TLS policy lookup key into the domain whose MTA-STS policy
applies, or into a reason to answer "not found" without any DNS query."""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

import idna

from postfix_mtasts.policy.mx import check_ascii_domain

#: Keys longer than this (in octets, before IDNA conversion) are not looked at:
#: no domain name of at most 253 octets needs that much text.
MAX_KEY_OCTETS = 1024
#: Longest piece of a key quoted in a reason.
QUOTE_LIMIT = 80
#: Postfix writes IPv6 address literals as ``[ipv6:...]``.
IPV6_LITERAL_PREFIX = "ipv6:"

BRACKETED_REASON = (
    "bracketed next-hop [host] (MX lookup suppressed; RFC 8461 §3.4 policy applies to the recipient domain)"
)

# Postfix next-hop port suffix: a number or a service name.
_PORT = re.compile(r":[a-z0-9-]+\Z")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class BracketedNextHop(enum.Enum):
    """What to do with ``[host]`` next hops (relayhost or transport without MX lookup).

    IGNORE follows RFC 8461 §3.4: the policy of the recipient domain applies,
    not the smart host's, so such a key gets no answer of its own. HOST treats
    the bracketed name as a policy domain, for setups that want that.
    """

    IGNORE = "ignore"
    HOST = "host"


@dataclass(frozen=True, slots=True)
class Resolve:
    """Look up MTA-STS for ``domain`` (A-labels, lower case, no trailing dot)."""

    domain: str


@dataclass(frozen=True, slots=True)
class Skip:
    """Answer not found without DNS; ``reason`` is one line for the log."""

    reason: str


def classify_key(key: bytes, bracketed: BracketedNextHop = BracketedNextHop.IGNORE) -> Resolve | Skip:
    """Classify one lookup key from Postfix; never raises.

    Keys starting with "." are Postfix's parent-domain probes and IP literals
    have no MTA-STS. An unbracketed ``host:port`` still gets MX lookups in
    Postfix, so it resolves to ``host`` in either mode. U-labels are converted
    with UTS-46 non-transitional processing, so ``faß.de`` is ``xn--fa-hia.de``.
    """
    if not key:
        return Skip("empty key")
    if len(key) > MAX_KEY_OCTETS:
        return Skip(f"invalid domain: key is longer than {MAX_KEY_OCTETS} octets")
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return Skip("invalid UTF-8")
    if text.startswith("."):
        return Skip("parent-domain probe")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            return Skip(f'invalid next-hop "{_quote(text)}": no closing ]')
        host, suffix = text[1:close], text[close + 1 :]
        if suffix and not _PORT.match(suffix.lower()):
            return Skip(f'invalid next-hop "{_quote(text)}": expected [host] or [host]:port')
        if _is_ip_literal(host):
            return Skip("IP literal")
        if bracketed is BracketedNextHop.IGNORE:
            return Skip(BRACKETED_REASON)
        return _policy_domain(host)
    if _is_ip_literal(text):
        return Skip("IP literal")
    host, colon, port = text.rpartition(":")
    if colon:
        if not _PORT.match(":" + port.lower()):
            return Skip(f'invalid next-hop "{_quote(text)}": bad port')
        if _is_ip_literal(host):
            return Skip("IP literal")
    else:
        host = text
    return _policy_domain(host)


def _is_ip_literal(text: str) -> bool:
    """True for an IPv4/IPv6 address or Postfix's ``ipv6:`` form."""
    if text[: len(IPV6_LITERAL_PREFIX)].lower() == IPV6_LITERAL_PREFIX:
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _policy_domain(host: str) -> Resolve | Skip:
    """Normalise ``host`` to a lower-case A-label domain, or say why it is none."""
    host = host.removesuffix(".")
    if host.isascii():
        name = host
    else:
        try:
            name = idna.encode(host, uts46=True, transitional=False).decode("ascii")
        except (ValueError, UnicodeError) as error:  # idna.IDNAError is a ValueError
            return Skip(f"invalid domain: {_quote(str(error))}")
    try:
        name = check_ascii_domain(name)
    except ValueError as error:
        return Skip(f"invalid domain: {_quote(str(error))}")
    labels = name.split(".")
    if len(labels) < 2:
        return Skip("not a domain name")
    if labels[-1].isdigit():
        return Skip("invalid domain: numeric top-level label")
    return Resolve(name)


def _quote(text: str) -> str:
    """Make ``text`` one short printable line for a reason."""
    text = _UNPRINTABLE.sub(lambda char: f"\\u{ord(char.group()):04x}", text)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."
