"""The outbox: send intents become messages, rendered and decided in the caller's transaction.

A journey step or a campaign that decides to message a profile calls :meth:`Outbox.enqueue`
inside the very transaction that records the decision, so the two commit together or not at
all. Each intent carries an idempotency key, unique in the workspace: writing the same intent
again (a retried step, a re-run campaign) returns the message written the first time.

For each intent the outbox finds the profile's address on the template's channel, renders the
template for the profile and applies the workspace's rules (:func:`waymark.delivery.rules.
decide`: address, suppression, consent, quiet hours, frequency caps) as they stand in this
transaction. The message is written with its outcome:

- ``queued``: to be sent; it counts toward the caps from now on (``counted_at``);
- ``held``: inside quiet hours; due again when the window ends (decided afresh then);
- ``excluded``: not sent, with the reason code, the rule and a sentence (``detail``);
- ``failed``: the template could not be rendered for this profile (``render_failed``).

Push intents become one message per push subscription of the profile (key ``<key>/<id>``).

Frequency caps are counted atomically: on SQLite every writer is serialised; on PostgreSQL the
transaction holds an advisory lock per profile (taken in one order) from counting to commit,
so two concurrent senders (a journey and a campaign) can never both take a cap's last slot.
The dispatcher decides again at send time under the same locks (:meth:`Outbox.redecide`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import orjson
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import Connection, select

from waymark.core.errors import InvalidInput, Issue, NotFound
from waymark.core.ids import new_id
from waymark.delivery.feedback import Tracker, tracking_keys
from waymark.delivery.rules import (
    Decision,
    Exclude,
    Hold,
    Message,
    Reason,
    Rules,
    SentRecord,
    decide,
    parse_rules,
)
from waymark.delivery.sms import e164
from waymark.delivery.store import DEFAULT_RULES, RulesVersion, normal_address
from waymark.delivery.templates import (
    Channel,
    CompiledTemplate,
    Rendered,
    RenderFailed,
    compile_template,
    parse_template,
)
from waymark.delivery.tracking import TrackingKeys
from waymark.model.schemas import FieldType, Schema, StringFormat
from waymark.profiles.schema_store import current_schema
from waymark.storage.hotpath import (
    DeliveryFacts,
    fetch_rows,
    insert_messages,
    read_delivery_facts,
    read_delivery_state,
    read_suppressed,
)
from waymark.storage.tables import (
    messages,
    push_subscriptions,
    template_fragments,
    templates,
)

__all__ = [
    "SOURCE_KINDS",
    "Enqueued",
    "Outbox",
    "SendIntent",
    "Source",
    "cap_locks",
    "cap_locks_of",
    "content_json",
    "read_content",
]

log = logging.getLogger(__name__)

#: Who writes send intents.
SOURCE_KINDS: Final = frozenset({"journey", "campaign", "test", "api"})
#: PostgreSQL advisory lock class of the per-profile cap locks (the object id hashes the
#: workspace and profile)
CAP_LOCK_CLASS: Final = 727_003
KEY_MAX: Final = 200
_CHUNK: Final = 500


@dataclass(frozen=True, slots=True)
class Source:
    """What wrote the intent: ``kind`` in :data:`SOURCE_KINDS` and the journey's or campaign's
    id (with a step or variant after a colon, as the caller likes)."""

    kind: str
    id: str = ""


@dataclass(frozen=True, slots=True)
class SendIntent:
    """One message to write. ``key`` is the idempotency key (at most :data:`KEY_MAX`
    characters, unique in the workspace). ``context`` adds render roots (``event``,
    ``audience``, ``journey``, ``campaign``, ``offer``). ``to`` sends to that address instead of
    the profile's (test sends to seed addresses); it is checked like any address."""

    key: str
    profile_id: str
    template: str
    source: Source
    purpose: str = "marketing"
    transactional: bool = False
    context: Mapping[str, Any] = field(default_factory=dict)
    to: str | None = None


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What became of one intent (one per push subscription): the message's id and status, and
    the decision as recorded; ``duplicate`` when the key had been written before (the first
    message's id and status are returned, nothing is written)."""

    message_id: str
    key: str
    status: str
    decision: Mapping[str, Any]
    duplicate: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "key": self.key,
            "status": self.status,
            "decision": dict(self.decision),
            "duplicate": self.duplicate,
        }


