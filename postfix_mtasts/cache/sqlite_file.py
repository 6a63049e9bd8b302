"""The SQLite cache file on disk: whose it is, and which daemon is using it.

Before SQLite opens the configured file (and so may write to it or create
files beside it), its header is read by hand. A file that is not an SQLite
database, or is another program's, is refused and left exactly as it was
found. A database is this daemon's when its ``application_id`` is
:data:`APPLICATION_ID`, or, made before the id was set, when its schema is
exactly what the migrations up to its ``user_version`` create; such a
database is adopted and stamped. A new database is built under a temporary
name and linked into place, so the path never names a half-made (say empty)
file: an empty file there is someone else's.

A second daemon is kept off the file by an ``flock`` on ``<path>.lock``, which
holds the holder's pid; the kernel releases it when the process dies, however
it dies.
"""

from __future__ import annotations

import enum
import fcntl
import os
import re
import sqlite3
import stat
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence

from postfix_mtasts.cache import StoreUnavailable
from postfix_mtasts.errors import one_line

#: ``PRAGMA application_id`` of a database this daemon made: 'MTSC'.
APPLICATION_ID = 0x4D545343
#: Mode of the state directory when we create it, and of the database file.
DIRECTORY_MODE = 0o750
FILE_MODE = 0o600
#: Files SQLite keeps beside the database; moved aside with it when corrupt.
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
#: A new database is built under a temporary name ending so, then linked into place.
NEW_SUFFIX = ".new"
#: The first 16 bytes of every SQLite 3 database file.
SQLITE_MAGIC = b"SQLite format 3\x00"
#: Size of the database header, and where its application_id sits in it
#: (a 4-byte big-endian integer; sqlite.org/fileformat.html, section 1.3).
HEADER_SIZE = 100
APPLICATION_ID_OFFSET = 68
APPLICATION_ID_SIZE = 4
#: The lock file beside the database, and what it holds.
LOCK_SUFFIX = ".lock"
LOCK_FILE_MODE = 0o600
LOCK_TEXT = "postfix-mtasts pid {pid}\n"
LOCK_PATTERN = re.compile(r"postfix-mtasts pid (\d+)\n?")
#: Most bytes of a lock file read to find its holder's pid.
LOCK_READ_LIMIT = 256
#: At most this many tables are named when refusing another program's database.
NAMED_TABLES_LIMIT = 5

#: One schema step (sqlite.MIGRATIONS): run inside its own transaction, then user_version is bumped.
Migration = Callable[[sqlite3.Connection], None]


def statements(*sql: str) -> Migration:
    """A schema step that runs ``sql``, one statement after another."""

    def migrate(conn: sqlite3.Connection) -> None:
        for statement in sql:
            conn.execute(statement)

    return migrate

#: What a refusal tells the user to do.
_WAY_OUT = "it is left untouched: set cache.path to another file (postfix-mtasts creates it)"


class StoreError(Exception):
    """The database cannot be used at all (not ours, in use, newer schema,
    failed migration); ``str()`` is one line naming the file and the way out."""


def _refused(path: str, what: str) -> StoreError:
    return StoreError(f"cache file {path} {what}; {_WAY_OUT}")


class Ownership(enum.Enum):
    """What examine() found at the cache path."""

    #: Nothing there: ours to create.
    MISSING = "missing"
    #: A database stamped with our application_id.
    OURS = "ours"
    #: Made by a version of this daemon from before the application_id.
    UNSTAMPED = "unstamped"


def examine(path: str, migrations: Sequence[Migration]) -> Ownership:
    """Whose the file at ``path`` is, read without changing it or anything
    beside it; raises StoreError naming the path unless it is ours to use."""
    header = _read_header(path)
    if header is None:
        return Ownership.MISSING
    if not header:
        raise _refused(path, "is an empty file that postfix-mtasts did not create")
    if not header.startswith(SQLITE_MAGIC):
        raise _refused(path, "is not an SQLite database")
    if len(header) < HEADER_SIZE:
        raise _refused(path, "is too short to be an SQLite database")
    application_id = int.from_bytes(
        header[APPLICATION_ID_OFFSET : APPLICATION_ID_OFFSET + APPLICATION_ID_SIZE], "big"
    )
    if application_id == APPLICATION_ID:
        return Ownership.OURS
    if application_id != 0:
        raise _refused(path, f"is another program's SQLite database (application_id {application_id:#010x})")
    version, schema = _read_schema(path)
    if 1 <= version <= len(migrations) and schema == _schema_of(migrations[:version]):
        return Ownership.UNSTAMPED
    tables = sorted(name for kind, name, _, _ in schema if kind == "table")
    if not tables:
        raise _refused(path, "is an SQLite database without postfix-mtasts's tables")
    named = ", ".join(tables[:NAMED_TABLES_LIMIT]) + (", ..." if len(tables) > NAMED_TABLES_LIMIT else "")
    raise _refused(path, f"is another program's SQLite database (tables: {named})")


