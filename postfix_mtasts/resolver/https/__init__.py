"""Fetching the MTA-STS policy file over validated HTTPS (RFC 8461 §3.3).

One fetch is one GET of ``https://mta-sts.<domain>/.well-known/mta-sts.txt``:
the name is resolved by the daemon's own resolver, the certificate must chain
to the trust root and name the host (SAN only, via service_identity), TLS 1.2
or later, no redirects, status 200, ``text/plain``, no content coding but gzip, a
capped body, and one deadline for all of it. Every outcome is a value
(:class:`FetchOK` or :class:`FetchFailed`) with a trace of what happened.

The HTTP client is treq's ``HTTPClient`` over an ``Agent`` whose endpoint
factory is ours (resolution through the daemon's resolver, our TLS checks).
treq asks for gzip, but its decoder inflates each piece of the body whole, so
one 16 KB TLS record of a gzip bomb would become some 16 MB in memory before
any cap could count it. The gzip coding is therefore taken off the response
below treq (:class:`_BoundedGzipAgent`) and undone by :class:`_BoundedGunzip`,
which never inflates more than the body cap plus one byte: the cap counts
*decoded* bytes, and a bomb is cut off like any other oversized body without
ever being inflated. Corrupt or truncated gzip data, or data after the end of
the gzip stream, fails the fetch; other content codings are refused.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from typing import Protocol as TypingProtocol

import idna
from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from postfix_mtasts import __version__, limits
from postfix_mtasts.errors import one_line
from postfix_mtasts.policy.policyfile import PolicyError, parse_policy
from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchOK, FetchProblem, FetchResult

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

#: Label prepended to the policy domain to name the policy host (RFC 8461 §3.3).
POLICY_HOST_PREFIX = "mta-sts."
#: Path of the policy file on the policy host (RFC 8461 §3.3).
POLICY_PATH = "/.well-known/mta-sts.txt"
#: The only media type a policy may be served as (RFC 8461 §3.2).
POLICY_MEDIA_TYPE = "text/plain"
#: Seconds one TCP connection attempt to one address may take before the next
#: address is tried; the whole fetch is still bounded by its own deadline.
CONNECT_ATTEMPT_TIMEOUT = 10.0
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
#: How we introduce ourselves to policy hosts.
USER_AGENT = f"postfix-mtasts/{__version__}"
#: HTTP status codes that announce a redirect.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Content codings that mean "no coding at all".
IDENTITY_CODINGS = frozenset({"", "identity"})
#: The one content coding we undo, in its spellings: content codings are
#: case-insensitive, and "x-gzip" is to be taken for "gzip" (RFC 9110 §8.4.1).
GZIP_CODINGS = frozenset({b"gzip", b"x-gzip"})
#: zlib's window bits for a gzip stream (header and CRC trailer) with the largest window.
GZIP_WBITS = 16 + zlib.MAX_WBITS
#: The stage from TCP connect to response headers (see _Attempt.current_stage).
AWAITING_RESPONSE = "awaiting the response"
#: Longest piece of a header value quoted in a reason.
QUOTE_LIMIT = 120
#: Lower-case LDH labels of 1 to 63 characters, no hyphen at either end. With no "--" anywhere (so
#: no A-label to check) and at most MAX_NAME_LENGTH characters in all, idna.encode would return such
#: a name unchanged: policy_host does not call it for one.
PLAIN_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: Longest domain name without its trailing dot (RFC 1035, as idna counts it).
MAX_NAME_LENGTH = 253

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


class AddressResolver(TypingProtocol):
    """Resolves a host name to IP address strings with the daemon's own DNS."""

    async def addresses(self, host: str) -> list[str]:
        """Return the addresses of ``host``; raise with a one-line str when it has none."""
        ...


class CaFileError(ValueError):
    """The configured CA file cannot be read or holds no certificate."""


