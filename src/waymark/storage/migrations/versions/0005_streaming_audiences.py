"""streaming audiences: per-profile states with timers, the recheck queue, build progress

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 05:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import waymark.storage.tables

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stream_states",
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("states", sa.Text(), nullable=False),
        sa.Column("due", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.Column("seen", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "profile_id", name=op.f("pk_stream_states")),
    )
    with op.batch_alter_table("stream_states", schema=None) as batch_op:
        batch_op.create_index("ix_stream_states_due", ["due"], unique=False)
    op.create_table(
        "stream_recheck",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("replay", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_stream_recheck")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("audiences", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stream_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("stream_through", sa.String(length=36), nullable=True))
        batch_op.add_column(
            sa.Column("stream_ready", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("audiences", schema=None) as batch_op:
        batch_op.drop_column("stream_ready")
        batch_op.drop_column("stream_through")
        batch_op.drop_column("stream_key")
    op.drop_table("stream_recheck")
    with op.batch_alter_table("stream_states", schema=None) as batch_op:
        batch_op.drop_index("ix_stream_states_due")
    op.drop_table("stream_states")
