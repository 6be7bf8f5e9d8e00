"""Push notifications: Web Push to browsers and Firebase Cloud Messaging (HTTP v1) to apps.

**Web Push** (:class:`WebPushProvider`): RFC 8030 delivery, the payload encrypted with
``aes128gcm`` (RFC 8291) and signed for with VAPID (RFC 8292). pywebpush encrypts and py_vapid
signs; the POST itself goes through httpx, like every other HTTP provider here, so that the
encrypted size can be checked before anything is sent and errors map the same way.

- ``message.to`` is the browser's subscription, the JSON of ``PushSubscription.toJSON()``:
  ``{"endpoint": "https://...", "keys": {"p256dh": "<base64url>", "auth": "<base64url>"}}``
  (other members such as ``expirationTime`` are ignored). :func:`parse_subscription` checks it;
  a malformed one is a permanent failure with ``address_gone`` (the stored subscription is
  useless) naming what was wrong, and no request is made.
- The payload is JSON for the service worker: ``title``, ``body``, ``url`` (the deep link),
  ``image``, ``data`` (the template's data object) and ``message_id`` (for open/click feedback);
  empty fields are left out. Encrypted, it must fit in 4096 bytes (about 3993 bytes of JSON);
  a larger one fails permanently, naming both sizes.
- Headers: ``TTL``, ``Urgency`` when configured, and ``Topic`` derived from the message id (the
  id itself when it is at most 32 URL-safe characters, a UUID's 32 hex digits, else no Topic):
  a retried message then replaces its earlier copy if the push service still holds it, so the
  browser shows one notification.
- Answers: 2xx sent (``provider_id`` from ``Location``); 404 and 410 the subscription is gone
  (the caller prunes it); 401 and 403 a permanent failure naming VAPID (a key mismatch, never
  taken as gone: a wrong key in the configuration must not prune every subscription); 413
  permanent; 408, 425, 429 and 5xx transient with ``Retry-After``; other statuses permanent;
  timeouts and network errors transient.

Endpoints must be ``https`` (RFC 8030) unless ``allow_http`` is set, for local push services in
tests, and name a host whose origin can be the VAPID audience (no credentials, no IPv6 literal).
Subscriptions come from browsers, so an endpoint is untrusted input: redirects are not followed.

**FCM** (:class:`FcmProvider`): ``POST {base_url}/v1/projects/{project_id}/messages:send`` with
``Authorization: Bearer <token>`` and ``{"message": {...}}`` where ``token`` is ``message.to``
(a device registration token), ``notification`` holds ``title``, ``body`` and ``image``, and
``data`` holds the template's data plus ``message_id`` and ``deep_link``. FCM takes only string
values in ``data``: strings pass unchanged, anything else is written as JSON text (``true``,
``3``, ``{"a": 1}``). The deep link also becomes ``webpush.fcm_options.link`` when it is https;
Android and APNs have no link field, so apps read ``data.deep_link``. ``apns-collapse-id`` is the
message id when it fits in 64 bytes (a retried message replaces its copy on iOS), and an image
sets ``mutable-content`` and ``apns.fcm_options.image`` (iOS needs both to show it).

Tokens come from a token source, a callable returning a bearer token; :func:`service_account_tokens`
makes one from a Google service account. It is called before every request and is expected to
cache. After a 401 the provider calls the source's ``invalidate()`` when it has one, and tries
once more with a fresh token; a second 401 is a permanent failure naming the credentials (not
``address_gone``). A source that raises a google-auth error fails the send, transient when the
error is a transport error or marked retryable.

FCM answers: 200 sent with ``provider_id`` the response's ``name``; ``UNREGISTERED``, a 404
``NOT_FOUND`` in FCM's error JSON, and a 400 ``INVALID_ARGUMENT`` about the registration token
are ``address_gone``; 403 (``SENDER_ID_MISMATCH``, ``PERMISSION_DENIED``) permanent, not gone;
408, 429 and 5xx transient with ``Retry-After``; other statuses permanent. A 2xx whose body is
not FCM's JSON is transient (it names the body); an error status whose body is not FCM's JSON
maps by status only, never to ``address_gone`` (a 404 from a wrong ``base_url`` must not prune
every token).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote, urlsplit

import google.auth.transport.requests
import httpx
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.auth.exceptions import GoogleAuthError, RefreshError, TransportError
from google.oauth2 import service_account
from py_vapid import Vapid
from pywebpush import WebPusher

from waymark.channels.base import DeliveryResult, OutgoingMessage
from waymark.channels.webhook import TRANSIENT_STATUSES, retry_after
from waymark.core.clock import Clock, SystemClock
from waymark.core.errors import InvalidInput, Issue
from waymark.delivery.templates import Channel

__all__ = [
    "FCM_SCOPE",
    "MAX_ENCRYPTED_PAYLOAD",
    "FcmProvider",
    "FcmSettings",
    "ServiceAccountTokens",
    "TokenSource",
    "WebPushProvider",
    "WebPushSettings",
    "WebPushSubscription",
    "generate_vapid_keys",
    "parse_subscription",
    "service_account_tokens",
]

#: The largest encrypted body every push service must accept (RFC 8030 section 7.2).
MAX_ENCRYPTED_PAYLOAD: Final = 4096
#: The OAuth 2 scope for sending with FCM HTTP v1.
FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
#: How long a VAPID token is valid (RFC 8292 allows at most 24 hours).
_VAPID_LIFETIME_S: Final = 12 * 3600
_URGENCIES: Final = frozenset({"very-low", "low", "normal", "high"})
_TOPIC: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
_BASE64: Final = re.compile(r"[A-Za-z0-9_+/-]+={0,2}")
_MAILTO: Final = re.compile(r"mailto:[^@\s]+@[^@\s]+")
_SHOWN: Final = 200  # characters of a response body quoted in a detail

#: Returns a bearer token for FCM; may also have ``invalidate()`` (see the module docstring).
TokenSource = Callable[[], str]


# --- Web Push -------------------------------------------------------------------------------


def _load_vapid(private_key: str) -> Vapid:
    """The py_vapid signer for a P-256 private key given as PEM (PKCS#8 or SEC 1), as the
    base64url raw 32-byte scalar, or as base64 DER; ``ValueError`` naming what is wrong."""
    text = private_key.strip()
    try:
        if text.startswith("-----BEGIN"):
            vapid = Vapid(private_key=serialization.load_pem_private_key(text.encode(), None))
        else:
            vapid = Vapid.from_string(text)
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise ValueError(
            "vapid_private_key is not a P-256 private key in PEM or base64url form: "
            f"{str(exc) or type(exc).__name__}"
        ) from None
    key = vapid.private_key
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"vapid_private_key is a {type(key).__name__}, not an EC key")
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"vapid_private_key is on the {key.curve.name} curve, not P-256")
    # The subject is checked by WebPushSettings; py_vapid's own check refuses https subjects
    # with a path, which RFC 8292 allows.
    vapid.conf = {"no-strict": True}
    return vapid


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def generate_vapid_keys() -> tuple[str, str]:
    """A new VAPID key pair: the private key as PKCS#8 PEM (for
    :attr:`WebPushSettings.vapid_private_key`) and the public key as the base64url uncompressed
    point that browsers take as ``applicationServerKey`` in ``pushManager.subscribe``."""
    vapid = Vapid()
    vapid.generate_keys()
    public = vapid.public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return vapid.private_pem().decode(), _b64url(public)


@dataclass(frozen=True)
class WebPushSettings:
    """The application server's side of Web Push. ``vapid_subject`` is a ``mailto:`` address or
    an ``https`` URL where the push service can reach the sender; ``ttl`` is how many seconds
    the push service keeps a message for an offline browser (default 28 days); ``urgency`` is
    ``very-low``, ``low``, ``normal`` or ``high`` (None: the service's default, normal).
    ``ValueError`` names a bad value."""

    vapid_private_key: str = field(repr=False)
    vapid_subject: str
    ttl: int = 28 * 24 * 3600
    urgency: Literal["very-low", "low", "normal", "high"] | None = None
    timeout: float = 10.0
    allow_http: bool = False  # for local push services in tests only

    def __post_init__(self) -> None:
        _load_vapid(self.vapid_private_key)
        subject = self.vapid_subject
        if subject.startswith("mailto:"):
            if not _MAILTO.fullmatch(subject):
                raise ValueError(f"vapid_subject {subject!r} is not a mailto: address")
        elif subject.startswith("https://"):
            if not urlsplit(subject).hostname:
                raise ValueError(f"vapid_subject {subject!r} is an https URL without a host")
        else:
            raise ValueError(f"vapid_subject {subject!r} must be a mailto: address or an https URL")
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int) or self.ttl < 0:
            raise ValueError(f"ttl must be a whole number of seconds >= 0, not {self.ttl!r}")
        if self.urgency is not None and self.urgency not in _URGENCIES:
            known = ", ".join(sorted(_URGENCIES))
            raise ValueError(f"urgency {self.urgency!r} is not one of {known}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, not {self.timeout!r}")


@dataclass(frozen=True)
class WebPushSubscription:
    """A checked browser subscription: the push service ``endpoint``, the browser's P-256 public
    key ``p256dh`` (65 bytes, uncompressed) and its 16-byte ``auth`` secret."""

    endpoint: str
    p256dh: bytes
    auth: bytes

    @property
    def audience(self) -> str:
        """The endpoint's origin, the ``aud`` of the VAPID token."""
        parts = urlsplit(self.endpoint)
        return f"{parts.scheme}://{parts.netloc}"

    def as_info(self) -> dict[str, Any]:
        """The ``subscription_info`` dictionary pywebpush takes."""
        return {
            "endpoint": self.endpoint,
            "keys": {"p256dh": _b64url(self.p256dh), "auth": _b64url(self.auth)},
        }


def _key(keys: Mapping[str, Any], name: str, size: int, issues: list[Issue]) -> bytes:
    path = f"keys.{name}"
    value = keys.get(name)
    if not isinstance(value, str) or not value:
        issues.append(Issue(path, "missing: a base64url string is expected"))
        return b""
    if not _BASE64.fullmatch(value):
        issues.append(Issue(path, "not base64url text"))
        return b""
    unpadded = value.rstrip("=").replace("+", "-").replace("/", "_")
    try:
        raw = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        issues.append(Issue(path, "not base64url text (bad length)"))
        return b""
    if len(raw) != size:
        issues.append(Issue(path, f"decodes to {len(raw)} bytes; {size} are expected"))
    return raw


def _endpoint_problem(endpoint: str, *, allow_http: bool) -> str | None:
    """What keeps ``endpoint`` from being a push service URL whose origin can be a VAPID
    audience, or None."""
    try:
        parts = urlsplit(endpoint)
        _ = parts.port  # a bad port raises ValueError only when read
    except ValueError as exc:
        return f"not a URL: {exc}"
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        return f"{parts.scheme or 'no'} scheme; https is expected"
    if not parts.hostname:
        return "the URL has no host"
    if "@" in parts.netloc:
        return "the URL carries credentials"
    if ":" in parts.hostname:
        return "an IPv6 literal host cannot be a VAPID audience"
    return None


def parse_subscription(text: str, *, allow_http: bool = False) -> WebPushSubscription:
    """The subscription in ``text`` (the JSON described in the module docstring);
    :class:`InvalidInput` with an issue per problem (``endpoint``, ``keys.p256dh``,
    ``keys.auth``)."""
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(
            [Issue("", f"a push subscription is JSON; this is not: {exc}")]
        ) from None
    if not isinstance(document, dict):
        kind = type(document).__name__
        raise InvalidInput([Issue("", f"a push subscription is a JSON object, not {kind}")])
    issues: list[Issue] = []
    endpoint = document.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        issues.append(Issue("endpoint", "missing: the push service URL is expected"))
        endpoint = ""
    else:
        problem = _endpoint_problem(endpoint, allow_http=allow_http)
        if problem:
            issues.append(Issue("endpoint", problem))
    keys = document.get("keys")
    p256dh = auth = b""
    if not isinstance(keys, dict):
        issues.append(Issue("keys", "missing: an object with p256dh and auth is expected"))
    else:
        p256dh = _key(keys, "p256dh", 65, issues)
        auth = _key(keys, "auth", 16, issues)
        if len(p256dh) == 65:
            try:
                ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
            except ValueError:
                issues.append(Issue("keys.p256dh", "not a point on the P-256 curve"))
    if issues:
        raise InvalidInput(issues)
    return WebPushSubscription(endpoint, p256dh, auth)


def _topic(message_id: str) -> str | None:
    """The RFC 8030 ``Topic`` for a message id, or None when none fits (see the module
    docstring)."""
    if _TOPIC.fullmatch(message_id):
        return message_id
    try:
        return uuid.UUID(message_id).hex
    except ValueError:
        return None


def _web_push_payload(message: OutgoingMessage) -> bytes:
    fields = message.content.fields
    payload: dict[str, Any] = {
        "title": fields.get("title", ""),
        "body": fields.get("body", ""),
        "url": fields.get("deep_link", ""),
        "image": fields.get("image_url", ""),
        "data": dict(message.content.data),
    }
    payload = {key: value for key, value in payload.items() if value}
    payload["message_id"] = message.id
    return orjson.dumps(payload)


def _post(
    client: httpx.Client, url: str, *, content: bytes, headers: Mapping[str, str]
) -> httpx.Response | DeliveryResult:
    """The response, or the transient failure a timeout or network error is."""
    try:
        return client.post(url, content=content, headers=dict(headers))
    except httpx.TimeoutException as exc:
        return DeliveryResult.failed(f"timed out: {exc!r}", transient=True)
    except httpx.HTTPError as exc:
        host = urlsplit(url).netloc
        return DeliveryResult.failed(f"cannot reach {host}: {exc!r}", transient=True)


def _by_status(response: httpx.Response, detail: str, now: datetime) -> DeliveryResult:
    """The failure ``response`` is by its status alone: 408, 425, 429 and 5xx transient (with
    ``Retry-After``), others permanent."""
    status = response.status_code
    transient = status in TRANSIENT_STATUSES or status >= 500
    wait = retry_after(response.headers.get("retry-after"), now) if transient else None
    return DeliveryResult.failed(detail, transient=transient, retry_after=wait)


class WebPushProvider:
    """Web Push to browser subscriptions (see the module docstring). Connections are pooled by
    the httpx client; thread-safe."""

    channel = Channel.PUSH

    def __init__(
        self,
        settings: WebPushSettings,
        *,
        clock: Clock | None = None,
        transport: httpx.BaseTransport | None = None,
        name: str = "webpush",
    ) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock or SystemClock()
        self._vapid = _load_vapid(settings.vapid_private_key)
        self._client = httpx.Client(
            timeout=settings.timeout, transport=transport, follow_redirects=False
        )

    def send(self, message: OutgoingMessage) -> DeliveryResult:
        if message.channel is not Channel.PUSH:
            raise ValueError(f"{self.name} sends push, not {message.channel.value}")
        settings = self.settings
        try:
            subscription = parse_subscription(message.to, allow_http=settings.allow_http)
        except InvalidInput as exc:
            return DeliveryResult.gone(f"malformed push subscription: {exc.message}")
        payload = _web_push_payload(message)
        body: bytes = WebPusher(subscription.as_info()).encode(payload, "aes128gcm")["body"]
        if len(body) > MAX_ENCRYPTED_PAYLOAD:
            return DeliveryResult.failed(
                f"the encrypted push payload is {len(body):,} bytes ({len(payload):,} bytes of "
                f"JSON); push services take at most {MAX_ENCRYPTED_PAYLOAD:,}: shorten the "
                "title, body or data",
                transient=False,
            )
        now = self.clock.now()
        claims = {
            "aud": subscription.audience,
            "sub": settings.vapid_subject,
            "exp": int(now.timestamp()) + _VAPID_LIFETIME_S,
        }
        headers = {
            "TTL": str(settings.ttl),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            **self._vapid.sign(claims),
        }
        if settings.urgency:
            headers["Urgency"] = settings.urgency
        topic = _topic(message.id)
        if topic:
            headers["Topic"] = topic
        response = _post(self._client, subscription.endpoint, content=body, headers=headers)
        if isinstance(response, DeliveryResult):
            return response
        status = response.status_code
        if 200 <= status < 300:
            return DeliveryResult.sent(response.headers.get("location"), f"HTTP {status}")
        shown = response.text[:_SHOWN]
        if status in (404, 410):
            return DeliveryResult.gone(
                f"the push subscription has expired or was withdrawn (HTTP {status}): {shown}"
            )
        if status in (401, 403):
            return DeliveryResult.failed(
                f"the push service refused the VAPID credentials (HTTP {status}): {shown}; "
                "was the subscription made with another application server key?",
                transient=False,
            )
        if status == 413:
            return DeliveryResult.failed(
                f"the push service refused the payload as too large ({len(body):,} bytes "
                f"encrypted, HTTP 413): {shown}",
                transient=False,
            )
        return _by_status(response, f"HTTP {status}: {shown}", now)

    def close(self) -> None:
        self._client.close()


# --- FCM ------------------------------------------------------------------------------------


class ServiceAccountTokens:
    """A :data:`TokenSource` of OAuth 2 access tokens for a Google service account (the JWT
    bearer grant, through google-auth). A token is reused until google-auth deems it about to
    expire (a few minutes early) or :meth:`invalidate` is called; thread-safe. Build with
    :func:`service_account_tokens`. Raises google-auth's ``RefreshError`` or ``TransportError``
    when no token can be had."""

    def __init__(self, credentials: service_account.Credentials, *, timeout: float = 10.0) -> None:
        self.credentials = credentials
        # google-auth's own transport over requests (present as a dependency of pywebpush)
        self._request = functools.partial(google.auth.transport.requests.Request(), timeout=timeout)
        self._lock = threading.Lock()
        self._stale = False

    def __call__(self) -> str:
        with self._lock:
            if self._stale or not self.credentials.valid:
                self.credentials.refresh(self._request)  # type: ignore[no-untyped-call]
                self._stale = False
            token = self.credentials.token
        if not isinstance(token, str) or not token:
            raise RefreshError("google-auth returned no access token")  # type: ignore[no-untyped-call]
        return token

    def invalidate(self) -> None:
        """Make the next call fetch a new token (the last one was refused)."""
        with self._lock:
            self._stale = True


def service_account_tokens(
    info_or_path: Mapping[str, Any] | str | PathLike[str],
    *,
    token_uri: str | None = None,
    timeout: float = 10.0,
) -> ServiceAccountTokens:
    """A token source for FCM from a service account key: its parsed JSON, or the path of its
    JSON file. ``token_uri`` overrides the key's token endpoint. ``ValueError`` (or ``OSError``
    for an unreadable file) when the key is not usable."""
    if isinstance(info_or_path, Mapping):
        info = dict(info_or_path)
    else:
        try:
            info = orjson.loads(Path(info_or_path).read_bytes())
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{info_or_path}: not a service account key (JSON): {exc}") from None
        if not isinstance(info, dict):
            raise ValueError(f"{info_or_path}: not a service account key (a JSON object)")
    if token_uri is not None:
        info["token_uri"] = token_uri
    credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
        info, scopes=[FCM_SCOPE]
    )
    return ServiceAccountTokens(credentials, timeout=timeout)


