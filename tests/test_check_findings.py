"""Unit tests of the check's pure parts: findings and their rendering, and the
judgements of certificates, policies, MX coverage, SMTP probes and TLSRPT."""

from __future__ import annotations

import datetime
import json

import pytest
import trustme
from cryptography import x509

from postfix_mtasts import limits
from postfix_mtasts.check.audit import CheckSetupError, normalise_domain
from postfix_mtasts.check.findings import (
    Finding,
    Level,
    Topic,
    exit_status,
    render_json,
    render_text,
    summary,
)
from postfix_mtasts.check.judgements import (
    CERTIFICATE_WARNING_DAYS,
    expiry_finding,
    mx_coverage,
    parse_tlsrpt,
    policy_findings,
    smtp_findings,
    tlsrpt_finding,
    unresolvable_mx_finding,
)
from postfix_mtasts.check.smtp import SmtpProbe
from postfix_mtasts.policy.model import Mode, Policy

NOW = datetime.datetime(2024, 6, 1, 12, 0, tzinfo=datetime.UTC)
UNCOVERED = Finding.error(
    Topic.MX_COVERAGE,
    "mx2.example.com is not covered by the policy's mx patterns (mx.example.com, *.mail.example.com)",
    "in enforce mode, senders refuse to deliver to mx2.example.com",
    'add "mx: mx2.example.com" to the policy, publish it, and change the id in the TXT record',
)


# --- findings and rendering ------------------------------------------------------


def test_warnings_and_errors_must_say_what_they_mean_and_how_to_fix() -> None:
    with pytest.raises(ValueError, match="needs its meaning and fix"):
        Finding(Level.ERROR, Topic.TLSRPT, "broken", meaning="bad")
    with pytest.raises(ValueError, match="needs its meaning and fix"):
        Finding(Level.WARNING, Topic.TLSRPT, "odd", fix="do it")
    assert Finding.ok(Topic.TLSRPT, "fine").meaning == ""


def test_text_rendering_matches_the_documented_style() -> None:
    findings = [Finding.ok(Topic.STS_TXT, "_mta-sts.example.com: one record, id 20240601"), UNCOVERED]
    assert render_text("example.com", findings) == (
        "✓ _mta-sts.example.com: one record, id 20240601\n"
        "✗ mx2.example.com is not covered by the policy's mx patterns (mx.example.com, *.mail.example.com)\n"
        "    means: in enforce mode, senders refuse to deliver to mx2.example.com\n"
        '    fix:   add "mx: mx2.example.com" to the policy, publish it, '
        "and change the id in the TXT record\n"
        "example.com: 2 checks, 1 error, 0 warnings\n"
    )


def test_json_rendering_is_a_list_of_findings() -> None:
    warning = Finding.warning(Topic.POLICY_MODE, "mode testing: not protected yet", "m", "f")
    parsed = json.loads(render_json([UNCOVERED, warning]))
    assert parsed == [
        {
            "level": "error",
            "topic": "mx-coverage",
            "message": UNCOVERED.message,
            "meaning": UNCOVERED.meaning,
            "fix": UNCOVERED.fix,
        },
        {"level": "warning", "topic": "policy-mode", "message": warning.message, "meaning": "m", "fix": "f"},
    ]
    assert json.loads(render_json([])) == []


def test_exit_status_fails_only_on_errors() -> None:
    ok = Finding.ok(Topic.TLSRPT, "fine")
    warning = Finding.warning(Topic.TLSRPT, "odd", "m", "f")
    assert exit_status([]) == 0
    assert exit_status([ok, warning]) == 0
    assert exit_status([ok, warning, UNCOVERED]) == 1
    assert summary("d.test", [ok, warning, warning]) == "d.test: 3 checks, 0 errors, 2 warnings"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Example.COM.", "example.com"), (" bücher.example ", "xn--bcher-kva.example")],
)
def test_normalise_domain(text: str, expected: str) -> None:
    assert normalise_domain(text) == expected


