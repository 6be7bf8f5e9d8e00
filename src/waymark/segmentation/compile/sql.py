"""Lowering a checked audience AST to one SQL query, through sqlglot expressions.

:func:`compile_sql` returns a sqlglot ``SELECT`` of the ``profile_id`` of every member at ``now``;
:func:`to_sql` renders it for a dialect. No SQL is assembled from strings: every literal is a
sqlglot literal, so names and values from a definition cannot change the query's shape.

The query reads three relations with the state store's and event log's column names:

- ``profiles (workspace_id, id, attributes JSON)``
- ``events (workspace_id, profile_id, name, timestamp, seq, properties JSON)``
- ``consents (workspace_id, profile_id, channel, purpose, status)``

Shape: a CTE of the visible events that any condition reads; one aggregate row per profile for
every count, sum, average, minimum, maximum and occurrence (a ``CASE`` per condition, so one scan
serves them all); a CTE per sequence (self-joins in time order) and per first/last pick (row
numbers); consents as semi-joins; and a final ``WHERE`` over ``profiles`` left-joined to
those. Every condition is made two-valued (``COALESCE(..., FALSE)``) so that ``NOT`` means what
the language says when a value is missing.

Reading JSON values by their declared type differs per engine; :class:`_Json` has a variant for
DuckDB and PostgreSQL (both executed in the tests, with a check of the JSON type so that a value of
another type counts as missing, as in memory) and a generic one for the warehouse dialects.

Pure: sqlglot only, no connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlglot.expressions as exp

from waymark.model.schemas import FieldType
from waymark.segmentation.lang import ast
from waymark.segmentation.lang.ast import (
    Aggregate,
    AggregateFn,
    And,
    Anniversary,
    Attr,
    Compare,
    CompareOp,
    Consent,
    ConsentStatus,
    Count,
    EventRef,
    Exists,
    Expr,
    Filter,
    FilterAnd,
    FilterNot,
    FilterOr,
    InAudience,
    InList,
    Not,
    Occurs,
    Or,
    Pick,
    Prop,
    Sequence,
    Test,
    Text,
    TextOp,
    Which,
    Within,
)

__all__ = ["EXECUTED_DIALECTS", "WAREHOUSE_DIALECTS", "compile_sql", "to_sql"]

#: Dialects whose SQL the tests execute on a real engine.
EXECUTED_DIALECTS = ("duckdb", "postgres")
#: Dialects the SQL is emitted for (and kept as golden files, parsed back by sqlglot).
WAREHOUSE_DIALECTS = ("spark", "trino", "clickhouse", "snowflake", "bigquery")

_TS_TYPE = exp.DataType.build("TIMESTAMPTZ")
_SQL_OPS: dict[CompareOp, type[exp.Binary]] = {
    CompareOp.EQ: exp.EQ,
    CompareOp.NE: exp.NEQ,
    CompareOp.LT: exp.LT,
    CompareOp.LE: exp.LTE,
    CompareOp.GT: exp.GT,
    CompareOp.GE: exp.GTE,
}
_DOUBLE = exp.DataType.build("DOUBLE")
_FALSE = exp.false()


def _lit(value: str | int | float | bool) -> exp.Expr:
    if isinstance(value, bool):
        return exp.true() if value else exp.false()
    if isinstance(value, str):
        return exp.Literal.string(value)
    return exp.Literal.number(repr(float(value)) if isinstance(value, float) else value)


def _moment(value: datetime) -> exp.Expr:
    text = value.astimezone(UTC).isoformat(sep=" ")
    return exp.cast(exp.Literal.string(text), _TS_TYPE)


def _fn(name: str, *args: exp.Expr) -> exp.Expr:
    return exp.Anonymous(this=name, expressions=list(args))


def _two_valued(condition: exp.Expr) -> exp.Expr:
    return exp.func("COALESCE", exp.paren(condition, copy=False), _FALSE)


def _and(parts: list[exp.Expr]) -> exp.Expr:
    if not parts:
        return exp.true()
    return exp.and_(*parts, copy=False) if len(parts) > 1 else parts[0]


class _Json:
    """Typed reads of a JSON column; the generic form for warehouses (no type check)."""

    def text(self, column: exp.Expr, path: str) -> exp.Expr:
        keys = [exp.JSONPathRoot(), *(exp.JSONPathKey(this=k) for k in path.split("."))]
        return exp.JSONExtractScalar(this=column, expression=exp.JSONPath(expressions=keys))

    def value(self, column: exp.Expr, path: str, kind: FieldType) -> exp.Expr:
        text = self.text(column, path)
        if kind is FieldType.STRING:
            return text
        target = {
            FieldType.NUMBER: _DOUBLE,
            FieldType.INTEGER: _DOUBLE,
            FieldType.BOOLEAN: exp.DataType.build("BOOLEAN"),
            FieldType.TIMESTAMP: _TS_TYPE,
        }.get(kind)
        return exp.TryCast(this=text, to=target) if target else text

    def present(self, column: exp.Expr, path: str) -> exp.Expr:
        return exp.Not(this=exp.Is(this=self.text(column, path), expression=exp.null()))


class _DuckJson(_Json):
    """DuckDB: ``json_type`` decides whether the stored value has the declared type."""

    _TYPES: ClassVar[dict[FieldType, Any]] = {
        FieldType.STRING: ("VARCHAR",),
        FieldType.TIMESTAMP: ("VARCHAR",),
        FieldType.NUMBER: ("BIGINT", "UBIGINT", "DOUBLE"),
        FieldType.INTEGER: ("BIGINT", "UBIGINT", "DOUBLE"),
        FieldType.BOOLEAN: ("BOOLEAN",),
    }

    def _path(self, path: str) -> exp.Expr:
        return exp.Literal.string("$." + path)

    def text(self, column: exp.Expr, path: str) -> exp.Expr:
        return _fn("json_extract_string", column.copy(), self._path(path))

    def value(self, column: exp.Expr, path: str, kind: FieldType) -> exp.Expr:
        return self.of_value(_fn("json_extract", column.copy(), self._path(path)), kind)

    def of_value(self, raw: exp.Expr, kind: FieldType) -> exp.Expr:
        """The typed read of a JSON value already extracted (``raw``)."""
        if kind in (FieldType.OBJECT, FieldType.ARRAY):
            return raw
        text = _fn("json_extract_string", raw.copy(), exp.Literal.string("$"))
        if kind is FieldType.TIMESTAMP:  # the stored form's pattern also rules out non-strings
            return _stored_moment(text, exp.TryCast)
        type_ok = exp.In(
            this=_fn("json_type", raw.copy()),
            expressions=[exp.Literal.string(t) for t in self._TYPES[kind]],
        )
        if kind is FieldType.STRING:
            read: exp.Expr = text
        elif kind is FieldType.BOOLEAN:
            read = exp.cast(raw.copy(), "BOOLEAN")
        else:
            read = exp.cast(raw.copy(), _DOUBLE)
        return exp.Case(ifs=[exp.If(this=type_ok, true=read)])

    def present_of(self, raw: exp.Expr) -> exp.Expr:
        """Whether an extracted JSON value is there (and not JSON null)."""
        return exp.NEQ(this=_fn("json_type", raw.copy()), expression=exp.Literal.string("NULL"))

    def present(self, column: exp.Expr, path: str) -> exp.Expr:
        kind = _fn("json_type", _fn("json_extract", column.copy(), self._path(path)))
        return exp.NEQ(this=kind, expression=exp.Literal.string("NULL"))


class _PgJson(_Json):
    """PostgreSQL (JSONB): ``jsonb_typeof`` decides whether the value has the declared type."""

    _TYPES: ClassVar[dict[FieldType, Any]] = {
        FieldType.STRING: "string",
        FieldType.TIMESTAMP: "string",
        FieldType.NUMBER: "number",
        FieldType.INTEGER: "number",
        FieldType.BOOLEAN: "boolean",
    }

    def _keys(self, path: str) -> list[exp.Expr]:
        return [exp.Literal.string(k) for k in path.split(".")]

    def text(self, column: exp.Expr, path: str) -> exp.Expr:
        return _fn("jsonb_extract_path_text", column.copy(), *self._keys(path))

    def value(self, column: exp.Expr, path: str, kind: FieldType) -> exp.Expr:
        raw = _fn("jsonb_extract_path", column.copy(), *self._keys(path))
        if kind in (FieldType.OBJECT, FieldType.ARRAY):
            return raw
        type_ok = exp.EQ(
            this=_fn("jsonb_typeof", raw), expression=exp.Literal.string(self._TYPES[kind])
        )
        text = self.text(column, path)
        if kind is FieldType.TIMESTAMP:
            read = _stored_moment(text, exp.Cast)
        elif kind is FieldType.STRING:
            read = text
        else:
            target = exp.DataType.build("BOOLEAN") if kind is FieldType.BOOLEAN else _DOUBLE
            read = exp.cast(text, target)
        return exp.Case(ifs=[exp.If(this=type_ok, true=read)])

    def present(self, column: exp.Expr, path: str) -> exp.Expr:
        kind = _fn("jsonb_typeof", _fn("jsonb_extract_path", column.copy(), *self._keys(path)))
        return exp.NEQ(this=kind, expression=exp.Literal.string("null"))


def _tried_moment(value: exp.Expr) -> tuple[exp.Expr, exp.Expr] | None:
    """(pattern check, try-cast) of a :func:`_stored_moment` read by a try-cast, else None.
    A test that is false for NULL is the same on the read as on the try-cast where the check
    holds, so the two may be tested in either order."""
    if not isinstance(value, exp.Case) or value.args.get("default") is not None:
        return None
    ifs = value.args.get("ifs") or []
    if len(ifs) != 1:
        return None
    form, read = ifs[0].this, ifs[0].args.get("true")
    if isinstance(form, exp.RegexpLike) and isinstance(read, exp.TryCast):
        return form, read
    return None


def _stored_moment(text: exp.Expr, cast: type[exp.Cast]) -> exp.Expr:
    """``text`` as a timestamp when it has the stored form (:data:`ast.STORED_MOMENT`) and
    names a real day, else NULL. PostgreSQL cannot try a cast, so both are checked first (the
    pattern leaves only the day of the month to check against its month's length)."""
    form = exp.RegexpLike(this=text.copy(), expression=exp.Literal.string(ast.STORED_MOMENT))

    def number(start: int, length: int) -> exp.Expr:
        piece = exp.Substring(this=text.copy(), start=_int(start), length=_int(length))
        return exp.cast(piece, "INT")

    read: exp.Expr = cast(this=text.copy(), to=_TS_TYPE)
    if cast is not exp.TryCast:  # a try-cast already gives NULL for a day that is not real
        year, month, day = number(1, 4), number(6, 2), number(9, 2)
        real = exp.LTE(this=day, expression=_days_in_month(month, year))
        read = exp.Case(ifs=[exp.If(this=real, true=read)])
    return exp.Case(ifs=[exp.If(this=form, true=read)])


def _days_in_month(month: exp.Expr, year: exp.Expr) -> exp.Expr:
    return exp.Case(
        ifs=[
            exp.If(
                this=exp.EQ(this=month.copy(), expression=_int(2)),
                true=exp.Case(ifs=[exp.If(this=_is_leap(year), true=_int(29))], default=_int(28)),
            ),
            exp.If(
                this=exp.In(this=month.copy(), expressions=[_int(4), _int(6), _int(9), _int(11)]),
                true=_int(30),
            ),
        ],
        default=_int(31),
    )


def _int(value: int) -> exp.Expr:
    return exp.Literal.number(value)


def _is_leap(year: exp.Expr) -> exp.Expr:
    def divisible(n: int) -> exp.Expr:
        return exp.EQ(this=exp.Mod(this=year.copy(), expression=_int(n)), expression=_int(0))

    return exp.paren(exp.or_(exp.and_(divisible(4), exp.Not(this=divisible(100))), divisible(400)))


def _json_for(dialect: str) -> _Json:
    if dialect == "duckdb":
        return _DuckJson()
    if dialect == "postgres":
        return _PgJson()
    return _Json()


def _ends_with(dialect: str, value: exp.Expr, suffix: str) -> exp.Expr:
    if dialect == "duckdb":
        return _fn("ends_with", value, exp.Literal.string(suffix))
    if not suffix:
        return exp.Not(this=exp.Is(this=value, expression=exp.null()))
    right = exp.Right(this=value, expression=exp.Literal.number(len(suffix)))
    return exp.EQ(this=right, expression=exp.Literal.string(suffix))


def _make_date(dialect: str, y: exp.Expr, m: exp.Expr, d: exp.Expr) -> exp.Expr:
    if dialect in ("duckdb", "postgres", "spark"):
        return _fn("make_date", y, m, d)
    return exp.DateFromParts(year=y, month=m, day=d)


@dataclass
class _Parts:
    """What the final query joins: aggregate columns, sequence and pick CTEs, consent columns."""

    event_names: set[str] = field(default_factory=set)
    aggregates: dict[object, tuple[str, exp.Expr]] = field(default_factory=dict)
    ctes: list[tuple[str, exp.Select]] = field(default_factory=list)
    cte_keys: dict[object, str] = field(default_factory=dict)
    zone_in_events: bool = False
    zones: bool = False
    #: DuckDB: the attribute paths read (one multi-path extraction per profile, in ``pj``)
    attribute_paths: list[str] = field(default_factory=list)
    #: per event name, the oldest moment an event can matter from (None: any age matters)
    floors: dict[str, datetime | None] = field(default_factory=dict)


class _Compiler:
    def __init__(
        self,
        *,
        workspace_id: str,
        now: datetime,
        dialect: str,
        sample_percent: int | None = None,
        state_scoped: bool = False,
    ) -> None:
        if now.tzinfo is None:
            raise ValueError("now must be an aware datetime")
        if sample_percent is not None and dialect not in EXECUTED_DIALECTS:
            raise ValueError(f"sampling is only compiled for {', '.join(EXECUTED_DIALECTS)}")
        self.sample_percent = sample_percent
        self.workspace_id = workspace_id
        self.state_scoped = state_scoped
        self.now = now
        self.dialect = dialect
        self.json = _json_for(dialect)
        self.parts = _Parts()

    # -- values and tests ------------------------------------------------------------------

    def _slot(self, path: str) -> exp.Expr:
        """DuckDB: the attribute's JSON value from one parse of the document per profile
        (a multi-path extraction in the ``pj`` CTE)."""
        paths = self.parts.attribute_paths
        if path not in paths:
            paths.append(path)
        # sqlglot's indices are 0-based; it writes DuckDB's 1-based index
        index = exp.Literal.number(paths.index(path))
        return exp.Bracket(this=exp.column("js", "p"), expressions=[index])

    def _attribute(self, path: str, kind: FieldType | None) -> exp.Expr:
        """An attribute of the profile ``p`` read as ``kind`` (None: whether it is there)."""
        if not isinstance(self.json, _DuckJson):
            attrs = exp.column("attributes", "p")
            if kind is None:
                return self.json.present(attrs, path)
            return self.json.value(attrs, path, kind)
        # read where it is tested (not in a projection of every profile): a filter's later
        # conditions are evaluated only for the rows its earlier ones kept
        raw = self._slot(path)
        return self.json.present_of(raw) if kind is None else self.json.of_value(raw, kind)

    def _fold(self, value: exp.Expr) -> exp.Expr:
        return _fn("translate", value, exp.Literal.string(ast.UPPER), exp.Literal.string(ast.LOWER))

    def _span(self, value: exp.Expr, window: ast.Window) -> exp.Expr:
        span = ast.resolve(window, self.now)
        if span.lo is not None and span.hi is not None and not span.hi_open:
            # one BETWEEN: an expensive value (a stored moment's pattern check) is read once
            return exp.Between(this=value.copy(), low=_moment(span.lo), high=_moment(span.hi))
        parts: list[exp.Expr] = []
        if span.lo is not None:
            parts.append(exp.GTE(this=value.copy(), expression=_moment(span.lo)))
        if span.hi is not None:
            cls = exp.LT if span.hi_open else exp.LTE
            parts.append(cls(this=value.copy(), expression=_moment(span.hi)))
        return _and(parts)

    def _literal(self, value: ast.Scalar, kind: FieldType) -> exp.Expr:
        converted = ast.literal_value(value, kind)
        if isinstance(converted, datetime):
            return _moment(converted)
        return _lit(converted)

    def _zone(self, tz: exp.Expr) -> exp.Expr:
        """The profile's zone if the engine knows it, else UTC (as in memory). The engine's
        zone names are read once per query, into the ``zones`` CTE."""
        utc = exp.Literal.string("UTC")
        if self.dialect not in EXECUTED_DIALECTS:
            return exp.func("COALESCE", tz.copy(), utc)
        self.parts.zones = True
        known = exp.In(this=tz.copy(), query=exp.Subquery(this=exp.select("name").from_("zones")))
        return exp.Case(ifs=[exp.If(this=known, true=tz.copy())], default=utc)

    def _fenced(self, query: exp.Select) -> exp.Select:
        """``query`` kept as its own step: PostgreSQL would otherwise pull a subquery up into
        its parent, writing each of its expressions out again wherever a column is used."""
        return query.offset(0) if self.dialect == "postgres" else query

    def _date_of_text(self, value: exp.Expr) -> exp.Expr:
        """A string's leading ``YYYY-MM-DD`` as a DATE, NULL if it is not a real day.

        Checked by pattern and arithmetic before the date is built (PostgreSQL's casts cannot
        fail softly), in layers of a scalar subquery so that each part is written once.
        """
        s, y, m, d = (exp.column(n) for n in ("s", "y", "m", "d"))
        form = exp.RegexpLike(this=s.copy(), expression=exp.Literal.string(ast.STORED_DATE))

        def number(start: int, length: int) -> exp.Expr:
            piece = exp.Substring(this=s.copy(), start=_int(start), length=_int(length))
            return exp.Case(ifs=[exp.If(this=form.copy(), true=exp.cast(piece, "INT"))])

        parts = exp.select(
            exp.alias_(number(1, 4), "y"),
            exp.alias_(number(6, 2), "m"),
            exp.alias_(number(9, 2), "d"),
        ).from_(self._fenced(exp.select(exp.alias_(value, "s"))).subquery("txt"))
        days_in_month = _days_in_month(m, y)
        real = exp.and_(
            exp.GTE(this=y.copy(), expression=_int(1)),
            exp.Between(this=m.copy(), low=_int(1), high=_int(12)),
        )
        # nested CASEs: the day is compared with its month's length only for a real month
        built = exp.Case(
            ifs=[
                exp.If(
                    this=real,
                    true=exp.Case(
                        ifs=[
                            exp.If(
                                this=exp.Between(this=d.copy(), low=_int(1), high=days_in_month),
                                true=_make_date(self.dialect, y.copy(), m.copy(), d.copy()),
                            )
                        ]
                    ),
                )
            ]
        )
        return exp.Subquery(this=exp.select(built).from_(parts.subquery("ymd")))

    def _anniversary(self, value: exp.Expr, kind: FieldType, days: int, tz: exp.Expr) -> exp.Expr:
        """Whether the date of ``value`` has its anniversary today or in the next ``days``
        days in the zone ``tz``: one scalar subquery, each step a layer (written once)."""
        if kind is FieldType.TIMESTAMP:
            day: exp.Expr = exp.cast(
                exp.AtTimeZone(this=value, zone=exp.Literal.string("UTC")), "DATE"
            )
        else:
            day = self._date_of_text(value)
        today = exp.cast(exp.AtTimeZone(this=_moment(self.now), zone=self._zone(tz)), "DATE")
        b, t, y, m, d, c0, c1 = (exp.column(n) for n in ("b", "t", "y", "m", "d", "c0", "c1"))

        def part(unit: str, of: exp.Expr) -> exp.Expr:
            return exp.cast(exp.Extract(this=exp.var(unit), expression=of.copy()), "INT")

        def on_year(year: exp.Expr) -> exp.Expr:
            feb29 = exp.and_(
                exp.EQ(this=m.copy(), expression=_int(2)),
                exp.EQ(this=d.copy(), expression=_int(29)),
                exp.Not(this=_is_leap(year)),
            )
            dom = exp.Case(ifs=[exp.If(this=feb29, true=_int(28))], default=d.copy())
            return _make_date(self.dialect, year.copy(), m.copy(), dom)

        inputs = exp.select(exp.alias_(day, "b"), exp.alias_(today, "t"))
        split = exp.select(
            "t",
            exp.alias_(part("YEAR", t), "y"),
            exp.alias_(part("MONTH", b), "m"),
            exp.alias_(part("DAY", b), "d"),
        ).from_(self._fenced(inputs).subquery("dates"))
        candidates = exp.select(
            "t",
            exp.alias_(on_year(y), "c0"),
            exp.alias_(on_year(exp.Add(this=y.copy(), expression=_int(1))), "c1"),
        ).from_(
            split.where(exp.Not(this=exp.Is(this=b.copy(), expression=exp.null()))).subquery(
                "parts"
            )
        )
        upcoming = exp.Case(
            ifs=[exp.If(this=exp.GTE(this=c0.copy(), expression=t.copy()), true=c0.copy())],
            default=c1.copy(),
        )
        last_day = exp.DateAdd(this=t.copy(), expression=_int(days), unit=exp.var("DAY"))
        verdict = exp.LTE(this=upcoming, expression=last_day)
        return exp.Subquery(this=exp.select(verdict).from_(candidates.subquery("next")))

    def _test(
        self,
        test: Test,
        value: exp.Expr,
        kind: FieldType,
        *,
        present: Callable[[], exp.Expr],
        tz: exp.Expr | None = None,
    ) -> exp.Expr:
        """The two-valued SQL of ``test`` on a typed value (NULL when missing)."""
        if isinstance(test, Exists):
            has = (
                present()
                if kind in (FieldType.OBJECT, FieldType.ARRAY)
                else exp.Not(this=exp.Is(this=value, expression=exp.null()))
            )
            has = _two_valued(has)
            return has if test.present else exp.Not(this=has)
        if isinstance(test, Compare):
            return _two_valued(
                _SQL_OPS[test.op](this=value, expression=self._literal(test.value, kind))
            )
        if isinstance(test, InList):
            inside = exp.In(this=value, expressions=[self._literal(v, kind) for v in test.values])
            return _two_valued(exp.Not(this=inside) if test.negated else inside)
        if isinstance(test, Text):
            folded, needle = self._fold(value), ast.fold(test.value)
            if test.op is TextOp.STARTS_WITH:
                cond: exp.Expr = exp.func("STARTS_WITH", folded, exp.Literal.string(needle))
            elif test.op is TextOp.ENDS_WITH:
                cond = _ends_with(self.dialect, folded, needle)
            else:
                cond = exp.GT(
                    this=exp.StrPosition(this=folded, substr=exp.Literal.string(needle)),
                    expression=exp.Literal.number(0),
                )
            return _two_valued(cond)
        if isinstance(test, Within):
            guarded = _tried_moment(value)
            if guarded is not None:
                # the window on the try-cast first; the stored form's pattern, the costly part,
                # only for the values inside it (a CASE evaluates its THEN for those rows only)
                form, read = guarded
                chosen = exp.If(this=self._span(read, test.window), true=form.copy())
                return _two_valued(exp.Case(ifs=[chosen], default=_FALSE.copy()))
            return _two_valued(self._span(value, test.window))
        if isinstance(test, Anniversary):
            return _two_valued(
                self._anniversary(
                    value, kind, test.days, tz or self._attribute("timezone", FieldType.STRING)
                )
            )
        raise TypeError(f"not a test: {test!r}")

    # -- events ------------------------------------------------------------------------------

    def _filter(self, node: Filter, props: exp.Expr, zone: exp.Expr) -> exp.Expr:
        if isinstance(node, FilterAnd):
            return exp.and_(*(self._filter(i, props, zone) for i in node.items))
        if isinstance(node, FilterOr):
            return exp.paren(exp.or_(*(self._filter(i, props, zone) for i in node.items)))
        if isinstance(node, FilterNot):
            return exp.Not(this=exp.paren(self._filter(node.item, props, zone)))
        kind = _kind(node)
        value = self.json.value(props, node.path, kind)
        if isinstance(node.test, Anniversary):
            self.parts.zone_in_events = True  # the events CTE then carries the profile's zone
        return self._test(
            node.test, value, kind, present=lambda: self.json.present(props, node.path), tz=zone
        )

    def _floor(self, name: str, floor: datetime | None) -> None:
        """Note that events of ``name`` older than ``floor`` cannot matter (None: any may)."""
        if name in self.parts.floors:
            known = self.parts.floors[name]
            floor = None if known is None or floor is None else min(known, floor)
        self.parts.floors[name] = floor

    def _match(
        self, ref: EventRef, alias: str | None = None, *, after: datetime | None = None
    ) -> exp.Expr:
        """Whether an event row (of ``alias``, or unqualified) matches ``ref``; ``after`` is a
        moment every matching event is known to follow (a later step of a sequence follows
        its first step)."""
        self.parts.event_names.add(ref.name)
        self._floor(ref.name, ast.resolve(ref.window, self.now).lo if ref.window else after)
        col = (lambda c: exp.column(c, alias)) if alias else exp.column
        parts: list[exp.Expr] = [exp.EQ(this=col("name"), expression=exp.Literal.string(ref.name))]
        if ref.window is not None:
            parts.append(self._span(col("ts"), ref.window))
        if ref.where is not None:
            parts.append(self._filter(ref.where, col("properties"), col("zone")))
        return _and(parts)

    def _aggregate_column(self, key: object, make: Callable[[], exp.Expr]) -> exp.Expr:
        if key not in self.parts.aggregates:
            self.parts.aggregates[key] = (f"a{len(self.parts.aggregates)}", make())
        return exp.column(self.parts.aggregates[key][0], "agg")

    def _count(self, ref: EventRef) -> exp.Expr:
        def make() -> exp.Expr:
            case = exp.Case(
                ifs=[exp.If(this=self._match(ref), true=exp.Literal.number(1))],
                default=exp.Literal.number(0),
            )
            return exp.Sum(this=case)

        return exp.func(
            "COALESCE", self._aggregate_column(("count", ref), make), exp.Literal.number(0)
        )

    def _aggregate(self, node: Aggregate) -> exp.Expr:
        def make() -> exp.Expr:
            number = self.json.value(exp.column("properties"), node.path, FieldType.NUMBER)
            case = exp.Case(ifs=[exp.If(this=self._match(node.event), true=number)])
            if node.fn is AggregateFn.AVG and self.dialect == "postgres":
                # PostgreSQL's avg(float8) also sums squares, which overflow past 1e154
                count = exp.func("NULLIF", exp.Count(this=case.copy()), _int(0))
                return exp.Div(this=exp.Sum(this=case), expression=count)
            fn = {
                AggregateFn.SUM: exp.Sum,
                AggregateFn.AVG: exp.Avg,
                AggregateFn.MIN: exp.Min,
                AggregateFn.MAX: exp.Max,
            }[node.fn]
            return fn(this=case)

        column = self._aggregate_column(("agg", node.fn, node.event, node.path), make)
        if node.fn is AggregateFn.SUM:
            column = exp.func("COALESCE", column, exp.Literal.number(0))
        return _two_valued(_SQL_OPS[node.op](this=column, expression=_lit(float(node.value))))

    def _cte(self, key: object, build: Callable[[str], exp.Select]) -> str:
        name = self.parts.cte_keys.get(key)
        if name is None:
            name = f"c{len(self.parts.ctes)}"
            self.parts.cte_keys[key] = name
            self.parts.ctes.append((name, build(name)))
        return name

    def _pick(self, node: Pick) -> exp.Expr:
        kind = _kind(node)

        def build(_name: str) -> exp.Select:
            if node.path is None:
                value: exp.Expr = exp.column("ts")
            else:
                value = self.json.value(exp.column("properties"), node.path, kind)
            direction = node.which is Which.LAST
            order = exp.Order(
                expressions=[
                    exp.Ordered(this=exp.column("ts"), desc=direction),
                    exp.Ordered(this=exp.column("seq"), desc=direction),
                ]
            )
            rank = exp.Window(
                this=exp.RowNumber(), partition_by=[exp.column("profile_id")], order=order
            )
            inner = (
                exp.select(
                    exp.column("profile_id"), exp.alias_(value, "val"), exp.alias_(rank, "rn")
                )
                .from_("ev")
                .where(self._match(node.event))
            )
            return (
                exp.select("profile_id", "val")
                .from_(inner.subquery("ranked"))
                .where(exp.EQ(this=exp.column("rn"), expression=exp.Literal.number(1)))
            )

        name = self._cte(("pick", node), build)
        value = exp.column("val", name)
        found = exp.Not(this=exp.Is(this=exp.column("profile_id", name), expression=exp.null()))
        present = lambda: exp.Not(this=exp.Is(this=value.copy(), expression=exp.null()))  # noqa: E731
        return exp.and_(found, self._test(node.test, value, kind, present=present))

    def _after(self, later: str, earlier: str) -> exp.Expr:
        """``later`` comes strictly after ``earlier`` in (timestamp, seq) order."""
        ts_l, ts_e = exp.column("ts", later), exp.column("ts", earlier)
        return exp.paren(
            exp.or_(
                exp.GT(this=ts_l, expression=ts_e),
                exp.and_(
                    exp.EQ(this=ts_l.copy(), expression=ts_e.copy()),
                    exp.GT(this=exp.column("seq", later), expression=exp.column("seq", earlier)),
                ),
            )
        )

    def _deadline(self, first: str, seconds: int) -> exp.Expr:
        interval = exp.Interval(this=exp.Literal.string(str(seconds)), unit=exp.var("SECOND"))
        return exp.Add(this=exp.column("ts", first), expression=interval)

    def _sequence(self, node: Sequence) -> exp.Expr:
        seconds = int(node.within.delta.total_seconds())
        positive = node.steps[:-1] if node.absent_last else node.steps

        first = positive[0].window
        after = ast.resolve(first, self.now).lo if first is not None else None

        def build(_name: str) -> exp.Select:
            aliases = [f"s{i}" for i in range(len(positive))]
            query = (
                exp.select(exp.column("profile_id", aliases[0]))
                .distinct()
                .from_(exp.alias_(exp.to_table("ev"), aliases[0], table=True))
            )
            conditions = [self._match(positive[0], aliases[0])]
            for i in range(1, len(positive)):
                a, prev = aliases[i], aliases[i - 1]
                on = exp.and_(
                    exp.EQ(
                        this=exp.column("profile_id", a),
                        expression=exp.column("profile_id", aliases[0]),
                    ),
                    self._after(a, prev),
                    exp.LTE(
                        this=exp.column("ts", a), expression=self._deadline(aliases[0], seconds)
                    ),
                )
                query = query.join(exp.alias_(exp.to_table("ev"), a, table=True), on=on)
                conditions.append(self._match(positive[i], a, after=after))
            if node.absent_last:
                conditions.append(
                    exp.LTE(this=self._deadline(aliases[0], seconds), expression=_moment(self.now))
                )
                later = (
                    exp.select(exp.Literal.number(1))
                    .from_(exp.alias_(exp.to_table("ev"), "n", table=True))
                    .where(
                        exp.and_(
                            exp.EQ(
                                this=exp.column("profile_id", "n"),
                                expression=exp.column("profile_id", aliases[0]),
                            ),
                            self._match(node.steps[-1], "n", after=after),
                            self._after("n", aliases[-1]),
                            exp.LTE(
                                this=exp.column("ts", "n"),
                                expression=self._deadline(aliases[0], seconds),
                            ),
                        )
                    )
                )
                conditions.append(exp.Not(this=exp.Exists(this=later)))
            return query.where(_and(conditions))

        name = self._cte(("sequence", node), build)
        return exp.Not(this=exp.Is(this=exp.column("profile_id", name), expression=exp.null()))

    def _consent(self, node: Consent) -> exp.Expr:
        """A semi-join on the consent records: ``unknown`` is having no record stating
        opted in or out (as in memory, where a missing record reads ``unknown``)."""
        if node.status is ConsentStatus.UNKNOWN:
            known = [ConsentStatus.OPTED_IN, ConsentStatus.OPTED_OUT]
            has, negate = known, not node.negated
        else:
            has, negate = [node.status], node.negated
        records = (
            exp.select("profile_id")
            .from_("consents")
            .where(
                exp.and_(
                    self._workspace(state=True),
                    exp.EQ(this=exp.column("channel"), expression=exp.Literal.string(node.channel)),
                    exp.EQ(this=exp.column("purpose"), expression=exp.Literal.string(node.purpose)),
                    exp.In(
                        this=exp.column("status"),
                        expressions=[exp.Literal.string(s.value) for s in has],
                    ),
                )
            )
        )
        inside = exp.In(this=exp.column("id", "p"), query=exp.Subquery(this=records))
        return exp.Not(this=inside) if negate else inside

    # -- conditions ----------------------------------------------------------------------------

    def condition(self, node: Expr) -> exp.Expr:
        if isinstance(node, And):
            return exp.paren(exp.and_(*(self.condition(i) for i in node.items)))
        if isinstance(node, Or):
            return exp.paren(exp.or_(*(self.condition(i) for i in node.items)))
        if isinstance(node, Not):
            return exp.Not(this=exp.paren(self.condition(node.item)))
        if isinstance(node, Attr):
            kind = _kind(node)
            value = self._attribute(node.path, kind)
            return self._test(
                node.test, value, kind, present=lambda: self._attribute(node.path, None)
            )
        if isinstance(node, Occurs):
            return exp.GT(this=self._count(node.event), expression=exp.Literal.number(0))
        if isinstance(node, Count):
            return _SQL_OPS[node.op](
                this=self._count(node.event), expression=exp.Literal.number(node.value)
            )
        if isinstance(node, Aggregate):
            return self._aggregate(node)
        if isinstance(node, Pick):
            return self._pick(node)
        if isinstance(node, Sequence):
            return self._sequence(node)
        if isinstance(node, Consent):
            return self._consent(node)
        if isinstance(node, InAudience):
            raise ValueError(f"expand audience references before compiling: {node.name!r}")
        raise TypeError(f"not a condition: {node!r}")

    # -- the query -------------------------------------------------------------------------------

    def _floors(self) -> list[exp.Expr]:
        """Filters of the events scan from the windows: events too old for every condition
        that reads their name are not read (a bound the engine can check against its zone
        maps, then one per name)."""
        floors = self.parts.floors
        if not floors or all(f is None for f in floors.values()):
            return []
        stamp = exp.column("timestamp", quoted=True)
        found: list[exp.Expr] = []
        if all(f is not None for f in floors.values()):
            oldest = min(f for f in floors.values() if f is not None)
            found.append(exp.GTE(this=stamp, expression=_moment(oldest)))
            if len(set(floors.values())) == 1:
                return found
        per_name = []
        for name, floor in sorted(floors.items()):
            is_name = exp.EQ(this=exp.column("name"), expression=exp.Literal.string(name))
            per_name.append(
                is_name
                if floor is None
                else exp.and_(is_name, exp.GTE(this=stamp.copy(), expression=_moment(floor)))
            )
        found.append(exp.paren(exp.or_(*per_name)))
        return found

    def _workspace(
        self, alias: str | None = None, *, sampled: str | None = None, state: bool = False
    ) -> exp.Expr:
        """This workspace's rows (and, when sampling, only the sampled profiles: ``sampled``
        names the profile id column). ``state``: of ``profiles`` or ``consents``, which need
        no test when the caller said they hold this workspace's rows only."""
        same: exp.Expr = exp.EQ(
            this=exp.column("workspace_id", alias) if alias else exp.column("workspace_id"),
            expression=exp.Literal.string(self.workspace_id),
        )
        if state and self.state_scoped:
            same = exp.true()
        if self.sample_percent is None or sampled is None:
            return same
        column = exp.column(sampled, alias) if alias else exp.column(sampled)
        if self.dialect == "duckdb":
            bucket: exp.Expr = exp.Mod(this=_fn("hash", column), expression=exp.Literal.number(100))
        else:  # hashtext is a 32-bit signed integer: shift it to be non-negative
            shifted = exp.Add(
                this=exp.cast(_fn("hashtext", column), "BIGINT"),
                expression=exp.Literal.number(2**31),
            )
            bucket = exp.Mod(this=exp.paren(shifted), expression=exp.Literal.number(100))
        return exp.and_(
            same, exp.LT(this=bucket, expression=exp.Literal.number(self.sample_percent))
        )

    def query(self, node: Expr) -> exp.Select:
        where = self.condition(node)
        parts = self.parts
        ctes: list[tuple[str, exp.Select]] = []
        if parts.event_names:
            columns: list[exp.Expr] = [
                exp.column("profile_id"),
                exp.column("name"),
                exp.alias_(exp.column("timestamp", quoted=True), "ts"),
                exp.column("seq"),
                exp.column("properties"),
            ]
            if parts.zone_in_events:  # an anniversary of an event property: the profile's zone
                zone = self.json.value(exp.column("attributes", "p"), "timezone", FieldType.STRING)
                lookup = (
                    exp.select(zone)
                    .from_(exp.alias_(exp.to_table("profiles"), "p", table=True))
                    .where(
                        exp.and_(
                            self._workspace("p", state=True),
                            exp.EQ(
                                this=exp.column("id", "p"),
                                expression=exp.column("profile_id", "events"),
                            ),
                        )
                    )
                )
                columns.append(exp.alias_(exp.Subquery(this=lookup), "zone"))
            events = (
                exp.select(*columns)
                .from_("events")
                .where(
                    exp.and_(
                        self._workspace(sampled="profile_id"),
                        exp.LTE(
                            this=exp.column("timestamp", quoted=True), expression=_moment(self.now)
                        ),
                        exp.In(
                            this=exp.column("name"),
                            expressions=[exp.Literal.string(n) for n in sorted(parts.event_names)],
                        ),
                        *self._floors(),
                    )
                )
            )
            ctes.append(("ev", events))
        if parts.aggregates:
            columns = [exp.alias_(e, name) for name, e in parts.aggregates.values()]
            ctes.append(
                ("agg", exp.select("profile_id", *columns).from_("ev").group_by("profile_id"))
            )
        if parts.zones:
            source: exp.Expr = (
                _fn("pg_timezone_names")
                if self.dialect == "duckdb"
                else exp.to_table("pg_timezone_names")
            )
            ctes.insert(0, ("zones", exp.select("name").from_(source)))  # before its readers
        ctes.extend(parts.ctes)
        profiles: exp.Expr = exp.to_table("profiles")
        if parts.attribute_paths:  # DuckDB: each profile's document parsed once
            paths = exp.Array(
                expressions=[exp.Literal.string("$." + path) for path in parts.attribute_paths]
            )
            parsed = (
                exp.select(
                    "workspace_id",
                    "id",
                    exp.alias_(_fn("json_extract", exp.column("attributes"), paths), "js"),
                )
                .from_("profiles")
                .where(self._workspace(sampled="id", state=True))
            )
            ctes.append(("pj", parsed))
            profiles = exp.to_table("pj")
        select = exp.select(exp.alias_(exp.column("id", "p"), "profile_id")).from_(
            exp.alias_(profiles, "p", table=True)
        )
        joined = (
            ["agg", *(name for name, _ in parts.ctes)]
            if parts.aggregates
            else [n for n, _ in parts.ctes]
        )
        inner = _needs_aggregate_row(node)
        for name in joined:
            select = select.join(
                name,
                on=exp.EQ(this=exp.column("profile_id", name), expression=exp.column("id", "p")),
                # a profile without an aggregate row cannot be a member: let the engine start
                # from the (few) aggregate rows instead of every profile
                join_type="INNER" if name == "agg" and inner else "LEFT",
            )
        select = select.where(exp.and_(self._workspace("p", sampled="id", state=True), where))
        for name, cte in ctes:
            # PostgreSQL inlines a CTE used once; the zone list is read once all the same
            select = select.with_(name, as_=cte, materialized=True if name == "zones" else None)
        return select


def _needs_aggregate_row(node: Expr) -> bool:
    """Whether ``node`` is false for every profile with no row in ``agg`` (no visible event
    of the names it reads): then ``agg`` can be inner-joined. Conservative: False when unsure."""
    if isinstance(node, Occurs):
        return True
    if isinstance(node, Count):
        return not ast.COMPARE[node.op](0, node.value)
    if isinstance(node, Aggregate):
        return node.fn is not AggregateFn.SUM or not ast.COMPARE[node.op](0.0, float(node.value))
    if isinstance(node, And):
        return any(_needs_aggregate_row(item) for item in node.items)
    if isinstance(node, Or):
        return all(_needs_aggregate_row(item) for item in node.items)
    return False  # attributes, consents, picks and sequences are not read from agg; Not flips


def _kind(node: Attr | Prop | Pick) -> FieldType:
    if node.kind is None:
        raise ValueError(f"check the audience before compiling it: no type for {node!r}")
    return node.kind


def compile_sql(
    expr: Expr,
    *,
    workspace_id: str,
    now: datetime,
    dialect: str = "duckdb",
    sample_percent: int | None = None,
    state_scoped: bool = False,
) -> exp.Select:
    """The members of ``expr`` at ``now``, as one ``SELECT profile_id`` for ``dialect``.

    ``expr`` must be checked (types filled) and expanded (no ``in audience``). With
    ``sample_percent`` only profiles whose id hashes into that share of 100 buckets are read
    (the same profiles every time: size estimates). ``state_scoped``: the caller promises
    that ``profiles`` and ``consents`` hold this workspace's rows only (the embedded log's
    per-workspace snapshots), so they are not filtered again; ``events`` always is.
    """
    return _Compiler(
        workspace_id=workspace_id,
        now=now,
        dialect=dialect,
        sample_percent=sample_percent,
        state_scoped=state_scoped,
    ).query(expr)


def to_sql(
    expr: Expr, *, workspace_id: str, now: datetime, dialect: str = "duckdb", pretty: bool = False
) -> str:
    """:func:`compile_sql` rendered as text for ``dialect``."""
    return compile_sql(expr, workspace_id=workspace_id, now=now, dialect=dialect).sql(
        dialect=dialect, pretty=pretty
    )
