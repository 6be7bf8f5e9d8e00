"""Tracking keys, tracked email, and what comes back about sent messages.

**Keys.** Each workspace signs its links with its own secrets (:func:`tracking_keys`), kept in
``workspaces.settings["tracking_keys"]``: a list of base64 secrets of 32 random bytes, made on
first use; the first signs, all verify. :func:`rotate_tracking_keys` puts a new one first, so
links in emails already sent keep working for as long as their key stays in the list.

**Links.** A :class:`Tracker` builds the signed URLs of :mod:`waymark.delivery.tracking` under
``{public_url}/t/{workspace_id}`` (the workspace is in the path because tokens carry none), and
is the dispatcher's content hook for email (:meth:`Tracker.content_hook`): the HTML and text
parts go through click URLs and get the open pixel, unless the workspace says otherwise
(``workspaces.settings["tracking"] = {"clicks": false, "opens": false}``, each defaulting to
true), and a non-transactional email gets its signed ``List-Unsubscribe`` URL.

**Feedback** (:func:`record_feedback`), from a provider's callback or a tracking endpoint, is
applied to its message in the caller's transaction:

- a ``message_events`` row (status = the kind) and, where it moves forward, the message's
  status: ``sent`` → ``delivered``; ``sent``/``delivered`` → ``bounced``; ``sent``/
  ``delivered`` → ``complained``; ``sent`` → ``failed``. Opens, clicks and unsubscribes are
  recorded without changing the status; a message still ``sending`` keeps it (the dispatcher
  records its send next);
- the profile event ``message.<kind>`` in the event inbox, as ingestion stores events: its
  message id (``waymark:feedback:<digest>``) is claimed in ``seen_messages``, so a callback
  delivered twice makes one event. The digest covers the message and the kind, which happen
  once per message, and for what may happen many times (opens, clicks, soft bounces) the time
  and the link as well. A duplicate changes nothing but the consent below;
- a hard bounce or a complaint puts the address on the suppression list (``hard_bounce``,
  ``complaint``); so do ``soft_bounce_limit`` soft bounces within ``soft_bounce_days``
  (``soft_bounce``), counted among the profile's messages to that address (the profile's index
  keeps the count cheap; an address shared by several profiles is counted per profile);
- an unsubscribe writes the consent ``opted_out`` for the message's channel and purpose, the
  way ingestion writes consents (:func:`write_consents`), and nothing on the suppression list:
  transactional messages still go, and the profile's other purposes stay as they were (an
  ``unsubscribed`` suppression would block every purpose of the address, of every profile
  holding it).

**Texts back** (:func:`apply_inbound_text`): STOP writes ``(sms, "*")`` ``opted_out`` for every
profile holding the sender's number (``"*"`` covers every purpose, see
:func:`waymark.delivery.rules.decide`), START ``opted_in``; HELP changes nothing; each gets
its reply.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, func, insert, select, update

from waymark.access.service import record_audit
from waymark.channels.base import Feedback, FeedbackKind, InboundText, OutgoingMessage
from waymark.core.errors import InvalidInput, Issue, NotFound
from waymark.delivery.keywords import Keyword, classify, reply_for
from waymark.delivery.rules import ANY_PURPOSE
from waymark.delivery.sms import e164
from waymark.delivery.store import suppress
from waymark.delivery.templates import Channel
from waymark.delivery.tracking import (
    Preferences,
    TrackingKeys,
    Unsubscribe,
    click_url,
    open_pixel_url,
    preferences_url,
    track_email,
    unsubscribe_url,
)
from waymark.hub import Hub
from waymark.identity.graph import MergePolicy
from waymark.identity.service import ProfileWriter
from waymark.model.events import (
    ConsentStatus,
    ConsentUpdate,
    Event,
    EventType,
    normalize_identity,
)
from waymark.model.schemas import FieldType, StringFormat, validate_event
from waymark.profiles.schema_store import schema_in_force
from waymark.storage.hotpath import claim_message_ids, inbox_row, insert_inbox, time_converter
from waymark.storage.tables import (
    consents,
    identities,
    message_events,
    messages,
    profile_merges,
    profiles,
    stream_recheck,
    templates,
    workspaces,
)

__all__ = [
    "EVENT_SOURCE",
    "Brand",
    "ContentHook",
    "Tracker",
    "TrackingOptions",
    "apply_inbound_text",
    "apply_unsubscribe",
    "brand_of",
    "consent_choices",
    "record_feedback",
    "rotate_tracking_keys",
    "save_preferences",
    "stored_tracking_keys",
    "tracking_keys",
    "write_consents",
]

log = logging.getLogger(__name__)

#: The ``source`` of the profile events feedback writes.
EVENT_SOURCE: Final = "delivery"
#: Where a workspace's tracking secrets are kept in its settings.
KEYS_SETTING: Final = "tracking_keys"
#: How a consent's purpose is spelled (as the profile API accepts it), or ``"*"``.
PURPOSE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}|\*")
_KEY_BYTES: Final = 32
#: kinds that can happen many times to one message: their time and link tell them apart
_REPEATABLE: Final = frozenset({FeedbackKind.OPENED, FeedbackKind.CLICKED})
#: kind -> (new status, the statuses it moves from)
_MOVES: Final[Mapping[FeedbackKind, tuple[str, frozenset[str]]]] = {
    FeedbackKind.DELIVERED: ("delivered", frozenset({"sent"})),
    FeedbackKind.BOUNCED: ("bounced", frozenset({"sent", "delivered"})),
    FeedbackKind.COMPLAINED: ("complained", frozenset({"sent", "delivered"})),
    FeedbackKind.FAILED: ("failed", frozenset({"sent"})),
}
_MAX_MERGE_HOPS: Final = 32

ContentHook = Callable[[Mapping[str, Any], OutgoingMessage], OutgoingMessage]

# -- keys -----------------------------------------------------------------------------------------

#: workspace -> (the stored list, its keys): decoding and deriving keys happens once per list
_KEYS: dict[str, tuple[tuple[Any, ...], TrackingKeys]] = {}


def _settings(conn: Connection, workspace_id: str, *, lock: bool = False) -> dict[str, Any]:
    """The workspace's settings (a copy); ``lock`` holds its row until the transaction ends
    (PostgreSQL; SQLite serialises writers anyway). :class:`NotFound` for no such workspace."""
    query = select(workspaces.c.settings).where(workspaces.c.id == workspace_id)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"no workspace {workspace_id!r}")
    return dict(row.settings or {})


def _keys_of(workspace_id: str, stored: Sequence[Any]) -> TrackingKeys:
    marker = tuple(stored)
    cached = _KEYS.get(workspace_id)
    if cached is not None and cached[0] == marker:
        return cached[1]
    decoded: list[bytes] = []
    for index, text in enumerate(marker):
        try:
            decoded.append(base64.b64decode(str(text), validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(
                [Issue(f"settings.{KEYS_SETTING}[{index}]", "base64 of a secret")]
            ) from None
    keys = TrackingKeys(tuple(decoded))
    if len(_KEYS) > 1024:
        _KEYS.clear()
    _KEYS[workspace_id] = (marker, keys)
    return keys


def _new_secret() -> str:
    return base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode("ascii")


def stored_tracking_keys(conn: Connection, workspace_id: str) -> TrackingKeys | None:
    """The workspace's keys, or None when it has none yet or does not exist. Reads only: what
    the public endpoints use, so a request can never create keys."""
    row = conn.execute(select(workspaces.c.settings).where(workspaces.c.id == workspace_id)).first()
    stored = (row.settings or {}).get(KEYS_SETTING) if row is not None else None
    return _keys_of(workspace_id, stored) if stored else None


def tracking_keys(conn: Connection, workspace_id: str) -> TrackingKeys:
    """The workspace's keys, made and stored on first use (so call it in a write transaction
    the first time: the outbox does). Two transactions making them at once agree on one list:
    the second waits on the workspace row and reads the first one's. :class:`NotFound` for no
    such workspace; :class:`InvalidInput` when the stored list was edited into nonsense."""
    stored = _settings(conn, workspace_id).get(KEYS_SETTING)
    if stored:
        return _keys_of(workspace_id, stored)
    settings = _settings(conn, workspace_id, lock=True)
    if not settings.get(KEYS_SETTING):
        settings[KEYS_SETTING] = [_new_secret()]
        conn.execute(
            update(workspaces).where(workspaces.c.id == workspace_id).values(settings=settings)
        )
    return _keys_of(workspace_id, settings[KEYS_SETTING])


def rotate_tracking_keys(
    conn: Connection, workspace_id: str, *, actor: str, now: datetime, keep: int | None = None
) -> TrackingKeys:
    """Put a new secret first (it signs from now on); the older ones keep verifying. ``keep``
    drops all but the newest ``keep`` secrets (links signed with a dropped one stop working).
    Audited."""
    if keep is not None and keep < 1:
        raise InvalidInput([Issue("keep", "at least 1: the new key")])
    settings = _settings(conn, workspace_id, lock=True)
    listed = [_new_secret(), *(settings.get(KEYS_SETTING) or [])]
    settings[KEYS_SETTING] = listed[:keep] if keep is not None else listed
    conn.execute(
        update(workspaces).where(workspaces.c.id == workspace_id).values(settings=settings)
    )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="tracking_keys.rotate",
        target_type="workspace",
        target_id=workspace_id,
        details={"keys": len(settings[KEYS_SETTING])},
        at=now,
    )
    return _keys_of(workspace_id, settings[KEYS_SETTING])


# -- links and tracked email ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrackingOptions:
    """What a workspace tracks in its emails (``workspaces.settings["tracking"]``)."""

    clicks: bool = True
    opens: bool = True

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> TrackingOptions:
        """The options in a workspace's settings: each on unless set to ``false``."""
        raw = settings.get("tracking")
        if not isinstance(raw, Mapping):
            return cls()
        return cls(clicks=raw.get("clicks") is not False, opens=raw.get("opens") is not False)


