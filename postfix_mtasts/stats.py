"""What the daemon keeps about itself: counters for ``ctl stats`` and metrics,
and the trace of recent resolutions for ``ctl show``."""

from __future__ import annotations

import bisect
from collections import Counter, OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime

from postfix_mtasts.policy.model import Answer

#: Upper bounds (seconds) of the lookup latency buckets; percentiles are read
#: off these buckets, so memory stays constant however many lookups we serve.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0,
)


class LookupStats:
    """Lookups by answer, cache hits, fetches and failures, latency buckets."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.started = reactor.seconds()
        self.answers: Counter[str] = Counter()
        self.hits = 0
        self.skipped = 0
        self.store_hits = 0
        self.misses = 0
        self.dns_queries = 0
        self.fetches = 0
        self.fetch_failures: Counter[str] = Counter()
        self.refresh_queue = 0
        # One count per bucket plus one for "slower than the last bucket".
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def count_hit(self, answer: Answer) -> None:
        """A lookup answered from memory; its latency counts as the first bucket."""
        self.hits += 1
        # _value_, not .value: the same string without enum's descriptor call.
        self.answers[answer.kind._value_] += 1
        self.latency_counts[0] += 1

    def count_skip(self, answer: Answer) -> None:
        """A key answered without any lookup (parent probe, IP literal, ...)."""
        self.skipped += 1
        self.answers[answer.kind.value] += 1
        self.latency_counts[0] += 1

    def count_lookup(self, answer: Answer, seconds: float) -> None:
        self.answers[answer.kind.value] += 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def count_failure(self, category: str) -> None:
        self.fetch_failures[category] += 1

    @property
    def lookups(self) -> int:
        return sum(self.answers.values())

    def percentile(self, fraction: float) -> float | None:
        """Upper bound of the bucket holding the given fraction of lookups."""
        total = sum(self.latency_counts)
        if total == 0:
            return None
        wanted = fraction * total
        running = 0
        for index, count in enumerate(self.latency_counts):
            running += count
            if running >= wanted:
                return LATENCY_BUCKETS[index] if index < len(LATENCY_BUCKETS) else float("inf")
        return float("inf")

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain JSON-ready values."""
        lookups = self.lookups
        answered_from_cache = self.hits + self.store_hits
        lookups_of_domains = lookups - self.skipped
        return {
            "uptime": self.reactor.seconds() - self.started,
            "lookups": lookups,
            "answers": dict(self.answers),
            "cache_hits": self.hits,
            "skipped": self.skipped,
            "store_hits": self.store_hits,
            "misses": self.misses,
            "hit_ratio": (answered_from_cache / lookups_of_domains) if lookups_of_domains else None,
            "dns_queries": self.dns_queries,
            "fetches": self.fetches,
            "fetch_failures": dict(self.fetch_failures),
            "refresh_queue": self.refresh_queue,
            "latency": {
                "p50": self.percentile(0.50),
                "p90": self.percentile(0.90),
                "p99": self.percentile(0.99),
                "p999": self.percentile(0.999),
            },
        }


#: Traces of the last resolution kept for ``ctl show``.
TRACES_KEPT = 1000


class RecentTraces:
    """The step-by-step trace of the last resolution of the most recently
    resolved domains (at most TRACES_KEPT)."""

    def __init__(self, kept: int = TRACES_KEPT) -> None:
        self.kept = kept
        self._traces: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def record(self, domain: str, steps: tuple[str, ...], result: str) -> None:
        self._traces[domain] = (*steps, f"result: {result}")
        self._traces.move_to_end(domain)
        while len(self._traces) > self.kept:
            self._traces.popitem(last=False)

    def last(self, domain: str) -> tuple[str, ...]:
        return self._traces.get(domain, ())
