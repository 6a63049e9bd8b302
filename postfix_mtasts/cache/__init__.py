"""The policy cache: one entry per domain, in a store that outlives the process.

Every backend (memory, sqlite, redis, postgresql) implements
:class:`IPolicyStore`; the lookup keeps a bounded in-memory front
(:mod:`postfix_mtasts.cache.front`) before it so that a hit costs no I/O.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

from postfix_mtasts.policy.entry import CacheEntry, Source

__all__ = ["CacheEntry", "IPolicyStore", "Source", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The backing store cannot be reached right now (network, disk, lock)."""


class IPolicyStore(Interface):
    """Durable storage of :class:`CacheEntry` values, keyed by domain.

    Methods are coroutines to be awaited from Twisted code (inside
    ``Deferred.fromCoroutine``). A method that cannot reach the store raises
    :class:`StoreUnavailable`; the lookup then keeps answering from memory.
    """

    name = Attribute("Short backend name for logs: 'sqlite', 'memory', ...")
    shared = Attribute(
        "True when a fleet of daemons shares the store and its leases decide which one "
        "fetches a domain; False for a local store, whose leases are always granted."
    )

    async def open() -> None:
        """Connect, create or migrate the schema. Called once before use."""

    async def load(limit: int) -> list[CacheEntry]:
        """Up to ``limit`` entries, most recently used first, to warm the front."""

    async def get(domain: str) -> CacheEntry | None:
        """The stored entry for ``domain``, or None."""

    async def put(entry: CacheEntry) -> None:
        """Store ``entry``; durable once the coroutine returns."""

    async def put_many(entries: list[CacheEntry]) -> None:
        """Store several entries in one transaction."""

    async def delete(domain: str) -> None:
        """Forget ``domain``."""

    async def delete_all() -> None:
        """Forget everything."""

    async def prune(now: float) -> int:
        """Delete entries no longer in force at ``now``; return how many."""

    async def count() -> int:
        """Number of stored entries."""

    async def acquire_lease(domain: str, holder: str, ttl: float) -> bool:
        """Claim the right to resolve ``domain`` for ``ttl`` seconds.

        Shared stores use this so that one daemon of a fleet fetches a domain
        at a time; local stores always grant it.
        """

    async def release_lease(domain: str, holder: str) -> None:
        """Give up a lease taken with :meth:`acquire_lease`."""

    async def close() -> None:
        """Finish pending writes and release connections and files."""
