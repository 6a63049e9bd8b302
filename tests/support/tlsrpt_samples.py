"""Build RFC 8460 TLS reports the way senders deliver them: JSON, gzip, mail, mbox, Maildir.

Reports are plain dictionaries in the RFC 8460 §4.4 format so a test can break
any field; the helpers wrap them as the real reporters do (§5.1 file names,
§5.3 multipart/report messages with application/tlsrpt+json or +gzip).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

Report = dict[str, Any]


def failure(result_type: str, count: int, sending_ip: str = "192.0.2.10",
            mx: str | None = "mx1.example.com", **extra: Any) -> dict[str, Any]:
    """One failure-details entry; ``extra`` adds fields by their RFC names with ``_`` for ``-``."""
    entry: dict[str, Any] = {"result-type": result_type, "sending-mta-ip": sending_ip,
                             "failed-session-count": count}
    if mx is not None:
        entry["receiving-mx-hostname"] = mx
    for key, value in extra.items():
        entry[key.replace("_", "-")] = value
    return entry


def policy(domain: str = "example.com", successful: int = 100, details: Sequence[dict[str, Any]] = (),
           failed: int | None = None, policy_type: str = "sts", mode: str | None = "enforce",
           mx: Sequence[str] = ("mx1.example.com", "mx2.example.com")) -> dict[str, Any]:
    """One policies[] entry; ``failed`` defaults to the sum of the details' counts."""
    strings: list[str] = []
    if policy_type == "sts":
        strings = ["version: STSv1", *(f"mx: {m}" for m in mx), "max_age: 604800"]
        if mode is not None:
            strings.insert(1, f"mode: {mode}")
    elif policy_type == "tlsa":
        strings = ["3 1 1 0c72ac70b745ac19998811b131d662c9ac69dbdbe7cb23e5b514b56664c5d3d6"]
    body: dict[str, Any] = {"policy-type": policy_type, "policy-string": strings, "policy-domain": domain}
    if policy_type != "no-policy-found":
        body["mx-host"] = list(mx)
    total_failed = sum(d["failed-session-count"] for d in details) if failed is None else failed
    return {
        "policy": body,
        "summary": {
            "total-successful-session-count": successful,
            "total-failure-session-count": total_failed,
        },
        "failure-details": list(details),
    }


def report(org: str = "google.com", report_id: str = "2024-05-01T00:00:00Z_example.com",
           start: str = "2024-05-01T00:00:00Z", end: str = "2024-05-01T23:59:59Z",
           policies: Sequence[dict[str, Any]] | None = None,
           contact: str = "smtp-tls-reporting@google.com") -> Report:
    """A whole report as RFC 8460 §4.4 lays it out."""
    return {
        "organization-name": org,
        "date-range": {"start-datetime": start, "end-datetime": end},
        "contact-info": contact,
        "report-id": report_id,
        "policies": list(policies if policies is not None else [policy()]),
    }


def json_bytes(data: Report | Any) -> bytes:
    return json.dumps(data, indent=2).encode("utf-8")


def gzip_bytes(data: Report | Any) -> bytes:
    return gzip.compress(json_bytes(data))


def file_name(data: Report, sender: str = "google.com", unique: str = "001", gz: bool = True) -> str:
    """RFC 8460 §5.1: ``sender!policy-domain!begin!end!unique.json[.gz]`` (times in epoch seconds)."""
    domain = data["policies"][0]["policy"]["policy-domain"]
    begin = int(datetime.fromisoformat(data["date-range"]["start-datetime"]).timestamp())
    end = int(datetime.fromisoformat(data["date-range"]["end-datetime"]).timestamp())
    return f"{sender}!{domain}!{begin}!{end}!{unique}.json" + (".gz" if gz else "")


def mail_message(data: Report | bytes, media_type: str = "application/tlsrpt+gzip",
                 filename: str | None = None, sender: str = "google.com") -> bytes:
    """A report mail as RFC 8460 §5.3 describes it: multipart/report; report-type="tlsrpt",
    a human-readable part, then the report attached with ``media_type``."""
    if isinstance(data, bytes):
        payload = data
        domain, report_id = "example.com", "raw"
    else:
        gz = media_type.endswith("gzip")
        payload = gzip_bytes(data) if gz else json_bytes(data)
        domain = data["policies"][0]["policy"]["policy-domain"] if data["policies"] else "example.com"
        report_id = data.get("report-id", "none")
        filename = filename or file_name(data, sender, gz=gz)
    message = EmailMessage()
    message["From"] = f"noreply-smtp-tls-reporting@{sender}"
    message["To"] = f"tlsrpt@{domain}"
    message["Subject"] = f"Report Domain: {domain} Submitter: {sender} Report-ID: <{report_id}>"
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = sender
    message["Date"] = "Thu, 02 May 2024 08:00:00 +0000"
    message.set_content(f"This is an aggregate TLS report from {sender}.\n")
    maintype, subtype = media_type.split("/")
    message.add_attachment(payload, maintype=maintype, subtype=subtype, filename=filename)
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes()


def plain_message(subject: str = "Lunch on Friday?") -> bytes:
    """Ordinary mail that shares a mailbox with the reports."""
    message = EmailMessage()
    message["From"] = "colleague@example.com"
    message["To"] = "postmaster@example.com"
    message["Subject"] = subject
    message.set_content("From the kitchen: there is cake.\n")
    return message.as_bytes()


def mbox(messages: Iterable[bytes]) -> bytes:
    """An mbox file: each message after a ``From `` line, body lines starting ``From `` quoted."""
    out = []
    for message in messages:
        out.append(b"From MAILER-DAEMON Thu May  2 08:00:00 2024\n")
        for line in message.replace(b"\r\n", b"\n").splitlines(keepends=True):
            out.append(b">" + line if line.startswith(b"From ") else line)
        out.append(b"\n")
    return b"".join(out)


def write_maildir(root: Path, new: Sequence[bytes] = (), cur: Sequence[bytes] = (),
                  tmp: Sequence[bytes] = ()) -> Path:
    """A Maildir with messages in new/, cur/ (flags in the name) and tmp/ (not yet delivered)."""
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, message in enumerate(new):
        (root / "new" / f"1714636800.M{i}P1.host").write_bytes(message)
    for i, message in enumerate(cur):
        (root / "cur" / f"1714636900.M{i}P2.host:2,S").write_bytes(message)
    for i, message in enumerate(tmp):
        (root / "tmp" / f"1714637000.M{i}P3.host").write_bytes(message)
    return root
