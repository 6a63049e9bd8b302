"""The cache rules of PolicyLookup (RFC 8461 §3.3, §5.1), proved under task.Clock.

Every test drives time by hand and counts DNS and HTTPS calls on scripted
fakes, so "answered from memory" means "no DNS call at all", not "fast".
"""

from __future__ import annotations

import gc
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from postfix_mtasts.answers import entry_answer
from postfix_mtasts.cache import CacheEntry, Source
from postfix_mtasts.config import PolicyConfig
from postfix_mtasts.lookup import LookupSettings, PolicyLookup, Resolution
from postfix_mtasts.policy.answer import policy_answer
from postfix_mtasts.policy.freshness import DNS_FAILURE_RETRY
from postfix_mtasts.policy.model import Answer, AnswerKind, Mode, Policy
from postfix_mtasts.resolver import FailureCategory, FetchFailed, TxtAbsent, TxtFailed
from tests.fakes import (
    FakeFetcher,
    FakeTxtResolver,
    FlakyStore,
    fetch_failed,
    fetched,
    opened,
    policy,
    result_of,
    run,
    txt,
)

#: A realistic epoch for the Clock, so no rule can pass by comparing with 0.
T0 = 1_700_000_000.0
DOMAIN = "example.com"
#: Long enough that no TXT recheck happens in tests about other rules.
NEVER = 10.0**9

P1 = policy(Mode.ENFORCE, 1000, "mx1.example.com")
P2 = policy(Mode.ENFORCE, 1000, "mx2.example.com")
OK1 = policy_answer(P1)
OK2 = policy_answer(P2)


@dataclass
class World:
    clock: Clock
    dns: FakeTxtResolver
    https: FakeFetcher
    store: FlakyStore
    lookup: PolicyLookup

    def ask(self, domain: str = DOMAIN, enforce_testing: bool = False) -> Deferred[Answer]:
        return run(self.lookup.lookup(domain, enforce_testing))

    def answer(self, domain: str = DOMAIN, enforce_testing: bool = False) -> Answer:
        """A lookup that must complete without time passing."""
        return result_of(self.ask(domain, enforce_testing))

    def at(self, offset: float) -> None:
        """Move the clock to T0 + offset, one second at a time so timers see each step."""
        target = T0 + offset
        assert target >= self.clock.seconds(), "time only moves forward"
        while self.clock.seconds() + 1 < target:
            self.clock.advance(1)
        self.clock.advance(target - self.clock.seconds())

    def start(self) -> int:
        return result_of(run(self.lookup.start()))

    def stop(self) -> Deferred[None]:
        return run(self.lookup.stop())


def settings_of(*, temp_on_first_lookup_timeout: bool = False, **values: Any) -> LookupSettings:
    """LookupSettings from flat keyword values, the [policy] ones sorted into a PolicyConfig."""
    policy_fields = PolicyConfig.__dataclass_fields__
    policy_keys = {name: values.pop(name) for name in list(values) if name in policy_fields}
    if temp_on_first_lookup_timeout:
        policy_keys["on_first_lookup_timeout"] = "temp"
    return LookupSettings(policy=PolicyConfig(**policy_keys), **values)


def make_world(**settings: Any) -> World:
    clock = Clock()
    clock.advance(T0)
    store = FlakyStore()
    opened(store)
    dns = FakeTxtResolver()
    https = FakeFetcher()
    lookup = PolicyLookup(
        clock, dns, https, store, settings_of(**settings), rng=random.Random(8461)
    )
    return World(clock, dns, https, store, lookup)


@pytest.fixture
def world() -> Iterator[World]:
    w = make_world(recheck_interval=NEVER)
    yield w


def publish(w: World, p: Policy, policy_id: str = "1", domain: str = DOMAIN) -> None:
    w.dns.set_id(domain, policy_id)
    w.https.set_policy(domain, p)


# --- max_age --------------------------------------------------------------------


def test_policy_answers_from_memory_without_dns_until_max_age(world: World) -> None:
    publish(world, P1)
    assert world.answer() == OK1
    assert (world.dns.total, world.https.total) == (1, 1)
    for offset in (1, 10, 500, 999, 999.9):
        world.at(offset)
        assert world.lookup.answer_now(DOMAIN, False) == OK1
        assert world.answer() == OK1
    assert (world.dns.total, world.https.total) == (1, 1)


def test_policy_expires_at_max_age_and_the_next_lookup_resolves_again(world: World) -> None:
    publish(world, P1)
    world.answer()
    world.at(1000)
    assert world.lookup.answer_now(DOMAIN, False) is None
    publish(world, P2, policy_id="1")
    assert world.answer() == OK2
    assert (world.dns.total, world.https.total) == (2, 2)


# --- recheck of the TXT id -------------------------------------------------------


def test_recheck_after_interval_checks_the_txt_id_once() -> None:
    w = make_world(recheck_interval=60)
    publish(w, P1)
    w.answer()
    w.at(59.9)
    assert w.answer() == OK1
    assert w.dns.total == 1
    w.at(60)
    assert w.lookup.answer_now(DOMAIN, False) is None  # a check is due: not from memory
    assert w.answer() == OK1
    assert (w.dns.total, w.https.total) == (2, 1)  # same id: no fetch
    w.at(61)
    assert w.answer() == OK1
    assert w.dns.total == 2  # the check reset the interval


