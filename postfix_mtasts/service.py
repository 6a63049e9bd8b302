"""Wiring: configuration in, a running daemon out.

Start-up order matters: the store is opened and the in-memory front warmed
*before* any listener accepts a connection, so after a restart cached
policies answer at once, before any network traffic.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort

from postfix_mtasts.cache import IPolicyStore
from postfix_mtasts.config import Config, ListenAddress, Nameserver
from postfix_mtasts.lookup import LookupSettings, PolicyLookup
from postfix_mtasts.policy.nexthop import BracketedNextHop
from postfix_mtasts.protocol import SocketmapFactory, TcpTableFactory
from postfix_mtasts.resolver.dns import DnsResolver
from postfix_mtasts.resolver.https import HttpsPolicyFetcher
from postfix_mtasts.responder import Responder

log = logging.getLogger("postfix_mtasts.service")

#: Bound on each operation against a shared (network) store.
SHARED_STORE_OP_TIMEOUT = 2.0


class StartupError(Exception):
    """The daemon cannot start; ``str(e)`` is one line for the admin."""


def nameserver_strings(nameservers: tuple[Nameserver, ...]) -> list[str]:
    return [
        f"[{ns.address}]:{ns.port}" if ":" in ns.address else f"{ns.address}:{ns.port}"
        for ns in nameservers
    ]


def lookup_settings(config: Config) -> LookupSettings:
    policy = config.policy
    return LookupSettings(
        recheck_interval=policy.recheck_interval,
        recheck_deadline=policy.recheck_deadline,
        first_lookup_deadline=policy.first_lookup_deadline,
        temp_on_first_lookup_timeout=policy.on_first_lookup_timeout == "temp",
        fetch_retry_backoff=policy.fetch_retry_backoff,
        negative_ttl_min=policy.negative_ttl_min,
        negative_ttl_max=policy.negative_ttl_max,
        refresh_after=policy.refresh_after,
        refresh_concurrency=policy.refresh_concurrency,
        refresh_jitter=policy.refresh_jitter,
        refresh_idle_limit=policy.refresh_idle_limit,
        memory_entries=config.cache.memory_entries,
        lease_ttl=config.resolver.fetch_timeout + 5.0,
    )


def build_store(reactor: Any, config: Config) -> IPolicyStore:
    """The configured backend; shared backends are wrapped to survive outages."""
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
    return ResilientStore(reactor, inner, op_timeout=SHARED_STORE_OP_TIMEOUT)


def build_lookup(reactor: Any, config: Config, store: IPolicyStore) -> PolicyLookup:
    dns = DnsResolver(nameserver_strings(config.resolver.nameservers), timeout=config.resolver.dns_timeout)
    fetcher = HttpsPolicyFetcher(
        reactor,
        dns,
        ca_file=config.resolver.ca_file,
        timeout=config.resolver.fetch_timeout,
        port=config.resolver.https_port,
    )
    return PolicyLookup(reactor, dns, fetcher, store, lookup_settings(config))


@dataclass
class Daemon:
    """One running postfix-mtasts: store, lookup, responder and listeners."""

    reactor: Any
    config: Config
    store: IPolicyStore | None = None
    lookup: PolicyLookup | None = None
    responder: Responder | None = None
    ports: list[tuple[ListenAddress, IListeningPort]] = field(default_factory=list)

    async def start(self) -> None:
        config = self.config
        self.store = build_store(self.reactor, config)
        try:
            await self.store.open()
        except Exception as e:
            raise StartupError(f"cache ({config.cache.backend}): {e}") from e
        self.lookup = build_lookup(self.reactor, config, self.store)
        loaded = await self.lookup.start()
        self.responder = Responder(
            self.lookup, config.profiles, BracketedNextHop(config.policy.bracketed_next_hop)
        )
        log.info("cache %s: %d entries loaded into memory", config.cache.backend, loaded)
        socketmap_factory = SocketmapFactory(
            self.responder, config.listen.socketmap_idle_timeout, clock=self.reactor
        )
        tcp_table_factory = TcpTableFactory(
            self.responder, config.listen.tcp_table_idle_timeout, clock=self.reactor
        )
        for factory in (socketmap_factory, tcp_table_factory):
            factory.noisy = False
        listeners = [(a, socketmap_factory, "socketmap") for a in config.listen.socketmap]
        listeners += [(a, tcp_table_factory, "tcp_table") for a in config.listen.tcp_table]
        for address, factory, kind in listeners:
            try:
                port = await serverFromString(self.reactor, endpoint_for(address)).listen(factory)
            except Exception as e:
                await self.stop()
                raise StartupError(f"cannot listen on {address} ({kind}): {_one_line(e)}") from e
            self.ports.append((address, port))
            log.info("listening for %s on %s", kind, address)

    async def stop(self) -> None:
        """Stop accepting, let lookups in flight finish, write the cache back."""
        for _, port in self.ports:
            await port.stopListening()
        self.ports.clear()
        if self.lookup is not None:
            await self.lookup.stop()
        if self.store is not None:
            await self.store.close()
        log.info("stopped")


def endpoint_for(address: ListenAddress) -> str:
    if address.kind == "systemd":
        return address.endpoint_description(_systemd_domain(address))
    description = address.endpoint_description()
    if address.kind == "unix":
        # A lock file lets Twisted remove the stale socket a crash left behind.
        description += ":lockfile=1"
    return description


def _systemd_domain(address: ListenAddress) -> str:
    """The address family of a socket passed by systemd, read off the descriptor."""
    from twisted.python.systemd import ListenFDs

    fds = ListenFDs.fromEnvironment()
    descriptors = fds.inheritedDescriptors()
    if address.systemd_name:
        fd = fds.inheritedNamedDescriptors().get(address.systemd_name)
        if fd is None:
            raise StartupError(f"{address}: systemd passed no socket named {address.systemd_name!r}")
    else:
        index = address.systemd_index or 0
        if index >= len(descriptors):
            raise StartupError(f"{address}: systemd passed {len(descriptors)} sockets, not {index + 1}")
        fd = descriptors[index]
    sock = socket.socket(fileno=fd)
    family = sock.family
    sock.detach()  # the descriptor stays open for Twisted to adopt
    return {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}[family]


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())