@dataclass(frozen=True)
class FcmSettings:
    """Where and as whom to send with FCM HTTP v1: the Firebase ``project_id``, a
    :data:`TokenSource` for bearer tokens, the API's ``base_url`` and the request timeout.
    ``ValueError`` names a bad value."""

    project_id: str
    token_source: TokenSource = field(repr=False)
    base_url: str = "https://fcm.googleapis.com"
    timeout: float = 10.0

    def __post_init__(self) -> None:
        project = self.project_id
        if not project or "/" in project or project != project.strip():
            raise ValueError(f"project_id {self.project_id!r} is not a Firebase project id")
        if urlsplit(self.base_url).scheme not in ("https", "http"):
            raise ValueError(f"base_url {self.base_url!r} is not an http(s) URL")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, not {self.timeout!r}")

    @property
    def send_url(self) -> str:
        project = quote(self.project_id, safe=":")
        return f"{self.base_url.rstrip('/')}/v1/projects/{project}/messages:send"


def _as_string(value: object) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _fcm_body(message: OutgoingMessage) -> dict[str, Any]:
    """The ``messages:send`` request body for ``message`` (see the module docstring)."""
    fields = message.content.fields
    notification = {"title": fields.get("title", ""), "body": fields.get("body", "")}
    data = {str(key): _as_string(value) for key, value in message.content.data.items()}
    data["message_id"] = message.id
    out: dict[str, Any] = {"token": message.to, "notification": notification, "data": data}
    apns: dict[str, Any] = {}
    if len(message.id.encode()) <= 64:
        apns["headers"] = {"apns-collapse-id": message.id}
    image = fields.get("image_url")
    if image:
        notification["image"] = image
        apns["payload"] = {"aps": {"mutable-content": 1}}
        apns["fcm_options"] = {"image": image}
    if apns:
        out["apns"] = apns
    link = fields.get("deep_link")
    if link:
        data["deep_link"] = link
        if link.startswith("https://"):
            out["webpush"] = {"fcm_options": {"link": link}}
    return {"message": out}