class Tracker:
    """Signed links of one hub (``public_url``: where recipients reach it) and the tracking of
    its emails. Holds nothing but the URL: keys are read per workspace, per call."""

    def __init__(self, public_url: str) -> None:
        self.public_url = public_url.rstrip("/")

    def base_url(self, workspace_id: str) -> str:
        """``{public_url}/t/{workspace_id}``: the tracking endpoints of the workspace."""
        return f"{self.public_url}/t/{workspace_id}"

    def unsubscribe_url(
        self,
        keys: TrackingKeys,
        workspace_id: str,
        *,
        message_id: str,
        profile_id: str,
        channel: Channel,
        purpose: str,
    ) -> str:
        """The signed link revoking ``profile_id``'s consent for ``(channel, purpose)``."""
        return unsubscribe_url(
            self.base_url(workspace_id),
            keys,
            message_id=message_id,
            profile_id=profile_id,
            channel=channel,
            purpose=purpose,
        )

    def preferences_url(
        self, keys: TrackingKeys, workspace_id: str, *, message_id: str, profile_id: str
    ) -> str:
        """The signed link to ``profile_id``'s preference page."""
        return preferences_url(
            self.base_url(workspace_id), keys, message_id=message_id, profile_id=profile_id
        )

    def click_url(
        self, keys: TrackingKeys, workspace_id: str, *, message_id: str, url: str, link_id: int
    ) -> str:
        """The signed redirect to ``url`` for link ``link_id`` of ``message_id``."""
        return click_url(
            self.base_url(workspace_id), keys, message_id=message_id, url=url, link_id=link_id
        )

    def open_url(self, keys: TrackingKeys, workspace_id: str, message_id: str) -> str:
        """The open pixel of ``message_id``."""
        return open_pixel_url(self.base_url(workspace_id), keys, message_id)

    def track(
        self, conn: Connection, row: Mapping[str, Any], message: OutgoingMessage
    ) -> OutgoingMessage:
        """``message`` (an email; other channels come back as they are) with tracked parts as
        the workspace's options say, and its signed ``unsubscribe_url`` unless ``row`` (its
        ``messages`` row) is transactional. May make the workspace's keys (see
        :func:`tracking_keys`)."""
        if message.channel is not Channel.EMAIL:
            return message
        workspace_id = str(row["workspace_id"])
        settings = _settings(conn, workspace_id)
        stored = settings.get(KEYS_SETTING)
        keys = _keys_of(workspace_id, stored) if stored else tracking_keys(conn, workspace_id)
        return self.tracked(keys, TrackingOptions.of(settings), row, message)

    def tracked(
        self,
        keys: TrackingKeys,
        options: TrackingOptions,
        row: Mapping[str, Any],
        message: OutgoingMessage,
    ) -> OutgoingMessage:
        """:meth:`track` with the keys and options given. Content the tracker cannot rewrite
        goes untracked (logged): it must not keep the message from going."""
        workspace_id = str(row["workspace_id"])
        unsubscribe = None
        if not row["transactional"]:
            unsubscribe = self.unsubscribe_url(
                keys,
                workspace_id,
                message_id=message.id,
                profile_id=str(row["profile_id"]),
                channel=message.channel,
                purpose=str(row["purpose"]),
            )
        content = message.content
        if options.clicks or options.opens:
            try:
                content = track_email(
                    content,
                    base_url=self.base_url(workspace_id),
                    keys=keys,
                    message_id=message.id,
                    track_clicks=options.clicks,
                    track_opens=options.opens,
                ).content
            except Exception:  # a document lxml cannot take: sent as it was rendered
                log.exception("tracking message %s failed; it goes untracked", message.id)
        return replace(message, content=content, unsubscribe_url=unsubscribe)

    def content_hook(self, hub: Hub, *, fresh_for: float = 5.0) -> ContentHook:
        """The dispatcher's ``content_hook``: :meth:`track` for each email, with the
        workspace's keys and tracking options read in a read-only connection at most every
        ``fresh_for`` seconds per workspace (a key rotation or a change of the options applies
        to messages sent after that; a write transaction only if the workspace has no keys
        yet). Database errors propagate: the message stays claimed and is tried again."""
        read: dict[str, tuple[float, dict[str, Any]]] = {}
        guard = threading.Lock()

        def hook(row: Mapping[str, Any], message: OutgoingMessage) -> OutgoingMessage:
            if message.channel is not Channel.EMAIL:
                return message
            workspace_id = str(row["workspace_id"])
            with guard:
                known = read.get(workspace_id)
            if known is None or time.monotonic() - known[0] > fresh_for:
                with hub.engine.connect() as conn:
                    settings = _settings(conn, workspace_id)
                with guard:
                    read[workspace_id] = (time.monotonic(), settings)
            else:
                settings = known[1]
            stored = settings.get(KEYS_SETTING)
            if not stored:
                with guard:
                    read.pop(workspace_id, None)  # made now: read them again next time
                with hub.tx() as conn:
                    return self.track(conn, row, message)
            keys = _keys_of(workspace_id, stored)
            return self.tracked(keys, TrackingOptions.of(settings), row, message)

        return hook


