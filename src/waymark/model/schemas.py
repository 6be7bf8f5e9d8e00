"""Workspace schemas: the declared profile attributes and event types, and validation against them.

A schema has a JSON form (the API, CLI and file form) read by :func:`parse_schema` and written by
:meth:`Schema.to_json`; the version of a stored schema is assigned by storage, not here.

Validation (:func:`validate_attributes`, :func:`validate_event`) coerces values to the declared
types and *returns* a :class:`ValidationResult` instead of raising, so that a batch can keep its
good items. Checks are compiled once per schema into closures (cached on the :class:`Schema`)
because validation runs on the ingestion hot path.

Pure: no I/O beyond the read-only reference data of ``zoneinfo`` and ``pycountry``, no clock.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache, cached_property, lru_cache
from typing import Any, Final
from zoneinfo import available_timezones

import phonenumbers
import pycountry
from email_validator import EmailNotValidError, validate_email

from waymark.core.errors import InvalidInput, Issue, join_path

__all__ = [
    "EventSpec",
    "FieldSpec",
    "FieldType",
    "Schema",
    "StringFormat",
    "UnknownPolicy",
    "ValidationResult",
    "diff_compatible",
    "parse_schema",
    "validate_attributes",
    "validate_event",
]

#: Attribute and property names.
NAME_PATTERN: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
#: Event type names (Segment-style names such as ``Order Completed`` are allowed).
EVENT_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .:/-]{0,127}")
#: Deepest nesting of ``items``/``properties`` a schema document may use.
MAX_DEPTH: Final = 16

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_SHOW_CHARS: Final = 40


class UnknownPolicy(StrEnum):
    """What to do with an attribute, event type or property the schema does not declare."""

    ACCEPT = "accept"  # store it and flag it
    REJECT = "reject"  # reject the item with an issue


class FieldType(StrEnum):
    """The declared type of a field."""

    STRING = "string"
    NUMBER = "number"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    TIMESTAMP = "timestamp"
    OBJECT = "object"
    ARRAY = "array"


class StringFormat(StrEnum):
    """A format a string field must have; values are normalized to its canonical form."""

    EMAIL = "email"
    PHONE = "phone"
    TIMEZONE = "timezone"
    COUNTRY = "country"


_ENUM_TYPES: Final = (FieldType.STRING, FieldType.NUMBER, FieldType.INTEGER)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """The declaration of one attribute, property, sub-field or array element.

    ``items`` applies to arrays and ``properties`` to objects; when absent, the elements or
    sub-fields are not checked (a free-form array or object). ``required`` on a top-level
    attribute means "present when the profile is created"; elsewhere it means "always present".
    Build untrusted specs with :func:`parse_schema`, which checks the combinations.
    """

    type: FieldType
    format: StringFormat | None = None
    enum: tuple[Any, ...] | None = None
    required: bool = False
    items: FieldSpec | None = None
    properties: Mapping[str, FieldSpec] | None = None
    description: str | None = None
    pii: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", FieldType(self.type))
        if self.format is not None:
            object.__setattr__(self, "format", StringFormat(self.format))
        if self.enum is not None:
            object.__setattr__(self, "enum", tuple(self.enum))
        if self.properties is not None:
            object.__setattr__(self, "properties", dict(self.properties))

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form, leaving out keys that hold their default."""
        out: dict[str, Any] = {"type": self.type.value}
        if self.format is not None:
            out["format"] = self.format.value
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.required:
            out["required"] = True
        if self.items is not None:
            out["items"] = self.items.to_json()
        if self.properties is not None:
            out["properties"] = {name: spec.to_json() for name, spec in self.properties.items()}
        if self.description is not None:
            out["description"] = self.description
        if self.pii:
            out["pii"] = True
        return out


