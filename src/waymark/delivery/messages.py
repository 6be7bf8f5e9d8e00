"""What happened to messages, and each profile's delivery state, as service functions.

- **The message log** (:func:`message_log`, :func:`get_message`): every message the outbox
  wrote, newest first (ids are time-ordered UUIDv7, so ``before`` an id pages back), with its
  decision, its rendered content and its status history. It is an admin view: addresses are
  shown as stored.
- **Dead letters** (:func:`list_dead_letters`, :func:`replay`): messages whose transient
  failures outlasted their retries. A replay puts them back in the queue as new (no attempts
  spent) and keeps the dead letter, marked replayed; the dispatcher decides again at send time,
  so a replayed message still obeys the rules as they stand then.
- **Cancelling** (:func:`cancel`) a message that has not been handed to a provider yet.
- **The in-app inbox** (:func:`inbox`, :func:`mark_read`, :func:`dismiss`,
  :func:`unread_count`): the cards the dispatcher delivered, per profile.
- **Push subscriptions** (:func:`register_subscription`, :func:`list_subscriptions`,
  :func:`delete_subscription`): a profile's browsers and devices; one push message goes to each.
- **Preview and test sends** (:func:`preview`, :func:`test_send`): a template rendered for a real
  profile with the context the outbox builds (:meth:`Outbox.render_context`), or sent to seed
  addresses as transactional ``test`` messages.

Like :mod:`waymark.delivery.store`, every function works in the caller's transaction and never
commits; ``now`` is always passed in.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import orjson
from sqlalchemy import Connection, Select, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from waymark.access.service import record_audit
from waymark.channels.push import parse_subscription
from waymark.core.errors import Conflict, InvalidInput, Issue, NotFound, join_path
from waymark.core.ids import new_id
from waymark.delivery.outbox import SOURCE_KINDS, Enqueued, Outbox, SendIntent, Source, read_content
from waymark.delivery.store import compile_stored, get_template
from waymark.delivery.templates import Channel, Rendered, parse_template
from waymark.delivery.tracking import TrackingKeys
from waymark.profiles.service import find_profile_id, parse_identity
from waymark.storage.tables import (
    dead_letters,
    inbox_messages,
    message_events,
    messages,
    profiles,
    push_subscriptions,
    templates,
    workspaces,
)

__all__ = [
    "CANCELLABLE",
    "MESSAGE_STATUSES",
    "PUSH_KINDS",
    "Card",
    "DeadLetter",
    "LoggedMessage",
    "MessageDetail",
    "PushSubscription",
    "cancel",
    "delete_subscription",
    "dismiss",
    "get_message",
    "inbox",
    "list_dead_letters",
    "list_subscriptions",
    "mark_read",
    "message_log",
    "preview",
    "register_subscription",
    "rendered_json",
    "replay",
    "resolve_profile",
    "test_send",
    "unread_count",
]

#: Every status a message can have (see :data:`waymark.storage.tables.messages`).
MESSAGE_STATUSES: Final = frozenset(
    {
        "queued",
        "held",
        "sending",
        "sent",
        "delivered",
        "failed",
        "excluded",
        "dead",
        "cancelled",
    }
)
#: Statuses a message can be cancelled from: not yet handed to a provider.
CANCELLABLE: Final = ("queued", "held")
#: Kinds of push subscription.
PUSH_KINDS: Final = frozenset({"webpush", "fcm"})
#: Most rows one page of any listing holds.
MAX_PAGE: Final = 1000
#: Most seed addresses one test send takes.
MAX_TEST_ADDRESSES: Final = 20
#: Longest FCM registration token accepted.
MAX_TOKEN: Final = 4096
#: Context roots the outbox sets itself (a caller's context cannot give them).
RESERVED_ROOTS: Final = frozenset({"profile", "message", "workspace"})
_CHUNK: Final = 500


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput([Issue("limit", f"must be a whole number from 1 to {MAX_PAGE}")])
    return limit


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def rendered_json(rendered: Rendered | None) -> dict[str, Any] | None:
    """How rendered content is shown: channel, fields, data (and a webhook's parsed body)."""
    if rendered is None:
        return None
    out: dict[str, Any] = {
        "channel": rendered.channel.value,
        "fields": dict(rendered.fields),
        "data": dict(rendered.data),
    }
    if rendered.json is not None:
        out["json"] = rendered.json
    return out


# -- the message log ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoggedMessage:
    """One message as the log shows it (its content and history: :class:`MessageDetail`).
    ``template_name`` is None when the template has been deleted since."""

    id: str
    key: str
    profile_id: str
    channel: str
    purpose: str
    transactional: bool
    template_id: str | None
    template_name: str | None
    template_version: int | None
    source_kind: str
    source_id: str
    to: str | None
    status: str
    reason: str | None
    rule: str | None
    detail: str
    attempts: int
    provider: str | None
    provider_id: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "profile_id": self.profile_id,
            "channel": self.channel,
            "purpose": self.purpose,
            "transactional": self.transactional,
            "template": {
                "id": self.template_id,
                "name": self.template_name,
                "version": self.template_version,
            },
            "source": {"kind": self.source_kind, "id": self.source_id},
            "to": self.to,
            "status": self.status,
            "reason": self.reason,
            "rule": self.rule,
            "detail": self.detail,
            "attempts": self.attempts,
            "provider": self.provider,
            "provider_id": self.provider_id,
            "next_attempt_at": _iso(self.next_attempt_at),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "sent_at": _iso(self.sent_at),
        }


