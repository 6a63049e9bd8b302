"""Start-up time and lookups during a shared-store outage (issue 16).

Two measurements of the real ``postfix-mtasts serve``, each a subprocess told
to notify a datagram socket of this script (``NOTIFY_SOCKET``, as systemd
does)::

    bench/run.sh --startup                   # after the main run
    .venv/bin/python bench/startup.py        # alone, about 6 minutes
    .venv/bin/python bench/startup.py --quick  # 3 runs each, about 4 minutes
    .venv/bin/python bench/startup.py --runs 3 --backends sqlite,redis

1. **Start-up.** For each backend (sqlite, redis, postgresql), each state of
   the shared store (up; down: a loopback port that refuses connections, and
   one whose listener accepts but never answers, so only a timeout ends the
   wait for it) and a local copy holding 0 or ``--cached`` policies: the
   wall time from spawn to READY=1, and to the first answered socketmap
   lookup (a probe connects from the spawn on; it asks a cached domain, or
   with an empty cache a domain without MTA-STS, which costs a DNS query).
   ``--runs`` runs each: median, min and max. With the store up, the shared
   store holds the same policies as the local copy (a fleet in steady state).
2. **Lookups during an outage.** A daemon reaching its store through a TCP
   proxy (in this process), with ``--cached`` policies in its local copy and
   the store: ``--lookups`` lookups over 16 connections with the store up
   (cached domains), then the proxy is cut (new connections refused, open
   ones dropped) and ``--lookups`` more are fired (cached domains, with
   domains it never saw mixed in: with and without MTA-STS, resolved from
   the world), then the proxy is restored. Answers by kind, latencies, and
   every line the daemon logged from the cut until the store was back.

The store runs are on this host's loopback (Redis 127.0.0.1:6379, PostgreSQL
127.0.0.1:5432 database ``test``), each run under a Redis key prefix or
PostgreSQL schema of its own, removed afterwards; no network namespace.
The DNS and policy host for the lookups that need them is bench/world.py on
free loopback ports. A table goes to stdout, the figures to
``bench/results/startup-<time>.json``, each daemon's log to
``bench/results/startup-*.log``. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402
import world as world_module  # noqa: E402
from fill_cache import cached_domain  # noqa: E402

from bench import RESULTS, VENV_PYTHON, World, log, machine, stop_process  # noqa: E402

LOOPBACK = "127.0.0.1"
REDIS_URL = os.environ.get("MTASTS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRESQL_DSN = os.environ.get(
    "MTASTS_BENCH_POSTGRESQL_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)
#: Where the real servers listen (the proxy and the "down" ports stand in for them).
REDIS_ADDRESS = (LOOPBACK, 6379)
POSTGRESQL_ADDRESS = (LOOPBACK, 5432)
BACKENDS = ("sqlite", "redis", "postgresql")
SHARED = ("redis", "postgresql")
#: The states of the shared store a start-up is measured in.
UP = "up"
REFUSED = "down: refused"
SILENT = "down: no answer"
#: Runs of each start-up configuration.
DEFAULT_RUNS = 5
QUICK_RUNS = 3
#: Policies in the local copy (and the store, when up) for the "cached" runs.
DEFAULT_CACHED = 10_000
#: Lookups fired during the outage (and before it, as the reference).
DEFAULT_LOOKUPS = 10_000
#: One lookup in this many during the outage asks a domain the daemon never saw
#: (alternately with and without MTA-STS).
UNCACHED_EVERY = 25
#: Fewest policy domains the world serves (bench/world.py issues one certificate
#: each); more when the lookups before and during the outage need more.
WORLD_POLICIES = 400
#: Seconds a daemon may take to send READY=1 and answer, before the run gives up.
READY_LIMIT = 60.0
#: Seconds between two connection attempts of the first-answer probe.
PROBE_INTERVAL = 0.002
#: Seconds to wait, after the proxy is restored, for the daemon's "back" line
#: (it probes the store every 5 s: cache.resilient.DEFAULT_RETRY_INTERVAL).
BACK_LIMIT = 30.0
#: Seconds the log is still read after the "back" line, for any line after it.
LOG_SETTLE = 1.0
#: Largest notify datagram read.
NOTIFY_SIZE = 4096
#: What the daemon logs when the shared store goes down and when it is back.
DOWN_WORD = "unavailable"
BACK_WORD = "store is back"


# --- small helpers -----------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (it may be taken later: a race the bench accepts)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def answer_kind(payload: bytes) -> str:
    """A socketmap reply as the table shows it: "secure", "not found", "TEMP", ..."""
    status, _, data = payload.partition(b" ")
    if status == b"OK":
        return data.split(b" ", 1)[0].decode("ascii", "replace") or "OK"
    if status == b"NOTFOUND":
        return "not found"
    return status.decode("ascii", "replace")


def reachable(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError:
        return False
    return True


# --- the shared store: namespaces, fills, clean-up ---------------------------


@dataclass
class Namespace:
    """A Redis key prefix or PostgreSQL schema of one run, on the real server."""

    backend: str
    name: str = field(default_factory=lambda: secrets.token_hex(6))

    @property
    def prefix(self) -> str:
        return f"mtasts-bench-{self.name}:"

    @property
    def schema(self) -> str:
        return f"mtasts_bench_{self.name}"

    def cache_section(self, address: tuple[str, int]) -> str:
        """The ``[cache.<backend>]`` table pointing a daemon at ``address``."""
        host, port = address
        if self.backend == "redis":
            return f'[cache.redis]\nurl = "redis://{host}:{port}/0"\nkey_prefix = "{self.prefix}"\n'
        from psycopg.conninfo import make_conninfo

        dsn = make_conninfo(POSTGRESQL_DSN, host=host, port=port)
        return f'[cache.postgresql]\ndsn = "{dsn}"\nschema = "{self.schema}"\n'

    def fill_arguments(self) -> list[str]:
        if self.backend == "redis":
            return ["--redis", REDIS_URL, "--key-prefix", self.prefix]
        return ["--postgresql", POSTGRESQL_DSN, "--schema", self.schema]

    def remove(self) -> None:
        """Delete every key under the prefix, or the whole schema."""
        if self.backend == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_timeout=10)
            try:
                keys = list(client.scan_iter(match=self.prefix + "*", count=1000))
                for start in range(0, len(keys), 1000):
                    client.delete(*keys[start : start + 1000])
            finally:
                client.close()
        else:
            import psycopg

            with psycopg.connect(POSTGRESQL_DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'.encode())


def fill(path: str, count: int, namespace: Namespace | None) -> float:
    """``count`` policies into the SQLite file at ``path`` and, if given, the
    shared store's namespace, with bench/fill_cache.py; returns the seconds taken."""
    started = time.monotonic()
    extra = namespace.fill_arguments() if namespace is not None else []
    subprocess.run(
        [VENV_PYTHON, os.path.join(BENCH, "fill_cache.py"), path, str(count), *extra],
        check=True,
        cwd=ROOT,
    )
    return time.monotonic() - started


