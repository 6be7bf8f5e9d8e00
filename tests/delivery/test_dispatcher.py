"""The dispatcher on SQLite and PostgreSQL: sending, retries, dead letters, breakers, rate limits,
decisions at send time, and crashes at every step losing nothing."""

from __future__ import annotations

import email
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from email import policy
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from tests.delivery.conftest import Shop
from waymark.channels.base import DeliveryResult, RecordingProvider
from waymark.channels.email import EmailSettings, SmtpProvider
from waymark.channels.sink import SinkSmtpServer, SinkStore
from waymark.core.ids import new_id
from waymark.delivery import store
from waymark.delivery.dispatcher import Dispatcher, DispatchSettings, pending
from waymark.delivery.feedback import tracking_keys
from waymark.delivery.outbox import Outbox, SendIntent, Source
from waymark.delivery.templates import Channel
from waymark.delivery.tracking import read_unsubscribe
from waymark.storage.tables import (
    dead_letters,
    event_inbox,
    inbox_messages,
    message_events,
    messages,
    push_subscriptions,
    suppressions,
)


class Crash(BaseException):
    """Stands for the process dying at a step."""


def _setup(shop: Shop, rules: dict[str, Any] | None = None) -> None:
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        store.save_template(
            conn,
            shop.ws,
            name="hello",
            document={
                "channel": "email",
                "subject": "Hello {{ profile.first_name }}",
                "html": "<p>Hi {{ profile.first_name }}</p>",
            },
            actor="t",
            now=now,
        )
        store.save_template(
            conn,
            shop.ws,
            name="card",
            document={"channel": "inbox", "title": "New", "body": "For {{ profile.first_name }}"},
            actor="t",
            now=now,
        )
        store.save_template(
            conn,
            shop.ws,
            name="ping",
            document={"channel": "push", "title": "Hi", "body": "{{ profile.first_name }}"},
            actor="t",
            now=now,
        )
        if rules is not None:
            store.save_rules(conn, shop.ws, rules, actor="t", now=now)


def _enqueue(shop: Shop, *keys: str, user: str = "ann", template: str = "hello") -> list[str]:
    intents = [SendIntent(k, shop.ids[user], template, Source("campaign", "c")) for k in keys]
    with shop.hub.tx() as conn:
        out = Outbox().enqueue(conn, shop.ws, intents, now=shop.hub.clock.now())
    return [o.message_id for o in out]


def _status(shop: Shop, message_id: str) -> Any:
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


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _dispatcher(shop: Shop, provider: Any, **kw: Any) -> Dispatcher:
    settings = kw.pop("settings", DispatchSettings(workers=1))
    channel = kw.pop("channel", Channel.EMAIL)
    return Dispatcher(
        shop.hub, {channel: lambda: provider}, settings=settings, draw=lambda: 0.0, **kw
    )


def test_queued_messages_are_sent_and_their_history_kept(shop: Shop) -> None:
    _setup(shop)
    ids = _enqueue(shop, "a", "b", "c")
    provider = RecordingProvider(Channel.EMAIL)
    dispatcher = _dispatcher(shop, provider, settings=DispatchSettings(workers=3))
    stats = dispatcher.run_until_idle()
    dispatcher.close()
    assert (stats.claimed, stats.sent) == (3, 3)
    assert sorted(m.id for m in provider.sent) == sorted(ids)
    sent = provider.sent[0]
    assert sent.content.fields["subject"] == "Hello Ann"
    assert sent.unsubscribe_url is None  # set by the tracking hook (next test)
    for message_id in ids:
        row = _status(shop, message_id)
        assert (row.status, row.provider, row.attempts) == ("sent", "recording", 1)
        assert row.provider_id.startswith("recording-")
        assert _history(shop, message_id) == ["queued", "sent"]
    with shop.hub.engine.connect() as conn:
        assert pending(conn, now=shop.hub.clock.now()) == 0
        sent_events = conn.execute(
            select(event_inbox.c.name, event_inbox.c.properties).where(
                event_inbox.c.name == "message.sent"
            )
        ).all()
    # each send is an event on the profile, for audiences and journeys
    assert sorted(orjson.loads(e.properties)["message_id"] for e in sent_events) == sorted(ids)
    assert orjson.loads(sent_events[0].properties)["template"] == "hello"


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[tuple[SinkStore, int]]:
    sink = SinkStore(tmp_path / "sink")
    with SinkSmtpServer(sink) as server:
        yield sink, server.port


