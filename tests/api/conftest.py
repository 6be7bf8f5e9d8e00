from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from waymark.access import service as access
from waymark.api.app import create_app
from waymark.hub import Hub


@dataclass
class Api:
    client: TestClient
    hub: Hub
    workspace_id: str
    write_key: str
    admin_key: str

    def basic(self, key: str | None = None) -> dict[str, str]:
        token = base64.b64encode(f"{key or self.write_key}:".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def bearer(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}


@pytest.fixture
def api(hub: Hub) -> Iterator[Api]:
    with hub.tx() as conn:
        ws, write, admin = access.create_workspace(conn, name="shop", actor="t", at=hub.clock.now())
    with TestClient(create_app(hub, background=False)) as client:
        yield Api(client, hub, ws.id, write.secret, admin.secret)
