"""RFC 8461's cache rules as pure decisions over entries.

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

from dataclasses import replace

from postfix_mtasts.policy.entry import CacheEntry, Source


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
