"""PostgreSQL: keep the planner's statistics of the outbox tables fresh as they grow

The outbox and the status history grow by a campaign's size at once; with the default
thresholds (a tenth of the table) the planner plans for a table many times smaller for
minutes, and reads whole workspaces where an index finds one key.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 08:50:00
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TABLES = ("messages", "message_events", "event_inbox")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(
            f"ALTER TABLE {table} SET (autovacuum_analyze_scale_factor = 0.01, "
            "autovacuum_analyze_threshold = 1000)"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(
            f"ALTER TABLE {table} RESET (autovacuum_analyze_scale_factor, "
            "autovacuum_analyze_threshold)"
        )