def test_slow_recheck_answers_from_cache_at_deadline_and_finishes_in_background() -> None:
    w = make_world(recheck_interval=60, recheck_deadline=2)
    publish(w, P1)
    w.answer()
    w.at(60)
    slow_dns = w.dns.hold(DOMAIN)
    pending = w.ask()
    assert w.dns.total == 2
    w.at(61.9)
    assert not pending.called
    w.at(62)
    assert result_of(pending) == OK1
    # The check completes later, with a new id; its result is used from then on.
    w.https.set_policy(DOMAIN, P2)
    slow_dns.callback(txt("2"))
    assert w.https.total == 2
    assert w.lookup.answer_now(DOMAIN, False) == OK2
    assert w.answer() == OK2
    assert w.dns.total == 2


def test_a_slow_check_is_logged_once_however_many_lookups_wait_on_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = make_world(recheck_interval=60, recheck_deadline=2)
    publish(w, P1)
    w.answer()
    w.at(60)
    slow_dns = w.dns.hold(DOMAIN)
    with caplog.at_level(logging.INFO, logger="postfix_mtasts.lookup"):
        pending = w.ask()
        w.at(62)
        assert result_of(pending) == OK1
        for _ in range(5):
            assert w.answer() == OK1
        slow_dns.callback(txt("1"))
        # A later slow check is a new event, and is logged again.
        w.at(130)
        again = w.dns.hold(DOMAIN)
        pending = w.ask()
        w.at(132)
        assert result_of(pending) == OK1
        again.callback(txt("1"))
    noted = [r for r in caplog.records if "still running" in r.getMessage()]
    assert len(noted) == 2


def test_lookups_during_a_check_past_its_deadline_answer_from_cache_at_once() -> None:
    """The deadline is the check's, not each lookup's: a slow check costs one wait, not one per lookup."""
    w = make_world(recheck_interval=60, recheck_deadline=2)
    publish(w, P1)
    w.answer()
    w.at(60)
    slow_dns = w.dns.hold(DOMAIN)
    first = w.ask()
    w.at(61)
    second = w.ask()
    assert not second.called
    w.at(62)
    assert result_of(first) == OK1
    assert result_of(second) == OK1  # waited 1 s: what was left of the check's deadline
    w.at(63)
    assert w.answer() == OK1  # no wait at all while the late check still runs
    assert w.dns.total == 2
    slow_dns.callback(txt("1"))
    assert w.clock.getDelayedCalls() == []


@pytest.mark.parametrize("temp", [False, True])
def test_cold_lookups_joining_a_late_discovery_answer_at_once(temp: bool) -> None:
    w = make_world(first_lookup_deadline=20, temp_on_first_lookup_timeout=temp)
    slow_dns = w.dns.hold(DOMAIN)
    w.ask()
    w.at(30)
    answer = w.answer()
    assert answer.kind is (AnswerKind.TEMP if temp else AnswerKind.NOTFOUND)
    assert w.dns.total == 1
    w.https.set_policy(DOMAIN, P1)
    slow_dns.callback(txt("1"))
    assert w.answer() == OK1


def test_fast_recheck_answer_waits_for_the_check_result() -> None:
    w = make_world(recheck_interval=60, recheck_deadline=2)
    publish(w, P1)
    w.answer()
    w.at(60)
    slow_dns = w.dns.hold(DOMAIN)
    pending = w.ask()
    w.at(61)
    w.https.set_policy(DOMAIN, P2)
    slow_dns.callback(txt("2"))
    assert result_of(pending) == OK2


# --- policy id changes ------------------------------------------------------------


def test_new_id_fetches_and_a_valid_policy_replaces_the_cached_one() -> None:
    w = make_world(recheck_interval=60)
    publish(w, P1)
    assert w.answer() == OK1
    w.at(60)
    publish(w, P2, policy_id="2")
    assert w.answer() == OK2
    assert (w.dns.total, w.https.total) == (2, 2)
    stored = w.store.stored(DOMAIN)
    assert stored is not None and stored.policy == P2 and stored.policy_id == "2"


def test_new_id_whose_fetch_fails_keeps_the_cached_policy_until_it_expires() -> None:
    w = make_world(recheck_interval=60)
    publish(w, P1)
    w.answer()
    w.at(60)
    w.dns.set_id(DOMAIN, "2")
    w.https.set(DOMAIN, fetch_failed("TLS handshake failed"))
    for offset in range(60, 1000, 60):
        w.at(offset)
        assert w.answer() == OK1, offset
    w.at(999.5)
    assert w.answer() == OK1
    w.at(1000)
    assert w.answer().kind is AnswerKind.NOTFOUND


def test_fetched_mode_none_replaces_the_policy_at_once() -> None:
    w = make_world(recheck_interval=60)
    publish(w, P1)
    w.answer()
    w.at(60)
    publish(w, policy(Mode.NONE, 1000), policy_id="2")
    assert w.answer().kind is AnswerKind.NOTFOUND
    assert w.lookup.answer_now(DOMAIN, False) == Answer(AnswerKind.NOTFOUND, w.answer().data)
    assert w.https.total == 2


