"""Reproducible benchmark of postfix-mtasts, side by side with its peer.

One command (as root, for the network namespace)::

    bench/run.sh            # full run, about 5 minutes
    bench/run.sh --quick    # under 2 minutes

Everything runs inside a private network namespace whose resolv.conf points
at the loopback world (see bench/README.rst): the world (unbound + an HTTPS
policy host), the daemon under test, the peer ``postfix-mta-sts-resolver``
and the closed-loop load generator. A table goes to stdout and the full
figures to ``bench/results/bench-<time>.json``. Nothing here asserts a target:
the table reports each figure next to the target it is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402
import world as world_module  # noqa: E402
from fill_cache import cached_domain  # noqa: E402

NETNS = "mtasts-bench"
RESULTS = os.path.join(BENCH, "results")
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
PEER_VENV = os.path.join(BENCH, ".peer-venv")
PEER_VERSION = "1.5.1"
#: The daemon under test gets CPU 0, the load generator CPU 1.
SERVER_CPU = 0
CLIENT_CPU = 1
#: The peer keeps its default port; ours and the floors take the next ones.
PEER_PORT = 8461
DAEMON_PORT = 8462
FLOOR_PORT = 8463
FLOOR_EPOLL_PORT = 8464
FLOOR_EAGER_PORT = 8465
FLOOR_RAW_PORT = 8466
TRIVIAL_PORT = 8499
#: Seconds a daemon may take to accept connections before the run gives up.
READY_LIMIT = 120.0
#: Seconds bench/hotpath.py and bench/coldpath.py may take.
HOTPATH_LIMIT = 120.0
COLDPATH_LIMIT = 300.0
#: What the daemon logs once its in-memory front holds the whole cache.
WARM_LINE = "entries loaded into memory"
#: Seconds the RSS is left to settle after the first answer.
SETTLE = 0.5


# --- small helpers -----------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pin(pid: int, cpu: int | None) -> None:
    if cpu is not None and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu})


def rss_kib(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                values[name] = int(value.split()[0])
    return values


def wait_listening(port: int, process: subprocess.Popen[Any], limit: float = READY_LIMIT) -> float:
    """Seconds until ``port`` accepts a connection; fails if the process exits."""
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return time.monotonic() - started
        except OSError:
            if time.monotonic() - started > limit:
                raise RuntimeError(f"nothing listens on port {port} after {limit:g}s") from None
            time.sleep(0.002)


def wait_for_line(path: str, text: str, process: subprocess.Popen[Any], limit: float = READY_LIMIT) -> float:
    """time.monotonic() when ``text`` first shows in the log at ``path``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            if text in f.read():
                return time.monotonic()
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        time.sleep(0.01)
    raise RuntimeError(f"no {text!r} in {path} after {limit:g}s")


def query_once(port: int, key: bytes, timeout: float = 30.0) -> str:
    """One socketmap lookup on a fresh connection; returns the reply payload."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(loadgen.encode(key))
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed without a reply")
            data += chunk
            colon = data.find(b":")
            if colon > 0 and len(data) >= colon + 1 + int(data[:colon]) + 1:
                return data[colon + 1 : colon + 1 + int(data[:colon])].decode()


def stop_process(process: subprocess.Popen[Any], grace: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class World:
    """The world process (bench/world.py), driven over its stdin/stdout."""

    def __init__(
        self,
        policies: int,
        dns_port: int,
        https_port: int,
        log_path: str,
        max_age: int = world_module.DEFAULT_MAX_AGE,
    ) -> None:
        self.process = subprocess.Popen(
            [
                VENV_PYTHON,
                os.path.join(BENCH, "world.py"),
                "--policies",
                str(policies),
                "--dns-port",
                str(dns_port),
                "--https-port",
                str(https_port),
                "--max-age",
                str(max_age),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log_path, "w"),
            text=True,
        )
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(self.process.pid, set(range(os.cpu_count() or 1)))
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"world did not start: {ready}")
        self.ca_file: str = ready["ca_file"]
        self.https_port: int = ready["https_port"]
        self.dns_port: int = ready["dns_port"]

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("world exited; see its log in bench/results")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def dns_queries(self) -> int:
        return int(self.ask("stats")["dns_queries"])

    def fetches(self) -> Counter[str]:
        return Counter(self.ask("stats")["fetches"])

    def stop(self) -> None:
        try:
            self.ask("quit")
        except (BrokenPipeError, RuntimeError, json.JSONDecodeError):
            pass
        stop_process(self.process)


# --- the daemons -------------------------------------------------------------


def ours_config(path: str, world: World, cache_path: str, extra_cache: str = "") -> str:
    """Defaults everywhere except what points the daemon at the world. In the
    namespace the world's resolver is the one resolv.conf names, so the daemon
    finds it as the peer does, with no nameservers configured."""
    nameservers = "" if world.dns_port == 53 else f'nameservers = ["127.0.0.1:{world.dns_port}"]\n'
    text = (
        "[listen]\n"
        f'socketmap = ["inet:127.0.0.1:{DAEMON_PORT}"]\n'
        "[cache]\n"
        'backend = "sqlite"\n'
        f'path = "{cache_path}"\n'
        f"{extra_cache}"
        "[resolver]\n"
        f"{nameservers}"
        f'ca_file = "{world.ca_file}"\n'
        f"https_port = {world.https_port}\n"
    )
    with open(path, "w") as f:
        f.write(text)
    return path


def start_ours(config_path: str, log_path: str) -> subprocess.Popen[Any]:
    process = subprocess.Popen(
        [VENV_PYTHON, "-m", "postfix_mtasts.cli", "serve", "--config", config_path],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "w"),
    )
    pin(process.pid, SERVER_CPU)
    return process


def start_peer(work: str, world: World, log_path: str) -> subprocess.Popen[Any]:
    """The peer with its defaults: an empty config file; DNS from the namespace's resolv.conf."""
    config = os.path.join(work, "mta-sts-daemon.yml")
    with open(config, "w") as f:
        f.write("# defaults\n")
    env = dict(os.environ, SSL_CERT_FILE=world.ca_file, PYTHONWARNINGS="ignore::DeprecationWarning")
    process = subprocess.Popen(
        [os.path.join(PEER_VENV, "bin", "mta-sts-daemon"), "-c", config],
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "w"),
        env=env,
        cwd=work,
    )
    pin(process.pid, SERVER_CPU)
    return process


