"""RFC 8460 (SMTP TLS Reporting) aggregate reports: parsing and validation.

Pure: JSON text or an already decoded object in, a typed :class:`Report` out, or
a :class:`ReportError` naming the field and what is wrong with it. No I/O here,
so every rule can be tested on plain dictionaries.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
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


#: Fields of one failure-details entry (RFC 8460 §4.4), and the draft names still sent for them:
#: RFC 8460's own §4.8 example says ``failure-error-code``.
DETAIL_FIELDS: tuple[str, ...] = (
    "result-type",
    "sending-mta-ip",
    "receiving-mx-hostname",
    "receiving-mx-helo",
    "receiving-ip",
    "failed-session-count",
    "additional-information",
    "failure-reason-code",
)
DETAIL_FIELD_ALIASES: dict[str, str] = {"failure-error-code": "failure-reason-code"}

#: RFC 3339 date-time (§5.6), "T" and "Z" in either case (§5.6 NOTE); a missing zone is read as UTC.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?",
    re.ASCII,
)
#: A URI's scheme (RFC 3986 §3.1); additional-information of this shape is a URI.
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
#: Longest warning text of one field value quoted back to the reader.
WARNING_VALUE_MAX = 200


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
    #: ``None`` when the reporter left it out (Postfix's TLSRPT reporter did, for no-policy-found).
    policy_domain: str | None
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
    #: What is wrong with the report without making its figures unusable, one line each.
    warnings: tuple[str, ...] = ()

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
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ReportError(f"not UTF-8 text (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"bad JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ReportError("bad JSON: nested too deeply") from None
    except ValueError as e:  # a number too long to convert, among others
        raise ReportError(f"bad JSON: {e}") from None
    return parse_report(data)


def parse_report(data: object) -> Report:
    """Validate a decoded JSON value as an RFC 8460 §4.4 report.

    A fault that makes the figures unusable raises :class:`ReportError`; one that
    does not (a missing policy-domain, details that disagree with the summary, a
    field RFC 8460 does not define) becomes a line of :attr:`Report.warnings`.
    """
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
    warnings: list[str] = []
    policies = tuple(_policy(item, f"policies[{i}]", warnings) for i, item in enumerate(policies_value))
    return Report(
        organization_name=organization,
        start=start,
        end=end,
        report_id=report_id,
        contact_info=contact_info,
        policies=policies,
        warnings=tuple(warnings),
    )


def _policy(value: object, where: str, warnings: list[str]) -> PolicyResult:
    entry = _mapping(value, where)
    policy = _mapping(_required(entry, "policy", f"{where}.policy"), f"{where}.policy")
    type_text = _string(policy, "policy-type", f"{where}.policy.policy-type")
    try:
        policy_type = PolicyType(type_text.lower())
    except ValueError:
        known = ", ".join(t.value for t in PolicyType)
        raise ReportError(f"{where}.policy.policy-type {type_text!r} is not one of {known}") from None
    domain = _policy_domain(policy, policy_type, f"{where}.policy.policy-domain", warnings)
    summary = _mapping(_required(entry, "summary", f"{where}.summary"), f"{where}.summary")
    details_value = entry.get("failure-details", [])
    if details_value is None:
        details_value = []
    if not isinstance(details_value, list):
        raise ReportError(f"{where}.failure-details must be a list, not {_kind(details_value)}")
    result = PolicyResult(
        policy_type=policy_type,
        policy_domain=domain,
        policy_strings=_policy_strings(policy.get("policy-string"), f"{where}.policy.policy-string"),
        mx_hosts=_lines(policy.get("mx-host"), f"{where}.policy.mx-host"),
        successful_sessions=_count(
            summary, "total-successful-session-count", f"{where}.summary.total-successful-session-count"
        ),
        failed_sessions=_count(
            summary, "total-failure-session-count", f"{where}.summary.total-failure-session-count"
        ),
        failure_details=tuple(
            _detail(item, f"{where}.failure-details[{i}]", warnings) for i, item in enumerate(details_value)
        ),
    )
    detailed = sum(d.failed_session_count for d in result.failure_details)
    if detailed > result.failed_sessions:
        warnings.append(
            f"{where}: failure-details add up to {detailed} failed sessions, more than the summary's "
            f"total-failure-session-count {result.failed_sessions}; the summary's figure is counted"
        )
    return result


def _policy_domain(policy: Mapping[str, Any], policy_type: PolicyType, where: str,
                   warnings: list[str]) -> str | None:
    """The policy-domain, lower case without a final dot. Postfix's own TLSRPT reporter left it
    out of no-policy-found policies until 2025: such a report is still counted, with a warning."""
    if policy_type is PolicyType.NO_POLICY_FOUND and policy.get("policy-domain") in (None, ""):
        warnings.append(f"missing required field {where}; the sessions are counted without a domain")
        return None
    return _string(policy, "policy-domain", where).rstrip(".").lower()


def _detail(value: object, where: str, warnings: list[str]) -> FailureDetail:
    entry = dict(_mapping(value, where))
    for draft, name in DETAIL_FIELD_ALIASES.items():
        if draft in entry and entry.get(name) is None:
            entry[name] = entry.pop(draft)
        else:
            entry.pop(draft, None)
    detail = FailureDetail(
        result_type=_string(entry, "result-type", f"{where}.result-type").lower(),
        failed_session_count=_count(entry, "failed-session-count", f"{where}.failed-session-count"),
        sending_mta_ip=_optional_string(entry, "sending-mta-ip", f"{where}.sending-mta-ip"),
        receiving_mx_hostname=_optional_host(entry, "receiving-mx-hostname", where),
        receiving_mx_helo=_optional_host(entry, "receiving-mx-helo", where),
        receiving_ip=_optional_string(entry, "receiving-ip", f"{where}.receiving-ip"),
        additional_information=_additional_information(entry, f"{where}.additional-information"),
        failure_reason_code=_optional_string(entry, "failure-reason-code", f"{where}.failure-reason-code"),
    )
    if detail.result_type not in RESULT_TYPES:
        warnings.append(
            f"{where}.result-type {_quoted(entry['result-type'])} is not a result type of RFC 8460 §4.3"
        )
    for key, address in (("sending-mta-ip", detail.sending_mta_ip), ("receiving-ip", detail.receiving_ip)):
        if address is not None and not _is_ip_address(address):
            warnings.append(f"{where}.{key} {_quoted(address)} is not an IP address")
    for key in entry:
        if key not in DETAIL_FIELDS:
            warnings.append(f"{where} has a field RFC 8460 does not define: {key} = {_quoted(entry[key])}")
    return detail


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _quoted(value: object) -> str:
    """A value from the report, quoted for a warning and cut to a readable length."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= WARNING_VALUE_MAX else text[: WARNING_VALUE_MAX - 1] + "…"


