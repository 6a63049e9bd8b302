"""Tests for MX pattern validation, RFC 8461 §4.1 matching and Postfix match lists."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postfix_mtasts.policy.mx import (
    check_ascii_domain,
    mx_matches,
    normalise_pattern,
    postfix_match_list,
    validate_pattern,
)

VALID_PATTERNS = [
    ("mail.example.com", "mail.example.com"),
    ("*.example.net", "*.example.net"),
    ("MX1.Example.COM", "mx1.example.com"),
    ("*.EXAMPLE.com", "*.example.com"),
    ("localhost", "localhost"),  # one label: RFC 5321 Domain allows it
    ("*.com", "*.com"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ("mx-1.a1.example", "mx-1.a1.example"),
    ("ab--cd.example", "ab--cd.example"),  # R-LDH label that is not xn-- is LDH
    ("1.2.3.4", "1.2.3.4"),  # digits are Let-dig
    ("a" * 63 + ".example", "a" * 63 + ".example"),
    (".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),
]


@pytest.mark.parametrize(("text", "expected"), VALID_PATTERNS)
def test_valid_patterns(text: str, expected: str) -> None:
    assert validate_pattern(text) == expected


INVALID_PATTERNS = [
    ("", "is empty"),
    ("*.", "is empty"),
    ("*", 'has "*" other than as the whole left-most label'),
    ("*mail.example.com", 'has "*"'),
    ("mail*.example.com", 'has "*"'),
    ("mail.*.example.com", 'has "*"'),
    ("*.*.example.com", 'has "*"'),
    ("**.example.com", 'has "*"'),
    ("mail.example.com.", "ends with a dot"),
    (".example.com", "has an empty label"),
    ("mail..example.com", "has an empty label"),
    ("bücher.example", "is not ASCII"),
    ("mail.exämple.com", "is not ASCII"),
    ("xn--abc.example", 'has invalid A-label "xn--abc"'),
    ("xn--.example", 'has label "xn--"'),
    ("xn--a.example", 'has invalid A-label "xn--a"'),
    ("xn--i-7iq.example", "has invalid A-label"),  # an emoji: not IDNA2008
    ("xn--bcher-kva0.example", "has invalid A-label"),  # does not round-trip
    ("-mail.example.com", 'has label "-mail"'),
    ("mail-.example.com", 'has label "mail-"'),
    ("mail_1.example.com", 'has label "mail_1"'),
    ("mail example.com", "not letters, digits and inner hyphens"),
    ("a" * 64 + ".example", "has a label longer than 63 characters"),
    (".".join(["a" * 63] * 3 + ["b" * 62]), "is longer than 253 characters"),
]


@pytest.mark.parametrize(("text", "reason"), INVALID_PATTERNS)
def test_invalid_patterns(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        validate_pattern(text)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("text", "pattern", "warned"),
    [
        ("mx1.example.com", "mx1.example.com", False),
        ("MX1.Example.COM", "mx1.example.com", False),  # DNS names ignore case: nothing to say
        ("MX1.Example.COM.", "mx1.example.com", True),
        ("*.example.net.", "*.example.net", True),
    ],
)
def test_normalise_pattern_drops_one_trailing_dot_with_a_warning(
    text: str, pattern: str, warned: bool
) -> None:
    normalised, warning = normalise_pattern(text)
    assert normalised == pattern
    assert (warning is not None) == warned
    if warning is not None:
        assert warning == f'"{text}" ends with a dot (not allowed in a policy); read as "{pattern}"'


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (".", "is empty"),
        ("mx.example.com..", "ends with a dot"),
        ("*..", "ends with a dot"),
        ("bad_.example.", "bad_"),
    ],
)
def test_normalise_pattern_still_refuses_what_is_not_a_host_name(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        normalise_pattern(text)
    assert reason in str(caught.value)


def test_check_ascii_domain_lowercases() -> None:
    assert check_ascii_domain("Example.COM") == "example.com"


MATCHES = [
    # RFC 8461 §4.1: "*.example.com" matches "mail.example.com" but neither
    # "example.com" nor "foo.mail.example.com".
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "foo.mail.example.com", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "mail.example.com.", True),
    ("*.example.com", "MAIL.Example.COM", True),
    ("*.example.com", "mailexample.com", False),
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.EXAMPLE.COM.", True),
    ("MAIL.example.com", "mail.example.com", True),
    ("mail.example.com", "mail.example.com..", False),
    ("mail.example.com", "x.mail.example.com", False),
    ("mail.example.com", "example.com", False),
    ("example.com", "mail.example.com", False),
]


@pytest.mark.parametrize(("pattern", "host", "expected"), MATCHES)
def test_mx_matches(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def reference_match(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1 spelt out label by label, as a second opinion."""
    host_labels = host.lower().removesuffix(".").split(".")
    pattern_labels = pattern.lower().split(".")
    if len(host_labels) != len(pattern_labels):
        return False
    for index, (want, have) in enumerate(zip(pattern_labels, host_labels, strict=True)):
        if index == 0 and want == "*":
            if not have:
                return False
        elif want != have:
            return False
    return True


LABELS = st.sampled_from(["a", "b", "mx", "Mx", "MX", "example", "com", "x-1"])
NAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join)


@given(
    wild=st.booleans(),
    domain=NAMES,
    host=st.one_of(NAMES, NAMES.map(lambda n: n + "."), st.text(alphabet="ab.*", max_size=8)),
)
def test_mx_matches_agrees_with_reference(wild: bool, domain: str, host: str) -> None:
    pattern = ("*." if wild else "") + domain
    assert mx_matches(pattern, host) == reference_match(pattern, host)


@given(wild=st.booleans(), domain=NAMES, first=LABELS)
def test_wildcard_matches_every_one_label_extension(wild: bool, domain: str, first: str) -> None:
    host = f"{first}.{domain}"
    assert mx_matches("*." + domain, host)
    assert mx_matches("*." + domain, host.upper() + ".")
    assert not mx_matches("*." + domain, domain)
    assert not mx_matches("*." + domain, f"{first}.{host}")


def test_postfix_match_list() -> None:
    patterns = ["mail.example.com", "*.example.net", "backupmx.example.com"]
    assert postfix_match_list(patterns) == ".example.net:backupmx.example.com:mail.example.com"


def test_postfix_match_list_dedupes_case_insensitively() -> None:
    patterns = ["B.example", "*.A.example", "b.example", "*.a.example"]
    assert postfix_match_list(patterns) == ".a.example:b.example"


def test_postfix_match_list_empty() -> None:
    assert postfix_match_list([]) == ""


@given(st.lists(st.builds(lambda w, d: ("*." if w else "") + d, st.booleans(), NAMES)))
def test_postfix_match_list_is_order_independent(patterns: list[str]) -> None:
    result = postfix_match_list(patterns)
    assert result == postfix_match_list(list(reversed(patterns)))
    items = result.split(":") if result else []
    assert items == sorted(set(items))
    assert all("*" not in item for item in items)
    assert set(items) == {p.lower().removeprefix("*") for p in patterns}
