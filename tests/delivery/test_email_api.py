"""The HTTP email provider against a real local HTTP server standing in for SendGrid's Mail Send
API, and the Event Webhook's parser and signature."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from waymark.channels.base import Feedback, FeedbackKind, Outcome, OutgoingMessage
from waymark.channels.email import EmailSettings, build_mime
from waymark.channels.email_api import (
    HttpEmailProvider,
    HttpEmailSettings,
    parse_sendgrid_events,
    sendgrid_payload,
    verify_sendgrid_signature,
)
from waymark.core.clock import ManualClock
from waymark.core.errors import InvalidInput
from waymark.delivery.templates import Channel, Rendered

NOW = dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.UTC)
API_KEY = "SG.test-key"


@dataclass
class Call:
    path: str
    headers: Message
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stub:
    """What the fake API received, and what it answers next (``hang``: never, until the test
    ends)."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    status: int = 202
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"X-Message-Id": "sgid123"})
    hang: bool = False
    release: threading.Event = field(default_factory=threading.Event)

    def answer(self, status: int, body: Any = b"", **headers: str) -> None:
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


def _settings(url: str = "http://127.0.0.1:1", **overrides: Any) -> HttpEmailSettings:
    values: dict[str, Any] = {
        "api_key": API_KEY,
        "from_address": "news@shop.example",
        "from_name": "Shop News",
        "base_url": url,
        "timeout": 2.0,
    }
    values.update(overrides)
    return HttpEmailSettings(**values)


def _provider(api: Stub, **overrides: Any) -> HttpEmailProvider:
    return HttpEmailProvider(_settings(api.url, **overrides), clock=ManualClock(NOW))


