"""Hand-written statements for the ingestion hot path, on the DBAPI cursor.

SQLAlchemy's per-parameter processing costs more than the database work for these small,
frequent statements, so the two per-event writes (claiming message ids, queueing events in
the inbox) bypass it. Everything else goes through SQLAlchemy Core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from waymark.model.events import Event
from waymark.storage.tables import read_time, sqlite_time

_CHUNK = 500


def fetch_rows(conn: Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """All rows of a read, as the driver's own tuples (SQLAlchemy's per-row wrapping costs
    more than SQLite's reading on these small, frequent look-ups)."""
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, params)
        return list(cursor.fetchall())
    except dbapi.Error as exc:  # as SQLAlchemy would raise it (DataError, OperationalError...)
        raise DBAPIError.instance(sql, params, exc, dbapi.Error) from exc
    finally:
        cursor.close()


def _write_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """One executemany on the driver's cursor, in the connection's transaction (SQLAlchemy's
    per-statement machinery costs more than these small statements; errors are raised as
    SQLAlchemy's all the same)."""
    if not rows:
        return
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(sql, rows)
    except dbapi.Error as exc:
        raise DBAPIError.instance(sql, rows, exc, dbapi.Error) from exc
    finally:
        cursor.close()


def claim_message_ids(
    conn: Connection, workspace_id: str, message_ids: Sequence[str], at: datetime
) -> set[str]:
    """Record ``message_ids`` as seen; return those not seen before (the caller's to store).

    Both backends use ``INSERT … ON CONFLICT DO NOTHING RETURNING``, which settles concurrent
    claims of the same id in favour of exactly one transaction (SQLite holds the write lock for
    the whole transaction anyway, ``BEGIN IMMEDIATE``).
    """
    if not message_ids:
        return set()
    when = time_converter(conn)(at)
    if conn.dialect.name == "postgresql":
        rows = conn.exec_driver_sql(
            "INSERT INTO seen_messages (workspace_id, message_id, received_at) "
            "SELECT %s, m, %s FROM unnest(%s::text[]) AS m "
            "ON CONFLICT (workspace_id, message_id) DO NOTHING RETURNING message_id",
            (workspace_id, when, list(message_ids)),
        )
        return {r[0] for r in rows}
    fresh: set[str] = set()
    unique = list(dict.fromkeys(message_ids))
    for i in range(0, len(unique), _CHUNK):
        chunk = unique[i : i + _CHUNK]
        params: list[str] = []
        for m in chunk:
            params += (workspace_id, m, when)
        # one statement claims the chunk and names the ids it took (RETURNING, SQLite 3.35+)
        fresh.update(
            r[0]
            for r in fetch_rows(
                conn,
                "INSERT INTO seen_messages (workspace_id, message_id, received_at) VALUES "
                + ",".join(["(?, ?, ?)"] * len(chunk))
                + " ON CONFLICT (workspace_id, message_id) DO NOTHING RETURNING message_id",
                params,
            )
        )
    return fresh


INBOX_COLUMNS = (
    "workspace_id",
    "profile_id",
    "message_id",
    "type",
    "name",
    "timestamp",
    "received_at",
    "identities",
    "properties",
    "traits",
    "context",
    "flags",
    "source",
    "previous_id",
    "group_id",
)


def time_converter(conn: Connection) -> Callable[[datetime], Any]:
    """How instants are bound on ``conn``: :func:`sqlite_time` text on SQLite, as they are
    elsewhere."""
    return sqlite_time if conn.dialect.name == "sqlite" else _same


def _same(value: datetime) -> datetime:
    return value


