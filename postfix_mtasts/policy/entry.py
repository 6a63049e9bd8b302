"""What the daemon knows about one domain: the cache entry, the same in every store.

Pure values (no I/O): the freshness rules (:mod:`postfix_mtasts.policy.freshness`)
decide over them, and every store keeps them as :meth:`CacheEntry.to_json`.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, replace
from typing import Any

from postfix_mtasts.policy.model import Mode, Policy


class Source(enum.Enum):
    """Where an entry's answer came from."""

    #: A policy fetched over HTTPS and validated.
    FETCHED = "fetched"
    #: The domain publishes no MTA-STS record.
    NEGATIVE = "negative"
    #: A record promises a policy but it could not be fetched or validated.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What the daemon knows about one domain.

    A FETCHED entry is in force until ``expires_at`` (``fetched_at`` plus the
    policy's max_age), whatever DNS or HTTPS say meanwhile. ``failed_id`` and
    ``retry_at`` remember a failed fetch so that it is not retried before the
    back-off, also when an older policy stays in force. ``failure_category``
    is the TLSRPT result type of that failed fetch (a FailureCategory value;
    empty when no policy was promised, e.g. DNS failed).
    """

    domain: str
    source: Source
    expires_at: float
    checked_at: float
    policy_id: str = ""
    policy: Policy | None = None
    policy_text: str = ""
    fetched_at: float = 0.0
    failed_id: str = ""
    retry_at: float = 0.0
    failure: str = ""
    last_used: float = 0.0
    failure_category: str = ""

    def in_force(self, now: float) -> bool:
        """True while this entry may still answer lookups."""
        return now < self.expires_at

    def touched(self, now: float) -> CacheEntry:
        return replace(self, last_used=now)

    def to_json(self) -> str:
        """A stable text form, the same in every backend."""
        doc: dict[str, Any] = {
            "v": 1,
            "domain": self.domain,
            "source": self.source.value,
            "expires_at": self.expires_at,
            "checked_at": self.checked_at,
            "policy_id": self.policy_id,
            "policy_text": self.policy_text,
            "fetched_at": self.fetched_at,
            "failed_id": self.failed_id,
            "retry_at": self.retry_at,
            "failure": self.failure,
            "failure_category": self.failure_category,
            "last_used": self.last_used,
        }
        if self.policy is not None:
            doc["policy"] = {
                "mode": self.policy.mode.value,
                "max_age": self.policy.max_age,
                "mx": list(self.policy.mx),
            }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CacheEntry:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on anything malformed."""
        try:
            doc = json.loads(text)
            if doc.get("v") != 1:
                raise ValueError(f"unknown entry version {doc.get('v')!r}")
            raw_policy = doc.get("policy")
            policy = None
            if raw_policy is not None:
                policy = Policy(
                    mode=Mode(raw_policy["mode"]),
                    max_age=int(raw_policy["max_age"]),
                    mx=tuple(str(p) for p in raw_policy["mx"]),
                )
            # Equal times share one float object: an entry is held in memory
            # by the hundred thousand, and a float costs 24 bytes.
            fetched_at = float(doc["fetched_at"])
            checked_at = _shared(float(doc["checked_at"]), fetched_at)
            return cls(
                domain=str(doc["domain"]),
                source=Source(doc["source"]),
                expires_at=float(doc["expires_at"]),
                checked_at=checked_at,
                policy_id=str(doc["policy_id"]),
                policy=policy,
                policy_text=str(doc["policy_text"]),
                fetched_at=fetched_at,
                failed_id=str(doc["failed_id"]),
                retry_at=_shared(float(doc["retry_at"]), _ZERO),
                failure=str(doc["failure"]),
                last_used=_shared(float(doc["last_used"]), checked_at),
                # Absent from entries stored before the field existed.
                failure_category=str(doc.get("failure_category", "")),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed cache entry: {e}") from e


_ZERO = 0.0


def _shared(value: float, other: float) -> float:
    """``other`` when it equals ``value``, so both fields hold one object."""
    return other if value == other else value
