"""Message templates: Liquid per channel, validated when saved, rendered per recipient.

A template is a JSON document (:func:`parse_template`) naming its channel and the Liquid source
of each of that channel's fields:

- ``email``: ``subject`` (required), ``preheader``, ``from_name``, ``from_address``,
  ``reply_to``, ``html`` and/or ``text`` (at least one; a missing ``text`` is derived from the
  ``html``: once, when the template is compiled, by converting the HTML *source* to text with
  its Liquid markup kept in place, so each recipient costs one render of a short text template
  instead of an HTML-to-text conversion; where that conversion cannot keep the markup whole, or
  the derived template fails for a recipient, that recipient's rendered HTML is converted);
- ``sms``: ``text``;
- ``push``: ``title``, ``body`` (required), ``deep_link``, ``image_url``, ``data`` (an object of
  string templates);
- ``webhook``: ``url`` (rendering to an ``http`` or ``https`` URL) and ``body``, whose rendering
  must be a JSON document (use the ``json`` filter to write values:
  ``{"name": {{ profile.first_name | json }}}``);
- ``inbox``: ``title``, ``body`` (required), ``image_url``, ``action_url``, ``data``.

The render context has fixed roots (:data:`ROOTS`): ``profile`` (its attributes, and ``id``),
``event`` (the triggering event: ``name``, ``timestamp``, ``properties``), ``audience``,
``journey``, ``campaign``, ``offer``, ``message`` (``id``, ``unsubscribe_url``,
``preferences_url``) and ``workspace``. Saving checks every reference against them and against
the workspace schema: ``profile.x`` must be a declared attribute, and with ``event_type`` set,
``event.properties.x`` a declared property of that type. Unknown filters, unknown fragments and
syntax errors are reported with the field, line and column.

Missing data: ``{{ profile.first_name | default: "there" }}`` gives a default. Without one, a
value the recipient lacks renders empty (``missing: "empty"``, the default) or makes the render
fail for that recipient (``missing: "skip"``), so the caller can exclude them with the reason.

Fragments are reusable templates of the workspace, named and included with ``{% render "name" %}``
(the fragment sees only what is passed to it) or ``{% include "name" %}`` (it sees everything).

HTML fields are auto-escaped (a profile value ``<b>`` arrives as ``&lt;b&gt;``); mark trusted
markup with ``| safe``. Text fields are not escaped.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, Final

import orjson
from inscriptis import get_text
from liquid import (
    BoundTemplate,
    CachingDictLoader,
    Environment,
    StrictDefaultUndefined,
    Undefined,
)
from liquid.exceptions import LiquidError, TemplateNotFoundError
from liquid.extra import JSON

from waymark.core.errors import InvalidInput, Issue, WaymarkError, join_path
from waymark.model.schemas import FieldSpec, FieldType, Schema
from waymark.segmentation.lang.check import did_you_mean

__all__ = [
    "FIELDS",
    "ROOTS",
    "Channel",
    "CompiledTemplate",
    "Fragments",
    "Missing",
    "RenderFailed",
    "Rendered",
    "TemplateDef",
    "check_fragment",
    "compile_template",
    "parse_template",
]

#: Longest source a field or fragment may have.
MAX_SOURCE: Final = 256 * 1024


class Channel(StrEnum):
    """The ways a message leaves."""

    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    WEBHOOK = "webhook"
    INBOX = "inbox"


#: Per channel: its text fields, which are required, and whether it has a ``data`` object.
FIELDS: Final[Mapping[Channel, tuple[tuple[str, ...], frozenset[str], bool]]] = {
    Channel.EMAIL: (
        ("subject", "preheader", "from_name", "from_address", "reply_to", "html", "text"),
        frozenset({"subject"}),
        False,
    ),
    Channel.SMS: (("text",), frozenset({"text"}), False),
    Channel.PUSH: (
        ("title", "body", "deep_link", "image_url"),
        frozenset({"title", "body"}),
        True,
    ),
    Channel.WEBHOOK: (("url", "body"), frozenset({"url", "body"}), False),
    Channel.INBOX: (
        ("title", "body", "image_url", "action_url"),
        frozenset({"title", "body"}),
        True,
    ),
}

#: The context's roots and, for those with a fixed shape, their keys (None: free-form).
ROOTS: Final[Mapping[str, frozenset[str] | None]] = {
    "profile": None,  # checked against the schema's attributes
    "event": frozenset({"name", "timestamp", "properties"}),
    "audience": frozenset({"id", "name"}),
    "journey": frozenset({"id", "name", "version", "node", "context"}),
    "campaign": frozenset({"id", "name", "variant"}),
    "offer": frozenset({"id", "name", "placement", "content", "tags"}),
    "message": frozenset({"id", "unsubscribe_url", "preferences_url", "channel"}),
    "workspace": frozenset({"id", "name"}),
}
#: Keys of a profile that are not attributes.
PROFILE_KEYS: Final = frozenset({"id"})


class Missing(StrEnum):
    """What a value the recipient lacks (and that has no default) does to the render."""

    EMPTY = "empty"
    SKIP = "skip"


@dataclass(frozen=True)
class TemplateDef:
    """A parsed template document (see the module docstring); build with
    :func:`parse_template`."""

    channel: Channel
    fields: Mapping[str, str]
    data: Mapping[str, str] = field(default_factory=dict)
    missing: Missing = Missing.EMPTY
    event_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form, which :func:`parse_template` reads back to an equal definition."""
        out: dict[str, Any] = {"channel": self.channel.value, **self.fields}
        if self.data:
            out["data"] = dict(self.data)
        if self.missing is not Missing.EMPTY:
            out["missing"] = self.missing.value
        if self.event_type is not None:
            out["event_type"] = self.event_type
        return out


