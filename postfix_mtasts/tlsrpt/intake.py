"""The daemon's report intake: the report store, and the mailboxes read into it.

:class:`ReportIntake` opens the report store (on a thread of its own) and,
every ``[reports] poll_interval`` seconds, looks at the Maildir
(``[reports] maildir``) and the IMAP folder (``[reports.imap]``), each look
ending before the next begins. A look that fails (server down, store not
writable) is logged as one line and tried again at the next interval; the
mail it could not store stays where it was. ``store`` is there for whatever
else in the daemon reads the reports.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from postfix_mtasts import limits
from postfix_mtasts.config import ReportsConfig
from postfix_mtasts.tlsrpt.imap import ImapError, ingest_imap, read_password
from postfix_mtasts.tlsrpt.ingest import Tally
from postfix_mtasts.tlsrpt.maildir import MaildirError, ingest_maildir
from postfix_mtasts.tlsrpt.store import IReportStore, ReportStoreError, open_store
from postfix_mtasts.tlsrpt.store.threaded import ThreadedReportStore

log = logging.getLogger("postfix_mtasts.tlsrpt.intake")


def wanted(config: ReportsConfig) -> bool:
    """Whether the daemon has mailboxes to read reports from."""
    return bool(config.maildir) or config.imap is not None


class ReportIntake:
    """Open with :meth:`start`, close with :meth:`stop`; ``store`` in between."""

    def __init__(self, reactor: Any, config: ReportsConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.store = ThreadedReportStore(reactor, lambda: _open(config))
        self._loop: LoopingCall | None = None
        self._looking: Deferred[None] | None = None
        #: What the looks stored, all added up (for logs and tests).
        self.tally = Tally()
        self.looks = 0

    async def start(self) -> None:
        """Open the store and begin looking; raises ReportStoreError (one line)
        or ImapError for a password file that cannot be read."""
        if self.config.imap is not None:
            read_password(self.config.imap.password_file)
        await self.store.open()
        log.info("report store %s open%s", self.store.location, self._watching())
        if wanted(self.config):
            loop = LoopingCall(self._look_now)
            loop.clock = self.reactor
            self._loop = loop
            loop.start(self.config.poll_interval, now=True)

    async def stop(self) -> None:
        """Stop looking, let a look under way finish, close the store."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._looking is not None:
            await self._looking
        await self.store.close()

    def _look_now(self) -> Deferred[None]:
        looking = Deferred.fromCoroutine(self.look())
        self._looking = looking
        return looking

    async def look(self) -> None:
        """One look at each mailbox; never raises."""
        if self.config.maildir:
            await self._guarded("Maildir " + self.config.maildir, self._look_maildir())
        if self.config.imap is not None:
            look = Deferred.fromCoroutine(ingest_imap(self.reactor, self.config.imap, self.store))
            look.addTimeout(limits.REPORTS_IMAP_TIMEOUT, self.reactor)
            await self._guarded(f"IMAP {self.config.imap.host}", look)
        self.looks += 1

    async def _look_maildir(self) -> Tally:
        path = self.config.maildir

        def job(store: IReportStore) -> Tally:
            return ingest_maildir(store, path)

        return await self.store.run(job)

    async def _guarded(self, what: str, work: Any) -> None:
        try:
            tally: Tally = await work
        except (ReportStoreError, MaildirError, ImapError) as e:
            log.error("%s; will look again in %g s", e, self.config.poll_interval)
            return
        except Exception as e:
            log.error("%s: %s; will look again in %g s", what, " ".join(str(e).split()) or type(e).__name__,
                      self.config.poll_interval)
            return
        self.tally.add(tally)
        if tally.new or tally.already_stored or tally.unreadable:
            log.info("%s: %s", what, tally.line())

    def _watching(self) -> str:
        places = [f"Maildir {self.config.maildir}"] if self.config.maildir else []
        if self.config.imap is not None:
            places.append(f"IMAP {self.config.imap.host} folder {self.config.imap.folder}")
        return f"; reading reports from {' and '.join(places)}" if places else ""


def _open(config: ReportsConfig) -> IReportStore:
    return open_store(config)