class _FetchError(Exception):
    """An expected fetch failure: ``str()`` is the one-line reason, ``problem``
    a :class:`FetchProblem`."""

    def __init__(self, reason: str, problem: str, category: str = FailureCategory.FETCH) -> None:
        super().__init__(reason)
        self.reason = reason
        self.problem = problem
        self.category = category

    def result(self, attempt: _Attempt) -> FetchFailed:
        """What the fetch of ``attempt`` returns for this failure."""
        return FetchFailed(self.reason, self.category, attempt.finish(self.reason), self.problem)


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


class HttpsPolicyFetcher:
    """Fetches and parses policy files; implements :class:`resolver.PolicyFetcher`.

    Each fetch uses its own connection (no pooling: a policy is fetched at most
    daily per domain), which is closed before :meth:`fetch` returns.
    """

    def __init__(
        self,
        reactor: Any,
        addresses: AddressResolver,
        *,
        ca_file: str = "",
        timeout: float = limits.FETCH_TIMEOUT,
        port: int = 443,
        body_limit: int = limits.POLICY_BODY_LIMIT,
    ) -> None:
        self._reactor = reactor
        self._addresses = addresses
        # One context for every fetch: the trust store is loaded and the verify
        # callback installed once; a connection brings only its SNI name and its
        # attempt (see _AttemptConnection).
        options = CertificateOptions(trustRoot=load_trust_root(ca_file), raiseMinimumTo=MINIMUM_TLS_VERSION)
        self._tls_context: SSL.Context = options.getContext()
        self._tls_context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_policy_host)
        offer_groups(self._tls_context, KEY_EXCHANGE_GROUPS)
        self._timeout = timeout
        self._port = port
        self._body_limit = body_limit

    async def fetch(self, domain: str) -> FetchResult:
        """Fetch the policy of ``domain``; never raises for network, TLS, HTTP or policy problems."""
        attempt = _Attempt(self._reactor, self._addresses, self._port)
        try:
            attempt.host = policy_host(domain)
        except _FetchError as failure:
            return failure.result(attempt)

        work = Deferred.fromCoroutine(self._fetch(attempt))
        work.addTimeout(self._timeout, self._reactor, onTimeoutCancel=attempt.deadline_passed)
        try:
            return await work
        except _FetchError as failure:
            return failure.result(attempt)
        except Exception as unexpected:
            if any(isinstance(cause, (CancelledError, neterror.ConnectingCancelledError))
                   for cause in _causes(unexpected)):
                # Our own deadline arrives as a _FetchError; this is the caller giving up
                # (while connecting, Twisted says so with ConnectingCancelledError).
                raise CancelledError() from None
            reason, category, problem = attempt.classify(unexpected)
            return FetchFailed(reason, category, attempt.finish(reason), problem)
        finally:
            await attempt.close()

    async def _fetch(self, attempt: _Attempt) -> FetchOK:
        """The fetch proper, without the deadline: raises :class:`_FetchError` on failure."""
        tls = _PolicyHostTLS(self._tls_context, attempt)
        pool = HTTPConnectionPool(self._reactor, persistent=False)  # type: ignore[no-untyped-call]
        agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
            self._reactor, _PolicyHostEndpointFactory(attempt, tls), pool=pool
        )
        # Under treq's own gzip decoder, so that it never sees a gzip coding to inflate unbounded.
        bounded = _BoundedGzipAgent(agent, self._body_limit, attempt.abort)
        url = f"https://{attempt.host}{'' if self._port == 443 else f':{self._port}'}{POLICY_PATH}"
        attempt.step(f"GET {url}")
        # unbuffered: the body is read by _read_body under the cap, never
        # buffered whole by treq; redirects are reported, never followed.
        response: Any = await HTTPClient(bounded).get(
            url,
            headers=Headers({b"User-Agent": [USER_AGENT.encode("ascii")]}),
            allow_redirects=False,
            unbuffered=True,
        )
        attempt.note_tls_success()
        attempt.step(f"HTTP {response.code} {_text(response.phrase)}")
        self._check_response(response, attempt)

        attempt.stage = "reading the body"
        body = await _read_body(response, self._body_limit, attempt)
        attempt.step(f"body {len(body)} bytes")
        try:
            policy = parse_policy(body)
        except PolicyError as invalid:
            raise _FetchError(
                f"invalid policy: {invalid}", FetchProblem.INVALID_POLICY, FailureCategory.INVALID
            ) from None
        attempt.step(
            f"policy valid: mode {policy.mode.value}, max_age {policy.max_age}, "
            f"mx {' '.join(policy.mx) or '(none)'}"
        )
        certificate = attempt.certificate
        return FetchOK(
            policy,
            body.decode("utf-8", "replace"),
            tuple(attempt.trace),
            tls_version=attempt.tls_version,
            not_after=None if certificate is None else certificate.not_valid_after_utc,
            body_bytes=len(body),
        )

    def _check_response(self, response: Any, attempt: _Attempt) -> None:
        """Reject anything but a 200 ``text/plain`` response without content coding."""
        headers = response.headers
        if response.code in REDIRECT_STATUSES:
            location = headers.getRawHeaders(b"Location")
            target = f"to {_quote(_text(location[0]))}" if location else "without a Location"
            raise _FetchError(f"HTTP {response.code} redirect {target} (not followed)", FetchProblem.REDIRECT)
        if response.code != 200:
            raise _FetchError(
                f"HTTP {response.code} {_quote(_text(response.phrase))}, not 200", FetchProblem.HTTP_STATUS
            )

        content_types = headers.getRawHeaders(b"Content-Type") or []
        if len(content_types) != 1:
            raise _FetchError(
                f"{len(content_types) or 'no'} Content-Type headers, not one saying {POLICY_MEDIA_TYPE}",
                FetchProblem.MEDIA_TYPE,
            )
        content_type = _text(content_types[0])
        attempt.step(f"Content-Type {_quote(content_type)}")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != POLICY_MEDIA_TYPE:
            raise _FetchError(
                f"media type {_quote(media_type)}, not {POLICY_MEDIA_TYPE}", FetchProblem.MEDIA_TYPE
            )

        codings = [
            coding.strip().lower()
            for value in headers.getRawHeaders(b"Content-Encoding") or []
            for coding in _text(value).split(",")
        ]
        unexpected = [coding for coding in codings if coding not in IDENTITY_CODINGS]
        if unexpected:
            refused = _quote(", ".join(unexpected))
            raise _FetchError(
                f"content coding {refused} refused (only gzip is accepted)", FetchProblem.CONTENT_CODING
            )

        length = response.length
        if isinstance(length, int):
            attempt.step(f"Content-Length {length}")
            if length > self._body_limit:
                raise _FetchError(
                    f"policy body over {self._body_limit} bytes (Content-Length {length})",
                    FetchProblem.TOO_LARGE,
                )


