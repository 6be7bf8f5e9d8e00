"""``waymark``: every command has ``--help``; most take ``--json`` for machine-readable output.

Global options choose the stores (``--data-dir``, ``--database-url``) and otherwise come from
``waymark.toml`` and ``WAYMARK_*`` variables (see :mod:`waymark.settings`).
"""

from __future__ import annotations

import dataclasses
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import typer

from waymark.access import service as access
from waymark.cli.audiences import audience_app
from waymark.cli.common import (
    JsonOpt,
    WorkspaceOpt,
    actor,
    cli_state,
    console,
    emit,
    err_console,
    jsonable,
    opened_hub,
    settings,
    table,
    workspace_id,
)
from waymark.cli.delivery import (
    fragment_app,
    message_app,
    rules_app,
    suppression_app,
    template_app,
)
from waymark.core.errors import InvalidInput, Issue, WaymarkError
from waymark.hub import Hub

app = typer.Typer(
    name="waymark",
    help="Waymark: customer-data hub, audiences, journeys and campaigns.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
workspace_app = typer.Typer(help="Create and list workspaces.", no_args_is_help=True)
key_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
user_app = typer.Typer(help="Users with roles, and their API tokens.", no_args_is_help=True)
schema_app = typer.Typer(help="The workspace's attribute and event schemas.", no_args_is_help=True)
import_app = typer.Typer(help="Import CSV, JSON Lines or Parquet files.", no_args_is_help=True)
profile_app = typer.Typer(help="Look up, search and update profiles.", no_args_is_help=True)
privacy_app = typer.Typer(help="Export or delete everything about a person.", no_args_is_help=True)
demo_app = typer.Typer(help="Synthetic shop data and the end-to-end demo.", no_args_is_help=True)
app.add_typer(workspace_app, name="workspace")
app.add_typer(key_app, name="key")
app.add_typer(user_app, name="user")
app.add_typer(schema_app, name="schema")
app.add_typer(import_app, name="import")
app.add_typer(profile_app, name="profile")
app.add_typer(privacy_app, name="privacy")
app.add_typer(demo_app, name="demo")
app.add_typer(audience_app, name="audience")
app.add_typer(template_app, name="template")
app.add_typer(fragment_app, name="fragment")
app.add_typer(rules_app, name="rules")
app.add_typer(suppression_app, name="suppression")
app.add_typer(message_app, name="message")


@app.callback()
def main(
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder of the embedded stores (default ./data).")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="State store URL, e.g. postgresql+psycopg://host/db.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="A waymark.toml file.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
) -> None:
    """Waymark: customer-data hub, audiences, journeys and campaigns."""
    cli_state["overrides"] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "log_level": log_level,
    }
    cli_state["config"] = config


# -- server -----------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
) -> None:
    """Run the API and the background workers in one process."""
    import uvicorn

    from waymark.api.app import create_app

    s = settings()
    hub = Hub.open(s)
    _ = hub.events  # take the event log now: fail fast if another process holds it
    console.print(
        f"Waymark API on http://{host or s.host}:{port or s.port}  "
        f"(state: {s.state_url}, events: {s.events_url})"
    )
    try:
        uvicorn.run(
            create_app(hub),
            host=host or s.host,
            port=port or s.port,
            log_level=s.log_level,
            access_log=False,
        )
    finally:
        hub.close()


@app.command()
def migrate() -> None:
    """Bring the state store's schema to the newest version."""
    with opened_hub():
        console.print("state store is up to date")


@app.command()
def flush(as_json: JsonOpt = False) -> None:
    """Move acknowledged events from the inbox to the event log now."""
    from waymark.workers import flush_once

    with opened_hub() as hub:
        moved = flush_once(hub)
    emit({"moved": moved}, as_json, lambda: console.print(f"moved {moved} events to the log"))


