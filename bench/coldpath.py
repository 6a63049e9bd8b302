"""CPU cost of each part of a cold lookup, in-process, against the benchmark's world.

Builds the daemon's own resolvers from a config like the benchmark's (the
world's CA and HTTPS port; nameservers only when given) and times, with 16
lookups at a time over the world's policy domains:

- ``txt``: ``DnsResolver.lookup_sts`` (dnspython, on the Twisted backend);
- ``addresses``: the policy host's addresses as a fetch gets them
  (getaddrinfo without nameservers, dnspython with);
- ``fetch``: ``HttpsPolicyFetcher.fetch`` (addresses, TCP, TLS, HTTP, parse);
- ``treq``: for comparison, a plain ``treq.get`` of the same URL through
  Twisted's stock Agent with the same trust root and no connection reuse.

Prints one JSON object: microseconds of CPU (user + system, all threads) and
of wall time per operation. Run by bench.py inside its network namespace;
by hand, give the world's CA file and port::

    python bench/coldpath.py --ca-file CA.pem --https-port 443 [--nameserver 127.0.0.1:53]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

import inprocess  # noqa: E402
import world as world_module  # noqa: E402

#: Operations in flight at once, as in the benchmark's cold fill.
CONCURRENCY = 16


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def timed(
    operation: Callable[[str], Awaitable[Any]], domains: list[str], check: Callable[[Any], bool]
) -> dict[str, float]:
    """CPU and wall microseconds per call of ``operation`` over ``domains``;
    fails if any result does not pass ``check`` (a timing of failures would mislead)."""
    from twisted.internet.defer import Deferred, gatherResults

    pending = iter(domains)
    bad: list[Any] = []

    async def worker() -> None:
        for domain in pending:
            result = await operation(domain)
            if not check(result):
                bad.append(result)

    cpu, wall = cpu_seconds(), time.monotonic()
    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(CONCURRENCY)])
    cpu, wall = cpu_seconds() - cpu, time.monotonic() - wall
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(domains)} failed, first: {bad[0]!r}")
    n = len(domains)
    return {"cpu_us": round(1e6 * cpu / n), "wall_us": round(1e6 * wall / n), "operations": n}


async def measure(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    import treq
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    from postfix_mtasts.config import parse_config
    from postfix_mtasts.resolver import FetchOK, TxtFound
    from postfix_mtasts.resolver.https import load_trust_root
    from postfix_mtasts.service import build_resolvers

    nameservers = f'nameservers = ["{args.nameserver}"]\n' if args.nameserver else ""
    config = parse_config(
        f'[resolver]\n{nameservers}ca_file = "{args.ca_file}"\nhttps_port = {args.https_port}\n',
        source="<coldpath>",
    )
    dns, fetcher = build_resolvers(reactor, config)
    addresses: Any = fetcher._addresses  # what a fetch resolves the policy host with
    domains = [world_module.policy_domain(i) for i in range(args.count)]
    policy = BrowserLikePolicyForHTTPS(trustRoot=load_trust_root(args.ca_file))  # type: ignore[no-untyped-call]
    port = "" if args.https_port == 443 else f":{args.https_port}"

    async def plain_treq(domain: str) -> bytes:
        pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
        agent = Agent(reactor, contextFactory=policy, pool=pool)  # type: ignore[no-untyped-call]
        response = await treq.get(f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt", agent=agent)
        body: bytes = await response.content()
        return body

    out: dict[str, Any] = {"addresses_from": "dnspython" if args.nameserver else "getaddrinfo"}
    for _ in range(args.rounds):
        for name, operation, check in (
            ("txt", dns.lookup_sts, lambda r: isinstance(r, TxtFound)),
            ("addresses", lambda d: addresses.addresses(f"mta-sts.{d}"), bool),
            ("fetch", fetcher.fetch, lambda r: isinstance(r, FetchOK)),
            ("treq", plain_treq, lambda r: r.startswith(b"version: STSv1")),
        ):
            figures = await timed(operation, domains, check)
            best = out.get(name)
            if best is None or figures["cpu_us"] < best["cpu_us"]:
                out[name] = figures
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--https-port", type=int, default=443)
    parser.add_argument("--nameserver", default="", help="host:port; default: the system's resolver")
    parser.add_argument("--count", type=int, default=1000, help="policy domains per operation")
    parser.add_argument("--rounds", type=int, default=2, help="the best round is kept")
    args = parser.parse_args()
    figures, failure = inprocess.run("epoll", lambda reactor: measure(reactor, args))
    if failure is not None:
        print(f"coldpath: {failure.getTraceback()}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
