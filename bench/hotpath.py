"""CPU cost of one warm hit inside the daemon, without sockets or the reactor loop.

Starts the real daemon in this process on a cache of COUNT policies (made by
fill_cache.py), takes the protocol its socketmap listener builds, gives it an
in-memory transport and feeds it requests one at a time, as Postfix would.
The same is done with a bare Twisted NetstringReceiver answering a constant
(the floor). Prints microseconds per request for both, and with ``--profile``
the functions that dominate ours (cProfile).

    python bench/hotpath.py [--count 10000] [--requests 200000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

import inprocess  # noqa: E402
from fill_cache import cached_domain  # noqa: E402
from floor import REPLY  # noqa: E402
from loadgen import encode  # noqa: E402

#: Seconds to wait for the daemon's front to hold every cached policy.
WARM_LIMIT = 60.0


async def _sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.defer import Deferred

    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


class MemoryTransport:
    """Just enough of ITransport for a protocol answering requests."""

    disconnecting = False

    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += 1

    def writeSequence(self, data: list[bytes]) -> None:
        self.written += 1

    def loseConnection(self) -> None:
        self.closed = True

    abortConnection = loseConnection

    def getPeer(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 40000)

    getHost = getPeer

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def per_request(protocol: Any, requests: list[bytes], count: int, profile: cProfile.Profile | None) -> float:
    """Microseconds per request fed to ``protocol`` (best of three runs)."""
    feed = protocol.dataReceived
    n = len(requests)
    best = float("inf")
    for _ in range(3):
        if profile is not None:
            profile.enable()
        started = time.perf_counter()
        for i in range(count):
            feed(requests[i % n])
        elapsed = time.perf_counter() - started
        if profile is not None:
            profile.disable()
        best = min(best, elapsed)
    written = protocol.transport.written
    if protocol.transport.closed:
        raise RuntimeError("the protocol closed the connection")
    if written < 3 * count:
        raise RuntimeError(f"only {written} of {3 * count} requests were answered at once")
    return 1e6 * best / count


async def measure(reactor: Any, args: argparse.Namespace, work: str) -> dict[str, Any]:
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import NetstringReceiver

    from postfix_mtasts.config import parse_config
    from postfix_mtasts.service import Daemon

    cache = os.path.join(work, "cache.sqlite3")
    subprocess.run([sys.executable, os.path.join(BENCH, "fill_cache.py"), cache, str(args.count)], check=True)
    config = parse_config(
        f'[listen]\nsocketmap = ["inet:127.0.0.1:{args.port}"]\n'
        f'[cache]\npath = "{cache}"\n[control]\nsocket = "{work}/control.sock"\n[log]\nlevel = "warning"\n',
        source="<hotpath>",
    )
    daemon = Daemon(reactor, config)
    await daemon.start()
    try:
        # The front may warm in the background after the listeners are up.
        lookup: Any = daemon.lookup
        waited = 0.0
        while len(lookup.front) < args.count and waited < WARM_LIMIT:
            await _sleep(reactor, 0.05)
            waited += 0.05
        factory = daemon.ports[0][1].factory  # type: ignore[attr-defined]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(MemoryTransport())
        keys = [cached_domain(i).encode() for i in range(min(args.count, 1000))]
        requests = [encode(key) for key in keys]
        profile = cProfile.Profile() if args.profile else None
        ours = per_request(protocol, requests, args.requests, profile)

        class Constant(NetstringReceiver):
            def stringReceived(self, string: bytes) -> None:
                self.sendString(REPLY)  # type: ignore[no-untyped-call]

        floor: Any = Factory.forProtocol(Constant).buildProtocol(None)
        floor.makeConnection(MemoryTransport())
        floor_us = per_request(floor, requests, args.requests, None)
        out: dict[str, Any] = {
            "ours_us_per_request": round(ours, 2),
            "floor_us_per_request": round(floor_us, 2),
        }
        if profile is not None:
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("tottime").print_stats(15)
            out["profile"] = text.getvalue()
        from twisted.internet.main import CONNECTION_DONE
        from twisted.python.failure import Failure

        protocol.connectionLost(Failure(CONNECTION_DONE))  # type: ignore[no-untyped-call]
        return out
    finally:
        await daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="cached policies")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--port", type=int, default=18462)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mtasts-hotpath-")
    outcome, failure = inprocess.run("asyncio", lambda reactor: measure(reactor, args, work))
    subprocess.run(["rm", "-rf", work], check=False)
    if failure is not None:
        print(f"hotpath: {failure.getTraceback()}", file=sys.stderr)
        return 1
    profile = outcome.pop("profile", None)
    print(json.dumps(outcome))
    if profile:
        print(profile)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Never wait for a worker thread a failed daemon stop may have left behind.
    os._exit(code)
