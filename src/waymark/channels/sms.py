"""SMS through Twilio's Programmable Messaging REST API, and Twilio's callbacks.

:class:`TwilioProvider` POSTs ``To``, ``From`` (or ``MessagingServiceSid``), ``Body`` and, when
configured, ``StatusCallback`` form-encoded to ``/2010-04-01/Accounts/{sid}/Messages.json`` with
HTTP basic auth (account SID and auth token) and ``I-Twilio-Idempotency-Token: <message id>``,
the same on every retry of the message. A number that is not valid E.164 fails permanently,
with ``address_gone``, before any request. Answers map to results:

- 2xx with a JSON ``sid``: sent, the SID being the provider id; a 2xx whose body is not that:
  transient (the message may or may not have been accepted: the retry carries the same token);
- 408, 425, 429 and 5xx: transient, ``Retry-After`` passed on;
- other 4xx: permanent, with Twilio's ``code`` and ``message``; codes 21211 (invalid ``To``)
  and 21614 (not a mobile number) also say ``address_gone``; 21610 (the recipient replied STOP)
  says so in the detail;
- timeouts and connection errors: transient.

Callbacks Twilio POSTs back (form fields) are checked with :func:`verify_twilio_signature`
(Twilio's ``X-Twilio-Signature`` scheme) and read with :func:`parse_twilio_status` (status
callbacks) and :func:`parse_twilio_inbound` (incoming texts). The parsers are pure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import httpx
import orjson

from waymark.channels.base import (
    DeliveryResult,
    Feedback,
    FeedbackKind,
    InboundText,
    OutgoingMessage,
)
from waymark.channels.webhook import TRANSIENT_STATUSES, retry_after
from waymark.core.clock import Clock, SystemClock
from waymark.core.errors import InvalidInput, Issue
from waymark.delivery.sms import e164
from waymark.delivery.templates import Channel

__all__ = [
    "IDEMPOTENCY_HEADER",
    "SIGNATURE_HEADER",
    "TwilioProvider",
    "TwilioSettings",
    "parse_twilio_inbound",
    "parse_twilio_status",
    "twilio_signature",
    "verify_twilio_signature",
]

IDEMPOTENCY_HEADER: Final = "I-Twilio-Idempotency-Token"
#: The header carrying :func:`twilio_signature` on Twilio's callbacks.
SIGNATURE_HEADER: Final = "X-Twilio-Signature"

#: Send-time error codes meaning the number will never take a text.
_GONE_CODES: Final = {21211: "invalid 'To' number", 21614: "'To' is not a mobile number"}
_UNSUBSCRIBED: Final = 21610
#: Delivery error codes counted as a hard bounce (the number is unreachable for good).
_HARD_BOUNCES: Final = {
    "30003": "unreachable destination handset",
    "30005": "unknown destination handset",
    "30006": "landline or unreachable carrier",
}


@dataclass(frozen=True)
class TwilioSettings:
    """A Twilio account and the sender: exactly one of ``from_number`` (E.164, a short code or
    an alphanumeric sender id) and ``messaging_service_sid``. ``status_callback`` is the URL
    Twilio POSTs delivery status to; ``timeout`` is per request, in seconds."""

    account_sid: str
    auth_token: str
    from_number: str | None = None
    messaging_service_sid: str | None = None
    base_url: str = "https://api.twilio.com"
    status_callback: str | None = None
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if not (self.account_sid and self.auth_token):
            raise ValueError("Twilio needs an account SID and an auth token")
        if (self.from_number is None) == (self.messaging_service_sid is None):
            raise ValueError("give exactly one of from_number and messaging_service_sid")

    @property
    def messages_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/2010-04-01/Accounts/{self.account_sid}/Messages.json"


class TwilioProvider:
    """Texts through Twilio (see the module docstring). Connections are pooled by the httpx
    client, reused across sends; a ``client`` passed in is used as is (auth and timeout are
    set per request) and left open by :meth:`close`."""

    channel = Channel.SMS

    def __init__(
        self,
        settings: TwilioSettings,
        *,
        client: httpx.Client | None = None,
        clock: Clock | None = None,
        name: str = "twilio",
    ) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock or SystemClock()
        self._owns_client = client is None
        self._client = client or httpx.Client()

    def _form(self, to: str, body: str) -> dict[str, str]:
        settings = self.settings
        form = {"To": to, "Body": body}
        if settings.messaging_service_sid is not None:
            form["MessagingServiceSid"] = settings.messaging_service_sid
        else:
            form["From"] = settings.from_number or ""
        if settings.status_callback:
            form["StatusCallback"] = settings.status_callback
        return form

    def send(self, message: OutgoingMessage) -> DeliveryResult:
        if message.channel is not Channel.SMS:
            raise ValueError(f"{self.name} sends sms, not {message.channel.value}")
        try:
            to = e164(message.to)
        except ValueError as exc:
            return DeliveryResult.gone(str(exc))
        body = message.content.fields.get("text", "")
        if not body.strip():
            return DeliveryResult.failed("the text is empty", transient=False)
        settings = self.settings
        try:
            response = self._client.post(
                settings.messages_url,
                data=self._form(to, body),
                headers={IDEMPOTENCY_HEADER: message.id, "Accept": "application/json"},
                auth=(settings.account_sid, settings.auth_token),
                timeout=settings.timeout,
            )
        except httpx.TimeoutException as exc:
            return DeliveryResult.failed(f"Twilio timed out: {exc!r}", transient=True)
        except httpx.HTTPError as exc:
            return DeliveryResult.failed(f"cannot reach Twilio: {exc}", transient=True)
        return self._result(response)

    def _result(self, response: httpx.Response) -> DeliveryResult:
        status = response.status_code
        answer = _json_object(response.content)
        if 200 <= status < 300:
            sid = answer.get("sid") if answer is not None else None
            if isinstance(sid, str) and sid:
                return DeliveryResult.sent(sid, f"HTTP {status}")
            return DeliveryResult.failed(
                f"Twilio answered HTTP {status} without a message sid "
                f"(body not the expected JSON): {response.text[:200]!r}",
                transient=True,
            )
        detail = f"HTTP {status}: {_twilio_error(answer, response)}"
        if status in TRANSIENT_STATUSES or status >= 500:
            wait = retry_after(response.headers.get("retry-after"), self.clock.now())
            return DeliveryResult.failed(detail, transient=True, retry_after=wait)
        code = answer.get("code") if answer is not None else None
        if isinstance(code, int) and code in _GONE_CODES:
            return DeliveryResult.gone(f"{_GONE_CODES[code]}: {detail}")
        if code == _UNSUBSCRIBED:
            detail = f"the recipient unsubscribed (replied STOP): {detail}"
        return DeliveryResult.failed(detail, transient=False)

    def close(self) -> None:
        """Close the HTTP client, if this provider made it."""
        if self._owns_client:
            self._client.close()


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _twilio_error(answer: dict[str, Any] | None, response: httpx.Response) -> str:
    """Twilio's ``code`` and ``message`` from an error answer, else the start of the body."""
    if answer is not None and ("code" in answer or "message" in answer):
        return f"Twilio error {answer.get('code')}: {answer.get('message', '')}"
    return response.text[:200]


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """Twilio's request signature: base64 of HMAC-SHA1, keyed with the auth token, over the
    full URL (query included) followed by each POST parameter's name and value, sorted by name.
    """
    data = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_twilio_signature(
    auth_token: str, url: str, params: Mapping[str, str], signature: str
) -> bool:
    """Whether ``signature`` (the ``X-Twilio-Signature`` header) signs ``url`` and ``params``
    with ``auth_token`` (compared in constant time). ``url`` must be exactly the one Twilio
    called, as configured (scheme, host, port, path and query)."""
    expected = twilio_signature(auth_token, url, params)
    return hmac.compare_digest(expected.encode(), signature.strip().encode())


