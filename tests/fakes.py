"""Test doubles for the lookup's collaborators: scripted DNS, HTTPS and store.

Each fake counts its calls so that a test can prove "no DNS at all" or
"exactly one fetch"; a scripted Deferred models a slow answer that the test
fires when it chooses. Unit tests only: integration tests use real servers.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from postfix_mtasts.cache import CacheEntry, StoreUnavailable
from postfix_mtasts.cache.memory import MemoryStore
from postfix_mtasts.policy.model import Mode, Policy
from postfix_mtasts.resolver import FetchFailed, FetchOK, FetchResult, TxtFound, TxtResult

T = TypeVar("T")


class _Script(Generic[T]):
    """Per-domain answers: one-shot replies first (in order), then a standing one.

    A reply is either a value or a Deferred the test fires later. Calls are
    counted per domain, and the number still waiting on a Deferred is tracked.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.standing: dict[str, T] = {}
        self.queued: dict[str, deque[T | Deferred[T]]] = {}
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def set(self, domain: str, result: T) -> None:
        """Answer every later call for ``domain`` with ``result``."""
        self.standing[domain] = result

    def hold(self, domain: str) -> Deferred[T]:
        """Make the next call for ``domain`` wait on the returned Deferred."""
        d: Deferred[T] = Deferred()
        self.queued.setdefault(domain, deque()).append(d)
        return d

    def once(self, domain: str, result: T) -> None:
        """Answer only the next call for ``domain`` with ``result``."""
        self.queued.setdefault(domain, deque()).append(result)

    async def answer(self, domain: str) -> T:
        self.calls[domain] += 1
        queue = self.queued.get(domain)
        if queue:
            reply = queue.popleft()
        elif domain in self.standing:
            reply = self.standing[domain]
        else:
            raise AssertionError(f"{self.what}: unscripted call for {domain!r}")
        if not isinstance(reply, Deferred):
            return reply
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await reply
        finally:
            self.in_flight -= 1


class FakeTxtResolver:
    """A :class:`~postfix_mtasts.resolver.TxtResolver` answering from a script."""

    def __init__(self) -> None:
        self.script: _Script[TxtResult] = _Script("TXT")

    @property
    def calls(self) -> Counter[str]:
        return self.script.calls

    @property
    def total(self) -> int:
        return self.script.total

    def set(self, domain: str, result: TxtResult) -> None:
        self.script.set(domain, result)

    def set_id(self, domain: str, policy_id: str, ttl: int = 3600) -> None:
        """Publish ``v=STSv1; id=<policy_id>`` for ``domain``."""
        self.set(domain, txt(policy_id, ttl))

    def hold(self, domain: str) -> Deferred[TxtResult]:
        return self.script.hold(domain)

    async def lookup_sts(self, domain: str) -> TxtResult:
        return await self.script.answer(domain)


class FakeFetcher:
    """A :class:`~postfix_mtasts.resolver.PolicyFetcher` answering from a script."""

    def __init__(self) -> None:
        self.script: _Script[FetchResult] = _Script("fetch")

    @property
    def calls(self) -> Counter[str]:
        return self.script.calls

    @property
    def total(self) -> int:
        return self.script.total

    @property
    def in_flight(self) -> int:
        return self.script.in_flight

    @property
    def max_in_flight(self) -> int:
        return self.script.max_in_flight

    def set(self, domain: str, result: FetchResult) -> None:
        self.script.set(domain, result)

    def set_policy(self, domain: str, policy: Policy) -> None:
        self.set(domain, fetched(policy))

    def hold(self, domain: str) -> Deferred[FetchResult]:
        return self.script.hold(domain)

    async def fetch(self, domain: str) -> FetchResult:
        return await self.script.answer(domain)


def txt(policy_id: str, ttl: int = 3600) -> TxtFound:
    return TxtFound(policy_id=policy_id, ttl=ttl, record=f"v=STSv1; id={policy_id}")


def policy(mode: Mode = Mode.ENFORCE, max_age: int = 86_400, *mx: str) -> Policy:
    return Policy(mode=mode, max_age=max_age, mx=mx or ("mx.example.net",))


def fetched(p: Policy) -> FetchOK:
    text = "version: STSv1\nmode: {}\n{}max_age: {}\n".format(
        p.mode.value, "".join(f"mx: {m}\n" for m in p.mx), p.max_age
    )
    return FetchOK(policy=p, text=text)


def fetch_failed(reason: str = "connection refused") -> FetchFailed:
    return FetchFailed(reason=reason)


class FlakyStore(MemoryStore):
    """A MemoryStore that can be switched off (every call raises
    :class:`StoreUnavailable`) and whose ``put`` can be held on a Deferred."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls: Counter[str] = Counter()
        self.put_gate: Deferred[None] | None = None
        self.puts: list[CacheEntry] = []

    def _check_open(self) -> None:
        if self.down:
            raise StoreUnavailable("store switched off by the test")
        super()._check_open()

    def stored(self, domain: str) -> CacheEntry | None:
        """What the store holds for ``domain``, read without going through the API."""
        return self._entries.get(domain)

    async def load(self, limit: int) -> list[CacheEntry]:
        self.calls["load"] += 1
        return await super().load(limit)

    async def get(self, domain: str) -> CacheEntry | None:
        self.calls["get"] += 1
        return await super().get(domain)

    async def put(self, entry: CacheEntry) -> None:
        self.calls["put"] += 1
        self._check_open()
        gate = self.put_gate
        if gate is not None:
            await gate
        await super().put(entry)
        self.puts.append(entry)

    async def put_many(self, entries: list[CacheEntry]) -> None:
        self.calls["put_many"] += 1
        await super().put_many(entries)

    async def prune(self, now: float) -> int:
        self.calls["prune"] += 1
        return await super().prune(now)

    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool:
        self.calls["acquire_lease"] += 1
        return await super().acquire_lease(domain, holder, ttl)

    async def release_lease(self, domain: str, holder: str) -> None:
        self.calls["release_lease"] += 1
        await super().release_lease(domain, holder)


def run(coro: Coroutine[Deferred[Any], Any, T]) -> Deferred[T]:
    """Start a coroutine under Twisted; with a Clock it runs until it waits on time."""
    return Deferred.fromCoroutine(coro)


def result_of(d: Deferred[T]) -> T:
    """The result of a Deferred that must already have fired successfully."""
    results: list[Any] = []

    def keep(outcome: Any) -> Any:
        results.append(outcome)
        return None if isinstance(outcome, Failure) else outcome

    d.addBoth(keep)
    assert results, "the Deferred has not fired yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def opened(store: MemoryStore) -> MemoryStore:
    result_of(run(store.open()))
    return store

