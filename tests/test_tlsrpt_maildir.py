"""The Maildir watcher's one look: the reports of mail in new/ are stored and
each message moved to cur/ marked seen (nothing rewritten or deleted); mail
already in cur/ and half-delivered mail in tmp/ are left alone; a message
with no report is logged and marked seen; a store that cannot be written
leaves the message in new/ for the next look."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts.tlsrpt.maildir import MaildirError, ingest_maildir, seen_name
from postfix_mtasts.tlsrpt.store import ReportStoreError
from postfix_mtasts.tlsrpt.store.memory import MemoryReportStore
from tests.test_tlsrpt_imap import PLAIN_MAIL, report_mail


def maildir(tmp_path: Path) -> Path:
    root = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True)
    return root


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("1700000000.M1P2.host", "1700000000.M1P2.host:2,S"),
        ("1700000000.M1P2.host:2,", "1700000000.M1P2.host:2,S"),
        ("1700000000.M1P2.host:2,FR", "1700000000.M1P2.host:2,FRS"),
        ("1700000000.M1P2.host:2,ST", "1700000000.M1P2.host:2,ST"),
        ("1700000000.M1P2.host:2,T", "1700000000.M1P2.host:2,ST"),
    ],
)
def test_seen_name_adds_the_flag_in_order(name: str, expected: str) -> None:
    assert seen_name(name) == expected


def test_new_mail_is_stored_and_marked_seen(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    (root / "new" / "1.host").write_bytes(report_mail("md-1"))
    (root / "new" / "2.host").write_bytes(PLAIN_MAIL)
    (root / "cur" / "0.host:2,S").write_bytes(report_mail("md-old"))
    (root / "tmp" / "3.host").write_bytes(report_mail("md-half"))
    store = MemoryReportStore()
    tally = ingest_maildir(store, str(root))
    assert (tally.new, tally.already_stored, tally.unreadable) == (1, 0, 1)
    assert [r.report_id for r in store.reports()] == ["md-1"]
    assert sorted(os.listdir(root / "new")) == []
    assert sorted(os.listdir(root / "cur")) == ["0.host:2,S", "1.host:2,S", "2.host:2,S"]
    assert (root / "cur" / "1.host:2,S").read_bytes() == report_mail("md-1")
    assert os.listdir(root / "tmp") == ["3.host"]
    again = ingest_maildir(store, str(root))
    assert (again.new, again.already_stored, again.unreadable) == (0, 0, 0)


class _Unwritable(MemoryReportStore):
    def add(self, raw: bytes, source: str) -> Any:
        raise ReportStoreError("report store /x: cannot store: database is locked")


def test_an_unwritable_store_leaves_the_message_in_new(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    (root / "new" / "1.host").write_bytes(report_mail("md-1"))
    with pytest.raises(ReportStoreError):
        ingest_maildir(_Unwritable(), str(root))
    assert os.listdir(root / "new") == ["1.host"]
    store = MemoryReportStore()
    assert ingest_maildir(store, str(root)).new == 1


def test_a_missing_maildir_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(MaildirError) as caught:
        ingest_maildir(MemoryReportStore(), str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(caught.value) and "\n" not in str(caught.value)
