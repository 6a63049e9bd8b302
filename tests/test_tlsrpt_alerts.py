"""The alert decisions as a table: a domain's failure ratio over the window raises an alert once
and clears it once (too few sessions change nothing; no reports in the window clear it), a
reporter silent for more than N days is warned about once and announced when back; and the
lines and mail those events make, with report-supplied names made harmless."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.policy import default

import pytest

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
)

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
SETTINGS = AlertSettings(ratio=0.1, window=timedelta(days=3), min_sessions=10, silence_days=4)
A = "a.example"


def seen(sessions: dict[str, tuple[int, int]] | None = None,
         newest: dict[str, datetime] | None = None) -> Observation:
    return Observation(NOW, sessions or {}, newest or {})


DOMAIN_ROWS: list[tuple[str, frozenset[str], dict[str, tuple[int, int]], frozenset[str], list[Event]]] = [
    # name, alerting before, (successful, failed) per domain, alerting after, events
    ("quiet stays quiet", frozenset(), {A: (100, 0)}, frozenset(), []),
    ("below the ratio", frozenset(), {A: (91, 9)}, frozenset(), []),
    ("at the ratio raises", frozenset(), {A: (90, 10)}, frozenset({A}), [DomainAlert(A, 90, 10)]),
    ("above, already alerting: nothing new", frozenset({A}), {A: (50, 50)}, frozenset({A}), []),
    ("below again clears", frozenset({A}), {A: (95, 5)}, frozenset(), [DomainCleared(A, 95, 5)]),
    ("too few sessions to raise", frozenset(), {A: (0, 9)}, frozenset(), []),
    ("too few sessions to clear", frozenset({A}), {A: (5, 0)}, frozenset({A}), []),
    ("no report in the window clears", frozenset({A}), {}, frozenset(), [DomainCleared(A, 0, 0)]),
    ("domains in name order", frozenset({"b.example"}), {"c.example": (0, 20), "b.example": (20, 0)},
     frozenset({"c.example"}), [DomainCleared("b.example", 20, 0), DomainAlert("c.example", 0, 20)]),
]


@pytest.mark.parametrize(("before", "sessions", "after", "events"),
                         [row[1:] for row in DOMAIN_ROWS], ids=[row[0] for row in DOMAIN_ROWS])
def test_domain_alerts(before: frozenset[str], sessions: dict[str, tuple[int, int]],
                       after: frozenset[str], events: list[Event]) -> None:
    state, happened = decide(SETTINGS, AlertState(domains=before), seen(sessions))
    assert (state.domains, happened) == (after, events)


G = "Google Inc."
REPORTER_ROWS: list[tuple[str, frozenset[str], dict[str, datetime], frozenset[str], list[Event]]] = [
    ("recent report", frozenset(), {G: NOW - timedelta(days=1)}, frozenset(), []),
    ("exactly the allowed days", frozenset(), {G: NOW - timedelta(days=4)}, frozenset(), []),
    ("silent too long warns", frozenset(), {G: NOW - timedelta(days=4, seconds=1)}, frozenset({G}),
     [ReporterSilent(G, NOW - timedelta(days=4, seconds=1))]),
    ("still silent: warned once", frozenset({G}), {G: NOW - timedelta(days=6)}, frozenset({G}), []),
    ("back again", frozenset({G}), {G: NOW - timedelta(hours=12)}, frozenset(),
     [ReporterBack(G, NOW - timedelta(hours=12))]),
    ("silent for months is forgotten", frozenset({G}), {G: NOW - timedelta(days=91)}, frozenset(), []),
    ("never warned about once forgotten", frozenset(), {G: NOW - timedelta(days=200)}, frozenset(), []),
]


@pytest.mark.parametrize(("before", "newest", "after", "events"),
                         [row[1:] for row in REPORTER_ROWS], ids=[row[0] for row in REPORTER_ROWS])
def test_reporter_silence(before: frozenset[str], newest: dict[str, datetime], after: frozenset[str],
                          events: list[Event]) -> None:
    state, happened = decide(SETTINGS, AlertState(silent_reporters=before), seen(newest=newest))
    assert (state.silent_reporters, happened) == (after, events)


def test_silence_days_zero_turns_the_reporter_warning_off() -> None:
    off = AlertSettings(silence_days=0)
    state, happened = decide(off, AlertState(silent_reporters=frozenset({G})),
                             seen(newest={G: NOW - timedelta(days=30)}))
    assert (state.silent_reporters, happened) == (frozenset(), [])


def test_each_event_is_one_printable_line() -> None:
    assert describe(DomainAlert(A, 90, 10), SETTINGS) == (
        "TLS reports for a.example: 10 of 100 sessions failed over the last 3 days "
        "(10.0 %, alert_ratio 10 %)")
    assert describe(DomainCleared(A, 95, 5), SETTINGS) == (
        "TLS reports for a.example: back to normal, 5 of 100 sessions failed over the last 3 days (5.0 %)")
    assert describe(DomainCleared(A, 0, 0), SETTINGS) == (
        "TLS reports for a.example: back to normal (no report in the last 3 days)")
    assert describe(ReporterSilent("Evil\nFORGED LINE", NOW), SETTINGS) == (
        "TLS reporter Evil\\nFORGED LINE has sent no report for more than 4 days "
        "(newest ended 2026-12-06 12:00 UTC)")


def test_the_alert_mail_is_short_plain_text_and_its_headers_cannot_be_injected() -> None:
    events: list[Event] = [DomainCleared("b.example", 20, 0), DomainAlert("evil.example\r\nBcc: x@y", 0, 20)]
    raw = alert_mail("postmaster@example.com", events, SETTINGS, "mx.example.com")
    message = message_from_bytes(raw, policy=default)
    assert message["To"] == "postmaster@example.com"
    assert message["Bcc"] is None
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Subject"].startswith(
        "postfix-mtasts on mx.example.com: TLS reports for evil.example\\r\\nBcc: x@y: 20 of 20")
    assert message["Subject"].endswith("(and 1 more)")
    body = message.get_content()
    assert "WARNING: TLS reports for evil.example" in body
    assert "TLS reports for b.example: back to normal" in body
