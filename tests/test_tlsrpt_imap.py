"""The IMAP watcher (Twisted's IMAP4 client) against Debian's real Dovecot.

Dovecot runs privately (tests/support/dovecot.py). ``serve`` with
``[reports.imap]`` stores what is delivered while it runs. One look at a
time, over IMAPS verified with a run-time CA: the reports of new mail are
stored, each message then moved to the done folder; mail with no report is
logged and moved too; a second look finds nothing. Without a done folder,
over plain IMAP: messages are left in place marked read. A store that cannot
be written leaves the message unread for the next look; a wrong password, an
unknown CA or an unreachable server is one ImapError line.
"""

from __future__ import annotations

import base64
import gzip
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.internet.task import deferLater

from postfix_mtasts.config import ImapConfig
from postfix_mtasts.tlsrpt.imap import ImapError, ingest_imap
from postfix_mtasts.tlsrpt.store import IReportStore, ReportStoreError
from postfix_mtasts.tlsrpt.store.memory import MemoryReportStore
from postfix_mtasts.tlsrpt.store.sqlite import SqliteReportStore
from postfix_mtasts.tlsrpt.store.threaded import ThreadedReportStore
from tests.conftest import require
from tests.support import dovecot as dovecot_support
from tests.support.daemon import DaemonProcess, async_yield_fixture, ensure_deferred, free_port
from tests.support.dovecot import Dovecot
from tests.test_tlsrpt_store import raw

pytestmark = pytest.mark.integration

DONE = "Reports/done"
#: Bound on waiting for the daemon to take a delivered message.
DAEMON_WAIT = 60.0


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def report_mail(report_id: str) -> bytes:
    attachment = base64.encodebytes(gzip.compress(raw(report_id=report_id))).decode()
    return (
        f"From: noreply@example.net\nTo: tlsrpt@example.org\nSubject: Report-ID: <{report_id}>\n"
        f"Message-ID: <{report_id}@example.net>\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type="tlsrpt"; boundary="b"\n\n'
        "--b\nContent-Type: text/plain\n\nA TLS report.\n"
        "--b\nContent-Type: application/tlsrpt+gzip\n"
        f'Content-Disposition: attachment; filename="{report_id}.json.gz"\n'
        f"Content-Transfer-Encoding: base64\n\n{attachment}--b--\n"
    ).encode()


PLAIN_MAIL = b"From: a@example.net\nSubject: lunch?\nMessage-ID: <lunch@example.net>\n\nNo report.\n"


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    require("root and Debian's Dovecot (dovecot-imapd)", dovecot_support.available())
    server = Dovecot.start(trustme.CA())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh(dovecot: Dovecot) -> Dovecot:
    """The user's mailbox emptied between tests."""
    shutil.rmtree(dovecot.maildir)
    dovecot.maildir.mkdir()
    os.chown(dovecot.maildir, dovecot_support.MAIL_UID, dovecot_support.MAIL_GID)
    return dovecot


def settings(server: Dovecot, tmp_path: Path, *, tls: bool = True, done: str = DONE,
             password: str | None = None) -> ImapConfig:
    password_file = tmp_path / "imap.password"
    password_file.write_text((password if password is not None else server.password) + "\n")
    return ImapConfig(
        host="127.0.0.1",
        port=server.imaps_port if tls else server.imap_port,
        tls=tls,
        ca_file=server.ca_file if tls else "",
        user=server.user,
        password_file=str(password_file),
        folder="INBOX",
        done_folder=done,
    )


@async_yield_fixture
async def store() -> AsyncIterator[ThreadedReportStore]:
    threaded = ThreadedReportStore(reactor(), MemoryReportStore)
    await threaded.open()
    yield threaded
    await threaded.close()


@ensure_deferred
async def test_reports_are_stored_and_mail_moved_to_the_done_folder(
    fresh: Dovecot, tmp_path: Path, store: ThreadedReportStore
) -> None:
    fresh.deliver("1.eml", report_mail("imap-1"))
    fresh.deliver("2.eml", PLAIN_MAIL)
    fresh.deliver("3.eml", report_mail("imap-2"))
    tally = await ingest_imap(reactor(), settings(fresh, tmp_path), store)
    assert (tally.new, tally.already_stored, tally.unreadable) == (2, 0, 1)
    assert sorted(r.report_id for r in await store.reports()) == ["imap-1", "imap-2"]
    inbox = fresh.folder_files()
    assert inbox == {"new": [], "cur": []}, inbox
    done = fresh.folder_files(DONE)
    assert len(done["new"]) + len(done["cur"]) == 3
    again = await ingest_imap(reactor(), settings(fresh, tmp_path), store)
    assert (again.new, again.already_stored, again.unreadable) == (0, 0, 0)


