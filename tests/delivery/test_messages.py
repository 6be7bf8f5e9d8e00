"""The message log, dead letters and replay, cancelling, the in-app inbox, push subscriptions,
previews and test sends, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select, update

from tests.delivery.conftest import Shop
from waymark.access import service as access
from waymark.channels.base import DeliveryResult, RecordingProvider
from waymark.core.errors import Conflict, InvalidInput, NotFound
from waymark.core.ids import new_id
from waymark.delivery import messages as m
from waymark.delivery import store
from waymark.delivery.dispatcher import Dispatcher, DispatchSettings
from waymark.delivery.feedback import tracking_keys
from waymark.delivery.outbox import Outbox, SendIntent, Source, read_content
from waymark.delivery.templates import Channel, RenderFailed
from waymark.delivery.tracking import BadToken, read_unsubscribe
from waymark.storage.tables import audit_log, inbox_messages, messages, push_subscriptions

OUTBOX = Outbox(public_url="https://hub.example")
TEMPLATES: dict[str, dict[str, Any]] = {
    "hello": {
        "channel": "email",
        "subject": "Hello {{ profile.first_name }}",
        "html": "<p>Hi {{ profile.first_name }} from {{ workspace.name }}</p>"
        "<a href='{{ message.unsubscribe_url }}'>stop</a>",
    },
    "text": {"channel": "sms", "text": "Hi {{ profile.first_name }}"},
    "card": {"channel": "inbox", "title": "New", "body": "For {{ profile.first_name }}"},
    "ping": {"channel": "push", "title": "Hi", "body": "{{ profile.first_name }}"},
    "order": {
        "channel": "email",
        "event_type": "purchase",
        "missing": "skip",
        "subject": "Order {{ event.properties.order_id }}",
        "text": "{{ profile.first_name }}, {{ profile.id }}: {{ event.name }}",
    },
}


def _setup(shop: Shop) -> None:
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        for name, document in TEMPLATES.items():
            store.save_template(conn, shop.ws, name=name, document=document, actor="t", now=now)


def _send(shop: Shop, *intents: SendIntent) -> list[Any]:
    with shop.hub.tx() as conn:
        return OUTBOX.enqueue(conn, shop.ws, list(intents), now=shop.hub.clock.now())


def _intent(
    shop: Shop, key: str, user: str = "ann", template: str = "hello", **kw: Any
) -> SendIntent:
    kw.setdefault("source", Source("campaign", "c1"))
    return SendIntent(key, shop.ids[user], template, **kw)


def _tick(shop: Shop, seconds: float = 1) -> None:
    shop.hub.clock.advance(timedelta(seconds=seconds))  # type: ignore[attr-defined]


def _other_workspace(shop: Shop) -> str:
    with shop.hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="other", actor="t", at=shop.hub.clock.now())
    return ws.id


def _dispatcher(shop: Shop, provider: Any, channel: Channel = Channel.EMAIL, **kw: Any) -> Any:
    settings = DispatchSettings(workers=1, breaker_threshold=99, **kw)
    return Dispatcher(
        shop.hub, {channel: lambda: provider}, outbox=OUTBOX, settings=settings, draw=lambda: 0.0
    )


# -- the log --------------------------------------------------------------------------------------


def test_the_log_lists_newest_first_with_filters_and_pages(shop: Shop) -> None:
    _setup(shop)
    sent = [
        *_send(shop, _intent(shop, "a1")),
        *_send(shop, _intent(shop, "b1", user="bob")),  # opted out of email marketing
        *_send(shop, _intent(shop, "a2", template="text", source=Source("journey", "j1:wait"))),
        *_send(
            shop,
            _intent(shop, "c1", user="cy", source=Source("journey", "j10:a"), transactional=True),
        ),
    ]
    ids = [e.message_id for e in sent]
    with shop.hub.engine.connect() as conn:
        log = m.message_log(conn, shop.ws)
        assert [e.id for e in log] == sorted(ids, reverse=True)
        first = next(e for e in log if e.key == "a1").to_json()
        assert first["template"]["name"] == "hello" and first["template"]["version"] == 1
        assert first["to"] == "ann@example.com" and first["status"] == "queued"
        assert first["source"] == {"kind": "campaign", "id": "c1"}
        assert set(first) >= {"reason", "rule", "detail", "attempts", "provider", "sent_at"}
        bob = next(e for e in log if e.key == "b1")
        assert (bob.status, bob.reason) == ("excluded", "no_consent")

        def keys(**filters: Any) -> set[str]:
            return {e.key for e in m.message_log(conn, shop.ws, **filters)}

        assert keys(profile_id=shop.ids["ann"]) == {"a2", "a1"}
        assert keys(status="excluded") == {"b1"}
        assert keys(channel="sms") == {"a2"}
        assert keys(source_kind="journey") == {"c1", "a2"}
        assert keys(source_id="j1") == {"a2"}  # a journey's steps, not j10's
        assert keys(source_kind="campaign", source_id="c1") == {"b1", "a1"}
        page = m.message_log(conn, shop.ws, limit=2)
        rest = m.message_log(conn, shop.ws, before=page[-1].id, limit=2)
        assert [e.id for e in page + rest] == [e.id for e in log]
        for bad in ({"status": "lost"}, {"channel": "fax"}, {"source_kind": "x"}, {"limit": 0}):
            with pytest.raises(InvalidInput) as caught:
                m.message_log(conn, shop.ws, **bad)
            assert caught.value.issues[0].path == next(iter(bad))


def test_one_message_has_its_content_and_history(shop: Shop) -> None:
    _setup(shop)
    [queued] = _send(shop, _intent(shop, "a1"))
    provider = RecordingProvider(Channel.EMAIL)
    dispatcher = _dispatcher(shop, provider)
    _tick(shop)
    assert dispatcher.run_until_idle().sent == 1
    dispatcher.close()
    # a template that cannot be rendered for this profile: failed, no content
    [failed] = _send(shop, _intent(shop, "o1", template="order", transactional=True))
    with shop.hub.engine.connect() as conn:
        found = m.get_message(conn, shop.ws, queued.message_id).to_json()
        assert found["status"] == "sent" and found["provider"] == "recording"
        assert found["content"]["fields"]["subject"] == "Hello Ann"
        assert [h["status"] for h in found["history"]] == ["queued", "sent"]
        assert found["history"][0]["at"] < found["history"][1]["at"]
        broken = m.get_message(conn, shop.ws, failed.message_id)
        assert broken.message.status == "failed" and broken.content is None
        assert broken.to_json()["content"] is None
        with pytest.raises(NotFound):
            m.get_message(conn, shop.ws, new_id())


def test_other_workspaces_see_none_of_it(shop: Shop) -> None:
    _setup(shop)
    [sent] = _send(shop, _intent(shop, "a1"))
    other = _other_workspace(shop)
    now = shop.hub.clock.now()
    with shop.hub.engine.connect() as conn:
        assert m.message_log(conn, other) == []
        with pytest.raises(NotFound):
            m.get_message(conn, other, sent.message_id)
    with shop.hub.tx() as conn, pytest.raises(NotFound):
        m.cancel(conn, other, sent.message_id, actor="t", now=now)
    with shop.hub.tx() as conn, pytest.raises(InvalidInput, match="no message"):
        m.replay(conn, other, [sent.message_id], actor="t", now=now)
    with shop.hub.tx() as conn, pytest.raises(NotFound):
        m.preview(conn, other, template="hello", profile_id=shop.ids["ann"], outbox=OUTBOX)


# -- cancelling -----------------------------------------------------------------------------------


def test_cancel_a_queued_or_held_message_but_not_a_sent_one(shop: Shop) -> None:
    _setup(shop)
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        store.save_rules(
            conn,
            shop.ws,
            {
                "quiet_hours": [
                    {"name": "all day", "start": "00:00", "end": "23:59", "channels": ["sms"]}
                ]
            },
            actor="t",
            now=now,
        )
    queued, held, later = (
        *_send(shop, _intent(shop, "q")),
        *_send(shop, _intent(shop, "h", template="text")),
        *_send(shop, _intent(shop, "s", user="cy", transactional=True)),
    )
    assert (queued.status, held.status) == ("queued", "held")
    with shop.hub.tx() as conn:
        for e in (queued, held):
            done = m.cancel(conn, shop.ws, e.message_id, actor="ops", now=now)
            assert done.status == "cancelled" and done.next_attempt_at is None
    with shop.hub.engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == queued.message_id)).one()
        assert row.counted_at is None and row.lease_until is None
        history = m.get_message(conn, shop.ws, held.message_id).history
        assert [h["status"] for h in history] == ["held", "cancelled"]
        assert history[-1]["detail"] == {"actor": "ops", "was": "held"}
        audit = conn.execute(
            select(audit_log.c.action, audit_log.c.target_id).where(
                audit_log.c.action == "message.cancel"
            )
        ).all()
        assert sorted(a.target_id for a in audit) == sorted([queued.message_id, held.message_id])
    provider = RecordingProvider(Channel.EMAIL)
    dispatcher = _dispatcher(shop, provider)
    assert dispatcher.run_until_idle().sent == 1  # only the one not cancelled
    dispatcher.close()
    assert [o.id for o in provider.sent] == [later.message_id]
    for message_id, status in ((later.message_id, "sent"), (queued.message_id, "cancelled")):
        with shop.hub.tx() as conn, pytest.raises(Conflict, match=f"is {status}"):
            m.cancel(conn, shop.ws, message_id, actor="ops", now=now)
    with shop.hub.tx() as conn, pytest.raises(NotFound):
        m.cancel(conn, shop.ws, "nope", actor="ops", now=now)


# -- dead letters ---------------------------------------------------------------------------------


def _dead(shop: Shop, *keys: str) -> list[str]:
    ids = [e.message_id for e in _send(shop, *(_intent(shop, k) for k in keys))]
    provider = RecordingProvider(Channel.EMAIL)
    provider.fail_next(*[DeliveryResult.failed("421 busy", transient=True)] * len(keys))
    dispatcher = _dispatcher(shop, provider, max_attempts=1)
    assert dispatcher.run_until_idle().dead == len(keys)
    dispatcher.close()
    return ids


def test_dead_letters_are_listed_and_replayed(shop: Shop) -> None:
    _setup(shop)
    first, second, third = _dead(shop, "d1", "d2", "d3")
    [alive] = _send(shop, _intent(shop, "alive", user="cy", transactional=True))
    _tick(shop, 60)
    now = shop.hub.clock.now()
    with shop.hub.engine.connect() as conn:
        letters = m.list_dead_letters(conn, shop.ws)
        assert [d.message_id for d in letters] == sorted([first, second, third], reverse=True)
        shown = letters[0].to_json()
        assert (shown["status"], shown["last_error"], shown["attempts"]) == ("dead", "421 busy", 1)
        assert shown["template"] == "hello" and shown["replayed_at"] is None
        assert len(m.list_dead_letters(conn, shop.ws, limit=1, before=letters[0].message_id)) == 1
    # a message that is not dead, or unknown: refused by name, nothing replayed
    with shop.hub.tx() as conn, pytest.raises(InvalidInput) as caught:
        m.replay(conn, shop.ws, [first, alive.message_id, "nope"], actor="ops", now=now)
    issues = caught.value.issues
    assert [i.path for i in issues] == ["ids[1]", "ids[2]"]
    assert alive.message_id in issues[0].reason and "is queued" in issues[0].reason
    assert "no message 'nope'" in issues[1].reason
    with shop.hub.engine.connect() as conn:
        assert m.get_message(conn, shop.ws, first).message.status == "dead"

    with shop.hub.tx() as conn:
        assert m.replay(conn, shop.ws, [first, first], actor="ops", now=now) == 1
    with shop.hub.engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == first)).one()
        assert (row.status, row.attempts, row.next_attempt_at, row.lease_until) == (
            "queued",
            0,
            now,
            None,
        )
        assert [h["status"] for h in m.get_message(conn, shop.ws, first).history] == [
            "queued",
            "dead",
            "replayed",
        ]
        replayed = {d.message_id: d for d in m.list_dead_letters(conn, shop.ws)}
        assert replayed[first].replayed_at == now and replayed[first].status == "queued"
        pending = m.list_dead_letters(conn, shop.ws, pending_only=True)
        assert {d.message_id for d in pending} == {second, third}
        audit = conn.execute(select(audit_log).where(audit_log.c.action == "message.replay")).one()
        assert (audit.actor, audit.target_id, audit.details["count"]) == ("ops", first, 1)
    # replaying twice is refused: it is queued now
    with shop.hub.tx() as conn, pytest.raises(InvalidInput, match="is queued"):
        m.replay(conn, shop.ws, [first], actor="ops", now=now)
    with shop.hub.tx() as conn:
        assert m.replay(conn, shop.ws, None, actor="ops", now=now) == 2
        assert m.replay(conn, shop.ws, None, actor="ops", now=now) == 0
    provider = RecordingProvider(Channel.EMAIL)
    dispatcher = _dispatcher(shop, provider)
    assert dispatcher.run_until_idle().sent == 4  # the three replayed and the one alive
    dispatcher.close()


# -- the in-app inbox -----------------------------------------------------------------------------


def _cards(shop: Shop, user: str, *keys: str) -> list[str]:
    ids = []
    for key in keys:  # one write per card, a second apart: their order is known
        [e] = _send(shop, _intent(shop, key, user=user, template="card"))
        ids.append(e.message_id)
        dispatcher = Dispatcher(shop.hub, {}, outbox=OUTBOX)  # cards need no provider
        assert dispatcher.run_until_idle().sent == 1
        dispatcher.close()
        _tick(shop)
    return ids


def test_the_inbox_reads_dismisses_and_pages(shop: Shop) -> None:
    _setup(shop)
    one, two, three = _cards(shop, "ann", "i1", "i2", "i3")
    [bobs] = _cards(shop, "bob", "b1")
    ann = shop.ids["ann"]
    now = shop.hub.clock.now()
    with shop.hub.engine.connect() as conn:
        cards = m.inbox(conn, shop.ws, ann, now=now)
        assert [c.message_id for c in cards] == [three, two, one]
        shown = cards[0].to_json()
        assert (shown["title"], shown["body"], shown["read"], shown["dismissed"]) == (
            "New",
            "For Ann",
            False,
            False,
        )
        assert m.unread_count(conn, shop.ws, ann, now=now) == 3
        page = m.inbox(conn, shop.ws, ann, now=now, limit=2)
        assert [c.message_id for c in page] == [three, two]
        assert [c.message_id for c in m.inbox(conn, shop.ws, ann, now=now, before=two)] == [one]
        with pytest.raises(InvalidInput, match="before"):
            m.inbox(conn, shop.ws, ann, now=now, before=bobs)
    with shop.hub.tx() as conn:
        read = m.mark_read(conn, shop.ws, ann, two, now)
        assert read.read_at == now
        _tick(shop)
        again = m.mark_read(conn, shop.ws, ann, two, shop.hub.clock.now())
        assert again.read_at == now  # the first read counts
        gone = m.dismiss(conn, shop.ws, ann, three, now)
        assert gone.to_json()["dismissed"] is True
        assert m.dismiss(conn, shop.ws, ann, three, shop.hub.clock.now()).dismissed_at == now
        # another profile's card is not found, whichever way it is asked for
        with pytest.raises(NotFound):
            m.mark_read(conn, shop.ws, ann, bobs, now)
        with pytest.raises(NotFound):
            m.dismiss(conn, shop.ws, shop.ids["bob"], one, now)
        conn.execute(
            update(inbox_messages)
            .where(inbox_messages.c.message_id == one)
            .values(expires_at=now + timedelta(seconds=30))
        )
    with shop.hub.engine.connect() as conn:
        assert [c.message_id for c in m.inbox(conn, shop.ws, ann, now=now)] == [two, one]
        everything = m.inbox(conn, shop.ws, ann, now=now, include_dismissed=True)
        assert [c.message_id for c in everything] == [three, two, one]
        assert m.unread_count(conn, shop.ws, ann, now=now) == 1
        later = now + timedelta(minutes=1)
        assert [c.message_id for c in m.inbox(conn, shop.ws, ann, now=later)] == [two]
        assert m.unread_count(conn, shop.ws, ann, now=later) == 0
        assert m.unread_count(conn, shop.ws, shop.ids["bob"], now=later) == 1


# -- push subscriptions ---------------------------------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def subscription_json(endpoint: str = "https://push.example/s/1", **extra: Any) -> dict[str, Any]:
    """A browser's ``PushSubscription.toJSON()`` with a real P-256 key."""
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    return {
        "endpoint": endpoint,
        "expirationTime": None,
        "keys": {"p256dh": _b64url(public), "auth": _b64url(b"0123456789abcdef")},
        **extra,
    }


