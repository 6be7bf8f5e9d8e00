"""Workspaces, keys, users and the audit log.

Keys are random 32-byte secrets shown once at creation and stored as SHA-256 hashes (they carry
full entropy, so a slow password hash buys nothing and would slow every request). A key's
``prefix`` (its first characters) is kept in clear so people can tell keys apart.

Services take an open connection (the unit of work) and never commit; the edge does.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from waymark.core.errors import Conflict, Forbidden, InvalidInput, Issue, NotFound, Unauthenticated
from waymark.core.ids import new_id
from waymark.storage.tables import api_keys, audit_log, users, workspaces


class Scope(StrEnum):
    """What a key may do. ``admin`` implies every other scope."""

    ADMIN = "admin"
    READ = "read"
    WRITE = "write"
    INGEST = "ingest"


class Role(StrEnum):
    """A person's role in a workspace; it decides the scopes of their tokens."""

    ADMIN = "admin"
    MARKETER = "marketer"
    APPROVER = "approver"
    VIEWER = "viewer"


ROLE_SCOPES: dict[Role, frozenset[Scope]] = {
    Role.ADMIN: frozenset(Scope),
    Role.MARKETER: frozenset({Scope.READ, Scope.WRITE, Scope.INGEST}),
    Role.APPROVER: frozenset({Scope.READ}),
    Role.VIEWER: frozenset({Scope.READ}),
}

