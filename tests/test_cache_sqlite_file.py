"""Whose the SQLite cache file is and who holds it (cache/sqlite_file.py): the
header read before SQLite touches the file, the lock file and the pid in it;
and the real daemon refusing, in one line and with the files left as they
were, a cache.path that is not its own or that another daemon holds, while
that other daemon goes on answering."""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts.cache.sqlite import MIGRATIONS
from postfix_mtasts.cache.sqlite_file import (
    LOCK_SUFFIX,
    DatabaseLock,
    Ownership,
    StoreError,
    examine,
)
from tests.support.daemon import (
    LOOPBACK,
    DaemonProcess,
    async_yield_fixture,
    ensure_deferred,
    first_listener,
    free_port,
    socketmap_lookup,
)
from tests.support.world import World

#: What a refused daemon must leave: these names, bytes and modification times.
Snapshot = dict[str, tuple[bytes, int]]


def snapshot(directory: Path) -> Snapshot:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def aged(path: Path) -> None:
    """Times in the past, so that any write would show in the mtime."""
    os.utime(path, (1_500_000_000, 1_500_000_000))


# --- the header -------------------------------------------------------------------------------


def test_nothing_at_the_path_is_ours_to_create(tmp_path: Path) -> None:
    assert examine(str(tmp_path / "cache.sqlite3"), MIGRATIONS) is Ownership.MISSING
    assert list(tmp_path.iterdir()) == []


def test_the_magic_without_a_whole_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    path.write_bytes(b"SQLite format 3\x00" + b"\x10\x00")
    with pytest.raises(StoreError, match="is too short to be an SQLite database"):
        examine(str(path), MIGRATIONS)


# --- the lock file --------------------------------------------------------------------------------


def test_the_lock_file_names_its_holder_and_refuses_a_second(tmp_path: Path) -> None:
    database = str(tmp_path / "cache.sqlite3")
    first, second = DatabaseLock(database), DatabaseLock(database)
    first.acquire()
    try:
        assert Path(database + LOCK_SUFFIX).read_text() == f"postfix-mtasts pid {os.getpid()}\n"
        with pytest.raises(StoreError) as caught:
            second.acquire()
        expected = f"cache file {database} is in use by another postfix-mtasts (pid {os.getpid()})"
        assert str(caught.value) == expected
        assert not second.held
    finally:
        first.release()
    second.acquire()
    assert second.held
    second.release()


def test_a_holder_that_has_not_written_its_pid_yet_is_unknown(tmp_path: Path) -> None:
    database = str(tmp_path / "cache.sqlite3")
    fd = os.open(database + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match=r"in use by another postfix-mtasts \(pid unknown\)$"):
            DatabaseLock(database).acquire()
    finally:
        os.close(fd)


def test_a_lock_file_made_by_another_program_is_left_untouched(tmp_path: Path) -> None:
    """shadow's lckpwdf writes a bare pid into /etc/passwd.lock, for one."""
    database = tmp_path / "cache.sqlite3"
    lock = Path(f"{database}{LOCK_SUFFIX}")
    lock.write_text("4242")
    aged(lock)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError) as caught:
        DatabaseLock(str(database)).acquire()
    assert str(caught.value).startswith(f"lock file {lock} was not made by postfix-mtasts; left untouched")
    assert snapshot(tmp_path) == before


# --- the real daemon --------------------------------------------------------------------------


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


@async_yield_fixture
async def world() -> AsyncIterator[World]:
    started = await World.start(reactor())
    try:
        yield started
    finally:
        await started.stop()


def foreign_database(path: Path) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO messages (body) VALUES (?)", [(f"hello {i}",) for i in range(50)])
    conn.close()


def copy_of_etc_passwd(path: Path) -> None:
    shutil.copy2("/etc/passwd", path)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("make", "what"),
    [
        (copy_of_etc_passwd, "is not an SQLite database"),
        (foreign_database, "is another program's SQLite database (tables: messages)"),
    ],
)
@ensure_deferred
async def test_the_daemon_refuses_a_cache_path_not_its_own_in_one_line(
    tmp_path: Path, world: World, make: Any, what: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cache = state / "cache.sqlite3"
    make(cache)
    aged(cache)
    before = snapshot(state)
    config_text = world.config_toml(
        socketmap=(f"inet:{LOOPBACK}:{free_port()}",), cache_backend="sqlite", cache_path=str(cache)
    )
    config = tmp_path / "daemon.toml"
    config.write_text(config_text)
    daemon = DaemonProcess(reactor(), config, first_listener(config_text))
    daemon.spawn()
    try:
        exited = await daemon.wait_exit()
    finally:
        await daemon.close()
    assert exited.code not in (0, None), exited
    lines = daemon.stderr_lines
    assert len(lines) == 1, daemon.stderr_text()
    assert "ERROR" in lines[0] and str(cache) in lines[0] and what in lines[0], lines[0]
    assert "left untouched" in lines[0] and "cache.path" in lines[0], lines[0]
    # Byte for byte and mtime as found; nothing moved aside or made beside it.
    assert snapshot(state) == before


@pytest.mark.integration
@ensure_deferred
async def test_a_second_daemon_on_one_cache_file_is_refused_naming_the_first(
    tmp_path: Path, world: World
) -> None:
    domain = "held.example"
    expected = ("OK", f"secure match=mx.{domain} servername=hostname")
    world.publish(domain, World.policy_text(mx=(f"mx.{domain}",)), "h1")
    cache = tmp_path / "cache.sqlite3"
    first_address = f"inet:{LOOPBACK}:{free_port()}"
    first = await DaemonProcess.start(
        reactor(),
        tmp_path,
        world.config_toml(socketmap=(first_address,), cache_backend="sqlite", cache_path=str(cache)),
        name="first",
    )
    try:
        assert await socketmap_lookup(reactor(), first_address, "postfix", domain) == expected
        second_text = world.config_toml(
            socketmap=(f"inet:{LOOPBACK}:{free_port()}",), cache_backend="sqlite", cache_path=str(cache)
        )
        second_config = tmp_path / "second.toml"
        second_config.write_text(second_text)
        second = DaemonProcess(reactor(), second_config, first_listener(second_text))
        second.spawn()
        try:
            exited = await second.wait_exit()
        finally:
            await second.close()
        assert exited.code not in (0, None), exited
        assert len(second.stderr_lines) == 1, second.stderr_text()
        line = second.stderr_lines[0]
        assert "ERROR" in line, line
        assert f"cache file {cache} is in use by another postfix-mtasts (pid {first.pid})" in line, line
        # The first never noticed: it answers, from its cache and anew.
        assert await socketmap_lookup(reactor(), first_address, "postfix", domain) == expected
        world.publish("later.example", World.policy_text(mx=("mx.later.example",)), "l1")
        assert await socketmap_lookup(reactor(), first_address, "postfix", "later.example") == (
            "OK",
            "secure match=mx.later.example servername=hostname",
        )
        assert world.https.requests[f"mta-sts.{domain}"] == 1
        await first.stop()
    finally:
        await first.close()
