"""The audience AST: one tree that every evaluator reads.

Nodes are frozen dataclasses, so two definitions are equal exactly when their trees are. A tree
comes from the text form (:mod:`.parser`) or the JSON form (:mod:`.jsonform`); :func:`.check.check`
fills in the declared type of each field it names (``kind``), which the evaluators need. The
meaning of every node is written down in ``docs/audiences.md``; the helpers at the end of this
module (windows, case folding, anniversaries, value reading) are that meaning in code, shared by
every evaluator so that they cannot drift apart.

Pure: no I/O, no clock (``now`` is always an argument).
"""

from __future__ import annotations

import calendar
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Any, Final, TypeAlias
from zoneinfo import ZoneInfo

from waymark.model.schemas import FieldType

__all__ = [
    "COMPARE",
    "Aggregate",
    "AggregateFn",
    "Ago",
    "And",
    "Anniversary",
    "At",
    "Attr",
    "Between",
    "Compare",
    "CompareOp",
    "Consent",
    "ConsentStatus",
    "Count",
    "Duration",
    "EventRef",
    "Exists",
    "Expr",
    "Filter",
    "FilterAnd",
    "FilterNot",
    "FilterOr",
    "InAudience",
    "InList",
    "Last",
    "Next",
    "Not",
    "Occurs",
    "Older",
    "Or",
    "Pick",
    "Prop",
    "Sequence",
    "Span",
    "Test",
    "Text",
    "TextOp",
    "Unit",
    "Which",
    "Window",
    "Within",
]


class Unit(StrEnum):
    """A unit of a duration. Months and years are not units: their length varies."""

    MINUTES = "minutes"
    HOURS = "hours"
    DAYS = "days"
    WEEKS = "weeks"


_UNIT_DELTA: Final = {
    Unit.MINUTES: timedelta(minutes=1),
    Unit.HOURS: timedelta(hours=1),
    Unit.DAYS: timedelta(days=1),
    Unit.WEEKS: timedelta(weeks=1),
}


@dataclass(frozen=True, slots=True)
class Duration:
    """``amount`` units of fixed length (a day is 24 hours)."""

    amount: int
    unit: Unit

    @property
    def delta(self) -> timedelta:
        return self.amount * _UNIT_DELTA[self.unit]


# -- windows -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ago:
    """A moment relative to now: ``30 days ago``."""

    duration: Duration


@dataclass(frozen=True, slots=True)
class At:
    """An absolute moment as written: an ISO date (``2026-01-01``) or timestamp."""

    text: str


Bound: TypeAlias = Ago | At


@dataclass(frozen=True, slots=True)
class Last:
    """``within last D``: from ``now - D`` to ``now``, both included."""

    duration: Duration


@dataclass(frozen=True, slots=True)
class Next:
    """``within next D``: from ``now`` to ``now + D``, both included (future timestamps)."""

    duration: Duration


@dataclass(frozen=True, slots=True)
class Older:
    """``more than D ago``: strictly before ``now - D``."""

    duration: Duration


@dataclass(frozen=True, slots=True)
class Between:
    """``between A and B``: from A to B, both included; a date-only B includes that whole day."""

    start: Bound
    end: Bound


Window: TypeAlias = Last | Next | Older | Between


# -- value tests ----------------------------------------------------------------------------


class CompareOp(StrEnum):
    EQ = "="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="


#: What each comparison means on Python values (every evaluator compares through this).
COMPARE: Final[dict[CompareOp, Callable[[Any, Any], bool]]] = {
    CompareOp.EQ: operator.eq,
    CompareOp.NE: operator.ne,
    CompareOp.LT: operator.lt,
    CompareOp.LE: operator.le,
    CompareOp.GT: operator.gt,
    CompareOp.GE: operator.ge,
}


class TextOp(StrEnum):
    STARTS_WITH = "starts_with"
    ENDS_WITH = "ends_with"
    CONTAINS = "contains"


Scalar: TypeAlias = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Compare:
    """``= != < <= > >=`` against a literal. A missing value never compares true."""

    op: CompareOp
    value: Scalar


@dataclass(frozen=True, slots=True)
class InList:
    """``in (...)`` / ``not in (...)``. A missing value is in no list and not in-not-in either."""

    values: tuple[Scalar, ...]
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Text:
    """``starts with``, ``ends with``, ``contains``; ASCII letters compare case-insensitively."""

    op: TextOp
    value: str


@dataclass(frozen=True, slots=True)
class Exists:
    """``exists`` (``present=True``) or ``is missing``."""

    present: bool


@dataclass(frozen=True, slots=True)
class Within:
    """A timestamp inside a window."""

    window: Window


@dataclass(frozen=True, slots=True)
class Anniversary:
    """``in next N days``: the date's month and day fall today or within the next N days, in
    the profile's time zone (a 29 February falls on 28 February in other years)."""

    days: int


Test: TypeAlias = Compare | InList | Text | Exists | Within | Anniversary