def _fcm_error(document: Any) -> tuple[str, str, str, bool] | None:
    """From FCM's error JSON: the gRPC status, the FCM error code, the message and whether a
    field violation names the registration token; None when ``document`` is not that JSON."""
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return None
    code = ""
    token_field = False
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict):
            continue
        if isinstance(detail.get("errorCode"), str):
            code = detail["errorCode"]
        violations = detail.get("fieldViolations")
        for violation in violations if isinstance(violations, list) else ():
            if isinstance(violation, dict) and violation.get("field") == "message.token":
                token_field = True
    return str(error.get("status", "")), code, str(error.get("message", "")), token_field


def _fcm_result(response: httpx.Response, now: datetime) -> DeliveryResult:
    """The result an FCM answer is (see the module docstring), 401 included."""
    status = response.status_code
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        document = None
    if 200 <= status < 300:
        name = document.get("name") if isinstance(document, dict) else None
        if isinstance(name, str) and name:
            return DeliveryResult.sent(name, f"HTTP {status}")
        return DeliveryResult.failed(
            f"FCM answered HTTP {status} without its JSON (a message name): "
            f"{response.text[:_SHOWN]!r}",
            transient=True,
        )
    error = _fcm_error(document)
    if error is None:
        return _by_status(
            response, f"FCM HTTP {status}, not FCM's error JSON: {response.text[:_SHOWN]!r}", now
        )
    grpc_status, code, text, token_field = error
    detail = f"FCM HTTP {status} {'/'.join(filter(None, (grpc_status, code)))}: {text}"
    invalid_token = token_field or "registration token" in text.lower()
    if (
        code == "UNREGISTERED"
        or grpc_status == "UNREGISTERED"
        or (status == 404 and grpc_status == "NOT_FOUND")
        or (status == 400 and "INVALID_ARGUMENT" in (grpc_status, code) and invalid_token)
    ):
        return DeliveryResult.gone(detail)
    if status == 401:
        return DeliveryResult.failed(
            f"FCM refused the credentials, also on a retry: {detail}", transient=False
        )
    return _by_status(response, detail, now)


