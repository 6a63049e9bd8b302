"""Prometheus metrics, served over HTTP by Twisted itself (no thread).

Everything is read from the daemon's own counters at scrape time by one
collector in a registry private to the daemon, so serving metrics costs
nothing between scrapes. Needs the optional ``prometheus_client`` package
(``pip install 'postfix-mtasts[metrics]'``); importing this module without it
raises ImportError, which the service turns into one start-up line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from postfix_mtasts import __version__
from postfix_mtasts.limits import FETCH_BUCKETS
from postfix_mtasts.lookup import PolicyLookup
from postfix_mtasts.stats import LATENCY_BUCKETS

#: Prefix of every metric name.
NAMESPACE = "postfix_mtasts"
#: The path Prometheus scrapes; "/" answers too.
METRICS_PATH = b"metrics"


class MetricsSource(Protocol):
    """What the collector reads (a :class:`postfix_mtasts.service.Service`)."""

    @property
    def lookup(self) -> PolicyLookup: ...

    @property
    def counters(self) -> Any: ...

    @property
    def daemon(self) -> Any: ...


def histogram_buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Cumulative ``le`` buckets from per-bucket counts (the last count is "above every bound")."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        buckets.append((repr(float(bound)), float(running)))
    running += sum(counts[len(bounds):])
    buckets.append(("+Inf", float(running)))
    return buckets


class DaemonCollector:
    """Turns the daemon's counters into Prometheus metric families at each scrape."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        source = self.source
        lookup = source.lookup
        stats = lookup.stats
        counters = source.counters
        name = NAMESPACE

        info = GaugeMetricFamily(f"{name}_build_info", "Version of the running daemon.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
        yield GaugeMetricFamily(f"{name}_start_time_seconds", "When the daemon started (Unix time).",
                                value=stats.started)

        lookups = CounterMetricFamily(f"{name}_lookups", "Answers given to Postfix, by profile and answer.",
                                      labels=["profile", "answer"])
        for (profile, answer), count in sorted(counters.by_profile.items()):
            lookups.add_metric([profile, answer], float(count))
        yield lookups

        cache = CounterMetricFamily(f"{name}_lookup_cache", "Where lookups were answered from.",
                                    labels=["result"])
        for result, count in (("memory", stats.hits), ("store", stats.store_hits), ("miss", stats.misses),
                              ("skipped", stats.skipped)):
            cache.add_metric([result], float(count))
        yield cache

        latency = HistogramMetricFamily(f"{name}_lookup_duration_seconds", "Time to answer one lookup.")
        latency.add_metric([], histogram_buckets(LATENCY_BUCKETS, stats.latency_counts), stats.latency_sum)
        yield latency

        yield CounterMetricFamily(f"{name}_dns_queries", "TXT queries for _mta-sts records.",
                                  value=float(stats.dns_queries))
        yield CounterMetricFamily(f"{name}_fetches", "HTTPS policy fetches started.",
                                  value=float(stats.fetches))

        fetch = HistogramMetricFamily(f"{name}_fetch_duration_seconds", "Time one HTTPS policy fetch took.")
        fetch.add_metric([], histogram_buckets(FETCH_BUCKETS, counters.fetch_counts), counters.fetch_seconds)
        yield fetch

        failures = CounterMetricFamily(f"{name}_fetch_failures", "Policy fetches that failed, by reason.",
                                       labels=["reason"])
        for reason, count in sorted(stats.fetch_failures.items()):
            failures.add_metric([reason], float(count))
        yield failures

        entries = GaugeMetricFamily(f"{name}_cache_entries", "Domains in the memory cache, by kind.",
                                    labels=["kind"])
        for kind, count in source.daemon.cached_by_source().items():
            entries.add_metric([kind], float(count))
        yield entries
        yield CounterMetricFamily(f"{name}_cache_evictions", "Entries dropped from memory to stay in bounds.",
                                  value=float(lookup.front.evictions))
        yield GaugeMetricFamily(f"{name}_refresh_queue", "Cached policies being refreshed in the background.",
                                value=float(stats.refresh_queue))
        yield GaugeMetricFamily(f"{name}_connections", "Postfix connections open now.",
                                value=float(len(source.daemon.connections)))


def build_registry(source: MetricsSource) -> CollectorRegistry:
    """A registry of this daemon's own (not the process-global default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(source))
    return registry


class MetricsPage(Resource):
    """``GET /metrics``: the registry in Prometheus' text format, rendered in the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        if request.postpath not in ([METRICS_PATH], [b""], []):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
            return b"not found: metrics are at /metrics\n"
        request.setHeader(  # type: ignore[no-untyped-call]
            b"content-type", CONTENT_TYPE_LATEST.encode("ascii")
        )
        return generate_latest(self.registry)


async def listen(endpoint: Any, registry: CollectorRegistry) -> IListeningPort:
    """Serve ``registry`` over HTTP on a Twisted server endpoint."""
    site = Site(MetricsPage(registry))  # type: ignore[no-untyped-call]
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log per scrape
    port: IListeningPort = await endpoint.listen(site)
    return port
