"""Schemathesis fuzzes every documented endpoint: whatever it sends, Waymark never answers 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from waymark.access import service as access
from waymark.api.app import create_app
from waymark.hub import Hub
from waymark.settings import load_settings

_hub = Hub.open(load_settings(environ={}, data_dir=Path(tempfile.mkdtemp(prefix="wm-fuzz-"))))
with _hub.tx() as _conn:
    _ws, _write, _admin = access.create_workspace(
        _conn, name="fuzz", actor="fuzz", at=_hub.clock.now()
    )
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_hub, background=False))


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    headers = {"Authorization": f"Bearer {_admin.secret}"}  # admin holds every scope
    case.call_and_validate(headers=headers, checks=[not_a_server_error])
