"""Run the real ``postfix-mtasts serve`` as a subprocess, for end-to-end tests.

The DNS server and policy host the daemon talks to run in the test process's
own reactor, so nothing here ever blocks it: the child is spawned with
``reactor.spawnProcess``, readiness is polled with ``deferLater``, and postmap
runs through ``getProcessOutputAndValue``.

Usage::

    daemon = await DaemonProcess.start(reactor, tmp_path, config_text)
    answer = await socketmap_lookup(reactor, daemon.socketmap, "postfix", "example.com")
    await daemon.stop()          # SIGTERM, exit status must be 0
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from postfix_mtasts.codec import socketmap

_F = TypeVar("_F", bound=Callable[..., Any])

#: Typed aliases of pytest-twisted's decorators (the package has no stubs).
ensure_deferred: Callable[[_F], _F] = pytest_twisted.ensureDeferred
async_yield_fixture: Callable[[_F], _F] = pytest_twisted.async_yield_fixture

#: The only address anything here connects to.
LOOPBACK = "127.0.0.1"
#: The checkout's root, put on the child's PYTHONPATH.
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
#: How long a daemon may take to accept its first connection.
START_TIMEOUT = 20.0
#: How long a daemon may take to exit after a signal.
EXIT_TIMEOUT = 20.0
#: Pause between two readiness probes.
POLL_INTERVAL = 0.05
#: How long one socketmap or tcp_table exchange may take before the test fails.
CLIENT_TIMEOUT = 20.0
#: Ports free_port() picks from: below Linux's default ephemeral range (32768-60999).
FREE_PORT_RANGE = (20_000, 32_767)
PORT_ATTEMPTS = 50
#: Where Debian installs postmap.
POSTMAP = "/usr/sbin/postmap"
#: Environment variables that change how the daemon logs (journal format, syslog).
_LOGGING_VARIABLES = ("JOURNAL_STREAM", "INVOCATION_ID", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")
#: What the daemon logs once every listener accepts and the cache is open.
_READY_LINE = re.compile(r"postfix-mtasts \S+ ready$")
#: How the checkout's own daemon is started (with the checkout on PYTHONPATH).
CHECKOUT_COMMAND = (sys.executable, "-m", "postfix_mtasts.cli")
#: Sets LISTEN_PID to the daemon's own pid, as systemd does: the shell's pid
#: is the daemon's once it execs.
_LISTEN_PID_SHELL = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
#: systemd's directory variables; the tests point them at private directories so
#: that defaults (control socket, SQLite file) never land in /run or /var/lib.
_DIRECTORY_VARIABLES = ("RUNTIME_DIRECTORY", "STATE_DIRECTORY")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now.

    Drawn at random below the kernel's ephemeral range, where the port-0
    listeners of the test servers (here and in parallel test runs) never land;
    it may still be taken before the caller binds it, a race tests accept.
    """
    for _ in range(PORT_ATTEMPTS):
        port = random.randint(*FREE_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {FREE_PORT_RANGE} after {PORT_ATTEMPTS} attempts")


def daemon_environment(runtime_directory: str = "", state_directory: str = "") -> dict[str, str]:
    """The test's environment, minus what would make the child log elsewhere,
    with systemd's RUNTIME_DIRECTORY and STATE_DIRECTORY when given."""
    dropped = _LOGGING_VARIABLES + _DIRECTORY_VARIABLES
    environment = {k: v for k, v in os.environ.items() if k not in dropped}
    if runtime_directory:
        environment["RUNTIME_DIRECTORY"] = runtime_directory
    if state_directory:
        environment["STATE_DIRECTORY"] = state_directory
    path = environment.get("PYTHONPATH", "")
    environment["PYTHONPATH"] = PROJECT_ROOT + (os.pathsep + path if path else "")
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


@dataclass(frozen=True)
class Exited:
    """How a child process ended: ``code`` for an exit, ``signal`` for a kill."""

    code: int | None
    signal: int | None


class _ChildProtocol(ProcessProtocol):
    """Collects a child's stdout and stderr lines and reports its end."""

    def __init__(self) -> None:
        self.stdout = b""
        self.stderr_lines: list[str] = []
        self._stderr_partial = b""
        self.exited: Exited | None = None
        self._waiters: list[Deferred[Exited]] = []
        self._line_listeners: list[Callable[[str], None]] = []

    def outReceived(self, data: bytes) -> None:
        self.stdout += data

    def errReceived(self, data: bytes) -> None:
        self._stderr_partial += data
        *complete, self._stderr_partial = self._stderr_partial.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.stderr_lines.append(line)
            for listener in list(self._line_listeners):
                listener(line)

    def processEnded(self, reason: Failure) -> None:
        if self._stderr_partial:
            self.stderr_lines.append(self._stderr_partial.decode("utf-8", "replace"))
            self._stderr_partial = b""
        value = reason.value
        if isinstance(value, ProcessDone):
            self.exited = Exited(0, None)
        elif isinstance(value, ProcessTerminated):
            self.exited = Exited(value.exitCode, value.signal)
        else:  # pragma: no cover - Twisted reports only those two
            self.exited = Exited(None, None)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.exited)

    def ended(self) -> Deferred[Exited]:
        waiter: Deferred[Exited] = Deferred()
        if self.exited is not None:
            waiter.callback(self.exited)
        else:
            self._waiters.append(waiter)
        return waiter


