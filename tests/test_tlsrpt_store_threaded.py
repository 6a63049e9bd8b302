"""ThreadedReportStore: the store's calls run on one thread of its own, in
order, awaited from the reactor; a store that cannot be opened leaves no
thread behind; calls before open or after close are a ReportStoreError."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts.tlsrpt.store import AddResult, IReportStore, ReportStoreError
from postfix_mtasts.tlsrpt.store.sqlite import SqliteReportStore
from postfix_mtasts.tlsrpt.store.threaded import ThreadedReportStore
from tests.support.daemon import ensure_deferred
from tests.test_tlsrpt_store import raw


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


@ensure_deferred
async def test_calls_run_on_the_store_thread(tmp_path: Path) -> None:
    path = str(tmp_path / "reports.sqlite3")
    store = ThreadedReportStore(reactor(), lambda: SqliteReportStore(path))
    await store.open()
    try:
        assert store.location == path
        assert (await store.add(raw(), "a")).result is AddResult.NEW
        assert (await store.add(raw(), "b")).result is AddResult.DUPLICATE
        assert [r.report_id for r in await store.reports()] == ["r-1"]
        assert await store.count() == 1

        def job(reports: IReportStore) -> str:
            assert reports.count() == 1
            return threading.current_thread().name

        assert await store.run(job) != threading.current_thread().name
    finally:
        await store.close()
    with pytest.raises(ReportStoreError, match="not open"):
        await store.count()


@ensure_deferred
async def test_a_store_that_cannot_open_leaves_no_thread(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.write_text("not ours\n" * 20)
    before = _threads()
    store = ThreadedReportStore(reactor(), lambda: SqliteReportStore(str(foreign)))
    with pytest.raises(ReportStoreError, match="refusing to touch it"):
        await store.open()
    assert _threads() <= before
    with pytest.raises(ReportStoreError, match="not open"):
        await store.add(raw(), "x")
