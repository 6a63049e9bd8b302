"""``postfix-mtasts doctor``'s decisions about what Postfix does with the
daemon's answers: its release against what a profile sends, Postfix 3.10.5's
smtp_tls_enforce_sts_mx_patterns, the default TLS level, DANE and TLSRPT.
Pure: values in, findings out; every ⚠ and ✗ says the exact line to change."""

from __future__ import annotations

from collections.abc import Mapping

from postfix_mtasts.check.findings import Finding
from postfix_mtasts.config import DEFAULT_PROFILE, STS_PROFILE, Config, Profile
from postfix_mtasts.doctor.postfix import (
    SMTP_SERVICE,
    PostfixView,
    Topic,
    Version,
    client_socket_path,
    find_service,
    is_yes,
)

#: First Postfix release with the ``servername`` TLS policy attribute.
SERVERNAME_VERSION = Version(3, 4)
#: First Postfix release that accepts the TLSRPT attributes in a policy.
TLSRPT_VERSION = Version(3, 10)
#: First Postfix release with ``smtp_tls_enforce_sts_mx_patterns``.
MX_PATTERNS_VERSION = Version(3, 10, 5)
#: Levels under which Postfix sends mail in plaintext to a server without STARTTLS.
PLAINTEXT_LEVELS = ("", "none")


def version_findings(view: PostfixView, profiles: Mapping[str, Profile], config: Config) -> list[Finding]:
    """The Postfix release against what each profile in use sends."""
    version = view.version
    if version is None:
        return [
            Finding.warning(
                Topic.VERSION,
                "Postfix version unknown (postconf -d mail_version printed no version)",
                "doctor cannot tell which answer attributes this Postfix accepts",
                "check that postconf is Postfix's own (postconf -d mail_version)",
            )
        ]
    findings = []
    for name, profile in sorted(profiles.items()):
        needed, what = SERVERNAME_VERSION, "servername=hostname"
        if profile.tlsrpt or profile.tlsrpt_policy_failure:
            needed, what = TLSRPT_VERSION, "the TLSRPT attributes (tlsrpt, tlsrpt_policy_failure)"
        if version < needed:
            findings.append(
                Finding.error(
                    Topic.VERSION,
                    f"Postfix {version} is older than {needed}, which profile {name} needs for {what}",
                    "Postfix rejects an answer with an attribute it does not know as invalid, "
                    "and defers the mail",
                    _downgrade_fix(name, version, config),
                )
            )
        else:
            findings.append(
                Finding.ok(Topic.VERSION, f"Postfix {version} accepts what profile {name} sends ({what})")
            )
    return findings


def _downgrade_fix(name: str, version: Version, config: Config) -> str:
    if version >= SERVERNAME_VERSION:
        return (
            f"name profile {DEFAULT_PROFILE} in main.cf (socketmap:…:{DEFAULT_PROFILE}), or set "
            f"tlsrpt = false and tlsrpt_policy_failure = false in [profiles.{name}] of {config.source}, "
            f"or upgrade Postfix to {TLSRPT_VERSION} or later"
        )
    return f"upgrade Postfix to {SERVERNAME_VERSION} or later (older releases know no servername attribute)"


def mx_pattern_findings(view: PostfixView, profiles: Mapping[str, Profile], config: Config) -> list[Finding]:
    """Postfix 3.10.5's smtp_tls_enforce_sts_mx_patterns works only with the
    attributes a profile with ``tlsrpt = true`` sends (mx_host_pattern...)."""
    if view.version is None or view.version < MX_PATTERNS_VERSION:
        return []
    setting = view.parameter("smtp_tls_enforce_sts_mx_patterns")
    findings = []
    for name, profile in sorted(profiles.items()):
        if not is_yes(setting):
            findings.append(
                Finding.warning(
                    Topic.MX_PATTERNS,
                    f"smtp_tls_enforce_sts_mx_patterns = {setting or '(empty)'}",
                    "Postfix connects to any MX host in DNS, not only those the policy names "
                    "(RFC 8461 §4.1), and matches certificates against the patterns",
                    "in main.cf: smtp_tls_enforce_sts_mx_patterns = yes"
                    + ("" if profile.tlsrpt else f", and tlsrpt = true in [profiles.{name}]"),
                )
            )
        elif not profile.tlsrpt:
            findings.append(
                Finding.error(
                    Topic.MX_PATTERNS,
                    f"smtp_tls_enforce_sts_mx_patterns = yes, but profile {name} sends no MTA-STS "
                    "attributes (tlsrpt = false)",
                    "the setting has no effect without policy_type=sts, policy_domain and "
                    "mx_host_pattern: Postfix connects to any MX host in DNS, not only those the "
                    "policy names (RFC 8461 §4.1)",
                    f"use the built-in profile {STS_PROFILE} in main.cf (socketmap:…:{STS_PROFILE}), "
                    f"or set tlsrpt = true in [profiles.{name}] of {config.source}",
                )
            )
        else:
            findings.append(
                Finding.ok(
                    Topic.MX_PATTERNS,
                    f"smtp_tls_enforce_sts_mx_patterns = yes and profile {name} sends the mx patterns: "
                    "Postfix connects only to MX hosts the policy names",
                )
            )
    return findings


def security_level_findings(view: PostfixView) -> list[Finding]:
    """The level Postfix applies to domains the daemon answers not found."""
    level = view.parameter("smtp_tls_security_level").strip().lower()
    if level in PLAINTEXT_LEVELS:
        return [
            Finding.warning(
                Topic.SECURITY_LEVEL,
                f"smtp_tls_security_level = {level or '(empty)'}: mail to domains without an enforced "
                "policy goes out in plaintext",
                "MTA-STS protects only domains that publish a policy; others do not even get "
                "opportunistic TLS",
                "in main.cf: smtp_tls_security_level = may",
            )
        ]
    return [
        Finding.ok(
            Topic.SECURITY_LEVEL,
            f"smtp_tls_security_level = {level}: the level for domains the daemon answers not found",
        )
    ]


