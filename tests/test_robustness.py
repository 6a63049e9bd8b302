"""A bad request only ever harms its own connection: one in-process
daemon takes 1000 concurrent connections, socketmap and tcp_table, good ones
mixed with garbage (broken netstrings, oversize lengths, binary junk, requests
cut off by a close, slowloris drips), against the loopback DNS server and
policy host.

Every good request must get the right answer, every garbage connection must be
closed by the daemon (or by its own client), the process's memory must stay
bounded and no protocol object may outlive its connection.
"""

from __future__ import annotations

import gc
import logging
import random
import resource
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import deferLater

from postfix_mtasts.background import quiet
from postfix_mtasts.codec import socketmap as socketmap_codec
from postfix_mtasts.codec import tcptable as tcptable_codec
from postfix_mtasts.protocol import SocketmapProtocol, TcpTableProtocol
from tests.conftest import require
from tests.support.daemon import async_yield_fixture, ensure_deferred
from tests.support.world import RawConnection, RunningDaemon, World, socketmap_query, start_daemon

pytestmark = pytest.mark.integration

CONNECTIONS = 1000
#: File descriptors the test process needs: both ends of every connection, plus headroom.
FDS_NEEDED = 2 * CONNECTIONS + 512
#: Connects in flight at once, so the listener's backlog is not flooded with SYNs.
CONNECTS_IN_FLIGHT = 100
#: Idle timeout of the daemon under test: long enough for every scenario to
#: finish its exchange, short enough that stalled slowloris clients are cut soon.
IDLE_TIMEOUT = 6.0
#: Pause between the drips of a slowloris client.
DRIP_PAUSE = 0.3
#: Generous bound on the daemon's memory growth over the whole storm (not a
#: performance target: only a leak of the connections' buffers would reach it).
RSS_GROWTH_LIMIT_KB = 200 * 1024
#: Bounded waits (polls of POLL seconds) for the daemon to see every close.
POLL = 0.05
SETTLE_POLLS = 400
SEED = 8461

POLICY_DOMAINS = tuple(f"policy{i}.example" for i in range(5))
PLAIN_DOMAINS = tuple(f"plain{i}.example" for i in range(5))

log = logging.getLogger(__name__)


def expected_socketmap(domain: str) -> tuple[str, str]:
    if domain in POLICY_DOMAINS:
        return ("OK", f"secure match=mx.{domain} servername=hostname")
    return ("NOTFOUND", "")


def expected_tcp_table(domain: str) -> tuple[int, str]:
    """The tcp_table reply for ``domain``; a 500's text is only the reason, so
    :func:`tcp_table_shape` drops it before comparing."""
    if domain in POLICY_DOMAINS:
        return (200, f"secure match=mx.{domain} servername=hostname")
    return (500, "")


def tcp_table_shape(replies: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(code, text if code == 200 else "") for code, text in replies]


