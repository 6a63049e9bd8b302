"""Postfix 3.10's TLSRPT attributes, end to end with a real Postfix 3.10.

Debian 12 ships Postfix 3.7, which rejects these attributes, so these tests
run Debian 13's Postfix 3.10 (built with libtlsrpt) in a chroot made with
``debootstrap --variant=minbase --include=postfix,libtlsrpt0 trixie DIR``
(``.ci/run`` makes one; ``MTASTS_POSTFIX310_ROOT`` names it). They need root
(chroot, and ports 25 and 53).

Postfix there delivers a real message: its SMTP client asks the daemon
(profile ``tlsrpt``) over socketmap, directly or through proxymap(8), for
the next hop's TLS policy, looks up the MX and the ``_smtp._tls`` record
through the system resolver (a test DNS server on port 53 of MTA_ADDRESS),
and hands the message over STARTTLS to a test SMTP server on port 25 of the
same address. libtlsrpt reports the
delivery as a JSON datagram on a unix socket the test listens on, so the test
sees what Postfix made of the answer's ``policy_type``, ``policy_domain``,
``mx_host_pattern`` and ``policy_string`` attributes, and of
``policy_failure`` when a promised policy cannot be fetched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from tests.conftest import missing
from tests.support.daemon import LOOPBACK, DaemonProcess, async_yield_fixture, ensure_deferred, free_port
from tests.support.dns_server import DnsServer, stop_listening
from tests.support.https_server import Serve
from tests.support.smtp_server import SmtpServer, set_mx
from tests.support.world import World

pytestmark = [pytest.mark.integration, pytest.mark.postfix]

#: Where the chroot with Postfix 3.10 is.
ROOT_VARIABLE = "MTASTS_POSTFIX310_ROOT"
#: A loopback address of its own for the DNS server (53) and the MX (25), so
#: that a local MTA on 127.0.0.1:25 is no obstacle.
MTA_ADDRESS = "127.88.0.1"
MX_HOST = "mx1.enforce.example"
ENFORCE = "enforce.example"
ENFORCE_MX = (MX_HOST, "*.backup.enforce.example")
#: A domain whose ``_mta-sts`` record promises a policy its host does not serve.
BROKEN = "broken.example"
TLSRPT_RECORD = "v=TLSRPTv1; rua=mailto:tlsrpt@reports.example"
#: Inside the chroot.
CA_PATH = "/etc/postfix/mtasts-test-ca.pem"
TLSRPT_SOCKET = "/run/tlsrpt/tlsrpt.sock"
MAILLOG = "/var/log/postfix.log"
#: libtlsrpt's codes (tlsrpt.h): the STS policy type and a failure type.
TLSRPT_POLICY_STS = 2
TLSRPT_STS_POLICY_FETCH_ERROR = 301
#: Guards against a hung run, not timed assertions.
DELIVERY_WAIT = 60.0
POLL = 0.1
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


@pytest.fixture
def postfix_root() -> Path:
    """The chroot, or skip (under CI: fail) saying what is missing."""
    value = os.environ.get(ROOT_VARIABLE, "")
    if not value:
        missing(f"a chroot with Postfix 3.10 ({ROOT_VARIABLE})")
    if os.geteuid() != 0:
        missing("root (chroot, ports 25 and 53) for the Postfix 3.10 tests")
    root = Path(value)
    if not (root / "usr/sbin/postfix").exists():
        missing(f"Postfix in {root} ({ROOT_VARIABLE})")
    return root


class _Reports(DatagramProtocol):
    """Every datagram libtlsrpt sends, decoded from JSON."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.reports.append(json.loads(datagram))


@dataclass
class Mta:
    """Postfix 3.10 in its chroot, and the world it delivers into."""

    root: Path
    world: World
    dns: DnsServer
    smtp: SmtpServer
    reports: _Reports
    daemon: DaemonProcess

    async def run(self, *argv: str) -> str:
        """A command inside the chroot; fails the test unless it exits 0."""
        running: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(  # type: ignore[no-untyped-call]
            "/usr/sbin/chroot", [str(self.root), *argv], env={"PATH": PATH}, reactor=reactor()
        )
        out, err, code = await running
        text = (out + err).decode("utf-8", "replace")
        assert code == 0, f"{' '.join(argv)} exited {code}: {text}"
        return text

    async def send(self, recipient: str) -> None:
        message = f"From: sender@sender.mtasts.test\nTo: {recipient}\nSubject: test\n\nhello\n"
        (self.root / "tmp/message").write_text(message)
        await self.run("/bin/sh", "-c", f"sendmail -f sender@sender.mtasts.test {recipient} < /tmp/message")

    def log(self) -> str:
        path = self.root / MAILLOG.lstrip("/")
        return path.read_text(errors="replace") if path.exists() else ""

    async def wait_for(self, done: Callable[[], object], what: str) -> None:
        waited = 0.0
        while not done():
            assert waited < DELIVERY_WAIT, f"no {what} after {DELIVERY_WAIT}s; Postfix log:\n{self.log()}"
            await deferLater(reactor(), POLL, lambda: None)
            waited += POLL


def main_cf(socketmap_port: int, table_kind: str) -> str:
    table = f"socketmap:inet:{LOOPBACK}:{socketmap_port}:tlsrpt"
    if table_kind == "proxymap":
        table = "proxy:" + table
    return f"""\
compatibility_level = 3.10
myhostname = sender.mtasts.test
myorigin = $myhostname
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
maillog_file = {MAILLOG}
smtp_tls_security_level = may
smtp_tls_CAfile = {CA_PATH}
smtp_tls_loglevel = 1
smtp_tls_policy_maps = {table}
smtp_tlsrpt_enable = yes
smtp_tlsrpt_socket_name = {TLSRPT_SOCKET}
"""


