"""What ``postfix-mtasts check`` found, and how it is shown: one line per
finding with ✓ / ⚠ / ✗, and for every ⚠ and ✗ what it means and how to fix
it; or the same list as JSON for monitoring. Pure: no I/O, no Twisted."""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass

#: Exit status with no ✗ finding, and with at least one.
EXIT_CLEAN = 0
EXIT_PROBLEMS = 1
#: How the explanation lines of a ⚠ or ✗ are indented under it.
DETAIL_INDENT = "    "


class Level(enum.Enum):
    """How bad a finding is; the value is the word JSON output uses."""

    OK = "ok"
    WARNING = "warning"
    ERROR = "error"

    @property
    def symbol(self) -> str:
        return _SYMBOLS[self]


_SYMBOLS = {Level.OK: "✓", Level.WARNING: "⚠", Level.ERROR: "✗"}


class Topic:
    """The stable names of what a finding is about, for monitoring."""

    STS_TXT = "mta-sts-txt"
    POLICY_HOST_DNS = "policy-host-dns"
    POLICY_HOST_TLS = "policy-host-tls"
    POLICY_HOST_HTTP = "policy-host-http"
    POLICY = "policy"
    POLICY_MODE = "policy-mode"
    POLICY_MAX_AGE = "policy-max-age"
    MX_RECORDS = "mx-records"
    MX_COVERAGE = "mx-coverage"
    SMTP_CONNECT = "smtp-connect"
    SMTP_STARTTLS = "smtp-starttls"
    SMTP_CERTIFICATE = "smtp-certificate"
    SMTP_TLS_VERSION = "smtp-tls-version"
    TLSRPT = "tlsrpt"


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of the audit: ``message`` is the line itself; a ⚠ or ✗
    must also say what it ``means`` for senders and how to ``fix`` it."""

    level: Level
    topic: str
    message: str
    meaning: str = ""
    fix: str = ""

    def __post_init__(self) -> None:
        if self.level is not Level.OK and not (self.meaning and self.fix):
            raise ValueError(f"a {self.level.value} finding needs its meaning and fix: {self.message}")

    @classmethod
    def ok(cls, topic: str, message: str) -> Finding:
        return cls(Level.OK, topic, message)

    @classmethod
    def warning(cls, topic: str, message: str, meaning: str, fix: str) -> Finding:
        return cls(Level.WARNING, topic, message, meaning, fix)

    @classmethod
    def error(cls, topic: str, message: str, meaning: str, fix: str) -> Finding:
        return cls(Level.ERROR, topic, message, meaning, fix)

    def as_dict(self) -> dict[str, str]:
        return {
            "level": self.level.value,
            "topic": self.topic,
            "message": self.message,
            "meaning": self.meaning,
            "fix": self.fix,
        }


def exit_status(findings: Sequence[Finding]) -> int:
    """0 when nothing is ✗, 1 otherwise (warnings do not fail a check)."""
    return EXIT_PROBLEMS if any(f.level is Level.ERROR for f in findings) else EXIT_CLEAN


def summary(domain: str, findings: Sequence[Finding]) -> str:
    """``example.com: 14 checks, 1 error, 2 warnings``."""
    errors = sum(f.level is Level.ERROR for f in findings)
    warnings = sum(f.level is Level.WARNING for f in findings)
    return (
        f"{domain}: {_count(len(findings), 'check')}, {_count(errors, 'error')}, "
        f"{_count(warnings, 'warning')}"
    )


def render_text(domain: str, findings: Sequence[Finding]) -> str:
    """The findings for a person, ending with a summary line."""
    lines: list[str] = []
    for finding in findings:
        lines.append(f"{finding.level.symbol} {finding.message}")
        if finding.level is not Level.OK:
            lines.append(f"{DETAIL_INDENT}means: {finding.meaning}")
            lines.append(f"{DETAIL_INDENT}fix:   {finding.fix}")
    lines.append(summary(domain, findings))
    return "\n".join(lines) + "\n"


def render_json(findings: Sequence[Finding]) -> str:
    """The findings for monitoring: a JSON list of objects with level
    (ok/warning/error), topic, message, meaning and fix."""
    return json.dumps([finding.as_dict() for finding in findings], indent=2, ensure_ascii=False) + "\n"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