def inbox_row(
    workspace_id: str, profile_id: str, event: Event, when: Callable[[datetime], Any]
) -> tuple[Any, ...]:
    """The ``event_inbox`` row (``INBOX_COLUMNS`` order) of an accepted event: JSON columns
    encoded once, here; ``when`` converts instants for the store."""
    identities: dict[str, str] = {}
    for identity in event.identities:
        identities.setdefault(identity.namespace, identity.value)
    dumps = orjson.dumps
    return (
        workspace_id,
        profile_id,
        event.message_id,
        event.type.value,
        event.name,
        when(event.timestamp),
        when(event.received_at),
        dumps(identities).decode(),
        dumps(event.properties, default=str).decode(),
        dumps(event.traits, default=str).decode(),
        dumps(event.context, default=str).decode(),
        dumps(list(event.flags)).decode(),
        event.source,
        event.previous_id,
        event.group_id,
    )


def insert_inbox(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Queue accepted events in one executemany: rows in ``INBOX_COLUMNS`` order, instants
    already converted by :func:`time_converter`."""
    if not rows:
        return
    mark = "%s" if conn.dialect.name == "postgresql" else "?"
    sql = (
        f"INSERT INTO event_inbox ({', '.join(INBOX_COLUMNS)}) "
        f"VALUES ({', '.join([mark] * len(INBOX_COLUMNS))})"
    )
    _write_many(conn, sql, rows)


def _marks(conn: Connection) -> str:
    return "%s" if conn.dialect.name == "postgresql" else "?"


def param_marks(conn: Connection, count: int) -> str:
    """``count`` parameter marks of the connection's driver, comma-separated (for statements
    on the driver's cursor, as :func:`fetch_rows` runs them)."""
    return ", ".join([_marks(conn)] * count)


def _json_mark(conn: Connection) -> str:
    return "%s::jsonb" if conn.dialect.name == "postgresql" else "?"


def insert_profiles(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """New profiles: ``(id, workspace_id, attributes_json, meta_json, first_seen, last_seen,
    created_at)`` tuples; ``updated_at`` is ``created_at``."""
    if not rows:
        return
    m, j, t = _marks(conn), _json_mark(conn), time_converter(conn)
    _write_many(
        conn,
        "INSERT INTO profiles (id, workspace_id, attributes, attribute_meta, first_seen, "
        f"last_seen, created_at, updated_at) VALUES ({m}, {m}, {j}, {j}, {m}, {m}, {m}, {m})",
        [(r[0], r[1], r[2], r[3], t(r[4]), t(r[5]), t(r[6]), t(r[6])) for r in rows],
    )


def update_profiles(conn: Connection, rows: Sequence[tuple[Any, ...]], now: datetime) -> None:
    """Changed profiles: ``(workspace_id, id, attributes_json, meta_json, first_seen,
    last_seen)`` tuples."""
    if not rows:
        return
    m, j, t = _marks(conn), _json_mark(conn), time_converter(conn)
    when = t(now)
    _write_many(
        conn,
        f"UPDATE profiles SET attributes = {j}, attribute_meta = {j}, first_seen = {m}, "
        f"last_seen = {m}, updated_at = {m} WHERE workspace_id = {m} AND id = {m}",
        [(r[2], r[3], t(r[4]), t(r[5]), when, r[0], r[1]) for r in rows],
    )


def touch_profiles(
    conn: Connection, workspace_id: str, touches: Sequence[tuple[str, datetime, datetime]]
) -> None:
    """Widen ``first_seen``/``last_seen`` of profiles to ``(id, earliest, latest)``."""
    if not touches:
        return
    m, t = _marks(conn), time_converter(conn)
    _write_many(
        conn,
        f"UPDATE profiles SET first_seen = CASE WHEN first_seen > {m} THEN {m} "
        f"ELSE first_seen END, last_seen = CASE WHEN last_seen < {m} THEN {m} "
        f"ELSE last_seen END WHERE workspace_id = {m} AND id = {m}",
        [
            (first, first, last, last, workspace_id, pid)
            for pid, first, last in ((p, t(f), t(la)) for p, f, la in touches)
        ],
    )


def upsert_links(conn: Connection, rows: Sequence[tuple[str, str, str, str, datetime]]) -> None:
    """Identity links ``(workspace_id, namespace, value, profile_id, first_seen)``, inserted or
    re-pointed."""
    if not rows:
        return
    m, t = _marks(conn), time_converter(conn)
    _write_many(
        conn,
        "INSERT INTO identities (workspace_id, namespace, value, profile_id, first_seen) "
        f"VALUES ({m}, {m}, {m}, {m}, {m}) ON CONFLICT (workspace_id, namespace, value) "
        "DO UPDATE SET profile_id = excluded.profile_id, first_seen = excluded.first_seen",
        [(w, n, v, p, t(f)) for w, n, v, p, f in rows],
    )


def find_owners(
    conn: Connection, workspace_id: str, namespace: str, values: Sequence[str]
) -> list[tuple[str, str, datetime]]:
    """``(value, profile_id, first_seen)`` of the identities of one namespace that exist
    (primary-key look-ups; SQLite uses no index for row-value IN lists, hence one namespace at
    a time)."""
    found: list[tuple[str, str, datetime]] = []
    pg = conn.dialect.name == "postgresql"
    for i in range(0, len(values), _CHUNK):
        chunk = list(values[i : i + _CHUNK])
        if pg:
            rows = fetch_rows(
                conn,
                "SELECT value, profile_id, first_seen FROM identities WHERE workspace_id = %s "
                "AND namespace = %s AND value = ANY(%s)",
                (workspace_id, namespace, chunk),
            )
        else:
            rows = fetch_rows(
                conn,
                "SELECT value, profile_id, first_seen FROM identities WHERE workspace_id = ? "
                f"AND namespace = ? AND value IN ({','.join('?' * len(chunk))})",
                (workspace_id, namespace, *chunk),
            )
        found.extend((r[0], r[1], read_time(r[2])) for r in rows)
    return found


def read_profile(
    conn: Connection,
    workspace_id: str,
    *,
    profile_id: str | None = None,
    identity: tuple[str, str] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, str, datetime]], list[tuple[Any, ...]]] | None:
    """One profile by id or by identity: ``(row, links, consents)`` or ``None``.

    ``row`` has id, attributes (decoded), first_seen, last_seen, created_at, updated_at;
    ``links`` are ``(namespace, value, first_seen)`` sorted; ``consents`` are
    ``(channel, purpose, status, updated_at, source)`` sorted. Three primary-key or index
    look-ups on the DBAPI cursor: this is the read path of decisions and the profile API.
    """
    m = _marks(conn)
    columns = "p.id, p.attributes, p.first_seen, p.last_seen, p.created_at, p.updated_at"
    if identity is not None:
        found = conn.exec_driver_sql(
            f"SELECT {columns} FROM identities i JOIN profiles p ON p.workspace_id = "
            f"i.workspace_id AND p.id = i.profile_id WHERE i.workspace_id = {m} AND "
            f"i.namespace = {m} AND i.value = {m}",
            (workspace_id, identity[0], identity[1]),
        ).first()
    else:
        found = conn.exec_driver_sql(
            f"SELECT {columns} FROM profiles p WHERE p.workspace_id = {m} AND p.id = {m}",
            (workspace_id, profile_id),
        ).first()
    if found is None:
        return None
    attributes = found[1]
    if isinstance(attributes, str | bytes):
        attributes = orjson.loads(attributes)
    row = {
        "id": found[0],
        "attributes": attributes or {},
        "first_seen": read_time(found[2]),
        "last_seen": read_time(found[3]),
        "created_at": read_time(found[4]),
        "updated_at": read_time(found[5]),
    }
    # no ORDER BY: it would steer SQLite onto the primary key instead of the profile index
    links = sorted(
        (r[0], r[1], read_time(r[2]))
        for r in conn.exec_driver_sql(
            "SELECT namespace, value, first_seen FROM identities "
            f"WHERE workspace_id = {m} AND profile_id = {m}",
            (workspace_id, found[0]),
        )
    )
    consents = sorted(
        (r[0], r[1], r[2], read_time(r[3]), r[4])
        for r in conn.exec_driver_sql(
            "SELECT channel, purpose, status, updated_at, source FROM consents "
            f"WHERE workspace_id = {m} AND profile_id = {m}",
            (workspace_id, found[0]),
        )
    )
    return row, links, consents