def test_push_subscriptions_are_checked_normalised_and_move_with_the_device(shop: Shop) -> None:
    _setup(shop)
    ann, bob = shop.ids["ann"], shop.ids["bob"]
    browser = subscription_json()
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        first = m.register_subscription(
            conn,
            shop.ws,
            ann,
            kind="webpush",
            address=json.dumps(browser),
            label="Firefox",
            now=now,
        )
        phone = m.register_subscription(conn, shop.ws, ann, kind="fcm", address="tok:123", now=now)
    _tick(shop)
    later = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        # the same subscription written differently is the same row, now bob's
        spaced = json.dumps({**browser, "expirationTime": 123}, indent=2)
        again = m.register_subscription(
            conn, shop.ws, bob, kind="webpush", address=spaced, now=later
        )
        assert again == first
    with shop.hub.engine.connect() as conn:
        [mine] = m.list_subscriptions(conn, shop.ws, ann)
        assert (mine.id, mine.kind, mine.address) == (phone, "fcm", "tok:123")
        [moved] = m.list_subscriptions(conn, shop.ws, bob)
        assert (moved.label, moved.created_at, moved.last_seen_at) == ("Firefox", now, later)
        assert json.loads(moved.address) == {
            "endpoint": browser["endpoint"],
            "keys": browser["keys"],
        }
        stored = conn.execute(
            select(push_subscriptions).where(push_subscriptions.c.id == first)
        ).one()
        assert len(stored.address_hash) == 64
    # a push message goes to each of the profile's subscriptions
    sent = _send(shop, _intent(shop, "p", user="bob", template="ping"))
    assert [(e.key, e.status) for e in sent] == [(f"p/{first}", "queued")]

    bad = [
        ({"kind": "webpush", "address": "not json"}, "address"),
        ({"kind": "webpush", "address": json.dumps({"keys": {}})}, "address.endpoint"),
        (
            {"kind": "webpush", "address": json.dumps(subscription_json("http://push.example/1"))},
            "address.endpoint",
        ),
        ({"kind": "fcm", "address": ""}, "address"),
        ({"kind": "fcm", "address": "has space"}, "address"),
        ({"kind": "fcm", "address": "x" * 4097}, "address"),
        ({"kind": "apns", "address": "tok"}, "kind"),
        ({"kind": "fcm", "address": "tok", "label": "x" * 201}, "label"),
    ]
    for kw, path in bad:
        with shop.hub.tx() as conn, pytest.raises(InvalidInput) as caught:
            m.register_subscription(conn, shop.ws, ann, now=now, **kw)
        assert caught.value.issues[0].path == path, (kw, caught.value.issues)
    # a local push service over http, when allowed
    with shop.hub.tx() as conn:
        m.register_subscription(
            conn,
            shop.ws,
            ann,
            kind="webpush",
            address=json.dumps(subscription_json("http://127.0.0.1:9999/s")),
            now=now,
            allow_http=True,
        )
        with pytest.raises(NotFound):
            m.register_subscription(conn, shop.ws, "nobody", kind="fcm", address="t", now=now)
    with shop.hub.tx() as conn:
        with pytest.raises(NotFound):
            m.delete_subscription(conn, shop.ws, phone, profile_id=bob)
        m.delete_subscription(conn, shop.ws, phone)
        with pytest.raises(NotFound):
            m.delete_subscription(conn, shop.ws, phone)
    with shop.hub.engine.connect() as conn:
        assert [s.kind for s in m.list_subscriptions(conn, shop.ws, ann)] == ["webpush"]