def dane_findings(view: PostfixView, profiles: Mapping[str, Profile], config: Config) -> list[Finding]:
    """A profile's ``dane`` against Postfix's own DANE settings."""
    support = view.parameter("smtp_dns_support_level").strip().lower()
    level = view.parameter("smtp_tls_security_level").strip().lower()
    lookup = view.parameter("smtp_host_lookup")
    uses_dns = "dns" in [word.strip().lower() for word in lookup.replace(",", " ").split()] or not lookup
    findings = []
    for name, profile in sorted(profiles.items()):
        if profile.dane:
            if support != "dnssec":
                findings.append(
                    Finding.error(
                        Topic.DANE,
                        f"profile {name} has dane = true, but smtp_dns_support_level = "
                        f"{support or '(empty)'}",
                        "its dane and dane-only answers need Postfix to look TLSA records up with "
                        "DNSSEC; without it Postfix cannot verify them",
                        "in main.cf: smtp_dns_support_level = dnssec",
                    )
                )
            elif not uses_dns:
                findings.append(
                    Finding.error(
                        Topic.DANE,
                        f"profile {name} has dane = true, but smtp_host_lookup = {lookup} leaves out dns",
                        "without DNS lookups Postfix finds no DNSSEC-validated TLSA records",
                        "in main.cf: smtp_host_lookup = dns",
                    )
                )
            else:
                findings.append(
                    Finding.ok(
                        Topic.DANE,
                        f"profile {name} has dane = true and Postfix does DNSSEC lookups "
                        f"(smtp_dns_support_level = dnssec, smtp_host_lookup = {lookup or 'dns'})",
                    )
                )
        elif support == "dnssec" and level.startswith("dane"):
            findings.append(
                Finding.warning(
                    Topic.DANE,
                    f"Postfix does DANE (smtp_tls_security_level = {level}), but profile {name} has "
                    "dane = false",
                    "for a domain with an MTA-STS policy the daemon's answer replaces DANE, though "
                    "RFC 8461 §2 says DANE wins",
                    f"set dane = true in [profiles.{name}] of {config.source}, with [dane] nameservers",
                )
            )
    return findings


def tlsrpt_findings(
    view: PostfixView, profiles: Mapping[str, Profile], socket_exists: bool | None
) -> list[Finding]:
    """Postfix's TLSRPT client against the profiles' ``tlsrpt`` switches.
    ``socket_exists``: whether smtp_tlsrpt_socket_name exists (None: not looked)."""
    if view.version is None or view.version < TLSRPT_VERSION:
        return []
    enabled = is_yes(view.parameter("smtp_tlsrpt_enable"))
    socket_name = view.parameter("smtp_tlsrpt_socket_name")
    reporting = sorted(name for name, p in profiles.items() if p.tlsrpt or p.tlsrpt_policy_failure)
    silent = sorted(name for name, p in profiles.items() if not p.tlsrpt)
    findings = []
    if reporting and not enabled:
        findings.append(
            Finding.warning(
                Topic.TLSRPT,
                f"profile {', '.join(reporting)} sends TLSRPT attributes, but smtp_tlsrpt_enable = no",
                "Postfix sends no TLS reports (the attributes still feed smtp_tls_enforce_sts_mx_patterns)",
                "in main.cf: smtp_tlsrpt_enable = yes and smtp_tlsrpt_socket_name = the socket "
                "tlsrpt-collectd listens on (absolute, or relative to the queue directory)",
            )
        )
    if enabled and not socket_name:
        findings.append(
            Finding.error(
                Topic.TLSRPT,
                "smtp_tlsrpt_enable = yes, but smtp_tlsrpt_socket_name is empty",
                "Postfix requires the TLSRPT collector's socket when reporting is on",
                "in main.cf: smtp_tlsrpt_socket_name = the socket tlsrpt-collectd listens on "
                "(absolute, or relative to the queue directory)",
            )
        )
    elif enabled and socket_exists is False:
        findings.append(
            Finding.warning(
                Topic.TLSRPT,
                f"smtp_tlsrpt_socket_name = {socket_name}: no such socket",
                "the TLSRPT collector is not running there; Postfix's TLS results are lost",
                f"start tlsrpt-collectd listening on {socket_name} (relative to the queue directory), "
                "or correct smtp_tlsrpt_socket_name",
            )
        )
    elif enabled and reporting:
        findings.append(
            Finding.ok(
                Topic.TLSRPT, f"Postfix reports TLS results to {socket_name}, with the MTA-STS details"
            )
        )
    if enabled and silent:
        findings.append(
            Finding.warning(
                Topic.TLSRPT,
                f"smtp_tlsrpt_enable = yes, but profile {', '.join(silent)} sends no TLSRPT attributes",
                "Postfix's reports of MTA-STS deliveries lack the policy (type, domain, mx patterns)",
                f"set tlsrpt = true in [profiles.{silent[0]}], or use the built-in profile {STS_PROFILE}",
            )
        )
    return findings


def tlsrpt_socket_path(view: PostfixView) -> str:
    """Where the SMTP client finds smtp_tlsrpt_socket_name on this host ("" if unset)."""
    name = view.parameter("smtp_tlsrpt_socket_name")
    if not name:
        return ""
    smtp = find_service(view.master, *SMTP_SERVICE)
    return client_socket_path(name, view.queue_directory, bool(smtp and smtp.chrooted))