#: ``messages`` columns in the order :func:`insert_messages` takes them
MESSAGE_COLUMNS = (
    "id",
    "workspace_id",
    "idempotency_key",
    "profile_id",
    "channel",
    "purpose",
    "transactional",
    "template_id",
    "template_version",
    "source_kind",
    "source_id",
    "to_address",
    "content",
    "status",
    "reason",
    "rule",
    "detail",
    "attempts",
    "next_attempt_at",
    "lease_until",
    "provider",
    "provider_id",
    "counted_at",
    "created_at",
    "updated_at",
    "sent_at",
)
_MESSAGE_TIMES = frozenset(
    {"next_attempt_at", "lease_until", "counted_at", "created_at", "updated_at", "sent_at"}
)


def insert_messages(
    conn: Connection, rows: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]]
) -> None:
    """New outbox messages (dicts with every :data:`MESSAGE_COLUMNS` key) and their first
    status rows (``workspace_id, message_id, profile_id, status, at, detail`` with ``detail``
    a JSON-able mapping), each in one executemany."""
    if not rows:
        return
    m, j, t = _marks(conn), _json_mark(conn), time_converter(conn)
    times = [c in _MESSAGE_TIMES for c in MESSAGE_COLUMNS]
    _write_many(
        conn,
        f"INSERT INTO messages ({', '.join(MESSAGE_COLUMNS)}) "
        f"VALUES ({', '.join([m] * len(MESSAGE_COLUMNS))})",
        [
            tuple(
                (t(r[c]) if r[c] is not None else None) if is_time else r[c]
                for c, is_time in zip(MESSAGE_COLUMNS, times, strict=True)
            )
            for r in rows
        ],
    )
    dumps = orjson.dumps
    _write_many(
        conn,
        "INSERT INTO message_events (workspace_id, message_id, profile_id, status, at, detail) "
        f"VALUES ({m}, {m}, {m}, {m}, {m}, {j})",
        [
            (
                h["workspace_id"],
                h["message_id"],
                h["profile_id"],
                h["status"],
                t(h["at"]),
                dumps(h["detail"]).decode(),
            )
            for h in history
        ],
    )


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def read_delivery_state(
    conn: Connection, workspace_id: str
) -> tuple[str, dict[str, Any], int, Any, int] | None:
    """What every delivery decision of a workspace reads first, in one statement: ``(name,
    settings, rules version (0: none saved), rules document (None), schema version (0))``;
    ``None`` for an unknown workspace."""
    m = _marks(conn)
    rows = fetch_rows(
        conn,
        "SELECT w.name, w.settings, r.version, r.document, "
        f"(SELECT max(s.version) FROM schemas s WHERE s.workspace_id = w.id) "
        f"FROM workspaces w LEFT JOIN delivery_rules r ON r.workspace_id = w.id WHERE w.id = {m}",
        (workspace_id,),
    )
    if not rows:
        return None
    name, settings, version, document, schema_version = rows[0]
    return name, _json(settings) or {}, int(version or 0), _json(document), int(schema_version or 0)


