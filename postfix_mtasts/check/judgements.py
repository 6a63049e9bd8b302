"""The check's judgements: what a policy, its MX coverage, a certificate, an
SMTP probe or a TLSRPT record found means, as findings with their fixes.

Pure functions over values the audit gathered (:mod:`postfix_mtasts.check.audit`
does the DNS, HTTPS and SMTP I/O); tested as tables in test_check_findings.
"""

from __future__ import annotations

import datetime
import re
import urllib.parse
from collections.abc import Sequence

from postfix_mtasts import limits
from postfix_mtasts.check.findings import Finding, Topic
from postfix_mtasts.check.smtp import MODERN_TLS_VERSIONS, SmtpProbe, certificate_names, days_left
from postfix_mtasts.policy.model import Mode, Policy
from postfix_mtasts.policy.mx import mx_matches

#: A certificate with fewer days left than this is a warning.
CERTIFICATE_WARNING_DAYS = 14
#: An enforce policy cached for less than this is a warning: a sender that
#: meets an attacker after the cache ran out has no policy to enforce.
SHORT_MAX_AGE = 86_400
#: Where the TLSRPT record lives (RFC 8460 §3).
TLSRPT_LABEL = "_smtp._tls"
#: The version tag a TLSRPT record starts with (RFC 8460 §3).
TLSRPT_VERSION = "v=TLSRPTv1"
#: URI schemes a TLSRPT rua may use (RFC 8460 §3).
TLSRPT_SCHEMES = ("mailto", "https")

# The max_age line of a policy file, as published.
_MAX_AGE_LINE = re.compile(r"^max_age:[ \t]*(?P<value>[0-9]+)[ \t]*\r?$", re.MULTILINE)
# tlsrpt-ext-name / field names: (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
_TLSRPT_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")


def unresolvable_mx_finding(host: str, reason: str, *, implicit: bool = False) -> Finding:
    """✗ for an MX host without addresses; ``implicit``: ``host`` is the domain
    itself, standing in for a missing MX record, so there is no MX record to edit."""
    if implicit:
        return Finding.error(
            Topic.SMTP_CONNECT,
            f"{host}: no MX record and no address: {reason}",
            f"senders have nowhere to deliver mail for {host}",
            f'publish an MX record, e.g. "{host}. MX 10 mx.{host}.", with an A (and/or AAAA) '
            "record for that host, and name it in the policy",
        )
    return Finding.error(
        Topic.SMTP_CONNECT,
        f"{host}: does not resolve: {reason}",
        f"senders cannot deliver to {host}",
        f"publish an A (and/or AAAA) record for {host}, or remove it from the MX records",
    )


def expiry_finding(
    topic: str,
    host: str,
    good: str,
    days: float,
    expires: datetime.datetime,
    meaning: str,
) -> Finding:
    """✓ ``good`` with the days left, ⚠ under CERTIFICATE_WARNING_DAYS, ✗ once expired."""
    date = f"{expires:%Y-%m-%d}"
    renew = f"renew the certificate of {host} now, and automate renewal (e.g. ACME)"
    if days < 0:
        return Finding.error(topic, f"{host}: certificate expired on {date}", meaning, renew)
    if days < CERTIFICATE_WARNING_DAYS:
        return Finding.warning(
            topic,
            f"{host}: certificate expires in {int(days)} days ({date})",
            f"in {int(days)} days {meaning[0].lower()}{meaning[1:]}",
            renew,
        )
    return Finding.ok(topic, f"{good}, expires {date} ({int(days)} days)")


def policy_findings(policy: Policy, text: str, warnings: Sequence[str] = ()) -> list[Finding]:
    """The policy's syntax, mode and max_age (``text`` is the body as served;
    ``warnings`` what its parser forgave)."""
    patterns = ", ".join(policy.mx) or "none"
    findings = [Finding.ok(Topic.POLICY, f"policy valid: mode {policy.mode.value}, mx {patterns}")]
    for warning in warnings:
        findings.append(
            Finding.warning(
                Topic.POLICY,
                f"policy {warning}",
                "senders that follow RFC 8461 to the letter refuse the whole policy, "
                "and your mail loses its protection with them",
                'write each mx line as a plain host name ("mx: mx1.example.com", no final dot), '
                "publish it, and change the id in the TXT record",
            )
        )
    if policy.mode is Mode.ENFORCE:
        findings.append(Finding.ok(Topic.POLICY_MODE, "mode enforce: senders require TLS to your MX hosts"))
    elif policy.mode is Mode.TESTING:
        findings.append(
            Finding.warning(
                Topic.POLICY_MODE,
                "mode testing: not protected yet",
                "senders deliver even when TLS to your MX hosts fails; they only report it (TLSRPT)",
                'once the reports show no failures, set "mode: enforce", publish, and change the TXT id',
            )
        )
    else:
        findings.append(
            Finding.warning(
                Topic.POLICY_MODE,
                "mode none: MTA-STS is switched off",
                "senders forget any earlier policy and deliver without MTA-STS",
                'set "mode: testing" (then "mode: enforce"), publish, and change the TXT id',
            )
        )
    match = _MAX_AGE_LINE.search(text)
    published = int(match["value"]) if match else policy.max_age
    if published > limits.MAX_AGE_LIMIT:
        findings.append(
            Finding.warning(
                Topic.POLICY_MAX_AGE,
                f"max_age {published} is over RFC 8461's limit; senders use {limits.MAX_AGE_LIMIT}",
                "senders cache the policy for at most about a year, whatever the file says",
                f'set "max_age: {limits.MAX_AGE_LIMIT}" or less (a week or more is usual)',
            )
        )
    elif policy.mode is Mode.ENFORCE and published < SHORT_MAX_AGE:
        findings.append(
            Finding.warning(
                Topic.POLICY_MAX_AGE,
                f"max_age {published} is under a day",
                "senders forget the policy quickly; an attacker who blocks the refresh can strip TLS",
                'set "max_age: 604800" (a week) or more, e.g. 31557600, and change the TXT id',
            )
        )
    else:
        findings.append(Finding.ok(Topic.POLICY_MAX_AGE, f"max_age {published} ({_duration(published)})"))
    return findings