# --- stand-ins for the store: a proxy, and a listener that never answers ---


class LoopThread:
    """An asyncio loop in a thread of its own, hosting the proxy and the silent listener."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class _Silent(asyncio.Protocol):
    """Accepts a connection and never answers it (what the store looks like when it hangs)."""

    def __init__(self, held: set[asyncio.BaseTransport]) -> None:
        self.held = held
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.held.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.held.discard(self.transport)


class SilentListener:
    """A loopback port whose listener accepts connections and never answers."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.held: set[asyncio.BaseTransport] = set()
        self.server: asyncio.AbstractServer = loop.run(
            loop.loop.create_server(lambda: _Silent(self.held), LOOPBACK, 0)
        )
        self.port: int = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def close() -> None:
            self.server.close()
            for transport in list(self.held):
                transport.abort()  # type: ignore[attr-defined]

        self.loop.run(close())


class Proxy:
    """Forwards a loopback port to the real store until cut: a cut refuses new
    connections and drops the open ones; ``restore`` forwards again on the same port."""

    def __init__(self, loop: LoopThread, target: tuple[str, int]) -> None:
        self.loop = loop
        self.target = target
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None
        self.transports: set[asyncio.BaseTransport] = set()
        self.restore()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer.transport, upstream_writer.transport)
        self.transports.update(pair)
        try:
            await asyncio.gather(self._pump(reader, upstream_writer), self._pump(upstream_reader, writer))
        finally:
            self.transports.difference_update(pair)

    def cut(self) -> None:
        async def cut() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
            for transport in list(self.transports):
                transport.abort()  # type: ignore[attr-defined]

        self.loop.run(cut())

    def restore(self) -> None:
        async def listen() -> asyncio.AbstractServer:
            return await asyncio.start_server(self._handle, LOOPBACK, self.port, reuse_address=True)

        if self.server is None:
            self.server = self.loop.run(listen())

    def close(self) -> None:
        self.cut()


