"""RFC 8460 §4.4 report parsing: what a valid report becomes, and the reason each broken one gets."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from postfix_mtasts.tlsrpt.model import (
    RESULT_TYPES,
    PolicyType,
    ReportError,
    parse_report,
    parse_report_text,
    policy_mode,
)
from tests.support import tlsrpt_samples as samples


def full_report() -> dict[str, Any]:
    return samples.report(policies=[
        samples.policy(successful=5326, details=[
            samples.failure("certificate-expired", 3, sending_ip="203.0.113.7", mx="MX1.Example.com.",
                            receiving_mx_helo="mx1", receiving_ip="198.51.100.25",
                            failure_reason_code="X509_V_ERR_CERT_HAS_EXPIRED",
                            additional_information="https://reporter.example/why"),
            samples.failure("starttls-not-supported", 2, mx=None),
        ]),
        samples.policy(domain="example.net", policy_type="tlsa", successful=10, mx=("mx.example.net",)),
        samples.policy(domain="example.org", policy_type="no-policy-found", successful=7),
    ])


def test_a_full_report_parses_into_typed_values() -> None:
    report = parse_report_text(samples.json_bytes(full_report()))
    assert report.organization_name == "google.com"
    assert report.report_id == "2024-05-01T00:00:00Z_example.com"
    assert report.contact_info == "smtp-tls-reporting@google.com"
    assert report.start == datetime(2024, 5, 1, tzinfo=UTC)
    assert report.end == datetime(2024, 5, 1, 23, 59, 59, tzinfo=UTC)
    sts, tlsa, none = report.policies
    assert (sts.policy_type, sts.policy_domain, sts.mode) == (PolicyType.STS, "example.com", "enforce")
    assert sts.mx_hosts == ("mx1.example.com", "mx2.example.com")
    assert (sts.successful_sessions, sts.failed_sessions) == (5326, 5)
    expired, starttls = sts.failure_details
    assert expired.result_type == "certificate-expired"
    assert expired.failed_session_count == 3
    assert expired.sending_mta_ip == "203.0.113.7"
    assert expired.receiving_mx_hostname == "mx1.example.com"  # lower case, no trailing dot
    assert expired.receiving_mx_helo == "mx1"
    assert expired.receiving_ip == "198.51.100.25"
    assert expired.failure_reason_code == "X509_V_ERR_CERT_HAS_EXPIRED"
    assert expired.additional_information == "https://reporter.example/why"
    assert starttls.receiving_mx == "-"
    assert (tlsa.policy_type, tlsa.mode) == (PolicyType.TLSA, None)
    assert (none.policy_type, none.mx_hosts, none.failure_details) == (PolicyType.NO_POLICY_FOUND, (), ())
    assert (report.successful_sessions, report.failed_sessions) == (5343, 5)


def test_receiving_mx_falls_back_to_helo_then_ip() -> None:
    data = samples.report(policies=[samples.policy(details=[
        samples.failure("validation-failure", 1, mx=None, receiving_mx_helo="helo.example.com"),
        samples.failure("validation-failure", 1, mx=None, receiving_ip="2001:db8::25"),
    ])])
    details = parse_report(data).policies[0].failure_details
    assert [d.receiving_mx for d in details] == ["helo.example.com", "2001:db8::25"]


@pytest.mark.parametrize(
    ("lines", "mode"),
    [
        (["version: STSv1", "mode: enforce", "mx: a"], "enforce"),
        (["version: STSv1", "mode:testing"], "testing"),
        (["Mode : NONE"], "none"),
        (["version: STSv1", "mx: mode.example.com"], None),
        ([], None),
    ],
)
def test_mode_is_read_from_the_policy_string_lines(lines: list[str], mode: str | None) -> None:
    assert policy_mode(lines) == mode


def test_a_policy_string_sent_as_one_string_is_split_into_lines() -> None:
    data = samples.report()
    data["policies"][0]["policy"]["policy-string"] = (
        "version: STSv1\r\nmode: testing\r\nmx: mx1.example.com\r\n"
    )
    data["policies"][0]["policy"]["mx-host"] = "mx1.example.com"
    policy = parse_report(data).policies[0]
    assert policy.policy_strings == ("version: STSv1", "mode: testing", "mx: mx1.example.com")
    assert policy.mode == "testing"
    assert policy.mx_hosts == ("mx1.example.com",)


def test_lenient_where_real_reporters_differ() -> None:
    data = samples.report(start="2024-05-01T02:00:00+02:00", end="2024-05-01T23:59:59")
    del data["contact-info"]
    data["policies"][0]["policy"].pop("mx-host")
    data["policies"][0]["failure-details"] = [
        samples.failure("Certificate-Expired", 1, failure_reason_code=42)
    ]
    data["policies"].append(samples.policy(domain="example.org"))
    data["policies"][1]["failure-details"] = None
    report = parse_report(data)
    assert report.start == datetime(2024, 5, 1, 0, 0, tzinfo=UTC)  # offsets converted to UTC
    assert report.end == datetime(2024, 5, 1, 23, 59, 59, tzinfo=UTC)  # no zone: UTC, as §4.4 says
    assert report.contact_info is None
    detail = report.policies[0].failure_details[0]
    assert (detail.result_type, detail.failure_reason_code) == ("certificate-expired", "42")
    assert report.policies[1].failure_details == ()


def test_unknown_result_types_are_kept_not_rejected() -> None:
    data = samples.report(policies=[samples.policy(details=[samples.failure("quantum-decoherence", 4)])])
    assert parse_report(data).policies[0].failure_details[0].result_type == "quantum-decoherence"


def test_the_rfc_registers_eleven_result_types() -> None:
    assert len(RESULT_TYPES) == len(set(RESULT_TYPES)) == 11


def _broken(edit: Any) -> dict[str, Any]:
    data = copy.deepcopy(full_report())
    edit(data)
    return data


def _delete(path: str) -> Any:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
    return edit


def _set(path: str, value: Any) -> Any:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


BROKEN = [
    (_delete("organization-name"), "missing required field organization-name"),
    (_delete("date-range"), "missing required field date-range"),
    (_delete("date-range/start-datetime"), "missing required field date-range.start-datetime"),
    (_delete("date-range/end-datetime"), "missing required field date-range.end-datetime"),
    (_delete("report-id"), "missing required field report-id"),
    (_delete("policies"), "missing required field policies"),
    (_delete("policies/0/policy"), "missing required field policies[0].policy"),
    (_delete("policies/0/policy/policy-type"), "missing required field policies[0].policy.policy-type"),
    (_delete("policies/1/policy/policy-domain"), "missing required field policies[1].policy.policy-domain"),
    (_delete("policies/0/summary"), "missing required field policies[0].summary"),
    (_delete("policies/2/summary/total-successful-session-count"),
     "missing required field policies[2].summary.total-successful-session-count"),
    (_delete("policies/0/summary/total-failure-session-count"),
     "missing required field policies[0].summary.total-failure-session-count"),
    (_delete("policies/0/failure-details/1/result-type"),
     "missing required field policies[0].failure-details[1].result-type"),
    (_delete("policies/0/failure-details/0/failed-session-count"),
     "missing required field policies[0].failure-details[0].failed-session-count"),
    (_set("organization-name", 7), "organization-name must be a string, not a whole number"),
    (_set("organization-name", "  "), "organization-name is empty"),
    (_set("date-range", "yesterday"), "date-range must be a JSON object, not a string"),
    (_set("date-range/start-datetime", "May 1st"),
     "date-range.start-datetime is not an RFC 3339 date-time: 'May 1st'"),
    (_set("date-range/end-datetime", "2024-04-30T00:00:00Z"),
     "date-range ends before it starts (2024-04-30T00:00:00+00:00 < 2024-05-01T00:00:00+00:00)"),
    (_set("policies", {}), "policies must be a list, not an object"),
    (_set("policies/0", []), "policies[0] must be a JSON object, not a list"),
    (_set("policies/0/policy/policy-type", "dmarc"),
     "policies[0].policy.policy-type 'dmarc' is not one of sts, tlsa, no-policy-found"),
    (_set("policies/0/policy/policy-string", 5),
     "policies[0].policy.policy-string must be a list of strings, not a whole number"),
    (_set("policies/0/policy/policy-string", ["mode: enforce", None]),
     "policies[0].policy.policy-string[1] must be a string, not null"),
    (_set("policies/0/summary/total-successful-session-count", "5326"),
     "policies[0].summary.total-successful-session-count must be a whole number, not a string"),
    (_set("policies/0/summary/total-successful-session-count", 1.5),
     "policies[0].summary.total-successful-session-count must be a whole number, not the decimal number 1.5"),
    (_set("policies/0/summary/total-failure-session-count", True),
     "policies[0].summary.total-failure-session-count must be a whole number, not a boolean"),
    (_set("policies/0/summary/total-failure-session-count", -3),
     "policies[0].summary.total-failure-session-count is -3; counts cannot be negative"),
    (_set("policies/0/failure-details/0/failed-session-count", -1),
     "policies[0].failure-details[0].failed-session-count is -1; counts cannot be negative"),
    (_set("policies/0/failure-details", {"result-type": "x"}),
     "policies[0].failure-details must be a list, not an object"),
    (_set("policies/0/failure-details/1/sending-mta-ip", ["192.0.2.1"]),
     "policies[0].failure-details[1].sending-mta-ip must be a string, not a list"),
]


@pytest.mark.parametrize(("edit", "reason"), BROKEN, ids=[reason for _, reason in BROKEN])
def test_each_broken_report_names_its_reason(edit: Any, reason: str) -> None:
    data = _broken(edit)
    with pytest.raises(ReportError) as caught:
        parse_report_text(json.dumps(data))
    assert str(caught.value) == reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b'{"organization-name": "x",', "bad JSON: Expecting property name enclosed in double quotes"),
        (b"[1, 2]", "the report must be a JSON object, not a list"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "bad JSON: nested too deeply"),
    ],
)
def test_text_that_is_not_a_report(text: bytes, reason: str) -> None:
    with pytest.raises(ReportError) as caught:
        parse_report_text(text)
    assert str(caught.value).startswith(reason)


def test_a_byte_order_mark_is_accepted() -> None:
    assert parse_report_text(b"\xef\xbb\xbf" + samples.json_bytes(samples.report())).report_id


def test_a_no_policy_found_policy_without_its_domain_is_read_with_a_warning() -> None:
    """Postfix's own TLSRPT reporter left policy-domain out of no-policy-found policies until 2025."""
    data = samples.report(policies=[
        samples.policy(successful=10),
        samples.policy(policy_type="no-policy-found", successful=7, failed=2),
    ])
    del data["policies"][1]["policy"]["policy-domain"]
    report = parse_report(data)
    assert [p.policy_domain for p in report.policies] == ["example.com", None]
    assert (report.successful_sessions, report.failed_sessions) == (17, 2)
    assert report.warnings == (
        "missing required field policies[1].policy.policy-domain; the sessions are counted without a domain",
    )