# -- preview and test sends -----------------------------------------------------------------------


def test_preview_renders_what_the_outbox_would_write(shop: Shop) -> None:
    _setup(shop)
    ann = shop.ids["ann"]
    event = {
        "name": "purchase",
        "timestamp": "2026-03-01T12:00:00Z",
        "properties": {"order_id": "o7"},
    }
    [written] = _send(
        shop, _intent(shop, "o", template="order", transactional=True, context={"event": event})
    )
    with shop.hub.engine.connect() as conn:
        stored = conn.execute(
            select(messages.c.content).where(messages.c.id == written.message_id)
        ).scalar_one()
        shown = m.preview(
            conn, shop.ws, template="order", profile_id=ann, context={"event": event}, outbox=OUTBOX
        )
        assert shown == read_content(stored)
        assert shown.fields["text"] == f"Ann, {ann}: purchase"
        hello = m.preview(conn, shop.ws, template="hello", profile_id=ann, outbox=OUTBOX)
        assert "from shop" in hello.fields["html"]
        [link] = re.findall(r"href='([^']+)'", hello.fields["html"])
        assert link.startswith(f"https://hub.example/t/{shop.ws}/u/")
        unsaved = m.preview(
            conn,
            shop.ws,
            document={"channel": "sms", "text": "Yo {{ profile.first_name | upcase }}"},
            profile_id=ann,
            outbox=OUTBOX,
        )
        assert unsaved.fields == {"text": "Yo ANN"}
        assert m.rendered_json(unsaved) == {
            "channel": "sms",
            "fields": {"text": "Yo ANN"},
            "data": {},
        }
        with pytest.raises(NotFound, match="nope"):
            m.preview(conn, shop.ws, template="nope", profile_id=ann, outbox=OUTBOX)
        with pytest.raises(NotFound):
            m.preview(conn, shop.ws, template="hello", profile_id="nobody", outbox=OUTBOX)
        with pytest.raises(InvalidInput) as caught:
            m.preview(
                conn,
                shop.ws,
                document={"channel": "sms", "text": "{{ profile.frist_name }}"},
                profile_id=ann,
                outbox=OUTBOX,
            )
        assert "frist_name" in str(caught.value)
        with pytest.raises(InvalidInput, match="profile cannot be given"):
            m.preview(
                conn,
                shop.ws,
                template="hello",
                profile_id=ann,
                context={"profile": {}},
                outbox=OUTBOX,
            )
        with pytest.raises(InvalidInput, match="either"):
            m.preview(conn, shop.ws, profile_id=ann, outbox=OUTBOX)
        with pytest.raises(RenderFailed, match="undefined"):  # no event: a skip for missing data
            m.preview(conn, shop.ws, template="order", profile_id=ann, outbox=OUTBOX)
    # a message's unsubscribe link works; a preview's has the same shape but never verifies
    [real] = _send(shop, _intent(shop, "h"))
    with shop.hub.engine.connect() as conn:
        keys = tracking_keys(conn, shop.ws)
        html = read_content(
            conn.execute(
                select(messages.c.content).where(messages.c.id == real.message_id)
            ).scalar_one()
        ).fields["html"]
    [sent_link] = re.findall(r"href='([^']+)'", html)
    assert read_unsubscribe(keys, sent_link.rsplit("/", 1)[1]).profile_id == ann
    with pytest.raises(BadToken):
        read_unsubscribe(keys, link.rsplit("/", 1)[1])


