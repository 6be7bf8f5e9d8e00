"""The ingestion entry points used by the API and CLI: parse, validate, store, in one call."""

from __future__ import annotations

from datetime import datetime

from waymark.hub import Hub
from waymark.identity.graph import MergePolicy
from waymark.ingestion.mover import FlushStats, flush_hub
from waymark.ingestion.payloads import (
    Limits,
    Parsed,
    parse_native_events,
    parse_native_profiles,
    parse_segment_call,
)
from waymark.ingestion.service import IngestResult, ingest_events, ingest_profiles
from waymark.model.events import Event, ProfileRecord
from waymark.profiles.schema_store import current_schema


def limits_of(hub: Hub) -> Limits:
    """The per-item limits configured for this hub."""
    s = hub.settings
    return Limits(max_event_bytes=s.max_event_bytes, max_future=s.max_future, max_past=s.max_past)


def policy_of(hub: Hub) -> MergePolicy:
    """The identity merge policy configured for this hub."""
    priority = {k: tuple(v) for k, v in hub.settings.source_priority.items()}
    return MergePolicy(
        source_priority={k: v for k, v in priority.items() if k != "*"},
        default_source_priority=priority.get("*", ()),
        max_identities=hub.settings.identity_graph_limit,
    )


class Ingestor:
    """Stores parsed batches for one hub; every call is one transaction."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.limits = limits_of(hub)
        self.policy = policy_of(hub)

    def store_events(self, workspace_id: str, parsed: Parsed[Event]) -> IngestResult:
        """Validate, deduplicate and durably store events; returns per-item outcomes."""
        with self.hub.tx() as conn:
            schema = current_schema(conn, workspace_id).schema
            return ingest_events(
                conn,
                workspace_id=workspace_id,
                parsed=parsed,
                schema=schema,
                policy=self.policy,
                now=self.hub.clock.now(),
                shared_event_log=self.hub.settings.shared_event_log,
            )

    def store_profiles(
        self, workspace_id: str, parsed: Parsed[ProfileRecord], *, lenient: bool = False
    ) -> IngestResult:
        """Validate and apply profile records."""
        with self.hub.tx() as conn:
            schema = current_schema(conn, workspace_id).schema
            return ingest_profiles(
                conn,
                workspace_id=workspace_id,
                parsed=parsed,
                schema=schema,
                policy=self.policy,
                now=self.hub.clock.now(),
                lenient=lenient,
                shared_event_log=self.hub.settings.shared_event_log,
            )

    def segment(
        self,
        workspace_id: str,
        call_type: str,
        body: object,
        *,
        received_at: datetime | None = None,
    ) -> IngestResult:
        """One Segment-spec call (``track`` ... or ``batch``)."""
        parsed = parse_segment_call(
            call_type,
            body,
            workspace_id=workspace_id,
            received_at=received_at or self.hub.clock.now(),
            limits=self.limits,
        )
        return self.store_events(workspace_id, parsed)

    def native_events(self, workspace_id: str, body: object) -> IngestResult:
        """``{"events": [...]}`` in Waymark's own format."""
        parsed = parse_native_events(
            body, workspace_id=workspace_id, received_at=self.hub.clock.now(), limits=self.limits
        )
        return self.store_events(workspace_id, parsed)

    def native_profiles(self, workspace_id: str, body: object) -> IngestResult:
        """``{"profiles": [...]}`` in Waymark's own format."""
        parsed = parse_native_profiles(body, received_at=self.hub.clock.now(), limits=self.limits)
        return self.store_profiles(workspace_id, parsed)

    def flush(self) -> FlushStats:
        """Move acknowledged events from the inbox to the event log."""
        return flush_hub(self.hub)
