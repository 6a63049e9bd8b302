"""Cache → fresh? → resolve: the RFC 8461 rules that decide every answer.

A lookup answers from the in-memory front when it can (no I/O at all), falls
back to the store, and only then asks DNS and HTTPS. A policy once fetched
stays in force until its max_age runs out, whatever DNS or HTTPS say
meanwhile; only a newly fetched, valid policy replaces it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from postfix_mtasts import limits
from postfix_mtasts.cache import CacheEntry, IPolicyStore, Source, StoreUnavailable
from postfix_mtasts.cache.front import MemoryFront
from postfix_mtasts.config import Config, PolicyConfig
from postfix_mtasts.errors import is_cancellation, log_failure
from postfix_mtasts.policy.answer import policy_answer
from postfix_mtasts.policy.freshness import FreshnessRules, Keep, after_fetch, after_fleet, after_txt
from postfix_mtasts.policy.model import Answer, AnswerKind
from postfix_mtasts.policy.tlsrpt import AnswerOptions, policy_failure_answer, with_sts_attributes
from postfix_mtasts.resolver import (
    FetchOK,
    PolicyFetcher,
    TxtFound,
    TxtResolver,
)
from postfix_mtasts.resolver.dane import DaneCache, dane_precedence
from postfix_mtasts.stats import LookupStats
from postfix_mtasts.sysmem import loading_long_lived, release_free_memory

log = logging.getLogger("postfix_mtasts.lookup")
#: Source.FETCHED, read once: an enum member looked up on its class costs a
#: metaclass call, and the warm-hit path compares with it on every hit.
_FETCHED = Source.FETCHED

#: Traces of the last resolution kept for ``ctl show``.
TRACES_KEPT = 1000
#: How often expired entries are pruned from the store.
PRUNE_INTERVAL = 3600.0
#: How often last-used times are written back to the store.
TOUCH_FLUSH_INTERVAL = 600.0
#: A fleet lease outlives the fetch it covers by this much (seconds).
LEASE_MARGIN = 5.0
#: How long a daemon waits for another fleet member that holds the lease.
LEASE_WAIT = 10.0
LEASE_POLL = 0.25
#: Entries put into memory between two pauses of a background warm-up.
WARM_UP_BATCH = 5000
#: Refreshes are scheduled to this resolution (seconds; finer when the scan
#: interval is shorter): one list of domains per slot of time, 8 bytes per
#: policy, instead of a heap entry (a tuple and a float) and a dictionary
#: entry each, about 130 bytes.
REFRESH_SLOT = 60.0


@dataclass(frozen=True, slots=True)
class LookupSettings:
    """What the lookup obeys: the ``[policy]`` section as the configuration
    parsed it, and the few values it takes from other sections."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    memory_entries: int = limits.MEMORY_ENTRIES
    #: How long a fleet lease lasts: a fetch's bound plus LEASE_MARGIN.
    lease_ttl: float = limits.FETCH_TIMEOUT + LEASE_MARGIN
    refresh_scan_interval: float = limits.REFRESH_SCAN_INTERVAL

    @classmethod
    def from_config(cls, config: Config) -> LookupSettings:
        return cls(
            policy=config.policy,
            memory_entries=config.cache.memory_entries,
            lease_ttl=config.resolver.fetch_timeout + LEASE_MARGIN,
        )


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of one discovery: the entry now in force and why."""

    entry: CacheEntry
    why: str
    trace: tuple[str, ...] = ()


def entry_answer(entry: CacheEntry, options: bool | AnswerOptions) -> Answer:
    """What Postfix is told while ``entry`` is in force, shaped by a profile's
    options (a bool is ``enforce_testing`` alone)."""
    wanted = AnswerOptions.of(options)
    if entry.source is Source.FETCHED and entry.policy is not None:
        answer = policy_answer(entry.policy, wanted.enforce_testing)
        if wanted.tlsrpt:
            answer, omitted = with_sts_attributes(answer, entry.domain, entry.policy, entry.policy_text)
            if omitted:
                log.info("%s: left out of the TLSRPT attributes: %s", entry.domain, "; ".join(omitted))
        return answer
    if entry.source is Source.NEGATIVE:
        return Answer.notfound("no MTA-STS policy published")
    if wanted.policy_failure and entry.failure_category:
        failed = policy_failure_answer(entry.domain, entry.failure_category)
        if failed is not None:
            return failed
    return Answer.notfound(f"no usable policy: {entry.failure}")


def _describe(answer: Answer) -> str:
    if answer.kind is AnswerKind.OK:
        return answer.data
    if answer.kind is AnswerKind.NOTFOUND:
        return "not found"
    return f"{answer.kind.value} {answer.data}"


class PolicyLookup:
    """Answers "what TLS policy for this domain?" by RFC 8461's rules.

    The reactor is injected (a ``task.Clock`` in tests); so are the DNS
    resolver, the HTTPS fetcher and the store.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        txt_resolver: TxtResolver,
        fetcher: PolicyFetcher,
        store: Any,
        settings: LookupSettings = LookupSettings(),
        *,
        rng: random.Random | None = None,
        holder: str | None = None,
        stats: LookupStats | None = None,
        dane: DaneCache | None = None,
        freeze_loaded: bool = False,
    ) -> None:
        self.reactor = reactor
        #: The daemon's own heap: the load at start holds full garbage
        #: collections off and freezes what it loaded (sysmem.loading_long_lived).
        self.freeze_loaded = freeze_loaded
        #: DANE results for profiles with ``dane``; None: DANE is not checked.
        self.dane = dane
        self.txt_resolver = txt_resolver
        self.fetcher = fetcher
        self.store: IPolicyStore = store
        self.settings = settings
        self.front = MemoryFront(settings.memory_entries)
        self.stats = stats if stats is not None else LookupStats(reactor)
        self.holder = holder or uuid.uuid4().hex
        self._rng = rng or random.Random()
        self._inflight: dict[str, Deferred[Resolution]] = {}
        # When each resolution in flight began: a deadline runs from there,
        # so lookups joining a late resolution do not each wait it out again.
        self._inflight_since: dict[str, float] = {}
        # Domains whose check in flight has already been logged as slow.
        self._slow_checks_noted: set[str] = set()
        # Domains flushed while a resolution of them was in flight.
        self._flushed_in_flight: set[str] = set()
        self._traces: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        # Refresh schedule: slot number → domains due in it. A domain's front
        # slot is marked with the list it was queued in, so that stale copies
        # (superseded, evicted, flushed) are skipped and a recheck that keeps
        # the policy does not queue it again.
        self._refresh_wheel: dict[int, list[str]] = {}
        self._refresh_slot = min(REFRESH_SLOT, settings.refresh_scan_interval)
        self._refresh_limit = DeferredSemaphore(max(1, settings.policy.refresh_concurrency))
        self._refreshing: set[str] = set()
        self._touched: dict[str, float] = {}
        self._calls: list[IDelayedCall] = []
        self._background: set[Deferred[Any]] = set()
        self._stopping = False
        self._store_failing = False
        # Entries a failing store could not take, written when it works again.
        self._unsaved: dict[str, CacheEntry] = {}
        # The background warm-up, while it runs (start(warm_in_background=True)).
        self._warming: Deferred[Any] | None = None
        # Domains whose fleet lease this daemon holds, until their result is stored.
        self._leases_held: set[str] = set()

    # --- life cycle --------------------------------------------------------

    async def start(self, *, warm_in_background: bool = False) -> int:
        """Start background work and warm the front from the store.

        Returns how many entries were loaded. With ``warm_in_background`` the
        daemon can listen at once: until the front is warm, a lookup that
        misses it reads the store, which is just as correct, only slower.
        """
        self._schedule(self.settings.refresh_scan_interval, self._refresh_due)
        self._schedule(PRUNE_INTERVAL, self._prune)
        self._schedule(TOUCH_FLUSH_INTERVAL, self._flush_touched)
        if warm_in_background:
            self._warming = self._spawn(self._warm_up(pause_every=WARM_UP_BATCH))
            return 0
        return await self._warm_up()

    async def warmed(self) -> None:
        """Wait until a background warm-up started by :meth:`start` is done."""
        warming = self._warming
        if warming is not None and not warming.called:
            await _quiet(warming)

    async def _warm_up(self, pause_every: int | None = None) -> int:
        """Fill the front from the store; with ``pause_every``, let the reactor
        serve lookups between batches instead of blocking it for the whole load."""
        with loading_long_lived() if self.freeze_loaded else contextlib.nullcontext():
            return await self._load_front(pause_every)

    async def _load_front(self, pause_every: int | None) -> int:
        started = self.reactor.seconds()
        try:
            entries = await self.store.load(self.settings.memory_entries)
        except StoreUnavailable as e:
            # Same rule as for every other store fault: answer from memory and
            # fresh resolutions meanwhile, rather than refuse to serve.
            log.warning("store unavailable at start (%s); starting with an empty cache", e)
            entries = []
        now = self.reactor.seconds()
        loaded = 0
        # Most recently used last, so it ends up most recent in the LRU. An
        # entry a lookup already put in memory meanwhile is newer: keep it.
        for count, entry in enumerate(reversed(entries), 1):
            if entry.in_force(now) and entry.domain not in self.front:
                self._remember(entry)
                loaded += 1
            if pause_every and count % pause_every == 0:
                await _sleep(self.reactor, 0)
        release_free_memory()  # what parsing the stored entries left behind
        log.info("cache %s: %d entries loaded into memory in %.2fs",
                 self.store.name, loaded, self.reactor.seconds() - started)
        return loaded

    async def stop(self) -> None:
        """Stop background work, let resolutions in flight finish, write back."""
        self._stopping = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        pending = list(self._background) + list(self._inflight.values())
        for d in pending:
            try:
                await _quiet(d)
            except Exception:  # already logged where it failed
                pass
        await self._flush_touched_now()

    def _schedule(self, interval: float, job: Callable[[], Any]) -> None:
        if self._stopping:
            return

        def run() -> None:
            self._calls[:] = [c for c in self._calls if c.active()]
            self._spawn(job())
            self._schedule(interval, job)

        self._calls.append(self.reactor.callLater(interval, run))

    def _spawn(self, coro: Any) -> Deferred[Any]:
        """Run a coroutine in the background, keeping a handle for stop()."""
        d: Deferred[Any] = Deferred.fromCoroutine(coro)
        self._background.add(d)

        def done(result: Any) -> None:
            self._background.discard(d)
            if isinstance(result, Failure) and not is_cancellation(result):
                log_failure(log, "background task failed", result)
            return None

        d.addBoth(done)
        return d

    # --- answering ----------------------------------------------------------

    def answer_now(self, domain: str, enforce_testing: bool | AnswerOptions) -> Answer | None:
        """The answer from memory if it needs no I/O at all, else None.

        The warm-hit path: every lookup Postfix makes for a cached domain
        runs this, so the rules of ``in_force`` and ``_recheck_due`` are
        spelled out here rather than called.
        """
        wanted = enforce_testing
        if type(wanted) is not AnswerOptions:
            wanted = AnswerOptions.of(wanted)
        slot = self.front.use(domain)
        if slot is None:
            return None
        entry = slot.entry
        now = self.reactor.seconds()
        if now >= entry.expires_at or (entry.source is _FETCHED
                                       and now - entry.checked_at >= self.settings.policy.recheck_interval):
            return None
        answers = slot.answers
        answer = None if answers is None else answers.get(wanted.code)
        if answer is None:
            answer = entry_answer(entry, wanted)
            self.front.remember_answer(domain, wanted.code, answer)
        if wanted.dane and self.dane is not None and answer.kind is AnswerKind.OK:
            dane = self.dane.cached(domain)
            if dane is None:
                return None
            answer = dane_precedence(answer, dane)
        self._touched[domain] = now
        self.stats.count_hit(answer)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s (cached %s)", domain, _describe(answer), entry.source.value)
        return answer

    async def lookup(self, domain: str, enforce_testing: bool | AnswerOptions = False) -> Answer:
        """The answer for ``domain`` (an A-label), resolving when needed.

        ``enforce_testing`` is the profile's :class:`AnswerOptions` (a bool:
        that switch alone).
        """
        fast = self.answer_now(domain, enforce_testing)
        if fast is not None:
            return fast
        started = self.reactor.seconds()
        answer = await self._lookup_slow(domain, enforce_testing)
        answer = await self._dane_first(domain, enforce_testing, answer)
        self.stats.count_lookup(answer, self.reactor.seconds() - started)
        return answer

    def _entry_answer(self, entry: CacheEntry, options: bool | AnswerOptions) -> Answer:
        """:func:`entry_answer`, kept in the front when ``entry`` is the one
        there, so the work (and any log line) happens once per entry and profile."""
        wanted = AnswerOptions.of(options)
        hit = self.front.cached_answer(entry.domain, wanted.code)
        if hit is not None and hit[0] is entry and hit[1] is not None:
            return hit[1]
        answer = entry_answer(entry, wanted)
        if hit is not None and hit[0] is entry:
            self.front.remember_answer(entry.domain, wanted.code, answer)
        return answer

    async def _dane_first(self, domain: str, options: bool | AnswerOptions, answer: Answer) -> Answer:
        """DANE precedence (RFC 8461 §2) for a profile with ``dane``; only an
        MTA-STS answer is checked, so domains without one cost no DNS."""
        if self.dane is None or answer.kind is not AnswerKind.OK or not AnswerOptions.of(options).dane:
            return answer
        return dane_precedence(answer, await self.dane.get(domain))

    async def _lookup_slow(self, domain: str, enforce_testing: bool | AnswerOptions) -> Answer:
        now = self.reactor.seconds()
        entry = self.front.get(domain)
        stored: CacheEntry | None = None
        if entry is None or not entry.in_force(now):
            stored = await self._store_get(domain)
            # A resolution may have put a newer entry in memory meanwhile.
            newer = self.front.peek(domain)
            if newer is not None and newer is not entry and newer.in_force(now):
                entry = newer
            elif stored is not None and stored.in_force(now):
                entry = stored
                self._remember(stored)
                self.stats.store_hits += 1
        if entry is not None and entry.in_force(now):
            self._touched[domain] = now
            if self._recheck_due(entry, now):
                shared = self._resolve_shared(domain)
                left = self._time_left(domain, self.settings.policy.recheck_deadline)
                try:
                    resolution = await self._wait(shared, left)
                    entry = resolution.entry
                except TimeoutError:
                    if domain not in self._slow_checks_noted:  # one line per slow check
                        self._slow_checks_noted.add(domain)
                        log.info("%s: TXT check still running after %.1fs; answering from the cache",
                                 domain, self.settings.policy.recheck_deadline)
                except Exception:
                    pass  # logged in _resolve_shared; the cached entry stands
            return self._entry_answer(entry, enforce_testing)
        self.stats.misses += 1
        # The store was read just above: the resolution starts from what it said.
        shared = self._resolve_shared(domain, stored=stored, store_read=True)
        left = self._time_left(domain, self.settings.policy.first_lookup_deadline)
        try:
            resolution = await self._wait(shared, left)
        except TimeoutError:
            why = f"discovery still running after {self.settings.policy.first_lookup_deadline:g}s"
            if self.settings.policy.on_first_lookup_timeout == "temp":
                log.info("%s: TEMP (%s; will answer from the result when it lands)", domain, why)
                return Answer.temp(f"MTA-STS discovery for {domain} in progress")
            log.info("%s: not found (%s; RFC 8461 treats this as no policy)", domain, why)
            return Answer.notfound(why)
        except Exception as e:
            return Answer.temp(f"internal error resolving {domain}: {e}")
        entry = resolution.entry
        self._touched[domain] = self.reactor.seconds()
        return self._entry_answer(entry, enforce_testing)

    def _recheck_due(self, entry: CacheEntry, now: float) -> bool:
        return (
            entry.source is Source.FETCHED
            and now - entry.checked_at >= self.settings.policy.recheck_interval
        )

    def _time_left(self, domain: str, deadline: float) -> float:
        """What remains of ``deadline`` for the resolution of ``domain`` in flight."""
        since = self._inflight_since.get(domain)
        if since is None:
            return deadline
        return deadline - (self.reactor.seconds() - since)

    async def _wait(self, shared: Deferred[Any], deadline: float | None) -> Resolution:
        """Wait for a shared resolution without letting a timeout cancel it for others."""
        if deadline is not None and deadline <= 0 and not shared.called:
            raise TimeoutError()
        waiter: Deferred[Resolution] = Deferred()

        def relay(result: Any) -> Any:
            if not waiter.called:
                if isinstance(result, _FailedValue):
                    waiter.errback(result.failure)
                else:
                    waiter.callback(result)
            return result

        shared.addBoth(relay)
        if deadline is not None:
            waiter.addTimeout(deadline, self.reactor)
        return await waiter

    # --- resolution -----------------------------------------------------------

    async def refresh(self, domain: str) -> Resolution:
        """Resolve ``domain`` now, fetching the policy even if the id is known."""
        return await self._wait(self._resolve_shared(domain, force_fetch=True), None)

    def _resolve_shared(
        self,
        domain: str,
        force_fetch: bool = False,
        *,
        stored: CacheEntry | None = None,
        store_read: bool = False,
    ) -> Deferred[Any]:
        """One resolution per domain at a time; every caller shares its result.

        A caller that has just read the store (``store_read``) passes what it
        found (``stored``), so that a new resolution does not read it again.

        The returned Deferred never fails: an unexpected error arrives as a
        :class:`Failure` *value*, which :meth:`_wait` turns back into an
        exception for each waiter, so nothing is left unhandled.
        """
        d = self._inflight.get(domain)
        if d is not None:
            return d
        since = self.reactor.seconds()
        d = Deferred.fromCoroutine(self._resolve_and_keep(domain, force_fetch, stored, store_read))

        def done(result: Any) -> Any:
            self._inflight.pop(domain, None)
            self._inflight_since.pop(domain, None)
            self._slow_checks_noted.discard(domain)
            self._flushed_in_flight.discard(domain)
            if isinstance(result, Failure):
                if not is_cancellation(result):
                    log_failure(log, f"{domain}: resolution failed unexpectedly", result)
                return _FailedValue(result)
            return result

        d.addBoth(done)
        if not d.called:
            self._inflight[domain] = d
            self._inflight_since[domain] = since
        return d

    async def _resolve_and_keep(
        self, domain: str, force_fetch: bool, stored: CacheEntry | None = None, store_read: bool = False
    ) -> Resolution:
        previous = self.front.peek(domain)
        if previous is None:
            previous = stored if store_read else await self._store_get(domain)
        try:
            return await self._resolve_and_store(domain, previous, force_fetch)
        finally:
            # Released only once the result is in the store: a fleet member
            # that takes the lease next finds it there and does not fetch again.
            if domain in self._leases_held:
                await self._release_lease(domain)

    async def _resolve_and_store(
        self, domain: str, previous: CacheEntry | None, force_fetch: bool
    ) -> Resolution:
        resolution = await self._resolve(domain, previous, force_fetch)
        entry = resolution.entry
        if domain in self._flushed_in_flight:
            # ctl flush forgot this domain while we were resolving it: what we
            # learnt may rest on the forgotten entry, so it answers the lookups
            # already waiting and is not kept.
            self._flushed_in_flight.discard(domain)
            self._trace(domain, resolution)
            log.info("%s: flushed while resolving; the result (%s) is not kept", domain, resolution.why)
            return resolution
        changed = previous is None or _durable_fields(previous) != _durable_fields(entry)
        if changed:
            # Durable before it is used: a new or replaced policy is written
            # first, then answered from.
            await self._store_put(entry)
        self._remember(entry)
        self._trace(domain, resolution)
        answer = entry_answer(entry, False)
        level = logging.INFO if changed or entry.source is not Source.FETCHED else logging.DEBUG
        log.log(level, "%s: %s (%s)", domain, _describe(answer), resolution.why)
        return resolution

    async def _resolve(self, domain: str, previous: CacheEntry | None, force_fetch: bool) -> Resolution:
        """Ask DNS, the fleet and HTTPS what policy.freshness needs, in that order."""
        settings = self.settings
        rules = FreshnessRules(settings.policy.negative_ttl_min, settings.policy.negative_ttl_max,
                               settings.policy.fetch_retry_backoff)
        trace: list[str] = []
        txt = await self.txt_resolver.lookup_sts(domain)
        now = self.reactor.seconds()
        self.stats.dns_queries += 1
        if isinstance(txt, TxtFound):
            trace.append(f"TXT _mta-sts.{domain}: {txt.record!r} (id {txt.policy_id}, ttl {txt.ttl})")
        else:
            trace.append(f"TXT _mta-sts.{domain}: {txt.reason}")
        step = after_txt(domain, previous, txt, now, rules, force_fetch=force_fetch)
        if isinstance(step, Keep):
            return Resolution(step.entry, step.why, tuple(trace))
        adopted = await self._await_fleet(domain, previous, now, step.policy_id)
        if adopted is not None:
            kept = after_fleet(step, adopted, now)
            return Resolution(kept.entry, kept.why, tuple(trace))
        self.stats.fetches += 1
        result = await self.fetcher.fetch(domain)
        trace.extend(result.trace)
        if not isinstance(result, FetchOK):
            self.stats.count_failure(result.category)
        kept = after_fetch(domain, previous, step, result, self.reactor.seconds(), rules)
        return Resolution(kept.entry, kept.why, tuple(trace))

    async def _await_fleet(
        self, domain: str, previous: CacheEntry | None, since: float, policy_id: str
    ) -> CacheEntry | None:
        """Take the fleet's lease for ``domain``, or wait for the holder's result.

        A local store has no fleet: nothing to take, nobody to wait for, and
        no other daemon's result to read back.
        """
        if not self.store.shared:
            return None
        try:
            if await self.store.acquire_lease(domain, self.holder, self.settings.lease_ttl):
                self._leases_held.add(domain)
                # Another daemon may have fetched, stored and released since
                # ``previous`` was read: take its result rather than fetch again.
                fetched = await self._store_get(domain)
                known = previous.fetched_at if previous is not None else 0.0
                if (fetched is not None and fetched.source is Source.FETCHED
                        and fetched.policy_id == policy_id and fetched.fetched_at > known
                        and fetched.in_force(self.reactor.seconds())):
                    await self._release_lease(domain)
                    return fetched
                return None
        except StoreUnavailable:
            return None
        waited = 0.0
        while waited < LEASE_WAIT:
            await _sleep(self.reactor, LEASE_POLL)
            waited += LEASE_POLL
            stored = await self._store_get(domain)
            if stored is not None and stored.checked_at >= since and stored != previous:
                return stored
        log.info("%s: fleet lease holder gave no result within %gs; fetching here", domain, LEASE_WAIT)
        return None

    async def _release_lease(self, domain: str) -> None:
        self._leases_held.discard(domain)
        if not self.store.shared:
            return
        try:
            await self.store.release_lease(domain, self.holder)
        except StoreUnavailable:
            pass

    # --- memory and store ---------------------------------------------------

    def _remember(self, entry: CacheEntry) -> None:
        domain = entry.domain
        previous = self.front.peek(domain)
        self.front.put(entry)
        if entry.source is not Source.FETCHED or entry.policy is None:
            return
        if (previous is not None and previous.fetched_at == entry.fetched_at
                and self.front.refresh_mark(domain) is not None):
            return  # the same policy, already queued
        # Never early: the slot is handled once its start has passed.
        number = math.ceil(self._refresh_due_at(entry) / self._refresh_slot)
        queue = self._refresh_wheel.get(number)
        if queue is None:
            queue = self._refresh_wheel[number] = []
        queue.append(domain)
        self.front.set_refresh_mark(domain, queue)

    def _refresh_due_at(self, entry: CacheEntry) -> float:
        assert entry.policy is not None
        age_limit = min(self.settings.policy.refresh_after, entry.policy.max_age / 2)
        jitter = self._rng.uniform(0, min(self.settings.policy.refresh_jitter, age_limit / 4))
        # A refresh that failed is not tried again before its back-off.
        return max(entry.fetched_at + age_limit + jitter, entry.retry_at)

    async def _store_get(self, domain: str) -> CacheEntry | None:
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

    async def _store_put(self, entry: CacheEntry) -> None:
        """Write ``entry``; a failing store (a full disk) is logged when it starts
        failing and when it works again, not once per new entry.

        Entries that could not be written are remembered and written with the
        next write that succeeds, so nothing learnt during the fault is lost
        at the next restart.
        """
        try:
            await self.store.put(entry)
        except StoreUnavailable as e:
            # Only policies are kept for later: an entry without one learnt
            # while the store failed may not have seen a policy stored there,
            # and written back later it would erase it.
            if entry.source is Source.FETCHED:
                self._unsaved[entry.domain] = entry
            if self._store_failing:
                log.debug("%s: could not store the new entry (%s)", entry.domain, e)
                return
            self._store_failing = True
            log.error("%s: could not store the new entry (%s); keeping it in memory "
                      "(further failed writes are not logged until one succeeds)", entry.domain, e)
            return
        self._unsaved.pop(entry.domain, None)
        await self._write_unsaved()

    async def _write_unsaved(self, also: list[CacheEntry] | None = None) -> None:
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
        if self._store_failing:
            log.info("cache %s: writes succeed again; %d entries learnt meanwhile written",
                     self.store.name, len(self._unsaved))
            self._store_failing = False
        self._unsaved.clear()

    def _trace(self, domain: str, resolution: Resolution) -> None:
        self._traces[domain] = (*resolution.trace, f"result: {resolution.why}")
        self._traces.move_to_end(domain)
        while len(self._traces) > TRACES_KEPT:
            self._traces.popitem(last=False)

    def last_trace(self, domain: str) -> tuple[str, ...]:
        return self._traces.get(domain, ())

    async def flush(self, domain: str | None) -> int:
        """Forget one domain (or all, for None); returns how many were dropped."""
        if domain is None:
            self._flushed_in_flight.update(self._inflight)
            count = len(self.front)
            self.front.clear()
            self._refresh_wheel.clear()
            self._unsaved.clear()
            await self.store.delete_all()
            return count
        if domain in self._inflight:
            self._flushed_in_flight.add(domain)
        present = domain in self.front
        self.front.delete(domain)
        self._unsaved.pop(domain, None)
        await self.store.delete(domain)
        return int(present)

    # --- background work ----------------------------------------------------

    async def _refresh_due(self) -> None:
        """Re-fetch cached policies before they expire (RFC 8461 §3.3)."""
        now = self.reactor.seconds()
        due: list[str] = []
        wheel = self._refresh_wheel
        for number in sorted(n for n in wheel if n * self._refresh_slot <= now):
            queue = wheel.pop(number)
            for domain in queue:
                if self.front.refresh_mark(domain) is not queue:
                    continue  # superseded, evicted, flushed, or met earlier in this queue
                self.front.set_refresh_mark(domain, None)
                entry = self.front.peek(domain)
                if entry is None or domain in self._refreshing:
                    continue  # already running: it queues the next refresh when done
                last_used = max(entry.last_used, self._touched.get(domain, 0.0))
                if now - last_used > self.settings.policy.refresh_idle_limit:
                    log.info("%s: not refreshed, unused for %.0f days; the policy stays until it expires",
                             domain, (now - last_used) / 86400)
                    continue
                due.append(domain)
        self.stats.refresh_queue = len(due)
        for domain in due:
            self._refreshing.add(domain)
            self._spawn(self._refresh_one(domain))

    def _refresh_slots(self) -> DeferredSemaphore:
        """The semaphore bounding refreshes, renewed when a reload changed
        ``refresh_concurrency`` (refreshes holding the old one finish on it)."""
        wanted = max(1, self.settings.policy.refresh_concurrency)
        if self._refresh_limit.limit != wanted:
            self._refresh_limit = DeferredSemaphore(wanted)
        return self._refresh_limit

    async def _refresh_one(self, domain: str) -> None:
        try:
            slots = self._refresh_slots()
            await slots.acquire()
            try:
                if not self._stopping:
                    await self.refresh(domain)
            except Exception:
                pass  # logged where the resolution failed
            finally:
                slots.release()
        finally:
            self._refreshing.discard(domain)
            self.stats.refresh_queue = max(0, self.stats.refresh_queue - 1)

    async def _prune(self) -> None:
        now = self.reactor.seconds()
        try:
            pruned = await self.store.prune(now)
        except StoreUnavailable:
            return
        if pruned:
            log.debug("pruned %d expired entries from the store", pruned)

    async def _flush_touched(self) -> None:
        await self._flush_touched_now()

    async def _flush_touched_now(self) -> None:
        """Write last-used times back in one batch, so idle domains can age out."""
        touched, self._touched = self._touched, {}
        updated = []
        for domain, when in touched.items():
            entry = self.front.peek(domain)
            if entry is not None and entry.last_used < when:
                entry = entry.touched(when)
                self.front.put(entry)
                updated.append(entry)
        if updated or self._unsaved:
            await self._write_unsaved(updated)


class _FailedValue:
    """A failure carried as a value through a shared Deferred."""

    __slots__ = ("failure",)

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


def _durable_fields(entry: CacheEntry) -> tuple[Any, ...]:
    """What must reach the store; checked_at and last_used alone may lag."""
    return (entry.source, entry.policy_id, entry.policy, entry.fetched_at, entry.expires_at,
            entry.failed_id, entry.retry_at)


async def _quiet(d: Deferred[Any]) -> None:
    """Await ``d`` without adding it a second consumer that could cancel it."""
    waiter: Deferred[None] = Deferred()

    def relay(result: object) -> object:
        waiter.callback(None)
        return result

    d.addBoth(relay)
    await waiter


async def _sleep(reactor: IReactorTime, seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d
