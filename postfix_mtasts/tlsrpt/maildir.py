"""The daemon's Maildir watcher: store the reports of newly delivered mail.

New mail is what sits in ``new/`` (maildir(5)). Each message there is read,
its reports stored, and it is then marked read the way every mail reader
does: moved to ``cur/`` with the ``S`` (seen) flag. Nothing is rewritten or
deleted. A message without a readable report is logged and marked read too
(it will not get better); a store that cannot be written leaves the message
in ``new/`` for the next look. Synchronous: the daemon runs it on the report
store's own thread.
"""

from __future__ import annotations

import logging
import os

from postfix_mtasts.tlsrpt.ingest import Tally, ingest
from postfix_mtasts.tlsrpt.sources import MAX_INPUT_BYTES, Broken, read_bytes
from postfix_mtasts.tlsrpt.store import IReportStore

log = logging.getLogger("postfix_mtasts.tlsrpt.maildir")

#: maildir(5): what separates a message's unique name from its flags in ``cur/``.
INFO_SEPARATOR = ":2,"
SEEN_FLAG = "S"
#: Largest message read from the Maildir; a larger one is logged and marked read.
MAX_MESSAGE_BYTES = MAX_INPUT_BYTES


class MaildirError(Exception):
    """The Maildir itself cannot be used (missing, unreadable); one line."""


def ingest_maildir(store: IReportStore, path: str) -> Tally:
    """Store the reports of every message in ``path``/new, each then moved to
    ``cur/`` marked seen. Raises ReportStoreError (the message being read stays
    in new/) or MaildirError."""
    new = os.path.join(path, "new")
    cur = os.path.join(path, "cur")
    try:
        names = sorted(os.listdir(new))
    except OSError as e:
        raise MaildirError(f"Maildir {path}: cannot read {new}: {e.strerror or e}") from None
    tally = Tally()
    for name in names:
        if name.startswith("."):
            continue
        message = os.path.join(new, name)
        data = _read(message)
        if data is None:
            continue  # gone meanwhile: another reader took it
        if isinstance(data, Broken):
            tally.count_unreadable(data.source, data.reason)
        else:
            tally.add(ingest(store, read_bytes(message, data)))
        _mark_seen(message, os.path.join(cur, seen_name(name)))
    return tally


def seen_name(name: str) -> str:
    """The name of a message in ``cur/`` with the seen flag added to its info."""
    base, separator, flags = name.partition(INFO_SEPARATOR)
    if not separator:
        return f"{name}{INFO_SEPARATOR}{SEEN_FLAG}"
    if SEEN_FLAG in flags:
        return name
    return f"{base}{INFO_SEPARATOR}{''.join(sorted(flags + SEEN_FLAG))}"


def _read(path: str) -> bytes | Broken | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MESSAGE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        return Broken(path, f"cannot read: {e.strerror or e}")
    if len(data) > MAX_MESSAGE_BYTES:
        return Broken(path, f"larger than {MAX_MESSAGE_BYTES} bytes")
    return data


def _mark_seen(source: str, target: str) -> None:
    try:
        os.rename(source, target)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("Maildir: cannot move %s to %s (%s); it will be read again", source, target,
                    e.strerror or e)