def test_testing_mode_answers_per_profile() -> None:
    w = make_world(recheck_interval=NEVER)
    testing = policy(Mode.TESTING, 1000, "mx.example.com")
    publish(w, testing)
    assert w.answer(enforce_testing=False).kind is AnswerKind.NOTFOUND
    assert w.answer(enforce_testing=True) == policy_answer(testing, True)
    assert w.answer(enforce_testing=True).kind is AnswerKind.OK
    assert w.answer(enforce_testing=False).kind is AnswerKind.NOTFOUND
    assert w.dns.total == 1


# --- no downgrade before max_age ---------------------------------------------------


@pytest.mark.parametrize(
    "trouble",
    ["txt-absent", "dns-failing", "https-failing", "policy-invalid"],
)
def test_cached_policy_stays_in_force_until_max_age_whatever_discovery_says(trouble: str) -> None:
    w = make_world(recheck_interval=60)
    publish(w, P1)
    w.answer()
    if trouble == "txt-absent":
        w.dns.set(DOMAIN, TxtAbsent("NXDOMAIN", negative_ttl=300))
    elif trouble == "dns-failing":
        w.dns.set(DOMAIN, TxtFailed("SERVFAIL"))
    elif trouble == "https-failing":
        w.dns.set_id(DOMAIN, "2")
        w.https.set(DOMAIN, fetch_failed("connection refused"))
    else:
        w.dns.set_id(DOMAIN, "2")
        w.https.set(DOMAIN, FetchFailed("mode: bogus", FailureCategory.INVALID))
    for offset in range(30, 1000, 30):
        w.at(offset)
        assert w.answer() == OK1, (trouble, offset)
    assert w.dns.total > 10  # it really kept checking
    w.at(1000)
    assert w.answer().kind is AnswerKind.NOTFOUND


# --- back-off of failed fetches -------------------------------------------------


def test_failed_fetch_of_a_cold_domain_is_not_retried_before_backoff() -> None:
    w = make_world(recheck_interval=60, fetch_retry_backoff=300)
    w.dns.set_id(DOMAIN, "1")
    w.https.set(DOMAIN, fetch_failed())
    for step in range(20):
        w.at(step * 3)
        assert w.answer().kind is AnswerKind.NOTFOUND
    assert w.https.total == 1
    w.at(299.9)
    w.answer()
    assert w.https.total == 1
    w.at(300)
    w.https.set_policy(DOMAIN, P1)
    assert w.answer() == OK1
    assert w.https.total == 2


def test_failed_fetch_of_a_new_id_is_not_retried_before_backoff_while_rechecking() -> None:
    w = make_world(recheck_interval=1, fetch_retry_backoff=300)
    publish(w, P1)
    w.answer()
    w.at(10)
    w.dns.set_id(DOMAIN, "2")
    w.https.set(DOMAIN, fetch_failed())
    dns_before = w.dns.total
    for step in range(20):
        w.at(10 + step * 3)
        assert w.answer() == OK1
    assert w.dns.total == dns_before + 20  # every lookup rechecked the id...
    assert w.https.total == 2  # ...but only the first fetched it
    w.at(309)
    w.answer()
    assert w.https.total == 2
    w.at(310)
    w.https.set_policy(DOMAIN, P2)
    assert w.answer() == OK2
    assert w.https.total == 3


# --- proactive refresh -------------------------------------------------------------


def refresh_times(w: World, until: float, domain: str = DOMAIN, keep_using: bool = True) -> list[float]:
    """Step the clock to ``until`` and note when each new fetch of ``domain`` happened."""
    times: list[float] = []
    seen = w.https.calls[domain]
    while w.clock.seconds() < T0 + until:
        w.clock.advance(1)
        if keep_using and int(w.clock.seconds() - T0) % 20 == 0:
            w.lookup.answer_now(domain, False)
        if w.https.calls[domain] != seen:
            times.extend([w.clock.seconds() - T0] * (w.https.calls[domain] - seen))
            seen = w.https.calls[domain]
    return times


def test_cached_policy_is_refreshed_before_expiry_after_half_its_max_age() -> None:
    w = make_world(recheck_interval=NEVER, refresh_scan_interval=60, refresh_jitter=300)
    w.start()
    publish(w, P1)
    w.answer()
    times = refresh_times(w, 999)
    # due at max_age/2 plus jitter up to a quarter of that, in a 60 s slot of
    # the schedule, found by a scan within 60 s after the slot's start
    assert len(times) == 1
    assert 500 <= times[0] <= 625 + 60 + 60
    # The refresh renewed the policy: still answered from memory past the first max_age.
    w.at(1100)
    assert w.lookup.answer_now(DOMAIN, False) == OK1
    assert w.dns.total == w.https.total  # only refreshes asked DNS


def test_refresh_after_applies_when_shorter_than_half_max_age() -> None:
    w = make_world(recheck_interval=NEVER, refresh_after=200, refresh_scan_interval=10)
    w.start()
    publish(w, P1)
    w.answer()
    times = refresh_times(w, 300)
    assert len(times) == 1
    assert 200 <= times[0] <= 250 + 10 + 10


