"""The in-memory front of the cache: a bounded LRU so that a hit costs no I/O.

Each slot also remembers the answer already computed for each profile, so a
warm hit is a dictionary lookup and nothing more.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from postfix_mtasts.cache import CacheEntry
from postfix_mtasts.policy.model import Answer


class _Slot:
    __slots__ = ("answers", "entry")

    def __init__(self, entry: CacheEntry) -> None:
        self.entry = entry
        # Keyed by the profile's answer options (hashable; a bool in old callers).
        self.answers: dict[Hashable, Answer] | None = None


class MemoryFront:
    """At most ``max_entries`` entries, least recently used evicted first.

    Eviction only forgets the copy in memory; the store still has the entry.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, domain: str) -> bool:
        return domain in self._slots

    def get(self, domain: str) -> CacheEntry | None:
        """The entry for ``domain``, marking it most recently used."""
        slot = self._slots.get(domain)
        if slot is None:
            return None
        self._slots.move_to_end(domain)
        return slot.entry

    def peek(self, domain: str) -> CacheEntry | None:
        """The entry for ``domain`` without changing the LRU order."""
        slot = self._slots.get(domain)
        return None if slot is None else slot.entry

    def cached_answer(
        self, domain: str, enforce_testing: Hashable
    ) -> tuple[CacheEntry, Answer | None] | None:
        """The entry and its precomputed answer for a profile, if any."""
        slot = self._slots.get(domain)
        if slot is None:
            return None
        self._slots.move_to_end(domain)
        answers = slot.answers
        return slot.entry, (None if answers is None else answers.get(enforce_testing))

    def remember_answer(self, domain: str, enforce_testing: Hashable, answer: Answer) -> None:
        slot = self._slots.get(domain)
        if slot is None:
            return
        if slot.answers is None:
            slot.answers = {}
        slot.answers[enforce_testing] = answer

    def put(self, entry: CacheEntry) -> None:
        """Insert or replace; a replaced entry loses its precomputed answers."""
        domain = entry.domain
        slot = self._slots.get(domain)
        if slot is not None:
            old = slot.entry
            # An answer is made of the source, the policy (and its text, for
            # TLSRPT) and (for a FAILED entry) the failure and its category;
            # any change to these makes it stale.
            if (old.policy is not entry.policy or old.source is not entry.source
                    or old.failure != entry.failure or old.policy_text != entry.policy_text
                    or old.failure_category != entry.failure_category):
                slot.answers = None
            slot.entry = entry
            self._slots.move_to_end(domain)
            return
        self._slots[domain] = _Slot(entry)
        while len(self._slots) > self.max_entries:
            self._slots.popitem(last=False)
            self.evictions += 1

    def delete(self, domain: str) -> None:
        self._slots.pop(domain, None)

    def clear(self) -> None:
        self._slots.clear()

    def entries(self) -> Iterator[CacheEntry]:
        """Every entry, least recently used first (a snapshot, safe to mutate after)."""
        return iter([slot.entry for slot in self._slots.values()])
