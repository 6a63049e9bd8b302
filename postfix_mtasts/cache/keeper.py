"""The lookup's reads and writes of its store, and what a failing store could not take.

A store that fails a write (a full disk under SQLite, the local copy of a
shared store) must not lose what was learnt: the policy stays in memory,
waits here, and is written with the next write that succeeds. The failure
is logged when it starts and when it ends, not once per entry. A shared
store's own outages are absorbed below (cache.resilient), so this is the one
place the lookup deals with failed writes.
"""

from __future__ import annotations

import logging

from postfix_mtasts.cache import CacheEntry, IPolicyStore, Source, StoreUnavailable
from postfix_mtasts.cache.front import MemoryFront

log = logging.getLogger("postfix_mtasts.lookup")


class EntryKeeper:
    """Reads and writes ``store`` for a lookup whose memory is ``front``."""

    def __init__(self, store: IPolicyStore, front: MemoryFront) -> None:
        self.store = store
        self.front = front
        self._failing = False
        # Entries the store refused, written when it works again.
        self._unsaved: dict[str, CacheEntry] = {}

    @property
    def unsaved(self) -> int:
        """Entries waiting for the store to take writes again."""
        return len(self._unsaved)

    async def get(self, domain: str) -> CacheEntry | None:
        """The stored entry; None when there is none or the store cannot be read."""
        # What the store refused is newer than what it holds, and may be
        # missing from memory now (evicted).
        unsaved = self._unsaved.get(domain)
        if unsaved is not None:
            return unsaved
        try:
            return await self.store.get(domain)
        except StoreUnavailable as e:
            log.debug("%s: store unavailable for read (%s)", domain, e)
            return None

    async def put(self, entry: CacheEntry) -> None:
        """Write ``entry``; if the store refuses, keep it for the next write that succeeds.

        Only policies are kept for later: an entry without one learnt while
        the store failed may not have seen a policy stored there, and written
        back later it would erase it.
        """
        try:
            await self.store.put(entry)
        except StoreUnavailable as e:
            if entry.source is Source.FETCHED:
                self._unsaved[entry.domain] = entry
            if self._failing:
                log.debug("%s: could not store the new entry (%s)", entry.domain, e)
                return
            self._failing = True
            log.error("%s: could not store the new entry (%s); keeping it in memory "
                      "(further failed writes are not logged until one succeeds)", entry.domain, e)
            return
        self._unsaved.pop(entry.domain, None)
        await self.write_back()

    async def write_back(self, also: list[CacheEntry] | None = None) -> None:
        """Write what failed to reach the store before (plus ``also``) in one batch."""
        batch = {entry.domain: entry for entry in also or ()}
        for domain, entry in self._unsaved.items():
            # The front may hold a newer entry for the domain by now.
            batch[domain] = self.front.peek(domain) or batch.get(domain) or entry
        if batch:
            try:
                await self.store.put_many(list(batch.values()))
            except StoreUnavailable as e:
                log.debug("could not write back %d entries (%s)", len(batch), e)
                return
        if self._failing:
            log.info("cache %s: writes succeed again; %d entries learnt meanwhile written",
                     self.store.name, len(self._unsaved))
            self._failing = False
        self._unsaved.clear()

    async def delete(self, domain: str) -> None:
        """Forget ``domain`` here and in the store."""
        self._unsaved.pop(domain, None)
        await self.store.delete(domain)

    async def delete_all(self) -> None:
        """Forget everything here and in the store."""
        self._unsaved.clear()
        await self.store.delete_all()