def content_json(rendered: Rendered) -> str:
    """How a message's rendered content is stored."""
    return orjson.dumps(
        {"channel": rendered.channel.value, "fields": rendered.fields, "data": rendered.data}
    ).decode()


def read_content(stored: str) -> Rendered:
    """The :class:`Rendered` content of a stored message (a webhook's body parsed again)."""
    raw = orjson.loads(stored)
    channel = Channel(raw["channel"])
    body = orjson.loads(raw["fields"]["body"]) if channel is Channel.WEBHOOK else None
    return Rendered(channel, raw["fields"], raw.get("data", {}), body)


def cap_locks(conn: Connection, workspace_id: str, profile_ids: Iterable[str]) -> None:
    """On PostgreSQL, hold the cap lock of each profile until the transaction ends (taken in
    one order, so two transactions locking overlapping sets cannot deadlock). Nothing on
    SQLite, whose writers are serialised."""
    cap_locks_of(conn, [(workspace_id, p) for p in profile_ids])


def cap_locks_of(conn: Connection, pairs: Iterable[tuple[str, str]]) -> None:
    """:func:`cap_locks` for ``(workspace, profile)`` pairs of several workspaces, all in one
    order."""
    if conn.dialect.name != "postgresql":
        return
    keys = sorted(
        {
            int.from_bytes(
                hashlib.blake2b(f"{w}:{p}".encode(), digest_size=4).digest(), "big", signed=True
            )
            for w, p in pairs
        }
    )
    for start in range(0, len(keys), _CHUNK):
        fetch_rows(
            conn,
            "SELECT pg_advisory_xact_lock(%s, k) FROM unnest(CAST(%s AS integer[])) "
            "WITH ORDINALITY AS t(k, n) ORDER BY n",
            (CAP_LOCK_CLASS, keys[start : start + _CHUNK]),
        )


@dataclass(slots=True)
class _Addresses:
    """Which attributes hold a profile's email address, phone number and time zone."""

    email: str | None
    phone: str | None
    time_zone: str | None
    #: the channels whose address attribute is declared with its format (so stored values were
    #: checked on the way in)
    checked: frozenset[Channel] = frozenset()

    @classmethod
    def of(cls, schema: Schema) -> _Addresses:
        found: dict[StringFormat, str] = {}
        for name, spec in schema.attributes.items():
            if spec.type is FieldType.STRING and spec.format is not None:
                found.setdefault(spec.format, name)
        return cls(
            found.get(StringFormat.EMAIL, "email"),
            found.get(StringFormat.PHONE, "phone"),
            found.get(StringFormat.TIMEZONE, "timezone"),
            frozenset(
                c
                for c, f in ((Channel.EMAIL, StringFormat.EMAIL), (Channel.SMS, StringFormat.PHONE))
                if f in found
            ),
        )


@dataclass(frozen=True, slots=True)
class _State:
    """A workspace as its delivery decisions read it."""

    name: str
    zone: str
    rules: Rules
    rules_version: int
    schema_version: int
    schema: Schema

    @classmethod
    def of(
        cls,
        name: str,
        settings: Mapping[str, Any],
        rules: Rules,
        rules_version: int,
        schema_version: int,
        schema: Schema,
    ) -> _State:
        """The state from the workspace's row (its time zone read from ``settings``)."""
        zone = str(settings.get("time_zone", "UTC"))
        return cls(name, zone, rules, rules_version, schema_version, schema)


