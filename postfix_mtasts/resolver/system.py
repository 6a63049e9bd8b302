"""Addresses of a policy host from the system's resolver (getaddrinfo).

Used when no ``[resolver] nameservers`` are configured: the daemon then
follows the system's configuration anyway, and glibc resolves the
``mta-sts`` host's A and AAAA records in C, where dnspython would build and
parse two messages in Python. In the benchmark's cold fill that was about a
third of the daemon's CPU. ``/etc/hosts``, ``resolv.conf`` and ``gai.conf``
apply, as they do to every other program on the host. The ``_mta-sts`` TXT
record is always looked up with dnspython.

getaddrinfo blocks, so it runs in a thread pool of its own: a DNS server
that stops answering ties up these threads, never the cache's. A caller
that stops waiting (its fetch deadline) gets its Deferred cancelled at once;
the thread finishes on its own.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from postfix_mtasts import limits
from postfix_mtasts.resolver.dns import AddressLookupError

#: getaddrinfo's errors, as one line each (the others: their own text).
_REASONS = {
    socket.EAI_NONAME: "no such host or no A or AAAA record",
    socket.EAI_AGAIN: "temporary DNS failure",
    socket.EAI_FAIL: "DNS failure",
}


def _lookup(host: str) -> list[str]:
    """The host's addresses, each once, in getaddrinfo's (RFC 6724) order."""
    found: list[str] = []
    for _family, _type, _proto, _name, sockaddr in socket.getaddrinfo(
        host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    ):
        address = str(sockaddr[0])
        if address not in found:
            found.append(address)
    return found


class SystemAddressResolver:
    """An ``AddressResolver`` for the HTTPS fetcher, backed by getaddrinfo."""

    def __init__(self, reactor: Any, threads: int = limits.ADDRESS_LOOKUP_THREADS) -> None:
        self._reactor = reactor
        self._threads = threads
        self._pool: ThreadPool | None = None

    def _started_pool(self) -> ThreadPool:
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(0, self._threads, name="getaddrinfo")
            pool.start()
            cast(IReactorCore, self._reactor).addSystemEventTrigger("during", "shutdown", self.stop)
        return pool

    def stop(self) -> None:
        """Stop the threads (waiting for lookups still running); idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    async def addresses(self, host: str) -> list[str]:
        """IPv6 and IPv4 addresses of ``host``; AddressLookupError with one
        line (without the host name) when it has none or DNS fails."""
        name = host.rstrip(".")
        if not name or "\x00" in name:
            raise AddressLookupError(f"invalid host name {host!r}")
        reactor = cast(IReactorFromThreads, self._reactor)
        try:
            return await deferToThreadPool(reactor, self._started_pool(), _lookup, name)
        except socket.gaierror as error:
            reason = (_REASONS.get(error.errno) if error.errno is not None else None) or str(
                error.strerror or error
            )
            raise AddressLookupError(reason) from None
        except (UnicodeError, ValueError) as error:
            raise AddressLookupError(f"invalid host name {host!r}: {error}") from None
