"""Hand-written statements for the ingestion hot path, on the DBAPI cursor.

SQLAlchemy's per-parameter processing costs more than the database work for these small,
frequent statements, so the two per-event writes (claiming message ids, queueing events in
the inbox) bypass it. Everything else goes through SQLAlchemy Core.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from waymark.storage.tables import sqlite_time

_CHUNK = 500


def _time(conn: Connection, value: datetime) -> Any:
    return sqlite_time(value) if conn.dialect.name == "sqlite" else value


def claim_message_ids(
    conn: Connection, workspace_id: str, message_ids: Sequence[str], at: datetime
) -> set[str]:
    """Record ``message_ids`` as seen; return those not seen before (the caller's to store).

    SQLite holds the write lock for the whole transaction (``BEGIN IMMEDIATE``), so a read then
    an insert cannot race; PostgreSQL uses one ``ON CONFLICT DO NOTHING RETURNING`` statement,
    which settles concurrent claims of the same id in favour of exactly one transaction.
    """
    if not message_ids:
        return set()
    when = _time(conn, at)
    if conn.dialect.name == "postgresql":
        rows = conn.exec_driver_sql(
            "INSERT INTO seen_messages (workspace_id, message_id, received_at) "
            "SELECT %s, m, %s FROM unnest(%s::text[]) AS m "
            "ON CONFLICT (workspace_id, message_id) DO NOTHING RETURNING message_id",
            (workspace_id, when, list(message_ids)),
        )
        return {r[0] for r in rows}
    seen: set[str] = set()
    for i in range(0, len(message_ids), _CHUNK):
        chunk = list(message_ids[i : i + _CHUNK])
        marks = ",".join("?" * len(chunk))
        seen.update(
            r[0]
            for r in conn.exec_driver_sql(
                "SELECT message_id FROM seen_messages WHERE workspace_id = ? "
                f"AND message_id IN ({marks})",
                (workspace_id, *chunk),
            )
        )
    fresh = [m for m in dict.fromkeys(message_ids) if m not in seen]
    if fresh:
        conn.exec_driver_sql(
            "INSERT INTO seen_messages (workspace_id, message_id, received_at) VALUES (?, ?, ?)",
            [(workspace_id, m, when) for m in fresh],
        )
    return set(fresh)


INBOX_COLUMNS = (
    "workspace_id",
    "profile_id",
    "message_id",
    "type",
    "name",
    "timestamp",
    "received_at",
    "identities",
    "properties",
    "traits",
    "context",
    "flags",
    "source",
    "previous_id",
    "group_id",
)


def insert_inbox(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Queue accepted events (``event_inbox`` columns but ``seq``) in one executemany."""
    if not rows:
        return
    mark = "%s" if conn.dialect.name == "postgresql" else "?"
    sql = (
        f"INSERT INTO event_inbox ({', '.join(INBOX_COLUMNS)}) "
        f"VALUES ({', '.join([mark] * len(INBOX_COLUMNS))})"
    )
    times = ("timestamp", "received_at")
    conn.exec_driver_sql(
        sql,
        [tuple(_time(conn, r[c]) if c in times else r[c] for c in INBOX_COLUMNS) for r in rows],
    )
