"""Prometheus metrics: a real daemon's endpoint scraped over HTTP and parsed
with prometheus_client's own parser; the start-up error without the package."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from postfix_mtasts.metrics import histogram_buckets
from tests.support.daemon import (
    LOOPBACK,
    PROJECT_ROOT,
    DaemonProcess,
    async_yield_fixture,
    daemon_environment,
    ensure_deferred,
    free_port,
    socketmap_lookup,
)
from tests.support.world import World

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


@dataclass
class Scraped:
    types: dict[str, str]
    samples: Samples

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]


@dataclass
class Running:
    world: World
    daemon: DaemonProcess
    socketmap: str
    metrics_url: str

    async def scrape(self, path: str = "/metrics") -> Scraped:
        response = await treq.get(self.metrics_url + path, reactor=reactor())
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
        text = await response.text()
        types: dict[str, str] = {}
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return Scraped(types, samples)


@async_yield_fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    world = await World.start(reactor())
    world.publish("policy.example", World.policy_text(mx=("mx.policy.example",)), "id1")
    world.dns.set_txt("_mta-sts.broken.example", "v=STSv1; id=b1;")  # no policy host: the fetch fails
    port, metrics_port = free_port(), free_port()
    text = world.config_toml(
        socketmap=[f"inet:{LOOPBACK}:{port}"],
        profiles={"strict": {"enforce_testing": True}},
        extra=f'[control]\nsocket = "{tmp_path}/control.sock"\n'
              f'[metrics]\nlisten = "inet:{LOOPBACK}:{metrics_port}"\n',
    )
    config_path = tmp_path / "daemon.toml"
    config_path.write_text(text)
    # Ready once the HTTP listener accepts: it opens after the Postfix listeners (and the report store).
    daemon = DaemonProcess(reactor(), config_path, ("inet", metrics_port))
    daemon.spawn()
    try:
        await daemon.wait_ready()
        yield Running(world, daemon, f"inet:{LOOPBACK}:{port}", f"http://{LOOPBACK}:{metrics_port}")
    finally:
        await daemon.close()
        await world.stop()


@ensure_deferred
async def test_metrics_count_lookups_cache_fetches_and_failures(running: Running) -> None:
    address = running.socketmap
    assert (await socketmap_lookup(reactor(), address, "postfix", "policy.example"))[0] == "OK"
    assert (await socketmap_lookup(reactor(), address, "postfix", "policy.example"))[0] == "OK"
    assert (await socketmap_lookup(reactor(), address, "strict", "policy.example"))[0] == "OK"
    assert (await socketmap_lookup(reactor(), address, "postfix", "none.example"))[0] == "NOTFOUND"
    assert (await socketmap_lookup(reactor(), address, "postfix", "broken.example"))[0] == "NOTFOUND"
    assert (await socketmap_lookup(reactor(), address, "other", "policy.example"))[0] == "PERM"

    scraped = await running.scrape()

    prefix = "postfix_mtasts_"
    assert scraped.types[prefix + "lookups"] == "counter"
    assert scraped.value(prefix + "lookups_total", profile="postfix", answer="OK") == 2
    assert scraped.value(prefix + "lookups_total", profile="postfix", answer="NOTFOUND") == 2
    assert scraped.value(prefix + "lookups_total", profile="strict", answer="OK") == 1
    assert scraped.value(prefix + "lookups_total", profile="(unknown)", answer="PERM") == 1
    assert scraped.value(prefix + "lookup_cache_total", result="memory") == 2
    assert scraped.value(prefix + "lookup_cache_total", result="miss") == 3

    assert scraped.types[prefix + "lookup_duration_seconds"] == "histogram"
    # Every answer with a domain is in the histogram (the unknown map name never reaches the lookup).
    assert scraped.value(prefix + "lookup_duration_seconds_count") == 5
    assert scraped.value(prefix + "lookup_duration_seconds_bucket", le="+Inf") == 5
    assert scraped.value(prefix + "lookup_duration_seconds_bucket", le="0.0001") >= 2  # memory hits
    assert scraped.value(prefix + "lookup_duration_seconds_sum") > 0

    assert scraped.value(prefix + "fetches_total") == 2
    assert scraped.value(prefix + "fetch_duration_seconds_count") == 2
    assert scraped.value(prefix + "fetch_duration_seconds_sum") > 0
    failures = {labels: value for (name, labels), value in scraped.samples.items()
                if name == prefix + "fetch_failures_total"}
    assert sum(failures.values()) == 1, failures
    assert scraped.value(prefix + "dns_queries_total") == 3

    assert scraped.types[prefix + "cache_entries"] == "gauge"
    assert scraped.value(prefix + "cache_entries", kind="fetched") == 1
    assert scraped.value(prefix + "cache_entries", kind="negative") == 1
    assert scraped.value(prefix + "cache_entries", kind="failed") == 1
    assert scraped.value(prefix + "refresh_queue") == 0
    assert scraped.value(prefix + "connections") == 0
    assert scraped.value(prefix + "build_info", version=__import__("postfix_mtasts").__version__) == 1


@ensure_deferred
async def test_metrics_buckets_are_cumulative_and_other_paths_are_404(running: Running) -> None:
    for domain in ("a.example", "b.example", "c.example"):
        await socketmap_lookup(reactor(), running.socketmap, "postfix", domain)

    scraped = await running.scrape("/")

    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in scraped.samples.items()
        if name == "postfix_mtasts_lookup_duration_seconds_bucket"
    )
    counts = [value for _, value in buckets]
    assert counts == sorted(counts) and counts[-1] == 3
    missing = await treq.get(running.metrics_url + "/nothing", reactor=reactor())
    assert missing.code == 404
    await missing.content()


def test_histogram_buckets_accumulate_and_end_with_inf() -> None:
    assert histogram_buckets((0.1, 1.0), [2, 0, 5]) == [("0.1", 2.0), ("1.0", 2.0), ("+Inf", 7.0)]


@ensure_deferred
async def test_metrics_without_prometheus_client_is_one_start_up_line(tmp_path: Path) -> None:
    # A package that fails to import, first on the path, stands in for a missing one.
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'prometheus_client'\")\n")
    config = tmp_path / "m.toml"
    config.write_text(
        f'[listen]\nsocketmap = ["inet:{LOOPBACK}:{free_port()}"]\n[cache]\nbackend = "memory"\n'
        f'[control]\nsocket = "{tmp_path}/c.sock"\n[metrics]\nlisten = "inet:{LOOPBACK}:{free_port()}"\n'
    )
    environment = daemon_environment()
    environment["PYTHONPATH"] = f"{shadow.parent}{os.pathsep}{environment['PYTHONPATH']}"
    running: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(  # type: ignore[no-untyped-call]
        sys.executable, ["-m", "postfix_mtasts.cli", "serve", "--config", str(config)],
        env=environment, path=PROJECT_ROOT, reactor=reactor(),
    )
    _out, err, code = await running
    stderr = err.decode()

    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, stderr
    assert "metrics.listen" in errors[0]
    assert "pip install 'postfix-mtasts[metrics]'" in errors[0]
    assert "Traceback" not in stderr


def test_report_series_are_bounded_and_long_names_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone can mail a report: the session series stop at limits.REPORT_METRIC_SERIES, and a
    name longer than limits.REPORT_LABEL_MAX is cut."""
    from prometheus_client import CollectorRegistry, generate_latest
    from twisted.internet.task import Clock

    from postfix_mtasts import limits
    from postfix_mtasts.config import ReportsConfig
    from postfix_mtasts.metrics import report_families
    from postfix_mtasts.reportwatch import ReportWatch, Snapshot

    monkeypatch.setattr(limits, "REPORT_METRIC_SERIES", 3)
    long_name = "x" * 300
    watch = ReportWatch(Clock(), None, ReportsConfig())  # type: ignore[arg-type]  # never read here
    totals = {(f"d{i}.example", long_name, "successful"): i for i in range(5)}
    watch.snapshot = Snapshot(watch.now(), count=5, totals=totals)

    class Collector:
        def collect(self) -> Any:
            return report_families(watch)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    text = generate_latest(registry).decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    sessions = [s for s in samples if s.name == "postfix_mtasts_tlsrpt_sessions_total"]
    assert [s.labels["policy_domain"] for s in sessions] == ["d0.example", "d1.example", "d2.example"]
    assert {len(s.labels["reporter"]) for s in sessions} == {limits.REPORT_LABEL_MAX}
    [dropped] = [s.value for s in samples if s.name == "postfix_mtasts_tlsrpt_series_dropped"]
    assert dropped == 2


def test_the_http_root_serves_metrics_and_reports_and_404_elsewhere() -> None:
    from prometheus_client import CollectorRegistry
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyRequest

    from postfix_mtasts.metrics import HttpRoot, MetricsPage

    reports = Resource()
    with_reports = HttpRoot(CollectorRegistry(), reports)
    without = HttpRoot(CollectorRegistry())
    request = DummyRequest([b""])
    assert isinstance(with_reports.getChild(b"metrics", request), MetricsPage)
    assert isinstance(with_reports.getChild(b"", request), MetricsPage)
    assert with_reports.getChild(b"reports", request) is reports
    page = with_reports.getChild(b"other", request)
    assert page.render(request) == b"not found: metrics are at /metrics, TLS reports at /reports\n"
    assert request.responseCode == 404
    page = without.getChild(b"reports", request)
    assert page.render(request).startswith(b"not found: this daemon has no TLS report store open: ")
