"""The same people loaded into DuckDB and PostgreSQL, and the members each evaluator finds."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import duckdb
import orjson
import psycopg

from tests.segmentation.data import Person
from waymark.segmentation.compile.memory import MemoryEvent, ProfileData, evaluate
from waymark.segmentation.compile.sql import compile_sql, to_sql
from waymark.segmentation.lang.ast import Expr

WORKSPACE = "ws-audiences"

_DUCK_TABLES = """
CREATE TABLE profiles (workspace_id VARCHAR, id VARCHAR, attributes VARCHAR);
CREATE TABLE events (workspace_id VARCHAR, profile_id VARCHAR, name VARCHAR,
                     "timestamp" TIMESTAMPTZ, seq BIGINT, properties VARCHAR);
CREATE TABLE consents (workspace_id VARCHAR, profile_id VARCHAR, channel VARCHAR,
                       purpose VARCHAR, status VARCHAR);
"""

_PG_TABLES = """
CREATE SCHEMA IF NOT EXISTS audience_eq;
SET search_path TO audience_eq;
DROP TABLE IF EXISTS profiles, events, consents;
CREATE TABLE profiles (workspace_id text, id text, attributes jsonb);
CREATE TABLE events (workspace_id text, profile_id text, name text,
                     "timestamp" timestamptz, seq bigint, properties jsonb);
CREATE TABLE consents (workspace_id text, profile_id text, channel text,
                       purpose text, status text);
"""


def _rows(
    people: Sequence[Person], workspace: str
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]:
    profiles = [(workspace, p.profile_id, orjson.dumps(p.attributes).decode()) for p in people]
    # a profile of another workspace with the same data must never be a member
    profiles += [
        ("other", p.profile_id + "-x", orjson.dumps(p.attributes).decode()) for p in people
    ]
    events = [
        (workspace, p.profile_id, e.name, e.timestamp, e.seq, orjson.dumps(e.properties).decode())
        for p in people
        for e in p.events
    ]
    consents = [
        (workspace, p.profile_id, channel, purpose, status)
        for p in people
        for (channel, purpose), status in p.consents.items()
    ]
    return profiles, events, consents


class DuckEngine:
    def __init__(self) -> None:
        self.conn = duckdb.connect()
        self.conn.execute("SET TimeZone = 'UTC'")
        self.conn.execute(_DUCK_TABLES)
        self.conn.execute("CREATE SCHEMA scoped")
        for table in ("profiles", "consents"):
            self.conn.execute(
                f"CREATE VIEW scoped.{table} AS SELECT * FROM main.{table} "
                f"WHERE workspace_id = '{WORKSPACE}'"
            )
        self.conn.execute("CREATE VIEW scoped.events AS SELECT * FROM main.events")

    def load(self, people: Sequence[Person]) -> None:
        profiles, events, consents = _rows(people, WORKSPACE)
        for table in ("profiles", "events", "consents"):
            self.conn.execute(f"DELETE FROM {table}")
        if profiles:
            self.conn.executemany("INSERT INTO profiles VALUES (?, ?, ?)", profiles)
        if events:
            self.conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", events)
        if consents:
            self.conn.executemany("INSERT INTO consents VALUES (?, ?, ?, ?, ?)", consents)

    def members(self, expr: Expr, now: datetime) -> set[str]:
        query = to_sql(expr, workspace_id=WORKSPACE, now=now, dialect="duckdb")
        found = {row[0] for row in self.conn.execute(query).fetchall()}
        # as the embedded log runs it: profiles and consents of this workspace only
        scoped = compile_sql(
            expr, workspace_id=WORKSPACE, now=now, dialect="duckdb", state_scoped=True
        ).sql(dialect="duckdb")
        self.conn.execute("SET search_path = 'scoped'")
        try:
            alike = {row[0] for row in self.conn.execute(scoped).fetchall()}
        finally:
            self.conn.execute("SET search_path = 'main'")
        assert alike == found, "the query for per-workspace snapshots finds other members"
        return found


class PgEngine:
    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(
            url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
        )
        self.conn.execute(_PG_TABLES)
        self.conn.execute("SET TimeZone = 'UTC'")

    def load(self, people: Sequence[Person]) -> None:
        profiles, events, consents = _rows(people, WORKSPACE)
        with self.conn.cursor() as cur:
            cur.execute("TRUNCATE profiles, events, consents")
            cur.executemany("INSERT INTO profiles VALUES (%s, %s, %s)", profiles)
            cur.executemany("INSERT INTO events VALUES (%s, %s, %s, %s, %s, %s)", events)
            cur.executemany("INSERT INTO consents VALUES (%s, %s, %s, %s, %s)", consents)

    def members(self, expr: Expr, now: datetime) -> set[str]:
        query = to_sql(expr, workspace_id=WORKSPACE, now=now, dialect="postgres")
        return {row[0] for row in self.conn.execute(query).fetchall()}

    def close(self) -> None:
        self.conn.close()


def memory_members(expr: Expr, people: Sequence[Person], now: datetime) -> set[str]:
    found = set()
    for p in people:
        data = ProfileData(
            attributes=p.attributes,
            events=[MemoryEvent(e.name, e.timestamp, e.seq, e.properties) for e in p.events],
            consents=p.consents,
        )
        if evaluate(expr, data, now):
            found.add(p.profile_id)
    return found
