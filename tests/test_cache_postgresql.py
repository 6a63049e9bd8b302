"""PostgresqlStore against the store contract and a real PostgreSQL on 127.0.0.1.

Every test works in its own randomly named schema and drops it after.
``MTASTS_TEST_POSTGRESQL_DSN`` points the tests at another server.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet import reactor as global_reactor

from postfix_mtasts.asyncio_bridge import from_asyncio
from postfix_mtasts.cache import StoreUnavailable
from postfix_mtasts.cache.postgresql import MIGRATIONS, SCHEMA_VERSION, PostgresqlStore, migrate
from tests.conftest import require
from tests.store_contract import (
    NOW,
    PolicyStore,
    StoreContract,
    StoreFactory,
    async_yield_fixture,
    ensure_deferred,
    fetched,
    negative,
)
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

POSTGRESQL_DSN = os.environ.get(
    "MTASTS_TEST_POSTGRESQL_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)
POSTGRESQL_WHAT = "PostgreSQL at " + POSTGRESQL_DSN
#: How long a test waits for a short lease to run out (a bound, not an assertion).
EXPIRY_WAIT = 10.0


def postgresql_reachable(dsn: str = POSTGRESQL_DSN) -> bool:
    """True when PostgreSQL accepts a connection with ``dsn``."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except (psycopg.Error, OSError):
        return False