#: A workspace's fragments: name -> Liquid source.
Fragments = Mapping[str, str]


def parse_template(document: Any) -> TemplateDef:
    """The definition in ``document`` (the JSON form); :class:`InvalidInput` naming each field
    that is missing, unknown or not a string. Liquid is not parsed here (see
    :func:`compile_template`)."""
    issues: list[Issue] = []
    if not isinstance(document, Mapping):
        raise InvalidInput([Issue("", "a template is a JSON object")])
    raw_channel = document.get("channel")
    try:
        channel = Channel(str(raw_channel))
    except ValueError:
        known = ", ".join(c.value for c in Channel)
        raise InvalidInput(
            [Issue("channel", f"unknown channel {raw_channel!r}; expected one of {known}")]
        ) from None
    names, required, has_data = FIELDS[channel]
    extra = {"channel", "missing", "event_type", *(("data",) if has_data else ())}
    fields: dict[str, str] = {}
    for key, value in document.items():
        if key in extra:
            continue
        if key not in names:
            hint = did_you_mean(str(key), [*names, *extra])
            issues.append(Issue(str(key), f"not a field of {_a(channel)} template{hint}"))
        elif not isinstance(value, str):
            issues.append(Issue(key, "a template field is a string of Liquid source"))
        elif len(value) > MAX_SOURCE:
            issues.append(Issue(key, f"longer than {MAX_SOURCE:,} characters"))
        else:
            fields[key] = value
    for key in sorted(required):
        if not (isinstance(document.get(key), str) and document[key].strip()):
            issues.append(Issue(key, f"{_a(channel)} template needs a non-empty {key}"))
    if channel is Channel.EMAIL and not (fields.get("html", "").strip() or fields.get("text", "")):
        issues.append(Issue("html", "an email template needs html or text (or both)"))
    data: dict[str, str] = {}
    raw_data = document.get("data", {}) if has_data else {}
    if not isinstance(raw_data, Mapping):
        issues.append(Issue("data", "an object of string templates"))
    else:
        for key, value in raw_data.items():
            if not isinstance(value, str):
                issues.append(Issue(join_path("data", str(key)), "a string of Liquid source"))
            else:
                data[str(key)] = value
    try:
        missing = Missing(document.get("missing", Missing.EMPTY.value))
    except ValueError:
        issues.append(Issue("missing", 'either "empty" or "skip"'))
        missing = Missing.EMPTY
    event_type = document.get("event_type")
    if event_type is not None and not isinstance(event_type, str):
        issues.append(Issue("event_type", "the name of an event type"))
        event_type = None
    if issues:
        raise InvalidInput(issues)
    return TemplateDef(channel, fields, data, missing, event_type)


