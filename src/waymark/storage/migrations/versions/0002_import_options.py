"""imports are identified by the file's content and the options it was read with

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 23:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("imports") as batch:
        batch.add_column(
            sa.Column("options_sha256", sa.String(length=64), nullable=False, server_default="")
        )
        batch.drop_constraint("uq_imports_workspace_id_kind_file_sha256", type_="unique")
        batch.create_unique_constraint(
            "uq_imports_workspace_id_kind_file_sha256_options_sha256",
            ["workspace_id", "kind", "file_sha256", "options_sha256"],
        )


def downgrade() -> None:
    with op.batch_alter_table("imports") as batch:
        batch.drop_constraint(
            "uq_imports_workspace_id_kind_file_sha256_options_sha256", type_="unique"
        )
        batch.create_unique_constraint(
            "uq_imports_workspace_id_kind_file_sha256", ["workspace_id", "kind", "file_sha256"]
        )
        batch.drop_column("options_sha256")
