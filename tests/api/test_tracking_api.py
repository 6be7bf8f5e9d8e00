"""The public tracking pages and provider callbacks, through the HTTP API on both backends."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from tests.api.conftest import Api
from tests.delivery.conftest import PEOPLE, SCHEMA
from waymark.api.app import create_app
from waymark.api.errors import waymark_error_handler
from waymark.api.tracking import add_tracking_routes
from waymark.channels.base import OutgoingMessage, RecordingProvider
from waymark.channels.sms import twilio_signature
from waymark.core.clock import ManualClock
from waymark.core.errors import WaymarkError
from waymark.delivery import store
from waymark.delivery.dispatcher import Dispatcher, DispatchSettings
from waymark.delivery.feedback import Tracker, stored_tracking_keys
from waymark.delivery.outbox import Outbox, SendIntent, Source
from waymark.delivery.templates import Channel
from waymark.delivery.tracking import PIXEL_GIF
from waymark.hub import Hub
from waymark.ingestion.pipeline import Ingestor
from waymark.model.events import Identity
from waymark.profiles import service as profiles
from waymark.profiles.schema_store import save_schema
from waymark.storage.tables import consents, event_inbox, messages, suppressions, workspaces

PUBLIC = "https://hub.test"
AUTH_TOKEN = "twilio-auth-token"
SALE = "https://shop.example/sale?x=1&y=ü"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PROMO = {
    "channel": "email",
    "subject": "Hi {{ profile.first_name }}",
    "html": f'<p><a href="{SALE}">Sale</a></p>',
}


@dataclass
class Site:
    api: Api
    hub: Hub
    ws: str
    ids: dict[str, str]
    signing_key: ec.EllipticCurvePrivateKey

    @property
    def client(self) -> TestClient:
        return self.api.client


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture
def site(api: Api) -> Iterator[Site]:
    """The ``api`` workspace with the delivery test people and providers configured for the
    callbacks, served by an app built with those settings."""
    hub = api.hub
    signing_key = ec.generate_private_key(ec.SECP256R1())
    hub.settings = hub.settings.model_copy(
        update={
            "public_url": PUBLIC,
            "providers": {
                "sms": {"kind": "twilio", "account_sid": "AC1", "auth_token": AUTH_TOKEN},
                "email": {
                    "kind": "sendgrid",
                    "api_key": "k",
                    "event_public_key": _pem(signing_key),
                },
            },
        }
    )
    # an app built after the settings changed: its tracking routes know the public URL
    with TestClient(create_app(hub, background=False)) as client:
        api = dataclasses.replace(api, client=client)
        now = hub.clock.now()
        with hub.tx() as conn:
            save_schema(conn, workspace_id=api.workspace_id, document=SCHEMA, actor="t", at=now)
            store.save_template(
                conn, api.workspace_id, name="promo", document=PROMO, actor="t", now=now
            )
            store.save_template(
                conn,
                api.workspace_id,
                name="text",
                document={"channel": "sms", "text": "Hi"},
                actor="t",
                now=now,
            )
        records = []
        for user, (email, phone, _zone, consent) in PEOPLE.items():
            attributes = {k: v for k, v in (("email", email), ("phone", phone)) if v}
            statements = [{"channel": "sms", "purpose": "marketing", "status": "opted_in"}]
            if consent:
                statements.append({"channel": "email", "purpose": "marketing", "status": consent})
            records.append(
                {
                    "identities": {"user_id": user},
                    "attributes": attributes,
                    "timestamp": now.isoformat(),
                    "consents": [{**s, "timestamp": now.isoformat()} for s in statements],
                }
            )
        assert Ingestor(hub).native_profiles(api.workspace_id, {"profiles": records}).accepted == 4
        with hub.engine.connect() as conn:
            ids = {
                u: profiles.find_profile_id(conn, api.workspace_id, Identity("user_id", u))
                for u in PEOPLE
            }
        yield Site(api, hub, api.workspace_id, ids, signing_key)


def _send(
    site: Site, *keys: str, user: str = "ann", template: str = "promo", receipt: bool = False
) -> list[OutgoingMessage]:
    """Enqueue a message per key and send them all (email tracked, SMS through "twilio")."""
    outbox = Outbox(public_url=PUBLIC)
    intents = [
        SendIntent(k, site.ids[user], template, Source("campaign", "c1"), transactional=receipt)
        for k in keys
    ]
    with site.hub.tx() as conn:
        outbox.enqueue(conn, site.ws, intents, now=site.hub.clock.now())
    channel = Channel.SMS if template == "text" else Channel.EMAIL
    provider = RecordingProvider(channel, name="twilio" if channel is Channel.SMS else "sendgrid")
    dispatcher = Dispatcher(
        site.hub,
        {channel: lambda: provider},
        outbox=outbox,
        settings=DispatchSettings(workers=1),
        content_hook=Tracker(PUBLIC).content_hook(site.hub),
        draw=lambda: 0.0,
    )
    dispatcher.run_until_idle()
    dispatcher.close()
    return provider.sent


def _path(url: str) -> str:
    return urlsplit(url).path


def _link(message: OutgoingMessage, kind: str) -> str:
    """The first tracking link of ``kind`` (``c``, ``o``) in the message's HTML, as a path."""
    html = message.content.fields["html"]
    start = html.index(f"{PUBLIC}/t/")
    while f"/{kind}/" not in html[start : start + 80]:
        start = html.index(f"{PUBLIC}/t/", start + 1)
    return _path(html[start : html.index('"', start)])