@dataclass(frozen=True, slots=True)
class MessageDetail:
    """A message with its rendered content (None when rendering failed) and its status
    history in order: each ``{"status", "at", "detail"}``."""

    message: LoggedMessage
    content: Rendered | None
    history: Sequence[Mapping[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.message.to_json(),
            "content": rendered_json(self.content),
            "history": [dict(h) for h in self.history],
        }


_LOG_COLUMNS = (
    messages.c.id,
    messages.c.idempotency_key,
    messages.c.profile_id,
    messages.c.channel,
    messages.c.purpose,
    messages.c.transactional,
    messages.c.template_id,
    templates.c.name.label("template_name"),
    messages.c.template_version,
    messages.c.source_kind,
    messages.c.source_id,
    messages.c.to_address,
    messages.c.status,
    messages.c.reason,
    messages.c.rule,
    messages.c.detail,
    messages.c.attempts,
    messages.c.provider,
    messages.c.provider_id,
    messages.c.next_attempt_at,
    messages.c.created_at,
    messages.c.updated_at,
    messages.c.sent_at,
)


def _log_query(workspace_id: str) -> Select[Any]:
    return (
        select(*_LOG_COLUMNS)
        .select_from(messages.outerjoin(templates, templates.c.id == messages.c.template_id))
        .where(messages.c.workspace_id == workspace_id)
    )


def _logged(row: Any) -> LoggedMessage:
    return LoggedMessage(
        id=row.id,
        key=row.idempotency_key,
        profile_id=row.profile_id,
        channel=row.channel,
        purpose=row.purpose,
        transactional=bool(row.transactional),
        template_id=row.template_id,
        template_name=row.template_name,
        template_version=row.template_version,
        source_kind=row.source_kind,
        source_id=row.source_id,
        to=row.to_address,
        status=row.status,
        reason=row.reason,
        rule=row.rule,
        detail=row.detail,
        attempts=row.attempts,
        provider=row.provider,
        provider_id=row.provider_id,
        next_attempt_at=row.next_attempt_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        sent_at=row.sent_at,
    )


def _one_of(field: str, value: str, known: frozenset[str] | Sequence[str]) -> str:
    if value not in known:
        raise InvalidInput(
            [Issue(field, f"unknown {field} {value!r}; one of {', '.join(sorted(known))}")]
        )
    return value


def message_log(
    conn: Connection,
    workspace_id: str,
    *,
    profile_id: str | None = None,
    source_kind: str | None = None,
    source_id: str | None = None,
    status: str | None = None,
    channel: str | None = None,
    before: str | None = None,
    limit: int = 50,
) -> list[LoggedMessage]:
    """The workspace's messages, newest first, at most ``limit``, those with an id below
    ``before`` (pagination: pass the last id of a page). ``source_id`` matches the source's id
    exactly or up to a colon (a journey's id finds the messages of each of its steps).
    :class:`InvalidInput` for an unknown status, source kind or channel."""
    query = _log_query(workspace_id)
    if profile_id is not None:
        query = query.where(messages.c.profile_id == profile_id)
    if source_kind is not None:
        query = query.where(
            messages.c.source_kind == _one_of("source_kind", source_kind, SOURCE_KINDS)
        )
    if source_id is not None:
        escaped = source_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(
            or_(
                messages.c.source_id == source_id,
                messages.c.source_id.like(f"{escaped}:%", escape="\\"),
            )
        )
    if status is not None:
        query = query.where(messages.c.status == _one_of("status", status, MESSAGE_STATUSES))
    if channel is not None:
        known = [c.value for c in Channel]
        query = query.where(messages.c.channel == _one_of("channel", channel, known))
    if before is not None:
        query = query.where(messages.c.id < before)
    rows = conn.execute(query.order_by(messages.c.id.desc()).limit(_limit(limit)))
    return [_logged(r) for r in rows]


def _find(conn: Connection, workspace_id: str, message_id: str) -> LoggedMessage:
    row = conn.execute(_log_query(workspace_id).where(messages.c.id == message_id)).first()
    if row is None:
        raise NotFound(f"no message {message_id!r} in this workspace")
    return _logged(row)


def get_message(conn: Connection, workspace_id: str, message_id: str) -> MessageDetail:
    """One message with its content and full status history; :class:`NotFound` when it is not
    this workspace's."""
    found = _find(conn, workspace_id, message_id)
    stored = conn.execute(
        select(messages.c.content).where(messages.c.id == message_id)
    ).scalar_one_or_none()
    history = [
        {"status": r.status, "at": r.at.isoformat(), "detail": r.detail}
        for r in conn.execute(
            select(message_events.c.status, message_events.c.at, message_events.c.detail)
            .where(
                message_events.c.workspace_id == workspace_id,
                message_events.c.message_id == message_id,
            )
            .order_by(message_events.c.seq)
        )
    ]
    return MessageDetail(found, read_content(stored) if stored else None, history)


def _event(
    workspace_id: str, message_id: str, profile_id: str, status: str, at: datetime, detail: Any
) -> dict[str, Any]:
    return {
        "workspace_id": workspace_id,
        "message_id": message_id,
        "profile_id": profile_id,
        "status": status,
        "at": at,
        "detail": detail,
    }


def cancel(
    conn: Connection, workspace_id: str, message_id: str, *, actor: str, now: datetime
) -> LoggedMessage:
    """Cancel a message that is ``queued`` or ``held``: it will not be sent and no longer
    counts toward the caps. :class:`Conflict` naming the status otherwise (a message being
    sent, or already decided), :class:`NotFound` when it is not this workspace's. Audited."""
    found = _find(conn, workspace_id, message_id)
    done = conn.execute(
        update(messages)
        .where(
            messages.c.workspace_id == workspace_id,
            messages.c.id == message_id,
            messages.c.status.in_(CANCELLABLE),
        )
        .values(
            status="cancelled",
            counted_at=None,
            next_attempt_at=None,
            lease_until=None,
            updated_at=now,
        )
    ).rowcount
    if not done:
        # another transaction (a dispatcher claiming it) may have moved it since we read it
        status = conn.execute(
            select(messages.c.status).where(messages.c.id == message_id)
        ).scalar_one()
        raise Conflict(
            f"message {message_id!r} is {status}; only a queued or held message can be cancelled"
        )
    conn.execute(
        insert(message_events).values(
            _event(
                workspace_id,
                message_id,
                found.profile_id,
                "cancelled",
                now,
                {"actor": actor, "was": found.status},
            )
        )
    )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="message.cancel",
        target_type="message",
        target_id=message_id,
        at=now,
    )
    return _find(conn, workspace_id, message_id)