def test_refresh_fetches_even_when_the_id_is_unchanged_and_replaces_the_policy() -> None:
    w = make_world(recheck_interval=NEVER, refresh_scan_interval=60)
    w.start()
    publish(w, P1)
    w.answer()
    w.https.set_policy(DOMAIN, P2)  # same id "1": a refresh must still fetch
    times = refresh_times(w, 700)
    assert len(times) == 1
    assert w.lookup.answer_now(DOMAIN, False) == OK2


def test_failing_refresh_is_retried_only_after_the_backoff() -> None:
    w = make_world(recheck_interval=NEVER, refresh_scan_interval=60, fetch_retry_backoff=300)
    w.start()
    publish(w, P1)
    w.answer()
    w.https.set(DOMAIN, fetch_failed("connection refused"))
    times = refresh_times(w, 999)
    assert times, "the policy was never refreshed"
    assert all(later - earlier >= 300 for earlier, later in itertools.pairwise(times)), times
    assert w.lookup.answer_now(DOMAIN, False) == OK1  # still in force meanwhile


def cached_policies(count: int, refresh_concurrency: int) -> tuple[World, list[str]]:
    """A started world with ``count`` domains' policies cached, all due for
    refresh at the same time, at most ``refresh_concurrency`` refreshed at once."""
    w = make_world(
        recheck_interval=NEVER,
        refresh_concurrency=refresh_concurrency,
        refresh_scan_interval=60,
        refresh_jitter=0,
    )
    w.start()
    domains = [f"d{i}.example" for i in range(count)]
    for domain in domains:
        publish(w, P1, domain=domain)
        assert w.answer(domain) == OK1
    return w, domains


def advance_until_refreshing(w: World, domains: list[str]) -> None:
    """Time passes, the domains in use, until a refresh fetch is in flight."""
    while w.https.in_flight == 0 and w.clock.seconds() < T0 + 700:
        w.clock.advance(1)
        for domain in domains:
            w.lookup.answer_now(domain, False)


def test_refresh_runs_at_most_refresh_concurrency_fetches_at_once() -> None:
    w, domains = cached_policies(10, refresh_concurrency=3)
    held = {domain: w.https.hold(domain) for domain in domains}
    advance_until_refreshing(w, domains)
    assert w.https.in_flight == 3
    assert w.lookup.stats.refresh_queue == 10  # all due at once, 3 running
    started = [d for d in domains if w.https.calls[d] == 2]
    assert len(started) == 3
    completed = 0
    while completed < len(domains):
        running = [d for d in domains if w.https.calls[d] == 2 and not held[d].called]
        assert running, "refresh stalled"
        held[running[0]].callback(fetched(P2))
        completed += 1
        assert w.https.in_flight <= 3
    assert w.https.max_in_flight == 3
    assert all(w.https.calls[d] == 2 for d in domains)
    assert all(w.lookup.answer_now(d, False) == OK2 for d in domains)


def test_a_new_refresh_concurrency_applies_to_the_next_refreshes() -> None:
    """A reload replaces the settings; refreshes queued after it use the new bound."""
    w, domains = cached_policies(6, refresh_concurrency=1)
    faster = replace(w.lookup.settings.policy, refresh_concurrency=4)
    w.lookup.settings = replace(w.lookup.settings, policy=faster)
    for domain in domains:
        w.https.hold(domain)
    advance_until_refreshing(w, domains)
    assert w.https.in_flight == 4


def test_policy_unused_for_the_idle_limit_is_not_refreshed_and_expires() -> None:
    w = make_world(recheck_interval=NEVER, refresh_idle_limit=100, refresh_scan_interval=60)
    w.start()
    publish(w, P1, domain="idle.example")
    publish(w, P1, domain="busy.example")
    w.answer("idle.example")
    w.answer("busy.example")
    while w.clock.seconds() < T0 + 999:
        w.clock.advance(1)
        if int(w.clock.seconds() - T0) % 20 == 0:
            assert w.lookup.answer_now("busy.example", False) == OK1
    assert w.https.calls["busy.example"] == 2
    assert w.https.calls["idle.example"] == 1
    assert w.lookup.answer_now("idle.example", False) == OK1  # still in force at 999
    w.at(1000)
    assert w.lookup.answer_now("idle.example", False) is None
    assert w.answer("idle.example") == OK1
    assert w.dns.calls["idle.example"] == 2


def test_refresh_fetches_each_due_policy_once_even_after_many_rechecks() -> None:
    """Rechecks keep the policy; they must not queue extra refreshes of it."""
    w = make_world(recheck_interval=10, refresh_scan_interval=60)
    w.start()
    publish(w, P1)
    w.answer()
    for offset in range(10, 490, 10):
        w.at(offset)
        assert w.answer() == OK1
    # One place in the refresh schedule, however many rechecks.
    assert len(w.lookup.refresh_wheel) == 1
    times = refresh_times(w, 800)
    assert len(times) == 1


