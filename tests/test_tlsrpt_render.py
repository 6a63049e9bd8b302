"""The report command's outputs: terminal tables in 100 columns, JSON and CSV that parse back,
and an HTML page that escapes what reporters send and loads nothing from outside."""

from __future__ import annotations

import csv
import io
import json
import re
from html.parser import HTMLParser

import pytest

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
        "result-type": "sts-webpki-invalid", "sending-mta-ip": "192.0.2.10", "receiving-mx-hostname": None,
        "receiving-mx-helo": None, "receiving-ip": None, "failure-reason-code": None,
        "additional-information": None, "receiving-mx": "-", "failed-sessions": 4,
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


def _every_field_report() -> bytes:
    return samples.json_bytes(samples.report(report_id="all", policies=[samples.policy(details=[
        samples.failure("validation-failure", 3, sending_ip="203.0.113.9", mx="mx1.example.com",
                        receiving_mx_helo="helo.mx1.example.com", receiving_ip="198.51.100.25",
                        failure_reason_code="X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED",
                        additional_information="https://reporter.example/why?id=42"),
    ])]))


#: Every failure-details field of _every_field_report, by its RFC 8460 name.
EVERY_FIELD = {
    "result-type": "validation-failure",
    "sending-mta-ip": "203.0.113.9",
    "receiving-mx-hostname": "mx1.example.com",
    "receiving-mx-helo": "helo.mx1.example.com",
    "receiving-ip": "198.51.100.25",
    "failure-reason-code": "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED",
    "additional-information": "https://reporter.example/why?id=42",
}


def test_text_shows_every_field_of_a_failure() -> None:
    summary, collected = load([_every_field_report()])
    text = render_text(summary, collected)
    assert re.search(r"^validation-failure +203\.0\.113\.9 +mx1\.example\.com +3$", text, re.M)
    for name in ("receiving-mx-helo", "receiving-ip", "failure-reason-code", "additional-information"):
        assert f"    {name}: {EVERY_FIELD[name]}\n" in text
    assert max(len(line) for line in text.splitlines()) <= TERMINAL_WIDTH


def test_html_shows_every_field_of_a_failure() -> None:
    summary, collected = load([_every_field_report()])
    parser = _PageParser()
    parser.feed(render_html(summary, collected))
    cells = [t for t in parser.text if t.strip()]
    for value in EVERY_FIELD.values():
        assert value in cells, value


def test_json_and_csv_carry_every_field_of_a_failure() -> None:
    summary, collected = load([_every_field_report()])
    (failure,) = json.loads(render_json(summary, collected))["failures"]
    assert failure == {**EVERY_FIELD, "receiving-mx": "mx1.example.com", "failed-sessions": 3}
    rows = list(csv.DictReader(io.StringIO(render_csv(collected))))
    detail = next(r for r in rows if r["result"] == "validation-failure")
    assert {name: detail[name] for name in EVERY_FIELD if name != "result-type"} == {
        name: value for name, value in EVERY_FIELD.items() if name != "result-type"}
    assert detail["sessions"] == "3"


def _no_policy(failed: int) -> bytes:
    return samples.json_bytes(samples.report(report_id=f"np{failed}", policies=[
        samples.policy(domain="xn--gpher-jua.test", policy_type="no-policy-found", successful=99,
                       failed=failed),
    ]))


def test_failed_no_policy_found_sessions_are_not_called_harmless() -> None:
    summary, collected = load([_no_policy(102)])
    text = render_text(summary, collected)
    data = json.loads(render_json(summary, collected))
    page = render_html(summary, collected)
    for shown in (text, page, json.dumps(data)):
        assert "nothing is broken" not in shown
    flat = " ".join(text.split())
    assert ("102 failed sessions: 102 to a domain that publishes no policy the sender could use "
            "(no-policy-found): most senders then deliver without TLS.") in flat
    assert "What it means: the receiving domain publishes no policy the sender could use" in flat
    assert "No failed sessions" not in flat
    assert data["verdict"] in flat
    assert data["no-policy-found"]["failed-sessions"] == 102
    assert '<p id="verdict"><b>102 failed sessions' in page


@pytest.mark.parametrize(
    ("payloads", "verdict"),
    [
        ([_no_policy(0)], "No failed sessions, but no MTA-STS or DANE policy applied to any of the 99: "
                          "senders used TLS without being required to (no-policy-found)."),
        ([samples.json_bytes(samples.report())], "No failed sessions: every reported sender negotiated TLS "
                                                 "as your policy asks."),
        ([samples.json_bytes(samples.report()), _no_policy(0)],
         "No failed sessions, but 99 of the 199 were under no MTA-STS or DANE policy: senders used TLS there "
         "without being required to (no-policy-found)."),
        ([samples.json_bytes(samples.report(policies=[samples.policy(details=[
            samples.failure("certificate-expired", 4)])])), _no_policy(2)],
         "6 failed sessions: 4 where your MTA-STS or DANE policy applied (an enforced policy makes the "
         "sender refuse such a connection and retry; in testing mode it delivers anyway); 2 to a domain "
         "that publishes no policy the sender could use (no-policy-found): most senders then deliver "
         "without TLS."),
        ([], "No sessions were reported."),
    ],
)
def test_the_verdict_says_what_failed_under_which_policy(payloads: list[bytes], verdict: str) -> None:
    summary, collected = load(payloads)
    assert json.loads(render_json(summary, collected))["verdict"] == verdict


def test_a_missing_policy_domain_and_the_warnings_are_shown() -> None:
    data = samples.report(report_id="postfix", policies=[
        samples.policy(policy_type="no-policy-found", successful=5)])
    del data["policies"][0]["policy"]["policy-domain"]
    summary, collected = load([samples.json_bytes(data)])
    warning = ("missing required field policies[0].policy.policy-domain; "
               "the sessions are counted without a domain")
    text = render_text(summary, collected)
    assert re.search(r"^no-policy-found +\(missing\) +- +5 +0 +0\.00 %$", text, re.M)
    assert warning in " ".join(text.split())
    as_json = json.loads(render_json(summary, collected))
    assert as_json["policies"][0]["policy-domain"] is None
    assert as_json["warnings"] == [{"source": "input 0", "organization-name": "google.com",
                                    "report-id": "postfix", "warning": warning}]
    page = render_html(summary, collected)
    assert f"<li>input 0: {warning}</li>" in page
    rows = list(csv.DictReader(io.StringIO(render_csv(collected))))
    assert rows[0]["policy-domain"] == ""
