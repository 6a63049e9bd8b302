"""Wiring: configuration in, a running daemon out.

Start-up order matters: the store is opened *before* any listener accepts a
connection, so after a restart cached policies answer at once, before any
network traffic. The in-memory front warms in the background meanwhile; until
it is warm, a lookup that misses it reads the store, which answers the same. :class:`Daemon` is that
core (store, lookup, Postfix listeners); :class:`Service` adds what a system
service needs around it: the control socket, metrics, systemd notification,
reload and the privilege drop.
"""

from __future__ import annotations

import bisect
import logging
import os
import pwd
import socket
import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure

from postfix_mtasts import __version__
from postfix_mtasts.activation import adopted_stream_endpoint
from postfix_mtasts.cache import IPolicyStore, Source
from postfix_mtasts.config import Config, ConfigError, ListenAddress, ReportsConfig, load_config
from postfix_mtasts.errors import ReloadRefused, StartupError, one_line
from postfix_mtasts.limits import FETCH_BUCKETS
from postfix_mtasts.listening import AcceptGuard, backlog_capped, kernel_backlog_limit, listen_backlog
from postfix_mtasts.lookup import LookupSettings, PolicyLookup
from postfix_mtasts.policy.model import Answer
from postfix_mtasts.policy.nexthop import BracketedNextHop
from postfix_mtasts.protocol import SocketmapFactory, SocketmapProtocol, TcpTableFactory, TcpTableProtocol
from postfix_mtasts.resolver import FetchResult, PolicyFetcher
from postfix_mtasts.resolver.dane import DaneCache, DaneResolver
from postfix_mtasts.resolver.dns import DnsResolver
from postfix_mtasts.resolver.https import AddressResolver, HttpsPolicyFetcher
from postfix_mtasts.resolver.system import SystemAddressResolver
from postfix_mtasts.responder import Responder

log = logging.getLogger("postfix_mtasts.service")

#: Bound on each operation against a shared (network) store.
SHARED_STORE_OP_TIMEOUT = 2.0
#: At shutdown, how long connections may keep lookups running before they are closed.
SHUTDOWN_GRACE = 30.0
#: How long a closed connection may take to flush its last answers.
CLOSE_GRACE = 5.0
#: How often shutdown looks whether the connections have gone idle.
DRAIN_POLL = 0.05
#: How often the status line shown by ``systemctl status`` is refreshed.
STATUS_INTERVAL = 30.0
#: Name of the runtime and state directories a daemon may hand to its user.
OWN_DIRECTORY_NAME = "postfix-mtasts"
#: Side files of an SQLite database in WAL mode, and its lock file
#: (cache/sqlite_file.py), handed over with it.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal", ".lock")


def build_store(reactor: Any, config: Config) -> IPolicyStore:
    """The configured backend; a shared backend is wrapped to survive outages
    and, unless ``cache.local_copy`` is off, layered over a local SQLite copy."""
    cache = config.cache
    if cache.backend == "memory":
        from postfix_mtasts.cache.memory import MemoryStore

        return MemoryStore()
    if cache.backend == "sqlite":
        from postfix_mtasts.cache.sqlite import SqliteStore, default_path

        return SqliteStore(reactor, cache.path or default_path())
    from postfix_mtasts.cache.resilient import ResilientStore

    inner: IPolicyStore
    if cache.backend == "redis":
        try:
            from postfix_mtasts.cache.redis import RedisStore
        except ImportError as e:
            raise StartupError(
                "cache.backend = \"redis\" needs the redis package: "
                f"pip install 'postfix-mtasts[redis]' ({e})"
            ) from e
        inner = RedisStore(
            cache.redis.url,
            key_prefix=cache.redis.key_prefix,
            sentinels=cache.redis.sentinels,
            sentinel_service=cache.redis.sentinel_service,
            op_timeout=SHARED_STORE_OP_TIMEOUT,
        )
    elif cache.backend == "postgresql":
        try:
            from postfix_mtasts.cache.postgresql import PostgresqlStore
        except ImportError as e:
            raise StartupError(
                "cache.backend = \"postgresql\" needs psycopg: "
                f"pip install 'postfix-mtasts[postgresql]' ({e})"
            ) from e
        inner = PostgresqlStore(
            cache.postgresql.dsn, schema=cache.postgresql.schema, op_timeout=SHARED_STORE_OP_TIMEOUT
        )
    else:  # config validation makes this unreachable
        raise StartupError(f"cache.backend: unknown backend {cache.backend!r}")
    shared = ResilientStore(
        reactor,
        inner,
        op_timeout=SHARED_STORE_OP_TIMEOUT,
        open_timeout=cache.open_deadline,
        backed_up_locally=cache.local_copy,
    )
    if not cache.local_copy:
        return shared
    from postfix_mtasts.cache.layered import LayeredStore
    from postfix_mtasts.cache.sqlite import SqliteStore, default_path

    return LayeredStore(reactor, SqliteStore(reactor, cache.path or default_path()), shared)


