"""Audiences as stored objects: definitions, batch runs, memberships and their changes.

A definition is saved in its JSON form after being checked against the workspace's schema in
force and its other audiences (references must exist, cycles are refused). A batch run evaluates
the audience's SQL at one instant on the event log's engine, compares the members found with the
stored membership and writes only the differences: each profile that entered (``realized``) or
left (``exited``) gets a row in ``audience_changes``, the stream that journeys, destinations and
reports read in ``seq`` order.

The embedded event log (DuckDB) does not hold the state tables, so a run hands it Arrow
snapshots of the workspace's profiles and consents, read from the state store; on PostgreSQL the
log shares the state database and the query reads them in place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
from croniter import croniter
from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from waymark.access.service import record_audit
from waymark.core.errors import Conflict, InvalidInput, Issue, NotFound
from waymark.core.ids import new_id
from waymark.core.names import check_name
from waymark.hub import Hub
from waymark.profiles.schema_store import current_schema
from waymark.segmentation.compile.sql import EXECUTED_DIALECTS, WAREHOUSE_DIALECTS, compile_sql
from waymark.segmentation.compile.streaming import plan as streaming_plan
from waymark.segmentation.lang import ast
from waymark.segmentation.lang.check import check, expand, references
from waymark.segmentation.lang.jsonform import from_json, to_json
from waymark.segmentation.lang.parser import parse
from waymark.segmentation.lang.printer import to_text
from waymark.segmentation.live import decide_modes
from waymark.storage.hotpath import fetch_rows
from waymark.storage.tables import (
    audience_changes,
    audience_members,
    audience_runs,
    audiences,
    privacy_requests,
    profile_merges,
    profiles,
)

__all__ = [
    "Audience",
    "delete_audience",
    "estimate",
    "explain",
    "get_audience",
    "list_audiences",
    "member_ids",
    "members_of",
    "overlap",
    "profile_memberships",
    "read_definition",
    "run_audience",
    "run_due",
    "save_audience",
]

log = logging.getLogger(__name__)

#: What the streaming mode means, for ``explain``.
STREAMING_REASON = (
    "kept up to date event by event by waymark serve: each event, attribute change and timer "
    "(a window ageing out, a sequence's deadline passing) updates the membership at once"
)


@dataclass(frozen=True, slots=True)
class Audience:
    """A saved audience; ``definition`` is checked against the schema it was saved under."""

    id: str
    workspace_id: str
    name: str
    description: str
    definition: ast.Expr
    mode: str
    schedule: str | None
    version: int
    created_at: datetime
    updated_at: datetime
    created_by: str
    last_run_at: datetime | None
    #: streaming audiences: "ready" (kept up to date), "building" (states being built from the
    #: log) or "pending" (waiting for serve to start building); None for batch audiences
    stream: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "text": to_text(self.definition),
            "definition": to_json(self.definition),
            "mode": self.mode,
            "stream": self.stream,
            "schedule": self.schedule,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "created_by": self.created_by,
            "last_run_at": self.last_run_at.isoformat() if self.last_run_at else None,
        }


def _row_to_audience(row: Any) -> Audience:
    return Audience(
        id=row.id,
        workspace_id=row.workspace_id,
        name=row.name,
        description=row.description,
        definition=from_json(row.definition),
        mode=row.mode,
        schedule=row.schedule,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
        created_by=row.created_by,
        last_run_at=row.last_run_at,
        stream=(
            None
            if row.mode != "streaming"
            else "ready"
            if row.stream_ready
            else "building"
            if row.stream_key is not None
            else "pending"
        ),
    )


def _stored(conn: Connection, workspace_id: str) -> dict[str, Audience]:
    rows = conn.execute(select(audiences).where(audiences.c.workspace_id == workspace_id))
    return {row.name: _row_to_audience(row) for row in rows}


def read_definition(
    conn: Connection, workspace_id: str, definition: object, *, known: Collection[str] | None = None
) -> ast.Expr:
    """A definition in text (``str``) or JSON (``dict``) form, checked against the schema in
    force and the workspace's audiences (``known`` overrides the names allowed in references)."""
    schema = current_schema(conn, workspace_id).schema
    names = set(_stored(conn, workspace_id)) if known is None else set(known)
    if isinstance(definition, str):
        return parse(definition, schema, audiences=names)
    if isinstance(definition, Mapping):
        return check(from_json(definition), schema, audiences=names)
    raise InvalidInput(
        [Issue("definition", "must be the text form (a string) or the JSON form (an object)")]
    )