# -- consents -------------------------------------------------------------------------------------


def write_consents(
    conn: Connection,
    workspace_id: str,
    profile_id: str,
    updates: Sequence[ConsentUpdate],
    *,
    now: datetime,
) -> bool:
    """Write ``updates`` for ``profile_id`` the way ingestion and the profile API do (through a
    :class:`ProfileWriter`: per channel and purpose the latest statement wins, an older one
    changes nothing) and queue the profile a streaming recheck (no event tells the streaming
    audiences); False, nothing written, when there is no such profile."""
    found = conn.execute(
        select(profiles.c.id).where(
            profiles.c.workspace_id == workspace_id, profiles.c.id == profile_id
        )
    ).first()
    if found is None:
        return False
    if not updates:
        return True
    writer = ProfileWriter(conn, workspace_id=workspace_id, policy=MergePolicy(), now=now)
    for consent in updates:
        writer.set_consent(profile_id, consent)
    writer.flush()
    conn.execute(
        insert(stream_recheck).values(
            workspace_id=workspace_id, profile_id=profile_id, replay=False
        )
    )
    return True


def _current_profile(
    conn: Connection, workspace_id: str, profile_id: str, message_id: str | None = None
) -> str | None:
    """The profile a link names now: its message's (messages follow merges), else the named
    one or the survivor it was merged into; None when it no longer exists."""
    candidate = profile_id
    if message_id is not None:
        owner = conn.execute(
            select(messages.c.profile_id).where(
                messages.c.workspace_id == workspace_id, messages.c.id == message_id
            )
        ).scalar()
        candidate = str(owner) if owner is not None else profile_id
    for _ in range(_MAX_MERGE_HOPS):
        exists = conn.execute(
            select(profiles.c.id).where(
                profiles.c.workspace_id == workspace_id, profiles.c.id == candidate
            )
        ).first()
        if exists is not None:
            return candidate
        survivor = conn.execute(
            select(profile_merges.c.survivor_id)
            .where(
                profile_merges.c.workspace_id == workspace_id,
                profile_merges.c.absorbed_id == candidate,
            )
            .order_by(profile_merges.c.seq.desc())
            .limit(1)
        ).scalar()
        if survivor is None:
            return None
        candidate = str(survivor)
    return None