def _events(site: Site, name: str) -> list[dict[str, Any]]:
    with site.hub.engine.connect() as conn:
        rows = conn.execute(select(event_inbox).where(event_inbox.c.name == name)).mappings()
        return [{**r, "properties": orjson.loads(r["properties"])} for r in rows]


def _consent(site: Site, user: str, channel: str, purpose: str) -> str | None:
    with site.hub.engine.connect() as conn:
        return conn.execute(
            select(consents.c.status).where(
                consents.c.profile_id == site.ids[user],
                consents.c.channel == channel,
                consents.c.purpose == purpose,
            )
        ).scalar()


def _status(site: Site, message_id: str) -> str:
    with site.hub.engine.connect() as conn:
        return str(
            conn.execute(select(messages.c.status).where(messages.c.id == message_id)).scalar_one()
        )


def _tamper(path: str) -> str:
    head, token = path.rsplit("/", 1)
    flipped = "A" if token[10] != "A" else "B"
    return f"{head}/{token[:10]}{flipped}{token[11:]}"


def _secure_page(response: Any) -> str:
    assert response.headers["content-type"].startswith("text/html")
    assert "no-store" in response.headers["cache-control"]
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "<script" not in response.text.lower()
    return str(response.text)


# -- recipients -----------------------------------------------------------------------------------


def test_a_click_redirects_to_its_destination_and_records_the_event(site: Site) -> None:
    (message,) = _send(site, "k1")
    answer = site.client.get(_link(message, "c"), follow_redirects=False)
    assert answer.status_code == 302
    assert answer.headers["location"] == "https://shop.example/sale?x=1&y=%C3%BC"
    assert site.hub.inbox_signal.is_set()
    (event,) = _events(site, "message.clicked")
    assert event["profile_id"] == site.ids["ann"]
    assert event["properties"] == {
        "message_id": message.id,
        "channel": "email",
        "purpose": "marketing",
        "template": "promo",
        "source": "campaign",
        "source_id": "c1",
        "url": SALE,
        "link_id": 1,
    }


def test_a_tampered_or_foreign_click_token_is_a_404_and_never_a_redirect(site: Site) -> None:
    (message,) = _send(site, "k1")
    good = _link(message, "c")
    for path in (
        _tamper(good),
        good.replace(site.ws, "0" * 36),
        good.replace(site.ws, "bad%00id"),
        f"/t/{site.ws}/c/not-a-token",
        _link(message, "o").removesuffix(".gif").replace("/o/", "/c/"),  # another purpose
    ):
        answer = site.client.get(path, follow_redirects=False)
        assert answer.status_code == 404, path
        assert "location" not in answer.headers
        _secure_page(answer)
    assert _events(site, "message.clicked") == []


def test_the_pixel_is_served_for_any_token_and_records_good_opens_only(site: Site) -> None:
    (message,) = _send(site, "k1")
    good = _link(message, "o")
    for path in (good, _tamper(good), f"/t/{site.ws}/o/garbage.gif", "/t/nobody/o/x.gif"):
        answer = site.client.get(path)
        assert answer.status_code == 200 and answer.content == PIXEL_GIF
        assert answer.headers["content-type"] == "image/gif"
        assert "no-store" in answer.headers["cache-control"]
    (event,) = _events(site, "message.opened")
    assert event["properties"]["message_id"] == message.id
    assert _status(site, message.id) == "sent"