def test_the_draft_name_failure_error_code_is_the_failure_reason_code() -> None:
    data = samples.report(policies=[samples.policy(details=[
        samples.failure("validation-failure", 3, failure_error_code="X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED"),
        samples.failure("validation-failure", 1, failure_error_code="old", failure_reason_code="new"),
    ])])
    report = parse_report(data)
    assert [d.failure_reason_code for d in report.policies[0].failure_details] == [
        "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED", "new"]
    assert report.warnings == ()


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2024-05-01t00:00:00z", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-01T23:59:59z", datetime(2024, 5, 1, 23, 59, 59, tzinfo=UTC)),
        ("2024-05-01 12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123456789Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-05-01T12:00:00-07:30", datetime(2024, 5, 1, 19, 30, tzinfo=UTC)),
        ("2024-05-01T12:00:00+0200", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)),  # a leap second
    ],
)
def test_rfc_3339_date_times_in_either_case(text: str, moment: datetime) -> None:
    data = samples.report(start=text, end="2030-01-01T00:00:00Z")
    assert parse_report(data).start == moment


@pytest.mark.parametrize(
    "text", ["2024-05-01", "2024-W18-3T00:00:00", "20240501T000000Z", "2024-05-01T25:00:00Z",
             "2024-02-30T00:00:00Z", "2024-05-01T00:00:00+24:00", "2024-05-01T00:00:00Zjunk",
             "٢٠٢٤-05-01T00:00:00Z"],
)
def test_what_is_no_rfc_3339_date_time_is_refused(text: str) -> None:
    with pytest.raises(ReportError) as caught:
        parse_report(samples.report(start=text))
    assert str(caught.value).startswith("date-range.start-datetime is not")
    assert repr(text) in str(caught.value)


