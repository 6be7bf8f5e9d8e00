"""Stored audiences on both backends: saving, batch runs and their changes, authoring helpers."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from waymark.access import service as access
from waymark.core.errors import Conflict, InvalidInput, NotFound
from waymark.hub import Hub
from waymark.ingestion.pipeline import Ingestor
from waymark.model.events import Identity
from waymark.privacy import delete_person
from waymark.profiles.schema_store import save_schema
from waymark.segmentation import service as segments
from waymark.storage.tables import audience_changes, audience_members, audience_runs
from waymark.workers import flush_once, run_due_audiences

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "src/waymark/demo/schema.json").read_text(encoding="utf-8")
)


def _ts(hub: Hub, days: float) -> str:
    return (hub.clock.now() - timedelta(days=days)).isoformat()


def _setup(hub: Hub) -> str:
    now = hub.clock.now()
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="shop", actor="t", at=now)
        save_schema(conn, workspace_id=ws.id, document=SCHEMA, actor="t", at=now)
    batch: list[dict[str, Any]] = []
    people = {
        "ann": ("DE", [1, 2, 3, 40], "ann@example.com"),
        "bob": ("DE", [5], "bob@example.com"),
        "cy": ("FR", [1, 2, 3], "cy@shop.example"),
        "dee": ("DE", [], "dee@example.com"),
    }
    for user, (country, days, email) in people.items():
        batch.append(
            {
                "type": "identify",
                "userId": user,
                "messageId": f"id-{user}",
                "timestamp": _ts(hub, 60),
                "traits": {"country": country, "email": email, "lifetime_value": 10.0 * len(days)},
            }
        )
        for i, d in enumerate(days):
            batch.append(
                {
                    "type": "track",
                    "userId": user,
                    "event": "purchase",
                    "messageId": f"p-{user}-{i}",
                    "timestamp": _ts(hub, d),
                    "properties": {
                        "order_id": f"o-{user}-{i}",
                        "revenue": 50.0,
                        "category": "shoes",
                    },
                }
            )
    result = Ingestor(hub).segment(ws.id, "batch", {"batch": batch})
    assert not result.rejected, result.to_json()
    flush_once(hub)
    return ws.id


def _save(hub: Hub, ws: str, name: str, definition: object, **kw: Any) -> segments.Audience:
    with hub.tx() as conn:
        return segments.save_audience(
            conn, ws, name=name, definition=definition, actor="t", now=hub.clock.now(), **kw
        )


def _members(hub: Hub, ws: str, name: str) -> set[str]:
    with hub.engine.connect() as conn:
        return {m["profile_id"] for m in segments.members_of(conn, ws, name)}


def _profile(hub: Hub, ws: str, user: str) -> str:
    from waymark.profiles import service as profiles

    with hub.engine.connect() as conn:
        return profiles.find_profile_id(conn, ws, Identity("user_id", user))


def test_batch_runs_store_only_the_changes(hub: Hub, clock: Any) -> None:
    ws = _setup(hub)
    ann, bob, cy = (_profile(hub, ws, u) for u in ("ann", "bob", "cy"))
    _save(hub, ws, "buyers", 'country = "DE" and count(purchase within last 30 days) >= 3')
    first = segments.run_audience(hub, ws, "buyers", now=hub.clock.now())
    assert (first["members"], first["realized"], first["exited"]) == (1, 1, 0)
    assert _members(hub, ws, "buyers") == {ann}

    # a week later ann's oldest purchase (3 days ago) is still inside; at 28 days it is not
    start = hub.clock.now()
    later = clock.advance(timedelta(days=28))
    second = segments.run_audience(hub, ws, "buyers", now=later)
    assert (second["members"], second["realized"], second["exited"]) == (0, 0, 1)
    assert _members(hub, ws, "buyers") == set()
    again = segments.run_audience(hub, ws, "buyers", now=later)
    assert (again["realized"], again["exited"]) == (0, 0)  # nothing changed: nothing written
    # a run of an older instant, applied after a newer one, changes nothing
    stale = segments.run_audience(hub, ws, "buyers", now=start)
    assert (stale["status"], stale["realized"], stale["exited"]) == ("superseded", 0, 0)
    assert _members(hub, ws, "buyers") == set()
    with pytest.raises(InvalidInput, match="future"):
        segments.run_audience(hub, ws, "buyers", now=later + timedelta(days=1))

    with hub.engine.connect() as conn:
        changes = [
            (r.profile_id, r.change)
            for r in conn.execute(select(audience_changes).order_by(audience_changes.c.seq))
        ]
        history = segments.profile_memberships(conn, ws, ann)
    assert changes == [(ann, "realized"), (ann, "exited")]
    assert history[0]["audience"] == "buyers" and history[0]["status"] == "exited"
    assert [h["change"] for h in history[0]["history"]] == ["realized", "exited"]
    assert bob not in _members(hub, ws, "buyers") and cy not in _members(hub, ws, "buyers")


def test_definitions_are_checked_and_references_resolved(hub: Hub) -> None:
    ws = _setup(hub)
    with pytest.raises(InvalidInput, match="contry"):
        _save(hub, ws, "bad", 'contry = "DE"')
    with pytest.raises(InvalidInput, match="vip"):
        _save(hub, ws, "needs-vip", 'in audience "vip"')
    _save(hub, ws, "german", 'country = "DE"')
    _save(
        hub,
        ws,
        "german buyers",
        {
            "kind": "and",
            "items": [
                {"kind": "in_audience", "audience": "german"},
                {"kind": "occurs", "event": {"name": "purchase"}},
            ],
        },
    )
    run = segments.run_audience(hub, ws, "german buyers", now=hub.clock.now())
    assert _members(hub, ws, "german buyers") == {
        _profile(hub, ws, "ann"),
        _profile(hub, ws, "bob"),
    }
    assert run["members"] == 2
    # a cycle through a stored audience is refused, and so is deleting a used audience
    with pytest.raises(InvalidInput, match=r"cycle|itself"):
        _save(hub, ws, "german", 'in audience "german buyers"')
    with pytest.raises(Conflict, match="german buyers"), hub.tx() as conn:
        segments.delete_audience(conn, ws, "german", actor="t", now=hub.clock.now())
    with hub.tx() as conn:
        segments.delete_audience(conn, ws, "german buyers", actor="t", now=hub.clock.now())
        segments.delete_audience(conn, ws, "german", actor="t", now=hub.clock.now())
    with hub.engine.connect() as conn, pytest.raises(NotFound):
        segments.get_audience(conn, ws, "german")
    with hub.engine.connect() as conn:
        assert conn.execute(select(audience_members)).first() is None


def test_estimate_explain_overlap(hub: Hub) -> None:
    ws = _setup(hub)
    german = _save(hub, ws, "german", 'country = "DE"')
    buyer = _save(hub, ws, "buyer", "purchase within last 30 days")
    exact = segments.estimate(hub, ws, german.definition, now=hub.clock.now(), percent=100)
    assert (exact["estimate"], exact["low"], exact["high"]) == (3, 3, 3)
    rough = segments.estimate(hub, ws, german.definition, now=hub.clock.now(), percent=50)
    assert rough["low"] <= rough["estimate"] <= rough["high"]
    assert rough["sample_members"] <= 3
    # the score interval covers the truth for every count a 50 % sample of 3 can give
    assert rough["low"] <= 3 <= rough["high"]
    both = segments.overlap(hub, ws, german.definition, buyer.definition, now=hub.clock.now())
    assert both == {"first": 3, "second": 3, "both": 2, "only_first": 1, "only_second": 1}
    with hub.engine.connect() as conn:
        plan = segments.explain(conn, ws, german.definition, now=hub.clock.now())
        with pytest.raises(InvalidInput, match="dialect"):
            segments.explain(conn, ws, german.definition, now=hub.clock.now(), dialects=["oracle"])
    assert plan["mode"] == "streaming" and plan["text"] == 'country = "DE"'
    assert plan["streaming"] == {"streamable": True, "reason": None}
    assert set(plan["sql"]) == {
        "duckdb",
        "postgres",
        "spark",
        "trino",
        "clickhouse",
        "snowflake",
        "bigquery",
    }


def _with_shipping(hub: Hub, ws: str, attributes: dict[str, Any] | None = None) -> None:
    """The demo schema, with a timestamp property on purchases (for batch-only definitions)."""
    events = {
        **SCHEMA["events"],
        "purchase": {
            **SCHEMA["events"]["purchase"],
            "properties": {
                **SCHEMA["events"]["purchase"]["properties"],
                "shipped_at": {"type": "timestamp"},
            },
        },
    }
    document = {**SCHEMA, "events": events, "attributes": attributes or SCHEMA["attributes"]}
    with hub.tx() as conn:
        save_schema(conn, workspace_id=ws, document=document, actor="t", at=hub.clock.now())


#: makes a definition batch-only (a filter moving with now) without changing its members here
BATCH_ONLY = " and not purchase where shipped_at within last 1 days"


def test_scheduled_audiences_run_when_due(hub: Hub, clock: Any) -> None:
    ws = _setup(hub)
    _with_shipping(hub, ws)
    daily = _save(hub, ws, "daily", 'country = "FR"' + BATCH_ONLY, schedule="0 6 * * *")
    assert daily.mode == "batch"
    _save(hub, ws, "manual", 'country = "FR"' + BATCH_ONLY)
    # a streaming audience is kept up to date by serve: its schedule is not needed once built
    _save(hub, ws, "streamed", 'country = "FR"', schedule="0 6 * * *")
    with pytest.raises(InvalidInput, match="cron"):
        _save(hub, ws, "broken", 'country = "FR"', schedule="every day")
    assert run_due_audiences(hub) == 0  # saved just now: the next 06:00 has not come
    clock.advance(timedelta(days=1))
    assert run_due_audiences(hub) == 1
    assert _members(hub, ws, "daily") == {_profile(hub, ws, "cy")}
    assert _members(hub, ws, "manual") == set()
    assert _members(hub, ws, "streamed") == {_profile(hub, ws, "cy")}
    assert run_due_audiences(hub) == 0  # ran for this day already
    # a scheduled audience that fails (its attribute left the schema) does not stop the others
    _save(hub, ws, "broken later", "lifetime_value > 10" + BATCH_ONLY, schedule="0 6 * * *")
    _save(hub, ws, "later", 'country = "DE"' + BATCH_ONLY, schedule="0 6 * * *")
    smaller = {k: v for k, v in SCHEMA["attributes"].items() if k != "lifetime_value"}
    _with_shipping(hub, ws, smaller)
    clock.advance(timedelta(days=1))
    assert run_due_audiences(hub) == 2  # daily and later ran; broken later failed, recorded
    assert len(_members(hub, ws, "later")) == 3
    with hub.engine.connect() as conn:
        failed = conn.execute(
            select(audience_runs.c.status, audience_runs.c.error).where(
                audience_runs.c.status == "failed"
            )
        ).all()
    assert len(failed) == 1 and "lifetime_value" in failed[0].error
    assert run_due_audiences(hub) == 0  # not retried before its next cron time


def test_privacy_deletion_removes_memberships(hub: Hub) -> None:
    ws = _setup(hub)
    ann = _profile(hub, ws, "ann")
    _save(hub, ws, "german", 'country = "DE"')
    segments.run_audience(hub, ws, "german", now=hub.clock.now())
    assert ann in _members(hub, ws, "german")
    from waymark.profiles import service as profiles

    with hub.tx() as conn:
        exported = profiles.export_person(
            conn,
            hub.events,
            workspace_id=ws,
            identity=Identity("user_id", "ann"),
            actor="t",
            now=hub.clock.now(),
        )
    assert [(m["audience"], m["status"]) for m in exported["audiences"]] == [("german", "realized")]
    delete_person(hub, workspace_id=ws, identity=Identity("user_id", "ann"), actor="t")
    with hub.engine.connect() as conn:
        for table in (audience_members, audience_changes):
            assert conn.execute(select(table).where(table.c.profile_id == ann)).first() is None
    run = segments.run_audience(hub, ws, "german", now=hub.clock.now())
    assert run["members"] == 2 and run["exited"] == 0


def test_memberships_follow_a_merge(hub: Hub) -> None:
    ws = _setup(hub)
    ing = Ingestor(hub)
    anon = {"type": "identify", "anonymousId": "anon-1", "traits": {"country": "DE"}}
    assert not ing.segment(ws, "batch", {"batch": [{**anon, "messageId": "m-anon"}]}).rejected
    flush_once(hub)
    _save(hub, ws, "german", 'country = "DE"')
    first = segments.run_audience(hub, ws, "german", now=hub.clock.now())
    assert first["members"] == 4  # ann, bob, dee and the anonymous visitor
    link = {"type": "identify", "userId": "dee", "anonymousId": "anon-1", "messageId": "m-link"}
    assert not ing.segment(ws, "batch", {"batch": [link]}).rejected
    flush_once(hub)
    dee = _profile(hub, ws, "dee")
    with hub.engine.connect() as conn:
        rows = conn.execute(select(audience_members.c.profile_id)).scalars().all()
        told = conn.execute(
            select(audience_changes.c.profile_id, audience_changes.c.change).order_by(
                audience_changes.c.seq
            )
        ).all()
    assert len(rows) == 3 and dee in rows  # one membership per person, on the survivor
    # history is not rewritten: the absorbed profile is told to have left
    absorbed = [p for p, change in told if change == "exited"]
    assert len(absorbed) == 1 and absorbed[0] != dee and len(told) == 5
    second = segments.run_audience(hub, ws, "german", now=hub.clock.now())
    assert (second["members"], second["realized"], second["exited"]) == (3, 0, 0)


def test_a_person_deleted_during_a_run_does_not_come_back(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = _setup(hub)
    ann = _profile(hub, ws, "ann")
    _save(hub, ws, "german", 'country = "DE"')
    evaluate = segments.member_ids

    def evaluate_then_delete(*args: Any, **kwargs: Any) -> list[str]:
        found = evaluate(*args, **kwargs)  # ann is found ...
        delete_person(hub, workspace_id=ws, identity=Identity("user_id", "ann"), actor="t")
        return found  # ... and deleted before the run stores what it found

    monkeypatch.setattr(segments, "member_ids", evaluate_then_delete)
    run = segments.run_audience(hub, ws, "german", now=hub.clock.now())
    assert run["members"] == 3 and run["realized"] == 2
    with hub.engine.connect() as conn:
        for table in (audience_members, audience_changes):
            assert conn.execute(select(table).where(table.c.profile_id == ann)).first() is None


def test_runs_left_running_by_a_stopped_process_are_marked_failed(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = _setup(hub)
    _save(hub, ws, "german", 'country = "DE"')

    def die(*args: Any, **kwargs: Any) -> list[str]:
        raise SystemExit("killed")  # not an Exception: the run is not marked failed

    monkeypatch.setattr(segments, "member_ids", die)
    with pytest.raises(SystemExit):
        segments.run_audience(hub, ws, "german", now=hub.clock.now())
    marked = segments.fail_interrupted_runs(hub)
    with hub.engine.connect() as conn:
        statuses = conn.execute(select(audience_runs.c.status)).scalars().all()
    if hub.engine.dialect.name == "sqlite":
        assert marked == 1 and statuses == ["failed"]
    else:  # other processes may be running theirs: left alone
        assert marked == 0 and statuses == ["running"]
