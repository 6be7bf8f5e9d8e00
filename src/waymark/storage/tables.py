"""The state store's tables (SQLAlchemy Core). Alembic migrations create them; every row is scoped
to a workspace and every key starts with ``workspace_id``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator, TypeEngine

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def sqlite_time(value: datetime) -> str:
    """How SQLite stores an instant: fixed-width UTC text, so text order is time order.

    ``value`` must be aware. This runs several times per ingested event, mostly on a few
    instants (a batch's arrival, its events' times), so recent results are remembered.
    """
    text = _TEXTS.get(value)
    if text is None:
        utc = value if value.tzinfo is UTC else value.astimezone(UTC)
        text = utc.isoformat(" ", "microseconds")[:26]  # without the "+00:00"
        if len(_TEXTS) >= 4096:
            _TEXTS.clear()
        _TEXTS[value] = text
    return text


_TEXTS: dict[datetime, str] = {}


def read_time(value: datetime | str) -> datetime:
    """An aware UTC instant from a database value: :func:`sqlite_time` text, other ISO-8601
    text (naive means UTC), or a datetime."""
    if isinstance(value, str):
        if len(value) == 26:  # sqlite_time's form: parsing with an offset beats replace()
            return datetime.fromisoformat(value + "+00:00")
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value if value.tzinfo is UTC else value.astimezone(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite keeps :func:`sqlite_time` text (one conversion
    each way, which matters on the ingestion hot path).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(26))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return sqlite_time(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else read_time(value)


Json = JSON().with_variant(JSONB(), "postgresql")
Id = String(36)
# SQLite autoincrement needs INTEGER; tables whose sequence numbers must never be reused (the
# inbox's seq is compared with the event log's watermark) also set sqlite_autoincrement.
Big = BigInteger().with_variant(Integer(), "sqlite")

workspaces = Table(
    "workspaces",
    metadata,
    Column("id", Id, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("settings", Json, nullable=False, default=dict),
    Column("created_at", UtcDateTime, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, ForeignKey("workspaces.id"), nullable=False),
    Column("email", String(255), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    Column("role", String(20), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("disabled_at", UtcDateTime),
    UniqueConstraint("workspace_id", "email"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, ForeignKey("workspaces.id"), nullable=False),
    Column("kind", String(10), nullable=False),  # write | secret | user
    Column("name", String(200), nullable=False, default=""),
    Column("prefix", String(16), nullable=False),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("scopes", Json, nullable=False),
    Column("user_id", Id, ForeignKey("users.id")),
    Column("created_at", UtcDateTime, nullable=False),
    Column("created_by", String(100), nullable=False),
    Column("revoked_at", UtcDateTime),
    Column("last_used_at", UtcDateTime),
    Index("ix_api_keys_workspace", "workspace_id"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Big, primary_key=True, autoincrement=True),
    Column("workspace_id", Id, nullable=True),
    Column("at", UtcDateTime, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(100), nullable=False),
    Column("target_type", String(50), nullable=False),
    Column("target_id", String(255), nullable=False, default=""),
    Column("details", Json, nullable=False, default=dict),
    Index("ix_audit_log_workspace_at", "workspace_id", "at"),
    sqlite_autoincrement=True,
)

schemas = Table(
    "schemas",
    metadata,
    Column("workspace_id", Id, ForeignKey("workspaces.id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("document", Json, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("created_by", String(200), nullable=False),
)

profiles = Table(
    "profiles",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, ForeignKey("workspaces.id"), nullable=False),
    Column("attributes", Json, nullable=False),
    # per attribute: [updated_at ISO string, source]; drives the merge policy
    Column("attribute_meta", Json, nullable=False),
    Column("first_seen", UtcDateTime, nullable=False),
    Column("last_seen", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Index("ix_profiles_workspace_id", "workspace_id", "id"),
)

identities = Table(
    "identities",
    metadata,
    Column("workspace_id", Id, primary_key=True),
    Column("namespace", String(64), primary_key=True),
    Column("value", String(255), primary_key=True),
    Column("profile_id", Id, nullable=False),
    Column("first_seen", UtcDateTime, nullable=False),
    Index("ix_identities_profile", "workspace_id", "profile_id"),
)

profile_merges = Table(
    "profile_merges",
    metadata,
    Column("seq", Big, primary_key=True, autoincrement=True),
    Column("workspace_id", Id, nullable=False),
    Column("absorbed_id", Id, nullable=False),
    Column("survivor_id", Id, nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Index("ix_profile_merges_absorbed", "workspace_id", "absorbed_id"),
    Index("ix_profile_merges_survivor", "workspace_id", "survivor_id"),
    sqlite_autoincrement=True,
)

consents = Table(
    "consents",
    metadata,
    Column("workspace_id", Id, primary_key=True),
    Column("profile_id", Id, primary_key=True),
    Column("channel", String(32), primary_key=True),
    Column("purpose", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("source", String(100), nullable=False),
    Index("ix_consents_profile", "workspace_id", "profile_id"),
)

seen_messages = Table(
    "seen_messages",
    metadata,
    Column("workspace_id", Id, primary_key=True),
    Column("message_id", String(255), primary_key=True),
    Column("received_at", UtcDateTime, nullable=False),
    Index("ix_seen_messages_received", "received_at"),
    sqlite_with_rowid=False,  # one B-tree: the rows live in the key (migration 0003)
)

# Acknowledged events wait here (durable, in the state store's transaction) until the mover
# appends them to the event log; see waymark.storage.eventlog.
event_inbox = Table(
    "event_inbox",
    metadata,
    Column("seq", Big, primary_key=True, autoincrement=True),
    Column("workspace_id", Id, nullable=False),
    Column("profile_id", Id, nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("type", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("timestamp", UtcDateTime, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    # JSON text, ready to append to the log without re-encoding
    Column("identities", Text, nullable=False),
    Column("properties", Text, nullable=False),
    Column("traits", Text, nullable=False),
    Column("context", Text, nullable=False),
    Column("flags", Text, nullable=False),
    Column("source", String(100), nullable=False),
    Column("previous_id", String(255)),
    Column("group_id", String(255)),
    # the log seq the embedded mover folded the row with, until it is appended (see mover)
    Column("log_seq", Big),
    Index("ix_event_inbox_profile", "workspace_id", "profile_id"),
    sqlite_autoincrement=True,
)

imports = Table(
    "imports",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, nullable=False),
    Column("kind", String(16), nullable=False),  # profiles | events
    Column("file_name", String(500), nullable=False),
    Column("file_sha256", String(64), nullable=False),
    # how the file was read (format, encoding, column mapping): another reading is another import
    Column("options_sha256", String(64), nullable=False, server_default=""),
    Column("status", String(16), nullable=False),  # running | done | failed
    Column("rows_committed", BigInteger, nullable=False, default=0),
    Column("rows_accepted", BigInteger, nullable=False, default=0),
    Column("rows_rejected", BigInteger, nullable=False, default=0),
    Column("error_report", String(1000)),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Column("actor", String(200), nullable=False),
    UniqueConstraint("workspace_id", "kind", "file_sha256", "options_sha256"),
)

privacy_requests = Table(
    "privacy_requests",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, nullable=False),
    Column("kind", String(16), nullable=False),  # export | delete
    # a keyed hash of the subject's identity, so the record itself holds no personal data
    Column("subject_hash", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("requested_at", UtcDateTime, nullable=False),
    Column("completed_at", UtcDateTime),
    Column("actor", String(200), nullable=False),
    Column("summary", Json, nullable=False, default=dict),
)

audiences = Table(
    "audiences",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, ForeignKey("workspaces.id"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("description", String(1000), nullable=False, default=""),
    # the definition in its JSON form (the text form is derived from it, without loss)
    Column("definition", Json, nullable=False),
    Column("mode", String(16), nullable=False),  # streaming | batch
    Column("schedule", String(100)),  # cron, for batch audiences
    Column("version", Integer, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("last_run_at", UtcDateTime),
    # streaming audiences: the key of the compiled definition (expanded) whose states are being
    # or have been built, how far the build has gone (profile id), and whether it is complete;
    # a NULL key asks ``waymark serve`` to rebuild (see waymark.segmentation.live); the
    # frontier is the newest profile id when the build began: newer profiles are kept up to
    # date from their first event, the build goes no further
    Column("stream_key", String(64)),
    Column("stream_through", Id),
    Column("stream_frontier", Id),
    Column("stream_ready", Boolean, nullable=False, default=False, server_default=false()),
    UniqueConstraint("workspace_id", "name"),
)

audience_members = Table(
    "audience_members",
    metadata,
    Column("workspace_id", Id, primary_key=True),
    Column("audience_id", Id, primary_key=True),
    Column("profile_id", Id, primary_key=True),
    Column("status", String(16), nullable=False),  # realized | exited
    Column("realized_at", UtcDateTime, nullable=False),
    Column("exited_at", UtcDateTime),
    Index("ix_audience_members_profile", "workspace_id", "profile_id"),
)

# Every membership change, in order: the history of a membership and the internal stream that
# journeys, destinations and reports read from their own watermark (``seq``).
audience_changes = Table(
    "audience_changes",
    metadata,
    Column("seq", Big, primary_key=True, autoincrement=True),
    Column("workspace_id", Id, nullable=False),
    Column("audience_id", Id, nullable=False),
    Column("profile_id", Id, nullable=False),
    Column("change", String(16), nullable=False),  # realized | exited
    Column("at", UtcDateTime, nullable=False),
    Column("run_id", Id),  # the batch run that found it (none for streaming)
    Index("ix_audience_changes_member", "workspace_id", "audience_id", "profile_id"),
    Index("ix_audience_changes_profile", "workspace_id", "profile_id"),
    sqlite_autoincrement=True,
)

audience_runs = Table(
    "audience_runs",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, nullable=False),
    Column("audience_id", Id, nullable=False),
    Column("trigger", String(16), nullable=False),  # schedule | manual
    Column("as_of", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False),  # running | done | failed
    Column("members", BigInteger),
    Column("realized", BigInteger),
    Column("exited", BigInteger),
    Column("error", String(2000)),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Column("actor", String(200), nullable=False),
    Index("ix_audience_runs_audience", "workspace_id", "audience_id", "started_at"),
)

# Streaming audiences: per profile, the JSON states of every streaming audience (audience id ->
# state) and the earliest instant at which time alone may change one of its memberships.
stream_states = Table(
    "stream_states",
    metadata,
    Column("workspace_id", Id, primary_key=True),
    Column("profile_id", Id, primary_key=True),
    Column("states", Text, nullable=False),
    Column("due", UtcDateTime),
    # the profile's updated_at when its memberships were last evaluated: attribute-reading
    # audiences are evaluated again only once it differs
    Column("seen", UtcDateTime),
    Column("updated_at", UtcDateTime, nullable=False),
    Index("ix_stream_states_due", "due"),
)

# Profiles whose streaming memberships must be evaluated again: their attributes changed outside
# the event stream, or (``replay``) their states must be rebuilt from their history (a merge).
stream_recheck = Table(
    "stream_recheck",
    metadata,
    Column("seq", Big, primary_key=True, autoincrement=True),
    Column("workspace_id", Id, nullable=False),
    Column("profile_id", Id, nullable=False),
    Column("replay", Boolean, nullable=False),
    sqlite_autoincrement=True,
)

# -- delivery ---------------------------------------------------------------------------------

# Message templates (waymark.delivery.templates), saved after being checked against the schema.
templates = Table(
    "templates",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, ForeignKey("workspaces.id"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("definition", Json, nullable=False),  # TemplateDef.to_json()
    Column("version", Integer, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("created_by", String(200), nullable=False),
    UniqueConstraint("workspace_id", "name"),
)

# Reusable pieces of templates, included with {% render "name" %}.
template_fragments = Table(
    "template_fragments",
    metadata,
    Column("workspace_id", Id, ForeignKey("workspaces.id"), primary_key=True),
    Column("name", String(100), primary_key=True),
    Column("source", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("updated_by", String(200), nullable=False),
)

# A workspace's delivery rules (waymark.delivery.rules): read in the transaction of every
# decision, so a change applies to the very next message.
delivery_rules = Table(
    "delivery_rules",
    metadata,
    Column("workspace_id", Id, ForeignKey("workspaces.id"), primary_key=True),
    Column("document", Json, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("updated_by", String(200), nullable=False),
)

# Addresses no message may reach (per channel): hard bounces, complaints, unsubscribes, manual
# entries, repeated soft bounces. ``profile_id`` names the profile the entry came from, if any.
suppressions = Table(
    "suppressions",
    metadata,
    Column("workspace_id", Id, primary_key=True),
    Column("channel", String(16), primary_key=True),
    Column("address", String(320), primary_key=True),
    Column("reason", String(32), nullable=False),
    Column("detail", String(1000), nullable=False, default=""),
    Column("source", String(200), nullable=False),
    Column("profile_id", Id),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_suppressions_profile", "workspace_id", "profile_id"),
)

# Every message: the transactional outbox the dispatcher reads (``status`` queued or held, due
# at ``next_attempt_at``) and the message log. ``idempotency_key`` makes writing the same send
# intent twice return the first message. ``counted_at`` is set while the message counts toward
# the frequency caps (admitted to be sent); caps count these rows, per profile.
messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, nullable=False),
    Column("idempotency_key", String(255), nullable=False),
    Column("profile_id", Id, nullable=False),
    Column("channel", String(16), nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("transactional", Boolean, nullable=False),
    Column("template_id", Id),
    Column("template_version", Integer),
    Column("source_kind", String(16), nullable=False),  # journey | campaign | test | api
    Column("source_id", String(255), nullable=False, default=""),
    Column("to_address", Text),
    Column("content", Text),  # the rendered content, JSON
    # queued | held | sending | sent | delivered | failed | excluded | dead | cancelled
    Column("status", String(16), nullable=False),
    Column("reason", String(32)),  # why excluded or failed (a machine code)
    Column("rule", String(100)),  # the cap or quiet hours window that excluded or held it
    Column("detail", String(2000), nullable=False, default=""),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UtcDateTime),
    Column("lease_until", UtcDateTime),
    Column("provider", String(64)),
    Column("provider_id", String(255)),
    Column("counted_at", UtcDateTime),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("sent_at", UtcDateTime),
    UniqueConstraint("workspace_id", "idempotency_key"),
    Index("ix_messages_due", "status", "next_attempt_at"),
    Index("ix_messages_counted", "workspace_id", "profile_id", "counted_at"),
    Index("ix_messages_provider_id", "workspace_id", "provider", "provider_id"),
    Index("ix_messages_source", "workspace_id", "source_kind", "source_id"),
)

# The status history of every message, in order.
message_events = Table(
    "message_events",
    metadata,
    Column("seq", Big, primary_key=True, autoincrement=True),
    Column("workspace_id", Id, nullable=False),
    Column("message_id", Id, nullable=False),
    Column("profile_id", Id, nullable=False),
    Column("status", String(16), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("detail", Json, nullable=False, default=dict),
    Index("ix_message_events_message", "workspace_id", "message_id"),
    Index("ix_message_events_profile", "workspace_id", "profile_id"),
    sqlite_autoincrement=True,
)

# Messages whose transient failures outlasted their retries: kept for inspection and replay.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("message_id", Id, primary_key=True),
    Column("workspace_id", Id, nullable=False),
    Column("profile_id", Id, nullable=False),
    Column("provider", String(64), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", String(2000), nullable=False),
    Column("failed_at", UtcDateTime, nullable=False),
    Column("replayed_at", UtcDateTime),
    Index("ix_dead_letters_workspace", "workspace_id", "failed_at"),
)

# Push addresses of a profile: Web Push subscriptions (JSON: endpoint and keys) and FCM device
# tokens; one message goes to each. A subscription the push service reports gone is deleted.
push_subscriptions = Table(
    "push_subscriptions",
    metadata,
    Column("id", Id, primary_key=True),
    Column("workspace_id", Id, nullable=False),
    Column("profile_id", Id, nullable=False),
    Column("kind", String(16), nullable=False),  # webpush | fcm
    Column("address", Text, nullable=False),
    Column("address_hash", String(64), nullable=False),  # sha256 of address: one row per address
    Column("label", String(200), nullable=False, default=""),  # browser or app, for people
    Column("created_at", UtcDateTime, nullable=False),
    Column("last_seen_at", UtcDateTime, nullable=False),
    UniqueConstraint("workspace_id", "address_hash"),
    Index("ix_push_subscriptions_profile", "workspace_id", "profile_id"),
)

# The in-app inbox: cards delivered to a profile, read and dismissed through the API.
inbox_messages = Table(
    "inbox_messages",
    metadata,
    Column("message_id", Id, primary_key=True),
    Column("workspace_id", Id, nullable=False),
    Column("profile_id", Id, nullable=False),
    Column("content", Json, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("read_at", UtcDateTime),
    Column("dismissed_at", UtcDateTime),
    Column("expires_at", UtcDateTime),
    Index("ix_inbox_messages_profile", "workspace_id", "profile_id", "created_at"),
)

#: Delivery tables whose rows follow a profile into the survivor when it is merged (their
#: ``profile_id`` is updated in the merge's transaction): caps count across both, the message
#: log and the inbox show both.
FOLLOW_MERGE_TABLES: tuple[Table, ...] = (
    messages,
    message_events,
    dead_letters,
    suppressions,
    push_subscriptions,
    inbox_messages,
)

#: Tables holding data about a person, with the column naming that person's profile. The
#: privacy deletion test walks every table of ``metadata`` and requires each to be listed here
#: or in ``PERSON_FREE_TABLES``, so a new table cannot silently escape deletion.
PERSON_TABLES: dict[str, str] = {
    "profiles": "id",
    "identities": "profile_id",
    "consents": "profile_id",
    "event_inbox": "profile_id",
    "profile_merges": "survivor_id",
    "audience_members": "profile_id",
    "audience_changes": "profile_id",
    "stream_states": "profile_id",
    "stream_recheck": "profile_id",
    "suppressions": "profile_id",
    "messages": "profile_id",
    "message_events": "profile_id",
    "dead_letters": "profile_id",
    "push_subscriptions": "profile_id",
    "inbox_messages": "profile_id",
}
PERSON_FREE_TABLES: frozenset[str] = frozenset(
    {
        "workspaces",
        "users",
        "api_keys",
        "audit_log",
        "schemas",
        "seen_messages",
        "imports",
        "privacy_requests",
        "audiences",
        "audience_runs",
        "templates",
        "template_fragments",
        "delivery_rules",
    }
)
