"""Tests for the RFC 8461 §3.2 policy file parser."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from postfix_mtasts import limits
from postfix_mtasts.policy.model import Mode, Policy
from postfix_mtasts.policy.policyfile import PolicyError, parse_policy, read_policy

# RFC 8461 §3.2's example policy, with the CRLF the RFC shows.
RFC_EXAMPLE = (
    b"version: STSv1\r\n"
    b"mode: enforce\r\n"
    b"mx: mail.example.com\r\n"
    b"mx: *.example.net\r\n"
    b"mx: backupmx.example.com\r\n"
    b"max_age: 604800\r\n"
)


def test_rfc_example() -> None:
    assert parse_policy(RFC_EXAMPLE) == Policy(
        Mode.ENFORCE,
        604800,
        ("mail.example.com", "*.example.net", "backupmx.example.com"),
    )


def test_rfc_appendix_a_example() -> None:
    body = b"version: STSv1\nmode: enforce\nmx: mail.example.com\nmax_age: 86400\n"
    assert parse_policy(body) == Policy(Mode.ENFORCE, 86400, ("mail.example.com",))


VALID = [
    # (body, expected policy)
    pytest.param(
        b"version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400",
        Policy(Mode.TESTING, 86400, ("mx.example.com",)),
        id="no-final-newline",
    ),
    pytest.param(
        b"version:STSv1\nmode:\t  enforce \t\nmx:   mx.example.com  \nmax_age:   1\n",
        Policy(Mode.ENFORCE, 1, ("mx.example.com",)),
        id="wsp-after-colon-and-trailing",
    ),
    pytest.param(
        b"version: STSv1\r\nmode: enforce\nmx: mx.example.com\r\nmax_age: 86400\r\n",
        Policy(Mode.ENFORCE, 86400, ("mx.example.com",)),
        id="mixed-crlf-lf",
    ),
    pytest.param(
        b"\nversion: STSv1\n\n\r\nmode: enforce\n  \nmx: mx.example.com\n\n\nmax_age: 86400\n\n",
        Policy(Mode.ENFORCE, 86400, ("mx.example.com",)),
        id="blank-lines-tolerated",
    ),
    pytest.param(
        b"\xef\xbb\xbfversion: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n",
        Policy(Mode.ENFORCE, 86400, ("mx.example.com",)),
        id="utf8-bom",
    ),
    pytest.param(
        b"version: STSv1\nmode: none\nmax_age: 86400\n",
        Policy(Mode.NONE, 86400, ()),
        id="mode-none-without-mx",
    ),
    pytest.param(
        b"version: STSv1\nmode: none\nmx: mx.example.com\nmax_age: 86400\n",
        Policy(Mode.NONE, 86400, ("mx.example.com",)),
        id="mode-none-with-mx",
    ),
    pytest.param(
        b"max_age: 604800\nmx: MX1.Example.COM\nmode: enforce\nversion: STSv1\n",
        Policy(Mode.ENFORCE, 604800, ("mx1.example.com",)),
        id="any-order-mx-lowercased",
    ),
    pytest.param(
        b"version: STSv1\nmode: enforce\nmx: b.example\nmx: a.example\nmx: B.example\n"
        b"mx: b.example\nmax_age: 5\n",
        Policy(Mode.ENFORCE, 5, ("b.example", "a.example")),
        id="mx-duplicates-removed-order-kept",
    ),
    pytest.param(
        b"version: STSv1\nmode: enforce\nmode: testing\nmode: bogus\nmx: m.example\n"
        b"max_age: 10\nmax_age: 20\nversion: STSv2\n",
        Policy(Mode.ENFORCE, 10, ("m.example",)),
        id="first-occurrence-wins",
    ),
    pytest.param(
        b"version: STSv1\nmode: enforce\nmx: m.example\nmax_age: 10\n"
        b"foo_bar.baz-1: some value: with colons\nx: \xc3\xa4\xc3\xb6 utf-8 ok\n",
        Policy(Mode.ENFORCE, 10, ("m.example",)),
        id="extensions-ignored",
    ),
    pytest.param(
        b"version: STSv1\nmode: enforce\nmx: m.example\nmax_age: 31557601\n",
        Policy(Mode.ENFORCE, limits.MAX_AGE_LIMIT, ("m.example",)),
        id="max-age-clamped",
    ),
    pytest.param(
        b"version: STSv1\nmode: enforce\nmx: m.example\nmax_age: 9999999999\n",
        Policy(Mode.ENFORCE, limits.MAX_AGE_LIMIT, ("m.example",)),
        id="max-age-ten-digits-clamped",
    ),
    pytest.param(
        b"version: STSv1\nmode: enforce\nmx: m.example\nmax_age: 0000086400\n",
        Policy(Mode.ENFORCE, 86400, ("m.example",)),
        id="max-age-leading-zeros",
    ),
    pytest.param(
        b"version: STSv1\nmode: testing\nmx: xn--bcher-kva.example\nmx: *.xn--fa-hia.de\nmax_age: 0\n",
        Policy(Mode.TESTING, 0, ("xn--bcher-kva.example", "*.xn--fa-hia.de")),
        id="a-labels",
    ),
]


@pytest.mark.parametrize(("body", "expected"), VALID)
def test_valid(body: bytes, expected: Policy) -> None:
    assert parse_policy(body) == expected


BASE = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"

INVALID = [
    # (body, substring of the reason)
    pytest.param(b"", "no version line", id="empty"),
    pytest.param(b"\xff\xfe", "not UTF-8", id="not-utf8"),
    pytest.param(b"version: STSv1\nmode: \xc3\n", "not UTF-8 (bad byte at offset 21)", id="truncated-utf8"),
    pytest.param(
        BASE.replace("enforce", "enfroce").encode(),
        'line 2: mode "enfroce" is not enforce, testing or none',
        id="bad-mode",
    ),
    pytest.param(BASE.replace("enforce", "Enforce").encode(), 'mode "Enforce"', id="mode-case"),
    pytest.param(
        BASE.replace("STSv1", "STSv2").encode(), 'line 1: version "STSv2" is not STSv1', id="version"
    ),
    pytest.param(BASE.replace("STSv1", "stsv1").encode(), 'version "stsv1"', id="version-case"),
    pytest.param(BASE.replace("version", "Version").encode(), "no version line", id="key-case"),
    pytest.param(BASE.replace("mode: enforce\n", "").encode(), "no mode line", id="no-mode"),
    pytest.param(BASE.replace("max_age: 86400\n", "").encode(), "no max_age line", id="no-max-age"),
    pytest.param(
        BASE.replace("mx: mx.example.com\n", "").encode(),
        "no mx line (required with mode enforce)",
        id="no-mx-enforce",
    ),
    pytest.param(
        BASE.replace("mx: mx.example.com\n", "").replace("enforce", "testing").encode(),
        "no mx line (required with mode testing)",
        id="no-mx-testing",
    ),
    pytest.param(
        BASE.replace("86400", "12345678901").encode(),
        'max_age "12345678901" is not 1 to 10 digits',
        id="max-age-11",
    ),
    pytest.param(BASE.replace("86400", "-1").encode(), 'max_age "-1"', id="max-age-negative"),
    pytest.param(BASE.replace("86400", "1e5").encode(), 'max_age "1e5"', id="max-age-float"),
    pytest.param(BASE.replace("86400", "８６４００").encode(), "max_age", id="max-age-fullwidth-digits"),
    pytest.param(BASE.replace("86400", "86 400").encode(), 'max_age "86 400"', id="max-age-space"),
    pytest.param(
        BASE.replace("mode: enforce", "mode").encode(), 'line 2: "mode" is not "key: value"', id="no-colon"
    ),
    pytest.param(
        BASE.replace("mode: enforce", "mode = enforce").encode(),
        'line 2: "mode = enforce" is not "key: value"',
        id="equals",
    ),
    pytest.param(
        BASE.replace("mode: enforce", " mode: enforce").encode(),
        'line 2: key " mode" is not a valid field name',
        id="leading-space",
    ),
    pytest.param(
        BASE.replace("mode: enforce", "mode : enforce").encode(), 'key "mode "', id="space-before-colon"
    ),
    pytest.param(BASE.replace("mode: enforce", ": enforce").encode(), 'key ""', id="empty-key"),
    pytest.param(
        (BASE + "_x: y\n").encode(), 'line 5: key "_x" is not a valid field name', id="key-underscore-first"
    ),
    pytest.param((BASE + "a" * 33 + ": y\n").encode(), "is not a valid field name", id="key-too-long"),
    pytest.param((BASE + "mode:\n").encode(), "line 5: mode has an empty value", id="empty-duplicate"),
    pytest.param(
        (BASE + "ext: a\x01b\n").encode(), "line 5: ext value contains a control character", id="control"
    ),
    pytest.param((BASE + "ext: a\rb\n").encode(), "control character", id="bare-cr"),
    pytest.param(
        (BASE + "mx: *.*.example.com\n").encode(),
        'line 5: mx "*.*.example.com" has "*"',
        id="mx-double-wildcard",
    ),
    pytest.param((BASE + "mx: mail.example.com..\n").encode(), "ends with a dot", id="mx-two-trailing-dots"),
    pytest.param((BASE + "mx: .\n").encode(), 'mx "." is empty', id="mx-only-a-dot"),
    pytest.param((BASE + "mx: bücher.example\n").encode(), "is not ASCII", id="mx-u-label"),
    pytest.param((BASE + "mx: xn--abc.example\n").encode(), "invalid A-label", id="mx-bad-a-label"),
    pytest.param(
        (BASE + "mx: mail_1.example\n").encode(), "not letters, digits and inner hyphens", id="mx-underscore"
    ),
    pytest.param(
        BASE.replace("enforce", "none").replace("mx.example.com", "-bad.example").encode(),
        'mx "-bad.example"',
        id="mx-validated-in-mode-none",
    ),
    pytest.param(b"x" * (limits.POLICY_BODY_LIMIT + 1), "longer than", id="too-long"),
]


def test_mx_with_upper_case_and_a_trailing_dot_is_read_with_a_warning() -> None:
    """Refusing the policy would remove the protection it asks for: the
    pattern is normalised, and the parser says what it forgave."""
    body = b"version: STSv1\nmode: enforce\nmx: MX1.Example.COM.\nmx: *.Backup.Example.COM\nmax_age: 86400\n"

    read = read_policy(body)

    assert read.policy == Policy(Mode.ENFORCE, 86400, ("mx1.example.com", "*.backup.example.com"))
    assert read.warnings == (
        'line 3: mx "MX1.Example.COM." ends with a dot (not allowed in a policy); read as "mx1.example.com"',
    )
    assert parse_policy(body) == read.policy


def test_a_clean_policy_has_no_warnings() -> None:
    assert read_policy(RFC_EXAMPLE).warnings == ()


@pytest.mark.parametrize(("body", "reason"), INVALID)
def test_invalid(body: bytes, reason: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(body)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message


def test_policy_error_is_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


def test_error_quotes_are_escaped_and_short() -> None:
    body = ("version: STSv1\nmode: " + '\u2028"x' * 100 + "\nmx: a.b\nmax_age: 1\n").encode()
    with pytest.raises(PolicyError) as caught:
        parse_policy(body)
    message = str(caught.value)
    assert message.startswith('line 2: mode "\\u2028\\"x')
    assert "..." in message
    assert len(message) < 120
    assert "\u2028" not in message


# --- property tests ---------------------------------------------------------


@given(st.binary(max_size=512))
@example(b"version: STSv1\nmode: enforce\nmax_age: 1\nmx: \xe2\x80\xa8")
def test_arbitrary_bytes_only_raise_policy_error(body: bytes) -> None:
    try:
        result = parse_policy(body)
    except PolicyError as error:
        assert "\n" not in str(error)
    else:
        assert isinstance(result, Policy)


LABEL = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?\Z").filter(lambda label: label[2:4] != "--")
DOMAIN = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
PATTERN = st.builds(lambda wild, domain: ("*." if wild else "") + domain, st.booleans(), DOMAIN)
KEYS = st.sampled_from(["version", "mode", "max_age", "mx", "ext", "x.y-z_1"])
VALUES = st.one_of(
    st.sampled_from(["STSv1", "enforce", "testing", "none", "86400", "", "STSv2", "*.a.b"]),
    st.text(max_size=20),
    PATTERN,
    st.integers(min_value=0, max_value=10**11).map(str),
)
SEPARATORS = st.sampled_from([": ", ":", ":\t", " : ", "=", ": \t "])
TERMINATORS = st.sampled_from(["\n", "\r\n", "\r", ""])


@given(st.lists(st.tuples(KEYS, SEPARATORS, VALUES, TERMINATORS), max_size=12))
def test_structured_random_policies_only_raise_policy_error(
    lines: list[tuple[str, str, str, str]],
) -> None:
    body = "".join(k + s + v + t for k, s, v, t in lines).encode("utf-8", "surrogatepass")
    try:
        policy = parse_policy(body)
    except PolicyError:
        return
    assert policy.mode in Mode
    assert 0 <= policy.max_age <= limits.MAX_AGE_LIMIT
    assert policy.mode is Mode.NONE or policy.mx
    assert len(set(policy.mx)) == len(policy.mx)


def render(policy: Policy, newline: str, space: str, extensions: list[tuple[str, str]]) -> bytes:
    """Write ``policy`` as a policy file, the way a domain might publish it."""
    lines = [f"version:{space}STSv1", f"mode:{space}{policy.mode.value}"]
    lines += [f"mx:{space}{pattern}" for pattern in policy.mx]
    lines.append(f"max_age:{space}{policy.max_age}")
    lines += [f"{name}:{space}{value}" for name, value in extensions]
    return newline.join(lines).encode()


EXT_NAME = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z").filter(
    lambda name: name not in {"version", "mode", "max_age", "mx"}
)
EXT_VALUE = st.from_regex(r"\A[!-~äöü€](?:[ !-~äöü€]{0,20}[!-~äöü€])?\Z")


@given(
    mode=st.sampled_from(Mode),
    max_age=st.integers(min_value=0, max_value=limits.MAX_AGE_LIMIT),
    mx=st.lists(PATTERN, min_size=1, max_size=6, unique=True),
    newline=st.sampled_from(["\n", "\r\n"]),
    space=st.sampled_from(["", " ", "  ", "\t"]),
    extensions=st.lists(st.tuples(EXT_NAME, EXT_VALUE), max_size=3),
    final_newline=st.booleans(),
)
def test_generated_policy_round_trips(
    mode: Mode,
    max_age: int,
    mx: list[str],
    newline: str,
    space: str,
    extensions: list[tuple[str, str]],
    final_newline: bool,
) -> None:
    policy = Policy(mode, max_age, tuple(mx))
    body = render(policy, newline, space, extensions)
    if final_newline:
        body += newline.encode()
    assert parse_policy(body) == policy
