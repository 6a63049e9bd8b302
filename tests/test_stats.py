"""LookupStats: counters, bucketed latency percentiles and the JSON snapshot."""

from __future__ import annotations

import json
import math

import pytest
from twisted.internet.task import Clock

from postfix_mtasts.policy.model import Answer
from postfix_mtasts.stats import LATENCY_BUCKETS, LookupStats

OK = Answer.ok("secure match=mx.example servername=hostname")
NOTFOUND = Answer.notfound("none")


def stats_at(start: float = 1000.0) -> tuple[LookupStats, Clock]:
    clock = Clock()
    clock.advance(start)
    return LookupStats(clock), clock


def test_empty_stats_have_no_percentiles_and_no_hit_ratio() -> None:
    stats, _ = stats_at()
    assert stats.percentile(0.5) is None
    snapshot = stats.snapshot()
    assert snapshot["lookups"] == 0
    assert snapshot["hit_ratio"] is None
    assert snapshot["latency"] == {"p50": None, "p90": None, "p99": None, "p999": None}


def test_percentiles_are_the_upper_bounds_of_their_buckets() -> None:
    stats, _ = stats_at()
    for _ in range(90):
        stats.count_hit(OK)
    for _ in range(9):
        stats.count_lookup(OK, 0.03)  # bucket (0.025, 0.05]
    stats.count_lookup(NOTFOUND, 3.0)  # bucket (2.5, 5.0]
    assert stats.percentile(0.5) == LATENCY_BUCKETS[0]
    assert stats.percentile(0.9) == LATENCY_BUCKETS[0]
    assert stats.percentile(0.95) == 0.05
    assert stats.percentile(0.99) == 0.05
    assert stats.percentile(0.999) == 5.0
    assert stats.percentile(1.0) == 5.0


@pytest.mark.parametrize("bound", LATENCY_BUCKETS)
def test_a_latency_equal_to_a_bound_falls_in_that_bucket(bound: float) -> None:
    stats, _ = stats_at()
    stats.count_lookup(OK, bound)
    assert stats.percentile(0.5) == bound


def test_latency_beyond_the_last_bucket_is_infinite() -> None:
    stats, _ = stats_at()
    stats.count_lookup(OK, LATENCY_BUCKETS[-1] * 10)
    p50 = stats.percentile(0.5)
    assert p50 is not None and math.isinf(p50)
    assert stats.latency_sum == LATENCY_BUCKETS[-1] * 10


def test_memory_stays_constant_however_many_lookups() -> None:
    stats, _ = stats_at()
    for i in range(10_000):
        stats.count_lookup(OK, (i % 100) / 100)
    assert len(stats.latency_counts) == len(LATENCY_BUCKETS) + 1
    assert sum(stats.latency_counts) == 10_000


def test_snapshot_counts_answers_hits_and_the_hit_ratio() -> None:
    stats, clock = stats_at(1000.0)
    clock.advance(42)
    stats.count_hit(OK)
    stats.count_hit(OK)
    stats.count_skip(NOTFOUND)  # not a domain lookup: left out of the hit ratio
    stats.misses += 1
    stats.store_hits += 1
    stats.count_lookup(OK, 0.2)  # the store hit
    stats.count_lookup(NOTFOUND, 1.5)  # the miss
    stats.dns_queries += 1
    stats.fetches += 1
    stats.count_failure("sts-policy-fetch-error")
    stats.count_failure("sts-policy-fetch-error")
    snapshot = stats.snapshot()
    assert snapshot["uptime"] == 42
    assert snapshot["lookups"] == 5
    assert snapshot["answers"] == {"OK": 3, "NOTFOUND": 2}
    assert (snapshot["cache_hits"], snapshot["store_hits"], snapshot["misses"]) == (2, 1, 1)
    assert snapshot["skipped"] == 1
    assert snapshot["hit_ratio"] == pytest.approx(3 / 4)
    assert snapshot["fetch_failures"] == {"sts-policy-fetch-error": 2}
    assert snapshot["latency"]["p50"] == LATENCY_BUCKETS[0]
    assert snapshot["latency"]["p99"] == 2.5
    json.dumps(snapshot)  # JSON-ready, for ctl stats
