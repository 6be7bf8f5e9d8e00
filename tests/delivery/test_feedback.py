"""Tracking keys, tracked email and feedback on SQLite and PostgreSQL: messages enqueued with
the outbox, sent by the dispatcher to a recording provider, then reported on."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import select, update

from tests.delivery.conftest import Shop
from waymark.channels.base import Feedback, FeedbackKind, InboundText, RecordingProvider
from waymark.core.clock import ManualClock
from waymark.delivery import store
from waymark.delivery.dispatcher import Dispatcher, DispatchSettings
from waymark.delivery.feedback import (
    Tracker,
    apply_inbound_text,
    record_feedback,
    rotate_tracking_keys,
    stored_tracking_keys,
    tracking_keys,
)
from waymark.delivery.outbox import Outbox, SendIntent, Source, read_content
from waymark.delivery.templates import Channel
from waymark.delivery.tracking import read_click, read_preferences, read_unsubscribe
from waymark.storage.tables import (
    consents,
    event_inbox,
    message_events,
    messages,
    seen_messages,
    stream_recheck,
    suppressions,
    workspaces,
)

PUBLIC = "https://hub.test"
SALE = "https://shop.example/sale?x=1"
PROMO = {
    "channel": "email",
    "subject": "Hi {{ profile.first_name }}",
    "html": (
        f'<p>Hello</p><p><a href="{SALE}">Sale</a></p>'
        '<p><a href="{{ message.unsubscribe_url }}">Unsubscribe</a> '
        '<a href="{{ message.preferences_url }}">Preferences</a></p>'
    ),
    "text": f"Sale: {SALE}",
}


def _templates(shop: Shop) -> None:
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        store.save_template(conn, shop.ws, name="promo", document=PROMO, actor="t", now=now)
        store.save_template(
            conn,
            shop.ws,
            name="text",
            document={"channel": "sms", "text": "Hi {{ profile.first_name }}"},
            actor="t",
            now=now,
        )


def _enqueue(
    shop: Shop, key: str, *, user: str = "ann", template: str = "promo", transactional: bool = False
) -> Any:
    intent = SendIntent(
        key, shop.ids[user], template, Source("campaign", "spring"), transactional=transactional
    )
    with shop.hub.tx() as conn:
        return Outbox(public_url=PUBLIC).enqueue(conn, shop.ws, [intent], now=shop.hub.clock.now())[
            0
        ]


def _send(shop: Shop, *keys: str, channel: Channel = Channel.EMAIL, **kw: Any) -> RecordingProvider:
    """Enqueue one message per key and dispatch them through the tracker's content hook."""
    for key in keys:
        _enqueue(shop, key, **kw)
    provider = RecordingProvider(channel)
    dispatcher = Dispatcher(
        shop.hub,
        {channel: lambda: provider},
        outbox=Outbox(public_url=PUBLIC),
        settings=DispatchSettings(workers=1),
        content_hook=Tracker(PUBLIC).content_hook(shop.hub),
        draw=lambda: 0.0,
    )
    dispatcher.run_until_idle()
    dispatcher.close()
    assert len(provider.sent) == len(keys)
    return provider


def _feedback(
    shop: Shop, feedback: Feedback, *, provider: str | None = "recording", **kw: Any
) -> str | None:
    with shop.hub.tx() as conn:
        return record_feedback(
            conn, shop.ws, feedback, provider=provider, now=shop.hub.clock.now(), **kw
        )


def _events(shop: Shop, name: str) -> list[dict[str, Any]]:
    with shop.hub.engine.connect() as conn:
        rows = conn.execute(
            select(event_inbox).where(event_inbox.c.name == name).order_by(event_inbox.c.seq)
        ).mappings()
        return [
            {
                **row,
                "properties": orjson.loads(row["properties"]),
                "flags": orjson.loads(row["flags"]),
            }
            for row in rows
        ]


def _message(shop: Shop, message_id: str) -> Any:
    with shop.hub.engine.connect() as conn:
        return conn.execute(select(messages).where(messages.c.id == message_id)).one()


def _history(shop: Shop, message_id: str) -> list[str]:
    with shop.hub.engine.connect() as conn:
        return list(
            conn.execute(
                select(message_events.c.status)
                .where(message_events.c.message_id == message_id)
                .order_by(message_events.c.seq)
            ).scalars()
        )


def _consents(shop: Shop, user: str) -> dict[tuple[str, str], str]:
    with shop.hub.engine.connect() as conn:
        rows = conn.execute(
            select(consents.c.channel, consents.c.purpose, consents.c.status).where(
                consents.c.profile_id == shop.ids[user]
            )
        )
        return {(r.channel, r.purpose): r.status for r in rows}


