"""Turn incoming HTTP payloads into native :class:`Event` and :class:`ProfileRecord` values.

Two formats are understood:

* the Segment tracking spec (``identify``, ``track``, ``page``, ``screen``, ``alias``, ``group`` and
  ``batch``), so that existing Segment client libraries work unchanged;
* Waymark's native format (``{"events": [...]}`` and ``{"profiles": [...]}``), also used for JSON
  Lines files, one item per line.

Items are parsed one by one: a batch with some bad items keeps the good ones, and each bad one is
reported as an :class:`ItemError` with its index and, per problem, the field path and the reason.
A body that is not usable at all (not an object, no items, bad batch-level fields) raises
:class:`InvalidInput` instead.

Pure: no I/O and no clock; the time of receipt comes in as ``received_at`` (aware; a naive one
is taken as UTC). Records refer to nested values of the input rather than copying them: treat
both as read-only.

Choices made where the Segment spec leaves room:

* ``page``/``screen``: ``Event.name`` is the call's ``name`` (``""`` when absent); ``name`` and
  ``category`` are also copied into ``properties`` under those keys unless already there.
* ``group``: ``groupId`` goes to ``Event.group_id``; the call's ``traits`` describe the group, not
  the person, so they go to ``Event.properties["group_traits"]`` and never yield identities or
  profile traits. ``context.traits`` still describe the person, as for every call.
* ``identify``/``alias``/``group`` events are named ``"identify"``/``"alias"``/``"group"``.
* ``Event.traits`` holds ``context.traits`` merged with ``identify`` traits (the latter win).
  ``Event.context`` is the merged context without ``traits`` and ``externalIds`` (moved to
  ``traits`` and ``identities``); ``integrations`` and the client's ``receivedAt`` are dropped.
* ``null`` means absent for every optional field. E-mail and phone traits that are blank are
  ignored (forms submit empty fields); an explicit identifier that is blank is an error.
* Unknown top-level fields of an event are accepted and flagged (``unknown_field:<name>``);
  unknown fields of a native profile record are rejected, as a record has no flags.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import orjson

from waymark.core.errors import InvalidInput, Issue, join_path
from waymark.core.ids import stable_id
from waymark.model.events import (
    ConsentStatus,
    ConsentUpdate,
    Event,
    EventType,
    Identity,
    ProfileRecord,
    normalize_identity,
)

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_EVENT_NAME_CHARS",
    "MAX_MESSAGE_ID_CHARS",
    "NAMESPACE_PATTERN",
    "ItemError",
    "Limits",
    "Parsed",
    "native_event_to_event",
    "native_profile_to_record",
    "parse_native_events",
    "parse_native_profiles",
    "parse_segment_call",
    "parse_timestamp",
    "segment_item_to_event",
]

T = TypeVar("T")

#: Custom identity namespaces (and consent channels and purposes) must match this pattern.
NAMESPACE_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
_NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)
MAX_MESSAGE_ID_CHARS = 255
MAX_EVENT_NAME_CHARS = 200
_MAX_ID_CHARS = 255

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SEGMENT_CALLS = frozenset(t.value for t in EventType)
_SEGMENT_COMMON_FIELDS = frozenset(
    {
        "type",
        "userId",
        "anonymousId",
        "messageId",
        "timestamp",
        "originalTimestamp",
        "sentAt",
        "receivedAt",
        "context",
        "integrations",
        "properties",
        "channel",
        "version",
        "writeKey",
        "_metadata",
    }
)
_SEGMENT_FIELDS: dict[EventType, frozenset[str]] = {
    EventType.TRACK: _SEGMENT_COMMON_FIELDS | {"event"},
    EventType.IDENTIFY: _SEGMENT_COMMON_FIELDS | {"traits"},
    EventType.PAGE: _SEGMENT_COMMON_FIELDS | {"name", "category"},
    EventType.SCREEN: _SEGMENT_COMMON_FIELDS | {"name", "category"},
    EventType.ALIAS: _SEGMENT_COMMON_FIELDS | {"previousId"},
    EventType.GROUP: _SEGMENT_COMMON_FIELDS | {"groupId", "traits"},
}
#: Left out of the canonical form behind a derived message id: they change between retries.
_SEGMENT_RETRY_FIELDS = frozenset({"sentAt", "receivedAt"})
_NATIVE_EVENT_FIELDS = frozenset(
    {
        "type",
        "event",
        "message_id",
        "timestamp",
        "sent_at",
        "identities",
        "properties",
        "traits",
        "context",
        "previous_id",
        "group_id",
    }
)
_NATIVE_RETRY_FIELDS = frozenset({"sent_at"})
_PROFILE_FIELDS = frozenset({"identities", "attributes", "timestamp", "consents"})
_CONSENT_FIELDS = frozenset({"channel", "purpose", "status", "timestamp"})
_CONSENT_VALUES = frozenset(s.value for s in ConsentStatus)
_CONSENT_STATUSES = ", ".join(s.value for s in ConsentStatus)
_DEFAULT_PURPOSE = "marketing"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-item limits. Sizes are bytes of the item's compact JSON encoding; all must be > 0."""

    max_event_bytes: int = 32 * 1024
    max_profile_bytes: int = 64 * 1024
    max_future: timedelta = timedelta(days=1)
    max_past: timedelta = timedelta(days=3650)

    def __post_init__(self) -> None:
        if self.max_event_bytes <= 0 or self.max_profile_bytes <= 0:
            raise ValueError("size limits must be positive")
        if self.max_future < timedelta(0) or self.max_past < timedelta(0):
            raise ValueError("time limits must not be negative")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class ItemError:
    """Why the item at ``index`` (0-based, in the request's item list) was rejected."""

    index: int
    issues: tuple[Issue, ...]


