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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import idna
from twisted.internet.defer import Deferred

from postfix_mtasts import limits
from postfix_mtasts.check.findings import Finding, Topic
from postfix_mtasts.check.judgements import (
    TLSRPT_LABEL,
    expiry_finding,
    mx_coverage,
    policy_findings,
    smtp_findings,
    tlsrpt_absent,
    tlsrpt_finding,
    unresolvable_mx_finding,
)
from postfix_mtasts.check.smtp import (
    DEFAULT_EHLO_NAME,
    PROBE_DEADLINE,
    SMTP_PORT,
    make_probe_context,
    probe_smtp,
)
from postfix_mtasts.policy.model import Policy
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

#: A policy id to suggest in fixes: the date and time, as many operators use.
ID_FORMAT = "%Y%m%d%H%M%S"

_T = TypeVar("_T")




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

        mx_findings, hosts, implicit = await mx
        probes = [_start(self._check_mx_host(host, implicit=implicit)) for host in hosts]
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
        findings += policy_findings(result.policy, result.text, result.warnings)
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

    async def _check_mx_records(self, domain: str) -> tuple[list[Finding], list[str], bool]:
        """The MX findings, the hosts to probe, and whether that is the domain
        itself standing in for a missing MX record (RFC 5321 §5.1)."""
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
                ], [domain], True
            return [
                Finding.error(
                    Topic.MX_RECORDS,
                    f"{domain}: MX lookup failed: {error.reason}",
                    "senders cannot find where to deliver your mail",
                    f"make your DNS servers answer MX queries for {domain}",
                )
            ], [], False
        hosts = [host for _, host in records if host]
        if not hosts:
            return [
                Finding.warning(
                    Topic.MX_RECORDS,
                    f"{domain}: null MX (RFC 7505): the domain accepts no mail",
                    "there is no delivery for MTA-STS to protect",
                    "remove the MTA-STS records, or publish real MX records if the domain should get mail",
                )
            ], [], False
        shown = ", ".join(f"{host} ({preference})" for preference, host in records if host)
        return [Finding.ok(Topic.MX_RECORDS, f"{domain}: MX {shown}")], hosts, False

    async def _check_mx_host(self, host: str, *, implicit: bool = False) -> list[Finding]:
        """Resolve and probe one MX host; ``implicit``: ``host`` is the domain
        itself, used because it has no MX record (RFC 5321 §5.1)."""
        try:
            addresses = await self._dns.addresses(host)
        except AddressLookupError as error:
            return [unresolvable_mx_finding(host, error.reason, implicit=implicit)]
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


def _start(coroutine: Coroutine[Any, Any, _T]) -> Deferred[_T]:
    """Start ``coroutine`` now (so several run at once) and return its Deferred."""
    return Deferred.fromCoroutine(coroutine)
