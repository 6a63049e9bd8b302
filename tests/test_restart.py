"""Nothing learnt is lost on restart (issue 3): the real daemon, stopped cleanly
or killed with SIGKILL, comes back on the same SQLite file and answers every
policy it had answered, with DNS and HTTPS broken; a corrupt file is kept
aside and the daemon starts clean."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import LOOPBACK, DaemonProcess, ensure_deferred, free_port, socketmap_lookup

pytestmark = pytest.mark.integration

#: Bytes written over the database file; not an SQLite header.
GARBAGE = bytes(range(256)) * 32


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def listen_toml(socketmap_port: int, database: Path) -> str:
    return (
        f'[listen]\nsocketmap = ["inet:{LOOPBACK}:{socketmap_port}"]\n'
        f'[cache]\nbackend = "sqlite"\npath = "{database}"\n'
    )


@ensure_deferred
async def test_a_corrupt_database_is_kept_aside_and_the_daemon_starts_clean(tmp_path: Path) -> None:
    database = tmp_path / "cache.db"
    port = free_port()
    first = await DaemonProcess.start(reactor(), tmp_path, listen_toml(port, database), name="first")
    await first.stop()
    assert database.exists()
    database.write_bytes(GARBAGE)

    second = await DaemonProcess.start(reactor(), tmp_path, listen_toml(port, database), name="second")
    try:
        status, _ = await socketmap_lookup(reactor(), f"inet:{LOOPBACK}:{port}", "postfix", "[192.0.2.1]")
        assert status == "NOTFOUND"
    finally:
        await second.stop()

    about_it = [line for line in second.stderr_lines if "corrupt" in line]
    assert len(about_it) == 1, second.stderr_text()
    assert str(database) in about_it[0]
    assert "Traceback" not in second.stderr_text()
    aside = sorted(name for name in os.listdir(tmp_path) if name.startswith("cache.db.corrupt-"))
    assert aside, os.listdir(tmp_path)
    assert (tmp_path / aside[0]).read_bytes() == GARBAGE
    assert aside[0] in about_it[0]
    # The new file is a working database again.
    assert database.read_bytes()[:16] == b"SQLite format 3\x00"
    assert any("0 entries loaded" in line for line in second.stderr_lines), second.stderr_text()
