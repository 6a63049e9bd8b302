"""sysmem: handing freed memory back to the system after the cache is loaded,
and the settings of the cyclic garbage collector."""

from __future__ import annotations

import gc
import platform
import weakref

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


def test_tuning_collects_the_young_generation_less_often(collector: None) -> None:
    gc.set_threshold(700, 10, 10)
    sysmem.tune_collector()
    assert gc.get_threshold() == (sysmem.YOUNG_COLLECTION_THRESHOLD, 10, 10)


def test_a_load_holds_full_collections_off_and_freezes_what_it_made(collector: None) -> None:
    gc.set_threshold(5000, 10, 10)
    gc.unfreeze()
    with sysmem.loading_long_lived():
        assert gc.get_threshold() == (5000, 10, sysmem.NEVER)
        loaded = [{"policy": i} for i in range(10_000)]
        assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == (5000, 10, 10)
    assert gc.get_freeze_count() >= len(loaded)
    # Frozen, not leaked: reference counting still frees them.
    with sysmem.loading_long_lived():
        held = Probe()
    probe = weakref.ref(held)
    del held
    assert probe() is None


def test_cycles_left_during_a_load_are_collected_not_frozen(collector: None) -> None:
    gc.unfreeze()
    with sysmem.loading_long_lived():
        cycle = Probe()
        cycle.itself = cycle  # garbage only the collector can free
        probe = weakref.ref(cycle)
        del cycle
    assert probe() is None


def test_overlapping_loads_restore_the_threshold_when_the_last_ends(collector: None) -> None:
    gc.set_threshold(5000, 10, 10)
    first = sysmem.loading_long_lived()
    second = sysmem.loading_long_lived()
    first.__enter__()
    second.__enter__()
    gc.unfreeze()
    first.__exit__(None, None, None)
    assert gc.get_threshold()[2] == sysmem.NEVER  # the second load is still going
    assert gc.get_freeze_count() == 0
    second.__exit__(None, None, None)
    assert gc.get_threshold() == (5000, 10, 10)
    assert gc.get_freeze_count() > 0


class Probe:
    """A container object the collector tracks, that a weak reference can follow."""

    itself: Probe
