"""Discovery over the network: the ``_mta-sts`` TXT record (DNS) and the policy
file (HTTPS). The result types are plain values (policy.discovery, re-exported
here); the lookup decides."""

from __future__ import annotations

from typing import Protocol

from postfix_mtasts.policy.discovery import (
    FailureCategory,
    FetchFailed,
    FetchOK,
    FetchProblem,
    FetchResult,
    TxtAbsent,
    TxtFailed,
    TxtFound,
    TxtResult,
)

__all__ = [
    "FailureCategory",
    "FetchFailed",
    "FetchOK",
    "FetchProblem",
    "FetchResult",
    "PolicyFetcher",
    "TxtAbsent",
    "TxtFailed",
    "TxtFound",
    "TxtResolver",
    "TxtResult",
]


class TxtResolver(Protocol):
    """Looks up ``_mta-sts.<domain>``."""

    async def lookup_sts(self, domain: str) -> TxtResult: ...


class PolicyFetcher(Protocol):
    """Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt``."""

    async def fetch(self, domain: str) -> FetchResult: ...
