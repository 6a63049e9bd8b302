"""Debian's real Dovecot, run privately for a test: its own configuration,
base_dir and log in a temporary directory, one passwd-file user whose
Maildir is there too, IMAP (plain login allowed) and IMAPS (a certificate
from a CA made at run time) on loopback ports. Never the machine's Dovecot.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.daemon import free_port

DOVECOT = "/usr/sbin/dovecot"
LOOPBACK = "127.0.0.1"
#: The user the mail files belong to (Dovecot refuses root).
MAIL_UID = 65534
MAIL_GID = 65534
#: Bound on Dovecot's start-up and shut-down.
START_WAIT = 30.0
POLL = 0.05


def available() -> bool:
    return os.geteuid() == 0 and os.access(DOVECOT, os.X_OK)


@dataclass
class Dovecot:
    directory: Path
    imap_port: int
    imaps_port: int
    user: str
    password: str
    ca_file: str
    process: subprocess.Popen[bytes]

    @property
    def maildir(self) -> Path:
        return self.directory / "home" / "Maildir"

    @classmethod
    def start(cls, ca: Any, user: str = "tlsrpt", password: str = "s3cret pass") -> Dovecot:
        """Start Dovecot in the foreground as a child; ``ca`` is a trustme.CA."""
        directory = Path(tempfile.mkdtemp(prefix="mtasts-dovecot-"))
        directory.chmod(0o755)
        home = directory / "home"
        (home / "Maildir").mkdir(parents=True)
        for path in (home, home / "Maildir"):
            os.chown(path, MAIL_UID, MAIL_GID)
        certificate = ca.issue_cert(LOOPBACK, "localhost")
        certificate.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
        ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        (directory / "passwd").write_text(f"{user}:{{PLAIN}}{password}:{MAIL_UID}:{MAIL_GID}::{home}::\n")
        imap_port, imaps_port = free_port(), free_port()
        (directory / "run").mkdir()
        (directory / "dovecot.conf").write_text(f"""\
base_dir = {directory}/run
state_dir = {directory}/state
log_path = {directory}/dovecot.log
instance_name = mtasts-test-{os.getpid()}-{imap_port}
protocols = imap
listen = {LOOPBACK}
ssl = yes
ssl_cert = <{directory}/server.pem
ssl_key = <{directory}/server.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {directory}/passwd
}}
userdb {{
  driver = passwd-file
  args = {directory}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = {LOOPBACK}
    port = {imaps_port}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0600
  }}
}}
""")
        process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(directory / "dovecot.conf")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        dovecot = cls(directory, imap_port, imaps_port, user, password, str(ca_file), process)
        try:
            dovecot._wait_listening()
        except BaseException:
            dovecot.stop()
            raise
        return dovecot

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_WAIT
        for port in (self.imap_port, self.imaps_port):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"dovecot exited {self.process.returncode}: {self.output()}")
                try:
                    with socket.create_connection((LOOPBACK, port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"dovecot not listening on {port}: {self.output()}") from None
                    time.sleep(POLL)

    def output(self) -> str:
        log = self.directory / "dovecot.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def deliver(self, name: str, message: bytes, folder: str = "") -> Path:
        """Put ``message`` in the user's Maildir (``folder``: a Maildir++ subfolder) as new mail."""
        root = self.maildir / f".{folder.replace('/', '.')}" if folder else self.maildir
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            os.chown(root / sub, MAIL_UID, MAIL_GID)
        os.chown(root, MAIL_UID, MAIL_GID)
        path = root / "new" / name
        temporary = root / "tmp" / name
        temporary.write_bytes(message)
        os.chown(temporary, MAIL_UID, MAIL_GID)
        temporary.rename(path)
        return path

    def folder_files(self, folder: str = "") -> dict[str, list[str]]:
        """Names in new/ and cur/ of the user's INBOX or a subfolder."""
        root = self.maildir / f".{folder.replace('/', '.')}" if folder else self.maildir
        return {
            sub: sorted(os.listdir(root / sub)) if (root / sub).is_dir() else [] for sub in ("new", "cur")
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=START_WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)