# --- negative cache ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("negative_ttl", "remembered"),
    [(10, 300.0), (1000, 1000.0), (10**6, 86_400.0), (None, 300.0)],
)
def test_absent_record_is_remembered_for_the_clamped_negative_ttl(
    negative_ttl: int | None, remembered: float
) -> None:
    w = make_world(negative_ttl_min=300, negative_ttl_max=86_400)
    w.dns.set(DOMAIN, TxtAbsent("NXDOMAIN", negative_ttl=negative_ttl))
    assert w.answer().kind is AnswerKind.NOTFOUND
    w.at(remembered - 0.5)
    assert w.lookup.answer_now(DOMAIN, False) is not None
    assert w.answer().kind is AnswerKind.NOTFOUND
    assert w.dns.total == 1
    w.at(remembered)
    assert w.lookup.answer_now(DOMAIN, False) is None
    publish(w, P1)
    assert w.answer() == OK1
    assert w.dns.total == 2
    assert w.https.total == 1


def test_dns_failure_of_a_cold_domain_is_retried_soon() -> None:
    w = make_world()
    w.dns.set(DOMAIN, TxtFailed("timeout"))
    assert w.answer().kind is AnswerKind.NOTFOUND
    publish(w, P1)
    w.at(120)
    assert w.answer() == OK1
    assert w.dns.total == 2


# --- single flight -------------------------------------------------------------------


def test_concurrent_lookups_share_one_dns_query_and_one_fetch() -> None:
    w = make_world()
    slow_dns = w.dns.hold(DOMAIN)
    slow_fetch = w.https.hold(DOMAIN)
    waiting = [w.ask() for _ in range(60)]
    assert w.dns.total == 1
    slow_dns.callback(txt("1"))
    assert w.https.total == 1
    assert not any(d.called for d in waiting)
    w.at(1)
    slow_fetch.callback(fetched(P1))
    answers = [result_of(d) for d in waiting]
    assert answers == [OK1] * 60
    assert (w.dns.total, w.https.total) == (1, 1)


# --- first lookup deadline ---------------------------------------------------------


@pytest.mark.parametrize("temp", [False, True])
def test_cold_lookup_past_first_deadline_answers_and_resolution_finishes(temp: bool) -> None:
    w = make_world(first_lookup_deadline=20, temp_on_first_lookup_timeout=temp)
    slow_dns = w.dns.hold(DOMAIN)
    pending = w.ask()
    w.at(19.9)
    assert not pending.called
    w.at(20)
    answer = result_of(pending)
    assert answer.kind is (AnswerKind.TEMP if temp else AnswerKind.NOTFOUND)
    w.at(25)
    w.https.set_policy(DOMAIN, P1)
    slow_dns.callback(txt("1"))
    assert w.lookup.answer_now(DOMAIN, False) == OK1
    assert w.answer() == OK1
    assert (w.dns.total, w.https.total) == (1, 1)
    assert w.clock.getDelayedCalls() == []


# --- durability ------------------------------------------------------------------------


def test_new_policy_is_in_the_store_before_the_lookup_answers_with_it() -> None:
    w = make_world()
    publish(w, P1)
    gate: Deferred[None] = Deferred()
    w.store.put_gate = gate
    pending = w.ask()
    assert w.https.total == 1
    assert not pending.called
    assert w.store.stored(DOMAIN) is None
    w.store.put_gate = None
    gate.callback(None)
    assert result_of(pending) == OK1
    stored = w.store.stored(DOMAIN)
    assert stored is not None and stored.policy == P1


def test_replacing_policy_is_stored_before_it_is_answered() -> None:
    w = make_world(recheck_interval=60, recheck_deadline=NEVER)
    publish(w, P1)
    w.answer()
    w.at(60)
    publish(w, P2, policy_id="2")
    gate: Deferred[None] = Deferred()
    w.store.put_gate = gate
    pending = w.ask()
    assert not pending.called
    stored = w.store.stored(DOMAIN)
    assert stored is not None and stored.policy == P1
    gate.callback(None)
    assert result_of(pending) == OK2
    stored = w.store.stored(DOMAIN)
    assert stored is not None and stored.policy == P2


def test_first_lookup_reads_the_store_once_and_resolves_from_what_it_found() -> None:
    w = make_world(recheck_interval=NEVER)
    publish(w, P1, policy_id="2")
    # Stored by an earlier run: policy 1 has expired, and id 2 failed to fetch
    # and may not be retried yet.
    expired = replace(
        stored_entry(DOMAIN, P1, fetched_offset=-2000, checked_offset=-10),
        failed_id="2", retry_at=T0 + 50, failure="connection refused",
    )
    assert not expired.in_force(T0)
    result_of(run(w.store.put(expired)))

    assert w.answer().kind is AnswerKind.NOTFOUND
    assert w.store.calls["get"] == 1
    assert w.https.total == 0  # the stored backoff was honoured, not forgotten

    w.answer("other.example")
    assert w.store.calls["get"] == 2


def test_a_new_domain_on_a_local_store_is_read_once_and_takes_no_lease() -> None:
    w = make_world(recheck_interval=NEVER)
    assert not w.store.shared
    publish(w, P1)
    assert w.answer() == OK1
    assert w.https.total == 1
    assert (w.store.calls["get"], w.store.calls["acquire_lease"], w.store.calls["release_lease"]) == (1, 0, 0)
    assert w.store.stored(DOMAIN) is not None


def test_a_new_domain_on_a_shared_store_is_fetched_under_the_fleets_lease() -> None:
    w = make_world(recheck_interval=NEVER)
    w.store.shared = True
    publish(w, P1)
    assert w.answer() == OK1
    assert w.https.total == 1
    # Read once by the lookup, once more after the lease: another daemon may
    # have stored the policy between the two.
    assert (w.store.calls["get"], w.store.calls["acquire_lease"], w.store.calls["release_lease"]) == (2, 1, 1)


