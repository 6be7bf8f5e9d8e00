"""Profiles: look-up by any identity, search by attribute, updates, and privacy requests.

Services take an open connection (and the event log where events are involved) and never
commit; the edge does. Every change through here is written to the audit log.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

import orjson
from sqlalchemy import ColumnElement, Connection, and_, delete, func, insert, or_, select, update

from waymark.access.service import record_audit
from waymark.core.errors import InvalidInput, Issue, NotFound
from waymark.core.ids import new_id
from waymark.identity.graph import MergePolicy
from waymark.identity.service import ProfileWriter
from waymark.model.events import ConsentStatus, ConsentUpdate, Identity, normalize_identity
from waymark.model.json import to_jsonable, unstorable
from waymark.model.schemas import Schema, validate_attributes
from waymark.storage import hotpath
from waymark.storage.database import streaming_lock
from waymark.storage.eventlog import EventLog
from waymark.storage.tables import (
    PERSON_TABLES,
    audience_changes,
    audience_members,
    audiences,
    audit_log,
    event_inbox,
    identities,
    metadata,
    privacy_requests,
    profile_merges,
    profiles,
    stream_recheck,
)


def parse_identity(namespace: str, value: str) -> Identity:
    """Normalize a path's identity or raise :class:`InvalidInput` naming the problem."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", namespace):
        raise InvalidInput([Issue("namespace", f"not a namespace name: {namespace!r}")])
    try:
        return normalize_identity(namespace, value)
    except ValueError as exc:
        raise InvalidInput([Issue("id", str(exc))]) from exc


def find_profile_id(conn: Connection, workspace_id: str, identity: Identity) -> str:
    """The id of the profile holding ``identity``; :class:`NotFound` when none does."""
    pid = conn.execute(
        select(identities.c.profile_id).where(
            identities.c.workspace_id == workspace_id,
            identities.c.namespace == identity.namespace,
            identities.c.value == identity.value,
        )
    ).scalar()
    if pid is None:
        raise NotFound(f"no profile with {identity}")
    return str(pid)


def _view(
    found: tuple[dict[str, Any], list[tuple[str, str, datetime]], list[tuple[Any, ...]]],
) -> dict[str, Any]:
    row, links, cons = found
    attrs = row["attributes"]
    return {
        "id": row["id"],
        "identities": [
            {"namespace": n, "value": v, "first_seen": fs.isoformat()} for n, v, fs in links
        ],
        "attributes": attrs,
        "consents": [
            {
                "channel": channel,
                "purpose": purpose,
                "status": status,
                "updated_at": updated_at.isoformat(),
                "source": source,
            }
            for channel, purpose, status, updated_at, source in cons
        ],
        "system": {
            "first_seen": row["first_seen"].isoformat(),
            "last_seen": row["last_seen"].isoformat(),
            "timezone": attrs.get("timezone"),
            "created_at": row["created_at"].isoformat(),
            "updated_at": row["updated_at"].isoformat(),
        },
    }


def get_profile(conn: Connection, workspace_id: str, profile_id: str) -> dict[str, Any]:
    """A profile with its identities, attributes, consents and system attributes."""
    found = hotpath.read_profile(conn, workspace_id, profile_id=profile_id)
    if found is None:
        raise NotFound(f"no profile {profile_id!r}")
    return _view(found)


def lookup(conn: Connection, workspace_id: str, namespace: str, value: str) -> dict[str, Any]:
    """The profile holding the identity ``namespace:value``."""
    identity = parse_identity(namespace, value)
    found = hotpath.read_profile(conn, workspace_id, identity=(identity.namespace, identity.value))
    if found is None:
        raise NotFound(f"no profile with {identity}")
    return _view(found)