# --- one daemon --------------------------------------------------------------


def daemon_config(
    path: str,
    port: int,
    backend: str,
    cache_path: str,
    store_section: str,
    world: World,
    deadline: float | None,
) -> str:
    """Defaults everywhere but the listener, the cache and what points the daemon at the world."""
    text = (
        "[listen]\n"
        f'socketmap = ["inet:{LOOPBACK}:{port}"]\n'
        "[cache]\n"
        f'backend = "{backend}"\n'
        f'path = "{cache_path}"\n'
        + (f"open_deadline = {deadline:g}\n" if deadline is not None and backend in SHARED else "")
        + f"{store_section}"
        "[resolver]\n"
        f'nameservers = ["{LOOPBACK}:{world.dns_port}"]\n'
        f'ca_file = "{world.ca_file}"\n'
        f"https_port = {world.https_port}\n"
    )
    with open(path, "w") as f:
        f.write(text)
    return path


class Daemon:
    """``postfix-mtasts serve`` with NOTIFY_SOCKET pointing at a socket of ours."""

    def __init__(self, work: str, config_path: str, log_path: str) -> None:
        self.log_path = log_path
        self.notify_path = os.path.join(work, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        environment = {
            k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID", "LISTEN_FDS")
        }
        # RUNTIME_DIRECTORY keeps the default control socket out of /run, where
        # another daemon on this machine may have its own.
        environment.update(NOTIFY_SOCKET=self.notify_path, RUNTIME_DIRECTORY=work, STATE_DIRECTORY=work)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [VENV_PYTHON, "-m", "postfix_mtasts.cli", "serve", "--config", config_path],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=open(log_path, "w"),
        )

    def watch_start(self, port: int, key: bytes) -> dict[str, Any]:
        """Seconds from spawn to READY=1, to the listener accepting, and to the
        first reply to ``key`` (asked as soon as the listener accepts)."""
        ready_at: float | None = None
        answer_at: float | None = None
        listening_at: float | None = None
        reply = b""
        probe: socket.socket | None = None
        buffer = b""
        deadline = self.started + READY_LIMIT
        try:
            while ready_at is None or answer_at is None:
                now = time.monotonic()
                if self.process.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.process.returncode}; see {self.log_path}")
                if now > deadline:
                    raise RuntimeError(f"no READY=1 and answer after {READY_LIMIT:g}s; see {self.log_path}")
                if probe is None and answer_at is None:
                    candidate = socket.socket()
                    try:
                        candidate.connect((LOOPBACK, port))
                    except OSError:
                        candidate.close()
                    else:
                        listening_at = time.monotonic()
                        candidate.sendall(loadgen.encode(key))
                        probe = candidate
                watched = [self.notify] + ([probe] if probe is not None else [])
                readable, _, _ = select.select(watched, [], [], PROBE_INTERVAL if probe is None else 1.0)
                for ready in readable:
                    if ready is self.notify:
                        message = self.notify.recv(NOTIFY_SIZE)
                        if b"READY=1" in message.split(b"\n") and ready_at is None:
                            ready_at = time.monotonic()
                    elif probe is not None:
                        chunk = probe.recv(4096)
                        if not chunk:
                            raise RuntimeError(f"connection closed without a reply; see {self.log_path}")
                        buffer += chunk
                        colon = buffer.find(b":")
                        if colon > 0 and len(buffer) >= colon + 2 + int(buffer[:colon]):
                            answer_at = time.monotonic()
                            reply = buffer[colon + 1 : colon + 1 + int(buffer[:colon])]
                            probe.close()
                            probe = None
        finally:
            if probe is not None:
                probe.close()
        assert listening_at is not None
        return {
            "ready_s": ready_at - self.started,
            "listening_s": listening_at - self.started,
            "first_answer_s": answer_at - self.started,
            "first_reply": reply.decode("utf-8", "replace"),
        }

    def log_lines(self, start: int = 0) -> list[str]:
        with open(self.log_path, errors="replace") as f:
            f.seek(start)
            return f.read().splitlines()

    def log_size(self) -> int:
        return os.path.getsize(self.log_path)

    def stop(self) -> None:
        stop_process(self.process)
        self.notify.close()


