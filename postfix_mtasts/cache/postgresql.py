"""A policy store in PostgreSQL, shared by a fleet of MTAs.

The daemon creates and migrates its own schema (``schema_version`` plus
ordered migrations, serialised between daemons by an advisory lock). Entries
live in ``entries`` (the JSON of :class:`CacheEntry` as jsonb, so an
administrator can query it) and fleet leases in ``leases``, timed by the
database's clock so that daemons with skewed clocks agree. A small pool of
psycopg 3 async connections is kept; a broken connection is dropped, so the
store reconnects by itself on the call after an outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from zope.interface import implementer

from postfix_mtasts.asyncio_bridge import from_asyncio
from postfix_mtasts.cache import CacheEntry, IPolicyStore, StoreUnavailable
from postfix_mtasts.errors import one_line

if TYPE_CHECKING:  # psycopg is an optional extra: imported where used
    import psycopg

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Default schema holding the daemon's tables.
DEFAULT_SCHEMA = "mtasts"
#: Default bound, in seconds, on one call to PostgreSQL (connect included).
DEFAULT_OP_TIMEOUT = 2.0
#: Bound on open(): connecting, waiting for another daemon's migration, migrating.
OPEN_TIMEOUT = 60.0
#: Extra time load() may take per entry asked for, on top of op_timeout: warming
#: a full front (200,000 entries) takes seconds, not one operation's bound.
LOAD_SECONDS_PER_ENTRY = 1e-4
#: Connections kept open at most.
POOL_SIZE = 4
#: libpq's connect_timeout has a floor of 2 seconds.
LIBPQ_MIN_CONNECT_TIMEOUT = 2

#: Ordered schema migrations: MIGRATIONS[n - 1] brings the schema to version n.
#: ``{schema}`` is replaced by the quoted schema name. Never edit a released
#: migration; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE {schema}.entries ("
        " domain text PRIMARY KEY,"
        " data jsonb NOT NULL,"
        " expires_at double precision NOT NULL,"
        " last_used double precision NOT NULL)",
        "CREATE INDEX entries_expires_at ON {schema}.entries (expires_at)",
        "CREATE INDEX entries_last_used ON {schema}.entries (last_used DESC)",
    ),
    (
        "CREATE TABLE {schema}.leases ("
        " domain text PRIMARY KEY,"
        " holder text NOT NULL,"
        " expires_at double precision NOT NULL)",
        "CREATE INDEX leases_expires_at ON {schema}.leases (expires_at)",
    ),
)

#: The version this code reads and writes.
SCHEMA_VERSION = len(MIGRATIONS)

_DB_NOW = "extract(epoch from clock_timestamp())::double precision"


def _sql(template: str, schema: str) -> Any:
    from psycopg import sql

    return sql.SQL(template).format(schema=sql.Identifier(schema))


async def migrate(conn: psycopg.AsyncConnection[Any], schema: str, upto: int = SCHEMA_VERSION) -> int:
    """Create ``schema`` if needed and apply the migrations it lacks, up to ``upto``.

    Runs in one transaction under an advisory lock, so two daemons starting
    at once migrate one after the other. Returns the version found before.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"postfix-mtasts schema {schema}",))
        await conn.execute(_sql("CREATE SCHEMA IF NOT EXISTS {schema}", schema))
        await conn.execute(
            _sql(
                "CREATE TABLE IF NOT EXISTS {schema}.schema_version ("
                " version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())",
                schema,
            )
        )
        cursor = await conn.execute(_sql("SELECT max(version) FROM {schema}.schema_version", schema))
        row = await cursor.fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"postgresql schema {schema!r} is at version {found}, newer than this "
                f"daemon's {SCHEMA_VERSION}: upgrade postfix-mtasts or use another schema"
            )
        for version in range(found + 1, upto + 1):
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(_sql(statement, schema))
            await conn.execute(
                _sql("INSERT INTO {schema}.schema_version (version) VALUES (%s)", schema), (version,)
            )
            log.info("postgresql: schema %s migrated to version %d", schema, version)
        return found