def _additional_information(entry: Mapping[str, Any], where: str) -> str | None:
    """additional-information is a URI (§4.4); whitespace inside a URI is a line-wrap artefact
    and is removed (RFC 3986 Appendix C). Free text is kept as it is."""
    value = _optional_string(entry, "additional-information", where)
    if value is not None and _URI_SCHEME.match(value) and "//" in value.split()[0]:
        return "".join(value.split())
    return value


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
    """An RFC 3339 date-time; "t" and "z" may be lower case (RFC 3339 §5.6), a missing zone
    is UTC (RFC 8460 §4.4 says UTC; some reporters omit the Z), a leap second is read as :59."""
    text = _string(entry, key, where)
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ReportError(f"{where} is not an RFC 3339 date-time: {text!r}")
    year, month, day, hour, minute, second = (int(match.group(n)) for n in range(1, 7))
    fraction, zulu, sign, offset_hours, offset_minutes = match.group(7, 8, 9, 10, 11)
    zone = UTC
    if sign is not None and not zulu:
        offset = timedelta(hours=int(offset_hours), minutes=int(offset_minutes))
        if offset >= timedelta(days=1):
            raise ReportError(f"{where} is not a valid date-time: {text!r} (a UTC offset of a day or more)")
        zone = timezone(-offset if sign == "-" else offset)
    try:
        moment = datetime(year, month, day, hour, minute, min(second, 59),
                          int((fraction or "0")[:6].ljust(6, "0")), tzinfo=zone)
    except ValueError as e:
        raise ReportError(f"{where} is not a valid date-time: {text!r} ({e})") from None
    return moment.astimezone(UTC)


def _policy_strings(value: object, where: str) -> tuple[str, ...]:
    """The policy-string lines. Microsoft sends a TLSA policy's records as a single string that
    holds a JSON array of them; that array is unpacked into one line per record."""
    lines = _lines(value, where)
    if len(lines) == 1 and lines[0].startswith("[") and lines[0].endswith("]"):
        try:
            inner = json.loads(lines[0])
        except ValueError:
            return lines
        if isinstance(inner, list) and all(isinstance(item, str) for item in inner):
            return tuple(item.strip() for item in inner if item.strip())
    return lines


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
