"""TLS to the policy host and its verdicts (RFC 8461 §3.3).

The certificate must chain to the trust root (the platform's or the configured
CA file) and name the policy host (SAN only, via service_identity), over TLS
1.2 or later. One OpenSSL verify callback, installed once per fetcher, keeps
OpenSSL's chain verdict and adds the name check; it records every problem on
the fetch's attempt, in words and as a :class:`FetchProblem`, so a failure can
say "expired" or "wrong name" rather than "certificate verify failed".
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from postfix_mtasts.errors import one_line
from postfix_mtasts.resolver import FetchProblem

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

#: The lowest TLS version a policy host may use (RFC 8461 §3.3 asks for TLS 1.2+).
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2
#: Key exchange groups offered to policy hosts, the first with a key share.
#: OpenSSL 3.5 and later also offer, with a second key share, the hybrid
#: X25519MLKEM768, whose key generation adds about a fifth to a fetch's
#: handshake. A policy is public: what TLS protects here is its authenticity,
#: which rests on the certificate's signatures, not on the key exchange; there
#: is no secret for a post-quantum exchange to keep. Every TLS 1.3 server must
#: support secp256r1 (RFC 8446 §9.1); the ECDSA curves stay for TLS 1.2
#: servers, whose certificates must be on a curve offered here.
KEY_EXCHANGE_GROUPS = b"X25519:P-256:P-384:P-521:X448"
#: Pieces of OpenSSL reasons that mean the peer offered no TLS version we accept.
VERSION_MISMATCH_HINTS = ("protocol version", "unsupported protocol", "no protocols available")


#: OpenSSL's X509_V_ERR_* codes, in words that tell an operator what is wrong.
VERIFY_ERRORS: dict[int, str] = {
    2: "certificate issuer is not trusted (issuer certificate not found)",
    4: "certificate signature cannot be decrypted",
    7: "certificate signature is invalid",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "certificate has a malformed notBefore date",
    14: "certificate has a malformed notAfter date",
    18: "certificate is self-signed",
    19: "certificate chain ends in an untrusted self-signed root",
    20: "certificate issuer is not trusted",
    21: "certificate issuer is not trusted (cannot verify the first certificate)",
    22: "certificate chain is too long",
    23: "certificate has been revoked",
    24: "certificate chain contains an invalid CA certificate",
    26: "certificate is not valid for TLS server use",
    27: "certificate root is not trusted for this purpose",
    28: "certificate root rejects this purpose",
    29: "certificate subject and issuer do not match",
}


#: OpenSSL verify errors that mean "expired" or "not from a trusted CA";
#: every other one is FetchProblem.CERTIFICATE_INVALID.
_VERIFY_PROBLEMS: dict[int, str] = {
    10: FetchProblem.CERTIFICATE_EXPIRED,
    **dict.fromkeys((2, 18, 19, 20, 21, 27), FetchProblem.CERTIFICATE_UNTRUSTED),
}
#: When a certificate has several problems, the one advice is given for.
_CERTIFICATE_PROBLEM_ORDER = (
    FetchProblem.CERTIFICATE_EXPIRED,
    FetchProblem.CERTIFICATE_NAME,
    FetchProblem.CERTIFICATE_UNTRUSTED,
)


class _TlsAttempt(TypingProtocol):
    """What the TLS checks need of a fetch attempt (an :mod:`.attempt` ``_Attempt``):
    the host to verify, and where to record what they find."""

    host: str
    tls_connection: SSL.Connection | None
    certificate: x509.Certificate | None
    certificate_problems: list[tuple[str, str]]


class CaFileError(ValueError):
    """The configured CA file cannot be read or holds no certificate."""


def load_trust_root(ca_file: str) -> IOpenSSLTrustRoot:
    """The platform's trust store when ``ca_file`` is empty, else the PEM certificates in it."""
    if not ca_file:
        trust: IOpenSSLTrustRoot = platformTrust()  # type: ignore[no-untyped-call]
        return trust
    try:
        with open(ca_file, "rb") as pem:
            data = pem.read()
    except OSError as error:
        raise CaFileError(f"cannot read CA file {ca_file}: {error.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CaFileError(f"CA file {ca_file} holds no PEM certificate") from None
    roots = [
        Certificate(X509.from_cryptography(certificate))  # type: ignore[no-untyped-call]
        for certificate in certificates
    ]
    trust_root: IOpenSSLTrustRoot = trustRootFromCertificates(roots)  # type: ignore[no-untyped-call]
    return trust_root


def policy_host_context(ca_file: str) -> SSL.Context:
    """The TLS context a fetcher uses for all its fetches: the trust root of
    ``ca_file`` (see :func:`load_trust_root`), TLS 1.2 or later, our groups,
    and :func:`_verify_policy_host` as the verify callback.

    The trust store is loaded and the verify callback installed once; a
    connection brings only its SNI name and its attempt (see :class:`_AttemptConnection`).
    """
    options = CertificateOptions(trustRoot=load_trust_root(ca_file), raiseMinimumTo=MINIMUM_TLS_VERSION)
    context: SSL.Context = options.getContext()
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_policy_host)
    offer_groups(context, KEY_EXCHANGE_GROUPS)
    return context


