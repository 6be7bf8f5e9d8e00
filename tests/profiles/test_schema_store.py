"""The schema in force, as the ingestion hot path reads it."""

from __future__ import annotations

from waymark.access import service as access
from waymark.hub import Hub
from waymark.model.schemas import validate_event
from waymark.profiles.schema_store import save_schema, schema_in_force


def test_schema_in_force_follows_each_new_version(hub: Hub) -> None:
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="s", actor="t", at=hub.clock.now())
    with hub.engine.connect() as conn:
        assert schema_in_force(conn, ws.id)[0] == 0
        assert validate_event(schema_in_force(conn, ws.id)[1], "anything", {}).ok
    for version, policy in ((1, "accept"), (2, "reject")):
        with hub.tx() as conn:
            save_schema(
                conn,
                workspace_id=ws.id,
                document={"events": {"checkout": {"properties": {}}}, "unknown_events": policy},
                actor="t",
                at=hub.clock.now(),
            )
        with hub.engine.connect() as conn:
            found, schema = schema_in_force(conn, ws.id)
            assert found == version
            assert validate_event(schema, "anything", {}).ok is (policy == "accept")


def test_every_schema_declares_the_hubs_own_message_events(hub: Hub) -> None:
    import pytest

    from waymark.core.errors import InvalidInput
    from waymark.model.schemas import BUILTIN_EVENTS
    from waymark.profiles.schema_store import current_schema
    from waymark.segmentation import service as segments

    now = hub.clock.now()
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="s", actor="t", at=now)
        assert "message.opened" in current_schema(conn, ws.id).schema.events  # version 0 too
        shown = save_schema(
            conn,
            workspace_id=ws.id,
            document={"events": {"checkout": {"properties": {}}}, "unknown_events": "reject"},
            actor="t",
            at=now,
        ).schema.to_json()
        # what `schema show` lists can be saved back unchanged
        again = save_schema(conn, workspace_id=ws.id, document=shown, actor="t", at=now)
        assert again.schema.to_json() == shown and not again.warnings
        with pytest.raises(InvalidInput, match=r"events\.message\.clicked: is written by the hub"):
            save_schema(
                conn,
                workspace_id=ws.id,
                document={"events": {"message.clicked": {"properties": {}}}},
                actor="t",
                at=now,
            )
        audience = segments.save_audience(
            conn,
            ws.id,
            name="engaged",
            definition='count("message.clicked" where channel = "email" within last 30 days) >= 1',
            actor="t",
            now=now,
        )
    assert audience.mode == "streaming"
    with hub.engine.connect() as conn:
        _v, schema = schema_in_force(conn, ws.id)
    assert set(BUILTIN_EVENTS) <= set(schema.events)
    assert validate_event(schema, "message.clicked", {"url": "https://x.test", "link_id": 2}).ok