def _suppressed(shop: Shop) -> dict[str, str]:
    with shop.hub.engine.connect() as conn:
        return {r.address: r.reason for r in conn.execute(select(suppressions))}


# -- keys and links -------------------------------------------------------------------------------


def test_keys_are_made_once_kept_in_the_settings_and_rotated(shop: Shop) -> None:
    now = shop.hub.clock.now()
    with shop.hub.engine.connect() as conn:
        assert stored_tracking_keys(conn, shop.ws) is None  # reading never makes them
        assert stored_tracking_keys(conn, "no-such-workspace") is None
    with shop.hub.tx() as conn:
        first = tracking_keys(conn, shop.ws)
        assert tracking_keys(conn, shop.ws) == first
    with shop.hub.engine.connect() as conn:
        stored = conn.execute(
            select(workspaces.c.settings).where(workspaces.c.id == shop.ws)
        ).scalar_one()["tracking_keys"]
        assert stored_tracking_keys(conn, shop.ws) == first
    assert len(stored) == 1 and len(base64.b64decode(stored[0])) == 32
    tracker = Tracker(PUBLIC)
    old_link = tracker.click_url(first, shop.ws, message_id="m-1", url=SALE, link_id=1)
    with shop.hub.tx() as conn:
        rotated = rotate_tracking_keys(conn, shop.ws, actor="t", now=now)
    assert rotated.secrets[1:] == first.secrets and rotated.secrets[0] not in first.secrets
    token = old_link.rsplit("/", 1)[1]
    assert read_click(rotated, token).url == SALE  # old links keep working
    with shop.hub.tx() as conn:
        only_new = rotate_tracking_keys(conn, shop.ws, actor="t", now=now, keep=1)
    assert len(only_new.secrets) == 1 and only_new.secrets[0] not in rotated.secrets


def test_the_outbox_renders_signed_unsubscribe_and_preference_links(shop: Shop) -> None:
    _templates(shop)
    sent = _enqueue(shop, "k1")
    content = read_content(_message(shop, sent.message_id).content)
    with shop.hub.engine.connect() as conn:
        keys = stored_tracking_keys(conn, shop.ws)
    assert keys is not None
    base = f"{PUBLIC}/t/{shop.ws}"
    html = content.fields["html"]
    unsubscribe = html.split(f'href="{base}/u/', 1)[1].split('"', 1)[0]
    asked = read_unsubscribe(keys, unsubscribe)
    assert (asked.message_id, asked.profile_id) == (sent.message_id, shop.ids["ann"])
    assert (asked.channel, asked.purpose) == (Channel.EMAIL, "marketing")
    preferences = html.split(f'href="{base}/p/', 1)[1].split('"', 1)[0]
    assert read_preferences(keys, preferences).profile_id == shop.ids["ann"]


def test_the_content_hook_tracks_email_and_signs_its_list_unsubscribe(shop: Shop) -> None:
    _templates(shop)
    provider = _send(shop, "k1")
    message = provider.sent[0]
    base = f"{PUBLIC}/t/{shop.ws}"
    with shop.hub.engine.connect() as conn:
        keys = stored_tracking_keys(conn, shop.ws)
    assert keys is not None
    html, text = message.content.fields["html"], message.content.fields["text"]
    assert f'href="{SALE}"' not in html and f"{base}/o/" in html
    click = html.split(f'href="{base}/c/', 1)[1].split('"', 1)[0]
    assert read_click(keys, click).url == SALE
    assert text.startswith(f"Sale: {base}/c/")
    assert message.unsubscribe_url is not None
    asked = read_unsubscribe(keys, message.unsubscribe_url.rsplit("/", 1)[1])
    assert (asked.message_id, asked.purpose) == (message.id, "marketing")
    # the unsubscribe link in the body stays the very same URL (it records its own event)
    assert f'href="{message.unsubscribe_url}"' in html


def test_tracking_can_be_turned_off_and_transactional_email_has_no_unsubscribe(
    shop: Shop,
) -> None:
    _templates(shop)
    with shop.hub.tx() as conn:
        conn.execute(
            update(workspaces)
            .where(workspaces.c.id == shop.ws)
            .values(settings={"tracking": {"clicks": False, "opens": False}})
        )
    provider = _send(shop, "k1", transactional=True)
    message = provider.sent[0]
    assert f'href="{SALE}"' in message.content.fields["html"]
    assert "/o/" not in message.content.fields["html"]
    assert message.unsubscribe_url is None