def offer_groups(context: SSL.Context, groups: bytes) -> bool:
    """Offer only ``groups`` (OpenSSL's list syntax) for the key exchange.

    pyOpenSSL has no public call for a list of groups (``set_tmp_ecdh`` takes
    one curve), so this uses the OpenSSL binding under it. Where that binding
    or OpenSSL refuses, the context keeps OpenSSL's defaults, which are just
    as safe, only slower: returns whether the list was taken.
    """
    from OpenSSL import _util

    set_groups = getattr(_util.lib, "SSL_CTX_set1_curves_list", None)
    raw = getattr(context, "_context", None)
    if set_groups is None or raw is None:
        return False
    return bool(set_groups(raw, groups) == 1)


def describe_certificate(certificate: x509.Certificate) -> str:
    """One trace line: subject, SAN DNS names, issuer and notAfter of a certificate."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        san = ", ".join(names.value.get_values_for_type(x509.DNSName)) or "(no DNS names)"
    except x509.ExtensionNotFound:
        san = "(none)"
    return (
        f"certificate subject {certificate.subject.rfc4514_string() or '(empty)'}, SAN {san}, "
        f"issuer {certificate.issuer.rfc4514_string() or '(empty)'}, "
        f"notAfter {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
    )


@implementer(IOpenSSLClientConnectionCreator)
class _PolicyHostTLS:
    """TLS to the policy host: SNI, chain to the trust root, a SAN naming the host.

    Twisted's ``optionsForClientTLS`` does the same checks but keeps their
    outcome to itself; this one records every problem on the attempt so the
    failure can name it (expired, untrusted, wrong name) rather than just
    "certificate verify failed".
    """

    def __init__(self, context: SSL.Context, attempt: _TlsAttempt) -> None:
        self._context = context
        self._attempt = attempt

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        attempt = self._attempt
        connection = _AttemptConnection(self._context, attempt)
        connection.set_tlsext_host_name(attempt.host.encode("ascii"))
        attempt.tls_connection = connection
        return connection


class _AttemptConnection(SSL.Connection):
    """A TLS connection that knows its attempt, for the verify callback shared by all connections.

    (Twisted keeps OpenSSL's app data for its own protocol object.)
    """

    def __init__(self, context: SSL.Context, attempt: _TlsAttempt) -> None:
        super().__init__(context, None)
        self.attempt = attempt


def _verify_policy_host(
    connection: SSL.Connection, certificate: X509, error: int, depth: int, ok: int
) -> bool:
    """OpenSSL's verify callback: keep its chain verdict, add the name check at the leaf.

    Installed once on the fetcher's context; it reports to the attempt of the
    connection (an :class:`_AttemptConnection`, made by :class:`_PolicyHostTLS`).
    """
    if not isinstance(connection, _AttemptConnection):
        return False
    attempt = connection.attempt
    try:
        # At the leaf, one conversion serves both the name check and the trace line.
        leaf = certificate.to_cryptography() if depth == 0 else None
        if leaf is not None:
            attempt.certificate = leaf
        if not ok:
            problem = VERIFY_ERRORS.get(error, f"certificate not accepted (OpenSSL verify error {error})")
            attempt.certificate_problems.append((
                problem + (f" (chain depth {depth})" if depth else ""),
                _VERIFY_PROBLEMS.get(error, FetchProblem.CERTIFICATE_INVALID),
            ))
            return False
        if leaf is None:
            return True
        try:
            verify_certificate_hostname(leaf, attempt.host)
        except (VerificationError, CertificateError):
            attempt.certificate_problems.append(
                (f"certificate not valid for {attempt.host}", FetchProblem.CERTIFICATE_NAME)
            )
            return False
        return True
    except Exception as unexpected:
        attempt.certificate_problems.append(
            (f"certificate check failed: {one_line(unexpected)}", FetchProblem.CERTIFICATE_INVALID)
        )
        return False


def _group_name(connection: SSL.Connection) -> str | None:
    """The negotiated key exchange group, where pyOpenSSL and OpenSSL can tell."""
    try:
        return connection.get_group_name()
    except (AttributeError, NotImplementedError):  # pyOpenSSL < 25 / OpenSSL < 3.2
        return None


def ssl_reason(error: SSL.Error) -> str:
    """OpenSSL's own words for a TLS failure, one line."""
    queue = error.args[0] if error.args else None
    if isinstance(queue, list) and queue:
        return "; ".join(str(entry[-1]) for entry in queue if entry)
    return one_line(error) or "unexpected end of the TLS stream"
