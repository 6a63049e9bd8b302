"""What the service counts besides the lookup's own statistics: answers per
profile, and how long policy fetches take (for ``ctl stats`` and metrics)."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

from postfix_mtasts.limits import FETCH_BUCKETS
from postfix_mtasts.policy.model import Answer
from postfix_mtasts.resolver import FetchResult, PolicyFetcher


@dataclass
class ServiceCounters:
    """Lookups per profile and answer, and how long policy fetches take."""

    by_profile: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: One count per FETCH_BUCKETS bound, plus one for slower fetches.
    fetch_counts: list[int] = field(default_factory=lambda: [0] * (len(FETCH_BUCKETS) + 1))
    fetch_seconds: float = 0.0

    def count_answer(self, profile: str, answer: Answer) -> None:
        self.by_profile[(profile, answer.kind._value_)] += 1

    def count_fetch(self, seconds: float) -> None:
        self.fetch_counts[bisect.bisect_left(FETCH_BUCKETS, seconds)] += 1
        self.fetch_seconds += seconds

    def profiles_snapshot(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for (profile, answer), count in sorted(self.by_profile.items()):
            result.setdefault(profile, {})[answer] = count
        return result


class TimedFetcher:
    """A :class:`PolicyFetcher` that records how long each fetch of the one it wraps took."""

    def __init__(self, inner: PolicyFetcher, clock: IReactorTime, counters: ServiceCounters) -> None:
        self.inner = inner
        self.clock = clock
        self.counters = counters

    async def fetch(self, domain: str) -> FetchResult:
        started = self.clock.seconds()
        try:
            return await self.inner.fetch(domain)
        finally:
            self.counters.count_fetch(self.clock.seconds() - started)