@ensure_deferred
async def test_without_a_done_folder_mail_stays_marked_read(
    fresh: Dovecot, tmp_path: Path, store: ThreadedReportStore
) -> None:
    fresh.deliver("1.eml", report_mail("plain-1"))
    tally = await ingest_imap(reactor(), settings(fresh, tmp_path, tls=False, done=""), store)
    assert (tally.new, tally.unreadable) == (1, 0)
    inbox = fresh.folder_files()
    assert inbox["new"] == [] and len(inbox["cur"]) == 1 and inbox["cur"][0].split(":2,")[1].count("S") == 1
    fresh.deliver("2.eml", report_mail("plain-2"))
    tally = await ingest_imap(reactor(), settings(fresh, tmp_path, tls=False, done=""), store)
    assert (tally.new, tally.already_stored) == (1, 0)  # the read one is not taken again
    assert sorted(r.report_id for r in await store.reports()) == ["plain-1", "plain-2"]


class _Unwritable(MemoryReportStore):
    def add(self, raw: bytes, source: str) -> Any:
        raise ReportStoreError("report store /nowhere: cannot store: disk I/O error")


@ensure_deferred
async def test_an_unwritable_store_leaves_the_mail_for_next_time(fresh: Dovecot, tmp_path: Path) -> None:
    fresh.deliver("1.eml", report_mail("later-1"))
    broken = ThreadedReportStore(reactor(), _Unwritable)
    await broken.open()
    try:
        with pytest.raises(ReportStoreError):
            await ingest_imap(reactor(), settings(fresh, tmp_path), broken)
    finally:
        await broken.close()
    inbox = fresh.folder_files()
    assert len(inbox["new"]) + len(inbox["cur"]) == 1
    assert all(":2," not in name or "S" not in name.split(":2,")[1] for name in inbox["cur"])
    working = ThreadedReportStore(reactor(), MemoryReportStore)
    await working.open()
    try:
        tally = await ingest_imap(reactor(), settings(fresh, tmp_path), working)
        assert tally.new == 1
    finally:
        await working.close()


@ensure_deferred
async def test_a_wrong_password_is_one_line(
    fresh: Dovecot, tmp_path: Path, store: ThreadedReportStore
) -> None:
    with pytest.raises(ImapError) as caught:
        await ingest_imap(reactor(), settings(fresh, tmp_path, password="wrong"), store)
    message = str(caught.value)
    assert "login refused" in message and "\n" not in message and "127.0.0.1" in message


@ensure_deferred
async def test_an_unknown_certificate_authority_is_refused(
    fresh: Dovecot, tmp_path: Path, store: ThreadedReportStore
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    config = settings(fresh, tmp_path)
    fresh.deliver("1.eml", report_mail("untrusted-1"))
    with pytest.raises(ImapError) as caught:
        await ingest_imap(reactor(), replace(config, ca_file=str(other_ca)), store)
    assert "certificate verify failed" in str(caught.value) and "\n" not in str(caught.value)
    assert await store.count() == 0


@ensure_deferred
async def test_an_unreachable_server_is_one_line(tmp_path: Path, store: ThreadedReportStore) -> None:
    password = tmp_path / "pw"
    password.write_text("x\n")
    config = ImapConfig(host="127.0.0.1", port=1, tls=False, user="u", password_file=str(password))
    with pytest.raises(ImapError) as caught:
        await ingest_imap(reactor(), config, store)
    assert "cannot connect" in str(caught.value) and "\n" not in str(caught.value)


def test_memory_store_is_an_ireportstore() -> None:
    from zope.interface.verify import verifyObject

    assert verifyObject(IReportStore, MemoryReportStore())


@ensure_deferred
async def test_the_daemon_reads_its_imap_folder(fresh: Dovecot, tmp_path: Path) -> None:
    """``postfix-mtasts serve`` with ``[reports.imap]``: mail delivered while it
    runs is stored and moved to the done folder, over verified IMAPS."""
    store_path = tmp_path / "reports.sqlite3"
    imap = settings(fresh, tmp_path)
    config = (
        f'[listen]\nsocketmap = ["inet:127.0.0.1:{free_port()}"]\n'
        '[cache]\nbackend = "memory"\n'
        f'[reports]\npath = "{store_path}"\npoll_interval = 1\n'
        f'[reports.imap]\nhost = "{imap.host}"\nport = {imap.port}\nca_file = "{imap.ca_file}"\n'
        f'user = "{imap.user}"\npassword_file = "{imap.password_file}"\ndone_folder = "{DONE}"\n'
    )
    daemon = await DaemonProcess.start(reactor(), tmp_path, config)
    try:
        fresh.deliver("1.eml", report_mail("daemon-imap-1"))
        waited = 0.0
        while sum(len(names) for names in fresh.folder_files(DONE).values()) < 1:
            assert waited < DAEMON_WAIT, daemon.stderr_text() + fresh.output()
            await deferLater(reactor(), 0.1, lambda: None)
            waited += 0.1
    finally:
        await daemon.stop()
    assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()
    store = SqliteReportStore(str(store_path))
    try:
        assert [r.report_id for r in store.reports()] == ["daemon-imap-1"]
    finally:
        store.close()
