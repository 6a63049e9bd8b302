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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support.daemon import PROJECT_ROOT, DaemonProcess, Launch, async_yield_fixture, ensure_deferred
from tests.support.socket_unit import (
    POSTFIX_USER,
    RUNUSER,
    debian_queue_directory,
    postmap_as,
    socket_as_the_unit_makes_it,
    unit_settings,
)
from tests.support.world import World

pytestmark = [pytest.mark.integration, pytest.mark.postfix]

UNIT = Path(PROJECT_ROOT) / "systemd" / "postfix-mtasts-unix.socket"
#: The README's main.cf map: relative to the queue directory.
POSTFIX_MAP = "socketmap:unix:private/mtasts:postfix"
#: Anyone else on the machine.
OTHER_USER = "nobody"
ENFORCE = "enforce.example"
ENFORCE_ANSWER = "secure match=mx1.enforce.example servername=hostname"


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


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
    launch = Launch(sockets=[(settings["FileDescriptorName"], listener)])
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
    result = await postmap_as(reactor(), POSTFIX_USER, setup.queue, ENFORCE, POSTFIX_MAP)

    assert (result.code, result.stdout, result.stderr) == (0, ENFORCE_ANSWER + "\n", "")
    assert setup.world.https.requests[f"mta-sts.{ENFORCE}"] == 1
    assert "systemd:socketmap-unix" in setup.daemon.stderr_text()


@ensure_deferred
async def test_the_socket_keeps_the_units_owner_and_mode(setup: Setup) -> None:
    await postmap_as(reactor(), POSTFIX_USER, setup.queue, ENFORCE, POSTFIX_MAP)
    settings = unit_settings(UNIT)

    status = os.stat(setup.socket_path)
    assert pwd.getpwuid(status.st_uid).pw_name == settings["SocketUser"]
    assert grp.getgrgid(status.st_gid).gr_name == settings["SocketGroup"]
    assert status.st_mode & 0o7777 == int(settings["SocketMode"], 8)


@ensure_deferred
async def test_a_user_outside_postfix_cannot_connect(setup: Setup) -> None:
    table = f"socketmap:unix:{setup.socket_path}:postfix"
    result = await postmap_as(reactor(), OTHER_USER, setup.queue, ENFORCE, table)

    assert result.code != 0 and result.stdout == ""
    assert "Permission denied" in result.stderr, result.stderr
    assert f"mta-sts.{ENFORCE}" not in setup.world.https.requests
