"""The in-memory evaluator: a checked audience tree, evaluated for one profile at one instant.

This is the decision path (edge decisions, journey branches), so a tree is compiled once into
nested closures (:func:`compile_memory`) and a profile is prepared once per instant
(:class:`PreparedProfile`: visible events only, ordered by (timestamp, sequence), grouped by
name), after which every audience reads the same indexes. :func:`evaluate` does both at once.

The meaning is the one written down in ``docs/audiences.md``; the value, window, folding and
anniversary rules come from the shared helpers of :mod:`waymark.segmentation.lang.ast`. Logic is
two-valued: a test of a missing value is false (except ``is missing``) and ``not`` of a false
test is true.

The tree must be checked (every ``kind`` filled in, no ``in audience``); anything else raises
``ValueError`` when it is compiled.

Pure: no I/O, no clock (``now`` is always an argument).
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from operator import attrgetter
from typing import Any, Final, TypeAlias

from waymark.model.schemas import FieldType
from waymark.segmentation.lang.ast import (
    COMPARE,
    Aggregate,
    AggregateFn,
    And,
    Anniversary,
    Attr,
    CompareOp,
    Consent,
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
    Scalar,
    Sequence,
    Test,
    Text,
    TextOp,
    Which,
    Window,
    Within,
    calendar_date,
    fold,
    literal_value,
    local_today,
    next_anniversary,
    read_number,
    reader,
    resolve,
)
from waymark.segmentation.lang.ast import Compare as CompareTest

__all__ = [
    "CompiledAudience",
    "MemoryEvent",
    "PreparedProfile",
    "ProfileData",
    "compile_memory",
    "evaluate",
]


@dataclass(frozen=True, slots=True)
class MemoryEvent:
    """One event of the profile's log: ``timestamp`` is aware UTC, ``seq`` its log sequence
    number (the tie-break after the timestamp), ``properties`` its JSON-decoded properties."""

    name: str
    timestamp: datetime
    seq: int
    properties: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ProfileData:
    """What an audience can read of one profile.

    ``attributes`` are JSON-decoded (``attributes["timezone"]``, when a string, is the IANA zone
    of anniversaries); ``events`` may come in any order; ``consents`` maps (channel, purpose) to
    ``"opted_in"`` or ``"opted_out"`` (absent: ``"unknown"``).
    """

    attributes: Mapping[str, Any]
    events: Seq[MemoryEvent]
    consents: Mapping[tuple[str, str], str]


_KEY: Final = attrgetter("timestamp", "seq")

#: (timestamp, seq): the total order of events.
Key: TypeAlias = tuple[datetime, int]


class _Index:
    """The visible events of one name, ordered by (timestamp, seq), with their timestamps and
    (built on first use) their keys."""

    __slots__ = ("_keys", "_numbers", "events", "stamps")

    def __init__(self, events: list[MemoryEvent]) -> None:
        self.events = sorted(events, key=_KEY)
        self.stamps = [event.timestamp for event in self.events]
        self._keys: list[Key] | None = None
        self._numbers: dict[str, list[float | None]] = {}

    def numbers(self, path: str, get: Callable[[Mapping[str, Any]], Any]) -> list[float | None]:
        """One property of every event read as a number (None where it is not one), aligned
        with ``events``: read once per profile, however many audiences aggregate it."""
        column = self._numbers.get(path)
        if column is None:
            column = [read_number(get(event.properties)) for event in self.events]
            self._numbers[path] = column
        return column

    @property
    def keys(self) -> list[Key]:
        if self._keys is None:
            self._keys = [(event.timestamp, event.seq) for event in self.events]
        return self._keys

    def bounds(self, window: Window, now: datetime) -> tuple[int, int]:
        """The slice of the events whose timestamp is inside ``window`` at ``now``."""
        span = resolve(window, now)
        lo = 0 if span.lo is None else bisect_left(self.stamps, span.lo)
        if span.hi is None:
            hi = len(self.stamps)
        elif span.hi_open:
            hi = bisect_left(self.stamps, span.hi)
        else:
            hi = bisect_right(self.stamps, span.hi)
        return lo, hi

    def within(self, window: Window | None, now: datetime) -> list[MemoryEvent]:
        """The events inside ``window`` at ``now`` (all when None; do not mutate)."""
        if window is None:
            return self.events
        lo, hi = self.bounds(window, now)
        return self.events[lo:hi]


_EMPTY: Final = _Index([])


class PreparedProfile:
    """A profile as seen at ``now``: events after ``now`` dropped (not yet visible), the rest
    grouped by name and ordered by (timestamp, seq). Per-name indexes are built on first use, so
    preparing costs one pass over the events. ``now`` must be aware. Building an index twice
    (two threads at once) is harmless: both build the same one."""

    __slots__ = ("_groups", "_indexes", "_selected", "_today", "attributes", "consents", "now")

    def __init__(self, profile: ProfileData, now: datetime) -> None:
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be an aware datetime")
        self.now: datetime = now
        self.attributes: Mapping[str, Any] = profile.attributes
        self.consents: Mapping[tuple[str, str], str] = profile.consents
        groups: dict[str, list[MemoryEvent]] = {}
        for event in profile.events:
            if event.timestamp <= now:
                group = groups.get(event.name)
                if group is None:
                    groups[event.name] = [event]
                else:
                    group.append(event)
        self._groups = groups
        self._indexes: dict[str, _Index] = {}
        self._today: date | None = None
        #: Filtered selections of events, by reference (filled by the compiled audiences).
        self._selected: dict[object, list[MemoryEvent]] = {}

    def index(self, name: str) -> _Index:
        """The visible events named ``name``, ordered."""
        index = self._indexes.get(name)
        if index is None:
            group = self._groups.get(name)
            index = _EMPTY if group is None else _Index(group)
            self._indexes[name] = index
        return index

    def events(self, name: str) -> Seq[MemoryEvent]:
        """The visible events named ``name``, ordered by (timestamp, seq)."""
        return tuple(self.index(name).events)

    @property
    def today(self) -> date:
        """Today's date at ``now`` in the profile's time zone (UTC when it has none)."""
        if self._today is None:
            zone = self.attributes.get("timezone")
            self._today = local_today(self.now, zone if isinstance(zone, str) else None)
        return self._today


# -- compilation ------------------------------------------------------------------------------

_Run: TypeAlias = Callable[[PreparedProfile], bool]
#: A compiled value test: (the raw JSON value, the profile) -> bool.
_ValueTest: TypeAlias = Callable[[Any, PreparedProfile], bool]
#: A compiled property filter: (the event's properties, the profile) -> bool.
_Where: TypeAlias = Callable[[Mapping[str, Any], PreparedProfile], bool]
_Getter: TypeAlias = Callable[[Mapping[str, Any]], Any]

_OPS: Final = COMPARE
_ORDERED: Final = frozenset({FieldType.NUMBER, FieldType.INTEGER, FieldType.TIMESTAMP})
_SCALAR: Final = frozenset(
    {FieldType.STRING, FieldType.NUMBER, FieldType.INTEGER, FieldType.BOOLEAN, FieldType.TIMESTAMP}
)
#: How a literal for a field of each type is written (a timestamp as ISO text).
_LITERAL_TYPE: Final[dict[FieldType, type | tuple[type, ...]]] = {
    FieldType.STRING: str,
    FieldType.NUMBER: (int, float),
    FieldType.INTEGER: (int, float),
    FieldType.BOOLEAN: bool,
    FieldType.TIMESTAMP: str,
}


@dataclass(frozen=True, slots=True)
class CompiledAudience:
    """A compiled audience: call it with a profile (raw, or prepared at the same ``now``).
    ``run(prepared)`` is the fast path (no checks): prepare a profile once, run many."""

    expr: Expr
    run: _Run

    def __call__(self, profile: ProfileData | PreparedProfile, now: datetime) -> bool:
        """Whether ``profile`` is in the audience at ``now``. A :class:`PreparedProfile` must have
        been prepared at this very ``now`` (``ValueError`` otherwise)."""
        if isinstance(profile, PreparedProfile):
            if profile.now != now:
                raise ValueError("the profile was prepared at another instant")
            return self.run(profile)
        return self.run(PreparedProfile(profile, now))


def compile_memory(expr: Expr) -> CompiledAudience:
    """``expr`` (checked) as a callable ``(profile, now) -> bool``; ``ValueError`` when the tree
    is not checked (a missing or unusable ``kind``) or holds ``in audience``."""
    return CompiledAudience(expr, _expr(expr))


def evaluate(expr: Expr, profile: ProfileData, now: datetime) -> bool:
    """Whether ``profile`` is in the audience ``expr`` (checked) at ``now`` (aware)."""
    return compile_memory(expr)(profile, now)


def _all(items: tuple[_Run, ...]) -> _Run:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        left, right = items
        return lambda p: left(p) and right(p)
    return lambda p: all(item(p) for item in items)


def _any(items: tuple[_Run, ...]) -> _Run:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        left, right = items
        return lambda p: left(p) or right(p)
    return lambda p: any(item(p) for item in items)


def _expr(node: Expr) -> _Run:
    if isinstance(node, And):
        return _all(tuple(_expr(item) for item in node.items))
    if isinstance(node, Or):
        return _any(tuple(_expr(item) for item in node.items))
    if isinstance(node, Not):
        inner = _expr(node.item)
        return lambda p: not inner(p)
    if isinstance(node, Attr):
        return _attr(node)
    if isinstance(node, Occurs):
        return _occurs(node.event)
    if isinstance(node, Count):
        return _count(node)
    if isinstance(node, Aggregate):
        return _aggregate(node)
    if isinstance(node, Pick):
        return _pick(node)
    if isinstance(node, Sequence):
        return _sequence(node)
    if isinstance(node, Consent):
        return _consent(node)
    if isinstance(node, InAudience):
        raise ValueError(f"in audience {node.name!r} must be expanded before evaluation in memory")
    raise ValueError(f"not an audience expression: {node!r}")


# -- values ---------------------------------------------------------------------------------


def path_getter(path: str) -> _Getter:
    """Read a dotted path from a mapping; None when a part is absent or not a mapping."""
    parts = tuple(path.split("."))
    if len(parts) == 1:
        return operator.methodcaller("get", path)

    def get(mapping: Mapping[str, Any]) -> Any:
        value: Any = mapping
        for part in parts:
            if type(value) is not dict and not isinstance(value, Mapping):
                return None
            value = value.get(part)
        return value

    return get


def _kind(kind: FieldType | None, where: str) -> FieldType:
    if kind is None:
        raise ValueError(f"{where}: the tree is not checked (no type)")
    return kind


def _literal(value: Scalar, kind: FieldType) -> Any:
    """A literal converted for comparison with values of ``kind``; ValueError when it is not
    written as such a value (booleans are not numbers; a timestamp must parse)."""
    written = isinstance(value, _LITERAL_TYPE[kind]) and (
        kind is FieldType.BOOLEAN or not isinstance(value, bool)
    )
    converted = literal_value(value, kind) if written else None
    if converted is None:
        raise ValueError(f"the literal {value!r} does not fit a {kind} field")
    return converted


def _test(test: Test, kind: FieldType) -> _ValueTest:
    """A value test of a raw (stored, JSON) value read as ``kind``."""
    read = reader(kind)  # read_value for this kind (None gives None)
    if isinstance(test, Exists):
        present = test.present
        return lambda raw, _p: (read(raw) is not None) is present
    if kind not in _SCALAR:
        raise ValueError(f"a {kind} field can only be tested with exists / is missing")
    if isinstance(test, CompareTest):
        if test.op not in (CompareOp.EQ, CompareOp.NE) and kind not in _ORDERED:
            raise ValueError(f"a {kind} field cannot be ordered with {test.op}")
        literal = _literal(test.value, kind)
        op = _OPS[test.op]

        def compare(raw: Any, _p: PreparedProfile) -> bool:
            value = read(raw)
            return value is not None and op(value, literal)

        return compare
    if isinstance(test, InList):
        values = frozenset(_literal(value, kind) for value in test.values)
        if test.negated:

            def not_in(raw: Any, _p: PreparedProfile) -> bool:
                value = read(raw)
                return value is not None and value not in values

            return not_in

        def is_in(raw: Any, _p: PreparedProfile) -> bool:
            value = read(raw)
            return value is not None and value in values

        return is_in
    if isinstance(test, Text):
        if kind is not FieldType.STRING:
            raise ValueError(f"text tests need a string field, not {kind}")
        needle = fold(test.value)
        method = {
            TextOp.STARTS_WITH: str.startswith,
            TextOp.ENDS_WITH: str.endswith,
            TextOp.CONTAINS: str.__contains__,
        }[test.op]

        def text(raw: Any, _p: PreparedProfile) -> bool:
            value = read(raw)
            return value is not None and method(fold(value), needle)

        return text
    if isinstance(test, Within):
        if kind is not FieldType.TIMESTAMP:
            raise ValueError(f"windows need a timestamp field, not {kind}")
        window = test.window
        #: the span at the instant asked last, as one tuple (replaced whole: threads safe);
        #: the profiles of a batch are asked at one instant
        resolved: list[tuple[datetime | None, Any]] = [(None, None)]

        def within(raw: Any, p: PreparedProfile) -> bool:
            value = read(raw)
            if value is None:
                return False
            known = resolved[0]
            if known[0] is not p.now:
                known = resolved[0] = (p.now, resolve(window, p.now))
            return bool(known[1].contains(value))

        return within
    if isinstance(test, Anniversary):
        if kind not in (FieldType.TIMESTAMP, FieldType.STRING):
            raise ValueError(f"anniversaries need a timestamp or string field, not {kind}")
        ahead = timedelta(days=test.days)

        def anniversary(raw: Any, p: PreparedProfile) -> bool:
            day = calendar_date(raw, kind)
            if day is None:
                return False
            today = p.today
            return next_anniversary(day, today) <= today + ahead

        return anniversary
    raise ValueError(f"not a value test: {test!r}")


def _attr(node: Attr) -> _Run:
    get = path_getter(node.path)
    test = _test(node.test, _kind(node.kind, node.path))
    return lambda p: test(get(p.attributes), p)


def _consent(node: Consent) -> _Run:
    record = (node.channel, node.purpose)
    status = node.status.value
    negated = node.negated
    return lambda p: (p.consents.get(record, "unknown") == status) is not negated


# -- events ---------------------------------------------------------------------------------


def compile_where(node: Filter) -> Callable[[Mapping[str, Any], PreparedProfile], bool]:
    """An event filter as a test of an event's properties (the prepared profile gives the
    moment for the property tests that read one: windows and anniversaries)."""
    return _where(node)


def _where(node: Filter) -> _Where:
    if isinstance(node, Prop):
        get = path_getter(node.path)
        test = _test(node.test, _kind(node.kind, node.path))
        return lambda props, p: test(get(props), p)
    if isinstance(node, FilterAnd):
        items = tuple(_where(item) for item in node.items)
        if len(items) == 2:
            left, right = items
            return lambda props, p: left(props, p) and right(props, p)
        return lambda props, p: all(item(props, p) for item in items)
    if isinstance(node, FilterOr):
        items = tuple(_where(item) for item in node.items)
        if len(items) == 2:
            left, right = items
            return lambda props, p: left(props, p) or right(props, p)
        return lambda props, p: any(item(props, p) for item in items)
    if isinstance(node, FilterNot):
        inner = _where(node.item)
        return lambda props, p: not inner(props, p)
    raise ValueError(f"not a property filter: {node!r}")


_Select: TypeAlias = Callable[[PreparedProfile], list[MemoryEvent]]


class _RefKey:
    """An event reference as a cache key, its hash computed once (at compile time)."""

    __slots__ = ("_hash", "ref")

    def __init__(self, ref: EventRef) -> None:
        self.ref = ref
        self._hash = hash(ref)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RefKey) and other.ref == self.ref


def _select(ref: EventRef) -> _Select:
    """The visible events matching ``ref`` (name, window, where), ordered. A filtered
    selection is kept on the prepared profile: audiences often share their references."""
    name, window = ref.name, ref.window
    if ref.where is None:
        return lambda p: p.index(name).within(window, p.now)
    where = _where(ref.where)
    key = _RefKey(ref)

    def select(p: PreparedProfile) -> list[MemoryEvent]:
        found = p._selected.get(key)
        if found is None:
            found = [e for e in p.index(name).within(window, p.now) if where(e.properties, p)]
            p._selected[key] = found
        return found

    return select


def _occurs(ref: EventRef) -> _Run:
    name, window = ref.name, ref.window
    if ref.where is None:
        return lambda p: bool(p.index(name).within(window, p.now))
    where = _where(ref.where)
    key = _RefKey(ref)

    def occurs(p: PreparedProfile) -> bool:
        found = p._selected.get(key)
        if found is not None:
            return bool(found)
        return any(where(e.properties, p) for e in p.index(name).within(window, p.now))

    return occurs


def _count(node: Count) -> _Run:
    select = _select(node.event)
    op = _OPS[node.op]
    target = float(node.value)
    return lambda p: op(float(len(select(p))), target)


def _aggregate(node: Aggregate) -> _Run:
    select = _select(node.event)
    get = path_getter(node.path)
    op = _OPS[node.op]
    target = float(node.value)
    fn = node.fn

    plain = node.event.where is None
    name, window, path = node.event.name, node.event.window, node.path

    def aggregate(p: PreparedProfile) -> bool:
        if plain:  # a slice of the profile's cached column of this property
            index = p.index(name)
            column = index.numbers(path, get)
            lo, hi = (0, len(column)) if window is None else index.bounds(window, p.now)
            numbers = [n for n in column[lo:hi] if n is not None]
        else:
            found = (read_number(get(e.properties)) for e in select(p))
            numbers = [n for n in found if n is not None]
        if fn is AggregateFn.SUM:
            # fsum: exactly rounded, so the result does not depend on the order of the events.
            return op(math.fsum(numbers), target)
        if not numbers:  # avg, min and max of nothing are missing: every comparison is false
            return False
        if fn is AggregateFn.AVG:
            value = math.fsum(numbers) / len(numbers)
        elif fn is AggregateFn.MIN:
            value = min(numbers)
        else:
            value = max(numbers)
        return op(value, target)

    return aggregate


def _pick(node: Pick) -> _Run:
    select = _select(node.event)
    if node.path is None:
        # ``.timestamp``: the event's time, as its ISO text (how timestamps are stored).
        if node.kind not in (None, FieldType.TIMESTAMP):
            raise ValueError(f".timestamp is a timestamp, not {node.kind}")
        test = _test(node.test, FieldType.TIMESTAMP)

        def value_of(event: MemoryEvent) -> Any:
            return event.timestamp.isoformat()

    else:
        test = _test(node.test, _kind(node.kind, node.path))
        get = path_getter(node.path)

        def value_of(event: MemoryEvent) -> Any:
            return get(event.properties)

    position = 0 if node.which is Which.FIRST else -1
    ref = node.event
    if ref.where is None:

        def pick(p: PreparedProfile) -> bool:
            events = select(p)
            return bool(events) and test(value_of(events[position]), p)

        return pick
    # filtered: walk from the wanted end and stop at the first match (not the whole selection)
    where = _where(ref.where)
    first = node.which is Which.FIRST

    def pick_filtered(p: PreparedProfile) -> bool:
        events = p.index(ref.name).within(ref.window, p.now)
        for event in events if first else reversed(events):
            if where(event.properties, p):
                return test(value_of(event), p)
        return False

    return pick_filtered


# -- sequences ------------------------------------------------------------------------------
#
# Let S1..Sk be the events matching each step, ordered by key = (timestamp, seq); D = within.
#
# Positive (``A then B then C within D``): is there a1 < a2 < ... < ak (ai in Si) with
# ak.timestamp <= a1.timestamp + D? For a fixed a1 take the greedy chain: g2 = the first event
# of S2 after a1, g3 = the first of S3 after g2, and so on. If any chain a1 < b2 < ... < bk
# exists then gi <= bi for every i (induction: bi > b(i-1) >= g(i-1), so bi is a candidate for
# gi, and gi is the least candidate), hence gk <= bk <= a1 + D: the greedy chain succeeds
# whenever any chain does. So it suffices to try every a1 of S1 with its greedy chain. Greedy
# chains are monotone: a later a1 has a pointwise later (or equal) greedy chain. Hence: if the
# chain runs out of events, every later a1 runs out too and we can stop; and two shortcuts skip
# starts that cannot do better (each argued where it is taken in ``_positive``).
#
# Absent last (``A then B then not C within D``): is there a chain a1 < ... < a(k-1) of the
# positive steps, all within D of a1, with a1 + D <= now, and no event of Sk with key after
# a(k-1) and timestamp <= a1 + D? Fix a1 (deadline T = a1.timestamp + D). The bad events for a
# chain are those of Sk in (a(k-1), T]: the later a(k-1), the fewer, so for a fixed a1 the most
# permissive chain is the one with the latest feasible a(k-1). The feasible a(k-1) are exactly
# the events e of S(k-1) with e.timestamp <= T that have a chain a1 < a2 < ... < a(k-2) < e
# before them; by the argument above such a chain exists iff the greedy (earliest) prefix
# g(k-2) exists and g(k-2) < e (its members are then < e, so within T too). So: greedy-earliest
# for steps 2..k-2, then the latest event of S(k-1) with timestamp <= T (it must be after
# g(k-2)), then check there is no event of Sk after it up to T. With k-1 == 1 the chain is a1
# itself. a1 + D <= now only gets harder for later a1, so we stop at the first a1 that fails it.


@dataclass(frozen=True, slots=True)
class _Step:
    """The events matching one step: their keys and timestamps, in order."""

    keys: list[Key]
    stamps: list[datetime]


def _step(ref: EventRef) -> Callable[[PreparedProfile], _Step]:
    name, window = ref.name, ref.window
    if ref.where is None:

        def whole(p: PreparedProfile) -> _Step:
            index = p.index(name)
            if window is None:
                return _Step(index.keys, index.stamps)
            lo, hi = index.bounds(window, p.now)
            return _Step(index.keys[lo:hi], index.stamps[lo:hi])

        return whole
    select = _select(ref)

    def filtered(p: PreparedProfile) -> _Step:
        events = select(p)
        return _Step([(e.timestamp, e.seq) for e in events], [e.timestamp for e in events])

    return filtered


def _sequence(node: Sequence) -> _Run:
    if len(node.steps) < 2:
        raise ValueError("a sequence has at least two steps")
    if any(step.window is not None for step in node.steps[1:]):
        raise ValueError("only the first step of a sequence may have a window")
    steps = tuple(_step(step) for step in node.steps)
    within = node.within.delta
    if node.absent_last:
        return _absent(steps[0], steps[1:-1], steps[-1], within)
    return _positive(steps[0], steps[1:], within)


def _positive(
    first: Callable[[PreparedProfile], _Step],
    rest: tuple[Callable[[PreparedProfile], _Step], ...],
    within: timedelta,
) -> _Run:
    def run(p: PreparedProfile) -> bool:
        head = first(p)
        starts, stamps = head.keys, head.stamps
        second, *later = [step(p).keys for step in rest]
        i = 0
        while i < len(starts):
            j = bisect_right(second, starts[i])
            if j == len(second):
                return False  # later starts have no candidate either
            prev = second[j]
            # Every start before ``prev`` (from this one on) has ``prev`` as its first second
            # step, hence the same greedy chain; the latest has the latest deadline: try it.
            i = bisect_left(starts, prev, i) - 1
            deadline = stamps[i] + within
            for keys in later:
                if prev[0] > deadline:
                    break
                k = bisect_right(keys, prev)
                if k == len(keys):
                    return False  # later starts have no candidate either
                prev = keys[k]
            if prev[0] <= deadline:
                return True
            # The chain failed at ``prev``. A later start's greedy chain is pointwise no
            # earlier, so a start whose deadline is before ``prev`` fails too: skip those.
            i = bisect_left(stamps, prev[0] - within, i + 1)
        return False

    return run


def _absent(
    first: Callable[[PreparedProfile], _Step],
    middle: tuple[Callable[[PreparedProfile], _Step], ...],
    negated: Callable[[PreparedProfile], _Step],
    within: timedelta,
) -> _Run:
    # middle: the positive steps after the first one (steps 2..k-1); negated: step k.
    def run(p: PreparedProfile) -> bool:
        starts = first(p).keys
        if not starts:
            return False
        steps = [step(p) for step in middle]
        prefix, last = (steps[:-1], steps[-1]) if steps else ([], None)
        absent = negated(p).keys
        now = p.now
        for start in starts:
            deadline = start[0] + within
            if deadline > now:
                return False  # D has not passed yet, nor for any later start
            prev = start
            for step in prefix:  # greedy earliest, as in the positive case
                i = bisect_right(step.keys, prev)
                if i == len(step.keys):
                    return False  # later starts have no candidate either
                prev = step.keys[i]
                if prev[0] > deadline:
                    break  # an early exit: no a(k-1) <= deadline could follow it either
            else:
                if last is not None:  # the latest a(k-1) within the deadline
                    j = bisect_right(last.stamps, deadline)
                    if j == 0 or last.keys[j - 1] <= prev:
                        continue
                    prev = last.keys[j - 1]
                i = bisect_right(absent, prev)
                if i == len(absent) or absent[i][0] > deadline:
                    return True
        return False

    return run