@pytest.mark.parametrize("text", ["", "localhost", "a..b", "exa mple.com", "-x.example"])
def test_normalise_domain_refuses(text: str) -> None:
    with pytest.raises(CheckSetupError):
        normalise_domain(text)


# --- certificates -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "level", "text"),
    [
        (90.0, Level.OK, "good, expires 2024-08-30 (90 days)"),
        (CERTIFICATE_WARNING_DAYS, Level.OK, "(14 days)"),
        (CERTIFICATE_WARNING_DAYS - 0.5, Level.WARNING, "certificate expires in 13 days (2024-06-15)"),
        (0.2, Level.WARNING, "certificate expires in 0 days"),
        (-1.0, Level.ERROR, "certificate expired on 2024-05-31"),
    ],
)
def test_expiry_thresholds(days: float, level: Level, text: str) -> None:
    expires = NOW + datetime.timedelta(days=days)
    finding = expiry_finding(Topic.SMTP_CERTIFICATE, "mx.example.com", "good", days, expires, "Senders fail")
    assert finding.level is level
    assert text in finding.message
    if level is Level.WARNING:
        assert finding.meaning.startswith("in 13 days senders fail") or finding.meaning.startswith(
            "in 0 days"
        )


# --- policy -------------------------------------------------------------------------


def _policy(mode: Mode, max_age: int = 604800, mx: tuple[str, ...] = ("mx.example.com",)) -> Policy:
    return Policy(mode=mode, max_age=min(max_age, limits.MAX_AGE_LIMIT), mx=mx)


def _levels(findings: list[Finding], topic: str) -> list[Level]:
    return [finding.level for finding in findings if finding.topic == topic]


def test_policy_findings_mode() -> None:
    assert _levels(policy_findings(_policy(Mode.ENFORCE), "max_age: 604800\n"), Topic.POLICY_MODE) == [
        Level.OK
    ]
    testing = policy_findings(_policy(Mode.TESTING), "max_age: 604800\n")
    assert [f.message for f in testing if f.topic == Topic.POLICY_MODE] == ["mode testing: not protected yet"]
    assert _levels(policy_findings(_policy(Mode.NONE, mx=()), ""), Topic.POLICY_MODE) == [Level.WARNING]


def test_forgiven_policy_problems_are_warnings_with_a_fix() -> None:
    warning = 'line 3: mx "MX1.example.com." ends with a dot; read as "mx1.example.com"'
    findings = policy_findings(_policy(Mode.ENFORCE), "max_age: 604800\n", (warning,))
    forgiven = [f for f in findings if f.topic == Topic.POLICY and f.level is Level.WARNING]
    assert [f.message for f in forgiven] == [f"policy {warning}"]
    assert "no final dot" in forgiven[0].fix


def test_a_missing_mx_host_is_removed_from_the_mx_records() -> None:
    finding = unresolvable_mx_finding("mx2.example.com", "NXDOMAIN")
    assert finding.level is Level.ERROR
    assert finding.fix == (
        "publish an A (and/or AAAA) record for mx2.example.com, or remove it from the MX records"
    )


def test_a_domain_without_mx_or_address_is_told_to_publish_an_mx_record() -> None:
    """With no MX record the domain itself is the implicit MX: there is no MX
    record to remove it from."""
    finding = unresolvable_mx_finding("example.com", "NXDOMAIN", implicit=True)
    assert finding.level is Level.ERROR
    assert finding.message == "example.com: no MX record and no address: NXDOMAIN"
    assert "MX record" in finding.fix and "remove" not in finding.fix
    assert finding.fix.startswith('publish an MX record, e.g. "example.com. MX 10 mx.example.com."')