def test_email_goes_through_a_real_smtp_server(shop: Shop, smtp_sink: Any) -> None:
    sink, port = smtp_sink
    _setup(shop)
    [message_id] = _enqueue(shop, "smtp")
    settings = EmailSettings(from_address="shop@example.com")
    provider = SmtpProvider(settings, host="127.0.0.1", port=port, security="none")
    outbox = Outbox(public_url="https://hub.test")
    dispatcher = _dispatcher(shop, provider, content_hook=outbox.tracker.content_hook(shop.hub))
    assert dispatcher.run_until_idle().sent == 1
    dispatcher.close()
    [entry] = sink.list()
    parsed = email.message_from_bytes(entry.raw, policy=policy.default)
    assert parsed["Subject"] == "Hello Ann" and parsed["To"] == "ann@example.com"
    assert parsed["Message-ID"].startswith(f"<{message_id}@")
    link = parsed["List-Unsubscribe"].strip().strip("<>")  # a long value is folded
    assert link.startswith(f"https://hub.test/t/{shop.ws}/u/")
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    with shop.hub.engine.connect() as conn:
        keys = tracking_keys(conn, shop.ws)
    request = read_unsubscribe(keys, link.rsplit("/", 1)[1])
    assert (request.message_id, request.profile_id) == (message_id, shop.ids["ann"])
    assert _status(shop, message_id).status == "sent"


def test_transient_failures_back_off_then_dead_letter(shop: Shop) -> None:
    _setup(shop)
    [message_id] = _enqueue(shop, "t")
    provider = RecordingProvider(Channel.EMAIL)
    provider.fail_next(
        DeliveryResult.failed("421 busy", transient=True),
        DeliveryResult.failed("429", transient=True, retry_after=600),
        DeliveryResult.failed("503", transient=True),
    )
    settings = DispatchSettings(workers=1, max_attempts=3, backoff_base=30, breaker_threshold=99)
    dispatcher = _dispatcher(shop, provider, settings=settings)
    assert dispatcher.run_once().retried == 1
    row = _status(shop, message_id)
    assert row.status == "queued" and row.next_attempt_at == shop.hub.clock.now() + timedelta(
        seconds=15
    )  # 30 s, jittered down to half
    assert dispatcher.run_once().claimed == 0  # not due yet
    shop.hub.clock.advance(timedelta(seconds=15))  # type: ignore[attr-defined]
    assert dispatcher.run_once().retried == 1
    row = _status(shop, message_id)
    assert row.next_attempt_at == shop.hub.clock.now() + timedelta(seconds=600)  # Retry-After
    shop.hub.clock.advance(timedelta(seconds=600))  # type: ignore[attr-defined]
    assert dispatcher.run_once().dead == 1
    row = _status(shop, message_id)
    assert (row.status, row.reason, row.attempts, row.counted_at) == (
        "dead",
        "retries_exhausted",
        3,
        None,
    )
    with shop.hub.engine.connect() as conn:
        letter = conn.execute(select(dead_letters)).one()
    assert (letter.message_id, letter.attempts, letter.last_error) == (message_id, 3, "503")
    assert _history(shop, message_id) == ["queued", "retrying", "retrying", "dead"]
    dispatcher.close()


