"""Webhook messages end to end, against a real local HTTP server: outbox, dispatcher, the
provider's failures (500, 429 with Retry-After, a timeout) each visible in the message log, and a
crash after the send that the receiver's idempotency key makes harmless."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from sqlalchemy import select

from tests.delivery.conftest import Shop
from waymark.channels.webhook import WebhookProvider
from waymark.delivery import store
from waymark.delivery.dispatcher import Dispatcher, DispatchSettings
from waymark.delivery.outbox import Outbox, SendIntent, Source
from waymark.delivery.templates import Channel
from waymark.storage.tables import message_events, messages


class Receiver(BaseHTTPRequestHandler):
    """Answers the scripted statuses in turn, then 200; keeps one delivery per
    Idempotency-Key, as a receiver honouring it would."""

    script: ClassVar[list[tuple[int, dict[str, str], float]]] = []
    requests: ClassVar[list[str]] = []
    delivered: ClassVar[dict[str, bytes]] = {}
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        key = self.headers["Idempotency-Key"]
        with self.lock:
            type(self).requests.append(key)
            status, headers, pause = self.script.pop(0) if self.script else (200, {}, 0.0)
            if status == 200:
                type(self).delivered.setdefault(key, body)
        if pause:
            time.sleep(pause)
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"garbage")  # any 2xx body is fine for a webhook
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.script, Receiver.requests, Receiver.delivered = [], [], {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/hooks"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _hook(shop: Shop, url: str) -> str:
    now = shop.hub.clock.now()
    with shop.hub.tx() as conn:
        store.save_template(
            conn,
            shop.ws,
            name="order",
            document={
                "channel": "webhook",
                "url": url,
                "body": '{"customer": {{ profile.first_name | json }}}',
            },
            actor="t",
            now=now,
        )
        [out] = Outbox().enqueue(
            conn,
            shop.ws,
            [
                SendIntent(
                    "o1",
                    shop.ids["ann"],
                    "order",
                    Source("journey", "j"),
                    purpose="orders",
                    transactional=True,
                )
            ],
            now=now,
        )
    return out.message_id


def _dispatcher(shop: Shop, **kw: Any) -> Dispatcher:
    return Dispatcher(
        shop.hub,
        {Channel.WEBHOOK: lambda: WebhookProvider(b"s" * 32, timeout=0.5)},
        settings=DispatchSettings(workers=1, backoff_base=10, breaker_threshold=99),
        draw=lambda: 0.0,
        **kw,
    )


def _log(shop: Shop, message_id: str) -> list[tuple[str, dict[str, Any]]]:
    with shop.hub.engine.connect() as conn:
        return [
            (r.status, r.detail)
            for r in conn.execute(
                select(message_events.c.status, message_events.c.detail)
                .where(message_events.c.message_id == message_id)
                .order_by(message_events.c.seq)
            )
        ]


def test_failures_are_retried_as_the_provider_asks_and_logged(shop: Shop, receiver: str) -> None:
    message_id = _hook(shop, receiver)
    Receiver.script = [(500, {}, 0.0), (429, {"Retry-After": "120"}, 0.0), (200, {}, 1.5)]
    dispatcher = _dispatcher(shop)
    clock: Any = shop.hub.clock
    for _ in range(3):  # 500, then 429, then a reply slower than the client's timeout
        assert dispatcher.run_once().retried == 1
        clock.advance(timedelta(seconds=121))
    assert dispatcher.run_once().sent == 1
    dispatcher.close()
    log = _log(shop, message_id)
    assert [status for status, _ in log] == ["queued", "retrying", "retrying", "retrying", "sent"]
    assert "HTTP 500" in log[1][1]["detail"]
    assert "HTTP 429" in log[2][1]["detail"] and log[2][1]["retry_at"] > log[1][1]["retry_at"]
    assert "timed out" in log[3][1]["detail"]
    # the receiver got the same key every time and kept one delivery
    assert set(Receiver.requests) == {message_id} and list(Receiver.delivered) == [message_id]
    assert Receiver.delivered[message_id] == b'{"customer":"Ann"}'


class Crash(BaseException):
    pass


def test_a_crash_after_the_send_is_harmless_to_a_receiver_honouring_the_key(
    shop: Shop, receiver: str
) -> None:
    message_id = _hook(shop, receiver)

    def fault(step: str) -> None:
        if step == "sent":
            raise Crash(step)

    first = _dispatcher(shop, fault=fault)
    with pytest.raises(Crash):
        first.run_once()
    first.close()
    clock: Any = shop.hub.clock
    clock.advance(timedelta(minutes=6))  # the lease runs out
    second = _dispatcher(shop)
    assert second.run_until_idle().sent == 1
    second.close()
    assert Receiver.requests == [message_id, message_id]  # sent twice ...
    assert list(Receiver.delivered) == [message_id]  # ... delivered once
    with shop.hub.engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == message_id)).one()
    assert (row.status, row.attempts) == ("sent", 2)
    assert [s for s, _ in _log(shop, message_id)] == ["queued", "lease_expired", "sent"]
