"""Every real-world report in ``../shared/reports-real/`` read right: the facts checked by hand in
its ``expected.json`` for every file, the faults of particular reporters (draft field names, bare
media types, details that disagree with the summary), and every failure-details field of every
report shown in the text, HTML, JSON and CSV outputs.

The corpus lives beside the checkout (CI copies ``shared/`` next to the clone); it is read in place.
"""

from __future__ import annotations

import csv
import html
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts.tlsrpt.model import Report
from postfix_mtasts.tlsrpt.render import render_csv, render_html, render_json, render_text
from postfix_mtasts.tlsrpt.sources import Broken, Found, Ignored, Item, collect, read_path
from postfix_mtasts.tlsrpt.summary import summarize
from tests.conftest import require

#: The corpus, relative to the checkout root.
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "reports-real"
EXPECTED = CORPUS / "expected.json"
#: Guard against a hung child; not a performance assertion.
CHILD_DEADLINE = 120


def expected_files() -> dict[str, dict[str, Any]]:
    if not EXPECTED.is_file():
        return {}
    files: dict[str, dict[str, Any]] = json.loads(EXPECTED.read_text(encoding="utf-8"))["files"]
    return files


def corpus() -> Path:
    require(f"the report corpus {CORPUS}", EXPECTED.is_file())
    return CORPUS


def read_one(name: str) -> tuple[list[Item], Report]:
    items = list(read_path(str(corpus() / name)))
    assert [type(item) for item in items] == [Found], items
    found = items[0]
    assert isinstance(found, Found)
    return items, found.report


def test_the_corpus_is_there_and_complete() -> None:
    folder = corpus()
    on_disk = {p.name for p in folder.iterdir()} - {"README.md", "expected.json"}
    assert on_disk == set(expected_files())
    assert len(on_disk) == 25


@pytest.mark.parametrize("name", sorted(expected_files()) or ["(corpus missing)"])
def test_each_file_gives_the_facts_checked_by_hand(name: str) -> None:
    facts = expected_files().get(name)
    require(f"the report corpus {CORPUS}", facts is not None)
    assert facts is not None
    _, report = read_one(name)
    assert report.organization_name == facts["organization"]
    assert report.successful_sessions == facts["successful"]
    assert report.failed_sessions == facts["failed"]
    if facts["policy_domains"]:
        assert sorted({p.policy_domain for p in report.policies if p.policy_domain}) == sorted(
            facts["policy_domains"])


def test_the_draft_name_failure_error_code_is_the_reason_code() -> None:
    _, report = read_one("danmarg_sample.json")
    validation = report.policies[0].failure_details[2]
    assert (validation.result_type, validation.failure_reason_code) == (
        "validation-failure", "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED")
    assert report.warnings == ()


def test_a_report_typed_application_tlsrpt_without_json_is_found() -> None:
    items, report = read_one("stalwart_mail-auth_rpt02.eml")
    assert items[0].source.endswith("attachment mail.sender.example!example.com!1013662812!1013749130.json")
    (detail,) = report.policies[0].failure_details
    assert (detail.result_type, detail.receiving_ip, detail.receiving_mx_hostname) == (
        "certificate-host-mismatch", "234.234.234.234", "demo.example.com")


@pytest.mark.parametrize(("name", "detailed", "summary"), [
    ("neztore_microsoft-report.json", 3, 2),
    ("parsedmarc_mail.ru.json", 2, 1),
])
def test_details_that_add_up_to_more_than_the_summary_are_flagged(name: str, detailed: int,
                                                                    summary: int) -> None:
    _, report = read_one(name)
    assert report.failed_sessions == summary  # the summary is authoritative (RFC 8460 §4.4)
    assert (f"policies[0]: failure-details add up to {detailed} failed sessions, more than the summary's "
            f"total-failure-session-count {summary}; the summary's figure is counted") in report.warnings


def test_what_is_odd_in_a_hand_edited_report_is_said() -> None:
    _, report = read_one("neztore_microsoft-report.json")
    assert report.warnings[:3] == (
        "policies[0].failure-details[0].result-type 'Testing' is not a result type of RFC 8460 §4.3",
        "policies[0].failure-details[0].sending-mta-ip 'x.x.x.x' is not an IP address",
        "policies[0].failure-details[0] has a field RFC 8460 does not define: "
        "additional-info-uri = 'testing.josh.scot'",
    )


def test_real_reporters_send_no_warnings() -> None:
    corpus()
    names = [name for name, facts in expected_files().items()
             if facts["kind"].startswith("real") and not name.startswith(("neztore", "parsedmarc_mail.ru"))]
    assert len(names) >= 12
    for name in names:
        assert read_one(name)[1].warnings == (), name


def test_microsofts_tlsa_records_in_one_string_are_unpacked() -> None:
    _, report = read_one("kravietz_microsoft1.eml")
    sts, tlsa = report.policies
    assert sts.mode == "enforce" and sts.mx_hosts == ()
    assert len(tlsa.policy_strings) == 13
    assert tlsa.policy_strings[0] == "2 1 1 025490860B498AB73C6A12F27A49AD5FE230FAFE3AC8F6112C9B7D0AAD46941D"
    assert all(line.startswith("2 1 1 ") and len(line) == 70 for line in tlsa.policy_strings)


def test_the_rfc_examples_line_wrapped_uri_is_joined() -> None:
    joined = "https://reports.company-x.example/report_info?id=5065427c-23d3#StarttlsNotSupported"
    for name in ("parsedmarc_rfc8460.json", "kravietz_rfc8460.json", "robalexdev_testing.json"):
        starttls = read_one(name)[1].policies[0].failure_details[1]
        assert starttls.additional_information == joined, name


