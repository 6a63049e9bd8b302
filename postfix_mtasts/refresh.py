"""When each cached policy is fetched again: a wheel of time slots.

RFC 8461 §3.3 asks senders to refresh a policy before it expires; the lookup
does it once a policy is ``min(refresh_after, max_age / 2)`` old, plus jitter
so that a fleet does not fetch in step, and never before a failed fetch's
back-off. Domains are kept in one list per slot of time (8 bytes a policy)
rather than a heap entry each; the memory front marks each domain with the
list it was queued in, so a superseded, evicted or flushed copy is skipped.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable

from twisted.internet.defer import DeferredSemaphore

from postfix_mtasts.background import BackgroundWork
from postfix_mtasts.cache import CacheEntry
from postfix_mtasts.cache.front import MemoryFront
from postfix_mtasts.config import PolicyConfig
from postfix_mtasts.stats import LookupStats

log = logging.getLogger("postfix_mtasts.lookup")

#: Refreshes are scheduled to this resolution (seconds; finer when the scan
#: interval is shorter): one list of domains per slot of time, 8 bytes per
#: policy, instead of a heap entry (a tuple and a float) and a dictionary
#: entry each, about 130 bytes.
REFRESH_SLOT = 60.0


class RefreshWheel:
    """The refresh schedule of the policies held in ``front``."""

    def __init__(self, front: MemoryFront, scan_interval: float, rng: random.Random) -> None:
        self.front = front
        self.slot = min(REFRESH_SLOT, scan_interval)
        self._rng = rng
        self._slots: dict[int, list[str]] = {}

    def __len__(self) -> int:
        """Domains queued (stale copies included)."""
        return sum(map(len, self._slots.values()))

    def schedule(self, entry: CacheEntry, previous: CacheEntry | None, policy: PolicyConfig) -> None:
        """Queue the refresh of ``entry``'s policy, just put in the front over ``previous``."""
        if entry.policy is None:
            return
        domain = entry.domain
        if (previous is not None and previous.fetched_at == entry.fetched_at
                and self.front.refresh_mark(domain) is not None):
            return  # the same policy, already queued
        # Never early: the slot is handled once its start has passed.
        number = math.ceil(self.due_at(entry, policy) / self.slot)
        queue = self._slots.get(number)
        if queue is None:
            queue = self._slots[number] = []
        queue.append(domain)
        self.front.set_refresh_mark(domain, queue)

    def due_at(self, entry: CacheEntry, policy: PolicyConfig) -> float:
        """When ``entry``'s policy is to be fetched again."""
        assert entry.policy is not None
        age_limit = min(policy.refresh_after, entry.policy.max_age / 2)
        jitter = self._rng.uniform(0, min(policy.refresh_jitter, age_limit / 4))
        # A refresh that failed is not tried again before its back-off.
        return max(entry.fetched_at + age_limit + jitter, entry.retry_at)

    def take_due(self, now: float) -> list[str]:
        """The domains due by ``now``, each once, taken off the wheel."""
        due: list[str] = []
        slots = self._slots
        for number in sorted(n for n in slots if n * self.slot <= now):
            queue = slots.pop(number)
            for domain in queue:
                if self.front.refresh_mark(domain) is not queue:
                    continue  # superseded, evicted, flushed, or met earlier in this queue
                self.front.set_refresh_mark(domain, None)
                due.append(domain)
        return due

    def clear(self) -> None:
        self._slots.clear()


class Refresher:
    """Fetches the policies the wheel says are due, at most
    ``refresh_concurrency`` at a time, skipping domains nobody uses any more."""

    def __init__(
        self,
        wheel: RefreshWheel,
        background: BackgroundWork,
        stats: LookupStats,
        *,
        policy: Callable[[], PolicyConfig],
        last_used: Callable[[CacheEntry], float],
        refresh: Callable[[str], Awaitable[object]],
    ) -> None:
        self.wheel = wheel
        self.background = background
        self.stats = stats
        self._policy = policy
        self._last_used = last_used
        self._refresh = refresh
        self._limit = DeferredSemaphore(max(1, policy().refresh_concurrency))
        self._running: set[str] = set()

    def run_due(self, now: float) -> None:
        """Start the refreshes due by ``now`` (RFC 8461 §3.3), in the background."""
        due: list[str] = []
        idle_limit = self._policy().refresh_idle_limit
        for domain in self.wheel.take_due(now):
            entry = self.wheel.front.peek(domain)
            if entry is None or domain in self._running:
                continue  # already running: it queues the next refresh when done
            last_used = self._last_used(entry)
            if now - last_used > idle_limit:
                log.info("%s: not refreshed, unused for %.0f days; the policy stays until it expires",
                         domain, (now - last_used) / 86400)
                continue
            due.append(domain)
        self.stats.refresh_queue = len(due)
        for domain in due:
            self._running.add(domain)
            self.background.spawn(self._one(domain))

    def _slots(self) -> DeferredSemaphore:
        """The semaphore bounding refreshes, renewed when a reload changed
        ``refresh_concurrency`` (refreshes holding the old one finish on it)."""
        wanted = max(1, self._policy().refresh_concurrency)
        if self._limit.limit != wanted:
            self._limit = DeferredSemaphore(wanted)
        return self._limit

    async def _one(self, domain: str) -> None:
        try:
            slots = self._slots()
            await slots.acquire()
            try:
                if not self.background.stopping:
                    await self._refresh(domain)
            except Exception:
                pass  # logged where the resolution failed
            finally:
                slots.release()
        finally:
            self._running.discard(domain)
            self.stats.refresh_queue = max(0, self.stats.refresh_queue - 1)
