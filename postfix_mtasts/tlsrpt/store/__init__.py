"""The TLS report store: every report received, kept once, queryable later.

A report is identified by its reporting organisation (compared without case)
and its ``report-id``. The first copy stored wins; a later copy of the same
report is a duplicate when its content is the same JSON, else a conflict,
logged as one WARNING line and otherwise ignored. The store keeps the raw JSON
as received and, beside it, the columns that queries need: organisation,
report-id, start and end of the date range, and per policy its type, domain
and session counts.

Every backend implements :class:`IReportStore`:

- :class:`~postfix_mtasts.tlsrpt.store.sqlite.SqliteReportStore`, the default,
  one SQLite file beside the policy cache (``[reports] path``);
- :class:`~postfix_mtasts.tlsrpt.store.postgresql.PostgresqlReportStore` when
  ``[reports] dsn`` is set, for a fleet;
- :class:`~postfix_mtasts.tlsrpt.store.memory.MemoryReportStore` for tests.

The interface is synchronous (the ``report`` commands are plain Python); the
daemon wraps a store in
:class:`~postfix_mtasts.tlsrpt.store.threaded.ThreadedReportStore`, whose
``async`` methods run each call on one thread of its own so the reactor never
waits for the disk or the database. :func:`open_store` picks the backend from
the configuration.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

from postfix_mtasts.tlsrpt.model import Report, ReportError, parse_report_text

if TYPE_CHECKING:
    from postfix_mtasts.config import ReportsConfig

log = logging.getLogger("postfix_mtasts.tlsrpt.store")

__all__ = [
    "APPLICATION_ID",
    "AddResult",
    "Added",
    "IReportStore",
    "ReportError",
    "ReportStoreError",
    "content_digest",
    "open_store",
    "report_key",
    "restrict_to_domain",
]

#: SQLite ``PRAGMA application_id`` of a report store: 'MTSR' in ASCII.
#: (The policy cache has a value of its own, so neither file is taken for the other.)
APPLICATION_ID = 0x4D545352


class AddResult(enum.Enum):
    """What :meth:`IReportStore.add` did with a report."""

    #: Stored now: the first copy of this (organisation, report-id).
    NEW = "new"
    #: Already stored with the same content; nothing written.
    DUPLICATE = "duplicate"
    #: Already stored with other content; the first copy is kept, this one logged and dropped.
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Added:
    """The answer of :meth:`IReportStore.add`: the outcome, the parsed report,
    and where the copy the store keeps came from (``source`` itself when NEW)."""

    result: AddResult
    report: Report
    first_source: str


class ReportStoreError(Exception):
    """The store cannot be opened, read or written; ``str()`` is one line that
    names the file or database and the reason. Nothing was stored."""


class IReportStore(Interface):
    """Durable storage of RFC 8460 reports, keyed by (organisation, report-id).

    Methods raise :class:`ReportStoreError` when the store cannot be used, and
    :meth:`add` raises :class:`~postfix_mtasts.tlsrpt.model.ReportError` for
    bytes that are not a valid report. Safe to call from one thread at a time.
    """

    location = Attribute("Where the reports are kept, for messages: a file path or a database name")

    def add(raw: bytes, source: str) -> Added:
        """Validate the report JSON ``raw`` (bytes as received, after any
        decompression) and store it unless its (organisation, report-id) is
        already stored. ``source`` says where it came from (a path, a message)
        and is kept with it. A conflict is logged as one WARNING line."""

    def reports(since: datetime | None = None, domain: str | None = None) -> list[Report]:
        """The stored reports, oldest first (by start of date range, then by
        arrival). ``since``: only those whose date range ends at or after it.
        ``domain``: only those with a policy for that policy domain, and of each
        only the policies of that domain (so that totals count that domain alone)."""

    def count() -> int:
        """How many reports are stored."""

    def close() -> None:
        """Release the file or connection; the store is not used afterwards."""


def report_key(report: Report) -> tuple[str, str]:
    """The identity of a report: organisation without case, and report-id."""
    return (report.organization_name.casefold(), report.report_id)


def content_digest(raw: bytes) -> str:
    """A hash of the report's JSON content, blind to white space and key order,
    so a copy re-encoded by another mail path still counts as the same."""
    data = json.loads(raw.decode("utf-8-sig"))
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def normalise_domain(domain: str) -> str:
    """A policy domain as the parser stores it: lower case, no trailing dot."""
    return domain.strip().rstrip(".").lower()


def restrict_to_domain(report: Report, domain: str | None) -> Report | None:
    """``report`` with only the policies of ``domain``; None when it has none."""
    if domain is None:
        return report
    wanted = normalise_domain(domain)
    policies = tuple(p for p in report.policies if p.policy_domain == wanted)
    return replace(report, policies=policies) if policies else None


def policy_rows(report: Report) -> Iterable[tuple[int, str, str, int, int]]:
    """(position, policy type, policy domain, successful, failed) per policy;
    a policy without a domain (old reporters' no-policy-found) has ``""``."""
    for position, policy in enumerate(report.policies):
        yield (
            position,
            policy.policy_type.value,
            policy.policy_domain or "",
            policy.successful_sessions,
            policy.failed_sessions,
        )


def epoch(moment: datetime) -> float:
    """Seconds since 1970 of an aware datetime (naive ones are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def open_store(config: ReportsConfig) -> IReportStore:
    """The store the configuration names: PostgreSQL when ``dsn`` is set, else
    the SQLite file at ``path`` (or its default, beside the policy cache).
    Raises :class:`ReportStoreError` when it cannot be opened."""
    if config.dsn:
        from postfix_mtasts.tlsrpt.store.postgresql import PostgresqlReportStore

        return PostgresqlReportStore(config.dsn, schema=config.schema)
    from postfix_mtasts.tlsrpt.store.sqlite import SqliteReportStore, default_path

    return SqliteReportStore(config.path or default_path())


def judge_copy(report: Report, source: str, digest: str, *, stored_digest: str,
               stored_source: str) -> Added:
    """A report already stored: the same content is a duplicate; other content
    a conflict, logged once, the stored copy kept."""
    if stored_digest == digest:
        return Added(AddResult.DUPLICATE, report, stored_source)
    log.warning(
        "report store: conflict: report %r of %s from %s differs from the copy stored from %s; "
        "kept the first",
        report.report_id, report.organization_name, source, stored_source,
    )
    return Added(AddResult.CONFLICT, report, stored_source)


def reparse(location: str, raws: Iterable[bytes], domain: str | None) -> list[Report]:
    """Stored JSON back to reports, restricted to ``domain``; a stored report
    this version cannot read any more is logged and left out."""
    reports: list[Report] = []
    for raw in raws:
        try:
            report = parse_report_text(raw)
        except ReportError as e:
            log.warning("report store %s: a stored report cannot be read any more (%s); left out",
                        location, e)
            continue
        restricted = restrict_to_domain(report, domain)
        if restricted is not None:
            reports.append(restricted)
    return reports