SCHEDULE_MAX = 100
#: The instants an audience can be evaluated at (windows reach 3,650 days either side).
AS_OF_RANGE = (datetime(1900, 1, 1, tzinfo=UTC), datetime(2999, 12, 31, tzinfo=UTC))


def as_of(text: str | None, default: datetime) -> datetime:
    """An evaluation instant given as ISO-8601 text (``default`` when None)."""
    if text is None:
        return default
    moment = ast.parse_moment(text)
    if moment is None:
        raise InvalidInput([Issue("as_of", f"{text!r} is not an ISO-8601 date or timestamp")])
    if not AS_OF_RANGE[0] <= moment <= AS_OF_RANGE[1]:
        raise InvalidInput([Issue("as_of", "must be between the years 1900 and 2999")])
    return moment


def _check_schedule(schedule: object) -> None:
    if schedule is None:
        return
    if not isinstance(schedule, str) or len(schedule) > SCHEDULE_MAX:
        raise InvalidInput(
            [Issue("schedule", f"must be a cron expression of at most {SCHEDULE_MAX} characters")]
        )
    if len(schedule.split()) != 5 or not croniter.is_valid(schedule):
        raise InvalidInput(
            [
                Issue(
                    "schedule",
                    f"{schedule!r} is not a cron expression of five fields, minute to weekday, "
                    "in UTC (e.g. '0 6 * * *')",
                )
            ]
        )


def _expands(
    conn: Connection, workspace_id: str, name: str, expr: ast.Expr, stored: Mapping[str, Audience]
) -> None:
    """Refuse a definition whose expansion loops back to ``name`` or, with the audiences it
    uses written out, breaks the language's limits (so that runs cannot fail on it later)."""
    definitions = {n: a.definition for n, a in stored.items()}
    definitions[name] = expr
    full = expand(ast.InAudience(name), definitions)  # raises on a cycle through ``name``
    check(full, current_schema(conn, workspace_id).schema)


def save_audience(
    conn: Connection,
    workspace_id: str,
    *,
    name: str,
    definition: object,
    description: object = "",
    schedule: object = None,
    actor: str,
    now: datetime,
) -> Audience:
    """Create the audience ``name`` or replace its definition (a new version)."""
    check_name(name)
    _check_schedule(schedule)
    if not isinstance(description, str) or len(description) > 1000:
        raise InvalidInput([Issue("description", "must be a string of at most 1000 characters")])
    stored = _stored(conn, workspace_id)
    expr = read_definition(conn, workspace_id, definition, known=set(stored) | {name})
    if name in references(expr):
        raise InvalidInput([Issue("definition", f"audience {name!r} cannot contain itself")])
    _expands(conn, workspace_id, name, expr, stored)
    values = {
        "description": description,
        "definition": to_json(expr),
        "mode": "batch",
        "schedule": schedule,
        "updated_at": now,
    }
    existing = stored.get(name)
    if existing is None:
        audience_id = new_id()
        conn.execute(
            insert(audiences).values(
                id=audience_id,
                workspace_id=workspace_id,
                name=name,
                version=1,
                created_at=now,
                created_by=actor,
                **values,
            )
        )
        action = "audience.create"
    else:
        audience_id = existing.id
        conn.execute(
            update(audiences)
            .where(audiences.c.id == audience_id)
            .values(version=existing.version + 1, **values)
        )
        action = "audience.update"
    decide_modes(conn, workspace_id, name)  # this one's, and those of audiences containing it
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action=action,
        target_type="audience",
        target_id=name,
        details={"text": to_text(expr)},
        at=now,
    )
    return get_audience(conn, workspace_id, name)


