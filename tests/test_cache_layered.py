"""cache.layered: a shared store above a local durable copy, on fakes and a fake clock.

What a daemon of a fleet may never lose: a policy in its local copy answers
while the shared store is down, slow, emptied or replaced; writes reach both
copies through the no-downgrade merge; what the shared store missed is written
to it again once it answers. The same guarantees with real processes, Redis
and PostgreSQL are in test_shared_restart.py.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from twisted.internet import task
from zope.interface.verify import verifyObject

from postfix_mtasts.cache import CacheEntry, IPolicyStore, Source
from postfix_mtasts.cache.layered import LayeredStore
from postfix_mtasts.cache.resilient import ResilientStore
from tests.fakes import FlakyStore, result_of, run
from tests.store_contract import DAY, NOW, fetched, negative

OP_TIMEOUT = 2.0
RETRY = 5.0


class Copies:
    """A layered store over two fakes, with the clock that drives it."""

    def __init__(self, local: FlakyStore | None = None, shared: FlakyStore | None = None) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.local = local or FlakyStore()
        self.shared = shared or FlakyStore()
        self.resilient = ResilientStore(self.clock, self.shared, op_timeout=OP_TIMEOUT,
                                        retry_interval=RETRY, backed_up_locally=True)
        self.store = LayeredStore(self.clock, self.local, self.resilient)

    def open(self) -> None:
        result_of(run(self.store.open()))

    def close(self) -> None:
        result_of(run(self.store.close()))


@pytest.fixture
def copies() -> Copies:
    made = Copies()
    made.open()
    return made


def test_provides_the_store_interface(copies: Copies) -> None:
    assert verifyObject(IPolicyStore, copies.store)
    assert copies.store.shared is True
    assert copies.store.name == copies.shared.name


def test_a_policy_only_the_local_copy_has_answers(copies: Copies) -> None:
    result_of(run(copies.local.put(fetched("a.example"))))

    got = result_of(run(copies.store.get("a.example")))

    assert got is not None and got.source is Source.FETCHED


def test_a_negative_entry_in_the_shared_store_does_not_hide_a_local_policy(copies: Copies) -> None:
    """Another daemon (or an attacker's stripped TXT record) wrote "no record"."""
    result_of(run(copies.local.put(fetched("a.example"))))
    result_of(run(copies.shared.put(negative("a.example"))))

    got = result_of(run(copies.store.get("a.example")))

    assert got is not None and got.source is Source.FETCHED


def test_what_only_the_shared_store_knew_is_kept_locally(copies: Copies) -> None:
    result_of(run(copies.shared.put(fetched("b.example"))))

    result_of(run(copies.store.get("b.example")))

    kept = copies.local.stored("b.example")
    assert kept is not None and kept.source is Source.FETCHED


def test_a_weaker_write_replaces_nothing_in_either_copy(copies: Copies) -> None:
    policy = fetched("a.example")
    result_of(run(copies.store.put(policy)))

    result_of(run(copies.store.put(negative("a.example", last_used=NOW + 10))))

    for copy in (copies.local, copies.shared):
        held = copy.stored("a.example")
        assert held is not None and held.source is Source.FETCHED
        assert held.last_used == NOW + 10  # the use still counts


def test_a_newer_policy_replaces_the_older_in_both_copies(copies: Copies) -> None:
    result_of(run(copies.store.put(fetched("a.example", policy_id="one"))))
    newer = replace(fetched("a.example", policy_id="two"), fetched_at=NOW + 60, checked_at=NOW + 60)

    result_of(run(copies.store.put(newer)))

    assert copies.local.stored("a.example") == newer
    assert copies.shared.stored("a.example") == newer


def test_started_with_the_shared_store_down_it_answers_from_the_local_copy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = Copies()
    result_of(run(made.local.open()))
    result_of(run(made.local.put(fetched("a.example"))))
    made.shared.down = True
    caplog.set_level(logging.INFO, "postfix_mtasts")

    made.open()
    loaded = result_of(run(made.store.load(100)))

    assert [e.domain for e in loaded] == ["a.example"]
    got = result_of(run(made.store.get("a.example")))
    assert got is not None and got.source is Source.FETCHED
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) == 1, [r.getMessage() for r in caplog.records]


def test_what_was_learnt_during_an_outage_reaches_the_shared_store_after_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = Copies()
    made.open()
    made.shared.down = True
    caplog.set_level(logging.INFO, "postfix_mtasts")
    result_of(run(made.store.put(fetched("a.example"))))
    made.close()
    assert made.shared.stored("a.example") is None
    assert any("kept in the local copy" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING and "shutdown" in r.getMessage() for r in caplog.records)

    # The next start, with the shared store back: the local copy writes it there.
    made.shared.down = False
    again = Copies(local=made.local, shared=made.shared)  # the fakes keep their entries
    again.open()
    result_of(run(again.store.load(100)))

    held = made.shared.stored("a.example")
    assert held is not None and held.source is Source.FETCHED
    assert again.store.reconciled_to_shared == 1


def test_an_emptied_shared_store_is_filled_again_from_the_local_copy(copies: Copies) -> None:
    for name in ("a.example", "b.example"):
        result_of(run(copies.store.put(fetched(name))))
    result_of(run(copies.store.put(negative("c.example"))))
    result_of(run(copies.shared.delete_all()))  # FLUSHALL, a new server, a dropped schema

    result_of(run(copies.store.load(100)))

    refilled = {e.domain for e in result_of(run(copies.shared.load(100)))}
    assert refilled == {"a.example", "b.example", "c.example"}


def test_a_shared_store_down_at_start_is_filled_from_the_local_copy_when_it_returns() -> None:
    made = Copies()
    result_of(run(made.local.open()))
    result_of(run(made.local.put(fetched("a.example"))))  # learnt by the previous run
    made.shared.down = True
    made.open()
    result_of(run(made.store.load(100)))
    made.shared.down = False

    made.clock.advance(RETRY)  # the probe finds it back, then the copies are reconciled

    assert made.resilient.available
    held = made.shared.stored("a.example")
    assert held is not None and held.source is Source.FETCHED


def test_expired_local_entries_are_not_written_to_the_shared_store(copies: Copies) -> None:
    old = fetched("old.example", expires_at=NOW - DAY)
    result_of(run(copies.local.put(old)))

    result_of(run(copies.store.load(100)))

    assert copies.shared.stored("old.example") is None


def test_load_merges_both_copies_most_recently_used_first(copies: Copies) -> None:
    result_of(run(copies.local.put(fetched("a.example", last_used=NOW - 10))))
    result_of(run(copies.shared.put(fetched("b.example", last_used=NOW - 5))))
    result_of(run(copies.shared.put(negative("a.example", last_used=NOW - 1))))

    loaded: list[CacheEntry] = result_of(run(copies.store.load(100)))

    assert [(e.domain, e.source) for e in loaded] == [
        ("a.example", Source.FETCHED),
        ("b.example", Source.FETCHED),
    ]
    assert loaded[0].last_used == NOW - 1


def test_start_up_reads_each_copy_once_when_it_held_less_than_asked(copies: Copies) -> None:
    """The reconciliation reuses what the warm-up read: no second full read of
    a shared store holding, say, 200,000 entries."""
    result_of(run(copies.local.put(fetched("a.example"))))

    result_of(run(copies.store.load(100)))

    assert copies.local.calls["load"] == 1 and copies.shared.calls["load"] == 1
    assert copies.shared.stored("a.example") is not None
