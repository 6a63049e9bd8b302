"""One fetch per domain for a whole fleet: the lease in the shared store.

Before fetching, a daemon takes the domain's lease; one that finds it taken
waits (bounded) for the holder's result in the store and adopts it. The
holder keeps the lease until its result is stored, so whoever takes it next
finds the result there. A local store has no fleet: nothing to take, nobody
to wait for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from postfix_mtasts.cache import CacheEntry, IPolicyStore, Source, StoreUnavailable
from postfix_mtasts.cache.keeper import EntryKeeper

log = logging.getLogger("postfix_mtasts.lookup")

#: How long a daemon waits for another fleet member that holds the lease.
LEASE_WAIT = 10.0
#: How often it reads the store meanwhile.
LEASE_POLL = 0.25


class FleetLeases:
    """The leases this daemon (``holder``) takes in ``store``."""

    def __init__(
        self,
        reactor: IReactorTime,
        store: IPolicyStore,
        keeper: EntryKeeper,
        holder: str,
        lease_ttl: Callable[[], float],
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.keeper = keeper
        self.holder = holder
        self._lease_ttl = lease_ttl
        # Domains whose lease this daemon holds, until their result is stored.
        self._held: set[str] = set()

    def holds(self, domain: str) -> bool:
        return domain in self._held

    async def claim(
        self, domain: str, previous: CacheEntry | None, since: float, policy_id: str
    ) -> CacheEntry | None:
        """Take the lease for ``domain`` (None: fetch it here), or return the
        result another daemon stored (after waiting for the holder)."""
        if not self.store.shared:
            return None
        try:
            if await self.store.acquire_lease(domain, self.holder, self._lease_ttl()):
                self._held.add(domain)
                # Another daemon may have fetched, stored and released since
                # ``previous`` was read: take its result rather than fetch again.
                fetched = await self.keeper.get(domain)
                known = previous.fetched_at if previous is not None else 0.0
                if (fetched is not None and fetched.source is Source.FETCHED
                        and fetched.policy_id == policy_id and fetched.fetched_at > known
                        and fetched.in_force(self.reactor.seconds())):
                    await self.release(domain)
                    return fetched
                return None
        except StoreUnavailable:
            return None
        waited = 0.0
        while waited < LEASE_WAIT:
            await deferLater(self.reactor, LEASE_POLL, lambda: None)
            waited += LEASE_POLL
            stored = await self.keeper.get(domain)
            if stored is not None and stored.checked_at >= since and stored != previous:
                return stored
        log.info("%s: fleet lease holder gave no result within %gs; fetching here", domain, LEASE_WAIT)
        return None

    async def release(self, domain: str) -> None:
        """Give the lease back (once the result is stored)."""
        self._held.discard(domain)
        if not self.store.shared:
            return
        try:
            await self.store.release_lease(domain, self.holder)
        except StoreUnavailable:
            pass
