"""SqliteStore: the store contract, plus what only a file on disk can get wrong."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet import reactor as global_reactor

from postfix_mtasts.cache import CacheEntry, StoreUnavailable
from postfix_mtasts.cache.sqlite import (
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


def _make_real_database(path: Path, entries: int) -> None:
    conn = _db(path)
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
    conn.close()


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


@ensure_deferred
async def test_migrates_a_version_0_database(store_factory: SqliteFactory) -> None:
    store_factory.path.parent.mkdir()
    conn = _db(store_factory.path)
    conn.execute("CREATE TABLE unrelated (x)")
    conn.execute("INSERT INTO unrelated VALUES (7)")
    conn.close()
    store = await store_factory.open_store()
    await store.put(negative("example.com"))
    assert await store.get("example.com") == negative("example.com")
    conn = _db(store_factory.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("SELECT x FROM unrelated").fetchall() == [(7,)]
    conn.close()


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


# --- damaged files ---------------------------------------------------------------


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
async def test_garbage_file_is_moved_aside(
    store_factory: SqliteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    store_factory.path.parent.mkdir()
    garbage = bytes(range(256)) * 32
    store_factory.path.write_bytes(garbage)
    wal = Path(str(store_factory.path) + "-wal")
    wal.write_bytes(b"also garbage")
    moved = await _assert_moved_aside_and_empty(store_factory, caplog, garbage)
    assert [p.read_bytes() for p in moved if p.name.endswith("-wal")] == [b"also garbage"]


@ensure_deferred
async def test_truncated_database_is_moved_aside(
    store_factory: SqliteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    store_factory.path.parent.mkdir()
    _make_real_database(store_factory.path, 500)
    whole = store_factory.path.read_bytes()
    store_factory.path.write_bytes(whole[: len(whole) // 2])
    await _assert_moved_aside_and_empty(store_factory, caplog, whole[: len(whole) // 2])


@ensure_deferred
async def test_damaged_page_is_moved_aside(
    store_factory: SqliteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that opens but whose btree pages are scribbled over."""
    store_factory.path.parent.mkdir()
    _make_real_database(store_factory.path, 500)
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
