"""A policy store that lives in a dict: for ``backend = "memory"`` and as the model.

Nothing survives the process. The store contract suite (tests/store_contract.py)
checks every other backend against the behaviour written down here.
"""

from __future__ import annotations

from zope.interface import implementer

from postfix_mtasts.cache import CacheEntry, IPolicyStore, StoreUnavailable


@implementer(IPolicyStore)
class MemoryStore:
    """Entries keyed by domain in process memory; leases are always granted.

    ``close()`` keeps the entries, so a store closed and opened again still
    holds them, as a durable backend would.
    """

    name = "memory"
    shared = False

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise StoreUnavailable("memory store is not open")

    async def open(self) -> None:
        self._open = True

    async def load(self, limit: int) -> list[CacheEntry]:
        self._check_open()
        if limit <= 0:
            return []
        ordered = sorted(self._entries.values(), key=lambda e: (-e.last_used, e.domain))
        return ordered[:limit]

    async def get(self, domain: str) -> CacheEntry | None:
        self._check_open()
        return self._entries.get(domain)

    async def put(self, entry: CacheEntry) -> None:
        self._check_open()
        self._entries[entry.domain] = entry

    async def put_many(self, entries: list[CacheEntry]) -> None:
        self._check_open()
        for entry in entries:
            self._entries[entry.domain] = entry

    async def delete(self, domain: str) -> None:
        self._check_open()
        self._entries.pop(domain, None)

    async def delete_all(self) -> None:
        self._check_open()
        self._entries.clear()

    async def prune(self, now: float) -> int:
        self._check_open()
        stale = [d for d, e in self._entries.items() if not e.in_force(now)]
        for domain in stale:
            del self._entries[domain]
        return len(stale)

    async def count(self) -> int:
        self._check_open()
        return len(self._entries)

    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool:
        self._check_open()
        return True

    async def release_lease(self, domain: str, holder: str) -> None:
        self._check_open()

    async def close(self) -> None:
        self._open = False
