# pytest_twisted has no type information: its decorators are untyped.
# mypy: disable-error-code="untyped-decorator"
"""The ``check`` audit end to end against a loopback world: a DNS server, the
HTTPS policy host and an SMTP server with STARTTLS on 127.0.0.1, all
certificates from one CA made at run time. Each misconfiguration gives its
finding (level and message); a correct domain gives only ✓."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor

from postfix_mtasts.check.audit import Auditor, CheckSettings
from postfix_mtasts.check.findings import Finding, Level, Topic, exit_status
from tests.conftest import require
from tests.support.https_server import CertKind, Redirect, Serve
from tests.support.smtp_server import SmtpCert, SmtpMode, SmtpServer, openssl_allows_tls10, set_mx
from tests.support.world import LOOPBACK, World

reactor: Any = global_reactor

DOMAIN = "example.test"
MX1 = "mx1.example.test"
MX2 = "mx2.example.test"
POLICY_ID = "20240601"
#: Short DNS/fetch/SMTP limits keep failing checks quick (not assertions).
DNS_TIMEOUT = 1.0
FETCH_TIMEOUT = 3.0
SMTP_DEADLINE = 3.0
#: Deadline for the "hang" server, whose probes must all run out.
HANG_DEADLINE = 0.5


@dataclass
class Lab:
    world: World
    smtp: SmtpServer

    def settings(self, smtp_deadline: float = SMTP_DEADLINE) -> CheckSettings:
        return CheckSettings(
            nameservers=(self.world.dns.nameserver,),
            ca_file=self.world.ca_file,
            https_port=self.world.https_port,
            smtp_port=self.smtp.port,
            dns_timeout=DNS_TIMEOUT,
            fetch_timeout=FETCH_TIMEOUT,
            smtp_deadline=smtp_deadline,
        )

    async def audit(self, smtp_deadline: float = SMTP_DEADLINE) -> list[Finding]:
        return await Auditor(reactor, self.settings(smtp_deadline)).audit(DOMAIN)

    async def restart_smtp(self, mode: SmtpMode) -> SmtpServer:
        await self.smtp.stop()
        self.smtp = SmtpServer(self.world.https.ca, mode=mode)
        await self.smtp.start(reactor)
        return self.smtp


def publish_correct_domain(world: World, *, mode: str = "enforce", mx: Sequence[str] = (MX1,)) -> None:
    """A domain set up right: TXT, policy host, policy, MX → 127.0.0.1, TLSRPT."""
    world.publish(DOMAIN, World.policy_text(mode=mode, mx=mx, max_age=604800), POLICY_ID)
    set_mx(world.dns, DOMAIN, (10, MX1))
    world.dns.set_a(MX1, LOOPBACK)
    world.dns.set_txt(f"_smtp._tls.{DOMAIN}", f"v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}")


@pytest_twisted.async_yield_fixture()
async def lab() -> AsyncIterator[Lab]:
    world = await World.start(reactor)
    smtp = SmtpServer(world.https.ca)
    await smtp.start(reactor)
    running = Lab(world, smtp)
    publish_correct_domain(world)
    try:
        yield running
    finally:
        await running.smtp.stop()
        await world.stop()


def only(findings: list[Finding], topic: str, level: Level) -> list[Finding]:
    return [finding for finding in findings if finding.topic == topic and finding.level is level]


def the_one(findings: list[Finding], topic: str, level: Level, text: str) -> Finding:
    """The single finding of ``topic`` at ``level`` whose message contains ``text``."""
    matching = [finding for finding in only(findings, topic, level) if text in finding.message]
    assert len(matching) == 1, "\n".join(f"{f.level.symbol} [{f.topic}] {f.message}" for f in findings)
    return matching[0]


def problems(findings: list[Finding]) -> list[str]:
    return [f"{f.level.symbol} [{f.topic}] {f.message}" for f in findings if f.level is not Level.OK]


# --- the correct domain ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_correct_domain_gives_only_ok_findings(lab: Lab) -> None:
    findings = await lab.audit()
    assert problems(findings) == []
    assert exit_status(findings) == 0
    topics = {finding.topic for finding in findings}
    assert topics == {
        Topic.STS_TXT,
        Topic.POLICY_HOST_DNS,
        Topic.POLICY_HOST_TLS,
        Topic.POLICY_HOST_HTTP,
        Topic.POLICY,
        Topic.POLICY_MODE,
        Topic.POLICY_MAX_AGE,
        Topic.MX_RECORDS,
        Topic.MX_COVERAGE,
        Topic.SMTP_STARTTLS,
        Topic.SMTP_CERTIFICATE,
        Topic.SMTP_TLS_VERSION,
        Topic.TLSRPT,
    }
    assert the_one(findings, Topic.STS_TXT, Level.OK, f"_mta-sts.{DOMAIN}: one record, id {POLICY_ID}")
    # The policy host's expiry date is what the fetcher saw of its certificate.
    policy_tls = the_one(findings, Topic.POLICY_HOST_TLS, Level.OK, "certificate valid and trusted, TLSv1.")
    assert ", expires " in policy_tls.message and " days)" in policy_tls.message
    assert the_one(findings, Topic.SMTP_CERTIFICATE, Level.OK, f"{MX1}: certificate valid for {MX1}")
    # The prober really spoke SMTP with STARTTLS, asking for the MX name.
    assert lab.smtp.sni_names == [MX1]
    assert lab.smtp.handshakes == 1
    assert lab.smtp.commands[-1] == "QUIT"
    await lab.smtp.wait_idle()


# --- _mta-sts TXT -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_missing_txt_record(lab: Lab) -> None:
    lab.world.dns.remove(f"_mta-sts.{DOMAIN}")
    findings = await lab.audit()
    finding = the_one(findings, Topic.STS_TXT, Level.ERROR, "no TXT record")
    assert "v=STSv1; id=" in finding.fix
    assert exit_status(findings) == 1


@pytest_twisted.ensureDeferred
async def test_two_sts_records(lab: Lab) -> None:
    lab.world.dns.set_txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=1;", "v=STSv1; id=2;")
    findings = await lab.audit()
    the_one(findings, Topic.STS_TXT, Level.ERROR, "2 v=STSv1 records; exactly one is allowed")
    assert exit_status(findings) == 1


@pytest_twisted.ensureDeferred
async def test_txt_syntax_error(lab: Lab) -> None:
    lab.world.dns.set_txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=2024-06-01;")
    findings = await lab.audit()
    the_one(findings, Topic.STS_TXT, Level.ERROR, 'id "2024-06-01" is not 1 to 32 letters or digits')


@pytest_twisted.ensureDeferred
async def test_txt_without_sts_prefix(lab: Lab) -> None:
    lab.world.dns.set_txt(f"_mta-sts.{DOMAIN}", "v=STSv1 id=1")
    findings = await lab.audit()
    the_one(findings, Topic.STS_TXT, Level.ERROR, "no record starts with v=STSv1;")


# --- policy host -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_policy_host_does_not_resolve(lab: Lab) -> None:
    lab.world.dns.remove(f"mta-sts.{DOMAIN}")
    findings = await lab.audit()
    the_one(findings, Topic.POLICY_HOST_DNS, Level.ERROR, f"mta-sts.{DOMAIN} does not resolve: NXDOMAIN")
    # Without a policy there is nothing to compare the MX hosts with, but they are still probed.
    assert only(findings, Topic.MX_COVERAGE, Level.OK) == []
    the_one(findings, Topic.SMTP_STARTTLS, Level.OK, MX1)
    assert exit_status(findings) == 1


@pytest.mark.parametrize(
    ("kind", "text", "fix"),
    [
        (CertKind.EXPIRED, "certificate has expired", f"renew the certificate of mta-sts.{DOMAIN}"),
        (
            CertKind.WRONG_NAME,
            f"certificate not valid for mta-sts.{DOMAIN}",
            f"a certificate whose subjectAltName includes mta-sts.{DOMAIN}",
        ),
        (CertKind.UNTRUSTED, "certificate issuer is not trusted", "with the intermediate certificates"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_policy_host_certificate_problems(lab: Lab, kind: CertKind, text: str, fix: str) -> None:
    policy = World.policy_text(mx=(MX1,), max_age=604800).encode()
    lab.world.https.set_host(f"mta-sts.{DOMAIN}", Serve(body=policy), certificate=kind)
    findings = await lab.audit()
    finding = the_one(findings, Topic.POLICY_HOST_TLS, Level.ERROR, text)
    assert "cannot fetch your policy" in finding.meaning
    assert fix in finding.fix, finding.fix
    assert exit_status(findings) == 1


@pytest_twisted.ensureDeferred
async def test_policy_host_redirect(lab: Lab) -> None:
    lab.world.https.set_host(f"mta-sts.{DOMAIN}", Redirect(f"https://www.{DOMAIN}/mta-sts.txt"))
    findings = await lab.audit()
    finding = the_one(findings, Topic.POLICY_HOST_HTTP, Level.ERROR, "HTTP 301 redirect to")
    assert "do not follow redirects" in finding.meaning


@pytest_twisted.ensureDeferred
async def test_policy_host_status(lab: Lab) -> None:
    lab.world.https.set_host(f"mta-sts.{DOMAIN}", Serve(body=b"gone\n", status=404))
    findings = await lab.audit()
    finding = the_one(findings, Topic.POLICY_HOST_HTTP, Level.ERROR, "HTTP 404")
    assert "with status 200 and the policy" in finding.fix, finding.fix


@pytest_twisted.ensureDeferred
async def test_policy_media_type(lab: Lab) -> None:
    policy = World.policy_text(mx=(MX1,)).encode()
    lab.world.https.set_host(f"mta-sts.{DOMAIN}", Serve(body=policy, content_type="text/html"))
    findings = await lab.audit()
    finding = the_one(findings, Topic.POLICY_HOST_HTTP, Level.ERROR, "media type text/html, not text/plain")
    assert "text/plain" in finding.fix


@pytest_twisted.ensureDeferred
async def test_policy_too_big(lab: Lab) -> None:
    policy = World.policy_text(mx=(MX1,)) + "x-padding: " + "y" * 70_000 + "\r\n"
    lab.world.https.set_host(f"mta-sts.{DOMAIN}", Serve(body=policy.encode()))
    findings = await lab.audit()
    finding = the_one(findings, Topic.POLICY_HOST_HTTP, Level.ERROR, "policy body over 65536 bytes")
    assert "stop reading an oversized policy" in finding.meaning


@pytest_twisted.ensureDeferred
async def test_policy_syntax_error(lab: Lab) -> None:
    lab.world.https.set_host(f"mta-sts.{DOMAIN}", Serve(body=b"version: STSv1\nmode: enforcing\nmx: a.b\n"))
    findings = await lab.audit()
    the_one(findings, Topic.POLICY, Level.ERROR, 'mode "enforcing" is not enforce, testing or none')


@pytest.mark.parametrize(("mode", "text"), [("testing", "not protected yet"), ("none", "switched off")])
@pytest_twisted.ensureDeferred
async def test_policy_mode_warnings(lab: Lab, mode: str, text: str) -> None:
    lab.world.publish(DOMAIN, World.policy_text(mode=mode, mx=(MX1,), max_age=604800), POLICY_ID)
    findings = await lab.audit()
    the_one(findings, Topic.POLICY_MODE, Level.WARNING, text)
    assert exit_status(findings) == 0


@pytest.mark.parametrize(
    ("max_age", "level", "text"),
    [
        (3600, Level.WARNING, "max_age 3600 is under a day"),
        (99_999_999, Level.WARNING, "max_age 99999999 is over RFC 8461's limit; senders use 31557600"),
        (31_557_600, Level.OK, "max_age 31557600"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_policy_max_age(lab: Lab, max_age: int, level: Level, text: str) -> None:
    lab.world.publish(DOMAIN, World.policy_text(mx=(MX1,), max_age=max_age), POLICY_ID)
    findings = await lab.audit()
    the_one(findings, Topic.POLICY_MAX_AGE, level, text)


# --- MX coverage --------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "level"), [("enforce", Level.ERROR), ("testing", Level.WARNING)])
@pytest_twisted.ensureDeferred
async def test_mx_not_covered(lab: Lab, mode: str, level: Level) -> None:
    lab.world.publish(DOMAIN, World.policy_text(mode=mode, mx=(MX1, "*.mail.example.test")), POLICY_ID)
    set_mx(lab.world.dns, DOMAIN, (10, MX1), (20, MX2))
    lab.world.dns.set_a(MX2, LOOPBACK)
    findings = await lab.audit()
    finding = the_one(
        findings,
        Topic.MX_COVERAGE,
        level,
        f"{MX2} is not covered by the policy's mx patterns ({MX1}, *.mail.example.test)",
    )
    assert finding.fix == f'add "mx: {MX2}" to the policy, publish it, and change the id in the TXT record'
    if level is Level.ERROR:
        assert finding.meaning == f"in enforce mode, senders refuse to deliver to {MX2}"
    # Both MX hosts were probed, each with its own name.
    assert sorted(name for name in lab.smtp.sni_names if name) == [MX1, MX2]
    assert len(only(findings, Topic.SMTP_CERTIFICATE, Level.OK)) == 2


@pytest_twisted.ensureDeferred
async def test_wildcard_pattern_covers_mx(lab: Lab) -> None:
    lab.world.publish(DOMAIN, World.policy_text(mx=("*.example.test",), max_age=604800), POLICY_ID)
    findings = await lab.audit()
    assert problems(findings) == []
    the_one(findings, Topic.MX_COVERAGE, Level.OK, f"every MX host ({MX1}) matches")


@pytest_twisted.ensureDeferred
async def test_no_mx_record_falls_back_to_the_domain(lab: Lab) -> None:
    lab.world.dns.remove(DOMAIN, "MX")
    lab.world.dns.set_a(DOMAIN, LOOPBACK)
    findings = await lab.audit()
    the_one(findings, Topic.MX_RECORDS, Level.WARNING, "no MX record")
    the_one(findings, Topic.MX_COVERAGE, Level.ERROR, f"{DOMAIN} is not covered")
    the_one(findings, Topic.SMTP_STARTTLS, Level.OK, f"{DOMAIN}: STARTTLS offered")


@pytest_twisted.ensureDeferred
async def test_mx_pattern_with_a_trailing_dot_is_a_warning_not_a_refusal(lab: Lab) -> None:
    lab.world.publish(DOMAIN, World.policy_text(mx=(MX1.upper() + ".",), max_age=604800), POLICY_ID)
    findings = await lab.audit()
    the_one(findings, Topic.POLICY, Level.OK, f"policy valid: mode enforce, mx {MX1}")
    the_one(findings, Topic.POLICY, Level.WARNING, "ends with a dot")
    the_one(findings, Topic.MX_COVERAGE, Level.OK, f"every MX host ({MX1}) matches")


@pytest_twisted.ensureDeferred
async def test_no_mx_record_and_no_address_asks_for_an_mx_record(lab: Lab) -> None:
    lab.world.dns.remove(DOMAIN, "MX")
    findings = await lab.audit()
    the_one(findings, Topic.MX_RECORDS, Level.WARNING, "no MX record")
    unreachable = the_one(findings, Topic.SMTP_CONNECT, Level.ERROR, f"{DOMAIN}: no MX record and no address")
    assert "remove it from the MX records" not in unreachable.fix
    assert unreachable.fix.startswith("publish an MX record")


@pytest_twisted.ensureDeferred
async def test_mx_host_does_not_resolve(lab: Lab) -> None:
    lab.world.dns.remove(MX1)
    findings = await lab.audit()
    the_one(findings, Topic.SMTP_CONNECT, Level.ERROR, f"{MX1}: does not resolve")


# --- SMTP on the MX hosts --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_starttls_not_offered(lab: Lab) -> None:
    smtp = await lab.restart_smtp(SmtpMode.NO_STARTTLS)
    findings = await lab.audit()
    finding = the_one(findings, Topic.SMTP_STARTTLS, Level.ERROR, f"{MX1}: STARTTLS not offered")
    assert "unencrypted" in finding.meaning
    assert only(findings, Topic.SMTP_CERTIFICATE, Level.OK) == []
    assert smtp.handshakes == 0
    assert "STARTTLS" not in smtp.commands
    assert exit_status(findings) == 1


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (SmtpCert.WRONG_NAME, f"certificate not valid for {MX1} (names: not-{MX1})"),
        (SmtpCert.EXPIRED, f"{MX1}: certificate expired on"),
        (SmtpCert.UNTRUSTED, "certificate issuer is not trusted"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_mx_certificate_problems(lab: Lab, kind: SmtpCert, text: str) -> None:
    lab.smtp.set_certificate(MX1, kind)
    findings = await lab.audit()
    finding = the_one(findings, Topic.SMTP_CERTIFICATE, Level.ERROR, text)
    assert f"cannot deliver to {MX1}" in finding.meaning
    # The handshake still completed, so the TLS version is known too.
    the_one(findings, Topic.SMTP_TLS_VERSION, Level.OK, MX1)
    assert exit_status(findings) == 1


@pytest_twisted.ensureDeferred
async def test_mx_certificate_expiring_soon(lab: Lab) -> None:
    lab.smtp.set_certificate(MX1, SmtpCert.EXPIRING)
    findings = await lab.audit()
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=5, hours=12)
    finding = the_one(
        findings, Topic.SMTP_CERTIFICATE, Level.WARNING, f"{MX1}: certificate expires in 5 days"
    )
    assert f"{expires:%Y-%m-%d}" in finding.message
    assert exit_status(findings) == 0


@pytest_twisted.ensureDeferred
async def test_mx_tls_1_0_only(lab: Lab) -> None:
    require("TLS 1.0 in this machine's OpenSSL", openssl_allows_tls10())
    await lab.restart_smtp(SmtpMode.TLS_1_0_ONLY)
    findings = await lab.audit()
    the_one(findings, Topic.SMTP_TLS_VERSION, Level.WARNING, f"{MX1}: negotiated TLSv1, below TLS 1.2")
    the_one(findings, Topic.SMTP_CERTIFICATE, Level.OK, MX1)


@pytest_twisted.ensureDeferred
async def test_hanging_mx_hosts_are_probed_at_once_and_cut_at_their_deadline(lab: Lab) -> None:
    set_mx(lab.world.dns, DOMAIN, (10, MX1), (20, MX2))
    lab.world.dns.set_a(MX2, LOOPBACK)
    lab.world.publish(DOMAIN, World.policy_text(mx=(MX1, MX2), max_age=604800), POLICY_ID)
    smtp = await lab.restart_smtp(SmtpMode.HANG)
    findings = await lab.audit(smtp_deadline=HANG_DEADLINE)
    for host in (MX1, MX2):
        the_one(
            findings,
            Topic.SMTP_CONNECT,
            Level.ERROR,
            f"{host}: no answer within {HANG_DEADLINE:g}s (while waiting for the banner from 127.0.0.1:",
        )
    # Both hosts were probed, and the prober closed both connections.
    assert smtp.connections_accepted == 2
    await smtp.wait_idle()


@pytest_twisted.ensureDeferred
async def test_smtp_refused(lab: Lab) -> None:
    port = lab.smtp.port
    await lab.smtp.stop()
    findings = await lab.audit()
    the_one(findings, Topic.SMTP_CONNECT, Level.ERROR, f"{MX1}: connection refused by 127.0.0.1:{port}")
    lab.smtp = SmtpServer(lab.world.https.ca)  # the fixture stops it again
    await lab.smtp.start(reactor)


# --- TLSRPT ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tlsrpt_absent(lab: Lab) -> None:
    lab.world.dns.remove(f"_smtp._tls.{DOMAIN}")
    findings = await lab.audit()
    finding = the_one(findings, Topic.TLSRPT, Level.WARNING, "no TLSRPT record")
    assert "you will not receive TLS reports" in finding.meaning
    assert exit_status(findings) == 0


@pytest.mark.parametrize(
    ("record", "text"),
    [
        ("v=TLSRPTv1;", "no rua= field"),
        ("v=TLSRPTv1; rua=ftp://reports.example.test/", "is neither a mailto: nor an https: URI"),
        ("v=TLSRPTv1; rua=mailto:nobody", "has no valid mail address"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_tlsrpt_invalid(lab: Lab, record: str, text: str) -> None:
    lab.world.dns.set_txt(f"_smtp._tls.{DOMAIN}", record)
    findings = await lab.audit()
    the_one(findings, Topic.TLSRPT, Level.ERROR, text)


@pytest_twisted.ensureDeferred
async def test_tlsrpt_with_two_uris(lab: Lab) -> None:
    lab.world.dns.set_txt(
        f"_smtp._tls.{DOMAIN}", f"v=TLSRPTv1; rua=mailto:a@{DOMAIN},https://reports.{DOMAIN}/tlsrpt"
    )
    findings = await lab.audit()
    the_one(findings, Topic.TLSRPT, Level.OK, f"mailto:a@{DOMAIN}, https://reports.{DOMAIN}/tlsrpt")
