"""Adding reports up (exact figures) and explaining every result type."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from postfix_mtasts.tlsrpt.explain import NO_POLICY_FOUND, explain, is_known
from postfix_mtasts.tlsrpt.model import RESULT_TYPES, Report, parse_report
from postfix_mtasts.tlsrpt.summary import summarize
from tests.support import tlsrpt_samples as samples


def three_reports() -> list[Report]:
    google_1 = samples.report(
        report_id="g1",
        policies=[
            samples.policy(successful=1000, details=[
                samples.failure("certificate-expired", 3, sending_ip="203.0.113.1", mx="mx1.example.com",
                                failure_reason_code="expired"),
                samples.failure("starttls-not-supported", 2, sending_ip="203.0.113.2", mx="mx2.example.com"),
            ]),
            samples.policy(domain="example.org", policy_type="no-policy-found", successful=40),
        ],
    )
    google_1b = samples.report(  # same organisation and date range, another policy domain
        report_id="g1b",
        policies=[samples.policy(domain="example.net", mode="testing", successful=60, failed=9, details=[
            samples.failure("sts-policy-fetch-error", 5, sending_ip="203.0.113.1", mx=None),
        ])],
    )
    microsoft_2 = samples.report(
        org="Microsoft Corporation", report_id="m2", contact="tlsrpt-noreply@microsoft.com",
        start="2024-05-03T00:00:00Z", end="2024-05-03T23:59:59Z",
        policies=[samples.policy(successful=500, details=[
            samples.failure("certificate-expired", 4, sending_ip="203.0.113.1", mx="mx1.example.com",
                            failure_reason_code="X509_V_ERR_CERT_HAS_EXPIRED"),
            samples.failure("certificate-expired", 1, sending_ip="198.51.100.9", mx="mx1.example.com"),
        ])],
    )
    return [parse_report(r) for r in (google_1, google_1b, microsoft_2)]


def test_exact_totals() -> None:
    summary = summarize(three_reports())
    assert summary.reports == 3
    assert summary.successful == 1000 + 40 + 60 + 500
    assert summary.failed == 5 + 9 + 5
    assert summary.failed_without_details == 4  # example.net counted 9 failures but detailed 5


def test_per_reporter_and_date_range() -> None:
    reporters = summarize(three_reports()).reporters
    assert [(r.organization, r.start.date(), r.reports, r.successful, r.failed, r.contact_info)
            for r in reporters] == [
        ("google.com", date(2024, 5, 1), 2, 1100, 14, "smtp-tls-reporting@google.com"),
        ("Microsoft Corporation", date(2024, 5, 3), 1, 500, 5, "tlsrpt-noreply@microsoft.com"),
    ]
    assert reporters[0].end == datetime(2024, 5, 1, 23, 59, 59, tzinfo=UTC)


def test_per_policy_with_its_mode() -> None:
    policies = summarize(three_reports()).policies
    assert [(p.policy_type, p.domain, p.mode, p.successful, p.failed) for p in policies] == [
        ("sts", "example.com", "enforce", 1500, 10),
        ("sts", "example.net", "testing", 60, 9),
        ("no-policy-found", "example.org", None, 40, 0),
    ]


def test_failures_grouped_by_every_field_but_the_count() -> None:
    reports = three_reports()
    reports.append(parse_report(samples.report(report_id="g9", policies=[samples.policy(details=[
        samples.failure("starttls-not-supported", 6, sending_ip="203.0.113.2", mx="mx2.example.com"),
        samples.failure("starttls-not-supported", 1, sending_ip="203.0.113.2", mx="mx2.example.com",
                        receiving_ip="192.0.2.25"),
    ])])))
    failures = summarize(reports).failures
    assert [(f.result_type, f.sending_mta_ip, f.receiving_mx, f.receiving_ip, f.failure_reason_code,
             f.sessions) for f in failures] == [
        ("starttls-not-supported", "203.0.113.2", "mx2.example.com", None, None, 8),  # 2 + 6, two reports
        ("sts-policy-fetch-error", "203.0.113.1", "-", None, None, 5),
        ("certificate-expired", "203.0.113.1", "mx1.example.com", None, "X509_V_ERR_CERT_HAS_EXPIRED", 4),
        ("certificate-expired", "203.0.113.1", "mx1.example.com", None, "expired", 3),
        ("certificate-expired", "198.51.100.9", "mx1.example.com", None, None, 1),
        ("starttls-not-supported", "203.0.113.2", "mx2.example.com", "192.0.2.25", None, 1),
    ]


def test_per_result_type_with_explanations() -> None:
    totals = summarize(three_reports()).result_types
    assert [(t.result_type, t.sessions) for t in totals] == [
        ("certificate-expired", 8), ("sts-policy-fetch-error", 5), ("starttls-not-supported", 2),
    ]
    assert totals[0].explanation == explain("certificate-expired")


def test_per_day_by_the_start_of_each_date_range() -> None:
    days = summarize(three_reports()).days
    assert [(d.day, d.successful, d.failed) for d in days] == [
        (date(2024, 5, 1), 1100, 14),
        (date(2024, 5, 3), 500, 5),
    ]


def test_nothing_adds_up_to_zero() -> None:
    summary = summarize([])
    assert (summary.reports, summary.successful, summary.failed, summary.days) == (0, 0, 0, [])


@pytest.mark.parametrize("result_type", RESULT_TYPES)
def test_every_result_type_has_a_plain_explanation_and_a_fix(result_type: str) -> None:
    explanation = explain(result_type)
    assert is_known(result_type)
    assert explanation.result_type == result_type
    assert len(explanation.meaning) > 40 and len(explanation.fix) > 40
    assert "does not know" not in explanation.meaning


def test_explanations_say_different_things() -> None:
    meanings = {explain(t).meaning for t in RESULT_TYPES}
    fixes = {explain(t).fix for t in RESULT_TYPES}
    assert len(meanings) == len(fixes) == len(RESULT_TYPES)


def test_explanations_point_at_the_usual_fix() -> None:
    assert "expired" in explain("certificate-expired").meaning
    assert "ACME" in explain("certificate-expired").fix and "reload" in explain("certificate-expired").fix
    assert "STARTTLS" in explain("starttls-not-supported").meaning
    assert ".well-known/mta-sts.txt" in explain("sts-policy-fetch-error").meaning
    assert "chain" in explain("certificate-not-trusted").fix
    assert "TLSA" in explain("tlsa-invalid").fix
    assert "DNSSEC" in explain("dnssec-invalid").meaning
    assert "mta-sts." in explain("sts-webpki-invalid").meaning
    assert "STSv1" in explain("sts-policy-invalid").fix
    assert explain("CERTIFICATE-EXPIRED") == explain("certificate-expired")
    assert "opportunistic" in NO_POLICY_FOUND.meaning


def test_an_unknown_result_type_gets_an_honest_answer() -> None:
    explanation = explain("quantum-decoherence")
    assert not is_known("quantum-decoherence")
    assert "does not know" in explanation.meaning
    assert "failure-reason-code" in explanation.fix