def apply_unsubscribe(
    conn: Connection, workspace_id: str, request: Unsubscribe, *, now: datetime
) -> bool:
    """Revoke what an unsubscribe link names (its channel and purpose) for the profile it
    names now, and record ``message.unsubscribed`` on its message (once); False when the
    profile no longer exists."""
    profile_id = _current_profile(conn, workspace_id, request.profile_id, request.message_id)
    if profile_id is None:
        return False
    row = _message(conn, workspace_id, request.message_id, None, None)
    if row is not None:
        feedback = Feedback(FeedbackKind.UNSUBSCRIBED, now, message_id=row.id)
        _apply(conn, workspace_id, row, feedback, provider=None, now=now)
    revoke = ConsentUpdate(
        request.channel.value, request.purpose, ConsentStatus.OPTED_OUT, now, "unsubscribe_link"
    )
    return write_consents(conn, workspace_id, profile_id, [revoke], now=now)


def consent_choices(
    conn: Connection, workspace_id: str, request: Preferences
) -> tuple[str, list[tuple[str, str, str]]] | None:
    """For a preference page: the profile it is for now and its ``(channel, purpose,
    status)`` consents in order, the purpose of the linking message included (``unknown``
    when never stated); None when the profile no longer exists."""
    profile_id = _current_profile(conn, workspace_id, request.profile_id, request.message_id)
    if profile_id is None:
        return None
    stated = _consents(conn, workspace_id, profile_id)
    sent = conn.execute(
        select(messages.c.channel, messages.c.purpose).where(
            messages.c.workspace_id == workspace_id, messages.c.id == request.message_id
        )
    ).first()
    if sent is not None:
        stated.setdefault((sent.channel, sent.purpose), ConsentStatus.UNKNOWN.value)
    return profile_id, sorted((c, p, s) for (c, p), s in stated.items())


