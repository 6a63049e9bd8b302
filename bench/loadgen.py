"""Closed-loop socketmap load generator, shaped like Postfix's smtp processes.

Each of N connections sends its next request only when the reply to the
previous one has arrived. Written on raw non-blocking sockets and one epoll
loop (no asyncio, no codec objects) so that on a 2-core machine it is not the
bottleneck: ``python bench/loadgen.py ceiling`` measures it against a trivial
server in another process.

Run as a library (``run_closed_loop``) or from the command line::

    python bench/loadgen.py ceiling --seconds 5
    python bench/loadgen.py run --port 8461 --keys keys.txt --seconds 5
    python bench/loadgen.py storm --port 8461 --keys keys.txt --clients 1000

``storm`` is what Postfix does after ``postfix reload``: every smtp process
connects at once and sends one request; it reports how long each waited for
its first reply, counted from its own ``connect``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

#: Connections Postfix would typically hold open to a busy policy map.
DEFAULT_CONNECTIONS = 16
#: Socket map name sent with every request (the daemon's default profile).
MAP_NAME = b"postfix"
#: Seconds a phase waits for its last replies before calling the server hung.
DRAIN_LIMIT = 30.0
#: Read size for replies; a reply is at most a few hundred bytes.
RECV_SIZE = 65536
#: The constant the trivial server answers (the size of a typical policy answer).
TRIVIAL_REPLY = b"OK secure match=.mx.example.com:mx1.example.com servername=hostname"
#: Descriptors the generator keeps for itself (files, pipes, epoll) beyond one per connection.
SPARE_DESCRIPTORS = 64
#: Seconds a storm waits for its last first reply; longer than the SYN retries
#: a full backlog causes (1, 3, 7, 15 s), so those show as latency, not loss.
STORM_LIMIT = 60.0


def encode(key: bytes, name: bytes = MAP_NAME) -> bytes:
    """One socketmap request as Postfix writes it: a netstring of ``NAME key``."""
    payload = name + b" " + key
    return b"%d:%b," % (len(payload), payload)


@dataclass
class PhaseResult:
    """What one closed-loop run measured."""

    connections: int
    seconds: float
    lookups: int
    lookups_per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    #: Replies the least and the most served connection got: far apart when
    #: some connections wait behind others (None when rounds are pooled).
    fewest_per_connection: int | None = None
    most_per_connection: int | None = None
    #: Milliseconds until every connection had its first answer, when warmed up.
    warmup_ms: float | None = None
    #: Every latency in nanoseconds, sorted (left out of :meth:`as_dict`).
    latencies_ns: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, object]:
        doc = asdict(self)
        del doc["latencies_ns"]
        return doc


def summarise(
    latencies_ns: list[int],
    seconds: float,
    statuses: dict[str, int],
    connections: int,
    per_connection: Sequence[int] = (),
) -> PhaseResult:
    """Throughput and latency percentiles of one or more runs taken together."""
    latencies = sorted(latencies_ns)
    ms = 1e-6
    return PhaseResult(
        connections=connections,
        seconds=round(seconds, 3),
        lookups=len(latencies),
        lookups_per_s=round(len(latencies) / seconds, 1) if seconds else 0.0,
        p50_ms=round(percentile(latencies, 0.50) * ms, 3),
        p99_ms=round(percentile(latencies, 0.99) * ms, 3),
        p999_ms=round(percentile(latencies, 0.999) * ms, 3),
        max_ms=round((latencies[-1] if latencies else 0) * ms, 3),
        statuses=dict(statuses),
        fewest_per_connection=min(per_connection) if per_connection else None,
        most_per_connection=max(per_connection) if per_connection else None,
        latencies_ns=latencies,
    )


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of the sorted samples lie (nearest rank)."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def raise_descriptor_limit(sockets: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to hold ``sockets`` connections
    (as far as the hard limit allows); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = sockets + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raise RuntimeError(f"{sockets} connections need {wanted} descriptors; the hard limit is {hard}")
    return soft


def run_closed_loop(
    port: int,
    keys: Sequence[bytes],
    *,
    connections: int = DEFAULT_CONNECTIONS,
    seconds: float | None = None,
    total: int | None = None,
    host: str = "127.0.0.1",
    name: bytes = MAP_NAME,
    on_reply: Callable[[int, bytes, int], None] | None = None,
    warmup: bool = False,
) -> PhaseResult:
    """Ask ``keys`` in order (cycling) over ``connections`` closed-loop connections.

    Stops after ``seconds`` (requests in flight are still waited for) or after
    exactly ``total`` requests, whichever is given. Latency is measured from
    the write of a request to the arrival of its complete reply. ``on_reply``,
    if given, is called with each reply's key index, payload and latency (ns).
    With ``warmup``, every connection first gets one answer (the server has
    accepted them all) before the clock starts: the steady state of
    long-lived connections, as Postfix's are, without the connection storm.
    """
    if (seconds is None) == (total is None):
        raise ValueError("give exactly one of seconds or total")
    requests = [encode(key, name) for key in keys]
    if not requests:
        raise ValueError("no keys")
    count = len(requests)
    limit = total if total is not None else -1
    raise_descriptor_limit(connections)
    socks: list[socket.socket] = []
    for _ in range(connections):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        socks.append(sock)
    fds = {sock.fileno(): index for index, sock in enumerate(socks)}
    buffers = [b""] * connections
    sent_at = [0] * connections
    sent_key = [0] * connections
    latencies: list[int] = []
    record = latencies.append
    served = [0] * connections
    statuses: Counter[bytes] = Counter()
    poller = select.epoll()
    for sock in socks:
        poller.register(sock.fileno(), select.EPOLLIN)
    clock = time.perf_counter_ns
    warmup_ns = _answer_each_once(socks, poller, requests[0]) if warmup else None
    next_key = 0
    issued = 0
    in_flight = 0
    started = clock()
    deadline = started + int(seconds * 1e9) if seconds is not None else None
    stopping = False

    def send(index: int) -> None:
        nonlocal next_key, issued, in_flight
        request = requests[next_key]
        sent_key[index] = next_key
        next_key += 1
        if next_key == count:
            next_key = 0
        sent_at[index] = clock()
        socks[index].send(request)
        issued += 1
        in_flight += 1

    for index in range(connections):
        if limit >= 0 and issued >= limit:
            break
        send(index)
    drain_deadline: int | None = None
    try:
        while in_flight:
            events = poller.poll(1.0)
            now = clock()
            if not stopping and deadline is not None and now >= deadline:
                stopping = True
            if stopping and drain_deadline is None:
                drain_deadline = now + int(DRAIN_LIMIT * 1e9)
            if drain_deadline is not None and now > drain_deadline:
                raise RuntimeError(
                    f"{in_flight} replies still missing {DRAIN_LIMIT:g}s after the phase ended"
                )
            for fd, _ in events:
                index = fds[fd]
                data = socks[index].recv(RECV_SIZE)
                if not data:
                    raise RuntimeError("server closed a connection")
                buffer = buffers[index] + data
                # One request is outstanding per connection, so a complete
                # buffer holds exactly one netstring.
                colon = buffer.find(b":")
                if colon < 0:
                    buffers[index] = buffer
                    continue
                length = int(buffer[:colon])
                end = colon + 1 + length
                if len(buffer) < end + 1:
                    buffers[index] = buffer
                    continue
                record(now - sent_at[index])
                if on_reply is not None:
                    on_reply(sent_key[index], buffer[colon + 1 : end], now - sent_at[index])
                served[index] += 1
                space = buffer.find(b" ", colon + 1, end)
                statuses[buffer[colon + 1 : space if space >= 0 else end]] += 1
                buffers[index] = buffer[end + 1 :]
                in_flight -= 1
                if not stopping and (limit < 0 or issued < limit):
                    send(index)
    finally:
        poller.close()
        for sock in socks:
            sock.close()
    elapsed = (clock() - started) / 1e9
    named = {status.decode("ascii", "replace"): n for status, n in statuses.items()}
    result = summarise(latencies, elapsed, named, connections, served)
    if warmup_ns is not None:
        result.warmup_ms = round(warmup_ns * 1e-6, 3)
    return result


def _answer_each_once(socks: Sequence[socket.socket], poller: select.epoll, request: bytes) -> int:
    """Send ``request`` on every connection and wait for every reply; nanoseconds taken."""
    started = time.perf_counter_ns()
    index_of = {sock.fileno(): index for index, sock in enumerate(socks)}
    received = [b""] * len(socks)
    waiting = set(range(len(socks)))
    for sock in socks:
        sock.send(request)
    deadline = started + int(DRAIN_LIMIT * 1e9)
    while waiting:
        if time.perf_counter_ns() > deadline:
            raise RuntimeError(f"{len(waiting)} connections unanswered {DRAIN_LIMIT:g}s into the warm-up")
        for fd, _ in poller.poll(1.0):
            index = index_of[fd]
            data = socks[index].recv(RECV_SIZE)
            if not data:
                raise RuntimeError("server closed a connection during the warm-up")
            received[index] += data
            colon = received[index].find(b":")
            if colon > 0 and len(received[index]) >= colon + 2 + int(received[index][:colon]):
                waiting.discard(index)
    return time.perf_counter_ns() - started


def run_paced(
    port: int,
    keys: Sequence[bytes],
    *,
    connections: int,
    rate: float,
    seconds: float,
    reuse: int,
    host: str = "127.0.0.1",
    name: bytes = MAP_NAME,
) -> PhaseResult:
    """``rate`` requests a second in all over ``connections`` connections, for ``seconds``.

    The soak's load: each connection sends at most one request at a time and
    no sooner than its turn (every ``connections / rate`` seconds), asks
    ``keys`` in order, and is closed and opened again after ``reuse``
    requests, as Postfix's smtp processes come and go. Unlike
    :func:`run_closed_loop` it leaves the server idle between requests, so a
    long run costs little CPU.
    """
    if not keys:
        raise ValueError("no keys")
    raise_descriptor_limit(connections)
    requests = [encode(key, name) for key in keys]
    clock = time.perf_counter_ns
    interval = int(connections / rate * 1e9)
    poller = select.epoll()

    def connect() -> socket.socket:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
        return sock

    socks = [connect() for _ in range(connections)]
    fds = {sock.fileno(): index for index, sock in enumerate(socks)}
    started = clock()
    due = [started + interval * index // connections for index in range(connections)]
    sent_at = [0] * connections
    used = [0] * connections
    waiting = [False] * connections
    buffers = [b""] * connections
    latencies: list[int] = []
    statuses: Counter[bytes] = Counter()
    next_key = 0
    end = started + int(seconds * 1e9)
    try:
        while True:
            now = clock()
            if now >= end and not any(waiting):
                break
            if now < end:
                for index in range(connections):
                    if waiting[index] or due[index] > now:
                        continue
                    if used[index] >= reuse:
                        old = socks[index]
                        del fds[old.fileno()]
                        poller.unregister(old.fileno())
                        old.close()
                        socks[index] = connect()
                        fds[socks[index].fileno()] = index
                        used[index] = 0
                    sent_at[index] = clock()
                    socks[index].send(requests[next_key])
                    next_key = (next_key + 1) % len(requests)
                    used[index] += 1
                    waiting[index] = True
                    # A connection that fell behind takes its next turn, not every turn missed.
                    due[index] = max(due[index] + interval, now)
            if now > end + int(DRAIN_LIMIT * 1e9):
                missing = sum(waiting)
                raise RuntimeError(f"{missing} replies still missing {DRAIN_LIMIT:g}s after the phase ended")
            timeout = max(0.0, (min(due) - clock()) / 1e9) if now < end else 1.0
            for fd, _ in poller.poll(min(timeout, 1.0)):
                index = fds[fd]
                data = socks[index].recv(RECV_SIZE)
                if not data:
                    raise RuntimeError("server closed a connection")
                buffer = buffers[index] + data
                colon = buffer.find(b":")
                if colon < 0 or len(buffer) < colon + 2 + int(buffer[:colon]):
                    buffers[index] = buffer
                    continue
                latencies.append(clock() - sent_at[index])
                stop = colon + 1 + int(buffer[:colon])
                space = buffer.find(b" ", colon + 1, stop)
                statuses[buffer[colon + 1 : space if space >= 0 else stop]] += 1
                buffers[index] = b""
                waiting[index] = False
    finally:
        poller.close()
        for sock in socks:
            sock.close()
    elapsed = (clock() - started) / 1e9
    named = {status.decode("ascii", "replace"): n for status, n in statuses.items()}
    return summarise(latencies, elapsed, named, connections)


@dataclass
class StormResult:
    """What one connection storm measured: each client's wait for its first reply."""

    clients: int
    answered: int
    #: Clients that got an error or a close instead of a reply, by errno name.
    failed: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: Milliseconds the generator took to issue every connect (its own share of the figures).
    connect_spread_ms: float
    statuses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_storm(
    port: int,
    keys: Sequence[bytes],
    clients: int,
    *,
    host: str = "127.0.0.1",
    name: bytes = MAP_NAME,
    limit: float = STORM_LIMIT,
) -> StormResult:
    """``clients`` connections opened at once, each sending one request (``keys``
    in turn) as soon as it is connected and closing on its reply.

    Latency runs from the client's own non-blocking ``connect`` to its complete
    reply, so SYNs dropped by a full listen backlog show as the kernel's
    retransmission delays.
    """
    if not keys:
        raise ValueError("no keys")
    raise_descriptor_limit(clients)
    clock = time.perf_counter_ns
    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    request_of: dict[int, bytes] = {}
    started_at: dict[int, int] = {}
    buffers: dict[int, bytes] = {}
    latencies: list[int] = []
    failed: Counter[str] = Counter()
    statuses: Counter[bytes] = Counter()
    first_connect = clock()
    for index in range(clients):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = sock.fileno()
        started_at[fd] = clock()
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            failed[errno.errorcode.get(code, str(code))] += 1
            sock.close()
            continue
        socks[fd] = sock
        request_of[fd] = encode(keys[index % len(keys)], name)
        buffers[fd] = b""
        poller.register(fd, select.EPOLLOUT)
    spread = clock() - first_connect

    def finish(fd: int, why: str | None) -> None:
        poller.unregister(fd)
        socks.pop(fd).close()
        if why is not None:
            failed[why] += 1

    deadline = clock() + int(limit * 1e9)
    try:
        while socks:
            if clock() > deadline:
                failed["no reply in time"] += len(socks)
                break
            for fd, mask in poller.poll(1.0):
                sock = socks[fd]
                if mask & select.EPOLLOUT:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        finish(fd, errno.errorcode.get(code, str(code)))
                        continue
                    sock.send(request_of[fd])
                    poller.modify(fd, select.EPOLLIN)
                    continue
                try:
                    data = sock.recv(RECV_SIZE)
                except OSError as e:
                    finish(fd, errno.errorcode.get(e.errno or 0, str(e.errno)))
                    continue
                if not data:
                    finish(fd, "closed without a reply")
                    continue
                buffer = buffers[fd] + data
                buffers[fd] = buffer
                colon = buffer.find(b":")
                if colon < 0 or len(buffer) < colon + 2 + int(buffer[:colon]):
                    continue
                latencies.append(clock() - started_at[fd])
                end = colon + 1 + int(buffer[:colon])
                space = buffer.find(b" ", colon + 1, end)
                statuses[buffer[colon + 1 : space if space >= 0 else end]] += 1
                finish(fd, None)
    finally:
        poller.close()
        for sock in socks.values():
            sock.close()
    latencies.sort()
    ms = 1e-6
    return StormResult(
        clients=clients,
        answered=len(latencies),
        failed=dict(failed),
        p50_ms=round(percentile(latencies, 0.50) * ms, 3),
        p99_ms=round(percentile(latencies, 0.99) * ms, 3),
        max_ms=round((latencies[-1] if latencies else 0) * ms, 3),
        connect_spread_ms=round(spread * ms, 3),
        statuses={status.decode("ascii", "replace"): n for status, n in statuses.items()},
    )