# -- dead letters ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that died after its retries; ``status`` is the message's status now (queued
    again, or sent, after a replay)."""

    message_id: str
    key: str
    profile_id: str
    channel: str
    template_name: str | None
    to: str | None
    status: str
    provider: str
    attempts: int
    last_error: str
    failed_at: datetime
    replayed_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "key": self.key,
            "profile_id": self.profile_id,
            "channel": self.channel,
            "template": self.template_name,
            "to": self.to,
            "status": self.status,
            "provider": self.provider,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "failed_at": self.failed_at.isoformat(),
            "replayed_at": _iso(self.replayed_at),
        }


def list_dead_letters(
    conn: Connection,
    workspace_id: str,
    *,
    limit: int = 50,
    before: str | None = None,
    pending_only: bool = False,
) -> list[DeadLetter]:
    """Dead letters, newest message first, those with an id below ``before``; with
    ``pending_only``, only those not replayed yet."""
    query = (
        select(
            dead_letters,
            messages.c.idempotency_key,
            messages.c.channel,
            messages.c.to_address,
            messages.c.status,
            templates.c.name.label("template_name"),
        )
        .select_from(
            dead_letters.join(messages, messages.c.id == dead_letters.c.message_id).outerjoin(
                templates, templates.c.id == messages.c.template_id
            )
        )
        .where(dead_letters.c.workspace_id == workspace_id)
    )
    if pending_only:
        query = query.where(dead_letters.c.replayed_at.is_(None))
    if before is not None:
        query = query.where(dead_letters.c.message_id < before)
    rows = conn.execute(query.order_by(dead_letters.c.message_id.desc()).limit(_limit(limit)))
    return [
        DeadLetter(
            message_id=r.message_id,
            key=r.idempotency_key,
            profile_id=r.profile_id,
            channel=r.channel,
            template_name=r.template_name,
            to=r.to_address,
            status=r.status,
            provider=r.provider,
            attempts=r.attempts,
            last_error=r.last_error,
            failed_at=r.failed_at,
            replayed_at=r.replayed_at,
        )
        for r in rows
    ]


def replay(
    conn: Connection,
    workspace_id: str,
    message_ids: Sequence[str] | None,
    *,
    actor: str,
    now: datetime,
) -> int:
    """Put dead messages back in the queue: ``message_ids``, or with None every dead message
    of the workspace. Each becomes ``queued``, due now, with no attempts spent and no lease
    (counting toward the caps again, like any queued message), gets a ``replayed`` event, and
    its dead letter is marked replayed. How many were replayed. :class:`InvalidInput` naming
    each id that is unknown here or not ``dead`` (then nothing is replayed). Audited."""
    if message_ids is None:
        wanted = list(
            conn.execute(
                select(messages.c.id).where(
                    messages.c.workspace_id == workspace_id, messages.c.status == "dead"
                )
            ).scalars()
        )
    else:
        if isinstance(message_ids, str):
            raise InvalidInput([Issue("ids", "a list of message ids")])
        wanted = list(dict.fromkeys(message_ids))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), _CHUNK):
            found.update(
                (r.id, r.status)
                for r in conn.execute(
                    select(messages.c.id, messages.c.status).where(
                        messages.c.workspace_id == workspace_id,
                        messages.c.id.in_(wanted[start : start + _CHUNK]),
                    )
                )
            )
        issues = [
            Issue(
                f"ids[{n}]",
                f"no message {mid!r} in this workspace"
                if mid not in found
                else f"message {mid!r} is {found[mid]}; only a dead message can be replayed",
            )
            for n, mid in enumerate(wanted)
            if found.get(mid) != "dead"
        ]
        if issues:
            raise InvalidInput(issues)
    if not wanted:
        return 0
    replayed = 0
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        owners = {
            r.id: r.profile_id
            for r in conn.execute(
                select(messages.c.id, messages.c.profile_id).where(
                    messages.c.workspace_id == workspace_id,
                    messages.c.id.in_(chunk),
                    messages.c.status == "dead",
                )
            )
        }
        done = conn.execute(
            update(messages)
            .where(
                messages.c.workspace_id == workspace_id,
                messages.c.id.in_(chunk),
                messages.c.status == "dead",
            )
            .values(
                status="queued",
                reason=None,
                attempts=0,
                next_attempt_at=now,
                lease_until=None,
                counted_at=now,
                updated_at=now,
            )
        ).rowcount
        if done != len(chunk):  # a concurrent replay took some since they were read
            raise Conflict("some of these messages were replayed meanwhile; list them again")
        conn.execute(
            update(dead_letters)
            .where(
                dead_letters.c.workspace_id == workspace_id, dead_letters.c.message_id.in_(chunk)
            )
            .values(replayed_at=now)
        )
        conn.execute(
            insert(message_events),
            [
                _event(workspace_id, mid, owners[mid], "replayed", now, {"actor": actor})
                for mid in chunk
            ],
        )
        replayed += done
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="message.replay",
        target_type="message",
        target_id=wanted[0] if len(wanted) == 1 else "",
        details={"count": replayed, "all": message_ids is None, "ids": wanted[:1000]},
        at=now,
    )
    return replayed


# -- the in-app inbox -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Card:
    """One in-app card: its rendered fields (``title``, ``body``, ``image_url``,
    ``action_url``) and data, and whether it has been read or dismissed."""

    message_id: str
    profile_id: str
    fields: Mapping[str, str]
    data: Mapping[str, str]
    created_at: datetime
    read_at: datetime | None
    dismissed_at: datetime | None
    expires_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            **self.fields,
            "data": dict(self.data),
            "created_at": self.created_at.isoformat(),
            "read": self.read_at is not None,
            "read_at": _iso(self.read_at),
            "dismissed": self.dismissed_at is not None,
            "dismissed_at": _iso(self.dismissed_at),
            "expires_at": _iso(self.expires_at),
        }


def _card(row: Any) -> Card:
    content = row.content or {}
    return Card(
        message_id=row.message_id,
        profile_id=row.profile_id,
        fields=dict(content.get("fields", {})),
        data=dict(content.get("data", {})),
        created_at=row.created_at,
        read_at=row.read_at,
        dismissed_at=row.dismissed_at,
        expires_at=row.expires_at,
    )


def _live(workspace_id: str, profile_id: str, now: datetime) -> list[Any]:
    return [
        inbox_messages.c.workspace_id == workspace_id,
        inbox_messages.c.profile_id == profile_id,
        or_(inbox_messages.c.expires_at.is_(None), inbox_messages.c.expires_at > now),
    ]


def inbox(
    conn: Connection,
    workspace_id: str,
    profile_id: str,
    *,
    now: datetime,
    include_dismissed: bool = False,
    limit: int = 50,
    before: str | None = None,
) -> list[Card]:
    """The profile's cards, newest first; expired ones are hidden, dismissed ones too unless
    ``include_dismissed``. ``before`` is the message id of the last card of the previous page
    (:class:`InvalidInput` when it is not one of this profile's cards)."""
    conditions = _live(workspace_id, profile_id, now)
    if not include_dismissed:
        conditions.append(inbox_messages.c.dismissed_at.is_(None))
    if before is not None:
        anchor = conn.execute(
            select(inbox_messages.c.created_at).where(
                inbox_messages.c.workspace_id == workspace_id,
                inbox_messages.c.profile_id == profile_id,
                inbox_messages.c.message_id == before,
            )
        ).scalar_one_or_none()
        if anchor is None:
            raise InvalidInput([Issue("before", f"no card {before!r} in this profile's inbox")])
        conditions.append(
            or_(
                inbox_messages.c.created_at < anchor,
                and_(
                    inbox_messages.c.created_at == anchor,
                    inbox_messages.c.message_id < before,
                ),
            )
        )
    rows = conn.execute(
        select(inbox_messages)
        .where(*conditions)
        .order_by(inbox_messages.c.created_at.desc(), inbox_messages.c.message_id.desc())
        .limit(_limit(limit))
    )
    return [_card(r) for r in rows]


def unread_count(conn: Connection, workspace_id: str, profile_id: str, *, now: datetime) -> int:
    """How many of the profile's cards are neither read, dismissed nor expired."""
    return int(
        conn.execute(
            select(func.count())
            .select_from(inbox_messages)
            .where(
                *_live(workspace_id, profile_id, now),
                inbox_messages.c.read_at.is_(None),
                inbox_messages.c.dismissed_at.is_(None),
            )
        ).scalar_one()
    )


def _mark(
    conn: Connection,
    workspace_id: str,
    profile_id: str,
    message_id: str,
    column: Literal["read_at", "dismissed_at"],
    now: datetime,
) -> Card:
    key = (
        inbox_messages.c.workspace_id == workspace_id,
        inbox_messages.c.profile_id == profile_id,
        inbox_messages.c.message_id == message_id,
    )
    if conn.execute(select(inbox_messages.c.message_id).where(*key)).first() is None:
        raise NotFound(f"no card {message_id!r} in this profile's inbox")
    conn.execute(
        update(inbox_messages).where(*key, inbox_messages.c[column].is_(None)).values({column: now})
    )
    return _card(conn.execute(select(inbox_messages).where(*key)).one())


def mark_read(
    conn: Connection, workspace_id: str, profile_id: str, message_id: str, now: datetime
) -> Card:
    """Mark one of the profile's cards read (the first time counts; again changes nothing);
    :class:`NotFound` when the card is not this profile's."""
    return _mark(conn, workspace_id, profile_id, message_id, "read_at", now)


def dismiss(
    conn: Connection, workspace_id: str, profile_id: str, message_id: str, now: datetime
) -> Card:
    """Dismiss one of the profile's cards (idempotent, like :func:`mark_read`); it leaves the
    inbox unless asked for with ``include_dismissed``."""
    return _mark(conn, workspace_id, profile_id, message_id, "dismissed_at", now)


# -- push subscriptions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushSubscription:
    """One browser (``webpush``: the subscription's JSON) or app install (``fcm``: the device
    token) of a profile."""

    id: str
    profile_id: str
    kind: str
    address: str
    label: str
    created_at: datetime
    last_seen_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "profile_id": self.profile_id,
            "kind": self.kind,
            "address": self.address,
            "label": self.label,
            "created_at": self.created_at.isoformat(),
            "last_seen_at": self.last_seen_at.isoformat(),
        }


