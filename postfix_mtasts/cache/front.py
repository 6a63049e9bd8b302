"""The in-memory front of the cache: a bounded map so that a hit costs no I/O.

Each slot also remembers the answer already computed for each profile, so a
warm hit is a dictionary lookup and nothing more.

Eviction is the "second chance" (CLOCK) approximation of least recently
used: a hit only sets a flag on its slot, and when the front outgrows its
bound a sweep evicts, oldest first, the entries not used since the previous
sweep. An exact LRU would have to reorder a linked list on every hit, and an
``OrderedDict`` costs about 53 bytes more per entry than a plain ``dict``
(measured at 100,000 entries); the store still holds whatever is evicted.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from postfix_mtasts.cache import CacheEntry
from postfix_mtasts.policy.model import Answer

#: A sweep frees this share of the bound at once (at least one entry), so
#: that its O(n) walk happens once per ``max_entries // 16`` insertions.
SWEEP_SLACK = 16


class Slot:
    """One domain in memory: its entry, the answers made from it, and flags."""

    __slots__ = ("answers", "entry", "refresh_mark", "used")

    def __init__(self, entry: CacheEntry) -> None:
        self.entry = entry
        # Keyed by the profile's answer options (hashable; a bool in old callers).
        self.answers: dict[Hashable, Answer] | None = None
        # Set by every hit, cleared by every sweep.
        self.used = False
        # Whatever the lookup's refresh schedule uses to find this entry's
        # place in it (an object shared by many slots); None: not scheduled.
        self.refresh_mark: object | None = None


class MemoryFront:
    """At most ``max_entries`` entries; the ones unused the longest are evicted.

    Eviction only forgets the copy in memory; the store still has the entry.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._slots: dict[str, Slot] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, domain: str) -> bool:
        return domain in self._slots

    def get(self, domain: str) -> CacheEntry | None:
        """The entry for ``domain``, marking it used."""
        slot = self._slots.get(domain)
        if slot is None:
            return None
        slot.used = True
        return slot.entry

    def use(self, domain: str) -> Slot | None:
        """The slot of ``domain``, marked used: the warm-hit path's one call."""
        slot = self._slots.get(domain)
        if slot is not None:
            slot.used = True
        return slot

    def peek(self, domain: str) -> CacheEntry | None:
        """The entry for ``domain`` without marking it used."""
        slot = self._slots.get(domain)
        return None if slot is None else slot.entry

    def cached_answer(
        self, domain: str, enforce_testing: Hashable
    ) -> tuple[CacheEntry, Answer | None] | None:
        """The entry and its precomputed answer for a profile, if any; marks it used."""
        slot = self._slots.get(domain)
        if slot is None:
            return None
        slot.used = True
        answers = slot.answers
        return slot.entry, (None if answers is None else answers.get(enforce_testing))

    def remember_answer(self, domain: str, enforce_testing: Hashable, answer: Answer) -> None:
        slot = self._slots.get(domain)
        if slot is None:
            return
        if slot.answers is None:
            slot.answers = {}
        slot.answers[enforce_testing] = answer

    def refresh_mark(self, domain: str) -> object | None:
        """The refresh schedule's mark on ``domain`` (None when absent or unmarked)."""
        slot = self._slots.get(domain)
        return None if slot is None else slot.refresh_mark

    def set_refresh_mark(self, domain: str, mark: object | None) -> None:
        slot = self._slots.get(domain)
        if slot is not None:
            slot.refresh_mark = mark

    def put(self, entry: CacheEntry) -> None:
        """Insert or replace; a replaced entry counts as used and keeps its
        precomputed answers only while they still hold."""
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
            slot.used = True
            return
        if len(self._slots) >= self.max_entries:
            self._sweep()  # before inserting: a new entry is never the one evicted
        self._slots[domain] = Slot(entry)

    def _sweep(self) -> None:
        """Evict, oldest first, entries unused since the last sweep, until
        there is room for one more and the slack; the survivors' flags are cleared."""
        target = self.max_entries - 1 - self.max_entries // SWEEP_SLACK
        excess = len(self._slots) - target
        kept: dict[str, Slot] = {}
        for domain, slot in self._slots.items():
            if excess > 0 and not slot.used:
                excess -= 1
                continue
            slot.used = False
            kept[domain] = slot
        # Everything had been used since the last sweep: the oldest go.
        if excess > 0:
            for domain in list(kept)[:excess]:
                del kept[domain]
            excess = 0
        self.evictions += len(self._slots) - len(kept)
        self._slots = kept

    def delete(self, domain: str) -> None:
        self._slots.pop(domain, None)

    def clear(self) -> None:
        self._slots.clear()

    def entries(self) -> Iterator[CacheEntry]:
        """Every entry, oldest first (a snapshot, safe to mutate after)."""
        return iter([slot.entry for slot in self._slots.values()])
