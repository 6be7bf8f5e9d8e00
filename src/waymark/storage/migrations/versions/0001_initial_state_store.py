"""initial state store

Revision ID: 0001
Revises:
Create Date: 2026-11-29 18:35:06.544020
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import waymark.storage.tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "audit_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workspace_id", sa.String(length=36), nullable=True),
        sa.Column("at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("target_type", sa.String(length=50), nullable=False),
        sa.Column("target_id", sa.String(length=255), nullable=False),
        sa.Column(
            "details",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_workspace_at", ["workspace_id", "at"], unique=False)

    op.create_table(
        "consents",
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("purpose", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("updated_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.PrimaryKeyConstraint(
            "workspace_id", "profile_id", "channel", "purpose", name=op.f("pk_consents")
        ),
    )
    with op.batch_alter_table("consents", schema=None) as batch_op:
        batch_op.create_index("ix_consents_profile", ["workspace_id", "profile_id"], unique=False)

    op.create_table(
        "event_inbox",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("timestamp", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("received_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("identities", sa.Text(), nullable=False),
        sa.Column("properties", sa.Text(), nullable=False),
        sa.Column("traits", sa.Text(), nullable=False),
        sa.Column("context", sa.Text(), nullable=False),
        sa.Column("flags", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.Column("previous_id", sa.String(length=255), nullable=True),
        sa.Column("group_id", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_event_inbox")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("event_inbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_event_inbox_profile", ["workspace_id", "profile_id"], unique=False
        )

    op.create_table(
        "identities",
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("first_seen", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "namespace", "value", name=op.f("pk_identities")),
    )
    with op.batch_alter_table("identities", schema=None) as batch_op:
        batch_op.create_index("ix_identities_profile", ["workspace_id", "profile_id"], unique=False)

    op.create_table(
        "imports",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("file_name", sa.String(length=500), nullable=False),
        sa.Column("file_sha256", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rows_committed", sa.BigInteger(), nullable=False),
        sa.Column("rows_accepted", sa.BigInteger(), nullable=False),
        sa.Column("rows_rejected", sa.BigInteger(), nullable=False),
        sa.Column("error_report", sa.String(length=1000), nullable=True),
        sa.Column("started_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imports")),
        sa.UniqueConstraint(
            "workspace_id",
            "kind",
            "file_sha256",
            name=op.f("uq_imports_workspace_id_kind_file_sha256"),
        ),
    )
    op.create_table(
        "privacy_requests",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column(
            "requested_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False
        ),
        sa.Column("completed_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column(
            "summary",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_requests")),
    )
    op.create_table(
        "profile_merges",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("absorbed_id", sa.String(length=36), nullable=False),
        sa.Column("survivor_id", sa.String(length=36), nullable=False),
        sa.Column("at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_profile_merges")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("profile_merges", schema=None) as batch_op:
        batch_op.create_index(
            "ix_profile_merges_absorbed", ["workspace_id", "absorbed_id"], unique=False
        )
        batch_op.create_index(
            "ix_profile_merges_survivor", ["workspace_id", "survivor_id"], unique=False
        )

    op.create_table(
        "seen_messages",
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("received_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "message_id", name=op.f("pk_seen_messages")),
    )
    with op.batch_alter_table("seen_messages", schema=None) as batch_op:
        batch_op.create_index("ix_seen_messages_received", ["received_at"], unique=False)

    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column(
            "settings",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workspaces")),
        sa.UniqueConstraint("name", name=op.f("uq_workspaces_name")),
    )
    op.create_table(
        "profiles",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column(
            "attributes",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "attribute_meta",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("first_seen", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("last_seen", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("created_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"], ["workspaces.id"], name=op.f("fk_profiles_workspace_id_workspaces")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profiles")),
    )
    with op.batch_alter_table("profiles", schema=None) as batch_op:
        batch_op.create_index("ix_profiles_workspace_id", ["workspace_id", "id"], unique=False)

    op.create_table(
        "schemas",
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "document",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"], ["workspaces.id"], name=op.f("fk_schemas_workspace_id_workspaces")
        ),
        sa.PrimaryKeyConstraint("workspace_id", "version", name=op.f("pk_schemas")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("created_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"], ["workspaces.id"], name=op.f("fk_users_workspace_id_workspaces")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("workspace_id", "email", name=op.f("uq_users_workspace_id_email")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "scopes",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("user_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("revoked_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", waymark.storage.tables.UtcDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_api_keys_user_id_users")),
        sa.ForeignKeyConstraint(
            ["workspace_id"], ["workspaces.id"], name=op.f("fk_api_keys_workspace_id_workspaces")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_api_keys_secret_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index("ix_api_keys_workspace", ["workspace_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_api_keys_workspace")

    op.drop_table("api_keys")
    op.drop_table("users")
    op.drop_table("schemas")
    with op.batch_alter_table("profiles", schema=None) as batch_op:
        batch_op.drop_index("ix_profiles_workspace_id")

    op.drop_table("profiles")
    op.drop_table("workspaces")
    with op.batch_alter_table("seen_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_seen_messages_received")

    op.drop_table("seen_messages")
    with op.batch_alter_table("profile_merges", schema=None) as batch_op:
        batch_op.drop_index("ix_profile_merges_survivor")
        batch_op.drop_index("ix_profile_merges_absorbed")

    op.drop_table("profile_merges")
    op.drop_table("privacy_requests")
    op.drop_table("imports")
    with op.batch_alter_table("identities", schema=None) as batch_op:
        batch_op.drop_index("ix_identities_profile")

    op.drop_table("identities")
    with op.batch_alter_table("event_inbox", schema=None) as batch_op:
        batch_op.drop_index("ix_event_inbox_profile")

    op.drop_table("event_inbox")
    with op.batch_alter_table("consents", schema=None) as batch_op:
        batch_op.drop_index("ix_consents_profile")

    op.drop_table("consents")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_workspace_at")

    op.drop_table("audit_log")
