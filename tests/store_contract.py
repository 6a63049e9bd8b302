"""The behaviour every :class:`IPolicyStore` backend must show, as reusable tests.

A backend's test module subclasses :class:`StoreContract` and provides a
``store_factory`` fixture that yields a :class:`StoreFactory` for a fresh, empty
backing place (a file, a database, a key prefix)::

    @async_yield_fixture
    async def store_factory(tmp_path):
        factory = MyFactory(tmp_path)
        yield factory
        await factory.close_all()

    class TestMyStore(StoreContract):
        pass

Every test below then runs against that backend.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer
from zope.interface.verify import verifyObject

from postfix_mtasts.cache import CacheEntry, IPolicyStore, Source, StoreUnavailable
from postfix_mtasts.policy.model import Mode, Policy

_F = TypeVar("_F", bound=Callable[..., Any])
_S = TypeVar("_S", bound="PolicyStore")

#: Typed aliases of pytest-twisted's decorators (the package has no stubs).
ensure_deferred: Callable[[_F], _F] = pytest_twisted.ensureDeferred
async_fixture: Callable[[_F], _F] = pytest_twisted.async_fixture
async_yield_fixture: Callable[[_F], _F] = pytest_twisted.async_yield_fixture

#: An arbitrary fixed "now" so that expiry arithmetic in the tests is exact.
NOW = 1_700_000_000.0
DAY = 86_400.0


class PolicyStore(Protocol):
    """The methods of :class:`IPolicyStore`, for the type checker."""

    name: str

    async def open(self) -> None: ...
    async def load(self, limit: int) -> list[CacheEntry]: ...
    async def get(self, domain: str) -> CacheEntry | None: ...
    async def put(self, entry: CacheEntry) -> None: ...
    async def put_many(self, entries: list[CacheEntry]) -> None: ...
    async def delete(self, domain: str) -> None: ...
    async def delete_all(self) -> None: ...
    async def prune(self, now: float) -> int: ...
    async def count(self) -> int: ...
    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool: ...
    async def release_lease(self, domain: str, holder: str) -> None: ...
    async def close(self) -> None: ...


class StoreFactory(abc.ABC):
    """Opens stores of one backend, all on the same backing place."""

    #: True for a store shared by a fleet of daemons: a lease held by one
    #: holder is refused to another until released. Local stores grant all.
    shared: bool = False

    def __init__(self) -> None:
        self._opened: list[PolicyStore] = []

    @abc.abstractmethod
    async def _create(self) -> PolicyStore:
        """A store object (not yet opened) on this factory's backing place."""

    def adopt(self, store: _S) -> _S:
        """Have ``store``, made by a test itself, closed at teardown."""
        self._opened.append(store)
        return store

    async def open_store(self) -> PolicyStore:
        """A newly opened store that sees whatever earlier stores wrote."""
        store = await self._create()
        self._opened.append(store)  # closed at teardown even if a test fails
        await store.open()
        return store

    async def reopen(self, store: PolicyStore) -> PolicyStore:
        """Close ``store`` and open the same backing place again."""
        await store.close()
        return await self.open_store()

    async def close_all(self) -> None:
        """Close every store this factory made (closing twice, or closing a
        store whose open() failed, must be harmless)."""
        for store in self._opened:
            await store.close()
        self._opened.clear()


def fetched(
    domain: str,
    *,
    last_used: float = NOW,
    expires_at: float = NOW + 7 * DAY,
    mx: tuple[str, ...] = (
        "mx1.example.net",
        "*.mail.example.net",
        "backup.example.org",
    ),
    policy_id: str = "20240101T000000",
) -> CacheEntry:
    """A FETCHED entry with a policy and its text, as discovery would store it."""
    policy = Policy(mode=Mode.ENFORCE, max_age=604_800, mx=mx)
    text = "version: STSv1\r\nmode: enforce\r\n" + "".join(f"mx: {p}\r\n" for p in mx)
    text += "max_age: 604800\r\n"
    return CacheEntry(
        domain=domain,
        source=Source.FETCHED,
        expires_at=expires_at,
        checked_at=NOW - 30.5,
        policy_id=policy_id,
        policy=policy,
        policy_text=text,
        fetched_at=NOW - 60.25,
        last_used=last_used,
    )


