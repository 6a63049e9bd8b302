"""Putting found reports into the store, and counting what happened.

Shared by ``postfix-mtasts report ingest`` and the daemon's mailbox
watchers (which run it on the store's own thread, through
:meth:`~postfix_mtasts.tlsrpt.store.threaded.ThreadedReportStore.run`). Whatever
cannot be read is logged as one WARNING line and counted; it never stops the
rest. Only a store that cannot be written stops ingestion, by raising
:class:`~postfix_mtasts.tlsrpt.store.ReportStoreError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from postfix_mtasts.tlsrpt.model import ReportError
from postfix_mtasts.tlsrpt.sources import Found, Item
from postfix_mtasts.tlsrpt.store import Added, AddResult, IReportStore

log = logging.getLogger("postfix_mtasts.tlsrpt.ingest")


@dataclass
class Tally:
    """What ingestion did: reports stored now, reports the store already had
    (same or conflicting content), and inputs that gave no report."""

    new: int = 0
    already_stored: int = 0
    conflicts: int = 0
    unreadable: int = 0

    def line(self) -> str:
        """The command's closing line: ``N new, M already stored, K unreadable``."""
        return f"{self.new} new, {self.already_stored} already stored, {self.unreadable} unreadable"

    def count_added(self, added: Added) -> None:
        if added.result is AddResult.NEW:
            self.new += 1
            log.info("%s: stored report %r of %s", added.first_source, added.report.report_id,
                     added.report.organization_name)
        else:
            self.already_stored += 1
            self.conflicts += added.result is AddResult.CONFLICT

    def count_unreadable(self, source: str, reason: str) -> None:
        self.unreadable += 1
        log.warning("%s: %s; skipped", _one_line(source), _one_line(reason))

    def add(self, other: Tally) -> None:
        self.new += other.new
        self.already_stored += other.already_stored
        self.conflicts += other.conflicts
        self.unreadable += other.unreadable


def ingest(store: IReportStore, items: Iterable[Item]) -> Tally:
    """Store every report among ``items``; raises ReportStoreError (the tally
    so far is then lost to the caller, but each stored report is committed)."""
    tally = Tally()
    for item in items:
        if isinstance(item, Found):
            try:
                added = store.add(item.raw, item.source)
            except ReportError as e:
                tally.count_unreadable(item.source, str(e))
                continue
            tally.count_added(added)
        else:
            tally.count_unreadable(item.source, item.reason)
    return tally


def _one_line(text: str) -> str:
    """White space folded: a subject or file name with line breaks stays one log line."""
    return " ".join(text.split())
