"""A fleet of daemons sharing one Redis or PostgreSQL store, end to end.

Real in-process daemons on the real reactor, one loopback World (DNS and
policy host), and a real Redis or PostgreSQL on 127.0.0.1 under a key prefix
or schema of the test's own. Outages are staged with a :class:`TcpProxy`
between a daemon and its store; every other daemon talks to the server directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from postfix_mtasts.cache import CacheEntry, IPolicyStore, Source
from postfix_mtasts.cache.layered import LayeredStore
from postfix_mtasts.cache.resilient import ResilientStore
from tests.conftest import require
from tests.support.daemon import async_yield_fixture, ensure_deferred
from tests.support.https_server import Drip
from tests.support.tcp_proxy import TcpProxy
from tests.support.world import RunningDaemon, World, socketmap_query, start_daemon

pytestmark = pytest.mark.integration

_F = TypeVar("_F", bound=Callable[..., Any])
#: pytest-twisted's decorator with arguments, typed (the package has no stubs).
parametrized_async_yield_fixture: Callable[..., Callable[[_F], _F]] = pytest_twisted.async_yield_fixture

MX = ("mx.example.com",)
SECURE = ("OK", "secure match=mx.example.com servername=hostname")
#: Seconds between bytes of a slow policy file: ~70 bytes make a fetch of
#: over a second, so a second daemon's lookup surely lands while it runs.
DRIP_INTERVAL = 0.02
#: fetch_timeout of the daemons under test: well above the slow fetch.
FETCH_TIMEOUT = 10.0
#: Bound on waiting for a store to come back (a guard, not an assertion on speed).
RECOVERY_WAIT = 30.0
POLL = 0.05
RESILIENT_LOGGER = "postfix_mtasts.cache.resilient"
FLEET_RESULT = "result: resolved by another daemon of the fleet"
INSPECTOR = "fleet-test-inspector"


# --- the shared backend ------------------------------------------------------------


class SharedBackend:
    """A real Redis or PostgreSQL namespace, reachable directly or through a cuttable proxy."""

    def __init__(self, name: str, proxy: TcpProxy, direct: str, proxied: str, namespace: str) -> None:
        self.name = name
        self.proxy = proxy
        self._direct = direct
        self._proxied = proxied
        self.namespace = namespace

    def cache_section(self, *, through_proxy: bool) -> str:
        """The TOML ``[cache.<backend>]`` table pointing a daemon at the store."""
        where = self._proxied if through_proxy else self._direct
        if self.name == "redis":
            return f'[cache.redis]\nurl = "{where}"\nkey_prefix = "{self.namespace}"\n'
        return f'[cache.postgresql]\ndsn = "{where}"\nschema = "{self.namespace}"\n'

    def fresh_store(self) -> IPolicyStore:
        """A new store on the same namespace, straight to the server, to look behind the daemons' backs."""
        if self.name == "redis":
            from postfix_mtasts.cache.redis import RedisStore

            return RedisStore(self._direct, key_prefix=self.namespace)
        from postfix_mtasts.cache.postgresql import PostgresqlStore

        return PostgresqlStore(self._direct, schema=self.namespace)

    async def stored(self, domain: str) -> CacheEntry | None:
        """What the shared store holds for ``domain``, read with a fresh store."""
        store = self.fresh_store()
        await store.open()
        try:
            return await store.get(domain)
        finally:
            await store.close()

    async def lease_taken(self, domain: str) -> bool:
        """True while some daemon holds the fleet lease for ``domain``."""
        store = self.fresh_store()
        await store.open()
        try:
            if await store.acquire_lease(domain, INSPECTOR, 5.0):
                await store.release_lease(domain, INSPECTOR)
                return False
            return True
        finally:
            await store.close()