def _consents(conn: Connection, workspace_id: str, profile_id: str) -> dict[tuple[str, str], str]:
    rows = conn.execute(
        select(consents.c.channel, consents.c.purpose, consents.c.status).where(
            consents.c.workspace_id == workspace_id, consents.c.profile_id == profile_id
        )
    )
    return {(r.channel, r.purpose): r.status for r in rows}


def save_preferences(
    conn: Connection,
    workspace_id: str,
    profile_id: str,
    wanted: Mapping[tuple[str, str], bool],
    *,
    now: datetime,
) -> list[tuple[str, str]]:
    """Set each ``(channel, purpose)`` of ``wanted`` to ``opted_in`` (True) or ``opted_out``
    (False) where that changes whether it is opted in (an ``unknown`` left unchecked stays
    unknown); the pairs written. :class:`InvalidInput` for an unknown channel or a purpose
    that is not a purpose name (or ``*``)."""
    channels = {c.value for c in Channel}
    issues = [
        Issue(f"{channel}:{purpose}", "not a channel and purpose")
        for channel, purpose in wanted
        if channel not in channels or not PURPOSE.fullmatch(purpose)
    ]
    if issues:
        raise InvalidInput(issues)
    current = _consents(conn, workspace_id, profile_id)
    changed = sorted(key for key, on in wanted.items() if (current.get(key) == "opted_in") != on)
    updates = [
        ConsentUpdate(
            channel,
            purpose,
            ConsentStatus.OPTED_IN if wanted[(channel, purpose)] else ConsentStatus.OPTED_OUT,
            now,
            "preference_page",
        )
        for channel, purpose in changed
    ]
    write_consents(conn, workspace_id, profile_id, updates, now=now)
    return changed


@dataclass(frozen=True, slots=True)
class Brand:
    """How a workspace names itself to recipients (``workspaces.settings["brand"]``, else its
    name) and the middle of its SMS HELP reply (``settings["sms_help"]``)."""

    name: str
    sms_help: str | None = None


