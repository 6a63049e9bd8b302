"""The daemon's heap: memory given back after the cache is loaded, and the
settings of Python's cyclic garbage collector.

Loading the cache at start parses every stored entry: the JSON text and the
objects made while parsing are freed at once, but glibc's allocator keeps
the pages they used. ``malloc_trim(0)`` returns them; measured with
``bench/run.sh`` it lowers the resident size after loading 100,000 policies
by about 30 bytes per policy. Elsewhere than glibc this does nothing.

The collector: a full collection walks every container object in the
process, the cached policies included. With 100,000 of them loaded that
takes 85 ms, with a million about 0.8 s, and meanwhile no lookup is
answered. The entries loaded at start live until they are replaced or
evicted, and hold no reference cycles, so reference counting frees them
and the collector has nothing to find there. While they are being loaded,
full collections wait (each would walk everything loaded so far: at
100,000 policies, five of them made the load 40% slower); once loaded, one
full collection clears what the lookups served meanwhile left in cycles,
and everything still alive is moved out of the collector's sight
(``gc.freeze``), so no later full collection walks the cache again.

The young generation is collected after 5,000 new container objects rather
than CPython's 700: a policy fetch leaves about 40 objects in reference
cycles (Twisted's connection, its protocols and their Deferreds), and
collecting them in fewer, larger batches halved the collector's CPU time
per new policy domain (from 120 to 60 microseconds, measured in-process
against the benchmark's world).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Callable, Iterator

log = logging.getLogger("postfix_mtasts.sysmem")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    return trim


def release_free_memory() -> bool:
    """Ask the C allocator to return free pages to the system; True if it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


#: New container objects (allocations less deallocations) that trigger a
#: collection of the youngest generation; CPython's default is 700.
YOUNG_COLLECTION_THRESHOLD = 5000
#: A full-collection threshold never reached: collections of the middle
#: generation since the last full one are counted against it.
NEVER = 1 << 30

#: How many loads are holding full collections off right now, and the
#: threshold to restore when the last one ends.
_holds = 0
_held_threshold = 0


def tune_collector() -> None:
    """Collect the youngest generation less often (``YOUNG_COLLECTION_THRESHOLD``)."""
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


@contextlib.contextmanager
def loading_long_lived() -> Iterator[None]:
    """Around a load of objects that live long and hold no cycles (the cache
    at start): no full collection meanwhile; at the end one full collection,
    then everything alive is frozen out of the collector's sight. Loads may
    overlap; all that happens when the last one ends."""
    global _holds, _held_threshold
    if _holds == 0:
        young, middle, _held_threshold = gc.get_threshold()
        gc.set_threshold(young, middle, NEVER)
    _holds += 1
    try:
        yield
    finally:
        _holds -= 1
        if _holds == 0:
            young, middle, _old = gc.get_threshold()
            gc.set_threshold(young, middle, _held_threshold)
            gc.collect()  # cycles left meanwhile would never be freed once frozen
            gc.freeze()
