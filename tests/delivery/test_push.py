"""Push against real local HTTP servers: a browser push service (the payload decrypted with the
subscriber's keys, the VAPID token verified), FCM HTTP v1 and an OAuth 2 token endpoint."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import http_ece
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from waymark.channels.base import Outcome, OutgoingMessage
from waymark.channels.push import (
    FCM_SCOPE,
    MAX_ENCRYPTED_PAYLOAD,
    FcmProvider,
    FcmSettings,
    WebPushProvider,
    WebPushSettings,
    generate_vapid_keys,
    parse_subscription,
    service_account_tokens,
)
from waymark.core.errors import InvalidInput
from waymark.delivery.templates import Channel, Rendered

NOW = dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.UTC)
VAPID_PRIVATE, VAPID_PUBLIC = generate_vapid_keys()
SUBJECT = "mailto:ops@waymark.example"

# --- a real HTTP server per test ------------------------------------------------------------

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Call:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Server:
    url: str
    calls: list[Call] = field(default_factory=list)


@contextmanager
def serving(answer: Callable[[Call], Answer], delay: float = 0.0) -> Iterator[Server]:
    """An HTTP server on 127.0.0.1 that records each POST and replies with ``answer(call)``."""
    calls: list[Call] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            call = Call(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            calls.append(call)
            status, headers, content = answer(call)
            if delay:
                time.sleep(delay)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args: Any) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", calls)
    finally:
        httpd.shutdown()
        httpd.server_close()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def push_message(
    to: str,
    *,
    message_id: str = "m1",
    body: str = "Your order has shipped",
    data: dict[str, Any] | None = None,
    **fields: str,
) -> OutgoingMessage:
    content = Rendered(Channel.PUSH, {"title": "Hi Ünï", "body": body, **fields}, data or {})
    return OutgoingMessage(message_id, Channel.PUSH, to, content, NOW)


# --- Web Push -------------------------------------------------------------------------------


@dataclass
class Subscriber:
    """A browser's side of a subscription: its ECDH key pair and auth secret."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def subscription(self, endpoint: str) -> str:
        public = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        keys = {"p256dh": b64url(public), "auth": b64url(self.auth)}
        return json.dumps({"endpoint": endpoint, "expirationTime": None, "keys": keys})

    def decrypt(self, body: bytes) -> Any:
        plain = http_ece.decrypt(
            body, private_key=self.key, auth_secret=self.auth, version="aes128gcm"
        )
        return json.loads(plain)


def push_service_answer(call: Call) -> Answer:
    answers: dict[str, Answer] = {
        "/gone": (410, {}, b"subscription expired"),
        "/unknown": (404, {}, b"no such subscription"),
        "/busy": (429, {"Retry-After": "7"}, b"slow down"),
        "/down": (500, {}, b"oops"),
        "/later": (503, {"Retry-After": "Wed, 02 Dec 2026 09:31:00 GMT"}, b""),
        "/big": (413, {}, b"payload too large"),
        "/wrong-key": (403, {}, b"VAPID key mismatch"),
        "/bad": (400, {}, b"bad request"),
    }
    location = {"Location": f"http://push.example/m/{call.path.strip('/')}"}
    return answers.get(call.path, (201, location, b""))


@pytest.fixture
def push_service() -> Iterator[Server]:
    with serving(push_service_answer) as server:
        yield server


def web_push(**overrides: Any) -> WebPushProvider:
    options: dict[str, Any] = {"allow_http": True, **overrides}
    options.setdefault("vapid_private_key", VAPID_PRIVATE)
    return WebPushProvider(WebPushSettings(vapid_subject=SUBJECT, **options))