def get_audience(conn: Connection, workspace_id: str, name: str) -> Audience:
    row = conn.execute(
        select(audiences).where(audiences.c.workspace_id == workspace_id, audiences.c.name == name)
    ).first()
    if row is None:
        raise NotFound(f"no audience named {name!r} in this workspace")
    return _row_to_audience(row)


def list_audiences(conn: Connection, workspace_id: str) -> list[Audience]:
    return sorted(_stored(conn, workspace_id).values(), key=lambda a: a.name)


def delete_audience(
    conn: Connection, workspace_id: str, name: str, *, actor: str, now: datetime
) -> None:
    """Delete an audience with its memberships, history and runs; refused while another
    audience refers to it."""
    stored = _stored(conn, workspace_id)
    target = stored.get(name)
    if target is None:
        raise NotFound(f"no audience named {name!r} in this workspace")
    users = sorted(n for n, a in stored.items() if name in references(a.definition))
    if users:
        raise Conflict(
            f"audience {name!r} is used by {', '.join(map(repr, users))}; change those first"
        )
    for table in (audience_members, audience_changes, audience_runs):
        conn.execute(
            delete(table).where(
                table.c.workspace_id == workspace_id, table.c.audience_id == target.id
            )
        )
    conn.execute(delete(audiences).where(audiences.c.id == target.id))
    decide_modes(conn, workspace_id)
    record_audit(
        conn,
        workspace_id=workspace_id,
        actor=actor,
        action="audience.delete",
        target_type="audience",
        target_id=name,
        at=now,
    )


def expanded(conn: Connection, workspace_id: str, expr: ast.Expr) -> ast.Expr:
    """``expr`` with every ``in audience`` replaced by that audience's definition, checked
    against the schema in force (ready for an evaluator). Raises :class:`InvalidInput` when
    the schema no longer has what a definition names."""
    definitions = {n: a.definition for n, a in _stored(conn, workspace_id).items()}
    schema = current_schema(conn, workspace_id).schema
    return check(expand(expr, definitions), schema)


