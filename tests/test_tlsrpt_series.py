"""The figures the dashboard, metrics and alerts watch: per-domain days over the window (zeros
filled in, reports outside left out), failures by result type, reporter, sending MTA and
receiving MX, session totals by (domain, reporter, result), newest report per reporter, and
the sessions in an alert window."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from postfix_mtasts.tlsrpt.model import Report, parse_report
from postfix_mtasts.tlsrpt.series import (
    RESULT_SUCCESSFUL,
    RESULT_UNDETAILED,
    breakdown,
    dashboard_view,
    newest_reports,
    session_totals,
    window_sessions,
)
from tests.support import tlsrpt_samples as samples

TODAY = date(2026, 12, 6)


def on(day: date, org: str = "Google Inc.", **policy: object) -> dict[str, object]:
    return samples.report(org=org, report_id=f"{org}-{day}-{policy.get('domain', '')}",
                          start=f"{day}T00:00:00Z", end=f"{day}T23:59:59Z",
                          policies=[samples.policy(**policy)])  # type: ignore[arg-type]


def parsed(*reports: dict[str, object]) -> list[Report]:
    return [parse_report(r) for r in reports]


def test_days_cover_the_window_with_zeros_and_leave_older_and_future_reports_out() -> None:
    reports = parsed(
        on(TODAY, successful=100),
        on(TODAY - timedelta(days=2), successful=50, details=[samples.failure("certificate-expired", 5)]),
        on(TODAY - timedelta(days=89), successful=7),   # first day of the window
        on(TODAY - timedelta(days=90), successful=999),  # one day too old
        on(TODAY + timedelta(days=1), successful=999),   # a reporter's clock ahead of ours
    )
    view = dashboard_view(reports, TODAY)

    assert (view.first_day, view.last_day, view.reports) == (TODAY - timedelta(days=89), TODAY, 3)
    [domain] = view.domains
    assert len(domain.days) == 90
    assert [d.day for d in domain.days] == [TODAY - timedelta(days=89 - i) for i in range(90)]
    by_day = {d.day: (d.successful, d.failed) for d in domain.days}
    assert by_day[TODAY] == (100, 0)
    assert by_day[TODAY - timedelta(days=2)] == (50, 5)
    assert by_day[TODAY - timedelta(days=89)] == (7, 0)
    assert by_day[TODAY - timedelta(days=1)] == (0, 0)
    assert (domain.successful, domain.failed, domain.sessions) == (157, 5, 162)


def test_failures_by_result_type_reporter_sending_mta_and_receiving_mx() -> None:
    reports = parsed(
        on(TODAY, successful=900, details=[
            samples.failure("sts-policy-fetch-error", 7, sending_ip="192.0.2.1", mx=None),
            samples.failure("certificate-expired", 3, sending_ip="192.0.2.2", mx="mx1.example.com"),
        ]),
        on(TODAY, org="Microsoft Corporation", successful=400, failed=6, details=[
            samples.failure("certificate-expired", 4, sending_ip="192.0.2.2", mx="mx2.example.com"),
        ]),
        on(TODAY - timedelta(days=1), org="Microsoft Corporation", successful=10),
        on(TODAY, domain="example.org", policy_type="no-policy-found", successful=30),
    )
    view = dashboard_view(reports, TODAY)

    assert [d.domain for d in view.domains] == ["example.com", "example.org"]  # failures first
    domain = view.domains[0]
    assert [(r.result_type, r.failed, r.is_sts) for r in domain.result_types] == [
        ("certificate-expired", 7, False), ("sts-policy-fetch-error", 7, True)]
    assert domain.result_types[0].explanation.fix.startswith("renew it")
    assert domain.failed_without_details == 2
    assert [(r.organization, r.reports, r.successful, r.failed) for r in domain.reporters] == [
        ("Google Inc.", 1, 900, 10), ("Microsoft Corporation", 2, 410, 6)]
    assert domain.reporters[1].newest == datetime(2026, 12, 6, 23, 59, 59, tzinfo=UTC)
    sending = [(r.name, r.failed) for r in domain.sending_mtas.rows]
    assert sending == [("192.0.2.1", 7), ("192.0.2.2", 7)]  # ties by name
    assert [(r.name, r.failed) for r in domain.receiving_mxs.rows] == [
        ("-", 7), ("mx2.example.com", 4), ("mx1.example.com", 3)]
    assert view.domains[1].policy_types == ("no-policy-found",)


def test_a_long_breakdown_keeps_the_largest_rows_and_adds_up_the_rest() -> None:
    table = breakdown({f"192.0.2.{i}": i for i in range(1, 21)}, rows=3)
    assert [(r.name, r.failed) for r in table.rows] == [("192.0.2.20", 20), ("192.0.2.19", 19),
                                                         ("192.0.2.18", 18)]
    assert (table.other_rows, table.other_failed) == (17, sum(range(1, 18)))


def test_session_totals_by_domain_reporter_and_result() -> None:
    reports = parsed(
        on(TODAY, successful=10, failed=5, details=[samples.failure("certificate-expired", 3)]),
        on(TODAY - timedelta(days=1), successful=1, details=[samples.failure("certificate-expired", 1)]),
        on(TODAY, org="Mail.Ru", domain="example.org", successful=2),
    )
    assert session_totals(reports) == {
        ("example.com", "Google Inc.", RESULT_SUCCESSFUL): 11,
        ("example.com", "Google Inc.", "certificate-expired"): 4,
        ("example.com", "Google Inc.", RESULT_UNDETAILED): 2,
        ("example.org", "Mail.Ru", RESULT_SUCCESSFUL): 2,
    }


def test_newest_report_per_reporter_is_the_latest_end() -> None:
    reports = parsed(*(on(TODAY - timedelta(days=n)) for n in (3, 1, 2)),
                     on(TODAY - timedelta(days=9), org="Mail.Ru"))
    assert newest_reports(reports) == {
        "Google Inc.": datetime(2026, 12, 5, 23, 59, 59, tzinfo=UTC),
        "Mail.Ru": datetime(2026, 11, 27, 23, 59, 59, tzinfo=UTC),
    }


def test_window_sessions_count_reports_ending_inside_the_window() -> None:
    reports = parsed(
        on(TODAY, successful=10, details=[samples.failure("certificate-expired", 2)]),
        on(TODAY - timedelta(days=1), successful=5),
        on(TODAY - timedelta(days=3), successful=1000),  # ended before the window
    )
    until = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)
    assert window_sessions(reports, until - timedelta(days=2), until) == {"example.com": (15, 2)}
