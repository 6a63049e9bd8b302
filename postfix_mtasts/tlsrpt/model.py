"""RFC 8460 (SMTP TLS Reporting) aggregate reports: parsing and validation.

Pure: JSON text or an already decoded object in, a typed :class:`Report` out, or
a :class:`ReportError` naming the field and what is wrong with it. No I/O here,
so every rule can be tested on plain dictionaries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

#: Result types of RFC 8460 §4.3 (negotiation, DANE, MTA-STS), in the RFC's order.
RESULT_TYPES: tuple[str, ...] = (
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
)


class PolicyType(Enum):
    """The ``policy-type`` of RFC 8460 §4.4: which policy the sender applied."""

    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY_FOUND = "no-policy-found"


class ReportError(ValueError):
    """A report that cannot be counted; the message names the field and the fault."""


@dataclass(frozen=True)
class FailureDetail:
    """One ``failure-details`` entry: a result type seen so many times between two hosts."""

    result_type: str
    failed_session_count: int
    sending_mta_ip: str | None = None
    receiving_mx_hostname: str | None = None
    receiving_mx_helo: str | None = None
    receiving_ip: str | None = None
    additional_information: str | None = None
    failure_reason_code: str | None = None

    @property
    def receiving_mx(self) -> str:
        """The receiving MX as best named: hostname, else HELO name, else IP, else ``-``."""
        return self.receiving_mx_hostname or self.receiving_mx_helo or self.receiving_ip or "-"


@dataclass(frozen=True)
class PolicyResult:
    """One ``policies[]`` entry: the policy applied to a domain and its session counts."""

    policy_type: PolicyType
    policy_domain: str
    policy_strings: tuple[str, ...]
    mx_hosts: tuple[str, ...]
    successful_sessions: int
    failed_sessions: int
    failure_details: tuple[FailureDetail, ...]

    @property
    def mode(self) -> str | None:
        """The MTA-STS ``mode`` from the policy-string lines (``enforce``, ``testing``, ``none``)."""
        return policy_mode(self.policy_strings)


@dataclass(frozen=True)
class Report:
    """One aggregate report from one reporting organisation for one date range."""

    organization_name: str
    start: datetime
    end: datetime
    report_id: str
    contact_info: str | None
    policies: tuple[PolicyResult, ...]

    @property
    def successful_sessions(self) -> int:
        return sum(p.successful_sessions for p in self.policies)

    @property
    def failed_sessions(self) -> int:
        return sum(p.failed_sessions for p in self.policies)


def policy_mode(policy_strings: Sequence[str]) -> str | None:
    """Find ``mode: X`` among the policy-string lines; ``None`` when there is none."""
    for line in policy_strings:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "mode":
            return value.strip().lower() or None
    return None


def parse_report_text(text: str | bytes) -> Report:
    """Parse the JSON text of one report (UTF-8 bytes or str) and validate it."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ReportError(f"not UTF-8 text (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"bad JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ReportError("bad JSON: nested too deeply") from None
    return parse_report(data)


def parse_report(data: object) -> Report:
    """Validate a decoded JSON value as an RFC 8460 §4.4 report."""
    top = _mapping(data, "the report")
    organization = _string(top, "organization-name", "organization-name")
    date_range = _mapping(_required(top, "date-range", "date-range"), "date-range")
    start = _datetime(date_range, "start-datetime", "date-range.start-datetime")
    end = _datetime(date_range, "end-datetime", "date-range.end-datetime")
    if end < start:
        raise ReportError(
            f"date-range ends before it starts ({end.isoformat()} < {start.isoformat()})"
        )
    contact_info = _optional_string(top, "contact-info", "contact-info")
    report_id = _string(top, "report-id", "report-id")
    policies_value = _required(top, "policies", "policies")
    if not isinstance(policies_value, list):
        raise ReportError(f"policies must be a list, not {_kind(policies_value)}")
    return Report(
        organization_name=organization,
        start=start,
        end=end,
        report_id=report_id,
        contact_info=contact_info,
        policies=tuple(_policy(item, f"policies[{i}]") for i, item in enumerate(policies_value)),
    )


def _policy(value: object, where: str) -> PolicyResult:
    entry = _mapping(value, where)
    policy = _mapping(_required(entry, "policy", f"{where}.policy"), f"{where}.policy")
    type_text = _string(policy, "policy-type", f"{where}.policy.policy-type")
    try:
        policy_type = PolicyType(type_text)
    except ValueError:
        known = ", ".join(t.value for t in PolicyType)
        raise ReportError(f"{where}.policy.policy-type {type_text!r} is not one of {known}") from None
    summary = _mapping(_required(entry, "summary", f"{where}.summary"), f"{where}.summary")
    details_value = entry.get("failure-details", [])
    if details_value is None:
        details_value = []
    if not isinstance(details_value, list):
        raise ReportError(f"{where}.failure-details must be a list, not {_kind(details_value)}")
    return PolicyResult(
        policy_type=policy_type,
        policy_domain=_string(policy, "policy-domain", f"{where}.policy.policy-domain").rstrip(".").lower(),
        policy_strings=_lines(policy.get("policy-string"), f"{where}.policy.policy-string"),
        mx_hosts=_lines(policy.get("mx-host"), f"{where}.policy.mx-host"),
        successful_sessions=_count(
            summary, "total-successful-session-count", f"{where}.summary.total-successful-session-count"
        ),
        failed_sessions=_count(
            summary, "total-failure-session-count", f"{where}.summary.total-failure-session-count"
        ),
        failure_details=tuple(
            _detail(item, f"{where}.failure-details[{i}]") for i, item in enumerate(details_value)
        ),
    )


def _detail(value: object, where: str) -> FailureDetail:
    entry = _mapping(value, where)
    return FailureDetail(
        result_type=_string(entry, "result-type", f"{where}.result-type").lower(),
        failed_session_count=_count(entry, "failed-session-count", f"{where}.failed-session-count"),
        sending_mta_ip=_optional_string(entry, "sending-mta-ip", f"{where}.sending-mta-ip"),
        receiving_mx_hostname=_optional_host(entry, "receiving-mx-hostname", where),
        receiving_mx_helo=_optional_host(entry, "receiving-mx-helo", where),
        receiving_ip=_optional_string(entry, "receiving-ip", f"{where}.receiving-ip"),
        additional_information=_optional_string(
            entry, "additional-information", f"{where}.additional-information"
        ),
        failure_reason_code=_optional_string(entry, "failure-reason-code", f"{where}.failure-reason-code"),
    )


# --- field readers: each raises ReportError naming the field -----------------


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return f"the decimal number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ReportError(f"{where} must be a JSON object, not {_kind(value)}")
    return value


def _required(entry: Mapping[str, Any], key: str, where: str) -> object:
    if key not in entry:
        raise ReportError(f"missing required field {where}")
    return entry[key]


def _string(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = _required(entry, key, where)
    if not isinstance(value, str):
        raise ReportError(f"{where} must be a string, not {_kind(value)}")
    if not value.strip():
        raise ReportError(f"{where} is empty")
    return value.strip()


def _optional_string(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # some reporters send failure-reason-code as a number
    if not isinstance(value, str):
        raise ReportError(f"{where} must be a string, not {_kind(value)}")
    return value.strip() or None


def _optional_host(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    value = _optional_string(entry, key, f"{where}.{key}")
    return value.rstrip(".").lower() if value else None


def _count(entry: Mapping[str, Any], key: str, where: str) -> int:
    value = _required(entry, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReportError(f"{where} must be a whole number, not {_kind(value)}")
    if value < 0:
        raise ReportError(f"{where} is {value}; counts cannot be negative")
    return value


def _datetime(entry: Mapping[str, Any], key: str, where: str) -> datetime:
    text = _string(entry, key, where)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{where} is not an RFC 3339 date-time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # RFC 8460 §4.4 says UTC; some omit the Z
    return moment.astimezone(UTC)


def _lines(value: object, where: str) -> tuple[str, ...]:
    """A list of strings; a single string (a known reporter quirk) is split into its lines."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(line.strip() for line in value.splitlines() if line.strip())
    if not isinstance(value, list):
        raise ReportError(f"{where} must be a list of strings, not {_kind(value)}")
    lines: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ReportError(f"{where}[{i}] must be a string, not {_kind(item)}")
        lines.extend(line.strip() for line in item.splitlines() if line.strip())
    return tuple(lines)