def raw_private_key(pem: str) -> str:
    key = serialization.load_pem_private_key(pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return b64url(key.private_numbers().private_value.to_bytes(32, "big"))


def check_vapid(authorization: str, audience: str) -> dict[str, Any]:
    """The claims of a ``vapid t=<jwt>,k=<key>`` header after checking its ES256 signature."""
    scheme, _, params = authorization.partition(" ")
    assert scheme == "vapid"
    parts = dict(p.split("=", 1) for p in params.split(","))
    assert parts["k"] == VAPID_PUBLIC
    header_b64, claims_b64, signature_b64 = parts["t"].split(".")
    assert json.loads(unb64url(header_b64)) == {"typ": "JWT", "alg": "ES256"}
    signature = unb64url(signature_b64)
    assert len(signature) == 64
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(parts["k"]))
    public.verify(  # raises InvalidSignature when wrong
        encode_dss_signature(int.from_bytes(signature[:32]), int.from_bytes(signature[32:])),
        f"{header_b64}.{claims_b64}".encode(),
        ec.ECDSA(hashes.SHA256()),
    )
    claims: dict[str, Any] = json.loads(unb64url(claims_b64))
    assert claims["aud"] == audience
    assert claims["sub"] == SUBJECT
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600
    return claims


@pytest.mark.parametrize("key_form", ["pem", "raw"])
def test_web_push_sends_an_encrypted_payload_signed_with_vapid(
    push_service: Server, key_form: str
) -> None:
    key = VAPID_PRIVATE if key_form == "pem" else raw_private_key(VAPID_PRIVATE)
    provider = web_push(vapid_private_key=key, ttl=3600, urgency="high")
    subscriber = Subscriber()
    message_id = str(uuid.uuid4())
    message = push_message(
        subscriber.subscription(f"{push_service.url}/push/abc"),
        message_id=message_id,
        data={"order": "A-1"},
        deep_link="https://shop.example/orders/A-1",
        image_url="https://cdn.example/parcel.png",
    )
    result = provider.send(message)
    provider.close()
    assert result.outcome is Outcome.SENT
    assert result.provider_id == "http://push.example/m/push/abc"
    (call,) = push_service.calls
    assert call.path == "/push/abc"
    assert call.headers["content-encoding"] == "aes128gcm"
    assert call.headers["content-type"] == "application/octet-stream"
    assert call.headers["ttl"] == "3600"
    assert call.headers["urgency"] == "high"
    assert call.headers["topic"] == uuid.UUID(message_id).hex
    assert subscriber.decrypt(call.body) == {
        "title": "Hi Ünï",
        "body": "Your order has shipped",
        "url": "https://shop.example/orders/A-1",
        "image": "https://cdn.example/parcel.png",
        "data": {"order": "A-1"},
        "message_id": message_id,
    }
    check_vapid(call.headers["authorization"], push_service.url)


def test_web_push_leaves_out_empty_fields_and_a_topic_that_does_not_fit(
    push_service: Server,
) -> None:
    provider = web_push()
    subscriber = Subscriber()
    long_id = "message:" + "x" * 40  # neither URL-safe nor short enough
    provider.send(push_message(subscriber.subscription(f"{push_service.url}/p"), message_id="m-7"))
    provider.send(
        push_message(subscriber.subscription(f"{push_service.url}/p"), message_id=long_id)
    )
    provider.close()
    first, second = push_service.calls
    assert first.headers["topic"] == "m-7"
    assert "topic" not in second.headers
    assert "urgency" not in first.headers
    assert first.headers["ttl"] == str(28 * 24 * 3600)
    assert subscriber.decrypt(first.body) == {
        "title": "Hi Ünï",
        "body": "Your order has shipped",
        "message_id": "m-7",
    }


