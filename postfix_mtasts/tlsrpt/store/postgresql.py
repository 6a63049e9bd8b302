"""The report store in PostgreSQL, shared by a fleet of MTAs (``[reports] dsn``).

Two tables in the configured schema (``mtasts`` by default, beside the policy
cache's): ``tlsrpt_reports`` (one row per report: identity, date range, totals,
the raw JSON) and ``tlsrpt_policies`` (per policy: type, domain, counts). Both
are created on first use under an advisory lock and marked as this project's
with a table comment; a ``tlsrpt_reports`` table without that mark is someone
else's and is never written. The connection is synchronous psycopg 3: the CLI
calls it directly, the daemon through
:class:`~postfix_mtasts.tlsrpt.store.threaded.ThreadedReportStore`. A broken
connection is dropped and made again on the next call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from zope.interface import implementer

from postfix_mtasts.tlsrpt.model import Report, parse_report_text
from postfix_mtasts.tlsrpt.store import (
    APPLICATION_ID,
    Added,
    AddResult,
    IReportStore,
    ReportStoreError,
    content_digest,
    epoch,
    judge_copy,
    normalise_domain,
    policy_rows,
    reparse,
    report_key,
)

if TYPE_CHECKING:  # psycopg is an optional extra: imported where used
    import psycopg

#: Schema of the report tables unless ``[reports] schema`` says otherwise.
DEFAULT_SCHEMA = "mtasts"
#: Seconds to wait for a connection (libpq's connect_timeout).
CONNECT_TIMEOUT = 10
#: The comment that marks the tables as this project's report store.
TABLE_MARK = "postfix-mtasts TLS report store, schema 1"

_CREATE = (
    "CREATE SCHEMA IF NOT EXISTS {schema}",
    "CREATE TABLE {schema}.tlsrpt_reports ("
    " id bigserial PRIMARY KEY,"
    " org_key text NOT NULL,"
    " report_id text NOT NULL,"
    " organization text NOT NULL,"
    " start_time double precision NOT NULL,"
    " end_time double precision NOT NULL,"
    " successful bigint NOT NULL,"
    " failed bigint NOT NULL,"
    " digest text NOT NULL,"
    " source text NOT NULL,"
    " received_at double precision NOT NULL,"
    " raw bytea NOT NULL,"
    " UNIQUE (org_key, report_id))",
    "CREATE INDEX ON {schema}.tlsrpt_reports (end_time)",
    "CREATE TABLE {schema}.tlsrpt_policies ("
    " report bigint NOT NULL REFERENCES {schema}.tlsrpt_reports (id) ON DELETE CASCADE,"
    " position integer NOT NULL,"
    " policy_type text NOT NULL,"
    " policy_domain text NOT NULL,"
    " successful bigint NOT NULL,"
    " failed bigint NOT NULL,"
    " PRIMARY KEY (report, position))",
    "CREATE INDEX ON {schema}.tlsrpt_policies (policy_domain)",
)


def _sql(template: str, schema: str) -> Any:
    from psycopg import sql

    return sql.SQL(template).format(schema=sql.Identifier(schema))


@implementer(IReportStore)
class PostgresqlReportStore:
    """Reports in PostgreSQL; connects (and creates its tables) at once."""

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA,
                 clock: Callable[[], float] = time.time) -> None:
        self.dsn = dsn
        self.schema = schema
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self.location = f"PostgreSQL schema {schema}"
        with self._lock, self._transaction() as conn:
            self._create(conn)

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on the (re)made connection; any database error
        becomes a ReportStoreError, and a broken connection is dropped."""
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.dsn, connect_timeout=CONNECT_TIMEOUT)
            with self._conn.transaction():
                yield self._conn
        except psycopg.Error as e:
            if self._conn is not None and (self._conn.broken or self._conn.closed):
                self._conn = None
            raise ReportStoreError(f"report store ({self.location}): {_one_line(e)}") from None

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPLICATION_ID,))
        row = conn.execute(
            "SELECT obj_description(to_regclass(%s), 'pg_class'), to_regclass(%s) IS NOT NULL",
            (f'"{self.schema}".tlsrpt_reports', f'"{self.schema}".tlsrpt_reports'),
        ).fetchone()
        assert row is not None
        mark, exists = row
        if exists and mark != TABLE_MARK:
            raise ReportStoreError(
                f"report store ({self.location}): table tlsrpt_reports exists but is not a "
                "postfix-mtasts report store; refusing to touch it (set [reports] schema to another one)"
            )
        if exists:
            return
        for statement in _CREATE:
            conn.execute(_sql(statement, self.schema))
        conn.execute(_sql("COMMENT ON TABLE {schema}.tlsrpt_reports IS " + _literal(TABLE_MARK), self.schema))

    def add(self, raw: bytes, source: str) -> Added:
        report = parse_report_text(raw)
        digest = content_digest(raw)
        org_key, report_id = report_key(report)
        with self._lock, self._transaction() as conn:
            inserted = conn.execute(
                _sql(
                    "INSERT INTO {schema}.tlsrpt_reports (org_key, report_id, organization,"
                    " start_time, end_time, successful, failed, digest, source, received_at, raw)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (org_key, report_id) DO NOTHING RETURNING id",
                    self.schema,
                ),
                (org_key, report_id, report.organization_name, epoch(report.start), epoch(report.end),
                 report.successful_sessions, report.failed_sessions, digest, source, self._clock(), raw),
            ).fetchone()
            if inserted is not None:
                with conn.cursor() as cursor:
                    cursor.executemany(
                        _sql(
                            "INSERT INTO {schema}.tlsrpt_policies (report, position, policy_type,"
                            " policy_domain, successful, failed) VALUES (%s, %s, %s, %s, %s, %s)",
                            self.schema,
                        ),
                        [(inserted[0], *row) for row in policy_rows(report)],
                    )
                return Added(AddResult.NEW, report, source)
            stored = conn.execute(
                _sql("SELECT digest, source FROM {schema}.tlsrpt_reports"
                     " WHERE org_key = %s AND report_id = %s", self.schema),
                (org_key, report_id),
            ).fetchone()
        assert stored is not None  # rows are never deleted
        return judge_copy(report, source, digest, stored_digest=stored[0], stored_source=stored[1])

    def reports(self, since: datetime | None = None, domain: str | None = None) -> list[Report]:
        where: list[str] = []
        args: list[object] = []
        if since is not None:
            where.append("end_time >= %s")
            args.append(epoch(since))
        if domain is not None:
            where.append("id IN (SELECT report FROM {schema}.tlsrpt_policies WHERE policy_domain = %s)")
            args.append(normalise_domain(domain))
        sql = "SELECT raw FROM {schema}.tlsrpt_reports"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start_time, id"
        with self._lock, self._transaction() as conn:
            rows = conn.execute(_sql(sql, self.schema), args).fetchall()
        return reparse(self.location, (bytes(r[0]) for r in rows), domain)

    def count(self) -> int:
        with self._lock, self._transaction() as conn:
            row = conn.execute(_sql("SELECT count(*) FROM {schema}.tlsrpt_reports", self.schema)).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