def _push_address(kind: object, address: object, *, allow_http: bool) -> tuple[str, str]:
    """The kind and the address as stored; :class:`InvalidInput` on ``kind`` or
    ``address`` (``address.endpoint``, ``address.keys.p256dh`` … for a Web Push one)."""
    if kind not in PUSH_KINDS:
        raise InvalidInput(
            [Issue("kind", f"unknown kind {kind!r}; one of {', '.join(sorted(PUSH_KINDS))}")]
        )
    if not isinstance(address, str):
        raise InvalidInput([Issue("address", "must be a string")])
    if kind == "webpush":
        try:
            subscription = parse_subscription(address, allow_http=allow_http)
        except InvalidInput as exc:
            raise InvalidInput(
                [
                    Issue(join_path("address", i.path) if i.path else "address", i.reason, i.code)
                    for i in exc.issues
                ]
            ) from None
        return "webpush", orjson.dumps(subscription.as_info()).decode()
    token = address.strip()
    if not 1 <= len(token) <= MAX_TOKEN or any(not "!" <= c <= "~" for c in token):
        raise InvalidInput(
            [
                Issue(
                    "address",
                    f"an FCM token is 1 to {MAX_TOKEN} visible ASCII characters (no spaces)",
                )
            ]
        )
    return "fcm", token


