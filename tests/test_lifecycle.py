"""The daemon as a system service, each test a real ``postfix-mtasts serve``
child: sd_notify (READY after the listener accepts, WATCHDOG, RELOADING,
STOPPING), socket activation, SIGHUP reloads good and bad, SIGTERM during a
lookup, the privilege drop, log formats, and ``systemd-analyze verify`` of the
shipped units."""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from postfix_mtasts import limits, logsetup
from postfix_mtasts.codec import socketmap
from postfix_mtasts.doctor.maps import SHIPPED_SOCKET_UNITS
from tests.conftest import require
from tests.support.daemon import (
    LOOPBACK,
    PROJECT_ROOT,
    async_yield_fixture,
    daemon_environment,
    ensure_deferred,
    free_port,
    probe_accepts,
    run_cli,
    socketmap_lookup,
    tcp_table_lookup,
)
from tests.support.dns_server import DnsServer
from tests.support.world import RawConnection

pytestmark = pytest.mark.integration

#: Bounds on waiting (guards against a hung test, not timed assertions).
WAIT_LIMIT = 20.0
POLL = 0.05
SYSTEMD_DIRECTORY = Path(PROJECT_ROOT) / "systemd"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR|DEBUG) ")


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


# --- a child process with whatever environment and descriptors a test needs ----------------


class Child(ProcessProtocol):
    """``postfix-mtasts serve`` with extra environment, inherited sockets, and
    optionally a shell that sets ``*_PID`` variables to the daemon's own pid."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._partial = b""
        self.code: int | None = None
        self.signal: int | None = None
        self._ended: Deferred[None] = Deferred()
        self.transport: Any = None

    @classmethod
    def spawn(
        cls,
        config: Path,
        *,
        environment: dict[str, str] | None = None,
        pid_variables: tuple[str, ...] = (),
        inherit: dict[int, int] | None = None,
    ) -> Child:
        child = cls()
        argv = [sys.executable, "-m", "postfix_mtasts.cli", "serve", "--config", str(config)]
        if pid_variables:
            # The daemon keeps the shell's pid through exec, so $$ is its pid.
            exports = " ".join(f"{name}=$$" for name in pid_variables)
            argv = ["/bin/sh", "-c", f'export {exports}; exec "$@"', "sh", *argv]
        env = daemon_environment()
        env.update(environment or {})
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", **(inherit or {})}
        reactor().spawnProcess(child, argv[0], argv, env=env, path=PROJECT_ROOT, childFDs=fds)
        return child

    @property
    def pid(self) -> int:
        pid: int = self.transport.pid
        return pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != 2:
            return
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        self.lines.extend(line.decode("utf-8", "replace") for line in complete)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            self.code = 0
        elif isinstance(value, ProcessTerminated):
            self.code, self.signal = value.exitCode, value.signal
        if self._partial:
            self.lines.append(self._partial.decode("utf-8", "replace"))
        self._ended.callback(None)

    @property
    def running(self) -> bool:
        return not self._ended.called

    def text(self) -> str:
        return "\n".join(self.lines)

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        waited = 0.0
        while not condition():
            if waited >= WAIT_LIMIT:
                raise AssertionError(f"{what}: not after {WAIT_LIMIT}s; daemon log:\n{self.text()}")
            await deferLater(reactor(), POLL, lambda: None)
            waited += POLL

    async def until_listening(self, port: int) -> None:
        def ready() -> bool:
            if not self.running:
                raise AssertionError(f"daemon exited ({self.code}):\n{self.text()}")
            return probe_accepts(("inet", port))

        await self.until(ready, f"listening on {port}")

    async def until_line(self, fragment: str, after: int = 0) -> str:
        await self.until(lambda: any(fragment in line for line in self.lines[after:]), repr(fragment))
        return next(line for line in self.lines[after:] if fragment in line)

    def send(self, number: int) -> None:
        os.kill(self.pid, number)

    async def exit_code(self) -> int | None:
        await self.until(lambda: not self.running, "exit")
        return self.code

    async def close(self) -> None:
        if self.running:
            self.send(signal.SIGKILL)
            await self._ended


@async_yield_fixture
async def dns() -> AsyncIterator[DnsServer]:
    server = await DnsServer.start(reactor())
    try:
        yield server
    finally:
        await server.stop()


def write_config(directory: Path, dns: DnsServer, socketmap_addresses: list[str], extra: str = "",
                 name: str = "daemon.toml") -> Path:
    addresses = ", ".join(f'"{address}"' for address in socketmap_addresses)
    config = directory / name
    config.write_text(
        f"[listen]\nsocketmap = [{addresses}]\n"
        '[cache]\nbackend = "memory"\n'
        f'[resolver]\nnameservers = ["{dns.nameserver}"]\ndns_timeout = 1.0\nfetch_timeout = 2.0\n'
        f'[control]\nsocket = "{directory}/control.sock"\n' + extra
    )
    return config


# --- sd_notify ---------------------------------------------------------------------------


class NotifyReceiver(DatagramProtocol):
    """The test's NOTIFY_SOCKET; on READY=1 it checks that the listener already accepts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[list[str]] = []
        self.accepting_when_ready: list[bool] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        lines = datagram.decode().split("\n")
        if "READY=1" in lines:
            self.accepting_when_ready.append(probe_accepts(("inet", self.port)))
        self.messages.append(lines)

    def count(self, assignment: str) -> int:
        return sum(assignment in message for message in self.messages)

    def index(self, assignment: str, start: int = 0) -> int:
        return next(i for i, message in enumerate(self.messages) if i >= start and assignment in message)


