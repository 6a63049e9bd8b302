"""sysmem: handing freed memory back to the system after the cache is loaded."""

from __future__ import annotations

import platform

import pytest

from postfix_mtasts import sysmem


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_freed_small_objects_go_back_to_the_system() -> None:
    # Many small strings freed at once leave glibc's heap holding the pages.
    keep = []
    junk = [bytes(600) + i.to_bytes(4, "big") for i in range(200_000)]  # malloc, not pymalloc
    keep.append(object())
    del junk
    before = _rss_kib()
    assert sysmem.release_free_memory() is True
    after = _rss_kib()
    assert before - after > 50_000, (before, after)  # of the ~120 MB freed, most returned


def test_without_malloc_trim_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sysmem, "_malloc_trim", lambda: None)
    assert sysmem.release_free_memory() is False
