"""The daemon's report intake: the mailboxes read into the report store.

Every ``[reports] poll_interval`` seconds :class:`ReportIntake` looks at the
Maildir (``[reports] maildir``) and the IMAP folder (``[reports.imap]``) and
stores the reports of new mail in the daemon's open report store, each look
ending before the next begins. A look that fails (server down, store not
writable) is logged as one line and tried again at the next interval; the
mail it could not store stays where it was. The store is the service's (it
opens and closes it; the report watch reads from it too).
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
from postfix_mtasts.tlsrpt.store import IReportStore, ReportStoreError
from postfix_mtasts.tlsrpt.store.threaded import ThreadedReportStore

log = logging.getLogger("postfix_mtasts.tlsrpt.intake")


def wanted(config: ReportsConfig) -> bool:
    """Whether the daemon has mailboxes to read reports from."""
    return bool(config.maildir) or config.imap is not None


class ReportIntake:
    """Looks from :meth:`start` to :meth:`stop` into ``store``, already open."""

    def __init__(self, reactor: Any, store: ThreadedReportStore, config: ReportsConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.store = store
        self._loop: LoopingCall | None = None
        self._looking: Deferred[None] | None = None
        #: What the looks stored, all added up (for logs and tests).
        self.tally = Tally()
        self.looks = 0

    def start(self) -> None:
        """Begin looking, the first look at once; raises ImapError (one line)
        for a password file that cannot be read."""
        if self.config.imap is not None:
            read_password(self.config.imap.password_file)
        log.info("reading TLS reports from %s into %s", self._watching(), self.store.location)
        if wanted(self.config):
            loop = LoopingCall(self._look_now)
            loop.clock = self.reactor
            self._loop = loop
            loop.start(self.config.poll_interval, now=True)

    async def stop(self) -> None:
        """Stop looking and let a look under way finish (the store stays open)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._looking is not None:
            await self._looking

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
        return " and ".join(places) or "no mailbox"