def build_resolvers(
    reactor: Any, config: Config, system_addresses: SystemAddressResolver | None = None
) -> tuple[DnsResolver, HttpsPolicyFetcher]:
    """The DNS resolver and the HTTPS policy fetcher the ``[resolver]`` section describes.

    Without configured nameservers the policy host's addresses come from the
    system's resolver (getaddrinfo: ``system_addresses``, or a new one),
    which follows the same configuration and costs far less CPU; with them,
    from dnspython asking those servers.
    """
    dns = DnsResolver(
        config.resolver.nameservers, timeout=config.resolver.dns_timeout, reactor=reactor
    )
    addresses: AddressResolver = dns
    if not config.resolver.nameservers:
        addresses = system_addresses or SystemAddressResolver(reactor)
    fetcher = HttpsPolicyFetcher(
        reactor,
        addresses,
        ca_file=config.resolver.ca_file,
        timeout=config.resolver.fetch_timeout,
        port=config.resolver.https_port,
    )
    return dns, fetcher


def build_dane(reactor: Any, config: Config) -> DaneCache | None:
    """The DANE checker of the ``[dane]`` section; None when no validating
    resolver is named (the config requires one for any profile with dane)."""
    if not config.dane.nameservers:
        return None
    resolver = DaneResolver(
        config.dane.nameservers, timeout=config.dane.timeout, reactor=reactor
    )
    return DaneCache(reactor, resolver.check, config.cache.memory_entries)


def build_lookup(
    reactor: Any,
    config: Config,
    store: IPolicyStore,
    system_addresses: SystemAddressResolver | None = None,
    *,
    freeze_loaded: bool = False,
) -> PolicyLookup:
    dns, fetcher = build_resolvers(reactor, config, system_addresses)
    dane = build_dane(reactor, config)
    return PolicyLookup(
        reactor, dns, fetcher, store, LookupSettings.from_config(config), dane=dane,
        freeze_loaded=freeze_loaded,
    )


# --- what the service counts besides LookupStats ------------------------------------


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


# --- connections, tracked so that shutdown can let them finish ----------------------


class ConnectionSet:
    """The Postfix connections open right now."""

    def __init__(self) -> None:
        self.open: set[_Tracked] = set()

    def __len__(self) -> int:
        return len(self.open)

    def busy(self) -> list[_Tracked]:
        return [connection for connection in self.open if connection.busy]


class _Tracked:
    """Mixin: joins the factory's :class:`ConnectionSet` while connected."""

    factory: Any
    transport: Any
    _pending: Any
    hold: Any  # the protocol's: stop reading for good

    @property
    def busy(self) -> bool:
        """True while a request of this connection still waits for its answer."""
        return bool(self._pending)

    def track(self) -> None:
        self.factory.connections.open.add(self)

    def untrack(self) -> None:
        self.factory.connections.open.discard(self)


class _TrackedSocketmapProtocol(_Tracked, SocketmapProtocol):
    def connectionMade(self) -> None:
        self.track()
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.untrack()
        super().connectionLost(reason)