@pytest.fixture(params=["socketmap", "proxymap"])
def table_kind(request: pytest.FixtureRequest) -> str:
    """How Postfix reaches the daemon: its SMTP client directly, or through
    proxymap(8) (``proxy:socketmap:...``), as a chrooted smtp(8) must."""
    kind: str = request.param
    return kind


@async_yield_fixture
async def mta(tmp_path: Path, postfix_root: Path, table_kind: str) -> AsyncIterator[Mta]:
    root = postfix_root
    async with AsyncExitStack() as cleanup:
        world = await World.start(reactor())
        cleanup.push_async_callback(world.stop)
        world.publish(ENFORCE, World.policy_text(mode="enforce", mx=ENFORCE_MX), "e1")
        world.publish(BROKEN, World.policy_text(mode="enforce", mx=(MX_HOST,)), "b1")
        world.https.set_host(f"mta-sts.{BROKEN}", Serve(status=404))

        dns = await DnsServer.start(reactor(), interface=MTA_ADDRESS, port=53)
        cleanup.push_async_callback(dns.stop)
        for domain in (ENFORCE, BROKEN):
            set_mx(dns, domain, (10, MX_HOST))
            dns.set_txt(f"_smtp._tls.{domain}", TLSRPT_RECORD)
        dns.set_a(MX_HOST, MTA_ADDRESS)
        smtp = SmtpServer(world.https.ca)
        await smtp.start(reactor(), interface=MTA_ADDRESS, port=25)
        cleanup.push_async_callback(smtp.stop)

        socketmap_port = free_port()
        config = world.config_toml(
            socketmap=(f"inet:{LOOPBACK}:{socketmap_port}",),
            profiles={"tlsrpt": {"tlsrpt": True, "tlsrpt_policy_failure": True}},
        )
        daemon = await DaemonProcess.start(reactor(), tmp_path, config)
        cleanup.push_async_callback(daemon.close)

        reports = _Reports()
        socket_path = root / TLSRPT_SOCKET.lstrip("/")
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        socket_path.unlink(missing_ok=True)
        listening = reactor().listenUNIXDatagram(str(socket_path), reports)
        cleanup.push_async_callback(stop_listening, listening)
        os.chmod(socket_path, 0o666)  # Postfix's smtp runs as the postfix user

        (root / "etc/resolv.conf").write_text(f"nameserver {MTA_ADDRESS}\n")
        shutil.copyfile(world.ca_file, root / CA_PATH.lstrip("/"))
        (root / "etc/postfix/main.cf").write_text(main_cf(socketmap_port, table_kind))
        (root / MAILLOG.lstrip("/")).unlink(missing_ok=True)
        setup = Mta(root, world, dns, smtp, reports, daemon)
        # No chroot inside the chroot (its files would need copying), and
        # no SMTP server of its own: the test only sends.
        await setup.run("postconf", "-F", "*/*/chroot = n")
        await setup.run("postconf", "-MX", "smtp/inet")
        # What a run cut short may have left: a running Postfix, queued mail.
        # (postfix check makes the queue directories a new chroot lacks.)
        await setup.run("/bin/sh", "-c", "! postfix status 2>/dev/null || postfix stop")
        await setup.run("postfix", "check")
        await setup.run("postsuper", "-d", "ALL")
        await setup.run("postfix", "start")
        try:
            yield setup
        finally:
            await setup.run("postfix", "stop")
            await setup.run("postsuper", "-d", "ALL")
        await daemon.stop()
    assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()


def _policy(report: dict[str, Any]) -> dict[str, Any]:
    policies = report["policies"]
    assert len(policies) == 1, report
    policy: dict[str, Any] = policies[0]
    return policy


@ensure_deferred
async def test_postfix_310_reports_the_sts_policy_of_a_delivery(mta: Mta) -> None:
    await mta.send(f"user@{ENFORCE}")
    await mta.wait_for(lambda: mta.smtp.mail and mta.reports.reports, "delivery and TLSRPT report")

    [mail] = mta.smtp.mail
    assert (mail.recipients, mail.tls) == ((f"user@{ENFORCE}",), True)
    log = mta.log()
    assert f"Verified TLS connection established to {MX_HOST}[{MTA_ADDRESS}]:25" in log, log
    assert "warning" not in log, log
    [report] = mta.reports.reports
    assert (report["d"], report["pr"]) == (ENFORCE, TLSRPT_RECORD)
    policy = _policy(report)
    assert policy["policy-type"] == TLSRPT_POLICY_STS
    assert policy["policy-domain"] == ENFORCE
    assert policy["mx-host"] == list(ENFORCE_MX)
    assert policy["policy-string"] == World.policy_text(mode="enforce", mx=ENFORCE_MX).splitlines()
    assert (policy["t"], policy["f"]) == (0, 0), policy


@ensure_deferred
async def test_postfix_310_defers_and_reports_a_promised_policy_it_cannot_fetch(mta: Mta) -> None:
    await mta.send(f"user@{BROKEN}")
    await mta.wait_for(lambda: mta.reports.reports, "TLSRPT report")

    assert mta.smtp.mail == []
    [report] = mta.reports.reports
    assert report["d"] == BROKEN
    policy = _policy(report)
    assert (policy["policy-type"], policy["policy-domain"]) == (TLSRPT_POLICY_STS, BROKEN)
    assert policy["f"] == 1, policy
    assert [detail["c"] for detail in policy["failure-details"]] == [TLSRPT_STS_POLICY_FETCH_ERROR], policy
    await mta.wait_for(lambda: "status=deferred" in mta.log(), "deferral in the log")
    assert f"to=<user@{BROKEN}>" in mta.log()