def mx_coverage(policy: Policy, hosts: Sequence[str]) -> list[Finding]:
    """Each MX host the policy's patterns do not cover (✗ enforce, ⚠ testing), or one ✓."""
    if policy.mode is Mode.NONE or not hosts:
        return []
    patterns = ", ".join(policy.mx)
    uncovered = [host for host in hosts if not any(mx_matches(pattern, host) for pattern in policy.mx)]
    if not uncovered:
        return [
            Finding.ok(
                Topic.MX_COVERAGE, f"every MX host ({', '.join(hosts)}) matches the policy's mx patterns"
            )
        ]
    findings: list[Finding] = []
    for host in uncovered:
        message = f"{host} is not covered by the policy's mx patterns ({patterns})"
        fix = f'add "mx: {host}" to the policy, publish it, and change the id in the TXT record'
        if policy.mode is Mode.ENFORCE:
            findings.append(
                Finding.error(
                    Topic.MX_COVERAGE, message, f"in enforce mode, senders refuse to deliver to {host}", fix
                )
            )
        else:
            findings.append(
                Finding.warning(
                    Topic.MX_COVERAGE,
                    message,
                    f"senders report deliveries to {host} as failures; "
                    "in enforce mode they would refuse them",
                    fix,
                )
            )
    return findings


def smtp_findings(probe: SmtpProbe, now: datetime.datetime) -> list[Finding]:
    """STARTTLS, certificate and TLS version of one MX host, or why they could not be seen."""
    host = probe.host
    refuse = f"senders that apply your MTA-STS policy cannot deliver to {host}"
    if probe.starttls_offered is None:
        return [
            Finding.error(
                Topic.SMTP_CONNECT,
                f"{host}: {probe.failure or 'no EHLO reply'}",
                f"senders cannot deliver to {host}",
                f"make the mail server of {host} accept SMTP connections "
                f"on port {probe.port} from the internet",
            )
        ]
    if not probe.starttls_offered:
        return [
            Finding.error(
                Topic.SMTP_STARTTLS,
                f"{host}: STARTTLS not offered (EHLO reply from {probe.peer})",
                f"mail to {host} travels unencrypted; {refuse}",
                "enable STARTTLS with a valid certificate (Postfix: smtpd_tls_security_level = may, "
                "smtpd_tls_chain_files = <key and certificate chain>)",
            )
        ]
    findings = [Finding.ok(Topic.SMTP_STARTTLS, f"{host}: STARTTLS offered ({probe.peer})")]
    if probe.tls_version is None:
        findings.append(
            Finding.error(
                Topic.SMTP_STARTTLS,
                f"{host}: {probe.failure or 'TLS did not start'}",
                refuse,
                f"check the TLS settings and certificate of the mail server of {host} (its log says more)",
            )
        )
        return findings
    findings.append(_certificate_finding(probe, now, refuse))
    if probe.tls_version in MODERN_TLS_VERSIONS:
        findings.append(Finding.ok(Topic.SMTP_TLS_VERSION, f"{host}: {probe.tls_version} ({probe.cipher})"))
    else:
        findings.append(
            Finding.warning(
                Topic.SMTP_TLS_VERSION,
                f"{host}: negotiated {probe.tls_version}, below TLS 1.2",
                "TLS 1.0 and 1.1 are deprecated (RFC 8996); many senders refuse them",
                "enable TLS 1.2 and 1.3 (Postfix: smtpd_tls_protocols = >=TLSv1.2, with a current OpenSSL)",
            )
        )
    if probe.failure is not None:
        findings.append(
            Finding.warning(
                Topic.SMTP_CONNECT,
                f"{host}: after TLS: {probe.failure}",
                "senders may fail to deliver after the handshake",
                f"check the mail server log of {host}",
            )
        )
    return findings


