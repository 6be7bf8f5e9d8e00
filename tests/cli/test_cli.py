"""The ``waymark`` command line, on the embedded default in a temporary data folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from waymark.cli import main as cli


@pytest.fixture
def waymark(tmp_path: Path) -> Any:
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True) -> Any:
        cli.cli_state.clear()
        result = runner.invoke(cli.app, ["--data-dir", str(tmp_path / "data"), *args])
        if ok:
            assert result.exit_code == 0, (result.output, result.exception)
        return result

    return invoke


def as_json(result: Any) -> Any:
    return json.loads(result.stdout)


def test_workspace_keys_users_and_audit(waymark: Any) -> None:
    created = as_json(waymark("workspace", "create", "shop", "--json"))
    assert created["write_key"].startswith("wmw_") and created["admin_key"].startswith("wms_")
    assert [w["name"] for w in as_json(waymark("workspace", "list", "--json"))] == ["shop"]
    key = as_json(
        waymark("key", "create", "-w", "shop", "--scope", "read", "--name", "bi", "--json")
    )
    keys = as_json(waymark("key", "list", "-w", "shop", "--json"))
    assert {k["kind"] for k in keys} == {"write", "secret"}
    assert all("secret" not in k and k["prefix"] for k in keys)
    waymark("key", "revoke", "-w", "shop", key["id"])
    user = as_json(
        waymark("user", "create", "-w", "shop", "ann@shop.io", "--role", "viewer", "--json")
    )
    assert user["token"].startswith("wmu_")
    audit = as_json(waymark("audit", "-w", "shop", "--json"))
    assert {"workspace.create", "key.create", "key.revoke", "user.create"} <= {
        e["action"] for e in audit
    }
    assert all(e["actor"].startswith("cli:") for e in audit)
    table = waymark("key", "list", "-w", "shop")  # the human form renders too
    assert "bi" in table.stdout


def test_schema_profiles_and_privacy(waymark: Any, tmp_path: Path) -> None:
    waymark("workspace", "create", "shop")
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"attributes": {"plan": {"type": "string", "enum": ["free", "pro"]}}})
    )
    saved = as_json(waymark("schema", "set", "-w", "shop", str(schema), "--json"))
    assert saved["version"] == 1
    view = as_json(
        waymark(
            "profile",
            "update",
            "-w",
            "shop",
            "email",
            "Ann@Example.com",
            "--set",
            'plan="pro"',
            "--consent",
            "email:marketing:opted_in",
            "--create",
        )
    )
    assert view["attributes"] == {"plan": "pro"}
    shown = as_json(waymark("profile", "show", "-w", "shop", "email", "ann@example.com", "--json"))
    assert shown["id"] == view["id"] and shown["consents"][0]["status"] == "opted_in"
    found = as_json(waymark("profile", "search", "-w", "shop", "-q", "plan=pro", "--json"))
    assert [p["id"] for p in found["profiles"]] == [view["id"]]
    out = tmp_path / "ann.json"
    waymark("privacy", "export", "-w", "shop", "email", "ann@example.com", "--out", str(out))
    assert json.loads(out.read_text())["profile"]["id"] == view["id"]
    deleted = as_json(
        waymark("privacy", "delete", "-w", "shop", "email", "ann@example.com", "--yes", "--json")
    )
    assert deleted["status"] == "done"
    gone = waymark("profile", "show", "-w", "shop", "email", "ann@example.com", ok=False)
    assert gone.exit_code != 0


def test_errors_are_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"attributes": {"x": {"type": "strng"}}}')
    data = str(tmp_path / "data")
    exe = [sys.executable, "-m", "waymark.cli.main", "--data-dir", data]
    subprocess.run([*exe, "workspace", "create", "shop"], check=True, capture_output=True)
    r = subprocess.run(
        [*exe, "schema", "set", "-w", "shop", str(bad)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 2
    assert "attributes.x.type" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [*exe, "profile", "show", "-w", "nope", "email", "a@b.c"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "no workspace 'nope'" in r.stderr


def test_demo_generate_scales_sessions_and_refuses_a_bad_scale(
    waymark: Any, tmp_path: Path
) -> None:
    plain = as_json(waymark("demo", "generate", "--out", str(tmp_path / "a"), "--json"))
    more = as_json(
        waymark("demo", "generate", "--out", str(tmp_path / "b"), "--sessions", "1.5", "--json")
    )
    assert more["profiles"] == plain["profiles"] and more["events"] > plain["events"]
    refused = waymark("demo", "generate", "--out", str(tmp_path / "c"), "--sessions", "0", ok=False)
    assert refused.exit_code != 0
    assert "--sessions: choose between 0.1 and 10" in str(refused.exception)
    assert not (tmp_path / "c").exists()