KEY_PREFIXES = {"write": "wmw_", "secret": "wms_", "user": "wmu_"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the workspace, the key, its scopes, and the user when it is a user token."""

    workspace_id: str
    key_id: str
    kind: str
    scopes: frozenset[Scope]
    user_id: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"user:{self.user_id}" if self.user_id else f"key:{self.key_id}"

    def require(self, scope: Scope) -> None:
        """Raise :class:`Forbidden` unless this principal holds ``scope`` (or admin)."""
        if scope not in self.scopes and Scope.ADMIN not in self.scopes:
            raise Forbidden(f"this key lacks the {scope.value!r} scope")


@dataclass(frozen=True, slots=True)
class Workspace:
    """A tenant: every object belongs to exactly one."""

    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A newly created key; ``secret`` is shown this once and never stored."""

    id: str
    kind: str
    secret: str
    scopes: tuple[str, ...]
    name: str


def hash_key(secret: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(secret.encode()).hexdigest()


def record_audit(
    conn: Connection,
    *,
    workspace_id: str | None,
    actor: str,
    action: str,
    target_type: str,
    target_id: str = "",
    details: dict[str, Any] | None = None,
    at: datetime,
) -> None:
    """Append one entry to the audit log (in the caller's transaction)."""
    conn.execute(
        insert(audit_log).values(
            workspace_id=workspace_id,
            at=at,
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            details=details or {},
        )
    )


def list_audit(conn: Connection, workspace_id: str, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest audit entries of a workspace, newest first."""
    rows = conn.execute(
        select(audit_log)
        .where(audit_log.c.workspace_id == workspace_id)
        .order_by(audit_log.c.id.desc())
        .limit(limit)
    ).mappings()
    return [{**r, "at": r["at"].isoformat()} for r in rows]


def create_workspace(
    conn: Connection, *, name: str, actor: str, at: datetime
) -> tuple[Workspace, IssuedKey, IssuedKey]:
    """Create a workspace with a write key and an admin secret key; both shown once."""
    if not _NAME_RE.match(name):
        raise InvalidInput(
            [
                Issue(
                    "name", "use 1-63 lower-case letters, digits, '-' or '_', starting alphanumeric"
                )
            ]
        )
    ws = Workspace(id=new_id(), name=name, created_at=at)
    try:
        with conn.begin_nested():
            conn.execute(insert(workspaces).values(id=ws.id, name=name, settings={}, created_at=at))
    except IntegrityError as exc:
        raise Conflict(f"a workspace named {name!r} already exists") from exc
    record_audit(
        conn,
        workspace_id=ws.id,
        actor=actor,
        action="workspace.create",
        target_type="workspace",
        target_id=ws.id,
        details={"name": name},
        at=at,
    )
    write = create_key(
        conn,
        workspace_id=ws.id,
        kind="write",
        name="default write key",
        scopes=[Scope.INGEST],
        actor=actor,
        at=at,
    )
    admin = create_key(
        conn,
        workspace_id=ws.id,
        kind="secret",
        name="initial admin key",
        scopes=[Scope.ADMIN],
        actor=actor,
        at=at,
    )
    return ws, write, admin


def get_workspace(conn: Connection, ref: str) -> Workspace:
    """Find a workspace by id or name."""
    row = conn.execute(
        select(workspaces).where((workspaces.c.id == ref) | (workspaces.c.name == ref))
    ).first()
    if row is None:
        raise NotFound(f"no workspace {ref!r}")
    return Workspace(id=row.id, name=row.name, created_at=row.created_at)


def list_workspaces(conn: Connection) -> list[Workspace]:
    """Every workspace, oldest first."""
    rows = conn.execute(select(workspaces).order_by(workspaces.c.created_at, workspaces.c.id))
    return [Workspace(id=r.id, name=r.name, created_at=r.created_at) for r in rows]


def create_key(
    conn: Connection,
    *,
    workspace_id: str,
    kind: str,
    scopes: list[Scope] | list[str],
    name: str = "",
    actor: str,
    at: datetime,
    user_id: str | None = None,
) -> IssuedKey:
    """Issue a key. ``write`` keys may only ingest; ``secret`` keys take any scopes."""
    if kind not in KEY_PREFIXES:
        raise InvalidInput([Issue("kind", f"unknown key kind {kind!r}; use write or secret")])
    try:
        scope_set = sorted({Scope(s) for s in scopes})
    except ValueError as exc:
        raise InvalidInput(
            [Issue("scopes", f"{exc}; valid scopes: {', '.join(s.value for s in Scope)}")]
        ) from exc
    if kind == "write" and scope_set != [Scope.INGEST]:
        raise InvalidInput([Issue("scopes", "a write key is public and may only have 'ingest'")])
    if not scope_set:
        raise InvalidInput([Issue("scopes", "give at least one scope")])
    if kind == "user":
        raise InvalidInput([Issue("kind", "user tokens are issued with create_user_token")])
    return _issue(
        conn,
        workspace_id=workspace_id,
        kind=kind,
        name=name,
        scopes=tuple(s.value for s in scope_set),
        user_id=user_id,
        actor=actor,
        at=at,
    )


def _issue(
    conn: Connection,
    *,
    workspace_id: str,
    kind: str,
    name: str,
    scopes: tuple[str, ...],
    user_id: str | None,
    actor: str,
    at: datetime,
) -> IssuedKey:
    """Store a new key's hash and audit it; the secret is returned, never stored."""
    secret = KEY_PREFIXES[kind] + secrets.token_urlsafe(32)
    key_id = new_id()
    conn.execute(
        insert(api_keys).values(
            id=key_id,
            workspace_id=workspace_id,
            kind=kind,
            name=name,
            prefix=secret[:10],
            secret_hash=hash_key(secret),
            scopes=list(scopes),
            user_id=user_id,
            created_at=at,
            created_by=actor,
        )
    )
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="key.create",
        target_type="api_key",
        target_id=key_id,
        details={"kind": kind, "scopes": list(scopes), "name": name},
        at=at,
    )
    return IssuedKey(key_id, kind, secret, scopes, name)


def list_keys(conn: Connection, workspace_id: str) -> list[dict[str, Any]]:
    """Keys of a workspace without their secrets."""
    cols = [
        api_keys.c[c]
        for c in (
            "id",
            "kind",
            "name",
            "prefix",
            "scopes",
            "user_id",
            "created_at",
            "created_by",
            "revoked_at",
            "last_used_at",
        )
    ]
    rows = conn.execute(
        select(*cols).where(api_keys.c.workspace_id == workspace_id).order_by(api_keys.c.created_at)
    ).mappings()
    return [dict(r) for r in rows]


def revoke_key(
    conn: Connection, *, workspace_id: str, key_id: str, actor: str, at: datetime
) -> None:
    """Revoke a key; it stops working immediately."""
    res = conn.execute(
        update(api_keys)
        .where(
            api_keys.c.id == key_id,
            api_keys.c.workspace_id == workspace_id,
            api_keys.c.revoked_at.is_(None),
        )
        .values(revoked_at=at)
    )
    if not res.rowcount:
        raise NotFound(f"no active key {key_id!r} in this workspace")
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="key.revoke",
        target_type="api_key",
        target_id=key_id,
        at=at,
    )


def authenticate(conn: Connection, secret: str) -> Principal:
    """Resolve a presented key to its principal, or raise :class:`Unauthenticated`."""
    if not secret or not secret.startswith(tuple(KEY_PREFIXES.values())):
        raise Unauthenticated("missing or malformed key")
    row = conn.execute(
        select(
            api_keys.c.id,
            api_keys.c.workspace_id,
            api_keys.c.kind,
            api_keys.c.scopes,
            api_keys.c.user_id,
            api_keys.c.revoked_at,
        ).where(api_keys.c.secret_hash == hash_key(secret))
    ).first()
    if row is None or row.revoked_at is not None:
        raise Unauthenticated("unknown or revoked key")
    scopes = frozenset(Scope(s) for s in row.scopes)
    if row.user_id is not None:
        user = conn.execute(
            select(users.c.role, users.c.disabled_at).where(users.c.id == row.user_id)
        ).first()
        if user is None or user.disabled_at is not None:
            raise Unauthenticated("the user of this token is disabled")
        scopes = ROLE_SCOPES[Role(user.role)]
    return Principal(row.workspace_id, row.id, row.kind, scopes, row.user_id)


def create_user(
    conn: Connection,
    *,
    workspace_id: str,
    email: str,
    role: str,
    name: str = "",
    actor: str,
    at: datetime,
) -> tuple[dict[str, Any], IssuedKey]:
    """Add a user with a role and issue their first API token (shown once)."""
    try:
        role_v = Role(role)
    except ValueError as exc:
        raise InvalidInput(
            [Issue("role", f"unknown role {role!r}; use one of {', '.join(r.value for r in Role)}")]
        ) from exc
    email = email.strip().lower()
    if "@" not in email or len(email) > 255:
        raise InvalidInput([Issue("email", "not an e-mail address")])
    uid = new_id()
    try:
        with conn.begin_nested():
            conn.execute(
                insert(users).values(
                    id=uid,
                    workspace_id=workspace_id,
                    email=email,
                    name=name,
                    role=role_v.value,
                    created_at=at,
                )
            )
    except IntegrityError as exc:
        raise Conflict(f"a user {email!r} already exists in this workspace") from exc
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="user.create",
        target_type="user",
        target_id=uid,
        details={"role": role_v.value},
        at=at,
    )
    token = create_user_token(conn, workspace_id=workspace_id, user_id=uid, actor=actor, at=at)
    return {"id": uid, "email": email, "name": name, "role": role_v.value}, token


def create_user_token(
    conn: Connection, *, workspace_id: str, user_id: str, actor: str, at: datetime
) -> IssuedKey:
    """Issue another API token for a user; its scopes follow the user's role at each use."""
    user = conn.execute(
        select(users.c.role).where(users.c.id == user_id, users.c.workspace_id == workspace_id)
    ).first()
    if user is None:
        raise NotFound(f"no user {user_id!r} in this workspace")
    scopes = tuple(sorted(s.value for s in ROLE_SCOPES[Role(user.role)]))
    return _issue(
        conn,
        workspace_id=workspace_id,
        kind="user",
        name="user token",
        scopes=scopes,
        user_id=user_id,
        actor=actor,
        at=at,
    )


def list_users(conn: Connection, workspace_id: str) -> list[dict[str, Any]]:
    """Users of a workspace."""
    rows = conn.execute(
        select(
            users.c.id,
            users.c.email,
            users.c.name,
            users.c.role,
            users.c.created_at,
            users.c.disabled_at,
        )
        .where(users.c.workspace_id == workspace_id)
        .order_by(users.c.created_at)
    ).mappings()
    return [dict(r) for r in rows]
