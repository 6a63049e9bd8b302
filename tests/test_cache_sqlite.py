"""SqliteStore: the store contract, plus what only a file on disk can get wrong:
modes and pragmas, schema versions, a file that is not ours (refused and left
byte for byte as it was), an old database of ours (adopted), a damaged one of
ours (moved aside), a second store on the same file (refused), run-time faults."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet import reactor as global_reactor

from postfix_mtasts.cache import CacheEntry, StoreUnavailable
from postfix_mtasts.cache.sqlite import (
    APPLICATION_ID,
    MIGRATIONS,
    SqliteStore,
    StoreError,
    ThreadedReactor,
    default_path,
)
from tests.store_contract import (
    NOW,
    PolicyStore,
    StoreContract,
    StoreFactory,
    async_yield_fixture,
    ensure_deferred,
    failed,
    fetched,
    negative,
)

reactor = cast(ThreadedReactor, global_reactor)


class SqliteFactory(StoreFactory):
    """Stores on one file under the test's tmp_path."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__()
        self.path = path
        self.options = options

    async def _create(self) -> PolicyStore:
        return SqliteStore(reactor, str(self.path), **self.options)

    async def open_sqlite(self, **options: Any) -> SqliteStore:
        """An opened SqliteStore with extra constructor options."""
        store = self.adopt(SqliteStore(reactor, str(self.path), **{**self.options, **options}))
        await store.open()
        return store


@async_yield_fixture
async def store_factory(tmp_path: Path) -> AsyncIterator[SqliteFactory]:
    factory = SqliteFactory(tmp_path / "state" / "cache.sqlite3")
    yield factory
    await factory.close_all()


class TestSqliteStore(StoreContract):
    pass


def _db(path: Path) -> sqlite3.Connection:
    """A second, independent connection to the store's file."""
    return sqlite3.connect(str(path), isolation_level=None)


def _error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "postfix_mtasts.cache" and r.levelno >= logging.ERROR
    ]


def _make_real_database(path: Path, entries: int, *, stamped: bool = True, wal: bool = False) -> None:
    """A database as the daemon makes it; ``stamped=False``: as versions from
    before the application_id made it."""
    conn = _db(path)
    if stamped:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    for migration in MIGRATIONS:
        migration(conn)
    conn.executemany(
        "INSERT INTO entries VALUES (?, ?, ?, ?)",
        [
            (e.domain, e.to_json(), e.expires_at, e.last_used)
            for e in (fetched(f"d{i}.example") for i in range(entries))
        ],
    )
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.close()