def test_permanent_failures_and_gone_addresses(shop: Shop) -> None:
    _setup(shop)
    rejected, gone = _enqueue(shop, "p1", "p2")
    provider = RecordingProvider(Channel.EMAIL)
    provider.fail_next(
        DeliveryResult.failed("550 policy", transient=False),
        DeliveryResult.gone("550 no such user"),
    )
    dispatcher = _dispatcher(shop, provider)
    assert dispatcher.run_until_idle().failed == 2
    assert (_status(shop, rejected).status, _status(shop, rejected).reason) == (
        "failed",
        "provider_rejected",
    )
    assert _status(shop, gone).reason == "address_gone"
    with shop.hub.engine.connect() as conn:
        entry = conn.execute(select(suppressions)).one()
    assert (entry.address, entry.reason, entry.channel) == ("ann@example.com", "invalid", "email")
    # the next message to that address is excluded before it is written
    [later] = _enqueue(shop, "p3")
    assert _status(shop, later).reason == "suppressed"
    dispatcher.close()


def test_a_gone_push_subscription_is_pruned(shop: Shop) -> None:
    _setup(shop)
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        conn.execute(
            push_subscriptions.insert().values(
                id=new_id(),
                workspace_id=shop.ws,
                profile_id=shop.ids["ann"],
                kind="fcm",
                address="tok",
                address_hash="h",
                created_at=now,
                last_seen_at=now,
            )
        )
    _enqueue(shop, "push", template="ping")
    provider = RecordingProvider(Channel.PUSH)
    provider.fail_next(DeliveryResult.gone("UNREGISTERED"))
    dispatcher = _dispatcher(shop, provider, channel=Channel.PUSH)
    assert dispatcher.run_until_idle().failed == 1
    with shop.hub.engine.connect() as conn:
        assert conn.execute(select(push_subscriptions)).all() == []
    dispatcher.close()


def test_an_open_circuit_defers_without_spending_attempts(shop: Shop) -> None:
    _setup(shop)
    ids = _enqueue(shop, "b1", "b2", "b3", "b4")
    provider = RecordingProvider(Channel.EMAIL)
    provider.fail_next(*[DeliveryResult.failed("timeout", transient=True)] * 2)
    clock = FakeTime()
    settings = DispatchSettings(workers=1, breaker_threshold=2, breaker_cooldown=60)
    dispatcher = _dispatcher(
        shop, provider, settings=settings, monotonic=clock.monotonic, sleep=clock.sleep
    )
    stats = dispatcher.run_once()
    assert (stats.retried, stats.deferred) == (2, 2)
    deferred = [i for i in ids if _status(shop, i).attempts == 0]
    assert len(deferred) == 2 and all(_history(shop, i)[-1] == "deferred" for i in deferred)
    clock.now += 61  # half open: one trial, which succeeds and closes the circuit
    shop.hub.clock.advance(timedelta(minutes=10))  # type: ignore[attr-defined]
    stats = dispatcher.run_until_idle()
    assert stats.sent == 4 and len(provider.sent) == 4
    dispatcher.close()


def test_a_token_bucket_paces_sends(shop: Shop) -> None:
    _setup(shop)
    _enqueue(shop, *[f"r{n}" for n in range(5)])
    clock = FakeTime()
    settings = DispatchSettings(workers=1, rates={"email": 2.0}, burst=1)
    dispatcher = _dispatcher(
        shop,
        RecordingProvider(Channel.EMAIL),
        settings=settings,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
    )
    assert dispatcher.run_until_idle().sent == 5
    assert sum(clock.slept) == pytest.approx(2.0)  # 4 waits of half a second
    dispatcher.close()


