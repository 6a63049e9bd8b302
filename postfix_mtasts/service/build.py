"""From configuration to components: the store, the resolvers, DANE, the lookup.

Builders only: nothing here listens or opens anything (the store is opened by
the daemon that owns it), so a reload can build new resolvers and keep the rest.
"""

from __future__ import annotations

from typing import Any

from postfix_mtasts.cache import IPolicyStore
from postfix_mtasts.config import Config
from postfix_mtasts.errors import StartupError
from postfix_mtasts.lookup import LookupSettings, PolicyLookup
from postfix_mtasts.resolver.dane import DaneCache, DaneResolver
from postfix_mtasts.resolver.dns import DnsResolver
from postfix_mtasts.resolver.https import AddressResolver, HttpsPolicyFetcher
from postfix_mtasts.resolver.system import SystemAddressResolver

#: Bound on each operation against a shared (network) store.
SHARED_STORE_OP_TIMEOUT = 2.0


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