class FcmProvider:
    """Firebase Cloud Messaging HTTP v1 to device registration tokens (see the module
    docstring). Connections are pooled by the httpx client; thread-safe when the token source
    is."""

    channel = Channel.PUSH

    def __init__(
        self,
        settings: FcmSettings,
        *,
        clock: Clock | None = None,
        transport: httpx.BaseTransport | None = None,
        name: str = "fcm",
    ) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock or SystemClock()
        self._client = httpx.Client(
            timeout=settings.timeout, transport=transport, follow_redirects=False
        )

    def _attempt(self, body: bytes) -> httpx.Response | DeliveryResult:
        """One POST of ``body`` with a token from the source, or the failure getting either."""
        try:
            token = self.settings.token_source()
        except GoogleAuthError as exc:
            transient = isinstance(exc, TransportError) or bool(getattr(exc, "retryable", False))
            return DeliveryResult.failed(
                f"cannot get an FCM access token: {exc}", transient=transient
            )
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        return _post(self._client, self.settings.send_url, content=body, headers=headers)

    def send(self, message: OutgoingMessage) -> DeliveryResult:
        if message.channel is not Channel.PUSH:
            raise ValueError(f"{self.name} sends push, not {message.channel.value}")
        if not message.to.strip():
            return DeliveryResult.gone("no FCM registration token")
        body = orjson.dumps(_fcm_body(message))
        response = self._attempt(body)
        if isinstance(response, httpx.Response) and response.status_code == 401:
            # an expired or revoked token: once more with a fresh one
            invalidate = getattr(self.settings.token_source, "invalidate", None)
            if callable(invalidate):
                invalidate()
            response = self._attempt(body)
        if isinstance(response, DeliveryResult):
            return response
        return _fcm_result(response, self.clock.now())

    def close(self) -> None:
        self._client.close()