@app.command()
def audit(workspace: WorkspaceOpt, limit: int = 50, as_json: JsonOpt = False) -> None:
    """Show the newest entries of the workspace's audit log."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            entries = access.list_audit(conn, ws, limit=limit)
    emit(
        entries,
        as_json,
        lambda: console.print(
            table(
                "audit log",
                ["at", "actor", "action", "target"],
                [
                    [e["at"], e["actor"], e["action"], f"{e['target_type']}:{e['target_id']}"]
                    for e in entries
                ],
            )
        ),
    )


# -- workspaces, keys, users ------------------------------------------------------------------


@workspace_app.command("create")
def workspace_create(name: str, as_json: JsonOpt = False) -> None:
    """Create a workspace; prints its write key and an admin key (shown only now)."""
    with opened_hub() as hub, hub.tx() as conn:
        ws, write, admin = access.create_workspace(
            conn, name=name, actor=actor(), at=hub.clock.now()
        )
    data = {"id": ws.id, "name": ws.name, "write_key": write.secret, "admin_key": admin.secret}

    def render() -> None:
        console.print(f"workspace [bold]{ws.name}[/] ({ws.id})")
        console.print(f"write key (public, ingestion only): [green]{write.secret}[/]")
        console.print(f"admin key (secret): [yellow]{admin.secret}[/]")
        console.print("[dim]keys are stored hashed and cannot be shown again[/]")

    emit(data, as_json, render)


@workspace_app.command("list")
def workspace_list(as_json: JsonOpt = False) -> None:
    """List workspaces."""
    with opened_hub() as hub, hub.engine.connect() as conn:
        items = access.list_workspaces(conn)
    data = [{"id": w.id, "name": w.name, "created_at": w.created_at} for w in items]
    emit(
        data,
        as_json,
        lambda: console.print(
            table(
                "workspaces",
                ["name", "id", "created"],
                [[w.name, w.id, w.created_at.isoformat()] for w in items],
            )
        ),
    )


@key_app.command("create")
def key_create(
    workspace: WorkspaceOpt,
    scope: Annotated[list[str], typer.Option(help="admin, read, write or ingest; repeatable.")],
    kind: Annotated[str, typer.Option(help="secret, or write (public, ingest only).")] = "secret",
    name: str = "",
    as_json: JsonOpt = False,
) -> None:
    """Create an API key (shown once)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            key = access.create_key(
                conn,
                workspace_id=ws,
                kind=kind,
                scopes=scope,
                name=name,
                actor=actor(),
                at=hub.clock.now(),
            )
    emit(
        {"id": key.id, "kind": key.kind, "key": key.secret, "scopes": key.scopes},
        as_json,
        lambda: console.print(
            f"{key.kind} key {key.id}: [yellow]{key.secret}[/] scopes={','.join(key.scopes)}"
        ),
    )


@key_app.command("list")
def key_list(workspace: WorkspaceOpt, as_json: JsonOpt = False) -> None:
    """List keys (never their secrets)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            keys = access.list_keys(conn, ws)
    emit(
        keys,
        as_json,
        lambda: console.print(
            table(
                "keys",
                ["id", "kind", "name", "prefix", "scopes", "revoked"],
                [
                    [
                        k["id"],
                        k["kind"],
                        k["name"],
                        k["prefix"] + "…",
                        ",".join(k["scopes"]),
                        k["revoked_at"],
                    ]
                    for k in keys
                ],
            )
        ),
    )


@key_app.command("revoke")
def key_revoke(workspace: WorkspaceOpt, key_id: str) -> None:
    """Revoke a key."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            access.revoke_key(
                conn, workspace_id=ws, key_id=key_id, actor=actor(), at=hub.clock.now()
            )
    console.print(f"revoked {key_id}")


@user_app.command("create")
def user_create(
    workspace: WorkspaceOpt,
    email: str,
    role: Annotated[str, typer.Option(help="admin, marketer, approver or viewer.")],
    name: str = "",
    as_json: JsonOpt = False,
) -> None:
    """Add a user and print their first API token (shown once)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            user, token = access.create_user(
                conn,
                workspace_id=ws,
                email=email,
                role=role,
                name=name,
                actor=actor(),
                at=hub.clock.now(),
            )
    emit(
        {"user": user, "token": token.secret},
        as_json,
        lambda: console.print(
            f"user {user['email']} ({user['role']}): token [yellow]{token.secret}[/]"
        ),
    )


@user_app.command("list")
def user_list(workspace: WorkspaceOpt, as_json: JsonOpt = False) -> None:
    """List users and their roles."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            users = access.list_users(conn, ws)
    emit(
        users,
        as_json,
        lambda: console.print(
            table(
                "users", ["email", "role", "id"], [[u["email"], u["role"], u["id"]] for u in users]
            )
        ),
    )


