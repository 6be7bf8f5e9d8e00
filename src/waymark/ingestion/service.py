"""Ingesting events and profile records: one micro-batch, one state-store transaction.

The order inside the transaction is what makes retries safe: items are validated first (pure),
then their ``message_id``\\ s are claimed in ``seen_messages`` with ``ON CONFLICT DO NOTHING
RETURNING`` (so two concurrent batches carrying the same id cannot both win), then identities
are resolved and the claimed events are written to the inbox. Commit = durable = acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, insert

from waymark.core.errors import Issue
from waymark.identity.graph import IdentityConflict, MergePolicy
from waymark.identity.service import ProfileWriter
from waymark.ingestion.payloads import ItemError, Parsed
from waymark.model.events import Event, EventType, Identity, ProfileRecord, normalize_identity
from waymark.model.json import unstorable
from waymark.model.schemas import Schema, validate_attributes, validate_event
from waymark.storage.hotpath import claim_message_ids, inbox_row, insert_inbox, time_converter
from waymark.storage.tables import stream_recheck

_CHUNK = 400


@dataclass
class IngestResult:
    """The outcome of one batch: counts, and each rejected item with its reasons."""

    accepted: int = 0
    duplicates: int = 0
    rejected: list[ItemError] = field(default_factory=list)
    profiles_created: int = 0
    profiles_merged: int = 0
    conflicts: list[IdentityConflict] = field(default_factory=list)
    profile_ids: list[str] = field(default_factory=list)
    #: item indices stored, and item indices skipped as already seen
    accepted_indices: list[int] = field(default_factory=list)
    duplicate_indices: list[int] = field(default_factory=list)
    conflict_indices: list[int | None] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The API's answer for this batch."""
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": [
                {
                    "index": e.index,
                    "errors": [
                        {"path": i.path, "reason": i.reason, "code": i.code} for i in e.issues
                    ],
                }
                for e in self.rejected
            ],
            "identity_conflicts": [
                {"identity": str(c.identity), "kept_by": c.owner_id, "because": str(c.prevailing)}
                for c in self.conflicts
            ],
        }


def validate_event_item(schema: Schema, event: Event) -> Event | tuple[Issue, ...]:
    """Check one event against the workspace schema; return it coerced and flagged, or issues.

    NUL characters are refused everywhere (PostgreSQL cannot store them in text or JSON), so
    both backends accept exactly the same events.
    """
    for part, text in (
        ("event", event.name),
        ("messageId", event.message_id),
        ("previousId", event.previous_id),
        ("groupId", event.group_id),
    ):
        if text is not None and "\x00" in text:
            return (Issue(part, "contains a NUL character (\\u0000), which cannot be stored"),)
    try:  # one C call covers the common case; the walk below only runs to name the culprit
        encoded = orjson.dumps((event.properties, event.traits, event.context), default=str)
        suspect = b"\\u0000" in encoded
    except TypeError:  # e.g. an integer beyond 64 bits
        suspect = True
    if suspect:
        for part, value in (
            ("properties", event.properties),
            ("traits", event.traits),
            ("context", event.context),
        ):
            bad = unstorable(value, part)
            if bad:
                return (Issue(*bad),)
    if event.previous_id is not None:
        try:
            normalize_identity("anonymous_id", event.previous_id)
        except ValueError as exc:
            return (Issue("previousId", str(exc)),)
    flags = list(event.flags)
    properties = event.properties
    traits = event.traits
    if event.type is EventType.TRACK:
        res = validate_event(schema, event.name, event.properties)
        if not res.ok:
            return res.issues
        properties = res.value
        flags.extend(res.flags)
    if event.traits:
        tres = validate_attributes(schema, event.traits, path="traits")
        if not tres.ok:
            return tres.issues
        traits = tres.value
        flags.extend(tres.flags)
    return Event(
        event.message_id,
        event.type,
        event.name,
        event.timestamp,
        event.received_at,
        event.identities,
        properties,
        traits,
        event.context,
        event.previous_id,
        event.group_id,
        event.source,
        tuple(dict.fromkeys(flags)),  # validated again under a newer schema: no repeats
    )


def check_events(parsed: Parsed[Event], schema: Schema) -> Parsed[Event]:
    """Validate each parsed event against ``schema``: the valid ones coerced and flagged, the
    others added to the errors (in index order). Pure: it can run outside the transaction."""
    items: list[tuple[int, Event]] = []
    errors = list(parsed.errors)
    for index, event in parsed.items:
        checked = validate_event_item(schema, event)
        if isinstance(checked, tuple):
            errors.append(ItemError(index, checked))
        else:
            items.append((index, checked))
    if len(errors) != len(parsed.errors):
        errors.sort(key=lambda e: e.index)
    return Parsed(items, errors)


def _alias_identity(writer: ProfileWriter, previous_id: str) -> Identity:
    """The identity ``previousId`` names: a known user_id, else a known or new anonymous_id."""
    as_user = normalize_identity("user_id", previous_id)
    if writer.find(as_user) is not None:
        return as_user
    return normalize_identity("anonymous_id", previous_id)


