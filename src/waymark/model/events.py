"""The hub's native records: identities, events and profile records.

Every source (Segment-spec HTTP calls, the native API, file imports, the demo) is turned into
these before anything is stored, so the rest of the hub sees one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

#: Namespaces every workspace has. Custom namespaces are any other ``[a-z][a-z0-9_]*`` name.
STANDARD_NAMESPACES: tuple[str, ...] = ("user_id", "anonymous_id", "email", "phone")

#: Namespaces of which a profile holds at most one value: two profiles that carry different
#: values of such a namespace are never merged (this stops shared devices joining two people).
DEFAULT_UNIQUE_NAMESPACES: frozenset[str] = frozenset({"user_id"})


class EventType(StrEnum):
    """The kinds of call of the Segment tracking spec, which the native format shares."""

    TRACK = "track"
    IDENTIFY = "identify"
    PAGE = "page"
    SCREEN = "screen"
    GROUP = "group"
    ALIAS = "alias"


class Identity(NamedTuple):
    """One identifier of a person in one namespace, already normalized. (A named tuple: it is
    hashed and compared in C, several times per ingested event.)"""

    namespace: str
    value: str

    def __str__(self) -> str:
        return f"{self.namespace}:{self.value}"


def normalize_identity(namespace: str, value: object) -> Identity:
    """Return the canonical form used for matching: e-mails lower-cased, all values trimmed.

    Raises ``ValueError`` naming the problem when the value is empty or not a scalar.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"identity {namespace!r} must be a string, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise ValueError(f"identity {namespace!r} is empty")
    if "\x00" in text:
        raise ValueError(f"identity {namespace!r} contains a NUL character")
    if len(text) > 255:
        raise ValueError(f"identity {namespace!r} is longer than 255 characters")
    if namespace == "email":
        text = text.lower()
    elif namespace == "phone":
        text = "".join(ch for ch in text if ch.isdigit() or ch == "+")
        if not text:
            raise ValueError("identity 'phone' has no digits")
    return Identity(namespace, text)


@dataclass(slots=True)
class Event:
    """One thing a person did (or a call about them), as stored in the event log.

    ``timestamp`` is when it happened (clock-skew corrected, UTC); ``received_at`` when the hub
    accepted it. ``traits`` are attributes to set on the profile (identify traits, or
    ``context.traits``). ``flags`` record accepted-but-noteworthy facts such as an unknown field
    under the "accept and flag" policy.

    Treat it as immutable. (It is not frozen only because a frozen dataclass of this size
    costs four times as much to create, once or twice per ingested event.)
    """

    message_id: str
    type: EventType
    name: str
    timestamp: datetime
    received_at: datetime
    identities: tuple[Identity, ...]
    properties: dict[str, Any] = field(default_factory=dict)
    traits: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    previous_id: str | None = None
    group_id: str | None = None
    source: str = "api"
    flags: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # pickled as one flat tuple (ingestion workers hand parsed batches to the writer):
        # the default for a slots class builds a dict per event, at about twice the cost
        return (
            _event_from_fields,
            (
                self.message_id,
                self.type.value,
                self.name,
                self.timestamp,
                self.received_at,
                tuple(map(tuple, self.identities)),
                self.properties,
                self.traits,
                self.context,
                self.previous_id,
                self.group_id,
                self.source,
                self.flags,
            ),
        )


_EVENT_TYPES = {t.value: t for t in EventType}
_tuple_new = tuple.__new__


def _event_from_fields(
    message_id: str,
    type_: str,
    name: str,
    timestamp: datetime,
    received_at: datetime,
    identities: tuple[tuple[str, str], ...],
    properties: dict[str, Any],
    traits: dict[str, Any],
    context: dict[str, Any],
    previous_id: str | None,
    group_id: str | None,
    source: str,
    flags: tuple[str, ...],
) -> Event:
    """Rebuild an :class:`Event` from :meth:`Event.__reduce__`'s fields."""
    return Event(
        message_id,
        _EVENT_TYPES[type_],
        name,
        timestamp,
        received_at,
        tuple([_tuple_new(Identity, pair) for pair in identities]),  # twice as fast as calls
        properties,
        traits,
        context,
        previous_id,
        group_id,
        source,
        flags,
    )


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """Attributes and identities asserted about one person at one time, by one source."""

    identities: tuple[Identity, ...]
    attributes: dict[str, Any]
    timestamp: datetime
    source: str = "api"
    consents: tuple[ConsentUpdate, ...] = ()


class ConsentStatus(StrEnum):
    """The state of a person's consent for one channel and purpose."""

    OPTED_IN = "opted_in"
    OPTED_OUT = "opted_out"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ConsentUpdate:
    """A statement of consent for one channel (email, sms, push, ...) and purpose."""

    channel: str
    purpose: str
    status: ConsentStatus
    timestamp: datetime
    source: str = "api"
