"""Where the memory per cached policy goes: tracemalloc around the lookup's warm start.

Opens the SQLite cache at PATH (COUNT entries, from fill_cache.py) with the
daemon's own store and lookup, takes a snapshot before and after
``PolicyLookup.start()`` (which loads every entry into the in-memory front)
and prints, as JSON, the bytes per entry each allocation site still holds.

    python bench/memtrace.py PATH COUNT
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from typing import Any

import inprocess

#: Allocation sites listed.
TOP = 15


async def measure(reactor: object, path: str, count: int) -> dict[str, Any]:
    from postfix_mtasts.cache.sqlite import SqliteStore
    from postfix_mtasts.config import parse_config
    from postfix_mtasts.service import build_lookup

    config = parse_config(f"[cache]\nmemory_entries = {max(count, 1)}\n", source="<memtrace>")
    store = SqliteStore(reactor, path)  # type: ignore[arg-type]
    await store.open()
    lookup = build_lookup(reactor, config, store)
    gc.collect()
    before = tracemalloc.take_snapshot()
    loaded = await lookup.start()
    gc.collect()
    after = tracemalloc.take_snapshot()
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(filters).compare_to(before.filter_traces(filters), "lineno")
    total = sum(stat.size_diff for stat in diff)
    sites = [
        (
            f"{stat.traceback[0].filename.replace(sys.prefix, '<venv>')}:{stat.traceback[0].lineno}",
            round(stat.size_diff / max(loaded, 1), 1),
        )
        for stat in diff[:TOP]
    ]
    await lookup.stop()
    await store.close()
    return {"count": loaded, "bytes_per_entry": round(total / max(loaded, 1), 1), "sites": sites}


def main() -> int:
    path, count = sys.argv[1], int(sys.argv[2])
    tracemalloc.start(1)
    figures, failure = inprocess.run("asyncio", lambda reactor: measure(reactor, path, count))
    if failure is not None:
        print(f"memtrace: {failure.getErrorMessage()}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