def test_short_max_age_warns_only_in_enforce_mode() -> None:
    enforce = policy_findings(_policy(Mode.ENFORCE, 3600), "version: STSv1\r\nmax_age: 3600\r\n")
    assert _levels(enforce, Topic.POLICY_MAX_AGE) == [Level.WARNING]
    testing = policy_findings(_policy(Mode.TESTING, 3600), "max_age: 3600\n")
    assert _levels(testing, Topic.POLICY_MAX_AGE) == [Level.OK]
    day = policy_findings(_policy(Mode.ENFORCE, 86400), "max_age: 86400\n")
    assert [f.message for f in day if f.topic == Topic.POLICY_MAX_AGE] == ["max_age 86400 (1 day)"]


def test_clamped_max_age_is_read_from_the_published_text() -> None:
    findings = policy_findings(_policy(Mode.ENFORCE, 99_999_999), "version: STSv1\nmax_age:  99999999 \n")
    [finding] = [f for f in findings if f.topic == Topic.POLICY_MAX_AGE]
    assert finding.level is Level.WARNING
    assert finding.message == f"max_age 99999999 is over RFC 8461's limit; senders use {limits.MAX_AGE_LIMIT}"


# --- MX coverage -----------------------------------------------------------------------


def test_mx_coverage_by_mode() -> None:
    patterns = ("mx.example.com", "*.mail.example.com")
    hosts = ["mx.example.com", "a.mail.example.com", "b.a.mail.example.com"]
    enforce = mx_coverage(_policy(Mode.ENFORCE, mx=patterns), hosts)
    assert [(f.level, f.message.split()[0]) for f in enforce] == [(Level.ERROR, "b.a.mail.example.com")]
    testing = mx_coverage(_policy(Mode.TESTING, mx=patterns), hosts)
    assert [f.level for f in testing] == [Level.WARNING]
    assert mx_coverage(_policy(Mode.NONE, mx=()), hosts) == []
    covered = mx_coverage(_policy(Mode.ENFORCE, mx=patterns), hosts[:2])
    assert [f.level for f in covered] == [Level.OK]


# --- SMTP probe results -------------------------------------------------------------------


def _certificate(host: str, days: int) -> x509.Certificate:
    leaf = trustme.CA().issue_cert(
        host, not_before=NOW - datetime.timedelta(days=10), not_after=NOW + datetime.timedelta(days=days)
    )
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


def test_smtp_findings_of_a_good_probe() -> None:
    probe = SmtpProbe(
        "mx.example.com",
        25,
        "192.0.2.1",
        starttls_offered=True,
        tls_version="TLSv1.2",
        cipher="AES",
        certificate=_certificate("mx.example.com", 60),
    )
    findings = smtp_findings(probe, NOW)
    assert [f.level for f in findings] == [Level.OK, Level.OK, Level.OK]
    assert findings[0].message == "mx.example.com: STARTTLS offered (192.0.2.1:25)"
    assert "(60 days)" in findings[1].message


def test_smtp_findings_of_an_old_tls_version_and_a_late_failure() -> None:
    probe = SmtpProbe(
        "mx.example.com",
        25,
        "2001:db8::1",
        starttls_offered=True,
        tls_version="TLSv1.1",
        cipher="AES",
        certificate=_certificate("mx.example.com", 60),
        failure="connection closed by the server",
    )
    findings = smtp_findings(probe, NOW)
    assert [(f.topic, f.level) for f in findings] == [
        (Topic.SMTP_STARTTLS, Level.OK),
        (Topic.SMTP_CERTIFICATE, Level.OK),
        (Topic.SMTP_TLS_VERSION, Level.WARNING),
        (Topic.SMTP_CONNECT, Level.WARNING),
    ]
    assert findings[0].message.endswith("([2001:db8::1]:25)")


def test_smtp_findings_when_the_handshake_failed() -> None:
    probe = SmtpProbe(
        "mx.example.com", 25, "192.0.2.1", starttls_offered=True, failure="TLS handshake failed: bad record"
    )
    findings = smtp_findings(probe, NOW)
    assert [(f.topic, f.level) for f in findings] == [
        (Topic.SMTP_STARTTLS, Level.OK),
        (Topic.SMTP_STARTTLS, Level.ERROR),
    ]
    assert "bad record" in findings[1].message