# --- 1. start-up -------------------------------------------------------------


@dataclass
class Context:
    world: World
    loop: LoopThread
    args: argparse.Namespace
    results: dict[str, Any] = field(default_factory=dict)


def start_once(ctx: Context, backend: str, state: str, count: int, run: int) -> dict[str, Any]:
    """One spawn to READY=1 and first answer; the store in ``state``, ``count`` policies cached."""
    work = tempfile.mkdtemp(prefix="mtasts-startup-")
    namespace = Namespace(backend) if backend in SHARED else None
    silent: SilentListener | None = None
    daemon: Daemon | None = None
    try:
        cache_path = os.path.join(work, "cache.sqlite3")
        # The store holds the policies too when it is up; when down, only the local copy can.
        fill(cache_path, count, namespace if state == UP else None)
        section = ""
        if namespace is not None:
            real = REDIS_ADDRESS if backend == "redis" else POSTGRESQL_ADDRESS
            if state == UP:
                address = real
            elif state == REFUSED:
                address = (LOOPBACK, free_port())
            else:
                silent = SilentListener(ctx.loop)
                address = (LOOPBACK, silent.port)
            section = namespace.cache_section(address)
        port = free_port()
        config_path = os.path.join(work, "daemon.toml")
        deadline = ctx.args.open_deadline
        config = daemon_config(config_path, port, backend, cache_path, section, ctx.world, deadline)
        tag = f"{backend}-{state.replace(':', '').replace(' ', '-')}-{count}-{run}"
        key = cached_domain(0) if count else world_module.plain_domain(run)
        daemon = Daemon(work, config, os.path.join(RESULTS, f"startup-{tag}.log"))
        result = daemon.watch_start(port, key.encode())
        result["down_lines"] = sum(DOWN_WORD in line for line in daemon.log_lines())
        return result
    finally:
        if daemon is not None:
            daemon.stop()
        if silent is not None:
            silent.close()
        if namespace is not None:
            namespace.remove()
        shutil.rmtree(work, ignore_errors=True)


