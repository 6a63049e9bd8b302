"""The audit behind ``postfix-mtasts check DOMAIN``: a domain's own MTA-STS
set-up as a sending MTA sees it.

It reads the ``_mta-sts`` TXT record, fetches the policy the way the daemon
does (the same :class:`HttpsPolicyFetcher`), compares the domain's real MX
hosts with the policy's ``mx`` patterns, probes every MX host's STARTTLS at
once, and reads the ``_smtp._tls`` TLSRPT record. Each check gives findings
(see :mod:`postfix_mtasts.check.findings`) in a fixed order.
"""

from __future__ import annotations

import datetime
import re
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import idna
from twisted.internet.defer import Deferred

from postfix_mtasts import limits
from postfix_mtasts.check.findings import Finding, Topic
from postfix_mtasts.check.smtp import (
    DEFAULT_EHLO_NAME,
    MODERN_TLS_VERSIONS,
    PROBE_DEADLINE,
    SMTP_PORT,
    SmtpProbe,
    certificate_names,
    days_left,
    make_probe_context,
    probe_smtp,
)
from postfix_mtasts.policy.model import Mode, Policy
from postfix_mtasts.policy.mx import mx_matches
from postfix_mtasts.policy.txt import parse_sts_records
from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchOK, FetchProblem
from postfix_mtasts.resolver.dns import AddressLookupError, DnsResolver, RecordLookupError
from postfix_mtasts.resolver.https import (
    POLICY_HOST_PREFIX,
    POLICY_MEDIA_TYPE,
    POLICY_PATH,
    CaFileError,
    HttpsPolicyFetcher,
)

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
#: A policy id to suggest in fixes: the date and time, as many operators use.
ID_FORMAT = "%Y%m%d%H%M%S"

_T = TypeVar("_T")

# The max_age line of a policy file, as published.
_MAX_AGE_LINE = re.compile(r"^max_age:[ \t]*(?P<value>[0-9]+)[ \t]*\r?$", re.MULTILINE)
# tlsrpt-ext-name / field names: (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
_TLSRPT_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """What the audit needs from the configuration and the command line."""

    nameservers: tuple[str, ...] = ()
    ca_file: str = ""
    https_port: int = 443
    smtp_port: int = SMTP_PORT
    dns_timeout: float = limits.DNS_TIMEOUT
    fetch_timeout: float = limits.FETCH_TIMEOUT
    smtp_deadline: float = PROBE_DEADLINE
    ehlo_name: str = DEFAULT_EHLO_NAME


class CheckSetupError(ValueError):
    """The audit cannot start (bad domain name, unusable CA file); one line."""


def normalise_domain(text: str) -> str:
    """``text`` as a lower-case A-label domain without the final dot, or CheckSetupError."""
    name = text.strip().rstrip(".")
    if not name or "." not in name:
        raise CheckSetupError(f"{text!r} is not a domain name (like example.com)")
    try:
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except idna.IDNAError as error:
        raise CheckSetupError(f"{text!r} is not a valid domain name: {error}") from None