# -- feedback -------------------------------------------------------------------------------------


def test_delivery_moves_the_status_and_makes_one_profile_event_however_often_told(
    shop: Shop,
) -> None:
    _templates(shop)
    provider = _send(shop, "k1")
    message_id = provider.sent[0].id
    row = _message(shop, message_id)
    delivered = Feedback(FeedbackKind.DELIVERED, shop.hub.clock.now(), provider_id=row.provider_id)
    assert _feedback(shop, delivered) == message_id
    assert _feedback(shop, delivered) == message_id  # the provider called back twice
    assert _message(shop, message_id).status == "delivered"
    assert _history(shop, message_id) == ["queued", "sent", "delivered"]
    (event,) = _events(shop, "message.delivered")
    assert event["profile_id"] == shop.ids["ann"] and event["source"] == "delivery"
    assert event["properties"] == {
        "message_id": message_id,
        "channel": "email",
        "purpose": "marketing",
        "template": "promo",
        "source": "campaign",
        "source_id": "spring",
        "provider": "recording",
    }
    assert event["flags"] == []
    with shop.hub.engine.connect() as conn:
        assert conn.execute(
            select(seen_messages.c.message_id).where(
                seen_messages.c.message_id == event["message_id"]
            )
        ).scalar_one()


def test_no_message_no_feedback(shop: Shop) -> None:
    now = shop.hub.clock.now()
    assert _feedback(shop, Feedback(FeedbackKind.DELIVERED, now, provider_id="nope")) is None
    assert _feedback(shop, Feedback(FeedbackKind.OPENED, now, message_id="nope\x00")) is None
    assert (
        _feedback(shop, Feedback(FeedbackKind.DELIVERED, now, provider_id="x"), provider=None)
        is None
    )
    assert _events(shop, "message.delivered") == []


def test_opens_and_clicks_are_recorded_each_time_without_changing_the_status(
    shop: Shop, clock: ManualClock
) -> None:
    _templates(shop)
    message_id = _send(shop, "k1").sent[0].id
    opened = Feedback(FeedbackKind.OPENED, clock.now(), message_id=message_id)
    assert _feedback(shop, opened, provider=None) == message_id
    clock.advance(timedelta(minutes=1))
    _feedback(
        shop, Feedback(FeedbackKind.OPENED, clock.now(), message_id=message_id), provider=None
    )
    clicked = Feedback(FeedbackKind.CLICKED, clock.now(), message_id=message_id, url=SALE)
    _feedback(shop, clicked, provider=None, link_id=1)
    _feedback(shop, clicked, provider=None, link_id=1)  # the same report again
    assert _message(shop, message_id).status == "sent"
    assert len(_events(shop, "message.opened")) == 2
    (click,) = _events(shop, "message.clicked")
    assert click["properties"]["url"] == SALE and click["properties"]["link_id"] == 1
    assert "provider" not in click["properties"]
    assert _history(shop, message_id)[2:] == ["opened", "opened", "clicked"]


def test_feedback_on_a_message_still_sending_keeps_its_status(shop: Shop) -> None:
    _templates(shop)
    sent = _enqueue(shop, "k1")
    with shop.hub.tx() as conn:
        conn.execute(
            update(messages).where(messages.c.id == sent.message_id).values(status="sending")
        )
    feedback = Feedback(FeedbackKind.DELIVERED, shop.hub.clock.now(), message_id=sent.message_id)
    assert _feedback(shop, feedback) == sent.message_id
    assert _message(shop, sent.message_id).status == "sending"  # the dispatcher records next
    assert len(_events(shop, "message.delivered")) == 1


def test_failures_after_acceptance_are_recorded_with_their_reason(shop: Shop) -> None:
    _templates(shop)
    message_id = _send(shop, "k1", user="cy", template="text", channel=Channel.SMS).sent[0].id
    failed = Feedback(
        FeedbackKind.FAILED, shop.hub.clock.now(), message_id=message_id, detail="error 30007"
    )
    _feedback(shop, failed)
    assert _message(shop, message_id).status == "failed"
    (event,) = _events(shop, "message.failed")
    assert event["properties"]["reason"] == "error 30007"
    assert event["properties"]["channel"] == "sms"
    assert _suppressed(shop) == {}


