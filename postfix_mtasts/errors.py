"""Errors the daemon reports, and how.

Expected failures (bad input, unreachable servers, a start-up or reload that
cannot be done) are one plain line; :func:`log_failure` is only for bugs, so
the traceback is wanted.
"""

from __future__ import annotations

import logging

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure


class StartupError(Exception):
    """The daemon cannot start; ``str(e)`` is one line for the admin."""


class ReloadRefused(Exception):
    """A new configuration was not applied; ``str(e)`` is one line for the admin."""


def log_failure(logger: logging.Logger, what: str, failure: Failure) -> None:
    """Log ``failure`` under ``what`` with its traceback."""
    value = failure.value
    traceback = failure.getTracebackObject()  # type: ignore[no-untyped-call]
    if isinstance(value, BaseException):
        logger.error("%s: %s", what, failure.getErrorMessage(), exc_info=(type(value), value, traceback))
    else:
        logger.error("%s: %s", what, failure.getErrorMessage())


def one_line(error: BaseException) -> str:
    """``error`` as one log line: its text with white space folded, or its type."""
    return " ".join(str(error).split()) or type(error).__name__


def is_cancellation(failure: Failure) -> bool:
    """True when ``failure`` is only a cancelled Deferred."""
    return isinstance(failure.value, CancelledError)
