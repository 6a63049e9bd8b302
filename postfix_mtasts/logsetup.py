"""Where log lines go: stderr, the journal, or syslog's mail facility.

Under systemd (``JOURNAL_STREAM`` or ``INVOCATION_ID`` set) lines carry no
timestamp, because journald adds its own, and start with the ``<N>`` syslog
priority prefix journald reads (sd-daemon(3)), so ``journalctl -p warning``
works; on a terminal they carry a timestamp. Twisted's own log events are
routed into the same stdlib handlers so there is one stream to read.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import cast

from twisted.logger import ILogObserver, LogLevel, STDLibLogObserver, globalLogBeginner

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Order of -q / default / -v adjustments around the configured level.
_LADDER = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]

SYSLOG_SOCKET = "/dev/log"

#: syslog priorities of the stdlib levels, for journald's "<N>" line prefix.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class LogSetupError(Exception):
    """Logging cannot go where the configuration says; one line for the admin."""


class JournalFormatter(logging.Formatter):
    """``<priority>LEVEL message``: journald strips the prefix and keeps the priority."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        # Each line of a multi-line record (a traceback) keeps the priority.
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def check(syslog: bool) -> None:
    """Raise LogSetupError if logging as configured cannot work on this machine."""
    if syslog and not os.path.exists(SYSLOG_SOCKET):
        raise LogSetupError(
            f"log.syslog = true but {SYSLOG_SOCKET} does not exist (is a syslog daemon running?)"
        )


def adjust_level(level: int, verbosity: int) -> int:
    """Move ``level`` down the ladder for each -v, up for each -q."""
    index = _LADDER.index(level) if level in _LADDER else 1
    index = min(max(index - verbosity, 0), len(_LADDER) - 1)
    return _LADDER[index]


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def configure(level: int, syslog: bool = False) -> None:
    """Install one handler on the root logger; safe to call again on reload.

    Raises LogSetupError (and changes nothing) if syslog is asked for but unreachable.
    """
    handler: logging.Handler
    if syslog:
        check(syslog)
        try:
            handler = logging.handlers.SysLogHandler(
                address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
            )
        except OSError as e:
            raise LogSetupError(
                f"log.syslog = true but {SYSLOG_SOCKET} refuses messages: {e.strerror}"
            ) from e
        handler.setFormatter(logging.Formatter("postfix-mtasts[%(process)d]: %(message)s"))
    elif under_systemd():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # Twisted's chatter ("Starting factory ...") is not for mail admins.
    logging.getLogger("twisted").setLevel(max(level, logging.WARNING))


_twisted_routed = False


def route_twisted_logs() -> None:
    """Send Twisted's log events (unhandled errors above all) to stdlib logging."""
    global _twisted_routed
    if _twisted_routed:
        return
    _twisted_routed = True
    observer = STDLibLogObserver(name="twisted")

    # Info-level chatter is dropped; running out of descriptors on accept is
    # reported by the listeners themselves (listening.AcceptGuard).
    def filtered(event: dict[str, object]) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn or event.get("isError"):
            observer(event)

    globalLogBeginner.beginLoggingTo(
        [cast(ILogObserver, filtered)], redirectStandardIO=False, discardBuffer=True
    )
