"""Give memory freed by a burst of temporary objects back to the system.

Loading the cache at start parses every stored entry: the JSON text and the
objects made while parsing are freed at once, but glibc's allocator keeps
the pages they used. ``malloc_trim(0)`` returns them; measured with
``bench/run.sh`` it lowers the resident size after loading 100,000 policies
by about 30 bytes per policy. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

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
