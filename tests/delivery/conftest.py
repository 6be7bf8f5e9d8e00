"""A workspace with a schema and a few profiles, on each backend, for the delivery services."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from waymark.access import service as access
from waymark.hub import Hub
from waymark.ingestion.pipeline import Ingestor
from waymark.model.events import Identity
from waymark.profiles import service as profiles
from waymark.profiles.schema_store import save_schema

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "src/waymark/demo/schema.json").read_text(encoding="utf-8")
)

#: user id -> (email, phone, time zone, email marketing consent)
PEOPLE: dict[str, tuple[str | None, str | None, str, str | None]] = {
    "ann": ("Ann@Example.com", "+4915112345678", "Europe/Berlin", "opted_in"),
    "bob": ("bob@example.com", None, "America/New_York", "opted_out"),
    "cy": ("cy@example.com", "+14155550123", "Asia/Tokyo", None),
    "dee": (None, None, "UTC", "opted_in"),
}


@dataclass
class Shop:
    hub: Hub
    ws: str
    ids: dict[str, str]


@pytest.fixture
def shop(hub: Hub) -> Shop:
    now = hub.clock.now()
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="shop", actor="t", at=now)
        save_schema(conn, workspace_id=ws.id, document=SCHEMA, actor="t", at=now)
    records: list[dict[str, Any]] = []
    for user, (email, phone, zone, consent) in PEOPLE.items():
        attributes: dict[str, Any] = {"first_name": user.title(), "timezone": zone}
        if email:
            attributes["email"] = email
        if phone:
            attributes["phone"] = phone
        record: dict[str, Any] = {
            "identities": {"user_id": user},
            "attributes": attributes,
            "timestamp": now.isoformat(),
        }
        statements = [
            {"channel": "sms", "purpose": "marketing", "status": "opted_in"},
            {"channel": "push", "purpose": "marketing", "status": "opted_in"},
        ]
        if consent:
            statements.append({"channel": "email", "purpose": "marketing", "status": consent})
        record["consents"] = [{**s, "timestamp": now.isoformat()} for s in statements]
        records.append(record)
    result = Ingestor(hub).native_profiles(ws.id, {"profiles": records})
    assert result.accepted == len(records), result.to_json()
    with hub.engine.connect() as conn:
        ids = {u: profiles.find_profile_id(conn, ws.id, Identity("user_id", u)) for u in PEOPLE}
    return Shop(hub, ws.id, ids)
