"""``waymark template | fragment | rules | suppression | message`` on the embedded default, the
Typer apps invoked directly (the main app adds them under those names)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from waymark.channels.base import DeliveryResult, RecordingProvider
from waymark.cli import main as cli
from waymark.cli.common import cli_state
from waymark.cli.delivery import (
    fragment_app,
    message_app,
    rules_app,
    suppression_app,
    template_app,
)
from waymark.core.errors import Conflict, InvalidInput, NotFound
from waymark.delivery.dispatcher import Dispatcher, DispatchSettings
from waymark.delivery.outbox import Outbox, SendIntent, Source
from waymark.delivery.templates import Channel, RenderFailed
from waymark.hub import Hub
from waymark.settings import load_settings

SCHEMA = Path(__file__).parents[2] / "src/waymark/demo/schema.json"
HELLO = {
    "channel": "email",
    "subject": "Hello {{ profile.first_name }}",
    "text": "Hi {{ profile.first_name }}, about {{ event.properties.order_id }}",
}

Invoke = Callable[..., Any]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def run(data: Path) -> Invoke:
    """Run one of the delivery apps (or the main app, for setup) on ``data``."""
    runner = CliRunner()

    def invoke(app: typer.Typer, *args: str, ok: bool = True) -> Any:
        cli_state.clear()
        if app is cli.app:
            result = runner.invoke(app, ["--data-dir", str(data), *args])
        else:  # what the main app's callback would have set
            cli_state["overrides"] = {"data_dir": data, "database_url": None, "log_level": None}
            cli_state["config"] = None
            result = runner.invoke(app, list(args))
        if ok:
            assert result.exit_code == 0, (result.output, result.exception)
        return result

    return invoke


def _json(result: Any) -> Any:
    return json.loads(result.stdout)


def _shop(run: Invoke, tmp_path: Path) -> None:
    run(cli.app, "workspace", "create", "shop")
    run(cli.app, "schema", "set", "-w", "shop", str(SCHEMA))
    for user in ("ann", "bob"):
        run(
            cli.app,
            "profile",
            "update",
            "-w",
            "shop",
            "user_id",
            user,
            "--set",
            f"first_name={user.title()}",
            "--set",
            f"email={user}@example.com",
            "--consent",
            "email:marketing:opted_in",
            "--create",
        )
    hello = tmp_path / "hello.json"
    hello.write_text(json.dumps(HELLO))
    run(template_app, "save", "-w", "shop", "hello", str(hello))


def _file(tmp_path: Path, name: str, content: Any) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_templates_fragments_and_rules(run: Invoke, tmp_path: Path) -> None:
    _shop(run, tmp_path)
    again = _json(
        run(
            template_app,
            "save",
            "-w",
            "shop",
            "hello",
            _file(tmp_path, "v2.json", {**HELLO, "subject": "Hey {{ profile.first_name }}"}),
            "--json",
        )
    )
    assert again["version"] == 2
    assert "hello" in run(template_app, "list", "-w", "shop").stdout
    assert [t["name"] for t in _json(run(template_app, "list", "-w", "shop", "--json"))] == [
        "hello"
    ]
    assert _json(run(template_app, "show", "-w", "shop", "hello"))["channel"] == "email"
    bad = run(
        template_app,
        "save",
        "-w",
        "shop",
        "bad",
        _file(tmp_path, "bad.json", {"channel": "sms", "text": "{{ profile.frist_name }}"}),
        ok=False,
    )
    assert isinstance(bad.exception, InvalidInput) and "frist_name" in str(bad.exception)
    broken = run(template_app, "save", "-w", "shop", "x", _file(tmp_path, "x.json", "{"), ok=False)
    assert isinstance(broken.exception, InvalidInput) and "malformed JSON" in str(broken.exception)

    context = _file(
        tmp_path, "ctx.json", {"event": {"name": "purchase", "properties": {"order_id": "o-7"}}}
    )
    shown = _json(
        run(
            template_app,
            "preview",
            "-w",
            "shop",
            "hello",
            "--user",
            "ann",
            "--context",
            context,
            "--json",
        )
    )
    assert shown["fields"] == {"subject": "Hey Ann", "text": "Hi Ann, about o-7"}
    table = run(template_app, "preview", "-w", "shop", "hello", "--user", "ann")
    assert "Hey Ann" in table.stdout
    for args, error in (
        (("hello", "--user", "zed"), NotFound),
        (("nope", "--user", "ann"), NotFound),
        (("hello",), InvalidInput),
        (("hello", "--user", "ann", "--profile-id", "p"), InvalidInput),
        (("hello", "--user", "ann", "--context", _file(tmp_path, "l.json", [1])), InvalidInput),
    ):
        failed = run(template_app, "preview", "-w", "shop", *args, ok=False)
        assert isinstance(failed.exception, error), (args, failed.exception)

    run(fragment_app, "save", "-w", "shop", "footer", _file(tmp_path, "f.liquid", "<p>Bye</p>"))
    assert _json(run(fragment_app, "list", "-w", "shop", "--json"))[0]["name"] == "footer"
    assert "<p>Bye</p>" in run(fragment_app, "show", "-w", "shop", "footer").stdout
    run(fragment_app, "delete", "-w", "shop", "footer")
    assert isinstance(
        run(fragment_app, "show", "-w", "shop", "footer", ok=False).exception, InvalidInput
    )

    assert _json(run(rules_app, "show", "-w", "shop"))["version"] == 0
    rules = {"caps": [{"name": "weekly", "limit": 2, "per": "7d"}]}
    saved = _json(run(rules_app, "set", "-w", "shop", _file(tmp_path, "r.json", rules), "--json"))
    assert saved["version"] == 1 and saved["rules"]["caps"][0]["limit"] == 2
    wrong = run(rules_app, "set", "-w", "shop", _file(tmp_path, "w.json", {"caps": 3}), ok=False)
    assert isinstance(wrong.exception, InvalidInput)

    run(template_app, "delete", "-w", "shop", "hello")
    assert isinstance(
        run(template_app, "show", "-w", "shop", "hello", ok=False).exception, NotFound
    )


def test_suppressions(run: Invoke, tmp_path: Path) -> None:
    _shop(run, tmp_path)
    added = run(
        suppression_app, "add", "-w", "shop", "email", "Ann@Example.com", "--reason", "complaint"
    )
    assert "suppressed" in added.stdout
    again = run(suppression_app, "add", "-w", "shop", "email", "ann@example.com")
    assert "already" in again.stdout
    listed = _json(run(suppression_app, "list", "-w", "shop", "--channel", "email", "--json"))
    assert [(s["address"], s["reason"]) for s in listed] == [("ann@example.com", "complaint")]
    assert "ann@example.com" in run(suppression_app, "list", "-w", "shop").stdout
    bad = run(
        suppression_app, "add", "-w", "shop", "email", "x@y.example", "--reason", "bored", ok=False
    )
    assert isinstance(bad.exception, InvalidInput) and "reason" in str(bad.exception)
    run(suppression_app, "remove", "-w", "shop", "email", "ann@example.com")
    gone = run(suppression_app, "remove", "-w", "shop", "email", "ann@example.com", ok=False)
    assert isinstance(gone.exception, InvalidInput)
    assert _json(run(suppression_app, "list", "-w", "shop", "--json")) == []


def _campaign_sends(data: Path, *keys: str, dead: int = 0) -> list[str]:
    """Write campaign messages to ann; the first ``dead`` of them die at their only attempt."""
    hub = Hub.open(load_settings(environ={}, data_dir=data))
    try:
        with hub.engine.connect() as conn:
            from waymark.access.service import get_workspace
            from waymark.model.events import Identity
            from waymark.profiles.service import find_profile_id

            ws = get_workspace(conn, "shop").id
            ann = find_profile_id(conn, ws, Identity("user_id", "ann"))
        intents = [
            SendIntent(
                k,
                ann,
                "hello",
                Source("campaign", "spring:a"),
                context={"event": {"name": "purchase", "properties": {"order_id": k}}},
            )
            for k in keys
        ]
        with hub.tx() as conn:
            ids = [e.message_id for e in Outbox().enqueue(conn, ws, intents, now=hub.clock.now())]
        provider = RecordingProvider(Channel.EMAIL)
        provider.fail_next(*[DeliveryResult.failed("421 busy", transient=True)] * dead)
        settings = DispatchSettings(workers=1, max_attempts=1, breaker_threshold=99)
        dispatcher = Dispatcher(hub, {Channel.EMAIL: lambda: provider}, settings=settings)
        try:
            dispatcher.run_until_idle()
        finally:
            dispatcher.close()
        return ids
    finally:
        hub.close()


def test_messages_test_sends_cancel_and_replay(run: Invoke, data: Path, tmp_path: Path) -> None:
    _shop(run, tmp_path)
    dead_id, sent_id = _campaign_sends(data, "c1", "c2", dead=1)
    context = _file(
        tmp_path, "ctx.json", {"event": {"name": "purchase", "properties": {"order_id": "o-1"}}}
    )
    sent = _json(
        run(
            template_app,
            "test-send",
            "-w",
            "shop",
            "hello",
            "--user",
            "bob",
            "--to",
            "qa@shop.example",
            "--to",
            "ops@shop.example",
            "--context",
            context,
            "--json",
        )
    )
    assert [e["status"] for e in sent] == ["queued", "queued"]
    assert (
        "queued"
        in run(
            template_app,
            "test-send",
            "-w",
            "shop",
            "hello",
            "--user",
            "bob",
            "--to",
            "x@shop.example",
        ).stdout
    )
    failed = run(
        template_app,
        "test-send",
        "-w",
        "shop",
        "nope",
        "--user",
        "bob",
        "--to",
        "a@b.example",
        ok=False,
    )
    assert isinstance(failed.exception, NotFound)
    shown = _json(run(message_app, "show", "-w", "shop", sent[0]["message_id"]))
    assert shown["to"] == "qa@shop.example" and shown["source"]["kind"] == "test"
    assert shown["content"]["fields"]["text"] == "Hi Bob, about o-1"
    assert [h["status"] for h in shown["history"]] == ["queued"]

    queued = _json(run(message_app, "list", "-w", "shop", "--status", "queued", "--json"))
    assert len(queued) == 3
    run(message_app, "cancel", "-w", "shop", sent[0]["message_id"])
    again = run(message_app, "cancel", "-w", "shop", sent[0]["message_id"], ok=False)
    assert isinstance(again.exception, Conflict) and "cancelled" in str(again.exception)
    missing = run(message_app, "show", "-w", "shop", "nope", ok=False)
    assert isinstance(missing.exception, NotFound)

    spring = _json(run(message_app, "list", "-w", "shop", "--campaign", "spring", "--json"))
    assert {m["id"] for m in spring} == {dead_id, sent_id}
    mine = _json(run(message_app, "list", "-w", "shop", "--profile-user", "ann", "--json"))
    assert {m["id"] for m in mine} == {dead_id, sent_id}
    assert _json(run(message_app, "list", "-w", "shop", "--journey", "spring", "--json")) == []
    assert "dead" in run(message_app, "list", "-w", "shop", "--channel", "email").stdout
    for args in (("--status", "lost"), ("--campaign", "a", "--journey", "b")):
        assert isinstance(
            run(message_app, "list", "-w", "shop", *args, ok=False).exception, InvalidInput
        )

    letters = _json(run(message_app, "dead", "-w", "shop", "--json"))
    assert [d["message_id"] for d in letters] == [dead_id]
    assert "421 busy" in run(message_app, "dead", "-w", "shop").stdout
    refused = run(message_app, "replay", "-w", "shop", dead_id, sent_id, ok=False)
    assert isinstance(refused.exception, InvalidInput) and sent_id in str(refused.exception)
    assert isinstance(run(message_app, "replay", "-w", "shop", ok=False).exception, InvalidInput)
    assert isinstance(
        run(message_app, "replay", "-w", "shop", dead_id, "--all", ok=False).exception, InvalidInput
    )
    assert _json(run(message_app, "replay", "-w", "shop", dead_id, "--json")) == {"replayed": 1}
    assert _json(run(message_app, "dead", "-w", "shop", "--pending", "--json")) == []
    assert _json(run(message_app, "replay", "-w", "shop", "--all", "--json")) == {"replayed": 0}
    history = _json(run(message_app, "show", "-w", "shop", dead_id))["history"]
    assert [h["status"] for h in history] == ["queued", "dead", "replayed"]


def test_a_render_failure_is_reported(run: Invoke, tmp_path: Path) -> None:
    _shop(run, tmp_path)
    strict = {**HELLO, "missing": "skip"}
    run(template_app, "save", "-w", "shop", "strict", _file(tmp_path, "s.json", strict))
    failed = run(template_app, "preview", "-w", "shop", "strict", "--user", "ann", ok=False)
    assert isinstance(failed.exception, RenderFailed) and "event" in str(failed.exception)


def test_dispatch_sends_due_messages_to_the_development_sink(
    run: Invoke, data: Path, tmp_path: Path
) -> None:
    from waymark.channels.sink import SinkStore

    _shop(run, tmp_path)
    sent = _json(
        run(
            template_app,
            "test-send",
            "-w",
            "shop",
            "hello",
            "--user",
            "ann",
            "--to",
            "qa@shop.example",
            "--json",
        )
    )
    done = _json(run(message_app, "dispatch", "--json"))
    assert (done["claimed"], done["sent"]) == (1, 1)
    [entry] = SinkStore(data / "sink").list()
    assert "qa@shop.example" in str(entry.to)
    shown = _json(run(message_app, "show", "-w", "shop", sent[0]["message_id"]))
    assert shown["status"] == "sent" and shown["provider"] == "sink-smtp"
    assert "nothing due" in run(message_app, "dispatch").stdout