def test_web_push_answers_map_to_results(push_service: Server) -> None:
    provider = web_push()
    subscriber = Subscriber()

    def send(path: str) -> Any:
        return provider.send(push_message(subscriber.subscription(push_service.url + path)))

    gone, unknown = send("/gone"), send("/unknown")
    busy, down, later = send("/busy"), send("/down"), send("/later")
    big, wrong_key, bad = send("/big"), send("/wrong-key"), send("/bad")
    provider.close()
    for result in (gone, unknown):
        assert (result.outcome, result.transient, result.address_gone) == (
            Outcome.FAILED,
            False,
            True,
        )
    assert "HTTP 410" in gone.detail and "expired" in gone.detail
    assert (busy.transient, busy.retry_after, busy.address_gone) == (True, 7.0, False)
    assert (down.transient, down.retry_after) == (True, None)
    assert later.transient and later.retry_after is not None  # an HTTP date, now in the past
    for result in (big, wrong_key, bad):
        assert (result.outcome, result.transient, result.address_gone) == (
            Outcome.FAILED,
            False,
            False,
        )
    assert "too large" in big.detail and "HTTP 413" in big.detail
    assert "VAPID" in wrong_key.detail and "HTTP 403" in wrong_key.detail
    assert bad.detail.startswith("HTTP 400")


def test_web_push_timeouts_and_unreachable_services_are_transient() -> None:
    subscriber = Subscriber()
    with serving(push_service_answer, delay=1.5) as slow:
        provider = web_push(timeout=0.3)
        timed_out = provider.send(push_message(subscriber.subscription(f"{slow.url}/p")))
        unreachable = provider.send(push_message(subscriber.subscription("http://127.0.0.1:9/p")))
        provider.close()
    assert (timed_out.outcome, timed_out.transient) == (Outcome.FAILED, True)
    assert "timed out" in timed_out.detail
    assert (unreachable.transient, unreachable.address_gone) == (True, False)
    assert "cannot reach 127.0.0.1:9" in unreachable.detail


def _subscription(endpoint: Any = "https://push.example/s/1", **keys: Any) -> str:
    subscriber = Subscriber()
    document = json.loads(subscriber.subscription(endpoint))
    document["keys"].update(keys)
    return json.dumps(document)


MALFORMED = [
    ("not json", "a push subscription is JSON"),
    ("[1, 2]", "a JSON object, not list"),
    (json.dumps({"keys": {}}), "endpoint: missing"),
    (_subscription("ftp://push.example/s/1"), "endpoint: ftp scheme; https is expected"),
    (_subscription("http://push.example/s/1"), "endpoint: http scheme; https is expected"),
    (_subscription("https:///s/1"), "endpoint: the URL has no host"),
    (_subscription("https://push.example:99999/s/1"), "endpoint: not a URL"),
    (_subscription("https://u:p@push.example/s/1"), "endpoint: the URL carries credentials"),
    (_subscription("https://[::1]/s/1"), "endpoint: an IPv6 literal host"),
    (json.dumps({"endpoint": "https://push.example/s/1"}), "keys: missing"),
    (_subscription(p256dh=None), "keys.p256dh: missing"),
    (_subscription(p256dh=b64url(b"\x04" * 33)), "keys.p256dh: decodes to 33 bytes; 65"),
    (_subscription(p256dh=b64url(b"\x04" + b"\x01" * 64)), "keys.p256dh: not a point on"),
    (_subscription(auth="!!!"), "keys.auth: not base64url text"),
    (_subscription(auth=b64url(b"short")), "keys.auth: decodes to 5 bytes; 16 are expected"),
]


@pytest.mark.parametrize(("text", "reason"), MALFORMED)
def test_a_malformed_subscription_is_gone_without_a_request(
    push_service: Server, text: str, reason: str
) -> None:
    provider = WebPushProvider(WebPushSettings(VAPID_PRIVATE, SUBJECT))
    result = provider.send(push_message(text))
    provider.close()
    assert (result.outcome, result.transient, result.address_gone) == (Outcome.FAILED, False, True)
    assert result.detail.startswith("malformed push subscription: ")
    assert reason in result.detail
    assert push_service.calls == []


