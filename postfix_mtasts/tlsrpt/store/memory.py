"""A report store in memory: the reference behaviour of :class:`IReportStore`,
for unit tests of whatever reads or writes reports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from zope.interface import implementer

from postfix_mtasts.tlsrpt.model import Report, parse_report_text
from postfix_mtasts.tlsrpt.store import (
    Added,
    AddResult,
    IReportStore,
    content_digest,
    judge_copy,
    normalise_domain,
    reparse,
    report_key,
)


@dataclass(frozen=True)
class _Kept:
    report: Report
    raw: bytes
    digest: str
    source: str


@implementer(IReportStore)
class MemoryReportStore:
    """Reports in a dict, kept in arrival order; gone when the process ends."""

    location = "memory"

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], _Kept] = {}

    def add(self, raw: bytes, source: str) -> Added:
        report = parse_report_text(raw)
        digest = content_digest(raw)
        key = report_key(report)
        stored = self._kept.get(key)
        if stored is None:
            self._kept[key] = _Kept(report, bytes(raw), digest, source)
            return Added(AddResult.NEW, report, source)
        return judge_copy(report, source, digest, stored_digest=stored.digest, stored_source=stored.source)

    def reports(self, since: datetime | None = None, domain: str | None = None) -> list[Report]:
        wanted = normalise_domain(domain) if domain is not None else None
        chosen = [
            (kept.report.start, position, kept.raw)
            for position, kept in enumerate(self._kept.values())
            if (since is None or kept.report.end >= since)
            and (wanted is None or any(p.policy_domain == wanted for p in kept.report.policies))
        ]
        chosen.sort(key=lambda item: (item[0], item[1]))
        return reparse(self.location, (raw for _, _, raw in chosen), domain)

    def count(self) -> int:
        return len(self._kept)

    def close(self) -> None:
        pass