def rss_kb() -> int:
    """Resident set size of this process (the daemon runs in it), in kB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def live_protocols() -> Counter[str]:
    gc.collect()
    counts: Counter[str] = Counter()
    for thing in gc.get_objects():
        if isinstance(thing, SocketmapProtocol):
            counts["socketmap"] += 1
        elif isinstance(thing, TcpTableProtocol):
            counts["tcp_table"] += 1
    return counts


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard_enough = hard == resource.RLIM_INFINITY or hard >= FDS_NEEDED
    require(f"RLIMIT_NOFILE hard limit of at least {FDS_NEEDED} (have {hard})", hard_enough)
    if soft != resource.RLIM_INFINITY and soft < FDS_NEEDED:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FDS_NEEDED, hard))


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@async_yield_fixture
async def world() -> AsyncIterator[World]:
    started = await World.start(reactor)
    for domain in POLICY_DOMAINS:
        started.publish(domain, World.policy_text(mx=(f"mx.{domain}",)), "id1")
    yield started
    await started.stop()


@async_yield_fixture
async def daemon(world: World) -> AsyncIterator[RunningDaemon]:
    config = world.config()
    config = replace(
        config,
        listen=replace(
            config.listen, socketmap_idle_timeout=IDLE_TIMEOUT, tcp_table_idle_timeout=IDLE_TIMEOUT
        ),
    )
    running = await start_daemon(reactor, config)
    yield running
    await running.stop()


class Storm:
    """The scenarios, their outcomes and the moment every connection is open."""

    def __init__(self, daemon: RunningDaemon, rng: random.Random) -> None:
        self.daemon = daemon
        self.rng = rng
        self.connect_limit = DeferredSemaphore(CONNECTS_IN_FLIGHT)
        self.opened = 0
        self.all_open: Deferred[None] = Deferred()
        self.held_open = 0
        self.peak_server_connections = 0
        self.outcomes: Counter[str] = Counter()

    async def connect(self, port: int) -> RawConnection:
        await self.connect_limit.acquire()
        try:
            connection = await RawConnection.open(port, reactor)
        finally:
            self.connect_limit.release()
        self.opened += 1
        if self.opened == CONNECTIONS:
            self.all_open.callback(None)
        return connection

    async def hold(self, connection: RawConnection) -> None:
        """Keep a connection open until every one of the storm is open, then close it."""
        self.held_open += 1
        await quiet(self.all_open)
        connection.close()

    def random_domains(self, count: int) -> list[str]:
        return [self.rng.choice(POLICY_DOMAINS + PLAIN_DOMAINS) for _ in range(count)]

    # --- good clients ---------------------------------------------------------

    async def good_socketmap(self) -> None:
        connection = await self.connect(self.daemon.socketmap_port)
        domains = self.random_domains(self.rng.randint(1, 3))
        connection.send(b"".join(socketmap_codec.encode_request("postfix", d.encode()) for d in domains))
        replies = await connection.socketmap_replies(len(domains))
        assert replies == [expected_socketmap(d) for d in domains], domains
        self.outcomes["socketmap answered"] += len(domains)
        await self.hold(connection)

    async def good_tcp_table(self) -> None:
        connection = await self.connect(self.daemon.tcp_table_port)
        domains = self.random_domains(self.rng.randint(1, 3))
        connection.send(b"".join(tcptable_codec.encode_request(d.encode()) for d in domains))
        replies = await connection.tcp_table_replies(len(domains))
        assert tcp_table_shape(replies) == [expected_tcp_table(d) for d in domains], domains
        self.outcomes["tcp_table answered"] += len(domains)
        await self.hold(connection)

    async def slow_complete(self) -> None:
        """A request dripped in three parts: slow, but answered all the same."""
        connection = await self.connect(self.daemon.socketmap_port)
        domain = self.random_domains(1)[0]
        wire = socketmap_codec.encode_request("postfix", domain.encode())
        third = max(1, len(wire) // 3)
        for start in range(0, len(wire), third):
            connection.send(wire[start : start + third])
            await sleep(DRIP_PAUSE)
        assert await connection.socketmap_replies(1) == [expected_socketmap(domain)]
        self.outcomes["slow request answered"] += 1
        await self.hold(connection)

    async def tcp_table_framed_junk(self) -> None:
        """Binary junk that is still a line: a 400 reply, and the connection stays usable."""
        connection = await self.connect(self.daemon.tcp_table_port)
        domain = self.random_domains(1)[0]
        junk = bytes(self.rng.randrange(256) for _ in range(20)).replace(b"\n", b"") + b"\n"
        connection.send(junk + tcptable_codec.encode_request(domain.encode()))
        replies = await connection.tcp_table_replies(2)
        assert replies[0][0] == 400 and tcp_table_shape(replies[1:]) == [expected_tcp_table(domain)], replies
        assert not connection.is_closed
        self.outcomes["tcp_table junk line refused, connection kept"] += 1
        await self.hold(connection)

    # --- garbage the daemon must close -----------------------------------------

    async def closed_by_daemon(self, port: int, data: bytes, what: str) -> RawConnection:
        connection = await self.connect(port)
        connection.send(data)
        await connection.closed()
        self.outcomes[f"closed by daemon: {what}"] += 1
        return connection

    async def bad_netstring_after_good(self) -> None:
        domain = self.random_domains(1)[0]
        good = socketmap_codec.encode_request("postfix", domain.encode())
        port = self.daemon.socketmap_port
        connection = await self.closed_by_daemon(port, good + b"x7:garbage,", "bad netstring")
        # The request before the bad bytes is still answered, then the connection closes.
        replies = socketmap_codec.SocketmapReplyDecoder().feed(connection.received)
        assert replies == [expected_socketmap(domain)]

    async def oversize_length(self) -> None:
        port = self.daemon.socketmap_port
        connection = await self.closed_by_daemon(port, b"99999999999:", "oversize length")
        assert connection.received == b""

    async def binary_junk(self) -> None:
        junk = b"\xff" + bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 200)))
        connection = await self.closed_by_daemon(self.daemon.socketmap_port, junk, "binary junk")
        assert connection.received == b""

    async def tcp_table_long_line(self) -> None:
        line = b"get " + b"A" * 5000
        connection = await self.closed_by_daemon(self.daemon.tcp_table_port, line, "over-long tcp_table line")
        assert connection.received == b""

    async def slow_stall(self) -> None:
        """Slowloris: half a request, a drip, then silence until the idle timeout."""
        connection = await self.connect(self.daemon.socketmap_port)
        wire = socketmap_codec.encode_request("postfix", b"stalled.example")
        connection.send(wire[:5])
        await sleep(DRIP_PAUSE)
        connection.send(wire[5:9])
        await connection.closed()
        assert connection.received == b""
        self.outcomes["closed by daemon: stalled partial request"] += 1

    # --- clients that give up --------------------------------------------------

    async def half_then_close(self) -> None:
        connection = await self.connect(self.daemon.socketmap_port)
        connection.send(socketmap_codec.encode_request("postfix", b"policy0.example")[:10])
        connection.close()
        await connection.closed()
        self.outcomes["client closed mid-request"] += 1


async def settle(daemon: RunningDaemon) -> int:
    """Wait (bounded) until the daemon holds no connection; return how many remain."""
    for _ in range(SETTLE_POLLS):
        if not daemon.daemon.connections.open:
            return 0
        await sleep(POLL)
    return len(daemon.daemon.connections.open)


@ensure_deferred
async def test_thousand_concurrent_connections_garbage_harms_only_itself(
    world: World, daemon: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    raise_fd_limit()
    caplog.set_level(logging.INFO, logger="postfix_mtasts")
    # Warm-up: one good lookup of each kind, so the baseline includes the
    # daemon's steady state (resolver sockets, TLS contexts, caches).
    for domain in POLICY_DOMAINS + PLAIN_DOMAINS:
        answer = await socketmap_query(daemon.socketmap_port, "postfix", domain.encode())
        assert answer == expected_socketmap(domain)
    assert await settle(daemon) == 0
    baseline_protocols = live_protocols()
    rss_before = rss_kb()

    storm = Storm(daemon, random.Random(SEED))
    scenarios: list[Callable[[], Coroutine[Any, Any, None]]] = [
        storm.good_socketmap, storm.good_socketmap, storm.good_tcp_table, storm.bad_netstring_after_good,
        storm.oversize_length, storm.binary_junk, storm.half_then_close, storm.slow_complete,
        storm.slow_stall, storm.tcp_table_long_line, storm.tcp_table_framed_junk, storm.good_socketmap,
    ]
    chosen = [scenarios[i % len(scenarios)] for i in range(CONNECTIONS)]
    running: list[Deferred[None]] = [Deferred.fromCoroutine(scenario()) for scenario in chosen]

    # While every connection is open, count what the daemon holds at once.
    async def watch() -> None:
        while not storm.all_open.called:
            storm.peak_server_connections = max(storm.peak_server_connections, len(daemon.daemon.connections))
            await sleep(POLL)
        storm.peak_server_connections = max(storm.peak_server_connections, len(daemon.daemon.connections))

    watcher = Deferred.fromCoroutine(watch())
    await gatherResults(running, consumeErrors=True)
    await watcher
    rss_peak = rss_kb()

    assert await settle(daemon) == 0, "connections still open in the daemon after every client is gone"
    after_protocols = live_protocols()
    rss_after = rss_kb()

    # The daemon is still healthy for a new client.
    assert await socketmap_query(daemon.socketmap_port, "postfix", b"policy1.example") == expected_socketmap(
        "policy1.example"
    )

    per_scenario = CONNECTIONS // len(scenarios)
    assert storm.outcomes["closed by daemon: bad netstring"] >= per_scenario
    assert storm.outcomes["closed by daemon: stalled partial request"] >= per_scenario
    assert storm.outcomes["client closed mid-request"] >= per_scenario
    assert storm.peak_server_connections >= storm.held_open // 2, (
        f"the daemon never held many connections at once (peak {storm.peak_server_connections})"
    )
    assert after_protocols == baseline_protocols, (
        f"protocol objects left over: {after_protocols} (baseline {baseline_protocols})"
    )
    growth = rss_after - rss_before
    assert growth < RSS_GROWTH_LIMIT_KB, f"RSS grew by {growth} kB over the storm"

    # Each garbage connection costs at most one log line, none a traceback.
    protocol_lines = [r for r in caplog.records if r.name == "postfix_mtasts.protocol"]
    garbage = sum(count for what, count in storm.outcomes.items() if what.startswith("closed by daemon"))
    junk_lines = storm.outcomes["tcp_table junk line refused, connection kept"]
    assert len(protocol_lines) <= garbage + junk_lines
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]

    log.warning(
        "storm: %s; peak %d daemon connections at once; RSS %d kB before, %d kB peak, %d kB after "
        "(growth %+d kB); protocol objects %s before and after",
        dict(storm.outcomes), storm.peak_server_connections, rss_before, rss_peak, rss_after, growth,
        dict(after_protocols),
    )
