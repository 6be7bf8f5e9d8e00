"""``waymark template | fragment | rules | suppression | message``: author templates, set the
delivery rules, keep the suppression list, and inspect, cancel and replay messages.

A profile is named by its ``user_id`` identity (``--user ann``) or its id (``--profile-id``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from sqlalchemy import Connection

from waymark.cli.common import (
    JsonOpt,
    WorkspaceOpt,
    actor,
    console,
    emit,
    opened_hub,
    settings,
    table,
    workspace_id,
)
from waymark.core.errors import InvalidInput, Issue
from waymark.delivery import messages as log
from waymark.delivery import store
from waymark.delivery.outbox import Outbox

template_app = typer.Typer(
    help="Message templates: save, preview, test-send.", no_args_is_help=True
)
fragment_app = typer.Typer(help="Reusable template fragments.", no_args_is_help=True)
rules_app = typer.Typer(
    help="Delivery rules: consent, frequency caps, quiet hours.", no_args_is_help=True
)
suppression_app = typer.Typer(help="Addresses no message may reach.", no_args_is_help=True)
message_app = typer.Typer(
    help="The message log: inspect, cancel, dead letters and replay.", no_args_is_help=True
)

UserOpt = Annotated[
    str | None, typer.Option("--user", help="The profile's user_id identity.", show_default=False)
]
ProfileIdOpt = Annotated[
    str | None, typer.Option("--profile-id", help="The profile's id.", show_default=False)
]
ContextOpt = Annotated[
    Path | None,
    typer.Option(
        "--context", help='A JSON file of render roots, e.g. {"event": {...}}.', show_default=False
    ),
]


def _json_file(path: Path) -> Any:
    """The JSON document in ``path``; :class:`InvalidInput` naming the file otherwise."""
    if not path.is_file():
        raise InvalidInput([Issue(str(path), "no such file")])
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise InvalidInput([Issue(str(path), f"malformed JSON: {exc}")]) from exc


def _text_file(path: Path) -> str:
    if not path.is_file():
        raise InvalidInput([Issue(str(path), "no such file")])
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput([Issue(str(path), f"not UTF-8 text: {exc}")]) from exc


def _profile(conn: Connection, ws: str, user: str | None, profile_id: str | None) -> str:
    """The profile named by ``--user`` or ``--profile-id`` (exactly one)."""
    if (user is None) == (profile_id is None):
        raise InvalidInput([Issue("--user", "give the profile: --user USER_ID or --profile-id ID")])
    ref: object = profile_id if user is None else {"namespace": "user_id", "value": user}
    return log.resolve_profile(conn, ws, ref, "--user" if user is not None else "--profile-id")


def _context(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    document = _json_file(path)
    if not isinstance(document, dict):
        raise InvalidInput([Issue(str(path), "the context is a JSON object of render roots")])
    return document


def _outbox() -> Outbox:
    return Outbox(public_url=settings().public_url)


# -- templates ------------------------------------------------------------------------------------


@template_app.command("save")
def template_save(workspace: WorkspaceOpt, name: str, file: Path, as_json: JsonOpt = False) -> None:
    """Create a template from a JSON file, or replace its definition (a new version)."""
    document = _json_file(file)
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            saved = store.save_template(
                conn, ws, name=name, document=document, actor=actor(), now=hub.clock.now()
            )
    emit(
        saved.to_json(),
        as_json,
        lambda: console.print(
            f"saved {saved.channel.value} template {name!r} version {saved.version}"
        ),
    )


@template_app.command("list")
def template_list(workspace: WorkspaceOpt, as_json: JsonOpt = False) -> None:
    """List the workspace's templates."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            found = store.list_templates(conn, ws)
    rows = [[t.name, t.channel.value, t.version, t.updated_at.isoformat()] for t in found]
    emit(
        [t.to_json() for t in found],
        as_json,
        lambda: console.print(table("templates", ["name", "channel", "version", "updated"], rows)),
    )


@template_app.command("show")
def template_show(workspace: WorkspaceOpt, name: str) -> None:
    """Print one template (JSON)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            emit(store.get_template(conn, ws, name).to_json(), True)


@template_app.command("delete")
def template_delete(workspace: WorkspaceOpt, name: str) -> None:
    """Delete a template (messages already written keep their content)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            store.delete_template(conn, ws, name, actor=actor(), now=hub.clock.now())
    console.print(f"deleted template {name!r}")