def trivial_server(port: int, ready_fd: int | None = None) -> None:
    """Answer every socketmap request with a constant, as fast as plain Python can.

    Only the generator's ceiling is measured with it; it assumes one request
    at a time per connection, as the closed-loop client sends.
    """
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(256)
    listener.setblocking(False)
    reply = b"%d:%b," % (len(TRIVIAL_REPLY), TRIVIAL_REPLY)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                conn, _ = listener.accept()
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[conn.fileno()] = conn
                poller.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns[fd]
            data = conn.recv(RECV_SIZE)
            if not data:
                poller.unregister(fd)
                conns.pop(fd).close()
                continue
            if data.endswith(b","):
                conn.send(reply)


def measure_ceiling(port: int, seconds: float, connections: int, cpu: int | None = None) -> PhaseResult:
    """The generator against :func:`trivial_server` in a child process."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child never returns
        os.close(read_end)
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            trivial_server(port, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    os.read(read_end, 1)
    os.close(read_end)
    try:
        return run_closed_loop(port, [b"example.com"], connections=connections, seconds=seconds)
    finally:
        os.kill(child, 15)
        os.waitpid(child, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ceiling = sub.add_parser("ceiling", help="the generator against a trivial constant server")
    ceiling.add_argument("--port", type=int, default=18499)
    ceiling.add_argument("--seconds", type=float, default=5.0)
    ceiling.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS)
    run = sub.add_parser("run", help="one closed-loop phase against a running server")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--keys", required=True, help="file with one key per line")
    run.add_argument("--seconds", type=float, default=5.0)
    run.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS)
    storm = sub.add_parser("storm", help="clients connecting at once, one request each")
    storm.add_argument("--port", type=int, required=True)
    storm.add_argument("--keys", required=True, help="file with one key per line")
    storm.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args(argv)
    result: PhaseResult | StormResult
    if args.command == "ceiling":
        result = measure_ceiling(args.port, args.seconds, args.connections)
    elif args.command == "storm":
        with open(args.keys, "rb") as f:
            keys = [line.strip() for line in f if line.strip()]
        result = run_storm(args.port, keys, args.clients)
    else:
        with open(args.keys, "rb") as f:
            keys = [line.strip() for line in f if line.strip()]
        result = run_closed_loop(args.port, keys, connections=args.connections, seconds=args.seconds)
    json.dump(result.as_dict(), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