def policy_host(domain: str) -> str:
    """The policy host of ``domain`` as an A-label name, e.g. ``mta-sts.example.com``."""
    name = domain.strip().rstrip(".")
    if not name:
        raise _FetchError("empty domain name", FetchProblem.DOMAIN_NAME)
    if name.isascii():
        lowered = name.lower()
        if len(lowered) <= MAX_NAME_LENGTH and "--" not in lowered and PLAIN_NAME.fullmatch(lowered):
            # The common case, which idna would return as it is: skip its per-character checks.
            return POLICY_HOST_PREFIX + lowered
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as error:
        raise _FetchError(
            f"domain {_quote(name)} is not a valid name: {error}", FetchProblem.DOMAIN_NAME
        ) from None
    return POLICY_HOST_PREFIX + ascii_name.lower()


class _Attempt:
    """What one fetch knows about itself: trace, TLS observations and its connection."""

    def __init__(self, reactor: Any, addresses: AddressResolver, port: int) -> None:
        self.reactor = reactor
        self.addresses = addresses
        self.port = port
        self.host = ""
        self.trace: list[str] = []
        self.stage = "resolving the policy host"
        self.peer = ""
        self.tls_connection: SSL.Connection | None = None
        #: Why certificate validation failed, in the order found: each in
        #: words and as a FetchProblem code.
        self.certificate_problems: list[tuple[str, str]] = []
        #: The negotiated TLS version, once the handshake is done.
        self.tls_version = ""
        self.certificate: x509.Certificate | None = None
        self.connection: _PolicyHostConnection | None = None

    def step(self, text: str) -> None:
        self.trace.append(text)

    def finish(self, reason: str) -> tuple[str, ...]:
        """The trace, ended by the failure."""
        self.trace.append(f"failed: {reason}")
        return tuple(self.trace)

    def deadline_passed(self, result: object, timeout: float) -> Failure:
        """``addTimeout``'s verdict when the deadline cancelled the fetch, whatever it was doing."""
        timed_out = _FetchError(
            f"no answer within {timeout}s (while {self.current_stage()})", FetchProblem.TIMEOUT
        )
        return Failure(timed_out)  # type: ignore[no-untyped-call]

    def current_stage(self) -> str:
        """What the fetch is waiting for, in words."""
        if self.stage != AWAITING_RESPONSE:
            return self.stage
        connection = self.tls_connection
        if connection is None or connection.get_peer_finished() is None:
            return f"in the TLS handshake with {self.peer}"
        return f"waiting for the response headers from {self.peer}"

    def note_tls_success(self) -> None:
        """Record the negotiated TLS version and the validated certificate."""
        connection = self.tls_connection
        if connection is None:
            return
        self.tls_version = connection.get_protocol_version_name()
        group = _group_name(connection)
        self.step(f"TLS {self.tls_version}, {connection.get_cipher_name()}{f', {group}' if group else ''}")
        self._note_certificate()
        self.step(f"certificate valid for {self.host}")

    def _note_certificate(self) -> None:
        if self.certificate is None and self.tls_connection is not None:
            self.certificate = self.tls_connection.get_peer_certificate(as_cryptography=True)
        if self.certificate is not None:
            self.step(describe_certificate(self.certificate))

    def classify(self, problem: BaseException) -> tuple[str, str, str]:
        """A one-line reason, a TLSRPT category and a FetchProblem for an
        exception out of the HTTP client."""
        causes = _causes(problem)
        where = self.peer or self.host
        if self.certificate_problems:
            self._note_certificate()
            kinds = {kind for _, kind in self.certificate_problems}
            kind = next(
                (k for k in _CERTIFICATE_PROBLEM_ORDER if k in kinds), FetchProblem.CERTIFICATE_INVALID
            )
            reason = "; ".join(text for text, _ in self.certificate_problems)
            return reason, FailureCategory.WEBPKI, kind
        for cause in causes:
            if isinstance(cause, SSL.Error):
                reason = ssl_reason(cause)
                if any(hint in reason for hint in VERSION_MISMATCH_HINTS):
                    reason += " (TLS 1.2 or later required)"
                return (
                    f"TLS handshake with {where} failed: {reason}",
                    FailureCategory.FETCH,
                    FetchProblem.TLS_HANDSHAKE,
                )
        for cause in causes:
            if isinstance(cause, neterror.ConnectionDone | neterror.ConnectionLost):
                return (
                    f"connection closed by {where} before a complete response",
                    FailureCategory.FETCH,
                    FetchProblem.CONNECTION_CLOSED,
                )
        detail = "; ".join(one_line(cause) for cause in causes[1:]) or one_line(problem)
        return f"fetch from {where} failed: {detail}", FailureCategory.FETCH, FetchProblem.OTHER

    def abort(self) -> None:
        """Drop the connection at once (TCP level), if there is one."""
        if self.connection is not None:
            self.connection.abort()

    async def close(self) -> None:
        """Make sure the connection is gone before the fetch returns."""
        connection = self.connection
        if connection is not None:
            connection.abort()
            await connection.closed()


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

    def __init__(self, context: SSL.Context, attempt: _Attempt) -> None:
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

    def __init__(self, context: SSL.Context, attempt: _Attempt) -> None:
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


