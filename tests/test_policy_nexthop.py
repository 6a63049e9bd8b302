"""Tests for classifying Postfix lookup keys into policy domains."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from postfix_mtasts.policy.nexthop import (
    BRACKETED_REASON,
    BracketedNextHop,
    Resolve,
    Skip,
    classify_key,
)

IGNORE = BracketedNextHop.IGNORE
HOST = BracketedNextHop.HOST

RESOLVE = [
    # (key, domain) -- the same in both modes
    (b"example.com", "example.com"),
    (b"Example.COM", "example.com"),
    (b"example.com.", "example.com"),
    (b"mail.sub.example.co.uk", "mail.sub.example.co.uk"),
    (b"b\xc3\xbccher.example", "xn--bcher-kva.example"),  # bücher.example
    (b"B\xc3\x9cCHER.Example.", "xn--bcher-kva.example"),  # BÜCHER.Example.
    (b"bu\xcc\x88cher.example", "xn--bcher-kva.example"),  # decomposed ü, NFC first
    (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
    (b"XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
    (b"fa\xc3\x9f.de", "xn--fa-hia.de"),  # faß.de, non-transitional: ß stays
    (b"FASS.de", "fass.de"),
    (b"\xe4\xbe\x8b\xe3\x81\x88.\xe3\x83\x86\xe3\x82\xb9\xe3\x83\x88", "xn--r8jz45g.xn--zckzah"),
    (b"example\xe3\x80\x82com", "example.com"),  # ideographic full stop maps to "."
    (b"mail.example.com:25", "mail.example.com"),  # host:port still gets MX lookups
    (b"mail.example.com:smtp", "mail.example.com"),
    (b"123.example", "123.example"),
    (b"ab--cd.example", "ab--cd.example"),
    (b"a" * 63 + b".example", "a" * 63 + ".example"),
]


@pytest.mark.parametrize(("key", "domain"), RESOLVE)
@pytest.mark.parametrize("mode", [IGNORE, HOST])
def test_resolve(key: bytes, domain: str, mode: BracketedNextHop) -> None:
    assert classify_key(key, mode) == Resolve(domain)


SKIP = [
    # (key, reason substring) -- the same in both modes
    (b"", "empty key"),
    (b".example.com", "parent-domain probe"),
    (b".", "parent-domain probe"),
    (b"\xff", "invalid UTF-8"),
    (b"b\xfccher.example", "invalid UTF-8"),  # Latin-1, not UTF-8
    (b"\xed\xa0\x80.example", "invalid UTF-8"),  # an encoded surrogate
    (b"1.2.3.4", "IP literal"),
    (b"1.2.3.4:25", "IP literal"),
    (b"2001:db8::1", "IP literal"),
    (b"[1.2.3.4]", "IP literal"),
    (b"[1.2.3.4]:25", "IP literal"),
    (b"[ipv6:2001:db8::1]", "IP literal"),
    (b"[IPv6:2001:db8::1]:587", "IP literal"),
    (b"[2001:db8::1]", "IP literal"),
    (b"localhost", "not a domain name"),
    (b"com.", "not a domain name"),
    (b"01.2.3.4", "invalid domain: numeric top-level label"),
    (b"a" * 64 + b".example", "invalid domain: has a label longer than 63 characters"),
    (b".".join([b"a" * 63] * 4), "invalid domain: is longer than 253 characters"),
    (b"x" * 2000, "longer than 1024 octets"),
    (b"example..com", "invalid domain: has an empty label"),
    (b"example.com..", "invalid domain: ends with a dot"),
    (b"-x.example", 'invalid domain: has label "-x"'),
    (b"_mta-sts.example.com", 'has label "_mta-sts"'),
    (b"exa mple.com", 'has label "exa mple"'),
    (b"a\nb.example", 'has label "a\\u000ab"'),
    (b"xn--abc.example", 'invalid domain: has invalid A-label "xn--abc"'),
    (b"\xe2\x9d\xa4.example", "invalid domain: Codepoint U+2764"),  # emoji, not IDNA2008
    (b"b\xc3\xbccher..example", "invalid domain"),
    (b"example.com:", "bad port"),
    (b"example.com:2 5", "bad port"),
    (b"[example.com", "no closing ]"),
    (b"[example.com]x", "expected [host] or [host]:port"),
    (b"[example.com]:", "expected [host] or [host]:port"),
]


@pytest.mark.parametrize(("key", "reason"), SKIP)
@pytest.mark.parametrize("mode", [IGNORE, HOST])
def test_skip(key: bytes, reason: str, mode: BracketedNextHop) -> None:
    result = classify_key(key, mode)
    assert isinstance(result, Skip)
    assert reason in result.reason


BRACKETED = [
    (b"[mail.example.com]", "mail.example.com"),
    (b"[mail.example.com]:587", "mail.example.com"),
    (b"[Mail.Example.COM.]:submission", "mail.example.com"),
    (b"[b\xc3\xbccher.example]", "xn--bcher-kva.example"),
]


@pytest.mark.parametrize(("key", "domain"), BRACKETED)
def test_bracketed_ignored_by_default(key: bytes, domain: str) -> None:
    assert classify_key(key) == Skip(BRACKETED_REASON)
    assert classify_key(key, IGNORE) == Skip(BRACKETED_REASON)


@pytest.mark.parametrize(("key", "domain"), BRACKETED)
def test_bracketed_as_host(key: bytes, domain: str) -> None:
    assert classify_key(key, HOST) == Resolve(domain)


def test_bracketed_reason_text() -> None:
    assert BRACKETED_REASON == (
        "bracketed next-hop [host] (MX lookup suppressed;"
        " RFC 8461 §3.4 policy applies to the recipient domain)"
    )


@pytest.mark.parametrize(
    ("key", "reason"),
    [(b"[localhost]", "not a domain name"), (b"[]", "is empty"), (b"[a..b]:25", "empty label")],
)
def test_bracketed_host_is_validated(key: bytes, reason: str) -> None:
    result = classify_key(key, HOST)
    assert isinstance(result, Skip)
    assert reason in result.reason


def test_mode_values() -> None:
    assert BracketedNextHop("ignore") is IGNORE
    assert BracketedNextHop("host") is HOST


def check_result(result: Resolve | Skip) -> None:
    if isinstance(result, Skip):
        assert result.reason
        assert result.reason.isprintable()
    else:
        assert isinstance(result, Resolve)
        domain = result.domain
        assert domain.isascii() and domain == domain.lower()
        assert "." in domain and not domain.endswith(".")
        assert len(domain) <= 253
        # A resolved domain is a fixed point.
        assert classify_key(domain.encode()) == result


@given(st.binary(max_size=300), st.sampled_from(BracketedNextHop))
@example(b"[", IGNORE)
@example(b"[]:", HOST)
@example(b"\xc3\x9f" * 300, HOST)
@example(b"\xc2\xad" * 300 + b".de", HOST)  # soft hyphens map to nothing
def test_never_raises_on_bytes(key: bytes, mode: BracketedNextHop) -> None:
    check_result(classify_key(key, mode))


KEY_PIECES = [*"ab1-.:[]ÜüßﬁΣ\u200d\u3002\x00", "xn--", "ipv6:", "bücher"]
KEY_TEXT = st.lists(st.sampled_from(KEY_PIECES), max_size=30).map("".join)


@given(KEY_TEXT, st.sampled_from(BracketedNextHop))
def test_never_raises_on_key_like_text(text: str, mode: BracketedNextHop) -> None:
    check_result(classify_key(text.encode("utf-8"), mode))


@given(st.text(max_size=80), st.sampled_from(BracketedNextHop))
def test_never_raises_on_any_unicode(text: str, mode: BracketedNextHop) -> None:
    check_result(classify_key(text.encode("utf-8", "surrogatepass"), mode))
