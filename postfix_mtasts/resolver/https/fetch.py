"""The RFC 8461 §3.3 fetch rules: one GET of the policy file, judged.

The URL is ``https://mta-sts.<domain>/.well-known/mta-sts.txt``; redirects are
refused, the status must be 200 and the media type ``text/plain``, no content
coding but gzip is accepted, the body is capped, one deadline bounds it all,
and the body must parse as a policy. Every outcome is a value
(:class:`FetchOK` or :class:`FetchFailed`) with a trace of what happened.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import idna
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from postfix_mtasts import __version__, limits
from postfix_mtasts.policy.policyfile import PolicyError, read_policy
from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchOK, FetchProblem, FetchResult
from postfix_mtasts.resolver.https.attempt import AddressResolver, _Attempt, _causes, _FetchError
from postfix_mtasts.resolver.https.connection import policy_host_agent
from postfix_mtasts.resolver.https.decoding import _BoundedGzipAgent
from postfix_mtasts.resolver.https.tls import policy_host_context

log = logging.getLogger("postfix_mtasts.resolver.https")

#: Label prepended to the policy domain to name the policy host (RFC 8461 §3.3).
POLICY_HOST_PREFIX = "mta-sts."
#: Path of the policy file on the policy host (RFC 8461 §3.3).
POLICY_PATH = "/.well-known/mta-sts.txt"
#: The only media type a policy may be served as (RFC 8461 §3.2).
POLICY_MEDIA_TYPE = "text/plain"
#: How we introduce ourselves to policy hosts.
USER_AGENT = f"postfix-mtasts/{__version__}"
#: HTTP status codes that announce a redirect.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Content codings that mean "no coding at all".
IDENTITY_CODINGS = frozenset({"", "identity"})
#: Longest piece of a header value quoted in a reason.
QUOTE_LIMIT = 120
#: Lower-case LDH labels of 1 to 63 characters, no hyphen at either end. With no "--" anywhere (so
#: no A-label to check) and at most MAX_NAME_LENGTH characters in all, idna.encode would return such
#: a name unchanged: policy_host does not call it for one.
PLAIN_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: Longest domain name without its trailing dot (RFC 1035, as idna counts it).
MAX_NAME_LENGTH = 253


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
        # One context for every fetch (see policy_host_context).
        self._tls_context: SSL.Context = policy_host_context(ca_file)
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
        agent = policy_host_agent(self._reactor, attempt, self._tls_context)
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
            read = read_policy(body)
        except PolicyError as invalid:
            raise _FetchError(
                f"invalid policy: {invalid}", FetchProblem.INVALID_POLICY, FailureCategory.INVALID
            ) from None
        policy = read.policy
        for warning in read.warnings:
            # Forgiven, so that the domain keeps its protection; said, so that it can be fixed.
            log.warning("%s: policy %s", attempt.host, warning)
            attempt.step(f"policy {warning}")
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
            warnings=read.warnings,
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


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _quote(text: str) -> str:
    shown = text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."
    return "".join(char if char.isprintable() else "?" for char in shown)
