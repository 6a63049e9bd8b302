"""RFC 8461's cache rules as pure decisions over entries.

Two kinds of decision live here, with no I/O: what one resolution leaves
behind (:func:`after_txt`, :func:`after_fleet`, :func:`after_fetch`; the
lookup only does the DNS query, the lease and the fetch they ask for), and
which of two entries a copy may keep (:func:`preferred`, :func:`merged`).

The one rule every layer of the cache obeys, wherever an entry comes from
(a fresh resolution, the local copy, the shared store, another daemon of the
fleet) and in whatever order writes arrive: a policy in force is never
replaced by something weaker. RFC 8461 §5.1 keeps a fetched policy until its
``max_age`` runs out, and §10.2 says why: an attacker who strips the TXT record
or breaks HTTPS must not be able to turn an enforced policy off.

:func:`preferred` is that rule, and :func:`merged` applies it to a write;
memory, the local copy and the shared store all merge through them, so the
rule is written once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from postfix_mtasts.policy.discovery import FetchOK, FetchResult, TxtAbsent, TxtFound, TxtResult
from postfix_mtasts.policy.entry import CacheEntry, Source
from postfix_mtasts.policy.model import Mode

#: How long a FAILED entry for a domain whose DNS failed is kept (seconds).
DNS_FAILURE_RETRY = 60.0


def _rank(entry: CacheEntry) -> tuple[int, float, float]:
    """How strong ``entry`` is, among entries in force: a fetched policy beats
    anything else (RFC 8461 §5.1), then the newer fetch, then the newer check."""
    fetched = entry.source is Source.FETCHED
    return (1 if fetched else 0, entry.fetched_at if fetched else 0.0, entry.checked_at)


def preferred(current: CacheEntry | None, incoming: CacheEntry | None, now: float) -> CacheEntry | None:
    """Which of two entries for one domain may be kept at ``now``.

    The rules, in order:

    1. An entry no longer in force loses to one that is (it may not answer).
    2. A fetched policy in force beats a negative or failed entry: no
       downgrade (RFC 8461 §5.1, §10.2).
    3. Of two fetched policies, the one fetched later wins: it is what the
       domain publishes now (§3.3, a new policy id replaces the old one).
    4. Otherwise the entry checked later wins (it says more about now).
    5. A tie keeps ``current``: nothing to write.

    Either side may be None (nothing known); two entries of which neither is
    in force give the later-checked one, so that expiry stays visible.
    """
    if incoming is None:
        return current
    if current is None:
        return incoming
    current_live = current.in_force(now)
    incoming_live = incoming.in_force(now)
    if current_live != incoming_live:
        return current if current_live else incoming
    return incoming if _rank(incoming) > _rank(current) else current


def merged(current: CacheEntry | None, incoming: CacheEntry | None, now: float) -> CacheEntry | None:
    """What a copy holding ``current`` should hold once ``incoming`` arrives:
    the :func:`preferred` entry, carrying the later ``last_used`` of the two
    (a lookup's use of a domain counts whichever entry wins, so that a used
    domain keeps being refreshed). Equal to ``current`` when nothing changes.
    """
    best = preferred(current, incoming, now)
    if best is None or current is None or incoming is None:
        return best
    other = incoming if best is current else current
    if other.last_used > best.last_used:
        best = replace(best, last_used=other.last_used)
    return best


# --- one resolution: after the TXT record, after the fleet, after the fetch ----------


@dataclass(frozen=True, slots=True)
class FreshnessRules:
    """The settings the decisions below depend on (seconds)."""

    negative_ttl_min: float
    negative_ttl_max: float
    fetch_retry_backoff: float
    #: How long a domain whose DNS failed is remembered as failed: short,
    #: because DNS trouble is usually brief and there is no policy to protect.
    dns_failure_retry: float = DNS_FAILURE_RETRY


@dataclass(frozen=True, slots=True)
class Keep:
    """The resolution ends here: ``entry`` answers, for the reason ``why``."""

    entry: CacheEntry
    why: str


@dataclass(frozen=True, slots=True)
class Fetch:
    """Fetch the policy ``policy_id`` (after the fleet's lease); ``cached`` is the
    policy in force that a failure or another daemon's result must not end."""

    policy_id: str
    cached: CacheEntry | None


def policy_in_force(previous: CacheEntry | None, now: float) -> CacheEntry | None:
    """``previous`` if it is a fetched policy still in force (RFC 8461 §5.1)."""
    if previous is not None and previous.source is Source.FETCHED and previous.in_force(now):
        return previous
    return None


def after_txt(
    domain: str,
    previous: CacheEntry | None,
    txt: TxtResult,
    now: float,
    rules: FreshnessRules,
    *,
    force_fetch: bool = False,
) -> Keep | Fetch:
    """What the ``_mta-sts`` TXT outcome means for ``domain``, given what is cached.

    ``force_fetch`` (a refresh) fetches even an unchanged id, and even without
    a TXT record when a policy is cached: DNS can be blocked by the very
    attacker the policy is there to stop (RFC 8461 §10.2).
    """
    cached = policy_in_force(previous, now)
    if isinstance(txt, TxtFound):
        policy_id = txt.policy_id
    elif cached is not None and not force_fetch:
        why = "TXT record gone" if isinstance(txt, TxtAbsent) else f"DNS failed: {txt.reason}"
        return Keep(replace(cached, checked_at=now), f"{why}; cached policy {cached.policy_id} "
                                                     f"stays in force until {stamp(cached.expires_at)}")
    elif cached is None:
        if isinstance(txt, TxtAbsent):
            ttl = txt.negative_ttl if txt.negative_ttl is not None else rules.negative_ttl_min
            ttl = min(max(float(ttl), rules.negative_ttl_min), rules.negative_ttl_max)
            entry = CacheEntry(domain, Source.NEGATIVE, expires_at=now + ttl, checked_at=now,
                               failure=txt.reason, last_used=now)
            return Keep(entry, f"no MTA-STS record ({txt.reason}); remembered for {ttl:g}s")
        entry = CacheEntry(domain, Source.FAILED, expires_at=now + rules.dns_failure_retry,
                           checked_at=now, failure=f"DNS failed: {txt.reason}", last_used=now)
        return Keep(entry, f"DNS failed: {txt.reason}")
    else:
        policy_id = cached.policy_id

    if cached is not None and cached.policy_id == policy_id and not force_fetch:
        return Keep(replace(cached, checked_at=now), f"policy id {policy_id} unchanged")
    if (previous is not None and previous.failed_id == policy_id and now < previous.retry_at
            and not force_fetch):
        # RFC 8461 §3.3: a failed fetch is not retried before the back-off.
        if cached is not None:
            kept = replace(cached, checked_at=now)
        else:
            # The policy that outlived the failure has expired meanwhile:
            # it must not answer again; "no usable policy" until the retry.
            kept = CacheEntry(domain, Source.FAILED, expires_at=previous.retry_at, checked_at=now,
                              failed_id=policy_id, retry_at=previous.retry_at,
                              failure=previous.failure, last_used=previous.last_used,
                              failure_category=previous.failure_category)
        return Keep(kept, f"fetch of policy id {policy_id} failed ({previous.failure}); "
                          f"no retry before {stamp(previous.retry_at)}")
    return Fetch(policy_id, cached)


def after_fleet(step: Fetch, adopted: CacheEntry, now: float) -> Keep:
    """Another daemon of the fleet resolved the domain and stored ``adopted``."""
    cached = step.cached
    if cached is not None and (adopted.source is not Source.FETCHED or not adopted.in_force(now)):
        # Another daemon's failure is no reason to drop a policy still in force.
        return Keep(replace(cached, checked_at=now),
                    f"another daemon of the fleet found no usable policy "
                    f"({adopted.failure or adopted.source.value}); cached policy "
                    f"{cached.policy_id} stays in force until {stamp(cached.expires_at)}")
    return Keep(adopted, "resolved by another daemon of the fleet")


def after_fetch(
    domain: str,
    previous: CacheEntry | None,
    step: Fetch,
    result: FetchResult,
    now: float,
    rules: FreshnessRules,
) -> Keep:
    """The entry a fetch of ``step.policy_id`` leaves behind."""
    cached, policy_id = step.cached, step.policy_id
    if isinstance(result, FetchOK):
        policy = result.policy
        entry = CacheEntry(
            domain, Source.FETCHED, expires_at=now + policy.max_age, checked_at=now,
            policy_id=policy_id, policy=policy, policy_text=result.text,
            fetched_at=now, last_used=previous.last_used if previous else now,
        )
        what = "refreshed" if cached is not None and cached.policy_id == policy_id else "fetched"
        return Keep(entry, f"policy {policy_id} {what}: mode {policy.mode.value}, max_age {policy.max_age}")
    retry_at = now + rules.fetch_retry_backoff
    if cached is not None:
        # RFC 8461 §5.1: a failed refresh leaves the policy in force.
        kept = replace(cached, checked_at=now, failed_id=policy_id, retry_at=retry_at,
                       failure=result.reason, failure_category=result.category)
        warn = "" if cached.policy and cached.policy.mode is Mode.NONE else " (refresh failing)"
        return Keep(kept, f"fetch of policy {policy_id} failed: {result.reason}; cached policy "
                          f"{cached.policy_id} stays in force until {stamp(cached.expires_at)}{warn}")
    # RFC 8461 §3.3: no usable policy; deliver as if none, retry after the back-off.
    entry = CacheEntry(domain, Source.FAILED, expires_at=retry_at, checked_at=now,
                       failed_id=policy_id, retry_at=retry_at, failure=result.reason,
                       failure_category=result.category, last_used=now)
    return Keep(entry, f"fetch failed: {result.reason}")


def stamp(when: float) -> str:
    """``when`` as an ISO 8601 UTC time, for reasons in the log."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