def test_unchanged_id_does_not_write_the_store() -> None:
    w = make_world(recheck_interval=60)
    publish(w, P1)
    w.answer()
    puts = w.store.calls["put"]
    w.at(60)
    w.answer()
    assert w.store.calls["put"] == puts


# --- start -------------------------------------------------------------------------------


def stored_entry(domain: str, p: Policy, fetched_offset: float, checked_offset: float) -> CacheEntry:
    fetched_at = T0 + fetched_offset
    return CacheEntry(
        domain, Source.FETCHED, expires_at=fetched_at + p.max_age, checked_at=T0 + checked_offset,
        policy_id="1", policy=p, policy_text=fetched(p).text, fetched_at=fetched_at,
        last_used=fetched_at,
    )


def test_start_loads_entries_in_force_and_answers_them_without_dns() -> None:
    w = make_world(recheck_interval=60)
    fresh = stored_entry("fresh.example", P1, fetched_offset=-500, checked_offset=-10)
    stale = stored_entry("stale.example", P1, fetched_offset=-1000, checked_offset=-10)
    negative = CacheEntry("none.example", Source.NEGATIVE, expires_at=T0 + 100, checked_at=T0 - 10)
    result_of(run(w.store.put_many([fresh, stale, negative])))
    assert w.start() == 2
    assert w.lookup.answer_now("fresh.example", False) == OK1
    assert w.answer("fresh.example") == OK1
    assert w.answer("none.example").kind is AnswerKind.NOTFOUND
    assert "stale.example" not in w.lookup.front
    assert w.dns.total == 0
    publish(w, P2, domain="stale.example")
    assert w.answer("stale.example") == OK2
    assert w.dns.calls["stale.example"] == 1


def test_background_warm_up_pauses_between_batches_and_keeps_newer_entries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import postfix_mtasts.lookup as lookup_module

    monkeypatch.setattr(lookup_module, "WARM_UP_BATCH", 2)
    w = make_world(recheck_interval=NEVER)
    entries = [stored_entry(f"d{i}.example", P1, fetched_offset=-10, checked_offset=-10) for i in range(6)]
    result_of(run(w.store.put_many(entries)))
    assert result_of(run(w.lookup.start(warm_in_background=True))) == 0
    # The first batch is in memory and the warm-up waits for the reactor.
    assert len(w.lookup.front) == 2
    # A lookup meanwhile reads the store, without DNS, and the answer it puts
    # in memory is not overwritten when the warm-up reaches that domain.
    late = entries[0].domain
    assert late not in w.lookup.front
    assert w.answer(late) == OK1
    remembered = w.lookup.front.peek(late)
    w.clock.advance(0)
    w.clock.advance(0)
    assert len(w.lookup.front) == 6
    assert w.lookup.front.peek(late) is remembered
    assert w.dns.total == 0


def test_the_daemons_warm_up_freezes_what_it_loaded_out_of_the_collectors_sight(collector: None) -> None:
    w = make_world(recheck_interval=NEVER)
    w.lookup.freeze_loaded = True
    entries = [stored_entry(f"d{i}.example", P1, fetched_offset=-10, checked_offset=-10) for i in range(50)]
    result_of(run(w.store.put_many(entries)))
    threshold = gc.get_threshold()
    gc.unfreeze()
    assert w.start() == 50
    loaded = w.lookup.front.peek("d7.example")
    assert loaded is not None and gc.is_tracked(loaded)
    # Frozen: in none of the generations a collection walks.
    assert gc.get_freeze_count() > 0
    assert not any(tracked is loaded for tracked in gc.get_objects())
    assert gc.get_threshold() == threshold  # full collections allowed again


def test_lookup_falls_back_to_the_store_when_memory_lost_the_entry() -> None:
    w = make_world(recheck_interval=NEVER, memory_entries=1)
    publish(w, P1, domain="a.example")
    publish(w, P2, domain="b.example")
    w.answer("a.example")
    w.answer("b.example")  # evicts a.example from memory
    assert "a.example" not in w.lookup.front
    assert w.answer("a.example") == OK1
    assert w.dns.calls["a.example"] == 1
    assert w.lookup.stats.store_hits == 1


# --- store down ----------------------------------------------------------------------------


def test_store_down_from_the_start_still_answers_from_fresh_resolutions() -> None:
    w = make_world(recheck_interval=NEVER)
    w.store.down = True
    assert w.start() == 0
    publish(w, P1)
    assert w.answer() == OK1
    assert w.answer() == OK1
    assert (w.dns.total, w.https.total) == (1, 1)
    assert result_of(w.stop()) is None


def test_store_going_down_keeps_answers_from_memory_and_new_resolutions() -> None:
    w = make_world(recheck_interval=60)
    w.start()
    publish(w, P1)
    w.answer()
    w.store.down = True
    w.at(30)
    assert w.answer() == OK1
    publish(w, P2, domain="other.example")
    assert w.answer("other.example") == OK2
    w.at(60)
    publish(w, P2, policy_id="2")
    assert w.answer() == OK2
    w.at(4000)  # past prune and write-back timers, which must swallow the outage
    assert w.lookup.answer_now("other.example", False) is None
    assert result_of(w.stop()) is None


