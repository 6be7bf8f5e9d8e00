"""The schema checker of the audience language, and the expansion of audiences of audiences.

:func:`check` validates a tree against a workspace schema and returns it with every ``kind``
filled in; it raises :class:`InvalidInput` listing every problem at once. A problem is located by
the path of the JSON form (``definition.items[2].event.window``) or, for a tree read from text by
:func:`.parser.parse`, by ``line L, column C`` (the parser passes a :class:`Positions` table).
:func:`expand` replaces ``in audience`` references with the definitions they name.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NoReturn, TypeVar

from waymark.core.errors import InvalidInput, Issue, join_path
from waymark.model.schemas import EventSpec, FieldSpec, FieldType, Schema
from waymark.segmentation.lang.ast import (
    Aggregate,
    AggregateFn,
    Ago,
    And,
    Anniversary,
    At,
    Attr,
    Between,
    Bound,
    Compare,
    CompareOp,
    Consent,
    ConsentStatus,
    Count,
    Duration,
    EventRef,
    Exists,
    Expr,
    Filter,
    FilterAnd,
    FilterNot,
    FilterOr,
    InAudience,
    InList,
    Last,
    Next,
    Not,
    Occurs,
    Older,
    Or,
    Pick,
    Prop,
    Scalar,
    Sequence,
    Test,
    Text,
    TextOp,
    Unit,
    Which,
    Window,
    Within,
    is_date_only,
    parse_moment,
)

__all__ = [
    "MAX_CONDITIONS",
    "MAX_DEPTH",
    "MAX_STRING",
    "MAX_VALUES",
    "MAX_WINDOW_DAYS",
    "ROOT",
    "Positions",
    "Problem",
    "check",
    "check_tree",
    "did_you_mean",
    "expand",
    "fail",
    "quote",
    "references",
]

#: The path of a definition's root in issues (``definition.items[0]...``).
ROOT: Final = "definition"
#: Deepest nesting: each ``and``, ``or``, ``not`` and each group of a ``where`` filter is a level.
MAX_DEPTH: Final = 32
#: Most conditions (leaf conditions and property tests) in one definition.
MAX_CONDITIONS: Final = 1000
#: Most values in one ``in (...)`` list.
MAX_VALUES: Final = 1000
#: Longest string literal, in characters.
MAX_STRING: Final = 1000
#: Longest duration.
MAX_WINDOW_DAYS: Final = 3650
#: Widest anniversary test (``in next N days``).
MAX_ANNIVERSARY_DAYS: Final = 366

#: Consent channels and purposes.
CONSENT_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,63}")
#: Attribute and property paths.
PATH: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")

_MINUTES: Final = {Unit.MINUTES: 1, Unit.HOURS: 60, Unit.DAYS: 1440, Unit.WEEKS: 7 * 1440}
_MAX_MINUTES: Final = MAX_WINDOW_DAYS * 1440
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_ORDERED: Final = frozenset({FieldType.NUMBER, FieldType.INTEGER, FieldType.TIMESTAMP})
_ORDERING: Final = frozenset({CompareOp.LT, CompareOp.LE, CompareOp.GT, CompareOp.GE})
_NUMERIC: Final = frozenset({FieldType.NUMBER, FieldType.INTEGER})
_TIMESTAMP: Final = FieldSpec(FieldType.TIMESTAMP)
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_SHOW: Final = 60
_MOMENT_EXAMPLE: Final = '"2026-01-01" or "2026-01-01T09:30:00Z"'

_T = TypeVar("_T")


# -- describing values in reasons ----------------------------------------------------------------


def quote(text: str) -> str:
    """``text`` as a double-quoted string for a message, shortened; escaped if unprintable."""
    shown = text if len(text) <= _SHOW else text[:_SHOW] + "…"
    return json.dumps(shown, ensure_ascii=not shown.isprintable())


def _show(value: object) -> str:
    """A literal as users write it, with its type: ``string "x"``, ``number 2.5``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"number {value}" if value.bit_length() <= 256 else "a number of over 77 digits"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if value is None:
        return "null"
    return type(value).__name__


def _literal_text(value: object) -> str:
    return quote(value) if isinstance(value, str) else _show(value).removeprefix("number ")


