"""The TLS reports watched by a real daemon: reports stored by ``report ingest`` (the real-world
corpus and a recent month), then /reports rendered by headless Chromium (charts in the DOM it
built, a non-blank screenshot with the bar colours), /reports/check running the real audit
against a loopback world (only for domains in the reports), /metrics parsed with
prometheus_client's parser and matching ``report show``, and the alert logged once. Unit tests
of the check page's bounds: one audit per domain at a time, at most two at once, results kept
for a while."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater

from postfix_mtasts import __version__, limits
from postfix_mtasts.check.findings import Finding
from postfix_mtasts.config import ReportsConfig
from postfix_mtasts.reportwatch import ReportWatch
from postfix_mtasts.reportweb import CheckPage
from postfix_mtasts.tlsrpt.model import Report
from postfix_mtasts.tlsrpt.store.memory import MemoryReportStore
from tests.conftest import require
from tests.support import tlsrpt_samples as samples
from tests.support.daemon import (
    LOOPBACK,
    DaemonProcess,
    async_yield_fixture,
    daemon_environment,
    ensure_deferred,
    free_port,
)
from tests.support.png import colours
from tests.support.world import World

#: The real-world reports, beside the checkout (as tests/test_tlsrpt_corpus.py finds them).
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "reports-real"
#: Guard against a hung child; not a performance assertion.
CHILD_DEADLINE = 120
#: How often, and how many times, a test looks at the daemon's log (a bound, not a timing).
POLL_INTERVAL = 0.1
RELOAD_POLLS = 300
DOMAIN = "policy.example"
EVIL = '<script>document.title="owned"</script>'
#: The bar colours of the dashboard's CSS (successful, failed).
GREEN, RED = (0x2D, 0xA4, 0x4E), (0xCF, 0x22, 0x2E)


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def recent_reports(directory: Path, today: date) -> None:
    """30 days of reports about DOMAIN from two reporters: fetch errors in the last three days
    (an alert), expired certificates a fortnight ago, and one reporter with a hostile name."""
    directory.mkdir()
    for back in range(1, 31):
        day = today - timedelta(days=back)
        for org, successful in (("Google Inc.", 1000 + back), ("Microsoft Corporation", 500)):
            details = []
            if back <= 3:
                details.append(samples.failure("sts-policy-fetch-error", 80, sending_ip="192.0.2.7", mx=None))
            if 14 <= back <= 16 and org == "Google Inc.":
                details.append(samples.failure("certificate-expired", 9, sending_ip="192.0.2.8",
                                               mx="mx1.policy.example"))
            data = samples.report(org=org, report_id=f"{org}-{day}", start=f"{day}T00:00:00Z",
                                  end=f"{day}T23:59:59Z",
                                  policies=[samples.policy(domain=DOMAIN, successful=successful,
                                                           details=details)])
            (directory / f"{org[:6]}-{day}.json").write_bytes(samples.json_bytes(data))
    hostile = samples.report(org=EVIL, report_id="evil-1", start=f"{today - timedelta(days=2)}T00:00:00Z",
                             end=f"{today - timedelta(days=2)}T23:59:59Z",
                             policies=[samples.policy(domain=DOMAIN, successful=3)])
    (directory / "evil.json").write_bytes(samples.json_bytes(hostile))


def report_command(*args: str, state_directory: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``postfix-mtasts report ...``; its default store is in ``state_directory``, as the daemon's
    (never in the real /var/lib)."""
    environment = daemon_environment(state_directory=str(state_directory or "/nonexistent"))
    done = subprocess.run([sys.executable, "-m", "postfix_mtasts.cli", "report", *args], env=environment,
                          capture_output=True, text=True, timeout=CHILD_DEADLINE, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done


@dataclass
class Running:
    world: World
    daemon: DaemonProcess
    url: str
    config: Path

    async def get(self, path: str) -> tuple[int, dict[str, str], str]:
        response = await treq.get(self.url + path, reactor=reactor())
        headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, await response.text("utf-8")


@async_yield_fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    require(f"the report corpus {CORPUS}", (CORPUS / "expected.json").is_file())
    http_port = free_port()
    store_toml = f'[reports]\npath = "{tmp_path}/reports.sqlite3"\nreporter_silence_days = 0\n'
    ingest_config = tmp_path / "ingest.toml"
    ingest_config.write_text(store_toml)
    recent_reports(tmp_path / "recent", datetime.now(UTC).date())
    stored = report_command("ingest", "--config", str(ingest_config), str(CORPUS), str(tmp_path / "recent"))
    assert stored.returncode == 0, stored.stderr

    world = await World.start(reactor())
    world.publish(DOMAIN, World.policy_text(mx=("mx1.policy.example",)), "id1")
    text = world.config_toml(
        socketmap=[f"inet:{LOOPBACK}:{free_port()}"],
        extra=f'[control]\nsocket = "{tmp_path}/control.sock"\n'
              f'[http]\nlisten = "inet:{LOOPBACK}:{http_port}"\n{store_toml}',
    )
    config_path = tmp_path / "daemon.toml"
    config_path.write_text(text)
    # Ready once the HTTP listener accepts: it opens after the Postfix listeners.
    daemon = DaemonProcess(reactor(), config_path, ("inet", http_port))
    daemon.spawn()
    try:
        await daemon.wait_ready()
        await until_logged(daemon, f"postfix-mtasts {__version__} ready")  # /reports is served from then on
        yield Running(world, daemon, f"http://{LOOPBACK}:{http_port}", ingest_config)
    finally:
        await daemon.close()
        await world.stop()


async def until_logged(daemon: DaemonProcess, fragment: str) -> None:
    """Wait until the daemon has logged ``fragment`` (or give up after RELOAD_POLLS looks)."""
    for _ in range(RELOAD_POLLS):
        if any(fragment in line for line in daemon.stderr_lines):
            return
        await deferLater(reactor(), POLL_INTERVAL, lambda: None)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         *args],
        capture_output=True, text=True, timeout=CHILD_DEADLINE, check=False,
    )