@implementer(IAgentEndpointFactory)
class _PolicyHostEndpointFactory:
    """Gives the Agent our endpoint for the one URI it will ever ask about."""

    def __init__(self, attempt: _Attempt, tls: _PolicyHostTLS) -> None:
        self._attempt = attempt
        self._tls = tls

    def endpointForURI(self, uri: URI) -> _PolicyHostEndpoint:
        return _PolicyHostEndpoint(self._attempt, self._tls)


@implementer(IStreamClientEndpoint)
class _PolicyHostEndpoint:
    """Resolves the policy host with the daemon's resolver, then TCP to each address in turn, then TLS."""

    def __init__(self, attempt: _Attempt, tls: _PolicyHostTLS) -> None:
        self._attempt = attempt
        self._tls = tls

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        """Resolve, then connect to the addresses in order; the first TCP connection wins."""
        attempt = self._attempt
        host = attempt.host
        attempt.stage = f"resolving {host}"
        try:
            found = await attempt.addresses.addresses(host)
        except CancelledError:
            raise
        except Exception as error:
            raise _FetchError(f"cannot resolve {host}: {one_line(error)}", FetchProblem.RESOLVE) from None
        addresses = [address for address in found if _is_ip(address)]
        if not addresses:
            raise _FetchError(f"{host} has no usable address", FetchProblem.RESOLVE)
        attempt.step(f"resolved {host}: {' '.join(addresses)}")

        creator = cast(IOpenSSLClientConnectionCreator, self._tls)
        # The Agent's factory serves this one connection: no "Starting factory"
        # and "Stopping factory" log events for every fetch.
        cast(Any, protocolFactory).noisy = False
        problems: list[str] = []
        for address in addresses:
            peer = f"[{address}]:{attempt.port}" if ":" in address else f"{address}:{attempt.port}"
            attempt.stage = f"connecting to {peer}"
            connector = _PolicyHostConnector(creator, protocolFactory, attempt)
            attempt.reactor.connectTCP(address, attempt.port, connector, timeout=CONNECT_ATTEMPT_TIMEOUT)
            try:
                connection = await connector.connected
            except neterror.ConnectError as error:
                problem = _connect_problem(error, peer)
                attempt.step(problem)
                problems.append(problem)
                continue
            attempt.peer = peer
            attempt.step(f"connected to {peer}")
            attempt.stage = AWAITING_RESPONSE
            # The Agent wants its own protocol back, from under our TLS.
            http_protocol: IProtocol = connection.wrappedProtocol
            return http_protocol
        raise _FetchError("; ".join(problems), FetchProblem.CONNECT)


