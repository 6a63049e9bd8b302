"""How the listeners take a storm of connections: the listen backlog, and
running out of descriptors.

After ``postfix reload`` every smtp process connects at once (100 by
default, 500-2000 on big sites). The kernel queues connections the daemon
has not accepted yet up to the listen backlog and drops the SYNs beyond it;
the clients retry after 1, 3, 7 s. So the backlog defaults to the largest
the kernel allows (``net.core.somaxconn``).

When the process runs out of descriptors, Twisted's accept loop (tcp.Port,
which unix ports share) gives up a reserved descriptor, accepts and closes the
waiting connections with it, and reports each at info level, once per
connection: the clients are refused at once and the open connections keep
being served. Only if that reserve is gone too (another thread took the
freed slot) does it just report the failure and leave the connection
waiting, and the listener, still readable, comes back on every loop turn.
:class:`AcceptGuard` listens on each port's logger instead: it logs one
warning when a burst of failures begins and one line, with the count
refused, once connections are accepted again and no failure follows for a
while; a listener that would come back on every turn pauses for a moment.
"""

from __future__ import annotations

import errno
import logging
import resource
from typing import Any, cast

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger

from postfix_mtasts import limits

log = logging.getLogger("postfix_mtasts.service")

#: Where Linux publishes the cap it puts on every listen backlog.
SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"


def kernel_backlog_limit(path: str = SOMAXCONN_PATH) -> int | None:
    """net.core.somaxconn, or None where it cannot be read (not Linux)."""
    try:
        with open(path) as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return value if value > 0 else None


def listen_backlog(configured: int, kernel_limit: int | None) -> int:
    """The backlog to ask ``listen()`` for: the configured one, else (0) the kernel's largest."""
    if configured:
        return configured
    return kernel_limit if kernel_limit is not None else limits.LISTEN_BACKLOG_DEFAULT


def backlog_capped(configured: int, kernel_limit: int | None) -> str | None:
    """One line for the log when the kernel will give less than ``listen.backlog`` asks; else None."""
    if not configured or kernel_limit is None or configured <= kernel_limit:
        return None
    return (
        f"listen.backlog = {configured} but the kernel caps every backlog at {kernel_limit} "
        f"(net.core.somaxconn); raise it with: sysctl -w net.core.somaxconn={configured}"
    )


#: How Twisted's accept loop words its reports (twisted.internet.tcp._accept).
_RESERVE_RELEASED = "EMFILE encountered"
_REFUSED_ONE = "EMFILE recovery: Closed socket"
_ACCEPT_FAILED = "Could not accept new connection ({acceptError})"
#: Accept errors that mean "no descriptor left": the process's or the system's.
_DESCRIPTOR_ERRORS = (errno.errorcode[errno.EMFILE], errno.errorcode[errno.ENFILE])
#: Accept errors that are one client's (it gave up before we accepted): no pause.
_CLIENT_ERRORS = (errno.errorcode[errno.ECONNABORTED],)


def descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class AcceptGuard:
    """Watches the accept loops of the daemon's listening ports.

    A port that cannot accept and refuses nothing (no reserved descriptor
    left, no kernel memory) stops reading for ``pause`` seconds instead of
    spinning; when Twisted refuses the waiting connections itself it does
    not spin, and the port reads on. A burst of failures is
    logged once when it begins and once when it is over: connections have
    been accepted (:meth:`accepted`) for ``quiet`` seconds without a new
    failure. That line says how many connections Twisted refused meanwhile.
    """

    def __init__(
        self,
        clock: IReactorTime,
        pause: float = limits.ACCEPT_PAUSE,
        quiet: float = limits.ACCEPT_BURST_QUIET,
    ) -> None:
        self.clock = clock
        self.pause = pause
        self.quiet = quiet
        #: When the current burst began and last failed (clock seconds), or None outside one.
        self.burst_started: float | None = None
        self.last_failure = 0.0
        #: Connections Twisted accepted and closed to make room, this burst.
        self.refused = 0
        #: Bursts seen since start (for tests and the curious).
        self.bursts = 0
        self._paused: set[int] = set()
        self._end_check: Any = None

    def watch(self, port: Any) -> None:
        """Route ``port``'s accept-loop reports through this guard.

        Twisted's ports log through a ``_logger`` class attribute; an instance
        attribute of the same name takes its place for this port only. Ports
        without one (or without reading to pause) are left alone.
        """
        original = getattr(port, "_logger", None)
        if not isinstance(original, Logger) or not hasattr(port, "stopReading"):
            return
        forward = original.observer

        def observe(event: dict[str, Any]) -> None:
            if not self._accept_event(port, event):
                forward(event)

        port._logger = Logger(namespace=original.namespace, source=port, observer=cast(ILogObserver, observe))

    def accepted(self) -> None:
        """A connection was accepted: a burst of failures, if any, may be over."""
        if self.burst_started is None or self._end_check is not None:
            return
        self._end_check = self.clock.callLater(self.quiet, self._end_burst)

    def _end_burst(self) -> None:
        self._end_check = None
        if self.burst_started is None:
            return
        quiet_for = self.clock.seconds() - self.last_failure
        if quiet_for < self.quiet:
            # Failed again since: look again once it has been quiet long enough.
            self._end_check = self.clock.callLater(self.quiet - quiet_for, self._end_burst)
            return
        log.warning(
            "accepting connections again: %d refused since the first failure %.1fs ago",
            self.refused,
            self.clock.seconds() - self.burst_started,
        )
        self.burst_started = None
        self.refused = 0

    def stop(self) -> None:
        """Cancel what is scheduled (the daemon stops; its ports are closed)."""
        if self._end_check is not None and self._end_check.active():
            self._end_check.cancel()
        self._end_check = None

    def _accept_event(self, port: Any, event: dict[str, Any]) -> bool:
        """Handle one event of ``port``'s accept loop; False if it is not about accepting."""
        text = str(event.get("log_format") or "")
        if text.startswith(_REFUSED_ONE):
            self.refused += 1
            return True
        if text.startswith(_RESERVE_RELEASED):
            self._failed("out of file descriptors")
            return True
        if text == _ACCEPT_FAILED:
            error = str(event.get("acceptError"))
            if error not in _CLIENT_ERRORS:
                why = "out of file descriptors" if error in _DESCRIPTOR_ERRORS else f"cannot accept ({error})"
                self._failed(why)
                self._pause(port)
            return True
        return text.startswith("Re-reserving EMFILE")

    def _failed(self, why: str) -> None:
        self.last_failure = self.clock.seconds()
        if self.burst_started is None:
            self.burst_started = self.last_failure
            self.bursts += 1
            log.warning(
                "%s (limit %d): new connections are refused until some close; existing ones "
                "are still answered; raise LimitNOFILE= (or ulimit -n)",
                why,
                descriptor_limit(),
            )

    def _pause(self, port: Any) -> None:
        if id(port) in self._paused:
            return
        port.stopReading()
        self._paused.add(id(port))
        self.clock.callLater(self.pause, self._resume, port)

    def _resume(self, port: Any) -> None:
        self._paused.discard(id(port))
        # A port closed meanwhile (reload, shutdown) stays closed.
        if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
            port.startReading()
