"""Faults while serving: DNS down, a hanging policy host, a full
disk under the SQLite cache, no file descriptors left. The daemon must keep
answering cached policies, answer new domains "not found" within its
deadlines, log each fault a bounded number of times (not once per lookup), and
recover by itself once the fault is gone.

DNS, policy host and disk faults run an in-process daemon (the logs are read
with caplog); the file-descriptor fault needs its own process limit, so it runs
``postfix-mtasts serve`` as a child with RLIMIT_NOFILE lowered.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater

from postfix_mtasts.codec import socketmap as socketmap_codec
from tests.conftest import require
from tests.support.daemon import DaemonProcess, async_yield_fixture, ensure_deferred, free_port
from tests.support.dns_server import LOOPBACK, DnsServer, _DnsDatagramProtocol, _DnsStreamFactory
from tests.support.https_server import Hang, HostileHttpsServer
from tests.support.world import RawConnection, RunningDaemon, World, socketmap_query, start_daemon

pytestmark = pytest.mark.integration

#: recheck_interval of the daemons under test (the smallest the config allows).
RECHECK = 1.0
PAST_RECHECK = RECHECK + 0.2
#: fetch_retry_backoff of the hanging-host test (the smallest the config allows is 1 s).
BACKOFF = 3.0
#: Lookups of one failing domain made while the fault lasts.
REPEATED_LOOKUPS = 10
#: Bounded polls for something that happens by itself (a recheck, a recovery).
POLL = 0.25
POLLS = 40
#: Size of the tmpfs the SQLite cache lives on in the disk-full test.
DISK_SIZE = "256k"
#: Policies learnt while the disk is full.
LEARNT_WHILE_FULL = 5
#: RLIMIT_NOFILE of the daemon in the file-descriptor test, and how many idle
#: connections are opened to exhaust it.
DAEMON_FD_LIMIT = 64
IDLE_CONNECTIONS = 120
#: Ports tried for the DNS server that must come back on the same port.
PORT_ATTEMPTS = 20

log = logging.getLogger(__name__)


def policy_answer(domain: str, mx_prefix: str = "mx") -> tuple[str, str]:
    return ("OK", f"secure match={mx_prefix}.{domain} servername=hostname")


def publish(world: World, domain: str, policy_id: str = "id1", mx_prefix: str = "mx") -> None:
    world.publish(domain, World.policy_text(mx=(f"{mx_prefix}.{domain}",)), policy_id)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def ask(daemon: RunningDaemon, domain: str) -> tuple[str, str]:
    return await socketmap_query(daemon.socketmap_port, "postfix", domain.encode("ascii"))


def lines_about(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.INFO) -> list[str]:
    """The daemon's log lines at ``level`` or above that mention ``text``."""
    return [
        f"{r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("postfix_mtasts") and r.levelno >= level and text in r.getMessage()
    ]


def daemon_lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [
        f"{r.levelname} {r.name} {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("postfix_mtasts") and r.levelno >= level
    ]


def report(title: str, lines: list[str]) -> None:
    """Show what the daemon logged (run with -o log_cli=true to read it)."""
    log.warning("%s:\n  %s", title, "\n  ".join(lines) if lines else "(nothing)")


@async_yield_fixture
async def world() -> AsyncIterator[World]:
    started = await World.start(reactor)
    yield started
    await started.stop()


# --- DNS down -----------------------------------------------------------------------


def listen_dns(dns: DnsServer, port: int) -> None:
    """Serve ``dns`` on UDP and TCP ``port`` of 127.0.0.1 (again, after a stop)."""
    listener: Any = reactor
    udp = listener.listenUDP(port, _DnsDatagramProtocol(dns), interface=LOOPBACK)
    try:
        tcp = listener.listenTCP(port, _DnsStreamFactory(dns), interface=LOOPBACK)
    except Exception:
        udp.stopListening()
        raise
    dns._udp, dns._tcp, dns.port = udp, tcp, port