def test_smtp_certificate_problems_are_one_error() -> None:
    probe = SmtpProbe(
        "mx.example.com",
        25,
        "192.0.2.1",
        starttls_offered=True,
        tls_version="TLSv1.3",
        cipher="AES",
        certificate=_certificate("other.example.com", 60),
        certificate_problems=[
            "certificate issuer is not trusted",
            "certificate not valid for mx.example.com",
        ],
    )
    [_, certificate, _] = smtp_findings(probe, NOW)
    assert certificate.level is Level.ERROR
    assert certificate.message == (
        "mx.example.com: certificate issuer is not trusted; certificate not valid for mx.example.com"
    )
    assert "subjectAltName includes mx.example.com" in certificate.fix


def test_smtp_findings_without_a_connection() -> None:
    probe = SmtpProbe("mx.example.com", 25, failure="connection refused by 192.0.2.1:25")
    [finding] = smtp_findings(probe, NOW)
    assert (finding.topic, finding.level) == (Topic.SMTP_CONNECT, Level.ERROR)
    assert finding.message == "mx.example.com: connection refused by 192.0.2.1:25"


# --- TLSRPT --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "rua"),
    [
        ([b"v=TLSRPTv1; rua=mailto:tls@example.com"], ["mailto:tls@example.com"]),
        (
            [b"v=TLSRPTv1;rua=mailto:a@example.com, https://r.example.com/x;"],
            ["mailto:a@example.com", "https://r.example.com/x"],
        ),
        ([b"v=spf1 -all", b"v=TLSRPTv1 ; rua=https://r.example.com/; x-ext=1"], ["https://r.example.com/"]),
        ([b"v=TLSRPTv1; rua=mailto:a%40b@example.com"], ["mailto:a%40b@example.com"]),
    ],
)
def test_parse_tlsrpt_accepts(records: list[bytes], rua: list[str]) -> None:
    assert parse_tlsrpt(records) == rua


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ([], "no record starts with v=TLSRPTv1"),
        ([b"v=TLSRPTv10; rua=mailto:a@example.com"], "no record starts with v=TLSRPTv1"),
        (
            [b"v=TLSRPTv1; rua=mailto:a@example.com", b"v=TLSRPTv1; rua=mailto:b@example.com"],
            "2 v=TLSRPTv1 records",
        ),
        ([b"v=TLSRPTv1; rua=mailto:a@example.com; junk"], "is not name=value"),
        ([b"v=TLSRPTv1; ruf=mailto:a@example.com"], "no rua= field"),
        ([b"v=TLSRPTv1; rua=http://r.example.com/"], "neither a mailto: nor an https: URI"),
        ([b"v=TLSRPTv1; rua=https:///path"], "has no host name"),
        ([b"v=TLSRPTv1; rua=mailto:@example.com"], "no valid mail address"),
        ([b"v=TLSRPTv1; rua=mailto:a@example.com,"], "neither a mailto: nor an https: URI"),
        (["v=TLSRPTv1; rua=mailto:é@example.com".encode()], "not US-ASCII"),
    ],
)
def test_parse_tlsrpt_refuses(records: list[bytes], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_tlsrpt(records)


def test_tlsrpt_finding_levels() -> None:
    name = "_smtp._tls.example.com"
    assert tlsrpt_finding(name, "example.com", [b"v=TLSRPTv1; rua=mailto:a@example.com"]).level is Level.OK
    other_txt = tlsrpt_finding(name, "example.com", [b"google-site-verification=x"])
    assert other_txt.level is Level.WARNING and "you will not receive TLS reports" in other_txt.meaning
    broken = tlsrpt_finding(name, "example.com", [b"v=TLSRPTv1; rua=ftp://x.example.com/"])
    assert broken.level is Level.ERROR