def test_a_mail_ru_fetch_error_keeps_its_reason_and_its_day() -> None:
    _, report = read_one("kravietz_mail.ru.eml")
    (detail,) = report.policies[0].failure_details
    assert detail.failure_reason_code is not None
    assert detail.failure_reason_code.startswith('unable to do http request: Get "https://mta-sts.krvtz.net/')
    assert (detail.sending_mta_ip, detail.receiving_mx) == (None, "-")
    assert (report.start.isoformat(), report.end.isoformat()) == (
        "2023-01-25T00:00:00+00:00", "2023-01-26T00:00:00+00:00")


def _outputs(names: list[str]) -> tuple[str, str, dict[str, Any], list[dict[str, str]]]:
    collected = collect(item for name in names for item in read_path(str(corpus() / name)))
    summary = summarize(collected.reports)
    page = render_html(summary, collected)
    text = " ".join(html.unescape(page).split())
    return (" ".join(render_text(summary, collected).split()), text,
            json.loads(render_json(summary, collected)),
            list(csv.DictReader(io.StringIO(render_csv(collected)))))


@pytest.mark.parametrize("name", sorted(expected_files()) or ["(corpus missing)"])
def test_every_output_carries_every_field_of_every_failure(name: str) -> None:
    require(f"the report corpus {CORPUS}", name in expected_files())
    _, report = read_one(name)
    text, page, data, rows = _outputs([name])
    for policy in report.policies:
        for detail in policy.failure_details:
            fields = {
                "result-type": detail.result_type,
                "sending-mta-ip": detail.sending_mta_ip,
                "receiving-mx-hostname": detail.receiving_mx_hostname,
                "receiving-mx-helo": detail.receiving_mx_helo,
                "receiving-ip": detail.receiving_ip,
                "additional-information": detail.additional_information,
                "failure-reason-code": detail.failure_reason_code,
            }
            present = {key: value for key, value in fields.items() if value is not None}
            for key, value in present.items():
                assert " ".join(value.split()) in text, (key, value)
                assert " ".join(value.split()) in page, (key, value)
            assert any(all(f.get(k) == v for k, v in present.items())
                       and f["failed-sessions"] >= detail.failed_session_count for f in data["failures"])
            in_csv = {("result" if key == "result-type" else key): value for key, value in present.items()}
            assert any(all(r[k] == v for k, v in in_csv.items())
                       and r["sessions"] == str(detail.failed_session_count) for r in rows)


def test_no_policy_found_failures_get_a_truthful_verdict() -> None:
    text, page, data, _ = _outputs(["robalexdev_report.json"])
    for shown in (text, page, data["verdict"], data["no-policy-found"]["meaning"]):
        assert "nothing is broken" not in shown.lower()
    assert data["verdict"].startswith("102 failed sessions: 102 to a domain that publishes no policy the "
                                      "sender could use (no-policy-found)")
    assert "publishes no policy the sender could use" in data["no-policy-found"]["meaning"]
    assert "unencrypted" in data["no-policy-found"]["meaning"]
    assert data["no-policy-found"]["failed-sessions"] == 102
    assert "no-policy-found: 99 successful, 102 failed sessions" in text
    assert "102 failed sessions came without failure details." in text


def run_report(*args: str) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [sys.executable, "-m", "postfix_mtasts.cli", "report", *args],
        capture_output=True, text=True, timeout=CHILD_DEADLINE, check=False,
    )
    assert "Traceback" not in completed.stderr, completed.stderr
    return completed


#: Reports that appear more than once in the corpus (same organisation and report-id), checked by hand:
#: the first file read (name order) is counted, the others are duplicates; only neztore's differ.
DUPLICATES = {
    "kravietz_mail.ru.json": "kravietz_mail.ru.eml",
    "kravietz_rfc8460.json": "danmarg_sample.json",
    "marcbradshaw_report.json": "marcbradshaw_email.eml",
    "neztore_microsoft-report.json.gz": "neztore_microsoft-report.json",
    "parsedmarc_rfc8460.json": "danmarg_sample.json",
    "robalexdev_test.eml": "danmarg_sample.json",
    "stalwart_mail-auth_rpt01.eml": "danmarg_sample.json",
}


def test_the_whole_corpus_through_the_command() -> None:
    names = sorted(expected_files())
    require(f"the report corpus {CORPUS}", bool(names))
    result = run_report(*(str(corpus() / name) for name in names), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    counted = [name for name in names if name not in DUPLICATES]
    facts = expected_files()
    assert data["reports"] == len(counted) == 18
    assert data["successful-sessions"] == sum(facts[name]["successful"] for name in counted)
    assert data["failed-sessions"] == sum(facts[name]["failed"] for name in counted)
    assert data["broken"] == [] and data["skipped"] == []
    duplicates = {Path(d["source"].split(" attachment")[0]).name:
                  (Path(d["first-source"].split(" attachment")[0]).name, d["conflict"])
                  for d in data["duplicates"]}
    assert duplicates == {copy: (first, copy.startswith("neztore")) for copy, first in DUPLICATES.items()}
    assert {w["report-id"] for w in data["warnings"]} == {
        "133988091029006454+josh.scot", "b28254de-7b2e-be36-bb5c-4c3b92da8b25@mail.ru"}
    lines = result.stderr.splitlines()
    assert any(line.endswith("with different content; the first copy is counted") for line in lines)
    assert any(": warning: policies[0]: failure-details add up to 2 failed sessions" in line
               for line in lines)


def test_every_file_of_the_corpus_is_a_report_or_a_mail_holding_one() -> None:
    corpus()
    for name in expected_files():
        items = list(read_path(str(corpus() / name)))
        assert not [item for item in items if isinstance(item, Broken | Ignored)], name