def test_rules_are_applied_again_at_send_time(shop: Shop) -> None:
    _setup(shop)
    [suppressed] = _enqueue(shop, "x")
    with shop.hub.tx() as conn:
        store.suppress(
            conn,
            shop.ws,
            channel="email",
            address="ann@example.com",
            reason="complaint",
            source="t",
            now=shop.hub.clock.now(),
        )
    provider = RecordingProvider(Channel.EMAIL)
    assert _dispatcher(shop, provider).run_until_idle().excluded == 1
    row = _status(shop, suppressed)
    assert (row.status, row.reason, row.counted_at) == ("excluded", "suppressed", None)
    with shop.hub.tx() as conn:
        conn.execute(suppressions.delete())
    [quiet] = _enqueue(shop, "q")  # queued, then quiet hours start before it goes
    with shop.hub.tx() as conn:
        store.save_rules(
            conn,
            shop.ws,
            {"quiet_hours": [{"name": "all day", "start": "00:00", "end": "23:59"}]},
            actor="t",
            now=shop.hub.clock.now(),
        )
    assert _dispatcher(shop, provider).run_until_idle().held == 1
    row = _status(shop, quiet)
    assert (row.status, row.rule, row.counted_at) == ("held", "all day", None)
    assert row.next_attempt_at > shop.hub.clock.now()
    assert provider.sent == []


def test_in_app_messages_are_delivered_once_into_the_inbox(shop: Shop) -> None:
    _setup(shop)
    [message_id] = _enqueue(shop, "card", template="card")
    dispatcher = Dispatcher(shop.hub, {}, settings=DispatchSettings(workers=1))
    assert dispatcher.run_until_idle().sent == 1
    with shop.hub.engine.connect() as conn:
        [card] = conn.execute(select(inbox_messages)).all()
    assert card.message_id == message_id and card.content["fields"]["body"] == "For Ann"
    assert _status(shop, message_id).status == "sent"
    dispatcher.close()


@pytest.mark.parametrize("step", ["claimed", "sent", "recording", "recorded"])
def test_a_crash_at_any_step_loses_nothing(shop: Shop, step: str) -> None:
    """The dispatcher dies at ``step`` while sending the first of three messages; a new one
    delivers every message, and a provider deduplicating on the message id sees each once."""
    _setup(shop)
    ids = _enqueue(shop, "c1", "c2", "c3")
    provider = RecordingProvider(Channel.EMAIL)
    fired = threading.Event()

    def fault(at: str) -> None:
        if at == step and not fired.is_set():
            fired.set()
            raise Crash(at)

    settings = DispatchSettings(workers=1, batch=3)
    first = _dispatcher(shop, provider, settings=settings, fault=fault)
    with pytest.raises(Crash):
        first.run_until_idle()
    first.close()
    second = _dispatcher(shop, provider, settings=settings)
    second.run_until_idle()
    shop.hub.clock.advance(settings.lease + timedelta(seconds=1))  # type: ignore[attr-defined]
    second.run_until_idle()
    second.close()
    assert {_status(shop, i).status for i in ids} == {"sent"}
    delivered = [m.id for m in provider.sent]
    assert set(delivered) == set(ids)  # nothing lost
    duplicates = len(delivered) - len(set(delivered))
    # SMTP-like providers: at most the one message in flight when it died arrives twice
    assert duplicates == (1 if step in ("sent", "recording") else 0)