def explain(
    conn: Connection,
    workspace_id: str,
    expr: ast.Expr,
    *,
    now: datetime,
    dialects: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The text, JSON, evaluation mode and SQL per dialect of a checked definition."""
    full = expanded(conn, workspace_id, expr)
    verdict = streaming_plan(full)
    names = list(dialects) if dialects is not None else [*EXECUTED_DIALECTS, *WAREHOUSE_DIALECTS]
    unknown = [d for d in names if d not in (*EXECUTED_DIALECTS, *WAREHOUSE_DIALECTS)]
    if unknown:
        choices = ", ".join((*EXECUTED_DIALECTS, *WAREHOUSE_DIALECTS))
        raise InvalidInput([Issue("dialect", f"unknown dialect {unknown[0]!r}; one of {choices}")])
    return {
        "text": to_text(expr),
        "definition": to_json(expr),
        "references": sorted(references(expr)),
        "mode": "streaming" if verdict.streamable else "batch",
        "mode_reason": STREAMING_REASON if verdict.streamable else verdict.reason,
        "streaming": {"streamable": verdict.streamable, "reason": verdict.reason},
        "as_of": now.isoformat(),
        "sql": {
            d: compile_sql(full, workspace_id=workspace_id, now=now, dialect=d).sql(
                dialect=d, pretty=True
            )
            for d in names
        },
    }


# -- evaluation ------------------------------------------------------------------------------


def snapshot(hub: Hub, workspace_id: str) -> dict[str, pa.Table]:
    """The workspace's profiles and consents as Arrow tables, for an embedded event log (read
    once and pass to several :func:`member_ids` calls to evaluate them on the same state)."""
    with hub.engine.connect() as conn:
        mark = "%s" if conn.dialect.name == "postgresql" else "?"
        profiles = fetch_rows(
            conn,
            f"SELECT workspace_id, id, attributes FROM profiles WHERE workspace_id = {mark}",
            (workspace_id,),
        )
        consents = fetch_rows(
            conn,
            "SELECT workspace_id, profile_id, channel, purpose, status FROM consents "
            f"WHERE workspace_id = {mark}",
            (workspace_id,),
        )

    def text(value: Any) -> str:
        return value if isinstance(value, str) else orjson.dumps(value).decode()

    return {
        "profiles": pa.table(
            {
                "workspace_id": pa.array([r[0] for r in profiles], pa.string()),
                "id": pa.array([r[1] for r in profiles], pa.string()),
                "attributes": pa.array([text(r[2]) for r in profiles], pa.string()),
            }
        ),
        "consents": pa.table(
            {
                name: pa.array([r[i] for r in consents], pa.string())
                for i, name in enumerate(
                    ("workspace_id", "profile_id", "channel", "purpose", "status")
                )
            }
        ),
    }


def member_ids(
    hub: Hub,
    workspace_id: str,
    expr: ast.Expr,
    *,
    now: datetime,
    sample_percent: int | None = None,
    tables: Mapping[str, pa.Table] | None = None,
) -> list[str]:
    """The profiles matching a checked definition at ``now`` (a sample of profiles if asked).

    ``tables`` is a :func:`snapshot` taken earlier; without it an embedded log reads one now.
    """
    with hub.engine.connect() as conn:
        full = expanded(conn, workspace_id, expr)
    log = hub.events
    query = compile_sql(
        full,
        workspace_id=workspace_id,
        now=now,
        dialect=log.dialect,
        sample_percent=sample_percent,
        # an embedded log reads snapshots of this workspace's profiles and consents only
        state_scoped=log.dialect == "duckdb",
    ).sql(dialect=log.dialect)
    read = (lambda: tables) if tables is not None else (lambda: snapshot(hub, workspace_id))
    return [str(v) for v in log.select_column(query, read)]


def estimate(
    hub: Hub, workspace_id: str, expr: ast.Expr, *, now: datetime, percent: int = 5
) -> dict[str, Any]:
    """A size estimate from a hash sample of ``percent`` % of profiles, with a 95 % interval;
    exact when ``percent`` is 100.

    Each member is in the sample with probability p, so the sampled count x is binomial in the
    true size M; the interval is the score interval: the M with (x - Mp)² <= z²·Mp(1 - p).
    Unlike x/p ± a normal margin it stays honest for small counts (x = 0 still bounds M).
    """
    if not 1 <= percent <= 100:
        raise InvalidInput([Issue("percent", "must be between 1 and 100")])
    sample = percent if percent < 100 else None
    found = len(member_ids(hub, workspace_id, expr, now=now, sample_percent=sample))
    p = percent / 100
    if percent == 100:
        low, high = float(found), float(found)
    else:
        z2 = 1.96**2
        b = 2 * found * p + z2 * p * (1 - p)
        root = math.sqrt(b * b - 4 * p * p * found * found)
        low, high = (b - root) / (2 * p * p), (b + root) / (2 * p * p)
    return {
        "estimate": round(found / p),
        "low": max(0, math.floor(low)),
        "high": math.ceil(high),
        "sampled_percent": percent,
        "sample_members": found,
        "as_of": now.isoformat(),
    }


def overlap(
    hub: Hub, workspace_id: str, first: ast.Expr, second: ast.Expr, *, now: datetime
) -> dict[str, int]:
    """How many profiles are in one, the other, or both of two definitions at ``now``."""
    a = set(member_ids(hub, workspace_id, first, now=now))
    b = set(member_ids(hub, workspace_id, second, now=now))
    return {
        "first": len(a),
        "second": len(b),
        "both": len(a & b),
        "only_first": len(a - b),
        "only_second": len(b - a),
    }


def _upsert(conn: Connection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


def _chunks(items: list[str], size: int = 5000) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def apply_members(
    conn: Connection,
    audience: Audience,
    found: Collection[str],
    *,
    now: datetime,
    run_id: str | None,
) -> tuple[int, int]:
    """Make ``found`` the audience's realized members; write and return (realized, exited)."""
    current = {
        r[0]
        for r in conn.execute(
            select(audience_members.c.profile_id).where(
                audience_members.c.workspace_id == audience.workspace_id,
                audience_members.c.audience_id == audience.id,
                audience_members.c.status == "realized",
            )
        )
    }
    found_set = set(found)
    entered = sorted(found_set - current)
    left = sorted(current - found_set)
    base = {"workspace_id": audience.workspace_id, "audience_id": audience.id}
    ins = _upsert(conn)(audience_members)
    for chunk in _chunks(entered):
        stmt = ins.values(
            [
                {
                    **base,
                    "profile_id": p,
                    "status": "realized",
                    "realized_at": now,
                    "exited_at": None,
                }
                for p in chunk
            ]
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["workspace_id", "audience_id", "profile_id"],
                set_={
                    "status": stmt.excluded.status,
                    "realized_at": stmt.excluded.realized_at,
                    "exited_at": None,
                },
            )
        )
    for chunk in _chunks(left):
        conn.execute(
            update(audience_members)
            .where(
                audience_members.c.workspace_id == audience.workspace_id,
                audience_members.c.audience_id == audience.id,
                audience_members.c.profile_id.in_(chunk),
            )
            .values(status="exited", exited_at=now)
        )
    changes = [
        {**base, "profile_id": p, "change": "realized", "at": now, "run_id": run_id}
        for p in entered
    ]
    changes += [
        {**base, "profile_id": p, "change": "exited", "at": now, "run_id": run_id} for p in left
    ]
    if changes:
        conn.execute(insert(audience_changes), changes)
    return len(entered), len(left)