# --- stop ------------------------------------------------------------------------------------


def test_stop_waits_for_resolutions_in_flight_and_cancels_timers() -> None:
    w = make_world(first_lookup_deadline=20)
    w.start()
    assert w.clock.getDelayedCalls() != []
    slow_dns = w.dns.hold(DOMAIN)
    pending = w.ask()
    stopped = w.stop()
    assert not stopped.called
    w.https.set_policy(DOMAIN, P1)
    slow_dns.callback(txt("1"))
    assert result_of(pending) == OK1
    assert result_of(stopped) is None
    assert w.clock.getDelayedCalls() == []
    stored = w.store.stored(DOMAIN)
    assert stored is not None and stored.policy == P1


def test_stop_waits_for_a_refresh_in_flight() -> None:
    w = make_world(recheck_interval=NEVER, refresh_scan_interval=60)
    w.start()
    publish(w, P1)
    w.answer()
    held = w.https.hold(DOMAIN)
    while w.https.in_flight == 0 and w.clock.seconds() < T0 + 700:
        w.clock.advance(1)
        w.lookup.answer_now(DOMAIN, False)
    assert w.https.in_flight == 1
    stopped = w.stop()
    assert not stopped.called
    held.callback(fetched(P2))
    assert result_of(stopped) is None
    assert w.clock.getDelayedCalls() == []


def test_stop_writes_last_used_times_back() -> None:
    w = make_world(recheck_interval=NEVER)
    w.start()
    publish(w, P1)
    w.answer()
    w.at(100)
    w.answer()
    result_of(w.stop())
    stored = w.store.stored(DOMAIN)
    assert stored is not None and stored.last_used == T0 + 100


# --- refresh(), flush(), traces, stats ------------------------------------------------


def test_refresh_fetches_now_and_records_a_trace(world: World) -> None:
    publish(world, P1)
    world.answer()
    world.https.set_policy(DOMAIN, P2)
    resolution = result_of(run(world.lookup.refresh(DOMAIN)))
    assert isinstance(resolution, Resolution)
    assert resolution.entry.policy == P2
    assert world.lookup.answer_now(DOMAIN, False) == OK2
    trace = world.lookup.last_trace(DOMAIN)
    assert trace and trace[-1].startswith("result: ")
    assert world.lookup.last_trace("unknown.example") == ()


def test_flush_forgets_memory_and_store(world: World) -> None:
    publish(world, P1)
    publish(world, P2, domain="other.example")
    world.answer()
    world.answer("other.example")
    assert result_of(run(world.lookup.flush(DOMAIN))) == 1
    assert world.store.stored(DOMAIN) is None
    assert world.lookup.answer_now(DOMAIN, False) is None
    assert world.answer() == OK1
    assert world.dns.calls[DOMAIN] == 2
    assert result_of(run(world.lookup.flush(None))) == 2
    assert world.store.stored("other.example") is None


@pytest.mark.parametrize("flush_all", [False, True])
def test_a_flush_during_a_recheck_is_not_undone_by_it(flush_all: bool) -> None:
    w = make_world(recheck_interval=60, recheck_deadline=NEVER)
    publish(w, P1)
    w.answer()
    w.at(60)
    slow_dns = w.dns.hold(DOMAIN)
    waiting = w.ask()  # the recheck, built on the cached policy, is in flight
    assert result_of(run(w.lookup.flush(None if flush_all else DOMAIN))) == 1
    slow_dns.callback(txt("1"))  # the same id: the recheck would keep the old policy
    assert result_of(waiting) == OK1  # the lookup that was waiting still gets its answer
    assert w.lookup.answer_now(DOMAIN, False) is None
    assert w.store.stored(DOMAIN) is None
    fetches = w.https.calls[DOMAIN]
    assert w.answer() == OK1  # found again from scratch
    assert w.https.calls[DOMAIN] == fetches + 1


def test_stats_count_hits_misses_dns_and_fetches(world: World) -> None:
    publish(world, P1)
    world.answer()
    world.answer()
    world.answer()
    stats = world.lookup.stats
    assert (stats.misses, stats.hits, stats.dns_queries, stats.fetches) == (1, 2, 1, 1)
    assert stats.snapshot()["answers"] == {"OK": 3}


def test_entry_answer_for_each_source() -> None:
    assert entry_answer(stored_entry(DOMAIN, P1, 0, 0), False) == OK1
    negative = CacheEntry(DOMAIN, Source.NEGATIVE, expires_at=T0, checked_at=T0)
    assert entry_answer(negative, True).kind is AnswerKind.NOTFOUND
    failed = CacheEntry(DOMAIN, Source.FAILED, expires_at=T0, checked_at=T0, failure="boom")
    assert entry_answer(failed, False) == Answer.notfound("no usable policy: boom")


# --- fleet lease ------------------------------------------------------------------------


class LeaseHeldElsewhere(FlakyStore):
    """A shared store where another daemon of the fleet holds every lease."""

    shared = True

    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool:
        self._check_open()
        return False