def test_get_shows_an_unsubscribe_form_and_only_post_unsubscribes(site: Site) -> None:
    with site.hub.tx() as conn:
        conn.execute(
            update(workspaces)
            .where(workspaces.c.id == site.ws)
            .values(settings={"brand": "<b>Shop</b>"})
        )
    (message,) = _send(site, "k1")
    assert message.unsubscribe_url is not None
    path = _path(message.unsubscribe_url)
    page = site.client.get(path)
    assert page.status_code == 200
    html = _secure_page(page)
    assert '<form method="post">' in html and "marketing email" in html
    assert "&lt;b&gt;Shop&lt;/b&gt;" in html and "<b>Shop" not in html
    assert _consent(site, "ann", "email", "marketing") == "opted_in"  # GET changed nothing
    done = site.client.post(path, content=b"List-Unsubscribe=One-Click")  # RFC 8058
    assert done.status_code == 200 and "unsubscribed" in _secure_page(done)
    assert _consent(site, "ann", "email", "marketing") == "opted_out"
    assert len(_events(site, "message.unsubscribed")) == 1
    with site.hub.tx() as conn:
        (next_one,) = Outbox(public_url=PUBLIC).enqueue(
            conn,
            site.ws,
            [SendIntent("k2", site.ids["ann"], "promo", Source("campaign", "c2"))],
            now=site.hub.clock.now(),
        )
        assert not conn.execute(select(suppressions)).all()  # consent only
    assert (next_one.status, next_one.decision["reason"]) == ("excluded", "no_consent")
    assert site.client.post(_tamper(path)).status_code == 404


def test_the_preference_page_round_trips(site: Site) -> None:
    (message,) = _send(site, "k1")
    html = message.content.fields["html"]
    assert "/p/" not in html  # this template links none: build the link as the outbox does
    with site.hub.engine.connect() as conn:
        keys = stored_tracking_keys(conn, site.ws)
    assert keys is not None
    path = _path(
        Tracker(PUBLIC).preferences_url(
            keys, site.ws, message_id=message.id, profile_id=site.ids["ann"]
        )
    )
    page = _secure_page(site.client.get(path))
    assert 'value="email:marketing" checked' in page
    assert 'value="sms:marketing" checked' in page
    form = [
        ("shown", "email:marketing"),
        ("shown", "sms:marketing"),
        ("shown", "push:news"),
        ("on", "sms:marketing"),
        ("on", "push:news"),
    ]
    saved = site.client.post(path, content=urlencode(form), headers=FORM)
    assert saved.status_code == 200 and "saved" in _secure_page(saved)
    assert _consent(site, "ann", "email", "marketing") == "opted_out"
    assert _consent(site, "ann", "sms", "marketing") == "opted_in"
    assert _consent(site, "ann", "push", "news") == "opted_in"
    again = _secure_page(site.client.get(path))
    assert 'value="email:marketing">' in again and 'value="push:news" checked' in again
    bad = site.client.post(path, data={"shown": "fax:marketing", "on": "fax:marketing"})
    assert bad.status_code == 400
    assert site.client.post(_tamper(path), content=urlencode(form), headers=FORM).status_code == 404


# -- Twilio ---------------------------------------------------------------------------------------


def _twilio(site: Site, endpoint: str, params: dict[str, str], *, token: str = AUTH_TOKEN) -> Any:
    url = f"{PUBLIC}/hooks/{site.ws}/twilio/{endpoint}"
    signature = twilio_signature(token, url, params)
    return site.client.post(_path(url), data=params, headers={"X-Twilio-Signature": signature})


def test_twilio_status_callbacks_are_verified_and_recorded(site: Site) -> None:
    (message,) = _send(site, "k1", user="cy", template="text")
    with site.hub.engine.connect() as conn:
        sid = conn.execute(
            select(messages.c.provider_id).where(messages.c.id == message.id)
        ).scalar_one()
    params = {"MessageSid": sid, "MessageStatus": "delivered", "To": "+14155550123"}
    assert _twilio(site, "status", params, token="wrong").status_code == 403
    assert site.client.post(f"/hooks/{site.ws}/twilio/status", data=params).status_code == 403
    assert _status(site, message.id) == "sent"
    assert _twilio(site, "status", params).status_code == 204
    assert _twilio(site, "status", params).status_code == 204  # Twilio retried
    assert _status(site, message.id) == "delivered"
    (event,) = _events(site, "message.delivered")
    assert event["properties"]["provider"] == "twilio"
    bounce = {**params, "MessageStatus": "undelivered", "ErrorCode": "30005"}
    assert _twilio(site, "status", bounce).status_code == 204
    with site.hub.engine.connect() as conn:
        assert conn.execute(select(suppressions.c.reason)).scalars().all() == ["hard_bounce"]