@ensure_deferred
async def test_sd_notify_ready_watchdog_reloading_stopping(tmp_path: Path, dns: DnsServer) -> None:
    port = free_port()
    config = write_config(tmp_path, dns, [f"inet:{LOOPBACK}:{port}"])
    receiver = NotifyReceiver(port)
    notify_path = str(tmp_path / "notify")
    listening = reactor().listenUNIXDatagram(notify_path, receiver)
    child = Child.spawn(config, environment={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"},
                        pid_variables=("WATCHDOG_PID",))
    try:
        await child.until(lambda: receiver.count("READY=1") >= 1, "READY=1")
        assert receiver.accepting_when_ready == [True]
        ready = receiver.messages[receiver.index("READY=1")]
        assert any(re.fullmatch(r"STATUS=0 policies cached \(0 domains\), 0 lookups, 0 connections", line)
                   for line in ready), ready

        await child.until(lambda: receiver.count("WATCHDOG=1") >= 3, "three WATCHDOG=1")
        assert (await socketmap_lookup(reactor(), f"inet:{LOOPBACK}:{port}", "postfix", "a.example"))[0] == (
            "NOTFOUND")
        await child.until(lambda: any("STATUS=0 policies cached (1 domains), 1 lookups" in line
                                      for message in receiver.messages for line in message), "updated STATUS")

        child.send(signal.SIGHUP)
        await child.until(lambda: receiver.count("RELOADING=1") == 1, "RELOADING=1")
        reloading = receiver.index("RELOADING=1")
        await child.until(lambda: receiver.count("READY=1") == 2, "READY=1 after the reload")
        assert receiver.index("READY=1", reloading) > reloading

        child.send(signal.SIGTERM)
        assert await child.exit_code() == 0, child.text()
        assert receiver.count("STOPPING=1") == 1
        stopping = receiver.index("STOPPING=1")
        assert receiver.count("WATCHDOG=1") == sum(
            "WATCHDOG=1" in message for message in receiver.messages[:stopping])
    finally:
        await child.close()
        await listening.stopListening()


@ensure_deferred
async def test_watchdog_pid_of_another_process_means_no_watchdog(tmp_path: Path, dns: DnsServer) -> None:
    port = free_port()
    config = write_config(tmp_path, dns, [f"inet:{LOOPBACK}:{port}"])
    receiver = NotifyReceiver(port)
    notify_path = str(tmp_path / "notify")
    listening = reactor().listenUNIXDatagram(notify_path, receiver)
    child = Child.spawn(config, environment={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000",
                                             "WATCHDOG_PID": "1"})
    try:
        await child.until(lambda: receiver.count("READY=1") == 1, "READY=1")
        await deferLater(reactor(), 0.5, lambda: None)  # several watchdog periods
        assert receiver.count("WATCHDOG=1") == 0
        child.send(signal.SIGTERM)
        assert await child.exit_code() == 0
    finally:
        await child.close()
        await listening.stopListening()


# --- socket activation -----------------------------------------------------------------------


@pytest.mark.parametrize("address", ["systemd:socketmap", "systemd:0"])
@ensure_deferred
async def test_socket_activation_serves_the_socket_systemd_passes(
    tmp_path: Path, dns: DnsServer, address: str
) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    config = write_config(tmp_path, dns, [address])
    child = Child.spawn(
        config,
        environment={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "socketmap"},
        pid_variables=("LISTEN_PID",),
        inherit={3: listener.fileno()},
    )
    listener.close()  # the daemon has its own copy
    try:
        await child.until_line("ready")
        assert f"listening for socketmap on {address}" in child.text()

        target = f"inet:{LOOPBACK}:{port}"
        status, _ = await socketmap_lookup(reactor(), target, "postfix", "activated.example")

        assert status == "NOTFOUND"
        assert dns.count("_mta-sts.activated.example") == 1
        child.send(signal.SIGTERM)
        assert await child.exit_code() == 0
    finally:
        await child.close()


@ensure_deferred
async def test_a_unix_socket_from_systemd_serves_across_restarts_as_the_unit_made_it(
    tmp_path: Path, dns: DnsServer
) -> None:
    # What postfix-mtasts-unix.socket does: systemd binds the path with the
    # unit's mode and keeps the socket while the service stops and starts.
    directory = tempfile.mkdtemp(prefix="mtasts-sd-")
    path = f"{directory}/mtasts"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o660)
    listener.listen(16)
    config = write_config(tmp_path, dns, ["systemd:socketmap-unix"])
    try:
        for start in ("first", "second"):
            child = Child.spawn(
                config,
                environment={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "socketmap-unix"},
                pid_variables=("LISTEN_PID",),
                inherit={3: listener.fileno()},
            )
            try:
                await child.until_line("ready")
                status, _ = await socketmap_lookup(reactor(), f"unix:{path}", "postfix", f"{start}.example")
                assert status == "NOTFOUND", child.text()
                child.send(signal.SIGTERM)
                assert await child.exit_code() == 0, child.text()
            finally:
                await child.close()
            assert os.stat(path).st_mode & 0o7777 == 0o660, start
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


