"""A real DNSSEC-validating resolver on loopback: Debian's unbound serving a
zone signed at test time with ldns-signzone, with that zone's DS as its only
trust anchor.

unbound loads the signed zone file as an ``auth-zone`` used only as its
upstream (``for-upstream: yes, for-downstream: no``), so every answer passes
through its validator exactly as data from a remote authoritative server
would: signed data gets the AD bit, a record changed after signing is bogus
and answered SERVFAIL. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode

from tests.support.daemon import LOOPBACK, free_port

UNBOUND = "/usr/sbin/unbound"
LDNS_KEYGEN = "ldns-keygen"
LDNS_SIGNZONE = "ldns-signzone"
#: ECDSA P-256 with SHA-256 (algorithm 13): fast to make, validated everywhere.
KEY_ALGORITHM = "ECDSAP256SHA256"
#: Signatures stay valid this long from now (ldns-signzone's -e).
SIGNATURE_VALIDITY = 30 * 86_400
#: How long unbound may take to answer its first query.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


def available() -> bool:
    """unbound and the ldns signing tools are installed."""
    return Path(UNBOUND).exists() and all(shutil.which(tool) for tool in (LDNS_KEYGEN, LDNS_SIGNZONE))


@dataclass
class SignedZone:
    """A zone's records as master-file lines (owner names relative to ``origin``);
    signed at start unless passed as one of the ``unsigned`` zones."""

    origin: str
    records: list[str] = field(default_factory=list)
    ttl: int = 300

    def text(self) -> str:
        head = [
            f"$ORIGIN {self.origin}.",
            f"$TTL {self.ttl}",
            f"@ IN SOA ns.{self.origin}. hostmaster.{self.origin}. 1 3600 600 86400 {self.ttl}",
            f"@ IN NS ns.{self.origin}.",
            f"ns IN A {LOOPBACK}",
        ]
        return "\n".join(head + self.records) + "\n"


class ValidatingResolver:
    """unbound on 127.0.0.1:``port``, validating ``zone`` with its own key.

    ``tamper`` replaces text in the signed zone file before unbound starts,
    so that the changed record no longer matches its signature.
    """

    def __init__(
        self,
        directory: Path,
        zone: SignedZone,
        tamper: tuple[tuple[str, str], ...] = (),
        unsigned: tuple[SignedZone, ...] = (),
    ) -> None:
        self.directory = directory
        self.zone = zone
        self.tamper = tamper
        #: Zones served without signatures (outside the trust anchor: insecure).
        self.unsigned = unsigned
        self.port = 0
        self.log = directory / "unbound.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> None:
        anchor = self._sign()
        self.port = free_port()
        config = self.directory / "unbound.conf"
        config.write_text(self._config(anchor))
        checked = subprocess.run(["unbound-checkconf", str(config)], capture_output=True, text=True)
        if checked.returncode != 0:
            raise RuntimeError(f"unbound-checkconf: {checked.stdout}{checked.stderr}".strip())
        with self.log.open("wb") as log:
            self._process = subprocess.Popen([UNBOUND, "-d", "-c", str(config)], stdout=log, stderr=log)
        self._wait_ready()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def _sign(self) -> Path:
        """Write, key and sign the zone; return the DS file (the trust anchor)."""
        origin = self.zone.origin
        zone_file = self.directory / "zone.db"
        zone_file.write_text(self.zone.text())
        ksk = self._run(LDNS_KEYGEN, "-a", KEY_ALGORITHM, "-k", origin).strip()
        zsk = self._run(LDNS_KEYGEN, "-a", KEY_ALGORITHM, origin).strip()
        expires = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() + SIGNATURE_VALIDITY))
        self._run(LDNS_SIGNZONE, "-n", "-e", expires, str(zone_file), ksk, zsk)
        signed = self.directory / "zone.db.signed"
        text = signed.read_text()
        for old, new in self.tamper:
            if text.count(old) != 1:
                raise ValueError(f"tamper: {old!r} occurs {text.count(old)} times in the signed zone")
            text = text.replace(old, new)
        signed.write_text(text)
        return self.directory / f"{ksk}.ds"

    def _run(self, *command: str) -> str:
        done = subprocess.run(command, cwd=self.directory, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
        return done.stdout

    def _config(self, anchor: Path) -> str:
        origin = self.zone.origin
        top = origin.rsplit(".", 1)[-1]
        return f"""server:
    interface: {LOOPBACK}
    port: {self.port}
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{self.directory}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    do-ip6: no
    num-threads: 1
    so-reuseport: no
    do-not-query-localhost: no
    access-control: 127.0.0.0/8 allow
    module-config: "validator iterator"
    trust-anchor-file: "{anchor}"
    # The test zone lives under a name unbound serves locally by default.
    local-zone: "{top}." nodefault
auth-zone:
    name: "{origin}."
    zonefile: "{self.directory / 'zone.db.signed'}"
    for-upstream: yes
    for-downstream: no
    fallback-enabled: no
""" + "".join(self._unsigned_zone(zone) for zone in self.unsigned)

    def _unsigned_zone(self, zone: SignedZone) -> str:
        path = self.directory / f"{zone.origin}.db"
        path.write_text(zone.text())
        return f"""auth-zone:
    name: "{zone.origin}."
    zonefile: "{path}"
    for-upstream: yes
    for-downstream: no
    fallback-enabled: no
"""

    def _wait_ready(self) -> None:
        query = dns.message.make_query(f"{self.zone.origin}.", "SOA", want_dnssec=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"unbound exited: {self.log.read_text()[-2000:]}")
            try:
                reply = dns.query.udp(query, LOOPBACK, port=self.port, timeout=POLL_INTERVAL * 4)
            except (dns.exception.Timeout, OSError):
                time.sleep(POLL_INTERVAL)
                continue
            if reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AD:
                return
            raise RuntimeError(
                f"unbound does not validate the test zone: {dns.rcode.to_text(reply.rcode())}, "
                f"flags {dns.flags.to_text(reply.flags)}; log: {self.log.read_text()[-2000:]}"
            )
        self.stop()
        raise RuntimeError(f"unbound did not answer within {START_TIMEOUT}s: {self.log.read_text()[-2000:]}")