def _header_application_id(path: Path) -> int:
    """The application_id in the file's own header (bytes 68-71), as SQLite
    would read it with no -wal file beside."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(100)[68:72], "big")


def _snapshot(directory: Path) -> dict[str, tuple[bytes | None, int, int]]:
    """Every name in ``directory`` with its bytes (regular files), mtime and mode."""
    return {
        p.name: (p.read_bytes() if p.is_file() else None, p.lstat().st_mtime_ns, p.lstat().st_mode)
        for p in sorted(directory.iterdir())
    }


# --- files, modes, pragmas ---------------------------------------------------


@ensure_deferred
async def test_creates_directory_0750_and_file_0600(
    store_factory: SqliteFactory,
) -> None:
    old = os.umask(0o077)
    try:
        await store_factory.open_store()
    finally:
        os.umask(old)
    directory = store_factory.path.parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    assert stat.S_IMODE(store_factory.path.stat().st_mode) == 0o600


@ensure_deferred
async def test_wal_mode_and_schema_version(store_factory: SqliteFactory) -> None:
    await store_factory.open_store()
    conn = _db(store_factory.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"entries", "entries_last_used", "entries_expires_at"} <= names
    conn.close()


@ensure_deferred
async def test_put_is_committed_before_it_returns(store_factory: SqliteFactory) -> None:
    store = await store_factory.open_store()
    entry = fetched("example.com")
    await store.put(entry)
    conn = _db(store_factory.path)
    (data,) = conn.execute("SELECT data FROM entries WHERE domain = 'example.com'").fetchone()
    conn.close()
    assert CacheEntry.from_json(data) == entry


# --- schema versions ------------------------------------------------------------


_migration_threads: list[threading.Thread] = []


def _add_column(conn: sqlite3.Connection) -> None:
    _migration_threads.append(threading.current_thread())
    conn.execute("ALTER TABLE entries ADD COLUMN hits INTEGER NOT NULL DEFAULT 0")


@ensure_deferred
async def test_migrates_an_older_schema_keeping_its_entries(
    store_factory: SqliteFactory,
) -> None:
    store_factory.path.parent.mkdir()
    _make_real_database(store_factory.path, 3)
    store = await store_factory.open_sqlite(migrations=(*MIGRATIONS, _add_column))
    assert await store.count() == 3
    assert await store.get("d1.example") == fetched("d1.example")
    await store.put(failed("new.example"))
    conn = _db(store_factory.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
    assert conn.execute("SELECT sum(hits) FROM entries").fetchone()[0] == 0
    conn.close()
    # Database work happens off the reactor's thread.
    assert len(_migration_threads) == 1
    assert _migration_threads[0] is not threading.current_thread()


@ensure_deferred
async def test_a_failing_migration_changes_nothing(store_factory: SqliteFactory) -> None:
    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    await (await store_factory.open_store()).put(negative("kept.example"))
    await store_factory.close_all()
    with pytest.raises(StoreError) as caught:
        await store_factory.open_sqlite(migrations=(*MIGRATIONS, broken))
    message = str(caught.value)
    assert "\n" not in message
    assert f"migration to schema version {len(MIGRATIONS) + 1} failed" in message
    conn = _db(store_factory.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in tables
    conn.close()
    store = await store_factory.open_store()
    assert await store.get("kept.example") == negative("kept.example")


@ensure_deferred
async def test_a_newer_schema_is_refused(store_factory: SqliteFactory) -> None:
    await (await store_factory.open_store()).put(negative("kept.example"))
    await store_factory.close_all()
    conn = _db(store_factory.path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    store = store_factory.adopt(SqliteStore(reactor, str(store_factory.path)))
    with pytest.raises(StoreError) as caught:
        await store.open()
    message = str(caught.value)
    assert "\n" not in message
    assert str(store_factory.path) in message and "schema version 99" in message
    with pytest.raises(StoreUnavailable):
        await store.get("kept.example")
    conn = _db(store_factory.path)
    assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    conn.close()


# --- files that are not ours -------------------------------------------------------


async def _assert_refused_untouched(factory: SqliteFactory, what: str) -> str:
    """Opening fails with one line naming the path, ``what`` and cache.path;
    the directory holds the same names, bytes, mtimes and modes as before."""
    directory = factory.path.parent
    before = _snapshot(directory)
    store = factory.adopt(SqliteStore(reactor, str(factory.path)))
    with pytest.raises(StoreError) as caught:
        await store.open()
    message = str(caught.value)
    assert "\n" not in message
    assert str(factory.path) in message and what in message, message
    assert "left untouched" in message and "cache.path" in message, message
    assert _snapshot(directory) == before
    with pytest.raises(StoreUnavailable):
        await store.get("example.com")
    return message


def _aged(path: Path) -> None:
    """Set a file's times in the past, so that any write would show."""
    os.utime(path, (1_500_000_000, 1_500_000_000))


@ensure_deferred
async def test_a_copy_of_etc_passwd_is_refused_untouched(store_factory: SqliteFactory) -> None:
    store_factory.path.parent.mkdir()
    shutil.copy2("/etc/passwd", store_factory.path)
    _aged(store_factory.path)
    await _assert_refused_untouched(store_factory, "is not an SQLite database")
    assert store_factory.path.read_bytes() == Path("/etc/passwd").read_bytes()