def test_stop_then_start_by_text(site: Site, clock: ManualClock) -> None:
    def text(body: str) -> Any:
        params = {"From": "+14155550123", "To": "+15005550006", "Body": body, "MessageSid": "SM1"}
        answer = _twilio(site, "inbound", params)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/xml")
        return answer.text

    with site.hub.tx() as conn:
        conn.execute(
            update(workspaces).where(workspaces.c.id == site.ws).values(settings={"brand": "A&B"})
        )
    stopped = text("STOP")
    assert "<Message>A&amp;B: You are unsubscribed" in stopped
    assert _consent(site, "cy", "sms", "*") == "opted_out"
    clock.advance(timedelta(seconds=5))
    assert "subscribed again" in text("start")
    assert _consent(site, "cy", "sms", "*") == "opted_in"
    assert text("what time do you open?").endswith("<Response/>")


def test_twilio_callbacks_need_a_configured_sms_provider(site: Site) -> None:
    hub = dataclasses.replace(
        site.hub, settings=site.hub.settings.model_copy(update={"providers": {}})
    )
    app = FastAPI()
    app.add_exception_handler(WaymarkError, waymark_error_handler)
    add_tracking_routes(app, hub, Tracker(PUBLIC))
    with TestClient(app) as client:
        params = {"From": "+14155550123", "To": "+15005550006", "Body": "STOP"}
        url = f"{PUBLIC}/hooks/{site.ws}/twilio/inbound"
        headers = {"X-Twilio-Signature": twilio_signature(AUTH_TOKEN, url, params)}
        answer = client.post(_path(url), data=params, headers=headers)
        assert answer.status_code == 403
        events = client.post(f"/hooks/{site.ws}/sendgrid/events", content=b"[]")
        assert events.status_code == 403
    assert _consent(site, "cy", "sms", "*") is None


# -- SendGrid -------------------------------------------------------------------------------------


def _sendgrid(site: Site, events: list[dict[str, Any]], *, key: Any = None) -> Any:
    body = orjson.dumps(events)
    timestamp = "1772366400"
    signer = key or site.signing_key
    signature = signer.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    headers = {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        "Content-Type": "application/json",
    }
    return site.client.post(f"/hooks/{site.ws}/sendgrid/events", content=body, headers=headers)


def _event(message: OutgoingMessage, kind: str, at: int, **extra: Any) -> dict[str, Any]:
    return {
        "event": kind,
        "email": message.to,
        "timestamp": at,
        "sg_message_id": f"sg-{message.id}.filter0001",
        "waymark_message_id": message.id,
        **extra,
    }


def test_sendgrid_events_are_verified_and_recorded_once(site: Site) -> None:
    (message,) = _send(site, "k1")
    delivered = [_event(message, "delivered", 1772366000), _event(message, "open", 1772366100)]
    forged = _sendgrid(site, delivered, key=ec.generate_private_key(ec.SECP256R1()))
    assert forged.status_code == 403
    unsigned = site.client.post(
        f"/hooks/{site.ws}/sendgrid/events", content=orjson.dumps(delivered)
    )
    assert unsigned.status_code == 403
    assert _events(site, "message.delivered") == []
    assert _sendgrid(site, delivered).status_code == 204
    assert _sendgrid(site, delivered).status_code == 204  # SendGrid delivered the batch twice
    assert len(_events(site, "message.delivered")) == 1
    assert len(_events(site, "message.opened")) == 1
    assert _status(site, message.id) == "delivered"
    assert _sendgrid(site, [{"event": 3}]).status_code == 400


def test_sendgrid_bounces_suppress_hard_at_once_and_soft_at_the_limit(site: Site) -> None:
    (hard,) = _send(site, "h1", user="cy", receipt=True)
    soft = _send(site, "s1", "s2", "s3")
    assert _sendgrid(site, [_event(hard, "bounce", 1772366000, type="bounce")]).status_code == 204
    with site.hub.engine.connect() as conn:
        assert dict(conn.execute(select(suppressions.c.address, suppressions.c.reason)).all()) == {
            "cy@example.com": "hard_bounce"
        }
    for n, message in enumerate(soft):
        batch = [_event(message, "bounce", 1772366000 + n, type="blocked", reason="mailbox full")]
        assert _sendgrid(site, batch).status_code == 204
        with site.hub.engine.connect() as conn:
            reasons = dict(
                conn.execute(select(suppressions.c.address, suppressions.c.reason)).all()
            )
        assert reasons.get("ann@example.com") == ("soft_bounce" if n == 2 else None)
    assert {e["properties"]["bounce"] for e in _events(site, "message.bounced")} == {"hard", "soft"}
