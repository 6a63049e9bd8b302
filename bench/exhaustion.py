"""The daemon out of file descriptors: what it costs while it lasts, and the log.

Starts ``postfix-mtasts serve`` (memory cache, one socketmap listener, no
network needed: the requests are IP-literal next hops, answered without DNS),
lowers its RLIMIT_NOFILE with prlimit to what it holds plus a few, opens more
idle connections than fit and keeps them open for ``--seconds``: the daemon's
CPU use meanwhile, whether a connection opened before is still answered, the
log lines about it, and how long after the idle connections close a new
connection is answered again. Run it against any checkout::

    .venv/bin/python bench/exhaustion.py [--root CHECKOUT] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402

import bench  # noqa: E402

PORT = 18470
#: Descriptors left to the daemon beyond those it holds once started.
SPARE = 8
#: Idle connections opened while it is limited: far more than SPARE.
IDLE = 200
#: An IP-literal next hop: answered at once, without DNS.
KEY = b"[192.0.2.1]"
#: Bound on waiting for the daemon to answer again.
RECOVERY_LIMIT = 30.0


def ask(port: int, timeout: float = 5.0) -> str:
    return bench.query_once(port, KEY, timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=bench.ROOT, help="the checkout whose daemon runs")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    loadgen.raise_descriptor_limit(IDLE + 10)
    work = tempfile.mkdtemp(prefix="mtasts-exhaustion-")
    config = os.path.join(work, "daemon.toml")
    with open(config, "w") as f:
        f.write(
            f'[listen]\nsocketmap = ["inet:127.0.0.1:{PORT}"]\n[cache]\nbackend = "memory"\n'
            f'[control]\nsocket = "{work}/control.sock"\n'
        )
    log_path = os.path.join(work, "daemon.log")
    process = subprocess.Popen(
        [bench.VENV_PYTHON, "-m", "postfix_mtasts.cli", "serve", "--config", config],
        cwd=args.root,
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "w"),
    )
    idle: list[socket.socket] = []
    try:
        bench.wait_listening(PORT, process)
        keeper = socket.create_connection(("127.0.0.1", PORT))
        keeper.sendall(loadgen.encode(KEY))
        keeper.recv(4096)
        limit = len(os.listdir(f"/proc/{process.pid}/fd")) + SPARE
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (limit, limit))
        cpu_before = bench.cpu_seconds(process.pid)
        started = time.monotonic()
        for _ in range(IDLE):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", PORT))
            idle.append(sock)
        time.sleep(args.seconds)
        cpu = bench.cpu_seconds(process.pid) - cpu_before
        elapsed = time.monotonic() - started
        keeper.sendall(loadgen.encode(KEY))
        keeper.settimeout(5.0)
        keeper_answered = bool(keeper.recv(4096))
        for sock in idle:
            sock.close()
        idle.clear()
        closed = time.monotonic()
        recovered: float | None = None
        while time.monotonic() - closed < RECOVERY_LIMIT:
            try:
                ask(PORT)
                recovered = time.monotonic() - closed
                break
            except (OSError, RuntimeError):
                time.sleep(0.01)
        time.sleep(6.0)  # long enough for a burst to be declared over
        keeper.close()
    finally:
        for sock in idle:
            sock.close()
        bench.stop_process(process)
    with open(log_path) as f:
        lines = [line.rstrip() for line in f if "descriptor" in line or "accept" in line.lower()]
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "root": args.root,
        "descriptor_limit": limit,
        "idle_connections": IDLE,
        "seconds_exhausted": round(elapsed, 2),
        "daemon_cpu_percent_while_exhausted": round(100 * cpu / elapsed, 1),
        "open_connection_answered_meanwhile": keeper_answered,
        "answered_again_after_s": None if recovered is None else round(recovered, 3),
        "log_lines": lines,
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
