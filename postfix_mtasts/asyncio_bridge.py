"""Await asyncio coroutines (redis.asyncio, psycopg) from Twisted code.

With the Redis or PostgreSQL cache the daemon runs on Twisted's asyncio
reactor (cli.ASYNCIO_BACKENDS), so the asyncio loop is the one already
running; a coroutine made for asyncio still has to be wrapped in a Task and a
Deferred before a Twisted-driven coroutine may await it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred

T = TypeVar("T")


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned task's outcome as seen, so asyncio logs nothing about it."""
    if not task.cancelled():
        task.exception()


async def from_asyncio(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` as an asyncio Task and wait for it the Twisted way.

    With ``timeout``, raise the built-in ``TimeoutError`` once it has passed.
    Cancelling the awaiting Deferred (a timeout, a shutdown) raises Twisted's
    ``CancelledError``. Either way the Task is cancelled and the caller goes
    on at once: a library that is slow to honour (or swallows) the
    cancellation cannot hold the caller past its deadline.
    """
    task: asyncio.Future[T] = asyncio.ensure_future(coro)

    def abandon(_: Deferred[T]) -> None:
        task.cancel()

    waiting: Deferred[T] = Deferred(abandon)

    def finished(done: asyncio.Future[T]) -> None:
        if waiting.called:
            _retrieve(done)
        elif done.cancelled():
            waiting.errback(CancelledError("the asyncio task was cancelled"))
        elif (error := done.exception()) is not None:
            waiting.errback(error)
        else:
            waiting.callback(done.result())

    task.add_done_callback(finished)
    if timeout is not None:
        bound = timeout

        def expire() -> None:
            if not waiting.called:
                task.cancel()
                waiting.errback(TimeoutError(f"timed out after {bound:g}s"))

        timer = task.get_loop().call_later(bound, expire)

        def stop_timer(result: Any) -> Any:
            timer.cancel()
            return result

        waiting.addBoth(stop_timer)
    return await waiting
