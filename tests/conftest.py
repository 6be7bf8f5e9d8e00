"""Shared fixtures: a hub on each real backend (SQLite+DuckDB embedded, PostgreSQL server mode)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from waymark.core.clock import ManualClock
from waymark.hub import Hub
from waymark.settings import load_settings
from waymark.storage.eventlog import log_metadata
from waymark.storage.tables import metadata

PG_ADMIN_URL = os.environ.get("WAYMARK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _pg_available() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}".splitlines()[0]


def require_postgres() -> None:
    """Skip locally, fail in CI, when PostgreSQL is not there."""
    reason = _pg_available()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test process, dropped at the end."""
    require_postgres()
    name = f"waymark_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def _truncate_pg(hub: Hub) -> None:
    names = [t.name for t in metadata.sorted_tables] + [t.name for t in log_metadata.sorted_tables]
    with hub.engine.begin() as conn:
        existing = set(
            conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname='public'")
            ).scalars()
        )
        todo = [n for n in names if n in existing]
        if todo:
            conn.execute(text(f"TRUNCATE {', '.join(todo)} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        require_postgres()
    return str(request.param)


@pytest.fixture
def hub(
    backend: str, tmp_path: Path, clock: ManualClock, request: pytest.FixtureRequest
) -> Iterator[Hub]:
    """A migrated hub on ``backend`` with an empty state and event log."""
    if backend == "postgres":
        url = request.getfixturevalue("pg_database_url")
        settings = load_settings(environ={}, data_dir=tmp_path, database_url=url)
    else:
        settings = load_settings(environ={}, data_dir=tmp_path)
    h = Hub.open(settings, clock)
    if backend == "postgres":
        _ = h.events  # creates the log tables
        _truncate_pg(h)
    try:
        yield h
    finally:
        h.close()
    if backend == "postgres":
        _no_leaked_transactions(request.getfixturevalue("pg_database_url"))


def _no_leaked_transactions(url: str) -> None:
    """Fail the test that left connections open in a transaction (after the hub closed, only
    a connection never given back can be): they would block the next test's TRUNCATE for
    ever. They are ended first, so the tests after it run."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        left = admin.execute(
            "SELECT pid, state, left(query, 300) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%%'",
            [name],
        ).fetchall()
        for pid, _state, _query in left:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    if left:
        shown = "; ".join(f"{state}: {query}" for _pid, state, query in left)
        pytest.fail(f"the test left {len(left)} connection(s) in a transaction: {shown}")
