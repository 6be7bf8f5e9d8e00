"""Dialect-aware ``INSERT ... ON CONFLICT`` for the two state-store backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


def upsert(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    keys: Sequence[str],
    update: Sequence[str] = (),
) -> None:
    """Insert ``rows``; on a key conflict update the ``update`` columns (or do nothing)."""
    if not rows:
        return
    dialect = conn.dialect.name
    stmt: Any
    if dialect == "postgresql":
        pg = postgresql.insert(table)
        stmt = (
            pg.on_conflict_do_update(
                index_elements=list(keys), set_={c: pg.excluded[c] for c in update}
            )
            if update
            else pg.on_conflict_do_nothing(index_elements=list(keys))
        )
    elif dialect == "sqlite":
        lite = sqlite.insert(table)
        stmt = (
            lite.on_conflict_do_update(
                index_elements=list(keys), set_={c: lite.excluded[c] for c in update}
            )
            if update
            else lite.on_conflict_do_nothing(index_elements=list(keys))
        )
    else:  # pragma: no cover - guarded by create_state_engine
        raise NotImplementedError(dialect)
    conn.execute(stmt, list(rows))
