"""Delivery objects as stored: templates and fragments, the workspace's rules, suppressions.

A template is saved in its JSON form after being compiled against the workspace's schema in
force and its fragments (syntax, references, filters: :func:`waymark.delivery.templates.
compile_template`); a fragment is saved only if every template including it still compiles.
Rules are one document per workspace, read in the transaction of each decision (a change applies
to the very next message). Suppressions are per channel and address, the address normalised as
:func:`normal_address` says (what the outbox compares).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, delete, insert, select, update

from waymark.access.service import record_audit
from waymark.core.errors import Conflict, InvalidInput, Issue, NotFound
from waymark.core.ids import new_id
from waymark.core.names import check_name
from waymark.delivery.rules import Rules, parse_rules
from waymark.delivery.sms import e164
from waymark.delivery.templates import (
    MAX_SOURCE,
    Channel,
    CompiledTemplate,
    TemplateDef,
    check_fragment,
    compile_template,
    parse_template,
)
from waymark.profiles.schema_store import current_schema
from waymark.storage.tables import (
    delivery_rules,
    suppressions,
    template_fragments,
    templates,
    workspaces,
)

__all__ = [
    "SUPPRESSION_REASONS",
    "RulesVersion",
    "Suppression",
    "Template",
    "compile_stored",
    "current_rules",
    "delete_fragment",
    "delete_template",
    "fragments",
    "get_template",
    "list_fragments",
    "list_suppressions",
    "list_templates",
    "normal_address",
    "save_fragment",
    "save_rules",
    "save_template",
    "suppress",
    "unsuppress",
]

#: Why an address is suppressed. ``unsubscribed`` still lets transactional messages through.
SUPPRESSION_REASONS: Final = frozenset(
    {"hard_bounce", "soft_bounce", "complaint", "unsubscribed", "invalid", "manual"}
)
#: Rules in force before a workspace saves any: consent required, no caps, no quiet hours.
DEFAULT_RULES: Final = parse_rules({})


# -- templates ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A saved template; ``definition`` compiled against the schema it was saved under."""

    id: str
    name: str
    channel: Channel
    definition: TemplateDef
    version: int
    created_at: datetime
    updated_at: datetime
    created_by: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "channel": self.channel.value,
            "definition": self.definition.to_json(),
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "created_by": self.created_by,
        }


def _template(row: Any) -> Template:
    return Template(
        id=row.id,
        name=row.name,
        channel=Channel(row.channel),
        definition=parse_template(row.definition),
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
        created_by=row.created_by,
    )


def fragments(conn: Connection, workspace_id: str) -> dict[str, str]:
    """The workspace's fragments, name -> source."""
    rows = conn.execute(
        select(template_fragments.c.name, template_fragments.c.source).where(
            template_fragments.c.workspace_id == workspace_id
        )
    )
    return {r.name: r.source for r in rows}


def compile_stored(
    conn: Connection, workspace_id: str, definition: TemplateDef
) -> CompiledTemplate:
    """``definition`` compiled against the schema in force and the stored fragments."""
    schema = current_schema(conn, workspace_id).schema
    return compile_template(definition, schema, fragments(conn, workspace_id))


def save_template(
    conn: Connection,
    workspace_id: str,
    *,
    name: object,
    document: object,
    actor: str,
    now: datetime,
) -> Template:
    """Create the template ``name`` or replace its definition (a new version); the channel of
    a saved template cannot change (its messages and the steps sending it rely on it)."""
    name = check_name(name)
    definition = parse_template(document)
    compile_stored(conn, workspace_id, definition)
    row = conn.execute(
        select(templates).where(templates.c.workspace_id == workspace_id, templates.c.name == name)
    ).first()
    if row is None:
        conn.execute(
            insert(templates).values(
                id=new_id(),
                workspace_id=workspace_id,
                name=name,
                channel=definition.channel.value,
                definition=definition.to_json(),
                version=1,
                created_at=now,
                updated_at=now,
                created_by=actor,
            )
        )
        action = "template.create"
    else:
        if row.channel != definition.channel.value:
            raise InvalidInput(
                [
                    Issue(
                        "channel",
                        f"template {name!r} is {row.channel}; a template keeps its channel "
                        "(save a new one under another name)",
                    )
                ]
            )
        conn.execute(
            update(templates)
            .where(templates.c.id == row.id)
            .values(definition=definition.to_json(), version=row.version + 1, updated_at=now)
        )
        action = "template.update"
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action=action,
        target_type="template",
        target_id=name,
        at=now,
    )
    return get_template(conn, workspace_id, name)


def get_template(conn: Connection, workspace_id: str, name: str) -> Template:
    row = conn.execute(
        select(templates).where(templates.c.workspace_id == workspace_id, templates.c.name == name)
    ).first()
    if row is None:
        raise NotFound(f"no template named {name!r} in this workspace")
    return _template(row)


def list_templates(conn: Connection, workspace_id: str) -> list[Template]:
    rows = conn.execute(
        select(templates).where(templates.c.workspace_id == workspace_id).order_by(templates.c.name)
    )
    return [_template(r) for r in rows]


