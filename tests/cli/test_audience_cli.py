"""``waymark audience``: save, validate, explain, run and export from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tests.cli.test_cli import as_json, waymark  # noqa: F401 - the fixture


def test_audience_commands(waymark: Any, tmp_path: Path) -> None:  # noqa: F811
    waymark("workspace", "create", "shop")
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"attributes": {"plan": {"type": "string", "enum": ["free", "pro"]}}})
    )
    waymark("schema", "set", "-w", "shop", str(schema))
    for email, plan in (("ann@example.com", "pro"), ("bob@example.com", "free")):
        waymark(
            "profile", "update", "-w", "shop", "email", email, "--set", f'plan="{plan}"', "--create"
        )

    valid = as_json(waymark("audience", "validate", "-w", "shop", 'plan = "pro"', "--json"))
    assert valid["text"] == 'plan = "pro"' and valid["mode"] == "streaming"
    bad = waymark("audience", "validate", "-w", "shop", 'plan = "gold"', ok=False)
    assert bad.exit_code != 0 and "gold" in str(bad.exception)

    definition = tmp_path / "pro.json"
    definition.write_text(json.dumps(valid["definition"]))
    saved = as_json(waymark("audience", "save", "-w", "shop", "pro", f"@{definition}", "--json"))
    assert saved["version"] == 1
    listed = waymark("audience", "list", "-w", "shop")
    assert "pro" in listed.stdout
    explained = as_json(
        waymark("audience", "explain", "-w", "shop", "pro", "--dialect", "trino", "--json")
    )
    assert list(explained["sql"]) == ["trino"]

    run = as_json(waymark("audience", "run", "-w", "shop", "pro", "--json"))
    assert (run["members"], run["realized"], run["exited"]) == (1, 1, 0)
    assert as_json(waymark("audience", "count", "-w", "shop", "pro", "--json")) == {"count": 1}
    est = as_json(
        waymark("audience", "estimate", "-w", "shop", "pro", "--percent", "100", "--json")
    )
    assert est["estimate"] == 1
    out = tmp_path / "pro.parquet"
    waymark("audience", "members", "-w", "shop", "pro", "-o", str(out))
    assert pq.read_table(out).column("status").to_pylist() == ["realized"]
    mine = as_json(waymark("audience", "of", "-w", "shop", "email", "ann@example.com", "--json"))
    assert [m["audience"] for m in mine] == ["pro"]
    waymark("audience", "delete", "-w", "shop", "pro")
    gone = waymark("audience", "show", "-w", "shop", "pro", ok=False)
    assert gone.exit_code != 0 and "pro" in str(gone.exception)
