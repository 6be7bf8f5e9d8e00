"""Migrations keep the rows they rebuild (SQLite)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import text

from waymark.storage.database import _alembic_config, create_state_engine, migrate, write_tx

REBUILT = ("seen_messages",)
KEPT = ("identities", "consents")


def _layout(conn: object) -> dict[str, bool]:
    rows = conn.execute(  # type: ignore[attr-defined]
        text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name IN ({})".format(
                ", ".join(f"'{t}'" for t in REBUILT + KEPT)
            )
        )
    ).all()
    return {name: sql.rstrip().endswith("WITHOUT ROWID") for name, sql in rows}


def test_without_rowid_rebuild_keeps_rows_and_indexes_both_ways(tmp_path: Path) -> None:
    engine = create_state_engine(f"sqlite:///{tmp_path / 'state.db'}")
    with write_tx(engine) as conn:
        cfg = _alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
        conn.execute(
            text(
                "INSERT INTO workspaces (id, name, settings, created_at) "
                "VALUES ('w', 'shop', '{}', '2026-01-01 00:00:00.000000')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO seen_messages VALUES ('w', 'm1', '2026-01-01 00:00:00.000000'), "
                "('w', 'm2', '2026-01-02 00:00:00.000000')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO identities VALUES "
                "('w', 'email', 'a@example.com', 'p1', '2026-01-01 00:00:00.000000')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO consents VALUES "
                "('w', 'p1', 'email', 'marketing', 'opted_in', '2026-01-01 00:00:00.000000', 'api')"
            )
        )
        assert _layout(conn) == dict.fromkeys(REBUILT + KEPT, False)
    migrate(engine)
    with engine.connect() as conn:
        assert _layout(conn) == {**dict.fromkeys(REBUILT, True), **dict.fromkeys(KEPT, False)}
        assert conn.execute(text("SELECT count(*) FROM seen_messages")).scalar() == 2
        assert conn.execute(text("SELECT profile_id FROM identities")).scalar() == "p1"
        assert conn.execute(text("SELECT status FROM consents")).scalar() == "opted_in"
        indexes = set(
            conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'index'")).scalars()
        )
        assert {"ix_seen_messages_received", "ix_identities_profile", "ix_consents_profile"} <= (
            indexes
        )
        # a message id is found through the table's own key
        plan = conn.execute(
            text(
                "EXPLAIN QUERY PLAN SELECT * FROM seen_messages WHERE workspace_id = 'w' "
                "AND message_id = 'm1'"
            )
        ).all()
        assert "PRIMARY KEY" in " ".join(str(r[-1]) for r in plan)
    with write_tx(engine) as conn:
        cfg = _alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
        assert _layout(conn) == dict.fromkeys(REBUILT + KEPT, False)
        assert conn.execute(text("SELECT count(*) FROM seen_messages")).scalar() == 2
    engine.dispose()