def _fail_run(hub: Hub, run_id: str, exc: BaseException) -> None:
    with hub.tx() as conn:
        conn.execute(
            update(audience_runs)
            .where(audience_runs.c.id == run_id)
            .values(status="failed", error=str(exc)[:2000], finished_at=hub.clock.now())
        )


def _profiles_went_away(conn: Connection, workspace_id: str, *, since: datetime) -> bool:
    """Whether a merge or a privacy deletion happened in the workspace since ``since``."""
    merged = conn.execute(
        select(profile_merges.c.seq)
        .where(profile_merges.c.workspace_id == workspace_id, profile_merges.c.at >= since)
        .limit(1)
    ).first()
    deleted = conn.execute(
        select(privacy_requests.c.id)
        .where(
            privacy_requests.c.workspace_id == workspace_id,
            privacy_requests.c.kind == "delete",
            privacy_requests.c.requested_at >= since,
        )
        .limit(1)
    ).first()
    return merged is not None or deleted is not None


def _drop_gone(conn: Connection, audience: Audience, run_id: str) -> int:
    """Remove what a run wrote for profiles that were merged away or deleted while it was
    evaluating (nothing of a deleted person may come back); returns the entries removed."""
    alive = select(profiles.c.id).where(profiles.c.workspace_id == audience.workspace_id)
    gone = conn.execute(
        delete(audience_changes).where(
            audience_changes.c.run_id == run_id,
            audience_changes.c.profile_id.not_in(alive.scalar_subquery()),
        )
    )
    conn.execute(
        delete(audience_members).where(
            audience_members.c.workspace_id == audience.workspace_id,
            audience_members.c.audience_id == audience.id,
            audience_members.c.profile_id.not_in(alive.scalar_subquery()),
        )
    )
    return int(gone.rowcount or 0)


