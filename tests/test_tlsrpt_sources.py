"""Finding reports where admins keep them: files, gzip, zip, mail, mbox, Maildir, directories, stdin.
Inputs are recognised by content; broken ones are named and the rest still count."""

from __future__ import annotations

import base64
import gzip
import io
import os
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from postfix_mtasts.tlsrpt import sources
from postfix_mtasts.tlsrpt.sources import Broken, Found, Ignored, Item, collect, read_inputs, read_path
from tests.support import tlsrpt_samples as samples


def one_day(day: int, report_id: str | None = None, org: str = "google.com", successful: int = 100,
            failures: int = 0) -> samples.Report:
    details = [samples.failure("certificate-expired", failures)] if failures else []
    return samples.report(
        org=org, report_id=report_id or f"{org}-{day}",
        start=f"2024-05-{day:02d}T00:00:00Z", end=f"2024-05-{day:02d}T23:59:59Z",
        policies=[samples.policy(successful=successful, details=details)],
    )


def found_ids(items: list[Item]) -> list[str]:
    return [item.report.report_id for item in items if isinstance(item, Found)]


def broken(items: list[Item]) -> list[tuple[str, str]]:
    return [(item.source, item.reason) for item in items if isinstance(item, Broken)]


def test_plain_json_and_gzip_files(tmp_path: Path) -> None:
    plain = tmp_path / samples.file_name(one_day(1), gz=False)
    plain.write_bytes(samples.json_bytes(one_day(1)))
    packed = tmp_path / samples.file_name(one_day(2))
    packed.write_bytes(samples.gzip_bytes(one_day(2)))
    assert packed.name == "google.com!example.com!1714608000!1714694399!001.json.gz"
    items = list(read_inputs([str(plain), str(packed)], io.BytesIO()))
    assert found_ids(items) == ["google.com-1", "google.com-2"]
    assert [item.source for item in items] == [str(plain), str(packed)]


def test_content_decides_not_the_file_name(tmp_path: Path) -> None:
    (tmp_path / "report.txt").write_bytes(samples.gzip_bytes(one_day(1)))
    (tmp_path / "report.json.gz").write_bytes(samples.json_bytes(one_day(2)))
    (tmp_path / "mail.json").write_bytes(samples.mail_message(one_day(3)))
    items = list(read_path(str(tmp_path)))
    assert sorted(found_ids(items)) == ["google.com-1", "google.com-2", "google.com-3"]


