"""policy.freshness: RFC 8461's cache rules, as tables.

The merge table: each row one rule of :func:`preferred` with the RFC 8461
section it comes from, which of the entry a copy holds and the entry
arriving may be kept, both ways round, since writes reach memory, the local
copy and the shared store in any order. The resolution table: what a TXT
outcome decides given what is cached (keep, or fetch which id), then what a
fetch or another daemon's result leaves behind.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from postfix_mtasts.policy.discovery import (
    FailureCategory,
    FetchFailed,
    FetchOK,
    TxtAbsent,
    TxtFailed,
    TxtFound,
    TxtResult,
)
from postfix_mtasts.policy.entry import CacheEntry, Source
from postfix_mtasts.policy.freshness import (
    Fetch,
    FreshnessRules,
    Keep,
    after_fetch,
    after_fleet,
    after_txt,
    merged,
    policy_in_force,
    preferred,
)
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


# --- one resolution: after_txt, after_fleet, after_fetch -------------------------------

RULES = FreshnessRules(negative_ttl_min=300.0, negative_ttl_max=86_400.0, fetch_retry_backoff=300.0)
FOUND_ONE = TxtFound(policy_id="one", ttl=3600, record="v=STSv1; id=one")
FOUND_TWO = TxtFound(policy_id="two", ttl=3600, record="v=STSv1; id=two")
ABSENT = TxtAbsent(reason="NXDOMAIN", negative_ttl=3600)
ABSENT_SHORT = TxtAbsent(reason="NXDOMAIN", negative_ttl=5)
BROKEN_DNS = TxtFailed(reason="SERVFAIL")
RETRYING = failed(checked_at=NOW - 10, expires_at=NOW + 200)  # failed_id "two", retry in 200 s

#: (previous, TXT outcome, force, outcome kind, source kept, policy id kept, RFC 8461, rule)
TXT_TABLE = [
    (None, ABSENT, False, "keep", Source.NEGATIVE, "", "§3.1", "no record: remembered as negative"),
    (None, BROKEN_DNS, False, "keep", Source.FAILED, "", "§3.1", "DNS failure, nothing cached: failed"),
    (None, FOUND_ONE, False, "fetch", None, "one", "§3.3", "a new id is fetched"),
    (ENFORCED, FOUND_ONE, False, "keep", Source.FETCHED, "one", "§3.3", "an unchanged id is not fetched"),
    (ENFORCED, FOUND_TWO, False, "fetch", None, "two", "§3.3", "a changed id is fetched"),
    (ENFORCED, ABSENT, False, "keep", Source.FETCHED, "one", "§10.2", "TXT gone: the policy stays"),
    (ENFORCED, BROKEN_DNS, False, "keep", Source.FETCHED, "one", "§10.2", "DNS blocked: the policy stays"),
    (ENFORCED, ABSENT, True, "fetch", None, "one", "§10.2", "a refresh fetches without the record"),
    (ENFORCED, FOUND_ONE, True, "fetch", None, "one", "§3.3", "a refresh fetches an unchanged id"),
    (EXPIRED, ABSENT, False, "keep", Source.NEGATIVE, "", "§5.1", "an expired policy is not kept"),
    (RETRYING, FOUND_TWO, False, "keep", Source.FAILED, "two", "§3.3", "no retry before the back-off"),
    (RETRYING, FOUND_ONE, False, "fetch", None, "one", "§3.3", "another id is fetched at once"),
]


@pytest.mark.parametrize(
    ("previous", "txt", "force", "kind", "source", "policy_id"),
    [row[:6] for row in TXT_TABLE],
    ids=[f"{row[6]} {row[7]}" for row in TXT_TABLE],
)
def test_after_txt(previous: CacheEntry | None, txt: TxtResult, force: bool, kind: str,
                   source: Source | None, policy_id: str) -> None:
    step = after_txt("example.com", previous, txt, NOW, RULES, force_fetch=force)

    if kind == "fetch":
        assert isinstance(step, Fetch)
        assert step.policy_id == policy_id
        assert step.cached is policy_in_force(previous, NOW)
    else:
        assert isinstance(step, Keep)
        assert step.entry.source is source
        assert (step.entry.policy_id or step.entry.failed_id) == policy_id
        assert step.entry.in_force(NOW)
        assert step.entry.checked_at == NOW


def test_a_negative_entry_lives_the_dns_negative_ttl_within_bounds() -> None:
    long = after_txt("example.com", None, ABSENT, NOW, RULES)
    short = after_txt("example.com", None, ABSENT_SHORT, NOW, RULES)

    assert isinstance(long, Keep) and long.entry.expires_at == NOW + 3600
    assert isinstance(short, Keep) and short.entry.expires_at == NOW + RULES.negative_ttl_min
    assert "remembered for 300s" in short.why


POLICY_TWO = Policy(mode=Mode.ENFORCE, max_age=3600, mx=("mx.example.com",))
FETCH_OK = FetchOK(policy=POLICY_TWO, text="version: STSv1\n")
FETCH_404 = FetchFailed(reason="HTTP 404", category=FailureCategory.FETCH)


def test_a_fetched_policy_is_in_force_for_its_max_age() -> None:
    kept = after_fetch("example.com", None, Fetch("two", None), FETCH_OK, NOW, RULES)

    assert kept.entry.source is Source.FETCHED
    assert kept.entry.expires_at == NOW + 3600 and kept.entry.fetched_at == NOW
    assert kept.why == "policy two fetched: mode enforce, max_age 3600"


def test_a_failed_refresh_keeps_the_policy_and_remembers_the_failure() -> None:
    """RFC 8461 §5.1 and §10.2: a fetch that fails never ends a policy in force."""
    kept = after_fetch("example.com", ENFORCED, Fetch("two", ENFORCED), FETCH_404, NOW, RULES)

    assert kept.entry.source is Source.FETCHED and kept.entry.policy_id == "one"
    assert kept.entry.failed_id == "two" and kept.entry.retry_at == NOW + RULES.fetch_retry_backoff
    assert "stays in force" in kept.why and "(refresh failing)" in kept.why


def test_a_failed_first_fetch_is_no_policy_until_the_back_off() -> None:
    """RFC 8461 §3.3: deliver as if there were no policy, and do not retry at once."""
    kept = after_fetch("example.com", None, Fetch("two", None), FETCH_404, NOW, RULES)

    assert kept.entry.source is Source.FAILED
    assert kept.entry.expires_at == kept.entry.retry_at == NOW + RULES.fetch_retry_backoff
    assert kept.entry.failure_category == FailureCategory.FETCH


def test_another_daemons_failure_does_not_end_a_policy_in_force() -> None:
    kept = after_fleet(Fetch("two", ENFORCED), FAILED, NOW)

    assert kept.entry.source is Source.FETCHED and kept.entry.policy_id == "one"
    assert "another daemon of the fleet found no usable policy" in kept.why


def test_another_daemons_policy_is_adopted() -> None:
    kept = after_fleet(Fetch("two", ENFORCED), NEWER_POLICY, NOW)

    assert kept.entry is NEWER_POLICY
    assert kept.why == "resolved by another daemon of the fleet"
