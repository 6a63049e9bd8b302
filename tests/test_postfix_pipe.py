"""``postfix-mtasts report ingest -`` as a pipe(8) transport of Debian's real Postfix.

A private Postfix instance runs from a temporary configuration directory
(``postfix -c DIR``: its own queue and data directories, its own mail log,
no inet listener at all), so the machine's own Postfix is never touched. Mail
is injected with ``sendmail -C DIR`` to the rua address, which transport_maps
sends to the ``tlsrpt`` pipe service, as the README documents. Proven here:
a report mailed there ends in the store; a message with no readable report
is accepted (status=sent) and what was wrong is in the mail log; a store that
cannot be written defers the message (exit 75), which stays queued and is
delivered once the store is writable again: no report is lost.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require
from tests.test_tlsrpt_store import raw

pytestmark = [pytest.mark.integration, pytest.mark.postfix]

ROOT = Path(__file__).resolve().parents[1]
RUA = "tlsrpt@reports.test"
#: The user pipe(8) runs the command as (Postfix refuses root).
PIPE_USER = "nobody"
PIPE_GROUP = "nogroup"
#: Bound on waiting for Postfix to deliver or defer one message.
DELIVERY_WAIT = 60.0
POLL = 0.1


def _system_python() -> str | None:
    """A Python of this version that any user may run: the test's own may
    live under /root, which pipe(8)'s unprivileged user cannot enter."""
    candidate = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return candidate if os.access(candidate, os.X_OK) else None