@ensure_deferred
async def test_sockets_meant_for_another_process_are_refused_in_one_line(
    tmp_path: Path, dns: DnsServer
) -> None:
    config = write_config(tmp_path, dns, ["systemd:socketmap"])
    child = Child.spawn(config, environment={"LISTEN_FDS": "1", "LISTEN_PID": "1",
                                             "LISTEN_FDNAMES": "socketmap"})
    try:
        assert await child.exit_code() == 1
        errors = [line for line in child.lines if "ERROR" in line]
        assert errors and len(errors) == 1, child.text()
        assert "systemd passed no socket named 'socketmap'" in errors[0]
        assert "start the .socket unit with FileDescriptorName=socketmap" in errors[0]
        assert "Traceback" not in child.text()
    finally:
        await child.close()


# --- SIGHUP ----------------------------------------------------------------------------------


@ensure_deferred
async def test_sighup_adds_and_removes_listeners_and_profiles_keeping_cache_and_connections(
    tmp_path: Path, dns: DnsServer
) -> None:
    port, tcp_port = free_port(), free_port()
    address = f"inet:{LOOPBACK}:{port}"
    config = write_config(tmp_path, dns, [address])
    child = Child.spawn(config)
    try:
        await child.until_listening(port)
        kept = await RawConnection.open(port)
        kept.send(socketmap.encode_request("postfix", b"cached.example"))
        assert await kept.socketmap_replies(1) == [("NOTFOUND", "")]
        assert (await socketmap_lookup(reactor(), address, "strict", "cached.example"))[0] == "PERM"
        assert not probe_accepts(("inet", tcp_port))

        text = config.read_text()
        config.write_text(text.replace("[cache]", f'tcp_table = ["inet:{LOOPBACK}:{tcp_port}"]\n[cache]')
                          + "[profiles.strict]\nenforce_testing = true\n[log]\nlevel = \"debug\"\n")
        mark = len(child.lines)
        child.send(signal.SIGHUP)
        line = await child.until_line("configuration reloaded", mark)

        assert "listeners: 1 added, 0 removed, 1 kept" in line
        assert "profiles: postfix, postfix310, strict" in line
        assert "log level debug" in line
        reply = await tcp_table_lookup(reactor(), f"inet:{LOOPBACK}:{tcp_port}", "cached.example")
        assert reply.startswith(b"500 ")
        assert await socketmap_lookup(reactor(), address, "strict", "cached.example") == ("NOTFOUND", "")
        # The connection opened before the reload still answers, from the cache kept across it.
        kept.send(socketmap.encode_request("postfix", b"cached.example"))
        assert await kept.socketmap_replies(2) == [("NOTFOUND", ""), ("NOTFOUND", "")]
        assert dns.count("_mta-sts.cached.example") == 1
        assert any("DEBUG" in line for line in child.lines[mark:])  # the new log level

        config.write_text(text)
        mark = len(child.lines)
        child.send(signal.SIGHUP)
        line = await child.until_line("configuration reloaded", mark)
        assert "listeners: 0 added, 1 removed, 1 kept" in line
        await child.until(lambda: not probe_accepts(("inet", tcp_port)), "tcp_table listener closed")
        assert (await socketmap_lookup(reactor(), address, "strict", "cached.example"))[0] == "PERM"
        kept.close()
        child.send(signal.SIGTERM)
        assert await child.exit_code() == 0
    finally:
        await child.close()


