"""Does any connection wait behind the others? Replies per connection in a closed loop.

Starts ``postfix-mtasts serve`` from a checkout (memory cache, one socketmap
listener; the requests are an IP-literal next hop, answered without DNS, so
no world is needed), pinned to CPU 0, and runs ``--connections`` closed-loop
connections against it for ``--seconds`` after one warm-up answer each. It
prints the latency percentiles, the replies the least, the median and the
most served connection got, how many connections got under 80% of the
median, and the slices of 100 ms whose slowest reply took over 150 ms (a
stall of everyone shows there; one connection behind the others shows in
the replies per connection)::

    .venv/bin/python bench/fairness.py [--root CHECKOUT] [--connections 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402

import bench  # noqa: E402

PORT = 18490
KEY = b"[192.0.2.1]"
#: Width of the time slices, and the slowest reply that marks a slice as a stall.
SLICE_NS = 100_000_000
STALL_MS = 150.0
#: A connection under this share of the median number of replies waited behind others.
BEHIND = 0.8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=bench.ROOT, help="the checkout whose daemon runs")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    bench.pin(0, bench.CLIENT_CPU)
    loadgen.raise_descriptor_limit(args.connections)
    work = tempfile.mkdtemp(prefix="mtasts-fairness-")
    config = os.path.join(work, "daemon.toml")
    with open(config, "w") as f:
        f.write(
            f'[listen]\nsocketmap = ["inet:127.0.0.1:{PORT}"]\n[cache]\nbackend = "memory"\n'
            f'[control]\nsocket = "{work}/control.sock"\n'
        )
    process = subprocess.Popen(
        [bench.VENV_PYTHON, "-m", "postfix_mtasts.cli", "serve", "--config", config],
        cwd=args.root,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(work, "daemon.log"), "w"),
    )
    bench.pin(process.pid, bench.SERVER_CPU)
    try:
        bench.wait_listening(PORT, process)
        samples = closed_loop(args.connections, args.seconds)
    finally:
        bench.stop_process(process)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summarise(samples, args), indent=2))
    return 0


def closed_loop(connections: int, seconds: float) -> list[tuple[int, int, int]]:
    """(sent at, latency, connection) of every reply, in nanoseconds from the start."""
    request = loadgen.encode(KEY)
    socks = [socket.create_connection(("127.0.0.1", PORT)) for _ in range(connections)]
    poller = select.epoll()
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
    index_of = {sock.fileno(): index for index, sock in enumerate(socks)}
    try:
        loadgen._answer_each_once(socks, poller, request)
        clock = time.perf_counter_ns
        started = clock()
        end = started + int(seconds * 1e9)
        sent = [0] * connections
        samples: list[tuple[int, int, int]] = []
        for index, sock in enumerate(socks):
            sent[index] = clock()
            sock.send(request)
        in_flight = connections
        while in_flight:
            for fd, _ in poller.poll(1.0):
                index = index_of[fd]
                socks[index].recv(loadgen.RECV_SIZE)  # one short reply per request
                now = clock()
                samples.append((sent[index] - started, now - sent[index], index))
                in_flight -= 1
                if now < end:
                    sent[index] = clock()
                    socks[index].send(request)
                    in_flight += 1
        return samples
    finally:
        poller.close()
        for sock in socks:
            sock.close()


def summarise(samples: list[tuple[int, int, int]], args: argparse.Namespace) -> dict[str, object]:
    latencies = sorted(latency for _, latency, _ in samples)
    per_connection = sorted(Counter(index for _, _, index in samples).values())
    median = per_connection[len(per_connection) // 2]
    slices: defaultdict[int, list[int]] = defaultdict(list)
    for sent_at, latency, _ in samples:
        slices[sent_at // SLICE_NS].append(latency)
    stalls = {
        f"{number * SLICE_NS / 1e9:.1f}s": round(max(values) / 1e6, 1)
        for number, values in sorted(slices.items())
        if max(values) / 1e6 > STALL_MS
    }
    ms = 1e-6
    return {
        "root": args.root,
        "connections": args.connections,
        "lookups_per_s": round(len(samples) / args.seconds),
        "p50_ms": round(loadgen.percentile(latencies, 0.5) * ms, 2),
        "p99_ms": round(loadgen.percentile(latencies, 0.99) * ms, 2),
        "p999_ms": round(loadgen.percentile(latencies, 0.999) * ms, 2),
        "replies_per_connection_least_median_most": [per_connection[0], median, per_connection[-1]],
        "connections_under_80_percent_of_median": sum(1 for n in per_connection if n < BEHIND * median),
        "slices_with_a_reply_over_150_ms": stalls,
    }


if __name__ == "__main__":
    sys.exit(main())
