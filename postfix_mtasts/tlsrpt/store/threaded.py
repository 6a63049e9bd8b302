"""The report store for the daemon: the same calls, run on a thread of their own.

:class:`ThreadedReportStore` wraps any :class:`IReportStore` (opened on that
thread too, since opening may create a file or connect to PostgreSQL) and
offers ``async`` methods, so the reactor never waits for the disk or the
database. One thread: calls run one after another, in the order made.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from postfix_mtasts.tlsrpt.model import Report
from postfix_mtasts.tlsrpt.store import Added, IReportStore, ReportStoreError

_T = TypeVar("_T")


class ThreadedReportStore:
    """``await store.add(raw, source)``, ``await store.reports(...)``: the
    :class:`IReportStore` calls, asynchronous. ``open()`` first, ``close()`` last."""

    def __init__(self, reactor: IReactorFromThreads, opener: Callable[[], IReportStore]) -> None:
        self._reactor = reactor
        self._opener = opener
        self._pool: ThreadPool | None = None
        self._store: IReportStore | None = None

    @property
    def location(self) -> str:
        return str(self._store.location) if self._store is not None else "(not open)"

    async def open(self) -> None:
        """Start the thread and open the store on it; raises ReportStoreError."""
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="postfix-mtasts-reports")
        self._pool.start()
        try:
            self._store = await self._call(self._opener)
        except BaseException:
            self._stop_pool()
            raise

    async def add(self, raw: bytes, source: str) -> Added:
        return await self._call(self._opened().add, raw, source)

    async def reports(self, since: datetime | None = None, domain: str | None = None) -> list[Report]:
        return await self._call(self._opened().reports, since, domain)

    async def count(self) -> int:
        return await self._call(self._opened().count)

    async def run(self, job: Callable[[IReportStore], _T]) -> _T:
        """Run ``job(store)`` on the store's thread: several calls (and the
        file reading or parsing around them) as one unit of blocking work."""
        return await self._call(job, self._opened())

    async def close(self) -> None:
        """Close the store on its thread, then stop the thread."""
        store, self._store = self._store, None
        try:
            if store is not None:
                await self._call(store.close)
        finally:
            self._stop_pool()

    def _opened(self) -> IReportStore:
        if self._store is None:
            raise ReportStoreError("report store is not open")
        return self._store

    async def _call(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._pool is None:
            raise ReportStoreError("report store is not open")
        result: _T = await deferToThreadPool(self._reactor, self._pool, fn, *args)
        return result

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()


__all__ = ["ThreadedReportStore"]
