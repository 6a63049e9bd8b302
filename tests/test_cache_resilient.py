"""ResilientStore: unit tests on a fake store and a fake clock, then real outages.

The integration tests put a :class:`TcpProxy` between the store and a real
Redis or PostgreSQL on 127.0.0.1 and cut it, to show that lookups get their
answers at once while the backend is gone and that queued writes land after.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet import task
from twisted.internet.defer import Deferred
from zope.interface import implementer
from zope.interface.verify import verifyObject

from postfix_mtasts.cache import CacheEntry, IPolicyStore, StoreUnavailable
from postfix_mtasts.cache.resilient import PROBE_DOMAIN, ResilientStore
from tests.store_contract import (
    NOW,
    ensure_deferred,
    failed,
    fetched,
    negative,
)
from tests.support.tcp_proxy import TcpProxy

T = TypeVar("T")
_F = TypeVar("_F", bound=Callable[..., Any])

#: pytest-twisted's decorator with arguments, typed (the package has no stubs).
parametrized_async_yield_fixture: Callable[..., Callable[[_F], _F]] = pytest_twisted.async_yield_fixture

OP_TIMEOUT = 2.0
RETRY = 5.0
LOGGER = "postfix_mtasts.cache.resilient"


@implementer(IPolicyStore)
class FakeStore:
    """An in-memory store that can be made to fail (``down``) or hang (``hang``)."""

    name = "fake"
    shared = True

    def __init__(self) -> None:
        self.data: dict[str, CacheEntry] = {}
        self.down = False
        self.hang = False
        self.opened = 0
        self.closed = False
        self.calls: list[str] = []
        self.writes: list[tuple[str, str]] = []
        self.cancelled = 0
        self.leases: dict[str, str] = {}

    async def _enter(self, what: str) -> None:
        self.calls.append(what)
        if self.hang:
            try:
                await Deferred()
            except BaseException:
                self.cancelled += 1
                raise
        if self.down:
            raise StoreUnavailable("fake backend refused the connection")

    async def open(self) -> None:
        await self._enter("open")
        self.opened += 1

    async def load(self, limit: int) -> list[CacheEntry]:
        await self._enter("load")
        return sorted(self.data.values(), key=lambda e: -e.last_used)[:limit]

    async def get(self, domain: str) -> CacheEntry | None:
        await self._enter("get")
        return self.data.get(domain)

    async def put(self, entry: CacheEntry) -> None:
        await self.put_many([entry])

    async def put_many(self, entries: list[CacheEntry]) -> None:
        await self._enter("put_many")
        for entry in entries:
            self.data[entry.domain] = entry
            self.writes.append(("put", entry.domain))

    async def delete(self, domain: str) -> None:
        await self._enter("delete")
        self.data.pop(domain, None)
        self.writes.append(("delete", domain))

    async def delete_all(self) -> None:
        await self._enter("delete_all")
        self.data.clear()
        self.writes.append(("delete_all", ""))

    async def prune(self, now: float) -> int:
        await self._enter("prune")
        due = [d for d, e in self.data.items() if not e.in_force(now)]
        for domain in due:
            del self.data[domain]
        return len(due)

    async def count(self) -> int:
        await self._enter("count")
        return len(self.data)

    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool:
        await self._enter("acquire_lease")
        return self.leases.setdefault(domain, holder) == holder

    async def release_lease(self, domain: str, holder: str) -> None:
        await self._enter("release_lease")
        if self.leases.get(domain) == holder:
            del self.leases[domain]

    async def close(self) -> None:
        await self._enter("close")
        self.closed = True


def run(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


def result_of(d: Deferred[T]) -> T:
    """The result of a Deferred that must have fired already."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the call is still waiting"
    if isinstance(results[0], BaseException) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def fake() -> FakeStore:
    return FakeStore()


@pytest.fixture
def store(clock: task.Clock, fake: FakeStore) -> Iterator[ResilientStore]:
    wrapped = ResilientStore(clock, fake, op_timeout=OP_TIMEOUT, retry_interval=RETRY)
    result_of(run(wrapped.open()))
    yield wrapped