def _apply_run(
    hub: Hub,
    audience: Audience,
    found: list[str],
    *,
    now: datetime,
    run_id: str,
    started: datetime,
) -> dict[str, Any]:
    """Store a run's members in one transaction that holds the audience (so two runs of one
    audience apply one after the other); a run older than one already applied changes
    nothing (``superseded``). A streaming audience whose states are built is kept by
    ``serve``: the run only compares (``compared``: how many would enter and leave), since
    writing its answer would put memberships out of step with the states."""
    with hub.tx() as conn:
        row = conn.execute(
            select(audiences.c.last_run_at, audiences.c.mode, audiences.c.stream_ready)
            .where(audiences.c.id == audience.id)
            .with_for_update()
        ).first()
        if row is None:
            raise NotFound(f"audience {audience.name!r} was deleted during its run")
        if row.mode == "streaming" and row.stream_ready:
            held = set(
                conn.execute(
                    select(audience_members.c.profile_id).where(
                        audience_members.c.workspace_id == audience.workspace_id,
                        audience_members.c.audience_id == audience.id,
                        audience_members.c.status == "realized",
                    )
                ).scalars()
            )
            wanted = set(found)
            realized, exited = len(wanted - held), len(held - wanted)
            conn.execute(
                update(audience_runs)
                .where(audience_runs.c.id == run_id)
                .values(
                    status="compared",
                    members=len(found),
                    realized=realized,
                    exited=exited,
                    finished_at=hub.clock.now(),
                )
            )
            return {"status": "compared", "realized": realized, "exited": exited}
        if row.last_run_at is not None and row.last_run_at > now:
            conn.execute(
                update(audience_runs)
                .where(audience_runs.c.id == run_id)
                .values(status="superseded", members=len(found), finished_at=hub.clock.now())
            )
            return {"status": "superseded", "realized": 0, "exited": 0}
        realized, exited = apply_members(conn, audience, found, now=now, run_id=run_id)
        if _profiles_went_away(conn, audience.workspace_id, since=started):
            realized -= _drop_gone(conn, audience, run_id)
        conn.execute(
            update(audience_runs)
            .where(audience_runs.c.id == run_id)
            .values(
                status="done",
                members=len(found),
                realized=realized,
                exited=exited,
                finished_at=hub.clock.now(),
            )
        )
        conn.execute(update(audiences).where(audiences.c.id == audience.id).values(last_run_at=now))
    return {"status": "done", "realized": realized, "exited": exited}


def run_audience(
    hub: Hub,
    workspace_id: str,
    name: str,
    *,
    now: datetime,
    trigger: str = "manual",
    actor: str = "system",
) -> dict[str, Any]:
    """Evaluate an audience at ``now`` (not in the future) and store the membership changes;
    returns the run. A failure is recorded on the run (with its error) and raised again."""
    if now > hub.clock.now():
        raise InvalidInput([Issue("as_of", "a run cannot be evaluated in the future")])
    started = hub.clock.now()
    with hub.tx() as conn:
        audience = get_audience(conn, workspace_id, name)
        run_id = new_id()
        conn.execute(
            insert(audience_runs).values(
                id=run_id,
                workspace_id=workspace_id,
                audience_id=audience.id,
                trigger=trigger,
                as_of=now,
                status="running",
                started_at=started,
                actor=actor,
            )
        )
    try:
        found = member_ids(hub, workspace_id, audience.definition, now=now)
        outcome = _apply_run(hub, audience, found, now=now, run_id=run_id, started=started)
    except Exception as exc:
        _fail_run(hub, run_id, exc)
        raise
    return {
        "run_id": run_id,
        "audience": name,
        "as_of": now.isoformat(),
        "status": outcome["status"],
        "members": len(found),
        "realized": outcome["realized"],
        "exited": outcome["exited"],
        "trigger": trigger,
    }


