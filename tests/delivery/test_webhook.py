"""Webhooks against a real local HTTP server: signature, idempotency key, status mapping."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from waymark.channels.base import Outcome, OutgoingMessage
from waymark.channels.webhook import WebhookProvider, sign, verify_signature
from waymark.core.clock import ManualClock
from waymark.delivery.templates import Channel, Rendered

NOW = dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.UTC)
SECRET = b"whsec-test"


class Receiver(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []
    answers: ClassVar[dict[str, tuple[int, dict[str, str]]]] = {}

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append((self.path, dict(self.headers.items()), body))
        status, headers = type(self).answers.get(self.path, (200, {}))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def server() -> Iterator[str]:
    Receiver.calls = []
    Receiver.answers = {
        "/busy": (429, {"Retry-After": "7"}),
        "/down": (503, {"Retry-After": "Wed, 02 Dec 2026 09:31:00 GMT"}),
        "/bad": (400, {}),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _message(url: str, n: int = 1) -> OutgoingMessage:
    body = {"profile": "p1", "n": n, "name": "Ünï"}
    content = Rendered(Channel.WEBHOOK, {"body": json.dumps(body)}, json=body)
    return OutgoingMessage(f"m{n}", Channel.WEBHOOK, url, content, NOW)


def test_a_signed_post_with_the_idempotency_key(server: str) -> None:
    provider = WebhookProvider(SECRET, clock=ManualClock(NOW))
    first = provider.send(_message(f"{server}/hook", 1))
    again = provider.send(_message(f"{server}/hook", 1))
    provider.close()
    assert first.outcome is Outcome.SENT and again.outcome is Outcome.SENT
    (path, headers, body), (_p, headers2, _b) = Receiver.calls
    assert path == "/hook"
    assert json.loads(body) == {"profile": "p1", "n": 1, "name": "Ünï"}
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == headers2["Idempotency-Key"] == "m1"
    signature = headers["Waymark-Signature"]
    assert signature == sign(SECRET, int(NOW.timestamp()), body)
    assert verify_signature(SECRET, signature, body, now=NOW + dt.timedelta(seconds=299))
    assert not verify_signature(SECRET, signature, body, now=NOW + dt.timedelta(seconds=301))
    assert not verify_signature(b"other", signature, body, now=NOW)
    assert not verify_signature(SECRET, signature, body + b" ", now=NOW)
    assert not verify_signature(SECRET, "v1=abc", body, now=NOW)


def test_statuses_map_to_results(server: str) -> None:
    provider = WebhookProvider(SECRET, clock=ManualClock(NOW))
    busy = provider.send(_message(f"{server}/busy"))
    down = provider.send(_message(f"{server}/down"))
    bad = provider.send(_message(f"{server}/bad"))
    provider.close()
    assert (busy.outcome, busy.transient, busy.retry_after) == (Outcome.FAILED, True, 7.0)
    assert (down.outcome, down.transient, down.retry_after) == (Outcome.FAILED, True, 60.0)
    assert (bad.outcome, bad.transient, bad.retry_after) == (Outcome.FAILED, False, None)
    assert bad.detail.startswith("HTTP 400")


def test_an_unreachable_receiver_is_transient(server: str) -> None:
    provider = WebhookProvider(SECRET, timeout=2.0)
    result = provider.send(_message("http://127.0.0.1:9/hook"))
    provider.close()
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "cannot reach" in result.detail
    with pytest.raises(ValueError, match="signing secret"):
        WebhookProvider(b"")
