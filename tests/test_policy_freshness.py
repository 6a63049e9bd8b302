"""policy.freshness: the no-downgrade merge, as a table.

Each row is one rule of :func:`preferred` with the RFC 8461 section it comes
from: which of the entry a copy holds and the entry arriving may be kept. The
merge is run both ways round where the rule is symmetric, since writes reach
memory, the local copy and the shared store in any order.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from postfix_mtasts.policy.entry import CacheEntry, Source
from postfix_mtasts.policy.freshness import merged, preferred
from postfix_mtasts.policy.model import Mode, Policy

NOW = 1_700_000_000.0
DAY = 86_400.0

POLICY = Policy(mode=Mode.ENFORCE, max_age=7 * int(DAY), mx=("mx.example.com",))


def fetched(*, fetched_at: float = NOW - DAY, checked_at: float | None = None,
            expires_at: float | None = None, policy_id: str = "one", last_used: float = 0.0) -> CacheEntry:
    return CacheEntry(
        "example.com", Source.FETCHED,
        expires_at=fetched_at + 7 * DAY if expires_at is None else expires_at,
        checked_at=fetched_at if checked_at is None else checked_at,
        policy_id=policy_id, policy=POLICY, policy_text="version: STSv1\n",
        fetched_at=fetched_at, last_used=last_used,
    )


def negative(
    *, checked_at: float = NOW, expires_at: float = NOW + 3600, last_used: float = 0.0
) -> CacheEntry:
    return CacheEntry("example.com", Source.NEGATIVE, expires_at=expires_at, checked_at=checked_at,
                      last_used=last_used)


def failed(*, checked_at: float = NOW, expires_at: float = NOW + 300) -> CacheEntry:
    return CacheEntry("example.com", Source.FAILED, expires_at=expires_at, checked_at=checked_at,
                      failed_id="two", retry_at=expires_at, failure="HTTP 404")


ENFORCED = fetched()
NEWER_POLICY = fetched(fetched_at=NOW - 60, policy_id="two")
RECHECKED = fetched(checked_at=NOW - 10)  # the same policy, its TXT id checked since
EXPIRED = fetched(fetched_at=NOW - 30 * DAY)
NEGATIVE = negative()
OLD_NEGATIVE = negative(checked_at=NOW - 600)
FAILED = failed()
STALE_NEGATIVE = negative(checked_at=NOW - 7200, expires_at=NOW - 3600)

#: (held, arriving, kept, RFC 8461 section, rule)
TABLE = [
    (None, ENFORCED, ENFORCED, "§3.3", "nothing known: anything is kept"),
    (ENFORCED, None, ENFORCED, "§3.3", "nothing arriving: what is held stays"),
    (ENFORCED, NEGATIVE, ENFORCED, "§5.1, §10.2", "a vanished TXT record never ends a policy in force"),
    (ENFORCED, FAILED, ENFORCED, "§5.1, §10.2", "a failed fetch never ends a policy in force"),
    (NEGATIVE, ENFORCED, ENFORCED, "§3.3", "a fetched policy replaces a negative entry"),
    (FAILED, ENFORCED, ENFORCED, "§3.3", "a fetched policy replaces a failed fetch"),
    (ENFORCED, NEWER_POLICY, NEWER_POLICY, "§3.3", "a policy fetched later replaces an older one"),
    (NEWER_POLICY, ENFORCED, NEWER_POLICY, "§3.3", "an older policy never replaces a newer one"),
    (ENFORCED, RECHECKED, RECHECKED, "§5.1", "the same policy checked later replaces itself"),
    (RECHECKED, ENFORCED, RECHECKED, "§5.1", "a stale copy of the same policy does not undo a check"),
    (EXPIRED, NEGATIVE, NEGATIVE, "§5.1", "a policy past its max_age no longer protects"),
    (NEGATIVE, EXPIRED, NEGATIVE, "§5.1", "an expired policy never comes back"),
    (OLD_NEGATIVE, NEGATIVE, NEGATIVE, "§3.3", "of two entries without a policy, the later check"),
    (NEGATIVE, OLD_NEGATIVE, NEGATIVE, "§3.3", "an older negative entry does not replace a newer"),
    (NEGATIVE, FAILED, NEGATIVE, "§3.3", "same check time: a tie keeps what is held"),
    (STALE_NEGATIVE, FAILED, FAILED, "§3.3", "an entry in force beats one that is not"),
    (ENFORCED, ENFORCED, ENFORCED, "-", "an equal write changes nothing"),
]


@pytest.mark.parametrize(
    ("held", "arriving", "kept"),
    [row[:3] for row in TABLE],
    ids=[f"{row[3]} {row[4]}" for row in TABLE],
)
def test_preferred(held: CacheEntry | None, arriving: CacheEntry | None, kept: CacheEntry) -> None:
    assert preferred(held, arriving, NOW) is kept


def test_the_table_covers_each_kind_of_entry_on_each_side() -> None:
    sources = {(row[0].source if row[0] else None, row[1].source if row[1] else None) for row in TABLE}
    kinds = [Source.FETCHED, Source.NEGATIVE, Source.FAILED]
    assert {(Source.FETCHED, kind) for kind in kinds} <= sources
    assert {(kind, Source.FETCHED) for kind in kinds} <= sources


def test_merged_keeps_the_later_use_of_either_entry() -> None:
    held = replace(NEWER_POLICY, last_used=NOW - 100)
    arriving = replace(ENFORCED, last_used=NOW - 5)  # an older policy, used more recently

    result = merged(held, arriving, NOW)

    assert result is not None
    assert result.policy_id == "two"  # the policy is the newer one...
    assert result.last_used == NOW - 5  # ...and the later use is not lost


def test_merged_is_what_is_held_when_nothing_changes() -> None:
    held = replace(ENFORCED, last_used=NOW)
    assert merged(held, replace(NEGATIVE, last_used=NOW - 1), NOW) is held
    assert merged(held, None, NOW) is held
    assert merged(None, held, NOW) is held


def test_merged_writes_are_order_independent() -> None:
    """Whatever order three writes reach a copy in, it ends holding the newest policy."""
    import itertools

    writes = [NEGATIVE, ENFORCED, NEWER_POLICY, FAILED]
    outcomes = set()
    for order in itertools.permutations(writes):
        held: CacheEntry | None = None
        for entry in order:
            held = merged(held, entry, NOW)
        assert held is not None
        outcomes.add((held.source, held.policy_id))
    assert outcomes == {(Source.FETCHED, "two")}