@ensure_deferred
async def test_sighup_with_a_broken_config_keeps_the_old_one_with_one_error_line(
    tmp_path: Path, dns: DnsServer
) -> None:
    port = free_port()
    address = f"inet:{LOOPBACK}:{port}"
    config = write_config(tmp_path, dns, [address])
    good = config.read_text()
    child = Child.spawn(config)
    occupant = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await child.until_listening(port)
        broken_files = [
            good + "[policy]\nrecheck_interval = 'soon'\n",
            "this is [not toml\n",
        ]
        occupant.bind((LOOPBACK, 0))
        occupant.listen(1)
        busy = f"inet:{LOOPBACK}:{occupant.getsockname()[1]}"
        broken_files.append(good.replace(f'"{address}"', f'"{address}", "{busy}"'))
        for broken in broken_files:
            config.write_text(broken)
            mark = len(child.lines)
            child.send(signal.SIGHUP)
            refused = await child.until_line("reload refused", mark)
            await deferLater(reactor(), 0.2, lambda: None)  # anything else it would log
            errors = [line for line in child.lines[mark:] if "ERROR" in line]
            assert errors == [refused], child.text()
            assert "keeping the running configuration" in refused
            assert "Traceback" not in child.text()
            assert child.running
            assert (await socketmap_lookup(reactor(), address, "postfix", "still.example"))[0] == "NOTFOUND"
        assert "cannot listen on" in refused and busy in refused

        config.write_text(good.replace("[cache]", "[profiles.late]\n[cache]"))
        mark = len(child.lines)
        child.send(signal.SIGHUP)
        assert "profiles: late, postfix" in await child.until_line("configuration reloaded", mark)
        child.send(signal.SIGTERM)
        assert await child.exit_code() == 0
    finally:
        occupant.close()
        await child.close()


# --- SIGTERM -----------------------------------------------------------------------------------