def _message(
    *,
    unsubscribe_url: str | None = "https://shop.example/u/abc",
    unsubscribe_mailto: str | None = None,
    **fields: str,
) -> OutgoingMessage:
    content = {
        "subject": "Your week",
        "html": "<html><body><p>Hello Ana</p></body></html>",
        "text": "Hello Ana\n",
        **fields,
    }
    return OutgoingMessage(
        "m1",
        Channel.EMAIL,
        "ana@mail.example",
        Rendered(Channel.EMAIL, {k: v for k, v in content.items() if v}),
        NOW,
        unsubscribe_url=unsubscribe_url,
        unsubscribe_mailto=unsubscribe_mailto,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ------------------------------------------------------------------------------------ sending


def test_a_message_is_posted_as_mail_send_json_with_bearer_auth(api: Stub) -> None:
    provider = _provider(api, reply_to="care@shop.example")
    message = _message(preheader="Three new arrivals")
    result = provider.send(message)
    provider.close()
    assert (result.outcome, result.provider_id) == (Outcome.SENT, "sgid123")
    (call,) = api.calls
    assert call.path == "/v3/mail/send"
    assert call.headers["Authorization"] == f"Bearer {API_KEY}"
    assert call.headers["Content-Type"] == "application/json"
    sent = call.json
    assert sent["personalizations"] == [
        {"to": [{"email": "ana@mail.example"}], "custom_args": {"waymark_message_id": "m1"}}
    ]
    assert sent["from"] == {"email": "news@shop.example", "name": "Shop News"}
    assert sent["reply_to"] == {"email": "care@shop.example"}
    assert sent["subject"] == "Your week"
    assert [part["type"] for part in sent["content"]] == ["text/plain", "text/html"]
    assert sent["content"][0]["value"] == "Hello Ana\n"
    html = sent["content"][1]["value"]
    assert html.startswith('<html><body><div style="display:none')
    assert "Three new arrivals" in html and html.endswith("<p>Hello Ana</p></body></html>")
    assert sent["headers"] == {
        "List-Unsubscribe": "<https://shop.example/u/abc>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert "mail_settings" not in sent


def test_template_fields_win_over_the_settings_and_headers_are_passed_on() -> None:
    message = _message(
        unsubscribe_url=None,
        from_address="ceo@shop.example",
        from_name="",
        reply_to="ceo@x.example",
    )
    message = replace(message, headers={"X-Campaign": "c7"})
    payload = sendgrid_payload(message, _settings(from_name=None, sandbox=True))
    assert payload["from"] == {"email": "ceo@shop.example"}
    assert payload["reply_to"] == {"email": "ceo@x.example"}
    assert payload["headers"] == {"X-Campaign": "c7"}
    assert payload["mail_settings"] == {"sandbox_mode": {"enable": True}}
    bare = sendgrid_payload(_message(unsubscribe_url=None), _settings())
    assert "headers" not in bare and "reply_to" not in bare


@pytest.mark.parametrize(
    ("url", "mailto"),
    [
        ("https://shop.example/u/abc", None),
        ("http://shop.example/u/abc", None),
        (None, "unsubscribe+abc@shop.example"),
        ("https://shop.example/u/abc", "unsubscribe+abc@shop.example"),
        (None, None),
    ],
)
def test_unsubscribe_headers_match_the_smtp_provider(url: str | None, mailto: str | None) -> None:
    message = _message(unsubscribe_url=url, unsubscribe_mailto=mailto)
    headers = sendgrid_payload(message, _settings()).get("headers", {})
    mime = build_mime(message, EmailSettings("news@shop.example"))
    for name in ("List-Unsubscribe", "List-Unsubscribe-Post"):
        assert headers.get(name) == (str(mime[name]) if mime[name] is not None else None)


def test_text_only_and_empty_messages(api: Stub) -> None:
    text_only = sendgrid_payload(_message(html=""), _settings())
    assert text_only["content"] == [{"type": "text/plain", "value": "Hello Ana\n"}]
    html_only = sendgrid_payload(_message(text=""), _settings())
    assert [part["type"] for part in html_only["content"]] == ["text/html"]
    provider = _provider(api)
    empty = provider.send(_message(html="", text=""))
    provider.close()
    assert (empty.outcome, empty.transient) == (Outcome.FAILED, False)
    assert "neither text nor HTML" in empty.detail
    assert api.calls == []


def test_throttling_and_server_errors_are_transient_with_retry_after(api: Stub) -> None:
    provider = _provider(api)
    api.answer(429, {"errors": [{"message": "too many requests"}]}, Retry_After="7")
    busy = provider.send(_message())
    reset = str(int(NOW.timestamp()) + 42)
    api.answer(429, {"errors": [{"message": "too many requests"}]}, X_RateLimit_Reset=reset)
    limited = provider.send(_message())
    api.answer(500, b"oops")
    broken = provider.send(_message())
    api.answer(503, b"", Retry_After="Wed, 02 Dec 2026 09:31:00 GMT")
    down = provider.send(_message())
    provider.close()
    assert (busy.outcome, busy.transient, busy.retry_after) == (Outcome.FAILED, True, 7.0)
    assert busy.detail == "HTTP 429: too many requests"
    assert (limited.transient, limited.retry_after) == (True, 42.0)
    assert (broken.transient, broken.retry_after, broken.detail) == (True, None, "HTTP 500: oops")
    assert (down.transient, down.retry_after) == (True, 60.0)


@pytest.mark.parametrize("status", [400, 401, 403, 413])
def test_client_errors_are_permanent_with_the_api_messages(api: Stub, status: int) -> None:
    provider = _provider(api)
    errors = {
        "errors": [
            {"message": "The from email does not contain a valid address.", "field": "from.email"},
            {"message": "Bad things", "field": None, "help": "http://help.example"},
        ]
    }
    api.answer(status, errors)
    result = provider.send(_message())
    provider.close()
    assert (result.outcome, result.transient, result.retry_after) == (Outcome.FAILED, False, None)
    assert result.detail == (
        f"HTTP {status}: from.email: The from email does not contain a valid address.; Bad things"
    )


def test_an_error_without_json_keeps_the_body(api: Stub) -> None:
    provider = _provider(api)
    api.answer(400, b"<html>bad gateway config</html>")
    result = provider.send(_message())
    provider.close()
    assert (result.transient, result.detail) == (False, "HTTP 400: <html>bad gateway config</html>")


def test_an_accepted_message_with_a_garbage_body_or_no_id_is_still_sent(api: Stub) -> None:
    provider = _provider(api)
    api.answer(202, b"\x00garbage{", X_Message_Id="sgid9")
    garbage = provider.send(_message())
    api.answer(202, b"not json either")
    anonymous = provider.send(_message())
    api.answer(200, b"")  # what sandbox mode answers
    sandbox = provider.send(_message())
    provider.close()
    assert (garbage.outcome, garbage.provider_id) == (Outcome.SENT, "sgid9")
    assert (anonymous.outcome, anonymous.provider_id) == (Outcome.SENT, None)
    assert sandbox.outcome is Outcome.SENT


def test_a_timeout_is_transient(api: Stub) -> None:
    api.hang = True
    provider = _provider(api, timeout=0.3)
    result = provider.send(_message())
    provider.close()
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "timed out" in result.detail


def test_an_unreachable_api_is_transient() -> None:
    provider = HttpEmailProvider(_settings(f"http://127.0.0.1:{_free_port()}"))
    result = provider.send(_message())
    provider.close()
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "cannot reach the email API" in result.detail


def test_a_given_client_is_used_and_left_open(api: Stub) -> None:
    client = httpx.Client(headers={"User-Agent": "waymark-test"})
    provider = HttpEmailProvider(_settings(api.url), client=client)
    assert provider.send(_message()).outcome is Outcome.SENT
    provider.close()
    assert not client.is_closed
    assert api.calls[0].headers["User-Agent"] == "waymark-test"
    client.close()


def test_misuse_raises() -> None:
    provider = HttpEmailProvider(_settings())
    sms = OutgoingMessage("m", Channel.SMS, "+4915112345678", Rendered(Channel.SMS, {}), NOW)
    with pytest.raises(ValueError, match="sends email"):
        provider.send(sms)
    provider.close()
    with pytest.raises(ValueError, match="not an email"):
        sendgrid_payload(sms, _settings())
    with pytest.raises(ValueError, match="API key"):
        _settings(api_key="")


# ------------------------------------------------------------------------------------- events

T = 1_796_203_800  # 2026-12-02 09:30:00 UTC


def _event(kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "email": "ana@mail.example",
        "timestamp": T,
        "event": kind,
        "sg_event_id": "ev1",
        "sg_message_id": "sgid123.filterdrecv-5645d9c87f-abc-1-5F1-2.0",
        "waymark_message_id": "m1",
        **extra,
    }


def _parse(*events: Any) -> list[Feedback]:
    return parse_sendgrid_events(json.dumps(list(events)).encode(), at_fallback=NOW)


def test_each_event_type_maps_to_feedback() -> None:
    feedback = _parse(
        _event("processed"),
        _event("deferred", response="400 try again later", attempt="1"),
        _event("delivered", response="250 OK"),
        _event("open", useragent="Mozilla"),
        _event("click", url="https://shop.example/p/1"),
        _event("bounce", type="bounce", reason="550 no such user", status="5.1.1"),
        _event("bounce", type="blocked", reason="blocked by policy", status="5.7.1"),
        _event("dropped", reason="Bounced Address"),
        _event("spamreport"),
        _event("unsubscribe"),
        _event("group_unsubscribe", asm_group_id=3),
        _event("group_resubscribe", asm_group_id=3),
        _event("some_future_event"),
    )
    assert [(f.kind, f.bounce) for f in feedback] == [
        (FeedbackKind.DELIVERED, None),
        (FeedbackKind.OPENED, None),
        (FeedbackKind.CLICKED, None),
        (FeedbackKind.BOUNCED, "hard"),
        (FeedbackKind.BOUNCED, "soft"),
        (FeedbackKind.FAILED, None),
        (FeedbackKind.COMPLAINED, None),
        (FeedbackKind.UNSUBSCRIBED, None),
        (FeedbackKind.UNSUBSCRIBED, None),
    ]
    assert {(f.message_id, f.provider_id, f.address, f.at) for f in feedback} == {
        ("m1", "sgid123", "ana@mail.example", dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.UTC))
    }
    click, hard, soft, dropped = feedback[2], feedback[3], feedback[4], feedback[5]
    assert click.url == "https://shop.example/p/1"
    assert hard.detail == "550 no such user (status 5.1.1)"
    assert soft.detail == "blocked by policy (status 5.7.1)"
    assert dropped.detail == "Bounced Address"
    assert all(f.url is None for f in feedback if f is not click)


def test_missing_ids_and_time_fall_back() -> None:
    (event,) = _parse({"event": "bounce", "email": "x@mail.example"})
    assert event == Feedback(FeedbackKind.BOUNCED, NOW, address="x@mail.example", bounce="hard")
    (other,) = _parse(_event("open", sg_message_id="plainid", timestamp=T + 0.5))
    assert other.provider_id == "plainid"
    assert other.at == dt.datetime(2026, 12, 2, 9, 30, 0, 500000, tzinfo=dt.UTC)
    assert parse_sendgrid_events(b"[]", at_fallback=NOW) == []


@pytest.mark.parametrize(
    ("body", "paths"),
    [
        (b"{not json", [""]),
        (b'{"event": "open"}', [""]),
        (b'[1, "open"]', ["[0]", "[1]"]),
        (b'[{"email": "a@b.example"}]', ["[0].event"]),
        (b'[{"event": ""}]', ["[0].event"]),
        (b'[{"event": "open", "timestamp": "yesterday"}]', ["[0].timestamp"]),
        (b'[{"event": "open", "timestamp": true}]', ["[0].timestamp"]),
        (b'[{"event": "open", "timestamp": 1e300}]', ["[0].timestamp"]),
        (
            b'[{"event": "open"}, {"event": "click", "url": 3, "email": []}]',
            ["[1].email", "[1].url"],
        ),
    ],
)
def test_malformed_bodies_name_each_problem(body: bytes, paths: list[str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_sendgrid_events(body, at_fallback=NOW)
    assert [issue.path for issue in caught.value.issues] == paths


# ---------------------------------------------------------------------------------- signature


def _key_pair(curve: ec.EllipticCurve | None = None) -> tuple[ec.EllipticCurvePrivateKey, str]:
    private = ec.generate_private_key(curve or ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, pem.decode()


def _sign(private: ec.EllipticCurvePrivateKey, timestamp: str, payload: bytes) -> str:
    signature = private.sign(timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode()


PAYLOAD = json.dumps([_event("delivered")]).encode() + b"\r\n"
STAMP = str(T)


def test_a_good_signature_verifies_with_pem_or_base64_der() -> None:
    private, pem = _key_pair()
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = _sign(private, STAMP, PAYLOAD)
    assert verify_sendgrid_signature(pem, PAYLOAD, signature, STAMP)
    assert verify_sendgrid_signature(pem.encode(), PAYLOAD, signature, STAMP)
    assert verify_sendgrid_signature(base64.b64encode(der).decode(), PAYLOAD, signature, STAMP)


def test_a_tampered_request_or_another_key_fails() -> None:
    private, pem = _key_pair()
    _other, other_pem = _key_pair()
    signature = _sign(private, STAMP, PAYLOAD)
    assert not verify_sendgrid_signature(
        pem, PAYLOAD.replace(b"delivered", b"bounce"), signature, STAMP
    )
    assert not verify_sendgrid_signature(pem, PAYLOAD.rstrip(), signature, STAMP)
    assert not verify_sendgrid_signature(pem, PAYLOAD, signature, str(T + 1))
    assert not verify_sendgrid_signature(other_pem, PAYLOAD, signature, STAMP)
    assert not verify_sendgrid_signature(pem, PAYLOAD, "not base64!", STAMP)
    assert not verify_sendgrid_signature(pem, PAYLOAD, base64.b64encode(b"x" * 70).decode(), STAMP)
    assert not verify_sendgrid_signature(pem, PAYLOAD, "", STAMP)


def test_a_key_that_cannot_be_read_is_a_configuration_error() -> None:
    private, _pem = _key_pair()
    signature = _sign(private, STAMP, PAYLOAD)
    with pytest.raises(ValueError, match="cannot read the verification key"):
        verify_sendgrid_signature("bm90IGEga2V5", PAYLOAD, signature, STAMP)
    with pytest.raises(ValueError, match="cannot read the verification key"):
        verify_sendgrid_signature(
            "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----", PAYLOAD, signature, STAMP
        )
    _p384, p384_pem = _key_pair(ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        verify_sendgrid_signature(p384_pem, PAYLOAD, signature, STAMP)