@parametrized_async_yield_fixture(params=["redis", "postgresql"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[SharedBackend]:
    from tests import test_cache_postgresql as pg
    from tests import test_cache_redis as rd

    cleanup: Callable[[], None]
    if request.param == "redis":
        from redis.asyncio.connection import parse_url

        require(rd.REDIS_WHAT, rd.redis_reachable())
        target = parse_url(rd.REDIS_URL)
        proxy = TcpProxy(reactor, str(target.get("host", "127.0.0.1")), int(target.get("port", 6379)))
        port = proxy.start()
        prefix = rd.new_prefix()
        shared = SharedBackend(
            "redis", proxy, rd.REDIS_URL, f"redis://127.0.0.1:{port}/{target.get('db', 0)}", prefix
        )

        def cleanup() -> None:
            rd.drop_prefix(prefix)
    else:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        require(pg.POSTGRESQL_WHAT, pg.postgresql_reachable())
        target_pg = conninfo_to_dict(pg.POSTGRESQL_DSN)
        proxy = TcpProxy(
            reactor, str(target_pg.get("host") or "127.0.0.1"), int(target_pg.get("port") or 5432)
        )
        port = proxy.start()
        schema = pg.new_schema()
        shared = SharedBackend(
            "postgresql",
            proxy,
            pg.POSTGRESQL_DSN,
            make_conninfo(pg.POSTGRESQL_DSN, host="127.0.0.1", port=port),
            schema,
        )

        def cleanup() -> None:
            pg.drop_schema(schema)

    try:
        yield shared
    finally:
        await proxy.stop()
        cleanup()


# --- the world and the fleet -----------------------------------------------------------


@async_yield_fixture
async def world() -> AsyncIterator[World]:
    started = await World.start(reactor)
    yield started
    await started.stop()


class Fleet:
    """Daemons started by one test on one World and one shared backend; all stopped at teardown."""

    def __init__(self, world: World, backend: SharedBackend) -> None:
        self.world = world
        self.backend = backend
        self.running: list[RunningDaemon] = []

    async def start(self, *, through_proxy: bool = False) -> RunningDaemon:
        config = self.world.config(
            cache_backend=self.backend.name,
            resolver={"fetch_timeout": FETCH_TIMEOUT},
            extra=self.backend.cache_section(through_proxy=through_proxy),
        )
        running = await start_daemon(reactor, config)
        self.running.append(running)
        return running

    async def stop_all(self) -> None:
        while self.running:
            await self.running.pop().stop()


@async_yield_fixture
async def fleet(world: World, backend: SharedBackend) -> AsyncIterator[Fleet]:
    started = Fleet(world, backend)
    try:
        yield started
    finally:
        await started.stop_all()


# --- helpers -------------------------------------------------------------------------


async def ask(daemon: RunningDaemon, domain: str) -> tuple[str, str]:
    return await socketmap_query(daemon.socketmap_port, "postfix", domain.encode("ascii"))


def asking(daemon: RunningDaemon, domain: str) -> Deferred[tuple[str, str]]:
    """Start a lookup now; await the answer later."""
    return Deferred.fromCoroutine(ask(daemon, domain))


def publish(world: World, domain: str, policy_id: str = "id1", *, slow: bool = False) -> None:
    text = World.policy_text(mx=MX)
    world.publish(domain, text, policy_id)
    if slow:
        world.https.set_host(f"mta-sts.{domain}", Drip(text.encode("ascii"), interval=DRIP_INTERVAL))


def fetches(world: World, domain: str) -> int:
    return world.https.requests[f"mta-sts.{domain}"]


def txt_queries(world: World, domain: str) -> int:
    return world.dns.count(f"_mta-sts.{domain}", "TXT")


def lookup_of(daemon: RunningDaemon) -> Any:
    lookup = daemon.daemon.lookup
    assert lookup is not None
    return lookup


def resilient_store(daemon: RunningDaemon) -> ResilientStore:
    store: Any = daemon.daemon.store
    assert isinstance(store, LayeredStore), f"a shared backend should keep a local copy, got {store!r}"
    store = store.remote
    assert isinstance(store, ResilientStore), f"a shared backend should be wrapped, got {store!r}"
    return store


async def wait_until_available(store: ResilientStore) -> None:
    deadline = time.monotonic() + RECOVERY_WAIT
    while not store.available:
        assert time.monotonic() < deadline, f"{store.name} store did not come back within {RECOVERY_WAIT}s"
        await deferLater(reactor, POLL, lambda: None)


def messages(caplog: pytest.LogCaptureFixture, level: int, logger: str = "postfix_mtasts") -> list[str]:
    """Messages logged at exactly ``level`` by ``logger`` or its children."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and (r.name == logger or r.name.startswith(logger + "."))
    ]


def assert_fetched(entry: CacheEntry | None, domain: str, policy_id: str = "id1") -> None:
    assert entry is not None, f"{domain} is not in the shared store"
    assert entry.source is Source.FETCHED and entry.policy_id == policy_id
    assert entry.policy is not None and entry.policy.mx == MX


# --- 1. one fetch for the whole fleet ----------------------------------------------------


@ensure_deferred
async def test_both_daemons_asked_at_once_fetch_once(world: World, fleet: Fleet) -> None:
    a, b = await fleet.start(), await fleet.start()
    publish(world, "popular.example", slow=True)

    answers = await gatherResults([asking(a, "popular.example"), asking(b, "popular.example")])

    assert answers == [SECURE, SECURE]
    assert fetches(world, "popular.example") == 1
    # One daemon took the lease and fetched; the other waited for its result.
    by_fetches = sorted([a, b], key=lambda d: lookup_of(d).stats.fetches)
    waiter, fetcher = by_fetches
    assert (lookup_of(waiter).stats.fetches, lookup_of(fetcher).stats.fetches) == (0, 1)
    assert lookup_of(waiter).last_trace("popular.example")[-1] == FLEET_RESULT
    assert_fetched(await fleet.backend.stored("popular.example"), "popular.example")


@ensure_deferred
async def test_second_daemon_asking_mid_fetch_waits_for_the_lease_holder(
    world: World, fleet: Fleet
) -> None:
    a, b = await fleet.start(), await fleet.start()
    publish(world, "slow.example", slow=True)

    requested = world.https.next_request()
    first = asking(a, "slow.example")
    assert await requested == "mta-sts.slow.example"
    # A is now mid-fetch (the policy file drips in for over a second) and
    # holds the fleet's lease for the domain: nobody else may take it.
    assert not first.called
    assert await fleet.backend.lease_taken("slow.example")
    second = asking(b, "slow.example")

    assert await gatherResults([first, second]) == [SECURE, SECURE]
    assert fetches(world, "slow.example") == 1
    assert lookup_of(a).stats.fetches == 1
    assert lookup_of(b).stats.fetches == 0
    assert lookup_of(b).last_trace("slow.example")[-1] == FLEET_RESULT
    # B checked the TXT record itself (it had nothing cached), then adopted A's result.
    assert txt_queries(world, "slow.example") == 2
    # The lease is given back once the fetch is done.
    assert not await fleet.backend.lease_taken("slow.example")


class GatedTxt:
    """A daemon's real TXT resolver whose answers are held until the test opens the gate."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate: Deferred[None] = Deferred()
        self.asked: Deferred[None] = Deferred()

    async def lookup_sts(self, domain: str) -> Any:
        if not self.asked.called:
            self.asked.callback(None)
        await self.gate
        return await self.inner.lookup_sts(domain)


@ensure_deferred
async def test_lookup_whose_lease_comes_after_the_whole_fetch_adopts_the_result(
    world: World, fleet: Fleet
) -> None:
    # B misses the store while A is fetching, and its TXT answer is slow to
    # come: by the time B asks for the lease, A has stored its policy and
    # released the lease. B must take A's result, not fetch the policy again.
    a, b = await fleet.start(), await fleet.start()
    publish(world, "late.example", slow=True)
    gated = GatedTxt(lookup_of(b).txt_resolver)
    lookup_of(b).txt_resolver = gated

    requested = world.https.next_request()
    first = asking(a, "late.example")
    await requested
    second = asking(b, "late.example")
    await gated.asked
    assert await first == SECURE
    assert not await fleet.backend.lease_taken("late.example")
    gated.gate.callback(None)

    assert await second == SECURE
    assert fetches(world, "late.example") == 1
    assert lookup_of(b).stats.fetches == 0
    assert lookup_of(b).last_trace("late.example")[-1] == FLEET_RESULT


# --- 2. what one daemon learns, all answer ----------------------------------------------


@ensure_deferred
async def test_policy_learned_by_one_daemon_is_answered_by_another_without_network(
    world: World, fleet: Fleet
) -> None:
    a, b = await fleet.start(), await fleet.start()
    publish(world, "learned.example")

    assert await ask(a, "learned.example") == SECURE
    assert (fetches(world, "learned.example"), txt_queries(world, "learned.example")) == (1, 1)

    # B's memory front misses; it reads the shared store before any DNS or
    # HTTPS, and the policy (checked by A moments ago, well inside
    # recheck_interval) answers as it is: no TXT query, no fetch.
    assert await ask(b, "learned.example") == SECURE
    assert (fetches(world, "learned.example"), txt_queries(world, "learned.example")) == (1, 1)
    stats = lookup_of(b).stats
    assert (stats.store_hits, stats.dns_queries, stats.fetches) == (1, 0, 0)
    # From now on B answers from its own memory.
    assert await ask(b, "learned.example") == SECURE
    assert lookup_of(b).stats.store_hits == 1


# --- 3. the store goes away and comes back ------------------------------------------------


@pytest.mark.parametrize("hang", [False, True], ids=["refused", "hung"])
@ensure_deferred
async def test_store_outage_keeps_answering_and_writes_back_what_was_learned(
    world: World, fleet: Fleet, hang: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="postfix_mtasts")
    backend = fleet.backend
    daemon = await fleet.start(through_proxy=True)
    store = resilient_store(daemon)
    for domain in ("known.example", "new1.example", "new2.example"):
        publish(world, domain)
    assert await ask(daemon, "known.example") == SECURE
    assert_fetched(await backend.stored("known.example"), "known.example")

    await backend.proxy.cut(hang=hang)
    # Each answer arrives within the daemon's own deadlines: a cached policy
    # from memory, a new domain resolved here (the store's read fails at once
    # when refused, after the store's op_timeout when hung).
    assert await ask(daemon, "known.example") == SECURE
    assert await ask(daemon, "new1.example") == SECURE
    assert await ask(daemon, "new2.example") == SECURE
    assert await ask(daemon, "new1.example") == SECURE
    assert await ask(daemon, "known.example") == SECURE
    assert not store.available
    assert store.pending_writes >= 2
    assert await backend.stored("new1.example") is None, "the outage did not cut the daemon off"
    assert fetches(world, "new1.example") == fetches(world, "new2.example") == 1

    await backend.proxy.restore()
    await wait_until_available(store)

    assert_fetched(await backend.stored("new1.example"), "new1.example")
    assert_fetched(await backend.stored("new2.example"), "new2.example")
    assert_fetched(await backend.stored("known.example"), "known.example")
    assert store.pending_writes == 0
    # One line when the store went, one when it came back; nothing else worse than INFO.
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{backend.name} store unavailable")
    back = messages(caplog, logging.INFO, RESILIENT_LOGGER)
    assert len(back) == 1, back
    assert back[0].startswith(f"{backend.name} store is back; flushed")
    assert messages(caplog, logging.ERROR) == []


# --- 4. the store is down when the daemon starts -------------------------------------------


@ensure_deferred
async def test_daemon_starts_without_its_store_and_uses_it_once_back(
    world: World, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="postfix_mtasts")
    backend = fleet.backend
    await backend.proxy.cut()
    a = await fleet.start(through_proxy=True)
    store = resilient_store(a)
    assert not store.available
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and warnings[0].startswith(f"{backend.name} store unavailable"), warnings

    publish(world, "early.example")
    assert await ask(a, "early.example") == SECURE

    await backend.proxy.restore()
    await wait_until_available(store)
    # What A learned while the store was away reached it...
    assert_fetched(await backend.stored("early.example"), "early.example")
    # ...and A now reads what the rest of the fleet learns.
    b = await fleet.start()
    publish(world, "later.example")
    assert await ask(b, "later.example") == SECURE
    assert await ask(a, "later.example") == SECURE
    assert fetches(world, "later.example") == 1
    assert lookup_of(a).stats.store_hits == 1
    assert len(messages(caplog, logging.WARNING)) == 1
    assert len(messages(caplog, logging.INFO, RESILIENT_LOGGER)) == 1
