"""``postfix-mtasts report`` as an admin runs it, in a real child process: exit status, stderr
reasons, stdin, --json, --csv, and the --html page opened by headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require
from tests.support import tlsrpt_samples as samples

#: Guard against a hung child; not a performance assertion.
CHILD_DEADLINE = 120


def run_report(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [sys.executable, "-m", "postfix_mtasts.cli", "report", *args],
        input=stdin.decode("latin-1"), capture_output=True, text=True, encoding="latin-1",
        timeout=CHILD_DEADLINE, check=False,
    )
    assert "Traceback" not in completed.stderr, completed.stderr
    return completed


def day_report(day: int, org: str = "google.com", successful: int = 1000,
               failures: tuple[tuple[str, int], ...] = ()) -> samples.Report:
    return samples.report(
        org=org, report_id=f"{org}-{day}",
        start=f"2024-05-{day:02d}T00:00:00Z", end=f"2024-05-{day:02d}T23:59:59Z",
        policies=[samples.policy(successful=successful,
                                 details=[samples.failure(t, n) for t, n in failures])],
    )


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    """A week of reports in the forms they arrive in: .json.gz files, mail, an mbox and a Maildir."""
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / samples.file_name(day_report(1))).write_bytes(
        samples.gzip_bytes(day_report(1, failures=(("certificate-expired", 3),))))
    (folder / "2.json").write_bytes(samples.json_bytes(day_report(2, successful=900)))
    (folder / "3.eml").write_bytes(samples.mail_message(
        day_report(3, org="Microsoft Corporation", failures=(("starttls-not-supported", 2),)),
        media_type="application/tlsrpt+gzip"))
    (folder / "inbox.mbox").write_bytes(samples.mbox([
        samples.mail_message(day_report(5, successful=1200), media_type="application/tlsrpt+json"),
        samples.plain_message(),
    ]))
    samples.write_maildir(folder / "Maildir", cur=[samples.mail_message(
        day_report(7, failures=(("sts-policy-fetch-error", 5), ("certificate-expired", 1))))])
    return folder


def test_a_folder_of_reports_exits_0(reports: Path) -> None:
    result = run_report(str(reports))
    assert result.returncode == 0, result.stderr
    assert "TLS reports: 5 read, 0 broken" in result.stdout
    assert "Sessions: 5,111 in all, 5,100 successful, 11 failed" in result.stdout
    assert re.search(r"^certificate-expired +192\.0\.2\.10 +mx1\.example\.com +4$", result.stdout, re.M)
    assert "Usual fix: renew it" in result.stdout
    assert result.stderr == (
        f"postfix-mtasts report: {reports}/inbox.mbox message 2: "
        "no TLS report attached (subject: Lunch on Friday?); skipped\n"
    )


def test_broken_reports_are_named_the_rest_still_count_and_exit_1(reports: Path) -> None:
    negative = day_report(4)
    negative["policies"][0]["summary"]["total-successful-session-count"] = -5
    backwards = day_report(6)
    backwards["date-range"]["end-datetime"] = "2024-05-05T00:00:00Z"
    (reports / "4.json").write_bytes(samples.json_bytes(negative))
    (reports / "6.json.gz").write_bytes(samples.gzip_bytes(backwards))
    (reports / "bad.json").write_bytes(b'{"organization-name": "x", ')
    result = run_report(str(reports))
    assert result.returncode == 1
    assert "TLS reports: 5 read, 3 broken" in result.stdout
    assert "5,100 successful, 11 failed" in result.stdout
    lines = result.stderr.splitlines()
    assert f"postfix-mtasts report: {reports}/4.json: policies[0].summary.total-successful-session-count " \
           "is -5; counts cannot be negative; skipped" in lines
    assert f"postfix-mtasts report: {reports}/6.json.gz: date-range ends before it starts " \
           "(2024-05-05T00:00:00+00:00 < 2024-05-06T00:00:00+00:00); skipped" in lines
    assert any(line.startswith(f"postfix-mtasts report: {reports}/bad.json: bad JSON: ") for line in lines)


def test_nothing_readable_exits_2(tmp_path: Path) -> None:
    (tmp_path / "only.json").write_bytes(b"[]")
    result = run_report(str(tmp_path / "only.json"), str(tmp_path / "missing.json.gz"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"postfix-mtasts report: {tmp_path}/only.json: the report must be a JSON object, not a list; skipped",
        f"postfix-mtasts report: {tmp_path}/missing.json.gz: cannot read: No such file or directory; skipped",
        "postfix-mtasts report: no TLS report could be read",
    ]


def test_nothing_readable_with_json_still_prints_json_with_the_reasons(tmp_path: Path) -> None:
    (tmp_path / "only.json").write_bytes(b"[]")
    result = run_report(str(tmp_path / "only.json"), str(tmp_path / "missing.json.gz"), "--json")
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert (data["reports"], data["successful-sessions"], data["failed-sessions"]) == (0, 0, 0)
    assert data["verdict"] == "No sessions were reported."
    assert data["broken"] == [
        {"source": f"{tmp_path}/only.json", "reason": "the report must be a JSON object, not a list"},
        {"source": f"{tmp_path}/missing.json.gz", "reason": "cannot read: No such file or directory"},
    ]
    assert result.stderr.splitlines()[-1] == "postfix-mtasts report: no TLS report could be read"


def test_warnings_and_conflicting_copies_are_told_and_the_reports_still_count(tmp_path: Path) -> None:
    postfix_style = day_report(1)
    postfix_style["policies"] = [samples.policy(policy_type="no-policy-found", successful=3, failed=1)]
    del postfix_style["policies"][0]["policy"]["policy-domain"]
    (tmp_path / "a.json").write_bytes(samples.json_bytes(postfix_style))
    postfix_style["policies"][0]["summary"]["total-successful-session-count"] = 4
    (tmp_path / "b.json").write_bytes(samples.json_bytes(postfix_style))
    result = run_report(str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "TLS reports: 1 read, 0 broken, 1 duplicate" in result.stdout
    assert result.stderr.splitlines() == [
        f"postfix-mtasts report: {tmp_path}/b.json: report 'google.com-1' of google.com was already read "
        f"from {tmp_path}/a.json with different content; the first copy is counted",
        f"postfix-mtasts report: {tmp_path}/a.json: warning: missing required field "
        "policies[0].policy.policy-domain; the sessions are counted without a domain",
    ]


@pytest.mark.parametrize("args", [(), ("-",)])
def test_standard_input(args: tuple[str, ...]) -> None:
    mailbox = samples.mbox([samples.mail_message(day_report(1)), samples.mail_message(day_report(2))])
    result = run_report(*args, "--json", stdin=mailbox)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["reports"], data["successful-sessions"]) == (2, 2000)


def test_json_and_csv_output_parse_back(reports: Path) -> None:
    as_json = run_report(str(reports), "--json")
    data = json.loads(as_json.stdout)
    assert (data["reports"], data["successful-sessions"], data["failed-sessions"]) == (5, 5100, 11)
    assert [t["result-type"] for t in data["result-types"]] == [
        "sts-policy-fetch-error", "certificate-expired", "starttls-not-supported"]
    as_csv = run_report(str(reports), "--csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert sum(int(r["sessions"]) for r in rows if r["result"] == "successful") == 5100
    assert sum(int(r["sessions"]) for r in rows if r["result"] != "successful") == 11
    both = run_report(str(reports), "--json", "--csv")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_an_html_file_that_cannot_be_written(reports: Path, tmp_path: Path) -> None:
    result = run_report(str(reports), "--html", str(tmp_path / "no" / "such" / "dir.html"))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"postfix-mtasts report: cannot write {tmp_path}/no/such/dir.html: No such file or directory")


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--enable-logging=stderr", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=CHILD_DEADLINE, check=False,
    )


def test_the_html_page_renders_in_headless_chromium(reports: Path, tmp_path: Path) -> None:
    require("chromium", shutil.which("chromium") is not None)
    page = tmp_path / "tls-reports.html"
    result = run_report(str(reports), "--html", str(page))
    assert result.returncode == 0, result.stderr
    url = page.resolve().as_uri()

    dumped = _chromium("--dump-dom", url, profile=tmp_path / "profile")
    assert dumped.returncode == 0, dumped.stderr
    assert "CONSOLE" not in dumped.stderr and "net::ERR" not in dumped.stderr, dumped.stderr
    dom = dumped.stdout
    assert '<svg id="chart"' in dom
    bars = re.findall(r'<rect class="bar (successful|failed)" data-day="([\d-]+)" data-sessions="(\d+)"', dom)
    assert len(bars) == 14  # 1-7 May, days without reports drawn as zero
    assert ("successful", "2024-05-05", "1200") in bars
    assert ("failed", "2024-05-07", "6") in bars and ("failed", "2024-05-04", "0") in bars
    assert re.search(r'id="successful-count"><b>5,100</b>', dom)
    assert re.search(r'id="failed-count"><b>11</b>', dom)
    assert "Microsoft Corporation" in dom
    assert "certificate-expired (4 failed sessions)" in dom
    assert "renew it (check your ACME renewal" in dom

    shot = tmp_path / "tls-reports.png"
    taken = _chromium("--window-size=1100,1500", f"--screenshot={shot}", url, profile=tmp_path / "profile2")
    assert taken.returncode == 0, taken.stderr
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 20_000


def test_the_report_package_is_plain_python(tmp_path: Path) -> None:
    """Reading reports needs no reactor: importing and running it loads no Twisted or network code."""
    path = tmp_path / "r.json"
    path.write_bytes(samples.json_bytes(day_report(1)))
    program = (
        "import argparse, io, sys\n"
        "import postfix_mtasts.tlsrpt as t\n"
        f"code = t.main(argparse.Namespace(paths=[{str(path)!r}], json=True, csv=False, html=None),"
        " stdout=io.StringIO())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'treq', 'dns', 'asyncio'))\n"
        "print(code, ','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=CHILD_DEADLINE, check=True)
    assert result.stdout.strip() == "0"