def delete_template(
    conn: Connection, workspace_id: str, name: str, *, actor: str, now: datetime
) -> None:
    """Delete a template; messages already written keep their content."""
    found = conn.execute(
        delete(templates).where(templates.c.workspace_id == workspace_id, templates.c.name == name)
    ).rowcount
    if not found:
        raise NotFound(f"no template named {name!r} in this workspace")
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="template.delete",
        target_type="template",
        target_id=name,
        at=now,
    )


def _users_of(conn: Connection, workspace_id: str, fragment: str) -> list[Template]:
    """Templates whose sources mention ``fragment`` (then compiled to be sure)."""
    return [
        t
        for t in list_templates(conn, workspace_id)
        if any(
            fragment in source
            for source in (*t.definition.fields.values(), *t.definition.data.values())
        )
    ]


def save_fragment(
    conn: Connection,
    workspace_id: str,
    *,
    name: object,
    source: object,
    actor: str,
    now: datetime,
) -> int:
    """Create or replace a fragment; its new version returned. Refused, naming them, when a
    template including it would no longer compile."""
    name = check_name(name)
    if not isinstance(source, str) or len(source) > MAX_SOURCE:
        raise InvalidInput(
            [Issue("source", f"must be a Liquid source of at most {MAX_SOURCE} characters")]
        )
    stored = fragments(conn, workspace_id)
    version = 1
    row = conn.execute(
        select(template_fragments.c.version).where(
            template_fragments.c.workspace_id == workspace_id, template_fragments.c.name == name
        )
    ).first()
    schema = current_schema(conn, workspace_id).schema
    check_fragment(source, schema, {k: v for k, v in stored.items() if k != name})
    issues: list[Issue] = []
    for template in _users_of(conn, workspace_id, name):
        try:
            compile_template(template.definition, schema, {**stored, name: source})
        except InvalidInput as exc:
            issues.extend(
                Issue(f"template {template.name!r}.{issue.path}", issue.reason)
                for issue in exc.issues
            )
    if issues:
        raise InvalidInput(issues)
    if row is None:
        conn.execute(
            insert(template_fragments).values(
                workspace_id=workspace_id,
                name=name,
                source=source,
                version=1,
                updated_at=now,
                updated_by=actor,
            )
        )
    else:
        version = row.version + 1
        conn.execute(
            update(template_fragments)
            .where(
                template_fragments.c.workspace_id == workspace_id,
                template_fragments.c.name == name,
            )
            .values(source=source, version=version, updated_at=now, updated_by=actor)
        )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="fragment.save",
        target_type="fragment",
        target_id=name,
        at=now,
    )
    return version


def list_fragments(conn: Connection, workspace_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(template_fragments)
        .where(template_fragments.c.workspace_id == workspace_id)
        .order_by(template_fragments.c.name)
    )
    return [
        {
            "name": r.name,
            "source": r.source,
            "version": r.version,
            "updated_at": r.updated_at.isoformat(),
            "updated_by": r.updated_by,
        }
        for r in rows
    ]


def delete_fragment(
    conn: Connection, workspace_id: str, name: str, *, actor: str, now: datetime
) -> None:
    """Delete a fragment; refused while a template that compiles only with it uses it."""
    stored = fragments(conn, workspace_id)
    if name not in stored:
        raise NotFound(f"no fragment named {name!r} in this workspace")
    schema = current_schema(conn, workspace_id).schema
    rest = {k: v for k, v in stored.items() if k != name}
    users = []
    for template in _users_of(conn, workspace_id, name):
        try:
            compile_template(template.definition, schema, rest)
        except InvalidInput:
            users.append(template.name)
    if users:
        raise Conflict(
            f"fragment {name!r} is used by {', '.join(map(repr, users))}; change those first"
        )
    conn.execute(
        delete(template_fragments).where(
            template_fragments.c.workspace_id == workspace_id, template_fragments.c.name == name
        )
    )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="fragment.delete",
        target_type="fragment",
        target_id=name,
        at=now,
    )


# -- rules ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RulesVersion:
    """The rules in force; version 0 is :data:`DEFAULT_RULES`, before any were saved."""

    rules: Rules
    version: int
    updated_at: datetime | None
    updated_by: str

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": self.rules.to_json(),
            "version": self.version,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "updated_by": self.updated_by,
        }


def current_rules(conn: Connection, workspace_id: str) -> RulesVersion:
    row = conn.execute(
        select(delivery_rules).where(delivery_rules.c.workspace_id == workspace_id)
    ).first()
    if row is None:
        return RulesVersion(DEFAULT_RULES, 0, None, "")
    return RulesVersion(parse_rules(row.document), row.version, row.updated_at, row.updated_by)