# -- schema -----------------------------------------------------------------------------------


@schema_app.command("set")
def schema_set(
    workspace: WorkspaceOpt,
    file: Annotated[Path, typer.Argument(help="A JSON schema document.", exists=True)],
    as_json: JsonOpt = False,
) -> None:
    """Save a new version of the workspace schema from a JSON file."""
    from waymark.profiles.schema_store import save_schema
    from waymark.segmentation.live import decide_modes

    try:
        document = orjson.loads(file.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise InvalidInput([Issue(str(file), f"malformed JSON: {exc}")]) from exc
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            saved = save_schema(
                conn, workspace_id=ws, document=document, actor=actor(), at=hub.clock.now()
            )
            decide_modes(conn, ws)  # what can be streamed may change with the schema

    def render() -> None:
        console.print(f"saved schema version {saved.version}")
        for w in saved.warnings:
            console.print(f"[yellow]breaking change:[/] {w}")

    emit(saved.to_json(), as_json, render)


@schema_app.command("show")
def schema_show(workspace: WorkspaceOpt) -> None:
    """Print the schema in force (JSON)."""
    from waymark.profiles.schema_store import current_schema

    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            emit(current_schema(conn, ws).to_json(), True)


# -- imports ----------------------------------------------------------------------------------


def _import(
    kind: Literal["profiles", "events"],
    workspace: str,
    file: Path,
    fmt: str | None,
    mapping: list[str],
    encoding: str,
    as_json: bool,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from waymark.ingestion.files import run_import

    pairs: dict[str, str] = {}
    for item in mapping:
        source, sep, target = item.partition("=")
        if not sep:
            raise InvalidInput([Issue("--map", f"write COLUMN=TARGET, got {item!r}")])
        pairs[source] = target
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            disable=as_json,
        ) as bar:
            task = bar.add_task(f"importing {kind}", total=None)

            def progress(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total)

            report = run_import(
                hub,
                workspace_id=ws,
                kind=kind,
                path=file,
                actor=actor(),
                fmt=fmt,
                mapping=pairs or None,
                encoding=encoding,
                progress=progress,
            )
    data = report.to_json()

    def render() -> None:
        console.print(
            table(
                f"import of {file.name}",
                ["", ""],
                [[k, v] for k, v in data.items() if not isinstance(v, dict | list)],
            )
        )

    emit(data, as_json, render)
    if data.get("rows_rejected"):
        err_console.print(f"[yellow]rejected rows are listed in {data.get('error_report')}[/]")


FormatOpt = Annotated[str | None, typer.Option("--format", help="csv, jsonl or parquet.")]
MapOpt = Annotated[
    list[str],
    typer.Option(
        "--map", help="COLUMN=TARGET, e.g. mail=identity:email, ltv=attribute:lifetime_value."
    ),
]
EncodingOpt = Annotated[str, typer.Option(help="Text encoding of CSV/JSON Lines files.")]


@import_app.command("profiles")
def import_profiles(
    workspace: WorkspaceOpt,
    file: Annotated[Path, typer.Argument(exists=True)],
    fmt: FormatOpt = None,
    mapping: MapOpt = [],  # noqa: B006
    encoding: EncodingOpt = "utf-8",
    as_json: JsonOpt = False,
) -> None:
    """Import profiles (identities, attributes, consents) from a file."""
    _import("profiles", workspace, file, fmt, mapping, encoding, as_json)


@import_app.command("events")
def import_events(
    workspace: WorkspaceOpt,
    file: Annotated[Path, typer.Argument(exists=True)],
    fmt: FormatOpt = None,
    mapping: MapOpt = [],  # noqa: B006
    encoding: EncodingOpt = "utf-8",
    as_json: JsonOpt = False,
) -> None:
    """Import events from a file."""
    _import("events", workspace, file, fmt, mapping, encoding, as_json)


# -- profiles ---------------------------------------------------------------------------------


@profile_app.command("show")
def profile_show(
    workspace: WorkspaceOpt,
    namespace: str,
    value: str,
    events: Annotated[int, typer.Option(help="How many recent events to show.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Show the profile holding an identity, e.g. ``email ann@example.com``."""
    from waymark.profiles import service as profiles

    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            view = profiles.lookup(conn, ws, namespace, value)
            recent = profiles.timeline(conn, hub.events, ws, view["id"], limit=events)
    view["events"] = recent

    def render() -> None:
        console.print(
            f"[bold]profile {view['id']}[/]  first seen {view['system']['first_seen']}"
            f"  last seen {view['system']['last_seen']}"
        )
        console.print(
            table(
                "identities",
                ["namespace", "value"],
                [[i["namespace"], i["value"]] for i in view["identities"]],
            )
        )
        console.print(
            table(
                "attributes",
                ["name", "value"],
                [[k, v] for k, v in sorted(view["attributes"].items())],
            )
        )
        console.print(
            table(
                "consents",
                ["channel", "purpose", "status", "updated"],
                [
                    [c["channel"], c["purpose"], c["status"], c["updated_at"]]
                    for c in view["consents"]
                ],
            )
        )
        console.print(
            table(
                "recent events",
                ["timestamp", "type", "name"],
                [[e["timestamp"], e["type"], e["name"]] for e in recent],
            )
        )

    emit(view, as_json, render)


@profile_app.command("search")
def profile_search(
    workspace: WorkspaceOpt,
    q: Annotated[list[str], typer.Option("-q", help="Filter like country=DE or ltv>100.")],
    limit: int = 20,
    as_json: JsonOpt = False,
) -> None:
    """Find profiles whose attributes match every filter."""
    from waymark.profiles import service as profiles

    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            found = profiles.search(conn, ws, q, limit=limit)
    emit(
        found,
        as_json,
        lambda: console.print(
            table(
                "profiles",
                ["id", "identities", "attributes"],
                [
                    [
                        p["id"],
                        " ".join(f"{i['namespace']}:{i['value']}" for i in p["identities"]),
                        orjson.dumps(p["attributes"]).decode()[:80],
                    ]
                    for p in found["profiles"]
                ],
            )
        ),
    )


@profile_app.command("update")
def profile_update(
    workspace: WorkspaceOpt,
    namespace: str,
    value: str,
    set_: Annotated[
        list[str], typer.Option("--set", help="name=JSON value, e.g. plan='\"pro\"'.")
    ] = [],  # noqa: B006
    consent: Annotated[
        list[str], typer.Option(help="channel:purpose:status, e.g. email:marketing:opted_out.")
    ] = [],  # noqa: B006
    create: Annotated[bool, typer.Option(help="Create the profile if it does not exist.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set attributes and consents on a profile."""
    from waymark.ingestion.pipeline import policy_of
    from waymark.profiles import service as profiles
    from waymark.profiles.schema_store import current_schema

    attrs: dict[str, Any] = {}
    for item in set_:
        name, sep, raw = item.partition("=")
        if not sep:
            raise InvalidInput([Issue("--set", f"write name=value, got {item!r}")])
        try:
            attrs[name] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            attrs[name] = raw
    consents: list[dict[str, str]] = []
    for item in consent:
        parts = item.split(":")
        if len(parts) != 3:
            raise InvalidInput([Issue("--consent", f"write channel:purpose:status, got {item!r}")])
        consents.append({"channel": parts[0], "purpose": parts[1], "status": parts[2]})
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        now = hub.clock.now()
        with hub.tx() as conn:
            view = profiles.update_profile(
                conn,
                workspace_id=ws,
                identity=profiles.parse_identity(namespace, value),
                attributes=attrs,
                consent_updates=profiles.parse_consents(consents, now=now, source=actor()),
                schema=current_schema(conn, ws).schema,
                policy=policy_of(hub),
                actor=actor(),
                now=now,
                create=create,
                shared_event_log=hub.settings.shared_event_log,
            )
    emit(view, True)  # a profile reads best as JSON; --json is accepted for symmetry
    _ = as_json


# -- privacy ----------------------------------------------------------------------------------


@privacy_app.command("export")
def privacy_export(
    workspace: WorkspaceOpt,
    namespace: str,
    value: str,
    out: Annotated[Path | None, typer.Option(help="Write the JSON here instead of stdout.")] = None,
) -> None:
    """Export everything held about a person (JSON)."""
    from waymark.profiles import service as profiles

    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            data = profiles.export_person(
                conn,
                hub.events,
                workspace_id=ws,
                identity=profiles.parse_identity(namespace, value),
                actor=actor(),
                now=hub.clock.now(),
            )
    if out:
        out.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        console.print(f"wrote {out} ({len(data['events'])} events)")
    else:
        emit(data, True)


@privacy_app.command("delete")
def privacy_delete(
    workspace: WorkspaceOpt,
    namespace: str,
    value: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a person: profile, identities, consents and events, in every store."""
    from waymark.privacy import delete_person
    from waymark.profiles import service as profiles

    identity = profiles.parse_identity(namespace, value)
    if not yes and not typer.confirm(f"Delete everything about {identity}?"):
        raise typer.Exit(1)
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        record = delete_person(hub, workspace_id=ws, identity=identity, actor=actor())
    emit(
        record,
        as_json,
        lambda: console.print(
            f"deleted; request {record['id']} {record['status']}: {record['summary']}"
        ),
    )


# -- demo -------------------------------------------------------------------------------------


@demo_app.command("generate")
def demo_generate(
    out: Annotated[Path, typer.Option(help="Folder for the files.")] = Path("demo-data/dataset"),
    profiles: Annotated[int, typer.Option(help="Number of customers (1,000 to 1,000,000).")] = 1000,
    seed: int = 7,
    days: int = 180,
    fmt: Annotated[str, typer.Option("--format", help="parquet, csv or jsonl.")] = "parquet",
    sessions: Annotated[
        float,
        typer.Option(help="Scale of everyone's sessions: 1.0 makes about 15 events a customer."),
    ] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Write a seeded synthetic online-shop dataset (profiles, events, schema)."""
    from datetime import UTC

    from rich.progress import Progress

    from waymark.demo.generate import generate

    if not 1000 <= profiles <= 1_000_000:
        raise InvalidInput([Issue("--profiles", "choose between 1,000 and 1,000,000")])
    if not 0.1 <= sessions <= 10.0:
        raise InvalidInput([Issue("--sessions", "choose between 0.1 and 10")])
    with Progress(console=err_console, disable=as_json) as bar:
        task = bar.add_task("generating", total=profiles)
        summary = generate(
            out,
            profiles=profiles,
            seed=seed,
            end=datetime.now(UTC),
            days=days,
            fmt=fmt,  # type: ignore[arg-type]
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            sessions=sessions,
        )
    emit(
        jsonable(dataclasses.asdict(summary)),
        as_json,
        lambda: console.print(f"wrote {out}: {summary}"),
    )


@demo_app.command("run")
def demo_run(
    folder: Annotated[Path, typer.Option(help="Where the demo keeps its data.")] = Path(
        "demo-data"
    ),
    profiles: Annotated[int, typer.Option(help="Number of customers to generate.")] = 2000,
) -> None:
    """Run the embedded end-to-end demo: generate, import, stream, look up, privacy."""
    from waymark.demo.run import run_demo

    run_demo(folder, profiles=profiles, console=console)


def run() -> None:
    """Entry point that turns Waymark errors into one clear line and exit code 2."""
    try:
        app()
    except WaymarkError as exc:
        err_console.print(f"[red]error:[/] {exc.message}")
        if isinstance(exc, InvalidInput):
            for issue in exc.issues:
                err_console.print(f"  {issue.path or '<input>'}: {issue.reason}")
        sys.exit(2)


if __name__ == "__main__":
    run()
