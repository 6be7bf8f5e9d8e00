"""The shape every channel provider has: one narrow method, ``send(message) -> DeliveryResult``.

A provider never raises for a delivery problem: what went wrong, and whether trying again may
help, is data on the result (``transient``, ``retry_after``), so the dispatcher decides about
retries, backoff, dead letters and circuit breaking in one place. A provider raises only for a
programming error (a message of a channel it does not serve).

:class:`RecordingProvider` keeps what it is given, for tests and the development sink, and can be
told to fail the next sends in chosen ways.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from waymark.delivery.templates import Channel, Rendered

__all__ = [
    "DeliveryResult",
    "Feedback",
    "FeedbackKind",
    "InboundText",
    "Outcome",
    "OutgoingMessage",
    "Provider",
    "RecordingProvider",
]


@dataclass(frozen=True)
class OutgoingMessage:
    """One message to one recipient, rendered and checked against the rules.

    ``id`` is the idempotency key: the same message retried keeps its id (an email's Message-ID
    is derived from it, an HTTP provider receives it as ``Idempotency-Key``). ``to`` is the
    address for the channel (an email address, an E.164 number, a push subscription's id, a
    URL). ``created_at`` is when the send intent was written (an email's ``Date``)."""

    id: str
    channel: Channel
    to: str
    content: Rendered
    created_at: datetime
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class Outcome(StrEnum):
    """What happened to one send."""

    SENT = "sent"  # the provider accepted it
    FAILED = "failed"  # it did not go; see ``transient``


@dataclass(frozen=True)
class DeliveryResult:
    """The answer of one ``send``: the provider's id for the message when accepted; else the
    reason, whether a later attempt may succeed (``transient``) and after how many seconds the
    provider asked to be tried again (``retry_after``)."""

    outcome: Outcome
    provider_id: str | None = None
    detail: str = ""
    transient: bool = False
    retry_after: float | None = None
    #: the provider says the address no longer exists (an expired push subscription, an
    #: unregistered device token, an unknown mailbox): it is pruned or suppressed
    address_gone: bool = False

    @classmethod
    def sent(cls, provider_id: str | None, detail: str = "") -> DeliveryResult:
        return cls(Outcome.SENT, provider_id, detail)

    @classmethod
    def failed(
        cls, detail: str, *, transient: bool, retry_after: float | None = None
    ) -> DeliveryResult:
        return cls(Outcome.FAILED, None, detail, transient, retry_after)

    @classmethod
    def gone(cls, detail: str) -> DeliveryResult:
        """A permanent failure because the address no longer exists."""
        return cls(Outcome.FAILED, None, detail, False, None, address_gone=True)


class FeedbackKind(StrEnum):
    """What a provider, a tracking endpoint or a recipient reported about a sent message; each
    becomes the profile event ``message.<kind>``."""

    DELIVERED = "delivered"
    OPENED = "opened"
    CLICKED = "clicked"
    BOUNCED = "bounced"  # ``bounce`` says "hard" or "soft"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"
    FAILED = "failed"  # the provider accepted it but could not deliver it (e.g. an SMS)


@dataclass(frozen=True)
class Feedback:
    """One report about one message. ``message_id`` is Waymark's id when the provider echoes it
    (a custom argument, a header), else ``provider_id`` (the id its ``send`` returned) finds
    the message. ``at`` is aware."""

    kind: FeedbackKind
    at: datetime
    message_id: str | None = None
    provider_id: str | None = None
    address: str | None = None
    bounce: str | None = None  # "hard" | "soft", for BOUNCED
    url: str | None = None  # the link, for CLICKED
    detail: str = ""


@dataclass(frozen=True)
class InboundText:
    """A text message a recipient sent to one of the workspace's numbers (E.164 both)."""

    sender: str
    recipient: str
    body: str
    at: datetime
    provider_id: str | None = None


class Provider(Protocol):
    """A way out for one channel. ``send`` may block (network I/O); it is called from one
    thread at a time per provider instance unless the provider says otherwise."""

    name: str
    channel: Channel

    def send(self, message: OutgoingMessage) -> DeliveryResult: ...

    def close(self) -> None: ...


class RecordingProvider:
    """Keeps every message it accepts in :attr:`sent` (thread-safe). :meth:`fail_next` makes the
    next sends fail with the given results instead, in order."""

    def __init__(self, channel: Channel, name: str = "recording") -> None:
        self.name = name
        self.channel = channel
        self.sent: list[OutgoingMessage] = []
        self._failures: list[DeliveryResult] = []
        self._lock = threading.Lock()

    def fail_next(self, *results: DeliveryResult) -> None:
        with self._lock:
            self._failures.extend(results)

    def send(self, message: OutgoingMessage) -> DeliveryResult:
        if message.channel is not self.channel:
            raise ValueError(f"{self.name} sends {self.channel.value}, not {message.channel.value}")
        with self._lock:
            if self._failures:
                return self._failures.pop(0)
            self.sent.append(message)
            return DeliveryResult.sent(f"{self.name}-{len(self.sent)}")

    def close(self) -> None:
        return None