@pytest.mark.integration
@ensure_deferred
async def test_the_dashboard_renders_in_headless_chromium(running: Running, tmp_path: Path) -> None:
    require("chromium", shutil.which("chromium") is not None)
    code, headers, _ = await running.get("/reports")
    assert code == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"

    # The daemon is another process: blocking here while Chromium loads the page is fine.
    dumped = chromium("--dump-dom", running.url + "/reports", profile=tmp_path / "p1")
    assert dumped.returncode == 0, dumped.stderr
    dom = dumped.stdout
    assert "<title>TLS reports: postfix-mtasts</title>" in dom  # the hostile name did not run
    [section] = re.findall(rf'<section class="domain" id="d0" data-domain="{re.escape(DOMAIN)}">'
                           r"(.*?)</section>", dom, flags=re.DOTALL)
    assert section.count('<svg class="chart"') == 1
    bars = re.findall(r'<rect class="bar (successful|failed)" data-day="([\d-]+)" data-sessions="(\d+)"',
                      section)
    assert len(bars) == 2 * 90
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    assert ("failed", yesterday, "160") in bars
    assert ("successful", yesterday, str(1001 + 500)) in bars
    assert f'href="/reports/check?domain={DOMAIN}"' in section
    assert "make sure the mta-sts host resolves and answers HTTPS" in section
    assert "renew it (check your ACME renewal" in section
    assert "&lt;script&gt;document.title" in section and "<script" not in dom
    assert 'id="alerts"' in dom and f"TLS reports for {DOMAIN}: 480 of " in dom

    shot = tmp_path / "reports.png"
    taken = chromium("--window-size=1200,1600", f"--screenshot={shot}", running.url + "/reports",
                     profile=tmp_path / "p2")
    assert taken.returncode == 0, taken.stderr
    seen = colours(shot.read_bytes())
    assert len(seen) > 50  # text, tables and charts, not one flat colour
    assert seen[GREEN] > 1000 and seen[RED] > 100  # the bars were drawn