def run_startup(ctx: Context, backends: Sequence[str]) -> list[dict[str, Any]]:
    """Every configuration ``--runs`` times, one run of each in turn (so that load
    from elsewhere on the machine falls on all of them alike)."""
    configurations = [
        (backend, state, count)
        for backend in backends
        for state in ((UP, REFUSED, SILENT) if backend in SHARED else (UP,))
        for count in (0, ctx.args.cached)
    ]
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {c: [] for c in configurations}
    for run in range(ctx.args.runs):
        log(f"start-up run {run + 1} of {ctx.args.runs}: {len(configurations)} configurations")
        for backend, state, count in configurations:
            runs[backend, state, count].append(start_once(ctx, backend, state, count, run))
    rows: list[dict[str, Any]] = []
    for (backend, state, count), each in runs.items():
        row = {
            "backend": backend,
            "store": state,
            "cached": count,
            "runs": len(each),
            "ready_s": summary([r["ready_s"] for r in each]),
            "first_answer_s": summary([r["first_answer_s"] for r in each]),
            "listening_s": summary([r["listening_s"] for r in each]),
            "first_reply": each[0]["first_reply"],
            "down_lines": [r["down_lines"] for r in each],
            "each": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in each],
        }
        rows.append(row)
        log(
            f"start-up {backend}, store {state}, {count:,} cached: READY median "
            f"{row['ready_s']['median']:.3f} s, first answer {row['first_answer_s']['median']:.3f} s "
            f"({row['first_reply'][:30]}), unavailable lines {row['down_lines']}"
        )
    return rows


# --- 2. lookups during an outage --------------------------------------------


