"""What every CLI command shares: settings for this invocation, the hub, output helpers."""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from waymark.access import service as access
from waymark.hub import Hub
from waymark.logs import configure
from waymark.settings import Settings, load_settings

console = Console()
err_console = Console(stderr=True)
cli_state: dict[str, Any] = {}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
WorkspaceOpt = Annotated[
    str, typer.Option("--workspace", "-w", help="Workspace name or id.", envvar="WAYMARK_WORKSPACE")
]


def settings() -> Settings:
    """The settings for this invocation (read once)."""
    if "settings" not in cli_state:
        cli_state["settings"] = load_settings(
            config_file=cli_state.get("config"), **cli_state.get("overrides", {})
        )
        s = cli_state["settings"]
        configure(s.log_level, s.log_format)
    result: Settings = cli_state["settings"]
    return result


def actor() -> str:
    """How the audit log names a person at this terminal."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


@contextmanager
def opened_hub() -> Iterator[Hub]:
    """A hub for one command, closed afterwards."""
    hub = Hub.open(settings())
    try:
        yield hub
    finally:
        hub.close()


def jsonable(value: Any) -> Any:
    """Datetimes and paths as strings, recursively."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def emit(data: Any, as_json: bool, render: Callable[[], None] | None = None) -> None:
    """Print ``data`` as JSON, or through ``render`` for people."""
    if as_json or render is None:
        sys.stdout.write(orjson.dumps(jsonable(data), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render()


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A Rich table with these columns and rows."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


def workspace_id(hub: Hub, ref: str) -> str:
    """Resolve a workspace name or id."""
    with hub.engine.connect() as conn:
        return access.get_workspace(conn, ref).id
