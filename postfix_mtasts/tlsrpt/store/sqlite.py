"""The default report store: one SQLite file, by default beside the policy cache.

The file is marked as this project's report store (``PRAGMA application_id``
= :data:`~postfix_mtasts.tlsrpt.store.APPLICATION_ID`) and only such a file is
ever opened: anything else at the path (an empty file too) stops the store
with one line naming it, and the file is left exactly as found. A missing
store is built under a temporary name and linked into place, so the path
never names a half-made file.
Several processes may write at once (the daemon and Postfix's pipe deliveries):
WAL mode, a busy timeout, and each report added in one ``BEGIN IMMEDIATE``
transaction committed with ``synchronous = FULL`` before ``add`` returns.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime

from zope.interface import implementer

from postfix_mtasts.cache.sqlite_file import Migration, statements
from postfix_mtasts.tlsrpt.model import Report, parse_report_text
from postfix_mtasts.tlsrpt.store import (
    APPLICATION_ID,
    Added,
    AddResult,
    IReportStore,
    ReportStoreError,
    content_digest,
    epoch,
    judge_copy,
    normalise_domain,
    policy_rows,
    reparse,
    report_key,
)

#: File name of the report store in the state directory (beside cache.sqlite3).
DATABASE_NAME = "reports.sqlite3"
#: Seconds a writer waits for another process's transaction before failing.
BUSY_TIMEOUT = 10.0
#: Mode of a directory the store creates, and of the database file.
DIRECTORY_MODE = 0o750
FILE_MODE = 0o640
#: The first bytes of every SQLite 3 database file, and where the header keeps
#: the application id (big-endian, 4 bytes; "Database File Format" §1.3).
SQLITE_MAGIC = b"SQLite format 3\x00"
APPLICATION_ID_OFFSET = 68
SQLITE_HEADER_SIZE = 100
#: A new store is built under a temporary name ending so, then linked into place.
NEW_SUFFIX = ".new"
#: Files SQLite may keep beside a database.
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")




#: MIGRATIONS[n] takes the schema from version n to n + 1. Times are seconds since
#: 1970 (UTC); ``org_key`` is the organisation without case, the identity's half.
MIGRATIONS: tuple[Migration, ...] = (
    statements(
        "CREATE TABLE reports ("
        " id INTEGER PRIMARY KEY,"
        " org_key TEXT NOT NULL,"
        " report_id TEXT NOT NULL,"
        " organization TEXT NOT NULL,"
        " start_time REAL NOT NULL,"
        " end_time REAL NOT NULL,"
        " successful INTEGER NOT NULL,"
        " failed INTEGER NOT NULL,"
        " digest TEXT NOT NULL,"
        " source TEXT NOT NULL,"
        " received_at REAL NOT NULL,"
        " raw BLOB NOT NULL,"
        " UNIQUE (org_key, report_id))",
        "CREATE INDEX reports_end_time ON reports (end_time)",
        "CREATE TABLE policies ("
        " report INTEGER NOT NULL REFERENCES reports (id) ON DELETE CASCADE,"
        " position INTEGER NOT NULL,"
        " policy_type TEXT NOT NULL,"
        " policy_domain TEXT NOT NULL,"
        " successful INTEGER NOT NULL,"
        " failed INTEGER NOT NULL,"
        " PRIMARY KEY (report, position))",
        "CREATE INDEX policies_domain ON policies (policy_domain)",
    ),
)


def default_path(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """Beside the policy cache: ``$STATE_DIRECTORY/reports.sqlite3`` under systemd,
    /var/lib/postfix-mtasts/reports.sqlite3 for root, else
    ``$XDG_STATE_HOME/postfix-mtasts/reports.sqlite3``."""
    from postfix_mtasts.cache.sqlite import default_path as cache_default_path

    return os.path.join(os.path.dirname(cache_default_path(environ, euid)), DATABASE_NAME)


def check_ours(path: str) -> bool:
    """Whether ``path`` may be used: True for a report store of ours, False when
    it is missing (a new store is made); raises :class:`ReportStoreError` for
    anything else, an empty file included, having only read its first bytes."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ReportStoreError(f"report store {path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ReportStoreError(f"report store {path} is not a regular file; refusing to touch it")
    try:
        with open(path, "rb") as f:
            header = f.read(SQLITE_HEADER_SIZE)
    except OSError as e:
        raise ReportStoreError(f"report store {path}: cannot read: {e.strerror or e}") from None
    if not header.startswith(SQLITE_MAGIC) or len(header) < SQLITE_HEADER_SIZE:
        raise ReportStoreError(
            f"{path} is not an SQLite database of postfix-mtasts; refusing to touch it "
            "(set [reports] path to another file)"
        )
    found = int.from_bytes(header[APPLICATION_ID_OFFSET : APPLICATION_ID_OFFSET + 4], "big")
    if found != APPLICATION_ID:
        raise ReportStoreError(
            f"{path} is an SQLite database but not a postfix-mtasts report store "
            f"(application_id {found:#x}, not {APPLICATION_ID:#x}); refusing to touch it "
            "(set [reports] path to another file)"
        )
    return True


@implementer(IReportStore)
class SqliteReportStore:
    """Reports in one SQLite file; opened (and created if missing) at once."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.location = path
        self._clock = clock
        self._lock = threading.Lock()
        self._conn = self._open(busy_timeout)

    # --- opening ------------------------------------------------------------

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        existing = check_ours(self.path)
        if not existing:
            self._create_file()
        try:
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise ReportStoreError(f"report store {self.path}: cannot open: {_one_line(e)}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            conn.close()
            raise ReportStoreError(f"report store {self.path}: cannot open: {_one_line(e)}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_file(self) -> None:
        """Build a new store under a temporary name, marked and with its schema,
        then link it into place: the path never names a half-made file, and a
        store another process linked there first is used as it is."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=DIRECTORY_MODE)
            fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=NEW_SUFFIX,
                                             dir=directory)
            os.close(fd)
        except OSError as e:
            raise ReportStoreError(f"report store {self.path}: cannot create: {e.strerror or e}") from None
        try:
            os.chmod(temporary, FILE_MODE)
            conn = sqlite3.connect(temporary, isolation_level=None)
            try:
                self._migrate(conn)
            finally:
                conn.close()
            os.link(temporary, self.path)
        except FileExistsError:
            check_ours(self.path)  # another process was quicker: is it ours?
        except (OSError, sqlite3.Error) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)
            raise ReportStoreError(f"report store {self.path}: cannot create: {reason}") from None
        finally:
            for leftover in (temporary, *(temporary + suffix for suffix in SIDE_SUFFIXES)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema up to date. The first step also writes the
        application id, in the rollback journal before WAL is turned on, so the
        mark is in the file's own header from the first commit."""
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) == len(MIGRATIONS):
            return  # up to date: nothing written, so a read-only store can still be read
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise ReportStoreError(
                    f"report store {self.path} has schema version {version}, newer than this "
                    f"postfix-mtasts knows ({len(MIGRATIONS)}); upgrade postfix-mtasts"
                )
            if version == 0:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            for target in range(version + 1, len(MIGRATIONS) + 1):
                MIGRATIONS[target - 1](conn)
                conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # --- IReportStore ---------------------------------------------------------

    def add(self, raw: bytes, source: str) -> Added:
        report = parse_report_text(raw)
        digest = content_digest(raw)
        org_key, report_id = report_key(report)
        with self._lock:
            try:
                return self._add(report, raw, source, digest, org_key, report_id)
            except sqlite3.Error as e:
                raise ReportStoreError(
                    f"report store {self.path}: cannot store report {report_id!r} "
                    f"of {report.organization_name}: {_one_line(e)}"
                ) from None

    def _add(self, report: Report, raw: bytes, source: str, digest: str,
             org_key: str, report_id: str) -> Added:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT digest, source FROM reports WHERE org_key = ? AND report_id = ?",
                (org_key, report_id),
            ).fetchone()
            if row is None:
                cursor = conn.execute(
                    "INSERT INTO reports (org_key, report_id, organization, start_time, end_time,"
                    " successful, failed, digest, source, received_at, raw)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (org_key, report_id, report.organization_name, epoch(report.start),
                     epoch(report.end), report.successful_sessions, report.failed_sessions,
                     digest, source, self._clock(), raw),
                )
                conn.executemany(
                    "INSERT INTO policies (report, position, policy_type, policy_domain,"
                    " successful, failed) VALUES (?, ?, ?, ?, ?, ?)",
                    [(cursor.lastrowid, *row) for row in policy_rows(report)],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if row is None:
            return Added(AddResult.NEW, report, source)
        return judge_copy(report, source, digest, stored_digest=row[0], stored_source=row[1])

    def reports(self, since: datetime | None = None, domain: str | None = None) -> list[Report]:
        sql = "SELECT raw FROM reports"
        where: list[str] = []
        args: list[object] = []
        if since is not None:
            where.append("end_time >= ?")
            args.append(epoch(since))
        if domain is not None:
            where.append("id IN (SELECT report FROM policies WHERE policy_domain = ?)")
            args.append(normalise_domain(domain))
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start_time, id"
        with self._lock:
            try:
                rows = self._conn.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise ReportStoreError(f"report store {self.path}: cannot read: {_one_line(e)}") from None
        return reparse(self.location, (bytes(r[0]) for r in rows), domain)

    def count(self) -> int:
        with self._lock:
            try:
                return int(self._conn.execute("SELECT count(*) FROM reports").fetchone()[0])
            except sqlite3.Error as e:
                raise ReportStoreError(f"report store {self.path}: cannot read: {_one_line(e)}") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