def new_domains(lookups: int) -> int:
    """Domains never seen, of each kind, among ``lookups`` keys of :func:`outage_keys`."""
    return (lookups // UNCACHED_EVERY + 1) // 2


def outage_keys(count: int, lookups: int, first_new: int) -> tuple[list[bytes], list[str]]:
    """Keys and the class of each: cached domains, with every ``UNCACHED_EVERY``-th
    a domain never seen (numbered from ``first_new``), alternately with and without MTA-STS."""
    keys: list[bytes] = []
    classes: list[str] = []
    new_policy = new_plain = first_new
    for index in range(lookups):
        if index % UNCACHED_EVERY == UNCACHED_EVERY - 1:
            if (index // UNCACHED_EVERY) % 2 == 0:
                keys.append(world_module.policy_domain(new_policy).encode())
                classes.append("new, MTA-STS")
                new_policy += 1
            else:
                keys.append(world_module.plain_domain(new_plain).encode())
                classes.append("new, no MTA-STS")
                new_plain += 1
        else:
            keys.append(cached_domain(index % count).encode())
            classes.append("cached")
    return keys, classes


def fire(port: int, keys: list[bytes], classes: list[str], connections: int) -> dict[str, Any]:
    """Each key once over ``connections`` closed-loop connections: answers by class and latency."""
    answers: dict[str, Counter[str]] = {name: Counter() for name in dict.fromkeys(classes)}
    latencies: dict[str, list[int]] = {name: [] for name in answers}

    def on_reply(index: int, payload: bytes, latency_ns: int) -> None:
        answers[classes[index]][answer_kind(payload)] += 1
        latencies[classes[index]].append(latency_ns)

    result = loadgen.run_closed_loop(port, keys, connections=connections, total=len(keys), on_reply=on_reply)
    by_class = {}
    for name, values in latencies.items():
        values.sort()
        by_class[name] = {
            "lookups": len(values),
            "answers": dict(answers[name]),
            "p50_ms": round(loadgen.percentile(values, 0.50) * 1e-6, 3),
            "p99_ms": round(loadgen.percentile(values, 0.99) * 1e-6, 3),
            "max_ms": round((values[-1] if values else 0) * 1e-6, 3),
        }
    return {
        "lookups": result.lookups,
        "seconds": result.seconds,
        "lookups_per_s": result.lookups_per_s,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "max_ms": result.max_ms,
        "by_class": by_class,
    }


def run_outage(ctx: Context, backend: str) -> dict[str, Any]:
    args = ctx.args
    work = tempfile.mkdtemp(prefix="mtasts-outage-")
    namespace = Namespace(backend)
    proxy: Proxy | None = None
    daemon: Daemon | None = None
    try:
        cache_path = os.path.join(work, "cache.sqlite3")
        fill(cache_path, args.cached, namespace)
        proxy = Proxy(ctx.loop, REDIS_ADDRESS if backend == "redis" else POSTGRESQL_ADDRESS)
        port = free_port()
        section = namespace.cache_section((LOOPBACK, proxy.port))
        config_path = os.path.join(work, "daemon.toml")
        deadline = ctx.args.open_deadline
        config = daemon_config(config_path, port, backend, cache_path, section, ctx.world, deadline)
        daemon = Daemon(work, config, os.path.join(RESULTS, f"startup-outage-{backend}.log"))
        daemon.watch_start(port, cached_domain(0).encode())
        # The same mix before the cut, with other new domains: the reference.
        reference = fire(port, *outage_keys(args.cached, args.lookups, 0), args.connections)
        log(
            f"outage {backend}: store up, {reference['lookups']:,} lookups: "
            + "; ".join(f"{name} {c['answers']}" for name, c in reference["by_class"].items())
        )
        keys, classes = outage_keys(args.cached, args.lookups, new_domains(args.lookups))
        offset = daemon.log_size()
        proxy.cut()
        cut_at = time.monotonic()
        during = fire(port, keys, classes, args.connections)
        proxy.restore()
        restored_at = time.monotonic()
        back_at = None
        while time.monotonic() < restored_at + BACK_LIMIT:
            if any(BACK_WORD in line for line in daemon.log_lines(offset)):
                back_at = time.monotonic()
                break
            time.sleep(0.05)
        time.sleep(LOG_SETTLE)
        lines = daemon.log_lines(offset)
        during.update(
            {
                "outage_s": round(restored_at - cut_at, 3),
                "back_after_restore_s": None if back_at is None else round(back_at - restored_at, 3),
                "log_lines": lines,
                "down_lines": sum(DOWN_WORD in line for line in lines),
                "back_lines": sum(BACK_WORD in line for line in lines),
                "store_lines": sum(f"{backend} store" in line for line in lines),
            }
        )
        log(
            f"outage {backend}: store cut, {during['lookups']:,} lookups: "
            + "; ".join(f"{name} {c['answers']}" for name, c in during["by_class"].items())
            + f"; {during['down_lines']} unavailable / {during['back_lines']} back lines"
        )
        return {"reference": reference, "outage": during}
    finally:
        if daemon is not None:
            daemon.stop()
        if proxy is not None:
            proxy.close()
        namespace.remove()
        shutil.rmtree(work, ignore_errors=True)


# --- the table ---------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    lines = [
        f"postfix-mtasts start-up and store outages at {results['machine']['commit'][:10]} "
        f"({results['machine']['nproc']} CPUs, {results['machine']['cpu']}; shared with other work:",
        f"1-minute load average {results['load_average_before'][0]:.1f} before, "
        f"{results['load_average_after'][0]:.1f} after)",
    ]
    if results.get("startup"):
        lines += [
            "",
            f"Start-up, seconds from spawn, median of {results['runs']} [min-max]",
            f"{'backend':<11}{'store':<17}{'cached':>8}  {'to READY=1':<24}{'to first answer':<24}"
            "first reply",
        ]
    for row in results.get("startup", []):
        ready, first = row["ready_s"], row["first_answer_s"]
        lines.append(
            f"{row['backend']:<11}{row['store']:<17}{row['cached']:>8,}  "
            f"{ready['median']:6.3f} [{ready['min']:.3f}-{ready['max']:.3f}]    "
            f"{first['median']:6.3f} [{first['min']:.3f}-{first['max']:.3f}]    "
            f"{row['first_reply'][:28]}"
        )
    for backend, doc in results.get("outages", {}).items():
        ref, out = doc["reference"], doc["outage"]
        lines += [
            "",
            f"Outage, {backend}: {ref['lookups']:,} lookups over {results['connections']} connections "
            f"with the store up, then {out['lookups']:,} with it cut ({out['outage_s']:.1f} s)",
        ]
        for phase, doc_phase in (("store up", ref), ("store cut", out)):
            lines.append(
                f"  {phase:<10}{'all':<17}{doc_phase['lookups']:>7,}  p50 {doc_phase['p50_ms']:8.3f} ms  "
                f"p99 {doc_phase['p99_ms']:8.3f} ms  {doc_phase['lookups_per_s']:,.0f} lookups/s"
            )
            for name, c in doc_phase["by_class"].items():
                lines.append(
                    f"  {'':<10}{name:<17}{c['lookups']:>7,}  p50 {c['p50_ms']:8.3f} ms  "
                    f"p99 {c['p99_ms']:8.3f} ms  answers {c['answers']}"
                )
        back = out["back_after_restore_s"]
        others = len(out["log_lines"]) - out["store_lines"]
        lines.append(
            f"  log from the cut on: {out['store_lines']} lines about the store ({out['down_lines']} "
            f"unavailable, {out['back_lines']} back, "
            f"{'never' if back is None else f'{back:.1f} s after the restore'}), "
            f"{others} others (the lookups' own):"
        )
        lines += [f"    {line}" for line in out["log_lines"] if f"{backend} store" in line]
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help=f"runs of each configuration (default {DEFAULT_RUNS})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs of each configuration")
    parser.add_argument("--cached", type=int, default=DEFAULT_CACHED, help="policies in the cached runs")
    parser.add_argument("--lookups", type=int, default=DEFAULT_LOOKUPS, help="lookups during the outage")
    parser.add_argument("--connections", type=int, default=loadgen.DEFAULT_CONNECTIONS)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of: %(default)s")
    parser.add_argument(
        "--open-deadline", type=float, help="[cache] open_deadline of the daemons (default: theirs, 5 s)"
    )
    parser.add_argument("--no-startup", action="store_true", help="only the outage")
    parser.add_argument("--no-outage", action="store_true", help="only the start-up")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else DEFAULT_RUNS
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    if args.cached < 1 or args.runs < 1 or args.lookups < 1:
        parser.error("--cached, --runs and --lookups must be at least 1")
    return args


