"""The report watch under ``task.Clock``: an alert raised (one WARNING line, the gauge set, one
mail through a fake sendmail) and cleared (one INFO line, the gauge back to 0, a second mail); a
silent reporter warned about once; sendmail that fails or a store that cannot be read is one
line and changes nothing else; the store is read again only when it changed."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock

from postfix_mtasts.config import ReportsConfig
from postfix_mtasts.metrics import report_families
from postfix_mtasts.reportwatch import ReportWatch
from postfix_mtasts.tlsrpt.model import Report
from postfix_mtasts.tlsrpt.store.memory import MemoryReportStore
from tests.support import tlsrpt_samples as samples
from tests.support.daemon import ensure_deferred

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
INTERVAL = 300.0


class ClockWithProcesses(Clock):
    """Time from a Clock; sendmail run for real by the running reactor."""

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        return global_reactor.spawnProcess(*args, **kwargs)


class AsyncStore:
    """The memory store behind the async calls a ThreadedReportStore offers; counts reads."""

    def __init__(self) -> None:
        self.store = MemoryReportStore()
        self.reads = 0
        self.broken = False

    async def reports(self, since: datetime | None = None, domain: str | None = None) -> list[Report]:
        self.reads += 1
        return self.store.reports(since, domain)

    async def count(self) -> int:
        if self.broken:
            raise OSError("disk I/O error")
        return self.store.count()

    def add(self, day: date, successful: int, failed: int = 0, org: str = "Google Inc.",
            domain: str = "example.com") -> None:
        details = [samples.failure("certificate-expired", failed)] if failed else []
        data = samples.report(org=org, report_id=f"{org}-{day}-{domain}-{successful}",
                              start=f"{day}T00:00:00Z", end=f"{day}T23:59:59Z",
                              policies=[samples.policy(domain=domain, successful=successful,
                                                       details=details)])
        self.store.add(samples.json_bytes(data), "test")


def fake_sendmail(tmp_path: Path, status: int = 0) -> Path:
    """A sendmail that appends its arguments and the message to a file, then exits ``status``."""
    script = tmp_path / "sendmail"
    out = tmp_path / "mail.out"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "ARGS: $*" >> "{out}"\n'
        f'cat >> "{out}"\n'
        f'echo "--END--" >> "{out}"\n'
        + (f'echo "queue file write error" >&2\nexit {status}\n' if status else "exit 0\n")
    )
    script.chmod(0o755)
    return script


def watch_for(store: AsyncStore, config: ReportsConfig) -> tuple[ReportWatch, ClockWithProcesses]:
    clock = ClockWithProcesses()
    clock.advance(NOW.timestamp())
    return ReportWatch(clock, store, config, interval=INTERVAL, host="mx.example.net"), clock


def scrape(watch: ReportWatch) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    class Collector:
        def collect(self) -> Any:
            return report_families(watch)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and r.name == "postfix_mtasts.reports"]


@ensure_deferred
async def test_an_alert_is_raised_once_and_cleared_once(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store = AsyncStore()
    today = NOW.date()
    store.add(today - timedelta(days=1), successful=100, failed=20)  # 16.7 % failed
    store.add(today - timedelta(days=5), successful=1, failed=500)   # outside the 3-day window
    config = ReportsConfig(alert_mail_to="postmaster@example.com", sendmail_path=str(fake_sendmail(tmp_path)))
    watch, clock = watch_for(store, config)

    watch.start()
    await watch.mail_done()
    raised = ("TLS reports for example.com: 20 of 120 sessions failed over the last 3 days "
              "(16.7 %, alert_ratio 5 %)")
    assert lines(caplog, logging.WARNING) == [raised]
    gauges = scrape(watch)
    assert gauges[("postfix_mtasts_tlsrpt_alert", (("policy_domain", "example.com"),))] == 1
    assert gauges[("postfix_mtasts_tlsrpt_failure_ratio", (("policy_domain", "example.com"),))] == 20 / 120
    mail = (tmp_path / "mail.out").read_text()
    assert mail.startswith("ARGS: -i -- postmaster@example.com\n")
    assert "Subject: postfix-mtasts on mx.example.net: " + raised in mail.replace("\n ", " ")
    assert watch.mails_sent == 1

    clock.advance(INTERVAL)  # nothing new: no second warning, no second mail
    await watch.mail_done()
    assert len(lines(caplog, logging.WARNING)) == 1 and watch.mails_sent == 1

    store.add(today - timedelta(days=1), successful=10_000, org="Microsoft")  # dilutes them below 5 %
    clock.advance(INTERVAL)
    await watch.mail_done()
    assert lines(caplog, logging.INFO)[-2:] == [
        "TLS reports for example.com: back to normal, 20 of 10,120 sessions failed over the last 3 days"
        " (0.2 %)",
        "TLS report alert mailed to postmaster@example.com",
    ]
    assert len(lines(caplog, logging.WARNING)) == 1
    assert scrape(watch)[("postfix_mtasts_tlsrpt_alert", (("policy_domain", "example.com"),))] == 0
    assert watch.mails_sent == 2
    assert (tmp_path / "mail.out").read_text().count("--END--") == 2
    await watch.stop()


@ensure_deferred
async def test_a_silent_reporter_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store = AsyncStore()
    store.add(NOW.date() - timedelta(days=1), successful=50)
    store.add(NOW.date() - timedelta(days=3), successful=50, org="Mail.Ru")
    watch, clock = watch_for(store, ReportsConfig(reporter_silence_days=2))

    watch.start()
    clock.advance(INTERVAL)
    assert lines(caplog, logging.WARNING) == [
        "TLS reporter Mail.Ru has sent no report for more than 2 days (newest ended 2026-12-03 23:59 UTC)"]
    assert scrape(watch)[("postfix_mtasts_tlsrpt_reporter_silent", (("reporter", "Mail.Ru"),))] == 1
    store.add(NOW.date(), successful=5, org="Mail.Ru")
    clock.advance(INTERVAL)
    assert lines(caplog, logging.INFO)[-1] == (
        "TLS reporter Mail.Ru sends reports again (newest ended 2026-12-06 23:59 UTC)")
    assert len(lines(caplog, logging.WARNING)) == 1
    await watch.stop()


@ensure_deferred
async def test_sendmail_failing_is_one_error_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = AsyncStore()
    store.add(NOW.date() - timedelta(days=1), successful=0, failed=50)
    sendmail = fake_sendmail(tmp_path, 75)
    config = ReportsConfig(alert_mail_to="postmaster@example.com", sendmail_path=str(sendmail))
    watch, _clock = watch_for(store, config)
    watch.start()
    await watch.stop()
    errors = lines(caplog, logging.ERROR)
    assert len(errors) == 1
    assert errors[0].startswith(f"TLS report alert to postmaster@example.com not mailed: {tmp_path}/sendmail")
    assert "exit code 75" in errors[0] and "queue file write error" in errors[0]
    assert (watch.mails_sent, watch.mail_failures) == (0, 1)
    assert watch.state.domains == frozenset({"example.com"})  # the alert itself stands


@ensure_deferred
async def test_the_store_is_read_again_only_when_it_changed(caplog: pytest.LogCaptureFixture) -> None:
    store = AsyncStore()
    store.add(NOW.date(), successful=10)
    watch, clock = watch_for(store, ReportsConfig())
    watch.start()
    clock.advance(INTERVAL)
    clock.advance(INTERVAL)
    assert store.reads == 1
    assert watch.snapshot.totals == {("example.com", "Google Inc.", "successful"): 10}
    store.add(NOW.date(), successful=7, org="Mail.Ru")
    clock.advance(INTERVAL)
    assert store.reads == 2 and watch.snapshot.count == 2

    store.broken = True
    clock.advance(INTERVAL)
    assert lines(caplog, logging.WARNING) == [
        "TLS report watch: cannot read the report store: disk I/O error"]
    assert watch.snapshot.count == 2  # the last figures are kept
    store.broken = False
    clock.advance(INTERVAL)
    await watch.stop()
    assert len(clock.getDelayedCalls()) == 0
