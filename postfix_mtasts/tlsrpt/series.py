"""The figures the dashboard, the metrics and the alerts watch, computed from stored reports.

Pure: validated :class:`~postfix_mtasts.tlsrpt.model.Report` values and "today"
in, plain dataclasses out. No clock, no store, no HTML: the callers pass the
time and lay the figures out.

A report counts on the UTC day its date range starts (as in
:mod:`postfix_mtasts.tlsrpt.summary`); reporters send one per day and domain.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from postfix_mtasts.tlsrpt.explain import Explanation, explain
from postfix_mtasts.tlsrpt.model import PolicyResult, Report

#: Days the dashboard charts, ending today.
DASHBOARD_DAYS = 90
#: Rows shown in each "failures by ..." table of a domain; the rest are added up in one line.
BREAKDOWN_ROWS = 15
#: The name used for a policy entry without a policy-domain (older Postfix reporters).
NO_DOMAIN = "(no policy-domain)"
#: The ``result`` label of successful sessions, beside the RFC 8460 result types.
RESULT_SUCCESSFUL = "successful"
#: The ``result`` label of failed sessions a policy counts but no failure-details entry explains.
RESULT_UNDETAILED = "failure-without-details"


def policy_domain(policy: PolicyResult) -> str:
    """The domain a policy entry is about, or :data:`NO_DOMAIN` when the reporter left it out."""
    return policy.policy_domain or NO_DOMAIN


def report_day(report: Report) -> date:
    """The UTC day a report counts on."""
    return report.start.date()


@dataclass(frozen=True)
class DaySessions:
    """Successful and failed sessions of one domain on one day."""

    day: date
    successful: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Row:
    """One line of a "failures by ..." table: a name and its failed sessions."""

    name: str
    failed: int


@dataclass(frozen=True)
class Breakdown:
    """The largest rows of one table, and what the rows left out add up to."""

    rows: tuple[Row, ...]
    other_rows: int = 0
    other_failed: int = 0


@dataclass(frozen=True)
class ResultTypeRow:
    """Failed sessions of one result type, with its meaning and usual fix."""

    result_type: str
    failed: int
    explanation: Explanation

    @property
    def is_sts(self) -> bool:
        """An MTA-STS failure (``sts-*``): ``check DOMAIN`` shows what senders find."""
        return self.result_type.startswith("sts-")


@dataclass(frozen=True)
class ReporterRow:
    """What one organisation reported about a domain in the window."""

    organization: str
    reports: int
    successful: int
    failed: int
    newest: datetime


@dataclass(frozen=True)
class DomainView:
    """Everything the dashboard shows for one policy domain."""

    domain: str
    days: tuple[DaySessions, ...]
    successful: int
    failed: int
    failed_without_details: int
    policy_types: tuple[str, ...]
    result_types: tuple[ResultTypeRow, ...]
    reporters: tuple[ReporterRow, ...]
    sending_mtas: Breakdown
    receiving_mxs: Breakdown

    @property
    def sessions(self) -> int:
        return self.successful + self.failed

    @property
    def failure_ratio(self) -> float:
        return self.failed / self.sessions if self.sessions else 0.0


@dataclass(frozen=True)
class DashboardView:
    """The dashboard's figures: the window and each domain, worst first."""

    first_day: date
    last_day: date
    reports: int
    domains: tuple[DomainView, ...]


@dataclass
class _DomainTotals:
    days: dict[date, list[int]] = field(default_factory=dict)
    failed_without_details: int = 0
    policy_types: set[str] = field(default_factory=set)
    result_types: dict[str, int] = field(default_factory=dict)
    reporters: dict[str, list[int]] = field(default_factory=dict)
    newest: dict[str, datetime] = field(default_factory=dict)
    sending: dict[str, int] = field(default_factory=dict)
    receiving: dict[str, int] = field(default_factory=dict)


def dashboard_view(reports: Iterable[Report], today: date, days: int = DASHBOARD_DAYS,
                   rows: int = BREAKDOWN_ROWS) -> DashboardView:
    """Per domain: sessions per day over the ``days`` ending ``today``, and failures by
    result type, reporter, sending MTA and receiving MX. Reports outside the window are left out."""
    first = today - timedelta(days=days - 1)
    domains: dict[str, _DomainTotals] = {}
    counted = 0
    for report in reports:
        day = report_day(report)
        if not first <= day <= today:
            continue
        counted += 1
        named: set[str] = set()
        for policy in report.policies:
            name = policy_domain(policy)
            totals = domains.setdefault(name, _DomainTotals())
            _add_policy(totals, report, day, policy)
            if name not in named:  # a report counts once per domain, however many policies
                named.add(name)
                totals.reporters[report.organization_name][0] += 1
    views = [_domain_view(name, totals, first, days, rows) for name, totals in domains.items()]
    views.sort(key=lambda v: (-v.failed, -v.failure_ratio, v.domain))
    return DashboardView(first, today, counted, tuple(views))


