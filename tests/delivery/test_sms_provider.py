"""The Twilio provider against a real local HTTP server standing in for Twilio's REST API, and
Twilio's callback signature and parsers."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from waymark.channels.base import FeedbackKind, InboundText, Outcome, OutgoingMessage
from waymark.channels.sms import (
    TwilioProvider,
    TwilioSettings,
    parse_twilio_inbound,
    parse_twilio_status,
    twilio_signature,
    verify_twilio_signature,
)
from waymark.core.clock import ManualClock
from waymark.core.errors import InvalidInput
from waymark.delivery.keywords import Keyword, classify
from waymark.delivery.templates import Channel, Rendered

NOW = dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.UTC)
SID, TOKEN = "AC0123456789abcdef0123456789abcdef", "auth-token-test"
MESSAGES_PATH = f"/2010-04-01/Accounts/{SID}/Messages.json"
TO = "+4915112345678"


@dataclass
class Call:
    path: str
    headers: Message
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode(), strict_parsing=True).items()}


@dataclass
class Stub:
    """What the fake API received, and what it answers next (``hang``: never, until the test
    ends)."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    status: int = 201
    body: bytes = b'{"sid": "SM0001", "status": "queued"}'
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    release: threading.Event = field(default_factory=threading.Event)

    def answer(self, status: int, body: Any, **headers: str) -> None:
        self.status, self.headers = status, {k.replace("_", "-"): v for k, v in headers.items()}
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.fixture
def api() -> Iterator[Stub]:
    stub = Stub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            stub.calls.append(Call(self.path, self.headers, body))
            if stub.hang:
                stub.release.wait(10)
                return
            self.send_response(stub.status)
            for key, value in stub.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(stub.body)))
            self.end_headers()
            self.wfile.write(stub.body)

        def log_message(self, *args: Any) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # a short poll interval: shutdown() waits for the loop to notice
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    stub.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield stub
    finally:
        stub.release.set()
        httpd.shutdown()
        httpd.server_close()


def _settings(url: str, **overrides: Any) -> TwilioSettings:
    values: dict[str, Any] = {
        "account_sid": SID,
        "auth_token": TOKEN,
        "from_number": "+15005550006",
        "base_url": url,
        "status_callback": "https://hooks.example/twilio/status",
        "timeout": 2.0,
    }
    values.update(overrides)
    return TwilioSettings(**values)


def _provider(api: Stub, **overrides: Any) -> TwilioProvider:
    return TwilioProvider(_settings(api.url, **overrides), clock=ManualClock(NOW))


def _message(to: str = TO, text: str = "Your order shipped 📦", n: int = 1) -> OutgoingMessage:
    return OutgoingMessage(f"m{n}", Channel.SMS, to, Rendered(Channel.SMS, {"text": text}), NOW)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ------------------------------------------------------------------------------------ sending


def test_a_text_is_posted_form_encoded_with_basic_auth_and_the_idempotency_token(
    api: Stub,
) -> None:
    provider = _provider(api)
    first = provider.send(_message())
    again = provider.send(_message())
    provider.close()
    assert (first.outcome, first.provider_id) == (Outcome.SENT, "SM0001")
    assert again.outcome is Outcome.SENT
    call, retry = api.calls
    assert call.path == MESSAGES_PATH
    credentials = base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    assert call.headers["Authorization"] == f"Basic {credentials}"
    assert call.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert call.headers["I-Twilio-Idempotency-Token"] == "m1"
    assert retry.headers["I-Twilio-Idempotency-Token"] == "m1"
    assert call.form == {
        "To": TO,
        "From": "+15005550006",
        "Body": "Your order shipped 📦",
        "StatusCallback": "https://hooks.example/twilio/status",
    }


def test_a_messaging_service_replaces_from_and_the_number_is_sent_in_e164(api: Stub) -> None:
    provider = _provider(api, from_number=None, messaging_service_sid="MG123", status_callback=None)
    result = provider.send(_message(to="+49 151 1234 5678"))
    provider.close()
    assert result.outcome is Outcome.SENT
    assert api.calls[0].form == {
        "To": TO,
        "MessagingServiceSid": "MG123",
        "Body": "Your order shipped 📦",
    }