class _Pool:
    """At most ``size`` autocommit connections; any that fails is closed, not reused."""

    def __init__(self, dsn: str, size: int, connect_timeout: int) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    @asynccontextmanager
    async def connection(self, fresh: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        import psycopg

        async with self._slots:
            if self._closed:
                raise psycopg.OperationalError("the store is closed")
            conn = None if fresh or not self._idle else self._idle.pop()
            if conn is None:
                conn = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=self._connect_timeout
                )
            healthy = False
            try:
                yield conn
                healthy = True
            finally:
                idle = psycopg.pq.TransactionStatus.IDLE
                if healthy and not self._closed and not conn.closed and conn.info.transaction_status == idle:
                    self._idle.append(conn)
                else:
                    await conn.close()

    @property
    def has_idle(self) -> bool:
        return bool(self._idle)

    async def drop_idle(self) -> None:
        """Close every idle connection: after one failed, the others likely have too."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def close(self) -> None:
        self._closed = True
        await self.drop_idle()


@implementer(IPolicyStore)
class PostgresqlStore:
    """Policies in PostgreSQL tables, in a schema of the daemon's own."""

    name = "postgresql"
    shared = True

    def __init__(
        self, dsn: str, schema: str = DEFAULT_SCHEMA, op_timeout: float = DEFAULT_OP_TIMEOUT
    ) -> None:
        if not schema:
            raise ValueError("PostgreSQL schema name is empty")
        self.dsn = dsn
        self.schema = schema
        self.op_timeout = op_timeout
        self._pool: _Pool | None = None

    @property
    def where(self) -> str:
        """Where the store points, for error messages (no password)."""
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts = conninfo_to_dict(self.dsn)
        except Exception:
            return "bad DSN"
        host = parts.get("host") or "local socket"
        port = parts.get("port") or "5432"
        db = parts.get("dbname") or parts.get("user") or "default database"
        return f"{host}:{port}/{db}"

    # --- plumbing -------------------------------------------------------------

    def _table(self, template: str) -> Any:
        return _sql(template, self.schema)

    async def _run(
        self,
        what: str,
        operation: Callable[[psycopg.AsyncConnection[Any]], Coroutine[Any, Any, T]],
        timeout: float | None = None,
    ) -> T:
        """Run ``operation`` on a pooled connection within the timeout; failures become StoreUnavailable."""
        import psycopg

        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"postgresql {self.where}: store is not open")
        bound = self.op_timeout if timeout is None else timeout

        async def attempt() -> T:
            reused = pool.has_idle
            try:
                async with pool.connection() as conn:
                    return await operation(conn)
            except psycopg.OperationalError:
                await pool.drop_idle()
                if not reused:
                    raise
            # A pooled connection died with the server; every operation here
            # is idempotent, so try once more on a new connection.
            async with pool.connection(fresh=True) as conn:
                return await operation(conn)

        try:
            return await from_asyncio(attempt(), bound)
        except TimeoutError:
            raise StoreUnavailable(f"postgresql {self.where}: {what} timed out after {bound:g}s") from None
        except StoreUnavailable:
            raise
        except (psycopg.Error, OSError) as e:
            raise StoreUnavailable(f"postgresql {self.where}: {what} failed: {one_line(e)}") from None

    @staticmethod
    def _parse(text: str) -> CacheEntry | None:
        try:
            return CacheEntry.from_json(text)
        except ValueError as e:
            log.warning("postgresql: ignoring unreadable cache entry: %s", e)
            return None

    # --- IPolicyStore ---------------------------------------------------------

    async def open(self) -> None:
        """Connect, then create or migrate the schema."""
        if self._pool is None:
            connect_timeout = max(LIBPQ_MIN_CONNECT_TIMEOUT, math.ceil(self.op_timeout))
            self._pool = _Pool(self.dsn, POOL_SIZE, connect_timeout)

        async def operation(conn: psycopg.AsyncConnection[Any]) -> None:
            await migrate(conn, self.schema)

        await self._run("open", operation, timeout=max(self.op_timeout, OPEN_TIMEOUT))

    async def load(self, limit: int) -> list[CacheEntry]:
        """Up to ``limit`` entries, most recently used first."""
        if limit <= 0:
            return []

        async def operation(conn: psycopg.AsyncConnection[Any]) -> list[CacheEntry]:
            cursor = await conn.execute(
                self._table("SELECT data::text FROM {schema}.entries ORDER BY last_used DESC LIMIT %s"),
                (limit,),
            )
            rows = await cursor.fetchall()
            return [e for e in (self._parse(r[0]) for r in rows) if e is not None]

        return await self._run("load", operation, self.op_timeout + limit * LOAD_SECONDS_PER_ENTRY)

    async def get(self, domain: str) -> CacheEntry | None:
        """The stored entry for ``domain``, or None."""

        async def operation(conn: psycopg.AsyncConnection[Any]) -> CacheEntry | None:
            cursor = await conn.execute(
                self._table("SELECT data::text FROM {schema}.entries WHERE domain = %s"), (domain,)
            )
            row = await cursor.fetchone()
            return None if row is None else self._parse(row[0])

        return await self._run("get", operation)

    async def put(self, entry: CacheEntry) -> None:
        """Store ``entry``, replacing any older one."""
        await self.put_many([entry])

    async def put_many(self, entries: list[CacheEntry]) -> None:
        """Store ``entries`` in one transaction."""
        if not entries:
            return
        rows = [(e.domain, e.to_json(), e.expires_at, e.last_used) for e in entries]

        async def operation(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                async with conn.cursor() as cursor:
                    await cursor.executemany(
                        self._table(
                            "INSERT INTO {schema}.entries (domain, data, expires_at, last_used)"
                            " VALUES (%s, %s::jsonb, %s, %s)"
                            " ON CONFLICT (domain) DO UPDATE SET data = EXCLUDED.data,"
                            " expires_at = EXCLUDED.expires_at, last_used = EXCLUDED.last_used"
                        ),
                        rows,
                    )

        await self._run("put", operation)

    async def delete(self, domain: str) -> None:
        """Forget ``domain``."""

        async def operation(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(self._table("DELETE FROM {schema}.entries WHERE domain = %s"), (domain,))

        await self._run("delete", operation)

    async def delete_all(self) -> None:
        """Forget every entry (leases expire by themselves)."""

        async def operation(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(self._table("DELETE FROM {schema}.entries"))

        await self._run("delete_all", operation)

    async def prune(self, now: float) -> int:
        """Delete entries whose ``expires_at`` is not after ``now``, and stale leases."""

        async def operation(conn: psycopg.AsyncConnection[Any]) -> int:
            async with conn.transaction():
                cursor = await conn.execute(
                    self._table("DELETE FROM {schema}.entries WHERE expires_at <= %s"), (now,)
                )
                removed = cursor.rowcount
                await conn.execute(self._table(f"DELETE FROM {{schema}}.leases WHERE expires_at < {_DB_NOW}"))
            return max(0, removed)

        return await self._run("prune", operation)

    async def count(self) -> int:
        """Number of stored entries."""

        async def operation(conn: psycopg.AsyncConnection[Any]) -> int:
            cursor = await conn.execute(self._table("SELECT count(*) FROM {schema}.entries"))
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

        return await self._run("count", operation)

    async def acquire_lease(self, domain: str, holder: str, ttl: float) -> bool:
        """Take ``domain``'s lease for ``ttl`` seconds unless another holder has a live one."""

        async def operation(conn: psycopg.AsyncConnection[Any]) -> bool:
            cursor = await conn.execute(
                self._table(
                    "INSERT INTO {schema}.leases AS held (domain, holder, expires_at)"
                    f" VALUES (%s, %s, {_DB_NOW} + %s)"
                    " ON CONFLICT (domain) DO UPDATE"
                    " SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at"
                    f" WHERE held.expires_at < {_DB_NOW} OR held.holder = EXCLUDED.holder"
                    " RETURNING holder"
                ),
                (domain, holder, float(ttl)),
            )
            return await cursor.fetchone() is not None

        return await self._run("acquire_lease", operation)

    async def release_lease(self, domain: str, holder: str) -> None:
        """Drop ``domain``'s lease if ``holder`` still has it."""

        async def operation(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                self._table("DELETE FROM {schema}.leases WHERE domain = %s AND holder = %s"),
                (domain, holder),
            )

        await self._run("release_lease", operation)

    async def close(self) -> None:
        """Close the pooled connections (writes are committed once their call returned)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await from_asyncio(pool.close(), self.op_timeout)
            except Exception as e:  # closing a dead connection must not stop shutdown
                log.debug("postgresql: error while closing: %s", one_line(e))