def save_rules(
    conn: Connection, workspace_id: str, document: object, *, actor: str, now: datetime
) -> RulesVersion:
    """Replace the workspace's rules (checked by :func:`parse_rules`); in force for the next
    decision of any transaction that starts after this one commits."""
    rules = parse_rules(document)
    # one save of a workspace's rules at a time (PostgreSQL; SQLite serializes writers): two
    # saves reading the same version would both write the next one, and deciders keep rules
    # by version
    conn.execute(select(workspaces.c.id).where(workspaces.c.id == workspace_id).with_for_update())
    old = current_rules(conn, workspace_id)
    values = {
        "document": rules.to_json(),
        "version": old.version + 1,
        "updated_at": now,
        "updated_by": actor,
    }
    if old.version == 0:
        conn.execute(insert(delivery_rules).values(workspace_id=workspace_id, **values))
    else:
        conn.execute(
            update(delivery_rules)
            .where(delivery_rules.c.workspace_id == workspace_id)
            .values(**values)
        )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="rules.update",
        target_type="delivery_rules",
        details={"version": old.version + 1},
        at=now,
    )
    return current_rules(conn, workspace_id)


# -- suppressions ---------------------------------------------------------------------------------


def normal_address(channel: Channel, address: str) -> str:
    """The form addresses are compared in: email lower-cased and trimmed, phone numbers in
    E.164 (unchanged when not parseable), anything else trimmed."""
    address = address.strip()
    if channel is Channel.EMAIL:
        return address.lower()
    if channel is Channel.SMS:
        try:
            return e164(address)
        except ValueError:
            return address
    return address


@dataclass(frozen=True, slots=True)
class Suppression:
    channel: Channel
    address: str
    reason: str
    detail: str
    source: str
    profile_id: str | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "channel": self.channel.value,
            "address": self.address,
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
            "profile_id": self.profile_id,
            "created_at": self.created_at.isoformat(),
        }


def _check_channel(channel: object) -> Channel:
    try:
        return Channel(str(channel))
    except ValueError:
        known = ", ".join(c.value for c in Channel)
        raise InvalidInput(
            [Issue("channel", f"unknown channel {channel!r}; one of {known}")]
        ) from None


def suppress(
    conn: Connection,
    workspace_id: str,
    *,
    channel: object,
    address: object,
    reason: object,
    source: str,
    now: datetime,
    detail: str = "",
    profile_id: str | None = None,
) -> bool:
    """Put ``address`` on the suppression list (``True``), or keep the entry already there
    (``False``; a stronger reason replaces ``soft_bounce`` or ``manual``)."""
    kind = _check_channel(channel)
    if not isinstance(address, str) or not address.strip() or len(address) > 320:
        raise InvalidInput([Issue("address", "must be an address of 1 to 320 characters")])
    if reason not in SUPPRESSION_REASONS:
        raise InvalidInput(
            [
                Issue(
                    "reason",
                    f"unknown reason {reason!r}; one of {', '.join(sorted(SUPPRESSION_REASONS))}",
                )
            ]
        )
    normal = normal_address(kind, address)
    key = (
        suppressions.c.workspace_id == workspace_id,
        suppressions.c.channel == kind.value,
        suppressions.c.address == normal,
    )
    old = conn.execute(select(suppressions.c.reason).where(*key)).first()
    if old is not None:
        if old.reason in ("soft_bounce", "manual") and reason not in ("soft_bounce", "manual"):
            conn.execute(
                update(suppressions)
                .where(*key)
                .values(reason=reason, detail=detail[:1000], source=source)
            )
        return False
    conn.execute(
        insert(suppressions).values(
            workspace_id=workspace_id,
            channel=kind.value,
            address=normal,
            reason=reason,
            detail=detail[:1000],
            source=source,
            profile_id=profile_id,
            created_at=now,
        )
    )
    return True


def unsuppress(
    conn: Connection, workspace_id: str, *, channel: object, address: str, actor: str, now: datetime
) -> bool:
    """Take ``address`` off the list; whether it was on it. Audited (it re-opens a channel)."""
    kind = _check_channel(channel)
    normal = normal_address(kind, address)
    gone = conn.execute(
        delete(suppressions).where(
            suppressions.c.workspace_id == workspace_id,
            suppressions.c.channel == kind.value,
            suppressions.c.address == normal,
        )
    ).rowcount
    if gone:
        record_audit(
            conn,
            workspace_id=workspace_id,
            actor=actor,
            action="suppression.delete",
            target_type="suppression",
            target_id=f"{kind.value}:{normal}",
            at=now,
        )
    return bool(gone)


def list_suppressions(
    conn: Connection,
    workspace_id: str,
    *,
    channel: object = None,
    after: str | None = None,
    limit: int = 100,
) -> list[Suppression]:
    """Entries in address order, ``after`` an address (pagination)."""
    query = select(suppressions).where(suppressions.c.workspace_id == workspace_id)
    if channel is not None:
        query = query.where(suppressions.c.channel == _check_channel(channel).value)
    if after is not None:
        query = query.where(suppressions.c.address > after)
    rows = conn.execute(query.order_by(suppressions.c.address, suppressions.c.channel).limit(limit))
    return [
        Suppression(
            Channel(r.channel), r.address, r.reason, r.detail, r.source, r.profile_id, r.created_at
        )
        for r in rows
    ]