def available_backends(wanted: Sequence[str]) -> list[str]:
    """``wanted`` less the shared stores whose server does not answer (said once each)."""
    found = []
    for backend in wanted:
        address = {"redis": REDIS_ADDRESS, "postgresql": POSTGRESQL_ADDRESS}.get(backend)
        if address is not None and not reachable(address):
            log(f"{backend}: nothing listens on {address[0]}:{address[1]}; skipped")
            continue
        found.append(backend)
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    os.makedirs(RESULTS, exist_ok=True)
    backends = available_backends(args.backends)
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "runs": args.runs,
        "cached": args.cached,
        "connections": args.connections,
        "load_average_before": os.getloadavg(),
    }
    world = World(
        max(WORLD_POLICIES, 2 * new_domains(args.lookups)),
        free_port(),
        free_port(),
        os.path.join(RESULTS, "startup-world.log"),
    )
    loop = LoopThread()
    ctx = Context(world, loop, args)
    try:
        if not args.no_startup:
            results["startup"] = run_startup(ctx, backends)
        if not args.no_outage:
            results["outages"] = {b: run_outage(ctx, b) for b in backends if b in SHARED}
    finally:
        loop.stop()
        world.stop()
    results["load_average_after"] = os.getloadavg()
    results["total_seconds"] = round(time.monotonic() - started, 1)
    path = os.path.join(RESULTS, f"startup-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(report(results))
    print(f"\nfull figures: {os.path.relpath(path, ROOT)}; run took {results['total_seconds']:g}s")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