@ensure_deferred
async def test_sigterm_during_a_slow_lookup_answers_it_then_exits_0(tmp_path: Path, dns: DnsServer) -> None:
    port = free_port()
    address = f"inet:{LOOPBACK}:{port}"
    dns.set_fault("_mta-sts.slow.example", "drop")  # never answers: the lookup waits for dns_timeout
    config = write_config(tmp_path, dns, [address], extra="[policy]\nfirst_lookup_deadline = 10\n")
    config.write_text(config.read_text().replace("dns_timeout = 1.0", "dns_timeout = 3.0"))
    child = Child.spawn(config)
    try:
        await child.until_listening(port)
        answer = Deferred.fromCoroutine(socketmap_lookup(reactor(), address, "postfix", "slow.example"))
        await child.until(lambda: dns.count("_mta-sts.slow.example") >= 1, "the DNS query")

        child.send(signal.SIGTERM)
        await child.until(lambda: not probe_accepts(("inet", port)), "no new connections")

        assert await answer == ("NOTFOUND", "")
        assert await child.exit_code() == 0, child.text()
        assert "slow.example: not found (DNS failed" in child.text()
        assert child.lines[-1].endswith("INFO stopped")
    finally:
        await child.close()


# --- privilege drop ------------------------------------------------------------------------------


@pytest.fixture
def open_directory() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="mtasts-life-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def proc_ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return (
        [int(x) for x in fields["Uid"].split()],
        [int(x) for x in fields["Gid"].split()],
        [int(x) for x in fields["Groups"].split()],
    )


@ensure_deferred
async def test_started_as_root_it_drops_to_the_service_user(open_directory: Path, dns: DnsServer) -> None:
    require("running as root", os.geteuid() == 0)
    nobody = pwd.getpwnam("nobody")
    port = free_port()
    state = open_directory / "postfix-mtasts"
    control = open_directory / "postfix-mtasts-run" / "control.sock"
    config = write_config(
        open_directory, dns, [f"inet:{LOOPBACK}:{port}"], extra='[service]\nuser = "nobody"\n'
    )
    config.write_text(
        config.read_text()
        .replace('backend = "memory"', f'backend = "sqlite"\npath = "{state}/cache.sqlite3"')
        .replace(f'socket = "{open_directory}/control.sock"', f'socket = "{control}"')
    )
    child = Child.spawn(config)
    try:
        await child.until_line("ready")
        uids, gids, groups = proc_ids(child.pid)
        assert uids == [nobody.pw_uid] * 4
        assert gids == [nobody.pw_gid] * 4
        assert 0 not in groups
        assert f"running as user nobody (uid {nobody.pw_uid}, gid {nobody.pw_gid})" in child.text()

        # The lookup writes the new entry to SQLite as nobody.
        target = f"inet:{LOOPBACK}:{port}"
        assert (await socketmap_lookup(reactor(), target, "postfix", "drop.example"))[0] == "NOTFOUND"
        listed = await run_cli(reactor(), "ctl", "--socket", str(control), "list")
        assert listed.code == 0 and "drop.example" in listed.stdout, listed
        for path in (state, state / "cache.sqlite3", state / "cache.sqlite3.lock", control.parent, control):
            assert path.stat().st_uid == nobody.pw_uid, path
        child.send(signal.SIGTERM)
        assert await child.exit_code() == 0, child.text()
        assert not [line for line in child.lines if "ERROR" in line or "WARNING" in line], child.text()
    finally:
        await child.close()


@ensure_deferred
async def test_an_unknown_service_user_stops_start_up_in_one_line(tmp_path: Path, dns: DnsServer) -> None:
    config = write_config(tmp_path, dns, [f"inet:{LOOPBACK}:{free_port()}"],
                          extra='[service]\nuser = "no-such-user-here"\n')
    child = Child.spawn(config)
    try:
        assert await child.exit_code() == 1
        assert [line for line in child.lines if "ERROR" in line] == [
            line for line in child.lines if "service.user: no such user 'no-such-user-here'" in line
        ]
        assert len(child.lines) == 1, child.text()
    finally:
        await child.close()