def test_parse_subscription_names_every_problem_and_accepts_standard_base64() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_subscription(json.dumps({"endpoint": 3, "keys": {"auth": "x"}}))
    assert [i.path for i in caught.value.issues] == ["endpoint", "keys.p256dh", "keys.auth"]
    subscriber = Subscriber()
    document = json.loads(subscriber.subscription("https://push.example/s/1"))
    document["keys"]["auth"] = base64.b64encode(subscriber.auth).decode()  # padded, +/ alphabet
    parsed = parse_subscription(json.dumps(document))
    assert parsed.auth == subscriber.auth
    assert parsed.audience == "https://push.example"


def test_a_payload_too_large_once_encrypted_fails_permanently(push_service: Server) -> None:
    provider = web_push()
    subscriber = Subscriber()
    endpoint = f"{push_service.url}/p"
    fits = provider.send(push_message(subscriber.subscription(endpoint), body="é" * 1900))
    large = provider.send(push_message(subscriber.subscription(endpoint), body="x" * 4000))
    provider.close()
    assert fits.outcome is Outcome.SENT
    assert len(push_service.calls) == 1
    assert len(push_service.calls[0].body) <= MAX_ENCRYPTED_PAYLOAD
    assert (large.outcome, large.transient, large.address_gone) == (Outcome.FAILED, False, False)
    assert "encrypted push payload is 4," in large.detail
    assert "at most 4,096" in large.detail


def test_web_push_settings_are_checked() -> None:
    WebPushSettings(VAPID_PRIVATE, "https://waymark.example/contact")
    WebPushSettings(raw_private_key(VAPID_PRIVATE), "mailto:ops@localhost")
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"vapid_subject": "ops@waymark.example"}, "mailto: address or an https URL"),
        ({"vapid_subject": "mailto:nobody"}, "is not a mailto: address"),
        ({"vapid_subject": "https://"}, "without a host"),
        ({"vapid_private_key": "not a key"}, "not a P-256 private key"),
        ({"vapid_private_key": p384.decode()}, "secp384r1"),
        ({"vapid_private_key": rsa_pem.decode()}, "not an EC key"),
        ({"ttl": -1}, "ttl must be"),
        ({"urgency": "asap"}, "urgency 'asap'"),
        ({"timeout": 0}, "timeout must be positive"),
    ]
    for change, message in cases:
        options: dict[str, Any] = {"vapid_private_key": VAPID_PRIVATE, "vapid_subject": SUBJECT}
        with pytest.raises(ValueError, match=message):
            WebPushSettings(**{**options, **change})
    assert VAPID_PRIVATE not in repr(WebPushSettings(VAPID_PRIVATE, SUBJECT))