def _a(kind: FieldType) -> str:
    article = "an" if kind.value[0] in "aeiou" else "a"
    return f"{article} {kind.value}"


def _amount(amount: int, unit: Unit) -> str:
    return f"{amount} {unit.value[:-1] if amount == 1 else unit.value}"


def did_you_mean(name: str, candidates: Iterable[str], *, none: str = "none are declared") -> str:
    """A hint for a misspelt name: ``; did you mean "x"?``, else the known names, else ``none``."""
    names = sorted(set(candidates))
    close = difflib.get_close_matches(name[:200], names, n=3, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join(quote(c) for c in close) + "?"
    if not names:
        return f"; {none}"
    more = ", …" if len(names) > 8 else ""
    return "; known: " + ", ".join(quote(n) for n in names[:8]) + more


# -- problems and positions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem: its JSON path, its reason and, for text, the line and column (1-based)."""

    path: str
    reason: str
    line: int | None = None
    column: int | None = None

    def issue(self) -> Issue:
        """The issue users see: located by line and column when known, else by path."""
        if self.line is None:
            return Issue(self.path, self.reason)
        return Issue(ROOT, f"line {self.line}, column {self.column}: {self.reason}")


def fail(problems: Iterable[Problem]) -> NoReturn:
    """Raise :class:`InvalidInput` with ``problems`` in the order of the text (stable)."""
    ordered = sorted(problems, key=lambda p: (p.line or 0, p.column or 0))
    raise InvalidInput([problem.issue() for problem in ordered])


class Positions:
    """Where the parser read each node: line and column by node identity and optional field.

    Entries hold their node, so that an identity cannot be reused while the table lives.
    Nodes marked :meth:`skip` were already reported by the parser; the checker leaves them.
    """

    __slots__ = ("_at", "_skipped")

    def __init__(self) -> None:
        self._at: dict[tuple[int, str], tuple[object, int, int]] = {}
        self._skipped: dict[int, object] = {}

    def record(self, node: object, line: int, column: int, field: str = "") -> None:
        """Note that ``node`` (or its ``field``) starts at ``line``, ``column``."""
        self._at[(id(node), field)] = (node, line, column)

    def find(self, node: object, field: str = "") -> tuple[int, int] | None:
        """The recorded line and column of ``node`` (or its ``field``), if any."""
        entry = self._at.get((id(node), field))
        if entry is None or entry[0] is not node:
            return None
        return entry[1], entry[2]

    def skip(self, node: object) -> None:
        """Mark ``node`` as already reported: the checker returns it as it is."""
        self._skipped[id(node)] = node

    def skipped(self, node: object) -> bool:
        """Whether ``node`` was marked with :meth:`skip`."""
        return self._skipped.get(id(node)) is node


@dataclass(frozen=True, slots=True)
class _Loc:
    """Where a node is: its JSON path, and its text position (or its nearest parent's)."""

    path: str
    at: tuple[int, int] | None


# -- the checker ---------------------------------------------------------------------------------


def check(expr: Expr, schema: Schema, *, audiences: Collection[str] = ()) -> Expr:
    """Check ``expr`` against ``schema`` and return it with every ``kind`` filled in.

    ``audiences`` are the names ``in audience`` may refer to. Raises :class:`InvalidInput`
    listing every problem, each under its JSON path (``definition.items[1].test.value``).
    """
    checked, problems = check_tree(expr, schema, audiences)
    if problems:
        fail(problems)
    return checked


def check_tree(
    expr: Expr,
    schema: Schema,
    audiences: Collection[str] = (),
    positions: Positions | None = None,
) -> tuple[Expr, list[Problem]]:
    """Check ``expr`` without raising: the checked tree and the problems (none when valid).

    With ``positions`` (from the parser), problems carry the line and column of their node.
    """
    checker = _Checker(schema, audiences, positions)
    root = _Loc(ROOT, positions.find(expr) if positions is not None else None)
    return checker.expr(expr, root, 0), checker.problems


class _Checker:
    """One run of the checker: walks a tree, collects problems, rebuilds it with kinds."""

    def __init__(
        self, schema: Schema, audiences: Collection[str], positions: Positions | None
    ) -> None:
        self.schema = schema
        self.audiences = frozenset(audiences)
        self.positions = positions
        self.problems: list[Problem] = []
        self.conditions = 0
        self.too_deep = False

    # -- locating and reporting

    def loc(self, parent: _Loc, *parts: str | int, node: object = None, field: str = "") -> _Loc:
        path = parent.path
        for part in parts:
            path = join_path(path, part)
        at = None
        if self.positions is not None and node is not None:
            at = self.positions.find(node, field)
        return _Loc(path, at or parent.at)

    def report(self, loc: _Loc, reason: str) -> None:
        line, column = loc.at if loc.at is not None else (None, None)
        self.problems.append(Problem(loc.path, reason, line, column))

    def skipped(self, node: object) -> bool:
        return self.positions is not None and self.positions.skipped(node)

    def deeper(self, depth: int, loc: _Loc) -> bool:
        """Whether one more level of nesting is allowed; reports the first breach."""
        if depth < MAX_DEPTH:
            return True
        if not self.too_deep:
            self.too_deep = True
            self.report(
                loc,
                f"nested more than {MAX_DEPTH} levels deep (each and, or, not and where group "
                "is a level); simplify it, or split it into audiences joined with in audience",
            )
        return False

    def condition(self, loc: _Loc) -> None:
        self.conditions += 1
        if self.conditions == MAX_CONDITIONS + 1:
            self.report(
                loc,
                f"more than {MAX_CONDITIONS:,} conditions; split the definition into audiences "
                "joined with in audience",
            )

    def member(self, value: object, kind: type[StrEnum], loc: _Loc, what: str) -> bool:
        if isinstance(value, kind):
            return True
        allowed = ", ".join(str(m) for m in kind.__members__.values())
        self.report(loc, f"unknown {what} {value!r}; expected one of {allowed}")
        return False

    # -- expressions

    def expr(self, node: Expr, loc: _Loc, depth: int) -> Expr:
        if isinstance(node, And | Or):
            if not self.deeper(depth, loc):
                return node
            word = "and" if isinstance(node, And) else "or"
            items = self.items(node.items, loc, word)
            checked = tuple(
                self.expr(item, self.loc(loc, "items", i, node=item), depth + 1)
                for i, item in enumerate(items)
            )
            return And(checked) if isinstance(node, And) else Or(checked)
        if isinstance(node, Not):
            if not self.deeper(depth, loc):
                return node
            return Not(self.expr(node.item, self.loc(loc, "item", node=node.item), depth + 1))
        self.condition(loc)
        if self.skipped(node):
            return node
        match node:
            case Attr():
                return self.attr(node, loc)
            case Occurs():
                event, _ = self.event(node.event, self.loc(loc, "event", node=node.event), depth)
                return Occurs(event)
            case Count():
                return self.count(node, loc, depth)
            case Aggregate():
                return self.aggregate(node, loc, depth)
            case Pick():
                return self.pick(node, loc, depth)
            case Sequence():
                return self.sequence(node, loc, depth)
            case Consent():
                return self.consent(node, loc)
            case InAudience():
                return self.in_audience(node, loc)
        self.report(loc, f"not an audience condition: {type(node).__name__}")
        return node

    def items(self, items: tuple[_T, ...], loc: _Loc, word: str) -> tuple[_T, ...]:
        if not isinstance(items, tuple):
            self.report(self.loc(loc, "items"), f"{word}: expected a list of items")
            return ()
        if len(items) < 2:
            self.report(
                self.loc(loc, "items"),
                f"{word} needs at least two items, got {len(items)}; use the item itself",
            )
        return items

    def attr(self, node: Attr, loc: _Loc) -> Attr:
        spec = self.field(
            node.path, self.schema.attributes, self.loc(loc, "path", node=node), "attribute", ""
        )
        if spec is None:
            return node
        self.test(node.test, spec, self.loc(loc, "test", node=node.test), f"attribute {node.path}")
        return Attr(node.path, node.test, spec.type)

    def count(self, node: Count, loc: _Loc, depth: int) -> Count:
        event, _ = self.event(node.event, self.loc(loc, "event", node=node.event), depth)
        self.member(node.op, CompareOp, self.loc(loc, "op", node=node), "comparison")
        value = node.value
        at = self.loc(loc, "value", node=node, field="value")
        if isinstance(value, bool) or not isinstance(value, int):
            self.report(at, f"count(…) is compared with a whole number, got {_show(value)}")
        elif value < 0:
            self.report(at, f"a count is never negative; compare with 0 or more, got {value}")
        elif value > _INT64_MAX:
            self.report(at, "number out of range: counts are at most 9223372036854775807")
        return Count(event, node.op, value)

    def aggregate(self, node: Aggregate, loc: _Loc, depth: int) -> Aggregate:
        event, spec = self.event(node.event, self.loc(loc, "event", node=node.event), depth)
        self.member(node.fn, AggregateFn, self.loc(loc, "fn", node=node), "aggregate")
        self.member(node.op, CompareOp, self.loc(loc, "op", node=node), "comparison")
        if spec is not None:
            at = self.loc(loc, "property", node=node, field="property")
            field = self.field(node.path, spec.properties, at, "property", event.name)
            if field is not None and field.type not in _NUMERIC:
                self.report(
                    at,
                    f"{node.fn}(…) needs a number property; property {node.path} of "
                    f"{quote(event.name)} is {_a(field.type)}",
                )
        self.number(node.value, self.loc(loc, "value", node=node, field="value"), "aggregate")
        return Aggregate(node.fn, event, node.path, node.op, node.value)

    def pick(self, node: Pick, loc: _Loc, depth: int) -> Pick:
        event, spec = self.event(node.event, self.loc(loc, "event", node=node.event), depth)
        self.member(node.which, Which, self.loc(loc, "which", node=node), "pick")
        test_loc = self.loc(loc, "test", node=node.test)
        kind: FieldType | None = None
        if node.path is None:
            kind = FieldType.TIMESTAMP
            self.test(node.test, _TIMESTAMP, test_loc, f"the timestamp of {quote(event.name)}")
        elif node.path == "timestamp":
            self.report(
                self.loc(loc, "property", node=node, field="property"),
                'property "timestamp" names the event\'s time; write null for it in the JSON form',
            )
        elif spec is not None:
            at = self.loc(loc, "property", node=node, field="property")
            field = self.field(node.path, spec.properties, at, "property", event.name)
            if field is not None:
                kind = field.type
                self.test(node.test, field, test_loc, f"property {node.path}")
        return Pick(node.which, event, node.path, node.test, kind)

    def sequence(self, node: Sequence, loc: _Loc, depth: int) -> Sequence:
        steps = node.steps if isinstance(node.steps, tuple) else ()
        if len(steps) < 2:
            self.report(self.loc(loc, "steps"), "a sequence needs at least two steps")
        checked: list[EventRef] = []
        for index, step in enumerate(steps):
            at = self.loc(loc, "steps", index, node=step)
            event, _ = self.event(step, at, depth)
            if index > 0 and step.window is not None:
                self.report(
                    self.loc(at, "window", node=step.window),
                    "only the first step of a sequence may have a window (it says when the "
                    "sequence may start); the later steps are limited by its within",
                )
            checked.append(event)
        self.duration(node.within, self.loc(loc, "within", node=node.within))
        if not isinstance(node.absent_last, bool):
            self.report(self.loc(loc, "absent_last"), "expected true or false")
        return Sequence(tuple(checked), node.within, node.absent_last)

    def consent(self, node: Consent, loc: _Loc) -> Consent:
        for field in ("channel", "purpose"):
            value = getattr(node, field)
            if not isinstance(value, str) or not CONSENT_NAME.fullmatch(value):
                shown = quote(value) if isinstance(value, str) else _show(value)
                self.report(
                    self.loc(loc, field, node=node, field=field),
                    f"consent {field} {shown} must be a lowercase identifier (a-z, 0-9 and _, "
                    "not starting with a digit), e.g. email or marketing",
                )
        self.member(node.status, ConsentStatus, self.loc(loc, "status", node=node), "status")
        if not isinstance(node.negated, bool):
            self.report(self.loc(loc, "negated"), "expected true or false")
        return node

    def in_audience(self, node: InAudience, loc: _Loc) -> InAudience:
        at = self.loc(loc, "audience", node=node, field="audience")
        name = node.name
        if not isinstance(name, str) or not name:
            self.report(at, "an audience name must be a non-empty string")
        elif self.string(name, at) and name not in self.audiences:
            hint = did_you_mean(name, self.audiences, none="there are no other audiences")
            self.report(at, f"unknown audience {quote(name)}{hint}")
        return node

    # -- events, filters and fields

    def event(self, ref: EventRef, loc: _Loc, depth: int) -> tuple[EventRef, EventSpec | None]:
        """The checked reference and its event type (None when the type is unknown)."""
        if self.skipped(ref):
            return ref, None
        name = ref.name
        spec = self.schema.events.get(name) if isinstance(name, str) else None
        if spec is None:
            shown = quote(name) if isinstance(name, str) else _show(name)
            hint = did_you_mean(str(name), self.schema.events)
            if isinstance(name, str) and name.split(".")[0] in self.schema.attributes:
                hint += f" ({quote(name)} is an attribute, not an event type)"
            self.report(self.loc(loc, "name", node=ref), f"unknown event type {shown}{hint}")
        where = ref.where
        if where is not None:
            where = self.filter(where, spec, str(name), self.loc(loc, "where", node=where), depth)
        if ref.window is not None:
            self.window(ref.window, self.loc(loc, "window", node=ref.window))
        return EventRef(name, where, ref.window), spec

    def filter(
        self, node: Filter, spec: EventSpec | None, event: str, loc: _Loc, depth: int
    ) -> Filter:
        if isinstance(node, FilterAnd | FilterOr):
            if not self.deeper(depth, loc):
                return node
            word = "and" if isinstance(node, FilterAnd) else "or"
            items = tuple(
                self.filter(item, spec, event, self.loc(loc, "items", i, node=item), depth + 1)
                for i, item in enumerate(self.items(node.items, loc, word))
            )
            return FilterAnd(items) if isinstance(node, FilterAnd) else FilterOr(items)
        if isinstance(node, FilterNot):
            if not self.deeper(depth, loc):
                return node
            item = self.loc(loc, "item", node=node.item)
            return FilterNot(self.filter(node.item, spec, event, item, depth + 1))
        if not isinstance(node, Prop):
            self.report(loc, f"not a property filter: {type(node).__name__}")
            return node
        self.condition(loc)
        if spec is None:  # the event type is unknown (reported): its properties are too
            return node
        at = self.loc(loc, "path", node=node)
        field = self.field(node.path, spec.properties, at, "property", event)
        if field is None:
            return node
        self.test(node.test, field, self.loc(loc, "test", node=node.test), f"property {node.path}")
        return Prop(node.path, node.test, field.type)

    def field(
        self, path: object, fields: Mapping[str, FieldSpec], loc: _Loc, noun: str, event: str
    ) -> FieldSpec | None:
        """The spec of a dotted ``path`` into ``fields`` (nested through object properties)."""
        of = f" of event {quote(event)}" if event else ""
        if not isinstance(path, str) or not PATH.fullmatch(path):
            shown = quote(path) if isinstance(path, str) else _show(path)
            self.report(
                loc, f"invalid {noun} path {shown}: names of letters, digits and _ joined by dots"
            )
            return None
        parts = path.split(".")
        current: Mapping[str, FieldSpec] = fields
        spec: FieldSpec | None = None
        for index, part in enumerate(parts):
            prefix = ".".join(parts[:index])
            spec = current.get(part)
            if spec is None:
                known = [f"{prefix}.{name}" if prefix else name for name in current]
                wanted = ".".join(parts[: index + 1])
                hint = did_you_mean(wanted, known)
                if noun == "attribute" and index == 0 and path in self.schema.events:
                    hint += f" ({quote(path)} is an event type, not an attribute)"
                self.report(loc, f"unknown {noun} {quote(wanted)}{of}{hint}")
                return None
            if index + 1 == len(parts):
                break
            here = ".".join(parts[: index + 1])
            if spec.type is not FieldType.OBJECT:
                self.report(
                    loc,
                    f"{noun} {quote(here)}{of} is {_a(spec.type)}; it has no field "
                    f"{quote(parts[index + 1])}",
                )
                return None
            if spec.properties is None:
                self.report(
                    loc,
                    f"{noun} {quote(here)}{of} is a free-form object: its fields are not "
                    "declared in the schema, so they cannot be tested (only exists or is missing "
                    "on the object itself)",
                )
                return None
            current = spec.properties
        return spec

    # -- tests and values

    def test(self, test: Test, spec: FieldSpec, loc: _Loc, subject: str) -> None:
        kind = spec.type
        if isinstance(test, Exists):
            if not isinstance(test.present, bool):
                self.report(loc, "exists: expected present to be true or false")
            return
        if kind in (FieldType.OBJECT, FieldType.ARRAY):
            self.report(loc, f"{subject} is {_a(kind)}; only exists and is missing can test it")
            return
        match test:
            case Compare():
                self.compare(test, spec, loc, subject)
            case InList():
                self.in_list(test, spec, loc, subject)
            case Text():
                self.member(test.op, TextOp, loc, "text test")
                if kind is not FieldType.STRING:
                    word = str(test.op).replace("_", " ")
                    self.report(loc, f"{word} tests text; {subject} is {_a(kind)}")
                at = self.loc(loc, "value", node=test, field="value")
                if not isinstance(test.value, str):
                    self.report(at, f"expected a string, got {_show(test.value)}")
                else:
                    self.string(test.value, at)
            case Within():
                if kind is not FieldType.TIMESTAMP:
                    self.report(loc, f"a window tests a timestamp; {subject} is {_a(kind)}")
                self.window(test.window, self.loc(loc, "window", node=test.window))
            case Anniversary():
                if kind not in (FieldType.TIMESTAMP, FieldType.STRING):
                    self.report(
                        loc,
                        "in next N days tests a date (a timestamp, or a string starting "
                        f"YYYY-MM-DD); {subject} is {_a(kind)}",
                    )
                days = test.days
                if (
                    isinstance(days, bool)
                    or not isinstance(days, int)
                    or not 0 <= days <= MAX_ANNIVERSARY_DAYS
                ):
                    self.report(
                        self.loc(loc, "days", node=test, field="days"),
                        f"in next N days takes 0 to {MAX_ANNIVERSARY_DAYS} days, got "
                        f"{_show(days).removeprefix('number ')}",
                    )
            case _:
                self.report(loc, f"not a test: {type(test).__name__}")

    def compare(self, test: Compare, spec: FieldSpec, loc: _Loc, subject: str) -> None:
        kind = spec.type
        if not self.member(test.op, CompareOp, loc, "comparison"):
            return
        if test.op in _ORDERING and kind not in _ORDERED:
            if kind is FieldType.STRING:
                reason = (
                    f"{subject} is a string, and strings cannot be ordered with {test.op} "
                    "(engines sort text differently); use =, !=, in (…), starts with, ends with "
                    "or contains"
                )
            else:
                reason = f"{subject} is {_a(kind)}; compare it with = or != only"
            self.report(loc, reason)
        at = self.loc(loc, "value", node=test, field="value")
        if self.literal(test.value, spec, at, subject) and test.op in (CompareOp.EQ, CompareOp.NE):
            self.enum(test.value, spec, at, subject)

    def in_list(self, test: InList, spec: FieldSpec, loc: _Loc, subject: str) -> None:
        values = test.values
        if not isinstance(values, tuple) or not values:
            self.report(self.loc(loc, "values"), "in (…) needs at least one value")
            return
        if len(values) > MAX_VALUES:
            self.report(
                self.loc(loc, "values"),
                f"in (…) lists at most {MAX_VALUES:,} values, got {len(values):,}; "
                "store a list attribute or split the audience",
            )
            return
        if not isinstance(test.negated, bool):
            self.report(self.loc(loc, "op"), "expected negated to be true or false")
        for index, value in enumerate(values):
            at = self.loc(loc, "values", index, node=test, field=f"values[{index}]")
            if self.literal(value, spec, at, subject):
                self.enum(value, spec, at, subject)

    def literal(self, value: Scalar, spec: FieldSpec, loc: _Loc, subject: str) -> bool:
        """Whether ``value`` is a literal of ``spec``'s type; reports why not."""
        kind = spec.type
        if kind is FieldType.STRING:
            if not isinstance(value, str):
                self.report(
                    loc,
                    f"{subject} is a string; expected a string in double quotes, "
                    f"got {_show(value)}",
                )
                return False
            return self.string(value, loc)
        if kind in _NUMERIC:
            return self.number(value, loc, subject, integer=kind is FieldType.INTEGER)
        if kind is FieldType.BOOLEAN:
            if not isinstance(value, bool):
                self.report(
                    loc, f"{subject} is a boolean; expected true or false, got {_show(value)}"
                )
                return False
            return True
        if kind is FieldType.TIMESTAMP:
            if not isinstance(value, str):
                self.report(
                    loc,
                    f"{subject} is a timestamp; expected a date or timestamp in "
                    f"double quotes ({_MOMENT_EXAMPLE}), got {_show(value)}",
                )
                return False
            if not self.string(value, loc):
                return False
            if parse_moment(value) is None:
                self.report(
                    loc,
                    f"{quote(value)} is not an ISO-8601 date or timestamp (e.g. {_MOMENT_EXAMPLE})",
                )
                return False
            return True
        self.report(loc, f"{subject} is {_a(kind)}; only exists and is missing can test it")
        return False

    def number(self, value: object, loc: _Loc, subject: str, *, integer: bool = False) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            what = "an integer" if integer else "a number"
            self.report(loc, f"{subject} is {what}; expected a number, got {_show(value)}")
            return False
        if isinstance(value, float) and not math.isfinite(value):
            self.report(loc, f"number out of range: {value!r} is not a finite number")
            return False
        if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            self.report(
                loc,
                "number out of range: whole numbers are limited to 64 bits (±9223372036854775807)",
            )
            return False
        if integer and isinstance(value, float) and not value.is_integer():
            self.report(loc, f"{subject} is an integer; {value!r} has a fraction")
            return False
        return True

    def string(self, value: str, loc: _Loc) -> bool:
        if len(value) > MAX_STRING:
            self.report(
                loc, f"string of {len(value):,} characters; strings are at most {MAX_STRING:,}"
            )
            return False
        if "\x00" in value:
            self.report(loc, "strings cannot contain NUL (\\u0000) characters")
            return False
        if _SURROGATE.search(value):
            self.report(
                loc,
                "string holds a lone surrogate (\\ud800-\\udfff), which is not "
                "valid Unicode; escape a character outside the BMP as a pair",
            )
            return False
        return True

    def enum(self, value: Scalar, spec: FieldSpec, loc: _Loc, subject: str) -> None:
        if spec.enum is None or value in spec.enum:
            return
        allowed = ", ".join(_literal_text(v) for v in spec.enum)
        self.report(
            loc, f"{_literal_text(value)} is not an allowed value of {subject}; allowed: {allowed}"
        )

    # -- windows and durations

    def window(self, window: Window, loc: _Loc) -> None:
        match window:
            case Last() | Next() | Older():
                key = type(window).__name__.lower()
                self.duration(window.duration, self.loc(loc, key, node=window.duration))
            case Between():
                start = self.bound(window.start, self.loc(loc, "between", 0, node=window.start))
                end = self.bound(window.end, self.loc(loc, "between", 1, node=window.end))
                if start and end:
                    self.order(window, loc)
            case _:
                self.report(loc, f"not a window: {type(window).__name__}")

    def bound(self, bound: Bound, loc: _Loc) -> bool:
        if isinstance(bound, Ago):
            return self.duration(bound.duration, self.loc(loc, "ago", node=bound.duration))
        if not isinstance(bound, At):
            self.report(loc, f"not a bound: {type(bound).__name__}")
            return False
        at = self.loc(loc, "at")
        if not isinstance(bound.text, str):
            self.report(at, f"expected a date or timestamp, got {_show(bound.text)}")
            return False
        if not self.string(bound.text, at):
            return False
        if parse_moment(bound.text) is None:
            self.report(
                at,
                f"{quote(bound.text)} is not an ISO-8601 date or timestamp (e.g. "
                f"{_MOMENT_EXAMPLE})",
            )
            return False
        return True

    def order(self, window: Between, loc: _Loc) -> None:
        """Report a ``between`` that can never hold (checked bounds)."""
        start, end = window.start, window.end
        if isinstance(start, At) and isinstance(end, At):
            lo, hi = parse_moment(start.text), parse_moment(end.text)
            assert lo is not None and hi is not None
            # A date-only end includes that whole day.
            empty = lo.date() > hi.date() if is_date_only(end.text) else lo > hi
            if empty:
                self.report(
                    loc,
                    f"impossible window: the start {quote(start.text)} is after the end "
                    f"{quote(end.text)}; write the earlier bound first",
                )
        elif (
            isinstance(start, Ago)
            and isinstance(end, Ago)
            and _minutes(start.duration) < _minutes(end.duration)
        ):
            first = _amount(end.duration.amount, end.duration.unit)
            second = _amount(start.duration.amount, start.duration.unit)
            self.report(
                loc,
                f"impossible window: the start ({second} ago) is after the end "
                f"({first} ago); write the older bound first: between {first} ago and "
                f"{second} ago",
            )

    def duration(self, duration: Duration, loc: _Loc) -> bool:
        if not isinstance(duration, Duration):
            self.report(loc, f"expected a duration, got {type(duration).__name__}")
            return False
        amount = duration.amount
        if not self.member(duration.unit, Unit, self.loc(loc, "unit"), "unit"):
            return False
        at = self.loc(loc, "amount")
        if isinstance(amount, bool) or not isinstance(amount, int):
            self.report(at, f"a duration is a whole number of {duration.unit}, got {_show(amount)}")
            return False
        if amount < 1:
            self.report(at, f"a duration is at least 1 {duration.unit.value[:-1]}, got {amount}")
            return False
        if amount > _MAX_MINUTES or _minutes(duration) > _MAX_MINUTES:
            self.report(
                loc,
                f"{_amount(amount, duration.unit)} is longer than the limit of "
                f"{MAX_WINDOW_DAYS:,} days",
            )
            return False
        return True


def _minutes(duration: Duration) -> int:
    return duration.amount * _MINUTES[duration.unit]


# -- audiences of audiences ----------------------------------------------------------------------


def references(expr: Expr) -> set[str]:
    """The names of the audiences ``expr`` refers to directly (not those they refer to)."""
    found: set[str] = set()
    stack: list[Expr] = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, And | Or):
            stack.extend(node.items)
        elif isinstance(node, Not):
            stack.append(node.item)
        elif isinstance(node, InAudience):
            found.add(node.name)
    return found