# -- event references and property filters ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prop:
    """A test of one event property (dotted path into ``properties``)."""

    path: str
    test: Test
    kind: FieldType | None = None


@dataclass(frozen=True, slots=True)
class FilterAnd:
    items: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class FilterOr:
    items: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class FilterNot:
    item: Filter


Filter: TypeAlias = Prop | FilterAnd | FilterOr | FilterNot


@dataclass(frozen=True, slots=True)
class EventRef:
    """Events of one type, optionally filtered on their properties and limited to a window."""

    name: str
    where: Filter | None = None
    window: Window | None = None


# -- conditions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attr:
    """A test of one profile attribute (dotted path into the attributes)."""

    path: str
    test: Test
    kind: FieldType | None = None


@dataclass(frozen=True, slots=True)
class Occurs:
    """At least one matching event."""

    event: EventRef


@dataclass(frozen=True, slots=True)
class Count:
    """``count(event) OP n``: the number of matching events (0 when there are none)."""

    event: EventRef
    op: CompareOp
    value: int


class AggregateFn(StrEnum):
    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"


@dataclass(frozen=True, slots=True)
class Aggregate:
    """``sum/avg/min/max(event.property) OP x`` over the matching events that have the property
    as a number. A sum over no values is 0; avg, min and max over none are missing (false)."""

    fn: AggregateFn
    event: EventRef
    path: str
    op: CompareOp
    value: int | float


class Which(StrEnum):
    FIRST = "first"
    LAST = "last"


@dataclass(frozen=True, slots=True)
class Pick:
    """``first/last(event).property TEST``: a test of one property (``path=None``: the event's
    timestamp) of the earliest or latest matching event, ordered by (timestamp, sequence).
    False when there is no matching event."""

    which: Which
    event: EventRef
    path: str | None
    test: Test
    kind: FieldType | None = None


@dataclass(frozen=True, slots=True)
class Sequence:
    """``A then B [then C ...] within D``: matching events in this order (by timestamp, then
    sequence, strictly increasing), all within D of the first. With ``absent_last`` the last
    step must *not* follow: the others happened, D has fully passed since the first, and no
    event of the last step came after the one before it and within D of the first."""

    steps: tuple[EventRef, ...]
    within: Duration
    absent_last: bool = False


class ConsentStatus(StrEnum):
    OPTED_IN = "opted_in"
    OPTED_OUT = "opted_out"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Consent:
    """``consent(channel, purpose) = status``; no record means ``unknown``."""

    channel: str
    purpose: str
    status: ConsentStatus
    negated: bool = False


@dataclass(frozen=True, slots=True)
class InAudience:
    """Membership of another audience of the workspace, by name."""

    name: str


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Expr


Expr: TypeAlias = (
    Attr | Occurs | Count | Aggregate | Pick | Sequence | Consent | InAudience | And | Or | Not
)

# -- the meaning, shared by every evaluator ----------------------------------------------------

#: Folding for case-insensitive text tests: ASCII letters only, so that every engine agrees.
ASCII_FOLD: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
UPPER: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LOWER: Final = "abcdefghijklmnopqrstuvwxyz"


def fold(text: str) -> str:
    """``text`` with ASCII letters lower-cased (the case rule of text tests)."""
    return text.translate(ASCII_FOLD)


@dataclass(frozen=True, slots=True)
class Span:
    """A resolved window: ``lo <= t`` (if lo) and ``t <= hi`` (or ``t < hi`` if hi_open)."""

    lo: datetime | None
    hi: datetime | None
    hi_open: bool = False

    def contains(self, moment: datetime) -> bool:
        if self.lo is not None and moment < self.lo:
            return False
        if self.hi is None:
            return True
        return moment < self.hi if self.hi_open else moment <= self.hi


def is_date_only(text: str) -> bool:
    """Whether an absolute bound is written as a date (``YYYY-MM-DD``) rather than a moment."""
    return len(text) == 10 and text[4] == "-" and text[7] == "-"


