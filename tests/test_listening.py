"""The listeners under a storm of connections (issue 20), covering
postfix_mtasts.listening and the listeners service.py opens with it.

The listen backlog (``listen.backlog``, or 0: the kernel's largest,
net.core.somaxconn) reaches every inet and unix listener a real
``postfix-mtasts serve`` opens: socketmap, tcp_table, the control socket and
metrics, read back from the kernel with ``ss`` (a listening socket's Send-Q is
its backlog). A backlog above the kernel's cap is reported in one line. 500
clients connecting at once while the daemon cannot accept are all held by the
kernel and all answered once it can. Out of descriptors (AcceptGuard): each
burst of accept failures is logged once when it begins and once when it is
over, however many connections it refused; a listener that refuses nothing
(Twisted's reserved descriptor gone) pauses instead of spinning; a real
daemon whose RLIMIT_NOFILE is lowered (prlimit) keeps answering its open
connection through two bursts and accepts new ones after.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger

from postfix_mtasts import limits
from postfix_mtasts.codec import socketmap as socketmap_codec
from postfix_mtasts.config import parse_listen_address
from postfix_mtasts.listening import AcceptGuard, backlog_capped, kernel_backlog_limit, listen_backlog
from postfix_mtasts.service import endpoint_for
from tests.conftest import require
from tests.support.daemon import DaemonProcess, async_yield_fixture, ensure_deferred, free_port
from tests.support.world import LOOPBACK, World, socketmap_query

pytestmark = pytest.mark.integration

#: Clients of the storm test, and the descriptors the test process needs for them.
STORM_CLIENTS = 500
FDS_NEEDED = STORM_CLIENTS + 200
#: A backlog no default gives, so reading it back proves it was applied.
CONFIGURED_BACKLOG = 321
#: Bounded polls for the kernel to finish the storm's handshakes, and for its replies.
POLL = 0.05
POLLS = 400
DOMAIN = "storm.example"


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def somaxconn() -> int:
    limit = kernel_backlog_limit()
    require("/proc/sys/net/core/somaxconn", limit is not None)
    assert limit is not None
    return limit


def listening_backlogs() -> dict[str, int]:
    """Every listening TCP and unix stream socket on this machine, by local
    address or path, with its backlog (the Send-Q ss shows for a listener)."""
    require("ss (iproute2)", shutil.which("ss") is not None)
    out = subprocess.run(["ss", "-lnH", "-t", "-x"], check=True, capture_output=True, text=True).stdout
    backlogs: dict[str, int] = {}
    for line in out.splitlines():
        fields = line.split()
        if "LISTEN" not in fields:
            continue
        at = fields.index("LISTEN")
        backlogs[fields[at + 3]] = int(fields[at + 2])
    return backlogs


def daemon_config(
    world: World, socketmap: list[str], extra: str = "", tcp_table: tuple[str, ...] = ()
) -> str:
    return world.config_toml(socketmap=socketmap, tcp_table=tcp_table, extra=extra)


def with_backlog(config: str, backlog: int) -> str:
    """``config`` with ``[listen] backlog`` set."""
    assert "[listen]\n" in config
    return config.replace("[listen]\n", f"[listen]\nbacklog = {backlog}\n", 1)


async def backlogs_of(*places: str) -> dict[str, int | None]:
    """The backlogs of ``places`` once all of them listen (the daemon opens the
    control socket and metrics after the first listener accepts)."""
    backlogs = listening_backlogs()
    for _ in range(POLLS):
        if all(place in backlogs for place in places):
            break
        await sleep(POLL)
        backlogs = listening_backlogs()
    return {place: backlogs.get(place) for place in places}


@async_yield_fixture
async def world() -> AsyncIterator[World]:
    started = await World.start(reactor)
    started.publish(DOMAIN, World.policy_text(mx=(f"mx.{DOMAIN}",)), "id1")
    try:
        yield started
    finally:
        await started.stop()


# --- the pure parts -----------------------------------------------------------------


def test_kernel_limit_is_somaxconn_or_none_when_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "somaxconn"
    path.write_text("4096\n")
    assert kernel_backlog_limit(str(path)) == 4096
    path.write_text("not a number\n")
    assert kernel_backlog_limit(str(path)) is None
    path.write_text("0\n")
    assert kernel_backlog_limit(str(path)) is None
    assert kernel_backlog_limit(str(tmp_path / "missing")) is None


def test_backlog_is_the_configured_one_else_the_kernels_else_the_default() -> None:
    assert listen_backlog(300, 4096) == 300
    assert listen_backlog(0, 8192) == 8192
    assert listen_backlog(0, None) == limits.LISTEN_BACKLOG_DEFAULT


def test_a_backlog_above_the_kernels_cap_is_one_line_naming_key_and_fix() -> None:
    assert backlog_capped(0, 4096) is None
    assert backlog_capped(4096, 4096) is None
    assert backlog_capped(10_000, None) is None
    message = backlog_capped(10_000, 4096)
    assert message is not None and "\n" not in message
    assert "listen.backlog = 10000" in message
    assert "4096" in message and "sysctl -w net.core.somaxconn=10000" in message


def test_endpoint_descriptions_carry_the_backlog_to_tcp_and_unix_ports(tmp_path: Path) -> None:
    memory = MemoryReactor()
    factory = Factory()
    for text in ("inet:127.0.0.1:8461", "inet:[::1]:8461"):
        endpoint = serverFromString(memory, endpoint_for(parse_listen_address(text), 777))
        endpoint.listen(factory)
    unix = parse_listen_address(f"unix:{tmp_path}/s.sock:mode=0660")
    serverFromString(memory, endpoint_for(unix, 888)).listen(factory)
    assert [server[2] for server in memory.tcpServers] == [777, 777]
    assert [server[2] for server in memory.unixServers] == [888]
    assert ":backlog=" not in endpoint_for(unix)


# --- running out of descriptors: AcceptGuard on a stand-in port ---------------------

#: Twisted's accept loop's words (twisted.internet.tcp._accept), as a port logs them.
RESERVE_RELEASED = "EMFILE encountered; releasing reserved file descriptor."
REFUSED_ONE = "EMFILE recovery: Closed socket from {address}"
RESERVED_AGAIN = "Re-reserving EMFILE recovery file descriptor."
ACCEPT_FAILED = "Could not accept new connection ({acceptError})"


class StandInPort:
    """What AcceptGuard uses of a Twisted port: the logger its accept loop
    reports through, reading on and off, and whether it still listens."""

    forwarded: list[dict[str, object]]
    _logger: Logger

    def __init__(self) -> None:
        self.forwarded = []
        type(self)._logger = Logger(namespace="stand-in", observer=self.forwarded.append)
        self.reading = True
        self.connected = True
        self.disconnecting = False

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def refuse(self, connections: int) -> None:
        """One accept-loop turn that ran out of descriptors and closed ``connections``."""
        self._logger.info(RESERVE_RELEASED)
        for number in range(connections):
            self._logger.info(REFUSED_ONE, address=("127.0.0.1", 40000 + number))
        self._logger.info(RESERVED_AGAIN)


def guard_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "postfix_mtasts.service"]


def watched() -> tuple[AcceptGuard, StandInPort, Clock]:
    clock = Clock()
    guard = AcceptGuard(clock, pause=0.25, quiet=5.0)
    port = StandInPort()
    guard.watch(port)
    return guard, port, clock


def test_a_burst_is_logged_once_when_it_begins_and_once_when_it_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    guard, port, clock = watched()
    port.refuse(100)
    for _ in range(20):  # more connections come, and are refused
        clock.advance(0.25)
        port.refuse(3)
        # Twisted refused them itself: nothing spins, the port reads on.
        assert port.reading
    lines = guard_lines(caplog)
    assert len(lines) == 1
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert lines[0].startswith(f"out of file descriptors (limit {limit}): ")
    assert "LimitNOFILE=" in lines[0]

    clock.advance(0.25)
    guard.accepted()
    guard.accepted()
    clock.advance(4.9)
    assert len(guard_lines(caplog)) == 1
    clock.advance(0.1)
    lines = guard_lines(caplog)
    assert len(lines) == 2
    # 160 refused in 5 s of failures; an accept 0.25 s later, then 5 s without one.
    assert lines[1] == "accepting connections again: 160 refused since the first failure 10.2s ago"
    assert guard.bursts == 1 and guard.burst_started is None
    # Nothing of the accept loop reached the port's own log.
    assert port.forwarded == []

    # The next burst is a new one, counted from zero.
    port.refuse(2)
    clock.advance(0.25)
    guard.accepted()
    clock.advance(5.0)
    lines = guard_lines(caplog)
    assert len(lines) == 4 and lines[2].startswith("out of file descriptors")
    assert lines[3].startswith("accepting connections again: 2 refused")
    assert guard.bursts == 2


def test_a_failure_after_an_accept_keeps_the_burst_open(caplog: pytest.LogCaptureFixture) -> None:
    guard, port, clock = watched()
    port.refuse(1)
    clock.advance(0.25)
    guard.accepted()
    clock.advance(2.0)
    port.refuse(1)  # still at the limit
    clock.advance(3.0)  # quiet since the accept, not since the last failure
    assert len(guard_lines(caplog)) == 1
    clock.advance(2.0)
    lines = guard_lines(caplog)
    assert len(lines) == 2 and lines[1].startswith("accepting connections again: 2 refused")


def test_other_accept_errors_pause_too_but_a_client_abort_does_not(caplog: pytest.LogCaptureFixture) -> None:
    _, port, clock = watched()
    port._logger.info(ACCEPT_FAILED, acceptError="ECONNABORTED")
    assert port.reading and guard_lines(caplog) == []
    port._logger.info(ACCEPT_FAILED, acceptError="ENOBUFS")
    assert not port.reading
    assert guard_lines(caplog)[0].startswith("cannot accept (ENOBUFS) (limit ")
    port._logger.info(ACCEPT_FAILED, acceptError="ENFILE")  # already paused: one call to resume
    clock.advance(0.25)
    assert port.reading and clock.getDelayedCalls() == []


def test_the_ports_other_events_pass_through_and_a_closed_port_stays_closed() -> None:
    guard, port, clock = watched()
    port._logger.info("something else {n}", n=1)
    assert [event["log_format"] for event in port.forwarded] == ["something else {n}"]
    port._logger.info(ACCEPT_FAILED, acceptError="EMFILE")
    assert not port.reading
    port.connected = False  # stopListening while paused
    clock.advance(0.25)
    assert not port.reading
    guard.stop()


def test_a_port_without_a_logger_is_left_alone() -> None:
    guard = AcceptGuard(Clock())
    port = object()
    guard.watch(port)
    assert not hasattr(port, "_logger")


# --- the real daemon ----------------------------------------------------------------


@ensure_deferred
async def test_configured_backlog_reaches_every_inet_and_unix_listener(world: World, tmp_path: Path) -> None:
    socketmap_port, tcp_table_port, metrics_port = free_port(), free_port(), free_port()
    socketmap_path = str(tmp_path / "socketmap.sock")
    config = with_backlog(
        daemon_config(
            world,
            [f"inet:{LOOPBACK}:{socketmap_port}", f"unix:{socketmap_path}"],
            extra=f'[metrics]\nlisten = "inet:{LOOPBACK}:{metrics_port}"\n',
            tcp_table=(f"inet:{LOOPBACK}:{tcp_table_port}",),
        ),
        CONFIGURED_BACKLOG,
    )
    daemon = await DaemonProcess.start(reactor, tmp_path, config)
    try:
        control = os.path.join(daemon.runtime_directory, "control.sock")
        wanted = {
            f"{LOOPBACK}:{socketmap_port}": CONFIGURED_BACKLOG,
            f"{LOOPBACK}:{tcp_table_port}": CONFIGURED_BACKLOG,
            f"{LOOPBACK}:{metrics_port}": CONFIGURED_BACKLOG,
            socketmap_path: CONFIGURED_BACKLOG,
            control: CONFIGURED_BACKLOG,
        }
        assert await backlogs_of(*wanted) == wanted, daemon.stderr_text()
        await daemon.stop()
    finally:
        await daemon.close()


@ensure_deferred
async def test_default_backlog_is_the_largest_the_kernel_allows(world: World, tmp_path: Path) -> None:
    limit = somaxconn()
    port = free_port()
    path = str(tmp_path / "socketmap.sock")
    daemon = await DaemonProcess.start(
        reactor, tmp_path, daemon_config(world, [f"inet:{LOOPBACK}:{port}", f"unix:{path}"])
    )
    try:
        inet = f"{LOOPBACK}:{port}"
        assert await backlogs_of(inet, path) == {inet: limit, path: limit}
        assert not [line for line in daemon.stderr_lines if "listen.backlog" in line]
        await daemon.stop()
    finally:
        await daemon.close()


@ensure_deferred
async def test_backlog_above_the_kernels_cap_is_logged_once_and_capped(world: World, tmp_path: Path) -> None:
    limit = somaxconn()
    require("net.core.somaxconn below the largest listen.backlog", limit < 65_535)
    asked = limit + 1
    port = free_port()
    config = with_backlog(daemon_config(world, [f"inet:{LOOPBACK}:{port}"]), asked)
    daemon = await DaemonProcess.start(reactor, tmp_path, config)
    try:
        inet = f"{LOOPBACK}:{port}"
        assert await backlogs_of(inet) == {inet: limit}
        lines = [line for line in daemon.stderr_lines if "listen.backlog" in line]
        assert len(lines) == 1, daemon.stderr_text()
        assert "WARNING" in lines[0] and f"net.core.somaxconn={asked}" in lines[0]
        await daemon.stop()
    finally:
        await daemon.close()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard_enough = hard == resource.RLIM_INFINITY or hard >= FDS_NEEDED
    require(f"RLIMIT_NOFILE hard limit of at least {FDS_NEEDED} (have {hard})", hard_enough)
    if soft != resource.RLIM_INFINITY and soft < FDS_NEEDED:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FDS_NEEDED, hard))


class Storm:
    """``clients`` non-blocking connections started at once, each to send one request."""

    def __init__(self, port: int, clients: int) -> None:
        self.poller = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.connected: set[int] = set()
        self.replies: dict[int, bytes] = {}
        for _ in range(clients):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((LOOPBACK, port))
            assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)
            self.socks[sock.fileno()] = sock
            self.poller.register(sock.fileno(), select.EPOLLOUT)

    def poll_connected(self) -> None:
        """Note the connections whose handshake the kernel has completed."""
        for fd, _ in self.poller.poll(0):
            if fd in self.connected:
                continue
            code = self.socks[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert code == 0, errno.errorcode.get(code, code)
            self.connected.add(fd)
            self.poller.modify(fd, 0)

    def send(self, request: bytes) -> None:
        for fd, sock in self.socks.items():
            sock.send(request)
            self.replies[fd] = b""
            self.poller.modify(fd, select.EPOLLIN)

    def poll_replies(self) -> None:
        for fd, _ in self.poller.poll(0):
            data = self.socks[fd].recv(4096)
            self.replies[fd] += data
            if not data:
                self.poller.unregister(fd)

    def answered(self) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        for data in self.replies.values():
            answers.extend(socketmap_codec.SocketmapReplyDecoder().feed(data)[:1])
        return answers

    def close(self) -> None:
        self.poller.close()
        for sock in self.socks.values():
            sock.close()


@ensure_deferred
async def test_storm_of_500_clients_is_held_by_the_backlog_and_all_answered(
    world: World, tmp_path: Path
) -> None:
    """While the daemon is stopped (SIGSTOP) it accepts nothing: only the
    backlog holds the storm. Every handshake completes in the kernel, and once
    the daemon runs again every client gets its answer."""
    raise_fd_limit()
    port = free_port()
    daemon = await DaemonProcess.start(reactor, tmp_path, daemon_config(world, [f"inet:{LOOPBACK}:{port}"]))
    storm: Storm | None = None
    stopped = False
    try:
        expected = (
            "OK",
            f"secure match=mx.{DOMAIN} servername=hostname",
        )
        assert await socketmap_query(port, "postfix", DOMAIN.encode()) == expected
        os.kill(daemon.pid, signal.SIGSTOP)
        stopped = True
        storm = Storm(port, STORM_CLIENTS)
        for _ in range(POLLS):
            storm.poll_connected()
            if len(storm.connected) == STORM_CLIENTS:
                break
            await sleep(POLL)
        # A backlog of 50 holds 51 of them; the others' SYNs are dropped and retried.
        assert len(storm.connected) == STORM_CLIENTS
        storm.send(socketmap_codec.encode_request("postfix", DOMAIN.encode()))
        os.kill(daemon.pid, signal.SIGCONT)
        stopped = False
        for _ in range(POLLS):
            storm.poll_replies()
            if len(storm.answered()) == STORM_CLIENTS:
                break
            await sleep(POLL)
        assert storm.answered() == [expected] * STORM_CLIENTS
        storm.close()
        storm = None
        await daemon.stop()
    finally:
        if stopped:
            os.kill(daemon.pid, signal.SIGCONT)
        if storm is not None:
            storm.close()
        await daemon.close()


# --- running out of descriptors: the real daemon --------------------------------------

#: Descriptors left free for the daemon beyond what it holds once started, and
#: connections opened in each burst (far more than that).
SPARE_DESCRIPTORS = 8
BURST_CONNECTIONS = 60
BURSTS = 2
EXHAUSTED = "out of file descriptors"
RECOVERED = "accepting connections again"


def daemon_lines_with(daemon: DaemonProcess, text: str) -> list[str]:
    return [line for line in daemon.stderr_lines if text in line]


async def wait_for_lines(daemon: DaemonProcess, text: str, count: int) -> list[str]:
    """The daemon's log lines containing ``text`` once there are ``count`` of them
    (bounded: a burst ends ACCEPT_BURST_QUIET seconds after it recovered)."""
    for _ in range(POLLS):
        lines = daemon_lines_with(daemon, text)
        if len(lines) >= count:
            return lines
        await sleep(POLL)
    return daemon_lines_with(daemon, text)


async def query_until_answered(port: int) -> tuple[str, str] | None:
    """A lookup on a new connection, again while the daemon refuses it (bounded)."""
    for _ in range(POLLS):
        try:
            return await socketmap_query(port, "postfix", DOMAIN.encode())
        except AssertionError:  # closed without an answer: refused
            await sleep(POLL)
    return None


@ensure_deferred
async def test_out_of_descriptors_one_line_per_burst_open_connection_served_then_recovery(
    world: World, tmp_path: Path
) -> None:
    """RLIMIT_NOFILE is lowered under the running daemon (prlimit) to just above
    what it holds; two storms of connections each exhaust it."""
    require(
        f"ACCEPT_BURST_QUIET short enough to test ({limits.ACCEPT_BURST_QUIET}s)",
        limits.ACCEPT_BURST_QUIET * 2 < POLL * POLLS,
    )
    raise_fd_limit()
    port = free_port()
    daemon = await DaemonProcess.start(reactor, tmp_path, daemon_config(world, [f"inet:{LOOPBACK}:{port}"]))
    storm: Storm | None = None
    expected = ("OK", f"secure match=mx.{DOMAIN} servername=hostname")
    request = socketmap_codec.encode_request("postfix", DOMAIN.encode())
    try:
        # Cached first, while this reactor serves the world: the keeper's
        # exchanges below block it, and are answered from the cache.
        assert await socketmap_query(port, "postfix", DOMAIN.encode()) == expected
        keeper = socket.create_connection((LOOPBACK, port))
        keeper.settimeout(POLL * POLLS)

        def ask_keeper() -> tuple[str, str]:
            keeper.sendall(request)
            data = b""
            while not (replies := socketmap_codec.SocketmapReplyDecoder().feed(data)):
                chunk = keeper.recv(4096)
                assert chunk, "the daemon closed the open connection"
                data += chunk
            return replies[0]

        assert ask_keeper() == expected
        in_use = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        limit = in_use + SPARE_DESCRIPTORS
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (limit, limit))

        for burst in range(1, BURSTS + 1):
            storm = Storm(port, BURST_CONNECTIONS)
            exhausted = await wait_for_lines(daemon, EXHAUSTED, burst)
            assert len(exhausted) == burst, daemon.stderr_text()
            assert f"(limit {limit})" in exhausted[-1]
            # The connection opened before is answered all along.
            assert ask_keeper() == expected
            storm.close()
            storm = None
            # Descriptors free again (once the daemon has seen the storm's
            # connections close): a new connection is answered.
            assert await query_until_answered(port) == expected
            recovered = await wait_for_lines(daemon, RECOVERED, burst)
            assert len(recovered) == burst, daemon.stderr_text()
        # One line as each burst began and one as it ended, not one per connection refused.
        assert len(daemon_lines_with(daemon, EXHAUSTED)) == BURSTS
        assert "refused since the first failure" in recovered[-1]
        assert ask_keeper() == expected
        keeper.close()
        await daemon.stop()
    finally:
        if storm is not None:
            storm.close()
        await daemon.close()