def test_two_dispatchers_share_the_work_without_sending_twice(shop: Shop) -> None:
    _setup(shop)
    ids = _enqueue(shop, *[f"s{n}" for n in range(40)])
    provider = RecordingProvider(Channel.EMAIL)
    settings = DispatchSettings(workers=2, batch=5)
    dispatchers = [_dispatcher(shop, provider, settings=settings) for _ in range(2)]
    threads = [threading.Thread(target=d.run_until_idle) for d in dispatchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for d in dispatchers:
        d.close()
    delivered = [m.id for m in provider.sent]
    assert sorted(delivered) == sorted(ids)


def test_a_message_without_a_provider_waits_and_is_kept(shop: Shop) -> None:
    _setup(shop)
    [message_id] = _enqueue(shop, "np")
    dispatcher = Dispatcher(shop.hub, {}, settings=DispatchSettings(workers=1), draw=lambda: 0)
    assert dispatcher.run_once().retried == 1
    row = _status(shop, message_id)
    assert row.status == "queued" and "no provider" in row.detail
    dispatcher.close()


def test_results_finishing_together_share_one_commit() -> None:
    from waymark.delivery.dispatcher import GroupCommit

    batches: list[list[int]] = []

    def commit(items: list[int]) -> None:
        time.sleep(0.05)  # a slow commit: the others pile up meanwhile
        if 13 in items:
            raise ValueError("disk full")
        batches.append(items)

    group = GroupCommit(commit)
    failed: list[int] = []

    def submit(n: int) -> None:
        try:
            group.submit(n)
        except ValueError:
            failed.append(n)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(n for b in batches for n in b) == list(range(12))  # each once
    assert len(batches) < 12  # shared
    submit(13)
    assert failed == [13]  # the batch's error reaches its submitters


def test_a_permanent_answer_to_the_trial_closes_the_circuit(shop: Shop) -> None:
    _setup(shop)
    _enqueue(shop, "t1", "t2", "t3")
    provider = RecordingProvider(Channel.EMAIL)
    provider.fail_next(
        DeliveryResult.failed("timeout", transient=True),
        DeliveryResult.failed("550 no such user", transient=False),
    )
    clock = FakeTime()
    settings = DispatchSettings(workers=1, batch=1, breaker_threshold=1, breaker_cooldown=60)
    dispatcher = _dispatcher(
        shop, provider, settings=settings, monotonic=clock.monotonic, sleep=clock.sleep
    )
    assert dispatcher.run_once().retried == 1  # opens the circuit
    assert dispatcher.run_once().deferred == 1
    clock.now += 61
    assert dispatcher.run_once().failed == 1  # the trial: refused, but the provider answered
    shop.hub.clock.advance(timedelta(minutes=30))  # type: ignore[attr-defined]
    assert dispatcher.run_until_idle().sent == 2  # not deferred for ever
    dispatcher.close()


def test_a_message_that_cannot_be_prepared_is_retried_and_the_others_go(shop: Shop) -> None:
    _setup(shop)
    ids = _enqueue(shop, "h1", "h2")

    def hook(row: Any, message: Any) -> Any:
        if row["id"] == ids[0]:
            raise RuntimeError("the store is unreachable")
        return message

    provider = RecordingProvider(Channel.EMAIL)
    dispatcher = _dispatcher(shop, provider, content_hook=hook)
    stats = dispatcher.run_once()
    dispatcher.close()
    assert (stats.sent, stats.retried) == (1, 1)
    row = _status(shop, ids[0])
    assert row.status == "queued" and "cannot prepare" in row.detail


def test_a_message_whose_lease_ran_out_on_every_attempt_goes_dead(shop: Shop) -> None:
    _setup(shop)
    [message_id] = _enqueue(shop, "l1")
    settings = DispatchSettings(workers=1, max_attempts=2)

    def fault(step: str) -> None:
        raise Crash(step)

    for _ in range(2):  # claimed, then the dispatcher dies, twice
        crashing = _dispatcher(
            shop, RecordingProvider(Channel.EMAIL), settings=settings, fault=fault
        )
        with pytest.raises(Crash):
            crashing.run_once()
        crashing.close()
        shop.hub.clock.advance(settings.lease + timedelta(seconds=1))  # type: ignore[attr-defined]
    stats = _dispatcher(shop, RecordingProvider(Channel.EMAIL), settings=settings).run_once()
    assert stats.dead == 1
    row = _status(shop, message_id)
    assert (row.status, row.reason, row.counted_at) == ("dead", "retries_exhausted", None)
    with shop.hub.engine.connect() as conn:
        assert conn.execute(select(dead_letters.c.attempts)).scalar_one() == 2


def test_caps_count_a_message_from_when_it_is_sent(shop: Shop) -> None:
    _setup(shop)
    [message_id] = _enqueue(shop, "late")
    shop.hub.clock.advance(timedelta(hours=5))  # type: ignore[attr-defined]
    _dispatcher(shop, RecordingProvider(Channel.EMAIL)).run_until_idle()
    assert _status(shop, message_id).counted_at == shop.hub.clock.now()