@dataclass(frozen=True, slots=True)
class EventSpec:
    """The declaration of one event type: its properties."""

    properties: Mapping[str, FieldSpec] = field(default_factory=dict)
    description: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "properties", dict(self.properties))

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form."""
        out: dict[str, Any] = {
            "properties": {name: spec.to_json() for name, spec in self.properties.items()}
        }
        if self.description is not None:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class Schema:
    """A workspace's declared attributes and event types, and its policies for undeclared ones.

    Equality is by value. Compiled checkers are cached on the instance on first use (not part of
    equality, and dropped when pickled). Mappings are copied on construction; treat them as
    read-only.
    """

    attributes: Mapping[str, FieldSpec] = field(default_factory=dict)
    events: Mapping[str, EventSpec] = field(default_factory=dict)
    unknown_attributes: UnknownPolicy = UnknownPolicy.ACCEPT
    unknown_events: UnknownPolicy = UnknownPolicy.ACCEPT
    unknown_properties: UnknownPolicy = UnknownPolicy.ACCEPT

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", dict(self.attributes))
        object.__setattr__(self, "events", dict(self.events))
        for name in ("unknown_attributes", "unknown_events", "unknown_properties"):
            object.__setattr__(self, name, UnknownPolicy(getattr(self, name)))

    @classmethod
    def empty(cls) -> Schema:
        """The schema of a new workspace: nothing declared, everything accepted."""
        return cls()

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form; ``parse_schema(s.to_json()) == s``."""
        return {
            "attributes": {name: spec.to_json() for name, spec in self.attributes.items()},
            "events": {name: spec.to_json() for name, spec in self.events.items()},
            "unknown_attributes": self.unknown_attributes.value,
            "unknown_events": self.unknown_events.value,
            "unknown_properties": self.unknown_properties.value,
        }

    def __getstate__(self) -> dict[str, Any]:
        # The cached closures cannot be pickled; they are rebuilt on first use.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @cached_property
    def _strict(self) -> _Compiled:
        return _Compiled(self, lenient=False)

    @cached_property
    def _lenient(self) -> _Compiled:
        return _Compiled(self, lenient=True)


def _builtin_events() -> dict[str, EventSpec]:
    text = FieldSpec(FieldType.STRING)
    common = {
        "message_id": text,
        "channel": FieldSpec(FieldType.STRING, enum=("email", "sms", "push", "webhook", "inbox")),
        "purpose": text,
        "template": text,
        "source": FieldSpec(FieldType.STRING, enum=("journey", "campaign", "test", "api")),
        "source_id": text,
        "provider": text,
    }
    extra: dict[str, dict[str, FieldSpec]] = {
        "sent": {},
        "delivered": {},
        "opened": {},
        "clicked": {"url": text, "link_id": FieldSpec(FieldType.INTEGER)},
        "bounced": {"bounce": FieldSpec(FieldType.STRING, enum=("hard", "soft"))},
        "complained": {},
        "unsubscribed": {},
        "failed": {"reason": text},
    }
    return {
        f"message.{kind}": EventSpec(
            {**common, **props}, description=f"Written by the hub: a message was {kind}."
        )
        for kind, props in extra.items()
    }


#: Events the hub writes itself (delivery feedback); every workspace's schema in force declares
#: them (:func:`with_builtin_events`), so audiences and journeys can use them.
BUILTIN_EVENTS: Final[Mapping[str, EventSpec]] = _builtin_events()


def with_builtin_events(schema: Schema) -> Schema:
    """``schema`` with :data:`BUILTIN_EVENTS` declared (they replace same-named ones)."""
    if all(schema.events.get(name) == spec for name, spec in BUILTIN_EVENTS.items()):
        return schema
    return replace(schema, events={**schema.events, **BUILTIN_EVENTS})


def without_builtin_events(schema: Schema) -> Schema:
    """``schema`` as a workspace declares it: built-in events that are declared as built in are
    left out; :class:`InvalidInput` when one is declared differently."""
    issues = [
        Issue(
            f"events.{name}",
            "is written by the hub and declared for every workspace; leave "
            "it out (or declare it exactly as `waymark schema show` lists it)",
        )
        for name, spec in schema.events.items()
        if name in BUILTIN_EVENTS and spec != BUILTIN_EVENTS[name]
    ]
    if issues:
        raise InvalidInput(issues)
    if not any(name in BUILTIN_EVENTS for name in schema.events):
        return schema
    return replace(
        schema, events={n: e for n, e in schema.events.items() if n not in BUILTIN_EVENTS}
    )


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """The outcome of validating one item.

    ``value`` holds the coerced fields that passed (fields with issues are left out); ``issues``
    are errors, so the item must be rejected when there is any; ``flags`` are accepted but
    noteworthy facts such as ``unknown_attribute:foo``. Issue codes: ``invalid`` (wrong type,
    format or value), ``required`` (missing or null) and ``unknown`` (undeclared under reject).
    """

    value: dict[str, Any]
    issues: tuple[Issue, ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when there is no issue."""
        return not self.issues


# --- describing values in reasons ------------------------------------------------------------


def _clip(text: str) -> str:
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "…"


def _json_text(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _describe(value: object) -> str:
    """Name the JSON type of ``value`` and show it, shortened: ``string "abc"``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean true" if value else "boolean false"
    if isinstance(value, int):
        # str() of a huge int is slow and may hit the interpreter's digit limit.
        shown = str(value) if value.bit_length() <= 256 else "with more than 77 digits"
        return f"integer {_clip(shown)}"
    if isinstance(value, float):
        if math.isnan(value):
            return "number NaN"
        if math.isinf(value):
            return "number Infinity" if value > 0 else "number -Infinity"
        return f"number {_clip(repr(value))}"
    if isinstance(value, str):
        return f"string {_json_text(_clip(value))}"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, datetime):
        return f"timestamp {value.isoformat()}"
    return type(value).__name__


