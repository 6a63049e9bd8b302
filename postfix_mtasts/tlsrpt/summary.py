"""Add reports up: per reporter and date range, per policy, per failure, per result type, per day.

Pure arithmetic on validated :class:`~postfix_mtasts.tlsrpt.model.Report` values;
the renderers only lay the figures out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime

from postfix_mtasts.tlsrpt.explain import Explanation, explain
from postfix_mtasts.tlsrpt.model import FailureDetail, PolicyType, Report


@dataclass
class ReporterRange:
    """The reports one organisation sent for one date range (often one per policy domain)."""

    organization: str
    start: datetime
    end: datetime
    reports: int = 0
    successful: int = 0
    failed: int = 0
    contact_info: str | None = None


@dataclass
class PolicyTotals:
    """Sessions counted against one policy: its type, domain and (for sts) mode."""

    policy_type: str
    #: ``None`` when the reports left the policy-domain out.
    domain: str | None
    mode: str | None
    successful: int = 0
    failed: int = 0


#: A failure group's fields in order: result type, sending MTA IP, receiving MX hostname and HELO,
#: receiving IP, failure reason code, additional information.
GroupKey = tuple[str, str | None, str | None, str | None, str | None, str | None, str | None]


@dataclass
class FailureGroup:
    """Failed sessions whose failure-details agree in every field but the count: one result type
    between one sending MTA and one receiving MX, with the same reason and information."""

    result_type: str
    sending_mta_ip: str | None = None
    receiving_mx_hostname: str | None = None
    receiving_mx_helo: str | None = None
    receiving_ip: str | None = None
    failure_reason_code: str | None = None
    additional_information: str | None = None
    sessions: int = 0

    @property
    def receiving_mx(self) -> str:
        """The receiving MX as best named: hostname, else HELO name, else IP, else ``-``."""
        return self.receiving_mx_hostname or self.receiving_mx_helo or self.receiving_ip or "-"

    @staticmethod
    def key(detail: FailureDetail) -> GroupKey:
        """What a failure-details entry is grouped by: every field but its count."""
        return (detail.result_type, detail.sending_mta_ip, detail.receiving_mx_hostname,
                detail.receiving_mx_helo, detail.receiving_ip, detail.failure_reason_code,
                detail.additional_information)

    def key_of(self) -> GroupKey:
        return (self.result_type, self.sending_mta_ip, self.receiving_mx_hostname, self.receiving_mx_helo,
                self.receiving_ip, self.failure_reason_code, self.additional_information)


@dataclass
class ResultTypeTotals:
    """All failed sessions of one result type, with what it means and the usual fix."""

    result_type: str
    sessions: int
    explanation: Explanation


@dataclass
class DayTotals:
    """Sessions of the reports whose date range starts on one UTC day."""

    day: date
    successful: int = 0
    failed: int = 0


@dataclass
class Summary:
    """Every figure the renderers show."""

    reports: int = 0
    successful: int = 0
    failed: int = 0
    #: Failed sessions counted in a policy's summary but in none of its failure-details.
    failed_without_details: int = 0
    #: Sessions under no-policy-found policies: no MTA-STS or DANE policy applied to them.
    no_policy_successful: int = 0
    no_policy_failed: int = 0
    reporters: list[ReporterRange] = field(default_factory=list)
    policies: list[PolicyTotals] = field(default_factory=list)
    failures: list[FailureGroup] = field(default_factory=list)
    result_types: list[ResultTypeTotals] = field(default_factory=list)
    days: list[DayTotals] = field(default_factory=list)


def summarize(reports: Iterable[Report]) -> Summary:
    """Add up ``reports`` (already de-duplicated by the caller)."""
    summary = Summary()
    reporters: dict[tuple[str, datetime, datetime], ReporterRange] = {}
    policies: dict[tuple[str, str | None, str | None], PolicyTotals] = {}
    failures: dict[GroupKey, FailureGroup] = {}
    by_type: dict[str, int] = {}
    days: dict[date, DayTotals] = {}
    for report in reports:
        summary.reports += 1
        reporter = reporters.setdefault(
            (report.organization_name, report.start, report.end),
            ReporterRange(report.organization_name, report.start, report.end),
        )
        reporter.reports += 1
        reporter.contact_info = reporter.contact_info or report.contact_info
        day = days.setdefault(report.start.date(), DayTotals(report.start.date()))
        for policy in report.policies:
            key = (policy.policy_type.value, policy.policy_domain, policy.mode)
            totals = policies.setdefault(key, PolicyTotals(*key))
            totals.successful += policy.successful_sessions
            totals.failed += policy.failed_sessions
            reporter.successful += policy.successful_sessions
            reporter.failed += policy.failed_sessions
            day.successful += policy.successful_sessions
            day.failed += policy.failed_sessions
            summary.successful += policy.successful_sessions
            summary.failed += policy.failed_sessions
            if policy.policy_type is PolicyType.NO_POLICY_FOUND:
                summary.no_policy_successful += policy.successful_sessions
                summary.no_policy_failed += policy.failed_sessions
            detailed = 0
            for detail in policy.failure_details:
                group_key = FailureGroup.key(detail)
                group = failures.setdefault(group_key, FailureGroup(*group_key))
                group.sessions += detail.failed_session_count
                by_type[detail.result_type] = by_type.get(detail.result_type, 0) + detail.failed_session_count
                detailed += detail.failed_session_count
            summary.failed_without_details += max(0, policy.failed_sessions - detailed)
    summary.reporters = sorted(reporters.values(), key=lambda r: (r.start, r.organization.lower(), r.end))
    summary.policies = sorted(
        policies.values(), key=lambda p: (p.domain is None, p.domain or "", p.policy_type, p.mode or "")
    )
    summary.failures = sorted(
        failures.values(),
        key=lambda f: (-f.sessions, f.result_type, f.receiving_mx, f.sending_mta_ip or "",
                       *(value or "" for value in f.key_of())),
    )
    summary.result_types = [
        ResultTypeTotals(name, sessions, explain(name))
        for name, sessions in sorted(by_type.items(), key=lambda item: (-item[1], item[0]))
    ]
    summary.days = [days[d] for d in sorted(days)]
    return summary