def test_hard_bounces_and_complaints_suppress_the_address(shop: Shop) -> None:
    _templates(shop)
    first, second = (m.id for m in _send(shop, "k1", "k2").sent)
    now = shop.hub.clock.now()
    bounced = Feedback(FeedbackKind.BOUNCED, now, message_id=first, bounce="hard", detail="550")
    _feedback(shop, bounced)
    assert _message(shop, first).status == "bounced"
    assert _suppressed(shop) == {"ann@example.com": "hard_bounce"}
    (event,) = _events(shop, "message.bounced")
    assert event["properties"]["bounce"] == "hard"
    _feedback(shop, Feedback(FeedbackKind.COMPLAINED, now, message_id=second))
    assert _message(shop, second).status == "complained"
    assert _suppressed(shop) == {"ann@example.com": "hard_bounce"}  # the first reason stays
    _feedback(shop, Feedback(FeedbackKind.DELIVERED, now, message_id=first))
    assert _message(shop, first).status == "bounced"  # statuses never move back


def test_soft_bounces_suppress_at_the_limit_within_the_window(
    shop: Shop, clock: ManualClock
) -> None:
    _templates(shop)
    ids = [m.id for m in _send(shop, "k1", "k2", "k3", "k4").sent]

    def soft(message_id: str) -> None:
        _feedback(
            shop,
            Feedback(FeedbackKind.BOUNCED, clock.now(), message_id=message_id, bounce="soft"),
            soft_bounce_limit=3,
            soft_bounce_days=30,
        )

    soft(ids[0])
    clock.advance(timedelta(days=31))
    soft(ids[1])
    soft(ids[2])
    assert _suppressed(shop) == {}  # the first one is out of the window
    soft(ids[3])
    assert _suppressed(shop) == {"ann@example.com": "soft_bounce"}
    assert len(_events(shop, "message.bounced")) == 4


def test_an_unsubscribe_revokes_the_consent_and_excludes_the_next_marketing_email(
    shop: Shop,
) -> None:
    _templates(shop)
    message_id = _send(shop, "k1").sent[0].id
    with shop.hub.engine.connect() as conn:
        rechecks = len(conn.execute(select(stream_recheck)).all())
    unsubscribed = Feedback(FeedbackKind.UNSUBSCRIBED, shop.hub.clock.now(), message_id=message_id)
    assert _feedback(shop, unsubscribed, provider="sendgrid") == message_id
    assert _consents(shop, "ann")[("email", "marketing")] == "opted_out"
    assert _consents(shop, "ann")[("sms", "marketing")] == "opted_in"  # others stay
    assert _suppressed(shop) == {}
    with shop.hub.engine.connect() as conn:
        assert len(conn.execute(select(stream_recheck)).all()) == rechecks + 1
    assert len(_events(shop, "message.unsubscribed")) == 1
    assert _message(shop, message_id).status == "sent"
    marketing = _enqueue(shop, "k2")
    assert (marketing.status, marketing.decision["reason"]) == ("excluded", "no_consent")
    assert _enqueue(shop, "k3", transactional=True).status == "queued"


# -- texts back -----------------------------------------------------------------------------------


def test_stop_and_start_revoke_and_restore_every_sms_purpose(
    shop: Shop, clock: ManualClock
) -> None:
    _templates(shop)

    def text(body: str) -> str | None:
        with shop.hub.tx() as conn:
            return apply_inbound_text(
                conn,
                shop.ws,
                InboundText("+1 415 555 0123", "+15005550006", body, clock.now()),
                brand="Shop",
                now=clock.now(),
            )

    assert text("see you") is None
    assert text("HELP") is not None and ("sms", "*") not in _consents(shop, "cy")
    reply = text("Stop.")
    assert reply is not None and reply.startswith("Shop: You are unsubscribed")
    assert _consents(shop, "cy")[("sms", "*")] == "opted_out"
    stopped = _enqueue(shop, "k1", user="cy", template="text")
    assert (stopped.status, stopped.decision["reason"]) == ("excluded", "no_consent")
    clock.advance(timedelta(minutes=5))
    reply = text("start")
    assert reply is not None and "subscribed again" in reply
    assert _consents(shop, "cy")[("sms", "*")] == "opted_in"
    assert _enqueue(shop, "k2", user="cy", template="text").status == "queued"
    assert _consents(shop, "ann").get(("sms", "*")) is None  # another number


@pytest.mark.parametrize("sender", ["+4915112345678", "+49 151 12345678"])
def test_a_number_is_found_by_the_phone_attribute(shop: Shop, sender: str) -> None:
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        apply_inbound_text(
            conn, shop.ws, InboundText(sender, "+15005550006", "STOP", now), brand="Shop", now=now
        )
    assert _consents(shop, "ann")[("sms", "*")] == "opted_out"
