"""MemoryFront: the bounded map before the store (second-chance eviction) and its precomputed answers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from postfix_mtasts.cache import CacheEntry, Source
from postfix_mtasts.cache.front import MemoryFront
from postfix_mtasts.policy.model import Answer, Mode
from tests.fakes import policy

P1 = policy(Mode.ENFORCE, 1000, "mx1.example.com")
P2 = policy(Mode.ENFORCE, 1000, "mx2.example.com")


def fetched_entry(domain: str, p: object = P1, checked_at: float = 0.0) -> CacheEntry:
    return CacheEntry(domain, Source.FETCHED, expires_at=1000.0, checked_at=checked_at,
                      policy_id="1", policy=p, fetched_at=0.0)  # type: ignore[arg-type]


def test_front_needs_room_for_one_entry() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MemoryFront(0)


def test_an_entry_used_since_the_last_sweep_survives_the_next_one() -> None:
    front = MemoryFront(3)
    for domain in ("a", "b", "c"):
        front.put(fetched_entry(domain))
    assert front.get("a") is not None
    front.put(fetched_entry("d"))
    assert [e.domain for e in front.entries()] == ["a", "c", "d"]
    # That sweep cleared a's flag: unused since, it is now the first to go.
    front.put(fetched_entry("e"))
    assert [e.domain for e in front.entries()] == ["c", "d", "e"]
    assert (len(front), front.evictions) == (3, 2)


def test_when_every_entry_was_used_the_oldest_goes_and_never_the_new_one() -> None:
    front = MemoryFront(3)
    for domain in ("a", "b", "c"):
        front.put(fetched_entry(domain))
        front.get(domain)
    front.put(fetched_entry("d"))
    assert [e.domain for e in front.entries()] == ["b", "c", "d"]


def test_peek_does_not_count_as_a_use_but_cached_answer_does() -> None:
    front = MemoryFront(2)
    for domain in ("a", "b"):
        front.put(fetched_entry(domain))
    assert front.peek("a") is not None
    front.put(fetched_entry("c"))
    assert "a" not in front
    assert front.cached_answer("b", False) is not None
    front.put(fetched_entry("d"))
    assert "b" in front and "c" not in front


def test_replacing_an_entry_does_not_evict_and_counts_as_a_use() -> None:
    front = MemoryFront(2)
    for domain in ("a", "b"):
        front.put(fetched_entry(domain))
    front.put(fetched_entry("a", checked_at=5.0))
    assert front.evictions == 0
    assert front.peek("a") == fetched_entry("a", checked_at=5.0)
    front.put(fetched_entry("c"))
    assert "a" in front and "b" not in front


def test_bound_holds_under_many_inserts() -> None:
    front = MemoryFront(100)
    for i in range(1000):
        front.put(fetched_entry(f"d{i}"))
        assert len(front) <= 100
    assert front.evictions == 1000 - len(front)
    # A sweep frees a sixteenth of the room at once; the newest are kept.
    assert 100 - 100 // 16 <= len(front) <= 100
    assert [e.domain for e in front.entries()] == [f"d{i}" for i in range(1000 - len(front), 1000)]


def test_a_hot_entry_survives_a_stream_of_new_ones() -> None:
    front = MemoryFront(64)
    front.put(fetched_entry("hot"))
    for i in range(10_000):
        front.put(fetched_entry(f"cold{i}"))
        assert front.cached_answer("hot", False) is not None


def test_refresh_marks_live_with_the_slot() -> None:
    front = MemoryFront(10)
    mark = object()
    front.set_refresh_mark("missing", mark)
    assert front.refresh_mark("missing") is None
    front.put(fetched_entry("a"))
    assert front.refresh_mark("a") is None
    front.set_refresh_mark("a", mark)
    front.put(fetched_entry("a", checked_at=5.0))
    assert front.refresh_mark("a") is mark
    front.delete("a")
    front.put(fetched_entry("a"))
    assert front.refresh_mark("a") is None


def test_precomputed_answers_are_kept_per_profile() -> None:
    front = MemoryFront(10)
    front.put(fetched_entry("a"))
    assert front.cached_answer("a", False) == (fetched_entry("a"), None)
    front.remember_answer("a", False, Answer.ok("one"))
    front.remember_answer("a", True, Answer.ok("two"))
    assert front.cached_answer("a", False) == (fetched_entry("a"), Answer.ok("one"))
    assert front.cached_answer("a", True) == (fetched_entry("a"), Answer.ok("two"))
    front.remember_answer("missing", False, Answer.ok("x"))
    assert front.cached_answer("missing", False) is None


def test_precomputed_answers_survive_a_recheck_that_keeps_the_policy() -> None:
    front = MemoryFront(10)
    entry = fetched_entry("a")
    front.put(entry)
    front.remember_answer("a", False, Answer.ok("one"))
    front.put(replace(entry, checked_at=60.0))
    assert front.cached_answer("a", False) == (replace(entry, checked_at=60.0), Answer.ok("one"))


def test_precomputed_answers_are_dropped_when_the_policy_changes() -> None:
    front = MemoryFront(10)
    front.put(fetched_entry("a", P1))
    front.remember_answer("a", False, Answer.ok("one"))
    front.put(fetched_entry("a", P2))
    hit = front.cached_answer("a", False)
    assert hit is not None and hit[1] is None


def test_precomputed_answers_are_dropped_when_the_source_changes() -> None:
    front = MemoryFront(10)
    front.put(CacheEntry("a", Source.NEGATIVE, expires_at=10.0, checked_at=0.0))
    front.remember_answer("a", False, Answer.notfound("no policy"))
    front.put(CacheEntry("a", Source.FAILED, expires_at=10.0, checked_at=0.0, failure="x"))
    hit = front.cached_answer("a", False)
    assert hit is not None and hit[1] is None


def test_precomputed_answers_are_dropped_when_the_failure_changes() -> None:
    """A FAILED entry's answer names its failure; a new failure must not show the old one."""
    front = MemoryFront(10)
    front.put(CacheEntry("a", Source.FAILED, expires_at=10.0, checked_at=0.0, failure="timeout"))
    front.remember_answer("a", False, Answer.notfound("no usable policy: timeout"))
    front.put(CacheEntry("a", Source.FAILED, expires_at=20.0, checked_at=10.0, failure="bad cert"))
    hit = front.cached_answer("a", False)
    assert hit is not None and hit[1] is None


def test_delete_and_clear() -> None:
    front = MemoryFront(10)
    front.put(fetched_entry("a"))
    front.put(fetched_entry("b"))
    front.delete("a")
    front.delete("never-there")
    assert "a" not in front and len(front) == 1
    front.clear()
    assert len(front) == 0 and list(front.entries()) == []