def timeline(
    conn: Connection,
    log: EventLog,
    workspace_id: str,
    profile_id: str,
    *,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest events of a profile, newest first: those still in the inbox, then the log."""
    waiting = conn.execute(
        select(event_inbox)
        .where(event_inbox.c.workspace_id == workspace_id, event_inbox.c.profile_id == profile_id)
        .order_by(event_inbox.c.timestamp.desc(), event_inbox.c.seq.desc())
        .limit(limit)
    ).mappings()
    out: list[dict[str, Any]] = []
    for r in waiting:
        out.append(
            {
                "message_id": r["message_id"],
                "type": r["type"],
                "name": r["name"],
                "timestamp": r["timestamp"].isoformat(),
                "received_at": r["received_at"].isoformat(),
                "profile_id": r["profile_id"],
                **{
                    k: orjson.loads(r[k])
                    for k in ("identities", "properties", "traits", "context", "flags")
                },
                "source": r["source"],
                "previous_id": r["previous_id"],
                "group_id": r["group_id"],
            }
        )
    out.extend(e.to_json() for e in log.events_for_profile(workspace_id, profile_id, limit=limit))
    out.sort(key=lambda e: (e["timestamp"], e.get("seq", 2**62)), reverse=True)
    return out[:limit]


_FILTER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]{0,127})\s*(!=|>=|<=|=|>|<|~)\s*(.*)$")


def parse_filter(text: str) -> tuple[str, str, str]:
    """Parse ``name<op>value`` (ops ``= != > >= < <= ~``; ``~`` is 'contains')."""
    m = _FILTER_RE.match(text)
    if not m or "\x00" in text:
        raise InvalidInput(
            [Issue("q", f"cannot read filter {text!r}; write name=value, name>10, name~part")]
        )
    return m.group(1), m.group(2), m.group(3).strip().strip('"')


def _condition(name: str, op: str, value: str) -> ColumnElement[bool]:
    col = profiles.c.attributes[name]
    if op in (">", ">=", "<", "<="):
        try:
            number = float(value)
        except ValueError as exc:
            raise InvalidInput([Issue("q", f"{name} {op} needs a number, got {value!r}")]) from exc
        num = col.as_float()
        ops = {">": num > number, ">=": num >= number, "<": num < number, "<=": num <= number}
        return cast(ColumnElement[bool], ops[op])
    text_col = col.as_string()
    if op == "~":
        contains: ColumnElement[bool] = func.lower(text_col).contains(
            value.lower(), autoescape=True
        )
        return contains
    if op == "!=":
        return or_(text_col.is_(None), text_col != value)
    return cast(ColumnElement[bool], text_col == value)


def search(
    conn: Connection,
    workspace_id: str,
    filters: Sequence[str],
    *,
    limit: int = 50,
    after: str | None = None,
) -> dict[str, Any]:
    """Profiles whose attributes match every filter, in id order, ``limit`` per page."""
    if not 1 <= limit <= 1000:
        raise InvalidInput([Issue("limit", "must be between 1 and 1000")])
    conds = [profiles.c.workspace_id == workspace_id]
    conds += [_condition(*parse_filter(f)) for f in filters]
    if after:
        conds.append(profiles.c.id > after)
    ids = list(
        conn.execute(
            select(profiles.c.id).where(and_(*conds)).order_by(profiles.c.id).limit(limit)
        ).scalars()
    )
    items = [get_profile(conn, workspace_id, pid) for pid in ids]
    return {"profiles": items, "next": ids[-1] if len(ids) == limit else None}


def update_profile(
    conn: Connection,
    *,
    workspace_id: str,
    identity: Identity,
    attributes: dict[str, Any],
    consent_updates: Sequence[ConsentUpdate],
    schema: Schema,
    policy: MergePolicy,
    actor: str,
    now: datetime,
    create: bool = False,
    shared_event_log: bool = False,
) -> dict[str, Any]:
    """Set attributes (``None`` unsets) and consents on the profile holding ``identity``.

    Raises :class:`NotFound` unless the profile exists or ``create`` is set, and
    :class:`InvalidInput` naming each bad attribute.
    """
    bad = unstorable(attributes, "attributes")
    if bad:
        raise InvalidInput([Issue(*bad)])
    res = validate_attributes(schema, attributes, path="attributes")
    if not res.ok:
        raise InvalidInput(res.issues)
    if not create:
        find_profile_id(conn, workspace_id, identity)
    writer = ProfileWriter(
        conn, workspace_id=workspace_id, policy=policy, now=now, shared_event_log=shared_event_log
    )
    pid = writer.record([identity], res.value, at=now, source=actor)
    for cu in consent_updates:
        writer.set_consent(pid, cu)
    writer.flush()
    pid = writer.canonical(pid)
    # no event tells the streaming audiences (waymark.segmentation.live): queue a recheck
    conn.execute(
        insert(stream_recheck).values(workspace_id=workspace_id, profile_id=pid, replay=False)
    )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="profile.update",
        target_type="profile",
        target_id=pid,
        details={
            "attributes": sorted(res.value),
            "consents": [f"{c.channel}/{c.purpose}" for c in consent_updates],
        },
        at=now,
    )
    return get_profile(conn, workspace_id, pid)


def parse_consents(items: object, *, now: datetime, source: str) -> list[ConsentUpdate]:
    """Read ``[{channel, purpose, status}]`` from an API body; :class:`InvalidInput` if bad."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidInput([Issue("consents", "expected an array")])
    out: list[ConsentUpdate] = []
    issues: list[Issue] = []
    for i, item in enumerate(items):
        path = f"consents[{i}]"
        if not isinstance(item, dict):
            issues.append(Issue(path, "expected an object"))
            continue
        channel, purpose, status = (
            item.get("channel"),
            item.get("purpose", "marketing"),
            item.get("status"),
        )
        if not isinstance(channel, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", channel):
            issues.append(Issue(f"{path}.channel", "expected a channel name such as email or sms"))
            continue
        if not isinstance(purpose, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", purpose):
            issues.append(Issue(f"{path}.purpose", "expected a purpose name such as marketing"))
            continue
        try:
            st = ConsentStatus(str(status))
        except ValueError:
            issues.append(Issue(f"{path}.status", "expected one of opted_in, opted_out, unknown"))
            continue
        out.append(ConsentUpdate(channel, purpose, st, now, source))
    if issues:
        raise InvalidInput(issues)
    return out


# -- privacy -------------------------------------------------------------------------------------


def subject_hash(workspace_id: str, identity: Identity) -> str:
    """A one-way reference to a request's subject, so the request log holds no personal data."""
    return hashlib.sha256(f"{workspace_id}\x1f{identity}".encode()).hexdigest()


def _merged_ids(conn: Connection, workspace_id: str, profile_id: str) -> list[str]:
    """``profile_id`` and every profile ever absorbed into it (transitively)."""
    found = [profile_id]
    frontier = [profile_id]
    while frontier:
        rows = conn.execute(
            select(profile_merges.c.absorbed_id).where(
                profile_merges.c.workspace_id == workspace_id,
                profile_merges.c.survivor_id.in_(frontier),
            )
        ).scalars()
        frontier = [r for r in rows if r not in found]
        found.extend(frontier)
    return found


def export_person(
    conn: Connection,
    log: EventLog,
    *,
    workspace_id: str,
    identity: Identity,
    actor: str,
    now: datetime,
) -> dict[str, Any]:
    """Everything held about the person with ``identity``, as JSON-ready data."""
    pid = find_profile_id(conn, workspace_id, identity)
    profile = get_profile(conn, workspace_id, pid)
    ids = _merged_ids(conn, workspace_id, pid)
    events: list[dict[str, Any]] = []
    for p in ids:
        batch = timeline(conn, log, workspace_id, p, limit=10_000_000)
        events.extend(batch)
    events.sort(key=lambda e: (e["timestamp"], e.get("seq", 0)))
    memberships = _memberships(conn, workspace_id, ids)
    req_id = new_id()
    conn.execute(
        privacy_requests.insert().values(
            id=req_id,
            workspace_id=workspace_id,
            kind="export",
            subject_hash=subject_hash(workspace_id, identity),
            status="done",
            requested_at=now,
            completed_at=now,
            actor=actor,
            summary={"events": len(events)},
        )
    )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="privacy.export",
        target_type="privacy_request",
        target_id=req_id,
        at=now,
    )
    return {
        "request_id": req_id,
        "exported_at": now.isoformat(),
        "profile": profile,
        "merged_profile_ids": ids[1:],
        "events": to_jsonable(events),
        "audiences": memberships,
    }


def _memberships(conn: Connection, workspace_id: str, ids: list[str]) -> list[dict[str, Any]]:
    """The person's audience memberships and their changes (for an export)."""
    names = dict(
        conn.execute(
            select(audiences.c.id, audiences.c.name).where(audiences.c.workspace_id == workspace_id)
        ).all()
    )
    current = conn.execute(
        select(audience_members).where(
            audience_members.c.workspace_id == workspace_id,
            audience_members.c.profile_id.in_(ids),
        )
    ).mappings()
    changes = conn.execute(
        select(audience_changes)
        .where(
            audience_changes.c.workspace_id == workspace_id,
            audience_changes.c.profile_id.in_(ids),
        )
        .order_by(audience_changes.c.seq)
    ).mappings()
    history: dict[str, list[dict[str, Any]]] = {}
    for c in changes:
        history.setdefault(c["audience_id"], []).append(
            {"change": c["change"], "at": c["at"].isoformat()}
        )
    return [
        {
            "audience": names.get(m["audience_id"], m["audience_id"]),
            "status": m["status"],
            "realized_at": m["realized_at"].isoformat(),
            "exited_at": m["exited_at"].isoformat() if m["exited_at"] else None,
            "history": history.get(m["audience_id"], []),
        }
        for m in current
    ]


def start_deletion(
    conn: Connection, *, workspace_id: str, identity: Identity, actor: str, now: datetime
) -> tuple[str, list[str]]:
    """Step 1 of a deletion (state store, one transaction): delete the person's profile,
    identities, consents and waiting events, erase their ids from the audit log, and record a
    ``running`` request listing the profile ids whose logged events are still to delete."""
    streaming_lock(conn)  # a fold must not write states for the person meanwhile
    pid = find_profile_id(conn, workspace_id, identity)
    ids = _merged_ids(conn, workspace_id, pid)
    counts: dict[str, int] = {}
    # every table that holds data about a person (the profile itself last)
    person_tables = [
        (metadata.tables[name], metadata.tables[name].c[column])
        for name, column in sorted(PERSON_TABLES.items(), key=lambda item: item[0] == "profiles")
        if name != "profile_merges"  # both of its id columns are cleared below
    ]
    for table, column in person_tables:
        res = conn.execute(
            delete(table).where(table.c.workspace_id == workspace_id, column.in_(ids))
        )
        counts[table.name] = int(res.rowcount or 0)
    conn.execute(
        delete(profile_merges).where(
            profile_merges.c.workspace_id == workspace_id,
            or_(profile_merges.c.survivor_id.in_(ids), profile_merges.c.absorbed_id.in_(ids)),
        )
    )
    conn.execute(
        update(audit_log)
        .where(audit_log.c.workspace_id == workspace_id, audit_log.c.target_id.in_(ids))
        .values(target_id="erased", details={})
    )
    req_id = new_id()
    conn.execute(
        privacy_requests.insert().values(
            id=req_id,
            workspace_id=workspace_id,
            kind="delete",
            subject_hash=subject_hash(workspace_id, identity),
            status="running",
            requested_at=now,
            actor=actor,
            summary={"pending_profile_ids": ids, "deleted": counts},
        )
    )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="privacy.delete",
        target_type="privacy_request",
        target_id=req_id,
        at=now,
    )
    return req_id, ids


def finish_deletions(conn: Connection, log: EventLog, *, now: datetime) -> int:
    """Step 2 (idempotent, also run at start-up): delete logged events of every ``running``
    deletion, then mark it done, forgetting the profile ids. Returns how many it finished."""
    rows = conn.execute(
        select(privacy_requests).where(
            privacy_requests.c.kind == "delete", privacy_requests.c.status == "running"
        )
    ).mappings()
    done = 0
    for r in list(rows):
        summary = dict(r["summary"])
        ids = summary.pop("pending_profile_ids", [])
        summary["events_deleted"] = log.delete_profiles(r["workspace_id"], ids)
        conn.execute(
            update(privacy_requests)
            .where(privacy_requests.c.id == r["id"])
            .values(status="done", completed_at=now, summary=summary)
        )
        done += 1
    if done:
        log.purge()
    return done


def privacy_request_status(conn: Connection, workspace_id: str, request_id: str) -> dict[str, Any]:
    """One privacy request's record."""
    row = (
        conn.execute(
            select(privacy_requests).where(
                privacy_requests.c.workspace_id == workspace_id, privacy_requests.c.id == request_id
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no privacy request {request_id!r}")
    data: dict[str, Any] = to_jsonable(dict(row))
    return data
