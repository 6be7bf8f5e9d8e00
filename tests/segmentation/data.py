"""Random profile histories aimed at a given audience definition, for the equivalence tests.

Values are drawn from the definition's own literals (and near misses: other case, a prefix or
suffix added), and timestamps from the edges of its windows (exactly on them, a second either
side), so that random histories hit the boundaries where evaluators could disagree.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from waymark.model.schemas import EventSpec, FieldSpec, FieldType, Schema
from waymark.segmentation.lang import ast

ZONES = ("UTC", "Europe/Berlin", "America/Los_Angeles", "Pacific/Auckland", "Asia/Kolkata")
CONSENT_STATUSES = ("opted_in", "opted_out")


@dataclass(frozen=True)
class Event:
    name: str
    timestamp: datetime
    seq: int
    properties: dict[str, Any]


@dataclass(frozen=True)
class Person:
    profile_id: str
    attributes: dict[str, Any]
    consents: dict[tuple[str, str], str]
    events: tuple[Event, ...]


def _tests(node: object) -> Iterator[tuple[str, ast.Test]]:
    """(path, test) for every attribute or property test in a tree."""
    if isinstance(node, ast.Attr | ast.Prop):
        yield node.path, node.test
    elif isinstance(node, ast.Pick):
        if node.path is not None:
            yield node.path, node.test
        yield from _tests(node.event)
    elif isinstance(node, ast.And | ast.Or | ast.FilterAnd | ast.FilterOr):
        for item in node.items:
            yield from _tests(item)
    elif isinstance(node, ast.Not | ast.FilterNot):
        yield from _tests(node.item)
    elif isinstance(node, ast.EventRef):
        if node.where is not None:
            yield from _tests(node.where)
    elif isinstance(node, ast.Occurs | ast.Count | ast.Aggregate):
        yield from _tests(node.event)
    elif isinstance(node, ast.Sequence):
        for step in node.steps:
            yield from _tests(step)


def _windows(node: object) -> Iterator[ast.Window]:
    if isinstance(node, ast.Within):
        yield node.window
    elif isinstance(node, ast.EventRef):
        if node.window is not None:
            yield node.window
        if node.where is not None:
            yield from _windows(node.where)
    elif isinstance(node, ast.Attr | ast.Prop):
        yield from _windows(node.test)
    elif isinstance(node, ast.Pick):
        yield from _windows(node.test)
        yield from _windows(node.event)
    elif isinstance(node, ast.Occurs | ast.Count | ast.Aggregate):
        yield from _windows(node.event)
    elif isinstance(node, ast.Sequence):
        for step in node.steps:
            yield from _windows(step)
    elif isinstance(node, ast.And | ast.Or | ast.FilterAnd | ast.FilterOr):
        for item in node.items:
            yield from _windows(item)
    elif isinstance(node, ast.Not | ast.FilterNot):
        yield from _windows(node.item)


def _gaps(node: object) -> Iterator[timedelta]:
    if isinstance(node, ast.Sequence):
        yield node.within.delta
    elif isinstance(node, ast.And | ast.Or):
        for item in node.items:
            yield from _gaps(item)
    elif isinstance(node, ast.Not):
        yield from _gaps(node.item)


def moments(expr: ast.Expr, now: datetime) -> list[datetime]:
    """Instants worth putting events and timestamps at: window edges, a second either side."""
    edges = {now, now - timedelta(days=1), now - timedelta(days=400)}
    for window in _windows(expr):
        span = ast.resolve(window, now)
        for edge in (span.lo, span.hi):
            if edge is not None and datetime(1971, 1, 1, tzinfo=UTC) < edge < datetime(
                9000, 1, 1, tzinfo=UTC
            ):
                edges.update({edge, edge - timedelta(seconds=1), edge + timedelta(seconds=1)})
    return sorted(edges)


def _literal_pool(expr: ast.Expr) -> dict[str, list[Any]]:
    pool: dict[str, list[Any]] = {}
    for path, test in _tests(expr):
        values: list[Any] = []
        if isinstance(test, ast.Compare):
            values.append(test.value)
        elif isinstance(test, ast.InList):
            values.extend(test.values)
        elif isinstance(test, ast.Text):
            values.extend([test.value, test.value.upper(), "x" + test.value, test.value + "x"])
        pool.setdefault(path, []).extend(values)
    return pool


@st.composite
def _value(
    draw: st.DrawFn, spec: FieldSpec, path: str, pool: dict[str, list[Any]], times: list[datetime]
) -> Any:
    known = [v for v in pool.get(path, []) if _fits(v, spec)]
    kind = spec.type
    if kind is FieldType.STRING:
        if spec.enum:
            return draw(st.sampled_from(list(spec.enum)))
        if path.endswith("birthday") or path.endswith("timezone"):
            if path.endswith("timezone"):
                return draw(st.sampled_from(ZONES))
            day = draw(st.dates(min_value=date(1950, 1, 1), max_value=date(2010, 12, 31)))
            near = [d.date() for d in times]
            if near and draw(st.booleans()):
                base = draw(st.sampled_from(near))
                day = _birthday_near(base, draw(st.integers(-2, 9)), draw(st.integers(1950, 2008)))
            return day.isoformat()
        return draw(st.sampled_from([*known, "", "a", "B", "Shoes", "shoes"]))
    if kind in (FieldType.NUMBER, FieldType.INTEGER):
        numbers = [float(v) for v in known if not isinstance(v, bool)]
        grid = draw(st.integers(-4, 400)) / (1 if kind is FieldType.INTEGER else 2)
        choice = draw(st.sampled_from([*numbers, grid]))
        if kind is FieldType.INTEGER:
            return int(choice) if float(choice).is_integer() else int(grid)
        return choice
    if kind is FieldType.BOOLEAN:
        return draw(st.booleans())
    if kind is FieldType.TIMESTAMP:
        moment = draw(st.sampled_from(times))
        return moment.isoformat()
    if kind is FieldType.OBJECT:
        inner = spec.properties or {}
        return {
            name: draw(_value(sub, f"{path}.{name}", pool, times))
            for name, sub in inner.items()
            if draw(st.booleans())
        }
    return [draw(st.integers(0, 3))]


def _birthday_near(base: date, offset: int, year: int) -> date:
    target = base + timedelta(days=offset)
    if target.month == 2 and target.day == 29:
        return date(2004, 2, 29)
    return date(year, target.month, target.day)


def _fits(value: Any, spec: FieldSpec) -> bool:
    if spec.type is FieldType.STRING:
        return isinstance(value, str) and (not spec.enum or value in spec.enum)
    if spec.type in (FieldType.NUMBER, FieldType.INTEGER):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return False


@st.composite
def _fields(
    draw: st.DrawFn,
    specs: dict[str, FieldSpec] | Any,
    prefix: str,
    pool: dict[str, list[Any]],
    times: list[datetime],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if draw(st.integers(0, 5)) == 0:
            continue  # missing
        if draw(st.integers(0, 30)) == 0:
            out[name] = draw(st.sampled_from([None, "wrong", 7, True]))  # another JSON type
            continue
        out[name] = draw(_value(spec, f"{prefix}{name}", pool, times))
    return out


def _event_names(expr: ast.Expr) -> list[str]:
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, ast.EventRef):
            names.add(node.name)
        elif isinstance(node, ast.Occurs | ast.Count | ast.Aggregate | ast.Pick):
            visit(node.event)
        elif isinstance(node, ast.Sequence):
            for step in node.steps:
                visit(step)
        elif isinstance(node, ast.And | ast.Or):
            for item in node.items:
                visit(item)
        elif isinstance(node, ast.Not):
            visit(node.item)

    visit(expr)
    return sorted(names)


@st.composite
def people(
    draw: st.DrawFn, schema: Schema, expr: ast.Expr, now: datetime, *, max_people: int = 6
) -> list[Person]:
    """A few profiles whose data is aimed at ``expr``'s literals and window edges."""
    pool = _literal_pool(expr)
    times = moments(expr, now)
    gaps = list(_gaps(expr))
    names = _event_names(expr) or sorted(schema.events)[:2]
    count = draw(st.integers(0, max_people))
    seq = 0
    out: list[Person] = []
    for index in range(count):
        attributes = draw(_fields(dict(schema.attributes), "", pool, times))
        consents = {
            (channel, purpose): draw(st.sampled_from(CONSENT_STATUSES))
            for channel, purpose in (
                ("email", "marketing"),
                ("sms", "marketing"),
                ("email", "news"),
            )
            if draw(st.booleans())
        }
        events: list[Event] = []
        for _ in range(draw(st.integers(0, 8))):
            name = draw(st.sampled_from(names))
            spec: EventSpec | None = schema.events.get(name)
            props = draw(_fields(dict(spec.properties), "", pool, times)) if spec else {}
            if events and gaps and draw(st.booleans()):
                # right after an earlier event, at a sequence's gap or just inside/outside it
                before = draw(st.sampled_from(events)).timestamp
                shift = draw(st.sampled_from(gaps)) + timedelta(
                    seconds=draw(st.sampled_from([-1, 0, 1]))
                )
                moment = before + draw(st.sampled_from([timedelta(0), shift, shift / 2]))
            else:
                moment = draw(st.sampled_from(times))
                if draw(st.booleans()):
                    moment -= timedelta(minutes=draw(st.integers(0, 90)))
            seq += 1
            events.append(Event(name, moment, seq, props))
        out.append(Person(f"p{index}", attributes, consents, tuple(events)))
    return out
