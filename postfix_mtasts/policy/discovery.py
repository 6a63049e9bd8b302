"""What discovery found, as plain values: the ``_mta-sts`` TXT record's outcome
and the policy fetch's. The resolvers (:mod:`postfix_mtasts.resolver`) make
them; the freshness rules (:mod:`postfix_mtasts.policy.freshness`) decide on them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from postfix_mtasts.policy.model import Policy


@dataclass(frozen=True, slots=True)
class TxtFound:
    """Exactly one valid ``v=STSv1`` record: its id, and the RRset TTL."""

    policy_id: str
    ttl: int
    record: str


@dataclass(frozen=True, slots=True)
class TxtAbsent:
    """The domain publishes no usable MTA-STS record.

    Covers NXDOMAIN, NODATA, no record starting ``v=STSv1;``, more than one
    such record and a malformed one: RFC 8461 §3.1 treats all of them as "no
    policy available". ``negative_ttl`` is the DNS negative-caching TTL (SOA
    minimum) when the answer carried one, else the TTL of the TXT RRset.
    """

    reason: str
    negative_ttl: int | None = None


@dataclass(frozen=True, slots=True)
class TxtFailed:
    """DNS could not answer (timeout, SERVFAIL, refused, network error)."""

    reason: str


TxtResult = TxtFound | TxtAbsent | TxtFailed


class FailureCategory:
    """Why a fetch failed, in TLSRPT's words (RFC 8460 §4.3)."""

    FETCH = "sts-policy-fetch-error"
    INVALID = "sts-policy-invalid"
    WEBPKI = "sts-webpki-invalid"


class FetchProblem:
    """What went wrong with a fetch, for code that gives advice on it
    (``check``); the reason says the same for people, in more detail."""

    DOMAIN_NAME = "domain-name"
    RESOLVE = "resolve"
    CONNECT = "connect"
    TLS_HANDSHAKE = "tls-handshake"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NAME = "certificate-name"
    CERTIFICATE_UNTRUSTED = "certificate-untrusted"
    CERTIFICATE_INVALID = "certificate-invalid"
    REDIRECT = "redirect"
    HTTP_STATUS = "http-status"
    MEDIA_TYPE = "media-type"
    CONTENT_CODING = "content-coding"
    TOO_LARGE = "too-large"
    CONNECTION_CLOSED = "connection-closed"
    TIMEOUT = "timeout"
    INVALID_POLICY = "invalid-policy"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class FetchOK:
    """A policy fetched over validated HTTPS and parsed without error.

    ``tls_version``, ``not_after`` (the certificate's, UTC) and ``body_bytes``
    are what the fetch saw, when the fetcher knows them; ``trace`` says it
    all in words.
    """

    policy: Policy
    text: str
    trace: tuple[str, ...] = field(default=())
    tls_version: str = ""
    not_after: datetime.datetime | None = None
    body_bytes: int | None = None
    #: What was wrong with the policy but forgiven (policyfile.read_policy).
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FetchFailed:
    """The fetch or the policy failed; ``reason`` is one line for the log,
    ``problem`` a :class:`FetchProblem` for code."""

    reason: str
    category: str = FailureCategory.FETCH
    trace: tuple[str, ...] = field(default=())
    problem: str = FetchProblem.OTHER


FetchResult = FetchOK | FetchFailed
