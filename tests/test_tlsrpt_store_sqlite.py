"""The SQLite report store's file: where it lives by default, the
application_id that marks it ours, a new one linked into place whole, every
file that is not ours (an empty one too) refused with one line and left
exactly as found, a newer schema refused, and two
processes storing the same reports at once keeping each exactly once."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from postfix_mtasts.tlsrpt.store import APPLICATION_ID, AddResult, ReportStoreError
from postfix_mtasts.tlsrpt.store.sqlite import MIGRATIONS, SqliteReportStore, default_path
from tests.test_tlsrpt_store import raw


def header_application_id(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[68:72], "big")


def test_default_path_is_beside_the_cache() -> None:
    assert default_path({"STATE_DIRECTORY": "/var/lib/x:/other"}, 1000) == "/var/lib/x/reports.sqlite3"
    assert default_path({}, 0) == "/var/lib/postfix-mtasts/reports.sqlite3"
    assert default_path({"XDG_STATE_HOME": "/home/u/.st", "HOME": "/home/u"}, 1000) == (
        "/home/u/.st/postfix-mtasts/reports.sqlite3"
    )


def test_a_new_store_is_created_with_its_directory_and_marked_ours(tmp_path: Path) -> None:
    path = tmp_path / "state" / "deeper" / "reports.sqlite3"
    store = SqliteReportStore(str(path))
    store.add(raw(), "x")
    store.close()
    assert header_application_id(path) == APPLICATION_ID
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()
    reopened = SqliteReportStore(str(path))
    assert reopened.count() == 1
    reopened.close()


def test_creation_leaves_nothing_but_the_store(tmp_path: Path) -> None:
    SqliteReportStore(str(tmp_path / "reports.sqlite3")).close()
    assert sorted(os.listdir(tmp_path)) == ["reports.sqlite3"]


def _policy_cache_like(path: Path) -> None:
    """An SQLite file of another program (here: application_id 0, a table)."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE entries (domain TEXT PRIMARY KEY, data TEXT)")
    conn.execute("INSERT INTO entries VALUES ('example.org', '{}')")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("kind", ["text", "empty", "other-sqlite", "other-application-id", "directory"])
def test_a_file_that_is_not_ours_is_refused_and_left_as_found(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "reports.sqlite3"
    if kind == "text":
        path.write_text("my notes\n" * 100)
    elif kind == "empty":
        path.touch()
    elif kind == "other-sqlite":
        _policy_cache_like(path)
    elif kind == "other-application-id":
        _policy_cache_like(path)
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA application_id = 1297371971")  # 'MTSC', some other program's mark
        conn.commit()
        conn.close()
    else:
        path.mkdir()
    before = sorted(os.listdir(tmp_path))
    content = path.read_bytes() if path.is_file() else None
    stamp = path.stat().st_mtime_ns
    with pytest.raises(ReportStoreError) as caught:
        SqliteReportStore(str(path))
    message = str(caught.value)
    assert str(path) in message and "refusing to touch it" in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == before  # no -wal, -shm or -journal beside it
    assert path.stat().st_mtime_ns == stamp
    if content is not None:
        assert path.read_bytes() == content


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "reports.sqlite3"
    SqliteReportStore(str(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(ReportStoreError, match="schema version 99, newer"):
        SqliteReportStore(str(path))


def _add_all(path: str, ids: list[str], results: multiprocessing.Queue[list[str]]) -> None:
    store = SqliteReportStore(path)
    try:
        results.put([store.add(raw(report_id=i), f"process {os.getpid()}").result.value for i in ids])
    finally:
        store.close()


def test_two_processes_storing_the_same_reports_keep_each_once(tmp_path: Path) -> None:
    path = str(tmp_path / "reports.sqlite3")
    SqliteReportStore(path).close()
    ids = [f"r{n}" for n in range(60)]
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[list[str]] = context.Queue()
    workers = [context.Process(target=_add_all, args=(path, ids, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    for n in range(len(ids)):
        pair = sorted(outcome[n] for outcome in outcomes)
        assert pair == [AddResult.DUPLICATE.value, AddResult.NEW.value], (ids[n], pair)
    store = SqliteReportStore(path)
    assert store.count() == len(ids)
    store.close()