def _expected(what: str, value: object) -> str:
    return f"expected {what}, got {_describe(value)}"


class _Bad(Exception):
    """A value cannot be coerced; ``args[0]`` is the reason."""


# --- scalar coercion: each returns the coerced value or raises _Bad ---------------------------


def _to_string(value: Any) -> Any:
    if not isinstance(value, str):
        raise _Bad(_expected("string", value))
    if "\x00" in value:
        raise _Bad(_expected("string without NUL characters", value))
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad(_expected("string of valid Unicode", value)) from None
    return value


def _to_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(_expected("number", value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Bad(_expected("finite number", value))
    elif not _INT64_MIN <= value <= _INT64_MAX:
        # A number is a double to every store; only exact 64-bit integers are kept as int.
        try:
            return float(value)
        except OverflowError:
            raise _Bad(_expected("finite number", value)) from None
    return value


def _to_integer(value: Any) -> Any:
    if isinstance(value, bool):
        raise _Bad(_expected("integer", value))
    if isinstance(value, float):
        if not value.is_integer():  # also false for NaN and infinities
            raise _Bad(_expected("integer", value))
        number = int(value)
    elif isinstance(value, int):
        number = int(value)
    else:
        raise _Bad(_expected("integer", value))
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise _Bad(_expected("integer within the 64-bit range", value))
    return number


def _to_boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise _Bad(_expected("boolean", value))
    return value


_TIMESTAMP: Final = "timestamp (ISO-8601 or epoch seconds)"


def _to_timestamp(value: Any) -> Any:
    """Return an aware UTC datetime; naive inputs are taken to be in UTC."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise _Bad(_expected(_TIMESTAMP, value)) from None
    elif isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise _Bad(_expected(_TIMESTAMP + " in range", value)) from None
    else:
        raise _Bad(_expected(_TIMESTAMP, value))
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise _Bad(_expected(_TIMESTAMP + " in range", value)) from None


# Lenient coercion (CSV and other all-text sources): text is first read as the declared type.

_INTEGER_TEXT: Final = re.compile(r"[+-]?[0-9]+")
_NUMBER_TEXT: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOLEAN_WORDS: Final = {
    "true": True,
    "1": True,
    "yes": True,
    "false": False,
    "0": False,
    "no": False,
}


def _number_from_text(text: str) -> int | float | None:
    stripped = text.strip()
    if len(stripped) > 400:  # int() refuses very long digit strings; no real cell is this long
        return None
    if _INTEGER_TEXT.fullmatch(stripped):
        return int(stripped)
    if _NUMBER_TEXT.fullmatch(stripped):
        return float(stripped)
    return None


def _lenient(strict: Callable[[Any], Any], what: str) -> Callable[[Any], Any]:
    def coerce(value: Any) -> Any:
        if isinstance(value, str):
            number = _number_from_text(value)
            if number is None:
                raise _Bad(_expected(what, value))
            try:
                return strict(number)
            except _Bad:
                raise _Bad(_expected(what, value)) from None
        return strict(value)

    return coerce


def _lenient_boolean(value: Any) -> Any:
    if isinstance(value, str):
        word = _BOOLEAN_WORDS.get(value.strip().lower())
        if word is None:
            raise _Bad(_expected("boolean (true/false, 1/0, yes/no)", value))
        return word
    return _to_boolean(value)


def _lenient_timestamp(value: Any) -> Any:
    if isinstance(value, str) and (number := _number_from_text(value)) is not None:
        try:
            return _to_timestamp(number)
        except _Bad:
            raise _Bad(_expected(_TIMESTAMP + " in range", value)) from None
    return _to_timestamp(value)


_STRICT_SCALARS: Final[Mapping[FieldType, Callable[[Any], Any]]] = {
    FieldType.STRING: _to_string,
    FieldType.NUMBER: _to_number,
    FieldType.INTEGER: _to_integer,
    FieldType.BOOLEAN: _to_boolean,
    FieldType.TIMESTAMP: _to_timestamp,
}
_LENIENT_SCALARS: Final[Mapping[FieldType, Callable[[Any], Any]]] = {
    FieldType.STRING: _to_string,
    FieldType.NUMBER: _lenient(_to_number, "number"),
    FieldType.INTEGER: _lenient(_to_integer, "integer"),
    FieldType.BOOLEAN: _lenient_boolean,
    FieldType.TIMESTAMP: _lenient_timestamp,
}


# --- string formats: each takes a str and returns its canonical form or raises _Bad -----------


@lru_cache(maxsize=8192)
def _email_or_error(text: str) -> tuple[bool, str]:
    try:
        return True, validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError as error:
        return False, str(error)


def _to_email(value: str) -> str:
    ok, result = _email_or_error(value.strip())
    if not ok:
        raise _Bad(f"{_expected('email address', value)} ({result})")
    return result


@lru_cache(maxsize=8192)
def _e164(text: str) -> str | None:
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _to_phone(value: str) -> str:
    text = value.strip()
    if not text.startswith("+"):
        raise _Bad(_expected("phone number in E.164 form, starting with + and country code", value))
    normalized = _e164(text)
    if normalized is None:
        raise _Bad(_expected("valid phone number in E.164 form", value))
    return normalized


@cache
def _timezones() -> Mapping[str, str]:
    """Lower-cased IANA names to their canonical spelling."""
    return {name.lower(): name for name in available_timezones()}


def _to_timezone(value: str) -> str:
    name = _timezones().get(value.strip().lower())
    if name is None:
        raise _Bad(_expected("IANA time zone name", value))
    return name


@cache
def _countries() -> Mapping[str, str]:
    """ISO 3166-1 alpha-2 and alpha-3 codes to the alpha-2 code."""
    codes: dict[str, str] = {}
    for country in pycountry.countries:
        codes[country.alpha_2] = country.alpha_2
        codes[country.alpha_3] = country.alpha_2
    return codes


def _to_country(value: str) -> str:
    code = _countries().get(value.strip().upper())
    if code is None:
        raise _Bad(_expected("ISO 3166-1 alpha-2 or alpha-3 country code", value))
    return code


_FORMATS: Final[Mapping[StringFormat, Callable[[str], str]]] = {
    StringFormat.EMAIL: _to_email,
    StringFormat.PHONE: _to_phone,
    StringFormat.TIMEZONE: _to_timezone,
    StringFormat.COUNTRY: _to_country,
}


def _scalar_coercer(spec: FieldSpec, *, lenient: bool) -> Callable[[Any], Any]:
    """The coercion of a non-container spec, format included and enum excluded."""
    base = (_LENIENT_SCALARS if lenient else _STRICT_SCALARS)[spec.type]
    if spec.format is None:
        return base
    normalize = _FORMATS[spec.format]

    def coerce(value: Any) -> Any:
        return normalize(base(value))

    return coerce


# --- compiled checkers -----------------------------------------------------------------------

_BAD: Final = object()  # returned by a checker whose value had an issue


def _prefix(base: str, rel: str) -> str:
    if not base:
        return rel
    if not rel:
        return base
    return base + rel if rel.startswith("[") else f"{base}.{rel}"


class _Sink:
    """Collects the issues and flags of one validation; paths are relative to ``base``."""

    __slots__ = ("base", "flags", "issues")

    def __init__(self, base: str) -> None:
        self.base = base
        self.issues: list[Issue] = []
        self.flags: list[str] = []

    def issue(self, rel: str, reason: str, code: str = "invalid") -> None:
        self.issues.append(Issue(_prefix(self.base, rel), reason, code))

    def result(self, value: dict[str, Any]) -> ValidationResult:
        return ValidationResult(value, tuple(self.issues), tuple(self.flags))


#: ``checker(value, relative_path, sink)`` returns the coerced value, or ``_BAD`` after
#: reporting to the sink. ``None`` never reaches a checker of a named field.
_Checker = Callable[[Any, str, _Sink], Any]


@dataclass(frozen=True, slots=True)
class _Context:
    """How the fields being compiled treat undeclared names and text input."""

    reject_unknown: bool
    noun: str  # "attribute" or "property", used in reasons
    flag: str  # flag prefix for accepted unknown names
    lenient: bool


class _Fields:
    """The compiled checks of one set of named fields (attributes, properties, sub-fields)."""

    __slots__ = ("checkers", "context", "required")

    def __init__(self, specs: Mapping[str, FieldSpec], context: _Context) -> None:
        self.context = context
        self.checkers: dict[str, _Checker] = {
            name: _compile(spec, context) for name, spec in specs.items()
        }
        self.required = tuple(name for name, spec in specs.items() if spec.required)

    def check(
        self, data: Mapping[str, Any], rel: str, sink: _Sink, *, check_required: bool = True
    ) -> dict[str, Any]:
        """Return the coerced fields of ``data`` that passed, reporting the others to ``sink``."""
        context = self.context
        checkers = self.checkers
        out: dict[str, Any] = {}
        for key, raw in data.items():
            child = f"{rel}.{key}" if rel else key
            checker = checkers.get(key)
            if checker is None:
                if context.reject_unknown:
                    sink.issue(child, f"unknown {context.noun} {_json_text(key)}", "unknown")
                else:
                    sink.flags.append(f"{context.flag}:{child}")
                    out[key] = raw
                continue
            if raw is None or (context.lenient and isinstance(raw, str) and not raw):
                if key in self.required:
                    sink.issue(
                        child,
                        f"{context.noun} {_json_text(key)} is required and cannot be null",
                        "required",
                    )
                else:
                    out[key] = None
                continue
            value = checker(raw, child, sink)
            if value is not _BAD:
                out[key] = value
        if check_required:
            for name in self.required:
                if name not in data:
                    sink.issue(
                        f"{rel}.{name}" if rel else name,
                        f"required {context.noun} {_json_text(name)} is missing",
                        "required",
                    )
        return out


def _compile(spec: FieldSpec, context: _Context) -> _Checker:
    if spec.type is FieldType.OBJECT:
        return _object_checker(spec, context)
    if spec.type is FieldType.ARRAY:
        return _array_checker(spec, context)
    coerce = _scalar_coercer(spec, lenient=context.lenient)
    if spec.enum is None:

        def check(value: Any, rel: str, sink: _Sink) -> Any:
            try:
                return coerce(value)
            except _Bad as bad:
                sink.issue(rel, bad.args[0])
                return _BAD

        return check

    allowed = frozenset(spec.enum)
    shown = _enum_text(spec.enum)

    def check_enum(value: Any, rel: str, sink: _Sink) -> Any:
        try:
            coerced = coerce(value)
        except _Bad as bad:
            sink.issue(rel, bad.args[0])
            return _BAD
        if coerced not in allowed:
            sink.issue(rel, _expected(f"one of {shown}", value))
            return _BAD
        return coerced

    return check_enum


def _enum_text(values: tuple[Any, ...]) -> str:
    shown = ", ".join(_json_text(v) for v in values[:10])
    return f"[{shown}{', …' if len(values) > 10 else ''}]"


def _container_from_text(value: Any, kind: type, what: str) -> Any:
    """In lenient mode, read a JSON text as an object or array (CSV cells hold text)."""
    try:
        parsed = json.loads(value)
    except ValueError:
        raise _Bad(_expected(what, value)) from None
    if not isinstance(parsed, kind):
        raise _Bad(_expected(what, value))
    return parsed


def _object_checker(spec: FieldSpec, context: _Context) -> _Checker:
    fields_ = None if spec.properties is None else _Fields(spec.properties, context)
    lenient = context.lenient

    def check(value: Any, rel: str, sink: _Sink) -> Any:
        if lenient and isinstance(value, str):
            try:
                value = _container_from_text(value, dict, "object")
            except _Bad as bad:
                sink.issue(rel, bad.args[0])
                return _BAD
        if not isinstance(value, Mapping):
            sink.issue(rel, _expected("object", value))
            return _BAD
        if fields_ is None:
            return dict(value)
        before = len(sink.issues)
        checked = fields_.check(value, rel, sink)
        return _BAD if len(sink.issues) > before else checked

    return check


def _array_checker(spec: FieldSpec, context: _Context) -> _Checker:
    item = None if spec.items is None else _compile(spec.items, context)
    lenient = context.lenient

    def check(value: Any, rel: str, sink: _Sink) -> Any:
        if lenient and isinstance(value, str):
            try:
                value = _container_from_text(value, list, "array")
            except _Bad as bad:
                sink.issue(rel, bad.args[0])
                return _BAD
        if not isinstance(value, list | tuple):
            sink.issue(rel, _expected("array", value))
            return _BAD
        if item is None:
            return list(value)
        before = len(sink.issues)
        checked = [item(element, f"{rel}[{index}]", sink) for index, element in enumerate(value)]
        return _BAD if len(sink.issues) > before else checked

    return check


class _Compiled:
    """All compiled checks of one schema, for strict or lenient input."""

    __slots__ = ("attributes", "events", "reject_unknown_events")

    def __init__(self, schema: Schema, *, lenient: bool) -> None:
        self.attributes = _Fields(
            schema.attributes,
            _Context(
                reject_unknown=schema.unknown_attributes is UnknownPolicy.REJECT,
                noun="attribute",
                flag="unknown_attribute",
                lenient=lenient,
            ),
        )
        properties = _Context(
            reject_unknown=schema.unknown_properties is UnknownPolicy.REJECT,
            noun="property",
            flag="unknown_property",
            lenient=lenient,
        )
        self.events = {
            name: _Fields(event.properties, properties) for name, event in schema.events.items()
        }
        self.reject_unknown_events = schema.unknown_events is UnknownPolicy.REJECT


# --- validation ------------------------------------------------------------------------------


def validate_attributes(
    schema: Schema,
    attrs: Mapping[str, Any],
    *,
    path: str = "traits",
    partial: bool = True,
    lenient: bool = False,
) -> ValidationResult:
    """Check and coerce profile attributes; issues are located under ``path``.

    ``None`` unsets a non-required attribute. With ``partial=False`` (a profile being created)
    every required attribute must be present. ``lenient`` reads text as the declared type and
    ``""`` as ``None`` (CSV imports).
    """
    sink = _Sink(path)
    if not isinstance(attrs, Mapping):
        sink.issue("", _expected("object", attrs))
        return sink.result({})
    compiled = schema._lenient if lenient else schema._strict
    value = compiled.attributes.check(attrs, "", sink, check_required=not partial)
    return sink.result(value)


def validate_event(
    schema: Schema,
    name: str,
    properties: Mapping[str, Any],
    *,
    path: str = "properties",
    lenient: bool = False,
) -> ValidationResult:
    """Check and coerce the properties of an event named ``name``; issues are under ``path``.

    An undeclared event type is an issue at path ``event`` under the reject policy, and a flag
    ``unknown_event:NAME`` (properties kept unchecked) under the accept policy.
    """
    sink = _Sink(path)
    if not isinstance(properties, Mapping):
        sink.issue("", _expected("object", properties))
        return sink.result({})
    compiled = schema._lenient if lenient else schema._strict
    fields_ = compiled.events.get(name)
    if fields_ is None:
        if compiled.reject_unknown_events:
            sink.issues.append(Issue("event", f"unknown event type {_json_text(name)}", "unknown"))
        else:
            sink.flags.append(f"unknown_event:{name}")
        return sink.result(dict(properties))
    return sink.result(fields_.check(properties, "", sink))


# --- parsing the JSON form -------------------------------------------------------------------

_SCHEMA_KEYS: Final = (
    "attributes",
    "events",
    "unknown_attributes",
    "unknown_events",
    "unknown_properties",
)
_IGNORED_SCHEMA_KEYS: Final = ("version",)  # assigned by storage; lets a read document be saved
_FIELD_KEYS: Final = (
    "type",
    "format",
    "enum",
    "required",
    "items",
    "properties",
    "description",
    "pii",
)
_EVENT_KEYS: Final = ("properties", "description")
_TYPE_NAMES: Final = frozenset(t.value for t in FieldType)
_FORMAT_NAMES: Final = frozenset(f.value for f in StringFormat)
_POLICY_NAMES: Final = frozenset(p.value for p in UnknownPolicy)


def _one_of(values: Iterable[str]) -> str:
    return ", ".join(values)


def _unknown_keys(
    data: Mapping[Any, Any], allowed: tuple[str, ...], path: str, issues: list[Issue]
) -> None:
    for key in data:
        if key not in allowed:
            issues.append(
                Issue(
                    join_path(path, str(key)),
                    f"unknown key {str(key)!r}; expected one of {_one_of(allowed)}",
                    "unknown",
                )
            )


def parse_schema(data: object) -> Schema:
    """Read and check a schema's JSON form.

    Raises :class:`InvalidInput` listing every problem with its path, e.g.
    ``attributes.address.properties.zip.type``. A ``version`` key is ignored.
    """
    issues: list[Issue] = []
    if not isinstance(data, Mapping):
        raise InvalidInput([Issue("", _expected("object (a schema)", data))])
    kept = {key: value for key, value in data.items() if key not in _IGNORED_SCHEMA_KEYS}
    _unknown_keys(kept, _SCHEMA_KEYS, "", issues)
    attributes = _parse_fields(data.get("attributes", {}), "attributes", issues, depth=1)
    events: dict[str, EventSpec] = {}
    raw_events = data.get("events", {})
    if not isinstance(raw_events, Mapping):
        issues.append(Issue("events", _expected("object", raw_events)))
    else:
        for name, raw in raw_events.items():
            path = join_path("events", str(name))
            if not isinstance(name, str) or not EVENT_NAME_PATTERN.fullmatch(name):
                issues.append(
                    Issue(
                        path,
                        f"invalid event name {str(name)!r}; "
                        f"it must match {EVENT_NAME_PATTERN.pattern}",
                    )
                )
                continue
            event = _parse_event(raw, path, issues)
            if event is not None:
                events[name] = event
    policies = {key: _parse_policy(data, key, issues) for key in _SCHEMA_KEYS[2:]}
    if issues:
        raise InvalidInput(issues)
    return Schema(attributes=attributes, events=events, **policies)


def _parse_policy(data: Mapping[str, Any], key: str, issues: list[Issue]) -> UnknownPolicy:
    raw = data.get(key, UnknownPolicy.ACCEPT.value)
    if isinstance(raw, str) and raw in _POLICY_NAMES:
        return UnknownPolicy(raw)
    issues.append(Issue(key, _expected('"accept" or "reject"', raw)))
    return UnknownPolicy.ACCEPT


def _parse_event(data: object, path: str, issues: list[Issue]) -> EventSpec | None:
    if not isinstance(data, Mapping):
        issues.append(Issue(path, _expected("object (an event spec)", data)))
        return None
    before = len(issues)
    _unknown_keys(data, _EVENT_KEYS, path, issues)
    description = _parse_description(data, path, issues)
    properties = _parse_fields(
        data.get("properties", {}), join_path(path, "properties"), issues, depth=1
    )
    if len(issues) > before:
        return None
    return EventSpec(properties=properties, description=description)


def _parse_fields(
    data: object, path: str, issues: list[Issue], *, depth: int
) -> dict[str, FieldSpec]:
    if not isinstance(data, Mapping):
        issues.append(Issue(path, _expected("object", data)))
        return {}
    out: dict[str, FieldSpec] = {}
    for name, raw in data.items():
        child = join_path(path, str(name))
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            issues.append(
                Issue(child, f"invalid name {str(name)!r}; it must match {NAME_PATTERN.pattern}")
            )
            continue
        spec = _parse_field(raw, child, issues, depth=depth, in_items=False)
        if spec is not None:
            out[name] = spec
    return out


def _parse_description(data: Mapping[str, Any], path: str, issues: list[Issue]) -> str | None:
    raw = data.get("description")
    if raw is None or isinstance(raw, str):
        return raw
    issues.append(Issue(join_path(path, "description"), _expected("string", raw)))
    return None


def _parse_flag(data: Mapping[str, Any], key: str, path: str, issues: list[Issue]) -> bool:
    raw = data.get(key, False)
    if isinstance(raw, bool):
        return raw
    issues.append(Issue(join_path(path, key), _expected("boolean", raw)))
    return False


def _parse_field(
    data: object, path: str, issues: list[Issue], *, depth: int, in_items: bool
) -> FieldSpec | None:
    """Return the spec at ``path``, or ``None`` after adding at least one issue."""
    if not isinstance(data, Mapping):
        issues.append(Issue(path, _expected("object (a field spec)", data)))
        return None
    if depth > MAX_DEPTH:
        issues.append(Issue(path, f"nested deeper than {MAX_DEPTH} levels"))
        return None
    before = len(issues)
    _unknown_keys(data, _FIELD_KEYS, path, issues)
    raw_type = data.get("type")
    if "type" not in data:
        issues.append(Issue(join_path(path, "type"), "type is required", "required"))
        return None
    if not isinstance(raw_type, str) or raw_type not in _TYPE_NAMES:
        shown = repr(raw_type) if isinstance(raw_type, str) else _describe(raw_type)
        issues.append(
            Issue(
                join_path(path, "type"),
                f"unknown type {shown}; expected one of {_one_of(FieldType)}",
            )
        )
        return None
    type_ = FieldType(raw_type)

    def misplaced(key: str, where: str) -> None:
        issues.append(
            Issue(join_path(path, key), f"{key} is only allowed on {where}, not {type_.value}")
        )

    format_: StringFormat | None = None
    if "format" in data:
        raw_format = data["format"]
        if type_ is not FieldType.STRING:
            misplaced("format", "type string")
        elif isinstance(raw_format, str) and raw_format in _FORMAT_NAMES:
            format_ = StringFormat(raw_format)
        else:
            shown = repr(raw_format) if isinstance(raw_format, str) else _describe(raw_format)
            issues.append(
                Issue(
                    join_path(path, "format"),
                    f"unknown format {shown}; expected one of {_one_of(StringFormat)}",
                )
            )

    required = _parse_flag(data, "required", path, issues)
    if required and in_items:
        issues.append(Issue(join_path(path, "required"), "required is not allowed on array items"))
    pii = _parse_flag(data, "pii", path, issues)
    description = _parse_description(data, path, issues)

    items: FieldSpec | None = None
    if "items" in data:
        if type_ is not FieldType.ARRAY:
            misplaced("items", "type array")
        else:
            items = _parse_field(
                data["items"], join_path(path, "items"), issues, depth=depth + 1, in_items=True
            )

    properties: dict[str, FieldSpec] | None = None
    if "properties" in data:
        if type_ is not FieldType.OBJECT:
            misplaced("properties", "type object")
        else:
            properties = _parse_fields(
                data["properties"], join_path(path, "properties"), issues, depth=depth + 1
            )

    enum: tuple[Any, ...] | None = None
    if "enum" in data:
        if type_ not in _ENUM_TYPES:
            misplaced("enum", "types " + _one_of(_ENUM_TYPES))
        else:
            enum = _parse_enum(
                data["enum"], FieldSpec(type_, format=format_), join_path(path, "enum"), issues
            )

    if len(issues) > before:
        return None
    return FieldSpec(
        type=type_,
        format=format_,
        enum=enum,
        required=required,
        items=items,
        properties=properties,
        description=description,
        pii=pii,
    )


def _parse_enum(
    data: object, spec: FieldSpec, path: str, issues: list[Issue]
) -> tuple[Any, ...] | None:
    if not isinstance(data, list) or not data:
        issues.append(Issue(path, _expected("non-empty array of allowed values", data)))
        return None
    coerce = _scalar_coercer(spec, lenient=False)
    values: list[Any] = []
    for index, raw in enumerate(data):
        child = join_path(path, index)
        try:
            value = coerce(raw)
        except _Bad as bad:
            issues.append(Issue(child, bad.args[0]))
            continue
        if value in values:
            issues.append(Issue(child, f"duplicate enum value {_json_text(value)}"))
            continue
        values.append(value)
    return tuple(values)


# --- compatibility ---------------------------------------------------------------------------


def diff_compatible(old: Schema, new: Schema) -> list[str]:
    """Describe the changes from ``old`` to ``new`` that can make valid data invalid.

    Each entry is ``path: what changed``. Widening (integer to number, a new optional field,
    a removed field that unknown-accept still takes) is not reported. Empty means compatible.
    """
    out: list[str] = []
    for key in _SCHEMA_KEYS[2:]:
        if getattr(old, key) is UnknownPolicy.ACCEPT and getattr(new, key) is UnknownPolicy.REJECT:
            out.append(f"{key}: changed from accept to reject")
    _diff_fields("attributes", old.attributes, new.attributes, new.unknown_attributes, out)
    for name, old_event in old.events.items():
        path = join_path("events", name)
        new_event = new.events.get(name)
        if new_event is None:
            if new.unknown_events is UnknownPolicy.REJECT:
                out.append(f"{path}: event type removed while unknown events are rejected")
            continue
        _diff_fields(
            join_path(path, "properties"),
            old_event.properties,
            new_event.properties,
            new.unknown_properties,
            out,
        )
    for name, new_event in new.events.items():
        if name not in old.events:
            path = join_path(join_path("events", name), "properties")
            _diff_fields(path, {}, new_event.properties, new.unknown_properties, out)
    return out


def _diff_fields(
    path: str,
    old: Mapping[str, FieldSpec],
    new: Mapping[str, FieldSpec],
    policy: UnknownPolicy,
    out: list[str],
) -> None:
    for name, old_spec in old.items():
        child = join_path(path, name)
        new_spec = new.get(name)
        if new_spec is None:
            if policy is UnknownPolicy.REJECT:
                out.append(f"{child}: removed while undeclared fields are rejected")
        else:
            _diff_field(child, old_spec, new_spec, policy, out)
    for name, new_spec in new.items():
        if name not in old and new_spec.required:
            out.append(f"{join_path(path, name)}: new required field")


def _diff_field(
    path: str, old: FieldSpec, new: FieldSpec, policy: UnknownPolicy, out: list[str]
) -> None:
    widened = old.type is FieldType.INTEGER and new.type is FieldType.NUMBER
    if old.type is not new.type and not widened:
        out.append(f"{path}: type changed from {old.type.value} to {new.type.value}")
        return
    if new.format is not None and new.format is not old.format:
        before = old.format.value if old.format is not None else "none"
        out.append(f"{path}: format changed from {before} to {new.format.value}")
    if new.required and not old.required:
        out.append(f"{path}: became required")
    if new.enum is not None:
        if old.enum is None:
            out.append(f"{path}: now restricted to {_enum_text(new.enum)}")
        else:
            removed = tuple(value for value in old.enum if value not in new.enum)
            if removed:
                out.append(f"{path}: enum values removed: {_enum_text(removed)}")
    if new.items is not None:
        if old.items is None:
            out.append(f"{join_path(path, 'items')}: array elements are now checked")
        else:
            _diff_field(join_path(path, "items"), old.items, new.items, policy, out)
    if new.properties is not None:
        if old.properties is None:
            out.append(f"{path}: object sub-fields are now checked")
        else:
            _diff_fields(join_path(path, "properties"), old.properties, new.properties, policy, out)