def start_floor(
    reactor_name: str, port: int, log_path: str, backlog: int | None = None
) -> subprocess.Popen[Any]:
    extra = [] if backlog is None else [str(backlog)]
    process = subprocess.Popen(
        [VENV_PYTHON, os.path.join(BENCH, "floor.py"), str(port), reactor_name, *extra],
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "w"),
    )
    pin(process.pid, SERVER_CPU)
    return process


# --- phases ------------------------------------------------------------------


def keyset(domains: Sequence[str]) -> list[bytes]:
    return [d.encode("ascii") for d in domains]


def mix_keys(policy: Sequence[bytes], plain: Sequence[bytes]) -> list[bytes]:
    """20% policy domains, 80% domains without MTA-STS, interleaved 1:4."""
    keys: list[bytes] = []
    for block in range(max(len(policy), len(plain) // 4)):
        keys.append(policy[block % len(policy)])
        keys.extend(plain[(block * 4 + i) % len(plain)] for i in range(4))
    return keys


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target:
    """One server under load: a daemon, the peer or a floor."""

    def __init__(self, name: str, port: int, process: subprocess.Popen[Any]) -> None:
        self.name = name
        self.port = port
        self.process = process
        #: Per phase name: the runs of that phase (one per round).
        self.runs: dict[str, list[tuple[loadgen.PhaseResult, int, float]]] = {}
        self.single: dict[str, dict[str, Any]] = {}

    def measure(
        self,
        world: World,
        label: str,
        keys: Sequence[bytes],
        connections: int,
        *,
        seconds: float | None = None,
        total: int | None = None,
    ) -> tuple[loadgen.PhaseResult, int, float]:
        before_q, before_cpu = world.dns_queries(), cpu_seconds(self.process.pid)
        result = loadgen.run_closed_loop(
            self.port, keys, connections=connections, seconds=seconds, total=total
        )
        queries = world.dns_queries() - before_q
        cpu = cpu_seconds(self.process.pid) - before_cpu
        log(
            f"  {self.name} {label}: {result.lookups_per_s:,.0f} lookups/s, p50 {result.p50_ms} ms, "
            f"p99 {result.p99_ms} ms, {queries} DNS queries, server CPU {100 * cpu / result.seconds:.0f}%, "
            f"{result.statuses}"
        )
        return result, queries, cpu

    def record(self, label: str, run: tuple[loadgen.PhaseResult, int, float]) -> None:
        self.runs.setdefault(label, []).append(run)

    def phases(self) -> dict[str, Any]:
        """Every phase, its rounds taken together (throughput = all lookups / all seconds)."""
        out: dict[str, Any] = dict(self.single)
        for label, runs in self.runs.items():
            latencies = [ns for result, _, _ in runs for ns in result.latencies_ns]
            seconds = sum(result.seconds for result, _, _ in runs)
            statuses: Counter[str] = Counter()
            for result, _, _ in runs:
                statuses.update(result.statuses)
            merged = loadgen.summarise(latencies, seconds, dict(statuses), runs[0][0].connections)
            out[label] = describe(merged, sum(q for _, q, _ in runs), sum(c for _, _, c in runs))
            out[label]["rounds_lookups_per_s"] = [result.lookups_per_s for result, _, _ in runs]
        return out


def describe(result: loadgen.PhaseResult, queries: int, cpu: float) -> dict[str, Any]:
    doc = result.as_dict()
    doc["dns_queries"] = queries
    doc["dns_queries_per_1000_lookups"] = (
        round(1000 * queries / result.lookups, 1) if result.lookups else None
    )
    doc["server_cpu_percent"] = round(100 * cpu / result.seconds, 1) if result.seconds else None
    # Lookups per second of the server's own CPU time: what other load on the
    # machine disturbs least, so the fairest comparison on a shared machine.
    doc["lookups_per_cpu_s"] = round(result.lookups / cpu) if cpu > 0 else None
    return doc


def fetch_stats(world: World, domains: Sequence[str]) -> dict[str, Any]:
    fetches = world.fetches()
    hosts = {f"mta-sts.{d}" for d in domains}
    per_domain = [fetches.get(f"mta-sts.{d}", 0) for d in domains]
    return {
        "fetches": sum(per_domain),
        "fetches_per_domain": round(sum(per_domain) / len(domains), 3),
        "min_per_domain": min(per_domain),
        "max_per_domain": max(per_domain),
        "domains_fetched_exactly_once": sum(1 for n in per_domain if n == 1),
        "fetches_of_other_hosts": sum(n for host, n in fetches.items() if host not in hosts),
    }


def first_lookups(target: Target, world: World, args: argparse.Namespace) -> None:
    """Cold fill of the policy domains, then the first lookup of each domain without MTA-STS."""
    policy_domains = [world_module.policy_domain(i) for i in range(args.policies)]
    plain = keyset([world_module.plain_domain(i) for i in range(args.plain)])
    world.ask("reset")
    log(f"{target.name}: cold fill of {len(policy_domains)} policy domains")
    result, queries, cpu = target.measure(
        world, "cold fill", keyset(policy_domains), args.connections, total=len(policy_domains)
    )
    fill = describe(result, queries, cpu)
    fill.update(fetch_stats(world, policy_domains))
    fill["dns_queries_per_domain"] = round(queries / len(policy_domains), 2)
    target.single["cold_fill"] = fill
    log(
        f"  fetches per domain {fill['fetches_per_domain']} (min {fill['min_per_domain']}, "
        f"max {fill['max_per_domain']})"
    )
    result, queries, cpu = target.measure(
        world, "no MTA-STS, first lookups", plain, args.connections, total=len(plain)
    )
    target.single["no_mta_sts_first"] = describe(result, queries, cpu)
    world.ask("reset")


def rounds(targets: list[Target], daemons: list[Target], world: World, args: argparse.Namespace) -> None:
    """The timed phases, in rounds that alternate between the servers so that
    load from elsewhere on the machine hits them all alike."""
    policy = keyset([world_module.policy_domain(i) for i in range(args.policies)])
    plain = keyset([world_module.plain_domain(i) for i in range(args.plain)])
    mix = mix_keys(policy, plain)
    slice_seconds = args.seconds / args.rounds
    for number in range(1, args.rounds + 1):
        log(f"round {number}/{args.rounds}")
        for target in targets:
            target.record(
                "warm_hits",
                target.measure(world, "warm hits", policy, args.connections, seconds=slice_seconds),
            )
        for target in daemons:
            target.record(
                "no_mta_sts",
                target.measure(world, "no MTA-STS", plain, args.connections, seconds=slice_seconds),
            )
            target.record(
                "mix_20_80", target.measure(world, "mix 20/80", mix, args.connections, seconds=slice_seconds)
            )


def run_servers(world: World, work: str, args: argparse.Namespace) -> dict[str, Any]:
    """Ours, the peer and the two floors, all up at once on their own ports."""
    processes: list[subprocess.Popen[Any]] = []
    try:
        config = ours_config(os.path.join(work, "ours.toml"), world, os.path.join(work, "ours-cache.sqlite3"))
        ours = Target("postfix-mtasts", DAEMON_PORT, start_ours(config, os.path.join(RESULTS, "ours.log")))
        processes.append(ours.process)
        daemons = [ours]
        peer_state: dict[str, Any]
        if not args.netns or args.no_peer:
            peer_state = {
                "skipped": "--no-peer given"
                if args.no_peer
                else "no network namespace: the peer reads /etc/resolv.conf and fetches on port 443"
            }
        elif not os.path.exists(os.path.join(PEER_VENV, "bin", "mta-sts-daemon")):
            peer_state = {"skipped": f"{PEER_VENV} has no mta-sts-daemon (bench/run.sh installs it)"}
        else:
            peer = Target(
                f"peer {PEER_VERSION}", PEER_PORT, start_peer(work, world, os.path.join(RESULTS, "peer.log"))
            )
            processes.append(peer.process)
            daemons.append(peer)
            peer_state = {}
        floors = []
        for reactor_name, port in (
            ("asyncio", FLOOR_PORT),
            ("epoll", FLOOR_EPOLL_PORT),
            ("epoll-eager", FLOOR_EAGER_PORT),
            ("epoll-raw", FLOOR_RAW_PORT),
        ):
            process = start_floor(reactor_name, port, os.path.join(RESULTS, f"floor-{reactor_name}.log"))
            processes.append(process)
            floors.append(Target(reactor_name, port, process))
        for target in daemons + floors:
            wait_listening(target.port, target.process)
        for target in daemons:
            first_lookups(target, world, args)
        rounds(daemons + floors, daemons, world, args)
        if args.profile:
            ours.single["profile"] = profile_warm(ours, world, args)
        policy_domains = [world_module.policy_domain(i) for i in range(args.policies)]
        out: dict[str, Any] = {}
        for target in daemons:
            doc = target.phases()
            doc["rss_kib"] = rss_kib(target.process.pid)
            out[target.name] = doc
        out["ours"] = out.pop("postfix-mtasts")
        out["peer"] = out.pop(f"peer {PEER_VERSION}", peer_state)
        out["fetches_during_timed_phases"] = fetch_stats(world, policy_domains)
        out["floor"] = {floor.name: floor.phases()["warm_hits"] for floor in floors}
        return out
    finally:
        for process in processes:
            stop_process(process)


# --- memory and start-up -----------------------------------------------------


def fill_cache(path: str, count: int) -> float:
    started = time.monotonic()
    subprocess.run(
        [VENV_PYTHON, os.path.join(BENCH, "fill_cache.py"), path, str(count)], check=True, cwd=ROOT
    )
    return time.monotonic() - started


def start_and_first_answer(
    world: World, work: str, count: int, key: bytes, memory_entries: int
) -> dict[str, Any]:
    """Start the daemon on a cache of ``count`` entries; time to the first answer and RSS."""
    cache_path = os.path.join(work, f"cache-{count}.sqlite3")
    extra = f"memory_entries = {memory_entries}\n"
    config = ours_config(os.path.join(work, f"mem-{count}.toml"), world, cache_path, extra)
    started = time.monotonic()
    log_path = os.path.join(RESULTS, f"ours-mem-{count}.log")
    process = start_ours(config, log_path)
    try:
        listening = wait_listening(DAEMON_PORT, process)
        reply = query_once(DAEMON_PORT, key)
        first_answer = time.monotonic() - started
        warm = wait_for_line(log_path, WARM_LINE, process) - started
        time.sleep(SETTLE)
        rss = rss_kib(process.pid)
        return {
            "first_answer_s": round(first_answer, 3),
            "listening_s": round(listening, 3),
            "front_warm_s": round(warm, 3),
            "first_reply": reply,
            "rss_kib": rss["VmRSS"],
            "hwm_kib": rss["VmHWM"],
        }
    finally:
        stop_process(process)


def run_memory(world: World, work: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    memory_entries = max([*args.memory_sizes, 200_000])
    # Baseline: the same daemon, the same config, an empty cache file, one lookup answered.
    fill_cache(os.path.join(work, "cache-0.sqlite3"), 0)
    base = start_and_first_answer(world, work, 0, b"n000000.example", memory_entries)
    out["baseline"] = base
    log(
        f"memory baseline (empty cache): VmRSS {base['rss_kib']} KiB, first answer {base['first_answer_s']} s"
    )
    for count in args.memory_sizes:
        seconds = fill_cache(os.path.join(work, f"cache-{count}.sqlite3"), count)
        result = start_and_first_answer(world, work, count, cached_domain(0).encode(), memory_entries)
        result["fill_s"] = round(seconds, 1)
        result["bytes_per_policy"] = round((result["rss_kib"] - base["rss_kib"]) * 1024 / count, 1)
        result["memory_entries"] = memory_entries
        out[str(count)] = result
        os.unlink(os.path.join(work, f"cache-{count}.sqlite3"))
        log(
            f"memory {count:,} cached policies: VmRSS {result['rss_kib']} KiB "
            f"({result['bytes_per_policy']} B/policy over baseline), "
            f"first answer {result['first_answer_s']} s "
            f"({result['first_reply'][:40]}...)"
        )
    return out


# --- profiling ---------------------------------------------------------------


def py_spy() -> str | None:
    candidate = os.path.join(ROOT, ".venv", "bin", "py-spy")
    return candidate if os.path.exists(candidate) else shutil.which("py-spy")


def profile_warm(target: Target, world: World, args: argparse.Namespace) -> dict[str, Any]:
    """py-spy samples the daemon while the load generator replays warm hits."""
    tool = py_spy()
    if tool is None:
        return {"skipped": "py-spy not installed (.venv/bin/pip install py-spy)"}
    raw = os.path.join(RESULTS, "profile-warm.txt")
    seconds = max(3, int(args.seconds))
    sampler = subprocess.Popen(
        [
            tool,
            "record",
            "--pid",
            str(target.process.pid),
            "--duration",
            str(seconds),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            raw,
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    policy = keyset([world_module.policy_domain(i) for i in range(args.policies)])
    under = describe(
        *target.measure(world, "warm hits under py-spy", policy, args.connections, seconds=seconds)
    )
    _, err = sampler.communicate()
    if sampler.returncode != 0 or not os.path.exists(raw):
        return {"skipped": f"py-spy failed: {err.strip()[-300:]}"}
    return {"under_profiler": under, **summarise_stacks(raw)}


def summarise_stacks(raw_path: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = [frame for frame in stack.split(";") if not frame.startswith("process ")]
            if not frames:
                continue
            total += count
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(frame, round(100 * n / total, 1)) for frame, n in counter.most_common(top)]

    return {
        "samples": total,
        "self_percent": share(own),
        "inclusive_percent": share(inclusive),
        "raw": os.path.relpath(raw_path, ROOT),
    }


def profile_memory(work: str, count: int) -> dict[str, Any]:
    """tracemalloc over the daemon's start on ``count`` cached policies: bytes per entry by site."""
    cache_path = os.path.join(work, f"cache-trace-{count}.sqlite3")
    fill_cache(cache_path, count)
    out = subprocess.run(
        [VENV_PYTHON, os.path.join(BENCH, "memtrace.py"), cache_path, str(count)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    os.unlink(cache_path)
    doc: dict[str, Any] = json.loads(out)
    return doc


def hotpath(args: argparse.Namespace) -> dict[str, Any]:
    """bench/hotpath.py: microseconds of CPU per warm hit in-process, ours and the floor."""
    command = [
        VENV_PYTHON,
        os.path.join(BENCH, "hotpath.py"),
        "--requests",
        "30000" if args.quick else "100000",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=HOTPATH_LIMIT)
    except subprocess.TimeoutExpired:
        return {"skipped": f"bench/hotpath.py did not finish in {HOTPATH_LIMIT:g}s"}
    if done.returncode != 0:
        return {"skipped": done.stderr.strip()[-300:]}
    doc: dict[str, Any] = json.loads(done.stdout.splitlines()[0])
    return doc


def coldpath(world: World, args: argparse.Namespace) -> dict[str, Any]:
    """bench/coldpath.py: CPU per TXT query, address lookup and fetch in-process,
    against the world, on the servers' CPU."""
    command = [
        VENV_PYTHON,
        os.path.join(BENCH, "coldpath.py"),
        "--ca-file",
        world.ca_file,
        "--https-port",
        str(world.https_port),
        "--count",
        str(min(args.policies, 300 if args.quick else 1000)),
    ]
    if world.dns_port != 53:
        command += ["--nameserver", f"127.0.0.1:{world.dns_port}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    pin(process.pid, SERVER_CPU)
    try:
        out, err = process.communicate(timeout=COLDPATH_LIMIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"skipped": f"bench/coldpath.py did not finish in {COLDPATH_LIMIT:g}s"}
    if process.returncode != 0:
        return {"skipped": err.strip()[-300:]}
    doc: dict[str, Any] = json.loads(out.splitlines()[0])
    return doc


# --- the report ----------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def report(results: dict[str, Any]) -> str:
    ours = results.get("ours", {})
    peer = results.get("peer", {})
    floor = results.get("floor", {})
    have_peer = "cold_fill" in peer
    lines: list[str] = []
    m = results["machine"]
    lines.append(
        f"machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, {m['kernel']}; "
        f"commit {m['commit'][:12]}; {results['connections']} closed-loop connections; "
        f"{results['seconds']:g}s per timed phase"
    )
    ceiling = results.get("generator_ceiling", {})
    if ceiling:
        lines.append(
            f"load generator ceiling (vs. trivial epoll server): {ceiling['lookups_per_s']:,.0f} lookups/s"
        )
    if not have_peer:
        lines.append(f"peer: {peer.get('skipped', 'not run')}")
    lines.append("")
    header = f"{'phase / figure':44} {'postfix-mtasts':>16} {'peer ' + PEER_VERSION:>14} {'ratio':>8}  target"
    lines.append(header)
    lines.append("-" * len(header) + "-" * 30)

    def row(name: str, a: Any, b: Any, r: str, target: str) -> None:
        lines.append(f"{name:44} {a!s:>16} {b!s:>14} {r:>8}  {target}")

    def get(doc: dict[str, Any], ph: str, key: str) -> Any:
        return doc.get(ph, {}).get(key)

    def fmt_rate(v: Any) -> str:
        return "-" if v is None else f"{v:,.0f}"

    def lat(doc: dict[str, Any], ph: str) -> str:
        d = doc.get(ph)
        return "-" if not d else f"{d['p50_ms']:.2f}/{d['p99_ms']:.2f}/{d['p999_ms']:.2f}"

    f_ours, f_peer = get(ours, "cold_fill", "seconds"), get(peer, "cold_fill", "seconds")
    row(
        "cold fill, 1000 policy domains: seconds",
        f_ours,
        f_peer or "-",
        ratio(f_peer, f_ours) + "",
        f"<= peer: {verdict(None if not (f_ours and f_peer) else f_ours <= f_peer)}",
    )
    fpd_ours = get(ours, "cold_fill", "fetches_per_domain")
    exact = get(ours, "cold_fill", "min_per_domain") == 1 and get(ours, "cold_fill", "max_per_domain") == 1
    row(
        "  fetches per domain (min..max)",
        f"{fpd_ours} ({get(ours, 'cold_fill', 'min_per_domain')}.."
        f"{get(ours, 'cold_fill', 'max_per_domain')})",
        "-"
        if not have_peer
        else f"{get(peer, 'cold_fill', 'fetches_per_domain')} "
        f"({get(peer, 'cold_fill', 'min_per_domain')}..{get(peer, 'cold_fill', 'max_per_domain')})",
        "",
        f"exactly 1: {verdict(exact if ours else None)}",
    )
    row(
        "  DNS queries per domain",
        get(ours, "cold_fill", "dns_queries_per_domain"),
        get(peer, "cold_fill", "dns_queries_per_domain") or "-",
        "",
        "",
    )
    row("  latency p50/p99/p99.9 ms", lat(ours, "cold_fill"), lat(peer, "cold_fill"), "", "")

    def cpu_ms(doc: dict[str, Any]) -> str:
        per_cpu_s = get(doc, "cold_fill", "lookups_per_cpu_s")
        return "-" if not per_cpu_s else f"{1000 / per_cpu_s:.2f}"

    row("  server CPU per domain, ms", cpu_ms(ours), cpu_ms(peer), "", "")
    cold = results.get("coldpath", {})
    if "fetch" in cold:
        for part, label, note in (
            ("txt", "  in-process CPU, us: TXT query", "bench/coldpath.py (dnspython)"),
            ("addresses", "    policy host addresses", f"({cold['addresses_from']})"),
            ("fetch", "    policy fetch (TCP, TLS, HTTP, parse)", "(treq, pyOpenSSL)"),
            ("treq", "    plain treq.get of the same URL", "(for comparison)"),
        ):
            row(label, cold[part]["cpu_us"], "", "", note)
        # What resolving one new domain costs on its own (dnspython, getaddrinfo,
        # treq over pyOpenSSL), against the peer's whole lookup (socketmap, DNS,
        # fetch, cache): while this ratio is under 1x, no work on the rest of
        # the daemon (socketmap, lookup, cache) can bring the cold fill level.
        parts = sum(cold[part]["cpu_us"] for part in ("txt", "addresses", "fetch"))
        per_cpu_s = get(peer, "cold_fill", "lookups_per_cpu_s")
        peer_us = round(1e6 / per_cpu_s) if per_cpu_s else None
        row(
            "    TXT + addresses + fetch, us",
            parts,
            peer_us or "-",
            ratio(peer_us, parts),
            "(resolving alone vs the peer's whole lookup)",
        )

    w_ours, w_peer = get(ours, "warm_hits", "lookups_per_s"), get(peer, "warm_hits", "lookups_per_s")
    w_floor = floor.get("asyncio", {}).get("lookups_per_s")
    w_floor_epoll = floor.get("epoll", {}).get("lookups_per_s")
    row(
        "warm hits: lookups/s",
        fmt_rate(w_ours),
        fmt_rate(w_peer),
        ratio(w_ours, w_peer),
        f">= 1.5x peer: {verdict(None if not (w_ours and w_peer) else w_ours >= 1.5 * w_peer)}",
    )
    # postfix-mtasts runs on the epoll reactor with its default SQLite cache
    # (the asyncio reactor only with Redis or PostgreSQL): that is its floor.
    floor_met = None if not (w_ours and w_floor_epoll) else w_ours >= 0.8 * w_floor_epoll
    row(
        "  floor, bare Twisted (epoll reactor)",
        fmt_rate(w_floor_epoll),
        "",
        ratio(w_ours, w_floor_epoll),
        f">= 80% of floor: {verdict(floor_met)}",
    )
    row(
        "  floor, bare Twisted (asyncio reactor)",
        fmt_rate(w_floor),
        "",
        ratio(w_ours, w_floor),
        "(the reactor with Redis/PostgreSQL)",
    )
    w_floor_eager = floor.get("epoll-eager", {}).get("lookups_per_s")
    row(
        "  floor, bare Twisted sending at once (epoll)",
        fmt_rate(w_floor_eager),
        "",
        ratio(w_ours, w_floor_eager),
        "(for information: replies sent as ours are)",
    )
    row("  latency p50/p99/p99.9 ms", lat(ours, "warm_hits"), lat(peer, "warm_hits"), "", "")
    row(
        "  server CPU %",
        get(ours, "warm_hits", "server_cpu_percent"),
        get(peer, "warm_hits", "server_cpu_percent") or "-",
        "",
        "",
    )
    row("  floor server CPU % (epoll)", floor.get("epoll", {}).get("server_cpu_percent"), "", "", "")
    c_ours, c_peer = get(ours, "warm_hits", "lookups_per_cpu_s"), get(peer, "warm_hits", "lookups_per_cpu_s")
    c_floor = floor.get("asyncio", {}).get("lookups_per_cpu_s")
    row(
        "  lookups per server CPU-second",
        fmt_rate(c_ours),
        fmt_rate(c_peer),
        ratio(c_ours, c_peer),
        "(same targets, CPU-normalised)",
    )
    row("  floor (asyncio): lookups per CPU-second", fmt_rate(c_floor), "", ratio(c_ours, c_floor), "")
    row(
        "  floor (epoll): lookups per CPU-second",
        fmt_rate(floor.get("epoll", {}).get("lookups_per_cpu_s")),
        "",
        ratio(c_ours, floor.get("epoll", {}).get("lookups_per_cpu_s")),
        "",
    )
    c_eager = floor.get("epoll-eager", {}).get("lookups_per_cpu_s")
    row("  floor (sending at once): lookups per CPU-s", fmt_rate(c_eager), "", ratio(c_ours, c_eager), "")
    c_raw = floor.get("epoll-raw", {}).get("lookups_per_cpu_s")
    row("  floor (at once, no parsing): lookups per CPU-s", fmt_rate(c_raw), "", ratio(c_ours, c_raw), "")
    hot = results.get("hotpath", {})
    if "ours_us_per_request" in hot:
        row(
            "  in-process CPU per warm hit, us (floor)",
            f"{hot['ours_us_per_request']} ({hot['floor_us_per_request']})",
            "",
            "",
            "bench/hotpath.py",
        )
    row(
        "  DNS queries per 1000 lookups",
        get(ours, "warm_hits", "dns_queries_per_1000_lookups"),
        get(peer, "warm_hits", "dns_queries_per_1000_lookups") or "-",
        "",
        "",
    )

    for ph, name in (
        ("no_mta_sts", "no MTA-STS (after first lookup)"),
        ("mix_20_80", "mix 20% policy / 80% none"),
    ):
        a, b = get(ours, ph, "lookups_per_s"), get(peer, ph, "lookups_per_s")
        row(
            f"{name}: lookups/s",
            fmt_rate(a),
            fmt_rate(b),
            ratio(a, b),
            f">= 5x peer: {verdict(None if not (a and b) else a >= 5 * b)}",
        )
        ca, cb = get(ours, ph, "lookups_per_cpu_s"), get(peer, ph, "lookups_per_cpu_s")
        row("  lookups per server CPU-second", fmt_rate(ca), fmt_rate(cb), ratio(ca, cb), "")
        row(
            "  DNS queries per 1000 lookups",
            get(ours, ph, "dns_queries_per_1000_lookups"),
            get(peer, ph, "dns_queries_per_1000_lookups") if have_peer else "-",
            "",
            "",
        )
        row("  latency p50/p99/p99.9 ms", lat(ours, ph), lat(peer, ph), "", "")
    nf = ours.get("no_mta_sts_first")
    if nf:
        row(
            "no MTA-STS, first lookup of 1000: seconds",
            nf["seconds"],
            get(peer, "no_mta_sts_first", "seconds") or "-",
            "",
            "",
        )
    timed = results.get("fetches_during_timed_phases")
    if timed:
        row("policy fetches during the timed phases (all)", timed["fetches"], "", "", "")
    memory = results.get("memory", {})
    for key, doc in memory.items():
        if key == "baseline":
            continue
        count = int(key)
        target = ""
        if count == 100_000:
            target = f"<= 1024 B: {verdict(doc['bytes_per_policy'] <= 1024)}"
        row(f"resident bytes per cached policy at {count:,}", doc["bytes_per_policy"], "", "", target)
    if "100000" in memory:
        doc = memory["100000"]
        row(
            "start to first answer, 100k cached: s",
            doc["first_answer_s"],
            "",
            "",
            f"<= 1 s: {verdict(doc['first_answer_s'] <= 1.0)}",
        )
    for key, doc in memory.items():
        if key not in ("baseline", "100000"):
            row(f"  start to first answer, {int(key):,} cached: s", doc["first_answer_s"], "", "", "")
    if "baseline" in memory:
        row("  start to first answer, empty cache: s", memory["baseline"]["first_answer_s"], "", "", "")

    prof = ours.get("profile")
    if prof and "self_percent" in prof:
        lines.append("")
        lines.append(f"warm-hit profile (py-spy, {prof['samples']} samples; {prof['raw']}): top self time")
        for frame, pct in prof["self_percent"][:10]:
            lines.append(f"  {pct:5.1f}%  {frame}")
    elif prof:
        lines.append(f"warm-hit profile: {prof.get('skipped')}")
    mem_prof = results.get("memory_profile")
    if mem_prof:
        lines.append("")
        lines.append(
            f"memory per cached policy by allocation site (tracemalloc, {mem_prof['count']:,} entries,"
            f" {mem_prof['bytes_per_entry']} B/entry traced):"
        )
        for site, per in mem_prof["sites"][:10]:
            lines.append(f"  {per:7.1f} B  {site}")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": f"Linux {platform.release()}",
        "commit": commit or "?",
    }


def inside(args: argparse.Namespace) -> int:
    """The benchmark proper, already inside the network namespace (or on bare loopback)."""
    os.makedirs(RESULTS, exist_ok=True)
    pin(0, CLIENT_CPU)
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "quick": args.quick,
        "machine": machine(),
        "connections": args.connections,
        "seconds": args.seconds,
        "netns": args.netns,
    }
    log("load generator ceiling against a trivial server")
    results["generator_ceiling"] = loadgen.measure_ceiling(
        TRIVIAL_PORT, min(args.seconds, 5.0), args.connections, cpu=SERVER_CPU
    ).as_dict()
    log(f"  {results['generator_ceiling']['lookups_per_s']:,.0f} lookups/s")
    work = tempfile.mkdtemp(prefix="mtasts-bench-")
    dns_port, https_port = (53, 443) if args.netns else (15353, 18443)
    world = World(args.policies, dns_port, https_port, os.path.join(RESULTS, "world.log"))
    try:
        results.update(run_servers(world, work, args))
        results["memory"] = run_memory(world, work, args)
        log("in-process CPU per warm hit (bench/hotpath.py)")
        results["hotpath"] = hotpath(args)
        log("in-process CPU per part of a cold lookup (bench/coldpath.py)")
        results["coldpath"] = coldpath(world, args)
        if args.profile:
            log(f"memory profile (tracemalloc) at {args.memory_profile_count:,} entries")
            results["memory_profile"] = profile_memory(work, args.memory_profile_count)
    finally:
        world.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["total_seconds"] = round(time.monotonic() - started, 1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(RESULTS, f"bench-{stamp}{'-quick' if args.quick else ''}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(report(results))
    print(
        f"\nfull figures: {os.path.relpath(path, ROOT)}; logs: bench/results/*.log; "
        f"run took {results['total_seconds']:g}s"
    )
    return 0


def outside(
    args: argparse.Namespace,
    argv: list[str],
    *,
    script: str = __file__,
    netns: str = NETNS,
    run_inside: Callable[[argparse.Namespace], int] = lambda args: inside(args),
) -> int:
    """Make the network namespace ``netns``, run ``script --inside`` in it, and remove it again."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        log("not root (or no 'ip'): no network namespace; running on this loopback without the peer")
        args.netns = False
        return run_inside(args)
    subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    etc = f"/etc/netns/{netns}"
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "resolv.conf"), "w") as f:
            f.write("nameserver 127.0.0.1\n")
        command = ["ip", "netns", "exec", netns, VENV_PYTHON, os.path.abspath(script), "--inside", *argv]
        return subprocess.run(command).returncode
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="postfix-mtasts benchmark (see bench/README.rst)")
    parser.add_argument("--quick", action="store_true", help="short phases, no 1M memory point (< 2 minutes)")
    parser.add_argument("--seconds", type=float, help="length of each timed phase (default 10, quick 3)")
    parser.add_argument("--connections", type=int, default=loadgen.DEFAULT_CONNECTIONS)
    parser.add_argument("--rounds", type=int, default=3, help="rounds each timed phase is split into")
    parser.add_argument("--policies", type=int, default=1000, help="policy domains in the world")
    parser.add_argument("--plain", type=int, default=1000, help="domains without MTA-STS")
    parser.add_argument(
        "--memory-sizes",
        help="comma-separated cache sizes (default 10000,100000,1000000; quick 10000,100000)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip postfix-mta-sts-resolver")
    parser.add_argument("--profile", action="store_true", help="py-spy on warm hits, tracemalloc on memory")
    parser.add_argument("--memory-profile-count", type=int, default=100_000)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    sizes = args.memory_sizes or ("10000,100000" if args.quick else "10000,100000,1000000")
    args.memory_sizes = [int(s) for s in sizes.split(",") if s]
    args.netns = args.inside
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.inside:
        return inside(args)
    return outside(args, argv)


if __name__ == "__main__":
    sys.exit(main())