@dataclass
class Mta:
    """A private Postfix and the report store its pipe transport writes to."""

    directory: Path
    config_directory: Path
    store_directory: Path
    store_path: Path

    def postfix(self, *argv: str) -> str:
        result = subprocess.run(["postfix", "-c", str(self.config_directory), *argv],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"postfix {' '.join(argv)}: {result.stdout}{result.stderr}{self.log()}"
        return result.stdout

    def send(self, message: bytes) -> str:
        """Inject ``message`` with sendmail; returns its queue id."""
        message_id = re.search(rb"^Message-ID: <([^>]+)>", message, re.M | re.I)
        assert message_id is not None
        subprocess.run(["sendmail", "-C", str(self.config_directory), "-f", "reporter@example.net", RUA],
                       input=message, check=True)
        wanted = f"message-id=<{message_id.group(1).decode()}>"
        line = self.wait_for_line(lambda line: wanted in line, f"cleanup of {wanted}")
        return line.split(": ", 2)[1]

    def log(self) -> str:
        path = self.directory / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_line(self, match: object, what: str) -> str:
        deadline = time.monotonic() + DELIVERY_WAIT
        while True:
            for line in self.log().splitlines():
                if match(line):  # type: ignore[operator]
                    return line
            assert time.monotonic() < deadline, f"no {what} within {DELIVERY_WAIT}s; log:\n{self.log()}"
            time.sleep(POLL)

    def status(self, queue_id: str, status: str, after: int = 0) -> str:
        """The (after+1)-th delivery attempt line of ``queue_id`` with ``status``."""
        def match(line: str) -> bool:
            return f" {queue_id}: to=<{RUA}>" in line and f"status={status}" in line

        self.wait_for_line(lambda line: sum(match(x) for x in self.log().splitlines()) > after,
                           f"status={status} for {queue_id}")
        return [line for line in self.log().splitlines() if match(line)][after]

    def stored_sources(self) -> list[str]:
        conn = sqlite3.connect(f"file:{self.store_path}?immutable=1", uri=True)
        try:
            return [row[0] for row in conn.execute("SELECT source FROM reports ORDER BY id")]
        finally:
            conn.close()

    def queued(self) -> list[str]:
        result = subprocess.run(["postqueue", "-c", str(self.config_directory), "-j"],
                                capture_output=True, text=True, check=True)
        return [json.loads(line)["queue_id"] for line in result.stdout.splitlines() if line.strip()]

    def stored_report_ids(self) -> list[str]:
        """Read behind the store's back, writing nothing (no -wal or -shm
        file made by root): every writer has closed, so all is in the file."""
        conn = sqlite3.connect(f"file:{self.store_path}?immutable=1", uri=True)
        try:
            return [row[0] for row in conn.execute("SELECT report_id FROM reports ORDER BY id")]
        finally:
            conn.close()


def _main_cf(directory: Path) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {directory}/queue
data_directory = {directory}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mta.reports.test
mydomain = reports.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
master_service_disable = inet
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
transport_maps = texthash:{directory}/etc/transport
tlsrpt_destination_recipient_limit = 1
"""


@pytest.fixture
def mta() -> Iterator[Mta]:
    require("root, to run a private Postfix", os.geteuid() == 0)
    require("Debian's Postfix (postfix, sendmail, postqueue)",
            all(shutil.which(p) for p in ("postfix", "sendmail", "postqueue"))
            and os.path.exists("/usr/share/postfix/master.cf.dist"))
    python = _system_python()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    require(f"/usr/bin/python{version} for the pipe user", python is not None)
    directory = Path(tempfile.mkdtemp(prefix="mtasts-pipe-"))
    directory.chmod(0o755)
    etc = directory / "etc"
    for sub in ("etc", "queue", "data", "store", "bin"):
        (directory / sub).mkdir()
    shutil.chown(directory / "data", "postfix")
    shutil.chown(directory / "store", PIPE_USER, PIPE_GROUP)
    store_path = directory / "store" / "reports.sqlite3"
    config = directory / "postfix-mtasts.toml"
    config.write_text(f'[reports]\npath = "{store_path}"\n')
    config.chmod(0o644)
    # The command pipe(8) runs: this checkout with the test's own packages.
    command = directory / "bin" / "postfix-mtasts"
    site_packages = sysconfig.get_paths()["purelib"]
    command.write_text(
        f'#!/bin/sh\nPYTHONPATH="{ROOT}:{site_packages}" exec {python} -m postfix_mtasts.cli "$@"\n'
    )
    command.chmod(0o755)
    (etc / "main.cf").write_text(_main_cf(directory))
    (etc / "transport").write_text(f"{RUA} tlsrpt:\n")
    master = Path("/usr/share/postfix/master.cf.dist").read_text()
    master += (
        "tlsrpt    unix  -       n       n       -       -       pipe\n"
        f"  flags=R user={PIPE_USER} argv={command} report ingest --config {config} -\n"
    )
    (etc / "master.cf").write_text(master)
    an_hour_ago = time.time() - 3600  # Postfix waits for a just-edited main.cf to settle
    os.utime(etc / "main.cf", (an_hour_ago, an_hour_ago))
    subprocess.run(["postconf", "-c", str(etc), "-F", "*/*/chroot = n"], check=True)
    mta = Mta(directory, etc, directory / "store", store_path)
    try:
        mta.postfix("start")
        yield mta
    finally:
        subprocess.run(["postfix", "-c", str(etc), "stop"], capture_output=True, check=False)
        subprocess.run(["postsuper", "-c", str(etc), "-d", "ALL"], capture_output=True, check=False)
        shutil.rmtree(directory, ignore_errors=True)


def report_message(report_id: str) -> bytes:
    """A report mail as RFC 8460 §5.3 describes it: the gzip attached."""
    attachment = base64.encodebytes(gzip.compress(raw(report_id=report_id))).decode()
    return (
        "From: tlsrpt-noreply@example.net\n"
        f"To: {RUA}\n"
        f"Subject: Report Domain: example.org Submitter: example.net Report-ID: <{report_id}>\n"
        f"Message-ID: <{report_id}@example.net>\n"
        "TLS-Report-Domain: example.org\n"
        "TLS-Report-Submitter: example.net\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type="tlsrpt"; boundary="b1"\n'
        "\n"
        "--b1\nContent-Type: text/plain\n\nThis is an aggregate TLS report.\n"
        "--b1\nContent-Type: application/tlsrpt+gzip\n"
        f'Content-Disposition: attachment; filename="example.net!example.org!1!2!{report_id}.json.gz"\n'
        "Content-Transfer-Encoding: base64\n\n"
        f"{attachment}"
        "--b1--\n"
    ).encode()


def test_a_mailed_report_ends_in_the_store(mta: Mta) -> None:
    queue_id = mta.send(report_message("pipe-1"))
    line = mta.status(queue_id, "sent")
    assert "delivered via tlsrpt service" in line
    assert mta.stored_report_ids() == ["pipe-1"]
    attachment = "example.net!example.org!1!2!pipe-1.json.gz"
    assert mta.stored_sources() == [f"message <pipe-1@example.net> attachment {attachment}"]
    # The same report mailed again is accepted and stored once.
    again = mta.send(report_message("pipe-1").replace(b"Message-ID: <pipe-1@", b"Message-ID: <pipe-1-again@"))
    mta.status(again, "sent")
    assert mta.stored_report_ids() == ["pipe-1"]


def test_a_message_without_a_readable_report_is_accepted_and_logged(mta: Mta) -> None:
    message = (b"From: someone@example.net\nTo: tlsrpt@reports.test\nSubject: hello\n"
               b"Message-ID: <no-report@example.net>\n\nNo report in here.\n")
    queue_id = mta.send(message)
    line = mta.status(queue_id, "sent")
    assert "(postfix-mtasts report ingest: message <no-report@example.net>: no TLS report attached" in line
    broken = report_message("pipe-broken").replace(b"Content-Transfer-Encoding: base64\n\n",
                                                   b"Content-Transfer-Encoding: base64\n\nAAAA")
    queue_id = mta.send(broken)
    line = mta.status(queue_id, "sent")
    # pipe(8) keeps the first 100 characters of the command's output.
    assert "(postfix-mtasts report ingest: message <pipe-broken@example.net> attachment exam" in line, line
    assert mta.queued() == []
    assert not mta.store_path.exists() or mta.stored_report_ids() == []


def test_a_read_only_store_defers_and_the_report_is_delivered_later(mta: Mta) -> None:
    first = mta.send(report_message("pipe-first"))
    mta.status(first, "sent")
    mta.store_path.chmod(0o444)
    mta.store_directory.chmod(0o555)
    queue_id = mta.send(report_message("pipe-later"))
    line = mta.status(queue_id, "deferred")
    assert str(mta.store_path) in line, line
    assert mta.queued() == [queue_id]
    assert mta.stored_report_ids() == ["pipe-first"]

    mta.store_directory.chmod(0o755)
    mta.store_path.chmod(0o640)
    subprocess.run(["postqueue", "-c", str(mta.config_directory), "-f"], check=True)
    mta.status(queue_id, "sent")
    assert mta.queued() == []
    assert sorted(mta.stored_report_ids()) == ["pipe-first", "pipe-later"]