def test_generated_vapid_keys_are_a_p256_pair() -> None:
    private_pem, public = generate_vapid_keys()
    key = serialization.load_pem_private_key(private_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert unb64url(public) == point and "=" not in public
    assert generate_vapid_keys()[1] != public


def test_push_providers_refuse_other_channels() -> None:
    email = OutgoingMessage("m1", Channel.EMAIL, "a@example.com", Rendered(Channel.EMAIL, {}), NOW)
    provider = web_push()
    fcm = FcmProvider(FcmSettings("demo-project", lambda: "t"))
    with pytest.raises(ValueError, match="sends push"):
        provider.send(email)
    with pytest.raises(ValueError, match="sends push"):
        fcm.send(email)
    provider.close()
    fcm.close()


# --- FCM ------------------------------------------------------------------------------------

PROJECT = "demo-project"
SEND_PATH = f"/v1/projects/{PROJECT}/messages:send"


def fcm_error(status: int, grpc: str, message: str, *details: dict[str, Any]) -> bytes:
    error = {"code": status, "message": message, "status": grpc, "details": list(details)}
    return json.dumps({"error": error}).encode()


def fcm_code(code: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}


FCM_ANSWERS: dict[str, Answer] = {
    "dev-gone": (
        404,
        {},
        fcm_error(404, "NOT_FOUND", "Requested entity was not found.", fcm_code("UNREGISTERED")),
    ),
    "dev-invalid": (
        400,
        {},
        fcm_error(
            400,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
            fcm_code("INVALID_ARGUMENT"),
        ),
    ),
    "dev-invalid-field": (
        400,
        {},
        fcm_error(
            400,
            "INVALID_ARGUMENT",
            "Request contains an invalid argument.",
            fcm_code("INVALID_ARGUMENT"),
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": "message.token", "description": "Invalid token"}],
            },
        ),
    ),
    "dev-bad-data": (
        400,
        {},
        fcm_error(
            400,
            "INVALID_ARGUMENT",
            "Invalid data payload key: from",
            fcm_code("INVALID_ARGUMENT"),
        ),
    ),
    "dev-mismatch": (
        403,
        {},
        fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", fcm_code("SENDER_ID_MISMATCH")),
    ),
    "dev-busy": (
        429,
        {"Retry-After": "30"},
        fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", fcm_code("QUOTA_EXCEEDED")),
    ),
    "dev-down": (503, {}, fcm_error(503, "UNAVAILABLE", "The service is unavailable.")),
    "dev-internal": (500, {}, fcm_error(500, "INTERNAL", "Internal error.", fcm_code("INTERNAL"))),
    "dev-garbage": (200, {"Content-Type": "text/html"}, b"<html>captive portal</html>"),
    "dev-html-404": (404, {"Content-Type": "text/html"}, b"<html>Not Found</html>"),
}


@dataclass
class FcmFake:
    """A local FCM: refuses the bearer tokens in ``rejected`` with 401, answers by device."""

    server: Server
    rejected: set[str] = field(default_factory=set)


@pytest.fixture
def fcm() -> Iterator[FcmFake]:
    rejected: set[str] = set()

    def answer(call: Call) -> Answer:
        if call.path != SEND_PATH:
            return 404, {}, b"wrong path"
        if call.headers.get("authorization") in rejected:
            error = fcm_error(401, "UNAUTHENTICATED", "Request had invalid credentials.")
            return 401, {}, error
        device = json.loads(call.body)["message"]["token"]
        name = json.dumps({"name": f"projects/{PROJECT}/messages/0:{len(device)}"}).encode()
        return FCM_ANSWERS.get(device, (200, {"Content-Type": "application/json"}, name))

    with serving(answer) as server:
        yield FcmFake(server, rejected)


def fcm_provider(fcm: FcmFake, tokens: Callable[[], str] = lambda: "static-token") -> FcmProvider:
    return FcmProvider(FcmSettings(PROJECT, tokens, base_url=fcm.server.url + "/"))


def test_fcm_sends_a_v1_message_with_string_data(fcm: FcmFake) -> None:
    provider = fcm_provider(fcm)
    message = push_message(
        "device-1",
        message_id="m-42",
        data={
            "order": "A-1",
            "count": 3,
            "flags": {"gift": True},
        },  # non-strings, as a caller might
        deep_link="https://shop.example/orders/A-1",
        image_url="https://cdn.example/parcel.png",
    )
    result = provider.send(message)
    plain = provider.send(push_message("device-2", message_id="m" * 70, deep_link="shop://o/1"))
    provider.close()
    assert result.outcome is Outcome.SENT
    assert result.provider_id == f"projects/{PROJECT}/messages/0:8"
    first, second = fcm.server.calls
    assert first.headers["authorization"] == "Bearer static-token"
    assert first.headers["content-type"] == "application/json"
    assert json.loads(first.body) == {
        "message": {
            "token": "device-1",
            "notification": {
                "title": "Hi Ünï",
                "body": "Your order has shipped",
                "image": "https://cdn.example/parcel.png",
            },
            "data": {
                "order": "A-1",
                "count": "3",
                "flags": '{"gift":true}',
                "message_id": "m-42",
                "deep_link": "https://shop.example/orders/A-1",
            },
            "apns": {
                "headers": {"apns-collapse-id": "m-42"},
                "payload": {"aps": {"mutable-content": 1}},
                "fcm_options": {"image": "https://cdn.example/parcel.png"},
            },
            "webpush": {"fcm_options": {"link": "https://shop.example/orders/A-1"}},
        }
    }
    assert plain.outcome is Outcome.SENT
    assert json.loads(second.body) == {
        "message": {
            "token": "device-2",
            "notification": {"title": "Hi Ünï", "body": "Your order has shipped"},
            "data": {"message_id": "m" * 70, "deep_link": "shop://o/1"},
        }
    }


