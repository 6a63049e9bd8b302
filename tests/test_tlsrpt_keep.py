"""``postfix-mtasts report ingest`` and ``report show`` from the command line.

The real-world corpus (../shared/reports-real beside the checkout) ingested
twice stores nothing new the second time, and ``report show --json`` then
equals the sum of the unique reports (facts from the corpus's hand-checked
expected.json, report-ids read independently of the project's readers). Exit
status: 0 when all input was dealt with, 75 (EX_TEMPFAIL) when the store or
the configuration cannot be used, including a store that is read-only or a
file that is not ours, which is left untouched.
"""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts import cli
from postfix_mtasts.tlsrpt import keep
from tests.conftest import require
from tests.test_tlsrpt_store import raw

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "reports-real"
ROOT = Path(__file__).resolve().parents[1]


def corpus() -> Path:
    require(f"the real-world report corpus at {CORPUS}", (CORPUS / "expected.json").is_file())
    return CORPUS


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "postfix-mtasts.toml"
    path.write_text(f'[reports]\npath = "{tmp_path / "state" / "reports.sqlite3"}"\n')
    return path


def run(action: str, *argv: str, stdin: bytes = b"", monkeypatch: pytest.MonkeyPatch | None = None,
        ) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = keep.run(action, list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


# --- an oracle that does not use the project's readers ----------------------------


def report_ids(path: Path) -> list[tuple[str, str]]:
    """(organisation, report-id) of each report in a corpus file, read with the
    standard library alone: JSON, gzip, or the JSON/gzip parts of a message."""
    data = path.read_bytes()
    blobs: list[bytes] = []
    if path.suffix == ".eml":
        message = email.message_from_bytes(data, policy=email.policy.compat32)
        for part in message.walk():
            payload = part.get_payload(decode=True)
            if (isinstance(payload, bytes) and payload[:2] == b"\x1f\x8b") or (
                isinstance(payload, bytes) and payload.lstrip()[:1] == b"{"
            ):
                blobs.append(payload)  # type: ignore[arg-type]
    else:
        blobs.append(data)
    ids = []
    for blob in blobs:
        if blob[:2] == b"\x1f\x8b":
            blob = gzip.decompress(blob)
        doc = json.loads(blob)
        if isinstance(doc, dict) and "report-id" in doc:
            ids.append((doc["organization-name"], doc["report-id"]))
    return ids


def unique_expected(root: Path) -> dict[str, Any]:
    """Totals over the first file (in name order) of each (organisation, report-id)."""
    facts = json.loads((root / "expected.json").read_text())["files"]
    seen: set[tuple[str, str]] = set()
    totals: dict[str, Any] = {"reports": 0, "successful": 0, "failed": 0, "domains": set(), "by_org": {}}
    for name in sorted(facts):
        [(organization, report_id)] = report_ids(root / name)
        key = (organization.casefold(), report_id)
        if key in seen:
            continue
        seen.add(key)
        fact = facts[name]
        totals["reports"] += 1
        totals["successful"] += fact["successful"]
        totals["failed"] += fact["failed"]
        totals["domains"].update(fact["policy_domains"])
        ok, bad = totals["by_org"].get(fact["organization"], (0, 0))
        totals["by_org"][fact["organization"]] = (ok + fact["successful"], bad + fact["failed"])
    return totals


# --- the corpus -------------------------------------------------------------------


def test_corpus_ingested_twice_stores_each_unique_report_once(config: Path) -> None:
    root = corpus()
    expected = unique_expected(root)
    files = len(json.loads((root / "expected.json").read_text())["files"])
    others = len([p for p in root.iterdir() if p.is_file()]) - files  # README.md, expected.json
    code, out, err = run("ingest", "--config", str(config), str(root))
    assert code == 0, err
    new = expected["reports"]
    assert out == f"{new} new, {files - new} already stored, {others} unreadable\n"
    code, out, err = run("ingest", "--config", str(config), str(root))
    assert code == 0, err
    assert out == f"0 new, {files} already stored, {others} unreadable\n"

    code, out, err = run("show", "--config", str(config), "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["reports"], shown["successful-sessions"], shown["failed-sessions"]) == (
        expected["reports"], expected["successful"], expected["failed"]
    )
    by_org: dict[str, tuple[int, int]] = {}
    for reporter in shown["reporters"]:
        ok, bad = by_org.get(reporter["organization-name"], (0, 0))
        by_org[reporter["organization-name"]] = (ok + reporter["successful-sessions"],
                                                 bad + reporter["failed-sessions"])
    assert by_org == expected["by_org"]
    assert {p["policy-domain"] for p in shown["policies"]} == expected["domains"]


def test_show_equals_report_over_the_same_files(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the store gives back adds up exactly as reading the files directly."""
    root = corpus()
    assert run("ingest", "--config", str(config), str(root))[0] == 0
    shown = json.loads(run("show", "--config", str(config), "--json")[1])
    cli.main(["report", "--json", str(root)])
    direct = json.loads(capsys.readouterr().out)
    for key in ("reports", "successful-sessions", "failed-sessions",
                "failed-sessions-without-details", "reporters", "policies", "failures",
                "result-types", "days"):
        assert shown[key] == direct[key], key


def test_conflicting_copies_are_logged_one_line_each(config: Path, tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(raw(successful=1))
    (tmp_path / "b.json").write_bytes(raw(successful=2))
    paths = (str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    code, out, err = run("ingest", "--config", str(config), *paths)
    assert (code, out) == (0, "1 new, 1 already stored, 0 unreadable\n")
    [line] = [line for line in err.splitlines() if "conflict" in line]
    assert "b.json" in line and "a.json" in line and "kept the first" in line


# --- show's selections --------------------------------------------------------------


def test_show_since_and_domain(config: Path, tmp_path: Path) -> None:
    (tmp_path / "old.json").write_bytes(raw(report_id="old", start="2000-01-01T00:00:00Z",
                                            end="2000-01-01T23:59:59Z", successful=5))
    (tmp_path / "new.json").write_bytes(raw(report_id="new", start="2099-01-01T00:00:00Z",
                                            end="2099-01-01T23:59:59Z", domains=("a.example", "b.example")))
    paths = (str(tmp_path / "old.json"), str(tmp_path / "new.json"))
    assert run("ingest", "--config", str(config), *paths)[0] == 0
    everything = json.loads(run("show", "--config", str(config), "--json")[1])
    assert (everything["reports"], everything["successful-sessions"]) == (2, 25)
    recent = json.loads(run("show", "--config", str(config), "--json", "--since", "30")[1])
    assert (recent["reports"], recent["successful-sessions"]) == (1, 20)
    one_domain = json.loads(run("show", "--config", str(config), "--json", "--domain", "b.example")[1])
    totals = (one_domain["reports"], one_domain["successful-sessions"], one_domain["failed-sessions"])
    assert totals == (1, 10, 2)
    assert [p["policy-domain"] for p in one_domain["policies"]] == ["b.example"]
    code, out, _ = run("show", "--config", str(config), "--domain", "nowhere.example")
    assert (code, out) == (0, "no reports stored for that selection\n")


def test_show_csv_and_html(config: Path, tmp_path: Path) -> None:
    (tmp_path / "r.json").write_bytes(raw())
    run("ingest", "--config", str(config), str(tmp_path / "r.json"))
    code, out, _ = run("show", "--config", str(config), "--csv")
    assert code == 0 and out.splitlines()[0].startswith("organization") and len(out.splitlines()) == 3
    page = tmp_path / "page.html"
    code, out, _ = run("show", "--config", str(config), "--html", str(page))
    assert code == 0 and "Example Mail" in out
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_show_of_an_empty_store_is_valid_json(config: Path) -> None:
    code, out, _ = run("show", "--config", str(config), "--json")
    assert code == 0 and json.loads(out)["reports"] == 0


# --- standard input, bad input ------------------------------------------------------


def test_standard_input_is_read(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = (
        b"From: reporter@example.net\r\nTo: tlsrpt@example.org\r\nSubject: Report\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type="tlsrpt"; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nA report.\r\n"
        b"--b\r\nContent-Type: application/tlsrpt+gzip\r\n"
        b'Content-Disposition: attachment; filename="r.json.gz"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(gzip.compress(raw())).replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )
    code, out, err = run("ingest", "--config", str(config), "-", stdin=message, monkeypatch=monkeypatch)
    assert (code, out) == (0, "1 new, 0 already stored, 0 unreadable\n"), err
    code, out, err = run("ingest", "--config", str(config), "-",
                         stdin=b"Subject: hello\nMessage-ID: <hi@example.net>\n\nno report\n",
                         monkeypatch=monkeypatch)
    assert (code, out) == (0, "0 new, 0 already stored, 1 unreadable\n")
    assert err == "postfix-mtasts report ingest: message <hi@example.net>: no TLS report attached" \
        " (subject: hello); skipped\n"


def test_bad_input_never_stops_the_rest(config: Path, tmp_path: Path) -> None:
    """A gzip bomb (over 50 MB once inflated), a zip bomb, invalid JSON, wrong
    types: each refused with a reason; the good report after them is stored."""
    bad = tmp_path / "bad"
    bad.mkdir()
    inflated = b'{"organization-name": "' + b" " * (51 * 1024 * 1024) + b'"}'
    (bad / "1-bomb.json.gz").write_bytes(gzip.compress(inflated, compresslevel=9))
    import zipfile

    with zipfile.ZipFile(bad / "2-bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("report.json", inflated)
    (bad / "3-invalid.json").write_bytes(b'{"organization-name": "x", ')
    wrong = json.loads(raw())
    wrong["policies"][0]["summary"]["total-successful-session-count"] = "ten"
    (bad / "4-wrong-types.json").write_text(json.dumps(wrong))
    (bad / "5-truncated.json.gz").write_bytes(gzip.compress(raw())[:40])
    (bad / "6-good.json").write_bytes(raw())
    code, out, err = run("ingest", "--config", str(config), str(bad))
    assert (code, out) == (0, "1 new, 0 already stored, 5 unreadable\n"), err
    lines = err.splitlines()
    assert len(lines) == 5
    assert "1-bomb.json.gz" in lines[0] and "decompresses to more than" in lines[0]
    assert "2-bomb.zip" in lines[1] and "decompresses to more than" in lines[1]
    assert "3-invalid.json" in lines[2] and "bad JSON" in lines[2]
    assert "4-wrong-types.json" in lines[3] and "must be a whole number" in lines[3]
    assert "5-truncated.json.gz" in lines[4]


# --- the store cannot be used: 75, and nothing touched ------------------------------


def test_a_file_that_is_not_ours_is_refused_and_left_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE mine (x)")
    conn.close()
    before = foreign.read_bytes()
    config = tmp_path / "c.toml"
    config.write_text(f'[reports]\npath = "{foreign}"\n')
    (tmp_path / "r.json").write_bytes(raw())
    code, out, err = run("ingest", "--config", str(config), str(tmp_path / "r.json"))
    assert (code, out) == (keep.EX_TEMPFAIL, "")
    assert err.count("\n") == 1 and str(foreign) in err and "not a postfix-mtasts report store" in err
    code, _, err = run("show", "--config", str(config))
    assert code == keep.EXIT_ERROR and str(foreign) in err
    assert foreign.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "foreign.sqlite3", "r.json"]


def test_a_bad_configuration_defers(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[reports]\npaht = "/x"\n')
    code, _, err = run("ingest", "--config", str(config), "-")
    assert code == keep.EX_TEMPFAIL and "reports.paht" in err and err.count("\n") == 1


@pytest.fixture
def shared_directory() -> Iterator[Path]:
    """A directory another user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="mtasts-keep-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_a_read_only_store_defers_and_keeps_what_it_has(shared_directory: Path) -> None:
    """Run as an unprivileged user (root ignores file modes): a store it may
    read but not write makes ingest exit 75; the store is unchanged."""
    require("root, to run ingest as user nobody", os.geteuid() == 0 and shutil.which("setpriv") is not None)
    store = shared_directory / "reports.sqlite3"
    config = shared_directory / "c.toml"
    config.write_text(f'[reports]\npath = "{store}"\n')
    (shared_directory / "first.json").write_bytes(raw(report_id="first"))
    (shared_directory / "second.json").write_bytes(raw(report_id="second"))
    assert run("ingest", "--config", str(config), str(shared_directory / "first.json"))[0] == 0
    for path in shared_directory.iterdir():
        path.chmod(0o644)
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    command = [sys.executable, "-m", "postfix_mtasts.cli", "report", "ingest", "--config", str(config)]
    result = subprocess.run([*nobody, *command, "-"], input=(shared_directory / "second.json").read_bytes(),
                            capture_output=True, cwd=ROOT, check=False)
    assert result.returncode == keep.EX_TEMPFAIL, result.stderr
    assert result.stdout == b""
    assert result.stderr.count(b"\n") == 1 and str(store).encode() in result.stderr
    shown = json.loads(run("show", "--config", str(config), "--json")[1])
    assert [r["reports"] for r in shown["reporters"]] == [1]