@pytest.mark.integration
@ensure_deferred
async def test_a_check_link_runs_the_audit_only_for_domains_in_the_reports(running: Running) -> None:
    code, _, page = await running.get(f"/reports/check?domain={DOMAIN}")
    assert code == 200, page
    assert f"postfix-mtasts check {DOMAIN}" in page
    topics = dict(re.findall(r'<tr class="finding (ok|warning|error)" data-topic="([a-z-]+)"', page)[::-1])
    assert re.search(r'<tr class="finding ok" data-topic="mta-sts-txt">', page), page
    assert re.search(r'<tr class="finding ok" data-topic="policy">', page), topics

    code, _, page = await running.get("/reports/check?domain=elsewhere.example")
    assert code == 404 and "is not a policy domain of the stored TLS reports" in page
    code, _, page = await running.get("/reports/check?domain=%3Cscript%3E")
    assert code == 400 and "<script>" not in page
    code, _, _ = await running.get("/reports/nothing")
    assert code == 404


@pytest.mark.integration
@ensure_deferred
async def test_metrics_match_the_store_and_the_alert_is_logged_once(running: Running) -> None:
    response = await treq.get(running.url + "/metrics", reactor=reactor())
    text = await response.text()
    sessions: dict[tuple[str, str, str], float] = {}
    newest: dict[str, float] = {}
    gauges: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "postfix_mtasts_tlsrpt_sessions_total":
                labels = sample.labels
                sessions[(labels["policy_domain"], labels["reporter"], labels["result"])] = sample.value
            elif sample.name == "postfix_mtasts_tlsrpt_newest_report_timestamp_seconds":
                newest[sample.labels["reporter"]] = sample.value
            elif sample.name in ("postfix_mtasts_tlsrpt_alert", "postfix_mtasts_tlsrpt_failure_ratio"):
                gauges[(sample.name, sample.labels["policy_domain"])] = sample.value

    shown = report_command("show", "--config", str(running.config), "--json")
    totals = json.loads(shown.stdout)
    successful = sum(v for (_, _, result), v in sessions.items() if result == "successful")
    assert successful == totals["successful-sessions"]
    # Failures count by result type as the failure-details report them (some reporters' details add
    # up to more than their summary), plus what summaries count without details.
    detailed = sum(f["failed-sessions"] for f in totals["failures"])
    assert sum(sessions.values()) - successful == detailed + totals["failed-sessions-without-details"]
    assert sessions[(DOMAIN, "Google Inc.", "sts-policy-fetch-error")] == 3 * 80
    assert sessions[(DOMAIN, "Google Inc.", "certificate-expired")] == 3 * 9
    yesterday_end = datetime.combine(datetime.now(UTC).date() - timedelta(days=1),
                                     datetime.max.time(), UTC).replace(microsecond=0)
    assert newest["Microsoft Corporation"] == yesterday_end.timestamp()
    assert EVIL in newest  # label values keep the name as sent; the text format escapes it
    assert gauges[("postfix_mtasts_tlsrpt_alert", DOMAIN)] == 1
    assert 0.05 < gauges[("postfix_mtasts_tlsrpt_failure_ratio", DOMAIN)] < 0.2
    warnings = [line for line in running.daemon.stderr_lines if "WARNING" in line and DOMAIN in line]
    assert len(warnings) == 1 and "sessions failed over the last 3 days" in warnings[0]


@pytest.mark.integration
@ensure_deferred
async def test_a_reload_with_a_higher_alert_ratio_clears_the_alert_at_once(running: Running) -> None:
    await until_logged(running.daemon, f"TLS reports for {DOMAIN}: 480 of")  # the alert is open
    config = running.daemon.config_path
    config.write_text(config.read_text().replace("reporter_silence_days = 0\n",
                                                 "reporter_silence_days = 0\nalert_ratio = 0.5\n"))
    os.kill(running.daemon.pid, signal.SIGHUP)
    cleared = f"TLS reports for {DOMAIN}: back to normal, 480 of 4,989 sessions failed"
    await until_logged(running.daemon, "report alerts updated")
    lines = running.daemon.stderr_lines
    assert any(cleared in line and "INFO" in line for line in lines), "\n".join(lines)
    code, _, page = await running.get("/reports")
    assert code == 200 and 'id="alerts"' not in page