def parse_moment(text: str) -> datetime | None:
    """An ISO date or timestamp as an aware UTC datetime (naive means UTC); None if invalid."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return None


def _bound(bound: Bound, now: datetime) -> datetime:
    if isinstance(bound, Ago):
        return now - bound.duration.delta
    moment = parse_moment(bound.text)
    if moment is None:  # the checker refuses these; evaluators never see one
        raise ValueError(f"not a date or timestamp: {bound.text!r}")
    return moment


def resolve(window: Window, now: datetime) -> Span:
    """The span of ``window`` at ``now`` (an aware datetime)."""
    if isinstance(window, Last):
        return Span(now - window.duration.delta, now)
    if isinstance(window, Next):
        return Span(now, now + window.duration.delta)
    if isinstance(window, Older):
        return Span(None, now - window.duration.delta, hi_open=True)
    lo = _bound(window.start, now)
    if isinstance(window.end, At) and is_date_only(window.end.text):
        return Span(lo, _bound(window.end, now) + timedelta(days=1), hi_open=True)
    return Span(lo, _bound(window.end, now))


#: How a stored timestamp reads: the ISO-8601 text ingestion writes (``isoformat()`` of an aware
#: datetime, or with ``Z``), with every field in range (year 1 on, hours to 23, offsets to
#: 15:59, which is as far as PostgreSQL goes). Other text in a timestamp field counts as
#: missing, in every evaluator: SQL engines parse other sets of forms than Python, and
#: PostgreSQL cannot try a cast, so the rule is this pattern (and, for the day of the month,
#: the calendar).
STORED_MOMENT: Final = (
    "^([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])-(0[1-9]|1[0-2])-"
    "(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]([.][0-9]{1,6})?"
    "(Z|[+-](0[0-9]|1[0-5]):[0-5][0-9])$"
)
#: How a calendar date in a string field starts (``YYYY-MM-DD``, then anything).
STORED_DATE: Final = "^[0-9]{4}-[0-9]{2}-[0-9]{2}"
_STORED_MOMENT_RE: Final = re.compile(STORED_MOMENT.replace("$", r"\Z"))
_STORED_DATE_RE: Final = re.compile(STORED_DATE)


def read_moment(value: Any) -> datetime | None:
    """A stored timestamp (see :data:`STORED_MOMENT`) as an aware UTC datetime, else None."""
    if not isinstance(value, str):
        return None
    return _stored_moment(value)


@lru_cache(maxsize=16_384)
def _stored_moment(text: str) -> datetime | None:
    # Cached: the audiences of a workspace read the same attribute of a profile many times.
    if not _STORED_MOMENT_RE.match(text):
        return None
    return parse_moment(text)


def read_number(value: Any) -> float | None:
    """A JSON value as a number, or None (booleans are not numbers)."""
    kind = type(value)  # exact types: JSON decoders give plain int, float and bool
    if kind is float:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return float(value)
    if kind is bool or not isinstance(value, int | float):
        return None
    return float(value)  # an int or float subclass


def _read_string(value: Any) -> Any:
    return value if isinstance(value, str) else None


def _read_boolean(value: Any) -> Any:
    return value if isinstance(value, bool) else None


def _read_as_is(value: Any) -> Any:
    return value  # objects and arrays: only exists / is missing test them


#: The reader of each kind (a dict look-up: this runs for every property an edge test reads).
_READERS: Final[dict[FieldType, Any]] = {
    FieldType.STRING: _read_string,
    FieldType.NUMBER: read_number,
    FieldType.INTEGER: read_number,
    FieldType.BOOLEAN: _read_boolean,
    FieldType.TIMESTAMP: read_moment,
    FieldType.OBJECT: _read_as_is,
    FieldType.ARRAY: _read_as_is,
}


def reader(kind: FieldType) -> Any:
    """The function :func:`read_value` applies for ``kind`` (for evaluators that bind it once);
    like :func:`read_value`, it reads None as None."""
    return _READERS[kind]


def read_value(value: Any, kind: FieldType) -> Any:
    """A stored JSON value read as ``kind`` for comparison, or None when it has another type.

    Numbers and integers read as float; timestamps (ISO text) as aware UTC datetimes.
    """
    if value is None:
        return None
    return _READERS[kind](value)


def literal_value(value: Scalar, kind: FieldType) -> Any:
    """A checked literal converted like :func:`read_value` converts stored values."""
    if kind is FieldType.TIMESTAMP and isinstance(value, str):
        return parse_moment(value)
    if kind in (FieldType.NUMBER, FieldType.INTEGER):
        return float(value)
    return value


def calendar_date(value: Any, kind: FieldType) -> date | None:
    """The calendar date of an anniversary field: a timestamp's UTC date, or a string's leading
    ``YYYY-MM-DD``; None when there is none."""
    if kind is FieldType.TIMESTAMP:
        moment = read_moment(value)
        return moment.date() if moment else None
    if not isinstance(value, str) or not _STORED_DATE_RE.match(value):
        return None
    try:
        return date(int(value[:4]), int(value[5:7]), int(value[8:10]))
    except ValueError:  # no such day (or year 0)
        return None


def _on_year(day: date, year: int) -> date:
    if day.month == 2 and day.day == 29 and not calendar.isleap(year):
        return date(year, 2, 28)
    return date(year, day.month, day.day)


def next_anniversary(day: date, today: date) -> date:
    """The first date on or after ``today`` with ``day``'s month and day."""
    this_year = _on_year(day, today.year)
    return this_year if this_year >= today else _on_year(day, today.year + 1)


def local_today(now: datetime, timezone: str | None) -> date:
    """Today's date at ``now`` in an IANA time zone (UTC when None or unknown)."""
    if timezone:
        try:
            return now.astimezone(ZoneInfo(timezone)).date()
        except (KeyError, ValueError):
            pass
    return now.astimezone(UTC).date()