def test_details_adding_up_to_more_than_the_summary_give_one_warning_per_policy() -> None:
    data = samples.report(policies=[
        samples.policy(failed=2, details=[samples.failure("certificate-expired", 2),
                                          samples.failure("starttls-not-supported", 1)]),
        samples.policy(domain="example.org", failed=1, details=[samples.failure("certificate-expired", 1)]),
        samples.policy(domain="example.net", failed=0, details=[samples.failure("dane-required", 4)]),
    ])
    report = parse_report(data)
    assert report.failed_sessions == 3  # the summaries count, as RFC 8460 §4.4 defines them
    assert report.warnings == (
        "policies[0]: failure-details add up to 3 failed sessions, more than the summary's "
        "total-failure-session-count 2; the summary's figure is counted",
        "policies[2]: failure-details add up to 4 failed sessions, more than the summary's "
        "total-failure-session-count 0; the summary's figure is counted",
    )


def test_odd_fields_are_counted_and_named() -> None:
    data = samples.report(policies=[samples.policy(details=[
        samples.failure("Testing", 1, sending_ip="x.x.x.x", receiving_ip="2001:db8::25",
                        additional_info_uri="testing.example"),
        samples.failure("certificate-expired", 1, receiving_ip="mx.example.com", extra={"a": 1}),
    ])])
    report = parse_report(data)
    assert [d.result_type for d in report.policies[0].failure_details] == ["testing", "certificate-expired"]
    assert report.warnings == (
        "policies[0].failure-details[0].result-type 'Testing' is not a result type of RFC 8460 §4.3",
        "policies[0].failure-details[0].sending-mta-ip 'x.x.x.x' is not an IP address",
        "policies[0].failure-details[0] has a field RFC 8460 does not define: "
        "additional-info-uri = 'testing.example'",
        "policies[0].failure-details[1].receiving-ip 'mx.example.com' is not an IP address",
        "policies[0].failure-details[1] has a field RFC 8460 does not define: extra = {\"a\": 1}",
    )