# --- logs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["JOURNAL_STREAM", "INVOCATION_ID"])
@ensure_deferred
async def test_under_systemd_lines_carry_a_priority_and_no_timestamp(
    tmp_path: Path, dns: DnsServer, variable: str
) -> None:
    port = free_port()
    child = Child.spawn(write_config(tmp_path, dns, [f"inet:{LOOPBACK}:{port}"]),
                        environment={variable: "8:12345"})
    try:
        await child.until_line("ready")
        child.send(signal.SIGTERM)
        assert await child.exit_code() == 0
        assert child.lines
        for line in child.lines:
            assert re.match(r"<[0-7]>(DEBUG|INFO|WARNING|ERROR) ", line), line
        assert f"<6>INFO listening for socketmap on inet:{LOOPBACK}:{port}" in child.lines
    finally:
        await child.close()


@ensure_deferred
async def test_on_a_terminal_lines_carry_a_timestamp(tmp_path: Path, dns: DnsServer) -> None:
    child = Child.spawn(write_config(tmp_path, dns, [f"inet:{LOOPBACK}:{free_port()}"]))
    try:
        await child.until_line("ready")
        child.send(signal.SIGTERM)
        assert await child.exit_code() == 0
        assert all(TIMESTAMP.match(line) for line in child.lines), child.text()
    finally:
        await child.close()


def test_syslog_goes_to_the_mail_facility(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "log")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(path)
    syslog.settimeout(5)
    monkeypatch.setattr(logsetup, "SYSLOG_SOCKET", path)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logsetup.configure(logging.INFO, syslog=True)
        logging.getLogger("postfix_mtasts.test").warning("to the mail log")
        message = syslog.recv(4096).decode()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        syslog.close()
    # <20> is facility mail (2) * 8 + warning (4).
    assert message.startswith(f"<20>postfix-mtasts[{os.getpid()}]: to the mail log")


def test_syslog_without_a_socket_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logsetup, "SYSLOG_SOCKET", str(tmp_path / "absent"))
    root = logging.getLogger()
    before = list(root.handlers)

    with pytest.raises(logsetup.LogSetupError) as caught:
        logsetup.configure(logging.INFO, syslog=True)

    assert str(caught.value) == (
        f"log.syslog = true but {tmp_path}/absent does not exist (is a syslog daemon running?)"
    )
    assert root.handlers == before  # nothing changed


# --- the shipped systemd units ----------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


