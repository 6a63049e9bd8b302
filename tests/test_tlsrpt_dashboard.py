"""The /reports page as text: a chart per domain with a bar per day and kind, result types with
their meaning and fix, a check link on sts-* failures only, open alerts, everything from a report
escaped, nothing loaded from outside, and a bounded number of domain sections. (Chromium renders
it in tests/test_reportsweb.py.)"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from postfix_mtasts.tlsrpt.dashboard import DOMAIN_SECTIONS, AlertBanner, check_link, render_dashboard
from postfix_mtasts.tlsrpt.model import parse_report
from postfix_mtasts.tlsrpt.series import dashboard_view
from tests.support import tlsrpt_samples as samples

TODAY = date(2026, 12, 6)
GENERATED = datetime(2026, 12, 6, 7, 0, tzinfo=UTC)


def report(day: date, domain: str = "example.com", org: str = "Google Inc.", successful: int = 100,
           details: list[dict[str, object]] | None = None) -> object:
    return parse_report(samples.report(
        org=org, report_id=f"{org}-{day}-{domain}", start=f"{day}T00:00:00Z", end=f"{day}T23:59:59Z",
        policies=[samples.policy(domain=domain, successful=successful, details=details or [])]))


def page(reports: list[object], banner: AlertBanner | None = None) -> str:
    return render_dashboard(dashboard_view(reports, TODAY), generated=GENERATED,  # type: ignore[arg-type]
                            banner=banner)


def test_each_domain_has_a_bar_per_day_and_kind_and_its_failures_explained() -> None:
    html = page([
        report(TODAY, successful=1200, details=[samples.failure("sts-webpki-invalid", 3)]),
        report(TODAY - timedelta(days=5), details=[samples.failure("certificate-expired", 4)]),
        report(TODAY, domain="example.org", successful=40),
    ])
    sections = re.findall(r'<section class="domain" id="(d\d+)" data-domain="([^"]+)"', html)
    assert sections == [("d0", "example.com"), ("d1", "example.org")]
    first = html[html.index('id="d0"'):html.index('id="d1"')]
    bars = re.findall(r'<rect class="bar (successful|failed)" data-day="([\d-]+)" data-sessions="(\d+)"',
                      first)
    assert len(bars) == 2 * 90
    assert ("successful", TODAY.isoformat(), "1200") in bars
    assert ("failed", (TODAY - timedelta(days=5)).isoformat(), "4") in bars
    assert ("failed", (TODAY - timedelta(days=1)).isoformat(), "0") in bars
    assert "renew it (check your ACME renewal" in first  # certificate-expired's fix
    assert "serve mta-sts.&lt;your domain&gt; with a valid public certificate" in first
    links = re.findall(r'<a class="check" href="([^"]+)"', html)
    assert links == ["/reports/check?domain=example.com"]  # sts-* only, once
    assert 'id="failed-count"><b>7</b>' in html


def test_everything_from_a_report_is_escaped_and_nothing_is_loaded() -> None:
    evil = '<script>alert(1)</script>"&x'
    html = page([report(TODAY, domain="a.example", org=evil, details=[
        samples.failure("sts-policy-invalid", 2, sending_ip=evil, mx=evil)])])
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&amp;x" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert not re.search(r"url\(", html)
    assert not re.search(r"<(link|img|iframe|object|embed)\b|@import", html)
    assert re.findall(r"https?://[^\s\"<]+", html) == ["http://www.w3.org/2000/svg"]  # the SVG namespace


def test_a_domain_name_with_url_characters_is_quoted_in_its_check_link() -> None:
    assert check_link("a&b.example/x?y") == "/reports/check?domain=a%26b.example%2Fx%3Fy"


def test_open_alerts_are_shown_above_the_figures() -> None:
    html = page([report(TODAY)], AlertBanner(domains=(("example.com", "10 of 100 failed <b>"),),
                                             silent_reporters=(("Mail.Ru", "silent for 9 days"),)))
    alerts = html[html.index('id="alerts"'):html.index('class="figures"')]
    assert '<li data-name="example.com">10 of 100 failed &lt;b&gt;</li>' in alerts
    assert '<li data-name="Mail.Ru">silent for 9 days</li>' in alerts


def test_no_reports_say_so_and_many_domains_are_bounded() -> None:
    assert 'id="no-reports"' in page([])
    many = page([report(TODAY, domain=f"d{i:03}.example") for i in range(DOMAIN_SECTIONS + 5)])
    assert many.count('<section class="domain"') == DOMAIN_SECTIONS
    assert many.count("<tr><td>") >= DOMAIN_SECTIONS + 5  # every domain in the overview
    assert "5 more domains are only in the overview above." in many


def test_a_policy_without_its_domain_has_no_check_link_and_no_policy_failures_are_not_excused() -> None:
    data = samples.report(report_id="postfix-1", start=f"{TODAY}T00:00:00Z", end=f"{TODAY}T23:59:59Z",
                          policies=[samples.policy(policy_type="no-policy-found", successful=5, details=[
                              samples.failure("sts-policy-fetch-error", 102)])])
    del data["policies"][0]["policy"]["policy-domain"]  # as Postfix's own reporter sent until 2025
    html = page([parse_report(data)])
    assert 'data-domain="(no policy-domain)"' in html
    assert 'class="check"' not in html  # nothing to audit
    told = html[html.index('class="explain no-policy"'):]
    assert "TLS still failed in these sessions" in told
    assert "nothing is broken" not in html