@dataclass(slots=True)
class _Facts:
    """What the rules read about a set of profiles, loaded once per batch."""

    attributes: dict[str, dict[str, Any]]
    consents: dict[str, dict[tuple[str, str], str]]
    sent: dict[str, list[tuple[str, SentRecord]]]  # profile -> (message id, record)
    suppressed: dict[tuple[str, str], str]  # (channel, address) -> reason


class Outbox:
    """Writes send intents (:meth:`enqueue`) and decides again at send time (:meth:`redecide`).

    Holds per-process caches only (compiled templates, parsed schemas and rules, by version):
    every decision reads the rules, consents, suppressions and caps of its own transaction.
    ``public_url`` is where this hub's tracking endpoints are reached (unsubscribe links)."""

    def __init__(self, *, public_url: str = "http://127.0.0.1:8088") -> None:
        self.public_url = public_url.rstrip("/")
        self.tracker = Tracker(self.public_url)
        self._compiled: dict[
            tuple[str, int, int, tuple[tuple[str, int], ...]], CompiledTemplate
        ] = {}
        self._schemas: dict[tuple[str, int], Schema] = {}
        self._rules: dict[tuple[str, int], Rules] = {}
        #: per workspace, the rules version last read and its longest cap window (how far
        #: back messages count): lets a decision at send time read all it needs at once
        self._longest: dict[str, tuple[int, timedelta | None]] = {}

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
        """Where the recipient of ``message_id`` unsubscribes from ``(channel, purpose)`` (one
        click, RFC 8058): the link :class:`~waymark.delivery.feedback.Tracker` signs."""
        return self.tracker.unsubscribe_url(
            keys,
            workspace_id,
            message_id=message_id,
            profile_id=profile_id,
            channel=channel,
            purpose=purpose,
        )

    def preferences_url(
        self, keys: TrackingKeys, workspace_id: str, *, message_id: str, profile_id: str
    ) -> str:
        """Where the recipient of ``message_id`` manages their subscriptions (signed)."""
        return self.tracker.preferences_url(
            keys, workspace_id, message_id=message_id, profile_id=profile_id
        )

    def render_context(
        self,
        keys: TrackingKeys,
        workspace_id: str,
        workspace_name: str,
        *,
        profile_id: str,
        attributes: Mapping[str, Any],
        message_id: str,
        channel: Channel,
        purpose: str,
        extra: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The render context of one message: the caller's ``extra`` roots (``event``,
        ``journey`` …), then ``profile``, ``message`` (its links signed with ``keys``) and
        ``workspace``, which the outbox always sets itself."""
        return {
            **extra,
            "profile": {**attributes, "id": profile_id},
            "message": {
                "id": message_id,
                "channel": channel.value,
                "unsubscribe_url": self.unsubscribe_url(
                    keys,
                    workspace_id,
                    message_id=message_id,
                    profile_id=profile_id,
                    channel=channel,
                    purpose=purpose,
                ),
                "preferences_url": self.preferences_url(
                    keys, workspace_id, message_id=message_id, profile_id=profile_id
                ),
            },
            "workspace": {"id": workspace_id, "name": workspace_name},
        }

    # -- loading ----------------------------------------------------------------------------

    def _state(self, conn: Connection, workspace_id: str) -> _State:
        """The workspace's name, time zone, rules and schema in force (parsed once per
        version), read in one statement."""
        found = read_delivery_state(conn, workspace_id)
        if found is None:
            raise NotFound(f"no workspace {workspace_id!r}")
        name, settings, rules_version, document, schema_version = found
        rules = self._rules.get((workspace_id, rules_version))
        if rules is None:
            rules = DEFAULT_RULES if document is None else parse_rules(document)
            if len(self._rules) > 256:
                self._rules.clear()
            self._rules[(workspace_id, rules_version)] = rules
        schema = self._schemas.get((workspace_id, schema_version))
        if schema is None:
            schema = current_schema(conn, workspace_id).schema
            if len(self._schemas) > 256:
                self._schemas.clear()
            self._schemas[(workspace_id, schema_version)] = schema
        self._longest[workspace_id] = (
            rules_version,
            max((cap.per for cap in rules.caps), default=None),
        )
        return _State.of(name, settings, rules, rules_version, schema_version, schema)

    def _templates(
        self, conn: Connection, workspace_id: str, names: set[str], schema: tuple[int, Schema]
    ) -> dict[str, tuple[str, int, CompiledTemplate]]:
        """Name -> (id, version, compiled); unknown names are absent."""
        frag_rows = conn.execute(
            select(template_fragments.c.name, template_fragments.c.version).where(
                template_fragments.c.workspace_id == workspace_id
            )
        ).all()
        frag_key = tuple(sorted((r.name, r.version) for r in frag_rows))
        sources: dict[str, str] | None = None
        out: dict[str, tuple[str, int, CompiledTemplate]] = {}
        rows = conn.execute(
            select(
                templates.c.id, templates.c.name, templates.c.version, templates.c.definition
            ).where(templates.c.workspace_id == workspace_id, templates.c.name.in_(sorted(names)))
        ).all()
        for row in rows:
            key = (row.id, row.version, schema[0], frag_key)
            compiled = self._compiled.get(key)
            if compiled is None:
                if sources is None:
                    sources = {
                        r.name: r.source
                        for r in conn.execute(
                            select(template_fragments.c.name, template_fragments.c.source).where(
                                template_fragments.c.workspace_id == workspace_id
                            )
                        )
                    }
                compiled = compile_template(parse_template(row.definition), schema[1], sources)
                if len(self._compiled) > 1024:
                    self._compiled.clear()
                self._compiled[key] = compiled
            out[row.name] = (row.id, row.version, compiled)
        return out

    def _facts(
        self,
        conn: Connection,
        workspace_id: str,
        profile_ids: Sequence[str],
        rules: Rules,
        now: datetime,
    ) -> _Facts:
        ids = sorted(set(profile_ids))
        attributes: dict[str, dict[str, Any]] = {}
        given: dict[str, dict[tuple[str, str], str]] = defaultdict(dict)
        sent: dict[str, list[tuple[str, SentRecord]]] = defaultdict(list)
        longest = max((cap.per for cap in rules.caps), default=None)
        since = None if longest is None else now - longest
        for start in range(0, len(ids), _CHUNK):
            _add_facts(
                read_delivery_facts(conn, workspace_id, ids[start : start + _CHUNK], since),
                attributes,
                given,
                sent,
            )
        return _Facts(attributes, dict(given), dict(sent), {})

    def _facts_and_state(
        self,
        conn: Connection,
        workspace_id: str,
        profile_ids: Sequence[str],
        wanted: set[tuple[str, str]],
        now: datetime,
    ) -> tuple[_State, _Facts]:
        """The state, the facts of ``profile_ids`` and the suppressions among ``wanted``, in
        one statement when the workspace's rules are known to this outbox by version (their
        longest cap says how far back messages count) and the sets are small; else as
        :meth:`_state`, :meth:`_facts` and :meth:`_load_suppressed` read them."""
        ids = sorted(set(profile_ids))
        known = self._longest.get(workspace_id)
        if known is not None and len(ids) <= _CHUNK and len(wanted) <= _CHUNK:
            version, longest = known
            got = read_delivery_facts(
                conn,
                workspace_id,
                ids,
                None if longest is None else now - longest,
                suppressed=sorted(wanted),
                with_state=True,
            )
            if got.state is None:
                raise NotFound(f"no workspace {workspace_id!r}")
            name, settings, rules_version, schema_version = got.state
            rules = self._rules.get((workspace_id, rules_version))
            schema = self._schemas.get((workspace_id, schema_version))
            if rules_version == version and rules is not None and schema is not None:
                attributes: dict[str, dict[str, Any]] = {}
                given: dict[str, dict[tuple[str, str], str]] = defaultdict(dict)
                sent: dict[str, list[tuple[str, SentRecord]]] = defaultdict(list)
                _add_facts(got, attributes, given, sent)
                state = _State.of(name, settings, rules, rules_version, schema_version, schema)
                return state, _Facts(attributes, dict(given), dict(sent), dict(got.suppressed))
        # the rules changed (or were never read here): read them first
        state = self._state(conn, workspace_id)
        facts = self._facts(conn, workspace_id, ids, state.rules, now)
        self._load_suppressed(conn, workspace_id, facts, wanted)
        return state, facts

    def _load_suppressed(
        self, conn: Connection, workspace_id: str, facts: _Facts, wanted: set[tuple[str, str]]
    ) -> None:
        by_channel: dict[str, list[str]] = defaultdict(list)
        for channel, address in wanted:
            by_channel[channel].append(address)
        for channel, addresses in by_channel.items():
            for start in range(0, len(addresses), _CHUNK):
                found = read_suppressed(
                    conn, workspace_id, channel, addresses[start : start + _CHUNK]
                )
                for address, reason in found.items():
                    facts.suppressed[(channel, address)] = reason

    # -- addresses --------------------------------------------------------------------------

    @staticmethod
    def _address(
        channel: Channel, attrs: Mapping[str, Any], where: _Addresses, to: str | None
    ) -> tuple[str | None, bool]:
        """The normalised address on ``channel`` and whether it is valid. An attribute the
        schema declares with the email or phone format was checked when it was stored."""
        if channel is Channel.INBOX:
            return "inbox", True
        raw = to
        checked = False
        if raw is None:
            name = where.email if channel is Channel.EMAIL else where.phone
            if channel in (Channel.EMAIL, Channel.SMS) and name is not None:
                value = attrs.get(name)
                raw = value if isinstance(value, str) else None
                checked = channel in where.checked
        if raw is None or not raw.strip():
            return None, False
        return normal_address(channel, raw), checked or _valid(channel, raw)

    # -- writing ----------------------------------------------------------------------------

    def enqueue(
        self,
        conn: Connection,
        workspace_id: str,
        intents: Sequence[SendIntent],
        *,
        now: datetime,
    ) -> list[Enqueued]:
        """Write ``intents`` as messages in ``conn``'s transaction (see the module docstring);
        one :class:`Enqueued` per message, in order. :class:`InvalidInput` (nothing written)
        naming each intent that is malformed or names an unknown template or profile."""
        _check(intents)
        if not intents:
            return []
        cap_locks(conn, workspace_id, (i.profile_id for i in intents))
        state = self._state(conn, workspace_id)
        ws_name, ws_zone = state.name, state.zone
        keys = tracking_keys(conn, workspace_id)
        # a test send's links never verify: a seed address clicking one must not unsubscribe
        # the real profile the test rendered for
        test_keys = TrackingKeys.of(os.urandom(32))
        schema = (state.schema_version, state.schema)
        where = _Addresses.of(state.schema)
        found = self._templates(conn, workspace_id, {i.template for i in intents}, schema)
        rules = RulesVersion(state.rules, state.rules_version, None, "")
        facts = self._facts(conn, workspace_id, [i.profile_id for i in intents], rules.rules, now)
        issues = [
            Issue(f"[{n}].template", f"no template named {i.template!r} in this workspace")
            for n, i in enumerate(intents)
            if i.template not in found
        ] + [
            Issue(f"[{n}].profile_id", f"no profile {i.profile_id!r} in this workspace")
            for n, i in enumerate(intents)
            if i.profile_id not in facts.attributes
        ]
        if issues:
            raise InvalidInput(issues)
        # one planned message per intent, or per push subscription of its profile
        subs = self._subscriptions(
            conn,
            workspace_id,
            {
                i.profile_id
                for i in intents
                if found[i.template][2].definition.channel is Channel.PUSH
            },
        )
        planned: list[tuple[SendIntent, str, str | None, bool]] = []  # intent, key, address, valid
        for intent in intents:
            channel = found[intent.template][2].definition.channel
            if channel is Channel.PUSH and intent.to is None:
                mine = subs.get(intent.profile_id, [])
                if not mine:
                    planned.append((intent, intent.key, None, False))
                for sub_id, sub_address in mine:
                    planned.append((intent, f"{intent.key}/{sub_id}", sub_address, True))
                continue
            found_address, found_valid = self._address(
                channel, facts.attributes[intent.profile_id], where, intent.to
            )
            planned.append((intent, intent.key, found_address, found_valid))
        existing = self._existing(conn, workspace_id, [p[1] for p in planned])
        self._load_suppressed(
            conn,
            workspace_id,
            facts,
            {
                (found[i.template][2].definition.channel.value, a)
                for i, k, a, _ in planned
                if a is not None and k not in existing
            },
        )
        out: list[Enqueued] = []
        rows: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        fresh: set[str] = set()
        for intent, key, planned_address, planned_valid in planned:
            address, valid = planned_address, planned_valid
            if key in existing or key in fresh:
                message_id, status, recorded = existing.get(key, ("", "", {}))
                if key in fresh:  # the same key twice in one call: the first one counts
                    first = next(e for e in out if e.key == key)
                    message_id, status, recorded = first.message_id, first.status, first.decision
                out.append(Enqueued(message_id, key, status, recorded, duplicate=True))
                continue
            fresh.add(key)
            template_id, version, compiled = found[intent.template]
            channel = compiled.definition.channel
            message_id = new_id()
            attrs = facts.attributes[intent.profile_id]
            zone_attr = where.time_zone
            zone = attrs.get(zone_attr) if zone_attr else None
            row: dict[str, Any] = {
                "id": message_id,
                "workspace_id": workspace_id,
                "idempotency_key": key,
                "profile_id": intent.profile_id,
                "channel": channel.value,
                "purpose": intent.purpose,
                "transactional": intent.transactional,
                "template_id": template_id,
                "template_version": version,
                "source_kind": intent.source.kind,
                "source_id": intent.source.id,
                "to_address": address,
                "content": None,
                "reason": None,
                "rule": None,
                "detail": "",
                "attempts": 0,
                "next_attempt_at": None,
                "lease_until": None,
                "provider": None,
                "provider_id": None,
                "counted_at": None,
                "created_at": now,
                "updated_at": now,
                "sent_at": None,
            }
            context = self.render_context(
                test_keys if intent.source.kind == "test" else keys,
                workspace_id,
                ws_name,
                profile_id=intent.profile_id,
                attributes=attrs,
                message_id=message_id,
                channel=channel,
                purpose=intent.purpose,
                extra=intent.context,
            )
            try:
                rendered = compiled.render(context)
            except RenderFailed as exc:
                decision_json: dict[str, Any] = {
                    "outcome": "fail",
                    "reason": "render_failed",
                    "field": exc.field,
                    "detail": exc.reason,
                }
                row.update(
                    status="failed",
                    reason="render_failed",
                    detail=f"{exc.field}: {exc.reason}"[:2000],
                )
            else:
                row["content"] = content_json(rendered)
                if channel is Channel.WEBHOOK and intent.to is None:
                    address, valid = rendered.fields["url"], True  # checked by the render
                    row["to_address"] = address
                decision = decide(
                    rules.rules,
                    Message(
                        channel,
                        intent.purpose,
                        address,
                        address_valid=valid,
                        transactional=intent.transactional,
                        time_zone=zone if isinstance(zone, str) else None,
                    ),
                    consents=facts.consents.get(intent.profile_id, {}),
                    suppressed=_suppressed_on(facts, channel),
                    sent=[r for _, r in facts.sent.get(intent.profile_id, [])],
                    now=now,
                    workspace_zone=ws_zone,
                )
                decision_json = decision.to_json()
                _apply(row, decision, now)
                if row["counted_at"] is not None:
                    facts.sent.setdefault(intent.profile_id, []).append(
                        (message_id, SentRecord(now, channel, intent.purpose, intent.transactional))
                    )
            if rules.version:
                decision_json["rules_version"] = rules.version
            rows.append(row)
            history.append(
                {
                    "workspace_id": workspace_id,
                    "message_id": message_id,
                    "profile_id": intent.profile_id,
                    "status": row["status"],
                    "at": now,
                    "detail": decision_json,
                }
            )
            out.append(Enqueued(message_id, key, row["status"], decision_json))
        insert_messages(conn, rows, history)
        return out

    def _existing(
        self, conn: Connection, workspace_id: str, keys: Sequence[str]
    ) -> dict[str, tuple[str, str, Mapping[str, Any]]]:
        found: dict[str, tuple[str, str, Mapping[str, Any]]] = {}
        wanted = sorted(set(keys))
        for start in range(0, len(wanted), _CHUNK):
            for row in conn.execute(
                select(
                    messages.c.idempotency_key,
                    messages.c.id,
                    messages.c.status,
                    messages.c.reason,
                    messages.c.rule,
                    messages.c.detail,
                ).where(
                    messages.c.workspace_id == workspace_id,
                    messages.c.idempotency_key.in_(wanted[start : start + _CHUNK]),
                )
            ):
                decision: dict[str, Any] = {"status": row.status}
                if row.reason:
                    decision.update(reason=row.reason, detail=row.detail)
                if row.rule:
                    decision["rule"] = row.rule
                found[row.idempotency_key] = (row.id, row.status, decision)
        return found

    @staticmethod
    def _subscriptions(
        conn: Connection, workspace_id: str, profile_ids: set[str]
    ) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = defaultdict(list)
        ids = sorted(profile_ids)
        for start in range(0, len(ids), _CHUNK):
            for row in conn.execute(
                select(
                    push_subscriptions.c.id,
                    push_subscriptions.c.profile_id,
                    push_subscriptions.c.address,
                )
                .where(
                    push_subscriptions.c.workspace_id == workspace_id,
                    push_subscriptions.c.profile_id.in_(ids[start : start + _CHUNK]),
                )
                .order_by(push_subscriptions.c.created_at)
            ):
                out[row.profile_id].append((row.id, row.address))
        return dict(out)

    # -- at send time -----------------------------------------------------------------------

    def redecide(
        self,
        conn: Connection,
        workspace_id: str,
        claimed: Sequence[Mapping[str, Any]],
        *,
        now: datetime,
        locked: bool = False,
    ) -> dict[str, Decision]:
        """Decide again for messages about to be sent (rows of ``messages``, all of this
        workspace), under the cap locks: the rules, consents and suppressions as they stand
        now, the caps counting every other admitted message. Message id -> decision."""
        if not claimed:
            return {}
        if not locked:  # else the caller holds them (waymark.delivery.dispatcher)
            cap_locks(conn, workspace_id, (m["profile_id"] for m in claimed))
        state, facts = self._facts_and_state(
            conn,
            workspace_id,
            [m["profile_id"] for m in claimed],
            {(m["channel"], m["to_address"]) for m in claimed if m["to_address"] is not None},
            now,
        )
        ws_zone = state.zone
        where = _Addresses.of(state.schema)
        rules = state.rules
        out: dict[str, Decision] = {}
        for m in claimed:
            channel = Channel(m["channel"])
            attrs = facts.attributes.get(m["profile_id"])
            if attrs is None:
                out[m["id"]] = Exclude(Reason.NO_PROFILE, "the profile no longer exists")
                continue
            zone = attrs.get(where.time_zone) if where.time_zone else None
            others = [r for mid, r in facts.sent.get(m["profile_id"], []) if mid != m["id"]]
            decision = decide(
                rules,
                Message(
                    channel,
                    m["purpose"],
                    m["to_address"],
                    address_valid=m["to_address"] is not None,
                    transactional=m["transactional"],
                    time_zone=zone if isinstance(zone, str) else None,
                ),
                consents=facts.consents.get(m["profile_id"], {}),
                suppressed=_suppressed_on(facts, channel),
                sent=others,
                now=now,
                workspace_zone=ws_zone,
            )
            out[m["id"]] = decision
            if not isinstance(decision, Exclude | Hold):
                facts.sent.setdefault(m["profile_id"], []).append(
                    (m["id"], SentRecord(now, channel, m["purpose"], m["transactional"]))
                )
        return out


def _add_facts(
    got: DeliveryFacts,
    attributes: dict[str, dict[str, Any]],
    given: dict[str, dict[tuple[str, str], str]],
    sent: dict[str, list[tuple[str, SentRecord]]],
) -> None:
    """Add what :func:`read_delivery_facts` read to the facts being gathered."""
    attributes.update(got.attributes)
    for profile_id, channel, purpose, status in got.consents:
        given[profile_id][(channel, purpose)] = status
    for message_id, profile_id, channel, purpose, transactional, at in got.counted:
        sent[profile_id].append(
            (message_id, SentRecord(at, Channel(channel), purpose, transactional))
        )


def _suppressed_on(facts: _Facts, channel: Channel) -> Mapping[str, str]:
    return _ChannelView(facts.suppressed, channel.value)


class _ChannelView(Mapping[str, str]):
    """The suppressions of one channel, as :func:`decide` reads them (by address)."""

    def __init__(self, entries: Mapping[tuple[str, str], str], channel: str) -> None:
        self._entries = entries
        self._channel = channel

    def __getitem__(self, address: str) -> str:
        return self._entries[(self._channel, address)]

    def __iter__(self) -> Any:
        return (a for c, a in self._entries if c == self._channel)

    def __len__(self) -> int:
        return sum(1 for c, _ in self._entries if c == self._channel)


def _apply(row: dict[str, Any], decision: Decision, now: datetime) -> None:
    """Write ``decision`` onto a new message row."""
    if isinstance(decision, Exclude):
        row.update(
            status="excluded",
            reason=decision.reason.value,
            rule=decision.rule,
            detail=decision.detail,
        )
    elif isinstance(decision, Hold):
        row.update(
            status="held",
            rule=decision.rule,
            detail=decision.detail,
            next_attempt_at=decision.until,
        )
    else:
        row.update(status="queued", next_attempt_at=now, counted_at=now)


def _valid(channel: Channel, raw: str) -> bool:
    """Whether ``raw`` is a usable address on ``channel``."""
    if channel is Channel.EMAIL:
        return _email_ok(raw)
    if channel is Channel.SMS:
        try:
            e164(raw)
        except ValueError:
            return False
        return True
    if channel is Channel.WEBHOOK:
        return raw.startswith(("http://", "https://"))
    return True


def _email_ok(raw: str) -> bool:
    try:
        validate_email(raw.strip(), check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def _check(intents: Sequence[SendIntent]) -> None:
    issues: list[Issue] = []
    for n, intent in enumerate(intents):
        if not isinstance(intent.key, str) or not intent.key or len(intent.key) > KEY_MAX:
            issues.append(Issue(f"[{n}].key", f"must be 1 to {KEY_MAX} characters"))
        if intent.source.kind not in SOURCE_KINDS:
            issues.append(
                Issue(
                    f"[{n}].source",
                    f"unknown source {intent.source.kind!r}; "
                    f"one of {', '.join(sorted(SOURCE_KINDS))}",
                )
            )
        if not isinstance(intent.purpose, str) or not intent.purpose or len(intent.purpose) > 64:
            issues.append(Issue(f"[{n}].purpose", "must be 1 to 64 characters"))
        reserved = {"profile", "message", "workspace"} & set(intent.context)
        if reserved:
            issues.append(
                Issue(
                    f"[{n}].context",
                    f"{', '.join(sorted(reserved))} cannot be given: the outbox sets them",
                )
            )
    if issues:
        raise InvalidInput(issues)
