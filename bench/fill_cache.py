"""Prepare a SQLite cache holding N fetched policies, through the store API.

The benchmark starts the real daemon on the file afterwards to measure its
resident memory per cached policy and its time to first answer. Every
policy differs (its own MX names, id and text), the worst case for memory.
``bench/startup.py`` also writes the same entries into a Redis key prefix or
a PostgreSQL schema (a fleet's shared store in steady state: what the local
copy holds, the store holds too).

    python bench/fill_cache.py PATH COUNT
    python bench/fill_cache.py PATH COUNT --redis URL --key-prefix PREFIX --now SECONDS
    python bench/fill_cache.py PATH COUNT --postgresql DSN --schema SCHEMA
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

#: Entries written per transaction.
BATCH = 20_000
#: Seconds one batch may take in a shared store: a bulk load, not a lookup, on
#: a machine that may be busy (the stores' own default is meant for lookups).
SHARED_BATCH_TIMEOUT = 120.0
#: Seconds the prepared policies stay in force (a week, a common max_age).
MAX_AGE = 604_800


def cached_domain(index: int) -> str:
    return f"c{index:07d}.example"


def make_entries(start: int, stop: int, now: float) -> list[object]:
    from postfix_mtasts.cache import CacheEntry, Source
    from postfix_mtasts.policy.model import Mode, Policy

    entries: list[object] = []
    for index in range(start, stop):
        domain = cached_domain(index)
        mx = (f"mx1.{domain}", f"*.mx.{domain}")
        text = f"version: STSv1\r\nmode: enforce\r\nmx: {mx[0]}\r\nmx: {mx[1]}\r\nmax_age: {MAX_AGE}\r\n"
        entries.append(
            CacheEntry(
                domain,
                Source.FETCHED,
                expires_at=now + MAX_AGE,
                checked_at=now,
                policy_id=f"2024{index:07d}",
                policy=Policy(Mode.ENFORCE, MAX_AGE, mx),
                policy_text=text,
                fetched_at=now,
                last_used=now - index * 1e-3,
            )
        )
    return entries


def open_stores(reactor: object, args: argparse.Namespace) -> list[Any]:
    """The SQLite file, and the shared store when one is named (unopened)."""
    from postfix_mtasts.cache.sqlite import SqliteStore

    stores: list[Any] = [SqliteStore(reactor, args.path)]  # type: ignore[arg-type]
    if args.redis:
        from postfix_mtasts.cache.redis import RedisStore

        stores.append(RedisStore(args.redis, key_prefix=args.key_prefix, op_timeout=SHARED_BATCH_TIMEOUT))
    if args.postgresql:
        from postfix_mtasts.cache.postgresql import PostgresqlStore

        stores.append(PostgresqlStore(args.postgresql, schema=args.schema, op_timeout=SHARED_BATCH_TIMEOUT))
    return stores


async def fill(reactor: object, args: argparse.Namespace) -> None:
    now = args.now if args.now is not None else time.time()
    for store in open_stores(reactor, args):
        await store.open()
        try:
            for start in range(0, args.count, BATCH):
                await store.put_many(make_entries(start, min(args.count, start + BATCH), now))
            stored = await store.count()
            if stored != args.count:
                raise SystemExit(f"fill_cache: {store.name} holds {stored} entries, expected {args.count}")
        finally:
            await store.close()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the SQLite file (the daemon's cache, or its local copy)")
    parser.add_argument("count", type=int, help="policies to write")
    parser.add_argument("--redis", default="", help="also fill this Redis (URL) under --key-prefix")
    parser.add_argument("--key-prefix", default="mtasts:")
    parser.add_argument("--postgresql", default="", help="also fill this PostgreSQL (DSN) in --schema")
    parser.add_argument("--schema", default="mtasts")
    parser.add_argument("--now", type=float, help="the entries' fetch time (default: now)")
    return parser.parse_args(argv)


def main() -> int:
    args = parse(sys.argv[1:])
    from twisted.internet import asyncioreactor

    asyncioreactor.install(asyncio.new_event_loop())  # type: ignore[no-untyped-call]
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    from twisted.internet.defer import Deferred

    outcome: dict[str, object] = {}

    def start() -> None:
        d = Deferred.fromCoroutine(fill(reactor, args))
        d.addErrback(lambda f: outcome.setdefault("error", f.getErrorMessage()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(reactor.callLater, 0, start)
    reactor.run()
    if "error" in outcome:
        print(f"fill_cache: {outcome['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
