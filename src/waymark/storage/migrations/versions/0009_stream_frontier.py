"""Streaming builds remember the newest profile when they began

Profiles created after a streaming audience's build began have no history to build: they
are kept up to date from their first event, instead of waiting for the build to reach them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 20:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audiences", sa.Column("stream_frontier", sa.String(36), nullable=True))


def downgrade() -> None:
    # a plain DROP COLUMN (SQLite 3.35+), as 0008's
    op.drop_column("audiences", "stream_frontier")