def _certificate_finding(probe: SmtpProbe, now: datetime.datetime, refuse: str) -> Finding:
    host = probe.host
    certificate = probe.certificate
    problems = list(probe.certificate_problems)
    expired = any("expired" in problem for problem in problems)
    if problems and not (expired and len(problems) == 1):
        if any("not valid for" in problem for problem in problems):
            fix = f"install a certificate whose subjectAltName includes {host}"
        elif any("trusted" in problem or "self-signed" in problem for problem in problems):
            fix = f"use a certificate for {host} from a public CA, and serve its intermediate certificates"
        else:
            fix = f"install a valid certificate for {host} from a public CA"
        return Finding.error(Topic.SMTP_CERTIFICATE, f"{host}: {'; '.join(problems)}", refuse, fix)
    if certificate is None:
        return Finding.error(
            Topic.SMTP_CERTIFICATE,
            f"{host}: no certificate presented",
            refuse,
            f"install a certificate for {host} from a public CA",
        )
    return expiry_finding(
        Topic.SMTP_CERTIFICATE,
        host,
        f"{host}: certificate valid for {host} ({certificate_names(certificate)}) and trusted",
        days_left(certificate, now),
        certificate.not_valid_after_utc,
        refuse[0].upper() + refuse[1:],
    )


def parse_tlsrpt(records: Sequence[bytes]) -> list[str]:
    """The rua URIs of the one ``v=TLSRPTv1`` record among ``records``
    (RFC 8460 §3); ValueError with the reason otherwise."""
    version = TLSRPT_VERSION.encode("ascii")
    candidates = [
        record
        for record in records
        if record.startswith(version) and record[len(version) :].lstrip(b" \t")[:1] in (b";", b"")
    ]
    if not candidates:
        raise ValueError(f"no record starts with {TLSRPT_VERSION}")
    if len(candidates) > 1:
        raise ValueError(f"{len(candidates)} {TLSRPT_VERSION} records; exactly one is allowed")
    try:
        text = candidates[0].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("record is not US-ASCII") from None
    fields = [field.strip(" \t") for field in text[len(TLSRPT_VERSION) :].split(";")]
    if fields and not fields[-1]:
        fields.pop()  # one trailing ";"
    fields = fields[1:]  # the empty piece between the version and the first ";"
    rua: list[str] | None = None
    for field in fields:
        name, equals, value = field.partition("=")
        if not equals or not value:
            raise ValueError(f"field {field!r} is not name=value")
        if not _TLSRPT_FIELD_NAME.match(name):
            raise ValueError(f"field name {name!r} is invalid")
        if name == "rua" and rua is None:
            rua = [uri.strip(" \t") for uri in value.split(",")]
    if rua is None:
        raise ValueError("no rua= field")
    for uri in rua:
        _check_rua(uri)
    return rua


def _check_rua(uri: str) -> None:
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in TLSRPT_SCHEMES:
        raise ValueError(f"rua {uri!r} is neither a mailto: nor an https: URI")
    if scheme == "mailto":
        local, at, domain = urllib.parse.unquote(parts.path).rpartition("@")
        if not (local and at and "." in domain):
            raise ValueError(f"rua {uri!r} has no valid mail address")
    elif not parts.hostname or "." not in parts.hostname:
        raise ValueError(f"rua {uri!r} has no host name")


def tlsrpt_absent(name: str, domain: str, reason: str) -> Finding:
    return Finding.warning(
        Topic.TLSRPT,
        f"{name}: no TLSRPT record ({reason})",
        "you will not receive TLS reports: failures of senders to reach you over TLS go unseen",
        f'publish a TXT record at {name}: "{TLSRPT_VERSION}; rua=mailto:tlsrpt@{domain}"',
    )


def tlsrpt_finding(name: str, domain: str, records: Sequence[bytes]) -> Finding:
    """✓ with the report addresses, or ✗ saying why senders ignore the record."""
    try:
        rua = parse_tlsrpt(records)
    except ValueError as error:
        if str(error).startswith("no record starts"):
            return tlsrpt_absent(name, domain, str(error))
        return Finding.error(
            Topic.TLSRPT,
            f"{name}: {error}",
            "senders ignore the record: you will not receive TLS reports",
            f'publish exactly one record: "{TLSRPT_VERSION}; rua=mailto:tlsrpt@{domain}" '
            "(several addresses separated by commas; mailto: or https: only)",
        )
    return Finding.ok(Topic.TLSRPT, f"{name}: reports go to {', '.join(rua)}")


def _duration(seconds: int) -> str:
    if seconds >= 86_400:
        days = seconds / 86_400
        return f"{days:g} days" if days != 1 else "1 day"
    return f"{seconds / 3600:g} hours"