class RenderFailed(WaymarkError):
    """A template could not be rendered for one recipient; ``field`` names the part."""

    code = "render_failed"

    def __init__(self, field_: str, reason: str) -> None:
        super().__init__(f"{field_}: {reason}")
        self.field = field_
        self.reason = reason


@dataclass(frozen=True)
class Rendered:
    """One recipient's message content: the channel's fields as rendered (``text`` of an email
    derived when not given; a webhook's ``body`` parsed as JSON, under ``json``)."""

    channel: Channel
    fields: Mapping[str, str]
    data: Mapping[str, str] = field(default_factory=dict)
    json: Any = None


def _a(channel: Channel) -> str:
    return (
        "an " if channel.value[0] in "aeiou" or channel is Channel.SMS else "a "
    ) + channel.value


def _position(source: str, index: int) -> str:
    if index < 0:
        return "at the end"
    line = source.count("\n", 0, index) + 1
    column = index - (source.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {column}"


def _environment(fragments: Fragments, *, html: bool, missing: Missing) -> Environment:
    env = Environment(
        loader=CachingDictLoader(dict(fragments), auto_reload=False),
        autoescape=html,
        undefined=StrictDefaultUndefined if missing is Missing.SKIP else Undefined,
    )
    env.filters["json"] = JSON()
    return env


#: Liquid markup in a source: output, tags, inline comments (with whitespace control)
_MARKUP: Final = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
#: placeholders for markup while the HTML around it becomes text (private-use characters)
_OPEN, _CLOSE = "\ue000", "\ue001"
_HELD: Final = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_TRAILING: Final = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS: Final = re.compile(r"\n{3,}")


def derive_text_source(html_source: str) -> str | None:
    """The Liquid source of a plain-text part for ``html_source``: the HTML converted to text
    (as for a rendered message) with every piece of Liquid markup kept where it stood. Markup
    in attributes (an ``href``) and in ``<head>`` or ``<style>`` drops out with its HTML.
    ``None`` when the source already holds the placeholder characters."""
    if _OPEN in html_source or _CLOSE in html_source:
        return None
    held: list[str] = []

    def hold(match: re.Match[str]) -> str:
        held.append(match.group(0))
        return f"{_OPEN}{len(held) - 1}{_CLOSE}"

    text = get_text(_MARKUP.sub(hold, html_source))
    # a line holding only tags (a loop's or a condition's) leaves no line of its own: its tags
    # join the next line, as the HTML they stood between leaves no text
    lines: list[str] = []
    pending = ""
    for line in text.split("\n"):
        found = _HELD.findall(line)
        if (
            found
            and not _HELD.sub("", line).strip()
            and all(not held[int(n)].startswith("{{") for n in found)
        ):
            pending += "".join(held[int(n)] for n in found)
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return _HELD.sub(lambda m: held[int(m.group(1))], "\n".join(lines))


def _tidy_text(text: str) -> str:
    """Trailing spaces gone, at most one blank line in a row, one final newline."""
    return _BLANK_RUNS.sub("\n\n", _TRAILING.sub("", text)).strip() + "\n"


#: the key of an email's text part derived from its HTML at compile time
_DERIVED: Final = "text~derived"


class CompiledTemplate:
    """A validated template ready to render; build with :func:`compile_template`."""

    def __init__(self, definition: TemplateDef, parts: Mapping[str, BoundTemplate]) -> None:
        self.definition = definition
        self._parts = dict(parts)
        self._derived = self._parts.pop(_DERIVED, None)

    @cached_property
    def references(self) -> frozenset[str]:
        """The dotted context paths the template reads (fragments included)."""
        found: set[str] = set()
        for template in self._parts.values():
            for variables in template.analyze(include_partials=True).globals.values():
                for variable in variables:
                    found.add(".".join(str(s) for s in variable.segments))
        return frozenset(found)

    def render(self, context: Mapping[str, Any]) -> Rendered:
        """The content for one recipient; :class:`RenderFailed` naming the field and the reason
        (a value missing under ``missing: "skip"``, a filter failing on the data, a webhook body
        that is not JSON)."""
        out: dict[str, str] = {}
        data: dict[str, str] = {}
        for key, template in self._parts.items():
            try:
                text = template.render(**context)
            except LiquidError as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise RenderFailed(key, reason) from None
            if key.startswith("data."):
                data[key[5:]] = text
            else:
                out[key] = text
        definition = self.definition
        body: Any = None
        if definition.channel is Channel.EMAIL and "text" not in out:
            plain: str | None = None
            if self._derived is not None:
                try:
                    plain = _tidy_text(self._derived.render(**context))
                except LiquidError:
                    plain = None  # e.g. a variable assigned in an attribute: convert the HTML
            if plain is None:
                plain = get_text(out.get("html", "")).strip() + "\n"
            out["text"] = plain
        if definition.channel is Channel.WEBHOOK:
            url = out["url"] = out["url"].strip()
            if not url.lower().startswith(("http://", "https://")) or any(c.isspace() for c in url):
                raise RenderFailed("url", f"the rendered url is not an http(s) URL: {url[:100]!r}")
            try:
                body = orjson.loads(out["body"])
            except orjson.JSONDecodeError as exc:
                raise RenderFailed("body", f"the rendered body is not JSON: {exc}") from None
        return Rendered(definition.channel, out, data, body)


def compile_template(
    definition: TemplateDef, schema: Schema, fragments: Fragments | None = None
) -> CompiledTemplate:
    """Parse every field of ``definition`` and check what it reads; :class:`InvalidInput` with
    an issue per problem: syntax errors (field, line, column), unknown filters and fragments,
    and references outside :data:`ROOTS` or the schema."""
    fragments = dict(fragments or {})
    issues: list[Issue] = []
    text_env = _environment(fragments, html=False, missing=definition.missing)
    html_env = _environment(fragments, html=True, missing=definition.missing)
    sources = {**definition.fields, **{f"data.{k}": v for k, v in definition.data.items()}}
    parts: dict[str, BoundTemplate] = {}
    for key, source in sources.items():
        env = html_env if key == "html" else text_env
        try:
            template = env.from_string(source)
            analysis = template.analyze(include_partials=True)
        except TemplateNotFoundError as exc:
            issues.append(Issue(key, f"unknown fragment {exc.message}{_near(source, exc)}"))
            continue
        except LiquidError as exc:
            issues.append(Issue(key, f"{exc.message}{_near(source, exc)}"))
            continue
        for name, spans in analysis.filters.items():
            if name not in env.filters:
                hint = did_you_mean(name, env.filters)
                where = _position(source, spans[0].index) if spans[0].template_name == "" else ""
                at = f" ({where})" if where else f" (in fragment {spans[0].template_name!r})"
                issues.append(Issue(key, f"unknown filter {name!r}{at}{hint}"))
        for variables in analysis.globals.values():
            for variable in variables:
                reason = _check_reference(
                    [str(s) for s in variable.segments], schema, definition.event_type
                )
                if reason is not None:
                    span = variable.span
                    at = (
                        _position(source, span.index)
                        if span.template_name == ""
                        else f"in fragment {span.template_name!r}"
                    )
                    issues.append(Issue(key, f"{reason} ({at})"))
        parts[key] = template
    if issues:
        raise InvalidInput(issues)
    if definition.channel is Channel.EMAIL and "text" not in parts and "html" in parts:
        derived = _derived_text(definition, fragments)
        if derived is not None:
            parts[_DERIVED] = derived
    return CompiledTemplate(definition, parts)


def check_fragment(source: str, schema: Schema, fragments: Fragments | None = None) -> None:
    """Check a fragment on its own: syntax, filters, the fragments it includes, and its
    references to the context's roots (other names are the arguments ``{% render %}`` passes,
    checked where a template includes it). :class:`InvalidInput` as :func:`compile_template`."""
    issues: list[Issue] = []
    env = _environment(dict(fragments or {}), html=False, missing=Missing.EMPTY)
    try:
        analysis = env.from_string(source).analyze(include_partials=True)
    except TemplateNotFoundError as exc:
        raise InvalidInput(
            [Issue("source", f"unknown fragment {exc.message}{_near(source, exc)}")]
        ) from None
    except LiquidError as exc:
        raise InvalidInput([Issue("source", f"{exc.message}{_near(source, exc)}")]) from None
    for name, spans in analysis.filters.items():
        if name not in env.filters:
            where = _position(source, spans[0].index) if spans[0].template_name == "" else ""
            at = f" ({where})" if where else f" (in fragment {spans[0].template_name!r})"
            issues.append(
                Issue("source", f"unknown filter {name!r}{at}{did_you_mean(name, env.filters)}")
            )
    for variables in analysis.globals.values():
        for variable in variables:
            segments = [str(s) for s in variable.segments]
            if segments[0] not in ROOTS:
                continue
            reason = _check_reference(segments, schema, None)
            if reason is not None and variable.span.template_name == "":
                issues.append(
                    Issue("source", f"{reason} ({_position(source, variable.span.index)})")
                )
    if issues:
        raise InvalidInput(issues)


def _derived_text(definition: TemplateDef, fragments: Mapping[str, str]) -> BoundTemplate | None:
    """The text part's template derived from the HTML's (fragments derived alike), or ``None``
    when the conversion left markup that no longer parses (a block opened in an attribute)."""
    converted: dict[str, str] = {}
    for name, source in {"": definition.fields["html"], **fragments}.items():
        text = derive_text_source(source)
        if text is None:
            return None
        converted[name] = text
    env = _environment(
        {k: v for k, v in converted.items() if k}, html=False, missing=definition.missing
    )
    try:
        return env.from_string(converted[""])
    except LiquidError:
        return None


def _near(source: str, exc: LiquidError) -> str:
    token = exc.token
    if token is None or token.start_index < 0:
        return ""
    return f" ({_position(source, token.start_index)})"


def _check_reference(segments: list[str], schema: Schema, event_type: str | None) -> str | None:
    """Why the context path ``segments`` cannot be read, or None."""
    root, rest = segments[0], segments[1:]
    shown = ".".join(segments)
    if root not in ROOTS:
        return f"unknown variable {root!r}{did_you_mean(root, ROOTS)}"
    if not rest:
        return None
    head = rest[0]
    if root == "profile":
        if head in PROFILE_KEYS:
            return None
        spec = schema.attributes.get(head)
        if spec is None:
            return f"unknown attribute {head!r} in {shown!r}{did_you_mean(head, schema.attributes)}"
        return _check_inside(spec, rest[1:], f"profile.{head}")
    keys = ROOTS[root]
    assert keys is not None
    if head not in keys:
        return f"{root} has no {head!r}{did_you_mean(head, keys)}"
    if root == "event" and head == "properties" and len(rest) > 1 and event_type is not None:
        spec_of = schema.events.get(event_type)
        if spec_of is None:
            return f"unknown event type {event_type!r}{did_you_mean(event_type, schema.events)}"
        name = rest[1]
        prop = spec_of.properties.get(name)
        if prop is None:
            hint = did_you_mean(name, spec_of.properties)
            return f"event type {event_type!r} has no property {name!r}{hint}"
        return _check_inside(prop, rest[2:], f"event.properties.{name}")
    return None


def _check_inside(spec: FieldSpec, rest: list[str], shown: str) -> str | None:
    """Why ``rest`` cannot be read below a field declared as ``spec``, or None."""
    for part in rest:
        if spec.type is FieldType.ARRAY:
            if part.isdigit() or part in {"first", "last", "size"}:
                if spec.items is None:
                    return None
                spec = spec.items
                shown = f"{shown}.{part}"
                continue
            return f"{shown!r} is an array: read an element ([0], first, last) or its size"
        if spec.type is not FieldType.OBJECT:
            if part == "size" and spec.type is FieldType.STRING:
                return None
            return f"{shown!r} is {spec.type.value}: it has no field {part!r}"
        if spec.properties is None:  # free-form object
            return None
        inner = spec.properties.get(part)
        if inner is None:
            return f"{shown!r} has no field {part!r}{did_you_mean(part, spec.properties)}"
        spec, shown = inner, f"{shown}.{part}"
    return None
