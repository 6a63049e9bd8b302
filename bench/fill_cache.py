"""Prepare a SQLite cache holding N fetched policies, through the store API.

The benchmark starts the real daemon on the file afterwards to measure its
resident memory per cached policy and its time to first answer. Every
policy differs (its own MX names, id and text), the worst case for memory.

    python bench/fill_cache.py PATH COUNT
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

#: Entries written per transaction.
BATCH = 20_000
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


async def fill(reactor: object, path: str, count: int) -> None:
    from postfix_mtasts.cache.sqlite import SqliteStore

    store = SqliteStore(reactor, path)  # type: ignore[arg-type]
    await store.open()
    now = time.time()
    try:
        for start in range(0, count, BATCH):
            await store.put_many(make_entries(start, min(count, start + BATCH), now))  # type: ignore[arg-type]
        stored = await store.count()
        if stored != count:
            raise SystemExit(f"fill_cache: {path} holds {stored} entries, expected {count}")
    finally:
        await store.close()


def main() -> int:
    path, count = sys.argv[1], int(sys.argv[2])
    from twisted.internet import asyncioreactor

    asyncioreactor.install(asyncio.new_event_loop())  # type: ignore[no-untyped-call]
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    from twisted.internet.defer import Deferred

    outcome: dict[str, object] = {}

    def start() -> None:
        d = Deferred.fromCoroutine(fill(reactor, path, count))
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
