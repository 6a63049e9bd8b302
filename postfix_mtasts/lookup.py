"""Cache → fresh? → resolve: the I/O around RFC 8461's decisions.

A lookup answers from the in-memory front when it can (no I/O at all), falls
back to the store, and only then asks DNS and HTTPS. What each outcome means
is decided in :mod:`postfix_mtasts.policy.freshness` (pure); this module does
the waiting: one resolution per domain (singleflight), deadlines, the fleet's
lease (fleet), reads and writes of the store (cache.keeper), and the
background work (refresh, prune, last-used times).
"""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from postfix_mtasts import limits
from postfix_mtasts.answers import describe, entry_answer
from postfix_mtasts.background import BackgroundWork, quiet
from postfix_mtasts.cache import CacheEntry, IPolicyStore, Source, StoreUnavailable
from postfix_mtasts.cache.front import MemoryFront
from postfix_mtasts.cache.keeper import EntryKeeper
from postfix_mtasts.config import Config, PolicyConfig
from postfix_mtasts.fleet import FleetLeases
from postfix_mtasts.policy.freshness import FreshnessRules, Keep, after_fetch, after_fleet, after_txt
from postfix_mtasts.policy.model import Answer, AnswerKind
from postfix_mtasts.policy.tlsrpt import AnswerOptions
from postfix_mtasts.refresh import Refresher, RefreshWheel
from postfix_mtasts.resolver import FetchOK, PolicyFetcher, TxtFound, TxtResolver
from postfix_mtasts.resolver.dane import DaneCache, dane_precedence
from postfix_mtasts.singleflight import SingleFlight
from postfix_mtasts.stats import LookupStats, RecentTraces
from postfix_mtasts.sysmem import loading_long_lived, release_free_memory

log = logging.getLogger("postfix_mtasts.lookup")
#: The one line per resolution (domain, answer, why), on a logger of its own so
#: that ``query``, which prints the same as its "result:" line, can quiet it.
RESULT_LOGGER = "postfix_mtasts.lookup.result"
result_log = logging.getLogger(RESULT_LOGGER)
#: Source.FETCHED, read once: an enum member looked up on its class costs a
#: metaclass call, and the warm-hit path compares with it on every hit.
_FETCHED = Source.FETCHED