#: Every unit the checkout ships (and the Debian package installs).
UNITS = ("postfix-mtasts.service", "postfix-mtasts.socket", "postfix-mtasts-unix.socket")
#: Where the service's ExecStart= expects the command: the Debian package's link.
PACKAGED_COMMAND = "/usr/bin/postfix-mtasts"
#: smtp processes of a big Postfix site (default_process_limit is 100), and the
#: descriptors the daemon needs besides their connections (fetches, cache, logs).
LARGE_SITE_SMTP_PROCESSES = 2000
DESCRIPTOR_HEADROOM = 1000


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require("systemd-analyze", analyze is not None)
    assert analyze is not None
    installed = Path(sys.executable).parent / "postfix-mtasts"
    binary = installed if installed.exists() else Path(sys.executable)
    service = (SYSTEMD_DIRECTORY / "postfix-mtasts.service").read_text()
    assert f"ExecStart={PACKAGED_COMMAND} serve" in service
    # verify insists that ExecStart= exists; the package may not be installed here.
    (tmp_path / "postfix-mtasts.service").write_text(service.replace(PACKAGED_COMMAND, str(binary)))
    for unit in UNITS[1:]:
        shutil.copy(SYSTEMD_DIRECTORY / unit, tmp_path / unit)

    result = subprocess.run(
        [analyze, "verify", *UNITS], cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # warnings (unknown keys, bad values) included


def test_systemd_units_say_what_the_daemon_does() -> None:
    service = unit_settings(SYSTEMD_DIRECTORY / "postfix-mtasts.service")
    socket_unit = unit_settings(SYSTEMD_DIRECTORY / "postfix-mtasts.socket")
    unix_unit = unit_settings(SYSTEMD_DIRECTORY / "postfix-mtasts-unix.socket")

    expected = {
        "Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["30"], "Restart": ["on-failure"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"], "DynamicUser": ["yes"],
        "StateDirectory": ["postfix-mtasts"], "RuntimeDirectory": ["postfix-mtasts"],
        "ProtectSystem": ["strict"], "ProtectHome": ["yes"], "NoNewPrivileges": ["yes"],
        "PrivateTmp": ["yes"], "PrivateDevices": ["yes"], "CapabilityBoundingSet": [""],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
        "SystemCallFilter": ["@system-service"], "SystemCallArchitectures": ["native"],
        "LockPersonality": ["yes"],
    }
    for key, value in expected.items():
        assert service.get(key) == value, key
    # The sandbox stays whole: the unix socket comes from systemd, not a writable path.
    assert "ReadWritePaths" not in service
    assert socket_unit["ListenStream"] == ["127.0.0.1:8461"]
    assert socket_unit["FileDescriptorName"] == ["socketmap"]
    assert 'socketmap = ["systemd:socketmap"]' in (SYSTEMD_DIRECTORY / "postfix-mtasts.socket").read_text()
    # Postfix (user postfix) may connect; the daemon's dynamic user never needs the path.
    assert unix_unit["ListenStream"] == ["/var/spool/postfix/private/mtasts"]
    assert (unix_unit["SocketUser"], unix_unit["SocketGroup"], unix_unit["SocketMode"]) == (
        ["postfix"], ["postfix"], ["0660"],
    )
    assert unix_unit["Service"] == socket_unit["Service"] == ["postfix-mtasts.service"]
    unix_text = (SYSTEMD_DIRECTORY / "postfix-mtasts-unix.socket").read_text()
    assert f'socketmap = ["systemd:{unix_unit["FileDescriptorName"][0]}"]' in unix_text
    assert "smtp_tls_policy_maps = socketmap:unix:private/mtasts:postfix" in unix_text
    # doctor suggests the main.cf table of each shipped socket unit.
    relative = os.path.relpath(unix_unit["ListenStream"][0], "/var/spool/postfix")
    assert SHIPPED_SOCKET_UNITS == {
        socket_unit["FileDescriptorName"][0]: f"inet:{socket_unit['ListenStream'][0]}",
        unix_unit["FileDescriptorName"][0]: f"unix:{relative}",
    }
    # The storm after "postfix reload": each socket unit's backlog is the
    # daemon's own default, and a big site's smtp processes, each with a
    # socketmap and a tcp_table connection, fit in the descriptors with room to spare.
    assert socket_unit["Backlog"] == unix_unit["Backlog"] == [str(limits.LISTEN_BACKLOG_DEFAULT)]
    assert int(service["LimitNOFILE"][0]) >= 2 * LARGE_SITE_SMTP_PROCESSES + DESCRIPTOR_HEADROOM


#: Makes the kernel refuse writable+executable memory for this process, as
#: MemoryDenyWriteExecute=yes does (prctl PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN).
MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    print("unsupported"); sys.exit(0)
from OpenSSL import SSL
connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
try:
    # What resolver/https/tls.py installs for every policy fetch: a Python verify callback.
    connection.set_verify(SSL.VERIFY_PEER, lambda *args: True)
except MemoryError:
    print("fails")
else:
    print("works")
"""


def test_memory_deny_write_execute_matches_what_pyopenssl_tolerates() -> None:
    result = subprocess.run([sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=60,
                            env=daemon_environment())
    outcome = result.stdout.strip()
    require("a kernel with PR_SET_MDWE (Linux 6.3+)", outcome != "unsupported")
    service = unit_settings(SYSTEMD_DIRECTORY / "postfix-mtasts.service")

    assert outcome in ("works", "fails"), result.stderr
    # Turn it on once the TLS stack no longer needs W+X memory, never before.
    assert service["MemoryDenyWriteExecute"] == (["yes"] if outcome == "works" else ["no"])
