"""``waymark audience``: author, evaluate and export audiences."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from waymark.cli.common import (
    JsonOpt,
    WorkspaceOpt,
    actor,
    console,
    emit,
    opened_hub,
    table,
    workspace_id,
)
from waymark.core.errors import InvalidInput, Issue
from waymark.hub import Hub
from waymark.segmentation import service as segments

audience_app = typer.Typer(help="Author, evaluate and export audiences.", no_args_is_help=True)

DefinitionArg = Annotated[
    str,
    typer.Argument(
        help="The definition's text, or @FILE for a file (text, or JSON if it ends in .json)."
    ),
]
AsOfOpt = Annotated[
    str | None, typer.Option("--as-of", help="Evaluate at this ISO-8601 instant instead of now.")
]


def _definition(value: str) -> object:
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    if not path.is_file():
        raise InvalidInput([Issue(value, "no such file")])
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput([Issue(str(path), f"malformed JSON: {exc}")]) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput([Issue(str(path), f"not UTF-8 text: {exc}")]) from exc


def _now(hub: Hub, as_of: str | None) -> Any:
    return segments.as_of(as_of, hub.clock.now())


@audience_app.command("save")
def save(
    workspace: WorkspaceOpt,
    name: str,
    definition: DefinitionArg,
    description: Annotated[str, typer.Option(help="What the audience is for.")] = "",
    schedule: Annotated[str | None, typer.Option(help="Cron schedule of batch runs.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an audience or replace its definition."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            saved = segments.save_audience(
                conn,
                ws,
                name=name,
                definition=_definition(definition),
                description=description,
                schedule=schedule,
                actor=actor(),
                now=hub.clock.now(),
            )
    data = saved.to_json()
    emit(
        data,
        as_json,
        lambda: console.print(
            f"saved audience {name!r} version {data['version']} ({data['mode']})"
        ),
    )


@audience_app.command("list")
def list_(workspace: WorkspaceOpt, as_json: JsonOpt = False) -> None:
    """List the workspace's audiences."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            items = [a.to_json() for a in segments.list_audiences(conn, ws)]
    rows = [[a["name"], a["mode"], a["schedule"], a["last_run_at"], a["text"]] for a in items]
    emit(
        items,
        as_json,
        lambda: console.print(
            table("audiences", ["name", "mode", "schedule", "last run", "definition"], rows)
        ),
    )


@audience_app.command("show")
def show(workspace: WorkspaceOpt, name: str) -> None:
    """Print one audience (JSON)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            emit(segments.get_audience(conn, ws, name).to_json(), True)


@audience_app.command("delete")
def delete(workspace: WorkspaceOpt, name: str) -> None:
    """Delete an audience, its memberships and its runs."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            segments.delete_audience(conn, ws, name, actor=actor(), now=hub.clock.now())
    console.print(f"deleted audience {name!r}")