def _read_header(path: str) -> bytes | None:
    """The first HEADER_SIZE bytes of a regular file (fewer if it is shorter),
    or None when nothing is at ``path``."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreUnavailable(f"cannot read cache database {path}: {e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refused(path, "is not a regular file")
        return os.pread(fd, HEADER_SIZE, 0)
    except OSError as e:
        raise StoreUnavailable(f"cannot read cache database {path}: {e.strerror}") from e
    finally:
        os.close(fd)


#: (type, name, tbl_name, sql) of every schema object but SQLite's own.
_Schema = frozenset[tuple[str, str, str, str]]
_SCHEMA_QUERY = (
    "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
)


def _read_schema(path: str) -> tuple[int, _Schema]:
    """user_version and schema of the main file alone. ``immutable`` opens it
    read-only with no locks and no -wal, -shm or -journal file."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as e:
        raise _refused(path, f"cannot be read as an SQLite database ({one_line(e)})") from e
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        rows = conn.execute(_SCHEMA_QUERY).fetchall()
    except sqlite3.Error as e:
        raise _refused(path, f"cannot be read as an SQLite database ({one_line(e)})") from e
    finally:
        conn.close()
    return version, frozenset((str(a), str(b), str(c), str(d)) for a, b, c, d in rows)


def _schema_of(migrations: Sequence[Migration]) -> _Schema:
    """The schema ``migrations`` build in an empty database."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for migrate in migrations:
            migrate(conn)
        rows = conn.execute(_SCHEMA_QUERY).fetchall()
    finally:
        conn.close()
    return frozenset((str(a), str(b), str(c), str(d)) for a, b, c, d in rows)


def make_directory(path: str) -> None:
    """Create the directory of the database ``path`` if it is missing."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return
    try:
        os.makedirs(directory, mode=DIRECTORY_MODE)
        os.chmod(directory, DIRECTORY_MODE)  # makedirs' mode is cut by umask
    except OSError as e:
        raise StoreUnavailable(f"cannot create cache directory {directory}: {e.strerror}") from e


def create_database(
    path: str, initialise: Callable[[sqlite3.Connection], None], migrations: Sequence[Migration]
) -> Ownership:
    """Build a new database with ``initialise`` under a temporary name and link
    it into place, so that ``path`` never names a half-made file; returns the
    ownership of what is at ``path`` then (another process may have been first)."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=name + ".", suffix=NEW_SUFFIX, dir=directory)
    except OSError as e:
        raise StoreUnavailable(f"cannot create cache database {path}: {e.strerror}") from e
    try:
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        conn = sqlite3.connect(temporary, isolation_level=None)
        try:
            initialise(conn)
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
        try:
            os.link(temporary, path)
        except FileExistsError:
            return examine(path, migrations)
        except OSError:
            # A file system without hard links: rename, now that the path is
            # known to be free (the lock keeps other daemons away).
            if os.path.lexists(path):
                return examine(path, migrations)
            os.rename(temporary, path)
    except sqlite3.Error as e:
        raise StoreUnavailable(f"cannot create cache database {path}: {one_line(e)}") from e
    except OSError as e:
        raise StoreUnavailable(f"cannot create cache database {path}: {e.strerror}") from e
    finally:
        for leftover in (temporary, *(temporary + suffix for suffix in SIDE_SUFFIXES)):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    return Ownership.OURS


def move_aside(path: str, stamp: str) -> str:
    """Rename a damaged database of ours, and its side files, out of the way;
    returns the new name."""
    base = f"{path}.corrupt-{stamp}"
    aside, n = base, 1
    while os.path.exists(aside):
        aside, n = f"{base}.{n}", n + 1
    try:
        os.replace(path, aside)
        for suffix in SIDE_SUFFIXES:
            if os.path.exists(path + suffix):
                os.replace(path + suffix, aside + suffix)
    except OSError as e:
        raise StoreError(
            f"cache database {path} is corrupt and cannot be moved aside ({e.strerror}); remove it by hand"
        ) from e
    return aside


class DatabaseLock:
    """An exclusive flock on ``<database>.lock`` for as long as it is held."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.path = database + LOCK_SUFFIX
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write our pid in the file; raises StoreError
        naming the holder when another process has it."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, LOCK_FILE_MODE)
        except OSError as e:
            raise StoreUnavailable(f"cannot open lock file {self.path}: {e.strerror}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(_read_lock(fd))
                raise StoreError(
                    f"cache file {self.database} is in use by another postfix-mtasts (pid {holder})"
                ) from None
            text = _read_lock(fd)
            if text and LOCK_PATTERN.fullmatch(text) is None:
                raise StoreError(
                    f"lock file {self.path} was not made by postfix-mtasts; left untouched:"
                    " remove it if nothing else uses it, or set cache.path to another file"
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, LOCK_TEXT.format(pid=os.getpid()).encode("ascii"), 0)
        except OSError as e:
            os.close(fd)
            raise StoreUnavailable(f"cannot lock {self.path}: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Let the next daemon in; the file stays, naming its last holder."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_lock(fd: int) -> str:
    return os.pread(fd, LOCK_READ_LIMIT, 0).decode("ascii", "replace")


def _holder(text: str) -> str:
    """The pid in a lock file's text, or "unknown" while it is being written."""
    match = LOCK_PATTERN.fullmatch(text)
    return match.group(1) if match else "unknown"
