"""``/reports`` on the daemon's HTTP listener: the dashboard, and ``/reports/check?domain=D``.

Thin Twisted resources: the figures come from :class:`~postfix_mtasts.reportwatch.ReportWatch`
(read from the store again first if it changed), the HTML from the pure
:mod:`postfix_mtasts.tlsrpt.dashboard`. The audit behind a check link runs only
for a domain the recent reports name, at most ``limits.REPORT_CHECKS_AT_ONCE`` at
once, one per domain, and its result is shown again for a few minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from postfix_mtasts import limits
from postfix_mtasts.check.audit import Auditor, CheckSettings, CheckSetupError, normalise_domain
from postfix_mtasts.check.findings import Finding
from postfix_mtasts.config import Config
from postfix_mtasts.reportwatch import ReportWatch
from postfix_mtasts.tlsrpt.dashboard import AlertBanner, render_check, render_dashboard, render_problem
from postfix_mtasts.tlsrpt.series import dashboard_view, policy_domain

log = logging.getLogger("postfix_mtasts.reports")

HTML = b"text/html; charset=utf-8"
#: Longest ``domain`` argument read from a check link (a domain name is at most 253).
DOMAIN_ARGUMENT_MAX = 300

Audit = Callable[[str], Coroutine[Any, Any, list[Finding]]]


def check_settings(config: Config) -> CheckSettings:
    """The audit's settings from the daemon's own resolver configuration."""
    resolver = config.resolver
    return CheckSettings(
        nameservers=tuple(str(server) for server in resolver.nameservers),
        ca_file=resolver.ca_file,
        https_port=resolver.https_port,
        dns_timeout=resolver.dns_timeout,
        fetch_timeout=resolver.fetch_timeout,
    )


def _respond(request: Request, work: Coroutine[Any, Any, tuple[int, str]]) -> int:
    """Run ``work`` (an HTTP status and an HTML page) and answer with it; a client gone
    before the answer cancels the work."""
    running = Deferred.fromCoroutine(work)

    def answer(result: tuple[int, str]) -> None:
        code, page = result
        request.setResponseCode(code)
        request.setHeader(b"content-type", HTML)  # type: ignore[no-untyped-call]
        request.setHeader(b"cache-control", b"no-store")  # type: ignore[no-untyped-call]
        request.setHeader(  # type: ignore[no-untyped-call]
            b"content-security-policy",
            b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'",
        )
        request.setHeader(b"x-content-type-options", b"nosniff")  # type: ignore[no-untyped-call]
        request.setHeader(b"referrer-policy", b"no-referrer")  # type: ignore[no-untyped-call]
        request.write(page.encode("utf-8"))  # type: ignore[no-untyped-call]
        request.finish()  # type: ignore[no-untyped-call]

    def failed(failure: Any) -> None:
        if failure.check(CancelledError):
            return
        log.error("TLS report page failed: %s", failure.getErrorMessage())
        answer((500, render_problem("Internal error", "The page could not be made; see the daemon's log.")))

    running.addCallbacks(answer, failed)
    request.notifyFinish().addErrback(lambda _: running.cancel())
    return NOT_DONE_YET


class ReportsPage(Resource):
    """``GET /reports``: the dashboard."""

    def __init__(self, watch: ReportWatch, check: CheckPage) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.watch = watch
        self.putChild(b"check", check)

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self  # "/reports/"
        return NotFound()  # type: ignore[no-untyped-call]

    def render_GET(self, request: Request) -> int:
        return _respond(request, self.page())

    async def page(self) -> tuple[int, str]:
        try:
            snapshot = await self.watch.refresh()
        except Exception as e:
            log.warning("TLS report dashboard: cannot read the report store: %s", e)
            snapshot = self.watch.snapshot
        now = self.watch.now()
        view = dashboard_view(snapshot.recent, now.date())
        domains, reporters = self.watch.banner()
        return 200, render_dashboard(view, generated=now, banner=AlertBanner(domains, reporters))


@dataclass(frozen=True)
class _Checked:
    at: datetime
    findings: list[Finding]


class CheckPage(Resource):
    """``GET /reports/check?domain=D``: what ``postfix-mtasts check D`` finds, for a domain in the reports."""

    isLeaf = True

    def __init__(self, watch: ReportWatch, audit: Audit) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.watch = watch
        self.audit = audit
        self._done: dict[str, _Checked] = {}
        self._running: dict[str, list[Deferred[_Checked]]] = {}

    def render_GET(self, request: Request) -> int:
        values = (request.args or {}).get(b"domain") or [b""]
        return _respond(request, self.page(values[0][:DOMAIN_ARGUMENT_MAX].decode("utf-8", "replace")))

    async def page(self, text: str) -> tuple[int, str]:
        try:
            domain = normalise_domain(text)
        except CheckSetupError as e:
            return 400, render_problem("Not a domain name", str(e))
        snapshot = await self.watch.refresh()
        named = {policy_domain(p) for report in snapshot.recent for p in report.policies}
        if domain not in named and text.strip().rstrip(".").lower() not in named:
            return 404, render_problem(
                "Not in the reports",
                f"{domain} is not a policy domain of the stored TLS reports of the last days; "
                "only those are checked from here. Run 'postfix-mtasts check DOMAIN' for any other.",
            )
        now = self.watch.now()
        self._forget_old(now)
        checked = self._done.get(domain)
        if checked is None:
            if domain not in self._running and len(self._running) >= limits.REPORT_CHECKS_AT_ONCE:
                return 503, render_problem("Busy", "Other checks are running; try again in a minute.")
            checked = await self._check(domain)
        return 200, render_check(domain, checked.findings, checked=checked.at)

    async def _check(self, domain: str) -> _Checked:
        """Wait for the audit of ``domain``, starting it unless it runs; a request that goes away
        stops waiting, the audit runs on (to its own deadlines) for the others and the cache."""
        if domain not in self._running:
            self._running[domain] = []
            Deferred.fromCoroutine(self.audit(domain)).addBoth(self._audited, domain)
        mine: Deferred[_Checked] = Deferred()
        self._running[domain].append(mine)
        return await mine

    def _audited(self, result: list[Finding] | Failure, domain: str) -> None:
        waiting = self._running.pop(domain)
        if isinstance(result, Failure):
            log.error("check %s from the TLS report page failed: %s", domain, result.getErrorMessage())
            for waiter in waiting:
                if not waiter.called:
                    waiter.errback(result)
            return
        checked = _Checked(self.watch.now(), result)
        self._done[domain] = checked
        for waiter in waiting:
            if not waiter.called:
                waiter.callback(checked)

    def _forget_old(self, now: datetime) -> None:
        for domain, checked in list(self._done.items()):
            if (now - checked.at).total_seconds() >= limits.REPORT_CHECK_CACHE_SECONDS:
                del self._done[domain]


class NotFound(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", HTML)  # type: ignore[no-untyped-call]
        return render_problem("Not found", "The TLS report dashboard is at /reports.").encode("utf-8")


def reports_resource(reactor: Any, watch: ReportWatch, config: Config) -> ReportsPage:
    """``/reports`` and its check pages, auditing with the daemon's resolver settings."""
    settings = check_settings(config)

    async def audit(domain: str) -> list[Finding]:
        return await Auditor(reactor, settings, clock=lambda: datetime.now(UTC)).audit(domain)

    return ReportsPage(watch, CheckPage(watch, audit))
