"""The inbox remembers the log ``seq`` a moved event was folded with

The embedded mover commits a batch's streaming fold before it appends the batch to the
DuckDB log (so memberships change without waiting for the append). Until the append, each
folded inbox row carries the log number it was folded with and will be appended with; a
crash in between is recovered by appending those rows with those numbers, not folding them
again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "event_inbox",
        sa.Column("log_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
    )


def downgrade() -> None:
    stamped = (
        op.get_bind()
        .execute(sa.text("SELECT count(*) FROM event_inbox WHERE log_seq IS NOT NULL"))
        .scalar()
    )
    if stamped:
        raise RuntimeError(
            f"{stamped} inbox rows are folded and not yet in the event log: run the mover "
            "(`waymark flush`) on this version before downgrading"
        )
    # a plain DROP COLUMN (SQLite 3.35+): a batch copy would drop the table's AUTOINCREMENT
    op.drop_column("event_inbox", "log_seq")
