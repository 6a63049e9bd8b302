"""What each RFC 8460 §4.3 result type means for the receiving domain, and the usual fix.

Written for the admin of the domain the reports are about: the sender tried to
deliver to *your* MX and this is what went wrong on the way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Explanation:
    """A result type in plain words: what happened, and what usually fixes it."""

    result_type: str
    meaning: str
    fix: str


_EXPLANATIONS: dict[str, tuple[str, str]] = {
    "starttls-not-supported": (
        "your MX did not offer STARTTLS when the sender connected, so no encrypted session was possible "
        "(or something on the path removed the STARTTLS offer).",
        "enable TLS on the receiving MTA (Postfix: smtpd_tls_security_level = may, with "
        "smtpd_tls_chain_files set) and check that no firewall or 'SMTP fixup' middlebox strips STARTTLS.",
    ),
    "certificate-host-mismatch": (
        "the MX's certificate does not name the host the sender connected to (nor match the policy's mx "
        "patterns).",
        "issue the certificate for every MX hostname in your MX records (as a SAN, not only the CN), "
        "and keep the MTA-STS policy's mx: lines in step with your MX records.",
    ),
    "certificate-expired": (
        "the MX's certificate had expired when the sender connected.",
        "renew it (check your ACME renewal and that the MTA reloaded the new certificate: 'postfix reload' "
        "after renewal, e.g. from a certbot deploy hook).",
    ),
    "certificate-not-trusted": (
        "the sender could not build a chain from the MX's certificate to a CA it trusts: self-signed, a "
        "private CA, or a missing intermediate certificate.",
        "use a certificate from a public CA and serve the full chain (leaf first, then intermediates; "
        "Postfix: fullchain.pem in smtpd_tls_chain_files).",
    ),
    "validation-failure": (
        "the TLS session or its validation failed for a reason that fits no more specific type (handshake "
        "failure, no shared protocol version or cipher, an invalid certificate).",
        "test the MX yourself (openssl s_client -starttls smtp -connect MX:25 -servername MX) and look at "
        "the failure-reason-code; allow TLS 1.2 and 1.3 with current ciphers.",
    ),
    "tlsa-invalid": (
        "DANE: the MX's TLSA records do not match the certificate it presented (or cannot be used).",
        "publish TLSA records for the key in use before each certificate or key change (roll over with both "
        "old and new records for a TTL), or keep the key on renewal.",
    ),
    "dnssec-invalid": (
        "DANE: the sender could not get DNSSEC-validated answers for your MX or TLSA records (a broken "
        "signature, an expired RRSIG, a DS record that does not match).",
        "check the zone's DNSSEC chain (e.g. with dnsviz or 'delv'); re-sign the zone and fix the DS record "
        "at the parent.",
    ),
    "dane-required": (
        "DANE was required for this destination but the sender found no usable TLSA records for the MX.",
        "publish TLSA records (for example '_25._tcp.MX. TLSA 3 1 1 ...') in a DNSSEC-signed zone, or stop "
        "requiring DANE.",
    ),
    "sts-policy-fetch-error": (
        "the sender could not fetch your MTA-STS policy from https://mta-sts.<your domain>/.well-known/"
        "mta-sts.txt (no address, connection refused or timed out, HTTP error, or a redirect, which RFC 8461 "
        "forbids).",
        "make sure the mta-sts host resolves and answers HTTPS with status 200 and the policy as text/plain, "
        "with no redirect; check the web server's logs at the report's times.",
    ),
    "sts-policy-invalid": (
        "the sender fetched your MTA-STS policy file but it does not parse as RFC 8461 requires.",
        "check the file: 'version: STSv1', 'mode:' enforce, testing or none, one 'mx:' line per MX pattern, "
        "'max_age:' in seconds, one field per line, CRLF or LF line ends.",
    ),
    "sts-webpki-invalid": (
        "the HTTPS certificate of the mta-sts.<your domain> web server did not validate when the sender "
        "fetched the policy.",
        "serve mta-sts.<your domain> with a valid public certificate that names that host and is not "
        "expired, with its full chain (renewals of that host are easy to forget).",
    ),
}

#: no-policy-found (RFC 8460 §4.3.1) with no failed session: TLS worked, but nothing required it.
NO_POLICY_FOUND = Explanation(
    "no-policy-found",
    "the sender found no policy for the domain that it could use (neither an MTA-STS policy nor DANE "
    "TLSA records); its sessions used opportunistic TLS, which worked, but nothing made the sender "
    "insist on it.",
    "publish an MTA-STS policy (or DANE) so that senders require TLS and report failures against it.",
)

#: no-policy-found with failed sessions: TLS failed where no policy told the sender to insist on it.
NO_POLICY_FOUND_FAILED = Explanation(
    "no-policy-found",
    "the receiving domain publishes no policy the sender could use (neither an MTA-STS policy nor DANE "
    "TLSA records), and TLS still failed in these sessions: without a policy senders do not insist on "
    "TLS, so most of them then delivered those messages unencrypted, open to reading and tampering on "
    "the way.",
    "find out why TLS failed (the failure details name the result type; without them test STARTTLS on "
    "each MX: openssl s_client -starttls smtp -connect MX:25), fix it, then publish an MTA-STS policy "
    "(or DANE) so that senders require TLS.",
)


def explain_no_policy(failed_sessions: int) -> Explanation:
    """What no-policy-found means for the domain's admin, given its failed sessions."""
    return NO_POLICY_FOUND_FAILED if failed_sessions else NO_POLICY_FOUND


def verdict(successful: int, failed: int, no_policy_successful: int, no_policy_failed: int) -> str:
    """One truthful sentence on the whole: what failed, and under which kind of policy."""
    sessions = successful + failed
    if not sessions:
        return "No sessions were reported."
    no_policy = no_policy_successful + no_policy_failed
    if not failed:
        if not no_policy:
            return "No failed sessions: every reported sender negotiated TLS as your policy asks."
        if no_policy == sessions:
            return (f"No failed sessions, but no MTA-STS or DANE policy applied to any of the {sessions:,}: "
                    "senders used TLS without being required to (no-policy-found).")
        return (f"No failed sessions, but {no_policy:,} of the {sessions:,} were under no MTA-STS or DANE "
                "policy: senders used TLS there without being required to (no-policy-found).")
    parts = []
    if failed - no_policy_failed:
        parts.append(f"{failed - no_policy_failed:,} where your MTA-STS or DANE policy applied (an enforced "
                     "policy makes the sender refuse such a connection and retry; in testing mode it "
                     "delivers anyway)")
    if no_policy_failed:
        parts.append(f"{no_policy_failed:,} to a domain that publishes no policy the sender could use "
                     "(no-policy-found): most senders then deliver without TLS")
    return f"{failed:,} failed sessions: " + "; ".join(parts) + "."


def explain(result_type: str) -> Explanation:
    """Explain one result type; an unregistered one gets an honest generic answer."""
    known = _EXPLANATIONS.get(result_type.lower())
    if known is not None:
        return Explanation(result_type.lower(), *known)
    return Explanation(
        result_type,
        "a result type this tool does not know (not in RFC 8460 §4.3); the reporter defines its meaning.",
        "read the report's failure-reason-code and additional-information, or ask the reporter's "
        "contact-info.",
    )


def is_known(result_type: str) -> bool:
    """True for the result types RFC 8460 §4.3 registers."""
    return result_type.lower() in _EXPLANATIONS