def ingest_events(
    conn: Connection,
    *,
    workspace_id: str,
    parsed: Parsed[Event],
    schema: Schema,
    policy: MergePolicy,
    now: datetime,
    shared_event_log: bool = False,
    validated: bool = False,
) -> IngestResult:
    """Validate, deduplicate, resolve and store one batch of events (caller commits).

    ``validated``: the items went through :func:`check_events` against ``schema`` already
    (an ingestion worker did it before handing the batch over), so they are not again."""
    if not validated:
        parsed = check_events(parsed, schema)
    result = IngestResult(rejected=list(parsed.errors))
    valid: list[tuple[int, Event]] = []
    first_index: dict[str, int] = {}
    for index, event in parsed.items:
        if event.message_id in first_index:
            result.duplicates += 1
            result.duplicate_indices.append(index)
            continue
        first_index[event.message_id] = index
        valid.append((index, event))
    if not valid:
        return result
    claimed = claim_message_ids(conn, workspace_id, [e.message_id for _, e in valid], now)
    fresh = [(i, e) for i, e in valid if e.message_id in claimed]
    result.duplicates += len(valid) - len(fresh)
    result.duplicate_indices.extend(i for i, e in valid if e.message_id not in claimed)
    result.duplicate_indices.sort()
    writer = ProfileWriter(
        conn, workspace_id=workspace_id, policy=policy, now=now, shared_event_log=shared_event_log
    )
    writer.preload(i for _, e in fresh for i in e.identities)
    placed: list[tuple[str, Event]] = []
    for index, event in fresh:
        ids = list(event.identities)
        if event.type is EventType.ALIAS and event.previous_id:
            ids.append(_alias_identity(writer, event.previous_id))
        traits = event.traits if event.type is EventType.IDENTIFY else {}
        pid = writer.record(ids, traits, at=event.timestamp, source=event.source, tag=index)
        placed.append((pid, event))
    stats = writer.flush()
    when = time_converter(conn)
    canonical = writer.canonical
    rows = [inbox_row(workspace_id, canonical(pid), event, when) for pid, event in placed]
    insert_inbox(conn, rows)
    result.accepted = len(rows)
    result.accepted_indices = [i for i, _ in fresh]
    result.profiles_created = stats.created
    result.profiles_merged = stats.merged
    result.conflicts = stats.conflicts
    result.conflict_indices = stats.conflict_tags
    result.profile_ids = sorted({str(r[1]) for r in rows})
    return result


def split_result(result: IngestResult, bounds: Sequence[tuple[int, int]]) -> list[IngestResult]:
    """Cut the result of a combined batch back into one result per ``[start, end)`` index
    range, re-numbered from 0 (group commit runs many requests as one batch)."""
    out: list[IngestResult] = []
    for start, end in bounds:

        def inside(i: int | None, a: int = start, b: int = end) -> bool:
            return i is not None and a <= i < b

        part = IngestResult(
            accepted=sum(1 for i in result.accepted_indices if inside(i)),
            duplicates=sum(1 for i in result.duplicate_indices if inside(i)),
            rejected=[
                ItemError(e.index - start, e.issues) for e in result.rejected if inside(e.index)
            ],
        )
        part.accepted_indices = [i - start for i in result.accepted_indices if inside(i)]
        part.duplicate_indices = [i - start for i in result.duplicate_indices if inside(i)]
        part.conflicts = [
            c for c, i in zip(result.conflicts, result.conflict_indices, strict=True) if inside(i)
        ]
        out.append(part)
    return out


def ingest_profiles(
    conn: Connection,
    *,
    workspace_id: str,
    parsed: Parsed[ProfileRecord],
    schema: Schema,
    policy: MergePolicy,
    now: datetime,
    lenient: bool = False,
    shared_event_log: bool = False,
) -> IngestResult:
    """Validate and apply profile records (attributes, identities, consents); caller commits.

    Re-applying the same records changes nothing (latest timestamp wins, links are sets).
    """
    result = IngestResult(rejected=list(parsed.errors))
    writer = ProfileWriter(
        conn, workspace_id=workspace_id, policy=policy, now=now, shared_event_log=shared_event_log
    )
    good: list[tuple[ProfileRecord, dict[str, Any]]] = []
    for index, record in parsed.items:
        res = validate_attributes(schema, record.attributes, path="attributes", lenient=lenient)
        bad = unstorable(record.attributes, "attributes")
        if bad:
            result.rejected.append(ItemError(index, (Issue(*bad),)))
            continue
        if not res.ok:
            result.rejected.append(ItemError(index, res.issues))
            continue
        good.append((record, res.value))
    result.rejected.sort(key=lambda e: e.index)
    writer.preload(i for rec, _ in good for i in rec.identities)
    pids: list[str] = []
    for record, attributes in good:
        pid = writer.record(
            list(record.identities), attributes, at=record.timestamp, source=record.source
        )
        for consent in record.consents:
            writer.set_consent(pid, consent)
        pids.append(pid)
    stats = writer.flush()
    result.accepted = len(good)
    result.profiles_created = stats.created
    result.profiles_merged = stats.merged
    result.conflicts = stats.conflicts
    result.profile_ids = sorted({writer.canonical(p) for p in pids})
    if result.profile_ids:  # no event tells the streaming audiences: queue them a recheck
        conn.execute(
            insert(stream_recheck),
            [
                {"workspace_id": workspace_id, "profile_id": p, "replay": False}
                for p in result.profile_ids
            ],
        )
    return result