def negative(domain: str, *, last_used: float = NOW, expires_at: float = NOW + 3600) -> CacheEntry:
    """A NEGATIVE entry: the domain publishes no MTA-STS record."""
    return CacheEntry(
        domain=domain,
        source=Source.NEGATIVE,
        expires_at=expires_at,
        checked_at=NOW,
        last_used=last_used,
    )


def failed(domain: str, *, last_used: float = NOW, expires_at: float = NOW + 300) -> CacheEntry:
    """A FAILED entry: a record promises a policy that could not be fetched."""
    return CacheEntry(
        domain=domain,
        source=Source.FAILED,
        expires_at=expires_at,
        checked_at=NOW,
        failed_id="abc123",
        retry_at=NOW + 300,
        failure="TLS certificate for mta-sts.example.com not trusted: unknown CA",
        last_used=last_used,
    )


_BUILDERS: dict[str, Callable[[str], CacheEntry]] = {
    "fetched": fetched,
    "fetched-no-mx": lambda d: fetched(d, mx=()),
    "fetched-unicode-text": lambda d: fetched(d, mx=("xn--bcher-kva.example",), policy_id="ü"),
    "negative": negative,
    "failed": failed,
}


class StoreContract:
    """Tests every backend must pass; needs a ``store_factory`` fixture."""

    @ensure_deferred
    async def test_provides_interface(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        assert verifyObject(IPolicyStore, store)
        assert isinstance(store.name, str) and store.name

    @ensure_deferred
    async def test_get_missing_is_none(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        assert await store.get("absent.example") is None
        await store.put(negative("present.example"))
        assert await store.get("absent.example") is None

    @pytest.mark.parametrize("kind", sorted(_BUILDERS))
    @ensure_deferred
    async def test_round_trip(self, store_factory: StoreFactory, kind: str) -> None:
        store = await store_factory.open_store()
        entry = _BUILDERS[kind]("example.com")
        await store.put(entry)
        got = await store.get("example.com")
        assert got == entry
        assert got is not None and got.source == entry.source

    @ensure_deferred
    async def test_put_replaces(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        await store.put(failed("example.com"))
        replacement = fetched("example.com", policy_id="second")
        await store.put(replacement)
        assert await store.get("example.com") == replacement
        assert await store.count() == 1

    @ensure_deferred
    async def test_put_many(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        await store.put(negative("c.example"))
        batch = [fetched("a.example"), failed("b.example"), fetched("c.example")]
        await store.put_many(batch)
        for entry in batch:
            assert await store.get(entry.domain) == entry
        assert await store.count() == 3
        await store.put_many([])
        assert await store.count() == 3

    @ensure_deferred
    async def test_put_many_last_of_a_domain_wins(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        last = fetched("a.example", policy_id="last")
        await store.put_many([fetched("a.example", policy_id="first"), last])
        assert await store.get("a.example") == last
        assert await store.count() == 1

    @ensure_deferred
    async def test_delete(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        await store.put_many([fetched("a.example"), negative("b.example")])
        await store.delete("a.example")
        assert await store.get("a.example") is None
        assert await store.get("b.example") == negative("b.example")
        await store.delete("never-stored.example")
        assert await store.count() == 1

    @ensure_deferred
    async def test_delete_all(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        await store.put_many([fetched(f"d{i}.example") for i in range(10)])
        await store.delete_all()
        assert await store.count() == 0
        assert await store.get("d3.example") is None
        assert await store.load(100) == []
        await store.put(negative("after.example"))
        assert await store.count() == 1

    @ensure_deferred
    async def test_count(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        assert await store.count() == 0
        await store.put(fetched("a.example"))
        await store.put(fetched("a.example"))
        assert await store.count() == 1
        await store.put(negative("b.example"))
        assert await store.count() == 2

    @ensure_deferred
    async def test_load_most_recently_used_first(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        used = {
            "a.example": 50.0,
            "b.example": 10.0,
            "c.example": 40.0,
            "d.example": 30.0,
        }
        await store.put_many([fetched(d, last_used=NOW + t) for d, t in used.items()])
        await store.put(negative("e.example", last_used=NOW + 20.0))
        loaded = await store.load(3)
        assert [e.domain for e in loaded] == ["a.example", "c.example", "d.example"]
        assert loaded[0] == fetched("a.example", last_used=NOW + 50.0)
        everything = await store.load(100)
        assert [e.domain for e in everything] == [
            "a.example",
            "c.example",
            "d.example",
            "e.example",
            "b.example",
        ]
        assert await store.load(0) == []

    @ensure_deferred
    async def test_load_follows_a_touched_entry(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        await store.put_many(
            [
                fetched("old.example", last_used=NOW),
                fetched("new.example", last_used=NOW + 1),
            ]
        )
        await store.put(fetched("old.example").touched(NOW + 2))
        loaded = await store.load(1)
        assert [e.domain for e in loaded] == ["old.example"]
        assert loaded[0].last_used == NOW + 2

    @ensure_deferred
    async def test_prune_removes_only_entries_not_in_force(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        await store.put_many(
            [
                fetched("expired.example", expires_at=NOW - 10),
                failed("ends-now.example", expires_at=NOW),
                negative("live.example", expires_at=NOW + 0.5),
                fetched("long.example", expires_at=NOW + DAY),
            ]
        )
        assert await store.prune(NOW) == 2
        assert await store.get("expired.example") is None
        assert await store.get("ends-now.example") is None
        assert await store.get("live.example") is not None
        assert await store.get("long.example") is not None
        assert await store.prune(NOW) == 0
        assert await store.count() == 2

    @ensure_deferred
    async def test_reopen_sees_everything_put(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        kept = [fetched("a.example"), negative("b.example"), failed("c.example")]
        await store.put(kept[0])
        await store.put_many([*kept[1:], fetched("gone.example")])
        await store.delete("gone.example")
        store = await store_factory.reopen(store)
        for entry in kept:
            assert await store.get(entry.domain) == entry
        assert await store.get("gone.example") is None
        assert await store.count() == 3

    @ensure_deferred
    async def test_concurrent_puts_all_land(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        entries = [fetched(f"host{i}.example", last_used=NOW + i) for i in range(50)]
        await defer.gatherResults([defer.Deferred.fromCoroutine(store.put(e)) for e in entries])
        assert await store.count() == 50
        for entry in entries:
            assert await store.get(entry.domain) == entry
        assert [e.domain for e in await store.load(2)] == [
            "host49.example",
            "host48.example",
        ]

    @ensure_deferred
    async def test_leases(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        assert await store.acquire_lease("example.com", "daemon-a", 30.0) is True
        second = await store.acquire_lease("example.com", "daemon-b", 30.0)
        if store_factory.shared:
            assert second is False
            assert await store.acquire_lease("other.example", "daemon-b", 30.0) is True
            await store.release_lease("example.com", "daemon-a")
            assert await store.acquire_lease("example.com", "daemon-b", 30.0) is True
            await store.release_lease("example.com", "daemon-b")
        else:
            assert second is True
            await store.release_lease("example.com", "daemon-a")
            await store.release_lease("example.com", "daemon-b")
        await store.release_lease("never-leased.example", "daemon-c")

    @ensure_deferred
    async def test_closed_store_is_unavailable(self, store_factory: StoreFactory) -> None:
        store = await store_factory.open_store()
        await store.put(negative("a.example"))
        await store.close()
        with pytest.raises(StoreUnavailable):
            await store.get("a.example")
        with pytest.raises(StoreUnavailable):
            await store.put(negative("b.example"))
        await store.close()
