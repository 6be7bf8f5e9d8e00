"""The delivery endpoints over HTTP, on both backends: templates, fragments, rules,
suppressions, sends, the message log, dead letters, and a profile's inbox and push
subscriptions."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.api.conftest import Api
from tests.delivery.test_messages import subscription_json
from waymark.access import service as access
from waymark.access.service import Principal, Scope
from waymark.api.app import create_app
from waymark.api.auth import KeyCache, presented_key
from waymark.api.delivery import add_delivery_routes
from waymark.channels.base import DeliveryResult, RecordingProvider
from waymark.delivery import store
from waymark.delivery.dispatcher import Dispatcher, DispatchSettings
from waymark.delivery.outbox import Outbox
from waymark.delivery.templates import Channel
from waymark.hub import Hub
from waymark.ingestion.pipeline import Ingestor
from waymark.profiles.schema_store import save_schema
from waymark.settings import load_settings

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "src/waymark/demo/schema.json").read_text(encoding="utf-8")
)
OUTBOX = Outbox(public_url="https://hub.example")
HELLO = {
    "channel": "email",
    "subject": "Hello {{ profile.first_name }}",
    "html": "<p>Hi {{ profile.first_name }}</p>",
}
ORDER = {
    "channel": "email",
    "event_type": "purchase",
    "missing": "skip",
    "subject": "Order {{ event.properties.order_id }}",
    "text": "Thanks, {{ profile.first_name }}",
}
CARD = {"channel": "inbox", "title": "New", "body": "For {{ profile.first_name }}"}


def with_delivery(app: FastAPI, hub: Hub) -> FastAPI:
    """``app`` with the delivery routes, added here until the app adds them itself."""
    if any(getattr(r, "path", "") == "/v1/templates" for r in app.routes):
        return app
    keys = KeyCache(hub)

    def principal(request: Request, scope: Scope) -> Principal:
        p = keys.resolve(presented_key(request))
        p.require(scope)
        return p

    add_delivery_routes(app, hub, principal, OUTBOX)
    return app


@pytest.fixture
def dapi(hub: Hub) -> Iterator[Api]:
    with hub.tx() as conn:
        ws, write, admin = access.create_workspace(conn, name="shop", actor="t", at=hub.clock.now())
    app = with_delivery(create_app(hub, background=False), hub)
    with TestClient(app) as client:
        api = Api(client, hub, ws.id, write.secret, admin.secret)
        _seed(api)
        yield api


def _seed(api: Api) -> None:
    h = api.bearer()
    assert api.client.put("/v1/schema", json=SCHEMA, headers=h).status_code == 200
    now = api.hub.clock.now().isoformat()
    people = {
        "ann": ("ann@example.com", "opted_in"),
        "bob": ("bob@example.com", "opted_out"),
    }
    records = [
        {
            "identities": {"user_id": user},
            "attributes": {"first_name": user.title(), "email": email},
            "consents": [
                {"channel": "email", "purpose": "marketing", "status": consent, "timestamp": now}
            ],
            "timestamp": now,
        }
        for user, (email, consent) in people.items()
    ]
    r = api.client.post("/v1/profiles", json={"profiles": records}, headers=h)
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
    for name, document in (("hello", HELLO), ("order", ORDER), ("card", CARD)):
        r = api.client.put(f"/v1/templates/{name}", json=document, headers=h)
        assert r.status_code == 201, r.text


def _key(api: Api, *scopes: str) -> str:
    with api.hub.tx() as conn:
        key = access.create_key(
            conn,
            workspace_id=api.workspace_id,
            kind="secret",
            scopes=list(scopes),
            actor="t",
            at=api.hub.clock.now(),
        )
    return key.secret


def _errors(r: Any) -> list[str]:
    return [e["path"] for e in r.json()["error"]["errors"]]


def _profile_id(api: Api, user: str) -> str:
    r = api.client.get(f"/v1/profiles/user_id/{user}", headers=api.bearer())
    return str(r.json()["id"])


def _dispatch(api: Api, provider: Any = None, **kw: Any) -> Any:
    factories = {Channel.EMAIL: lambda: provider} if provider is not None else {}
    settings = DispatchSettings(workers=1, breaker_threshold=99, **kw)
    dispatcher = Dispatcher(api.hub, factories, outbox=OUTBOX, settings=settings, draw=lambda: 0.0)
    try:
        return dispatcher.run_until_idle()
    finally:
        dispatcher.close()


def test_templates_fragments_rules_and_previews(dapi: Api) -> None:
    c, h = dapi.client, dapi.bearer()
    again = c.put("/v1/templates/hello", json={**HELLO, "subject": "Yo"}, headers=h)
    assert again.status_code == 200 and again.json()["version"] == 2
    names = [t["name"] for t in c.get("/v1/templates", headers=h).json()["templates"]]
    assert names == ["card", "hello", "order"]
    assert c.get("/v1/templates/hello", headers=h).json()["definition"]["subject"] == "Yo"
    bad = c.put("/v1/templates/x", json={"channel": "sms", "txt": "hi"}, headers=h)
    assert bad.status_code == 400 and "txt" in _errors(bad)

    # an unsaved document: checked, and previewed for a profile when one is named
    r = c.post(
        "/v1/templates/validate",
        json={"definition": {"channel": "sms", "text": "Hi {{ profile.first_name }}"}},
        headers=h,
    )
    assert r.status_code == 200 and r.json()["references"] == ["profile.first_name"]
    r = c.post(
        "/v1/templates/validate",
        json={
            "definition": {"channel": "sms", "text": "Hi {{ profile.first_name }}"},
            "profile": {"namespace": "user_id", "value": "ann"},
        },
        headers=h,
    )
    assert r.json()["preview"]["fields"] == {"text": "Hi Ann"}
    r = c.post(
        "/v1/templates/validate",
        json={"definition": {"channel": "sms", "text": "{{ profile.frist_name }}"}},
        headers=h,
    )
    assert r.status_code == 400 and "frist_name" in r.text and _errors(r) == ["text"]
    assert c.post("/v1/templates/validate", json={}, headers=h).status_code == 400

    # a saved template for a real profile, by identity or by id
    ann = {"namespace": "user_id", "value": "ann"}
    r = c.post("/v1/templates/hello/preview", json={"profile": ann}, headers=h)
    assert r.status_code == 200 and r.json()["fields"]["subject"] == "Yo"
    assert "Hi Ann" in r.json()["fields"]["html"]
    by_id = c.post(
        "/v1/templates/hello/preview", json={"profile": _profile_id(dapi, "ann")}, headers=h
    )
    assert by_id.json()["fields"] == r.json()["fields"]
    event = {"name": "purchase", "properties": {"order_id": "o-7"}}
    r = c.post(
        "/v1/templates/order/preview", json={"profile": ann, "context": {"event": event}}, headers=h
    )
    assert r.json()["fields"]["subject"] == "Order o-7"
    missing = c.post("/v1/templates/order/preview", json={"profile": ann}, headers=h)
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "render_failed"
    assert missing.json()["error"]["errors"][0]["path"] in {"subject", "text"}
    for body, status, needle in (
        ({"profile": ann}, 404, "nope"),  # the template
        ({"profile": {"namespace": "user_id", "value": "zed"}}, 404, "zed"),
        ({"profile": {"namespace": "user_id"}}, 400, "profile.value"),
        ({"profile": 7}, 400, "profile"),
        ({"profile": ann, "context": {"profile": {}}}, 400, "outbox sets"),
        ({"profile": ann, "context": []}, 400, "context"),
        ({"profile": ann, "colour": "red"}, 400, "colour"),
    ):
        name = "nope" if needle == "nope" else "hello"
        r = c.post(f"/v1/templates/{name}/preview", json=body, headers=h)
        assert (r.status_code, needle in r.text) == (status, True), (body, r.text)

    # fragments
    r = c.put("/v1/fragments/footer", json={"source": "<p>{{ url }}</p>"}, headers=h)
    assert r.status_code == 201 and r.json() == {"name": "footer", "version": 1}
    r = c.put("/v1/fragments/footer", json={"source": "<p>Bye {{ url }}</p>"}, headers=h)
    assert r.json()["version"] == 2
    assert c.get("/v1/fragments/footer", headers=h).json()["source"] == "<p>Bye {{ url }}</p>"
    assert [f["name"] for f in c.get("/v1/fragments", headers=h).json()["fragments"]] == ["footer"]
    assert c.put("/v1/fragments/x", json={"source": 5}, headers=h).status_code == 400
    assert c.delete("/v1/fragments/footer", headers=h).status_code == 204
    assert c.get("/v1/fragments/footer", headers=h).status_code == 404

    # rules: read for anyone who reads, changed by admins only
    assert c.get("/v1/delivery/rules", headers=h).json()["version"] == 0
    writer = dapi.bearer(_key(dapi, "read", "write"))
    rules = {"caps": [{"name": "weekly", "limit": 3, "per": "7d"}]}
    assert c.put("/v1/delivery/rules", json=rules, headers=writer).status_code == 403
    r = c.put("/v1/delivery/rules", json=rules, headers=h)
    assert r.status_code == 200 and r.json()["version"] == 1
    bad = c.put("/v1/delivery/rules", json={"caps": [{"limit": -1}]}, headers=h)
    assert bad.status_code == 400 and any(p.startswith("caps[0]") for p in _errors(bad))
    assert c.get("/v1/delivery/rules", headers=writer).json()["rules"]["caps"][0]["limit"] == 3

    reader = dapi.bearer(_key(dapi, "read"))
    assert c.put("/v1/templates/x", json=HELLO, headers=reader).status_code == 403
    assert c.get("/v1/templates", headers=dapi.basic()).status_code == 403  # the write key
    assert c.delete("/v1/templates/hello", headers=h).status_code == 204
    assert c.get("/v1/templates/hello", headers=h).status_code == 404
    assert c.delete("/v1/templates/hello", headers=h).status_code == 404


def test_sends_the_log_and_cancelling(dapi: Api) -> None:
    c, h = dapi.client, dapi.bearer()
    ann_id = _profile_id(dapi, "ann")
    receipts = [
        {
            "key": "receipt:o-1",
            "profile": {"namespace": "user_id", "value": "bob"},  # opted out: still a receipt
            "template": "order",
            "purpose": "orders",
            "transactional": True,
            "context": {"event": {"name": "purchase", "properties": {"order_id": "o-1"}}},
        },
        {"key": "news:1", "profile": ann_id, "template": "hello"},
        {"key": "news:2", "profile": {"namespace": "user_id", "value": "bob"}, "template": "hello"},
    ]
    r = c.post("/v1/messages", json={"messages": receipts}, headers=h)
    assert r.status_code == 200, r.text
    sent = r.json()["messages"]
    assert [m["status"] for m in sent] == ["queued", "queued", "excluded"]
    assert sent[2]["decision"]["reason"] == "no_consent"
    again = c.post("/v1/messages", json={"messages": receipts[:1]}, headers=h).json()["messages"]
    assert again[0]["duplicate"] and again[0]["message_id"] == sent[0]["message_id"]

    for body, paths in (
        ({"messages": []}, ["messages"]),
        ({"messages": "x"}, ["messages"]),
        ({"messages": [], "extra": 1}, ["extra"]),
        ({"messages": [5]}, ["messages[0]"]),
        (
            {"messages": [{"key": 1, "profile": ann_id, "template": "hello", "colour": "red"}]},
            ["messages[0].colour", "messages[0].key"],
        ),
        (
            {"messages": [{"key": "k", "profile": {"namespace": "user_id"}, "template": "hello"}]},
            ["messages[0].profile.value"],
        ),
        (
            {
                "messages": [
                    {"key": "k1", "profile": ann_id, "template": "hello"},
                    {"key": "k2", "profile": "nobody", "template": "hello"},
                ]
            },
            ["messages[1].profile"],
        ),
        (
            {"messages": [{"key": "k", "profile": ann_id, "template": "nope"}]},
            ["messages[0].template"],
        ),
        (
            {
                "messages": [
                    {"key": "k", "profile": ann_id, "template": "hello", "transactional": 1}
                ]
            },
            ["messages[0].transactional"],
        ),
        (
            {
                "messages": [
                    {"key": "k", "profile": ann_id, "template": "hello", "context": {"message": 1}}
                ]
            },
            ["messages[0].context"],
        ),
    ):
        r = c.post("/v1/messages", json=body, headers=h)
        assert r.status_code == 400 and _errors(r) == paths, (body, r.text)
    assert c.get("/v1/messages?limit=50", headers=h).json()["messages"][0]["key"] != "k1"

    listed = c.get("/v1/messages", headers=h).json()
    assert len(listed["messages"]) == 3 and listed["next"] is None
    page = c.get("/v1/messages?limit=2", headers=h).json()
    rest = c.get(f"/v1/messages?limit=2&before={page['next']}", headers=h).json()
    assert [m["id"] for m in page["messages"] + rest["messages"]] == [
        m["id"] for m in listed["messages"]
    ]
    by_identity = c.get("/v1/messages?profile=user_id:bob", headers=h).json()["messages"]
    assert {m["key"] for m in by_identity} == {"receipt:o-1", "news:2"}
    queued = c.get(f"/v1/messages?status=queued&profile_id={ann_id}", headers=h).json()
    assert [m["key"] for m in queued["messages"]] == ["news:1"]
    api_sent = c.get("/v1/messages?source_kind=api&channel=email", headers=h).json()["messages"]
    assert len(api_sent) == 3 and all(m["source"]["id"].startswith("key:") for m in api_sent)
    for query, path in (
        ("status=lost", "status"),
        ("profile=bob", "profile"),
        ("limit=0", "query.limit"),
    ):
        r = c.get(f"/v1/messages?{query}", headers=h)
        assert r.status_code == 400 and _errors(r) == [path], r.text
    assert c.get("/v1/messages?profile=user_id:zed", headers=h).status_code == 404

    receipt = c.get(f"/v1/messages/{sent[0]['message_id']}", headers=h).json()
    assert receipt["content"]["fields"]["subject"] == "Order o-1"
    assert receipt["to"] == "bob@example.com" and receipt["purpose"] == "orders"
    assert [e["status"] for e in receipt["history"]] == ["queued"]

    news = sent[1]["message_id"]
    r = c.post(f"/v1/messages/{news}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    again_cancel = c.post(f"/v1/messages/{news}/cancel", headers=h)
    assert again_cancel.status_code == 409 and "cancelled" in again_cancel.text
    assert _dispatch(dapi, RecordingProvider(Channel.EMAIL)).sent == 1
    late = c.post(f"/v1/messages/{sent[0]['message_id']}/cancel", headers=h)
    assert late.status_code == 409 and "is sent" in late.text
    assert c.post("/v1/messages/nope/cancel", headers=h).status_code == 404
    assert c.get("/v1/messages/nope", headers=h).status_code == 404

    # another workspace sees none of it
    with dapi.hub.tx() as conn:
        _ws, _w, other = access.create_workspace(
            conn, name="other", actor="t", at=dapi.hub.clock.now()
        )
    theirs = dapi.bearer(other.secret)
    assert c.get("/v1/messages", headers=theirs).json()["messages"] == []
    assert c.get(f"/v1/messages/{news}", headers=theirs).status_code == 404
    assert c.post(f"/v1/messages/{news}/cancel", headers=theirs).status_code == 404
    assert c.get("/v1/profiles/user_id/ann/inbox", headers=theirs).status_code == 404
    reader = dapi.bearer(_key(dapi, "read"))
    assert c.post("/v1/messages", json={"messages": receipts}, headers=reader).status_code == 403


def test_test_sends(dapi: Api) -> None:
    c, h = dapi.client, dapi.bearer()
    body = {"profile": {"namespace": "user_id", "value": "bob"}, "to": ["qa@shop.example"]}
    r = c.post("/v1/templates/hello/test-send", json=body, headers=h)
    assert r.status_code == 200, r.text
    [sent] = r.json()["messages"]
    assert sent["status"] == "queued" and sent["key"].startswith("test:")
    found = c.get(f"/v1/messages/{sent['message_id']}", headers=h).json()
    assert (found["to"], found["source"]["kind"], found["transactional"]) == (
        "qa@shop.example",
        "test",
        True,
    )
    assert c.post("/v1/templates/nope/test-send", json=body, headers=h).status_code == 404
    for bad, path in (({**body, "to": []}, "to"), ({**body, "to": "a@b"}, "to")):
        r = c.post("/v1/templates/hello/test-send", json=bad, headers=h)
        assert r.status_code == 400 and _errors(r) == [path]
    assert (
        c.post("/v1/templates/hello/test-send", json=body, headers=dapi.bearer(_key(dapi, "read")))
    ).status_code == 403


def test_dead_letters_and_replay(dapi: Api) -> None:
    c, h = dapi.client, dapi.bearer()
    ann = {"namespace": "user_id", "value": "ann"}
    intents = [{"key": f"n{i}", "profile": ann, "template": "hello"} for i in range(3)]
    sent = c.post("/v1/messages", json={"messages": intents}, headers=h).json()["messages"]
    provider = RecordingProvider(Channel.EMAIL)
    provider.fail_next(*[DeliveryResult.failed("421 busy", transient=True)] * 2)
    # two die; the third is sent
    assert _dispatch(dapi, provider, max_attempts=1).dead == 2
    letters = c.get("/v1/dead-letters", headers=h).json()
    dead = [d["message_id"] for d in letters["dead_letters"]]
    assert len(dead) == 2 and letters["dead_letters"][0]["last_error"] == "421 busy"
    alive = next(m["message_id"] for m in sent if m["message_id"] not in dead)
    page = c.get("/v1/dead-letters?limit=1", headers=h).json()
    assert page["next"] == dead[0]

    r = c.post("/v1/dead-letters/replay", json={"ids": [dead[0], alive]}, headers=h)
    assert r.status_code == 400 and _errors(r) == ["ids[1]"] and alive in r.text
    for body in ({}, {"ids": [dead[0]], "all": True}, {"ids": []}, {"ids": "x"}, {"all": 1}):
        assert c.post("/v1/dead-letters/replay", json=body, headers=h).status_code == 400, body
    writer = dapi.bearer(_key(dapi, "read", "write"))
    assert c.post("/v1/dead-letters/replay", json={"all": True}, headers=writer).status_code == 403

    r = c.post("/v1/dead-letters/replay", json={"ids": [dead[0]]}, headers=h)
    assert r.json() == {"replayed": 1}
    pending = c.get("/v1/dead-letters?pending=true", headers=h).json()["dead_letters"]
    assert [d["message_id"] for d in pending] == [dead[1]]
    assert c.post("/v1/dead-letters/replay", json={"all": True}, headers=h).json() == {
        "replayed": 1
    }
    assert _dispatch(dapi, RecordingProvider(Channel.EMAIL)).sent == 2
    history = c.get(f"/v1/messages/{dead[1]}", headers=h).json()["history"]
    assert [e["status"] for e in history] == ["queued", "dead", "replayed", "sent"]


def test_suppressions(dapi: Api) -> None:
    c, h = dapi.client, dapi.bearer()
    add = {
        "channel": "email",
        "address": " Ann@Example.com ",
        "reason": "manual",
        "detail": "asked",
    }
    r = c.post("/v1/suppressions", json=add, headers=h)
    assert r.status_code == 201 and r.json() == {
        "channel": "email",
        "address": "ann@example.com",
        "created": True,
    }
    assert c.post("/v1/suppressions", json=add, headers=h).status_code == 200  # already there
    hook = "https://hooks.example/a/b?x=1"
    assert (
        c.post(
            "/v1/suppressions",
            json={"channel": "webhook", "address": hook, "reason": "invalid"},
            headers=h,
        ).status_code
        == 201
    )
    c.post("/v1/suppressions", json={"channel": "email", "address": "zed@example.com"}, headers=h)
    everything = c.get("/v1/suppressions", headers=h).json()["suppressions"]
    assert {s["address"] for s in everything} == {"ann@example.com", hook, "zed@example.com"}
    emails = c.get("/v1/suppressions?channel=email&limit=1", headers=h).json()
    assert [s["address"] for s in emails["suppressions"]] == ["ann@example.com"]
    rest = c.get(f"/v1/suppressions?channel=email&after={emails['next']}", headers=h).json()
    assert [s["address"] for s in rest["suppressions"]] == ["zed@example.com"]
    assert emails["suppressions"][0]["source"].startswith("key:")

    # a suppressed address gets no message
    r = c.post(
        "/v1/messages",
        json={
            "messages": [
                {
                    "key": "k",
                    "profile": {"namespace": "user_id", "value": "ann"},
                    "template": "hello",
                }
            ]
        },
        headers=h,
    )
    assert r.json()["messages"][0]["decision"]["reason"] == "suppressed"

    for body, path in (
        ({**add, "reason": "bored"}, "reason"),
        ({**add, "channel": "fax"}, "channel"),
        ({**add, "address": ""}, "address"),
        ({**add, "detail": 5}, "detail"),
        ({**add, "colour": "red"}, "colour"),
    ):
        r = c.post("/v1/suppressions", json=body, headers=h)
        assert r.status_code == 400 and _errors(r) == [path], (body, r.text)
    assert c.get("/v1/suppressions?channel=fax", headers=h).status_code == 400

    writer = dapi.bearer(_key(dapi, "read", "write"))
    assert c.delete("/v1/suppressions/email/ann@example.com", headers=writer).status_code == 403
    assert c.delete("/v1/suppressions/email/ANN@example.com", headers=h).status_code == 204
    assert c.delete("/v1/suppressions/email/ann@example.com", headers=h).status_code == 404
    # an address with slashes and a query, percent-encoded as one path segment
    assert (
        c.delete(f"/v1/suppressions/webhook/{quote(hook, safe='')}", headers=h).status_code == 204
    )


def test_a_profiles_inbox_and_push_subscriptions(dapi: Api) -> None:
    c, h = dapi.client, dapi.bearer()
    cards = [
        {"key": f"c{i}", "profile": {"namespace": "user_id", "value": user}, "template": "card"}
        for i, user in enumerate(["ann", "ann", "bob"])
    ]
    sent = c.post("/v1/messages", json={"messages": cards}, headers=h).json()["messages"]
    assert _dispatch(dapi).sent == 3  # cards need no provider
    box = c.get("/v1/profiles/user_id/ann/inbox", headers=h).json()
    assert box["unread"] == 2 and {card["body"] for card in box["cards"]} == {"For Ann"}
    first, second = sent[0]["message_id"], sent[1]["message_id"]
    r = c.post(f"/v1/profiles/user_id/ann/inbox/{first}/read", headers=h)
    assert r.status_code == 200 and r.json()["read"] is True
    assert c.get("/v1/profiles/user_id/ann/inbox", headers=h).json()["unread"] == 1
    r = c.post(f"/v1/profiles/user_id/ann/inbox/{second}/dismiss", headers=h)
    assert r.json()["dismissed"] is True
    assert c.post(f"/v1/profiles/user_id/ann/inbox/{second}/dismiss", headers=h).status_code == 200
    box = c.get("/v1/profiles/user_id/ann/inbox", headers=h).json()
    assert [card["message_id"] for card in box["cards"]] == [first] and box["unread"] == 0
    every = c.get("/v1/profiles/user_id/ann/inbox?include_dismissed=true", headers=h).json()
    assert len(every["cards"]) == 2
    bobs = sent[2]["message_id"]
    assert c.post(f"/v1/profiles/user_id/ann/inbox/{bobs}/read", headers=h).status_code == 404
    assert c.get("/v1/profiles/user_id/zed/inbox", headers=h).status_code == 404
    assert c.get("/v1/profiles/user_id/ann/inbox?before=nope", headers=h).status_code == 400
    reader = dapi.bearer(_key(dapi, "read"))
    assert c.get("/v1/profiles/user_id/ann/inbox", headers=reader).status_code == 200
    assert c.post(f"/v1/profiles/user_id/ann/inbox/{first}/read", headers=reader).status_code == 403

    base = "/v1/profiles/user_id/ann/push-subscriptions"
    browser = subscription_json()
    r = c.post(base, json={"kind": "webpush", "address": browser, "label": "Firefox"}, headers=h)
    assert r.status_code == 201, r.text
    web_id = r.json()["id"]
    again = c.post(base, json={"kind": "webpush", "address": json.dumps(browser)}, headers=h)
    assert again.json()["id"] == web_id  # the same browser, given as JSON text
    fcm = c.post(base, json={"kind": "fcm", "address": "tok-1"}, headers=h).json()["id"]
    listed = c.get(base, headers=h).json()["subscriptions"]
    assert [(s["id"], s["kind"], s["label"]) for s in listed] == [
        (web_id, "webpush", "Firefox"),
        (fcm, "fcm", ""),
    ]
    for body, path in (
        ({"kind": "webpush", "address": {"keys": {}}}, "address.endpoint"),
        (
            {"kind": "webpush", "address": subscription_json("http://push.example/1")},
            "address.endpoint",
        ),
        ({"kind": "webpush", "address": "not json"}, "address"),
        ({"kind": "fcm", "address": 7}, "address"),
        ({"kind": "apns", "address": "t"}, "kind"),
        ({"kind": "fcm", "address": "t", "colour": "red"}, "colour"),
    ):
        r = c.post(base, json=body, headers=h)
        assert r.status_code == 400 and path in _errors(r), (body, r.text)
    assert c.post(base, json={"kind": "fcm", "address": "t"}, headers=reader).status_code == 403
    # the device changes hands: bob registers the same token
    moved = c.post(
        "/v1/profiles/user_id/bob/push-subscriptions",
        json={"kind": "fcm", "address": "tok-1"},
        headers=h,
    )
    assert moved.json()["id"] == fcm
    assert [s["id"] for s in c.get(base, headers=h).json()["subscriptions"]] == [web_id]
    assert c.delete(f"{base}/{fcm}", headers=h).status_code == 404  # bob's now
    assert c.delete(f"{base}/{web_id}", headers=h).status_code == 204
    assert c.get(base, headers=h).json()["subscriptions"] == []


def test_the_routes_are_in_the_openapi_document(dapi: Api) -> None:
    paths = dapi.client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/templates/{name}",
        "/v1/templates/{name}/preview",
        "/v1/templates/validate",
        "/v1/delivery/rules",
        "/v1/suppressions/{channel}/{address}",
        "/v1/messages",
        "/v1/messages/{message_id}/cancel",
        "/v1/dead-letters/replay",
        "/v1/profiles/{namespace}/{value}/inbox",
        "/v1/profiles/{namespace}/{value}/push-subscriptions/{subscription_id}",
    ):
        assert path in paths, path


# -- fuzzing --------------------------------------------------------------------------------------


def _fuzzed_app() -> tuple[FastAPI, str]:
    """A seeded embedded hub's app and admin key for the fuzzer (built at import, as in
    test_fuzz.py: the fuzzer needs the schema when tests are collected)."""
    hub = Hub.open(load_settings(environ={}, data_dir=Path(tempfile.mkdtemp(prefix="wm-dfuzz-"))))
    now = hub.clock.now()
    with hub.tx() as conn:
        ws, _write, admin = access.create_workspace(conn, name="fuzz", actor="t", at=now)
        save_schema(conn, workspace_id=ws.id, document=SCHEMA, actor="t", at=now)
        store.save_template(conn, ws.id, name="hello", document=HELLO, actor="t", now=now)
    record = {"identities": {"user_id": "ann"}, "attributes": {"first_name": "Ann"}}
    assert Ingestor(hub).native_profiles(ws.id, {"profiles": [record]}).accepted == 1
    return with_delivery(create_app(hub, background=False), hub), admin.secret


_FUZZ_APP, _FUZZ_KEY = _fuzzed_app()
fuzz = schemathesis.openapi.from_asgi("/openapi.json", _FUZZ_APP).include(
    path_regex=r"^/v1/(templates|fragments|delivery|suppressions|messages|dead-letters)"
    r"|/inbox|/push-subscriptions"
)


@fuzz.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {_FUZZ_KEY}"}, checks=[not_a_server_error]
    )