def _add_policy(totals: _DomainTotals, report: Report, day: date, policy: PolicyResult) -> None:
    per_day = totals.days.setdefault(day, [0, 0])
    per_day[0] += policy.successful_sessions
    per_day[1] += policy.failed_sessions
    totals.policy_types.add(policy.policy_type.value)
    organization = report.organization_name
    reporter = totals.reporters.setdefault(organization, [0, 0, 0])
    reporter[1] += policy.successful_sessions
    reporter[2] += policy.failed_sessions
    if report.end > totals.newest.get(organization, report.end - timedelta(seconds=1)):
        totals.newest[organization] = report.end
    detailed = 0
    for detail in policy.failure_details:
        count = detail.failed_session_count
        detailed += count
        totals.result_types[detail.result_type] = totals.result_types.get(detail.result_type, 0) + count
        sender = detail.sending_mta_ip or "-"
        totals.sending[sender] = totals.sending.get(sender, 0) + count
        totals.receiving[detail.receiving_mx] = totals.receiving.get(detail.receiving_mx, 0) + count
    totals.failed_without_details += max(0, policy.failed_sessions - detailed)


def _domain_view(name: str, totals: _DomainTotals, first: date, days: int, rows: int) -> DomainView:
    series = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        successful, failed = totals.days.get(day, (0, 0))
        series.append(DaySessions(day, successful, failed))
    reporters = sorted(
        (ReporterRow(org, n, s, f, totals.newest[org]) for org, (n, s, f) in totals.reporters.items()),
        key=lambda r: (-r.failed, -r.successful, r.organization.lower()),
    )
    return DomainView(
        domain=name,
        days=tuple(series),
        successful=sum(d.successful for d in series),
        failed=sum(d.failed for d in series),
        failed_without_details=totals.failed_without_details,
        policy_types=tuple(sorted(totals.policy_types)),
        result_types=tuple(
            ResultTypeRow(kind, count, explain(kind))
            for kind, count in sorted(totals.result_types.items(), key=lambda item: (-item[1], item[0]))
        ),
        reporters=tuple(reporters),
        sending_mtas=breakdown(totals.sending, rows),
        receiving_mxs=breakdown(totals.receiving, rows),
    )


def breakdown(counts: dict[str, int], rows: int = BREAKDOWN_ROWS) -> Breakdown:
    """The ``rows`` largest counts, largest first; the rest summed into ``other_*``."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown, rest = ordered[:rows], ordered[rows:]
    return Breakdown(tuple(Row(n, c) for n, c in shown), len(rest), sum(c for _, c in rest))


# --- for the metrics ---------------------------------------------------------------


SessionKey = tuple[str, str, str]


def session_totals(reports: Iterable[Report]) -> dict[SessionKey, int]:
    """Sessions by (policy domain, reporter, result): ``successful``, each result type, and
    :data:`RESULT_UNDETAILED` for failures without details."""
    totals: dict[SessionKey, int] = {}

    def add(key: SessionKey, count: int) -> None:
        totals[key] = totals.get(key, 0) + count

    for report in reports:
        reporter = report.organization_name
        for policy in report.policies:
            domain = policy_domain(policy)
            add((domain, reporter, RESULT_SUCCESSFUL), policy.successful_sessions)
            detailed = 0
            for detail in policy.failure_details:
                detailed += detail.failed_session_count
                add((domain, reporter, detail.result_type), detail.failed_session_count)
            if policy.failed_sessions > detailed:
                add((domain, reporter, RESULT_UNDETAILED), policy.failed_sessions - detailed)
    return totals


def newest_reports(reports: Iterable[Report]) -> dict[str, datetime]:
    """The end of the newest date range each reporter (organisation) has sent."""
    newest: dict[str, datetime] = {}
    for report in reports:
        seen = newest.get(report.organization_name)
        if seen is None or report.end > seen:
            newest[report.organization_name] = report.end
    return newest


def window_sessions(
    reports: Iterable[Report], since: datetime, until: datetime
) -> dict[str, tuple[int, int]]:
    """(successful, failed) per policy domain over the reports whose date range ends in
    (``since``, ``until``]."""
    totals: dict[str, tuple[int, int]] = {}
    for report in reports:
        if not since < report.end <= until:
            continue
        for policy in report.policies:
            domain = policy_domain(policy)
            successful, failed = totals.get(domain, (0, 0))
            totals[domain] = (successful + policy.successful_sessions, failed + policy.failed_sessions)
    return totals