def test_test_sends_go_to_seed_addresses_as_transactional(shop: Shop) -> None:
    _setup(shop)
    bob = shop.ids["bob"]  # opted out of email marketing: a test send still goes
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        out = m.test_send(
            conn,
            shop.ws,
            template="hello",
            profile_id=bob,
            to=["QA@Shop.example", "not an address"],
            outbox=OUTBOX,
            now=now,
            actor="ops",
        )
    assert [e.status for e in out] == ["queued", "excluded"]
    assert out[1].decision["reason"] == "invalid_address"
    run = out[0].key.split(":")[1]
    assert [e.key for e in out] == [f"test:{run}:0", f"test:{run}:1"]
    with shop.hub.engine.connect() as conn:
        first = m.get_message(conn, shop.ws, out[0].message_id)
        assert (first.message.to, first.message.purpose, first.message.transactional) == (
            "qa@shop.example",
            "test",
            True,
        )
        assert (first.message.source_kind, first.message.source_id) == ("test", "hello")
        assert first.content is not None and first.content.fields["subject"] == "Hello Bob"
        assert m.message_log(conn, shop.ws, source_kind="test", limit=5)[0].key.startswith("test:")
        audit = conn.execute(
            select(audit_log).where(audit_log.c.action == "template.test_send")
        ).one()
        assert audit.details["to"] == ["QA@Shop.example", "not an address"]
    for kw, error in (
        ({"template": "nope", "to": ["a@b.example"]}, NotFound),
        ({"template": "hello", "to": []}, InvalidInput),
        ({"template": "hello", "to": "a@b.example"}, InvalidInput),
        ({"template": "hello", "to": [""]}, InvalidInput),
        ({"template": "hello", "to": ["x@y.example"] * 21}, InvalidInput),
    ):
        with shop.hub.tx() as conn, pytest.raises(error):
            m.test_send(conn, shop.ws, profile_id=bob, outbox=OUTBOX, now=now, actor="ops", **kw)
    with shop.hub.tx() as conn, pytest.raises(NotFound):
        m.test_send(
            conn,
            shop.ws,
            template="hello",
            profile_id="nobody",
            to=["a@b.example"],
            outbox=OUTBOX,
            now=now,
            actor="ops",
        )
