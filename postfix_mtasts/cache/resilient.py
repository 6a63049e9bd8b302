"""A store wrapper that keeps the daemon answering while its store is down.

Every call to the wrapped store is bounded by ``op_timeout``. When the store
fails or hangs, reads answer "nothing stored" (the lookup then answers from
its in-memory front), writes wait in a bounded queue (newest per domain
wins), and a timer probes the store until it is back; the queue is then
written back in order. An outage costs one log line when it starts and one
when it ends, not one per lookup.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from postfix_mtasts.cache import CacheEntry, IPolicyStore, Source, StoreUnavailable
from postfix_mtasts.policy.freshness import merged

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Seconds between probes of a store that is down.
DEFAULT_RETRY_INTERVAL = 5.0
#: Writes kept while the store is down; past this the oldest are dropped.
MAX_PENDING_WRITES = 50_000
#: Entries written back per put_many call once the store is back.
FLUSH_BATCH = 500
#: Extra time load() may take per entry asked for, on top of op_timeout: warming
#: a full front (200,000 entries) from a shared store takes seconds.
LOAD_SECONDS_PER_ENTRY = 1e-4
#: A domain that is never stored: reading it tells whether the store answers.
PROBE_DOMAIN = "store-probe.postfix-mtasts.invalid"


@dataclass(frozen=True, slots=True, eq=False)
class _PendingWrite:
    """A write waiting for the store: ``entry`` to put, or None to delete ``domain``."""

    domain: str
    entry: CacheEntry | None


@implementer(IPolicyStore)
class ResilientStore:
    """Wraps any :class:`IPolicyStore` so that an outage never stalls a lookup."""

    def __init__(
        self,
        reactor: IReactorTime,
        inner: IPolicyStore,
        *,
        op_timeout: float,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        max_pending: int = MAX_PENDING_WRITES,
        open_timeout: float | None = None,
        backed_up_locally: bool = False,
    ) -> None:
        if op_timeout <= 0 or retry_interval <= 0 or max_pending < 1:
            raise ValueError("op_timeout and retry_interval must be positive, max_pending at least 1")
        self._reactor = reactor
        self.inner = inner
        self.name: str = inner.name
        self.shared: bool = inner.shared
        self.op_timeout = op_timeout
        self.retry_interval = retry_interval
        self.max_pending = max_pending
        self.open_timeout = op_timeout if open_timeout is None else open_timeout
        #: True when a local copy holds every write too (cache.layered), so a
        #: write still queued at shutdown is not lost: it is written again later.
        self.backed_up_locally = backed_up_locally
        #: Called once the store answers again after an outage (or a failed open).
        self.on_recovered: Callable[[], None] | None = None
        #: False from the first failure until the store answers and the queue is written.
        self.available = True
        #: Writes dropped because the queue was full, since the store went down.
        self.dropped_writes = 0
        self._opened = False
        self._closed = False
        self._pending: OrderedDict[str, _PendingWrite] = OrderedDict()
        self._delete_all_pending = False
        self._flushed_this_outage = 0
        self._retry_call: IDelayedCall | None = None
        self._recovering = False

    @property
    def pending_writes(self) -> int:
        """Writes waiting for the store to come back."""
        return len(self._pending) + (1 if self._delete_all_pending else 0)

    # --- plumbing -------------------------------------------------------------

    async def _call(
        self, what: str, make: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None
    ) -> T:
        """Await one inner call, cancelled after the timeout; a timeout is a StoreUnavailable."""
        bound = self.op_timeout if timeout is None else timeout
        d: Deferred[T] = Deferred.fromCoroutine(make())
        d.addTimeout(bound, self._reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise StoreUnavailable(f"{what} timed out after {bound:g}s") from None

    def _went_down(self, error: StoreUnavailable) -> None:
        if self.available:
            self.available = False
            self._flushed_this_outage = 0
            self.dropped_writes = 0
            log.warning(
                "%s store unavailable: %s; lookups continue from memory and writes are "
                "queued until it is back",
                self.name,
                error,
            )
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        if self._closed or self._recovering:
            return
        if self._retry_call is not None and self._retry_call.active():
            return
        self._retry_call = self._reactor.callLater(self.retry_interval, self._probe)

    def _probe(self) -> None:
        self._retry_call = None
        d = Deferred.fromCoroutine(self._recover())
        d.addErrback(lambda f: log.error("%s store: probe failed unexpectedly: %s", self.name, f.value))

    async def _recover(self) -> None:
        """Check the store answers, write the queue back, and say so once."""
        if self._closed or self.available or self._recovering:
            return
        self._recovering = True
        try:
            if not self._opened:
                await self._call("open", self.inner.open, self.open_timeout)
                self._opened = True
            else:
                await self._call("probe", lambda: self.inner.get(PROBE_DOMAIN))
            await self._flush()
        except BaseException as e:
            self._recovering = False
            self._schedule_probe()
            if isinstance(e, StoreUnavailable):
                log.debug("%s store still unavailable: %s", self.name, e)
                return
            raise
        self._recovering = False
        # close() may have run while the probe was awaited; mypy cannot know.
        if self._closed:
            return  # type: ignore[unreachable]
        self.available = True
        dropped = f", {self.dropped_writes} dropped while the queue was full" if self.dropped_writes else ""
        log.info(
            "%s store is back; flushed %d queued writes%s",
            self.name,
            self._flushed_this_outage,
            dropped,
        )
        if self.on_recovered is not None:
            self.on_recovered()

    async def _flush(self) -> None:
        """Write the queue back in order; stops (queue kept) at the first failure."""
        while self._delete_all_pending or self._pending:
            if self._delete_all_pending:
                await self._call("delete_all", self.inner.delete_all)
                self._delete_all_pending = False
                self._flushed_this_outage += 1
                continue
            batch: list[_PendingWrite] = []
            deleting = next(iter(self._pending.values())).entry is None
            for write in self._pending.values():
                if (write.entry is None) != deleting or len(batch) >= FLUSH_BATCH:
                    break
                batch.append(write)
            if deleting:
                for write in batch:
                    await self._call("delete", partial(self.inner.delete, write.domain))
                    self._settle(write)
            else:
                entries = await self._worth_writing([w.entry for w in batch if w.entry is not None])
                if entries:
                    await self._call("put_many", partial(self.inner.put_many, entries))
                for write in batch:
                    self._settle(write)

    async def _worth_writing(self, entries: list[CacheEntry]) -> list[CacheEntry]:
        """What to write of ``entries``, each merged with what the store holds
        by :func:`postfix_mtasts.policy.freshness.merged` (the no-downgrade rule).

        Such an entry was learnt while the store could not be read: it says
        nothing about a policy stored there (by another daemon, or before a
        restart), and RFC 8461 keeps a policy until its max_age runs out. An
        entry without a policy that is no longer in force is not written at all.
        """
        now = self._reactor.seconds()
        worth: list[CacheEntry] = []
        for entry in entries:
            if entry.source is not Source.FETCHED and not entry.in_force(now):
                continue
            stored = await self._call("get", partial(self.inner.get, entry.domain))
            best = merged(stored, entry, now)
            if best is not None and best != stored:
                worth.append(best)
        return worth

    def _settle(self, write: _PendingWrite) -> None:
        """Remove ``write`` from the queue unless a newer write replaced it meanwhile."""
        if self._pending.get(write.domain) is write:
            del self._pending[write.domain]
            self._flushed_this_outage += 1

    def _enqueue(self, domain: str, entry: CacheEntry | None) -> None:
        if self._pending.pop(domain, None) is None:
            while len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                if self.dropped_writes == 0:
                    log.warning(
                        "%s store: write queue full (%d); dropping the oldest queued writes",
                        self.name,
                        self.max_pending,
                    )
                self.dropped_writes += 1
        self._pending[domain] = _PendingWrite(domain, entry)

    def _queued_value(self, domain: str) -> CacheEntry | None:
        write = self._pending.get(domain)
        return None if write is None else write.entry

    # --- IPolicyStore ---------------------------------------------------------

    async def open(self) -> None:
        """Open the store; if it is down, carry on and keep trying in the background."""
        try:
            await self._call("open", self.inner.open, self.open_timeout)
        except StoreUnavailable as e:
            self._went_down(e)
            return
        self._opened = True

    async def load(self, limit: int) -> list[CacheEntry]:
        """Entries to warm the front with; none while the store is down."""
        if self.available:
            try:
                bound = self.op_timeout + max(0, limit) * LOAD_SECONDS_PER_ENTRY
                return await self._call("load", lambda: self.inner.load(limit), bound)
            except StoreUnavailable as e:
                self._went_down(e)
        return []

    async def get(self, domain: str) -> CacheEntry | None:
        """The stored entry; while down, only what is queued for ``domain``."""
        if self.available:
            try:
                return await self._call("get", lambda: self.inner.get(domain))
            except StoreUnavailable as e:
                self._went_down(e)
        return self._queued_value(domain)

    async def put(self, entry: CacheEntry) -> None:
        """Store ``entry`` now, or queue it while the store is down."""
        await self.put_many([entry])

    async def put_many(self, entries: list[CacheEntry]) -> None:
        """Store ``entries`` now, or queue them while the store is down."""
        if not entries:
            return
        if self.available:
            try:
                await self._call("put", lambda: self.inner.put_many(entries))
                return
            except StoreUnavailable as e:
                self._went_down(e)
        for entry in entries:
            self._enqueue(entry.domain, entry)

    async def delete(self, domain: str) -> None:
        """Forget ``domain`` now, or queue that while the store is down."""
        if self.available:
            try:
                await self._call("delete", lambda: self.inner.delete(domain))
                return
            except StoreUnavailable as e:
                self._went_down(e)
        self._enqueue(domain, None)

    async def delete_all(self) -> None:
        """Forget everything now, or once the store is back (queued writes are dropped)."""
        if self.available:
            try:
                await self._call("delete_all", self.inner.delete_all)
                return
            except StoreUnavailable as e:
                self._went_down(e)
        self._pending.clear()
        self._delete_all_pending = True

    async def prune(self, now: float) -> int:
        """Prune the store; 0 while it is down (the next prune catches up)."""
        if self.available:
            try:
                return await self._call("prune", lambda: self.inner.prune(now))
            except StoreUnavailable as e:
                self._went_down(e)
        return 0

    async def count(self) -> int:
        """Entries in the store; 0 while it is down."""
        if self.available:
            try:
                return await self._call("count", self.inner.count)
            except StoreUnavailable as e:
                self._went_down(e)
        return 0

    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool:
        """The store's answer; True while it is down, resolving locally rather than stalling."""
        if self.available:
            try:
                return await self._call(
                    "acquire_lease", lambda: self.inner.acquire_lease(domain, holder, ttl)
                )
            except StoreUnavailable as e:
                self._went_down(e)
        return True

    async def release_lease(self, domain: str, holder: str) -> None:
        """Release in the store; while it is down the lease simply expires there."""
        if self.available:
            try:
                await self._call("release_lease", lambda: self.inner.release_lease(domain, holder))
            except StoreUnavailable as e:
                self._went_down(e)

    async def close(self) -> None:
        """Stop probing, try one last flush within op_timeout, then close the store."""
        if self._closed:
            return
        self._closed = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self.pending_writes and self._opened:
            flush: Deferred[None] = Deferred.fromCoroutine(self._flush())
            flush.addTimeout(self.op_timeout, self._reactor)
            try:
                await flush
            except (StoreUnavailable, defer.TimeoutError) as e:
                log.debug("%s store: final flush failed: %s", self.name, e)
        if self.pending_writes and self.backed_up_locally:
            log.info(
                "%s store: %d queued writes are kept in the local copy and written to the "
                "store after the next start",
                self.name,
                self.pending_writes,
            )
        elif self.pending_writes:
            log.warning(
                "%s store: %d queued writes could not be written before shutdown",
                self.name,
                self.pending_writes,
            )
        try:
            await self._call("close", self.inner.close)
        except StoreUnavailable as e:
            log.debug("%s store: close failed: %s", self.name, e)