def brand_of(conn: Connection, workspace_id: str) -> Brand:
    """The workspace's :class:`Brand`; :class:`NotFound` for no such workspace."""
    row = conn.execute(
        select(workspaces.c.name, workspaces.c.settings).where(workspaces.c.id == workspace_id)
    ).first()
    if row is None:
        raise NotFound(f"no workspace {workspace_id!r}")
    settings = row.settings or {}
    brand, helps = settings.get("brand"), settings.get("sms_help")
    return Brand(
        brand.strip() if isinstance(brand, str) and brand.strip() else row.name,
        helps if isinstance(helps, str) and helps.strip() else None,
    )


# -- feedback -------------------------------------------------------------------------------------


def _clean(text: str | None, limit: int) -> str | None:
    """``text`` fit to store: no NUL (PostgreSQL refuses it), at most ``limit`` characters."""
    if text is None:
        return None
    return text.replace("\x00", "")[:limit] or None


def _message(
    conn: Connection,
    workspace_id: str,
    message_id: str | None,
    provider: str | None,
    provider_id: str | None,
) -> Any:
    """The ``messages`` row by Waymark's id, else by the provider's; None if neither finds one."""
    columns = select(
        messages.c.id,
        messages.c.profile_id,
        messages.c.channel,
        messages.c.purpose,
        messages.c.template_id,
        messages.c.source_kind,
        messages.c.source_id,
        messages.c.to_address,
        messages.c.status,
    ).where(messages.c.workspace_id == workspace_id)
    message_id, provider_id = _clean(message_id, 255), _clean(provider_id, 255)
    if message_id is not None:
        row = conn.execute(columns.where(messages.c.id == message_id)).first()
        if row is not None:
            return row
    if provider is not None and provider_id is not None:
        return conn.execute(
            columns.where(messages.c.provider == provider, messages.c.provider_id == provider_id)
        ).first()
    return None


def record_feedback(
    conn: Connection,
    workspace_id: str,
    feedback: Feedback,
    *,
    provider: str | None,
    now: datetime,
    soft_bounce_limit: int = 3,
    soft_bounce_days: int = 30,
    link_id: int | None = None,
) -> str | None:
    """Apply ``feedback`` to its message as the module docstring says, in ``conn``'s
    transaction; the id of that message, or None when no message of the workspace matches
    (nothing written). ``provider`` is the name the message was sent with (``messages.
    provider``: ``twilio``, ``sendgrid``), which finds it by ``feedback.provider_id``; None for
    the hub's own endpoints. ``link_id`` is the clicked link's. When an id comes back, events
    may have been written: the caller sets ``hub.inbox_signal`` after committing."""
    row = _message(conn, workspace_id, feedback.message_id, provider, feedback.provider_id)
    if row is None:
        return None
    _apply(
        conn,
        workspace_id,
        row,
        feedback,
        provider=provider,
        now=now,
        limits=(soft_bounce_limit, soft_bounce_days),
        link_id=link_id,
    )
    if feedback.kind is FeedbackKind.UNSUBSCRIBED:
        source = f"feedback:{provider}" if provider else "unsubscribe_link"
        revoke = ConsentUpdate(
            row.channel, row.purpose, ConsentStatus.OPTED_OUT, min(feedback.at, now), source
        )
        write_consents(conn, workspace_id, row.profile_id, [revoke], now=now)
    return str(row.id)


def _event_key(message_id: str, feedback: Feedback, at: datetime, link_id: int | None) -> str:
    """The profile event's message id: the same for the same report, whoever sends it twice."""
    parts = [message_id, feedback.kind.value]
    soft = feedback.kind is FeedbackKind.BOUNCED and feedback.bounce == "soft"
    if feedback.kind in _REPEATABLE or soft:
        parts += [at.isoformat(), feedback.url or "", "" if link_id is None else str(link_id)]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]
    return f"waymark:feedback:{digest}"


