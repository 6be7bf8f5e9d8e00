"""Ingestion through the state store and event log, on SQLite+DuckDB and on PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from waymark.access import service as access
from waymark.core.clock import ManualClock
from waymark.hub import Hub
from waymark.ingestion.pipeline import Ingestor
from waymark.profiles import service as profiles
from waymark.profiles.schema_store import save_schema
from waymark.storage.tables import event_inbox, identities, seen_messages


@pytest.fixture
def ws(hub: Hub) -> str:
    with hub.tx() as conn:
        workspace, _w, _a = access.create_workspace(
            conn, name="shop", actor="test", at=hub.clock.now()
        )
    return workspace.id


def ts(hub: Hub, minutes: int = 0) -> str:
    return (hub.clock.now() - timedelta(hours=1) + timedelta(minutes=minutes)).isoformat()


def track(hub: Hub, mid: str, event: str, minutes: int, **ids: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": mid,
        "event": event,
        "timestamp": ts(hub, minutes),
        "properties": {"sku": "A1"},
        **ids,
    }


def test_anonymous_browsing_then_login_merges_and_events_follow(hub: Hub, ws: str) -> None:
    ing = Ingestor(hub)
    r1 = ing.segment(
        ws,
        "batch",
        {
            "batch": [
                track(hub, "m1", "product_view", 1, anonymousId="dev-1"),
                track(hub, "m2", "cart_add", 2, anonymousId="dev-1"),
            ]
        },
    )
    assert (r1.accepted, r1.profiles_created) == (2, 1)
    ing.flush()  # the anonymous events reach the log before the merge happens
    r2 = ing.segment(
        ws,
        "identify",
        {
            "messageId": "m3",
            "userId": "u1",
            "anonymousId": "dev-1",
            "traits": {"email": "Ann@Example.com", "plan": "pro"},
            "timestamp": ts(hub, 3),
        },
    )
    assert r2.accepted == 1 and r2.profiles_created == 0
    # a second device of the same user, seen before login, merges on login
    ing.segment(ws, "track", track(hub, "m4", "app_open", 4, anonymousId="dev-2"))
    r3 = ing.segment(
        ws,
        "identify",
        {"messageId": "m5", "userId": "u1", "anonymousId": "dev-2", "timestamp": ts(hub, 5)},
    )
    assert r3.profiles_merged == 1
    ing.flush()
    with hub.tx() as conn:
        view = profiles.lookup(conn, ws, "email", "ann@example.com")
        assert view == profiles.lookup(conn, ws, "anonymous_id", "dev-2")
        assert {(i["namespace"], i["value"]) for i in view["identities"]} == {
            ("user_id", "u1"),
            ("anonymous_id", "dev-1"),
            ("anonymous_id", "dev-2"),
            ("email", "ann@example.com"),
        }
        assert view["attributes"]["plan"] == "pro"
        events = profiles.timeline(conn, hub.events, ws, view["id"])
        assert conn.execute(select(func.count()).select_from(event_inbox)).scalar_one() == 0
    assert [e["message_id"] for e in events] == ["m5", "m4", "m3", "m2", "m1"]
    assert hub.events.count(ws) == 5


def test_retried_batches_create_no_duplicates(hub: Hub, ws: str) -> None:
    ing = Ingestor(hub)
    body = {"batch": [track(hub, f"m{i}", "product_view", i, userId="u1") for i in range(5)]}
    assert ing.segment(ws, "batch", body).accepted == 5
    again = ing.segment(ws, "batch", body)
    assert (again.accepted, again.duplicates) == (0, 5)
    within = ing.segment(ws, "batch", {"batch": [track(hub, "x", "a", 1, userId="u1")] * 3})
    assert (within.accepted, within.duplicates) == (1, 2)
    ing.flush()
    ing.flush()  # a second flush moves nothing twice
    assert hub.events.count(ws) == 6


def test_a_batch_with_bad_items_keeps_the_good_ones(hub: Hub, ws: str) -> None:
    with hub.tx() as conn:
        save_schema(
            conn,
            workspace_id=ws,
            actor="t",
            at=hub.clock.now(),
            document={
                "events": {"purchase": {"properties": {"revenue": {"type": "number"}}}},
                "unknown_events": "reject",
            },
        )
    ing = Ingestor(hub)
    res = ing.segment(
        ws,
        "batch",
        {
            "batch": [
                {
                    "type": "track",
                    "event": "purchase",
                    "userId": "u1",
                    "messageId": "ok",
                    "properties": {"revenue": 12.5},
                },
                {
                    "type": "track",
                    "event": "purchase",
                    "userId": "u1",
                    "messageId": "bad-type",
                    "properties": {"revenue": "lots"},
                },
                {"type": "track", "event": "teleport", "userId": "u1", "messageId": "unknown"},
                {"type": "track", "event": "purchase", "messageId": "no-identity"},
                "not an object",
            ]
        },
    )
    assert res.accepted == 1
    reasons = {e.index: e.issues[0] for e in res.rejected}
    assert sorted(reasons) == [1, 2, 3, 4]
    assert reasons[1].path == "properties.revenue" and "number" in reasons[1].reason
    assert "teleport" in reasons[2].reason
    assert "userId" in reasons[3].reason or "anonymousId" in reasons[3].reason
    # a rejected item's messageId is not burnt: the corrected retry is accepted
    fixed = ing.segment(
        ws,
        "track",
        {
            "event": "purchase",
            "userId": "u1",
            "messageId": "bad-type",
            "properties": {"revenue": 3},
        },
    )
    assert fixed.accepted == 1
    with hub.tx() as conn:
        assert conn.execute(select(func.count()).select_from(seen_messages)).scalar_one() == 2


def test_unknown_fields_are_flagged_under_accept(hub: Hub, ws: str) -> None:
    ing = Ingestor(hub)
    ing.segment(
        ws,
        "track",
        {"event": "brand_new", "userId": "u1", "messageId": "f1", "properties": {"x": 1}},
    )
    ing.flush()
    with hub.tx() as conn:
        pid = profiles.find_profile_id(conn, ws, profiles.parse_identity("user_id", "u1"))
    [event] = hub.events.events_for_profile(ws, pid)
    assert "unknown_event:brand_new" in event.flags


def test_profile_records_with_consents_latest_wins(hub: Hub, ws: str, clock: ManualClock) -> None:
    ing = Ingestor(hub)
    t0 = clock.now() - timedelta(days=2)
    rec = {
        "identities": {"user_id": "u9", "email": "z@x.io"},
        "attributes": {"plan": "free"},
        "timestamp": t0.isoformat(),
        "consents": [
            {
                "channel": "email",
                "purpose": "marketing",
                "status": "opted_in",
                "timestamp": t0.isoformat(),
            }
        ],
    }
    older = {
        **rec,
        "attributes": {"plan": "ancient"},
        "timestamp": (t0 - timedelta(days=1)).isoformat(),
        "consents": [
            {
                "channel": "email",
                "status": "opted_out",
                "timestamp": (t0 - timedelta(days=1)).isoformat(),
            }
        ],
    }
    assert ing.native_profiles(ws, {"profiles": [rec]}).accepted == 1
    assert ing.native_profiles(ws, {"profiles": [older]}).accepted == 1
    with hub.tx() as conn:
        view = profiles.lookup(conn, ws, "user_id", "u9")
    assert view["attributes"]["plan"] == "free"
    assert [(c["channel"], c["status"]) for c in view["consents"]] == [("email", "opted_in")]


def test_shared_device_does_not_join_two_users(hub: Hub, ws: str) -> None:
    ing = Ingestor(hub)
    ing.segment(ws, "identify", {"userId": "u1", "anonymousId": "kiosk", "messageId": "a"})
    res = ing.segment(ws, "identify", {"userId": "u2", "anonymousId": "kiosk", "messageId": "b"})
    assert res.accepted == 1 and res.conflicts
    with hub.tx() as conn:
        owners = {
            v: p for v, p in conn.execute(select(identities.c.value, identities.c.profile_id))
        }
    assert owners["u1"] == owners["kiosk"] != owners["u2"]


def test_alias_links_previous_id(hub: Hub, ws: str) -> None:
    ing = Ingestor(hub)
    ing.segment(ws, "track", track(hub, "a1", "view", 1, anonymousId="anon-7"))
    ing.segment(ws, "alias", {"userId": "u7", "previousId": "anon-7", "messageId": "a2"})
    with hub.tx() as conn:
        assert (
            profiles.lookup(conn, ws, "user_id", "u7")["id"]
            == profiles.lookup(conn, ws, "anonymous_id", "anon-7")["id"]
        )


def test_source_priority_from_settings_beats_recency(tmp_path: Any, clock: ManualClock) -> None:
    from waymark.settings import load_settings

    settings = load_settings(environ={}, data_dir=tmp_path, source_priority={"plan": ["crm"]})
    hub = Hub.open(settings, clock)
    try:
        with hub.tx() as conn:
            ws, _w, _a = access.create_workspace(conn, name="s", actor="t", at=clock.now())
        ing = Ingestor(hub)
        old = (clock.now() - timedelta(days=3)).isoformat()
        ing.native_profiles(
            ws.id,
            {
                "profiles": [
                    {
                        "identities": {"user_id": "u1"},
                        "attributes": {"plan": "enterprise"},
                        "timestamp": old,
                    }
                ]
            },
        )
        # the CRM is the authority on plans: its value survives a newer one from the web
        ing.store_profiles(
            ws.id,
            ing_parse(
                ing,
                {"profiles": [{"identities": {"user_id": "u1"}, "attributes": {"plan": "free"}}]},
                "web",
            ),
        )
        with hub.tx() as conn:
            assert profiles.lookup(conn, ws.id, "user_id", "u1")["attributes"]["plan"] == "free"
        ing.store_profiles(
            ws.id,
            ing_parse(
                ing,
                {
                    "profiles": [
                        {
                            "identities": {"user_id": "u1"},
                            "attributes": {"plan": "pro"},
                            "timestamp": old,
                        }
                    ]
                },
                "crm",
            ),
        )
        with hub.tx() as conn:
            assert profiles.lookup(conn, ws.id, "user_id", "u1")["attributes"]["plan"] == "pro"
    finally:
        hub.close()


def ing_parse(ing: Ingestor, body: dict[str, Any], source: str) -> Any:
    from waymark.ingestion.payloads import parse_native_profiles

    return parse_native_profiles(body, received_at=ing.hub.clock.now(), source=source)
