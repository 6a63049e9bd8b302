"""Ingestion's tally: each report found is stored once and counted as new or
already stored (a conflict too), everything else counted as unreadable with
one WARNING line each, white space folded so a multi-line reason stays one
line; a report the store refuses as invalid is unreadable, not fatal."""

from __future__ import annotations

import logging

import pytest

from postfix_mtasts.tlsrpt.ingest import Tally, ingest
from postfix_mtasts.tlsrpt.model import parse_report_text
from postfix_mtasts.tlsrpt.sources import Broken, Found, Ignored, Item
from postfix_mtasts.tlsrpt.store.memory import MemoryReportStore
from tests.test_tlsrpt_store import raw


def found(source: str, data: bytes) -> Found:
    return Found(source, parse_report_text(data), data)


def test_tally_of_new_duplicate_conflict_and_unreadable(caplog: pytest.LogCaptureFixture) -> None:
    items: list[Item] = [
        found("a", raw(report_id="1")),
        found("b", raw(report_id="1")),
        found("c", raw(report_id="1", successful=99)),
        found("d", raw(report_id="2")),
        Broken("e.json", "bad JSON: Expecting value at line 1 column 1"),
        Ignored("f.eml", "no TLS report attached (subject: Report\n   Domain: example.org)"),
        Found("g", parse_report_text(raw(report_id="3")), b"{broken"),
    ]
    store = MemoryReportStore()
    with caplog.at_level(logging.WARNING):
        tally = ingest(store, items)
    assert (tally.new, tally.already_stored, tally.conflicts, tally.unreadable) == (2, 2, 1, 3)
    assert tally.line() == "2 new, 2 already stored, 3 unreadable"
    lines = [r.getMessage() for r in caplog.records if r.name == "postfix_mtasts.tlsrpt.ingest"]
    assert lines[1] == "f.eml: no TLS report attached (subject: Report Domain: example.org); skipped"
    assert all("\n" not in line for line in lines) and len(lines) == 3
    assert store.count() == 2


def test_tallies_add_up() -> None:
    total = Tally(1, 2, 1, 3)
    total.add(Tally(4, 5, 0, 6))
    assert total == Tally(5, 7, 1, 9)