def test_zip_archive_members_are_read(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.json", samples.json_bytes(one_day(1)))
        archive.writestr("b.json.gz", samples.gzip_bytes(one_day(2)))
        archive.writestr("c.json", b"{not json")
    path = tmp_path / "reports.zip"
    path.write_bytes(buffer.getvalue())
    items = list(read_path(str(path)))
    assert found_ids(items) == ["google.com-1", "google.com-2"]
    assert broken(items) == [
        (f"{path} member c.json",
         "bad JSON: Expecting property name enclosed in double quotes at line 1 column 2")
    ]


@pytest.mark.parametrize("media_type", ["application/tlsrpt+json", "application/tlsrpt+gzip"])
def test_a_mail_message_with_the_report_attached(tmp_path: Path, media_type: str) -> None:
    path = tmp_path / "report.eml"
    path.write_bytes(samples.mail_message(one_day(1, failures=4), media_type=media_type))
    items = list(read_path(str(path)))
    assert found_ids(items) == ["google.com-1"]
    name = samples.file_name(one_day(1), gz=media_type.endswith("gzip"))
    assert items[0].source == f"{path} attachment {name}"
    assert isinstance(items[0], Found) and items[0].report.failed_sessions == 4


@pytest.mark.parametrize(
    ("media_type", "filename"),
    [
        ("application/gzip", "google.com!example.com!1714608000!1714694399!001.json.gz"),
        ("application/octet-stream", "report.json.gz"),
        ("application/json", None),
        ("text/plain", "report.json"),
    ],
)
def test_media_types_reporters_use_instead(tmp_path: Path, media_type: str, filename: str | None) -> None:
    payload = samples.gzip_bytes(one_day(1)) if "gz" in (filename or "") else samples.json_bytes(one_day(1))
    message = samples.mail_message(payload, media_type=media_type, filename=filename)
    assert found_ids(list(sources.read_bytes("m", message))) == ["google.com-1"]


def test_an_unrelated_octet_stream_attachment_is_no_report() -> None:
    message = samples.mail_message(b"\x00\x01binary", media_type="application/octet-stream",
                                   filename="invoice.pdf")
    items = list(sources.read_bytes("m", message))
    assert items == [Ignored("m", "no TLS report attached (subject: Report Domain: example.com "
                                  "Submitter: google.com Report-ID: <raw>)")]


def test_a_broken_attachment_is_named_with_its_reason() -> None:
    bad = samples.report()
    bad["policies"][0]["summary"]["total-failure-session-count"] = -2
    message = samples.mail_message(bad, filename="bad.json.gz")
    assert broken(list(sources.read_bytes("inbox", message))) == [
        ("inbox attachment bad.json.gz",
         "policies[0].summary.total-failure-session-count is -2; counts cannot be negative")
    ]


def test_an_mbox_with_reports_other_mail_and_a_broken_report(tmp_path: Path) -> None:
    bad = one_day(3)
    del bad["report-id"]
    path = tmp_path / "tlsrpt.mbox"
    path.write_bytes(samples.mbox([
        samples.mail_message(one_day(1), media_type="application/tlsrpt+json"),
        samples.plain_message(),
        samples.mail_message(one_day(2, org="Microsoft Corporation"), media_type="application/tlsrpt+gzip"),
        samples.mail_message(bad),
        samples.mail_message(one_day(4)),
    ]))
    items = list(read_path(str(path)))
    assert found_ids(items) == ["google.com-1", "Microsoft Corporation-2", "google.com-4"]
    assert [item.source.split(" attachment")[0] for item in items] == [
        f"{path} message {n}" for n in (1, 2, 3, 4, 5)
    ]
    assert broken(items)[0][1] == "missing required field report-id"
    assert items[1] == Ignored(f"{path} message 2", "no TLS report attached (subject: Lunch on Friday?)")


def test_mbox_splitting_unquotes_from_lines_in_bodies() -> None:
    data = samples.mbox([samples.plain_message("one"), b"Subject: two\n\nFrom here on\n"])
    messages = sources.split_mbox(data)
    assert len(messages) == 2
    assert b"\nFrom here on\n" in messages[1]


def test_a_maildir_reads_new_and_cur_but_not_tmp(tmp_path: Path) -> None:
    maildir = samples.write_maildir(
        tmp_path / "Maildir",
        new=[samples.mail_message(one_day(1)), samples.plain_message()],
        cur=[samples.mail_message(one_day(2)),
             samples.mail_message(one_day(3), media_type="application/tlsrpt+json")],
        tmp=[samples.mail_message(one_day(9))],
    )
    (maildir / "dovecot-uidlist").write_text("3 V1 N4\n")
    items = list(read_path(str(maildir)))
    assert found_ids(items) == ["google.com-1", "google.com-2", "google.com-3"]
    assert [type(item).__name__ for item in items] == ["Found", "Ignored", "Found", "Found"]
    assert items[0].source.startswith(f"{maildir}/new/1714636800.M0P1.host attachment ")


def test_a_directory_tree_with_a_maildir_inside(tmp_path: Path) -> None:
    (tmp_path / "2024" / "05").mkdir(parents=True)
    (tmp_path / "2024" / "05" / "a.json.gz").write_bytes(samples.gzip_bytes(one_day(1)))
    (tmp_path / "2024" / "notes.txt").write_bytes(b"remember to renew the certificate\n")
    (tmp_path / ".hidden.json").write_bytes(b"not read")
    samples.write_maildir(tmp_path / "mail", new=[samples.mail_message(one_day(2))])
    items = list(read_path(str(tmp_path)))
    assert found_ids(items) == ["google.com-1", "google.com-2"]
    assert broken(items) == [
        (str(tmp_path / "2024" / "notes.txt"),
         "not a TLS report: neither JSON, gzip, zip, an mbox nor a mail message")
    ]


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (samples.json_bytes(one_day(1)), "json"),
        (samples.gzip_bytes(one_day(1)), "gzip"),
        (samples.mail_message(one_day(1)), "message"),
        (samples.mbox([samples.mail_message(one_day(1))]), "mbox"),
    ],
)
def test_standard_input_by_dash_or_no_path(payload: bytes, kind: str) -> None:
    assert sources.content_kind(payload) == kind
    for paths in ([], ["-"]):
        items = list(read_inputs(paths, io.BytesIO(payload)))
        assert found_ids(items) == ["google.com-1"]
        assert items[0].source.startswith("standard input")


