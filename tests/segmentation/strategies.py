"""Random valid audience trees for a schema, for property tests of the language and evaluators.

``audiences(schema)`` draws checked trees (every ``kind`` filled in) of every node type that
:func:`waymark.segmentation.lang.check.check` accepts with ``audiences=AUDIENCE_NAMES``:
``check(tree, schema, audiences=AUDIENCE_NAMES) == tree``. Literals fit the declared types and
enums, windows are possible, sequences put a window only on their first step, and nesting stays
well under the limits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from waymark.model.schemas import FieldSpec, FieldType, Schema
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
    Test,
    Text,
    TextOp,
    Unit,
    Which,
    Window,
    Within,
)
from waymark.segmentation.lang.ast import (
    Sequence as SequenceNode,
)

__all__ = ["AUDIENCE_NAMES", "audiences", "fields", "windows"]

#: The audience names drawn trees refer to with ``in audience``; pass them to ``check``.
AUDIENCE_NAMES: Final = ("vip", "churn risk")

#: The largest amount of each unit within the 3,650-day limit.
_MOST: Final = {
    Unit.MINUTES: 3650 * 1440,
    Unit.HOURS: 3650 * 24,
    Unit.DAYS: 3650,
    Unit.WEEKS: 3650 // 7,
}
_ORDERED: Final = (FieldType.NUMBER, FieldType.INTEGER, FieldType.TIMESTAMP)
_INT64: Final = 2**63 - 1

_texts: Final = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_durations: Final = st.sampled_from(Unit).flatmap(
    lambda unit: st.builds(
        Duration, st.integers(1, 90) | st.integers(1, _MOST[unit]), st.just(unit)
    )
)
_instants: Final = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2100, 12, 31), timezones=st.just(UTC)
)


def _moment_text(moment: datetime, style: int) -> str:
    """An ISO text of ``moment`` (style 0 date only; 1 UTC offset; 2 ``Z``; 3 naive)."""
    if style == 0:
        return moment.date().isoformat()
    if style == 1:
        return moment.isoformat()
    if style == 2:
        return moment.isoformat().replace("+00:00", "Z")
    return moment.replace(tzinfo=None).isoformat()


_moment_texts: Final = st.builds(_moment_text, _instants, st.integers(0, 3))


@st.composite
def _between(draw: st.DrawFn) -> Between:
    """A ``between`` that can hold: absolute bounds in order, relative ones oldest first."""
    shape = draw(st.sampled_from(("absolute", "relative", "mixed")))
    if shape == "absolute":
        first, second = sorted((draw(_instants), draw(_instants)))
        start = At(_moment_text(first, draw(st.integers(0, 3))))
        end = At(_moment_text(second, draw(st.integers(0, 3))))
        return Between(start, end)
    if shape == "relative":
        one, two = draw(_durations), draw(_durations)
        older, newer = sorted((one, two), key=lambda d: d.delta, reverse=True)
        return Between(Ago(older), Ago(newer))
    bounds: list[Bound] = [Ago(draw(_durations)), At(draw(_moment_texts))]
    if draw(st.booleans()):
        bounds.reverse()
    return Between(bounds[0], bounds[1])


def windows() -> SearchStrategy[Window]:
    """Valid windows of every kind."""
    return st.one_of(
        st.builds(Last, _durations),
        st.builds(Next, _durations),
        st.builds(Older, _durations),
        _between(),
    )


def fields(specs: Mapping[str, FieldSpec], prefix: str = "") -> list[tuple[str, FieldSpec]]:
    """Every testable (dotted path, spec) of ``specs``, through declared object properties."""
    out: list[tuple[str, FieldSpec]] = []
    for name, spec in specs.items():
        path = f"{prefix}.{name}" if prefix else name
        out.append((path, spec))
        if spec.type is FieldType.OBJECT and spec.properties is not None:
            out += fields(spec.properties, path)
    return out


def _values(spec: FieldSpec) -> SearchStrategy[Scalar]:
    """Literals of ``spec``'s type (from its enum when it has one)."""
    if spec.enum is not None:
        return st.sampled_from(spec.enum)
    match spec.type:
        case FieldType.STRING:
            return _texts
        case FieldType.NUMBER:
            return st.one_of(
                st.integers(-1000, 1000),
                st.integers(-_INT64 - 1, _INT64),
                st.floats(allow_nan=False, allow_infinity=False),
            )
        case FieldType.INTEGER:
            return st.integers(-_INT64 - 1, _INT64) | st.integers(-1000, 1000).map(float)
        case FieldType.BOOLEAN:
            return st.booleans()
        case FieldType.TIMESTAMP:
            return _moment_texts
    raise AssertionError(f"no literals for {spec.type}")


def _tests(spec: FieldSpec) -> SearchStrategy[Test]:
    """Tests that fit a field of ``spec``."""
    kind = spec.type
    exists = st.builds(Exists, st.booleans())
    if kind in (FieldType.OBJECT, FieldType.ARRAY):
        return exists
    values = _values(spec)
    ops = list(CompareOp) if kind in _ORDERED else [CompareOp.EQ, CompareOp.NE]
    options: list[SearchStrategy[Test]] = [
        exists,
        st.builds(Compare, st.sampled_from(ops), values),
        st.builds(InList, st.lists(values, min_size=1, max_size=4).map(tuple), st.booleans()),
    ]
    if kind is FieldType.STRING:
        options.append(st.builds(Text, st.sampled_from(TextOp), _texts))
    if kind is FieldType.TIMESTAMP:
        options.append(st.builds(Within, windows()))
    if kind in (FieldType.STRING, FieldType.TIMESTAMP):
        options.append(st.builds(Anniversary, st.integers(0, 366)))
    return st.one_of(options)


