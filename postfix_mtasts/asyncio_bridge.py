"""Await asyncio coroutines (redis.asyncio, psycopg, dnspython) from Twisted code.

The daemon runs on Twisted's asyncio reactor, so the asyncio loop is the one
already running; a coroutine made for asyncio still has to be wrapped in a
Task and a Deferred before a Twisted-driven coroutine may await it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred

T = TypeVar("T")


async def from_asyncio(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` as an asyncio Task and wait for it the Twisted way.

    Cancelling the awaiting Deferred (a timeout, a shutdown) cancels the Task;
    the caller then sees Twisted's ``CancelledError`` (which ``addTimeout``
    turns into a timeout), not asyncio's, which is a BaseException.
    """
    future: asyncio.Future[T] = asyncio.ensure_future(coro)
    try:
        return await Deferred.fromFuture(future)
    except asyncio.CancelledError:
        raise CancelledError("the asyncio task was cancelled") from None