class DeliveryFacts(NamedTuple):
    """What :func:`read_delivery_facts` read."""

    #: attributes by profile id
    attributes: dict[str, dict[str, Any]]
    #: ``(profile, channel, purpose, status)``
    consents: list[tuple[str, str, str, str]]
    #: ``(id, profile, channel, purpose, transactional, counted_at)``
    counted: list[tuple[str, str, str, str, bool, datetime]]
    #: reasons by ``(channel, address)`` of the suppressed among those asked for
    suppressed: dict[tuple[str, str], str]
    #: asked for: ``(name, settings, rules version (0: none saved), schema version (0))``;
    #: None if not asked for or the workspace is unknown
    state: tuple[str, dict[str, Any], int, int] | None


def read_delivery_facts(
    conn: Connection,
    workspace_id: str,
    profile_ids: Sequence[str],
    counted_since: datetime | None,
    *,
    suppressed: Sequence[tuple[str, str]] = (),
    with_state: bool = False,
) -> DeliveryFacts:
    """For ``profile_ids`` (at most a few hundred): their attributes, their consents and,
    unless ``counted_since`` is None, the messages counting toward caps since then; which of
    the ``(channel, address)`` pairs ``suppressed`` (at most a few hundred) are suppressed;
    and with ``with_state``, the workspace's state as :func:`read_delivery_state` reads it but
    the rules document. One statement: on PostgreSQL each is a round trip."""
    m = _marks(conn)
    pg = conn.dialect.name == "postgresql"
    flag, when = ("CAST(NULL AS BOOLEAN)", "CAST(NULL AS TIMESTAMPTZ)") if pg else ("NULL", "NULL")
    # kind, then the columns of each kind
    parts: list[str] = []
    values: list[Any] = []
    if profile_ids:
        marks = ", ".join([m] * len(profile_ids))
        params = (workspace_id, *profile_ids)
        parts += [
            f"SELECT 'p', id, CAST(attributes AS TEXT), NULL, NULL, {flag}, {when} FROM profiles "
            f"WHERE workspace_id = {m} AND id IN ({marks})",
            f"SELECT 'c', profile_id, channel, purpose, status, {flag}, {when} "
            f"FROM consents WHERE workspace_id = {m} AND profile_id IN ({marks})",
        ]
        values += [*params, *params]
        if counted_since is not None:
            parts.append(
                "SELECT 'm', profile_id, id, channel, purpose, transactional, counted_at "
                f"FROM messages WHERE workspace_id = {m} AND profile_id IN ({marks}) "
                f"AND counted_at > {m}"
            )
            values += [*params, time_converter(conn)(counted_since)]
    if suppressed:
        pairs = ", ".join([f"({m}, {m})"] * len(suppressed))
        parts.append(
            f"SELECT 's', channel, address, reason, NULL, {flag}, {when} FROM suppressions "
            f"WHERE workspace_id = {m} AND (channel, address) IN (VALUES {pairs})"
        )
        values += [workspace_id, *(item for pair in suppressed for item in pair)]
    if with_state:
        parts.append(
            "SELECT 'w', w.name, CAST(w.settings AS TEXT), CAST(r.version AS TEXT), "
            "CAST((SELECT max(s.version) FROM schemas s WHERE s.workspace_id = w.id) AS TEXT), "
            f"{flag}, {when} FROM workspaces w LEFT JOIN delivery_rules r "
            f"ON r.workspace_id = w.id WHERE w.id = {m}"
        )
        values.append(workspace_id)
    attributes: dict[str, dict[str, Any]] = {}
    consents: list[tuple[str, str, str, str]] = []
    counted: list[tuple[str, str, str, str, bool, datetime]] = []
    found: dict[tuple[str, str], str] = {}
    state: tuple[str, dict[str, Any], int, int] | None = None
    rows = fetch_rows(conn, " UNION ALL ".join(parts), values) if parts else []
    for kind, first, a, b, c, transactional, at in rows:
        if kind == "p":
            attributes[first] = _json(a) or {}
        elif kind == "c":
            consents.append((first, a, b, c))
        elif kind == "m":
            counted.append((a, first, b, c, bool(transactional), read_time(at)))
        elif kind == "s":
            found[(first, a)] = b
        else:
            state = (first, _json(a) or {}, int(b or 0), int(c or 0))
    return DeliveryFacts(attributes, consents, counted, found, state)


def read_suppressed(
    conn: Connection, workspace_id: str, channel: str, addresses: Sequence[str]
) -> dict[str, str]:
    """Of ``addresses`` (at most a few hundred), those suppressed on ``channel``: reasons."""
    if not addresses:
        return {}
    m = _marks(conn)
    marks = ", ".join([m] * len(addresses))
    return {
        r[0]: r[1]
        for r in fetch_rows(
            conn,
            "SELECT address, reason FROM suppressions WHERE workspace_id = "
            f"{m} AND channel = {m} AND address IN ({marks})",
            (workspace_id, channel, *addresses),
        )
    }