def test_fcm_answers_map_to_results(fcm: FcmFake) -> None:
    provider = FcmProvider(FcmSettings(PROJECT, lambda: "static-token", base_url=fcm.server.url))
    results = {device: provider.send(push_message(device)) for device in FCM_ANSWERS}
    provider.close()
    for device in ("dev-gone", "dev-invalid", "dev-invalid-field"):
        result = results[device]
        assert (result.outcome, result.transient, result.address_gone) == (
            Outcome.FAILED,
            False,
            True,
        ), device
    assert "UNREGISTERED" in results["dev-gone"].detail
    for device in ("dev-bad-data", "dev-mismatch", "dev-html-404"):
        result = results[device]
        assert (result.outcome, result.transient, result.address_gone) == (
            Outcome.FAILED,
            False,
            False,
        ), device
    assert "Invalid data payload key" in results["dev-bad-data"].detail
    assert "SENDER_ID_MISMATCH" in results["dev-mismatch"].detail
    assert "not FCM's error JSON" in results["dev-html-404"].detail
    busy = results["dev-busy"]
    assert (busy.transient, busy.retry_after, busy.address_gone) == (True, 30.0, False)
    assert "QUOTA_EXCEEDED" in busy.detail
    for device in ("dev-down", "dev-internal"):
        assert (results[device].transient, results[device].address_gone) == (True, False)
    garbage = results["dev-garbage"]
    assert (garbage.outcome, garbage.transient) == (Outcome.FAILED, True)
    assert "without its JSON" in garbage.detail and "captive portal" in garbage.detail


def test_fcm_refused_credentials_fail_permanently_after_one_retry(fcm: FcmFake) -> None:
    fcm.rejected.add("Bearer static-token")
    provider = fcm_provider(fcm)
    result = provider.send(push_message("device-1"))
    provider.close()
    assert (result.outcome, result.transient, result.address_gone) == (Outcome.FAILED, False, False)
    assert "refused the credentials" in result.detail and "401" in result.detail
    assert len(fcm.server.calls) == 2


def test_fcm_network_failures_are_transient() -> None:
    provider = FcmProvider(FcmSettings(PROJECT, lambda: "t", base_url="http://127.0.0.1:9"))
    result = provider.send(push_message("device-1"))
    empty = provider.send(push_message("  "))
    provider.close()
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "cannot reach" in result.detail
    assert empty.address_gone
    with pytest.raises(ValueError, match="project_id"):
        FcmSettings("a/b", lambda: "t")


# --- service account tokens against a local token endpoint ------------------------------------

RSA_KEY = rsa.generate_private_key(65537, 2048)
CLIENT_EMAIL = "sender@demo-project.iam.gserviceaccount.com"


def service_account_info(token_uri: str) -> dict[str, str]:
    pem = RSA_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "key-1",
        "private_key": pem,
        "client_email": CLIENT_EMAIL,
        "client_id": "1234567890",
        "token_uri": token_uri,
    }


@dataclass
class TokenEndpoint:
    server: Server
    settings: dict[str, Any]  # expires_in; refuse: answer invalid_grant


