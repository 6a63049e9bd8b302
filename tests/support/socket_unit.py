"""A queue directory laid out as Debian's Postfix lays it out, and a unix
socket made in it as a systemd ``.socket`` unit makes it, for tests of
``systemd/postfix-mtasts-unix.socket`` (the checkout's or the installed one).

Usage::

    queue = debian_queue_directory()
    listener, path = socket_as_the_unit_makes_it(queue, unit_settings(UNIT))
    ... hand ``listener`` to the daemon (Launch(sockets=...)) ...
    result = await postmap_as(reactor, "postfix", queue, KEY, "socketmap:unix:private/mtasts:postfix")
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from tests.support.daemon import POSTMAP, CommandResult

#: Debian's queue_directory, under which the unit puts the socket.
QUEUE_DIRECTORY = "/var/spool/postfix"
RUNUSER = "/usr/sbin/runuser"
POSTFIX_USER = "postfix"


def unit_settings(path: Path) -> dict[str, str]:
    """The ``[Socket]`` settings of a .socket unit (each key once)."""
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def socket_as_the_unit_makes_it(queue: Path, settings: dict[str, str]) -> tuple[socket.socket, Path]:
    """What systemd does for the unit, under ``queue`` instead of the real
    queue directory: bind ListenStream=, chown SocketUser:SocketGroup, chmod
    SocketMode=, listen with Backlog=."""
    relative = os.path.relpath(settings["ListenStream"], QUEUE_DIRECTORY)
    assert not relative.startswith(".."), f"the unit's socket is outside {QUEUE_DIRECTORY}"
    path = queue / relative
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chown(path, pwd.getpwnam(settings["SocketUser"]).pw_uid, grp.getgrnam(settings["SocketGroup"]).gr_gid)
    os.chmod(path, int(settings["SocketMode"], 8))
    listener.listen(int(settings["Backlog"]))
    return listener, path


def debian_queue_directory() -> Path:
    """A queue directory as Debian's postfix makes it, as far as the socket
    matters: world-searchable, with ``private/`` owned by postfix, mode 0700;
    and a main.cf for ``postmap -c`` that names it."""
    # A unix socket path must stay under 108 bytes; pytest's tmp_path may not.
    queue = Path(tempfile.mkdtemp(prefix="mtasts-queue-"))
    queue.chmod(0o755)
    private = queue / "private"
    private.mkdir(mode=0o700)
    os.chown(private, pwd.getpwnam(POSTFIX_USER).pw_uid, 0)
    etc = queue / "etc"
    etc.mkdir(mode=0o755)
    main_cf = etc / "main.cf"
    main_cf.write_text(f"compatibility_level = 3.6\nqueue_directory = {queue}\n")
    main_cf.chmod(0o644)
    # Postfix programs pause on a main.cf modified a moment ago.
    an_hour_ago = time.time() - 3600
    os.utime(main_cf, (an_hour_ago, an_hour_ago))
    return queue


async def postmap_as(reactor: Any, user: str, queue: Path, key: str, table: str) -> CommandResult:
    """``postmap -q KEY TABLE`` as ``user``, from the queue directory."""
    args: Sequence[str] = ["-u", user, "--", POSTMAP, "-c", str(queue / "etc"), "-q", key, table]
    running: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(  # type: ignore[no-untyped-call]
        RUNUSER, args, env={"PATH": "/usr/sbin:/usr/bin:/bin"}, path=str(queue), reactor=reactor
    )
    out, err, code = await running
    return CommandResult(out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code)