@dataclass(frozen=True)
class Launch:
    """How a :class:`DaemonProcess` starts, when not as the checkout's module.

    ``command`` may be an installed ``postfix-mtasts``, which then gets no
    PYTHONPATH (it must run its own code); ``user`` runs it as that user
    (its RUNTIME_DIRECTORY made theirs); ``state_directory`` is its
    STATE_DIRECTORY (default: the configuration file's directory);
    ``sockets`` (FileDescriptorName, listening socket) are handed over as
    systemd's socket activation does: descriptors from 3 on, LISTEN_FDS,
    LISTEN_FDNAMES and LISTEN_PID. ``probe`` is polled for readiness when the
    configuration names only ``systemd:`` listeners.
    """

    command: Sequence[str] = CHECKOUT_COMMAND
    user: str = ""
    state_directory: str = ""
    sockets: Sequence[tuple[str, socket.socket]] = ()


class DaemonFailed(AssertionError):
    """The daemon did not start, or did not stop the way the test expected."""


class DaemonProcess:
    """One ``postfix-mtasts serve`` child with its config file and stderr."""

    def __init__(
        self, reactor: Any, config_path: Path, probe: tuple[str, str | int] | None, launch: Launch = Launch()
    ) -> None:
        self.reactor = reactor
        self.config_path = config_path
        self.launch = launch
        #: ("inet", port) or ("unix", path): the listener polled for readiness;
        #: None: wait for the daemon's "ready" line instead.
        self.probe = probe
        self._protocol = _ChildProtocol()
        self._transport: Any = None
        #: The child's RUNTIME_DIRECTORY (its default control socket goes there);
        #: short, since a unix socket path must fit in 108 bytes.
        self.runtime_directory = tempfile.mkdtemp(prefix="mtasts-run-")

    @classmethod
    async def start(
        cls,
        reactor: Any,
        directory: Path,
        config_text: str,
        *,
        name: str = "daemon",
        args: Sequence[str] = (),
        launch: Launch = Launch(),
    ) -> DaemonProcess:
        """Write ``config_text`` to ``directory/NAME.toml`` and run the daemon on
        it until its first listener accepts; fails with its stderr if it exits."""
        config_path = directory / f"{name}.toml"
        config_path.write_text(config_text, encoding="utf-8")
        # Sockets handed over accept before the daemon even runs: no probe for those.
        probe = None if launch.sockets else first_listener(config_text)
        daemon = cls(reactor, config_path, probe, launch)
        daemon.spawn(args)
        try:
            await daemon.wait_ready()
        except BaseException:
            await daemon.close()
            raise
        return daemon

    def spawn(self, args: Sequence[str] = ()) -> None:
        launch = self.launch
        argv = [*launch.command, "serve", "--config", str(self.config_path), *args]
        state_directory = launch.state_directory or str(self.config_path.parent)
        environment = daemon_environment(self.runtime_directory, state_directory)
        directory = PROJECT_ROOT
        if tuple(launch.command) != CHECKOUT_COMMAND:
            del environment["PYTHONPATH"]
            directory = "/"
        descriptors: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        if launch.sockets:
            environment["LISTEN_FDS"] = str(len(launch.sockets))
            environment["LISTEN_FDNAMES"] = ":".join(name for name, _ in launch.sockets)
            for index, (_, listener) in enumerate(launch.sockets):
                descriptors[3 + index] = listener.fileno()
            argv = ["/bin/sh", "-c", _LISTEN_PID_SHELL, "sh", *argv]
        uid = gid = None
        if launch.user:
            entry = pwd.getpwnam(launch.user)
            uid, gid = entry.pw_uid, entry.pw_gid
            os.chown(self.runtime_directory, uid, gid)
        self._transport = self.reactor.spawnProcess(
            self._protocol, argv[0], argv, env=environment, path=directory, childFDs=descriptors,
            uid=uid, gid=gid,
        )

    @property
    def pid(self) -> int:
        pid: int = self._transport.pid
        return pid

    @property
    def stderr_lines(self) -> list[str]:
        """Every complete line the daemon wrote to stderr so far (its log)."""
        return self._protocol.stderr_lines

    @property
    def exited(self) -> Exited | None:
        return self._protocol.exited

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_lines)

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll the listener until it accepts (without a probe: until the daemon
        logs that it is ready); fail if the daemon exits first."""
        waited = 0.0
        while True:
            if self.exited is not None:
                raise DaemonFailed(f"daemon exited ({self.exited}) before listening:\n{self.stderr_text()}")
            if self.probe is None:
                if any(_READY_LINE.search(line) for line in self.stderr_lines):
                    return
            elif probe_accepts(self.probe):
                return
            if waited >= timeout:
                self.kill_now()
                raise DaemonFailed(
                    f"daemon not listening on {self.probe} after {timeout}s:\n{self.stderr_text()}"
                )
            await deferLater(self.reactor, POLL_INTERVAL, lambda: None)
            waited += POLL_INTERVAL

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> Exited:
        ended = self._protocol.ended()
        ended.addTimeout(timeout, self.reactor)
        try:
            exited = await ended
        except Exception as e:
            self.kill_now()
            raise DaemonFailed(f"daemon did not exit within {timeout}s:\n{self.stderr_text()}") from e
        shutil.rmtree(self.runtime_directory, ignore_errors=True)
        return exited

    async def stop(self) -> Exited:
        """SIGTERM, wait for the exit, and insist on exit status 0."""
        self._signal(signal.SIGTERM)
        exited = await self.wait_exit()
        if exited != Exited(0, None):
            raise DaemonFailed(f"daemon ended with {exited} after SIGTERM:\n{self.stderr_text()}")
        return exited

    async def kill(self) -> Exited:
        """SIGKILL: no clean-up of any kind happens in the daemon."""
        self._signal(signal.SIGKILL)
        exited = await self.wait_exit()
        if exited.signal != signal.SIGKILL:
            raise DaemonFailed(f"daemon ended with {exited}, not by SIGKILL:\n{self.stderr_text()}")
        return exited

    def kill_now(self) -> None:
        """SIGKILL without waiting, for clean-up after a failed test."""
        if self.exited is None and self._transport is not None:
            try:
                self._transport.signalProcess("KILL")
            except Exception:
                pass

    async def close(self) -> None:
        """Make sure the child is gone (fixture teardown)."""
        if self._transport is None or self.exited is not None:
            shutil.rmtree(self.runtime_directory, ignore_errors=True)
            return
        self.kill_now()
        await self.wait_exit()

    def _signal(self, number: int) -> None:
        if self.exited is not None:
            raise DaemonFailed(f"daemon already ended ({self.exited}):\n{self.stderr_text()}")
        self._transport.signalProcess(number)


def first_listener(config_text: str) -> tuple[str, str | int]:
    """The first socketmap (else tcp_table) address of a TOML config, as a probe target."""
    import tomllib

    listen = tomllib.loads(config_text).get("listen", {})
    addresses = list(listen.get("socketmap", ["inet:127.0.0.1:8461"])) + list(listen.get("tcp_table", []))
    for address in addresses:
        kind, _, rest = address.partition(":")
        if kind == "inet":
            host, _, port = rest.rpartition(":")
            if host != LOOPBACK:
                raise ValueError(f"tests listen on {LOOPBACK} only, not {address!r}")
            return ("inet", int(port))
        if kind == "unix":
            return ("unix", rest.split(":mode=")[0])
    raise ValueError(f"no inet or unix listener in the config: {addresses}")


def probe_accepts(probe: tuple[str, str | int]) -> bool:
    """True if a listener accepts a connection now."""
    kind, where = probe
    family = socket.AF_INET if kind == "inet" else socket.AF_UNIX
    target: Any = (LOOPBACK, where) if kind == "inet" else where
    with socket.socket(family, socket.SOCK_STREAM) as client:
        # On loopback a connect is accepted or refused at once; the timeout only
        # bounds the pathological case of a full backlog.
        client.settimeout(POLL_INTERVAL)
        try:
            client.connect(target)
        except OSError:
            return False
        return True


# --- clients ------------------------------------------------------------------


class _Exchange(Protocol):
    """Send one request, collect bytes until ``complete(buffer)`` says the reply is whole."""

    def __init__(self, request: bytes, complete: Callable[[bytes], bool]) -> None:
        self.request = request
        self.complete = complete
        self.buffer = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.done.called and self.complete(self.buffer):
            self.done.callback(self.buffer)
            transport: Any = self.transport
            transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.errback(AssertionError(f"connection closed after {self.buffer!r}"))


def _endpoint(reactor: Any, address: str) -> Any:
    kind, _, rest = address.partition(":")
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        return TCP4ClientEndpoint(reactor, host, int(port), timeout=CLIENT_TIMEOUT)
    if kind == "unix":
        return UNIXClientEndpoint(reactor, rest, timeout=CLIENT_TIMEOUT)  # type: ignore[no-untyped-call]
    raise ValueError(f"cannot connect to {address!r}")


async def _exchange(reactor: Any, address: str, request: bytes, complete: Callable[[bytes], bool]) -> bytes:
    exchange = _Exchange(request, complete)
    await _endpoint(reactor, address).connect(Factory.forProtocol(lambda: exchange))
    exchange.done.addTimeout(CLIENT_TIMEOUT, reactor)
    return await exchange.done


async def socketmap_lookup(reactor: Any, address: str, name: str, key: str) -> tuple[str, str]:
    """One socketmap request over a fresh connection to ``address`` ("inet:HOST:PORT"
    or "unix:PATH"); returns (status, data), e.g. ("OK", "secure match=...")."""
    decoder = socketmap.SocketmapReplyDecoder()
    replies: list[tuple[str, str]] = []
    seen = 0

    def complete(buffer: bytes) -> bool:
        nonlocal seen
        replies.extend(decoder.feed(buffer[seen:]))
        seen = len(buffer)
        return bool(replies)

    await _exchange(reactor, address, socketmap.encode_request(name, key.encode("utf-8")), complete)
    return replies[0]


async def tcp_table_lookup(reactor: Any, address: str, key: str) -> bytes:
    """One tcp_table ``get`` over a fresh connection; returns the reply line."""
    reply = await _exchange(reactor, address, b"get " + key.encode("utf-8") + b"\n", lambda b: b"\n" in b)
    return reply.split(b"\n", 1)[0]


@dataclass(frozen=True)
class CommandResult:
    """What a finished command printed, and its exit status."""

    stdout: str
    stderr: str
    code: int

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


# --- postmap ------------------------------------------------------------------


async def postmap_query(
    reactor: Any, table: str, key: str, *, config_directory: Path | None = None
) -> CommandResult:
    """``postmap -q KEY TABLE`` without blocking the reactor (the daemon it
    queries may need the test's DNS and HTTPS servers to answer)."""
    args = ["-q", key, table]
    if config_directory is not None:
        args = ["-c", str(config_directory), *args]
    running: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(  # type: ignore[no-untyped-call]
        POSTMAP, args, env={"PATH": "/usr/sbin:/usr/bin:/bin"}, reactor=reactor
    )
    out, err, code = await running
    return CommandResult(out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code)


# --- the command line ---------------------------------------------------------


async def run_cli(reactor: Any, *args: str, private_directory: Path | None = None) -> CommandResult:
    """``postfix-mtasts ARGS`` as a child process, without blocking the reactor;
    ``private_directory`` becomes its RUNTIME_DIRECTORY and STATE_DIRECTORY."""
    argv = ["-m", "postfix_mtasts.cli", *args]
    private = "" if private_directory is None else str(private_directory)
    running: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(  # type: ignore[no-untyped-call]
        sys.executable, argv, env=daemon_environment(private, private), path=PROJECT_ROOT, reactor=reactor
    )
    out, err, code = await running
    return CommandResult(out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code)


class _BatchProtocol(ProcessProtocol):
    """Feeds ``stdin`` to a child, closes it, and collects the output."""

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.done: Deferred[CommandResult] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.stdin)
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = value.exitCode if isinstance(value, ProcessTerminated) else 0
        self.done.callback(
            CommandResult(self.out.decode("utf-8", "replace"), self.err.decode("utf-8", "replace"), code)
        )


