"""Prometheus metrics, served over HTTP by Twisted itself (no thread), beside the TLS report
dashboard (:mod:`postfix_mtasts.reportweb`) on the same listener.

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

from postfix_mtasts import __version__, limits
from postfix_mtasts.limits import FETCH_BUCKETS
from postfix_mtasts.lookup import PolicyLookup
from postfix_mtasts.reportwatch import ReportWatch
from postfix_mtasts.stats import LATENCY_BUCKETS

#: Prefix of every metric name.
NAMESPACE = "postfix_mtasts"
#: The path Prometheus scrapes; "/" answers too.
METRICS_PATH = b"metrics"
#: Where the TLS report dashboard is.
REPORTS_PATH = b"reports"
NOT_FOUND = b"not found: metrics are at /metrics, TLS reports at /reports\n"
NO_REPORTS = (b"not found: this daemon has no TLS report store open: store reports with "
              b"'postfix-mtasts report ingest', or set [reports] path or dsn\n")


class MetricsSource(Protocol):
    """What the collector reads (a :class:`postfix_mtasts.service.Service`)."""

    @property
    def lookup(self) -> PolicyLookup: ...

    @property
    def counters(self) -> Any: ...

    @property
    def daemon(self) -> Any: ...

    @property
    def report_watch(self) -> Any: ...


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
        if source.report_watch is not None:
            yield from report_families(source.report_watch)


def _label(text: str) -> str:
    return text if len(text) <= limits.REPORT_LABEL_MAX else text[: limits.REPORT_LABEL_MAX - 1] + "…"


def report_families(watch: ReportWatch) -> Iterator[Metric]:
    """The stored TLS reports' figures, as the watch last read them, and its alerts."""
    name = f"{NAMESPACE}_tlsrpt"
    snapshot = watch.snapshot
    yield GaugeMetricFamily(f"{name}_reports", "TLS reports in the report store.",
                            value=float(snapshot.count))
    sessions = CounterMetricFamily(
        f"{name}_sessions", "Sessions in the stored TLS reports, by policy domain, reporter and result "
        "(successful, an RFC 8460 result type, or failure-without-details).",
        labels=["policy_domain", "reporter", "result"])
    keys = sorted(snapshot.totals)
    for key in keys[: limits.REPORT_METRIC_SERIES]:
        domain, reporter, result = key
        sessions.add_metric([_label(domain), _label(reporter), _label(result)], float(snapshot.totals[key]))
    yield sessions
    yield GaugeMetricFamily(f"{name}_series_dropped",
                            "Session series left out to keep the metrics bounded.",
                            value=float(max(0, len(keys) - limits.REPORT_METRIC_SERIES)))
    newest = GaugeMetricFamily(f"{name}_newest_report_timestamp_seconds",
                               "End of the newest stored report's date range, per reporter (Unix time).",
                               labels=["reporter"])
    for reporter, moment in sorted(snapshot.newest.items())[: limits.REPORT_METRIC_SERIES]:
        newest.add_metric([_label(reporter)], moment.timestamp())
    yield newest
    seen = watch.observation
    ratio = GaugeMetricFamily(f"{name}_failure_ratio",
                              "Share of failed sessions per policy domain over [reports] alert_window.",
                              labels=["policy_domain"])
    alert = GaugeMetricFamily(f"{name}_alert",
                              "1 while a policy domain's failure ratio is at or above [reports] alert_ratio.",
                              labels=["policy_domain"])
    domains = sorted(set(seen.sessions) | watch.state.domains)[: limits.REPORT_METRIC_SERIES]
    for domain in domains:
        successful, failed = seen.sessions.get(domain, (0, 0))
        if successful + failed:
            ratio.add_metric([_label(domain)], failed / (successful + failed))
        alert.add_metric([_label(domain)], 1.0 if domain in watch.state.domains else 0.0)
    yield ratio
    yield alert
    silent = GaugeMetricFamily(f"{name}_reporter_silent",
                               "1 while a reporter has sent nothing for longer than "
                               "[reports] reporter_silence_days.",
                               labels=["reporter"])
    for reporter in sorted(snapshot.newest)[: limits.REPORT_METRIC_SERIES]:
        silent.add_metric([_label(reporter)], 1.0 if reporter in watch.state.silent_reporters else 0.0)
    yield silent
    yield CounterMetricFamily(f"{name}_alert_mails", "Alert mails handed to sendmail.",
                              value=float(watch.mails_sent))
    yield CounterMetricFamily(f"{name}_alert_mail_failures", "Alert mails sendmail did not take.",
                              value=float(watch.mail_failures))


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
        if request.postpath not in ([b""], []):
            return _not_found(request)
        request.setHeader(  # type: ignore[no-untyped-call]
            b"content-type", CONTENT_TYPE_LATEST.encode("ascii")
        )
        return generate_latest(self.registry)


class HttpRoot(Resource):
    """The HTTP listener's paths: ``/metrics`` (and ``/``), and ``/reports`` when given."""

    def __init__(self, registry: CollectorRegistry, reports: Resource | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.metrics = MetricsPage(registry)
        self.reports = reports

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path in (METRICS_PATH, b""):
            return self.metrics
        if path == REPORTS_PATH:
            return self.reports or _NotFound(NO_REPORTS)
        return _NotFound()


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, text: bytes = NOT_FOUND) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.text = text

    def render(self, request: Request) -> bytes:
        return _not_found(request, self.text)


def _not_found(request: Request, text: bytes = NOT_FOUND) -> bytes:
    request.setResponseCode(404)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
    return text


async def listen(endpoint: Any, root: Resource) -> IListeningPort:
    """Serve ``root`` over HTTP on a Twisted server endpoint."""
    site = Site(root)  # type: ignore[no-untyped-call]
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log per scrape
    port: IListeningPort = await endpoint.listen(site)
    return port
