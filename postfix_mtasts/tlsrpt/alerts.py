"""When stored TLS reports are worth a warning: the decisions, as a pure function.

:func:`decide` takes the settings, what is alerting now (:class:`AlertState`) and
fresh figures (:class:`Observation`), and returns the next state and the events
to tell (log, metric, mail). The service around it only reads the store and acts.

- A policy domain *alerts* when its failed sessions over the window reach
  ``ratio`` of its sessions, with at least ``min_sessions`` sessions counted.
  It *clears* when a window with at least ``min_sessions`` sessions falls below
  the ratio, or when no report in the window names the domain any more.
  Fewer sessions than that keep the state as it is: too little to judge.
- A reporter is *silent* once its newest report ended more than
  ``silence`` ago (only reporters heard from within ``memory`` are watched, so
  one that stopped long ago is not warned about forever), and *back* when a
  newer report arrives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

#: Defaults of the ``[reports]`` alert keys.
DEFAULT_RATIO = 0.05
DEFAULT_WINDOW = 3 * 86_400.0
DEFAULT_MIN_SESSIONS = 10
DEFAULT_SILENCE_DAYS = 7
#: Reporters not heard from in this long are no longer watched for silence.
REPORTER_MEMORY = timedelta(days=90)


@dataclass(frozen=True)
class AlertSettings:
    """The thresholds, typed (from ``[reports]`` in the configuration)."""

    ratio: float = DEFAULT_RATIO
    window: timedelta = timedelta(seconds=DEFAULT_WINDOW)
    min_sessions: int = DEFAULT_MIN_SESSIONS
    #: 0 turns the silence warning off.
    silence_days: int = DEFAULT_SILENCE_DAYS


@dataclass(frozen=True)
class Observation:
    """Fresh figures: (successful, failed) per policy domain over the window ending ``now``,
    and the end of each reporter's newest report."""

    now: datetime
    sessions: Mapping[str, tuple[int, int]]
    newest: Mapping[str, datetime]


@dataclass(frozen=True)
class AlertState:
    """What is being warned about now."""

    domains: frozenset[str] = frozenset()
    silent_reporters: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DomainAlert:
    """A domain's failure ratio reached the threshold."""

    domain: str
    successful: int
    failed: int

    @property
    def ratio(self) -> float:
        return self.failed / (self.successful + self.failed)


@dataclass(frozen=True)
class DomainCleared:
    """A domain that was alerting is below the threshold again (or has no reports in the window:
    ``successful`` and ``failed`` are then both 0)."""

    domain: str
    successful: int
    failed: int


@dataclass(frozen=True)
class ReporterSilent:
    """A reporter has sent nothing newer than ``newest`` for more than the allowed days."""

    reporter: str
    newest: datetime


@dataclass(frozen=True)
class ReporterBack:
    """A reporter that was silent sent a report again."""

    reporter: str
    newest: datetime


Event = DomainAlert | DomainCleared | ReporterSilent | ReporterBack


def decide(settings: AlertSettings, state: AlertState, seen: Observation) -> tuple[AlertState, list[Event]]:
    """The next state and the events that lead to it, domains first, each group sorted by name."""
    events: list[Event] = []
    alerting = set(state.domains)
    for domain in sorted(set(seen.sessions) | state.domains):
        successful, failed = seen.sessions.get(domain, (0, 0))
        total = successful + failed
        if total == 0:
            if domain in alerting:
                alerting.discard(domain)
                events.append(DomainCleared(domain, 0, 0))
            continue
        if total < settings.min_sessions:
            continue  # too few sessions to judge either way
        above = failed / total >= settings.ratio
        if above and domain not in alerting:
            alerting.add(domain)
            events.append(DomainAlert(domain, successful, failed))
        elif not above and domain in alerting:
            alerting.discard(domain)
            events.append(DomainCleared(domain, successful, failed))
    silent = set(state.silent_reporters)
    if settings.silence_days > 0:
        allowed = timedelta(days=settings.silence_days)
        for reporter in sorted(set(seen.newest) | state.silent_reporters):
            newest = seen.newest.get(reporter)
            if newest is None or seen.now - newest > REPORTER_MEMORY:
                silent.discard(reporter)  # forgotten: no longer watched
                continue
            quiet = seen.now - newest > allowed
            if quiet and reporter not in silent:
                silent.add(reporter)
                events.append(ReporterSilent(reporter, newest))
            elif not quiet and reporter in silent:
                silent.discard(reporter)
                events.append(ReporterBack(reporter, newest))
    else:
        silent.clear()
    return AlertState(frozenset(alerting), frozenset(silent)), events


def printable(text: str) -> str:
    """``text`` with control characters escaped: names come from reports anyone can send, and must
    not start a new log line or mail header."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def describe(event: Event, settings: AlertSettings) -> str:
    """One line for the log and the mail; names from the reports are made printable."""
    window = _duration(settings.window)
    if isinstance(event, DomainAlert | DomainCleared):
        event = replace(event, domain=printable(event.domain))
    else:
        event = replace(event, reporter=printable(event.reporter))
    if isinstance(event, DomainAlert):
        total = event.successful + event.failed
        return (f"TLS reports for {event.domain}: {event.failed:,} of {total:,} sessions failed over the "
                f"last {window} ({100 * event.ratio:.1f} %, alert_ratio {100 * settings.ratio:g} %)")
    if isinstance(event, DomainCleared):
        total = event.successful + event.failed
        if total == 0:
            return f"TLS reports for {event.domain}: back to normal (no report in the last {window})"
        return (f"TLS reports for {event.domain}: back to normal, {event.failed:,} of {total:,} sessions "
                f"failed over the last {window} ({100 * event.failed / total:.1f} %)")
    if isinstance(event, ReporterSilent):
        return (f"TLS reporter {event.reporter} has sent no report for more than {settings.silence_days} "
                f"days (newest ended {event.newest:%Y-%m-%d %H:%M} UTC)")
    return (f"TLS reporter {event.reporter} sends reports again "
            f"(newest ended {event.newest:%Y-%m-%d %H:%M} UTC)")


def is_warning(event: Event) -> bool:
    """Alerts and silences are warnings; their ends are news."""
    return isinstance(event, DomainAlert | ReporterSilent)


def _duration(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    if seconds % 86_400 == 0:
        days = seconds // 86_400
        return f"{days} day{'s' if days != 1 else ''}"
    if seconds % 3_600 == 0:
        hours = seconds // 3_600
        return f"{hours} hour{'s' if hours != 1 else ''}"
    return f"{seconds} seconds"


def alert_mail(to: str, events: list[Event], settings: AlertSettings, host: str) -> bytes:
    """A short plain-text message about ``events`` for ``sendmail -i``; sendmail adds From and Date."""
    from email.message import EmailMessage
    from email.policy import SMTP

    warnings = [e for e in events if is_warning(e)]
    first = warnings[0] if warnings else events[0]
    subject = describe(first, settings)
    if len(events) > 1:
        subject += f" (and {len(events) - 1} more)"
    message = EmailMessage(policy=SMTP)
    message["To"] = to
    message["Subject"] = f"postfix-mtasts on {printable(host)}: {subject}"
    message["Auto-Submitted"] = "auto-generated"
    lines = [("WARNING: " if is_warning(e) else "") + describe(e, settings) for e in events]
    lines += ["", "The dashboard at /reports on the daemon's HTTP listener shows the figures;",
              "'postfix-mtasts check DOMAIN' audits a domain's MTA-STS set-up."]
    message.set_content("\n".join(lines) + "\n")
    return message.as_bytes()
