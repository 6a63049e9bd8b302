"""MemoryStore against the store contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

from postfix_mtasts.cache.memory import MemoryStore
from tests.store_contract import (
    PolicyStore,
    StoreContract,
    StoreFactory,
    async_yield_fixture,
)


class MemoryFactory(StoreFactory):
    """One MemoryStore per test; reopening opens the same object again."""

    def __init__(self) -> None:
        super().__init__()
        self._store = MemoryStore()

    async def _create(self) -> PolicyStore:
        return self._store


@async_yield_fixture
async def store_factory() -> AsyncIterator[StoreFactory]:
    factory = MemoryFactory()
    yield factory
    await factory.close_all()


class TestMemoryStore(StoreContract):
    pass
