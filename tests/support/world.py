"""A small loopback "internet" for end-to-end tests: one DNS server and one
HTTPS policy host on 127.0.0.1, plus real socketmap/tcp_table clients and an
in-process daemon pointed at them.

Usage::

    world = await World.start(reactor)
    world.publish("example.com", World.policy_text(mx=("mx.example.com",)), "id1")
    running = await start_daemon(reactor, world.config())
    status, data = await socketmap_query(running.socketmap_port, "postfix", b"example.com")
    await running.stop()
    await world.stop()

Subprocess tests take :meth:`World.config_toml` (with real port numbers) and
write it to a file for ``postfix-mtasts serve``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from postfix_mtasts.codec import socketmap, tcptable
from postfix_mtasts.config import Config, ListenAddress, ListenConfig, parse_config
from postfix_mtasts.service import Daemon
from tests.support.dns_server import DnsServer
from tests.support.https_server import HostileHttpsServer, Serve

#: The only address anything here listens on or connects to.
LOOPBACK = "127.0.0.1"
#: Short limits so that failing discoveries end quickly in tests.
DNS_TIMEOUT = 1.0
FETCH_TIMEOUT = 2.0
FIRST_LOOKUP_DEADLINE = 5.0
#: How long a test client waits for a reply before the test fails (not a timed
#: assertion: only a guard against a hung test run).
CLIENT_TIMEOUT = 20.0

PolicyTable = Mapping[str, object]
#: Backends shared by a fleet, under which each daemon keeps a local copy.
SHARED_BACKENDS = ("redis", "postgresql")


class World:
    """One DNS server and one HTTPS policy host, both on 127.0.0.1.

    The HTTPS host's CA is made at run time (trustme); :attr:`ca_file` is its PEM.
    """

    def __init__(self, dns: DnsServer, https: HostileHttpsServer) -> None:
        self.dns = dns
        self.https = https
        #: Where daemons of this world keep their files (a shared backend's
        #: local copy); removed by stop().
        self.directory = tempfile.mkdtemp(prefix="mtasts-world-")
        self._local_copies = itertools.count(1)

    @classmethod
    async def start(cls, reactor: Any) -> World:
        dns = await DnsServer.start(reactor)
        https = HostileHttpsServer()
        await https.start(reactor)
        return cls(dns, https)

    async def stop(self) -> None:
        await self.https.stop()
        await self.dns.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def ca_file(self) -> str:
        return self.https.ca_file

    @property
    def https_port(self) -> int:
        return self.https.port

    # --- publishing -----------------------------------------------------------

    def publish(self, domain: str, policy_text: str, policy_id: str, *, txt: str | None = None) -> None:
        """Publish MTA-STS for ``domain``: the TXT record (``txt`` verbatim, or
        ``v=STSv1; id=<policy_id>;``), the policy host's A record, and the
        policy file served by the HTTPS host with a good certificate."""
        domain = domain.rstrip(".").lower()
        self.dns.set_txt(f"_mta-sts.{domain}", txt if txt is not None else f"v=STSv1; id={policy_id};")
        self.dns.set_a(f"mta-sts.{domain}", LOOPBACK)
        self.https.set_host(f"mta-sts.{domain}", Serve(body=policy_text.encode("utf-8")))

    @staticmethod
    def policy_text(
        mode: str = "enforce", mx: Sequence[str] = ("mx.example.com",), max_age: int = 86400
    ) -> str:
        """A policy file (RFC 8461 §3.2) with CRLF line ends."""
        lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {pattern}" for pattern in mx)]
        lines.append(f"max_age: {max_age}")
        return "".join(line + "\r\n" for line in lines)

    # --- configuration --------------------------------------------------------

    def config_toml(
        self,
        *,
        socketmap: Iterable[str] = (f"inet:{LOOPBACK}:8461",),
        tcp_table: Iterable[str] = (),
        cache_backend: str = "memory",
        cache_path: str = "",
        policy: PolicyTable | None = None,
        resolver: PolicyTable | None = None,
        profiles: Mapping[str, PolicyTable] | None = None,
        extra: str = "",
    ) -> str:
        """A TOML config pointing a daemon at this world: its nameserver,
        CA file and HTTPS port, short timeouts, the given listeners and cache.

        ``policy`` and ``resolver`` add or override keys of those sections,
        ``profiles`` adds ``[profiles.NAME]`` tables; ``extra`` is appended.
        """
        resolver_keys: dict[str, object] = {
            "nameservers": [self.dns.nameserver],
            "ca_file": self.ca_file,
            "https_port": self.https_port,
            "dns_timeout": DNS_TIMEOUT,
            "fetch_timeout": FETCH_TIMEOUT,
            **(resolver or {}),
        }
        policy_keys: dict[str, object] = {"first_lookup_deadline": FIRST_LOOKUP_DEADLINE, **(policy or {})}
        cache_keys: dict[str, object] = {"backend": cache_backend}
        if not cache_path and cache_backend in SHARED_BACKENDS:
            # Each daemon of a fleet has a local copy of its own (a second
            # daemon on one file refuses to start), never the machine's default.
            cache_path = os.path.join(self.directory, f"local-{next(self._local_copies)}.sqlite3")
        if cache_path:
            cache_keys["path"] = cache_path
        sections = [
            _table("listen", {"socketmap": list(socketmap), "tcp_table": list(tcp_table)}),
            _table("cache", cache_keys),
            _table("resolver", resolver_keys),
            _table("policy", policy_keys),
        ]
        for name, keys in (profiles or {}).items():
            sections.append(_table(f"profiles.{name}", keys))
        return "\n".join(sections) + ("\n" + extra if extra else "")

    def config(
        self,
        *,
        socketmap: Sequence[ListenAddress] | None = None,
        tcp_table: Sequence[ListenAddress] | None = None,
        **overrides: Any,
    ) -> Config:
        """:meth:`config_toml` parsed; listeners default to one socketmap and
        one tcp_table on 127.0.0.1 port 0 (the system picks; the parser
        refuses port 0, so they are set after parsing)."""
        parsed = parse_config(self.config_toml(**overrides), source="<world>")
        any_port = ListenAddress(kind="inet", host=LOOPBACK, port=0)
        listen = replace(
            parsed.listen,
            socketmap=tuple(socketmap) if socketmap is not None else (any_port,),
            tcp_table=tuple(tcp_table) if tcp_table is not None else (any_port,),
        )
        return replace(parsed, listen=listen)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _table(name: str, keys: Mapping[str, object]) -> str:
    return "\n".join([f"[{name}]", *(f"{key} = {_toml_value(value)}" for key, value in keys.items())]) + "\n"


# --- the daemon ---------------------------------------------------------------


@dataclass
class RunningDaemon:
    """An in-process :class:`Daemon` and the ports its inet listeners got."""

    daemon: Daemon
    socketmap_ports: list[int] = field(default_factory=list)
    tcp_table_ports: list[int] = field(default_factory=list)

    @property
    def socketmap_port(self) -> int:
        return self.socketmap_ports[0]

    @property
    def tcp_table_port(self) -> int:
        return self.tcp_table_ports[0]

    async def stop(self) -> None:
        await self.daemon.stop()


async def start_daemon(reactor: Any, config: Config) -> RunningDaemon:
    """Start a :class:`Daemon` in this process; listeners come up in config order."""
    daemon = Daemon(reactor, config)
    await daemon.start()
    listen: ListenConfig = config.listen
    running = RunningDaemon(daemon)
    for index, (address, listening) in enumerate(daemon.ports):
        if address.kind != "inet":
            continue
        port: Any = listening
        number: int = port.getHost().port
        if index < len(listen.socketmap):
            running.socketmap_ports.append(number)
        else:
            running.tcp_table_ports.append(number)
    return running


# --- clients --------------------------------------------------------------------


class RawConnection(Protocol):
    """A client connection that keeps every byte received and tells when it closes."""

    def __init__(self) -> None:
        self.received = b""
        self._close_waiters: list[Deferred[None]] = []
        self._data_waiters: list[Deferred[None]] = []
        self.is_closed = False
        self._reactor: Any = None

    @classmethod
    async def open(cls, target: int | str, reactor: Any = None) -> RawConnection:
        """Connect to 127.0.0.1:``target`` (an int) or the unix socket ``target``."""
        reactor = _reactor(reactor)
        endpoint: Any = (
            TCP4ClientEndpoint(reactor, LOOPBACK, target, timeout=CLIENT_TIMEOUT)
            if isinstance(target, int)
            else UNIXClientEndpoint(reactor, target, timeout=CLIENT_TIMEOUT)  # type: ignore[no-untyped-call]
        )
        connection: RawConnection = await endpoint.connect(Factory.forProtocol(cls))
        connection._reactor = reactor
        return connection

    def send(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)

    def close(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiters, self._data_waiters = self._data_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.is_closed = True
        waiters = self._data_waiters + self._close_waiters
        self._data_waiters, self._close_waiters = [], []
        for waiter in waiters:
            waiter.callback(None)

    async def closed(self) -> None:
        """Wait until the peer closes (fails the test after CLIENT_TIMEOUT)."""
        if self.is_closed:
            return
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        await waiter.addTimeout(CLIENT_TIMEOUT, self._reactor)

    async def socketmap_replies(self, count: int) -> list[tuple[str, str]]:
        """Wait for ``count`` socketmap replies (fewer if the server closes)."""
        return await self._replies(socketmap.SocketmapReplyDecoder(), count)

    async def tcp_table_replies(self, count: int) -> list[tuple[int, str]]:
        """Wait for ``count`` tcp_table replies (fewer if the server closes)."""
        return await self._replies(tcptable.TcpTableReplyDecoder(), count)

    async def _replies(self, decoder: Any, count: int) -> list[Any]:
        consumed = 0
        replies: list[Any] = []
        while True:
            if consumed < len(self.received):
                replies += decoder.feed(self.received[consumed:])
                consumed = len(self.received)
            if len(replies) >= count or self.is_closed:
                return replies
            waiter: Deferred[None] = Deferred()
            self._data_waiters.append(waiter)
            await waiter.addTimeout(CLIENT_TIMEOUT, self._reactor)


async def socketmap_query(target: int | str, name: str, key: bytes, reactor: Any = None) -> tuple[str, str]:
    """One socketmap lookup on a fresh connection: ``(status, data)``."""
    connection = await RawConnection.open(target, reactor)
    try:
        connection.send(socketmap.encode_request(name, key))
        replies = await connection.socketmap_replies(1)
    finally:
        connection.close()
    if not replies:
        raise AssertionError(f"socketmap server closed the connection without answering {key!r}")
    return replies[0]


async def tcp_table_query(target: int | str, key: bytes, reactor: Any = None) -> tuple[int, str]:
    """One tcp_table lookup on a fresh connection: ``(code, unquoted text)``."""
    connection = await RawConnection.open(target, reactor)
    try:
        connection.send(tcptable.encode_request(key))
        replies = await connection.tcp_table_replies(1)
    finally:
        connection.close()
    if not replies:
        raise AssertionError(f"tcp_table server closed the connection without answering {key!r}")
    return replies[0]


def _reactor(reactor: Any) -> Any:
    if reactor is not None:
        return reactor
    from twisted.internet import reactor as global_reactor

    return global_reactor
