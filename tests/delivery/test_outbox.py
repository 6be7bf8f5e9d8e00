"""Stored templates and rules, and the outbox: intents become messages, decided in the caller's
transaction, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from tests.delivery.conftest import Shop
from waymark.core.errors import Conflict, InvalidInput
from waymark.core.ids import new_id
from waymark.delivery import store
from waymark.delivery.outbox import Outbox, SendIntent, Source, read_content
from waymark.delivery.rules import Exclude, Hold, Reason, Send
from waymark.storage.tables import message_events, messages, push_subscriptions

WELCOME = {
    "channel": "email",
    "subject": "Hi {{ profile.first_name }}",
    "html": (
        "<p>Hello {{ profile.first_name }}</p>{% render 'footer', url: message.unsubscribe_url %}"
    ),
}
FOOTER = "<p><a href='{{ url }}'>Unsubscribe</a></p>"


def _templates(shop: Shop) -> None:
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        store.save_fragment(conn, shop.ws, name="footer", source=FOOTER, actor="t", now=now)
        store.save_template(conn, shop.ws, name="welcome", document=WELCOME, actor="t", now=now)
        store.save_template(
            conn,
            shop.ws,
            name="sms",
            document={"channel": "sms", "text": "Hi {{ profile.first_name }}"},
            actor="t",
            now=now,
        )
        store.save_template(
            conn,
            shop.ws,
            name="push",
            document={"channel": "push", "title": "Hi", "body": "{{ profile.first_name }}"},
            actor="t",
            now=now,
        )


def _rules(shop: Shop, document: dict[str, Any]) -> None:
    with shop.hub.tx() as conn:
        store.save_rules(conn, shop.ws, document, actor="t", now=shop.hub.clock.now())


def _send(
    shop: Shop, outbox: Outbox, user: str, key: str, template: str = "welcome", **kw: Any
) -> Any:
    intent = SendIntent(key, shop.ids[user], template, Source("campaign", "c1"), **kw)
    with shop.hub.tx() as conn:
        [out] = outbox.enqueue(conn, shop.ws, [intent], now=shop.hub.clock.now())
    return out


def _row(shop: Shop, message_id: str) -> Any:
    with shop.hub.engine.connect() as conn:
        return conn.execute(select(messages).where(messages.c.id == message_id)).one()


def test_templates_are_checked_when_saved_and_keep_their_channel(shop: Shop) -> None:
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn, pytest.raises(InvalidInput) as caught:
        store.save_template(
            conn,
            shop.ws,
            name="bad",
            document={"channel": "sms", "text": "{{ profile.frist_name }}"},
            actor="t",
            now=now,
        )
    assert "frist_name" in str(caught.value.issues[0])
    _templates(shop)
    with shop.hub.tx() as conn:
        again = store.save_template(
            conn, shop.ws, name="welcome", document={**WELCOME, "subject": "Yo"}, actor="t", now=now
        )
        assert again.version == 2
        with pytest.raises(InvalidInput, match="keeps its channel"):
            store.save_template(
                conn,
                shop.ws,
                name="welcome",
                document={"channel": "sms", "text": "x"},
                actor="t",
                now=now,
            )
    # a fragment is checked alone, and a change that breaks a template using it is refused
    with shop.hub.tx() as conn, pytest.raises(InvalidInput) as caught:
        store.save_fragment(
            conn, shop.ws, name="footer", source="{{ profile.nope }}", actor="t", now=now
        )
    assert "unknown attribute 'nope'" in str(caught.value.issues[0])
    with shop.hub.tx() as conn:
        store.save_template(
            conn,
            shop.ws,
            name="receipt",
            document={
                "channel": "sms",
                "event_type": "purchase",
                "text": "{% render 'footer', url: 'https://x.test' %}",
            },
            actor="t",
            now=now,
        )
    with shop.hub.tx() as conn, pytest.raises(InvalidInput) as caught:
        store.save_fragment(
            conn,
            shop.ws,
            name="footer",
            source="{{ event.properties.revnue }}",
            actor="t",
            now=now,
        )
    assert str(caught.value.issues[0]).startswith("template 'receipt'.text: event type")
    with shop.hub.tx() as conn, pytest.raises(Conflict, match="welcome"):
        store.delete_fragment(conn, shop.ws, "footer", actor="t", now=now)


def test_an_intent_becomes_a_rendered_queued_message_once(shop: Shop) -> None:
    _templates(shop)
    outbox = Outbox(public_url="https://hub.test/")
    first = _send(shop, outbox, "ann", "k1")
    assert first.status == "queued" and not first.duplicate
    again = _send(shop, outbox, "ann", "k1")
    assert again.duplicate and again.message_id == first.message_id
    row = _row(shop, first.message_id)
    assert row.to_address == "ann@example.com"  # compared and sent in normal form
    assert row.counted_at is not None and row.next_attempt_at is not None
    content = read_content(row.content)
    assert content.fields["subject"] == "Hi Ann"
    assert f"https://hub.test/t/{shop.ws}/u/" in content.fields["html"]  # signed: see feedback
    assert content.fields["text"].startswith("Hello Ann")
    with shop.hub.engine.connect() as conn:
        history = conn.execute(
            select(message_events.c.status, message_events.c.detail).where(
                message_events.c.message_id == first.message_id
            )
        ).all()
    assert [(h.status, h.detail["outcome"]) for h in history] == [("queued", "send")]


def test_each_exclusion_is_recorded_with_its_reason(shop: Shop) -> None:
    _templates(shop)
    outbox = Outbox()
    bob = _send(shop, outbox, "bob", "b")  # opted out of email marketing
    assert (bob.status, bob.decision["reason"]) == ("excluded", "no_consent")
    cy = _send(shop, outbox, "cy", "c")  # no consent statement at all
    assert cy.decision["reason"] == "no_consent" and "consent: none" in cy.decision["detail"]
    dee = _send(shop, outbox, "dee", "d")  # no email address
    assert dee.decision["reason"] == "no_address"
    bad = _send(shop, outbox, "ann", "e", to="not an address")
    assert bad.decision["reason"] == "invalid_address"
    with shop.hub.tx() as conn:
        assert store.suppress(
            conn,
            shop.ws,
            channel="email",
            address=" ANN@example.COM",
            reason="hard_bounce",
            source="test",
            now=shop.hub.clock.now(),
        )
    ann = _send(shop, outbox, "ann", "f")
    assert ann.decision["reason"] == "suppressed" and "hard_bounce" in ann.decision["detail"]
    row = _row(shop, ann.message_id)
    assert (row.status, row.reason, row.counted_at) == ("excluded", "suppressed", None)
    # transactional messages need no consent (but a hard bounce still blocks them)
    receipt = _send(shop, outbox, "cy", "g", transactional=True, purpose="receipt")
    assert receipt.status == "queued"


def test_caps_count_across_sources_and_a_rule_change_applies_to_the_next_message(
    shop: Shop,
) -> None:
    _templates(shop)
    outbox = Outbox()
    _rules(shop, {"caps": [{"name": "weekly", "channel": "email", "limit": 2, "per": "7d"}]})
    assert _send(shop, outbox, "ann", "1").status == "queued"
    shop.hub.clock.advance(timedelta(days=1))  # type: ignore[attr-defined]
    intent = SendIntent("2", shop.ids["ann"], "welcome", Source("journey", "j1:step3"))
    with shop.hub.tx() as conn:
        [second] = outbox.enqueue(conn, shop.ws, [intent], now=shop.hub.clock.now())
    assert second.status == "queued"
    third = _send(shop, outbox, "ann", "3")
    assert (third.status, third.decision["rule"]) == ("excluded", "weekly")
    assert "2 of 2 in the last 7 days" in third.decision["detail"]
    assert _send(shop, outbox, "ann", "4", transactional=True).status == "queued"
    # the oldest ages out six days later
    shop.hub.clock.advance(timedelta(days=6, seconds=1))  # type: ignore[attr-defined]
    assert _send(shop, outbox, "ann", "5").status == "queued"
    _rules(shop, {"caps": [{"name": "tight", "channel": "email", "limit": 1, "per": "1d"}]})
    six = _send(shop, outbox, "ann", "6")
    assert (six.status, six.decision["rule"], six.decision["rules_version"]) == (
        "excluded",
        "tight",
        2,
    )


def _redecide(shop: Shop, outbox: Outbox, message_id: str) -> Any:
    with shop.hub.tx() as conn:
        row = dict(_row(shop, message_id)._mapping)
        return outbox.redecide(conn, shop.ws, [row], now=shop.hub.clock.now())[message_id]


def test_send_time_decisions_read_rules_changed_since_the_last_one(shop: Shop) -> None:
    """At send time the outbox reads the rules' version with the facts, in one statement,
    counting messages as far back as the rules it read last ask; a new version (here a longer
    cap window) is read first, and its window counts. Suppressions read in that statement
    exclude too."""
    _templates(shop)
    outbox = Outbox()
    _rules(shop, {"caps": [{"name": "hourly", "channel": "email", "limit": 1, "per": "1h"}]})
    first = _send(shop, outbox, "ann", "w1")
    assert first.status == "queued"
    shop.hub.clock.advance(timedelta(hours=2))  # type: ignore[attr-defined]
    later = _send(shop, outbox, "ann", "w2")
    assert later.status == "queued"
    assert isinstance(_redecide(shop, outbox, later.message_id), Send)  # "w1" is 2 h old
    _rules(shop, {"caps": [{"name": "daily", "channel": "email", "limit": 1, "per": "1d"}]})
    again = _redecide(shop, outbox, later.message_id)
    assert isinstance(again, Exclude)
    assert (again.reason, again.rule) == (Reason.FREQUENCY_CAP, "daily")  # "w1" is in a day
    assert isinstance(_redecide(shop, outbox, later.message_id), Exclude)  # the same version
    _rules(shop, {})
    assert isinstance(_redecide(shop, outbox, later.message_id), Send)
    with shop.hub.tx() as conn:
        store.suppress(
            conn,
            shop.ws,
            channel="email",
            address="ann@example.com",
            reason="complaint",
            source="test",
            now=shop.hub.clock.now(),
        )
    suppressed = _redecide(shop, outbox, later.message_id)
    assert isinstance(suppressed, Exclude) and suppressed.reason is Reason.SUPPRESSED


def test_quiet_hours_hold_until_the_window_ends_in_the_recipients_zone(shop: Shop) -> None:
    _templates(shop)
    outbox = Outbox()
    _rules(shop, {"quiet_hours": [{"name": "night", "start": "21:00", "end": "08:00"}]})
    # 12:00 UTC is 21:00 in Tokyo and 13:00 in Berlin
    cy = _send(shop, outbox, "cy", "q1", template="sms")
    ann = _send(shop, outbox, "ann", "q2", template="sms")
    assert (cy.status, ann.status) == ("held", "queued")
    row = _row(shop, cy.message_id)
    assert row.next_attempt_at == datetime(2026, 3, 1, 23, 0, tzinfo=UTC)  # 08:00 in Tokyo
    assert row.counted_at is None  # counted when it is released


def test_a_batch_writes_many_intents_and_the_same_key_twice_is_one_message(shop: Shop) -> None:
    _templates(shop)
    outbox = Outbox()
    intents = [
        SendIntent(f"batch-{u}", shop.ids[u], "sms", Source("campaign", "c2")) for u in shop.ids
    ]
    intents.append(intents[0])
    with shop.hub.tx() as conn:
        out = outbox.enqueue(conn, shop.ws, intents, now=shop.hub.clock.now())
    assert [o.status for o in out] == ["queued", "excluded", "queued", "excluded", "queued"]
    assert out[-1].duplicate and out[-1].message_id == out[0].message_id
    with shop.hub.engine.connect() as conn:
        assert len(conn.execute(select(messages.c.id)).all()) == 4


def test_bad_intents_are_refused_whole_with_each_problem_named(shop: Shop) -> None:
    _templates(shop)
    outbox = Outbox()
    intents = [
        SendIntent("ok", shop.ids["ann"], "welcome", Source("api")),
        SendIntent("", shop.ids["ann"], "nope", Source("cron")),
        SendIntent("x", "no-such-profile", "welcome", Source("api"), context={"profile": {}}),
    ]
    with shop.hub.tx() as conn, pytest.raises(InvalidInput) as caught:
        outbox.enqueue(conn, shop.ws, intents, now=shop.hub.clock.now())
    found = [str(i) for i in caught.value.issues]
    assert found[:3] == [
        "[1].key: must be 1 to 200 characters",
        "[1].source: unknown source 'cron'; one of api, campaign, journey, test",
        "[2].context: profile cannot be given: the outbox sets them",
    ]
    with shop.hub.engine.connect() as conn:
        assert conn.execute(select(messages.c.id)).all() == []


def test_a_render_failure_is_a_failed_message_with_the_field(shop: Shop) -> None:
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        store.save_template(
            conn,
            shop.ws,
            name="strict",
            document={"channel": "sms", "text": "{{ profile.city }}", "missing": "skip"},
            actor="t",
            now=now,
        )
    out = _send(shop, Outbox(), "ann", "s", template="strict")
    assert (out.status, out.decision["reason"], out.decision["field"]) == (
        "failed",
        "render_failed",
        "text",
    )


def test_push_intents_go_to_each_subscription(shop: Shop) -> None:
    _templates(shop)
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        for n in range(2):
            conn.execute(
                push_subscriptions.insert().values(
                    id=new_id(),
                    workspace_id=shop.ws,
                    profile_id=shop.ids["ann"],
                    kind="fcm",
                    address=f"token-{n}",
                    address_hash=f"h{n}",
                    created_at=now + timedelta(seconds=n),
                    last_seen_at=now,
                )
            )
    intent = SendIntent("p", shop.ids["ann"], "push", Source("journey", "j"))
    lonely = SendIntent("p", shop.ids["cy"], "push", Source("journey", "j2"))
    with shop.hub.tx() as conn:
        out = outbox_enqueue(conn, shop, [intent])
        none = outbox_enqueue(conn, shop, [lonely])
    assert [o.status for o in out] == ["queued", "queued"]
    assert [o.key.split("/")[0] for o in out] == ["p", "p"]
    assert [_row(shop, o.message_id).to_address for o in out] == ["token-0", "token-1"]
    assert none[0].decision["reason"] == "no_address"


def outbox_enqueue(conn: Any, shop: Shop, intents: list[SendIntent]) -> Any:
    return Outbox().enqueue(conn, shop.ws, intents, now=shop.hub.clock.now())


def test_two_concurrent_senders_never_exceed_a_cap(shop: Shop) -> None:
    """The first sender holds its transaction open after counting; the second must wait for
    it and then see its message (without the cap lock it would count none and send too)."""
    _templates(shop)
    _rules(shop, {"caps": [{"name": "one", "channel": "email", "limit": 1, "per": "1d"}]})
    counted = threading.Event()
    results: dict[str, str] = {}

    def sender(name: str, hold: float) -> None:
        outbox = Outbox()
        with shop.hub.tx() as conn:
            if name == "second":
                counted.wait(5)
            intent = SendIntent(name, shop.ids["ann"], "welcome", Source("journey", name))
            [out] = outbox.enqueue(conn, shop.ws, [intent], now=shop.hub.clock.now())
            results[name] = out.status
            if name == "first":
                counted.set()
                time.sleep(hold)

    threads = [
        threading.Thread(target=sender, args=("first", 0.5)),
        threading.Thread(target=sender, args=("second", 0)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == {"first": "queued", "second": "excluded"}


def test_two_concurrent_rule_saves_give_two_versions(shop: Shop) -> None:
    """The first save holds its transaction open; the second waits for it and writes the
    version after it (deciders keep rules by version: one number, one document)."""
    _rules(shop, {})  # version 1: both saves below update it
    saved = threading.Event()
    versions: dict[str, int] = {}

    def saver(name: str, limit: int) -> None:
        with shop.hub.tx() as conn:
            if name == "second":
                saved.wait(5)
            document = {"caps": [{"name": name, "channel": "email", "limit": limit, "per": "1d"}]}
            versions[name] = store.save_rules(
                conn, shop.ws, document, actor="t", now=shop.hub.clock.now()
            ).version
            if name == "first":
                saved.set()
                time.sleep(0.5)

    threads = [
        threading.Thread(target=saver, args=("first", 1)),
        threading.Thread(target=saver, args=("second", 2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert versions == {"first": 2, "second": 3}
    with shop.hub.engine.connect() as conn:
        current = store.current_rules(conn, shop.ws)
    assert (current.version, current.rules.caps[0].name) == (3, "second")


def test_deciding_again_at_send_time_sees_changes_and_not_the_message_itself(shop: Shop) -> None:
    _templates(shop)
    outbox = Outbox()
    _rules(shop, {"caps": [{"name": "one", "channel": "email", "limit": 1, "per": "1d"}]})
    out = _send(shop, outbox, "ann", "r1")
    row = _row(shop, out.message_id)._asdict()
    with shop.hub.tx() as conn:
        decided = outbox.redecide(conn, shop.ws, [row], now=shop.hub.clock.now())
    assert isinstance(decided[out.message_id], Send)  # its own slot is not counted against it
    _rules(shop, {"quiet_hours": [{"name": "always", "start": "00:00", "end": "23:59"}]})
    with shop.hub.tx() as conn:
        decided = outbox.redecide(conn, shop.ws, [row], now=shop.hub.clock.now())
    assert isinstance(decided[out.message_id], Hold)
    _rules(shop, {})
    from waymark.ingestion.pipeline import Ingestor

    Ingestor(shop.hub).native_profiles(
        shop.ws,
        {
            "profiles": [
                {
                    "identities": {"user_id": "ann"},
                    "timestamp": shop.hub.clock.now().isoformat(),
                    "consents": [
                        {
                            "channel": "email",
                            "purpose": "marketing",
                            "status": "opted_out",
                            "timestamp": shop.hub.clock.now().isoformat(),
                        }
                    ],
                }
            ]
        },
    )
    with shop.hub.tx() as conn:
        decided = outbox.redecide(conn, shop.ws, [row], now=shop.hub.clock.now())
    assert decided[out.message_id].to_json()["reason"] == "no_consent"
    assert orjson.loads(row["content"])["channel"] == "email"


def test_a_test_sends_links_never_unsubscribe_the_real_profile(shop: Shop) -> None:
    from waymark.delivery.feedback import tracking_keys
    from waymark.delivery.tracking import BadToken, read_unsubscribe

    _templates(shop)
    outbox = Outbox(public_url="https://hub.test")
    real = _send(shop, outbox, "ann", "real")
    test = SendIntent("t", shop.ids["ann"], "welcome", Source("test"), transactional=True)
    with shop.hub.tx() as conn:
        [seed] = outbox.enqueue(conn, shop.ws, [test], now=shop.hub.clock.now())
        keys = tracking_keys(conn, shop.ws)

    def token(message_id: str) -> str:
        html = read_content(_row(shop, message_id).content).fields["html"]
        return html.split(f"/t/{shop.ws}/u/")[1].split("'")[0]

    assert read_unsubscribe(keys, token(real.message_id)).profile_id == shop.ids["ann"]
    with pytest.raises(BadToken):
        read_unsubscribe(keys, token(seed.message_id))
