"""The report store's contract, the same for every backend (memory, SQLite,
PostgreSQL on 127.0.0.1): a report is kept once per (organisation, report-id),
the first copy wins, an identical copy is a duplicate and a different one a
conflict logged as one WARNING line; queries filter by date and policy domain.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from postfix_mtasts.config import ReportsConfig
from postfix_mtasts.tlsrpt.model import ReportError
from postfix_mtasts.tlsrpt.store import (
    APPLICATION_ID,
    AddResult,
    IReportStore,
    ReportStoreError,
    content_digest,
    open_store,
)
from postfix_mtasts.tlsrpt.store.memory import MemoryReportStore
from postfix_mtasts.tlsrpt.store.sqlite import SqliteReportStore
from tests.conftest import require

POSTGRESQL_DSN = os.environ.get("MTASTS_TEST_POSTGRESQL_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def report_json(
    report_id: str = "r-1",
    organization: str = "Example Mail",
    start: str = "2026-03-01T00:00:00Z",
    end: str = "2026-03-01T23:59:59Z",
    domains: tuple[str, ...] = ("example.org",),
    successful: int = 10,
    failed: int = 2,
) -> dict[str, Any]:
    """A valid RFC 8460 report as a dict, one sts policy per domain."""
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": start, "end-datetime": end},
        "contact-info": "tlsrpt@example.net",
        "report-id": report_id,
        "policies": [
            {
                "policy": {
                    "policy-type": "sts",
                    "policy-domain": domain,
                    "policy-string": [
                        "version: STSv1", "mode: enforce", "mx: mx.example.org", "max_age: 86400"
                    ],
                    "mx-host": ["mx.example.org"],
                },
                "summary": {
                    "total-successful-session-count": successful,
                    "total-failure-session-count": failed,
                },
                "failure-details": [
                    {"result-type": "certificate-expired", "sending-mta-ip": "192.0.2.1",
                     "receiving-mx-hostname": "mx.example.org", "failed-session-count": failed}
                ] if failed else [],
            }
            for domain in domains
        ],
    }


def raw(**fields: Any) -> bytes:
    return json.dumps(report_json(**fields), indent=2).encode()


def postgresql_store() -> Iterator[IReportStore]:
    import psycopg

    try:
        with psycopg.connect(POSTGRESQL_DSN, connect_timeout=2):
            pass
    except (psycopg.Error, OSError):
        require(f"PostgreSQL at {POSTGRESQL_DSN}", False)
    from postfix_mtasts.tlsrpt.store.postgresql import PostgresqlReportStore

    schema = "test_reports_" + secrets.token_hex(4)
    store = PostgresqlReportStore(POSTGRESQL_DSN, schema=schema)
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(POSTGRESQL_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[IReportStore]:
    if request.param == "memory":
        yield MemoryReportStore()
    elif request.param == "sqlite":
        sqlite_store = SqliteReportStore(str(tmp_path / "reports.sqlite3"))
        yield sqlite_store
        sqlite_store.close()
    else:
        yield from postgresql_store()


def test_every_backend_provides_the_interface(store: IReportStore) -> None:
    assert verifyObject(IReportStore, store)


def test_first_copy_is_new_and_kept(store: IReportStore) -> None:
    added = store.add(raw(), "first.json")
    assert added.result is AddResult.NEW
    assert added.first_source == "first.json"
    assert added.report.report_id == "r-1"
    assert store.count() == 1
    [kept] = store.reports()
    assert (kept.organization_name, kept.successful_sessions, kept.failed_sessions) == ("Example Mail", 10, 2)


def test_same_content_again_is_a_duplicate_whatever_its_layout(store: IReportStore) -> None:
    store.add(raw(), "first.json")
    compact = json.dumps(report_json(), separators=(",", ":")).encode()
    again = store.add(compact, "mail 2")
    assert again.result is AddResult.DUPLICATE
    assert again.first_source == "first.json"
    assert store.count() == 1


def test_organisation_is_compared_without_case(store: IReportStore) -> None:
    store.add(raw(organization="Example Mail"), "a")
    assert store.add(raw(organization="EXAMPLE MAIL"), "b").result is AddResult.CONFLICT
    assert store.add(raw(organization="Other Mail"), "c").result is AddResult.NEW


def test_other_content_is_a_conflict_logged_once_and_the_first_copy_wins(
    store: IReportStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.add(raw(successful=10), "first.json")
    with caplog.at_level(logging.WARNING, logger="postfix_mtasts.tlsrpt.store"):
        later = store.add(raw(successful=99), "second.json")
    assert later.result is AddResult.CONFLICT
    assert later.first_source == "first.json"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert "conflict" in line and "second.json" in line and "first.json" in line and "\n" not in line
    [kept] = store.reports()
    assert kept.successful_sessions == 10


def test_invalid_reports_raise_report_error_and_store_nothing(store: IReportStore) -> None:
    for bad in (b"{not json", b"[]", json.dumps({**report_json(), "policies": "x"}).encode(), b"\xff\xfe"):
        with pytest.raises(ReportError):
            store.add(bad, "bad")
    assert store.count() == 0


def test_reports_since_keeps_those_ending_at_or_after(store: IReportStore) -> None:
    store.add(raw(report_id="old", start="2026-01-01T00:00:00Z", end="2026-01-01T23:59:59Z"), "a")
    store.add(raw(report_id="new", start="2026-03-01T00:00:00Z", end="2026-03-01T23:59:59Z"), "b")
    since = datetime(2026, 2, 1, tzinfo=UTC)
    assert [r.report_id for r in store.reports(since=since)] == ["new"]
    assert [r.report_id for r in store.reports()] == ["old", "new"]


def test_reports_are_ordered_by_start(store: IReportStore) -> None:
    store.add(raw(report_id="late", start="2026-03-02T00:00:00Z", end="2026-03-02T23:59:59Z"), "a")
    store.add(raw(report_id="early", start="2026-03-01T00:00:00Z", end="2026-03-01T23:59:59Z"), "b")
    assert [r.report_id for r in store.reports()] == ["early", "late"]


def test_reports_for_a_domain_carry_only_its_policies(store: IReportStore) -> None:
    store.add(raw(report_id="both", domains=("example.org", "example.net")), "a")
    store.add(raw(report_id="net", domains=("example.net",)), "b")
    only_org = store.reports(domain="Example.ORG.")
    assert [r.report_id for r in only_org] == ["both"]
    assert [p.policy_domain for p in only_org[0].policies] == ["example.org"]
    assert only_org[0].successful_sessions == 10
    assert [r.report_id for r in store.reports(domain="example.net")] == ["both", "net"]
    assert store.reports(domain="example.com") == []


def test_digest_ignores_layout_and_key_order() -> None:
    a = b'{"a": 1, "b": [1, 2]}'
    b = b'{"b":[1,2],\n "a":1}'
    assert content_digest(a) == content_digest(b)
    assert content_digest(a) != content_digest(b'{"a": 2, "b": [1, 2]}')


def test_open_store_picks_sqlite_by_path(tmp_path: Any) -> None:
    path = str(tmp_path / "here.sqlite3")
    store = open_store(ReportsConfig(path=path))
    try:
        assert isinstance(store, SqliteReportStore) and store.location == path
    finally:
        store.close()


def test_open_store_picks_postgresql_by_dsn() -> None:
    stores = postgresql_store()
    next(stores)  # skips (or fails under CI) without PostgreSQL
    try:
        schema = "test_reports_" + secrets.token_hex(4)
        store = open_store(ReportsConfig(dsn=POSTGRESQL_DSN, schema=schema))
        try:
            assert schema in store.location
            assert store.add(raw(), "x").result is AddResult.NEW
        finally:
            store.close()
            import psycopg

            with psycopg.connect(POSTGRESQL_DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        stores.close()


def test_postgresql_refuses_a_table_of_the_same_name_that_is_not_ours() -> None:
    stores = postgresql_store()
    next(stores)
    import psycopg

    from postfix_mtasts.tlsrpt.store.postgresql import PostgresqlReportStore

    schema = "test_reports_" + secrets.token_hex(4)
    with psycopg.connect(POSTGRESQL_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".tlsrpt_reports (x int)')
        conn.execute(f'INSERT INTO "{schema}".tlsrpt_reports VALUES (7)')
    try:
        with pytest.raises(ReportStoreError, match="not a postfix-mtasts report store"):
            PostgresqlReportStore(POSTGRESQL_DSN, schema=schema)
        with psycopg.connect(POSTGRESQL_DSN) as conn:
            assert conn.execute(f'SELECT x FROM "{schema}".tlsrpt_reports').fetchall() == [(7,)]
    finally:
        with psycopg.connect(POSTGRESQL_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        stores.close()


def test_postgresql_unreachable_is_one_line_store_error() -> None:
    from postfix_mtasts.tlsrpt.store.postgresql import PostgresqlReportStore

    with pytest.raises(ReportStoreError) as caught:
        PostgresqlReportStore("postgresql://nobody@127.0.0.1:1/none", schema="x")
    assert "\n" not in str(caught.value)


def test_application_id_spells_mtsr() -> None:
    assert APPLICATION_ID.to_bytes(4, "big") == b"MTSR"