def _require_profile(conn: Connection, workspace_id: str, profile_id: str) -> dict[str, Any]:
    """The profile's attributes; :class:`NotFound` when it is not this workspace's."""
    attributes = conn.execute(
        select(profiles.c.attributes).where(
            profiles.c.workspace_id == workspace_id, profiles.c.id == profile_id
        )
    ).scalar_one_or_none()
    if attributes is None:
        raise NotFound(f"no profile {profile_id!r} in this workspace")
    return dict(attributes)


def resolve_profile(conn: Connection, workspace_id: str, ref: object, path: str = "profile") -> str:
    """The id of the profile ``ref`` names: an identity ``{"namespace": ..., "value": ...}``
    or a profile id (a string). :class:`InvalidInput` on ``path`` for anything else,
    :class:`NotFound` when no profile of this workspace matches."""
    if isinstance(ref, str) and ref:
        _require_profile(conn, workspace_id, ref)
        return ref
    if isinstance(ref, Mapping):
        namespace, value = ref.get("namespace"), ref.get("value")
        unknown = set(ref) - {"namespace", "value"}
        issues = [Issue(join_path(path, str(k)), "unknown field") for k in sorted(unknown, key=str)]
        issues += [
            Issue(join_path(path, key), "required: a string")
            for key, v in (("namespace", namespace), ("value", value))
            if not isinstance(v, str) or not v
        ]
        if issues:
            raise InvalidInput(issues)
        try:
            identity = parse_identity(str(namespace), str(value))
        except InvalidInput as exc:
            raise InvalidInput(
                [Issue(join_path(path, i.path), i.reason, i.code) for i in exc.issues]
            ) from None
        return find_profile_id(conn, workspace_id, identity)
    raise InvalidInput(
        [Issue(path, 'a profile id, or an identity {"namespace": ..., "value": ...}')]
    )


