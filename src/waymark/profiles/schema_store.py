"""Versioned workspace schemas: every save is a new version; the newest is in force."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select

from waymark.access.service import record_audit
from waymark.model.schemas import (
    Schema,
    diff_compatible,
    parse_schema,
    with_builtin_events,
    without_builtin_events,
)
from waymark.storage.hotpath import fetch_rows
from waymark.storage.tables import schemas


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One saved version of a workspace's schema."""

    version: int
    schema: Schema
    created_at: datetime | None
    created_by: str
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "schema": self.schema.to_json(),
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "created_by": self.created_by,
            "warnings": list(self.warnings),
        }


def current_schema(conn: Connection, workspace_id: str) -> SchemaVersion:
    """The schema in force (version 0, empty and accepting, before any is saved)."""
    row = conn.execute(
        select(schemas)
        .where(schemas.c.workspace_id == workspace_id)
        .order_by(schemas.c.version.desc())
        .limit(1)
    ).first()
    if row is None:
        return SchemaVersion(0, _EMPTY, None, "")
    return SchemaVersion(
        row.version,
        with_builtin_events(parse_schema(row.document)),
        row.created_at,
        row.created_by,
    )


def schema_in_force(conn: Connection, workspace_id: str) -> tuple[int, Schema]:
    """``(version, schema)`` in force, for the ingestion hot path: one look-up of the newest
    version number; the document is read and compiled only when that version is new here."""
    mark = "%s" if conn.dialect.name == "postgresql" else "?"
    # on the driver's cursor: SQLAlchemy's statement machinery cost more than the look-up
    (version,) = fetch_rows(
        conn, f"SELECT max(version) FROM schemas WHERE workspace_id = {mark}", (workspace_id,)
    )[0]
    if version is None:
        return 0, _EMPTY
    key = (workspace_id, int(version))
    compiled = _COMPILED.get(key)
    if compiled is None:
        document = conn.execute(
            select(schemas.c.document).where(
                schemas.c.workspace_id == workspace_id, schemas.c.version == version
            )
        ).scalar_one()
        compiled = with_builtin_events(parse_schema(document))
        if len(_COMPILED) >= 256:
            _COMPILED.clear()
        _COMPILED[key] = compiled
    return int(version), compiled


_EMPTY = with_builtin_events(Schema.empty())
_COMPILED: dict[tuple[str, int], Schema] = {}  # versions never change once saved


def schema_history(conn: Connection, workspace_id: str) -> list[SchemaVersion]:
    """Every saved version, oldest first."""
    rows = conn.execute(
        select(schemas).where(schemas.c.workspace_id == workspace_id).order_by(schemas.c.version)
    )
    return [
        SchemaVersion(
            r.version, with_builtin_events(parse_schema(r.document)), r.created_at, r.created_by
        )
        for r in rows
    ]


def save_schema(
    conn: Connection, *, workspace_id: str, document: object, actor: str, at: datetime
) -> SchemaVersion:
    """Validate ``document`` and save it as the next version.

    Raises :class:`~waymark.core.errors.InvalidInput` with the path of each problem; returns the
    new version with warnings about breaking changes against the previous one.
    """
    declared = without_builtin_events(parse_schema(document))
    schema = with_builtin_events(declared)
    previous = current_schema(conn, workspace_id)
    warnings = tuple(diff_compatible(previous.schema, schema)) if previous.version else ()
    latest = conn.execute(
        select(func.max(schemas.c.version)).where(schemas.c.workspace_id == workspace_id)
    ).scalar()
    version = int(latest or 0) + 1
    conn.execute(
        insert(schemas).values(
            workspace_id=workspace_id,
            version=version,
            document=declared.to_json(),
            created_at=at,
            created_by=actor,
        )
    )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="schema.save",
        target_type="schema",
        target_id=str(version),
        details={"warnings": list(warnings)},
        at=at,
    )
    return SchemaVersion(version, schema, at, actor, warnings)