@pytest.fixture
def token_endpoint() -> Iterator[TokenEndpoint]:
    settings: dict[str, Any] = {"expires_in": 3600, "refuse": False}
    issued: list[str] = []

    def answer(call: Call) -> Answer:
        form = {k: v[0] for k, v in parse_qs(call.body.decode()).items()}
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        header_b64, claims_b64, signature_b64 = form["assertion"].split(".")
        RSA_KEY.public_key().verify(
            unb64url(signature_b64),
            f"{header_b64}.{claims_b64}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
        assert json.loads(unb64url(header_b64))["alg"] == "RS256"
        claims = json.loads(unb64url(claims_b64))
        assert claims["iss"] == CLIENT_EMAIL
        assert claims["scope"] == FCM_SCOPE
        assert claims["aud"] == "https://oauth2.googleapis.com/token"
        assert claims["exp"] > time.time()
        if settings["refuse"]:
            body = {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
            return 400, {"Content-Type": "application/json"}, json.dumps(body).encode()
        issued.append(f"sa-token-{len(issued) + 1}")
        body = {
            "access_token": issued[-1],
            "expires_in": settings["expires_in"],
            "token_type": "Bearer",
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    with serving(answer) as server:
        yield TokenEndpoint(server, settings)


def test_a_refused_token_is_refreshed_once(fcm: FcmFake, token_endpoint: TokenEndpoint) -> None:
    tokens = service_account_tokens(
        service_account_info("https://unused.example/token"),
        token_uri=f"{token_endpoint.server.url}/token",
    )
    fcm.rejected.add("Bearer sa-token-1")  # revoked after it was issued
    provider = fcm_provider(fcm, tokens)
    first = provider.send(push_message("device-1"))
    second = provider.send(push_message("device-2"))
    provider.close()
    assert first.outcome is Outcome.SENT and second.outcome is Outcome.SENT
    assert [c.headers["authorization"] for c in fcm.server.calls] == [
        "Bearer sa-token-1",
        "Bearer sa-token-2",
        "Bearer sa-token-2",  # cached: still valid
    ]
    assert [c.path for c in token_endpoint.server.calls] == ["/token", "/token"]


def test_an_expiring_token_is_refreshed(token_endpoint: TokenEndpoint, tmp_path: Path) -> None:
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(service_account_info(f"{token_endpoint.server.url}/token")))
    token_endpoint.settings["expires_in"] = 60  # inside google-auth's refresh margin
    tokens = service_account_tokens(key_file)
    assert [tokens(), tokens()] == ["sa-token-1", "sa-token-2"]
    token_endpoint.settings["expires_in"] = 3600
    assert [tokens(), tokens()] == ["sa-token-3", "sa-token-3"]
    assert len(token_endpoint.server.calls) == 3


def test_a_token_endpoint_refusal_is_a_permanent_failure(
    fcm: FcmFake, token_endpoint: TokenEndpoint
) -> None:
    token_endpoint.settings["refuse"] = True
    tokens = service_account_tokens(service_account_info(f"{token_endpoint.server.url}/token"))
    provider = fcm_provider(fcm, tokens)
    result = provider.send(push_message("device-1"))
    provider.close()
    assert (result.outcome, result.transient, result.address_gone) == (Outcome.FAILED, False, False)
    assert "cannot get an FCM access token" in result.detail
    assert "invalid_grant" in result.detail
    assert fcm.server.calls == []


def test_an_unreachable_token_endpoint_is_transient(fcm: FcmFake) -> None:
    tokens = service_account_tokens(service_account_info("http://127.0.0.1:9/token"), timeout=2)
    provider = fcm_provider(fcm, tokens)
    result = provider.send(push_message("device-1"))
    provider.close()
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "cannot get an FCM access token" in result.detail


def test_a_bad_service_account_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        service_account_tokens({"client_email": CLIENT_EMAIL, "token_uri": "https://t.example"})
    not_json = tmp_path / "key.json"
    not_json.write_text("nope")
    with pytest.raises(ValueError, match="not a service account key"):
        service_account_tokens(not_json)