async def postmap_batch(
    reactor: Any, table: str, keys: Sequence[str], *, config_directory: Path
) -> CommandResult:
    """``postmap -q - TABLE`` with one key per line on stdin: Postfix looks them
    all up over one connection and prints ``key<TAB>value`` for each one found."""
    protocol = _BatchProtocol("".join(key + "\n" for key in keys).encode("utf-8"))
    argv = [POSTMAP, "-c", str(config_directory), "-q", "-", table]
    reactor.spawnProcess(protocol, POSTMAP, argv, env={"PATH": "/usr/sbin:/usr/bin:/bin"})
    protocol.done.addTimeout(CLIENT_TIMEOUT, reactor)
    return await protocol.done


def postfix_config_directory(directory: Path) -> Path:
    """A minimal Postfix configuration directory for ``postmap -c``, so the
    tests do not depend on (or read) the machine's /etc/postfix."""
    directory.mkdir(parents=True, exist_ok=True)
    main_cf = directory / "main.cf"
    main_cf.write_text("compatibility_level = 3.6\n")
    # Postfix programs pause (about 1.5 s) on a main.cf modified a moment ago,
    # waiting for the edit to settle; a file from the past is read at once.
    an_hour_ago = time.time() - 3600
    os.utime(main_cf, (an_hour_ago, an_hour_ago))
    return directory
