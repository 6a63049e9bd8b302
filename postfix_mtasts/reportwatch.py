"""The daemon's eye on the report store: figures for /reports and /metrics, and alerts.

Every ``interval`` seconds (and before each dashboard page) :class:`ReportWatch`
takes a :class:`Snapshot` of the store (read again only when its report count
changed), feeds :func:`~postfix_mtasts.tlsrpt.alerts.decide` and acts on the
events: one log line each, the alert gauges, and optionally one short mail
through the local ``sendmail``. Time comes from the reactor passed in, so a
``task.Clock`` drives it in tests.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from postfix_mtasts import limits
from postfix_mtasts.config import ReportsConfig
from postfix_mtasts.tlsrpt.alerts import (
    AlertSettings,
    AlertState,
    DomainAlert,
    DomainCleared,
    Event,
    Observation,
    ReporterBack,
    ReporterSilent,
    alert_mail,
    decide,
    describe,
    is_warning,
    printable,
)
from postfix_mtasts.tlsrpt.model import Report
from postfix_mtasts.tlsrpt.series import (
    DASHBOARD_DAYS,
    SessionKey,
    newest_reports,
    session_totals,
    window_sessions,
)

log = logging.getLogger("postfix_mtasts.reports")

#: PATH of the sendmail process (Postfix's sendmail runs postdrop from its own directory).
SENDMAIL_SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class ReportReader(Protocol):
    """What the watch needs of the store (a ``ThreadedReportStore``)."""

    async def reports(self, since: datetime | None = None, domain: str | None = None) -> list[Report]: ...

    async def count(self) -> int: ...


@dataclass(frozen=True)
class Snapshot:
    """The store as last read: recent reports for the dashboard and the alert window, and
    all-time figures for the metrics."""

    taken: datetime
    count: int = 0
    recent: tuple[Report, ...] = ()
    totals: dict[SessionKey, int] = field(default_factory=dict)
    newest: dict[str, datetime] = field(default_factory=dict)


def alert_settings(config: ReportsConfig) -> AlertSettings:
    """The typed thresholds from ``[reports]``."""
    return AlertSettings(
        ratio=config.alert_ratio,
        window=timedelta(seconds=config.alert_window),
        min_sessions=config.alert_min_sessions,
        silence_days=config.reporter_silence_days,
    )


class ReportWatch:
    """Reads the store now and then, keeps the figures, raises and clears alerts."""

    def __init__(self, reactor: Any, store: ReportReader, config: ReportsConfig,
                 interval: float = limits.REPORTS_WATCH_INTERVAL, host: str | None = None) -> None:
        self.reactor = reactor
        self.store = store
        self.config = config
        self.settings = alert_settings(config)
        self.interval = interval
        self.host = host or socket.gethostname()  # getfqdn() may wait for DNS; this never does
        self.state = AlertState()
        #: The figures the last decision saw (window sessions per domain), for the gauges.
        self.observation = Observation(self.now(), {}, {})
        #: The events that opened each open alert, for the dashboard and the gauges.
        self.open_domains: dict[str, Event] = {}
        self.open_reporters: dict[str, Event] = {}
        self.snapshot = Snapshot(taken=self.now())
        self.mails_sent = 0
        self.mail_failures = 0
        self._loop: LoopingCall | None = None
        self._loaded = False
        self._refreshing = False
        self._waiting: list[Deferred[Snapshot]] = []
        self._mailing: list[Deferred[None]] = []

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.reactor.seconds(), UTC)

    def start(self) -> None:
        """Look now, then every ``interval`` seconds."""
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.check()))
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True).addErrback(self._loop_failed)

    async def stop(self) -> None:
        """Stop looking; wait for a mail being handed to sendmail."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        await self.mail_done()

    async def mail_done(self) -> None:
        """Wait until every alert mail started so far was taken by sendmail (or failed)."""
        for pending in list(self._mailing):
            await pending

    def _loop_failed(self, failure: Failure) -> None:
        log.error("TLS report watch stopped: %s", failure.getErrorMessage())

    async def check(self) -> list[Event]:
        """Read the store (if it changed) and act on what the figures now say."""
        try:
            snapshot = await self.refresh()
        except Exception as e:  # the store is down: keep the last figures and try again later
            log.warning("TLS report watch: cannot read the report store: %s", _one_line(e))
            return []
        return self.evaluate(snapshot)

    async def refresh(self) -> Snapshot:
        """The store's current figures; one read at a time, and none when its count is unchanged."""
        if self._refreshing:
            waiter: Deferred[Snapshot] = Deferred()
            self._waiting.append(waiter)
            return await waiter
        self._refreshing = True
        try:
            return await self._read()
        finally:
            self._refreshing = False
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(self.snapshot)

    async def _read(self) -> Snapshot:
        now = self.now()
        count = await self.store.count()
        if self._loaded and count == self.snapshot.count:
            self.snapshot = replace(self.snapshot, taken=now)
            return self.snapshot
        everything = await self.store.reports()
        self._loaded = True
        keep_after = now - max(timedelta(days=DASHBOARD_DAYS + 1), self.settings.window)
        self.snapshot = Snapshot(
            taken=now,
            count=count,
            recent=tuple(r for r in everything if r.end > keep_after),
            totals=session_totals(everything),
            newest=newest_reports(everything),
        )
        return self.snapshot

    def evaluate(self, snapshot: Snapshot) -> list[Event]:
        """Decide on ``snapshot`` at the reactor's time and act on the events."""
        now = self.now()
        seen = Observation(now, window_sessions(snapshot.recent, now - self.settings.window, now),
                           snapshot.newest)
        self.observation = seen
        self.state, events = decide(self.settings, self.state, seen)
        for event in events:
            self._record(event)
            line = describe(event, self.settings)
            if is_warning(event):
                log.warning("%s", line)
            else:
                log.info("%s", line)
        if events and self.config.alert_mail_to:
            self._mailing.append(self._send(events))
        return events

    def _record(self, event: Event) -> None:
        if isinstance(event, DomainAlert):
            self.open_domains[event.domain] = event
        elif isinstance(event, DomainCleared):
            self.open_domains.pop(event.domain, None)
        elif isinstance(event, ReporterSilent):
            self.open_reporters[event.reporter] = event
        elif isinstance(event, ReporterBack):
            self.open_reporters.pop(event.reporter, None)

    def banner(self) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
        """Open alerts as (name, line) pairs, for the dashboard."""
        def lines(events: dict[str, Event]) -> tuple[tuple[str, str], ...]:
            return tuple((name, describe(e, self.settings)) for name, e in sorted(events.items()))

        return lines(self.open_domains), lines(self.open_reporters)

    # --- mail --------------------------------------------------------------------

    def _send(self, events: Sequence[Event]) -> Deferred[None]:
        to = self.config.alert_mail_to
        message = alert_mail(to, list(events), self.settings, self.host)
        protocol = _SendmailProtocol(message)
        argv = [self.config.sendmail_path, "-i", "--", to]
        try:
            self.reactor.spawnProcess(protocol, argv[0], argv, env={"PATH": SENDMAIL_SEARCH_PATH})
        except OSError as e:
            protocol.ended.errback(Failure(e))  # type: ignore[no-untyped-call]
        else:
            deadline = self.reactor.callLater(limits.SENDMAIL_TIMEOUT, protocol.give_up)
            protocol.ended.addBoth(lambda result: (deadline.active() and deadline.cancel(), result)[1])
        finished: Deferred[None] = Deferred()

        def sent(_: object) -> None:
            self.mails_sent += 1
            log.info("TLS report alert mailed to %s", to)

        def failed(failure: Failure) -> None:
            self.mail_failures += 1
            log.error("TLS report alert to %s not mailed: %s %s", to, self.config.sendmail_path,
                      printable(_one_line(failure.value)))

        def forget(_: object) -> None:
            self._mailing.remove(finished)
            finished.callback(None)

        protocol.ended.addCallbacks(sent, failed).addBoth(forget)
        return finished


class _SendmailProtocol(ProcessProtocol):
    """Writes the message to sendmail's standard input and waits for it to exit 0."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.errors = b""
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.message)
        self.transport.closeStdin()

    def give_up(self) -> None:
        """sendmail hangs: kill it (processEnded then reports the signal)."""
        self.errors += f" (killed after {limits.SENDMAIL_TIMEOUT:g} seconds)".encode()
        if self.transport is not None:
            self.transport.signalProcess("KILL")

    def errReceived(self, data: bytes) -> None:
        self.errors = (self.errors + data)[-limits.SENDMAIL_ERROR_BYTES:]

    def processEnded(self, reason: Failure) -> None:
        if self.ended.called:
            return
        if reason.check(ProcessDone):  # type: ignore[no-untyped-call]
            self.ended.callback(None)
            return
        said = self.errors.decode("utf-8", "replace").strip()
        problem = RuntimeError(f"{reason.getErrorMessage()}{': ' + said if said else ''}")
        self.ended.errback(Failure(problem))  # type: ignore[no-untyped-call]


def _one_line(error: object) -> str:
    return " ".join(str(error).split()) or type(error).__name__