def test_a_tlsa_policy_string_holding_a_json_array_is_unpacked() -> None:
    data = samples.report(policies=[samples.policy(policy_type="tlsa")])
    data["policies"][0]["policy"]["policy-string"] = ['["3 1 1 AB", "3 1 1 CD"]']
    assert parse_report(data).policies[0].policy_strings == ("3 1 1 AB", "3 1 1 CD")
    data["policies"][0]["policy"]["policy-string"] = ["[not json]"]
    assert parse_report(data).policies[0].policy_strings == ("[not json]",)


@pytest.mark.parametrize(
    ("sent", "read"),
    [
        ("https://reports.example/  report_info ? id = 50 c - 23 d3# Starttls ",
         "https://reports.example/report_info?id=50c-23d3#Starttls"),
        ("see the postmaster page: it explains", "see the postmaster page: it explains"),
    ],
)
def test_a_line_wrapped_uri_in_additional_information_is_joined(sent: str, read: str) -> None:
    data = samples.report(policies=[samples.policy(details=[
        samples.failure("starttls-not-supported", 1, additional_information=sent)])])
    assert parse_report(data).policies[0].failure_details[0].additional_information == read


def test_a_policy_type_in_capitals_is_read() -> None:
    data = samples.report(policies=[samples.policy(policy_type="STS")])
    assert parse_report(data).policies[0].policy_type is PolicyType.STS


def test_a_number_too_long_to_read_is_a_reason_not_a_crash() -> None:
    text = b'{"organization-name": "x", "n": ' + b"9" * 5000 + b"}"
    with pytest.raises(ReportError) as caught:
        parse_report_text(text)
    assert str(caught.value).startswith("bad JSON: Exceeds the limit")