class _PolicyHostConnection(TLSMemoryBIOProtocol):
    """TLS right on the TCP connection, which the fetch can abort and wait for until it is gone.

    One protocol object per connection (no wrapper between TCP and TLS, nor
    Twisted's buffering of small writes: the request is one write).
    """

    factory: _PolicyHostConnector

    def __init__(self, factory: _PolicyHostConnector, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)  # type: ignore[no-untyped-call]
        self._tcp_lost = False
        self._close_waiters: list[Deferred[None]] = []

    def makeConnection(self, transport: Any) -> None:
        self.factory.attempt.connection = self
        super().makeConnection(transport)  # type: ignore[no-untyped-call]
        self.factory.made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tcp_lost = True
        waiting, self._close_waiters = self._close_waiters, []
        try:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
        finally:
            for waiter in waiting:
                waiter.callback(None)

    def abort(self) -> None:
        """Drop the TCP connection at once, under the TLS layer."""
        transport: Any = self.transport  # a TCP transport: ITCPTransport has abortConnection
        if not self._tcp_lost and transport is not None:
            transport.abortConnection()

    def closed(self) -> Deferred[None]:
        """Fires once the TCP connection is closed (at once if it already is)."""
        waiter: Deferred[None] = Deferred()
        if self._tcp_lost:
            waiter.callback(None)
        else:
            self._close_waiters.append(waiter)
        return waiter


