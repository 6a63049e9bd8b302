"""Find TLS reports wherever an admin keeps them: files, directories, mail.

Every input is recognised by its content, not its name: gzip, zip, JSON, an
mbox, a single mail message (the report as an attachment, RFC 8460 §5.3) or a
Maildir. Each report found, each broken one and each message that holds no
report is yielded as it is met, named by where it came from.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import io
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import BinaryIO

from postfix_mtasts.tlsrpt.model import Report, ReportError, parse_report_text

#: Largest file (or standard input) read; a mailbox of a year of reports fits easily.
MAX_INPUT_BYTES = 256 * 1024 * 1024
#: Largest report after decompression: a guard against gzip and zip bombs.
MAX_REPORT_BYTES = 32 * 1024 * 1024
#: How deep containers may nest (a gzip in a zip attached to a message in an mbox).
MAX_NESTING = 4
#: Media types of RFC 8460 §5.3.
TLSRPT_MEDIA_TYPES = frozenset({"application/tlsrpt+json", "application/tlsrpt+gzip"})
#: Media types reporters use instead, seen in the wild.
OTHER_REPORT_MEDIA_TYPES = frozenset(
    {
        "application/json",
        "application/gzip",
        "application/x-gzip",
        "application/zip",
        "application/x-zip-compressed",
        "application/octet-stream",
    }
)
#: Attachment names that suggest a report (RFC 8460 §5.1 names end in .json or .json.gz).
REPORT_NAME_SUFFIXES = (".json", ".json.gz", ".gz", ".zip")
#: Subdirectories whose presence makes a directory a Maildir; only cur and new hold delivered mail.
MAILDIR_SUBDIRS = ("cur", "new", "tmp")
MAILDIR_MAIL_SUBDIRS = ("new", "cur")

_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")
_MBOXRD_QUOTED_FROM = re.compile(rb"^>+From ")


@dataclass(frozen=True)
class Found:
    """A valid report, where it was read from, and its JSON as read (for the report store)."""

    source: str
    report: Report
    raw: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class Broken:
    """Something that should have been a report but cannot be counted, and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class Ignored:
    """A mail message that carries no TLS report (other mail in the same mailbox)."""

    source: str
    reason: str


Item = Found | Broken | Ignored


def read_inputs(paths: Sequence[str], stdin: BinaryIO) -> Iterator[Item]:
    """Read each path (``-`` is standard input; no paths at all means standard input)."""
    for path in paths or ["-"]:
        if path == "-":
            data = stdin.read(MAX_INPUT_BYTES + 1)
            if len(data) > MAX_INPUT_BYTES:
                yield Broken("standard input", f"larger than {MAX_INPUT_BYTES} bytes")
                continue
            yield from read_bytes("standard input", data)
        else:
            yield from read_path(path)


def read_path(path: str) -> Iterator[Item]:
    """Read a file, a Maildir, or everything below a directory in name order (hidden names skipped)."""
    if not os.path.isdir(path):
        yield from read_file(path)
    elif is_maildir(path):
        yield from read_maildir(path)
    else:
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            yield Broken(path, f"cannot read: {e.strerror or e}")
            return
        for name in names:
            full = os.path.join(path, name)
            if name.startswith(".") or (os.path.islink(full) and os.path.isdir(full)):
                continue  # dotfiles are no reports; symlinked directories could loop
            yield from read_path(full)


def is_maildir(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, sub)) for sub in MAILDIR_SUBDIRS)


def read_maildir(path: str) -> Iterator[Item]:
    """Read the delivered messages of a Maildir (new/ and cur/; tmp/ is mail still being written)."""
    for sub in MAILDIR_MAIL_SUBDIRS:
        folder = os.path.join(path, sub)
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            yield Broken(folder, f"cannot read: {e.strerror or e}")
            continue
        for name in names:
            full = os.path.join(folder, name)
            if name.startswith(".") or not os.path.isfile(full):
                continue
            data = _read_file_bytes(full)
            if isinstance(data, Broken):
                yield data
            else:
                yield from _read_message(full, data, depth=1)


def read_file(path: str) -> Iterator[Item]:
    data = _read_file_bytes(path)
    if isinstance(data, Broken):
        yield data
    else:
        yield from read_bytes(path, data)


def _read_file_bytes(path: str) -> bytes | Broken:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:
        return Broken(path, f"cannot read: {e.strerror or e}")
    if len(data) > MAX_INPUT_BYTES:
        return Broken(path, f"larger than {MAX_INPUT_BYTES} bytes")
    return data