def expand(expr: Expr, definitions: Mapping[str, Expr]) -> Expr:
    """``expr`` with every ``in audience`` replaced by the (checked) definition it names.

    Expands recursively; each audience is expanded once and shared. Raises
    :class:`InvalidInput` for an unknown audience or a cycle (``"vip" -> "gold" -> "vip"``).
    """
    return _Expander(definitions).expr(expr, ())


class _Expander:
    def __init__(self, definitions: Mapping[str, Expr]) -> None:
        self.definitions = definitions
        self.done: dict[str, Expr] = {}

    def expr(self, node: Expr, chain: tuple[str, ...]) -> Expr:
        if isinstance(node, And):
            return And(tuple(self.expr(item, chain) for item in node.items))
        if isinstance(node, Or):
            return Or(tuple(self.expr(item, chain) for item in node.items))
        if isinstance(node, Not):
            return Not(self.expr(node.item, chain))
        if isinstance(node, InAudience):
            return self.audience(node.name, chain)
        return node

    def audience(self, name: str, chain: tuple[str, ...]) -> Expr:
        if name in chain:
            cycle = " -> ".join(quote(n) for n in (*chain[chain.index(name) :], name))
            raise InvalidInput(
                [
                    Issue(
                        ROOT,
                        f"audiences refer to each other in a cycle: {cycle}; remove one of "
                        "these references",
                    )
                ]
            )
        if name in self.done:
            return self.done[name]
        definition = self.definitions.get(name)
        if definition is None:
            hint = did_you_mean(name, self.definitions, none="there are no other audiences")
            raise InvalidInput([Issue(ROOT, f"unknown audience {quote(name)}{hint}")])
        expanded = self.expr(definition, (*chain, name))
        self.done[name] = expanded
        return expanded