@ensure_deferred
async def test_random_bytes_are_refused_untouched_with_what_lies_beside(store_factory: SqliteFactory) -> None:
    store_factory.path.parent.mkdir()
    # A zero byte first: never the SQLite magic, whatever urandom gives.
    store_factory.path.write_bytes(b"\0" + os.urandom(64 * 1024))
    Path(f"{store_factory.path}-wal").write_bytes(os.urandom(4096))
    _aged(store_factory.path)
    await _assert_refused_untouched(store_factory, "is not an SQLite database")


def _foreign_tables(path: Path) -> None:
    conn = _db(path)
    conn.execute("CREATE TABLE accounts (name TEXT PRIMARY KEY, balance INTEGER)")
    conn.executemany("INSERT INTO accounts VALUES (?, ?)", [(f"user{i}", i) for i in range(100)])
    conn.close()


def _foreign_tables_in_wal_mode(path: Path) -> None:
    _foreign_tables(path)
    conn = _db(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("INSERT INTO accounts VALUES ('late', 1)")
    conn.close()


def _our_tables_beside_another(path: Path) -> None:
    _make_real_database(path, 2, stamped=False)
    conn = _db(path)
    conn.execute("CREATE TABLE extra (x)")
    conn.close()


def _our_tables_under_another_application_id(path: Path) -> None:
    _make_real_database(path, 2, stamped=False)
    conn = _db(path)
    conn.execute("PRAGMA application_id = 305419896")  # 0x12345678
    conn.close()


def _no_tables_at_all(path: Path) -> None:
    conn = _db(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _old_database_with_its_schema_page_scribbled(path: Path) -> None:
    _make_real_database(path, 50, stamped=False)
    data = bytearray(path.read_bytes())
    data[100:400] = b"\xa5" * 300
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (_foreign_tables, "another program's SQLite database (tables: accounts)"),
        (_foreign_tables_in_wal_mode, "another program's SQLite database (tables: accounts)"),
        (_our_tables_beside_another, "another program's SQLite database (tables: entries, extra)"),
        (_our_tables_under_another_application_id, "(application_id 0x12345678)"),
        (_no_tables_at_all, "an SQLite database without postfix-mtasts's tables"),
        (_empty_file, "is an empty file that postfix-mtasts did not create"),
        (_old_database_with_its_schema_page_scribbled, "cannot be read as an SQLite database"),
    ],
)
@ensure_deferred
async def test_another_programs_database_is_refused_untouched(
    store_factory: SqliteFactory, make: Any, what: str
) -> None:
    store_factory.path.parent.mkdir()
    make(store_factory.path)
    _aged(store_factory.path)
    await _assert_refused_untouched(store_factory, what)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
@ensure_deferred
async def test_a_path_that_is_not_a_regular_file_is_refused(store_factory: SqliteFactory, kind: str) -> None:
    store_factory.path.parent.mkdir()
    if kind == "directory":
        store_factory.path.mkdir()
    else:
        os.mkfifo(store_factory.path)
    await _assert_refused_untouched(store_factory, "is not a regular file")


# --- new and older databases of ours ---------------------------------------------------


@ensure_deferred
async def test_a_new_database_is_marked_as_ours_and_nothing_else_is_left_beside(
    store_factory: SqliteFactory,
) -> None:
    store = await store_factory.open_store()
    await store.put(negative("example.com"))
    assert _header_application_id(store_factory.path) == APPLICATION_ID == 0x4D545343
    names = {p.name for p in store_factory.path.parent.iterdir()}
    assert names <= {"cache.sqlite3", "cache.sqlite3-wal", "cache.sqlite3-shm", "cache.sqlite3.lock"}, names
    await store_factory.close_all()
    names = {p.name for p in store_factory.path.parent.iterdir()}
    assert names == {"cache.sqlite3", "cache.sqlite3.lock"}, names