@audience_app.command("validate")
def validate(workspace: WorkspaceOpt, definition: DefinitionArg, as_json: JsonOpt = False) -> None:
    """Check a definition against the schema; print its canonical text and JSON form."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            expr = segments.read_definition(conn, ws, _definition(definition))
            data = segments.explain(conn, ws, expr, now=hub.clock.now(), dialects=[])
    emit(data, as_json, lambda: console.print(f"[green]valid[/] ({data['mode']}): {data['text']}"))


@audience_app.command("explain")
def explain(
    workspace: WorkspaceOpt,
    name: str,
    dialect: Annotated[list[str] | None, typer.Option(help="Only these SQL dialects.")] = None,
    as_of: AsOfOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the evaluation mode and the SQL per dialect."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            audience = segments.get_audience(conn, ws, name)
            data = segments.explain(
                conn, ws, audience.definition, now=_now(hub, as_of), dialects=dialect
            )

    def render() -> None:
        console.print(f"[bold]{name}[/]: {data['text']}")
        console.print(f"mode: {data['mode']} ({data['mode_reason']})")
        for d, sql in data["sql"].items():
            console.rule(d)
            console.print(sql, markup=False, highlight=False)

    emit(data, as_json, render)


@audience_app.command("estimate")
def estimate(
    workspace: WorkspaceOpt,
    name: str,
    percent: Annotated[int, typer.Option(min=1, max=100, help="Share of profiles sampled.")] = 5,
    as_of: AsOfOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A fast size estimate from a sample of profiles, with a 95 % interval."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            expr = segments.get_audience(conn, ws, name).definition
        data = segments.estimate(hub, ws, expr, now=_now(hub, as_of), percent=percent)
    emit(
        data,
        as_json,
        lambda: console.print(
            f"about {data['estimate']:,} ({data['low']:,}–{data['high']:,}, {percent} % sample)"
        ),
    )


@audience_app.command("count")
def count(
    workspace: WorkspaceOpt, name: str, as_of: AsOfOpt = None, as_json: JsonOpt = False
) -> None:
    """The exact number of members now (nothing is stored)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            expr = segments.get_audience(conn, ws, name).definition
        found = segments.member_ids(hub, ws, expr, now=_now(hub, as_of))
    emit({"count": len(found)}, as_json, lambda: console.print(f"{len(found):,} members"))


@audience_app.command("overlap")
def overlap(
    workspace: WorkspaceOpt,
    first: str,
    second: str,
    as_of: AsOfOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """How many profiles are in one, the other, or both audiences."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            a = segments.get_audience(conn, ws, first).definition
            b = segments.get_audience(conn, ws, second).definition
        data = segments.overlap(hub, ws, a, b, now=_now(hub, as_of))
    rows = [[k, f"{v:,}"] for k, v in data.items()]
    emit(data, as_json, lambda: console.print(table(f"{first} / {second}", ["", "profiles"], rows)))


@audience_app.command("run")
def run(
    workspace: WorkspaceOpt, name: str, as_of: AsOfOpt = None, as_json: JsonOpt = False
) -> None:
    """Evaluate an audience now and store its membership changes."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        data = segments.run_audience(hub, ws, name, now=_now(hub, as_of), actor=actor())
    emit(
        data,
        as_json,
        lambda: console.print(
            f"{name}: {data['members']:,} members, "
            f"{data['realized']:,} entered, {data['exited']:,} left"
        ),
    )


@audience_app.command("members")
def members(
    workspace: WorkspaceOpt,
    name: str,
    status: Annotated[str, typer.Option(help="realized, exited or all.")] = "realized",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write CSV or Parquet (by suffix).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List or export the stored members of an audience."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            rows = segments.members_of(conn, ws, name, status=status, limit=limit)
    columns = ["profile_id", "status", "realized_at", "exited_at"]
    if output is not None:
        if output.suffix == ".parquet":
            pq.write_table(
                pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in columns}), output
            )
        elif output.suffix == ".csv":
            with output.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        else:
            raise InvalidInput([Issue("--output", "must end in .csv or .parquet")])
        print(f"wrote {len(rows):,} members to {output}", file=sys.stderr)
        return
    emit(
        rows,
        as_json,
        lambda: console.print(table(name, columns, [[r[c] for c in columns] for r in rows])),
    )


@audience_app.command("of")
def of_profile(
    workspace: WorkspaceOpt, namespace: str, value: str, as_json: JsonOpt = False
) -> None:
    """The audiences one profile is or was in, e.g. ``email ann@example.com``."""
    from waymark.profiles import service as profiles

    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            pid = profiles.find_profile_id(conn, ws, profiles.parse_identity(namespace, value))
            items = segments.profile_memberships(conn, ws, pid)
    rows = [[m["audience"], m["status"], m["realized_at"], m["exited_at"]] for m in items]
    emit(
        items,
        as_json,
        lambda: console.print(table(pid, ["audience", "status", "realized", "exited"], rows)),
    )
