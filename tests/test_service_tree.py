"""service.tree: the daemon's parts stop one after another, the last started first.

Twisted's MultiService would stop them all at once; the daemon needs the
order (stop accepting, drain, stop the lookup, close the connections, close
the store), and a half-built tree after a failed start must close too.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from postfix_mtasts.service.tree import ListeningService, OrderedServices, Step
from tests.fakes import result_of


class Recorder:
    """Steps that note when they begin and end stopping; each takes ``delay`` seconds."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.events: list[str] = []

    def step(self, name: str, delay: float = 1.0) -> Step:
        async def stop() -> None:
            self.events.append(f"{name} begins")
            await deferLater(self.clock, delay, lambda: None)
            self.events.append(f"{name} ends")

        return Step(name, stop)


def test_children_stop_in_reverse_order_each_waited_for() -> None:
    clock = Clock()
    record = Recorder(clock)
    tree = OrderedServices()
    for name in ("store", "lookup", "listener"):
        tree.add(record.step(name))
    tree.start()

    stopped = tree.stopService()
    clock.pump([1.0] * 3)

    result_of(stopped)
    assert record.events == [
        "listener begins", "listener ends",
        "lookup begins", "lookup ends",
        "store begins", "store ends",
    ]
    assert not tree.running


def test_a_tree_that_never_started_still_closes_what_it_holds() -> None:
    """A start that failed half way: the parts opened so far are closed."""
    clock = Clock()
    record = Recorder(clock)
    tree = OrderedServices()
    tree.add(record.step("store", delay=0))
    tree.add(record.step("listener", delay=0))

    stopped = tree.stopService()
    clock.advance(0)

    result_of(stopped)
    assert record.events == ["listener begins", "listener ends", "store begins", "store ends"]


def test_a_step_runs_its_stop_once() -> None:
    clock = Clock()
    record = Recorder(clock)
    step = record.step("store", delay=0)

    for _ in range(2):
        step.stopService()
        clock.advance(0)

    assert record.events == ["store begins", "store ends"]


def test_a_removed_listener_closes_its_port_and_leaves_the_tree() -> None:
    class Port:
        closed = 0

        def stopListening(self) -> Deferred[None]:
            Port.closed += 1
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d

    tree = OrderedServices()
    tree.add(Step("store", lambda: deferLater(Clock(), 0, lambda: None)))
    listener = ListeningService("socketmap inet:127.0.0.1:8461", Port())  # type: ignore[arg-type]
    tree.add(listener)
    tree.start()

    result_of(Deferred.fromCoroutine(tree.remove(listener)))

    assert Port.closed == 1
    assert [child.name for child in tree] == ["store"]
    assert listener.parent is None