def _apply(
    conn: Connection,
    workspace_id: str,
    row: Any,
    feedback: Feedback,
    *,
    provider: str | None,
    now: datetime,
    limits: tuple[int, int] = (3, 30),
    link_id: int | None = None,
) -> None:
    """Everything but the consent, once per report (nothing for a report seen before)."""
    at = min(feedback.at, now)
    event_id = _event_key(row.id, feedback, at, link_id)
    if not claim_message_ids(conn, workspace_id, [event_id], now):
        return
    kind = feedback.kind
    bounce = None
    if kind is FeedbackKind.BOUNCED:
        bounce = "soft" if feedback.bounce == "soft" else "hard"
    url = _clean(feedback.url, 8192) if kind is FeedbackKind.CLICKED else None
    said = _clean(feedback.detail, 1000)
    detail = {
        key: value
        for key, value in (
            ("provider", provider),
            ("provider_id", _clean(feedback.provider_id, 255)),
            ("bounce", bounce),
            ("url", url),
            ("link_id", link_id),
            ("detail", said),
        )
        if value is not None
    }
    conn.execute(
        insert(message_events).values(
            workspace_id=workspace_id,
            message_id=row.id,
            profile_id=row.profile_id,
            status=kind.value,
            at=at,
            detail=detail,
        )
    )
    move = _MOVES.get(kind)
    if move is not None:
        conn.execute(
            update(messages)
            .where(messages.c.id == row.id, messages.c.status.in_(sorted(move[1])))
            .values(status=move[0], updated_at=now)
        )
    _suppress(conn, workspace_id, row, feedback, bounce, provider, now, limits)
    properties: dict[str, Any] = {
        "message_id": row.id,
        "channel": row.channel,
        "purpose": row.purpose,
        "template": _template_name(conn, row.template_id),
        "source": row.source_kind,
        "source_id": row.source_id or None,
        "provider": provider,
    }
    if kind is FeedbackKind.CLICKED:
        properties.update(url=url, link_id=link_id)
    elif kind is FeedbackKind.BOUNCED:
        properties["bounce"] = bounce
    elif kind is FeedbackKind.FAILED:
        properties["reason"] = said or "undelivered"
    _store_event(
        conn,
        workspace_id,
        row.profile_id,
        event_id,
        f"message.{kind.value}",
        {k: v for k, v in properties.items() if v is not None},
        at=at,
        now=now,
    )


def record_sent(conn: Connection, row: Mapping[str, Any], *, provider: str, now: datetime) -> None:
    """The profile event ``message.sent`` for a message a provider accepted (or the inbox
    took), once per message; ``row`` is the message's row. The caller sets the mover's signal
    after committing."""
    event_id = f"waymark:sent:{row['id']}"
    if not claim_message_ids(conn, row["workspace_id"], [event_id], now):
        return
    properties = {
        "message_id": row["id"],
        "channel": row["channel"],
        "purpose": row["purpose"],
        "template": _template_name(conn, row["template_id"]),
        "source": row["source_kind"],
        "source_id": row["source_id"] or None,
        "provider": provider,
    }
    _store_event(
        conn,
        row["workspace_id"],
        row["profile_id"],
        event_id,
        "message.sent",
        {k: v for k, v in properties.items() if v is not None},
        at=now,
        now=now,
    )


def _template_name(conn: Connection, template_id: str | None) -> str | None:
    if template_id is None:
        return None
    name = conn.execute(select(templates.c.name).where(templates.c.id == template_id)).scalar()
    return None if name is None else str(name)


def _suppress(
    conn: Connection,
    workspace_id: str,
    row: Any,
    feedback: Feedback,
    bounce: str | None,
    provider: str | None,
    now: datetime,
    limits: tuple[int, int],
) -> None:
    """Put the message's address on the suppression list if the feedback says so."""
    address = row.to_address or feedback.address
    if not address or row.channel not in (Channel.EMAIL.value, Channel.SMS.value):
        return
    reason = None
    if feedback.kind is FeedbackKind.COMPLAINED:
        reason = "complaint"
    elif bounce == "hard":
        reason = "hard_bounce"
    elif bounce == "soft":
        limit, days = limits
        if _soft_bounces(conn, workspace_id, row, now - timedelta(days=days)) >= limit:
            reason = "soft_bounce"
    if reason is None:
        return
    suppress(
        conn,
        workspace_id,
        channel=row.channel,
        address=address,
        reason=reason,
        source=f"feedback:{provider}" if provider else "feedback",
        now=now,
        detail=_clean(feedback.detail, 1000) or "",
        profile_id=row.profile_id,
    )