class _PolicyHostConnector(TLSMemoryBIOFactory):
    """The client factory of one TCP connection attempt: :attr:`connected` fires with its TLS protocol.

    Does what an endpoint's wrapping factory would (fail on a failed or
    cancelled connection attempt) without another protocol layer.
    """

    protocol = _PolicyHostConnection

    def __init__(
        self, creator: IOpenSSLClientConnectionCreator, http_factory: IProtocolFactory, attempt: _Attempt
    ) -> None:
        super().__init__(creator, True, http_factory, clock=attempt.reactor)
        self.attempt = attempt
        self.connected: Deferred[_PolicyHostConnection] = Deferred(self._cancel)
        self._connector: Any = None

    def startedConnecting(self, connector: Any) -> None:
        self._connector = connector

    def buildProtocol(self, addr: Any) -> _PolicyHostConnection | None:  # type: ignore[override]
        try:
            return cast(_PolicyHostConnection, super().buildProtocol(addr))
        except Exception:
            self.connected.errback()
            return None

    def made(self, connection: _PolicyHostConnection) -> None:
        if not self.connected.called:
            self.connected.callback(connection)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.connected.called:
            self.connected.errback(reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass

    def _cancel(self, connected: Deferred[_PolicyHostConnection]) -> None:
        cancelled = neterror.ConnectingCancelledError(self._connector.getDestination())  # type: ignore[no-untyped-call]
        connected.errback(cancelled)
        self._connector.stopConnecting()


class _BodyReader(Protocol):
    """Collects a response body up to ``limit`` bytes and aborts the connection beyond it."""

    def __init__(self, limit: int, attempt: _Attempt) -> None:
        self._limit = limit
        self._attempt = attempt
        self._chunks: list[bytes] = []
        self._received = 0
        self.done: Deferred[bytes] = Deferred(lambda _: attempt.abort())

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._chunks.clear()
            self._attempt.abort()
            self.done.errback(_FetchError(f"policy body over {self._limit} bytes", FetchProblem.TOO_LARGE))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(_FetchError):  # type: ignore[no-untyped-call]
            # A gzip decoder below refused the body (and has dropped the connection).
            self.done.errback(reason)
            return
        # PotentialDataLoss: no Content-Length and no chunking, the body ended
        # with the connection, which HTTP/1.1 allows.
        if reason.check(ResponseDone, PotentialDataLoss):  # type: ignore[no-untyped-call]
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(
                _FetchError(
                    f"connection to {self._attempt.peer} lost after {self._received} body bytes",
                    FetchProblem.CONNECTION_CLOSED,
                )
            )


async def _read_body(response: Any, limit: int, attempt: _Attempt) -> bytes:
    reader = _BodyReader(limit, attempt)
    response.deliverBody(reader)
    return await reader.done


@implementer(IAgent)
class _BoundedGzipAgent:
    """Takes the trailing gzip codings off each response and undoes them within the body cap.

    Goes under treq's ``ContentDecoderAgent`` (which still sends ``Accept-Encoding:
    gzip``): it takes off the trailing run of ``gzip`` codings, in any case and
    spelt ``x-gzip`` too, which that decoder would leave alone or inflate
    unbounded. The codings before that run stay in the header, where the
    fetcher refuses them.
    """

    def __init__(self, agent: IAgent, limit: int, abort: Callable[[], None]) -> None:
        self._agent = agent
        self._limit = limit
        self._abort = abort

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        requested: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        return requested.addCallback(self._take_gzip)

    def _take_gzip(self, response: IResponse) -> IResponse:
        values = response.headers.getRawHeaders(b"Content-Encoding")
        if not values:
            return response
        codings = b",".join(values).split(b",")
        layers = 0
        while codings and codings[-1].strip().lower() in GZIP_CODINGS:
            codings.pop()
            layers += 1
        if not layers:
            return response
        if codings:
            response.headers.setRawHeaders(b"Content-Encoding", [b",".join(codings)])
        else:
            response.headers.removeHeader(b"Content-Encoding")
        return _GunzippedResponse(response, layers, self._limit, self._abort)


class _GunzippedResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """A response whose body is delivered with ``layers`` gzip codings undone, each within the cap."""

    #: The Content-Length, if any, counts the gzip data, not the body.
    length = UNKNOWN_LENGTH

    def __init__(self, original: IResponse, layers: int, limit: int, abort: Callable[[], None]) -> None:
        super().__init__(original)
        self._layers = layers
        self._limit = limit
        self._abort = abort

    def deliverBody(self, protocol: IProtocol) -> None:
        for _ in range(self._layers):
            protocol = _BoundedGunzip(protocol, self._limit, self._abort)
        self.original.deliverBody(protocol)


class _BoundedGunzip(Protocol):
    """Undoes one gzip coding of a body on its way to ``body``, producing at most ``limit`` + 1 bytes.

    zlib inflates each piece of input no further than the room left under the
    cap plus one byte and keeps the rest of the piece (``unconsumed_tail``) for
    the next round, so whatever the pieces the network hands over, a bomb is
    refused once it passes the cap rather than inflated. The body must be one
    whole gzip stream: corrupt data, a stream cut short and data after its end
    are refused too. A refused body is a :class:`_FetchError` handed to
    ``body`` as its connection loss, and the connection is dropped.
    """

    def __init__(self, body: IProtocol, limit: int, abort: Callable[[], None]) -> None:
        self._body = body
        self._limit = limit
        self._abort = abort
        self._inflater = zlib.decompressobj(wbits=GZIP_WBITS)
        self._produced = 0
        self._refused = False

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)  # type: ignore[no-untyped-call]
        self._body.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        inflater = self._inflater
        pending = data
        while pending and not self._refused:
            if inflater.eof:
                self._refuse(
                    "gzip body goes on after the end of its gzip stream", FetchProblem.CONTENT_CODING
                )
                return
            room = self._limit + 1 - self._produced  # at least 1: a max_length of 0 would mean "all"
            try:
                decoded = inflater.decompress(pending, room)
            except zlib.error as error:
                self._refuse(f"gzip body is corrupt: {one_line(error)}", FetchProblem.CONTENT_CODING)
                return
            self._produced += len(decoded)
            if self._produced > self._limit:
                self._refuse(f"policy body over {self._limit} bytes", FetchProblem.TOO_LARGE)
                return
            if decoded:
                self._body.dataReceived(decoded)
            # Input zlib held back for want of room, or (past the end of the stream) left over.
            pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._refused:
            return
        ended = reason.check(ResponseDone, PotentialDataLoss)  # type: ignore[no-untyped-call]
        if ended and not self._inflater.eof:
            self._refuse("gzip body ends before its gzip stream does", FetchProblem.CONTENT_CODING)
            return
        self._body.connectionLost(reason)

    def _refuse(self, reason: str, problem: str) -> None:
        self._refused = True
        self._abort()
        self._body.connectionLost(Failure(_FetchError(reason, problem)))  # type: ignore[no-untyped-call]


