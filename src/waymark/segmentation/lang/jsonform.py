"""The JSON form of an audience tree (API, console): :func:`to_json` and :func:`from_json`.

Nodes are objects tagged by ``kind`` (conditions, filters) or ``op`` (tests); windows are
objects with one key (``{"last": D}``). The declared types (``kind`` fields of the AST) are not
part of the form: :func:`from_json` leaves them ``None`` and :func:`.check.check` fills them in.
``from_json(to_json(tree)) == tree`` for every unchecked tree. :func:`from_json` checks structure
only (keys, JSON types, known tags), and reports every problem with its path, e.g.
``definition.items[2].event.window``; names and meaning are the checker's.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, Final, TypeVar

from waymark.core.errors import InvalidInput, Issue, join_path
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
)
from waymark.segmentation.lang.check import MAX_DEPTH, ROOT, did_you_mean

__all__ = ["from_json", "to_json"]

_E = TypeVar("_E", bound=StrEnum)
_V = TypeVar("_V")

# -- writing -------------------------------------------------------------------------------------


def to_json(expr: Expr) -> dict[str, Any]:
    """The JSON form of ``expr`` (a dict of JSON types; ``kind`` fields are left out)."""
    match expr:
        case And(items=items):
            return {"kind": "and", "items": [to_json(item) for item in items]}
        case Or(items=items):
            return {"kind": "or", "items": [to_json(item) for item in items]}
        case Not(item=item):
            return {"kind": "not", "item": to_json(item)}
        case Attr(path=path, test=test):
            return {"kind": "attribute", "path": path, "test": _test_json(test)}
        case Occurs(event=event):
            return {"kind": "occurs", "event": _event_json(event)}
        case Count(event=event, op=op, value=value):
            return {"kind": "count", "event": _event_json(event), "op": str(op), "value": value}
        case Aggregate(fn=fn, event=event, path=path, op=op, value=value):
            return {
                "kind": "aggregate",
                "fn": str(fn),
                "event": _event_json(event),
                "property": path,
                "op": str(op),
                "value": value,
            }
        case Pick(which=which, event=event, path=path, test=test):
            return {
                "kind": "pick",
                "which": str(which),
                "event": _event_json(event),
                "property": path,
                "test": _test_json(test),
            }
        case Sequence(steps=steps, within=within, absent_last=absent_last):
            return {
                "kind": "sequence",
                "steps": [_event_json(step) for step in steps],
                "within": _duration_json(within),
                "absent_last": absent_last,
            }
        case Consent(channel=channel, purpose=purpose, status=status, negated=negated):
            return {
                "kind": "consent",
                "channel": channel,
                "purpose": purpose,
                "status": str(status),
                "negated": negated,
            }
        case InAudience(name=name):
            return {"kind": "in_audience", "audience": name}
    raise TypeError(f"not an audience condition: {type(expr).__name__}")


def _event_json(event: EventRef) -> dict[str, Any]:
    out: dict[str, Any] = {"name": event.name}
    if event.where is not None:
        out["where"] = _filter_json(event.where)
    if event.window is not None:
        out["window"] = _window_json(event.window)
    return out


def _filter_json(node: Filter) -> dict[str, Any]:
    match node:
        case FilterAnd(items=items):
            return {"kind": "and", "items": [_filter_json(item) for item in items]}
        case FilterOr(items=items):
            return {"kind": "or", "items": [_filter_json(item) for item in items]}
        case FilterNot(item=item):
            return {"kind": "not", "item": _filter_json(item)}
        case Prop(path=path, test=test):
            return {"kind": "property", "path": path, "test": _test_json(test)}
    raise TypeError(f"not a property filter: {type(node).__name__}")


def _test_json(test: Test) -> dict[str, Any]:
    match test:
        case Compare(op=op, value=value):
            return {"op": str(op), "value": value}
        case InList(values=values, negated=negated):
            return {"op": "not_in" if negated else "in", "values": list(values)}
        case Text(op=op, value=value):
            return {"op": str(op), "value": value}
        case Exists(present=present):
            return {"op": "exists" if present else "missing"}
        case Within(window=window):
            return {"op": "within", "window": _window_json(window)}
        case Anniversary(days=days):
            return {"op": "anniversary", "days": days}
    raise TypeError(f"not a test: {type(test).__name__}")


def _window_json(window: Window) -> dict[str, Any]:
    match window:
        case Last(duration=duration):
            return {"last": _duration_json(duration)}
        case Next(duration=duration):
            return {"next": _duration_json(duration)}
        case Older(duration=duration):
            return {"older": _duration_json(duration)}
        case Between(start=start, end=end):
            return {"between": [_bound_json(start), _bound_json(end)]}
    raise TypeError(f"not a window: {type(window).__name__}")


def _bound_json(bound: Bound) -> dict[str, Any]:
    if isinstance(bound, Ago):
        return {"ago": _duration_json(bound.duration)}
    return {"at": bound.text}


def _duration_json(duration: Duration) -> dict[str, Any]:
    return {"amount": duration.amount, "unit": str(duration.unit)}


# -- reading -------------------------------------------------------------------------------------

_EXPR_KEYS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    # kind: (required keys besides kind, optional keys)
    "and": (("items",), ()),
    "or": (("items",), ()),
    "not": (("item",), ()),
    "attribute": (("path", "test"), ()),
    "occurs": (("event",), ()),
    "count": (("event", "op", "value"), ()),
    "aggregate": (("fn", "event", "property", "op", "value"), ()),
    "pick": (("which", "event", "property", "test"), ()),
    "sequence": (("steps", "within"), ("absent_last",)),
    "consent": (("channel", "purpose", "status"), ("negated",)),
    "in_audience": (("audience",), ()),
}
_FILTER_KEYS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "and": (("items",), ()),
    "or": (("items",), ()),
    "not": (("item",), ()),
    "property": (("path", "test"), ()),
}
_TEST_KEYS: Final[dict[str, tuple[str, ...]]] = {
    **{op.value: ("value",) for op in CompareOp},
    "in": ("values",),
    "not_in": ("values",),
    **{op.value: ("value",) for op in TextOp},
    "exists": (),
    "missing": (),
    "within": ("window",),
    "anniversary": ("days",),
}
_TEST_TAGS: Final = {op: (fields, ()) for op, fields in _TEST_KEYS.items()}
_WINDOW_KEYS: Final = ("last", "next", "older", "between")
_BOUND_KEYS: Final = ("ago", "at")


def from_json(data: object) -> Expr:
    """Read the JSON form (structure only; see :func:`.check.check` for names and types).

    Raises :class:`InvalidInput` listing every problem under its path, rooted at
    ``definition``: unknown or missing keys, wrong JSON types, unknown tags, and nesting
    deeper than the checker's limit (which also bounds the reading's recursion).
    """
    reader = _Reader()
    expr = reader.expr(data, ROOT, 0)
    if reader.issues or expr is None:
        raise InvalidInput(reader.issues or [Issue(ROOT, "not an audience definition")])
    return expr


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


class _Reader:
    """One reading: returns nodes (None where unreadable) and collects every issue."""

    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def bad(self, path: str, reason: str) -> None:
        self.issues.append(Issue(path, reason))

    def obj(
        self,
        data: object,
        path: str,
        what: str,
        required: tuple[str, ...],
        optional: tuple[str, ...],
    ) -> Mapping[str, Any] | None:
        """``data`` as an object with these keys; reports unknown and missing keys."""
        if not isinstance(data, Mapping):
            self.bad(path, f"expected an object ({what}), got {_describe(data)}")
            return None
        allowed = (*required, *optional)
        for key in data:
            if key not in allowed:
                self.bad(
                    join_path(path, str(key)),
                    f"unknown key {str(key)!r} in {what}; expected {', '.join(allowed) or 'none'}",
                )
        for key in required:
            if key not in data:
                self.bad(join_path(path, key), f"missing key {key!r} in {what}")
        return data

    def tagged(
        self,
        data: object,
        path: str,
        tag: str,
        what: str,
        keys: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]],
    ) -> tuple[str, Mapping[str, Any]] | None:
        """The tag (``kind`` or ``op``) of an object and the object, keys checked."""
        if not isinstance(data, Mapping):
            self.bad(path, f"expected an object ({what}), got {_describe(data)}")
            return None
        value = data.get(tag)
        if not isinstance(value, str) or value not in keys:
            if tag not in data:
                self.bad(join_path(path, tag), f"missing key {tag!r} in {what}")
            else:
                shown = repr(value) if isinstance(value, str) else _describe(value)
                hint = did_you_mean(value, keys) if isinstance(value, str) else ""
                hint = hint if hint.startswith("; did") else f"; expected one of {', '.join(keys)}"
                self.bad(join_path(path, tag), f"unknown {tag} {shown} in {what}{hint}")
            return None
        required, optional = keys[value]
        obj = self.obj(data, path, f"{what} {value!r}", (tag, *required), optional)
        return (value, obj) if obj is not None else None

    # -- leaves

    def string(self, data: Mapping[str, Any], key: str, path: str) -> str | None:
        value = data.get(key)
        if key in data and not isinstance(value, str):
            self.bad(join_path(path, key), f"expected a string, got {_describe(value)}")
            return None
        return value

    def boolean(self, data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            self.bad(join_path(path, key), f"expected true or false, got {_describe(value)}")
            return default
        return value

    def integer(self, data: Mapping[str, Any], key: str, path: str) -> int | None:
        value = data.get(key)
        if key in data and (isinstance(value, bool) or not isinstance(value, int)):
            self.bad(join_path(path, key), f"expected a whole number, got {_describe(value)}")
            return None
        return value

    def number(self, data: Mapping[str, Any], key: str, path: str) -> int | float | None:
        value = data.get(key)
        if key in data and (isinstance(value, bool) or not isinstance(value, int | float)):
            self.bad(join_path(path, key), f"expected a number, got {_describe(value)}")
            return None
        return value

    def scalar(self, value: object, path: str) -> Scalar | None:
        if not isinstance(value, str | int | float):  # bool is an int
            self.bad(path, f"expected a string, number or boolean, got {_describe(value)}")
            return None
        return value

    def member(self, data: Mapping[str, Any], key: str, path: str, enum: type[_E]) -> _E | None:
        if key not in data:
            return None
        value = data[key]
        try:
            return enum(value)
        except ValueError:
            allowed = ", ".join(m.value for m in enum)
            shown = repr(value) if isinstance(value, str) else _describe(value)
            self.bad(join_path(path, key), f"unknown {key} {shown}; expected one of {allowed}")
            return None

    def many(
        self, data: Mapping[str, Any], key: str, path: str, read: Callable[[object, str], _V | None]
    ) -> tuple[_V, ...] | None:
        """The array at ``key``, each element read by ``read``; None if any is unreadable."""
        if key not in data:
            return None
        values = data[key]
        if not isinstance(values, list | tuple):
            self.bad(join_path(path, key), f"expected an array, got {_describe(values)}")
            return None
        base = join_path(path, key)
        out: list[_V] = []
        complete = True
        for index, item in enumerate(values):
            value = read(item, join_path(base, index))
            if value is None:
                complete = False
            else:
                out.append(value)
        return tuple(out) if complete else None

    def deeper(self, depth: int, path: str) -> bool:
        if depth < MAX_DEPTH:
            return True
        self.bad(
            path,
            f"nested more than {MAX_DEPTH} levels deep (each and, or, not and "
            "where group is a level)",
        )
        return False

    # -- expressions

    def expr(self, data: object, path: str, depth: int) -> Expr | None:
        read = self.tagged(data, path, "kind", "condition", _EXPR_KEYS)
        if read is None:
            return None
        kind, obj = read
        if kind in ("and", "or", "not"):
            if not self.deeper(depth, path):
                return None
            if kind == "not":
                if "item" not in obj:
                    return None
                item = self.expr(obj["item"], join_path(path, "item"), depth + 1)
                return Not(item) if item is not None else None

            def read_item(data: object, at: str) -> Expr | None:
                return self.expr(data, at, depth + 1)

            items: tuple[Expr, ...] | None = self.many(obj, "items", path, read_item)
            if items is None:
                return None
            return And(items) if kind == "and" else Or(items)
        return self.condition(kind, obj, path, depth)

    def condition(self, kind: str, obj: Mapping[str, Any], path: str, depth: int) -> Expr | None:
        event: EventRef | None = None
        if "event" in _EXPR_KEYS[kind][0] and "event" in obj:
            event = self.event(obj["event"], join_path(path, "event"), depth)
        match kind:
            case "attribute":
                attr_path = self.string(obj, "path", path)
                test = self.test(obj["test"], join_path(path, "test")) if "test" in obj else None
                return Attr(attr_path, test) if attr_path is not None and test else None
            case "occurs":
                return Occurs(event) if event else None
            case "count":
                op = self.member(obj, "op", path, CompareOp)
                value = self.integer(obj, "value", path)
                return Count(event, op, value) if event and op and value is not None else None
            case "aggregate":
                fn = self.member(obj, "fn", path, AggregateFn)
                prop = self.string(obj, "property", path)
                op = self.member(obj, "op", path, CompareOp)
                number = self.number(obj, "value", path)
                if event and fn and prop is not None and op and number is not None:
                    return Aggregate(fn, event, prop, op, number)
                return None
            case "pick":
                which = self.member(obj, "which", path, Which)
                prop = obj.get("property")
                if prop is not None and not isinstance(prop, str):
                    self.bad(
                        join_path(path, "property"),
                        f"expected a string, or null for the event's timestamp, got "
                        f"{_describe(prop)}",
                    )
                    return None
                test = self.test(obj["test"], join_path(path, "test")) if "test" in obj else None
                return Pick(which, event, prop, test) if event and which and test else None
            case "sequence":

                def step(data: object, at: str) -> EventRef | None:
                    return self.event(data, at, depth)

                steps = self.many(obj, "steps", path, step)
                within = (
                    self.duration(obj["within"], join_path(path, "within"))
                    if "within" in obj
                    else None
                )
                absent_last = self.boolean(obj, "absent_last", path, False)
                if steps is None or within is None:
                    return None
                return Sequence(steps, within, absent_last)
            case "consent":
                channel = self.string(obj, "channel", path)
                purpose = self.string(obj, "purpose", path)
                status = self.member(obj, "status", path, ConsentStatus)
                negated = self.boolean(obj, "negated", path, False)
                if channel is not None and purpose is not None and status:
                    return Consent(channel, purpose, status, negated)
                return None
            case "in_audience":
                name = self.string(obj, "audience", path)
                return InAudience(name) if name is not None else None
        raise AssertionError(kind)  # every kind of _EXPR_KEYS is handled above

    def event(self, data: object, path: str, depth: int) -> EventRef | None:
        obj = self.obj(data, path, "event", ("name",), ("where", "window"))
        if obj is None:
            return None
        name = self.string(obj, "name", path)
        where: Filter | None = None
        if obj.get("where") is not None:
            where = self.filter(obj["where"], join_path(path, "where"), depth)
            if where is None:
                return None
        window: Window | None = None
        if obj.get("window") is not None:
            window = self.window(obj["window"], join_path(path, "window"))
            if window is None:
                return None
        return EventRef(name, where, window) if name is not None else None

    def filter(self, data: object, path: str, depth: int) -> Filter | None:
        read = self.tagged(data, path, "kind", "property filter", _FILTER_KEYS)
        if read is None:
            return None
        kind, obj = read
        if kind == "property":
            prop = self.string(obj, "path", path)
            test = self.test(obj["test"], join_path(path, "test")) if "test" in obj else None
            return Prop(prop, test) if prop is not None and test else None
        if not self.deeper(depth, path):
            return None
        if kind == "not":
            if "item" not in obj:
                return None
            item = self.filter(obj["item"], join_path(path, "item"), depth + 1)
            return FilterNot(item) if item else None

        def read_item(data: object, at: str) -> Filter | None:
            return self.filter(data, at, depth + 1)

        items: tuple[Filter, ...] | None = self.many(obj, "items", path, read_item)
        if items is None:
            return None
        return FilterAnd(items) if kind == "and" else FilterOr(items)

    # -- tests and windows

    def test(self, data: object, path: str) -> Test | None:
        read = self.tagged(data, path, "op", "test", _TEST_TAGS)
        if read is None:
            return None
        op, obj = read
        if op in ("in", "not_in"):
            values: tuple[Scalar, ...] | None = self.many(obj, "values", path, self.scalar)
            return InList(values, op == "not_in") if values is not None else None
        if op in ("exists", "missing"):
            return Exists(op == "exists")
        if op == "within":
            if "window" not in obj:
                return None
            window = self.window(obj["window"], join_path(path, "window"))
            return Within(window) if window else None
        if op == "anniversary":
            days = self.integer(obj, "days", path)
            return Anniversary(days) if days is not None else None
        if op in TextOp.__members__.values():
            text = self.string(obj, "value", path)
            return Text(TextOp(op), text) if text is not None else None
        value = self.scalar(obj["value"], join_path(path, "value")) if "value" in obj else None
        return Compare(CompareOp(op), value) if value is not None else None

    def window(self, data: object, path: str) -> Window | None:
        obj = self.obj(data, path, "window", (), _WINDOW_KEYS)
        if obj is None:
            return None
        present = [key for key in _WINDOW_KEYS if key in obj]
        if len(present) != 1:
            if len(present) == len(obj):  # no unknown key was reported
                self.bad(path, f"a window has exactly one of {', '.join(_WINDOW_KEYS)}")
            return None
        (key,) = present
        inner = join_path(path, key)
        if key == "between":
            bounds = obj[key]
            if not isinstance(bounds, list | tuple) or len(bounds) != 2:
                self.bad(
                    inner,
                    f"expected an array of two bounds, got {_describe(bounds)}"
                    + (f" of {len(bounds)}" if isinstance(bounds, list | tuple) else ""),
                )
                return None
            start = self.bound(bounds[0], join_path(inner, 0))
            end = self.bound(bounds[1], join_path(inner, 1))
            return Between(start, end) if start and end else None
        duration = self.duration(obj[key], inner)
        if duration is None:
            return None
        if key == "last":
            return Last(duration)
        return Next(duration) if key == "next" else Older(duration)

    def bound(self, data: object, path: str) -> Bound | None:
        obj = self.obj(data, path, "bound", (), _BOUND_KEYS)
        if obj is None:
            return None
        present = [key for key in _BOUND_KEYS if key in obj]
        if len(present) != 1:
            if len(present) == len(obj):
                self.bad(path, "a bound has exactly one of ago, at")
            return None
        if present == ["at"]:
            text = self.string(obj, "at", path)
            return At(text) if text is not None else None
        duration = self.duration(obj["ago"], join_path(path, "ago"))
        return Ago(duration) if duration else None

    def duration(self, data: object, path: str) -> Duration | None:
        obj = self.obj(data, path, "duration", ("amount", "unit"), ())
        if obj is None:
            return None
        amount = self.integer(obj, "amount", path)
        unit = self.member(obj, "unit", path, Unit)
        return Duration(amount, unit) if amount is not None and unit else None
