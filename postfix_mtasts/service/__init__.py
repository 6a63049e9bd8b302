"""Wiring: configuration in, a running daemon out.

The service tree (each child stopped in turn, the last started first)::

    Daemon.tree (OrderedServices)
      store              closed last, once everything above has written to it
      connections        closed once their answers are written
      lookup             background work stopped, resolutions in flight finished
      drain              no new requests; those received are answered
      socketmap / tcp_table listeners, one child each (reload adds and removes them)
      control            the admin's control socket (Service)
      http               /metrics and /reports (Service)
      reports            the TLS report intake and watch (Service)
      heartbeat          systemd's watchdog and status line (Service)

- :mod:`.build`: the store, the resolvers, DANE and the lookup from the configuration;
- :mod:`.daemon`: :class:`Daemon`, the store, lookup and Postfix listeners;
- :mod:`.system`: :class:`Service`, what a system service adds around it;
- :mod:`.tree`, :mod:`.connections`, :mod:`.endpoints`, :mod:`.counters`,
  :mod:`.privileges`: the parts they are made of.
"""

from postfix_mtasts.errors import ReloadRefused, StartupError
from postfix_mtasts.service.build import (
    SHARED_STORE_OP_TIMEOUT,
    build_dane,
    build_lookup,
    build_resolvers,
    build_store,
)
from postfix_mtasts.service.counters import ServiceCounters, TimedFetcher
from postfix_mtasts.service.daemon import Daemon
from postfix_mtasts.service.endpoints import (
    endpoint_for,
    inherited_descriptor,
    listen_environment_now,
    server_endpoint,
)
from postfix_mtasts.service.system import Service

__all__ = [
    "SHARED_STORE_OP_TIMEOUT",
    "Daemon",
    "ReloadRefused",
    "Service",
    "ServiceCounters",
    "StartupError",
    "TimedFetcher",
    "build_dane",
    "build_lookup",
    "build_resolvers",
    "build_store",
    "endpoint_for",
    "inherited_descriptor",
    "listen_environment_now",
    "server_endpoint",
]
