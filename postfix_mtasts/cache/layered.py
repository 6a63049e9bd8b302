"""A shared store (Redis, PostgreSQL) above a local durable copy (SQLite).

A fleet shares what it learns through the shared store, but each daemon also
keeps everything it has seen in a local SQLite file of its own. Start-up reads
the local copy first, so a policy this host has seen is enforced until its
``max_age`` whatever the shared store does: slow, down at start, down for
hours, emptied, or replaced by a new server (RFC 8461 §10.2: no downgrade).

Reads take the stronger of the two copies; writes go to both, each merged
with what that copy holds by :func:`postfix_mtasts.policy.freshness.merged`,
so that no write, in whatever order it arrives, replaces a policy in force
with something weaker. Whatever the shared store missed (a write queued when
the daemon stopped, a store emptied or replaced) is written to it again from
the local copy after the next start, or when it comes back.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from postfix_mtasts.cache import CacheEntry, IPolicyStore, StoreUnavailable
from postfix_mtasts.cache.resilient import ResilientStore
from postfix_mtasts.policy.freshness import merged

log = logging.getLogger(__name__)

#: Entries the reconciliation reads from each copy at the most.
RECONCILE_LIMIT = 1_000_000
#: Entries written per put_many while the copies are reconciled.
RECONCILE_BATCH = 500


@implementer(IPolicyStore)
class LayeredStore:
    """What one daemon of a fleet stores: ``local`` (durable, its own) under
    ``shared`` (the fleet's, wrapped to survive outages)."""

    shared = True

    def __init__(self, reactor: IReactorTime, local: IPolicyStore, shared: ResilientStore) -> None:
        self._reactor = reactor
        self.local = local
        self.remote = shared
        self.name: str = shared.name
        # One merge-then-write at a time per copy: a write merged against
        # what a copy held must not race another write of this daemon.
        self._local_lock = DeferredLock()
        self._remote_lock = DeferredLock()
        self._reconciling: Deferred[None] | None = None
        self._reconcile_again = False
        self._closed = False
        #: Entries the last reconciliations wrote to each copy, for logs and tests.
        self.reconciled_to_shared = 0
        self.reconciled_to_local = 0

    @property
    def available(self) -> bool:
        """True while the shared store answers."""
        return self.remote.available

    def _shared_up(self) -> bool:
        # A method, not the attribute: every await may change the answer.
        return self.remote.available

    # --- life cycle -------------------------------------------------------------

    async def open(self) -> None:
        """Open the local copy (a failure stops start-up), then the shared store
        (down or slow: one log line, and the daemon serves from the local copy)."""
        await self.local.open()
        self.remote.on_recovered = self._shared_came_back
        await self.remote.open()

    async def close(self) -> None:
        """Stop reconciling, close the shared store, then the local copy."""
        self._closed = True
        reconciling = self._reconciling
        if reconciling is not None:
            reconciling.cancel()
        try:
            await self.remote.close()
        finally:
            await self.local.close()

    # --- reads ------------------------------------------------------------------

    async def load(self, limit: int) -> list[CacheEntry]:
        """Both copies merged, most recently used first; the local copy is read
        even when the shared store is down. Starts a reconciliation of the two."""
        now = self._reactor.seconds()
        local = await self.local.load(limit)
        shared = await self.remote.load(limit) if self.remote.available else []
        combined = {entry.domain: entry for entry in shared}
        for entry in local:
            best = merged(combined.get(entry.domain), entry, now)
            if best is not None:
                combined[entry.domain] = best
        if self.remote.available:
            # What was just read is all there is when neither copy filled the
            # limit: the reconciliation need not read both copies again.
            complete = len(local) < limit and len(shared) < limit
            self._start_reconcile((local, shared) if complete else None)
        result = sorted(combined.values(), key=lambda entry: entry.last_used, reverse=True)
        return result[:limit]

    async def get(self, domain: str) -> CacheEntry | None:
        """The stronger of the two copies; what only the shared store knew is
        kept in the local copy too."""
        now = self._reactor.seconds()
        try:
            local = await self.local.get(domain)
        except StoreUnavailable as e:
            log.debug("%s: local copy unavailable for read (%s)", domain, e)
            local = None
        shared = await self.remote.get(domain)
        best = merged(local, shared, now)
        if best is not None and best != local:
            try:
                await self._put_local([best])
            except StoreUnavailable as e:
                log.debug("%s: could not keep the shared entry locally (%s)", domain, e)
        return best

    async def count(self) -> int:
        """Entries in the shared store, or in the local copy while it is down."""
        if self.remote.available:
            return await self.remote.count()
        return await self.local.count()

    # --- writes -----------------------------------------------------------------

    async def put(self, entry: CacheEntry) -> None:
        """Merge ``entry`` into the local copy (durable once this returns; a
        failure raises StoreUnavailable), then into the shared store."""
        await self.put_many([entry])

    async def put_many(self, entries: list[CacheEntry]) -> None:
        """Merge ``entries`` into the local copy (one transaction), then into
        the shared store (one batch)."""
        await self._put_local(entries)
        await self._put_shared(entries)

    async def _put_local(self, entries: list[CacheEntry]) -> None:
        await self._local_lock.acquire()
        try:
            changed = []
            for entry in entries:
                current = await self.local.get(entry.domain)
                best = merged(current, entry, self._reactor.seconds())
                if best is not None and best != current:
                    changed.append(best)
            if changed:
                await self.local.put_many(changed)
        finally:
            self._local_lock.release()

    async def _put_shared(self, entries: list[CacheEntry]) -> None:
        """Merge into the shared store; while it is down the writes are queued
        there (and the local copy has them anyway)."""
        await self._remote_lock.acquire()
        try:
            changed = []
            for entry in entries:
                if self._shared_up():
                    current = await self.remote.get(entry.domain)
                    if not self._shared_up():
                        current = None  # went down just now: queue the entry as it is
                    best = merged(current, entry, self._reactor.seconds())
                    if best is None or best == current:
                        continue
                    entry = best
                changed.append(entry)
            if changed:
                await self.remote.put_many(changed)
        finally:
            self._remote_lock.release()

    async def delete(self, domain: str) -> None:
        await self.local.delete(domain)
        await self.remote.delete(domain)

    async def delete_all(self) -> None:
        await self.local.delete_all()
        await self.remote.delete_all()

    async def prune(self, now: float) -> int:
        pruned = await self.local.prune(now)
        return max(pruned, await self.remote.prune(now))

    # --- the fleet's leases live in the shared store ------------------------------

    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool:
        return await self.remote.acquire_lease(domain, holder, ttl)

    async def release_lease(self, domain: str, holder: str) -> None:
        await self.remote.release_lease(domain, holder)

    # --- reconciliation -------------------------------------------------------------

    def _shared_came_back(self) -> None:
        """The shared store answers again: it may have missed what was learnt
        (or lost what it had) meanwhile."""
        self._start_reconcile()

    def _start_reconcile(self, read: tuple[list[CacheEntry], list[CacheEntry]] | None = None) -> None:
        if self._closed:
            return
        if self._reconciling is not None:
            self._reconcile_again = True
            return
        d = Deferred.fromCoroutine(self._reconcile(read))
        self._reconciling = d

        def done(result: Any) -> None:
            self._reconciling = None
            if self._reconcile_again and not self._closed:
                self._reconcile_again = False
                self._start_reconcile()
            if isinstance(result, Failure) and not isinstance(result.value, CancelledError):
                log.error("%s store: reconciling with the local copy failed: %s",
                          self.name, result.getErrorMessage())

        d.addBoth(done)

    async def _reconcile(self, read: tuple[list[CacheEntry], list[CacheEntry]] | None) -> None:
        """Write to each copy what only the other one knows, entry by entry
        through the merge, so that neither loses a policy in force. ``read``:
        both copies whole, as load() just read them; else they are read here."""
        now = self._reactor.seconds()
        if read is None:
            local_entries = await self.local.load(RECONCILE_LIMIT)
            if not self._shared_up():
                return
            shared_entries = await self.remote.load(RECONCILE_LIMIT)
            if not self._shared_up():
                return
        else:
            local_entries, shared_entries = read
        local = {entry.domain: entry for entry in local_entries}
        shared = {entry.domain: entry for entry in shared_entries}
        to_shared = [entry for domain, entry in local.items()
                     if entry.in_force(now) and merged(shared.get(domain), entry, now) != shared.get(domain)]
        to_local = [entry for domain, entry in shared.items()
                    if entry.in_force(now) and merged(local.get(domain), entry, now) != local.get(domain)]
        for start in range(0, len(to_local), RECONCILE_BATCH):
            await self._put_local(to_local[start:start + RECONCILE_BATCH])
        written = 0
        for start in range(0, len(to_shared), RECONCILE_BATCH):
            if not self._shared_up():
                break
            batch = to_shared[start:start + RECONCILE_BATCH]
            await self._put_shared(batch)
            written += len(batch)
        self.reconciled_to_local += len(to_local)
        self.reconciled_to_shared += written
        if written or to_local:
            log.info("%s store: %d entries written from the local copy, %d kept locally from the store",
                     self.name, written, len(to_local))