def _soft_bounces(conn: Connection, workspace_id: str, row: Any, since: datetime) -> int:
    """Soft bounces since ``since`` of the profile's messages to the message's address."""
    joined = message_events.join(messages, messages.c.id == message_events.c.message_id)
    return int(
        conn.execute(
            select(func.count())
            .select_from(joined)
            .where(
                message_events.c.workspace_id == workspace_id,
                message_events.c.profile_id == row.profile_id,
                message_events.c.status == FeedbackKind.BOUNCED.value,
                message_events.c.at >= since,
                message_events.c.detail["bounce"].as_string() == "soft",
                messages.c.channel == row.channel,
                messages.c.to_address == row.to_address,
            )
        ).scalar_one()
    )


def _store_event(
    conn: Connection,
    workspace_id: str,
    profile_id: str,
    event_id: str,
    name: str,
    properties: dict[str, Any],
    *,
    at: datetime,
    now: datetime,
) -> None:
    """One hub event into the event inbox, checked against the schema in force as ingestion
    checks events. It is stored even if that schema refuses it (flag ``unchecked``): the
    built-in ``message.*`` events are declared for every workspace, so that only happens to a
    schema saved before they were."""
    _, schema = schema_in_force(conn, workspace_id)
    checked = validate_event(schema, name, properties)
    flags: tuple[str, ...] = checked.flags
    if checked.ok:
        properties = checked.value
    else:
        log.warning("the schema of workspace %s refuses %s: %s", workspace_id, name, checked.issues)
        flags = ("unchecked",)
    event = Event(
        message_id=event_id,
        type=EventType.TRACK,
        name=name,
        timestamp=at,
        received_at=now,
        identities=(),
        properties=properties,
        flags=flags,
        source=EVENT_SOURCE,
    )
    insert_inbox(conn, [inbox_row(workspace_id, profile_id, event, time_converter(conn))])


# -- texts back -----------------------------------------------------------------------------------


def _phone_owners(conn: Connection, workspace_id: str, number: str) -> list[str]:
    """The profiles holding ``number``: by the ``phone`` identity, and by the schema's phone
    attribute (stored in E.164; a scan of the workspace's profiles, done for keywords only)."""
    try:
        normal = e164(number)
    except ValueError:
        normal = number.strip()
    found: set[str] = set()
    try:
        identity = normalize_identity("phone", normal)
    except ValueError:
        return []
    found.update(
        conn.execute(
            select(identities.c.profile_id).where(
                identities.c.workspace_id == workspace_id,
                identities.c.namespace == identity.namespace,
                identities.c.value == identity.value,
            )
        ).scalars()
    )
    _, schema = schema_in_force(conn, workspace_id)
    attribute = next(
        (
            name
            for name, spec in schema.attributes.items()
            if spec.type is FieldType.STRING and spec.format is StringFormat.PHONE
        ),
        "phone",
    )
    found.update(
        conn.execute(
            select(profiles.c.id).where(
                profiles.c.workspace_id == workspace_id,
                profiles.c.attributes[attribute].as_string() == normal,
            )
        ).scalars()
    )
    return sorted(found)


def apply_inbound_text(
    conn: Connection,
    workspace_id: str,
    text: InboundText,
    *,
    brand: str,
    now: datetime,
    help_text: str | None = None,
) -> str | None:
    """Act on a keyword texted to the workspace (see the module docstring): the reply to send
    back (:func:`waymark.delivery.keywords.reply_for`), or None when the text is no keyword.
    A STOP or START from a number no profile holds changes nothing but is answered."""
    keyword = classify(text.body)
    if keyword is None:
        return None
    if keyword is not Keyword.HELP:
        status = ConsentStatus.OPTED_OUT if keyword is Keyword.STOP else ConsentStatus.OPTED_IN
        statement = ConsentUpdate(
            Channel.SMS.value, ANY_PURPOSE, status, min(text.at, now), "sms_keyword"
        )
        for profile_id in _phone_owners(conn, workspace_id, text.sender):
            write_consents(conn, workspace_id, profile_id, [statement], now=now)
    return reply_for(keyword, brand=brand, help_text=help_text)