def register_subscription(
    conn: Connection,
    workspace_id: str,
    profile_id: str,
    *,
    kind: object,
    address: object,
    label: object = "",
    now: datetime,
    allow_http: bool = False,
) -> str:
    """Record a push address of the profile; its id. A ``webpush`` address is a browser's
    subscription JSON (checked by :func:`waymark.channels.push.parse_subscription`, stored in
    a normal form, so the same subscription written differently is one row); an ``fcm``
    address is a device token. Registering an address already known refreshes
    ``last_seen_at`` and gives it to ``profile_id`` (a device changes hands), keeping its id
    (and its label unless a new one is given). ``allow_http`` admits http endpoints (local push
    services in tests)."""
    stored_kind, stored = _push_address(kind, address, allow_http=allow_http)
    if not isinstance(label, str) or len(label) > 200:
        raise InvalidInput([Issue("label", "must be a string of at most 200 characters")])
    _require_profile(conn, workspace_id, profile_id)
    digest = hashlib.sha256(stored.encode()).hexdigest()
    ins = (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(push_subscriptions)
    conn.execute(
        ins.values(
            id=new_id(),
            workspace_id=workspace_id,
            profile_id=profile_id,
            kind=stored_kind,
            address=stored,
            address_hash=digest,
            label=label,
            created_at=now,
            last_seen_at=now,
        ).on_conflict_do_update(
            index_elements=["workspace_id", "address_hash"],
            set_={
                "profile_id": ins.excluded.profile_id,
                "last_seen_at": ins.excluded.last_seen_at,
                "label": func.coalesce(
                    func.nullif(ins.excluded.label, ""), push_subscriptions.c.label
                ),
            },
        )
    )
    return str(
        conn.execute(
            select(push_subscriptions.c.id).where(
                push_subscriptions.c.workspace_id == workspace_id,
                push_subscriptions.c.address_hash == digest,
            )
        ).scalar_one()
    )


def list_subscriptions(
    conn: Connection, workspace_id: str, profile_id: str
) -> list[PushSubscription]:
    """The profile's push subscriptions, oldest first (the order messages go out in)."""
    rows = conn.execute(
        select(push_subscriptions)
        .where(
            push_subscriptions.c.workspace_id == workspace_id,
            push_subscriptions.c.profile_id == profile_id,
        )
        .order_by(push_subscriptions.c.created_at, push_subscriptions.c.id)
    )
    return [
        PushSubscription(
            r.id, r.profile_id, r.kind, r.address, r.label, r.created_at, r.last_seen_at
        )
        for r in rows
    ]


def delete_subscription(
    conn: Connection, workspace_id: str, subscription_id: str, *, profile_id: str | None = None
) -> None:
    """Forget a push subscription; :class:`NotFound` when it is not this workspace's (or,
    with ``profile_id``, not that profile's)."""
    query = delete(push_subscriptions).where(
        push_subscriptions.c.workspace_id == workspace_id,
        push_subscriptions.c.id == subscription_id,
    )
    if profile_id is not None:
        query = query.where(push_subscriptions.c.profile_id == profile_id)
    if not conn.execute(query).rowcount:
        raise NotFound(f"no push subscription {subscription_id!r} here")


# -- preview and test sends -----------------------------------------------------------------------


def _check_context(context: object) -> Mapping[str, Any]:
    if not isinstance(context, Mapping):
        raise InvalidInput([Issue("context", "must be an object of render roots")])
    reserved = RESERVED_ROOTS & set(context)
    if reserved:
        raise InvalidInput(
            [
                Issue(
                    "context",
                    f"{', '.join(sorted(reserved))} cannot be given: the outbox sets them",
                )
            ]
        )
    return context


def preview(
    conn: Connection,
    workspace_id: str,
    *,
    template: str | None = None,
    document: object | None = None,
    profile_id: str,
    context: Mapping[str, Any] | None = None,
    purpose: str = "marketing",
    outbox: Outbox,
) -> Rendered:
    """Render the saved ``template``, or an unsaved template ``document`` (checked like a
    save), for a real profile with the context a message of ``purpose`` would have; nothing is
    written. The message id is fresh and the links are signed with a throwaway key: they have
    their real shape but never verify, so a preview shown to staff cannot unsubscribe anyone.
    :class:`NotFound` for an unknown template or profile, :class:`InvalidInput` for a bad
    document or context, :class:`waymark.delivery.templates.RenderFailed` when the template
    cannot be rendered for this profile."""
    if (template is None) == (document is None):
        raise InvalidInput([Issue("template", "give either a saved template's name or a document")])
    extra = _check_context(context if context is not None else {})
    definition = (
        get_template(conn, workspace_id, template).definition
        if template is not None
        else parse_template(document)
    )
    compiled = compile_stored(conn, workspace_id, definition)
    attributes = _require_profile(conn, workspace_id, profile_id)
    name = conn.execute(
        select(workspaces.c.name).where(workspaces.c.id == workspace_id)
    ).scalar_one_or_none()
    if name is None:
        raise NotFound(f"no workspace {workspace_id!r}")
    return compiled.render(
        outbox.render_context(
            TrackingKeys.of(os.urandom(32)),
            workspace_id,
            name,
            profile_id=profile_id,
            attributes=attributes,
            message_id=new_id(),
            channel=definition.channel,
            purpose=purpose,
            extra=extra,
        )
    )


def test_send(
    conn: Connection,
    workspace_id: str,
    *,
    template: str,
    profile_id: str,
    to: Sequence[str],
    outbox: Outbox,
    now: datetime,
    actor: str,
    context: Mapping[str, Any] | None = None,
) -> list[Enqueued]:
    """Send ``template``, rendered for ``profile_id``, to each seed address in ``to`` (at most
    :data:`MAX_TEST_ADDRESSES`): transactional messages of purpose ``test`` from
    ``Source("test", template)``, keyed ``test:<new id>:<n>``; suppressions and address checks
    still apply, consent and caps do not. An inbox template puts one card per address in the
    profile's own inbox. :class:`NotFound` for an unknown template or profile. Audited."""
    if isinstance(to, str) or not to or len(to) > MAX_TEST_ADDRESSES:
        raise InvalidInput([Issue("to", f"a list of 1 to {MAX_TEST_ADDRESSES} seed addresses")])
    bad = [
        Issue(f"to[{n}]", "an address is a non-empty string")
        for n, a in enumerate(to)
        if not isinstance(a, str) or not a.strip()
    ]
    if bad:
        raise InvalidInput(bad)
    extra = _check_context(context if context is not None else {})
    get_template(conn, workspace_id, template)
    _require_profile(conn, workspace_id, profile_id)
    run = new_id()
    intents = [
        SendIntent(
            key=f"test:{run}:{n}",
            profile_id=profile_id,
            template=template,
            source=Source("test", template),
            purpose="test",
            transactional=True,
            context=extra,
            to=address,
        )
        for n, address in enumerate(to)
    ]
    out = outbox.enqueue(conn, workspace_id, intents, now=now)
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="template.test_send",
        target_type="template",
        target_id=template,
        details={"profile_id": profile_id, "to": list(to), "messages": [e.message_id for e in out]},
        at=now,
    )
    return out