def test_files_that_cannot_be_read(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    bad_gzip = tmp_path / "cut.json.gz"
    bad_gzip.write_bytes(samples.gzip_bytes(one_day(1))[:30])
    missing = tmp_path / "missing.json"
    reasons = dict(broken(list(read_inputs([str(empty), str(bad_gzip), str(missing)], io.BytesIO()))))
    assert reasons[str(empty)] == "empty"
    assert reasons[str(bad_gzip)].startswith("bad gzip data: ")
    assert reasons[str(missing)] == "cannot read: No such file or directory"


def test_a_gzip_bomb_is_stopped_at_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_REPORT_BYTES", 1000)
    bomb = gzip.compress(b" " * 5000 + samples.json_bytes(one_day(1)))
    assert broken(list(sources.read_bytes("bomb", bomb))) == [
        ("bomb", "decompresses to more than 1,000 bytes")
    ]


def test_containers_nested_too_deep() -> None:
    data = samples.json_bytes(one_day(1))
    for _ in range(sources.MAX_NESTING + 1):
        data = gzip.compress(data)
    assert broken(list(sources.read_bytes("deep", data))) == [
        ("deep", f"containers nested more than {sources.MAX_NESTING} deep")
    ]


def test_collect_counts_a_report_read_twice_once(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(samples.json_bytes(one_day(1)))
    (tmp_path / "b.json.gz").write_bytes(samples.gzip_bytes(one_day(1)))
    (tmp_path / "c.json").write_bytes(samples.json_bytes(one_day(1, org="Other Org")))
    collected = collect(read_path(str(tmp_path)))
    assert [f.source for f in collected.found] == [str(tmp_path / "a.json"), str(tmp_path / "c.json")]
    assert [(d.source, d.first_source) for d in collected.duplicates] == [
        (str(tmp_path / "b.json.gz"), str(tmp_path / "a.json"))
    ]


def test_an_unreadable_maildir_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    maildir = samples.write_maildir(tmp_path / "Maildir", cur=[samples.mail_message(one_day(1))])
    real_listdir = os.listdir  # root ignores chmod, so refuse the listing here

    def listdir(path: str) -> list[str]:
        if path.endswith("/new"):
            raise PermissionError(13, "Permission denied")
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    items = list(read_path(str(maildir)))
    assert broken(items) == [(str(maildir / "new"), "cannot read: Permission denied")]
    assert found_ids(items) == ["google.com-1"]


def _mime(parts: list[tuple[str, bytes]], top: str | None = None) -> bytes:
    """A multipart/report message with parts given as raw header block and body, so a test can
    garble any header."""
    boundary = "b0undary"
    head = top or f'multipart/report; report-type="tlsrpt"; boundary="{boundary}"'
    out = [b"From: noreply-smtp-tls-reporting@google.com\nSubject: Report Domain: example.com\n",
           f"MIME-Version: 1.0\nContent-Type: {head}\n\n".encode()]
    out.append(f"--{boundary}\nContent-Type: text/plain\n\nThis is an aggregate TLS report.\n".encode())
    for headers, body in parts:
        out.append(f"--{boundary}\n{headers}\n\n".encode() + body + b"\n")
    out.append(f"--{boundary}--\n".encode())
    return b"".join(out)


def _zip_of(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("report.json", data)
    return buffer.getvalue()


def _base64(data: bytes) -> bytes:
    return base64.encodebytes(data)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        # the bare media type, no +json (stalwart's fixture)
        ('Content-Type: application/tlsrpt\nContent-Disposition: attachment; filename="r.json"',
         samples.json_bytes(one_day(1))),
        # an unnamed octet-stream gzip
        ("Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64",
         _base64(samples.gzip_bytes(one_day(1)))),
        # a semicolon missing from Content-Type: Python reads the whole line as the media type
        ('Content-Type: application/tlsrpt+gzip name="r.json.gz"\nContent-Transfer-Encoding: base64',
         _base64(samples.gzip_bytes(one_day(1)))),
        # no media type at all: text/plain by default
        ("Content-Type: application\nContent-Transfer-Encoding: base64",
         _base64(samples.gzip_bytes(one_day(1)))),
        # Content-Transfer-Encoding missing: the base64 text is read as it is
        ("Content-Type: application/tlsrpt+gzip", _base64(samples.gzip_bytes(one_day(1)))),
        ("Content-Type: application/x-unknown\nContent-Transfer-Encoding: bas64",
         _base64(samples.gzip_bytes(one_day(1)))),
        # a zip, unnamed and untyped
        ("Content-Transfer-Encoding: base64", _base64(_zip_of(samples.json_bytes(one_day(1))))),
        # JSON pasted into a text part
        ("Content-Type: text/plain; charset=utf-8", samples.json_bytes(one_day(1))),
    ],
)
def test_a_report_is_found_by_its_content_whatever_the_part_says(headers: str, body: bytes) -> None:
    items = list(sources.read_bytes("m", _mime([(headers, body)])))
    assert found_ids(items) == ["google.com-1"], items
    assert len(items) == 1


def test_a_report_is_found_under_a_garbled_multipart_header() -> None:
    """A top-level Content-Type without its ';' leaves the whole MIME body as one text part."""
    message = _mime([("Content-Type: application/tlsrpt+gzip\nContent-Transfer-Encoding: base64",
                      _base64(samples.gzip_bytes(one_day(1)))),
                     ("Content-Type: application/tlsrpt+json", samples.json_bytes(one_day(2)))],
                    top='multipart/report boundary="b0undary"')
    assert found_ids(list(sources.read_bytes("m", message))) == ["google.com-1", "google.com-2"]


def test_parts_that_only_look_a_bit_like_reports_are_not_read() -> None:
    message = _mime([
        ("Content-Type: text/plain", b'Config: {"retries": 3} and {"organization": 1}\n'),
        ("Content-Type: application/octet-stream", b"\x00\x01binary"),
        ("Content-Type: text/plain\nContent-Transfer-Encoding: base64", _base64(b"eyes only\n")),
    ])
    items = list(sources.read_bytes("m", message))
    assert items == [Ignored("m", "no TLS report attached (subject: Report Domain: example.com)")]


def test_a_declared_report_that_is_broken_is_named() -> None:
    message = _mime([("Content-Type: application/tlsrpt+json", b'{"organization-name": "x"}'),
                     ("Content-Type: application/tlsrpt+gzip", b"")])
    assert broken(list(sources.read_bytes("m", message))) == [
        ("m attachment 1", "missing required field date-range"),
        ("m attachment 2", "empty application/tlsrpt+gzip attachment"),
    ]


def _peak_memory(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


#: Decompressed size of the bombs below: more than the limit.
BOMB_BYTES = 60_000_000


def test_a_real_gzip_bomb_is_refused_at_50_mb_without_holding_it() -> None:
    assert sources.MAX_REPORT_BYTES == 50_000_000
    bomb = gzip.compress(b"{" + b" " * BOMB_BYTES + b"}", compresslevel=9)
    assert len(bomb) < 100_000
    items: list[Item] = []
    peak = _peak_memory(lambda: items.extend(sources.read_bytes("bomb", bomb)))
    assert broken(items) == [("bomb", "decompresses to more than 50,000,000 bytes")]
    assert peak < sources.MAX_REPORT_BYTES // 10  # measured in chunks that are not kept


def test_a_zip_bomb_stops_at_the_archives_limit_and_the_rest_still_counts(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.json", samples.json_bytes(one_day(1)))
        for n in range(3):
            archive.writestr(f"bomb{n}.json", b" " * (BOMB_BYTES // 2))
        archive.writestr("z.json", samples.json_bytes(one_day(2)))
    (tmp_path / "1.zip").write_bytes(buffer.getvalue())
    (tmp_path / "2.json").write_bytes(samples.json_bytes(one_day(3)))
    items: list[Item] = []
    peak = _peak_memory(lambda: items.extend(read_path(str(tmp_path))))
    assert found_ids(items) == ["google.com-1", "google.com-3"]
    assert broken(items) == [
        (f"{tmp_path}/1.zip member bomb0.json", "empty"),
        (f"{tmp_path}/1.zip member bomb1.json",
         "the archive decompresses to more than 50,000,000 bytes; its 2 later members are not read"),
    ]
    assert peak < 2 * BOMB_BYTES // 2 + sources.MAX_REPORT_BYTES // 10


def test_a_report_read_twice_with_different_content_is_a_conflict(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(samples.json_bytes(one_day(1)))
    (tmp_path / "b.json").write_bytes(samples.json_bytes(one_day(1)))
    (tmp_path / "c.json").write_bytes(samples.json_bytes(one_day(1, successful=7)))
    collected = collect(read_path(str(tmp_path)))
    assert [(d.source, d.first_source, d.conflict) for d in collected.duplicates] == [
        (str(tmp_path / "b.json"), str(tmp_path / "a.json"), False),
        (str(tmp_path / "c.json"), str(tmp_path / "a.json"), True),
    ]


def test_bad_input_never_stops_the_rest(tmp_path: Path) -> None:
    huge_number = b'{"organization-name": "x", "n": ' + b"9" * 5000 + b"}"
    wrong_types = samples.report()
    wrong_types["policies"][0]["failure-details"] = "none"
    path = tmp_path / "inbox.mbox"
    path.write_bytes(samples.mbox([
        samples.mail_message(huge_number, media_type="application/tlsrpt+json", filename="n.json"),
        samples.mail_message(one_day(1)),
        samples.mail_message(wrong_types),
        samples.mail_message(b"[" * 100_000, media_type="application/tlsrpt+json", filename="deep.json"),
        samples.mail_message(one_day(2)),
    ]))
    items = list(read_path(str(path)))
    assert found_ids(items) == ["google.com-1", "google.com-2"]
    reasons = [reason for _, reason in broken(items)]
    assert reasons[0].startswith("bad JSON: Exceeds the limit (4300 digits)")
    assert reasons[1] == "policies[0].failure-details must be a list, not a string"
    assert reasons[2] == "bad JSON: nested too deeply"