def test_a_number_that_is_not_e164_is_gone_without_a_request(api: Stub) -> None:
    provider = _provider(api)
    bad = provider.send(_message(to="12345"))
    empty = provider.send(_message(text="  "))
    provider.close()
    assert (bad.outcome, bad.transient, bad.address_gone) == (Outcome.FAILED, False, True)
    assert bad.detail.startswith("'12345' is not a phone number")
    assert (empty.outcome, empty.transient, empty.address_gone) == (Outcome.FAILED, False, False)
    assert api.calls == []


def test_throttling_and_server_errors_are_transient_with_retry_after(api: Stub) -> None:
    provider = _provider(api)
    api.answer(429, {"code": 20429, "message": "Too Many Requests"}, Retry_After="7")
    busy = provider.send(_message())
    api.answer(503, b"<html>down</html>", Retry_After="Wed, 02 Dec 2026 09:31:00 GMT")
    down = provider.send(_message())
    api.answer(500, {"code": 20500, "message": "Internal Server Error"})
    broken = provider.send(_message())
    provider.close()
    assert (busy.outcome, busy.transient, busy.retry_after) == (Outcome.FAILED, True, 7.0)
    assert "20429" in busy.detail
    assert (down.transient, down.retry_after) == (True, 60.0)
    assert (broken.transient, broken.retry_after) == (True, None)
    assert broken.detail.startswith("HTTP 500")


@pytest.mark.parametrize(
    ("code", "gone"),
    [(21211, True), (21614, True), (21610, False), (21606, False)],
)
def test_client_errors_are_permanent_with_twilio_code_and_message(
    api: Stub, code: int, gone: bool
) -> None:
    provider = _provider(api)
    api.answer(400, {"code": code, "message": f"twilio says {code}", "status": 400})
    result = provider.send(_message())
    provider.close()
    assert (result.outcome, result.transient, result.address_gone) == (Outcome.FAILED, False, gone)
    assert result.retry_after is None
    assert f"Twilio error {code}: twilio says {code}" in result.detail
    assert result.detail.count("HTTP 400") == 1
    if code == 21610:
        assert "replied STOP" in result.detail


def test_an_error_without_json_is_permanent_with_the_body(api: Stub) -> None:
    provider = _provider(api)
    api.answer(401, b"Unauthorized")
    result = provider.send(_message())
    provider.close()
    assert (result.outcome, result.transient, result.address_gone) == (Outcome.FAILED, False, False)
    assert result.detail == "HTTP 401: Unauthorized"


@pytest.mark.parametrize("body", [b"<html>ok</html>", b"[1, 2]", b'{"status": "queued"}', b""])
def test_a_success_without_a_sid_is_transient(api: Stub, body: bytes) -> None:
    provider = _provider(api)
    api.answer(201, body)
    result = provider.send(_message())
    provider.close()
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "without a message sid" in result.detail


def test_a_timeout_is_transient(api: Stub) -> None:
    api.hang = True
    provider = _provider(api, timeout=0.3)
    result = provider.send(_message())
    provider.close()
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "timed out" in result.detail


def test_an_unreachable_api_is_transient() -> None:
    provider = TwilioProvider(_settings(f"http://127.0.0.1:{_free_port()}"))
    result = provider.send(_message())
    provider.close()
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "cannot reach Twilio" in result.detail


def test_a_given_client_is_used_and_left_open(api: Stub) -> None:
    client = httpx.Client(headers={"User-Agent": "waymark-test"})
    provider = TwilioProvider(_settings(api.url), client=client)
    assert provider.send(_message()).outcome is Outcome.SENT
    provider.close()
    assert not client.is_closed
    assert api.calls[0].headers["User-Agent"] == "waymark-test"
    assert api.calls[0].headers["Authorization"].startswith("Basic ")
    client.close()


def test_misuse_raises() -> None:
    provider = TwilioProvider(_settings("http://127.0.0.1:1"))
    email = OutgoingMessage("m", Channel.EMAIL, "a@b.example", Rendered(Channel.EMAIL, {}), NOW)
    with pytest.raises(ValueError, match="sends sms"):
        provider.send(email)
    provider.close()
    with pytest.raises(ValueError, match="exactly one"):
        _settings("", messaging_service_sid="MG1")
    with pytest.raises(ValueError, match="exactly one"):
        _settings("", from_number=None)
    with pytest.raises(ValueError, match="auth token"):
        _settings("", auth_token="")


# ---------------------------------------------------------------------------------- signature

DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675310",
    "Digits": "1234",
    "From": "+14158675310",
    "To": "+18005551212",
}


def test_the_signature_matches_twilios_documented_example() -> None:
    # the worked example of Twilio's webhook security documentation (auth token 12345)
    assert twilio_signature("12345", DOC_URL, DOC_PARAMS) == "GvWf1cFY/Q7PnoempGyD5oXAezc="
    assert verify_twilio_signature("12345", DOC_URL, DOC_PARAMS, "GvWf1cFY/Q7PnoempGyD5oXAezc=")


def test_a_tampered_request_or_wrong_token_fails() -> None:
    signature = twilio_signature(TOKEN, DOC_URL, DOC_PARAMS)
    assert verify_twilio_signature(TOKEN, DOC_URL, dict(reversed(DOC_PARAMS.items())), signature)
    assert not verify_twilio_signature("other", DOC_URL, DOC_PARAMS, signature)
    assert not verify_twilio_signature(TOKEN, DOC_URL, {**DOC_PARAMS, "Digits": "9"}, signature)
    assert not verify_twilio_signature(TOKEN, DOC_URL, {**DOC_PARAMS, "X": ""}, signature)
    assert not verify_twilio_signature(
        TOKEN, DOC_URL.replace("foo=1", "foo=2"), DOC_PARAMS, signature
    )
    assert not verify_twilio_signature(TOKEN, DOC_URL, DOC_PARAMS, "")
    assert not verify_twilio_signature(TOKEN, DOC_URL, DOC_PARAMS, "not base64 at all ✗")


# ---------------------------------------------------------------------------------- callbacks


def _status(status: str, code: str | None = None) -> dict[str, str]:
    params = {"MessageSid": "SM0001", "MessageStatus": status, "To": TO, "From": "+15005550006"}
    if code is not None:
        params["ErrorCode"] = code
    return params


def test_delivered_is_delivered() -> None:
    feedback = parse_twilio_status(_status("delivered"), at=NOW)
    assert feedback is not None
    assert (feedback.kind, feedback.at, feedback.provider_id, feedback.address) == (
        FeedbackKind.DELIVERED,
        NOW,
        "SM0001",
        TO,
    )
    assert feedback.message_id is None


@pytest.mark.parametrize("code", ["30003", "30005", "30006"])
def test_an_unreachable_number_is_a_hard_bounce(code: str) -> None:
    feedback = parse_twilio_status(_status("undelivered", code), at=NOW)
    assert feedback is not None
    assert (feedback.kind, feedback.bounce) == (FeedbackKind.BOUNCED, "hard")
    assert code in feedback.detail


@pytest.mark.parametrize(("status", "code"), [("failed", "30007"), ("undelivered", "30008")])
def test_other_failures_are_failed_with_the_code(status: str, code: str) -> None:
    feedback = parse_twilio_status(_status(status, code), at=NOW)
    assert feedback is not None
    assert (feedback.kind, feedback.bounce) == (FeedbackKind.FAILED, None)
    assert feedback.detail == f"{status}, error {code}"
    missing = parse_twilio_status(_status(status), at=NOW)
    assert missing is not None and missing.detail == f"{status}, error none given"


@pytest.mark.parametrize("status", ["queued", "sending", "sent", "accepted", "Sent"])
def test_pending_statuses_say_nothing(status: str) -> None:
    assert parse_twilio_status(_status(status), at=NOW) is None


def test_a_status_callback_without_sid_or_status_is_invalid() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_twilio_status({"To": TO}, at=NOW)
    assert [issue.path for issue in caught.value.issues] == ["MessageSid", "MessageStatus"]


def test_an_inbound_text_is_read_and_its_keyword_classified() -> None:
    params = {"From": TO, "To": "+15005550006", "Body": " Stop. ", "MessageSid": "SM9"}
    inbound = parse_twilio_inbound(params, at=NOW)
    assert inbound == InboundText(TO, "+15005550006", " Stop. ", NOW, "SM9")
    assert classify(inbound.body) is Keyword.STOP
    bare = parse_twilio_inbound({"From": TO, "To": "+15005550006", "SmsSid": "SM8"}, at=NOW)
    assert (bare.body, bare.provider_id) == ("", "SM8")
    with pytest.raises(InvalidInput, match="From: missing"):
        parse_twilio_inbound({"To": "+15005550006", "Body": "hi"}, at=NOW)