def read_bytes(source: str, data: bytes, depth: int = 0) -> Iterator[Item]:
    """Recognise ``data`` by its content and yield what it holds."""
    if depth > MAX_NESTING:
        yield Broken(source, f"containers nested more than {MAX_NESTING} deep")
        return
    kind = content_kind(data)
    if kind == "gzip":
        inner = _gunzip(data)
        if isinstance(inner, str):
            yield Broken(source, inner)
        else:
            yield from read_bytes(source, inner, depth + 1)
    elif kind == "zip":
        yield from _read_zip(source, data, depth)
    elif kind == "json":
        try:
            yield Found(source, parse_report_text(data), data)
        except ReportError as e:
            yield Broken(source, str(e))
    elif kind == "mbox":
        for number, message in enumerate(split_mbox(data), start=1):
            yield from _read_message(f"{source} message {number}", message, depth + 1)
    elif kind == "message":
        yield from _read_message(source, data, depth + 1)
    elif not data.strip():
        yield Broken(source, "empty")
    else:
        yield Broken(source, "not a TLS report: neither JSON, gzip, zip, an mbox nor a mail message")


def content_kind(data: bytes) -> str | None:
    """Which container or format ``data`` is: gzip, zip, json, mbox, message, or None."""
    if data.startswith(b"\x1f\x8b"):
        return "gzip"
    if data.startswith(b"PK\x03\x04"):
        return "zip"
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith((b"{", b"[")):
        return "json"
    if data.startswith(b"From "):
        return "mbox"
    if _HEADER_LINE.match(data):
        return "message"
    return None


def split_mbox(data: bytes) -> list[bytes]:
    """Split an mbox into its messages: each starts at a line beginning ``From ``."""
    messages: list[bytes] = []
    current: list[bytes] | None = None
    for line in data.splitlines(keepends=True):
        if line.startswith(b"From "):
            if current is not None:
                messages.append(b"".join(current))
            current = []
            continue
        if current is None:
            current = []
        if _MBOXRD_QUOTED_FROM.match(line):
            line = line[1:]
        current.append(line)
    if current is not None:
        messages.append(b"".join(current))
    return messages


def _read_message(source: str, data: bytes, depth: int) -> Iterator[Item]:
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    subject = str(message.get("Subject", "")).strip()
    attachments = [part for part in message.walk() if _looks_like_report(part)]
    if not attachments:
        about = f" (subject: {subject})" if subject else ""
        yield Ignored(source, f"no TLS report attached{about}")
        return
    for number, part in enumerate(attachments, start=1):
        name = part.get_filename()
        where = f"{source} attachment {name or number}"
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload:
            yield Broken(where, f"empty {part.get_content_type()} attachment")
            continue
        yield from read_bytes(where, payload, depth + 1)


def _looks_like_report(part: Message) -> bool:
    if part.is_multipart():
        return False
    media_type = part.get_content_type()
    if media_type in TLSRPT_MEDIA_TYPES:
        return True
    name = (part.get_filename() or "").lower()
    if media_type.startswith("text/"):
        return name.endswith(".json")
    return media_type in OTHER_REPORT_MEDIA_TYPES and (
        name.endswith(REPORT_NAME_SUFFIXES) or media_type != "application/octet-stream"
    )


def _gunzip(data: bytes) -> bytes | str:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            inner = f.read(MAX_REPORT_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        return f"bad gzip data: {e}"
    if len(inner) > MAX_REPORT_BYTES:
        return f"decompresses to more than {MAX_REPORT_BYTES} bytes"
    return inner


def _read_zip(source: str, data: bytes, depth: int) -> Iterator[Item]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        yield Broken(source, f"bad zip data: {e}")
        return
    if not members:
        yield Broken(source, "empty zip archive")
    for info in members:
        where = f"{source} member {info.filename}"
        try:
            with archive.open(info) as f:
                inner = f.read(MAX_REPORT_BYTES + 1)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
            yield Broken(where, f"bad zip data: {e}")
            continue
        if len(inner) > MAX_REPORT_BYTES:
            yield Broken(where, f"decompresses to more than {MAX_REPORT_BYTES} bytes")
            continue
        yield from read_bytes(where, inner, depth + 1)


@dataclass(frozen=True)
class Duplicate:
    """A report read a second time (same organisation and report-id); counted once."""

    source: str
    first_source: str
    report: Report


@dataclass
class Collected:
    """Everything read from the inputs, sorted into what counts and what does not."""

    found: list[Found]
    broken: list[Broken]
    ignored: list[Ignored]
    duplicates: list[Duplicate]

    @property
    def reports(self) -> list[Report]:
        return [item.report for item in self.found]


def collect(items: Iterator[Item] | Sequence[Item]) -> Collected:
    """Sort items, keeping the first of reports that share organisation and report-id."""
    collected = Collected([], [], [], [])
    first_seen: dict[tuple[str, str], str] = {}
    for item in items:
        if isinstance(item, Found):
            key = (item.report.organization_name.lower(), item.report.report_id)
            if key in first_seen:
                collected.duplicates.append(Duplicate(item.source, first_seen[key], item.report))
                continue
            first_seen[key] = item.source
            collected.found.append(item)
        elif isinstance(item, Broken):
            collected.broken.append(item)
        else:
            collected.ignored.append(item)
    return collected