class _TrackedTcpTableProtocol(_Tracked, TcpTableProtocol):
    def connectionMade(self) -> None:
        self.track()
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.untrack()
        super().connectionLost(reason)


class TrackingSocketmapFactory(SocketmapFactory):
    def __init__(self, *args: Any, connections: ConnectionSet, guard: AcceptGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections = connections
        self.guard = guard

    def buildProtocol(self, addr: Any) -> SocketmapProtocol:
        self.guard.accepted()
        protocol = _TrackedSocketmapProtocol(self.responder, self.idle_timeout, clock=self.clock)
        protocol.factory = self
        return protocol


class TrackingTcpTableFactory(TcpTableFactory):
    def __init__(self, *args: Any, connections: ConnectionSet, guard: AcceptGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections = connections
        self.guard = guard

    def buildProtocol(self, addr: Any) -> TcpTableProtocol:
        self.guard.accepted()
        protocol = _TrackedTcpTableProtocol(
            self.responder, self.idle_timeout, self.profile, clock=self.clock
        )
        protocol.factory = self
        return protocol


# --- the core daemon ----------------------------------------------------------------


def listen_environment_now() -> dict[str, str]:
    """systemd's LISTEN_* variables still in this process's environment.

    Importing ``twisted.internet.endpoints`` deletes LISTEN_PID and LISTEN_FDS,
    so the command line copies them before any such import and passes them in;
    this is the fallback for a daemon started some other way.
    """
    return {name: value for name, value in os.environ.items() if name.startswith("LISTEN_")}


#: A Postfix listener is known by what it speaks and where.
ListenerKey = tuple[str, ListenAddress]


def _listener_keys(config: Config) -> list[ListenerKey]:
    return [("socketmap", a) for a in config.listen.socketmap] + [
        ("tcp_table", a) for a in config.listen.tcp_table
    ]


@dataclass
class Daemon:
    """One running postfix-mtasts: store, lookup, responder and listeners."""

    reactor: Any
    config: Config
    store: IPolicyStore | None = None
    lookup: PolicyLookup | None = None
    responder: Responder | None = None
    #: The Postfix listeners, socketmap ones first, in configuration order.
    ports: list[tuple[ListenAddress, IListeningPort]] = field(default_factory=list)
    counters: ServiceCounters = field(default_factory=ServiceCounters)
    connections: ConnectionSet = field(default_factory=ConnectionSet)
    #: systemd's LISTEN_* variables as the process received them.
    listen_environment: Mapping[str, str] = field(default_factory=listen_environment_now)
    _listeners: dict[ListenerKey, IListeningPort] = field(default_factory=dict)
    _factories: dict[str, Factory] = field(default_factory=dict)
    #: getaddrinfo's threads, one pool for the daemon's life (reloads keep it).
    system_addresses: SystemAddressResolver = field(init=False)
    #: The listen backlog of every listener (listen.backlog, else the kernel's largest).
    backlog: int = field(init=False)
    _backlog_capped: str | None = field(init=False, default=None)
    #: Logs each burst of accept failures (out of descriptors) once as it begins and once as it ends.
    accept_guard: AcceptGuard = field(init=False)

    def __post_init__(self) -> None:
        self.system_addresses = SystemAddressResolver(self.reactor)
        self.accept_guard = AcceptGuard(self.reactor)
        limit = kernel_backlog_limit()
        self.backlog = listen_backlog(self.config.listen.backlog, limit)
        self._backlog_capped = backlog_capped(self.config.listen.backlog, limit)

    async def start(self) -> None:
        """Open the store, listen, then warm the memory front.

        Nothing is logged as done until everything is: a start-up failure
        (a store that cannot be opened, a port in use) is one line, raised as
        :class:`StartupError` with whatever was opened closed again.
        """
        config = self.config
        self.store = build_store(self.reactor, config)
        try:
            await self.store.open()
        except StartupError:
            raise
        except Exception as e:
            raise StartupError(f"cache ({config.cache.backend}): {one_line(e)}") from e
        self.lookup = build_lookup(
            self.reactor, config, self.store, self.system_addresses, freeze_loaded=True
        )
        self.lookup.fetcher = TimedFetcher(self.lookup.fetcher, self.reactor, self.counters)
        self.responder = Responder(
            self.lookup,
            config.profiles,
            BracketedNextHop(config.policy.bracketed_next_hop),
            counters=self.counters,
        )
        socketmap_factory = TrackingSocketmapFactory(
            self.responder, config.listen.socketmap_idle_timeout, clock=self.reactor,
            connections=self.connections, guard=self.accept_guard,
        )
        tcp_table_factory = TrackingTcpTableFactory(
            self.responder, config.listen.tcp_table_idle_timeout, clock=self.reactor,
            connections=self.connections, guard=self.accept_guard,
        )
        for factory in (socketmap_factory, tcp_table_factory):
            factory.noisy = False
        self._factories = {"socketmap": socketmap_factory, "tcp_table": tcp_table_factory}
        keys = _listener_keys(config)
        for key in keys:
            try:
                await self._listen(key, quiet=True)
            except StartupError:
                await self._abandon_start()
                raise
        self._order_ports(config)
        for kind, address in keys:
            log.info("listening for %s on %s", kind, address)
        if self._backlog_capped:
            log.warning("%s", self._backlog_capped)
        # Lookups are answered from here on (a miss in the front reads the
        # store); the front warms meanwhile, and start() returns once it is warm.
        await self.lookup.start(warm_in_background=True)
        await self.lookup.warmed()

    async def _abandon_start(self) -> None:
        """Close what a failed start opened, without logging a shutdown."""
        for port in list(self._listeners.values()):
            await _stop_listening(port)
        self._listeners.clear()
        if self.store is not None:
            try:
                await self.store.close()
            except Exception as e:
                log.debug("closing the cache after a failed start: %s", one_line(e))

    async def _listen(self, key: ListenerKey, *, quiet: bool = False) -> None:
        kind, address = key
        try:
            endpoint = server_endpoint(self.reactor, address, self.listen_environment, self.backlog)
            port = await endpoint.listen(self._factories[kind])
        except StartupError:
            raise
        except Exception as e:
            raise StartupError(f"cannot listen on {address} ({kind}): {one_line(e)}") from e
        self.accept_guard.watch(port)
        self._listeners[key] = port
        if not quiet:
            log.info("listening for %s on %s", kind, address)

    def _order_ports(self, config: Config) -> None:
        listeners = self._listeners
        self.ports[:] = [(key[1], listeners[key]) for key in _listener_keys(config) if key in listeners]

    async def stop(self, *, quiet: bool = False) -> None:
        """Stop accepting, let lookups in flight finish and answer, write the cache back.

        ``quiet``: a start that failed after the daemon was up; the error
        line says it all, so "stopped" is not logged.
        """
        for port in list(self._listeners.values()):
            await _stop_listening(port)
        self._listeners.clear()
        self.ports.clear()
        self.accept_guard.stop()
        await self._drain_connections()
        if self.lookup is not None:
            await self.lookup.stop()
        await self._close_connections()
        if self.store is not None:
            await self.store.close()
        if not quiet:
            log.info("stopped")

    async def _drain_connections(self) -> None:
        """No new requests; wait (bounded) until every request received has its answer."""
        for connection in list(self.connections.open):
            connection.hold()
        waited = 0.0
        while self.connections.busy() and waited < SHUTDOWN_GRACE:
            await _sleep(self.reactor, DRAIN_POLL)
            waited += DRAIN_POLL
        busy = len(self.connections.busy())
        if busy:
            log.warning("closing %d connections with lookups still running after %gs", busy, SHUTDOWN_GRACE)

    async def _close_connections(self) -> None:
        """Close every connection once its answers are written (loseConnection flushes first)."""
        for connection in list(self.connections.open):
            connection.transport.loseConnection()
        waited = 0.0
        while self.connections.open and waited < CLOSE_GRACE:
            await _sleep(self.reactor, DRAIN_POLL)
            waited += DRAIN_POLL
        for connection in list(self.connections.open):
            connection.transport.abortConnection()

    async def apply(self, new: Config) -> list[str]:
        """Switch the running daemon to ``new`` without dropping the cache or open connections.

        Listeners are opened before any is closed, so a listener that cannot
        be opened refuses the whole change (:class:`ReloadRefused`) and the
        old configuration stays. Returns one short note per change made.
        """
        assert self.lookup is not None and self.responder is not None
        old = self.config
        notes: list[str] = []
        old_keys, new_keys = set(_listener_keys(old)), set(_listener_keys(new))
        added = [key for key in _listener_keys(new) if key not in old_keys]
        removed = [key for key in _listener_keys(old) if key not in new_keys]
        # The same place with other options (a unix socket's mode): free it first.
        places = {_place(address) for _, address in added}
        rebound = [key for key in removed if _place(key[1]) in places]
        for key in rebound:
            await _stop_listening(self._listeners.pop(key))
        opened: list[ListenerKey] = []
        for key in added:
            try:
                await self._listen(key)
            except StartupError as e:
                for done in opened:
                    await _stop_listening(self._listeners.pop(done))
                lost = ", ".join(str(key[1]) for key in rebound)
                raise ReloadRefused(str(e) + (f" (and {lost} was closed)" if lost else "")) from e
            opened.append(key)
        for key in removed:
            if key in self._listeners:
                await _stop_listening(self._listeners.pop(key))
                log.info("no longer listening for %s on %s", key[0], key[1])
        self._order_ports(new)
        if added or removed:
            notes.append(f"listeners: {len(added)} added, {len(removed)} removed, "
                         f"{len(new_keys) - len(added)} kept")

        socketmap_factory = self._factories["socketmap"]
        tcp_table_factory = self._factories["tcp_table"]
        socketmap_factory.idle_timeout = new.listen.socketmap_idle_timeout  # type: ignore[attr-defined]
        tcp_table_factory.idle_timeout = new.listen.tcp_table_idle_timeout  # type: ignore[attr-defined]
        if dict(new.profiles) != dict(old.profiles):
            notes.append(f"profiles: {', '.join(sorted(new.profiles))}")
        self.responder.profiles = new.profiles
        self.responder.bracketed = BracketedNextHop(new.policy.bracketed_next_hop)
        if new.policy != old.policy:
            notes.append("policy settings")
        # The front's size is fixed at start ([cache] changes need a restart).
        self.lookup.settings = replace(
            LookupSettings.from_config(new), memory_entries=self.lookup.settings.memory_entries
        )
        if new.resolver != old.resolver:
            dns, fetcher = build_resolvers(self.reactor, new, self.system_addresses)
            self.lookup.txt_resolver = dns
            self.lookup.fetcher = TimedFetcher(fetcher, self.reactor, self.counters)
            notes.append("resolver")
        if new.dane != old.dane:
            self.lookup.dane = build_dane(self.reactor, new)
            notes.append("DANE resolver")
        if new.cache != old.cache:
            log.warning("cache settings changed: they take effect at the next restart")
        if new.listen.backlog != old.listen.backlog:
            log.warning("listen.backlog changed: it takes effect at the next restart")
        self.config = new
        return notes

    def cached_by_source(self) -> dict[str, int]:
        """How many entries the memory front holds, per source (fetched, negative, failed)."""
        counts = {source.value: 0 for source in Source}
        if self.lookup is not None:
            for entry in self.lookup.front.entries():
                counts[entry.source.value] += 1
        return counts


async def _stop_listening(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


def _place(address: ListenAddress) -> ListenAddress:
    return replace(address, mode=None)


async def _sleep(clock: IReactorTime, seconds: float) -> None:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    await d


# --- the system service ---------------------------------------------------------


class Service:
    """The daemon as systemd (or an init script) runs it.

    Start: the :class:`Daemon` (store, warm front, Postfix listeners), then the
    control socket and metrics, then the privilege drop, then READY=1.
    ``reload()`` re-reads the configuration file; ``stop()`` sends
    STOPPING=1 and lets the daemon finish its lookups.
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
        self._control_port: IListeningPort | None = None
        self._metrics_port: IListeningPort | None = None
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
        user = _service_user(config.service.user)
        await self.daemon.start()
        try:
            try:
                await self._listen_control(config)
            except StartupError as e:
                # Postfix's lookups matter more than the admin's socket: serve without it.
                log.warning("%s; postfix-mtasts ctl will not reach this daemon", e)
            await self._listen_metrics(config)
            if user is not None:
                self._drop_privileges(user)
            await self._start_reports(config)  # as the service user: it owns what it creates
        except StartupError:
            await self._stop_extras()
            await self.daemon.stop(quiet=True)
            raise
        self.started = True
        self._start_heartbeat()
        self.notifier.ready(self.status_line())
        log.info("postfix-mtasts %s ready", __version__)

    async def stop(self) -> None:
        self.stopping = True
        self.notifier.stopping("stopping: finishing lookups in flight")
        if self._heartbeat is not None:
            self._heartbeat.stop()
        await self._stop_extras()
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
        self._serve_reports(config)

    async def _stop_extras(self) -> None:
        watch, self.report_watch = self.report_watch, None
        if watch is not None:
            await watch.stop()
        if self.reports is not None:
            reports, self.reports = self.reports, None
            await reports.stop()
        for port in (self._control_port, self._metrics_port):
            if port is not None:
                await _stop_listening(port)
        self._control_port = self._metrics_port = None

    # --- control and metrics listeners ------------------------------------------

    async def _listen_control(self, config: Config) -> None:
        from postfix_mtasts.control import ControlFactory, default_socket_path

        path = config.control.socket or default_socket_path(self.environ)
        _make_runtime_directory(os.path.dirname(path))
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
        self._control_port, self.control_path = port, path
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
        self._metrics_port = port
        log.info("serving Prometheus metrics and TLS reports on %s", address)

    def _serve_reports(self, config: Config) -> None:
        """Put /reports on the HTTP listener once both it and the report watch exist."""
        if self._http_root is not None and self.report_watch is not None:
            from postfix_mtasts.reportweb import reports_resource

            self._http_root.reports = reports_resource(self.reactor, self.report_watch, config)

    # --- privileges -------------------------------------------------------------

    def _drop_privileges(self, user: pwd.struct_passwd) -> None:
        """Hand the cache and the control socket to ``user``, then become it."""
        if os.geteuid() == user.pw_uid:
            return
        uid, gid = user.pw_uid, user.pw_gid
        for path in self._owned_paths():
            try:
                os.chown(path, uid, gid)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StartupError(f"cannot hand {path} to user {user.pw_name}: {e.strerror}") from e
        try:
            os.initgroups(user.pw_name, gid)
            os.setgid(gid)
            os.setuid(uid)
        except OSError as e:
            raise StartupError(f"cannot become user {user.pw_name}: {e.strerror}") from e
        log.info("running as user %s (uid %d, gid %d)", user.pw_name, uid, gid)

    def _owned_paths(self) -> list[str]:
        """What the service user must own to keep working: the SQLite files and the control socket."""
        paths: list[str] = []
        store = self.daemon.store
        # The sqlite backend's file, or a shared backend's local copy.
        database = getattr(getattr(store, "local", store), "path", None)
        if isinstance(database, str):
            directory = os.path.dirname(os.path.abspath(database))
            # A directory of our own is handed over (SQLite creates its -wal
            # file there); a shared one like /tmp is never touched.
            if os.path.basename(directory) == OWN_DIRECTORY_NAME:
                paths.append(directory)
            paths.append(database)
            paths.extend(database + suffix for suffix in SQLITE_SIDE_FILES)
        if self.control_path:
            directory = os.path.dirname(self.control_path)
            if os.path.basename(directory).startswith(OWN_DIRECTORY_NAME):
                paths.append(directory)
            paths.append(self.control_path)
        return paths

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
            old_port, old_path = self._control_port, self.control_path
            try:
                await self._listen_control(new)
            except StartupError as e:
                self._control_port, self.control_path = old_port, old_path
                notes.append(f"control socket kept ({e})")
            else:
                if old_port is not None:
                    await _stop_listening(old_port)
                notes.append(f"control socket {self.control_path}")
        if new.http != old.http:
            old_metrics = self._metrics_port
            if old_metrics is not None:
                await _stop_listening(old_metrics)
                self._metrics_port = None
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


def _service_user(name: str) -> pwd.struct_passwd | None:
    """The account ``[service] user`` names, checked before anything is opened."""
    if not name:
        return None
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise StartupError(
            f"service.user: no such user {name!r} (create it, e.g. adduser --system {name})"
        ) from None
    if os.geteuid() != 0 and os.geteuid() != user.pw_uid:
        raise StartupError(f"service.user = {name!r}: the daemon must be started as root to become it")
    return user


def _make_runtime_directory(directory: str) -> None:
    """Create the control socket's directory; refuse one that another user owns."""
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        info = os.stat(directory)
    except OSError as e:
        raise StartupError(f"cannot create control socket directory {directory}: {e.strerror}") from e
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"control socket directory {directory} is not a directory")
    if info.st_uid not in (0, os.geteuid()):
        owner = _user_name(info.st_uid)
        raise StartupError(f"control socket directory {directory} belongs to {owner}, not to this user")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def endpoint_for(address: ListenAddress, backlog: int | None = None) -> str:
    """The Twisted endpoint description of an inet or unix address, with
    ``backlog`` as its listen backlog (None: Twisted's default)."""
    if address.kind == "systemd":
        raise ValueError(f"{address}: a socket from systemd has no description; use server_endpoint()")
    description = address.endpoint_description()
    if backlog is not None:
        description += f":backlog={backlog}"
    if address.kind == "unix":
        # A lock file lets Twisted remove the stale socket a crash left behind.
        description += ":lockfile=1"
    return description


def server_endpoint(
    reactor: Any, address: ListenAddress, listen_environment: Mapping[str, str], backlog: int | None = None
) -> Any:
    """A server endpoint for ``address``; a systemd socket is adopted from the
    descriptors passed, and keeps the backlog its unit's Backlog= gave it."""
    if address.kind != "systemd":
        return serverFromString(reactor, endpoint_for(address, backlog))  # type: ignore[no-untyped-call]
    fd = inherited_descriptor(address, listen_environment)
    sock = socket.socket(fileno=fd)
    family = sock.family
    kind = sock.type
    sock.detach()  # the descriptor stays open: Twisted adopts (duplicates) it
    if kind != socket.SOCK_STREAM or family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        raise StartupError(f"{address}: the socket systemd passed is not a stream socket (use ListenStream=)")
    return adopted_stream_endpoint(reactor, fd, family)


def inherited_descriptor(address: ListenAddress, listen_environment: Mapping[str, str]) -> int:
    """The descriptor systemd passed for ``address`` (sd_listen_fds(3) rules: LISTEN_PID must be ours)."""
    from twisted.python.systemd import ListenFDs

    # fromEnvironment deletes what it read; it gets a copy.
    fds = ListenFDs.fromEnvironment(environ=dict(listen_environment))
    descriptors = fds.inheritedDescriptors()
    if address.systemd_name:
        named = fds.inheritedNamedDescriptors()
        fd = named.get(address.systemd_name)
        if fd is None:
            names = ", ".join(sorted(named)) or "none"
            raise StartupError(
                f"{address}: systemd passed no socket named {address.systemd_name!r} (names passed: "
                f"{names}); start the .socket unit with FileDescriptorName={address.systemd_name}, "
                "then restart the service"
            )
        return fd
    index = address.systemd_index or 0
    if index >= len(descriptors):
        raise StartupError(f"{address}: systemd passed {len(descriptors)} sockets, not {index + 1}")
    return descriptors[index]


