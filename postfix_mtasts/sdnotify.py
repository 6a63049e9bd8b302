"""systemd's notify protocol (sd_notify(3)) without a library: one datagram per message.

The service tells systemd when it is ready, reloading or stopping, keeps the
watchdog fed from the reactor (so a hung reactor stops the pings and systemd
restarts it), and puts a short status line into ``systemctl status``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from twisted.internet.interfaces import IDelayedCall, IReactorTime

log = logging.getLogger("postfix_mtasts.sdnotify")

#: The variables systemd sets for a Type=notify service with a watchdog.
NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
#: Ping the watchdog this often, as a fraction of WatchdogSec (sd_watchdog_enabled(3)).
WATCHDOG_FRACTION = 0.5


def _socket_address(value: str) -> str | bytes | None:
    """The datagram address in NOTIFY_SOCKET: a path, or "@name" for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    return None


class Notifier:
    """Sends state changes to systemd; does nothing when not started by it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_name = env.get(NOTIFY_SOCKET, "")
        self.address = _socket_address(self.socket_name)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one message; True if systemd got it."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as e:
            if not self._warned:  # once: a missing notify socket would repeat every ping
                log.warning("cannot notify systemd at %s: %s", self.socket_name, e.strerror or e)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets newer systemd (Type=notify-reload) match the reload.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *_status(status))

    def status(self, status: str) -> bool:
        return self.send(*_status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _status(text: str) -> list[str]:
    return [f"STATUS={' '.join(text.split())}"] if text else []


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings, or None when systemd wants none from this process."""
    env = os.environ if environ is None else environ
    usec_text = env.get(WATCHDOG_USEC, "")
    if not usec_text.isdigit() or int(usec_text) == 0:
        return None
    pid_text = env.get(WATCHDOG_PID, "")
    if pid_text and pid_text != str(os.getpid() if pid is None else pid):
        return None  # meant for another process (a wrapper that exec'd us would have fixed it)
    return int(usec_text) / 1_000_000 * WATCHDOG_FRACTION


class Watchdog:
    """Every ``interval`` seconds, from the reactor: WATCHDOG=1 while ``healthy()``
    (if ``feed``), and the current ``status()`` line.

    The pings come from a reactor timer on purpose: if the reactor hangs, they
    stop, and systemd restarts the service after WatchdogSec.
    """

    def __init__(
        self,
        clock: IReactorTime,
        notifier: Notifier,
        interval: float,
        healthy: Callable[[], bool] = lambda: True,
        status: Callable[[], str] | None = None,
        feed: bool = True,
    ) -> None:
        self.clock = clock
        self.notifier = notifier
        self.interval = interval
        self.healthy = healthy
        self.status = status
        self.feed = feed
        self.pings = 0
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        self._tick()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    @property
    def running(self) -> bool:
        return self._call is not None and self._call.active()

    def _tick(self) -> None:
        try:
            lines = _status(self.status()) if self.status is not None else []
            if self.feed:
                if self.healthy():
                    lines.insert(0, "WATCHDOG=1")
                else:
                    log.warning("unhealthy: not feeding the systemd watchdog")
            if lines and self.notifier.send(*lines) and self.feed and lines[0] == "WATCHDOG=1":
                self.pings += 1
        finally:
            self._call = self.clock.callLater(self.interval, self._tick)