def _required(params: Mapping[str, str], *names: str) -> dict[str, str]:
    missing = [name for name in names if not params.get(name)]
    if missing:
        raise InvalidInput([Issue(name, "missing from the Twilio callback") for name in missing])
    return {name: params[name] for name in names}


def parse_twilio_status(params: Mapping[str, str], *, at: datetime) -> Feedback | None:
    """The feedback in a status callback's form fields, received at ``at`` (Twilio sends no
    time): ``delivered`` is DELIVERED; ``undelivered`` and ``failed`` are FAILED with the
    ``ErrorCode`` in the detail, or BOUNCED ``"hard"`` for codes meaning the number is
    unreachable for good (30003, 30005, 30006); other statuses (queued, sending, sent …) give
    None. :class:`InvalidInput` when ``MessageSid`` or ``MessageStatus`` is missing."""
    fields = _required(params, "MessageSid", "MessageStatus")
    sid, status = fields["MessageSid"], fields["MessageStatus"].strip().lower()
    address = params.get("To") or None
    if status == "delivered":
        return Feedback(FeedbackKind.DELIVERED, at, provider_id=sid, address=address)
    if status not in {"undelivered", "failed"}:
        # pending states, and any state Twilio adds later, say nothing final
        return None
    code = (params.get("ErrorCode") or "").strip()
    meaning = _HARD_BOUNCES.get(code)
    detail = f"{status}, error {code or 'none given'}" + (f": {meaning}" if meaning else "")
    if meaning is not None:
        return Feedback(
            FeedbackKind.BOUNCED, at, provider_id=sid, address=address, bounce="hard", detail=detail
        )
    return Feedback(FeedbackKind.FAILED, at, provider_id=sid, address=address, detail=detail)


def parse_twilio_inbound(params: Mapping[str, str], *, at: datetime) -> InboundText:
    """The text in an incoming-message webhook's form fields, received at ``at``;
    :class:`InvalidInput` when ``From`` or ``To`` is missing. A missing ``Body`` is empty."""
    fields = _required(params, "From", "To")
    return InboundText(
        sender=fields["From"],
        recipient=fields["To"],
        body=params.get("Body", ""),
        at=at,
        provider_id=params.get("MessageSid") or params.get("SmsSid") or None,
    )