def _tested(specs: Sequence[tuple[str, FieldSpec]]) -> SearchStrategy[tuple[str, Test, FieldType]]:
    """(path, test, kind) of one of ``specs``."""
    return st.sampled_from(specs).flatmap(
        lambda item: _tests(item[1]).map(lambda test: (item[0], test, item[1].type))
    )


def _filters(specs: Sequence[tuple[str, FieldSpec]], depth: int) -> SearchStrategy[Filter]:
    props = _tested(specs).map(lambda t: Prop(t[0], t[1], t[2]))
    if depth >= 2:
        return props
    inner = st.deferred(lambda: _filters(specs, depth + 1))
    return st.one_of(
        props,
        st.lists(inner, min_size=2, max_size=3).map(lambda items: FilterAnd(tuple(items))),
        st.lists(inner, min_size=2, max_size=3).map(lambda items: FilterOr(tuple(items))),
        inner.map(FilterNot),
    )


class _Drawer:
    """The strategies of one schema."""

    def __init__(self, schema: Schema, names: Sequence[str]) -> None:
        self.schema = schema
        self.names = names
        self.attributes = fields(schema.attributes)
        self.properties = {
            name: [(p, s) for p, s in fields(spec.properties) if p != "timestamp"]
            for name, spec in schema.events.items()
        }

    def event(self, *, windowed: bool = True) -> SearchStrategy[EventRef]:
        return st.sampled_from(sorted(self.properties)).flatmap(
            lambda name: self._event_named(name, windowed=windowed)
        )

    def _event_named(self, name: str, *, windowed: bool = True) -> SearchStrategy[EventRef]:
        specs = self.properties[name]
        where = st.none() | _filters(specs, 0) if specs else st.none()
        window = st.none() | windows() if windowed else st.none()
        return st.builds(EventRef, st.just(name), where, window)

    def conditions(self) -> SearchStrategy[Expr]:
        options: list[SearchStrategy[Expr]] = [
            st.builds(
                Consent,
                st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True),
                st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True),
                st.sampled_from(ConsentStatus),
                st.booleans(),
            )
        ]
        if self.names:
            options.append(st.builds(InAudience, st.sampled_from(self.names)))
        if self.attributes:
            options.append(_tested(self.attributes).map(lambda t: Attr(t[0], t[1], t[2])))
        if self.properties:
            options += [
                st.builds(Occurs, self.event()),
                st.builds(
                    Count,
                    self.event(),
                    st.sampled_from(CompareOp),
                    st.integers(0, 20) | st.integers(0, _INT64),
                ),
                self.sequence(),
                self.pick(),
            ]
        if any(self.numeric(name) for name in self.properties):
            options.append(self.aggregate())
        return st.one_of(options)

    def numeric(self, event: str) -> list[str]:
        kinds = (FieldType.NUMBER, FieldType.INTEGER)
        return [path for path, spec in self.properties[event] if spec.type in kinds]

    def aggregate(self) -> SearchStrategy[Expr]:
        names = sorted(name for name in self.properties if self.numeric(name))

        def build(name: str) -> SearchStrategy[Expr]:
            return st.builds(
                Aggregate,
                st.sampled_from(AggregateFn),
                self._event_named(name),
                st.sampled_from(self.numeric(name)),
                st.sampled_from(CompareOp),
                st.integers(-1000, 1000) | st.floats(allow_nan=False, allow_infinity=False),
            )

        return st.sampled_from(names).flatmap(build)

    def pick(self) -> SearchStrategy[Expr]:
        timestamp = FieldSpec(FieldType.TIMESTAMP)

        def build(name: str) -> SearchStrategy[Expr]:
            paths: list[tuple[str | None, FieldSpec]] = [(None, timestamp)]
            paths += self.properties[name]
            return st.builds(
                lambda which, event, chosen: Pick(which, event, chosen[0], chosen[1], chosen[2]),
                st.sampled_from(Which),
                self._event_named(name),
                st.sampled_from(paths).flatmap(
                    lambda item: _tests(item[1]).map(lambda test: (item[0], test, item[1].type))
                ),
            )

        return st.sampled_from(sorted(self.properties)).flatmap(build)

    def sequence(self) -> SearchStrategy[Expr]:
        return st.builds(
            lambda first, rest, within, absent: SequenceNode((first, *rest), within, absent),
            self.event(),
            st.lists(self.event(windowed=False), min_size=1, max_size=3),
            _durations,
            st.booleans(),
        )

    def expr(self, depth: int) -> SearchStrategy[Expr]:
        leaf = self.conditions()
        if depth <= 0:
            return leaf
        inner = st.deferred(lambda: self.expr(depth - 1))
        return st.one_of(
            leaf,
            st.lists(inner, min_size=2, max_size=3).map(lambda items: And(tuple(items))),
            st.lists(inner, min_size=2, max_size=3).map(lambda items: Or(tuple(items))),
            inner.map(Not),
        )


def audiences(
    schema: Schema, *, names: Sequence[str] = AUDIENCE_NAMES, depth: int = 3
) -> SearchStrategy[Expr]:
    """Checked trees for ``schema`` of every node type, nested up to ``depth`` and/or/not levels.

    ``check(tree, schema, audiences=names) == tree`` for every drawn tree. The schema should
    not declare a name both as an attribute and as an event type (the text would be ambiguous).
    """
    return _Drawer(schema, names).expr(depth)