def test_provides_interface(store: ResilientStore) -> None:
    assert verifyObject(IPolicyStore, store)
    assert store.name == "fake"


def test_passes_calls_through_while_up(store: ResilientStore, fake: FakeStore) -> None:
    entry = fetched("a.example")
    result_of(run(store.put(entry)))
    result_of(run(store.put_many([negative("b.example", expires_at=NOW - 1)])))
    assert result_of(run(store.get("a.example"))) == entry
    assert [e.domain for e in result_of(run(store.load(10)))] == ["a.example", "b.example"]
    assert result_of(run(store.count())) == 2
    assert result_of(run(store.prune(NOW))) == 1
    assert result_of(run(store.acquire_lease("a.example", "me", 30))) is True
    assert result_of(run(store.acquire_lease("a.example", "other", 30))) is False
    result_of(run(store.delete("a.example")))
    assert fake.data == {}
    assert store.available and store.pending_writes == 0


def test_one_warning_when_the_store_goes_away(
    store: ResilientStore, fake: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    result_of(run(store.put(fetched("kept.example"))))
    fake.down = True
    for i in range(20):
        assert result_of(run(store.get("kept.example"))) is None
        result_of(run(store.put(negative(f"d{i}.example"))))
    assert result_of(run(store.load(100))) == []
    assert result_of(run(store.count())) == 0
    assert result_of(run(store.prune(NOW))) == 0
    assert result_of(run(store.acquire_lease("x.example", "me", 30))) is True
    result_of(run(store.release_lease("x.example", "me")))

    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert "fake store unavailable" in warnings[0]
    assert "fake backend refused the connection" in warnings[0]
    assert "lookups continue from memory" in warnings[0]
    assert not store.available
    assert store.pending_writes == 20
    # After the first failed get nothing reached the store: the rest answered at once.
    assert fake.calls == ["open", "put_many", "get"]


def test_queued_writes_flushed_in_order_once_back(
    store: ResilientStore, fake: FakeStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.data["old.example"] = fetched("old.example")
    fake.down = True
    result_of(run(store.put(fetched("a.example"))))
    result_of(run(store.delete("old.example")))
    result_of(run(store.put_many([negative("b.example"), negative("c.example")])))
    assert store.pending_writes == 4

    clock.advance(RETRY)  # a probe while still down changes nothing
    assert not store.available and store.pending_writes == 4
    assert fake.writes == []

    fake.down = False
    clock.advance(RETRY)
    assert store.available and store.pending_writes == 0
    assert fake.writes == [
        ("put", "a.example"),
        ("delete", "old.example"),
        ("put", "b.example"),
        ("put", "c.example"),
    ]
    assert set(fake.data) == {"a.example", "b.example", "c.example"}
    infos = records(caplog, logging.INFO)
    assert infos == ["fake store is back; flushed 4 queued writes"]
    assert len(records(caplog, logging.WARNING)) == 1
    # Back to normal: calls go straight through again.
    assert result_of(run(store.get("a.example"))) == fetched("a.example")


def test_newest_write_per_domain_wins(store: ResilientStore, fake: FakeStore, clock: task.Clock) -> None:
    fake.down = True
    result_of(run(store.put(fetched("a.example", policy_id="first"))))
    result_of(run(store.put(fetched("b.example"))))
    result_of(run(store.put(fetched("a.example", policy_id="second"))))
    result_of(run(store.put(fetched("c.example"))))
    result_of(run(store.delete("c.example")))
    assert store.pending_writes == 3
    # While down, a read sees what is queued for the domain.
    queued = result_of(run(store.get("a.example")))
    assert queued is not None and queued.policy_id == "second"
    assert result_of(run(store.get("c.example"))) is None

    fake.down = False
    clock.advance(RETRY)
    assert fake.writes == [("put", "b.example"), ("put", "a.example"), ("delete", "c.example")]
    assert fake.data["a.example"].policy_id == "second"


def test_write_back_never_replaces_a_stored_policy_with_an_entry_without_one(
    store: ResilientStore, fake: FakeStore, clock: task.Clock
) -> None:
    # A daemon cut off from the store (restarted meanwhile, or its memory
    # evicted the domain) cannot see the policy stored there, so what it learns
    # (a failed fetch, a record an attacker hides) says nothing about that
    # policy; written back, it would erase it for the whole fleet.
    clock.advance(NOW)
    fake.data["policy.example"] = fetched("policy.example")
    fake.data["lapsed.example"] = fetched("lapsed.example", expires_at=NOW - 1)
    fake.down = True
    result_of(run(store.put_many([
        failed("policy.example", expires_at=NOW + 60),
        negative("lapsed.example"),
        negative("new.example"),
        negative("stale.example", expires_at=NOW + 1),
    ])))
    clock.advance(RETRY)
    fake.down = False
    clock.advance(RETRY)
    assert store.available and store.pending_writes == 0
    assert fake.data["policy.example"] == fetched("policy.example")
    assert fake.data["lapsed.example"] == negative("lapsed.example")
    assert fake.data["new.example"] == negative("new.example")
    # Expired before it could be written: nothing worth keeping.
    assert "stale.example" not in fake.data


def test_queue_is_bounded_dropping_the_oldest(
    clock: task.Clock, fake: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = ResilientStore(clock, fake, op_timeout=OP_TIMEOUT, retry_interval=RETRY, max_pending=3)
    result_of(run(store.open()))
    fake.down = True
    for i in range(5):
        result_of(run(store.put(negative(f"d{i}.example"))))
    result_of(run(store.put(negative("d3.example"))))  # already queued: nothing dropped
    assert store.pending_writes == 3
    assert store.dropped_writes == 2
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 2 and "write queue full (3)" in warnings[1]

    fake.down = False
    clock.advance(RETRY)
    assert [d for _, d in fake.writes] == ["d2.example", "d4.example", "d3.example"]
    assert records(caplog, logging.INFO) == [
        "fake store is back; flushed 3 queued writes, 2 dropped while the queue was full"
    ]


def test_a_hung_call_times_out_and_is_cancelled(
    store: ResilientStore, fake: FakeStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    fake.hang = True
    pending = run(store.get("a.example"))
    write = run(store.put(negative("a.example")))
    clock.advance(OP_TIMEOUT - 0.1)
    assert not pending.called and not write.called
    clock.advance(0.1)
    assert result_of(pending) is None
    result_of(write)
    assert fake.cancelled == 2
    assert not store.available and store.pending_writes == 1
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1 and f"get timed out after {OP_TIMEOUT:g}s" in warnings[0]

    # Further calls do not wait on the hung store at all.
    assert result_of(run(store.get("b.example"))) is None
    assert fake.calls.count("get") == 1

    fake.hang = False
    clock.advance(RETRY)
    assert store.available and fake.data["a.example"] == negative("a.example")
    # The probe, then the write-back's check that a.example has no policy stored.
    assert fake.calls.count("get") == 3 and PROBE_DOMAIN not in fake.data


def test_probe_that_hangs_is_cut_short_and_retried(
    store: ResilientStore, fake: FakeStore, clock: task.Clock
) -> None:
    fake.down = True
    result_of(run(store.put(negative("a.example"))))
    fake.down, fake.hang = False, True
    clock.advance(RETRY)
    clock.advance(OP_TIMEOUT)
    assert fake.cancelled == 1 and not store.available
    fake.hang = False
    clock.advance(RETRY)
    assert store.available and "a.example" in fake.data


def test_store_down_at_start_is_opened_later(
    clock: task.Clock, fake: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.down = True
    store = ResilientStore(clock, fake, op_timeout=OP_TIMEOUT, retry_interval=RETRY)
    result_of(run(store.open()))
    assert not store.available and fake.opened == 0
    result_of(run(store.put(negative("a.example"))))
    fake.down = False
    clock.advance(RETRY)
    assert store.available and fake.opened == 1
    assert "a.example" in fake.data
    assert records(caplog, logging.INFO) == ["fake store is back; flushed 1 queued writes"]


def test_delete_all_while_down_drops_earlier_writes(
    store: ResilientStore, fake: FakeStore, clock: task.Clock
) -> None:
    fake.data["old.example"] = negative("old.example")
    fake.down = True
    result_of(run(store.put(negative("before.example"))))
    result_of(run(store.delete_all()))
    result_of(run(store.put(negative("after.example"))))
    assert store.pending_writes == 2
    fake.down = False
    clock.advance(RETRY)
    assert fake.writes == [("delete_all", ""), ("put", "after.example")]
    assert set(fake.data) == {"after.example"}


def test_failed_flush_keeps_the_rest_queued(
    store: ResilientStore, fake: FakeStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.down = True
    result_of(run(store.put(negative("a.example"))))
    result_of(run(store.delete("b.example")))
    result_of(run(store.put(negative("c.example"))))
    fake.down = False
    original_delete = fake.delete

    async def failing_delete(domain: str) -> None:
        fake.down = True
        await original_delete(domain)

    fake.delete = failing_delete  # type: ignore[method-assign]
    clock.advance(RETRY)
    assert not store.available and store.pending_writes == 2
    assert fake.writes == [("put", "a.example")]
    fake.delete = original_delete  # type: ignore[method-assign]
    fake.down = False
    clock.advance(RETRY)
    assert store.available and store.pending_writes == 0
    assert fake.writes == [("put", "a.example"), ("delete", "b.example"), ("put", "c.example")]
    assert records(caplog, logging.INFO) == ["fake store is back; flushed 3 queued writes"]


def test_close_flushes_what_it_can(store: ResilientStore, fake: FakeStore, clock: task.Clock) -> None:
    fake.down = True
    result_of(run(store.put(negative("a.example"))))
    fake.down = False  # back, but no probe has run yet
    result_of(run(store.close()))
    assert "a.example" in fake.data and fake.closed
    assert clock.getDelayedCalls() == []


def test_close_while_down_gives_up_within_op_timeout(
    store: ResilientStore, fake: FakeStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    fake.hang = True
    write = run(store.put(negative("a.example")))
    clock.advance(OP_TIMEOUT)
    result_of(write)
    closing = run(store.close())
    clock.advance(OP_TIMEOUT)  # the final flush gives up
    assert not closing.called
    clock.advance(OP_TIMEOUT)  # the inner close gives up too
    result_of(closing)
    warnings = records(caplog, logging.WARNING)
    assert warnings[-1] == "fake store: 1 queued writes could not be written before shutdown"
    assert clock.getDelayedCalls() == []


# --- integration: real outages through a proxy -------------------------------------

#: Bound on waiting for the store to come back (not an assertion on speed).
RECOVERY_WAIT = 20.0
INTEGRATION_OP_TIMEOUT = 1.0
INTEGRATION_RETRY = 0.1


async def sleep(seconds: float) -> None:
    await task.deferLater(global_reactor, seconds, lambda: None)


async def wait_until_available(store: ResilientStore) -> None:
    deadline = time.monotonic() + RECOVERY_WAIT
    while not store.available:
        assert time.monotonic() < deadline, f"{store.name} store did not come back"
        await sleep(0.05)


class Backend:
    """A real server reached directly and through a cuttable proxy."""

    def __init__(self, direct: Any, proxied: Any, proxy: TcpProxy) -> None:
        self.direct = direct
        self.proxied = proxied
        self.proxy = proxy


@parametrized_async_yield_fixture(params=["redis", "postgresql"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    from tests import test_cache_postgresql as pg
    from tests import test_cache_redis as rd
    from tests.conftest import require

    if request.param == "redis":
        from redis.asyncio.connection import parse_url

        from postfix_mtasts.cache.redis import RedisStore

        require(rd.REDIS_WHAT, rd.redis_reachable())
        target = parse_url(rd.REDIS_URL)
        proxy = TcpProxy(global_reactor, str(target.get("host", "127.0.0.1")), int(target.get("port", 6379)))
        port = proxy.start()
        prefix = rd.new_prefix()
        db = target.get("db", 0)
        direct: Any = RedisStore(rd.REDIS_URL, key_prefix=prefix, clock=lambda: NOW)
        proxied: Any = RedisStore(f"redis://127.0.0.1:{port}/{db}", key_prefix=prefix, clock=lambda: NOW)

        def cleanup() -> None:
            rd.drop_prefix(prefix)
    else:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        from postfix_mtasts.cache.postgresql import PostgresqlStore

        require(pg.POSTGRESQL_WHAT, pg.postgresql_reachable())
        target_pg = conninfo_to_dict(pg.POSTGRESQL_DSN)
        proxy = TcpProxy(
            global_reactor, str(target_pg.get("host") or "127.0.0.1"), int(target_pg.get("port") or 5432)
        )
        port = proxy.start()
        schema = pg.new_schema()
        direct = PostgresqlStore(pg.POSTGRESQL_DSN, schema=schema)
        proxied = PostgresqlStore(
            make_conninfo(pg.POSTGRESQL_DSN, host="127.0.0.1", port=port), schema=schema
        )

        def cleanup() -> None:
            pg.drop_schema(schema)

    try:
        await direct.open()
        yield Backend(direct, proxied, proxy)
    finally:
        await direct.close()
        await proxy.stop()
        cleanup()


@pytest.mark.integration
@pytest.mark.parametrize("hang", [False, True], ids=["refused", "hung"])
@ensure_deferred
async def test_outage_through_proxy(backend: Backend, hang: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = ResilientStore(
        global_reactor,
        backend.proxied,
        op_timeout=INTEGRATION_OP_TIMEOUT,
        retry_interval=INTEGRATION_RETRY,
    )
    await store.open()
    try:
        assert store.available
        await store.put(fetched("before.example"))
        assert await backend.direct.get("before.example") == fetched("before.example")

        await backend.proxy.cut(hang=hang)
        # The first call notices the outage (at once when refused, after
        # op_timeout when hung); every later one returns without waiting.
        assert await store.get("before.example") is None
        assert not store.available
        assert await store.get("before.example") is None
        assert await store.load(10) == []
        assert await store.acquire_lease("before.example", "daemon-a", 30.0) is True
        await store.put(fetched("during.example"))
        await store.delete("before.example")
        assert store.pending_writes == 2
        assert await backend.direct.get("during.example") is None

        await backend.proxy.restore()
        await wait_until_available(store)
        assert store.pending_writes == 0
        assert await backend.direct.get("during.example") == fetched("during.example")
        assert await backend.direct.get("before.example") is None
        assert await store.get("during.example") == fetched("during.example")

        warnings = records(caplog, logging.WARNING)
        assert len(warnings) == 1 and warnings[0].startswith(f"{store.name} store unavailable")
        assert records(caplog, logging.INFO) == [f"{store.name} store is back; flushed 2 queued writes"]
    finally:
        await store.close()


# --- the asyncio bridge the shared stores use ---------------------------------------


@ensure_deferred
async def test_bridge_returns_result_and_cancels_the_task() -> None:
    import asyncio

    from twisted.internet.defer import CancelledError

    from postfix_mtasts.asyncio_bridge import from_asyncio

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert await from_asyncio(answer()) == 42
    assert await from_asyncio(answer(), timeout=60) == 42

    async def fails() -> None:
        raise ValueError("from asyncio")

    with pytest.raises(ValueError, match="from asyncio"):
        await from_asyncio(fails())

    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    waiting = Deferred.fromCoroutine(from_asyncio(forever()))
    await from_asyncio(started.wait())
    waiting.cancel()
    with pytest.raises(CancelledError):
        await waiting
    await from_asyncio(cancelled.wait(), timeout=60)


@ensure_deferred
async def test_bridge_timeout_does_not_wait_for_a_task_that_ignores_cancellation() -> None:
    """Some clients swallow a cancellation; the caller must still go on at its deadline."""
    import asyncio

    from postfix_mtasts.asyncio_bridge import from_asyncio

    release = asyncio.Event()
    finished = asyncio.Event()

    async def stubborn() -> str:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                pass  # ignored on purpose
        finished.set()
        return "late"

    with pytest.raises(TimeoutError, match=r"timed out after 0\.05s"):
        await from_asyncio(stubborn(), timeout=0.05)
    assert not finished.is_set()
    release.set()
    await from_asyncio(finished.wait(), timeout=60)
