"""One policy fetch attempt: what it knows about itself, and how it fails.

An :class:`_Attempt` is shared by the layers of one fetch: the connection, the
TLS checks and the HTTP exchange each record on it what they did (the trace),
the stage the fetch is in, what TLS showed and the connection to drop.
:class:`_FetchError` is the expected failure any layer raises;
:meth:`_Attempt.classify` turns anything else out of the HTTP client into a
reason, a TLSRPT category and a :class:`FetchProblem`.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import error as neterror
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from postfix_mtasts.errors import one_line
from postfix_mtasts.resolver import FailureCategory, FetchFailed, FetchProblem
from postfix_mtasts.resolver.https.tls import (
    _CERTIFICATE_PROBLEM_ORDER,
    VERSION_MISMATCH_HINTS,
    _group_name,
    describe_certificate,
    ssl_reason,
)

#: The stage from TCP connect to response headers (see _Attempt.current_stage).
AWAITING_RESPONSE = "awaiting the response"


class AddressResolver(TypingProtocol):
    """Resolves a host name to IP address strings with the daemon's own DNS."""

    async def addresses(self, host: str) -> list[str]:
        """Return the addresses of ``host``; raise with a one-line str when it has none."""
        ...


class _Connection(TypingProtocol):
    """What an attempt needs of its connection (a :mod:`.connection` ``_PolicyHostConnection``)."""

    def abort(self) -> None:
        """Drop the connection at once."""
        ...

    def closed(self) -> Deferred[None]:
        """Fires once the connection is gone."""
        ...


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
        self.connection: _Connection | None = None

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
