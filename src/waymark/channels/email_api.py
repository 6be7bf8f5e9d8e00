"""Email through an HTTP API speaking SendGrid's v3 Mail Send shape, and its Event Webhook.

:class:`HttpEmailProvider` POSTs one JSON document per message to ``/v3/mail/send`` with
``Authorization: Bearer <api key>`` (see :func:`sendgrid_payload`): one personalization for the
recipient carrying ``custom_args: {"waymark_message_id": <message id>}`` (echoed on every event
about the message), ``from``/``reply_to``/``subject`` with the same precedence as
:func:`waymark.channels.email.build_mime` (the template's fields over the settings), content
``text/plain`` then ``text/html`` (the preheader hidden at the top of the HTML, as there), and
``List-Unsubscribe``/``List-Unsubscribe-Post`` headers with the same rules as there. Answers map
to results: 2xx is sent, with the ``X-Message-Id`` header as the provider id (None if absent:
the message was accepted all the same); 408, 425, 429 and 5xx transient (``Retry-After``, else
the ``X-RateLimit-Reset`` time, passed on); other 4xx permanent with the API's
``errors[].message`` in the detail; timeouts and connection errors transient.

Duplicates: the API has no idempotency key. If the connection drops after the API accepted the
request but before its answer arrived, the retry may send the message twice; both copies carry
the same ``waymark_message_id``, so their feedback lands on one message.

:func:`parse_sendgrid_events` reads the Event Webhook's JSON array (pure);
:func:`verify_sendgrid_signature` checks its Signed Event Webhook headers
(``X-Twilio-Email-Event-Webhook-Signature`` and ``-Timestamp``).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import httpx
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from waymark.channels.base import DeliveryResult, Feedback, FeedbackKind, OutgoingMessage
from waymark.channels.email import unsubscribe_headers, with_preheader
from waymark.channels.webhook import TRANSIENT_STATUSES, retry_after
from waymark.core.clock import Clock, SystemClock
from waymark.core.errors import InvalidInput, Issue, join_path
from waymark.delivery.templates import Channel

__all__ = [
    "MESSAGE_ID_ARG",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "HttpEmailProvider",
    "HttpEmailSettings",
    "parse_sendgrid_events",
    "sendgrid_payload",
    "verify_sendgrid_signature",
]

#: The custom argument carrying Waymark's message id (SendGrid echoes it on each event).
MESSAGE_ID_ARG: Final = "waymark_message_id"
SIGNATURE_HEADER: Final = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER: Final = "X-Twilio-Email-Event-Webhook-Timestamp"

#: Event types and the feedback they are; others (processed, deferred …) are skipped.
_KINDS: Final = {
    "delivered": FeedbackKind.DELIVERED,
    "open": FeedbackKind.OPENED,
    "click": FeedbackKind.CLICKED,
    "bounce": FeedbackKind.BOUNCED,
    "dropped": FeedbackKind.FAILED,
    "spamreport": FeedbackKind.COMPLAINED,
    "unsubscribe": FeedbackKind.UNSUBSCRIBED,
    "group_unsubscribe": FeedbackKind.UNSUBSCRIBED,
}


@dataclass(frozen=True)
class HttpEmailSettings:
    """The API key and endpoint, and the sender side: the default ``From`` and ``Reply-To`` (a
    template may set its own). ``sandbox`` asks the API to validate without sending;
    ``timeout`` is per request, in seconds."""

    api_key: str
    from_address: str
    from_name: str | None = None
    reply_to: str | None = None
    base_url: str = "https://api.sendgrid.com"
    timeout: float = 10.0
    sandbox: bool = False

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("the email API needs an API key")

    @property
    def send_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/v3/mail/send"


def sendgrid_payload(message: OutgoingMessage, settings: HttpEmailSettings) -> dict[str, Any]:
    """The Mail Send JSON document for ``message`` (an email); ``ValueError`` for another
    channel or a message with neither text nor HTML."""
    if message.channel is not Channel.EMAIL:
        raise ValueError(f"not an email: {message.channel.value}")
    fields = message.content.fields
    sender: dict[str, str] = {"email": fields.get("from_address") or settings.from_address}
    name = fields.get("from_name") or settings.from_name
    if name:
        sender["name"] = name
    content = []
    text, html = fields.get("text", ""), fields.get("html", "")
    if text:
        content.append({"type": "text/plain", "value": text})
    if html:
        preheader = fields.get("preheader")
        if preheader:
            html = with_preheader(html, preheader)
        content.append({"type": "text/html", "value": html})
    if not content:
        raise ValueError("the message has neither text nor HTML")
    payload: dict[str, Any] = {
        "personalizations": [
            {"to": [{"email": message.to}], "custom_args": {MESSAGE_ID_ARG: message.id}}
        ],
        "from": sender,
        "subject": fields.get("subject", ""),
        "content": content,
    }
    reply_to = fields.get("reply_to") or settings.reply_to
    if reply_to:
        payload["reply_to"] = {"email": reply_to}
    headers = {**unsubscribe_headers(message), **message.headers}
    if headers:
        payload["headers"] = headers
    if settings.sandbox:
        payload["mail_settings"] = {"sandbox_mode": {"enable": True}}
    return payload


class HttpEmailProvider:
    """Email through the Mail Send API (see the module docstring). Connections are pooled by
    the httpx client, reused across sends; a ``client`` passed in is used as is (auth and
    timeout are set per request) and left open by :meth:`close`."""

    channel = Channel.EMAIL

    def __init__(
        self,
        settings: HttpEmailSettings,
        *,
        client: httpx.Client | None = None,
        clock: Clock | None = None,
        name: str = "sendgrid",
    ) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock or SystemClock()
        self._owns_client = client is None
        self._client = client or httpx.Client()

    def send(self, message: OutgoingMessage) -> DeliveryResult:
        if message.channel is not Channel.EMAIL:
            raise ValueError(f"{self.name} sends email, not {message.channel.value}")
        try:
            payload = sendgrid_payload(message, self.settings)
        except ValueError as exc:
            return DeliveryResult.failed(f"cannot write the message: {exc}", transient=False)
        settings = self.settings
        try:
            response = self._client.post(
                settings.send_url,
                content=orjson.dumps(payload),
                headers={
                    "Authorization": f"Bearer {settings.api_key}",
                    "Content-Type": "application/json",
                },
                timeout=settings.timeout,
            )
        except httpx.TimeoutException as exc:
            return DeliveryResult.failed(f"the email API timed out: {exc!r}", transient=True)
        except httpx.HTTPError as exc:
            return DeliveryResult.failed(f"cannot reach the email API: {exc}", transient=True)
        status = response.status_code
        if 200 <= status < 300:
            return DeliveryResult.sent(response.headers.get("x-message-id"), f"HTTP {status}")
        detail = f"HTTP {status}: {_api_errors(response)}"
        if status in TRANSIENT_STATUSES or status >= 500:
            return DeliveryResult.failed(detail, transient=True, retry_after=self._wait(response))
        return DeliveryResult.failed(detail, transient=False)

    def _wait(self, response: httpx.Response) -> float | None:
        """Seconds the API asked us to wait: ``Retry-After``, else until ``X-RateLimit-Reset``."""
        now = self.clock.now()
        wait = retry_after(response.headers.get("retry-after"), now)
        reset = response.headers.get("x-ratelimit-reset")
        if wait is None and reset:
            try:
                wait = max(0.0, float(reset) - now.timestamp())
            except ValueError:
                return None
        return wait

    def close(self) -> None:
        """Close the HTTP client, if this provider made it."""
        if self._owns_client:
            self._client.close()


def _api_errors(response: httpx.Response) -> str:
    """The ``errors[].message`` of an error answer (with their ``field``), joined; else the
    start of the body."""
    try:
        answer = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        answer = None
    errors = answer.get("errors") if isinstance(answer, dict) else None
    messages = []
    for error in errors if isinstance(errors, list) else ():
        if isinstance(error, dict) and error.get("message"):
            where = error.get("field")
            messages.append(f"{where}: {error['message']}" if where else str(error["message"]))
    return "; ".join(messages) or response.text[:200]


def _event_time(raw: Any, path: str, fallback: datetime, issues: list[Issue]) -> datetime:
    if raw is None:
        return fallback
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        issues.append(Issue(path, "a Unix time in seconds"))
        return fallback
    try:
        return datetime.fromtimestamp(raw, UTC)
    except (OverflowError, OSError, ValueError):
        issues.append(Issue(path, f"{raw} is not a representable time"))
        return fallback


def _optional_str(event: dict[str, Any], key: str, base: str, issues: list[Issue]) -> str | None:
    value = event.get(key)
    if value is None or isinstance(value, str):
        return value or None
    issues.append(Issue(join_path(base, key), "a string"))
    return None


def parse_sendgrid_events(body: bytes, *, at_fallback: datetime) -> list[Feedback]:
    """The feedback in an Event Webhook body (a JSON array of events), in order. ``delivered``,
    ``open``, ``click`` (with its ``url``), ``bounce`` (hard; soft when its ``type`` is
    ``blocked``), ``dropped`` (FAILED, with the reason), ``spamreport`` (COMPLAINED) and
    ``unsubscribe``/``group_unsubscribe`` count; other event types (processed, deferred …) are
    skipped. ``message_id`` is the ``waymark_message_id`` custom argument (SendGrid puts custom
    arguments at the top of the event), ``provider_id`` the ``sg_message_id`` up to its first
    dot (the ``X-Message-Id`` of the send), ``at`` the event's ``timestamp`` (``at_fallback``
    when it has none). :class:`InvalidInput` naming each malformed part (``[2].timestamp``)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput([Issue("", f"the event body is not JSON: {exc}")]) from None
    if not isinstance(document, list):
        raise InvalidInput([Issue("", "the event body is a JSON array of events")])
    issues: list[Issue] = []
    out: list[Feedback] = []
    for index, event in enumerate(document):
        base = join_path("", index)
        if not isinstance(event, dict):
            issues.append(Issue(base, "an event is a JSON object"))
            continue
        kind_name = event.get("event")
        if not isinstance(kind_name, str) or not kind_name:
            issues.append(Issue(join_path(base, "event"), "the event type, a non-empty string"))
            continue
        at = _event_time(event.get("timestamp"), join_path(base, "timestamp"), at_fallback, issues)
        strings = {
            key: _optional_str(event, key, base, issues)
            for key in (MESSAGE_ID_ARG, "sg_message_id", "email", "url", "type", "reason")
        }
        kind = _KINDS.get(kind_name)
        if kind is None:
            continue
        sg_id = strings["sg_message_id"]
        bounce = None
        if kind is FeedbackKind.BOUNCED:
            bounce = "soft" if strings["type"] == "blocked" else "hard"
        detail = strings["reason"] or ""
        if detail and event.get("status"):
            detail = f"{detail} (status {event['status']})"
        out.append(
            Feedback(
                kind,
                at,
                message_id=strings[MESSAGE_ID_ARG],
                provider_id=sg_id.partition(".")[0] if sg_id else None,
                address=strings["email"],
                bounce=bounce,
                url=strings["url"] if kind is FeedbackKind.CLICKED else None,
                detail=detail,
            )
        )
    if issues:
        raise InvalidInput(issues)
    return out


def _load_public_key(key: str | bytes) -> ec.EllipticCurvePublicKey:
    raw = key.encode() if isinstance(key, str) else key
    try:
        if b"-----BEGIN" in raw:
            loaded = serialization.load_pem_public_key(raw)
        else:
            loaded = serialization.load_der_public_key(base64.b64decode(raw.strip()))
    except (ValueError, binascii.Error, TypeError) as exc:
        raise ValueError(f"cannot read the verification key: {exc}") from None
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or loaded.curve.name != "secp256r1":
        raise ValueError("the verification key is not an ECDSA P-256 public key")
    return loaded


def verify_sendgrid_signature(
    public_key_pem_or_b64: str | bytes, payload: bytes, signature_b64: str, timestamp: str
) -> bool:
    """Whether ``signature_b64`` (the signature header: base64 of a DER ECDSA signature) signs
    ``timestamp`` (the timestamp header) followed by ``payload`` (the raw body) with SHA-256
    under the webhook's verification key: PEM, or the base64 DER that SendGrid's settings show.
    ``ValueError`` when the key cannot be read or is not P-256 (a configuration error, not a
    forged request)."""
    key = _load_public_key(public_key_pem_or_b64)
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        key.verify(signature, timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
