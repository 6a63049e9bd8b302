"""Fetching the MTA-STS policy file over validated HTTPS (RFC 8461 §3.3).

One fetch is one GET of ``https://mta-sts.<domain>/.well-known/mta-sts.txt``:
the name is resolved by the daemon's own resolver, the certificate must chain
to the trust root and name the host (SAN only, via service_identity), TLS 1.2
or later, no redirects, status 200, ``text/plain``, no content coding but gzip, a
capped body, and one deadline for all of it. Every outcome is a value
(:class:`FetchOK` or :class:`FetchFailed`) with a trace of what happened.

The HTTP client is treq's ``HTTPClient`` over an ``Agent`` whose endpoint
factory is ours (resolution through the daemon's resolver, our TLS checks).
One module per job, each importing only those listed after it:

``fetch``
    :class:`HttpsPolicyFetcher`: the RFC 8461 rules (URL, redirects, status,
    media type, body cap, deadline, policy parsing) and the outcome.
``connection``
    the Agent of one fetch and its endpoint: address resolution, TCP to
    each address in turn, TLS on the first connection made.
``decoding``
    the gzip content coding, undone within the body cap.
``attempt``
    what one fetch knows about itself (trace, stage, connection) and how it fails.
``tls``
    the TLS context (trust root, TLS 1.2+, key exchange groups) and the
    certificate verdicts.

Names with a leading underscore are private to this package.
"""

from postfix_mtasts.resolver.https.attempt import AddressResolver, _FetchError
from postfix_mtasts.resolver.https.decoding import _BoundedGunzip, _BoundedGzipAgent
from postfix_mtasts.resolver.https.fetch import (
    POLICY_HOST_PREFIX,
    POLICY_MEDIA_TYPE,
    POLICY_PATH,
    HttpsPolicyFetcher,
    policy_host,
)
from postfix_mtasts.resolver.https.tls import VERIFY_ERRORS, CaFileError, load_trust_root, ssl_reason

#: What the rest of the daemon, bench/ and the tests import from here.
__all__ = [
    "POLICY_HOST_PREFIX",
    "POLICY_MEDIA_TYPE",
    "POLICY_PATH",
    "VERIFY_ERRORS",
    "AddressResolver",
    "CaFileError",
    "HttpsPolicyFetcher",
    "_BoundedGunzip",
    "_BoundedGzipAgent",
    "_FetchError",
    "load_trust_root",
    "policy_host",
    "ssl_reason",
]