class Auditor:
    """Runs every check for one domain; built once, then :meth:`audit`."""

    def __init__(
        self,
        reactor: Any,
        settings: CheckSettings,
        *,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self._reactor = reactor
        self._settings = settings
        self._clock = clock
        try:
            self._dns = DnsResolver(settings.nameservers, settings.dns_timeout, reactor=reactor)
            self._fetcher = HttpsPolicyFetcher(
                reactor,
                self._dns,
                ca_file=settings.ca_file,
                timeout=settings.fetch_timeout,
                port=settings.https_port,
            )
            self._tls_context = make_probe_context(settings.ca_file)
        except (CaFileError, ValueError) as error:
            raise CheckSetupError(str(error)) from None

    async def audit(self, domain: str) -> list[Finding]:
        """Every finding for ``domain``; the independent checks run at once."""
        name = normalise_domain(domain)
        sts = _start(self._check_sts_txt(name))
        policy = _start(self._check_policy(name))
        mx = _start(self._check_mx_records(name))
        tlsrpt = _start(self._check_tlsrpt(name))

        mx_findings, hosts = await mx
        probes = [_start(self._check_mx_host(host)) for host in hosts]
        policy_findings, found = await policy
        findings = [*await sts, *policy_findings, *mx_findings]
        if found is not None:
            findings += mx_coverage(found, hosts)
        for probe in probes:
            findings += await probe
        findings += await tlsrpt
        return findings

    # --- _mta-sts TXT ---------------------------------------------------------

    async def _check_sts_txt(self, domain: str) -> list[Finding]:
        name = f"_mta-sts.{domain}"
        publish = f'publish one TXT record at {name}: "v=STSv1; id={self._suggested_id()}"'
        try:
            records = await self._dns.txt_records(name)
        except RecordLookupError as error:
            if error.absent:
                return [
                    Finding.error(
                        Topic.STS_TXT,
                        f"{name}: no TXT record ({error.reason})",
                        "senders never look for your policy: MTA-STS is off for " + domain,
                        publish,
                    )
                ]
            return [
                Finding.error(
                    Topic.STS_TXT,
                    f"{name}: DNS lookup failed: {error.reason}",
                    "senders cannot tell whether you publish MTA-STS and deliver without it",
                    "make your DNS servers answer TXT queries for " + name,
                )
            ]
        parsed = parse_sts_records(records)
        if parsed.policy_id is not None:
            return [Finding.ok(Topic.STS_TXT, f"{name}: one record, id {parsed.policy_id}")]
        meaning = "senders treat the domain as having no MTA-STS policy (RFC 8461 §3.1)"
        if parsed.reason.startswith("no v=STSv1"):
            shown = "; ".join(record.decode("latin-1") for record in records)[:120]
            return [
                Finding.error(
                    Topic.STS_TXT,
                    f"{name}: no record starts with v=STSv1; (found: {shown})",
                    meaning,
                    publish,
                )
            ]
        if "exactly one" in parsed.reason:
            return [
                Finding.error(
                    Topic.STS_TXT,
                    f"{name}: {parsed.reason}",
                    meaning,
                    "delete all but one v=STSv1 record, and give it a new id",
                )
            ]
        return [
            Finding.error(
                Topic.STS_TXT,
                f"{name}: {parsed.reason} ({parsed.record})",
                meaning,
                f'write the record as "v=STSv1; id=<1 to 32 letters or digits>", e.g. '
                f'"v=STSv1; id={self._suggested_id()}"',
            )
        ]

    # --- the policy host and the policy ---------------------------------------

    async def _check_policy(self, domain: str) -> tuple[list[Finding], Policy | None]:
        host = POLICY_HOST_PREFIX + domain
        url = f"https://{host}{POLICY_PATH}"
        try:
            addresses = await self._dns.addresses(host)
        except AddressLookupError as error:
            return [
                Finding.error(
                    Topic.POLICY_HOST_DNS,
                    f"{host} does not resolve: {error.reason}",
                    "senders cannot fetch your policy, so MTA-STS is not in force",
                    f"publish an A (and/or AAAA) record for {host} pointing at the web server "
                    f"that serves {url}",
                )
            ], None
        findings = [Finding.ok(Topic.POLICY_HOST_DNS, f"{host} resolves to {', '.join(addresses)}")]
        result = await self._fetcher.fetch(domain)
        if isinstance(result, FetchFailed):
            return [*findings, self._fetch_failure(host, url, result)], None
        findings += self._fetch_success(host, url, result)
        findings += policy_findings(result.policy, result.text)
        return findings, result.policy

    def _fetch_success(self, host: str, url: str, result: FetchOK) -> list[Finding]:
        version = result.tls_version or "TLS"
        expires = result.not_after
        size = result.body_bytes
        findings: list[Finding] = []
        if expires is None:
            findings.append(
                Finding.ok(Topic.POLICY_HOST_TLS, f"{host}: certificate valid and trusted, {version}")
            )
        else:
            findings.append(
                expiry_finding(
                    Topic.POLICY_HOST_TLS,
                    host,
                    f"{host}: certificate valid and trusted, {version}",
                    (expires - self._clock()).total_seconds() / 86_400,
                    expires,
                    "senders cannot fetch or refresh your policy once it has expired",
                )
            )
        findings.append(
            Finding.ok(
                Topic.POLICY_HOST_HTTP,
                f"{url}: HTTP 200, {POLICY_MEDIA_TYPE}, {'?' if size is None else size} bytes, no redirect",
            )
        )
        return findings

    def _fetch_failure(self, host: str, url: str, result: FetchFailed) -> Finding:
        """The finding, with its advice, for a failed fetch: chosen by what the
        fetcher says went wrong (``result.problem``), never by its wording."""
        reason = result.reason
        problem = result.problem
        meaning = "senders cannot fetch your policy, so MTA-STS is not in force"
        if result.category == FailureCategory.WEBPKI:
            if problem == FetchProblem.CERTIFICATE_EXPIRED:
                fix = f"renew the certificate of {host} and install it on the web server"
            elif problem == FetchProblem.CERTIFICATE_NAME:
                fix = f"use a certificate whose subjectAltName includes {host}"
            elif problem == FetchProblem.CERTIFICATE_UNTRUSTED:
                fix = (
                    f"serve {host} with a certificate from a public CA, with the intermediate "
                    "certificates of its chain"
                )
            else:
                fix = f"serve {host} with a valid certificate from a public CA that names {host}"
            return Finding.error(Topic.POLICY_HOST_TLS, f"{host}: {reason}", meaning, fix)
        if result.category == FailureCategory.INVALID:
            return Finding.error(
                Topic.POLICY,
                f"{url}: {reason}",
                "senders ignore an invalid policy: MTA-STS is not in force",
                'correct the file: "version: STSv1", "mode: enforce|testing|none", '
                'one "mx: <host or *.domain>" line per MX, "max_age: <seconds>"',
            )
        if problem == FetchProblem.TLS_HANDSHAKE:
            return Finding.error(
                Topic.POLICY_HOST_TLS,
                f"{host}: {reason}",
                meaning,
                f"serve {host} over TLS 1.2 or later with a certificate from a public CA",
            )
        if problem == FetchProblem.REDIRECT:
            return Finding.error(
                Topic.POLICY_HOST_HTTP,
                f"{url}: {reason}",
                "senders do not follow redirects (RFC 8461 §3.3), so they cannot fetch your policy",
                f"serve the policy file itself at {url}, with status 200",
            )
        if problem == FetchProblem.MEDIA_TYPE:
            return Finding.error(
                Topic.POLICY_HOST_HTTP,
                f"{url}: {reason}",
                "senders reject a policy not served as text/plain (RFC 8461 §3.2)",
                f'serve {POLICY_PATH} with "Content-Type: {POLICY_MEDIA_TYPE}"',
            )
        if problem == FetchProblem.TOO_LARGE:
            return Finding.error(
                Topic.POLICY_HOST_HTTP,
                f"{url}: {reason}",
                "senders stop reading an oversized policy and ignore it",
                f"serve only the policy (a few lines; at most {limits.POLICY_BODY_LIMIT} bytes)",
            )
        if problem == FetchProblem.CONTENT_CODING:
            return Finding.error(
                Topic.POLICY_HOST_HTTP,
                f"{url}: {reason}",
                meaning,
                f"serve {POLICY_PATH} uncompressed or gzip-compressed (no other Content-Encoding)",
            )
        if problem == FetchProblem.HTTP_STATUS:
            return Finding.error(
                Topic.POLICY_HOST_HTTP,
                f"{url}: {reason}",
                meaning,
                f"make the web server of {host} answer {POLICY_PATH} with status 200 and the policy",
            )
        return Finding.error(
            Topic.POLICY_HOST_HTTP,
            f"{url}: {reason}",
            meaning,
            f"make sure a web server answers HTTPS on {host} port 443 and serves {POLICY_PATH}",
        )

    def _suggested_id(self) -> str:
        return self._clock().strftime(ID_FORMAT)

    # --- MX hosts ---------------------------------------------------------------

    async def _check_mx_records(self, domain: str) -> tuple[list[Finding], list[str]]:
        try:
            records = await self._dns.mx_hosts(domain)
        except RecordLookupError as error:
            if error.absent:
                return [
                    Finding.warning(
                        Topic.MX_RECORDS,
                        f"{domain}: no MX record ({error.reason}); senders deliver to {domain} itself",
                        f"MTA-STS covers only MX hosts; {domain} is used as its own (implicit) MX",
                        f'publish an MX record, e.g. "{domain}. MX 10 mx.{domain}.", and name that '
                        "host in the policy",
                    )
                ], [domain]
            return [
                Finding.error(
                    Topic.MX_RECORDS,
                    f"{domain}: MX lookup failed: {error.reason}",
                    "senders cannot find where to deliver your mail",
                    f"make your DNS servers answer MX queries for {domain}",
                )
            ], []
        hosts = [host for _, host in records if host]
        if not hosts:
            return [
                Finding.warning(
                    Topic.MX_RECORDS,
                    f"{domain}: null MX (RFC 7505): the domain accepts no mail",
                    "there is no delivery for MTA-STS to protect",
                    "remove the MTA-STS records, or publish real MX records if the domain should get mail",
                )
            ], []
        shown = ", ".join(f"{host} ({preference})" for preference, host in records if host)
        return [Finding.ok(Topic.MX_RECORDS, f"{domain}: MX {shown}")], hosts

    async def _check_mx_host(self, host: str) -> list[Finding]:
        try:
            addresses = await self._dns.addresses(host)
        except AddressLookupError as error:
            return [
                Finding.error(
                    Topic.SMTP_CONNECT,
                    f"{host}: does not resolve: {error.reason}",
                    f"senders cannot deliver to {host}",
                    f"publish an A (and/or AAAA) record for {host}, or remove it from the MX records",
                )
            ]
        probe = await probe_smtp(
            self._reactor,
            host,
            addresses,
            self._tls_context,
            port=self._settings.smtp_port,
            deadline=self._settings.smtp_deadline,
            ehlo_name=self._settings.ehlo_name,
        )
        return smtp_findings(probe, self._clock())

    # --- TLSRPT -----------------------------------------------------------------

    async def _check_tlsrpt(self, domain: str) -> list[Finding]:
        name = f"{TLSRPT_LABEL}.{domain}"
        try:
            records = await self._dns.txt_records(name)
        except RecordLookupError as error:
            if error.absent:
                return [tlsrpt_absent(name, domain, error.reason)]
            return [
                Finding.warning(
                    Topic.TLSRPT,
                    f"{name}: DNS lookup failed: {error.reason}",
                    "senders cannot find where to send TLS reports",
                    "make your DNS servers answer TXT queries for " + name,
                )
            ]
        return [tlsrpt_finding(name, domain, records)]


# --- pure judgements (unit-tested on their own) ----------------------------------


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


def policy_findings(policy: Policy, text: str) -> list[Finding]:
    """The policy's syntax, mode and max_age (``text`` is the body as served)."""
    patterns = ", ".join(policy.mx) or "none"
    findings = [Finding.ok(Topic.POLICY, f"policy valid: mode {policy.mode.value}, mx {patterns}")]
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


def _start(coroutine: Coroutine[Any, Any, _T]) -> Deferred[_T]:
    """Start ``coroutine`` now (so several run at once) and return its Deferred."""
    return Deferred.fromCoroutine(coroutine)
