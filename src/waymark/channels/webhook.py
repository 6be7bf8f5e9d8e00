"""Webhooks: a JSON POST signed with HMAC-SHA256 over a timestamp and the body.

The request carries ``Waymark-Signature: t=<unix seconds>,v1=<hex>`` where the hex is
``HMAC-SHA256(secret, "<t>.<body bytes>")``, and ``Idempotency-Key: <message id>`` (the same on
every retry of the message). A receiver checks both with :func:`verify_signature`, refusing
timestamps older than its tolerance (a replayed request).

Answers map to results: 2xx sent; 408, 425, 429 and 5xx transient (``Retry-After`` in seconds
or as an HTTP date is passed on); other statuses permanent; timeouts and connection errors
transient.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

import httpx
import orjson

from waymark.channels.base import DeliveryResult, OutgoingMessage
from waymark.core.clock import Clock, SystemClock
from waymark.delivery.templates import Channel

__all__ = ["WebhookProvider", "sign", "verify_signature"]

SIGNATURE_HEADER = "Waymark-Signature"
TRANSIENT_STATUSES = frozenset({408, 425, 429})


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Waymark-Signature`` header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: bytes, header: str, body: bytes, *, now: datetime, tolerance_s: int = 300
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` at a time within ``tolerance_s`` of
    ``now`` (compared in constant time)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now.timestamp() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).partition("v1=")[2]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def retry_after(value: str | None, now: datetime) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (a number or an HTTP date, relative
    to ``now``); ``None`` when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - now).total_seconds())


class WebhookProvider:
    """POSTs a webhook message's rendered JSON ``body`` to its ``to`` URL (see the module
    docstring). Connections are pooled by the httpx client (reused across sends)."""

    channel = Channel.WEBHOOK

    def __init__(
        self,
        secret: bytes,
        *,
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        transport: httpx.BaseTransport | None = None,
        name: str = "webhook",
    ) -> None:
        if not secret:
            raise ValueError("a webhook provider needs a signing secret")
        self.name = name
        self.secret = secret
        self.clock = clock or SystemClock()
        self._client = httpx.Client(
            timeout=timeout, headers=dict(headers or {}), transport=transport
        )

    def send(self, message: OutgoingMessage) -> DeliveryResult:
        if message.channel is not Channel.WEBHOOK:
            raise ValueError(f"{self.name} sends webhooks, not {message.channel.value}")
        body = orjson.dumps(message.content.json)
        now = self.clock.now()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": message.id,
            SIGNATURE_HEADER: sign(self.secret, int(now.timestamp()), body),
            **message.headers,
        }
        try:
            response = self._client.post(message.to, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return DeliveryResult.failed(f"timed out: {exc!r}", transient=True)
        except httpx.HTTPError as exc:
            return DeliveryResult.failed(f"cannot reach {message.to}: {exc}", transient=True)
        status = response.status_code
        if 200 <= status < 300:
            return DeliveryResult.sent(response.headers.get("x-request-id"), f"HTTP {status}")
        detail = f"HTTP {status}: {response.text[:200]}"
        transient = status in TRANSIENT_STATUSES or status >= 500
        wait = retry_after(response.headers.get("retry-after"), now) if transient else None
        return DeliveryResult.failed(detail, transient=transient, retry_after=wait)

    def close(self) -> None:
        self._client.close()
