"""Privacy requests: export everything about a person; delete a person from every store."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import inspect, text

from waymark.access import service as access
from waymark.hub import Hub
from waymark.ingestion.pipeline import Ingestor
from waymark.model.events import Identity
from waymark.privacy import delete_person
from waymark.profiles import service as profiles
from waymark.storage.eventlog import DuckDBEventLog
from waymark.storage.tables import PERSON_FREE_TABLES, PERSON_TABLES, metadata
from waymark.workers import finish_pending_deletions, flush_once

SECRET = "ann-private-note-7731"


def _setup(hub: Hub) -> tuple[str, str, list[str]]:
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="shop", actor="t", at=hub.clock.now())
    ing = Ingestor(hub)
    ing.segment(
        ws.id,
        "batch",
        {
            "batch": [
                {
                    "type": "track",
                    "anonymousId": "ann-phone",
                    "event": "product_view",
                    "messageId": "a1",
                },
                {
                    "type": "track",
                    "anonymousId": "ann-laptop",
                    "event": "cart_add",
                    "messageId": "a2",
                },
            ]
        },
    )
    flush_once(hub)  # some of Ann's events are in the log before her profiles merge
    ing.segment(
        ws.id,
        "batch",
        {
            "batch": [
                {
                    "type": "identify",
                    "userId": "ann-42",
                    "anonymousId": "ann-phone",
                    "messageId": "a3",
                    "traits": {"email": "ann@example.com", "note": SECRET},
                },
                {
                    "type": "identify",
                    "userId": "ann-42",
                    "anonymousId": "ann-laptop",
                    "messageId": "a4",
                },
                {
                    "type": "track",
                    "userId": "ann-42",
                    "event": "purchase",
                    "messageId": "a5",
                    "properties": {"gift_message": SECRET},
                },
                {
                    "type": "identify",
                    "userId": "bob-7",
                    "traits": {"email": "bob@example.com"},
                    "messageId": "b1",
                },
                {"type": "track", "userId": "bob-7", "event": "purchase", "messageId": "b2"},
            ]
        },
    )
    ing.native_profiles(
        ws.id,
        {
            "profiles": [
                {
                    "identities": {"email": "ann@example.com"},
                    "attributes": {"city": "Leiden"},
                    "consents": [{"channel": "email", "status": "opted_in"}],
                }
            ]
        },
    )
    with hub.tx() as conn:
        ann = profiles.lookup(conn, ws.id, "user_id", "ann-42")
        profiles.update_profile(
            conn,
            workspace_id=ws.id,
            identity=Identity("user_id", "ann-42"),
            attributes={"vip": True},
            consent_updates=[],
            schema=_schema(conn, ws.id),
            policy=ing.policy,
            actor="cli:test",
            now=hub.clock.now(),
        )
        merged = profiles._merged_ids(conn, ws.id, ann["id"])
    assert len(merged) == 2  # her two devices were two profiles before she logged in
    return ws.id, ann["id"], merged


def _schema(conn: Any, ws: str) -> Any:
    from waymark.profiles.schema_store import current_schema

    return current_schema(conn, ws).schema


def _all_rows(hub: Hub) -> dict[str, list[str]]:
    """Every row of every table in every store, as text."""
    out: dict[str, list[str]] = {}
    with hub.engine.connect() as conn:
        for name in inspect(conn).get_table_names():
            rows = conn.execute(text(f'SELECT * FROM "{name}"')).all()
            out[f"state.{name}"] = [repr(tuple(r)) for r in rows]
    log = hub.events
    if isinstance(log, DuckDBEventLog):
        for (name,) in log.sql("SELECT table_name FROM information_schema.tables"):
            out[f"log.{name}"] = [repr(r) for r in log.sql(f'SELECT * FROM "{name}"')]
    return out


def test_every_table_is_classified_for_deletion() -> None:
    names = {t.name for t in metadata.sorted_tables}
    assert names == set(PERSON_TABLES) | PERSON_FREE_TABLES
    assert not set(PERSON_TABLES) & PERSON_FREE_TABLES


def test_export_holds_everything_about_the_person(hub: Hub) -> None:
    ws, ann_id, merged = _setup(hub)
    with hub.tx() as conn:
        data = profiles.export_person(
            conn,
            hub.events,
            workspace_id=ws,
            identity=Identity("email", "ann@example.com"),
            actor="t",
            now=hub.clock.now(),
        )
    dumped = orjson.dumps(data).decode()
    assert data["profile"]["id"] == ann_id
    assert sorted(e["message_id"] for e in data["events"]) == ["a1", "a2", "a3", "a4", "a5"]
    assert SECRET in dumped and "Leiden" in dumped and "bob" not in dumped
    assert data["profile"]["consents"][0]["status"] == "opted_in"
    assert set(data["merged_profile_ids"]) == set(merged) - {ann_id}


def test_delete_leaves_nothing_of_the_person_in_any_table(hub: Hub) -> None:
    ws, _ann_id, merged = _setup(hub)
    needles = [*merged, "ann-42", "ann-phone", "ann-laptop", "ann@example.com", SECRET, "Leiden"]
    before = _all_rows(hub)
    assert any(n in row for rows in before.values() for row in rows for n in needles)

    record = delete_person(
        hub, workspace_id=ws, identity=Identity("email", "ann@example.com"), actor="cli:dpo"
    )
    assert record["status"] == "done"
    flush_once(hub)
    after = _all_rows(hub)
    leftovers = [
        (table, n) for table, rows in after.items() for row in rows for n in needles if n in row
    ]
    assert leftovers == []
    with hub.engine.connect() as conn:
        bob = profiles.lookup(conn, ws, "user_id", "bob-7")
        assert bob["attributes"]["email"] == "bob@example.com"
        bob_events = profiles.timeline(conn, hub.events, ws, bob["id"])
        audit = access.list_audit(conn, ws)
    assert {e["message_id"] for e in bob_events} == {"b1", "b2"}
    assert any(e["action"] == "privacy.delete" and e["actor"] == "cli:dpo" for e in audit)


def test_a_deletion_interrupted_after_the_state_store_completes_at_restart(hub: Hub) -> None:
    ws, _ann_id, merged = _setup(hub)
    flush_once(hub)
    with hub.tx() as conn:
        profiles.start_deletion(
            conn,
            workspace_id=ws,
            identity=Identity("user_id", "ann-42"),
            actor="t",
            now=hub.clock.now(),
        )
    # the process dies here; the log still holds her events
    assert any(hub.events.events_for_profile(ws, p) for p in merged)
    assert finish_pending_deletions(hub) == 1
    assert not any(hub.events.events_for_profile(ws, p) for p in merged)
    assert finish_pending_deletions(hub) == 0
