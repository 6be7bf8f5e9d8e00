"""The official Segment Python library, unchanged, against a real Waymark server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import uvicorn
from segment.analytics.client import Client

from waymark.access import service as access
from waymark.api.app import create_app
from waymark.hub import Hub
from waymark.profiles import service as profiles
from waymark.workers import flush_once


@pytest.fixture
def server(hub: Hub) -> Iterator[tuple[str, str, str]]:
    with hub.tx() as conn:
        ws, write, _admin = access.create_workspace(
            conn, name="shop", actor="t", at=hub.clock.now()
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(
            create_app(hub, background=False), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", write.secret, ws.id
    finally:
        srv.should_exit = True
        thread.join(timeout=20)


@pytest.mark.parametrize("gzip", [False, True])
def test_segment_library_calls_are_stored(
    hub: Hub, server: tuple[str, str, str], gzip: bool
) -> None:
    host, write_key, ws = server
    errors: list[Exception] = []
    client = Client(
        write_key,
        host=host,
        sync_mode=True,
        gzip=gzip,
        max_retries=0,
        on_error=lambda e, _batch: errors.append(e),
    )
    now = hub.clock.now()
    client.page(anonymous_id="dev-9", name="Home", properties={"path": "/"}, timestamp=now)
    client.track(
        anonymous_id="dev-9", event="product_view", properties={"sku": "S1"}, timestamp=now
    )
    client.identify(
        user_id="u9", anonymous_id="dev-9", traits={"email": "nine@example.com"}, timestamp=now
    )
    client.screen(user_id="u9", name="Cart", timestamp=now)
    client.group(user_id="u9", group_id="acme", traits={"name": "Acme"}, timestamp=now)
    client.alias(previous_id="dev-9", user_id="u9", timestamp=now)
    client.track(
        user_id="u9",
        event="purchase",
        properties={"revenue": 19.99},
        timestamp=datetime(2026, 3, 1, 11, 0, tzinfo=UTC),
    )
    client.flush()
    assert errors == []
    flush_once(hub)
    with hub.engine.connect() as conn:
        view = profiles.lookup(conn, ws, "email", "nine@example.com")
        events = profiles.timeline(conn, hub.events, ws, view["id"])
    assert {(i["namespace"], i["value"]) for i in view["identities"]} >= {
        ("user_id", "u9"),
        ("anonymous_id", "dev-9"),
    }
    assert sorted(e["type"] for e in events) == sorted(
        ["page", "track", "identify", "screen", "group", "alias", "track"]
    )
    purchase = next(e for e in events if e["name"] == "purchase")
    assert purchase["properties"]["revenue"] == 19.99
    assert purchase["context"]["library"]["name"] == "analytics-python"