def sql(statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on a blocking connection, behind the store's back."""
    import psycopg

    with psycopg.connect(POSTGRESQL_DSN, autocommit=True) as conn:
        cursor = conn.execute(statement.encode(), params or None)
        return list(cursor.fetchall()) if cursor.description else []


def new_schema() -> str:
    return f"mtasts_test_{secrets.token_hex(6)}"


def drop_schema(schema: str) -> None:
    sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def sleep(seconds: float) -> None:
    await task.deferLater(global_reactor, seconds, lambda: None)


class PostgresqlFactory(StoreFactory):
    """Stores on one schema of the test database."""

    shared = True

    def __init__(self, schema: str) -> None:
        super().__init__()
        self.schema = schema

    async def _create(self) -> PolicyStore:
        return PostgresqlStore(POSTGRESQL_DSN, schema=self.schema, op_timeout=5.0)


@pytest.fixture
def postgresql_server() -> None:
    """Skip (under CI: fail) without a PostgreSQL server. A plain fixture: a
    skip raised inside pytest-twisted's async fixture breaks the next test's
    set-up instead of skipping it."""
    require(POSTGRESQL_WHAT, postgresql_reachable())


@async_yield_fixture
async def store_factory(postgresql_server: None) -> AsyncIterator[StoreFactory]:
    factory = PostgresqlFactory(new_schema())
    try:
        yield factory
    finally:
        await factory.close_all()
        drop_schema(factory.schema)


@pytest.fixture
def schema() -> Iterator[str]:
    require(POSTGRESQL_WHAT, postgresql_reachable())
    chosen = new_schema()
    try:
        yield chosen
    finally:
        drop_schema(chosen)


class TestPostgresqlStore(StoreContract):
    pass


def versions(schema: str) -> list[int]:
    return [row[0] for row in sql(f'SELECT version FROM "{schema}".schema_version ORDER BY version')]


@ensure_deferred
async def test_fresh_schema_is_created_at_the_current_version(schema: str) -> None:
    store = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    await store.open()
    await store.close()
    assert versions(schema) == list(range(1, SCHEMA_VERSION + 1))
    tables = sql("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", schema)
    assert {t[0] for t in tables} == {"schema_version", "entries", "leases"}
    # Opening again migrates nothing.
    store = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    await store.open()
    await store.close()
    assert versions(schema) == list(range(1, SCHEMA_VERSION + 1))


@ensure_deferred
async def test_migrates_an_older_schema_keeping_its_entries(schema: str) -> None:
    import psycopg

    assert SCHEMA_VERSION >= 2 and len(MIGRATIONS) == SCHEMA_VERSION

    async def make_version_1() -> int:
        async with await psycopg.AsyncConnection.connect(POSTGRESQL_DSN, autocommit=True) as conn:
            return await migrate(conn, schema, upto=1)

    assert await from_asyncio(make_version_1()) == 0
    assert versions(schema) == [1]
    old = fetched("old.example")
    sql(
        f'INSERT INTO "{schema}".entries (domain, data, expires_at, last_used) VALUES (%s, %s, %s, %s)',
        old.domain,
        old.to_json(),
        old.expires_at,
        old.last_used,
    )

    store = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    await store.open()
    try:
        assert versions(schema) == list(range(1, SCHEMA_VERSION + 1))
        assert await store.get("old.example") == old
        # The lease table came with version 2.
        assert await store.acquire_lease("old.example", "daemon-a", 30.0) is True
    finally:
        await store.close()


@ensure_deferred
async def test_two_daemons_migrating_at_once(schema: str) -> None:
    stores = [PostgresqlStore(POSTGRESQL_DSN, schema=schema) for _ in range(3)]
    try:
        await defer.gatherResults([defer.Deferred.fromCoroutine(s.open()) for s in stores])
        assert versions(schema) == list(range(1, SCHEMA_VERSION + 1))
    finally:
        for store in stores:
            await store.close()


@ensure_deferred
async def test_refuses_a_newer_schema(schema: str) -> None:
    store = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    await store.open()
    await store.close()
    sql(f'INSERT INTO "{schema}".schema_version (version) VALUES (%s)', SCHEMA_VERSION + 1)
    store = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    with pytest.raises(StoreUnavailable, match="newer than this daemon's"):
        await store.open()
    await store.close()


@ensure_deferred
async def test_prune_deletes_expired_rows(schema: str) -> None:
    store = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    await store.open()
    try:
        await store.put_many(
            [
                fetched("expired.example", expires_at=NOW - 1),
                negative("live.example", expires_at=NOW + 60),
            ]
        )
        assert sql(f'SELECT count(*) FROM "{schema}".entries')[0][0] == 2
        assert await store.prune(NOW) == 1
        rows = sql(f'SELECT domain FROM "{schema}".entries')
        assert rows == [("live.example",)]
    finally:
        await store.close()


@ensure_deferred
async def test_entries_are_queryable_json(schema: str) -> None:
    store = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    await store.open()
    try:
        await store.put(fetched("example.com", policy_id="abc"))
        rows = sql(f"SELECT data->>'policy_id', data->'policy'->'mx'->>0 FROM \"{schema}\".entries")
        assert rows == [("abc", "mx1.example.net")]
    finally:
        await store.close()


@ensure_deferred
async def test_two_stores_see_each_others_writes(schema: str) -> None:
    first = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    second = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    await first.open()
    await second.open()
    try:
        entry = fetched("shared.example")
        await first.put(entry)
        assert await second.get("shared.example") == entry
        await second.delete("shared.example")
        assert await first.get("shared.example") is None
    finally:
        await first.close()
        await second.close()


@ensure_deferred
async def test_lease_exclusive_between_holders_and_expiring(schema: str) -> None:
    first = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    second = PostgresqlStore(POSTGRESQL_DSN, schema=schema)
    await first.open()
    await second.open()
    try:
        assert await first.acquire_lease("example.com", "daemon-a", 0.3) is True
        assert await second.acquire_lease("example.com", "daemon-b", 30.0) is False
        await second.release_lease("example.com", "daemon-b")  # not its lease: no effect
        assert await second.acquire_lease("example.com", "daemon-b", 30.0) is False

        deadline = time.monotonic() + EXPIRY_WAIT
        while not await second.acquire_lease("example.com", "daemon-b", 30.0):
            assert time.monotonic() < deadline, "lease did not expire"
            await sleep(0.05)
        assert await first.acquire_lease("example.com", "daemon-a", 30.0) is False
        # prune drops leases that ran out, and only those.
        assert await first.acquire_lease("short.example", "daemon-a", 0.01) is True
        await sleep(0.05)
        await first.prune(NOW)
        held = sql(f'SELECT domain, holder FROM "{schema}".leases')
        assert held == [("example.com", "daemon-b")]
    finally:
        await first.close()
        await second.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@ensure_deferred
async def test_unreachable_server_is_unavailable() -> None:
    store = PostgresqlStore(f"host=127.0.0.1 port={free_port()} dbname=test", schema="unused")
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    message = str(caught.value)
    assert message.startswith("postgresql 127.0.0.1:") and "open failed" in message
    assert "\n" not in message
    await store.close()


@ensure_deferred
async def test_reconnects_by_itself_after_an_outage(schema: str) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    target = conninfo_to_dict(POSTGRESQL_DSN)
    proxy = TcpProxy(global_reactor, str(target.get("host", "127.0.0.1")), int(target.get("port") or 5432))
    port = proxy.start()
    store = PostgresqlStore(make_conninfo(POSTGRESQL_DSN, host="127.0.0.1", port=port), schema=schema)
    try:
        await store.open()
        await store.put(negative("before.example"))
        await proxy.cut()
        with pytest.raises(StoreUnavailable):
            await store.get("before.example")
        with pytest.raises(StoreUnavailable):
            await store.put(negative("during.example"))
        await proxy.restore()
        # The pooled connections died in the cut; the next call works all the same.
        assert await store.get("before.example") == negative("before.example")
        await store.put(negative("after.example"))
        assert await store.count() == 2
    finally:
        await store.close()
        await proxy.stop()
