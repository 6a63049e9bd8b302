"""The core of a running postfix-mtasts: store, lookup, responder and the Postfix listeners.

Start-up order matters: the store is opened *before* any listener accepts a
connection, so after a restart cached policies answer at once, before any
network traffic; the in-memory front then warms while lookups that miss it
read the store, which answers the same. Each part that must be undone at
shutdown is a child of :attr:`Daemon.tree`, stopped in reverse order: stop
accepting, let the lookups in flight answer, stop the lookup's background
work, close the connections, close the store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.interfaces import IListeningPort

from postfix_mtasts.cache import IPolicyStore, Source
from postfix_mtasts.config import Config, ListenAddress
from postfix_mtasts.errors import ReloadRefused, StartupError, one_line
from postfix_mtasts.listening import AcceptGuard, backlog_capped, kernel_backlog_limit, listen_backlog
from postfix_mtasts.lookup import LookupSettings, PolicyLookup
from postfix_mtasts.policy.nexthop import BracketedNextHop
from postfix_mtasts.protocol import SocketmapFactory, TcpTableFactory, _LookupFactory
from postfix_mtasts.resolver.system import SystemAddressResolver
from postfix_mtasts.responder import DEFAULT_PROFILE, Responder
from postfix_mtasts.service.build import build_dane, build_lookup, build_resolvers, build_store
from postfix_mtasts.service.connections import ConnectionSet
from postfix_mtasts.service.counters import ServiceCounters, TimedFetcher
from postfix_mtasts.service.endpoints import listen_environment_now, server_endpoint
from postfix_mtasts.service.tree import ListeningService, OrderedServices, Step

log = logging.getLogger("postfix_mtasts.service")

#: A Postfix listener is known by what it speaks and where.
ListenerKey = tuple[str, ListenAddress]


def _listener_keys(config: Config) -> list[ListenerKey]:
    return [("socketmap", a) for a in config.listen.socketmap] + [
        ("tcp_table", a) for a in config.listen.tcp_table
    ]


def _place(address: ListenAddress) -> ListenAddress:
    return replace(address, mode=None)


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
    #: Every part to undo at shutdown, in the order it started (see tree.py).
    tree: OrderedServices = field(default_factory=OrderedServices)
    _listeners: dict[ListenerKey, ListeningService] = field(default_factory=dict)
    _factories: dict[str, _LookupFactory] = field(default_factory=dict)
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
        store = self.store = build_store(self.reactor, config)
        try:
            await store.open()
        except StartupError:
            raise
        except Exception as e:
            raise StartupError(f"cache ({config.cache.backend}): {one_line(e)}") from e
        self.tree.add(Step("store", store.close))
        self.tree.add(Step("connections", lambda: self.connections.close(self.reactor)))
        lookup = self.lookup = build_lookup(
            self.reactor, config, store, self.system_addresses, freeze_loaded=True
        )
        lookup.fetcher = TimedFetcher(lookup.fetcher, self.reactor, self.counters)
        self.tree.add(Step("lookup", lookup.stop))
        self.tree.add(Step("drain", self._drain))
        self.responder = Responder(
            lookup,
            config.profiles,
            BracketedNextHop(config.policy.bracketed_next_hop),
            counters=self.counters,
        )
        common: dict[str, Any] = {
            "clock": self.reactor, "tracker": self.connections, "on_accept": self.accept_guard.accepted,
        }
        self._factories = {
            "socketmap": SocketmapFactory(self.responder, config.listen.socketmap_idle_timeout, **common),
            "tcp_table": TcpTableFactory(
                self.responder, config.listen.tcp_table_idle_timeout, DEFAULT_PROFILE, **common
            ),
        }
        for factory in self._factories.values():
            factory.noisy = False
        if self._backlog_capped:
            # Before listening: the first client may come at once, and whoever
            # sees the listener up should find the reason for its backlog logged.
            log.warning("%s", self._backlog_capped)
        keys = _listener_keys(config)
        for key in keys:
            try:
                await self._listen(key, quiet=True)
            except StartupError:
                await self.tree.stopService()
                raise
        self._order_ports(config)
        for kind, address in keys:
            log.info("listening for %s on %s", kind, address)
        # Lookups are answered from here on (a miss in the front reads the
        # store); the front warms meanwhile, and start() returns once it is warm.
        await lookup.start(warm_in_background=True)
        self.tree.start()
        await lookup.warmed()

    async def _drain(self) -> None:
        self.accept_guard.stop()
        await self.connections.drain(self.reactor)

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
        child = ListeningService(f"{kind} {address}", port)
        self.tree.add(child)
        self._listeners[key] = child
        if not quiet:
            log.info("listening for %s on %s", kind, address)

    async def _unlisten(self, key: ListenerKey) -> None:
        await self.tree.remove(self._listeners.pop(key))

    def _order_ports(self, config: Config) -> None:
        listeners = self._listeners
        self.ports[:] = [(key[1], listeners[key].port) for key in _listener_keys(config) if key in listeners]

    async def stop(self, *, quiet: bool = False) -> None:
        """Stop accepting, let lookups in flight finish and answer, write the cache back.

        ``quiet``: a start that failed after the daemon was up; the error
        line says it all, so "stopped" is not logged.
        """
        self._listeners.clear()
        self.ports.clear()
        await self.tree.stopService()
        if not quiet:
            log.info("stopped")

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
            await self._unlisten(key)
        opened: list[ListenerKey] = []
        for key in added:
            try:
                await self._listen(key)
            except StartupError as e:
                for done in opened:
                    await self._unlisten(done)
                lost = ", ".join(str(key[1]) for key in rebound)
                raise ReloadRefused(str(e) + (f" (and {lost} was closed)" if lost else "")) from e
            opened.append(key)
        for key in removed:
            if key in self._listeners:
                await self._unlisten(key)
                log.info("no longer listening for %s on %s", key[0], key[1])
        self._order_ports(new)
        if added or removed:
            notes.append(f"listeners: {len(added)} added, {len(removed)} removed, "
                         f"{len(new_keys) - len(added)} kept")

        self._factories["socketmap"].idle_timeout = new.listen.socketmap_idle_timeout
        self._factories["tcp_table"].idle_timeout = new.listen.tcp_table_idle_timeout
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