def fail_interrupted_runs(hub: Hub) -> int:
    """Mark as failed the runs a stopped process left ``running``; returns how many.

    Only on the embedded default, where one ``serve`` owns the event log, so every run still
    ``running`` when it starts was interrupted. With PostgreSQL other processes may be running
    theirs, and such rows are left as they are.
    """
    if hub.engine.dialect.name != "sqlite":
        return 0
    with hub.tx() as conn:
        result = conn.execute(
            update(audience_runs)
            .where(audience_runs.c.status == "running")
            .values(
                status="failed",
                error="interrupted: the process stopped during the run",
                finished_at=hub.clock.now(),
            )
        )
    return int(result.rowcount or 0)


def run_due(hub: Hub, *, now: datetime) -> list[dict[str, Any]]:
    """Run every scheduled audience whose cron time (UTC) has come since its last scheduled
    attempt, once each however many times were missed. A failing audience is recorded as a
    failed run and tried again at its next cron time; the others run all the same."""
    with hub.engine.connect() as conn:
        rows = list(conn.execute(select(audiences).where(audiences.c.schedule.is_not(None))))
        attempts = dict(
            conn.execute(
                select(audience_runs.c.audience_id, func.max(audience_runs.c.as_of))
                .where(audience_runs.c.trigger == "schedule")
                .group_by(audience_runs.c.audience_id)
            ).all()
        )
    done = []
    for row in rows:
        if row.mode == "streaming" and row.stream_ready:
            continue  # kept up to date by serve; its schedule only matters while it builds
        since = max(
            t for t in (row.created_at, row.last_run_at, attempts.get(row.id)) if t is not None
        )
        if croniter(row.schedule, since).get_next(datetime) > now:
            continue
        try:
            done.append(run_audience(hub, row.workspace_id, row.name, now=now, trigger="schedule"))
        except Exception:  # recorded on the run; the next audience still runs
            log.exception("scheduled run failed", extra={"audience": row.name})
    return done


def members_of(
    conn: Connection,
    workspace_id: str,
    name: str,
    *,
    status: str = "realized",
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The stored members of an audience (``status``: realized, exited or all)."""
    if status not in ("realized", "exited", "all"):
        raise InvalidInput([Issue("status", "must be realized, exited or all")])
    audience = get_audience(conn, workspace_id, name)
    query = (
        select(audience_members)
        .where(
            audience_members.c.workspace_id == workspace_id,
            audience_members.c.audience_id == audience.id,
        )
        .order_by(audience_members.c.profile_id)
    )
    if status != "all":
        query = query.where(audience_members.c.status == status)
    if limit is not None:
        query = query.limit(limit)
    return [
        {
            "profile_id": r.profile_id,
            "status": r.status,
            "realized_at": r.realized_at.isoformat(),
            "exited_at": r.exited_at.isoformat() if r.exited_at else None,
        }
        for r in conn.execute(query)
    ]


def profile_memberships(
    conn: Connection, workspace_id: str, profile_id: str
) -> list[dict[str, Any]]:
    """Every audience one profile is or was in, with its history of changes."""
    names = {a.id: a.name for a in _stored(conn, workspace_id).values()}
    history: dict[str, list[dict[str, Any]]] = {}
    for r in conn.execute(
        select(audience_changes)
        .where(
            audience_changes.c.workspace_id == workspace_id,
            audience_changes.c.profile_id == profile_id,
        )
        .order_by(audience_changes.c.seq)
    ):
        history.setdefault(r.audience_id, []).append({"change": r.change, "at": r.at.isoformat()})
    out = []
    for r in conn.execute(
        select(audience_members).where(
            audience_members.c.workspace_id == workspace_id,
            audience_members.c.profile_id == profile_id,
        )
    ):
        out.append(
            {
                "audience": names.get(r.audience_id, r.audience_id),
                "status": r.status,
                "realized_at": r.realized_at.isoformat(),
                "exited_at": r.exited_at.isoformat() if r.exited_at else None,
                "history": history.get(r.audience_id, []),
            }
        )
    return sorted(out, key=lambda m: m["audience"])