#: How often expired entries are pruned from the store.
PRUNE_INTERVAL = 3600.0
#: How often last-used times are written back to the store.
TOUCH_FLUSH_INTERVAL = 600.0
#: A fleet lease outlives the fetch it covers by this much (seconds).
LEASE_MARGIN = 5.0
#: Entries put into memory between two pauses of a background warm-up.
WARM_UP_BATCH = 5000


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
        self._store: IPolicyStore = store
        self.settings = settings  # sets _recheck_interval, read on every warm hit
        self.front = MemoryFront(settings.memory_entries)
        self.stats = stats if stats is not None else LookupStats(reactor)
        self.holder = holder or uuid.uuid4().hex
        self._rng = rng or random.Random()
        self._flights: SingleFlight[Resolution] = SingleFlight(reactor, log, self._resolution_done)
        # Domains whose check in flight has already been logged as slow.
        self._slow_checks_noted: set[str] = set()
        # Domains flushed while a resolution of them was in flight.
        self._flushed_in_flight: set[str] = set()
        self.traces = RecentTraces()
        self.refresh_wheel = RefreshWheel(self.front, settings.refresh_scan_interval, self._rng)
        self._touched: dict[str, float] = {}
        self.background = BackgroundWork(reactor, log)
        self.refresher = Refresher(
            self.refresh_wheel, self.background, self.stats,
            policy=lambda: self.settings.policy,
            last_used=lambda entry: max(entry.last_used, self._touched.get(entry.domain, 0.0)),
            refresh=self.refresh,
        )
        self.keeper = EntryKeeper(store, self.front)
        self.fleet = FleetLeases(reactor, store, self.keeper, self.holder, lambda: self.settings.lease_ttl)
        # The background warm-up, while it runs (start(warm_in_background=True)).
        self._warming: Deferred[Any] | None = None

    @property
    def settings(self) -> LookupSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: LookupSettings) -> None:
        """New settings (a reload); the warm-hit path keeps the recheck interval at hand."""
        self._settings = settings
        p = settings.policy
        self._recheck_interval = p.recheck_interval
        self._rules = FreshnessRules(p.negative_ttl_min, p.negative_ttl_max, p.fetch_retry_backoff)

    @property
    def store(self) -> IPolicyStore:
        return self._store

    @store.setter
    def store(self, store: IPolicyStore) -> None:
        """Another store (a test's); what reads and writes it follows."""
        self._store = self.keeper.store = self.fleet.store = store

    # --- life cycle --------------------------------------------------------

    async def start(self, *, warm_in_background: bool = False) -> int:
        """Start background work and warm the front from the store.

        Returns how many entries were loaded. With ``warm_in_background`` the
        daemon can listen at once: until the front is warm, a lookup that
        misses it reads the store, which is just as correct, only slower.
        """
        self.background.every(self.settings.refresh_scan_interval, self._refresh_due)
        self.background.every(PRUNE_INTERVAL, self._prune)
        self.background.every(TOUCH_FLUSH_INTERVAL, self._flush_touched)
        if warm_in_background:
            self._warming = self.background.spawn(self._warm_up(pause_every=WARM_UP_BATCH))
            return 0
        return await self._warm_up()

    async def warmed(self) -> None:
        """Wait until a background warm-up started by :meth:`start` is done."""
        warming = self._warming
        if warming is not None and not warming.called:
            await quiet(warming)

    async def _warm_up(self, pause_every: int | None = None) -> int:
        """Fill the front from the store; with ``pause_every``, let the reactor
        serve lookups between batches instead of blocking it for the whole load."""
        with loading_long_lived() if self.freeze_loaded else contextlib.nullcontext():
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
                    await deferLater(self.reactor, 0, lambda: None)
            release_free_memory()  # what parsing the stored entries left behind
            log.info("cache %s: %d entries loaded into memory in %.2fs",
                     self.store.name, loaded, self.reactor.seconds() - started)
            return loaded

    async def stop(self) -> None:
        """Stop background work, let resolutions in flight finish, write back."""
        await self.background.stop(also=self._flights.running())
        await self._flush_touched_now()

    # --- answering ----------------------------------------------------------

    def answer_now(self, domain: str, enforce_testing: bool | AnswerOptions) -> Answer | None:
        """The answer from memory if it needs no I/O at all, else None.

        The warm-hit path: every lookup Postfix makes for a cached domain
        runs this, so the rules of ``in_force`` and the recheck are
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
                                       and now - entry.checked_at >= self._recheck_interval):
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
            log.debug("%s: %s (cached %s)", domain, describe(answer), entry.source.value)
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
            stored = await self.keeper.get(domain)
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
            if entry.source is _FETCHED and now - entry.checked_at >= self._recheck_interval:
                shared = self._resolve_shared(domain)
                left = self._flights.time_left(domain, self.settings.policy.recheck_deadline)
                try:
                    resolution = await self._flights.wait(shared, left)
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
        left = self._flights.time_left(domain, self.settings.policy.first_lookup_deadline)
        try:
            resolution = await self._flights.wait(shared, left)
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

    # --- resolution -----------------------------------------------------------

    async def refresh(self, domain: str) -> Resolution:
        """Resolve ``domain`` now, fetching the policy even if the id is known."""
        return await self._flights.wait(self._resolve_shared(domain, force_fetch=True), None)

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
        """
        return self._flights.join(
            domain, lambda: self._resolve_and_keep(domain, force_fetch, stored, store_read)
        )

    def _resolution_done(self, domain: str) -> None:
        self._slow_checks_noted.discard(domain)
        self._flushed_in_flight.discard(domain)

    async def _resolve_and_keep(
        self, domain: str, force_fetch: bool, stored: CacheEntry | None = None, store_read: bool = False
    ) -> Resolution:
        previous = self.front.peek(domain)
        if previous is None:
            previous = stored if store_read else await self.keeper.get(domain)
        try:
            return await self._resolve_and_store(domain, previous, force_fetch)
        finally:
            # Released only once the result is in the store: a fleet member
            # that takes the lease next finds it there and does not fetch again.
            if self.fleet.holds(domain):
                await self.fleet.release(domain)

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
            self.traces.record(domain, resolution.trace, resolution.why)
            log.info("%s: flushed while resolving; the result (%s) is not kept", domain, resolution.why)
            return resolution
        changed = previous is None or _durable_fields(previous) != _durable_fields(entry)
        if changed:
            # Durable before it is used: a new or replaced policy is written
            # first, then answered from.
            await self.keeper.put(entry)
        self._remember(entry)
        self.traces.record(domain, resolution.trace, resolution.why)
        answer = entry_answer(entry, False)
        level = logging.INFO if changed or entry.source is not Source.FETCHED else logging.DEBUG
        result_log.log(level, "%s: %s (%s)", domain, describe(answer), resolution.why)
        return resolution

    async def _resolve(self, domain: str, previous: CacheEntry | None, force_fetch: bool) -> Resolution:
        """Ask DNS, the fleet and HTTPS what policy.freshness needs, in that order."""
        rules = self._rules
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
        adopted = await self.fleet.claim(domain, previous, now, step.policy_id)
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

    # --- memory and store ---------------------------------------------------

    def _remember(self, entry: CacheEntry) -> None:
        previous = self.front.peek(entry.domain)
        self.front.put(entry)
        if entry.source is Source.FETCHED:
            self.refresh_wheel.schedule(entry, previous, self.settings.policy)

    def last_trace(self, domain: str) -> tuple[str, ...]:
        return self.traces.last(domain)

    async def flush(self, domain: str | None) -> int:
        """Forget one domain (or all, for None); returns how many were dropped."""
        if domain is None:
            self._flushed_in_flight.update(self._flights.keys())
            count = len(self.front)
            self.front.clear()
            self.refresh_wheel.clear()
            await self.keeper.delete_all()
            return count
        if domain in self._flights:
            self._flushed_in_flight.add(domain)
        present = domain in self.front
        self.front.delete(domain)
        await self.keeper.delete(domain)
        return int(present)

    # --- background work ----------------------------------------------------

    async def _refresh_due(self) -> None:
        """Re-fetch cached policies before they expire (RFC 8461 §3.3)."""
        self.refresher.run_due(self.reactor.seconds())

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
        if updated or self.keeper.unsaved:
            await self.keeper.write_back(updated)


def _durable_fields(entry: CacheEntry) -> tuple[Any, ...]:
    """What must reach the store; checked_at and last_used alone may lag."""
    return (entry.source, entry.policy_id, entry.policy, entry.fetched_at, entry.expires_at,
            entry.failed_id, entry.retry_at)
