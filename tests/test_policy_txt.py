"""Tests for choosing and reading the ``_mta-sts`` TXT record (RFC 8461 §3.1)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from postfix_mtasts.policy.txt import TxtParse, parse_sts_records


def test_rfc_example() -> None:
    record = b"v=STSv1; id=20160831085700Z;"
    assert parse_sts_records([record]) == TxtParse(
        policy_id="20160831085700Z", reason="", record="v=STSv1; id=20160831085700Z;"
    )


VALID = [
    # (record, expected id)
    pytest.param(b"v=STSv1; id=20160831085700Z", "20160831085700Z", id="no-trailing-semicolon"),
    pytest.param(b"v=STSv1;id=abc", "abc", id="no-spaces"),
    pytest.param(b"v=STSv1 \t; \t id=abc \t;\t ", "abc", id="wsp-around-delimiters"),
    pytest.param(b"v=STSv1; id=abc  ", "abc", id="trailing-wsp-tolerated"),
    pytest.param(b"v=STSv1; id=" + b"A1" * 16, "A1" * 16, id="id-32-chars"),
    pytest.param(b"v=STSv1; ext=value; id=x", "x", id="extension-before-id"),
    pytest.param(
        b"v=STSv1; id=x; a.b_c-d=!#$%&'()*+,-./0123456789:<>?@[]^_`{|}~", "x", id="extension-charset"
    ),
    pytest.param(b"v=STSv1; id=first; id=second", "first", id="first-id-wins"),
    pytest.param(b"v=STSv1; id=x; v=STSv2", "x", id="later-v-is-an-extension"),
    pytest.param(b"v=STSv1; id=x; " + b"n" * 32 + b"=1", "x", id="ext-name-32"),
]


@pytest.mark.parametrize(("record", "policy_id"), VALID)
def test_valid(record: bytes, policy_id: str) -> None:
    result = parse_sts_records([record])
    assert result.policy_id == policy_id
    assert result.reason == ""


INVALID = [
    # (record, exact reason)
    pytest.param(b"v=STSv1;", "invalid v=STSv1 record: missing id", id="no-fields"),
    pytest.param(b"v=STSv1; ", "invalid v=STSv1 record: missing id", id="only-trailing-wsp"),
    pytest.param(b"v=STSv1; ext=1", "invalid v=STSv1 record: missing id", id="only-extension"),
    pytest.param(b"v=STSv1; ID=abc", "invalid v=STSv1 record: missing id", id="id-is-case-sensitive"),
    pytest.param(
        b"v=STSv1; id=", 'invalid v=STSv1 record: id "" is not 1 to 32 letters or digits', id="empty-id"
    ),
    pytest.param(
        b"v=STSv1; id=" + b"a" * 33, 'id "' + "a" * 33 + '" is not 1 to 32 letters', id="id-33-chars"
    ),
    pytest.param(
        b"v=STSv1; id=2016-08-31",
        'invalid v=STSv1 record: id "2016-08-31" is not 1 to 32 letters or digits',
        id="id-with-hyphen",
    ),
    pytest.param(b"v=STSv1; id=abc def", 'id "abc def"', id="id-with-space"),
    pytest.param(b"v=STSv1; id=ok; id=n-o", 'id "n-o"', id="bad-second-id"),
    pytest.param(
        b"v=STSv1; id=abc;; ", "invalid v=STSv1 record: empty field between semicolons", id="double-semicolon"
    ),
    pytest.param(b"v=STSv1;; id=abc", "empty field between semicolons", id="leading-empty-field"),
    pytest.param(
        b"v=STSv1; id=abc; junk",
        'invalid v=STSv1 record: field "junk" is not name=value',
        id="not-name-value",
    ),
    pytest.param(
        b"v=STSv1; id=abc; _x=1", 'invalid v=STSv1 record: field name "_x" is invalid', id="bad-ext-name"
    ),
    pytest.param(b"v=STSv1; id=abc; " + b"n" * 33 + b"=1", "field name", id="ext-name-33"),
    pytest.param(
        b"v=STSv1; id=abc; x=", 'invalid v=STSv1 record: field x has invalid value ""', id="empty-ext-value"
    ),
    pytest.param(b"v=STSv1; id=abc; x=a=b", 'field x has invalid value "a=b"', id="equals-in-ext-value"),
    pytest.param(b"v=STSv1; id=abc; x=a b", 'field x has invalid value "a b"', id="space-in-ext-value"),
    pytest.param(b"v=STSv1; id=abc; x=a\x01", "field x has invalid value", id="control-in-ext-value"),
    pytest.param(b"v=STSv1; id=abc\n", 'id "abc\\n"', id="newline"),
    pytest.param(b"v=STSv1; id=abc; x=\xc3\xa4", "invalid v=STSv1 record: not US-ASCII", id="utf8"),
    pytest.param(b"v=STSv1; id=\xff", "invalid v=STSv1 record: not US-ASCII", id="non-utf8"),
]


@pytest.mark.parametrize(("record", "reason"), INVALID)
def test_invalid(record: bytes, reason: str) -> None:
    result = parse_sts_records([record])
    assert result.policy_id is None
    assert reason in result.reason
    assert result.record  # the offending record is kept for the log
    assert "\n" not in result.reason
    assert "\n" not in result.record


def test_invalid_record_is_escaped_for_logs() -> None:
    result = parse_sts_records([b"v=STSv1; id=\xff\n"])
    assert result.record == "v=STSv1; id=\\xff\\x0a"


DISCARDED = [
    pytest.param(b"", id="empty"),
    pytest.param(b"v=spf1 -all", id="spf"),
    pytest.param(b"v=STSv1", id="no-semicolon"),
    pytest.param(b"v=STSv1 id=abc", id="space-no-semicolon"),
    pytest.param(b" v=STSv1; id=abc", id="leading-space"),
    pytest.param(b"V=STSv1; id=abc", id="upper-v"),
    pytest.param(b"v=stsv1; id=abc", id="lower-version"),
    pytest.param(b"v=STSv10; id=abc", id="other-version"),
    pytest.param(b"v=STSv2; id=abc", id="version-2"),
    pytest.param(b"\xffv=STSv1; id=abc", id="garbage-first"),
    pytest.param(b"id=abc; v=STSv1", id="version-not-first"),
]


@pytest.mark.parametrize("record", DISCARDED)
def test_discarded(record: bytes) -> None:
    assert parse_sts_records([record]) == TxtParse(policy_id=None, reason="no v=STSv1 record")


def test_no_records() -> None:
    assert parse_sts_records([]) == TxtParse(policy_id=None, reason="no v=STSv1 record")


def test_other_records_are_ignored() -> None:
    records = [b"v=spf1 -all", b"google-site-verification=abc", b"v=STSv1; id=42;", b"\xff\xfe"]
    assert parse_sts_records(records).policy_id == "42"


def test_two_records_are_not_allowed() -> None:
    records = [b"v=STSv1; id=1", b"v=spf1 -all", b"v=STSv1; id=2"]
    assert parse_sts_records(records) == TxtParse(
        policy_id=None, reason="2 v=STSv1 records; exactly one is allowed"
    )


def test_identical_duplicate_records_still_count_twice() -> None:
    result = parse_sts_records([b"v=STSv1; id=1", b"v=STSv1; id=1", b"v=STSv1 ;junk"])
    assert result.reason == "3 v=STSv1 records; exactly one is allowed"


def test_invalid_record_counts_toward_the_limit() -> None:
    # A broken second STSv1 record still makes the set ambiguous.
    result = parse_sts_records([b"v=STSv1; id=1", b"v=STSv1; id=!"])
    assert result.policy_id is None
    assert result.reason.startswith("2 v=STSv1 records")


@given(st.lists(st.binary(max_size=64), max_size=4))
@example([b"v=STSv1;\x80"])
@example([b"v=STSv1; id=a;" + bytes(range(256))])
def test_never_raises(records: list[bytes]) -> None:
    result = parse_sts_records(records)
    assert (result.policy_id is None) != (result.reason == "")
    if result.policy_id is not None:
        assert result.policy_id.isascii() and result.policy_id.isalnum()
        assert 1 <= len(result.policy_id) <= 32


@given(st.lists(st.binary(max_size=40).map(lambda tail: b"v=STSv1;" + tail), min_size=1, max_size=1))
def test_never_raises_on_stsv1_records(records: list[bytes]) -> None:
    result = parse_sts_records(records)
    assert result.record
    assert result.record.isprintable()


ID = st.from_regex(r"\A[A-Za-z0-9]{1,32}\Z")
EXTENSION = st.tuples(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z").filter(lambda n: n != "id"),
    st.from_regex(r"\A[\x21-\x3a\x3c\x3e-\x7e]{1,20}\Z"),
).map("=".join)
DELIMITER = st.tuples(st.sampled_from(["", " ", "\t", "  "]), st.sampled_from(["", " ", "\t "])).map(
    lambda wsp: wsp[0] + ";" + wsp[1]
)


@given(
    policy_id=ID,
    before=st.lists(EXTENSION, max_size=3),
    after=st.lists(EXTENSION, max_size=3),
    delimiters=st.lists(DELIMITER, min_size=8, max_size=8),
    trailing=st.booleans(),
)
def test_generated_valid_records(
    policy_id: str, before: list[str], after: list[str], delimiters: list[str], trailing: bool
) -> None:
    fields = [*before, "id=" + policy_id, *after]
    text = "v=STSv1"
    for delimiter, field in zip(delimiters, fields, strict=False):
        text += delimiter + field
    if trailing:
        text += delimiters[-1]
    result = parse_sts_records([b"v=spf1 -all", text.encode()])
    # A tab is legal between fields; the logged record shows it escaped.
    assert result == TxtParse(policy_id=policy_id, record=text.replace("\t", "\\x09"))