@dataclass(frozen=True, slots=True)
class Parsed(Generic[T]):
    """The outcome of one request: accepted items with their index, and rejected ones.

    Every index of the request appears exactly once, in either ``items`` or ``errors``, in order.
    """

    items: list[tuple[int, T]]
    errors: list[ItemError]


# --------------------------------------------------------------------------------------------
# Small helpers


def _json_type(value: object) -> str:
    """Name ``value``'s type as JSON does."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _preview(text: str, limit: int = 40) -> str:
    """Quote ``text`` for a reason, shortened to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _human(delta: timedelta) -> str:
    """Describe the length of ``delta`` in its largest sensible unit, e.g. ``2.5 days``."""
    seconds = abs(delta.total_seconds())
    for unit, size in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0), ("second", 1.0)):
        if seconds >= size or unit == "second":
            amount = f"{seconds / size:.2f}".rstrip("0").rstrip(".")
            return f"{amount} {unit}" + ("" if amount == "1" else "s")
    raise AssertionError("unreachable")  # pragma: no cover


def _utc(instant: datetime) -> datetime:
    """Return ``instant`` in UTC; a naive one is taken to be UTC already."""
    if instant.tzinfo is UTC:
        return instant
    if instant.tzinfo is None:
        return instant.replace(tzinfo=UTC)
    return instant.astimezone(UTC)


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Return a new dict: ``over`` laid on ``base``, nested objects merged, ``over`` winning."""
    merged = dict(base)
    for key, value in over.items():
        below = merged.get(key)
        if isinstance(below, dict) and isinstance(value, dict):
            merged[key] = _deep_merge(below, value)
        else:
            merged[key] = value
    return merged


def _object(
    container: Mapping[str, Any], key: str, path: str, issues: list[Issue]
) -> dict[str, Any]:
    """Return the optional object ``container[key]`` (``{}`` when absent or null, or wrong)."""
    value = container.get(key)
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    issues.append(
        Issue(join_path(path, key), f"must be an object, got {_json_type(value)}", "type")
    )
    return {}


def _encoded_item(item: object, path: str, max_bytes: int, what: str) -> dict[str, Any]:
    """Return ``item`` if it is an object within ``max_bytes``; raise :class:`InvalidInput`."""
    if not isinstance(item, dict):
        raise InvalidInput(
            [Issue(path, f"{what} must be an object, got {_json_type(item)}", "type")]
        )
    try:
        size = len(orjson.dumps(item))
    except TypeError as exc:  # orjson.JSONEncodeError: e.g. an integer beyond 64 bits
        raise InvalidInput([Issue(path, f"is not encodable as JSON: {exc}", "invalid")]) from None
    if size > max_bytes:
        raise InvalidInput(
            [
                Issue(
                    path, f"{what} is {size} bytes, more than the limit of {max_bytes}", "too_large"
                )
            ]
        )
    return item


def _canonical_id(workspace_id: str, content: Mapping[str, Any]) -> str:
    """Derive a message id from ``content``: identical content gives the identical id."""
    return stable_id(workspace_id, orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode())


def _flags(data: Mapping[str, Any], known: frozenset[str]) -> tuple[str, ...]:
    """Flag each top-level field not in ``known``."""
    if data.keys() <= known:
        return ()
    return tuple(f"unknown_field:{key}" for key in data if key not in known)


# --------------------------------------------------------------------------------------------
# Time


def parse_timestamp(value: object) -> datetime:
    """Return the aware UTC instant ``value`` denotes.

    Accepts ISO-8601 text (``Z`` or an offset; naive means UTC; fractions beyond microseconds are
    truncated) or a number of milliseconds since the Unix epoch. Raises ``ValueError`` with a
    reason (phrased to follow a field name) otherwise.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("z"):
            text = text[:-1] + "Z"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"is not an ISO-8601 timestamp: {_preview(value)}") from None
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise ValueError(f"is out of range: {_preview(value)}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"must be an ISO-8601 string or epoch milliseconds, got {_json_type(value)}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number of epoch milliseconds")
    try:
        return _EPOCH + timedelta(milliseconds=value)
    except OverflowError:
        raise ValueError(f"is out of range as epoch milliseconds: {value}") from None


def _optional_time(
    container: Mapping[str, Any], key: str, path: str, issues: list[Issue]
) -> datetime | None:
    """Parse the optional timestamp ``container[key]``; record an issue when it is malformed."""
    value = container.get(key)
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        issues.append(Issue(join_path(path, key), str(exc), "invalid"))
        return None


def _resolve_time(
    given: datetime | None,
    base: str,
    key: str,
    *,
    sent_at: datetime | None,
    received_at: datetime,
    limits: Limits,
    issues: list[Issue],
) -> datetime:
    """Return the event's instant, corrected for client clock skew when ``sent_at`` is known.

    corrected = received_at − (sent_at − given); without ``sent_at`` it is ``given``; without
    ``given`` it is ``received_at``. Records an ``out_of_range`` issue at ``base.key`` outside
    the limits.
    """
    if given is None:
        return received_at
    # Offset of the corrected instant from received_at: both branches avoid overflow.
    offset = given - sent_at if sent_at is not None else given - received_at
    note = " (after clock-skew correction)" if sent_at is not None else ""
    if offset > limits.max_future:
        reason = (
            f"is {_human(offset)} in the future{note}, more than the "
            f"{_human(limits.max_future)} allowed"
        )
    elif -offset > limits.max_past:
        reason = (
            f"is {_human(offset)} in the past{note}, more than the "
            f"{_human(limits.max_past)} allowed"
        )
    else:
        try:
            return received_at + offset
        except OverflowError:
            reason = "is out of range"
    issues.append(Issue(join_path(base, key), reason, "out_of_range"))
    return received_at


# --------------------------------------------------------------------------------------------
# Identifiers


def _id_text(value: object) -> str | None:
    """Return an identifier as text (numbers become strings), or ``None`` for another type."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _wrong_id_type(value: object, base: str, key: str | int) -> Issue:
    """The issue for an identifier that is neither a string nor a number."""
    reason = f"must be a string or a number, got {_json_type(value)}"
    return Issue(join_path(base, key), reason, "type")


def _plain_id(value: object, base: str, key: str, issues: list[Issue]) -> str | None:
    """Return a trimmed, non-empty identifier of at most 255 characters (e.g. a group id)."""
    text = _id_text(value)
    if text is None:
        issues.append(_wrong_id_type(value, base, key))
        return None
    text = text.strip()
    if not text:
        issues.append(Issue(join_path(base, key), "must not be empty", "invalid"))
        return None
    if len(text) > _MAX_ID_CHARS:
        reason = f"is longer than {_MAX_ID_CHARS} characters"
        issues.append(Issue(join_path(base, key), reason, "too_long"))
        return None
    return text


def _add_identity(
    ids: dict[Identity, None],
    namespace: str,
    value: object,
    base: str,
    key: str | int,
    issues: list[Issue],
) -> None:
    """Normalize ``value`` in ``namespace`` into ``ids`` (ordered, duplicates collapsed)."""
    text = _id_text(value)
    if text is None:
        issues.append(_wrong_id_type(value, base, key))
        return
    try:
        identity = normalize_identity(namespace, text)
    except ValueError as exc:
        issues.append(Issue(join_path(base, key), str(exc), "invalid"))
        return
    ids[identity] = None


def _trait_identities(
    ids: dict[Identity, None], traits: Mapping[str, Any], path: str, issues: list[Issue]
) -> None:
    """Take ``email`` and ``phone`` from person traits; blank values count as absent."""
    for key in ("email", "phone"):
        value = traits.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        _add_identity(ids, key, value, path, key, issues)


def _external_ids(ids: dict[Identity, None], value: object, path: str, issues: list[Issue]) -> None:
    """Read Segment ``context.externalIds`` (``[{"id": ..., "type": ...}]``) into ``ids``."""
    if not isinstance(value, list):
        issues.append(Issue(path, f"must be an array, got {_json_type(value)}", "type"))
        return
    for index, entry in enumerate(value):
        entry_path = join_path(path, index)
        if not isinstance(entry, dict):
            issues.append(Issue(entry_path, f"must be an object, got {_json_type(entry)}", "type"))
            continue
        kind = entry.get("type")
        if not isinstance(kind, str):
            reason = f"must be a namespace name, got {_json_type(kind)}"
            issues.append(Issue(join_path(entry_path, "type"), reason, "type"))
            continue
        namespace = kind.strip().lower()
        if not _NAMESPACE_RE.fullmatch(namespace):
            reason = f"namespace {_preview(kind)} must match {NAMESPACE_PATTERN} once lower-cased"
            issues.append(Issue(join_path(entry_path, "type"), reason))
            continue
        _add_identity(ids, namespace, entry.get("id"), entry_path, "id", issues)


def _identity_map(ids: dict[Identity, None], value: object, path: str, issues: list[Issue]) -> None:
    """Read a native ``identities`` object (namespace → value or array of values) into ``ids``."""
    if value is None:
        reason = "is required: an object naming at least one identity"
        issues.append(Issue(path, reason, "required"))
        return
    if not isinstance(value, dict):
        issues.append(Issue(path, f"must be an object, got {_json_type(value)}", "type"))
        return
    if not value:
        issues.append(Issue(path, "must name at least one identity", "required"))
        return
    for namespace, given in value.items():
        if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
            reason = f"namespace {_preview(str(namespace))} must match {NAMESPACE_PATTERN}"
            issues.append(Issue(join_path(path, str(namespace)), reason))
        elif isinstance(given, list):
            ns_path = join_path(path, namespace)
            if not given:
                issues.append(Issue(ns_path, "must not be an empty array", "invalid"))
            for index, each in enumerate(given):
                _add_identity(ids, namespace, each, ns_path, index, issues)
        else:
            _add_identity(ids, namespace, given, path, namespace, issues)


# --------------------------------------------------------------------------------------------
# Names and ids


def _event_name(
    value: object, base: str, key: str, issues: list[Issue], *, required: bool
) -> str | None:
    """Return an event name: a string of at most 200 characters, non-blank when ``required``."""
    if isinstance(value, str):
        if len(value) > MAX_EVENT_NAME_CHARS:
            reason = f"is longer than {MAX_EVENT_NAME_CHARS} characters"
            issues.append(Issue(join_path(base, key), reason, "too_long"))
            return None
        if required and not value.strip():
            issues.append(Issue(join_path(base, key), "must not be empty", "invalid"))
            return None
        return value
    if value is not None:
        reason = f"must be a string, got {_json_type(value)}"
        issues.append(Issue(join_path(base, key), reason, "type"))
    elif required:
        reason = "is required: a non-empty string"
        issues.append(Issue(join_path(base, key), reason, "required"))
    return None


def _message_id(value: object, base: str, key: str, issues: list[Issue]) -> str | None:
    """Return the client's message id (a non-blank string of ≤ 255 characters), if any."""
    if value is None:
        return None
    if not isinstance(value, str):
        reason = f"must be a string, got {_json_type(value)}"
        issues.append(Issue(join_path(base, key), reason, "type"))
        return None
    if not value.strip():
        issues.append(Issue(join_path(base, key), "must not be empty", "invalid"))
        return None
    if len(value) > MAX_MESSAGE_ID_CHARS:
        reason = f"is longer than {MAX_MESSAGE_ID_CHARS} characters"
        issues.append(Issue(join_path(base, key), reason, "too_long"))
        return None
    return value


def _optional_string(
    container: Mapping[str, Any], key: str, path: str, issues: list[Issue]
) -> str | None:
    """Return the optional string ``container[key]``; record an issue for another type."""
    value = container.get(key)
    if value is None or isinstance(value, str):
        return value
    issues.append(Issue(join_path(path, key), f"must be a string, got {_json_type(value)}", "type"))
    return None


# --------------------------------------------------------------------------------------------
# Segment tracking spec


def _segment_kind(data: Mapping[str, Any], call_type: str | None, path: str) -> EventType:
    """Return the item's call type: the endpoint's, or (in a batch) the item's own ``type``."""
    given = data.get("type")
    if call_type is not None:
        if call_type not in _SEGMENT_CALLS:
            raise ValueError(f"unknown Segment call type {call_type!r}")
        if given is None or given == call_type:
            return EventType(call_type)
        shown = _preview(given) if isinstance(given, str) else _json_type(given)
        reason = f"is {shown} but the call is {call_type!r}"
    elif isinstance(given, str) and given in _SEGMENT_CALLS:
        return EventType(given)
    elif given is None:
        raise InvalidInput([Issue(join_path(path, "type"), "is required in a batch", "required")])
    else:
        shown = _preview(given) if isinstance(given, str) else _json_type(given)
        reason = f"must be one of {', '.join(sorted(_SEGMENT_CALLS))}, got {shown}"
    raise InvalidInput([Issue(join_path(path, "type"), reason, "invalid")])


def segment_item_to_event(
    item: object,
    *,
    workspace_id: str,
    received_at: datetime,
    call_type: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    source: str = "segment",
    path: str = "",
    batch_context: Mapping[str, Any] | None = None,
    batch_sent_at: datetime | None = None,
) -> Event:
    """Convert one Segment-spec call into an :class:`Event`.

    ``call_type`` is the endpoint's call (``None`` inside a batch: the item's ``type`` decides).
    ``path`` prefixes every issue path (e.g. ``batch[3]``). ``batch_context`` lies under the
    item's context (the item wins); ``batch_sent_at`` applies when the item has no ``sentAt``.
    Raises :class:`InvalidInput` listing every problem found; raises ``ValueError`` for an
    unknown ``call_type`` (a caller's bug). Never raises anything else.
    """
    received = _utc(received_at)
    data = _encoded_item(item, path, limits.max_event_bytes, "the call")
    kind = _segment_kind(data, call_type, path)
    issues: list[Issue] = []

    # Context, traits and properties.
    item_context = _object(data, "context", path, issues)
    context = _deep_merge(batch_context, item_context) if batch_context else dict(item_context)
    context_traits: dict[str, Any] = {}
    external_ids: object = None
    if context:
        context_traits = _object(context, "traits", join_path(path, "context"), issues)
        external_ids = context.get("externalIds")
    call_traits = (
        _object(data, "traits", path, issues)
        if kind is EventType.IDENTIFY or kind is EventType.GROUP
        else {}
    )
    properties = _object(data, "properties", path, issues)

    # Identities: userId and anonymousId, then e-mail and phone from traits, then externalIds.
    ids: dict[Identity, None] = {}
    user_id = data.get("userId")
    anonymous_id = data.get("anonymousId")
    if user_id is not None:
        _add_identity(ids, "user_id", user_id, path, "userId", issues)
    if anonymous_id is not None:
        _add_identity(ids, "anonymous_id", anonymous_id, path, "anonymousId", issues)
    previous_id: str | None = None
    if kind is EventType.ALIAS:
        previous = data.get("previousId")
        needs = "is required: alias needs both userId and previousId"
        if user_id is None:
            issues.append(Issue(join_path(path, "userId"), needs, "required"))
        if previous is None:
            issues.append(Issue(join_path(path, "previousId"), needs, "required"))
        else:
            previous_id = _plain_id(previous, path, "previousId", issues)
    elif user_id is None and anonymous_id is None:
        reason = "userId or anonymousId is required (at least one of them)"
        issues.append(Issue(join_path(path, "userId"), reason, "required"))
    if context_traits:
        traits_path = join_path(join_path(path, "context"), "traits")
        _trait_identities(ids, context_traits, traits_path, issues)
    if kind is EventType.IDENTIFY and call_traits:
        _trait_identities(ids, call_traits, join_path(path, "traits"), issues)
    if external_ids is not None:
        ext_path = join_path(join_path(path, "context"), "externalIds")
        _external_ids(ids, external_ids, ext_path, issues)

    # Name, properties and group.
    group_id: str | None = None
    name: str | None
    if kind is EventType.TRACK:
        name = _event_name(data.get("event"), path, "event", issues, required=True)
    elif kind is EventType.PAGE or kind is EventType.SCREEN:
        name = _event_name(data.get("name"), path, "name", issues, required=False)
        category = _optional_string(data, "category", path, issues)
        if (name is not None and "name" not in properties) or (
            category is not None and "category" not in properties
        ):
            properties = dict(properties)
            if name is not None:
                properties.setdefault("name", name)
            if category is not None:
                properties.setdefault("category", category)
    else:
        name = kind.value
        if kind is EventType.GROUP:
            raw_group = data.get("groupId")
            if raw_group is None:
                reason = "is required for a group call"
                issues.append(Issue(join_path(path, "groupId"), reason, "required"))
            else:
                group_id = _plain_id(raw_group, path, "groupId", issues)
            if call_traits:
                properties = {**properties, "group_traits": call_traits}

    # Time and message id.
    sent_at = _optional_time(data, "sentAt", path, issues) or batch_sent_at
    original = _optional_time(data, "originalTimestamp", path, issues)
    given = _optional_time(data, "timestamp", path, issues)
    timestamp = _resolve_time(
        original or given,
        path,
        "originalTimestamp" if original is not None else "timestamp",
        sent_at=sent_at,
        received_at=received,
        limits=limits,
        issues=issues,
    )
    message_id = _message_id(data.get("messageId"), path, "messageId", issues)

    if issues:
        raise InvalidInput(issues)
    if message_id is None:
        content = {k: v for k, v in data.items() if k not in _SEGMENT_RETRY_FIELDS}
        content["type"] = kind.value
        if context:
            content["context"] = context
        try:
            message_id = _canonical_id(workspace_id, content)
        except TypeError as exc:  # only a batch context given by a caller can get here
            issue = Issue(join_path(path, "context"), f"is not encodable as JSON: {exc}")
            raise InvalidInput([issue]) from None

    # A copy: context.traits may come from the batch context, shared by every item.
    traits = (
        {**context_traits, **call_traits} if kind is EventType.IDENTIFY else dict(context_traits)
    )
    context.pop("traits", None)
    context.pop("externalIds", None)
    return Event(
        message_id=message_id,
        type=kind,
        name=name or "",
        timestamp=timestamp,
        received_at=received,
        identities=tuple(ids),
        properties=properties,
        traits=traits,
        context=context,
        previous_id=previous_id,
        group_id=group_id,
        source=source,
        flags=_flags(data, _SEGMENT_FIELDS[kind]),
    )


def _body(body: object) -> dict[str, Any]:
    """Return the request body if it is an object; raise :class:`InvalidInput` otherwise."""
    if not isinstance(body, dict):
        reason = f"the request body must be a JSON object, got {_json_type(body)}"
        raise InvalidInput([Issue("", reason, "type")])
    return body


def _item_list(body: Mapping[str, Any], key: str) -> list[Any]:
    """Return the non-empty array ``body[key]``; raise :class:`InvalidInput` otherwise."""
    items = body.get(key)
    if items is None:
        raise InvalidInput([Issue(key, "is required: an array of items", "required")])
    if not isinstance(items, list):
        raise InvalidInput([Issue(key, f"must be an array, got {_json_type(items)}", "type")])
    if not items:
        raise InvalidInput([Issue(key, "is empty: send at least one item", "required")])
    return items


def _collect(items: Iterable[tuple[int, object]], convert: Callable[[int, object], T]) -> Parsed[T]:
    """Apply ``convert(index, item)`` to each item; an ``InvalidInput`` becomes an ItemError."""
    parsed: Parsed[T] = Parsed([], [])
    for index, item in items:
        try:
            parsed.items.append((index, convert(index, item)))
        except InvalidInput as exc:
            parsed.errors.append(ItemError(index, tuple(exc.issues)))
    return parsed


def parse_segment_call(
    call_type: str,
    body: object,
    *,
    workspace_id: str,
    received_at: datetime,
    limits: Limits = DEFAULT_LIMITS,
    source: str = "segment",
) -> Parsed[Event]:
    """Parse the body of one Segment-spec call (``track`` ... ``group``, or ``batch``).

    A single call yields one item with index 0. Raises :class:`InvalidInput` when the body is
    not an object, or (for ``batch``) when ``batch`` is missing, not an array or empty, or the
    batch-level ``context``/``sentAt`` is malformed; raises ``ValueError`` for an unknown
    ``call_type``. Item problems never raise: they are returned as :class:`ItemError`.
    """
    if call_type != "batch" and call_type not in _SEGMENT_CALLS:
        raise ValueError(f"unknown Segment call type {call_type!r}")
    data = _body(body)
    received = _utc(received_at)
    if call_type != "batch":
        return _collect(
            [(0, data)],
            lambda _index, item: segment_item_to_event(
                item,
                workspace_id=workspace_id,
                received_at=received,
                call_type=call_type,
                limits=limits,
                source=source,
            ),
        )
    items = _item_list(data, "batch")
    issues: list[Issue] = []
    batch_context = _object(data, "context", "", issues)
    batch_sent_at = _optional_time(data, "sentAt", "", issues)
    try:
        orjson.dumps(batch_context)
    except TypeError as exc:
        issues.append(Issue("context", f"is not encodable as JSON: {exc}"))
    if issues:
        raise InvalidInput(issues)
    return _collect(
        enumerate(items),
        lambda index, item: segment_item_to_event(
            item,
            workspace_id=workspace_id,
            received_at=received,
            limits=limits,
            source=source,
            path=f"batch[{index}]",
            batch_context=batch_context or None,
            batch_sent_at=batch_sent_at,
        ),
    )


# --------------------------------------------------------------------------------------------
# Native format


def native_event_to_event(
    item: object,
    *,
    workspace_id: str,
    received_at: datetime,
    limits: Limits = DEFAULT_LIMITS,
    source: str = "api",
    path: str = "",
) -> Event:
    """Convert one native event object (an ``events`` item, or a JSON Lines row) to an Event.

    Fields: ``type`` (default ``track``), ``event`` (the name; required for ``track``),
    ``identities`` (required, namespace → value or array of values), ``message_id``,
    ``timestamp``, ``sent_at`` (enables clock-skew correction), ``properties``, ``traits``,
    ``context``, ``previous_id`` (required for ``alias``), ``group_id`` (required for ``group``).
    Raises :class:`InvalidInput` listing every problem found, and nothing else.
    """
    received = _utc(received_at)
    data = _encoded_item(item, path, limits.max_event_bytes, "the event")
    issues: list[Issue] = []

    raw_type = data.get("type")
    if raw_type is None:
        raw_type = "track"
    if not isinstance(raw_type, str) or raw_type not in _SEGMENT_CALLS:
        shown = _preview(raw_type) if isinstance(raw_type, str) else _json_type(raw_type)
        reason = f"must be one of {', '.join(sorted(_SEGMENT_CALLS))}, got {shown}"
        raise InvalidInput([Issue(join_path(path, "type"), reason, "invalid")])
    kind = EventType(raw_type)

    ids: dict[Identity, None] = {}
    _identity_map(ids, data.get("identities"), join_path(path, "identities"), issues)
    properties = _object(data, "properties", path, issues)
    traits = _object(data, "traits", path, issues)
    context = _object(data, "context", path, issues)

    name = _event_name(data.get("event"), path, "event", issues, required=kind is EventType.TRACK)
    if name is None:
        name = "" if kind in (EventType.PAGE, EventType.SCREEN, EventType.TRACK) else kind.value

    previous_id: str | None = None
    group_id: str | None = None
    for key, needed_by in (("previous_id", EventType.ALIAS), ("group_id", EventType.GROUP)):
        value = data.get(key)
        if value is None:
            if kind is needed_by:
                reason = f"is required for {kind.value}"
                issues.append(Issue(join_path(path, key), reason, "required"))
            continue
        text = _plain_id(value, path, key, issues)
        if key == "previous_id":
            previous_id = text
        else:
            group_id = text

    sent_at = _optional_time(data, "sent_at", path, issues)
    given = _optional_time(data, "timestamp", path, issues)
    timestamp = _resolve_time(
        given,
        path,
        "timestamp",
        sent_at=sent_at,
        received_at=received,
        limits=limits,
        issues=issues,
    )
    message_id = _message_id(data.get("message_id"), path, "message_id", issues)

    if issues:
        raise InvalidInput(issues)
    if message_id is None:
        content = {k: v for k, v in data.items() if k not in _NATIVE_RETRY_FIELDS}
        content["type"] = kind.value
        message_id = _canonical_id(workspace_id, content)
    return Event(
        message_id=message_id,
        type=kind,
        name=name,
        timestamp=timestamp,
        received_at=received,
        identities=tuple(ids),
        properties=properties,
        traits=traits,
        context=context,
        previous_id=previous_id,
        group_id=group_id,
        source=source,
        flags=_flags(data, _NATIVE_EVENT_FIELDS),
    )


def parse_native_events(
    body: object,
    *,
    workspace_id: str,
    received_at: datetime,
    limits: Limits = DEFAULT_LIMITS,
    source: str = "api",
) -> Parsed[Event]:
    """Parse ``{"events": [...]}``. Raises :class:`InvalidInput` for a body that is not an
    object or has no non-empty ``events`` array; item problems come back as :class:`ItemError`.
    """
    items = _item_list(_body(body), "events")
    received = _utc(received_at)
    return _collect(
        enumerate(items),
        lambda index, item: native_event_to_event(
            item,
            workspace_id=workspace_id,
            received_at=received,
            limits=limits,
            source=source,
            path=f"events[{index}]",
        ),
    )


def _name_field(
    container: Mapping[str, Any],
    key: str,
    path: str,
    issues: list[Issue],
    default: str | None = None,
) -> str | None:
    """Return ``container[key]`` as a name matching :data:`NAMESPACE_PATTERN`."""
    value = container.get(key)
    key_path = join_path(path, key)
    if value is None:
        if default is None:
            issues.append(Issue(key_path, "is required", "required"))
        return default
    if not isinstance(value, str):
        issues.append(Issue(key_path, f"must be a string, got {_json_type(value)}", "type"))
        return None
    if not _NAMESPACE_RE.fullmatch(value):
        issues.append(Issue(key_path, f"{_preview(value)} must match {NAMESPACE_PATTERN}"))
        return None
    return value


def _consents(
    value: object,
    path: str,
    *,
    record_time: datetime,
    received_at: datetime,
    limits: Limits,
    source: str,
    issues: list[Issue],
) -> tuple[ConsentUpdate, ...]:
    """Read a ``consents`` array; each entry's ``timestamp`` defaults to the record's."""
    if value is None:
        return ()
    if not isinstance(value, list):
        issues.append(Issue(path, f"must be an array, got {_json_type(value)}", "type"))
        return ()
    updates: list[ConsentUpdate] = []
    for index, entry in enumerate(value):
        entry_path = join_path(path, index)
        if not isinstance(entry, dict):
            issues.append(Issue(entry_path, f"must be an object, got {_json_type(entry)}", "type"))
            continue
        before = len(issues)
        for key in entry:
            if key not in _CONSENT_FIELDS:
                issues.append(
                    Issue(join_path(entry_path, key), "is not a known field", "unknown_field")
                )
        channel = _name_field(entry, "channel", entry_path, issues)
        purpose = _name_field(entry, "purpose", entry_path, issues, default=_DEFAULT_PURPOSE)
        raw_status = entry.get("status")
        status_path = join_path(entry_path, "status")
        status: ConsentStatus | None = None
        if raw_status is None:
            issues.append(
                Issue(status_path, f"is required: one of {_CONSENT_STATUSES}", "required")
            )
        elif not isinstance(raw_status, str) or raw_status not in _CONSENT_VALUES:
            shown = _preview(raw_status) if isinstance(raw_status, str) else _json_type(raw_status)
            issues.append(Issue(status_path, f"must be one of {_CONSENT_STATUSES}, got {shown}"))
        else:
            status = ConsentStatus(raw_status)
        given = _optional_time(entry, "timestamp", entry_path, issues)
        when = (
            _resolve_time(
                given,
                entry_path,
                "timestamp",
                sent_at=None,
                received_at=received_at,
                limits=limits,
                issues=issues,
            )
            if given is not None
            else record_time
        )
        if len(issues) == before and channel and purpose and status:
            updates.append(ConsentUpdate(channel, purpose, status, when, source))
    return tuple(updates)


def native_profile_to_record(
    item: object,
    *,
    received_at: datetime,
    limits: Limits = DEFAULT_LIMITS,
    source: str = "api",
    path: str = "",
) -> ProfileRecord:
    """Convert one native profile object (a ``profiles`` item, or a JSON Lines row).

    Fields: ``identities`` (required), ``attributes`` (object), ``timestamp`` (default
    ``received_at``) and ``consents`` (``[{channel, purpose = "marketing", status, timestamp}]``,
    status one of ``opted_in``/``opted_out``/``unknown``). Unknown fields are rejected.
    Raises :class:`InvalidInput` listing every problem found, and nothing else.
    """
    received = _utc(received_at)
    data = _encoded_item(item, path, limits.max_profile_bytes, "the profile")
    issues = [
        Issue(join_path(path, key), "is not a known field", "unknown_field")
        for key in data
        if key not in _PROFILE_FIELDS
    ]
    ids: dict[Identity, None] = {}
    _identity_map(ids, data.get("identities"), join_path(path, "identities"), issues)
    attributes = _object(data, "attributes", path, issues)
    given = _optional_time(data, "timestamp", path, issues)
    timestamp = _resolve_time(
        given,
        path,
        "timestamp",
        sent_at=None,
        received_at=received,
        limits=limits,
        issues=issues,
    )
    consents = _consents(
        data.get("consents"),
        join_path(path, "consents"),
        record_time=timestamp,
        received_at=received,
        limits=limits,
        source=source,
        issues=issues,
    )
    if issues:
        raise InvalidInput(issues)
    return ProfileRecord(
        identities=tuple(ids),
        attributes=attributes,
        timestamp=timestamp,
        source=source,
        consents=consents,
    )


def parse_native_profiles(
    body: object,
    *,
    received_at: datetime,
    limits: Limits = DEFAULT_LIMITS,
    source: str = "api",
) -> Parsed[ProfileRecord]:
    """Parse ``{"profiles": [...]}``. Raises :class:`InvalidInput` for a body that is not an
    object or has no non-empty ``profiles`` array; item problems come back as :class:`ItemError`.
    """
    items = _item_list(_body(body), "profiles")
    received = _utc(received_at)
    return _collect(
        enumerate(items),
        lambda index, item: native_profile_to_record(
            item,
            received_at=received,
            limits=limits,
            source=source,
            path=f"profiles[{index}]",
        ),
    )
