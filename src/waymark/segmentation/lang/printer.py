"""The canonical text form of an audience tree: :func:`to_text`.

For every tree :func:`.check.check` accepts, ``parse(to_text(tree), schema) == tree``: floats
print so that they read back as floats, parentheses appear exactly where the tree's nesting
differs from what the precedence (``not`` > ``and`` > ``or``) implies, and names that read as
keywords are quoted (event types) or prefixed with ``attribute``. Names are printed bare and
resolved by the parser, so a schema declaring the same name as an attribute and as an event
type makes the text ambiguous (the parser says so).

Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from typing import Final

from waymark.segmentation.lang.ast import (
    Aggregate,
    Ago,
    And,
    Anniversary,
    At,
    Attr,
    Between,
    Bound,
    Compare,
    Consent,
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
    Window,
    Within,
)
from waymark.segmentation.lang.parser import KEYWORDS

__all__ = ["to_text"]

_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def to_text(expr: Expr) -> str:
    """The canonical text of ``expr``, which :func:`.parser.parse` reads back to an equal tree.

    Raises :class:`ValueError` for a value the text form cannot hold (a non-finite number).
    """
    return _expr(expr)


def _expr(expr: Expr) -> str:
    if isinstance(expr, Or):
        return " or ".join(_wrap(item, Or) for item in expr.items)
    if isinstance(expr, And):
        return " and ".join(_wrap(item, And, Or) for item in expr.items)
    if isinstance(expr, Not):
        return "not " + _wrap(expr.item, And, Or)
    return _condition(expr)


def _wrap(expr: Expr, *grouped: type) -> str:
    """``expr``'s text, parenthesized when it is one of the ``grouped`` kinds of node."""
    text = _expr(expr)
    return f"({text})" if isinstance(expr, grouped) else text


def _condition(expr: Expr) -> str:
    match expr:
        case Attr(path=path, test=test):
            return f"{_attribute(path)} {_test(test)}"
        case Occurs(event=event):
            return _event(event)
        case Count(event=event, op=op, value=value):
            return f"count({_event(event)}) {op} {value}"
        case Aggregate(fn=fn, event=event, path=path, op=op, value=value):
            target = f"{_event_name(event.name)}.{path}"
            return f"{fn}({target}{_event_tail(event)}) {op} {_literal(value)}"
        case Pick(which=which, event=event, path=path, test=test):
            return f"{which}({_event(event)}).{path or 'timestamp'} {_test(test)}"
        case Sequence(steps=steps, within=within, absent_last=absent_last):
            texts = [_event(step) for step in steps]
            if absent_last and texts:
                texts[-1] = "not " + texts[-1]
            return " then ".join(texts) + f" within {_duration(within)}"
        case Consent(channel=channel, purpose=purpose, status=status, negated=negated):
            return f"consent({channel}, {purpose}) {'!=' if negated else '='} {status}"
        case InAudience(name=name):
            return f"in audience {_string(name)}"
    raise TypeError(f"not an audience condition: {type(expr).__name__}")


def _attribute(path: str) -> str:
    """An attribute path; ``attribute`` first when its first name reads as a keyword."""
    first = path.split(".", 1)[0]
    return f"attribute {path}" if first.lower() in KEYWORDS else path


def _event_name(name: str) -> str:
    """An event type: bare when it is an identifier that is not a keyword, else quoted."""
    if _IDENTIFIER.fullmatch(name) and name.lower() not in KEYWORDS:
        return name
    return _string(name)


def _event(event: EventRef) -> str:
    return _event_name(event.name) + _event_tail(event)


def _event_tail(event: EventRef) -> str:
    """`` where …`` and the window of an event reference, each with a leading space."""
    text = ""
    if event.where is not None:
        where = _filter(event.where)
        text += f" where {where}" if isinstance(event.where, Prop) else f" where ({where})"
    if event.window is not None:
        text += " " + _window(event.window)
    return text


def _filter(node: Filter) -> str:
    match node:
        case FilterOr(items=items):
            return " or ".join(_wrap_filter(item, FilterOr) for item in items)
        case FilterAnd(items=items):
            return " and ".join(_wrap_filter(item, FilterAnd, FilterOr) for item in items)
        case FilterNot(item=item):
            return "not " + _wrap_filter(item, FilterAnd, FilterOr)
        case Prop(path=path, test=test):
            return f"{path} {_test(test)}"
    raise TypeError(f"not a property filter: {type(node).__name__}")


def _wrap_filter(node: Filter, *grouped: type) -> str:
    text = _filter(node)
    return f"({text})" if isinstance(node, grouped) else text


def _test(test: Test) -> str:
    match test:
        case Compare(op=op, value=value):
            return f"{op} {_literal(value)}"
        case InList(values=values, negated=negated):
            listed = ", ".join(_literal(v) for v in values)
            return f"{'not in' if negated else 'in'} ({listed})"
        case Text(op=op, value=value):
            return f"{str(op).replace('_', ' ')} {_string(value)}"
        case Exists(present=present):
            return "exists" if present else "is missing"
        case Within(window=window):
            return _window(window)
        case Anniversary(days=days):
            return f"in next {days} {'day' if days == 1 else 'days'}"
    raise TypeError(f"not a test: {type(test).__name__}")


def _window(window: Window) -> str:
    match window:
        case Last(duration=duration):
            return f"within last {_duration(duration)}"
        case Next(duration=duration):
            return f"within next {_duration(duration)}"
        case Older(duration=duration):
            return f"more than {_duration(duration)} ago"
        case Between(start=start, end=end):
            return f"between {_bound(start)} and {_bound(end)}"
    raise TypeError(f"not a window: {type(window).__name__}")


def _bound(bound: Bound) -> str:
    if isinstance(bound, Ago):
        return f"{_duration(bound.duration)} ago"
    if isinstance(bound, At):
        return _string(bound.text)
    raise TypeError(f"not a bound: {type(bound).__name__}")


def _duration(duration: Duration) -> str:
    unit = str(duration.unit)
    return f"{duration.amount} {unit[:-1] if duration.amount == 1 else unit}"


def _literal(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"the text form has no non-finite numbers: {value!r}")
        return repr(value)  # always has "." or "e", so it reads back as a float
    return _string(value)


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