def _group_name(connection: SSL.Connection) -> str | None:
    """The negotiated key exchange group, where pyOpenSSL and OpenSSL can tell."""
    try:
        return connection.get_group_name()
    except (AttributeError, NotImplementedError):  # pyOpenSSL < 25 / OpenSSL < 3.2
        return None


def _connect_problem(error: neterror.ConnectError, peer: str) -> str:
    if isinstance(error, neterror.ConnectionRefusedError):
        return f"connection refused by {peer}"
    if isinstance(error, neterror.TimeoutError):
        return f"no TCP connection to {peer} within {CONNECT_ATTEMPT_TIMEOUT}s"
    return f"cannot connect to {peer}: {one_line(error)}"


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _causes(problem: BaseException) -> list[BaseException]:
    """The exceptions inside Twisted's ResponseFailed / ResponseNeverReceived wrappers."""
    found: list[BaseException] = []
    pending: list[BaseException] = [problem]
    while pending:
        current = pending.pop(0)
        found.append(current)
        for reason in getattr(current, "reasons", None) or []:
            if isinstance(reason, Failure) and reason.value is not None:
                pending.append(reason.value)
    return found


def ssl_reason(error: SSL.Error) -> str:
    """OpenSSL's own words for a TLS failure, one line."""
    queue = error.args[0] if error.args else None
    if isinstance(queue, list) and queue:
        return "; ".join(str(entry[-1]) for entry in queue if entry)
    return one_line(error) or "unexpected end of the TLS stream"


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _quote(text: str) -> str:
    shown = text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."
    return "".join(char if char.isprintable() else "?" for char in shown)
