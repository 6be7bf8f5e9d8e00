"""audiences, memberships, membership changes and batch runs

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 23:48:19
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import waymark.storage.tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "audience_changes",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("audience_id", sa.String(length=36), nullable=False),
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("change", sa.String(length=16), nullable=False),
        sa.Column("at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audience_changes")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("audience_changes", schema=None) as batch_op:
        batch_op.create_index(
            "ix_audience_changes_member",
            ["workspace_id", "audience_id", "profile_id"],
            unique=False,
        )
        batch_op.create_index(
            "ix_audience_changes_profile", ["workspace_id", "profile_id"], unique=False
        )

    op.create_table(
        "audience_members",
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("audience_id", sa.String(length=36), nullable=False),
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("realized_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("exited_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint(
            "workspace_id", "audience_id", "profile_id", name=op.f("pk_audience_members")
        ),
    )
    with op.batch_alter_table("audience_members", schema=None) as batch_op:
        batch_op.create_index(
            "ix_audience_members_profile", ["workspace_id", "profile_id"], unique=False
        )

    op.create_table(
        "audience_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("audience_id", sa.String(length=36), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("as_of", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("members", sa.BigInteger(), nullable=True),
        sa.Column("realized", sa.BigInteger(), nullable=True),
        sa.Column("exited", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.String(length=2000), nullable=True),
        sa.Column("started_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audience_runs")),
    )
    with op.batch_alter_table("audience_runs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_audience_runs_audience", ["workspace_id", "audience_id", "started_at"], unique=False
        )

    op.create_table(
        "audiences",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=1000), nullable=False),
        sa.Column(
            "definition",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("schedule", sa.String(length=100), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("last_run_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"], ["workspaces.id"], name=op.f("fk_audiences_workspace_id_workspaces")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audiences")),
        sa.UniqueConstraint("workspace_id", "name", name=op.f("uq_audiences_workspace_id_name")),
    )


def downgrade() -> None:

    op.drop_table("audiences")
    with op.batch_alter_table("audience_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_audience_runs_audience")

    op.drop_table("audience_runs")
    with op.batch_alter_table("audience_members", schema=None) as batch_op:
        batch_op.drop_index("ix_audience_members_profile")

    op.drop_table("audience_members")
    with op.batch_alter_table("audience_changes", schema=None) as batch_op:
        batch_op.drop_index("ix_audience_changes_profile")
        batch_op.drop_index("ix_audience_changes_member")

    op.drop_table("audience_changes")
