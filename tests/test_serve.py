"""``waymark serve`` as a real process: acknowledged events survive a kill -9 and a restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from waymark.hub import Hub
from waymark.settings import load_settings


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.port = _port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "waymark.cli.main", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(
            "server did not start: " + self.proc.stderr.read().decode()[-2000:]
            if self.proc.stderr
            else ""
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


@pytest.fixture
def env(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    e = {
        **os.environ,
        "WAYMARK_DATA_DIR": str(tmp_path / "data"),
        "WAYMARK_LOG_LEVEL": "warning",
        "WAYMARK_FLUSH_INTERVAL_MS": "100",
    }
    if backend == "postgres":
        e["WAYMARK_DATABASE_URL"] = request.getfixturevalue("pg_database_url")
        hub = Hub.open(load_settings(environ=e))
        from tests.conftest import _truncate_pg

        _truncate_pg(hub)
        hub.close()
    yield e


def _create_workspace(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "waymark.cli.main", "workspace", "create", "shop", "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return str(json.loads(out.stdout)["write_key"])


def _batch(start: int, n: int) -> dict[str, object]:
    return {
        "batch": [
            {"type": "track", "event": "view", "userId": f"u{i % 7}", "messageId": f"m{i}"}
            for i in range(start, start + n)
        ]
    }


def test_acknowledged_events_survive_kill_9_and_retries_do_not_duplicate(
    env: dict[str, str],
) -> None:
    key = _create_workspace(env)
    server = Server(env)
    url = server.start()
    acked = 0
    for start in range(0, 500, 50):
        r = httpx.post(url + "/v1/batch", json=_batch(start, 50), auth=(key, ""), timeout=30)
        assert r.status_code == 200
        acked += r.json()["accepted"]
    server.stop(signal.SIGKILL)  # no shutdown hooks: whatever was acknowledged must be durable

    url = server.start()
    # the client never saw some answers: it retries everything
    for start in range(0, 500, 50):
        r = httpx.post(url + "/v1/batch", json=_batch(start, 50), auth=(key, ""), timeout=30)
        assert r.json()["accepted"] == 0 and r.json()["duplicates"] == 50
    server.stop(signal.SIGTERM)  # a clean stop moves what waits in the inbox to the log

    hub = Hub.open(load_settings(environ=env))
    try:
        from sqlalchemy import func, select

        from waymark.storage.tables import event_inbox, workspaces

        with hub.engine.connect() as conn:
            ws = conn.execute(select(workspaces.c.id)).scalar_one()
            waiting = conn.execute(select(func.count()).select_from(event_inbox)).scalar_one()
        assert acked == 500
        assert waiting == 0
        assert hub.events.count(ws) == 500
    finally:
        hub.close()
