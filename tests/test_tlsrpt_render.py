"""The report command's outputs: terminal tables in 100 columns, JSON and CSV that parse back,
and an HTML page that escapes what reporters send and loads nothing from outside."""

from __future__ import annotations

import csv
import io
import json
import re
from html.parser import HTMLParser

from postfix_mtasts.tlsrpt.render import (
    CSV_COLUMNS,
    CSV_SUCCESS,
    CSV_UNDETAILED,
    TERMINAL_WIDTH,
    chart_svg,
    render_csv,
    render_html,
    render_json,
    render_text,
    table,
)
from postfix_mtasts.tlsrpt.sources import Collected, collect, read_bytes
from postfix_mtasts.tlsrpt.summary import Summary, summarize
from tests.support import tlsrpt_samples as samples

LONG_MX = "mx-with-a-remarkably-long-name-for-testing.mail-cluster-eu-west.example.com"
V6 = "2001:db8:ffff:ffff:ffff:ffff:ffff:1234"


def sample_reports() -> list[bytes]:
    return [
        samples.gzip_bytes(samples.report(report_id="g1", policies=[
            samples.policy(successful=12_345, details=[
                samples.failure("certificate-expired", 3, sending_ip="203.0.113.1"),
                samples.failure("starttls-not-supported", 2, sending_ip=V6, mx=LONG_MX),
            ]),
            samples.policy(domain="example.org", policy_type="no-policy-found", successful=40),
        ])),
        samples.json_bytes(samples.report(
            org="Microsoft Corporation", report_id="m3", start="2024-05-03T00:00:00Z",
            end="2024-05-03T23:59:59Z",
            policies=[samples.policy(mode="testing", successful=500, failed=6, details=[
                samples.failure("sts-webpki-invalid", 4, mx=None),
            ])],
        )),
        b'{"organization-name": "broken.example"}',
    ]


def load(payloads: list[bytes]) -> tuple[Summary, Collected]:
    collected = collect(item for n, p in enumerate(payloads) for item in read_bytes(f"input {n}", p))
    return summarize(collected.reports), collected


def test_table_aligns_and_cuts_to_the_width() -> None:
    lines = table(["Name", "Count"], [["short", "1"], ["x" * 200, "12,345"]], numeric=(1,), width=40)
    assert all(len(line) <= 40 for line in lines)
    assert lines[0] == "Name" + " " * 28 + "   Count"
    assert lines[2].endswith("      1") and lines[3].endswith("12,345")
    assert lines[3].startswith("x" * 31 + "…")


def test_terminal_output_fits_100_columns_and_shows_the_figures() -> None:
    summary, collected = load(sample_reports())
    text = render_text(summary, collected)
    assert max(len(line) for line in text.splitlines()) <= TERMINAL_WIDTH
    assert "TLS reports: 2 read, 1 broken" in text
    assert "Sessions: 12,896 in all, 12,885 successful, 11 failed (0.09 % failed)" in text
    assert re.search(r"^sts +example\.com +enforce +12,345 +5 +0\.04 %$", text, re.M)
    assert re.search(r"^sts +example\.com +testing +500 +6 +1\.19 %$", text, re.M)
    assert re.search(r"^certificate-expired +203\.0\.113\.1 +mx1\.example\.com +3$", text, re.M)
    assert V6 in text  # the address column is never the one cut
    assert "2 failed sessions came without failure details." in text
    assert "Usual fix: renew it" in text
    assert "no-policy-found" in text and "opportunistic" in text


def test_json_parses_back_with_the_same_figures() -> None:
    summary, collected = load(sample_reports())
    data = json.loads(render_json(summary, collected))
    assert (data["reports"], data["successful-sessions"], data["failed-sessions"]) == (2, 12_885, 11)
    assert data["failed-sessions-without-details"] == 2
    assert [(p["policy-domain"], p["mode"], p["successful-sessions"]) for p in data["policies"]] == [
        ("example.com", "enforce", 12_345), ("example.com", "testing", 500), ("example.org", None, 40),
    ]
    assert data["failures"][0] == {
        "result-type": "sts-webpki-invalid", "sending-mta-ip": "192.0.2.10", "receiving-mx": "-",
        "failed-sessions": 4, "failure-reason-codes": [],
    }
    assert [t["result-type"] for t in data["result-types"]] == [
        "sts-webpki-invalid", "certificate-expired", "starttls-not-supported"]
    assert data["result-types"][1]["fix"].startswith("renew it")
    assert data["days"] == [
        {"day": "2024-05-01", "successful-sessions": 12_385, "failed-sessions": 5},
        {"day": "2024-05-03", "successful-sessions": 500, "failed-sessions": 6},
    ]
    assert data["broken"] == [{"source": "input 2", "reason": "missing required field date-range"}]


def test_csv_parses_back_and_adds_up_to_the_summary() -> None:
    summary, collected = load(sample_reports())
    rows = list(csv.DictReader(io.StringIO(render_csv(collected))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert sum(int(r["sessions"]) for r in rows if r["result"] == CSV_SUCCESS) == summary.successful
    assert sum(int(r["sessions"]) for r in rows if r["result"] != CSV_SUCCESS) == summary.failed
    undetailed = [r for r in rows if r["result"] == CSV_UNDETAILED]
    assert [(r["organization-name"], r["mode"], r["sessions"]) for r in undetailed] == [
        ("Microsoft Corporation", "testing", "2")]
    starttls = next(r for r in rows if r["result"] == "starttls-not-supported")
    assert (starttls["sending-mta-ip"], starttls["receiving-mx-hostname"]) == (V6, LONG_MX)
    assert starttls["start-datetime"] == "2024-05-01T00:00:00+00:00"
    assert len(rows) == 7  # 3 policies' successes, 3 details, 1 undetailed remainder


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_escapes_what_reporters_send_and_loads_nothing() -> None:
    hostile = samples.report(
        org='<script>alert("org")</script>', report_id="x",
        policies=[samples.policy(domain="example.com", details=[
            samples.failure('<img src=x onerror=alert(1)>', 1, mx='"><svg onload=alert(2)>'),
        ])],
    )
    summary, collected = load([samples.json_bytes(hostile), b"<b>not a report</b>"])
    page = render_html(summary, collected)
    parser = _PageParser()
    parser.feed(page)
    assert "script" not in parser.tags and "img" not in parser.tags
    assert parser.tags.count("svg") == 1
    names = {name for name, _ in parser.attributes}
    assert not names & {"src", "href", "onload", "onerror", "srcset"}
    text = "".join(parser.text)
    assert '<script>alert("org")</script>' in text  # shown as text, not run
    assert '"><svg onload=alert(2)>' in text
    assert "@import" not in page and "url(" not in page


def test_the_chart_fills_days_without_reports() -> None:
    summary, _ = load(sample_reports())
    svg = chart_svg(summary.days)
    bars = re.findall(r'<rect class="bar (\w+)" data-day="([\d-]+)" data-sessions="(\d+)"', svg)
    assert bars == [
        ("successful", "2024-05-01", "12385"), ("successful", "2024-05-02", "0"),
        ("successful", "2024-05-03", "500"),
        ("failed", "2024-05-01", "5"), ("failed", "2024-05-02", "0"), ("failed", "2024-05-03", "6"),
    ]
    heights = [int(h) for h in re.findall(r'height="(\d+)"><title>', svg)]
    assert heights[1] == heights[4] == 0
    assert heights[0] > heights[2] > 0 and heights[5] > heights[3] > 0  # each panel to its own scale
