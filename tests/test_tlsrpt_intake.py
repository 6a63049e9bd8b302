"""The daemon's report intake: ReportIntake's looks, start-up failures, and
the real start-up path, ``postfix-mtasts serve`` with ``[reports] maildir``
storing the report of a message delivered while it runs."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import deferLater

from postfix_mtasts.config import ImapConfig, ReportsConfig
from postfix_mtasts.tlsrpt.imap import ImapError
from postfix_mtasts.tlsrpt.intake import ReportIntake, wanted
from postfix_mtasts.tlsrpt.store import ReportStoreError
from postfix_mtasts.tlsrpt.store.sqlite import SqliteReportStore
from tests.support.daemon import DaemonProcess, ensure_deferred, free_port
from tests.test_tlsrpt_imap import PLAIN_MAIL, report_mail

#: Bound on waiting for the daemon to take a delivered message.
TAKE_WAIT = 60.0


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def maildir(tmp_path: Path) -> Path:
    root = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True)
    return root


def test_wanted_only_with_a_mailbox() -> None:
    assert not wanted(ReportsConfig())
    assert wanted(ReportsConfig(maildir="/var/mail/tlsrpt"))
    assert wanted(ReportsConfig(imap=ImapConfig(host="h", user="u", password_file="/p")))


@ensure_deferred
async def test_a_look_stores_and_a_failed_look_is_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ReportsConfig(path=str(tmp_path / "reports.sqlite3"), maildir=str(tmp_path / "Maildir"),
                           poll_interval=3600)
    intake = ReportIntake(reactor(), config)
    with caplog.at_level(logging.INFO):
        await intake.start()  # the first look runs at once, and fails: no Maildir yet
        try:
            waited = 0.0
            while intake.looks < 1:
                assert waited < TAKE_WAIT
                await deferLater(reactor(), 0.05, lambda: None)
                waited += 0.05
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "Maildir" in errors[0] and "look again" in errors[0]
            root = maildir(tmp_path)
            (root / "new" / "1.host").write_bytes(report_mail("intake-1"))
            (root / "new" / "2.host").write_bytes(PLAIN_MAIL)
            await intake.look()
            assert (intake.tally.new, intake.tally.unreadable) == (1, 1)
            assert [r.report_id for r in await intake.store.reports()] == ["intake-1"]
        finally:
            await intake.stop()
    assert sorted(os.listdir(root / "cur")) == ["1.host:2,S", "2.host:2,S"]


@ensure_deferred
async def test_start_refuses_a_foreign_store_and_a_missing_password_file(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    foreign.write_bytes(b"not sqlite at all, but somebody's file\n" * 10)
    with pytest.raises(ReportStoreError, match="not an SQLite database of postfix-mtasts"):
        await ReportIntake(reactor(), ReportsConfig(path=str(foreign), maildir=str(tmp_path))).start()
    imap = ImapConfig(host="127.0.0.1", user="u", password_file=str(tmp_path / "missing"))
    with pytest.raises(ImapError, match="password_file"):
        await ReportIntake(reactor(), ReportsConfig(path=str(tmp_path / "r.sqlite3"), imap=imap)).start()


@ensure_deferred
async def test_the_daemon_stores_reports_delivered_to_its_maildir(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    store_path = tmp_path / "state" / "reports.sqlite3"
    config = (
        f'[listen]\nsocketmap = ["inet:127.0.0.1:{free_port()}"]\n'
        '[cache]\nbackend = "memory"\n'
        f'[reports]\npath = "{store_path}"\nmaildir = "{root}"\npoll_interval = 1\n'
    )
    daemon = await DaemonProcess.start(reactor(), tmp_path, config)
    try:
        (root / "tmp" / "1.host").write_bytes(report_mail("daemon-1"))
        (root / "tmp" / "1.host").rename(root / "new" / "1.host")
        waited = 0.0
        while not (root / "cur" / "1.host:2,S").exists():
            assert waited < TAKE_WAIT, daemon.stderr_text()
            await deferLater(reactor(), 0.1, lambda: None)
            waited += 0.1
    finally:
        await daemon.stop()
    assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()
    store = SqliteReportStore(str(store_path))
    try:
        assert [r.report_id for r in store.reports()] == ["daemon-1"]
    finally:
        store.close()
    with sqlite3.connect(store_path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x4D545352
    conn.close()
