"""sd_notify without a library: real datagrams on a real AF_UNIX socket, the
watchdog interval rules of sd_watchdog_enabled(3), and the heartbeat on a Clock."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from postfix_mtasts.sdnotify import Notifier, Watchdog, watchdog_interval


class Listener:
    """A NOTIFY_SOCKET as systemd binds it: AF_UNIX, SOCK_DGRAM."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def messages(self) -> list[list[str]]:
        received: list[list[str]] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return received
            received.append(data.decode().split("\n"))


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Listener, str]]:
    path = str(tmp_path / "notify")
    bound = Listener(path)
    yield bound, path
    bound.sock.close()


def test_ready_status_stopping_reloading_arrive_as_datagrams(listener: tuple[Listener, str]) -> None:
    bound, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})

    assert notifier.enabled
    assert notifier.ready("3 policies cached,\n 10 lookups")
    assert notifier.reloading()
    assert notifier.stopping()
    assert notifier.status("idle")

    ready, reloading, stopping, status = bound.messages()
    # A status with a newline would end the message early: it is kept on one line.
    assert ready == ["READY=1", "STATUS=3 policies cached, 10 lookups"]
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=") and reloading[1].split("=")[1].isdigit()
    assert stopping == ["STOPPING=1"]
    assert status == ["STATUS=idle"]


def test_abstract_socket_names_are_supported() -> None:
    name = f"postfix-mtasts-test-{os.getpid()}"
    bound = Listener(b"\0" + name.encode())
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert bound.messages() == [["READY=1"]]
    finally:
        bound.sock.close()


@pytest.mark.parametrize("value", ["", "relative/path", "@"])
def test_without_a_usable_notify_socket_nothing_is_sent(value: str) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": value} if value else {})

    assert not notifier.enabled
    assert notifier.ready() is False


def test_a_vanished_notify_socket_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})

    assert notifier.watchdog() is False
    assert notifier.watchdog() is False

    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4243"}, None),  # another process's watchdog
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_watchdog_pings_from_the_clock_while_healthy(listener: tuple[Listener, str]) -> None:
    bound, path = listener
    clock = Clock()
    health = {"ok": True}
    dog = Watchdog(clock, Notifier({"NOTIFY_SOCKET": path}), 0.1, healthy=lambda: health["ok"],
                   status=lambda: "2 policies cached")

    dog.start()
    clock.advance(0.1)
    clock.advance(0.1)
    health["ok"] = False
    clock.advance(0.1)
    dog.stop()
    clock.advance(1.0)

    messages = bound.messages()
    assert messages[:3] == [["WATCHDOG=1", "STATUS=2 policies cached"]] * 3
    # Unhealthy: the status still goes out, the watchdog is not fed.
    assert messages[3:] == [["STATUS=2 policies cached"]]
    assert dog.pings == 3
    assert not dog.running
    assert clock.getDelayedCalls() == []


def test_status_only_heartbeat_never_feeds_a_watchdog(listener: tuple[Listener, str]) -> None:
    bound, path = listener
    clock = Clock()
    dog = Watchdog(clock, Notifier({"NOTIFY_SOCKET": path}), 30, status=lambda: "ok", feed=False)

    dog.start()
    clock.advance(30)
    dog.stop()

    assert bound.messages() == [["STATUS=ok"], ["STATUS=ok"]]
    assert dog.pings == 0
