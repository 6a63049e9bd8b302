"""Where log lines go: stderr, the journal, or syslog's mail facility.

Under systemd (``JOURNAL_STREAM`` set) lines carry no timestamp, because
journald adds its own; on a terminal they do. Twisted's own log events are
routed into the same stdlib handlers so there is one stream to read.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from twisted.logger import LogLevel, STDLibLogObserver, globalLogBeginner

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Order of -q / default / -v adjustments around the configured level.
_LADDER = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]

SYSLOG_SOCKET = "/dev/log"


def adjust_level(level: int, verbosity: int) -> int:
    """Move ``level`` down the ladder for each -v, up for each -q."""
    index = _LADDER.index(level) if level in _LADDER else 1
    index = min(max(index - verbosity, 0), len(_LADDER) - 1)
    return _LADDER[index]


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def configure(level: int, syslog: bool = False) -> None:
    """Install one handler on the root logger; safe to call again on reload."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler: logging.Handler
    if syslog:
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.setFormatter(logging.Formatter("postfix-mtasts[%(process)d]: %(message)s"))
    elif under_systemd():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
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

    def filtered(event: dict[str, object]) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn or event.get("isError"):
            observer(event)

    globalLogBeginner.beginLoggingTo([filtered], redirectStandardIO=False, discardBuffer=True)