def fleet_world() -> World:
    w = make_world()
    store = LeaseHeldElsewhere()
    opened(store)
    w.store = store
    w.lookup.store = store
    return w


def test_lookup_adopts_the_result_of_the_fleet_member_holding_the_lease() -> None:
    w = fleet_world()
    w.dns.set_id(DOMAIN, "1")
    pending = w.ask()
    w.at(1)
    assert not pending.called
    theirs = stored_entry(DOMAIN, P1, fetched_offset=1, checked_offset=1)
    result_of(run(w.store.put_many([theirs])))
    w.clock.pump([0.05] * 10)  # the next poll sees it
    assert result_of(pending) == OK1
    assert w.https.total == 0
    assert w.clock.getDelayedCalls() == []


def test_a_fleet_members_failure_does_not_replace_our_policy_in_force() -> None:
    w = fleet_world()
    ours = stored_entry(DOMAIN, P1, fetched_offset=-10, checked_offset=-100)
    w.lookup.front.put(ours)
    # The TXT id changed: a fetch is due, and another daemon holds the lease.
    w.dns.set_id(DOMAIN, "2")
    pending = run(w.lookup.refresh(DOMAIN))
    w.at(1)
    theirs = CacheEntry(DOMAIN, Source.FAILED, expires_at=T0 + 300, checked_at=T0 + 1,
                        failed_id="2", retry_at=T0 + 300, failure="certificate has expired")
    result_of(run(w.store.put_many([theirs])))
    w.clock.pump([0.05] * 10)
    resolution = result_of(pending)
    assert resolution.entry.policy == P1
    assert "stays in force" in resolution.why
    assert w.answer() == OK1
    assert w.https.total == 0


def test_lookup_fetches_itself_when_the_lease_holder_gives_no_result() -> None:
    from postfix_mtasts.fleet import LEASE_POLL, LEASE_WAIT

    w = fleet_world()
    publish(w, P1)
    pending = w.ask()
    polls = round(LEASE_WAIT / LEASE_POLL)
    w.clock.pump([LEASE_POLL] * (polls - 1))
    assert not pending.called and w.https.total == 0
    w.clock.advance(LEASE_POLL)
    assert result_of(pending) == OK1
    assert w.https.total == 1


# --- a store that failed or answered late (review fixes) -------------------------------------


def test_a_policy_the_store_refused_still_answers_after_memory_evicted_it() -> None:
    # A full disk refused the write, then memory evicted the domain: the store
    # never had the policy, but it is in force until its max_age (RFC 8461 §5.1).
    w = make_world(recheck_interval=NEVER, memory_entries=1)
    publish(w, P1, domain="a.example")
    w.dns.set("b.example", TxtAbsent("NXDOMAIN", negative_ttl=300))
    w.store.down = True
    assert w.answer("a.example") == OK1
    w.answer("b.example")  # evicts a.example from memory
    assert "a.example" not in w.lookup.front
    w.dns.set("a.example", TxtFailed("SERVFAIL"))
    assert w.answer("a.example") == OK1  # the store still fails
    w.answer("b.example")
    w.store.down = False  # readable again, but it never got a.example
    assert w.answer("a.example") == OK1
    assert w.https.calls["a.example"] == 1


def test_what_was_learnt_while_the_store_failed_never_overwrites_its_policy() -> None:
    # The store held a policy this daemon could not read (a read error, memory
    # evicted it); the failure it learnt meanwhile says nothing about that policy.
    w = make_world(recheck_interval=NEVER)
    theirs = stored_entry(DOMAIN, P1, fetched_offset=-10, checked_offset=-10)
    result_of(run(w.store.put_many([theirs])))
    w.store.down = True
    w.dns.set(DOMAIN, TxtFailed("SERVFAIL"))
    assert w.answer().kind is AnswerKind.NOTFOUND
    w.store.down = False
    publish(w, P2, domain="other.example")
    assert w.answer("other.example") == OK2  # a write that succeeds
    w.at(DNS_FAILURE_RETRY + 1)
    result_of(run(w.lookup._flush_touched_now()))  # and the periodic write-back
    assert w.store.stored(DOMAIN) == theirs
    assert w.answer() == OK1


class LateReadStore(FlakyStore):
    """A store whose next ``get`` reads at once but answers only when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.get_gate: Deferred[None] | None = None

    async def get(self, domain: str) -> CacheEntry | None:
        entry = await super().get(domain)
        gate, self.get_gate = self.get_gate, None
        if gate is not None:
            await gate
        return entry


def test_a_late_store_read_does_not_replace_a_newer_entry_in_memory() -> None:
    w = make_world(recheck_interval=NEVER)
    store = LateReadStore()
    opened(store)
    w.store = store
    w.lookup.store = store
    old = CacheEntry(DOMAIN, Source.NEGATIVE, expires_at=T0 + 3600, checked_at=T0 - 10)
    result_of(run(store.put_many([old])))
    gate: Deferred[None] = Deferred()
    store.get_gate = gate
    late = w.ask()  # reads the NEGATIVE entry, answered late
    publish(w, P1)
    assert result_of(run(w.lookup.refresh(DOMAIN))).entry.policy == P1  # the domain publishes now
    gate.callback(None)
    assert result_of(late) == OK1
    assert w.answer() == OK1
