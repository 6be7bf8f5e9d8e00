"""SQLite keeps seen message ids in their primary key (WITHOUT ROWID)

A rowid table with a composite primary key is two B-trees (the rows, and the key's index);
every ingested event inserts one seen message id, so each insert touched both. Stored in the
key, it is one B-tree. PostgreSQL is unchanged.

Identities stay a rowid table on purpose: a WITHOUT ROWID table stores the whole row in its
randomly ordered key B-tree (and the whole key in its other index), and bulk imports of
millions of new identities into a database larger than the page cache measured slower.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 22:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TABLES = ("seen_messages",)


def _rebuild(table: str, *, rowid: bool) -> None:
    """Recreate ``table`` from its own definition with or without a rowid, rows and indexes
    kept (SQLite cannot change this in place)."""
    conn = op.get_bind()
    (sql,) = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).one()
    indexes = [
        r[0]
        for r in conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
            "AND sql IS NOT NULL",
            (table,),
        )
    ]
    body = sql.rstrip().removesuffix("WITHOUT ROWID").rstrip()
    op.execute(f"ALTER TABLE {table} RENAME TO _old_{table}")
    for index in conn.exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
        (f"_old_{table}",),
    ).all():
        op.execute(f"DROP INDEX {index[0]}")
    op.execute(body if rowid else f"{body} WITHOUT ROWID")
    op.execute(f"INSERT INTO {table} SELECT * FROM _old_{table}")
    op.execute(f"DROP TABLE _old_{table}")
    for index_sql in indexes:
        op.execute(index_sql)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in _TABLES:
        _rebuild(table, rowid=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in _TABLES:
        _rebuild(table, rowid=True)