@ensure_deferred
async def test_a_database_made_before_the_mark_is_adopted_and_marked(
    store_factory: SqliteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    store_factory.path.parent.mkdir()
    _make_real_database(store_factory.path, 3, stamped=False, wal=True)
    assert _header_application_id(store_factory.path) == 0
    with caplog.at_level(logging.INFO, logger="postfix_mtasts.cache"):
        store = await store_factory.open_store()
    assert await store.count() == 3
    assert await store.get("d1.example") == fetched("d1.example")
    assert _header_application_id(store_factory.path) == APPLICATION_ID
    adopted = [r.getMessage() for r in caplog.records if "marked as its own" in r.getMessage()]
    assert adopted == [
        f"cache database {store_factory.path} was made by an older postfix-mtasts: marked as its own"
    ]
    await store_factory.close_all()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="postfix_mtasts.cache"):
        store = await store_factory.open_store()
    assert await store.count() == 3
    assert not [r for r in caplog.records if "marked as its own" in r.getMessage()]


# --- damaged files of ours ---------------------------------------------------------


async def _assert_moved_aside_and_empty(
    factory: SqliteFactory,
    caplog: pytest.LogCaptureFixture,
    original: bytes,
) -> list[Path]:
    with caplog.at_level(logging.INFO, logger="postfix_mtasts.cache"):
        store = await factory.open_store()
    assert await store.count() == 0
    assert await store.get("d1.example") is None
    await store.put(negative("fresh.example"))
    assert await store.get("fresh.example") == negative("fresh.example")
    moved = sorted(factory.path.parent.glob("cache.sqlite3.corrupt-*"))
    main = [p for p in moved if not p.name.endswith(("-wal", "-shm", "-journal"))]
    assert len(main) == 1
    assert main[0].read_bytes() == original
    lines = _error_lines(caplog)
    assert len(lines) == 1
    assert str(factory.path) in lines[0] and str(main[0]) in lines[0]
    assert "corrupt" in lines[0] and "starting empty" in lines[0]
    assert "\n" not in lines[0]
    return moved