@template_app.command("preview")
def template_preview(
    workspace: WorkspaceOpt,
    name: str,
    user: UserOpt = None,
    profile_id: ProfileIdOpt = None,
    context: ContextOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Render a template for a real profile, as its message would be (nothing is sent)."""
    extra = _context(context)
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            pid = _profile(conn, ws, user, profile_id)
            rendered = log.preview(
                conn, ws, template=name, profile_id=pid, context=extra, outbox=_outbox()
            )
    data = log.rendered_json(rendered) or {}

    def render() -> None:
        fields = [[k, v] for k, v in data["fields"].items()]
        fields += [[f"data.{k}", v] for k, v in data["data"].items()]
        console.print(table(f"{name} for {pid}", ["field", "rendered"], fields))

    emit(data, as_json, render)


@template_app.command("test-send")
def template_test_send(
    workspace: WorkspaceOpt,
    name: str,
    to: Annotated[
        list[str], typer.Option("--to", help="A seed address; repeatable.", show_default=False)
    ],
    user: UserOpt = None,
    profile_id: ProfileIdOpt = None,
    context: ContextOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send a template, rendered for a profile, to seed addresses (transactional tests)."""
    extra = _context(context)
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            pid = _profile(conn, ws, user, profile_id)
            sent = log.test_send(
                conn,
                ws,
                template=name,
                profile_id=pid,
                to=to,
                context=extra,
                outbox=_outbox(),
                now=hub.clock.now(),
                actor=actor(),
            )
    rows = [
        [address, e.message_id, e.status, e.decision.get("reason", "")]
        for address, e in zip(to, sent, strict=False)
    ]
    emit(
        [e.to_json() for e in sent],
        as_json,
        lambda: console.print(
            table(f"test send of {name}", ["to", "message", "status", "why"], rows)
        ),
    )


# -- fragments ------------------------------------------------------------------------------------


@fragment_app.command("save")
def fragment_save(workspace: WorkspaceOpt, name: str, file: Path) -> None:
    """Create or replace a fragment from a Liquid file (refused if a template would break)."""
    source = _text_file(file)
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            version = store.save_fragment(
                conn, ws, name=name, source=source, actor=actor(), now=hub.clock.now()
            )
    console.print(f"saved fragment {name!r} version {version}")


@fragment_app.command("list")
def fragment_list(workspace: WorkspaceOpt, as_json: JsonOpt = False) -> None:
    """List the workspace's fragments."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            found = store.list_fragments(conn, ws)
    rows = [[f["name"], f["version"], f["updated_at"], f["updated_by"]] for f in found]
    emit(
        found,
        as_json,
        lambda: console.print(table("fragments", ["name", "version", "updated", "by"], rows)),
    )


@fragment_app.command("show")
def fragment_show(workspace: WorkspaceOpt, name: str) -> None:
    """Print a fragment's source."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            source = store.fragments(conn, ws).get(name)
    if source is None:
        raise InvalidInput([Issue("name", f"no fragment named {name!r} in this workspace")])
    console.print(source, markup=False, highlight=False)


@fragment_app.command("delete")
def fragment_delete(workspace: WorkspaceOpt, name: str) -> None:
    """Delete a fragment (refused while a template needs it)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            store.delete_fragment(conn, ws, name, actor=actor(), now=hub.clock.now())
    console.print(f"deleted fragment {name!r}")


# -- rules ----------------------------------------------------------------------------------------


@rules_app.command("show")
def rules_show(workspace: WorkspaceOpt) -> None:
    """Print the rules in force (JSON; version 0 is the default, before any were saved)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            emit(store.current_rules(conn, ws).to_json(), True)


@rules_app.command("set")
def rules_set(workspace: WorkspaceOpt, file: Path, as_json: JsonOpt = False) -> None:
    """Replace the rules with a JSON file; in force for the next message."""
    document = _json_file(file)
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            saved = store.save_rules(conn, ws, document, actor=actor(), now=hub.clock.now())
    emit(
        saved.to_json(),
        as_json,
        lambda: console.print(f"rules version {saved.version} in force"),
    )


# -- suppressions ---------------------------------------------------------------------------------


@suppression_app.command("add")
def suppression_add(
    workspace: WorkspaceOpt,
    channel: str,
    address: str,
    reason: Annotated[
        str,
        typer.Option(help="hard_bounce, soft_bounce, complaint, unsubscribed, invalid, manual."),
    ] = "manual",
    detail: Annotated[str, typer.Option(help="Why, for people.")] = "",
) -> None:
    """Put an address on the suppression list."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            created = store.suppress(
                conn,
                ws,
                channel=channel,
                address=address,
                reason=reason,
                source=actor(),
                detail=detail,
                now=hub.clock.now(),
            )
    console.print(
        f"suppressed {address} on {channel}" if created else f"{address} was already suppressed"
    )


@suppression_app.command("remove")
def suppression_remove(workspace: WorkspaceOpt, channel: str, address: str) -> None:
    """Take an address off the suppression list (messages may reach it again)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            gone = store.unsuppress(
                conn, ws, channel=channel, address=address, actor=actor(), now=hub.clock.now()
            )
    if not gone:
        raise InvalidInput([Issue("address", f"{address!r} is not on the {channel} list")])
    console.print(f"{address} may receive {channel} messages again")


@suppression_app.command("list")
def suppression_list(
    workspace: WorkspaceOpt,
    channel: Annotated[str | None, typer.Option(help="Only this channel.")] = None,
    after: Annotated[str | None, typer.Option(help="Addresses after this one.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List suppressed addresses, in address order."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            found = store.list_suppressions(conn, ws, channel=channel, after=after, limit=limit)
    rows = [
        [s.channel.value, s.address, s.reason, s.source, s.created_at.isoformat(), s.detail]
        for s in found
    ]
    emit(
        [s.to_json() for s in found],
        as_json,
        lambda: console.print(
            table(
                "suppressions", ["channel", "address", "reason", "source", "since", "detail"], rows
            )
        ),
    )


# -- messages -------------------------------------------------------------------------------------


@message_app.command("list")
def message_list(
    workspace: WorkspaceOpt,
    profile_user: Annotated[
        str | None, typer.Option("--profile-user", help="The recipient's user_id.")
    ] = None,
    status: Annotated[str | None, typer.Option(help="queued, held, sent, dead …")] = None,
    campaign: Annotated[str | None, typer.Option(help="Sent by this campaign.")] = None,
    journey: Annotated[str | None, typer.Option(help="Sent by this journey (any step).")] = None,
    channel: Annotated[str | None, typer.Option(help="email, sms, push, webhook, inbox.")] = None,
    before: Annotated[str | None, typer.Option(help="Older than this message id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The message log, newest first."""
    if campaign is not None and journey is not None:
        raise InvalidInput([Issue("--campaign", "give --campaign or --journey, not both")])
    kind, source = ("campaign", campaign) if campaign is not None else ("journey", journey)
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            pid = _profile(conn, ws, profile_user, None) if profile_user is not None else None
            found = log.message_log(
                conn,
                ws,
                profile_id=pid,
                source_kind=kind if source is not None else None,
                source_id=source,
                status=status,
                channel=channel,
                before=before,
                limit=limit,
            )
    rows = [
        [
            e.id,
            e.created_at.isoformat(timespec="seconds"),
            e.channel,
            e.template_name,
            f"{e.source_kind}:{e.source_id}" if e.source_id else e.source_kind,
            e.to,
            e.status,
            e.reason,
        ]
        for e in found
    ]
    columns = ["id", "created", "channel", "template", "source", "to", "status", "reason"]
    emit(
        [e.to_json() for e in found],
        as_json,
        lambda: console.print(table("messages", columns, rows)),
    )


@message_app.command("show")
def message_show(workspace: WorkspaceOpt, message_id: str) -> None:
    """Print one message with its content and status history (JSON)."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            emit(log.get_message(conn, ws, message_id).to_json(), True)


@message_app.command("cancel")
def message_cancel(workspace: WorkspaceOpt, message_id: str) -> None:
    """Cancel a queued or held message."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            log.cancel(conn, ws, message_id, actor=actor(), now=hub.clock.now())
    console.print(f"cancelled {message_id}")


@message_app.command("dead")
def message_dead(
    workspace: WorkspaceOpt,
    pending: Annotated[bool, typer.Option(help="Only those not replayed yet.")] = False,
    before: Annotated[str | None, typer.Option(help="Older than this message id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List dead letters: messages whose retries ran out."""
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.engine.connect() as conn:
            found = log.list_dead_letters(
                conn, ws, limit=limit, before=before, pending_only=pending
            )
    rows = [
        [
            d.message_id,
            d.failed_at.isoformat(timespec="seconds"),
            d.channel,
            d.provider,
            d.attempts,
            d.last_error,
            d.replayed_at.isoformat(timespec="seconds") if d.replayed_at else "",
        ]
        for d in found
    ]
    columns = ["message", "failed", "channel", "provider", "attempts", "last error", "replayed"]
    emit(
        [d.to_json() for d in found],
        as_json,
        lambda: console.print(table("dead letters", columns, rows)),
    )


@message_app.command("replay")
def message_replay(
    workspace: WorkspaceOpt,
    message_ids: Annotated[
        list[str] | None, typer.Argument(help="Dead messages to queue again.", show_default=False)
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead message.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Queue dead messages again (IDs, or --all)."""
    if all_ == bool(message_ids):
        raise InvalidInput([Issue("ids", "give message ids or --all")])
    with opened_hub() as hub:
        ws = workspace_id(hub, workspace)
        with hub.tx() as conn:
            count = log.replay(
                conn, ws, None if all_ else message_ids, actor=actor(), now=hub.clock.now()
            )
    emit({"replayed": count}, as_json, lambda: console.print(f"replayed {count} messages"))


@message_app.command("dispatch")
def message_dispatch(as_json: JsonOpt = False) -> None:
    """Send every due message now, with the configured providers (what `serve` does in the
    background), then stop. Email to the development sink is kept in the data folder."""
    from waymark.delivery.runtime import DeliveryRuntime

    with opened_hub() as hub:
        runtime = DeliveryRuntime(hub)
        try:
            stats = runtime.dispatcher.run_until_idle(rounds=100_000)
        finally:
            runtime.close()
    data = stats.to_json()
    emit(
        data,
        as_json,
        lambda: console.print(", ".join(f"{k} {v}" for k, v in data.items() if v) or "nothing due"),
    )
