"""The daemon as systemd (or an init script) runs it: :class:`Service`.

Around the :class:`~postfix_mtasts.service.daemon.Daemon` it adds the
control socket, the HTTP listener (metrics, /reports), the TLS report intake
and watch, the privilege drop, systemd notification and its watchdog, and
reload. Each is a child of the daemon's service tree, so stopping runs them
down in reverse order before the daemon's own parts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString

from postfix_mtasts import __version__
from postfix_mtasts.cache import Source
from postfix_mtasts.config import Config, ConfigError, ListenAddress, ReportsConfig, load_config
from postfix_mtasts.errors import ReloadRefused, StartupError, one_line
from postfix_mtasts.lookup import PolicyLookup
from postfix_mtasts.service import privileges
from postfix_mtasts.service.counters import ServiceCounters
from postfix_mtasts.service.daemon import Daemon
from postfix_mtasts.service.endpoints import endpoint_for, server_endpoint
from postfix_mtasts.service.tree import ListeningService, OrderedServices, Step

log = logging.getLogger("postfix_mtasts.service")

#: How often the status line shown by ``systemctl status`` is refreshed.
STATUS_INTERVAL = 30.0


class Service:
    """The daemon as systemd (or an init script) runs it.

    Start: the :class:`Daemon` (store, warm front, Postfix listeners), then the
    control socket and metrics, then the privilege drop, then the TLS reports,
    then READY=1. ``reload()`` re-reads the configuration file; ``stop()``
    sends STOPPING=1 and lets the daemon finish its lookups.
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        *,
        verbosity: int = 0,
        environ: Mapping[str, str] | None = None,
        listen_environment: Mapping[str, str] | None = None,
    ) -> None:
        from postfix_mtasts.sdnotify import Notifier

        self.reactor = reactor
        self.daemon = Daemon(reactor, config)
        if listen_environment is not None:
            self.daemon.listen_environment = listen_environment
        self.verbosity = verbosity
        self.environ = os.environ if environ is None else environ
        self.notifier = Notifier(self.environ)
        self.control_path = ""
        self.started = False
        self.stopping = False
        self._control: ListeningService | None = None
        self._http: ListeningService | None = None
        self._metrics_registry: Any = None
        self._http_root: Any = None
        #: Alerts, metrics and /reports on the stored TLS reports (reportwatch), if a store is open.
        self.report_watch: Any = None
        self._heartbeat: Any = None
        self._reloading: Deferred[Any] | None = None
        #: The report store and the mailboxes read into it (tlsrpt.intake), if configured.
        self.reports: Any = None

    @property
    def config(self) -> Config:
        return self.daemon.config

    @property
    def lookup(self) -> PolicyLookup:
        assert self.daemon.lookup is not None
        return self.daemon.lookup

    async def start(self) -> None:
        config = self.config
        user = privileges.service_user(config.service.user)
        await self.daemon.start()
        try:
            try:
                await self._listen_control(config)
            except StartupError as e:
                # Postfix's lookups matter more than the admin's socket: serve without it.
                log.warning("%s; postfix-mtasts ctl will not reach this daemon", e)
            await self._listen_metrics(config)
            if user is not None:
                store = self.daemon.store
                database = getattr(getattr(store, "local", store), "path", None)
                paths = privileges.owned_paths(database if isinstance(database, str) else None,
                                               self.control_path)
                privileges.drop_privileges(user, paths)
            await self._start_reports(config)  # as the service user: it owns what it creates
        except StartupError:
            await self.daemon.stop(quiet=True)
            raise
        self.started = True
        self._start_heartbeat()
        self.notifier.ready(self.status_line())
        log.info("postfix-mtasts %s ready", __version__)

    async def stop(self) -> None:
        self.stopping = True
        self.notifier.stopping("stopping: finishing lookups in flight")
        await self.daemon.stop()

    async def _start_reports(self, config: Config) -> None:
        """The report store, the mailboxes read into it (tlsrpt.intake) and its watch (alerts,
        metrics, /reports). A store that configured mailboxes need stops start-up when it cannot
        be opened; one that is only watched is one WARNING line: Postfix's lookups matter more."""
        from postfix_mtasts.reportwatch import ReportWatch
        from postfix_mtasts.tlsrpt import intake
        from postfix_mtasts.tlsrpt.imap import ImapError
        from postfix_mtasts.tlsrpt.store import ReportStoreError

        needed = intake.wanted(config.reports)
        if not needed and not _wants_reports(config):
            return
        reports = intake.ReportIntake(self.reactor, config.reports)
        try:
            await reports.start()
        except (ReportStoreError, ImapError) as e:
            if needed:
                raise StartupError(str(e)) from e
            log.warning("%s; TLS reports are not watched", e)
            return
        self.reports = reports
        self.report_watch = ReportWatch(self.reactor, reports.store, config.reports)
        self.report_watch.start()
        self.daemon.tree.add(Step("reports", self._stop_reports))
        self._serve_reports(config)

    async def _stop_reports(self) -> None:
        watch, self.report_watch = self.report_watch, None
        if watch is not None:
            await watch.stop()
        reports, self.reports = self.reports, None
        if reports is not None:
            await reports.stop()

    # --- control and metrics listeners ------------------------------------------

    async def _listen_control(self, config: Config) -> None:
        from postfix_mtasts.control import ControlFactory, default_socket_path

        path = config.control.socket or default_socket_path(self.environ)
        privileges.make_runtime_directory(os.path.dirname(path))
        address = ListenAddress(kind="unix", path=path, mode=config.control.mode)
        try:
            description = endpoint_for(address, self.daemon.backlog)
            endpoint = serverFromString(self.reactor, description)  # type: ignore[no-untyped-call]
            port = await endpoint.listen(ControlFactory(self))
        except Exception as e:
            raise StartupError(f"cannot listen on control socket {path}: {one_line(e)}") from e
        # Twisted applies the mode after bind; make sure nothing looser was left.
        os.chmod(path, config.control.mode)
        self.daemon.accept_guard.watch(port)
        self._control = ListeningService(f"control {path}", port)
        self.daemon.tree.add(self._control)
        self.control_path = path
        log.info("control socket on %s (mode %04o)", path, config.control.mode)

    async def _listen_metrics(self, config: Config) -> None:
        address = config.http.listen
        if address is None:
            return
        try:
            from postfix_mtasts import metrics
        except ImportError as e:
            raise StartupError(
                f"{config.http.key} = \"{address}\" needs prometheus_client: "
                f"pip install 'postfix-mtasts[metrics]' ({e})"
            ) from e
        if self._metrics_registry is None:
            self._metrics_registry = metrics.build_registry(self)
        self._http_root = metrics.HttpRoot(self._metrics_registry)
        self._serve_reports(config)
        try:
            endpoint = server_endpoint(
                self.reactor, address, self.daemon.listen_environment, self.daemon.backlog
            )
            port = await metrics.listen(endpoint, self._http_root)
        except Exception as e:
            raise StartupError(f"cannot listen on {address} (metrics): {one_line(e)}") from e
        self.daemon.accept_guard.watch(port)
        self._http = ListeningService(f"http {address}", port)
        self.daemon.tree.add(self._http)
        log.info("serving Prometheus metrics and TLS reports on %s", address)

    def _serve_reports(self, config: Config) -> None:
        """Put /reports on the HTTP listener once both it and the report watch exist."""
        if self._http_root is not None and self.report_watch is not None:
            from postfix_mtasts.reportweb import reports_resource

            self._http_root.reports = reports_resource(self.reactor, self.report_watch, config)

    # --- reload -----------------------------------------------------------------

    async def reload(self) -> str:
        """Read the configuration file again and apply it; raises ReloadRefused, logged as one ERROR line."""
        if self._reloading is not None:
            raise ReloadRefused("a reload is already running")
        done: Deferred[Any] = Deferred()
        self._reloading = done
        self.notifier.reloading()
        try:
            summary = await self._reload()
        except ReloadRefused as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            raise
        finally:
            self._reloading = None
            done.callback(None)
            self.notifier.ready(self.status_line())
        log.info("%s", summary)
        return summary

    async def _reload(self) -> str:
        from postfix_mtasts import logsetup

        old = self.config
        source = None if old.source == "<defaults>" else old.source
        try:
            new = load_config(source)
        except ConfigError as e:
            raise ReloadRefused(str(e)) from e
        try:
            level = logsetup.adjust_level(logsetup.LEVELS[new.log.level], self.verbosity)
            logsetup.check(syslog=new.log.syslog)
        except logsetup.LogSetupError as e:
            raise ReloadRefused(str(e)) from e
        if new.service != old.service:
            log.warning("service.user changed: it takes effect at the next restart")
        if _report_store_keys(new) != _report_store_keys(old):
            log.warning("[reports] changed: it takes effect at the next restart")
        notes = await self.daemon.apply(new)
        if new.control != old.control:
            old_control, old_path = self._control, self.control_path
            try:
                await self._listen_control(new)
            except StartupError as e:
                self._control, self.control_path = old_control, old_path
                notes.append(f"control socket kept ({e})")
            else:
                await _retire(self.daemon.tree, old_control)
                notes.append(f"control socket {self.control_path}")
        if new.http != old.http:
            old_http, self._http = self._http, None
            await _retire(self.daemon.tree, old_http)
            try:
                await self._listen_metrics(new)
            except StartupError as e:
                notes.append(f"metrics off ({e})")
            else:
                notes.append(f"metrics on {new.http.listen}" if new.http.listen else "metrics off")
        if new.reports != old.reports and self.report_watch is not None:
            from postfix_mtasts.reportwatch import alert_settings

            self.report_watch.config = new.reports
            self.report_watch.settings = alert_settings(new.reports)
            await self.report_watch.check()  # new thresholds judge the figures now
            notes.append("report alerts updated")
        if new.log != old.log:
            logsetup.configure(level, syslog=new.log.syslog)
            notes.append(f"log level {logging.getLevelName(level).lower()}")
        changed = "; ".join(notes) if notes else "nothing changed"
        return f"configuration reloaded from {new.source}: {changed}"

    # --- status -------------------------------------------------------------------

    def status_line(self) -> str:
        """One line for ``systemctl status``: what is cached and how much was answered."""
        lookup = self.daemon.lookup
        if lookup is None:
            return "starting"
        cached = self.daemon.cached_by_source()
        return (f"{cached[Source.FETCHED.value]} policies cached "
                f"({len(lookup.front)} domains), {lookup.stats.lookups} lookups, "
                f"{len(self.daemon.connections)} connections")

    def extra_stats(self) -> dict[str, Any]:
        """What ``ctl stats`` shows beyond LookupStats: per profile, cache by kind, connections."""
        return {
            "profiles": self.counters.profiles_snapshot(),
            "cached": self.daemon.cached_by_source(),
            "connections": len(self.daemon.connections),
            "fetch_seconds_total": self.counters.fetch_seconds,
            "version": __version__,
        }

    @property
    def counters(self) -> ServiceCounters:
        return self.daemon.counters

    def healthy(self) -> bool:
        return self.started and not self.stopping

    def _start_heartbeat(self) -> None:
        from postfix_mtasts.sdnotify import Watchdog, watchdog_interval

        if not self.notifier.enabled:
            return
        interval = watchdog_interval(self.environ)
        self._heartbeat = Watchdog(
            self.reactor,
            self.notifier,
            interval if interval is not None else STATUS_INTERVAL,
            healthy=self.healthy,
            status=self.status_line,
            feed=interval is not None,
        )
        self._heartbeat.start()
        self.daemon.tree.add(Step("heartbeat", self._stop_heartbeat))

    async def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()




async def _retire(tree: OrderedServices, child: ListeningService | None) -> None:
    """Take a replaced listener out of the tree, closing its port."""
    if child is not None:
        await tree.remove(child)


#: The [reports] keys the report watch reads; a reload applies them at once.
REPORT_ALERT_KEYS = ("alert_ratio", "alert_window", "alert_min_sessions", "alert_mail_to", "sendmail_path",
                     "reporter_silence_days")


def _report_store_keys(config: Config) -> ReportsConfig:
    """``config.reports`` without its alert keys: what only a restart applies."""
    defaults = ReportsConfig()
    return replace(config.reports, **{key: getattr(defaults, key) for key in REPORT_ALERT_KEYS})


def _wants_reports(config: Config) -> bool:
    """Whether to open the report store: the configuration names it (a store, a mailbox, alert
    mail), or ``report ingest`` already made the default one. Nothing else creates it."""
    reports = config.reports
    if reports.path or reports.dsn or reports.maildir or reports.imap or reports.alert_mail_to:
        return True
    from postfix_mtasts.tlsrpt.store.sqlite import default_path

    return os.path.exists(default_path())
