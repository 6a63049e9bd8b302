"""The default policy store: one SQLite file, worked on by one dedicated thread.

Every statement runs on a single-thread pool so the reactor never waits for the
disk. The file is in WAL mode with ``synchronous=FULL``: ``put`` returns only
after its transaction is committed to disk, so a policy is durable before it is
used to answer or replaces an older one.

Writes are group-committed: while one transaction is on its way to the disk,
the entries put meanwhile wait together and go in the next one. Under a burst
of new domains (a cold start, a queue run) that turns one fsync per entry into
one per batch; a lone write still goes at once. Every write, batched or not,
keeps the order in which it was asked for.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from postfix_mtasts.cache import CacheEntry, IPolicyStore, StoreUnavailable
from postfix_mtasts.cache.sqlite_file import APPLICATION_ID as APPLICATION_ID
from postfix_mtasts.cache.sqlite_file import (
    DatabaseLock,
    Ownership,
    create_database,
    examine,
    make_directory,
    move_aside,
    statements,
)
from postfix_mtasts.cache.sqlite_file import Migration as Migration
from postfix_mtasts.cache.sqlite_file import StoreError as StoreError
from postfix_mtasts.errors import one_line

log = logging.getLogger("postfix_mtasts.cache")

#: Rows read per job when loading the cache at start-up.
LOAD_BATCH = 5000
#: A waiting group-committed transaction takes no more puts once it holds
#: this many entries (a put_many joins whole): the next one starts instead.
WRITE_BATCH = 500
#: Seconds a statement waits for another connection's lock before failing.
BUSY_TIMEOUT = 5.0
#: Where the cache lives when running as root, and its name under any state dir.
SYSTEM_STATE_DIRECTORY = "/var/lib/postfix-mtasts"
STATE_SUBDIRECTORY = "postfix-mtasts"
DATABASE_NAME = "cache.sqlite3"
#: SQLite primary result codes that mean the file itself is damaged.
CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

#: Longest SQLite corruption report quoted in the log line.
REASON_LIMIT = 160

_T = TypeVar("_T")



#: The schema history; MIGRATIONS[n] takes a database from version n to n + 1.
#: ``data`` is CacheEntry.to_json(); ``expires_at`` and ``last_used`` are copies
#: of its fields so that prune and load are index scans, never JSON parses.
MIGRATIONS: tuple[Migration, ...] = (
    statements(
        "CREATE TABLE entries ("
        " domain TEXT PRIMARY KEY,"
        " data TEXT NOT NULL,"
        " expires_at REAL NOT NULL,"
        " last_used REAL NOT NULL)",
        "CREATE INDEX entries_last_used ON entries (last_used)",
        "CREATE INDEX entries_expires_at ON entries (expires_at)",
    ),
)

_UPSERT = (
    "INSERT INTO entries (domain, data, expires_at, last_used) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (domain) DO UPDATE SET data = excluded.data,"
    " expires_at = excluded.expires_at, last_used = excluded.last_used"
)


class ThreadedReactor(Protocol):
    """What the store needs of the reactor (IReactorCore plus threads)."""

    def seconds(self) -> float: ...
    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None: ...
    def addSystemEventTrigger(self, phase: str, eventType: str, callable: Callable[..., Any]) -> Any: ...
    def removeSystemEventTrigger(self, triggerID: Any) -> None: ...


class _Corrupt(Exception):
    """The file is damaged; the text is SQLite's reason.

    ``conn`` is still open: closing it first would let SQLite delete the -wal
    file, which belongs with the damaged database for whoever inspects it.
    """

    def __init__(self, reason: str, conn: sqlite3.Connection | None) -> None:
        super().__init__(reason)
        self.conn = conn


def default_path(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """Where the cache lives: ``$STATE_DIRECTORY`` (systemd) first, then
    /var/lib/postfix-mtasts for root, else ``$XDG_STATE_HOME/postfix-mtasts``."""
    env = os.environ if environ is None else environ
    uid = os.geteuid() if euid is None else euid
    state_directory = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state_directory:
        return os.path.join(state_directory, DATABASE_NAME)
    if uid == 0:
        return os.path.join(SYSTEM_STATE_DIRECTORY, DATABASE_NAME)
    xdg = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(xdg):
        # The XDG spec says a relative value is invalid and must be ignored.
        home = env.get("HOME") or os.path.expanduser("~")
        xdg = os.path.join(home, ".local", "state")
    return os.path.join(xdg, STATE_SUBDIRECTORY, DATABASE_NAME)


def _row(entry: CacheEntry) -> tuple[str, str, float, float]:
    return (entry.domain, entry.to_json(), entry.expires_at, entry.last_used)


class _Write:
    """One transaction waiting for the store's thread: a statement, its rows
    and everyone waiting for it to be committed (several, for upserts that
    were put while an earlier transaction was being written)."""

    __slots__ = ("rows", "sql", "waiters")

    def __init__(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        self.sql = sql
        self.rows = rows
        self.waiters: list[Deferred[int]] = []


@implementer(IPolicyStore)
class SqliteStore:
    """Entries in the SQLite file ``path``; leases are always granted.

    ``max_bytes`` bounds the file (SQLite's max_page_count): a put that would
    grow it further fails with StoreUnavailable, as on a full disk.
    """

    name = "sqlite"
    shared = False

    def __init__(
        self,
        reactor: ThreadedReactor,
        path: str,
        *,
        busy_timeout: float = BUSY_TIMEOUT,
        max_bytes: int | None = None,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._busy_timeout = busy_timeout
        self._max_bytes = max_bytes
        self._migrations = tuple(migrations)
        self._pool: ThreadPool | None = None
        self._shutdown_trigger: object | None = None
        self._conn: sqlite3.Connection | None = None
        #: Held from open() to close(): no other daemon uses the file meanwhile.
        self._lock: DatabaseLock | None = None
        self._malformed_reported = False
        #: Rows skipped because their data did not parse, since open().
        self.malformed_rows = 0
        #: Writes not yet handed to the thread, oldest first.
        self._writes: deque[_Write] = deque()
        self._writing = False
        self._writes_drained: list[Deferred[None]] = []
        #: Transactions written and entries they upserted, since creation.
        self.write_transactions = 0
        self.upserts = 0

    # --- running work on the database thread ---------------------------------

    async def _call(self, fn: Callable[..., _T], *args: object) -> _T:
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"cache database {self.path} is not open")
        reactor = cast(IReactorFromThreads, self._reactor)
        return await deferToThreadPool(reactor, pool, fn, *args)

    def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(conn, *args)`` on the database thread; SQLite errors become
        StoreUnavailable and leave no transaction open."""
        conn = self._conn
        if conn is None:
            raise StoreUnavailable(f"cache database {self.path} is not open")
        try:
            return fn(conn, *args)
        except sqlite3.Error as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise StoreUnavailable(f"cache database {self.path}: {one_line(e)}") from e

    async def _do(self, fn: Callable[..., _T], *args: object) -> _T:
        return await self._call(self._run, fn, *args)

    # --- opening --------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = ThreadPool(1, 1, name=f"sqlite {self.path}")
        pool.start()
        self._pool = pool
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._stop_pool_at_shutdown
        )
        self._malformed_reported = False
        self.malformed_rows = 0
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._reactor.seconds()))
        try:
            self._conn = await self._call(self._open_in_thread, stamp)
        except BaseException:
            self._stop_pool()
            raise

    def _is_open(self) -> bool:
        return self._pool is not None

    def _stop_pool_at_shutdown(self) -> None:
        # The trigger is firing: removing it now would raise ValueError and
        # leave the pool's thread running, so the process would never exit.
        self._shutdown_trigger = None
        self._stop_pool()

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if pool is not None:
            pool.stop()

    def _open_in_thread(self, stamp: str) -> sqlite3.Connection:
        make_directory(self.path)
        # Refused before the lock file or SQLite creates anything beside it.
        examine(self.path, self._migrations)
        lock = DatabaseLock(self.path)
        lock.acquire()
        try:
            conn = self._open_locked(stamp)
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return conn

    def _open_locked(self, stamp: str) -> sqlite3.Connection:
        """The checked, migrated connection, once no other daemon can open the
        file; a damaged database of ours is moved aside and a new one made."""
        # Looked at again: it may have changed before the lock was ours.
        ownership = examine(self.path, self._migrations)
        if ownership is Ownership.MISSING:
            ownership = self._create()
        try:
            conn = self._connect()
        except _Corrupt as e:
            try:
                aside = move_aside(self.path, stamp)
            finally:
                if e.conn is not None:
                    e.conn.close()
            log.error(
                "cache database %s is corrupt (%s); moved aside to %s and starting empty",
                self.path,
                e,
                aside,
            )
            ownership = self._create()
            try:
                conn = self._connect()
            except _Corrupt as again:
                if again.conn is not None:
                    again.conn.close()
                raise StoreError(
                    f"cache database {self.path} is still corrupt after moving the old file aside ({again})"
                ) from None
        try:
            if ownership is Ownership.UNSTAMPED:
                self._stamp(conn)
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create(self) -> Ownership:
        def initialise(conn: sqlite3.Connection) -> None:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self._migrate(conn)

        return create_database(self.path, initialise, self._migrations)

    def _stamp(self, conn: sqlite3.Connection) -> None:
        """Mark a database an older postfix-mtasts made as ours."""
        try:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            # Into the main file now, so that its header tells the truth.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot mark cache database {self.path} as ours: {one_line(e)}") from e
        log.info("cache database %s was made by an older postfix-mtasts: marked as its own", self.path)

    def _connect(self) -> sqlite3.Connection:
        """A checked connection in WAL mode to the database examine() found
        ours; raises _Corrupt for a damaged file."""
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            # Checked before anything writes to the file, so that a damaged
            # file is moved aside exactly as it was found.
            problems = conn.execute("PRAGMA quick_check").fetchall()
            if problems != [("ok",)]:
                reason = one_line(Exception(problems[0][0]))
                if len(reason) > REASON_LIMIT:
                    reason = reason[: REASON_LIMIT - 3] + "..."
                raise _Corrupt(f"quick_check: {reason}", conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning(
                    "cache database %s: WAL journal mode unavailable, using %s",
                    self.path,
                    mode,
                )
            conn.execute("PRAGMA synchronous = FULL")
            if self._max_bytes is not None:
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                pages = max(1, self._max_bytes // int(page_size))
                conn.execute(f"PRAGMA max_page_count = {pages}")
            return conn
        except _Corrupt:
            raise
        except sqlite3.DatabaseError as e:
            if (e.sqlite_errorcode & 0xFF) in CORRUPT_CODES:
                raise _Corrupt(one_line(e), conn) from e
            if conn is not None:
                conn.close()
            raise StoreUnavailable(f"cannot open cache database {self.path}: {one_line(e)}") from e
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        known = len(self._migrations)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot read cache database {self.path}: {one_line(e)}") from e
        if version > known:
            raise StoreError(
                f"cache database {self.path} has schema version {version}, newer"
                f" than this postfix-mtasts knows ({known}); upgrade postfix-mtasts"
                " or move the file aside"
            )
        for target in range(version + 1, known + 1):
            try:
                conn.execute("BEGIN IMMEDIATE")
                self._migrations[target - 1](conn)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except Exception as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StoreError(
                    f"cache database {self.path}: migration to schema version {target} failed: {one_line(e)}"
                ) from e

    # --- reading --------------------------------------------------------------

    def _parse(self, rows: list[tuple[str, str]]) -> list[CacheEntry]:
        """Entries from (domain, data) rows; malformed rows are left out and
        reported once per open."""
        entries: list[CacheEntry] = []
        bad: list[tuple[str, str]] = []
        for domain, data in rows:
            try:
                entry = CacheEntry.from_json(data)
            except ValueError as e:
                bad.append((domain, one_line(e)))
                continue
            if entry.domain != domain:
                bad.append((domain, f"row holds the entry of {entry.domain!r}"))
                continue
            entries.append(entry)
        if bad:
            self.malformed_rows += len(bad)
            if not self._malformed_reported:
                self._malformed_reported = True
                log.warning(
                    "cache database %s: skipped %d malformed entries (first: %s: %s);"
                    " they are ignored until replaced",
                    self.path,
                    len(bad),
                    bad[0][0],
                    bad[0][1],
                )
        return entries

    async def load(self, limit: int) -> list[CacheEntry]:
        """Most recently used first, read in batches of :data:`LOAD_BATCH` rows.

        Each batch is its own job on the store's thread, so a ``get`` from a
        lookup waits for one batch, not for the whole load.
        """
        entries: list[CacheEntry] = []
        after: tuple[float, str] | None = None
        while len(entries) < limit:
            wanted = min(LOAD_BATCH, limit - len(entries))
            batch, after = await self._do(lambda conn, n=wanted, a=after: self._load_batch(conn, n, a))
            entries.extend(batch)
            if after is None:
                break
        return entries

    def _load_batch(
        self, conn: sqlite3.Connection, count: int, after: tuple[float, str] | None
    ) -> tuple[list[CacheEntry], tuple[float, str] | None]:
        """One page of the load, after ``after`` (last_used, domain); returns
        the entries and where the next page starts (None at the end)."""
        if after is None:
            rows = conn.execute(
                "SELECT domain, data, last_used FROM entries ORDER BY last_used DESC, domain LIMIT ?",
                (count,),
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT domain, data, last_used FROM entries"
                " WHERE last_used < ? OR (last_used = ? AND domain > ?)"
                " ORDER BY last_used DESC, domain LIMIT ?",
                (after[0], after[0], after[1], count),
            ).fetchall()
        entries = self._parse([(domain, data) for domain, data, _ in rows])
        following = (rows[-1][2], rows[-1][0]) if len(rows) == count else None
        return entries, following

    async def get(self, domain: str) -> CacheEntry | None:
        def get(conn: sqlite3.Connection) -> CacheEntry | None:
            rows = conn.execute("SELECT domain, data FROM entries WHERE domain = ?", (domain,)).fetchall()
            entries = self._parse(rows)
            return entries[0] if entries else None

        return await self._do(get)

    async def count(self) -> int:
        def count(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])

        return await self._do(count)

    # --- writing --------------------------------------------------------------

    @staticmethod
    def _write(conn: sqlite3.Connection, sql: str, rows: list[tuple[object, ...]]) -> int:
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.executemany(sql, rows) if rows else conn.execute(sql)
        conn.execute("COMMIT")
        return int(cursor.rowcount)

    async def _queued_write(self, sql: str, rows: list[tuple[object, ...]]) -> int:
        """Run ``sql`` over ``rows`` in a transaction after every write asked
        for before; upserts join the one still waiting, if any (group commit).
        Returns the row count; raises StoreUnavailable as the transaction did."""
        if self._pool is None:
            raise StoreUnavailable(f"cache database {self.path} is not open")
        writes = self._writes
        last = writes[-1] if writes else None
        if sql is _UPSERT and last is not None and last.sql is _UPSERT and len(last.rows) < WRITE_BATCH:
            job = last
            job.rows.extend(rows)
        else:
            job = _Write(sql, rows)
            writes.append(job)
        committed: Deferred[int] = Deferred()
        job.waiters.append(committed)
        if not self._writing:
            self._writing = True
            Deferred.fromCoroutine(self._write_queued())
        return await committed

    async def _write_queued(self) -> None:
        """Hand the queued transactions to the thread one at a time; whatever
        is queued while one is written goes in the next."""
        try:
            while self._writes:
                job = self._writes.popleft()
                try:
                    count = await self._do(self._write, job.sql, job.rows)
                except Exception as problem:  # StoreUnavailable above all
                    for waiter in job.waiters:
                        waiter.errback(problem)
                    continue
                self.write_transactions += 1
                if job.sql is _UPSERT:
                    self.upserts += len(job.rows)
                for waiter in job.waiters:
                    waiter.callback(count)
        finally:
            self._writing = False
            drained, self._writes_drained = self._writes_drained, []
            for listener in drained:
                listener.callback(None)

    async def _writes_done(self) -> None:
        """Wait until every write asked for so far is committed or has failed."""
        if self._writing:
            drained: Deferred[None] = Deferred()
            self._writes_drained.append(drained)
            await drained

    async def put(self, entry: CacheEntry) -> None:
        await self._queued_write(_UPSERT, [_row(entry)])

    async def put_many(self, entries: list[CacheEntry]) -> None:
        if entries:
            await self._queued_write(_UPSERT, [_row(e) for e in entries])

    async def delete(self, domain: str) -> None:
        await self._queued_write("DELETE FROM entries WHERE domain = ?", [(domain,)])

    async def delete_all(self) -> None:
        await self._queued_write("DELETE FROM entries", [])

    async def prune(self, now: float) -> int:
        return await self._queued_write("DELETE FROM entries WHERE expires_at <= ?", [(now,)])

    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool:
        if self._pool is None:
            raise StoreUnavailable(f"cache database {self.path} is not open")
        return True

    async def release_lease(self, domain: str, holder: str) -> None:
        if self._pool is None:
            raise StoreUnavailable(f"cache database {self.path} is not open")

    # --- closing --------------------------------------------------------------

    async def close(self) -> None:
        if self._pool is None:
            return
        # Writes still queued were promised to the disk: they go first.
        await self._writes_done()
        if not self._is_open():
            return  # another close() finished meanwhile

        def close_in_thread() -> None:
            conn, self._conn = self._conn, None
            lock, self._lock = self._lock, None
            try:
                if conn is not None:
                    conn.close()
            finally:
                if lock is not None:
                    lock.release()

        try:
            await self._call(close_in_thread)
        except sqlite3.Error as e:
            log.warning("cache database %s: error on close: %s", self.path, one_line(e))
        finally:
            self._stop_pool()
