"""The unix socket of ``systemd/postfix-mtasts-unix.socket`` with Debian's real
Postfix: the socket is made as the shipped unit says (its path under the queue
directory, ``SocketUser=``, ``SocketGroup=``, ``SocketMode=``) in a queue
directory laid out as Debian's (``private/`` is postfix's, mode 0700), and
handed to the daemon as systemd does (``LISTEN_FDS``, ``LISTEN_FDNAMES`` with
the unit's ``FileDescriptorName=``). ``postmap -q`` run as the postfix user
over ``socketmap:unix:private/mtasts:postfix``, the README's main.cf map, from
the queue directory (the working directory, and the chroot, of Postfix's
daemons) answers with the policy; a user outside Postfix cannot connect.

The daemon here runs as root, since the checkout's Python may not be readable
by anyone else; tests/test_debian_package.py runs the installed daemon as an
unprivileged user that cannot reach the path, as the service's dynamic user.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from tests.conftest import require
from tests.support.daemon import (
    POSTMAP,
    PROJECT_ROOT,
    CommandResult,
    DaemonProcess,
    Launch,
    async_yield_fixture,
    ensure_deferred,
)
from tests.support.world import World

pytestmark = [pytest.mark.integration, pytest.mark.postfix]

UNIT = Path(PROJECT_ROOT) / "systemd" / "postfix-mtasts-unix.socket"
#: Debian's queue_directory, under which the unit puts the socket.
QUEUE_DIRECTORY = "/var/spool/postfix"
RUNUSER = "/usr/sbin/runuser"
POSTFIX_USER = "postfix"
#: Anyone else on the machine.
OTHER_USER = "nobody"
ENFORCE = "enforce.example"
ENFORCE_ANSWER = "secure match=mx1.enforce.example servername=hostname"


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


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


async def postmap_as(user: str, queue: Path, key: str, table: str) -> CommandResult:
    """``postmap -q KEY TABLE`` as ``user``, from the queue directory."""
    args: Sequence[str] = ["-u", user, "--", POSTMAP, "-c", str(queue / "etc"), "-q", key, table]
    running: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(  # type: ignore[no-untyped-call]
        RUNUSER, args, env={"PATH": "/usr/sbin:/usr/bin:/bin"}, path=str(queue), reactor=reactor()
    )
    out, err, code = await running
    return CommandResult(out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code)


@dataclass
class Setup:
    world: World
    daemon: DaemonProcess
    queue: Path
    socket_path: Path


@pytest.fixture
def machine() -> None:
    """Skip (under CI: fail) without what the test drives: Debian's Postfix,
    runuser, and root to make the socket postfix's and to switch users."""
    require("Debian's postfix (postmap)", shutil.which("postmap") is not None)
    require("runuser (util-linux)", os.path.exists(RUNUSER))
    require("root (to create the socket as systemd does)", os.geteuid() == 0)


@async_yield_fixture
async def setup(tmp_path: Path, machine: None) -> AsyncIterator[Setup]:
    settings = unit_settings(UNIT)
    world = await World.start(reactor())
    world.publish(ENFORCE, World.policy_text(mode="enforce", mx=("mx1.enforce.example",)), "e1")
    queue = debian_queue_directory()
    listener, path = socket_as_the_unit_makes_it(queue, settings)
    config = world.config_toml(socketmap=(f"systemd:{settings['FileDescriptorName']}",))
    launch = Launch(sockets=[(settings["FileDescriptorName"], listener)], probe=("unix", str(path)))
    try:
        daemon = await DaemonProcess.start(reactor(), tmp_path, config, launch=launch)
        # systemd keeps its copy; the test's is no longer needed once the child has one.
        listener.close()
        try:
            yield Setup(world, daemon, queue, path)
            await daemon.stop()
        finally:
            await daemon.close()
        assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()
    finally:
        listener.close()
        await world.stop()
        shutil.rmtree(queue, ignore_errors=True)


@ensure_deferred
async def test_postfix_reaches_the_daemon_through_the_units_socket(setup: Setup) -> None:
    result = await postmap_as(POSTFIX_USER, setup.queue, ENFORCE, "socketmap:unix:private/mtasts:postfix")

    assert (result.code, result.stdout, result.stderr) == (0, ENFORCE_ANSWER + "\n", "")
    assert setup.world.https.requests[f"mta-sts.{ENFORCE}"] == 1
    assert "systemd:socketmap-unix" in setup.daemon.stderr_text()


@ensure_deferred
async def test_the_socket_keeps_the_units_owner_and_mode(setup: Setup) -> None:
    await postmap_as(POSTFIX_USER, setup.queue, ENFORCE, "socketmap:unix:private/mtasts:postfix")
    settings = unit_settings(UNIT)

    status = os.stat(setup.socket_path)
    assert pwd.getpwuid(status.st_uid).pw_name == settings["SocketUser"]
    assert grp.getgrgid(status.st_gid).gr_name == settings["SocketGroup"]
    assert status.st_mode & 0o7777 == int(settings["SocketMode"], 8)


@ensure_deferred
async def test_a_user_outside_postfix_cannot_connect(setup: Setup) -> None:
    result = await postmap_as(OTHER_USER, setup.queue, ENFORCE, f"socketmap:unix:{setup.socket_path}:postfix")

    assert result.code != 0 and result.stdout == ""
    assert "Permission denied" in result.stderr, result.stderr
    assert f"mta-sts.{ENFORCE}" not in setup.world.https.requests