@ensure_deferred
async def test_truncated_database_is_moved_aside(
    store_factory: SqliteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    store_factory.path.parent.mkdir()
    _make_real_database(store_factory.path, 500)
    whole = store_factory.path.read_bytes()
    store_factory.path.write_bytes(whole[: len(whole) // 2])
    await _assert_moved_aside_and_empty(store_factory, caplog, whole[: len(whole) // 2])


@pytest.mark.parametrize("stamped", [True, False], ids=["marked", "made-before-the-mark"])
@ensure_deferred
async def test_damaged_page_is_moved_aside(
    store_factory: SqliteFactory, caplog: pytest.LogCaptureFixture, stamped: bool
) -> None:
    """A file that opens but whose btree pages are scribbled over; one made
    before the application_id is known as ours by its intact schema."""
    store_factory.path.parent.mkdir()
    _make_real_database(store_factory.path, 500, stamped=stamped)
    data = bytearray(store_factory.path.read_bytes())
    page = 4096
    for offset in range(3 * page, 6 * page, 7):
        data[offset] = 0xA5
    store_factory.path.write_bytes(bytes(data))
    await _assert_moved_aside_and_empty(store_factory, caplog, bytes(data))


@ensure_deferred
async def test_malformed_rows_are_skipped_with_one_line(
    store_factory: SqliteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    store = await store_factory.open_store()
    good = [fetched("good1.example", last_used=NOW + 1), negative("good2.example")]
    await store.put_many(good)
    conn = _db(store_factory.path)
    conn.executemany(
        "INSERT INTO entries VALUES (?, ?, ?, ?)",
        [
            ("notjson.example", "{not json", NOW + 9, NOW + 9),
            ("badversion.example", '{"v": 7}', NOW + 9, NOW + 9),
            ("wrongdomain.example", fetched("other.example").to_json(), NOW + 9, NOW + 9),
        ],
    )
    conn.close()
    with caplog.at_level(logging.INFO, logger="postfix_mtasts.cache"):
        assert await store.load(10) == good
        assert await store.get("notjson.example") is None
        assert await store.get("badversion.example") is None
        assert await store.get("wrongdomain.example") is None
        assert await store.get("good1.example") == good[0]
    records = [r for r in caplog.records if r.name == "postfix_mtasts.cache"]
    assert len(records) == 1
    assert "skipped 3 malformed entries" in records[0].getMessage()
    assert isinstance(store, SqliteStore) and store.malformed_rows == 6
    # Replacing a malformed row heals it.
    await store.put(negative("notjson.example"))
    assert await store.get("notjson.example") == negative("notjson.example")


# --- one daemon per file -----------------------------------------------------------


@ensure_deferred
async def test_a_second_store_on_the_file_is_refused_naming_the_first(store_factory: SqliteFactory) -> None:
    first = await store_factory.open_store()
    await first.put(negative("kept.example"))
    second = store_factory.adopt(SqliteStore(reactor, str(store_factory.path)))
    with pytest.raises(StoreError) as caught:
        await second.open()
    assert str(caught.value) == (
        f"cache file {store_factory.path} is in use by another postfix-mtasts (pid {os.getpid()})"
    )
    # The first goes on as if nothing happened.
    await first.put(negative("later.example"))
    assert await first.get("kept.example") == negative("kept.example")
    await first.close()
    await second.open()
    assert await second.get("later.example") == negative("later.example")


def test_the_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    """A holder killed with SIGKILL closes nothing itself; the kernel frees the lock."""
    path = tmp_path / "cache.sqlite3"
    program = textwrap.dedent(
        f"""
        import sys
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred
        from postfix_mtasts.cache.sqlite import SqliteStore

        async def main():
            await SqliteStore(reactor, {str(path)!r}).open()
            print("open", flush=True)

        reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
        reactor.run()
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        refused = _open_once(path)
        assert refused.stdout == f"cache file {path} is in use by another postfix-mtasts (pid {holder.pid})\n"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        opened = _open_once(path)
        assert opened.stdout == "opened\n", opened.stderr
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


#: A process that opens the store at argv[1] once and says how it went.
_OPEN_ONCE = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from postfix_mtasts.cache.sqlite import SqliteStore

    async def main():
        store = SqliteStore(reactor, sys.argv[1])
        try:
            await store.open()
            print("opened")
            await store.close()
        except Exception as e:
            print(e)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.run()
    """
)


def _open_once(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _OPEN_ONCE, str(path)], capture_output=True, text=True)


# --- run-time faults ---------------------------------------------------------------


@ensure_deferred
async def test_locked_database_is_unavailable_then_recovers(
    store_factory: SqliteFactory,
) -> None:
    store = await store_factory.open_sqlite(busy_timeout=0.05)
    await store.put(negative("before.example"))
    other = _db(store_factory.path)
    other.execute("BEGIN EXCLUSIVE")
    other.execute("INSERT INTO entries VALUES ('x.example', 'x', 0, 0)")
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.put(fetched("during.example"))
        assert "locked" in str(caught.value)
        assert "\n" not in str(caught.value)
        # WAL readers are not blocked by a writer.
        assert await store.get("before.example") == negative("before.example")
    finally:
        other.execute("ROLLBACK")
        other.close()
    await store.put(fetched("after.example"))
    assert await store.get("after.example") == fetched("after.example")
    assert await store.get("during.example") is None


@ensure_deferred
async def test_full_database_is_unavailable_then_recovers(
    store_factory: SqliteFactory,
) -> None:
    store = await store_factory.open_sqlite(max_bytes=64 * 1024)
    stored = 0
    with pytest.raises(StoreUnavailable) as caught:
        for i in range(10_000):
            await store.put(fetched(f"host{i:05}.example"))
            stored += 1
    assert "full" in str(caught.value)
    assert stored > 0
    assert await store.count() == stored
    assert await store.get(f"host{stored:05}.example") is None
    with pytest.raises(StoreUnavailable):
        await store.put_many([negative(f"batch{i}.example") for i in range(50)])
    assert await store.get("batch0.example") is None
    # Space comes back: the same store writes again.
    await store.delete_all()
    await store.put(fetched("after.example"))
    assert await store.get("after.example") == fetched("after.example")


# --- group commit ----------------------------------------------------------------


def _rows_on_disk(path: Path, domain: str | None = None) -> int:
    """Rows another connection sees committed (for ``domain``, or all)."""
    conn = _db(path)
    try:
        if domain is None:
            return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])
        return int(conn.execute("SELECT count(*) FROM entries WHERE domain = ?", (domain,)).fetchone()[0])
    finally:
        conn.close()


@ensure_deferred
async def test_puts_made_during_a_write_share_the_next_transaction(store_factory: SqliteFactory) -> None:
    from twisted.internet.defer import Deferred, gatherResults

    store = await store_factory.open_sqlite()
    on_disk_when_told: dict[str, int] = {}

    def told(_: object, domain: str) -> None:
        on_disk_when_told[domain] = _rows_on_disk(store_factory.path, domain)

    puts = []
    for i in range(50):
        domain = f"d{i:02}.example"
        put = Deferred.fromCoroutine(store.put(fetched(domain)))
        put.addCallback(told, domain)
        puts.append(put)
    await gatherResults(puts)
    # Each caller hears of its entry only once the entry is committed.
    assert on_disk_when_told == {f"d{i:02}.example": 1 for i in range(50)}
    # The first put went alone; the 49 made while it was written, together.
    assert (store.write_transactions, store.upserts) == (2, 50)
    # A lone write later still goes at once, in a transaction of its own.
    await store.put(negative("alone.example"))
    assert (store.write_transactions, store.upserts) == (3, 51)


@ensure_deferred
async def test_writes_keep_the_order_they_were_asked_in(store_factory: SqliteFactory) -> None:
    from twisted.internet.defer import Deferred, gatherResults

    store = await store_factory.open_sqlite()
    v2, v3 = fetched("a.example", policy_id="v2"), fetched("a.example", policy_id="v3")
    writes = [
        Deferred.fromCoroutine(work)
        for work in (
            store.put(negative("first.example")),  # written while the rest queue
            store.put(v2),
            store.delete("a.example"),
            store.put(fetched("b.example")),
            store.delete_all(),
            store.put(fetched("c.example")),
            store.put(v3),
        )
    ]
    await gatherResults(writes)
    assert await store.get("a.example") == v3
    assert await store.get("b.example") is None
    assert await store.get("first.example") is None
    assert await store.get("c.example") == fetched("c.example")
    # The last two puts shared one transaction; nothing crossed a delete.
    assert store.write_transactions == 6


@ensure_deferred
async def test_a_failed_group_commit_fails_every_put_in_it_then_recovers(
    store_factory: SqliteFactory,
) -> None:
    from twisted.internet.defer import Deferred, DeferredList

    store = await store_factory.open_sqlite(max_bytes=64 * 1024)
    puts = [Deferred.fromCoroutine(store.put(fetched(f"host{i:04}.example"))) for i in range(400)]
    outcomes = await DeferredList(puts, consumeErrors=True)
    # The first went alone and fits; the other 399 did not fit in one transaction.
    assert outcomes[0] == (True, None)
    refusals = [result for ok, result in outcomes[1:] if not ok]
    assert len(refusals) == 399
    assert all(r.check(StoreUnavailable) and "full" in str(r.value) for r in refusals)
    assert _rows_on_disk(store_factory.path) == 1
    await store.put(fetched("after.example"))
    assert await store.get("after.example") == fetched("after.example")


@ensure_deferred
async def test_close_commits_the_writes_still_queued(store_factory: SqliteFactory) -> None:
    from twisted.internet.defer import Deferred

    store = await store_factory.open_sqlite()
    puts = [Deferred.fromCoroutine(store.put(fetched(f"d{i:02}.example"))) for i in range(20)]
    await store.close()
    assert all(put.called for put in puts)
    assert _rows_on_disk(store_factory.path) == 20
    with pytest.raises(StoreUnavailable):
        await store.put(fetched("late.example"))


@ensure_deferred
async def test_unopenable_directory_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    factory = SqliteFactory(blocker / "sub" / "cache.sqlite3")
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await factory.open_sqlite()
        assert "cannot create cache directory" in str(caught.value)
    finally:
        await factory.close_all()


# --- default path ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        ({"STATE_DIRECTORY": "/run/sd/a:/run/sd/b"}, 0, "/run/sd/a/cache.sqlite3"),
        ({"STATE_DIRECTORY": "/srv/state"}, 1000, "/srv/state/cache.sqlite3"),
        ({}, 0, "/var/lib/postfix-mtasts/cache.sqlite3"),
        ({"XDG_STATE_HOME": "/x/state"}, 0, "/var/lib/postfix-mtasts/cache.sqlite3"),
        (
            {"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"},
            1000,
            "/x/state/postfix-mtasts/cache.sqlite3",
        ),
        ({"HOME": "/home/u"}, 1000, "/home/u/.local/state/postfix-mtasts/cache.sqlite3"),
        (
            {"XDG_STATE_HOME": "relative", "HOME": "/home/u"},
            1000,
            "/home/u/.local/state/postfix-mtasts/cache.sqlite3",
        ),
    ],
)
def test_default_path(environ: dict[str, str], euid: int, expected: str) -> None:
    assert default_path(environ, euid) == expected


def test_default_path_uses_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/from/systemd")
    assert default_path() == "/from/systemd/cache.sqlite3"


# --- loading in batches ------------------------------------------------------


@ensure_deferred
async def test_load_in_batches_gives_the_same_order_across_ties(
    store_factory: SqliteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import postfix_mtasts.cache.sqlite as sqlite_module

    store = await store_factory.open_store()
    # Ties on last_used straddle the batch boundaries: the domain breaks them.
    entries = [fetched(f"d{i:02}.example", last_used=NOW + i // 4) for i in range(23)]
    await store.put_many(entries)
    whole = await store.load(100)
    monkeypatch.setattr(sqlite_module, "LOAD_BATCH", 3)
    assert await store.load(100) == whole
    assert await store.load(7) == whole[:7]
    assert len(whole) == 23
    assert [e.last_used for e in whole] == sorted((e.last_used for e in whole), reverse=True)


@ensure_deferred
async def test_a_get_waits_for_one_load_batch_not_the_whole_load(
    store_factory: SqliteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twisted.internet.defer import Deferred

    import postfix_mtasts.cache.sqlite as sqlite_module

    store = await store_factory.open_store()
    await store.put_many([fetched(f"d{i:02}.example", last_used=NOW + i) for i in range(30)])
    monkeypatch.setattr(sqlite_module, "LOAD_BATCH", 5)
    finished: list[str] = []
    loading = Deferred.fromCoroutine(store.load(100))
    loading.addCallback(lambda _: finished.append("load"))
    got = Deferred.fromCoroutine(store.get("d00.example"))
    got.addCallback(lambda _: finished.append("get"))
    await got
    await loading
    assert finished == ["get", "load"]


def test_process_exits_when_the_reactor_stops_with_the_store_still_open(tmp_path: Path) -> None:
    """The shutdown trigger stops the store's thread; the process must not hang."""
    import subprocess
    import sys
    import textwrap

    program = textwrap.dedent(
        f"""
        from twisted.internet import asyncioreactor
        asyncioreactor.install()
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred
        from postfix_mtasts.cache.sqlite import SqliteStore

        async def main():
            store = SqliteStore(reactor, {str(tmp_path / "cache.sqlite3")!r})
            await store.open()
            reactor.stop()  # never closed: the trigger must clean up

        reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
        reactor.run()
        print("exited")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exited"
    assert "ValueError" not in result.stderr, result.stderr
