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