@async_yield_fixture
async def fixed_port_world() -> AsyncIterator[World]:
    """A world whose DNS server listens below the ephemeral port range, so that
    once stopped no client socket takes its port and it can come back on it."""
    dns = DnsServer()
    for _ in range(PORT_ATTEMPTS):
        try:
            listen_dns(dns, free_port())
            break
        except CannotListenError:
            continue
    else:
        pytest.fail(f"no port free for a DNS server after {PORT_ATTEMPTS} attempts")
    https = HostileHttpsServer()
    await https.start(reactor)
    started = World(dns, https)
    yield started
    await started.stop()


@pytest.mark.parametrize("fault", ["stopped", "dropped"])
@ensure_deferred
async def test_dns_down_cached_policies_answer_new_domains_not_found_and_service_resumes(
    fixed_port_world: World, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    world = fixed_port_world
    caplog.set_level(logging.DEBUG, logger="postfix_mtasts")
    for domain in ("cached.example", "new.example", "later.example"):
        publish(world, domain)
    daemon = await start_daemon(reactor, world.config(policy={"recheck_interval": RECHECK}))
    try:
        assert await ask(daemon, "cached.example") == policy_answer("cached.example")
        caplog.clear()

        names = ("_mta-sts.cached.example", "_mta-sts.new.example", "mta-sts.new.example")
        if fault == "stopped":
            await world.dns.stop()
        else:
            for name in names:
                world.dns.set_fault(name, "drop")

        # Cached: answered from the cache across several failing TXT rechecks.
        for _ in range(3):
            await sleep(PAST_RECHECK)
            assert await ask(daemon, "cached.example") == policy_answer("cached.example")
        # New: not found (the first lookup's deadline bounds the wait), again and again.
        for _ in range(REPEATED_LOOKUPS):
            assert await ask(daemon, "new.example") == ("NOTFOUND", "")

        new_lines = lines_about(caplog, "new.example")
        cached_lines = lines_about(caplog, "cached.example")
        report(f"DNS {fault}: log lines at INFO and above", daemon_lines(caplog))
        # One line for the failed discovery, not one per lookup.
        assert 1 <= len(new_lines) <= 2, new_lines
        assert any("DNS failed" in line for line in new_lines), new_lines
        # Failing rechecks of a cached policy are not news at INFO.
        assert len(cached_lines) <= 1, cached_lines
        assert not [line for line in daemon_lines(caplog, logging.ERROR)]

        # DNS returns: a domain never asked before resolves at once, and the
        # cached one is rechecked again (its TXT queries reach the server).
        if fault == "stopped":
            listen_dns(world.dns, world.dns.port)
        else:
            for name in names:
                world.dns.set_fault(name, None)
        assert await ask(daemon, "later.example") == policy_answer("later.example")
        before = world.dns.count("_mta-sts.cached.example", "TXT")
        await sleep(PAST_RECHECK)
        assert await ask(daemon, "cached.example") == policy_answer("cached.example")
        assert world.dns.count("_mta-sts.cached.example", "TXT") > before
    finally:
        await daemon.stop()


# --- the policy host hangs ----------------------------------------------------------


@ensure_deferred
async def test_hanging_policy_host_cached_answer_stays_new_domain_not_found_back_off_then_recovery(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="postfix_mtasts")
    publish(world, "cached.example")
    daemon = await start_daemon(
        reactor,
        world.config(policy={"recheck_interval": RECHECK, "fetch_retry_backoff": BACKOFF}),
    )
    try:
        assert await ask(daemon, "cached.example") == policy_answer("cached.example")
        caplog.clear()

        # A new policy id for the cached domain and a new domain, both on hosts that hang.
        publish(world, "cached.example", policy_id="id2", mx_prefix="mx2")
        world.https.set_host("mta-sts.cached.example", Hang())
        publish(world, "new.example")
        world.https.set_host("mta-sts.new.example", Hang())
        new_host = world.https.state("mta-sts.new.example")

        assert await ask(daemon, "new.example") == ("NOTFOUND", "")
        assert new_host.requests == 1
        # Within the back-off the failed fetch is not tried again, however often asked.
        for _ in range(REPEATED_LOOKUPS):
            assert await ask(daemon, "new.example") == ("NOTFOUND", "")
        assert new_host.requests == 1
        # The cached policy answers while its new id's fetch hangs, on every recheck.
        for _ in range(2):
            await sleep(PAST_RECHECK)
            assert await ask(daemon, "cached.example") == policy_answer("cached.example")
        assert world.https.state("mta-sts.cached.example").requests >= 1

        report("policy host hanging: log lines at INFO and above", daemon_lines(caplog))
        new_lines = lines_about(caplog, "new.example")
        assert 1 <= len(new_lines) <= 2, new_lines
        assert not [line for line in daemon_lines(caplog, logging.ERROR)]

        # The host heals; after the back-off both domains pick up their policy by themselves.
        publish(world, "cached.example", policy_id="id2", mx_prefix="mx2")
        publish(world, "new.example")
        answers: dict[str, tuple[str, str]] = {}
        for _ in range(POLLS):
            answers = {d: await ask(daemon, d) for d in ("new.example", "cached.example")}
            if answers == {
                "new.example": policy_answer("new.example"),
                "cached.example": policy_answer("cached.example", "mx2"),
            }:
                break
            await sleep(POLL)
        else:
            pytest.fail(f"no recovery after the policy host healed: {answers}")
        assert new_host.finished == 1
    finally:
        await daemon.stop()


# --- the cache's disk is full -------------------------------------------------------


def can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_SIZE, mounted for the test and unmounted after it."""
    where = tmp_path / "disk"
    where.mkdir()
    require(f"mounting a {DISK_SIZE} tmpfs (needs root)", can_mount_tmpfs(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Fill the file system with one file until the kernel says ENOSPC."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


@ensure_deferred
async def test_full_disk_lookups_go_on_from_memory_error_logged_once_and_writes_resume(
    world: World, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="postfix_mtasts")
    learnt = [f"learnt{i}.example" for i in range(LEARNT_WHILE_FULL)]
    for domain in ("first.example", "after.example", *learnt):
        publish(world, domain)
    daemon = await start_daemon(
        reactor, world.config(cache_backend="sqlite", cache_path=str(small_disk / "cache.sqlite3"))
    )
    store: Any = daemon.daemon.store
    try:
        assert await ask(daemon, "first.example") == policy_answer("first.example")
        assert (await store.get("first.example")) is not None
        caplog.clear()

        filler = fill(small_disk)
        for domain in learnt:
            assert await ask(daemon, domain) == policy_answer(domain)
        # Learnt while full: answered again from memory, as is the stored one.
        for domain in (*learnt, "first.example"):
            assert await ask(daemon, domain) == policy_answer(domain)
        errors = daemon_lines(caplog, logging.ERROR)
        report("disk full: log lines at INFO and above", daemon_lines(caplog))
        assert errors, "a failed cache write must be logged"
        assert all("disk is full" in line for line in errors), errors
        assert len(errors) == 1, f"one ERROR line per failed write: {errors}"

        for domain in learnt:
            assert (await store.get(domain)) is None

        # Space returns: the next new policy is written to the file again, and
        # with it every policy learnt while the disk was full.
        caplog.clear()
        filler.unlink()
        assert await ask(daemon, "after.example") == policy_answer("after.example")
        assert (await store.get("after.example")) is not None
        for domain in learnt:
            stored = await store.get(domain)
            assert stored is not None and stored.policy is not None, domain
        report("disk has space again: log lines at INFO and above", daemon_lines(caplog))
        assert not daemon_lines(caplog, logging.ERROR)
        assert [line for line in daemon_lines(caplog) if "writes succeed again" in line]
    finally:
        await daemon.stop()


# --- no file descriptors left -------------------------------------------------------


class LimitedDaemonProcess(DaemonProcess):
    """``postfix-mtasts serve`` exec'd by a tiny Python wrapper that lowers RLIMIT_NOFILE first
    (Twisted's spawnProcess has no preexec hook)."""

    def spawn(self, args: Any = ()) -> None:
        from tests.support.daemon import PROJECT_ROOT, daemon_environment

        config = str(self.config_path)
        serve = [sys.executable, "-m", "postfix_mtasts.cli", "serve", "--config", config, *args]
        wrapper = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({DAEMON_FD_LIMIT}, {DAEMON_FD_LIMIT})); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        argv = [sys.executable, "-c", wrapper, *serve]
        environment = daemon_environment(self.runtime_directory, str(self.config_path.parent))
        self._transport = self.reactor.spawnProcess(
            self._protocol, sys.executable, argv, env=environment, path=PROJECT_ROOT
        )


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def lookup_on(connection: RawConnection, domain: str) -> list[tuple[str, str]]:
    """One request on an open connection; its reply, or [] if the daemon closed it."""
    already = len(socketmap_codec.SocketmapReplyDecoder().feed(connection.received))
    connection.send(socketmap_codec.encode_request("postfix", domain.encode("ascii")))
    replies = await connection.socketmap_replies(already + 1)
    return replies[already:]


@ensure_deferred
async def test_file_descriptors_exhausted_daemon_survives_serves_open_connections_and_recovers(
    world: World, tmp_path: Path
) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    require("a test-process fd limit above the connections it opens",
            soft == resource.RLIM_INFINITY or soft > IDLE_CONNECTIONS + 200)
    publish(world, "cached.example")
    publish(world, "new.example")
    publish(world, "after.example")
    port = free_port()
    config = world.config_toml(socketmap=(f"inet:{LOOPBACK}:{port}",))
    daemon = await LimitedDaemonProcess.start(reactor, tmp_path, config)
    idle: list[RawConnection] = []
    try:
        keeper = await RawConnection.open(port, reactor)
        assert await lookup_on(keeper, "cached.example") == [policy_answer("cached.example")]
        baseline = open_descriptors(daemon.pid)

        for _ in range(IDLE_CONNECTIONS):
            idle.append(await RawConnection.open(port, reactor))
        await sleep(1.0)
        exhausted = open_descriptors(daemon.pid)
        closed_by_daemon = sum(1 for c in idle if c.is_closed)
        # The limit was reached: the daemon holds all it may, and turned the rest away.
        assert exhausted >= DAEMON_FD_LIMIT - 2, (baseline, exhausted)
        assert closed_by_daemon >= 1
        assert daemon.exited is None

        # The connection opened before keeps being answered from the cache.
        assert await lookup_on(keeper, "cached.example") == [policy_answer("cached.example")]
        # A new domain needs sockets the daemon cannot open: answered, not crashed.
        new_answer = await lookup_on(keeper, "new.example")
        assert new_answer and new_answer[0][0] in ("NOTFOUND", "OK"), new_answer

        for connection in idle:
            connection.close()
        for connection in idle:
            await connection.closed()
        # Descriptors free again: new connections are accepted and served.
        answer: tuple[str, str] | None = None
        for _ in range(POLLS):
            try:
                answer = await socketmap_query(port, "postfix", b"cached.example")
                break
            except AssertionError:
                await sleep(POLL)
        assert answer == policy_answer("cached.example")
        # (new.example's failure is remembered for its retry interval; a domain
        # never asked before shows that discovery works again.)
        assert await socketmap_query(port, "postfix", b"after.example") == policy_answer("after.example")
        keeper.close()
        report(
            f"fd limit {DAEMON_FD_LIMIT}: {baseline} fds in use before, {exhausted} when exhausted, "
            f"{closed_by_daemon} of {IDLE_CONNECTIONS} idle connections closed by the daemon; new.example "
            f"while exhausted: {new_answer}; daemon stderr",
            daemon.stderr_lines,
        )
        # Said once, not once per refused connection.
        exhaustion = [line for line in daemon.stderr_lines if "out of file descriptors" in line]
        assert len(exhaustion) == 1, daemon.stderr_text()
        assert f"limit {DAEMON_FD_LIMIT}" in exhaustion[0]
        await daemon.stop()
    finally:
        for connection in idle:
            if not connection.is_closed:
                connection.close()
        await daemon.close()