@pytest.mark.integration
@ensure_deferred
async def test_the_store_is_opened_only_when_used_or_already_made(tmp_path: Path) -> None:
    port = free_port()
    text = f'[listen]\nsocketmap = ["inet:{LOOPBACK}:{port}"]\n[cache]\nbackend = "memory"\n' \
           f'[control]\nsocket = "{tmp_path}/control.sock"\n'
    daemon = await DaemonProcess.start(reactor(), tmp_path, text)
    await daemon.close()
    assert not (tmp_path / "reports.sqlite3").exists()  # STATE_DIRECTORY is tmp_path
    assert not any("TLS report store" in line for line in daemon.stderr_lines)

    recent_reports(tmp_path / "recent", datetime.now(UTC).date())
    stored = report_command("ingest", str(tmp_path / "recent"), state_directory=tmp_path)
    assert stored.returncode == 0, stored.stderr
    daemon = await DaemonProcess.start(reactor(), tmp_path, text)
    try:
        await until_logged(daemon, "TLS reports for policy.example")
    finally:
        await daemon.close()
    lines = daemon.stderr_lines
    assert any(f"report store {tmp_path}/reports.sqlite3 open" in line for line in lines), lines
    assert any("WARNING" in line and "TLS reports for policy.example" in line for line in lines), lines

# --- the check page's bounds, with a fake audit ----------------------------------------------


class FakeAudit:
    """Audits that end when the test says so; counts how many were started per domain."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.pending: dict[str, list[Deferred[list[Finding]]]] = {}

    async def __call__(self, domain: str) -> list[Finding]:
        self.started.append(domain)
        waiting: Deferred[list[Finding]] = Deferred()
        self.pending.setdefault(domain, []).append(waiting)
        return await waiting

    def finish(self, domain: str) -> None:
        for waiting in self.pending.pop(domain):
            waiting.callback([Finding.ok("mta-sts-txt", f"{domain} has an _mta-sts TXT record")])


def check_page(*domains: str) -> tuple[CheckPage, FakeAudit, Clock]:
    store = MemoryReportStore()
    day = datetime.now(UTC).date() - timedelta(days=1)
    for domain in domains:
        data = samples.report(report_id=domain, start=f"{day}T00:00:00Z", end=f"{day}T23:59:59Z",
                              policies=[samples.policy(domain=domain)])
        store.add(samples.json_bytes(data), "test")

    class Store:
        async def reports(self, since: datetime | None = None, domain: str | None = None) -> list[Report]:
            return store.reports(since, domain)

        async def count(self) -> int:
            return store.count()

    clock = Clock()
    clock.advance(datetime.now(UTC).timestamp())
    audit = FakeAudit()
    return CheckPage(ReportWatch(clock, Store(), ReportsConfig()), audit), audit, clock


@ensure_deferred
async def test_one_audit_per_domain_at_a_time_and_its_result_kept_for_a_while() -> None:
    page, audit, clock = check_page("a.example")
    first = Deferred.fromCoroutine(page.page("a.example"))
    second = Deferred.fromCoroutine(page.page("A.Example."))
    assert audit.started == ["a.example"]
    audit.finish("a.example")
    for answer in (await first, await second):
        assert answer[0] == 200 and "a.example has an _mta-sts TXT record" in answer[1]
    clock.advance(limits.REPORT_CHECK_CACHE_SECONDS - 1)
    assert (await page.page("a.example"))[0] == 200 and audit.started == ["a.example"]
    clock.advance(1)
    gone = Deferred.fromCoroutine(page.page("a.example"))
    again = Deferred.fromCoroutine(page.page("a.example"))
    assert audit.started == ["a.example", "a.example"]
    gone.cancel()  # that client went away; the audit runs on for the other
    gone.addErrback(lambda failure: failure.trap(CancelledError))
    audit.finish("a.example")
    assert (await again)[0] == 200


@ensure_deferred
async def test_at_most_two_audits_at_once_and_only_for_domains_in_the_reports() -> None:
    page, audit, _clock = check_page("a.example", "b.example", "c.example")
    running = [Deferred.fromCoroutine(page.page(d)) for d in ("a.example", "b.example")]
    code, text = await page.page("c.example")
    assert code == 503 and "try again" in text
    assert audit.started == ["a.example", "b.example"]
    code, text = await page.page("elsewhere.example")
    assert code == 404 and "elsewhere.example is not a policy domain" in text
    code, text = await page.page("not a domain")
    assert code == 400
    for domain in ("a.example", "b.example"):
        audit.finish(domain)
    for done in running:
        assert (await done)[0] == 200
