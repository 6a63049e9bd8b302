"""Find TLS reports wherever an admin keeps them: files, directories, mail.

Every input is recognised by its content, not its name: gzip, zip, JSON, an
mbox, a single mail message (the report as an attachment, RFC 8460 §5.3) or a
Maildir. Each report found, each broken one and each message that holds no
report is yielded as it is met, named by where it came from.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import gzip
import io
import json
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from functools import partial
from typing import IO, BinaryIO, Protocol

from postfix_mtasts.tlsrpt.model import Report, ReportError, parse_report_text

#: Largest file (or standard input) read; a mailbox of a year of reports fits easily.
MAX_INPUT_BYTES = 256 * 1024 * 1024
#: Largest report after decompression, and largest sum of a zip archive's members: a guard
#: against gzip and zip bombs. A bigger one is refused after a first pass that keeps nothing.
MAX_REPORT_BYTES = 50_000_000
#: Bytes read or decompressed at a time.
DECOMPRESS_CHUNK = 64 * 1024
#: How deep containers may nest (a gzip in a zip attached to a message in an mbox).
MAX_NESTING = 4
#: Media types of RFC 8460 §5.3, and the bare one some senders use.
TLSRPT_MEDIA_TYPES = frozenset({"application/tlsrpt+json", "application/tlsrpt+gzip", "application/tlsrpt"})
#: Top-level keys of an RFC 8460 §4.4 report: JSON holding one of them, in any part, is read.
REPORT_KEYS = (b'"organization-name"', b'"policies"', b'"report-id"', b'"date-range"')
#: Magic numbers of the compressed forms a report arrives in.
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
#: How the base64 text of a gzip, a zip or a JSON object begins, for parts whose
#: Content-Transfer-Encoding header is missing or garbled.
BASE64_STARTS = (b"H4sI", b"UEsDB", b"ey", b"ew", b"77u/")
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
            data = read_limited(stdin, MAX_INPUT_BYTES)
            if data is None:
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
            data = read_limited(f, MAX_INPUT_BYTES)
    except OSError as e:
        return Broken(path, f"cannot read: {e.strerror or e}")
    if data is None:
        return Broken(path, f"larger than {MAX_INPUT_BYTES} bytes")
    return data


class Readable(Protocol):
    """Anything with a binary ``read(size)``: a file, standard input, a gzip or zip member."""

    def read(self, size: int = -1, /) -> bytes: ...


def read_limited(stream: Readable, limit: int) -> bytes | None:
    """All of ``stream`` if it holds at most ``limit`` bytes, else ``None``; read in chunks,
    so memory follows what the stream holds, not the limit."""
    chunks: list[bytes] = []
    size = 0
    while chunk := stream.read(DECOMPRESS_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


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
    if data.startswith(GZIP_MAGIC):
        return "gzip"
    if data.startswith(ZIP_MAGIC):
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
    try:
        message = email.message_from_bytes(data, policy=email.policy.compat32)
        subject = " ".join(str(message.get("Subject", "")).split())
        attachments = list(_report_parts(message))
        if not attachments:
            attachments = list(_embedded_reports(message))
    except Exception as e:  # any sender can mail anything: one bad message harms nothing else
        yield Broken(source, f"cannot read this mail message: {type(e).__name__}: {e}")
        return
    if not attachments:
        about = f" (subject: {subject})" if subject else ""
        yield Ignored(source, f"no TLS report attached{about}")
        return
    for number, (name, payload) in enumerate(attachments, start=1):
        where = f"{source} attachment {name or number}"
        if isinstance(payload, str):
            yield Broken(where, payload)
        else:
            yield from read_bytes(where, payload, depth + 1)


def _report_parts(message: Message) -> Iterator[tuple[str | None, bytes | str]]:
    """The parts that hold a report, by file name and content (or why an empty one cannot be read):
    those declared one (media type or file name), and any other whose content is one (gzip, zip,
    or JSON with RFC 8460's keys), whatever its headers say."""
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        payload = payload if isinstance(payload, bytes) else b""
        declared = _declared_report(part)
        if declared and not payload.strip():
            yield part.get_filename(), f"empty {part.get_content_type()} attachment"
            continue
        if not looks_like_report(payload):
            unwrapped = _unwrapped_base64(payload)
            if unwrapped is not None and looks_like_report(unwrapped):
                payload = unwrapped
            elif not declared:
                continue
        yield part.get_filename(), payload


def looks_like_report(data: bytes) -> bool:
    """True for a gzip, a zip, or a JSON object naming an RFC 8460 top-level key."""
    if data.startswith((GZIP_MAGIC, ZIP_MAGIC)):
        return True
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    return text.startswith(b"{") and any(key in text for key in REPORT_KEYS)


def _unwrapped_base64(payload: bytes) -> bytes | None:
    """A part whose Content-Transfer-Encoding is missing or garbled may still be base64 text."""
    compact = b"".join(payload.split())
    if not compact.startswith(BASE64_STARTS):
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


_BASE64_BLOCK = re.compile(rb"(?m)^(?:H4sI|UEsDB)[A-Za-z0-9+/=]*\r?$(?:\n[A-Za-z0-9+/=]+\r?$)*")


def _embedded_reports(message: Message) -> Iterator[tuple[str | None, bytes | str]]:
    """Reports inside the text of a message whose MIME structure is broken (a garbled
    multipart Content-Type leaves the attachments as plain text): base64 blocks of a gzip or
    zip, and JSON objects that name RFC 8460's keys."""
    for part in message.walk():
        if part.is_multipart():
            continue
        text = part.get_payload(decode=True)
        if not isinstance(text, bytes):
            continue
        for block in _BASE64_BLOCK.finditer(text):
            decoded = _unwrapped_base64(block.group())
            if decoded is not None and looks_like_report(decoded):
                yield None, decoded
        yield from ((None, found) for found in _json_objects(text))


#: Where a report's JSON object can start inside text: a brace and one of its top-level keys.
_REPORT_START = re.compile(r'\{\s*"(?:organization-name|date-range|contact-info|report-id|policies)"')


def _json_objects(text: bytes) -> Iterator[bytes]:
    decoder = json.JSONDecoder()
    body = text.decode("utf-8", errors="replace")
    position = 0
    while start := _REPORT_START.search(body, position):
        try:
            value, end = decoder.raw_decode(body, start.start())
        except ValueError:  # RecursionError is one too
            position = start.end()
            continue
        if isinstance(value, dict):
            yield body[start.start():end].encode("utf-8")
        position = end


def _declared_report(part: Message) -> bool:
    media_type = part.get_content_type()
    if media_type in TLSRPT_MEDIA_TYPES:
        return True
    name = (part.get_filename() or "").lower()
    if media_type.startswith("text/"):
        return name.endswith(".json")
    return media_type in OTHER_REPORT_MEDIA_TYPES and (
        name.endswith(REPORT_NAME_SUFFIXES) or media_type != "application/octet-stream"
    )


def _measured(open_stream: Callable[[], gzip.GzipFile | IO[bytes]], limit: int) -> bytes | None:
    """Decompress what ``open_stream`` gives if it holds at most ``limit`` bytes, else ``None``.
    The size is measured first in small chunks that are kept nowhere, so a bomb costs no memory."""
    size = 0
    with open_stream() as stream:
        while chunk := stream.read(DECOMPRESS_CHUNK):
            size += len(chunk)
            if size > limit:
                return None
    with open_stream() as stream:
        data = read_limited(stream, size)
    return data if data is not None and len(data) == size else None


def _gunzip(data: bytes) -> bytes | str:
    try:
        inner = _measured(lambda: gzip.GzipFile(fileobj=io.BytesIO(data)), MAX_REPORT_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        return f"bad gzip data: {e}"
    if inner is None:
        return f"decompresses to more than {MAX_REPORT_BYTES:,} bytes"
    return inner


def _read_zip(source: str, data: bytes, depth: int) -> Iterator[Item]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        yield Broken(source, f"bad zip data: {e}")
        return
    if not members:
        yield Broken(source, "empty zip archive")
    budget = MAX_REPORT_BYTES
    for number, info in enumerate(members):
        where = f"{source} member {info.filename}"
        try:
            inner = _measured(partial(archive.open, info), budget)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, ValueError) as e:
            yield Broken(where, f"bad zip data: {e}")
            continue
        if inner is None:
            rest = len(members) - number - 1
            yield Broken(where, f"the archive decompresses to more than {MAX_REPORT_BYTES:,} bytes"
                         + (f"; its {rest} later members are not read" if rest else ""))
            return
        budget -= len(inner)
        yield from read_bytes(where, inner, depth + 1)


@dataclass(frozen=True)
class Duplicate:
    """A report read a second time (same organisation and report-id); counted once, the first copy."""

    source: str
    first_source: str
    report: Report
    #: The copies differ in content: which one is right cannot be told, the first is counted.
    conflict: bool = False


@dataclass(frozen=True)
class ReportWarning:
    """Something wrong with a report that is still counted."""

    source: str
    report: Report
    text: str


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

    @property
    def warnings(self) -> list[ReportWarning]:
        """The warnings of the reports counted, in the order they were read."""
        return [ReportWarning(item.source, item.report, text)
                for item in self.found for text in item.report.warnings]


def collect(items: Iterator[Item] | Sequence[Item]) -> Collected:
    """Sort items, keeping the first of reports that share organisation and report-id."""
    collected = Collected([], [], [], [])
    first_seen: dict[tuple[str, str], Found] = {}
    for item in items:
        if isinstance(item, Found):
            key = (item.report.organization_name.lower(), item.report.report_id)
            first = first_seen.get(key)
            if first is not None:
                collected.duplicates.append(
                    Duplicate(item.source, first.source, item.report, conflict=item.report != first.report)
                )
                continue
            first_seen[key] = item
            collected.found.append(item)
        elif isinstance(item, Broken):
            collected.broken.append(item)
        else:
            collected.ignored.append(item)
    return collected
