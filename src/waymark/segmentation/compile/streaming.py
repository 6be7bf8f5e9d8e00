"""The streaming evaluator: audience membership kept up to date event by event.

A checked tree is compiled once (:func:`compile_streaming`); each (profile, audience) pair then
keeps a small JSON state. :meth:`StreamingAudience.on_event` folds one event into it (events
come in any timestamp order: late and future-dated events are normal),
:meth:`StreamingAudience.member` answers at an instant from the state and the profile's *current*
attributes and consents (they are not history, so a change of them only needs a new ``member``
call), and :meth:`StreamingAudience.next_change` gives the instant at which time alone may change
the answer (a timer). Nothing rescans the profile's history. The meaning is the in-memory
evaluator's (:mod:`.memory`), which the property tests compare against.

Time
----
Instants are kept as integer microseconds since 1970 (UTC); a change "at" ``x`` means the answer
at ``x`` may differ from the answer just before it. ``on_event`` takes the current time ``now``
as well as the event: it is a promise that no later question is asked about an earlier instant.
The state remembers the latest such ``now`` (its *watermark* ``W``) and forgets what cannot
matter at any instant ``>= W``; ``member`` and ``next_change`` refuse (``ValueError``) an instant
before ``W``. Without that promise no bounded state could answer exactly: "3 purchases in 30
days" asked about an arbitrary past instant needs every purchase.

Windows
-------
An event window, combined with visibility (events after ``now`` are not visible), is at instant
``t``: a fixed lower bound ``lo_abs`` or a moving one ``t + lo_off`` (or none), and an upper
bound ``t + hi_off`` (``hi_off <= 0``, closed or open) plus perhaps a fixed ``hi_abs``. Fixed
bounds are tested once, when the event arrives. Both moving bounds only move forward, so an
event *enters* the window once (at ``ts - hi_off``) and, if the lower bound moves, *leaves* it
once (just after ``ts - lo_off``). At ``W`` an event is *entered* (it is inside the upper bound
for every ``t >= W``), *pending* (it enters later: future-dated, or not yet old enough for
``more than D ago`` / ``between 30 days ago and 7 days ago``) or *gone* (below a moving lower
bound: never again inside; dropped). A window is *sliding* when its lower bound moves (``within
last``, ``within next``, ``between D ago and ...``) and *fixed* otherwise (no window, ``more than
D ago``, ``between "2026-01-01" and ...``): in a fixed window entered events never leave.

State per construct (``k`` the compared count, ``n`` the cap ``max_events``)
-----------------------------------------------------------------------------
- ``count(e) OP k`` and ``e`` (``count >= 1``): only ``min(count, S)`` matters, with ``S = k``
  for ``>=`` and ``<`` and ``k + 1`` for the others. Fixed window: a counter of entered events
  (saturating at ``S``) and the ``S - counter`` oldest pending timestamps (pending events enter
  oldest first, so later ones cannot matter before the count saturates). Sliding window: the
  ``S`` newest entered timestamps (the entered events inside the window at ``t`` are the newest
  ones, so if a dropped one were inside, all ``S`` kept ones would be too) and every pending
  timestamp. Timers are exact: a sweep over the instants at which what is kept enters and
  leaves finds the first at which the comparison turns. Bound: ``S``, plus pending events.
- ``sum/avg(e.p)``: fixed window: the exact sum of the entered values (an integer mantissa and
  a binary exponent, so the rounded value equals ``math.fsum`` of all values), their number,
  and the pending values. Sliding window: every value inside or pending (the exact answer needs
  them all). Bound: the events of the window.
- ``min/max(e.p)``: fixed window: the best entered value and the pending values that could still
  improve on it (each strictly better than every older one). Sliding window: the entered values
  not beaten by a newer entered one (a monotonic queue: a newer, better value outlives the older
  one in the window) and every pending value. Bound: the events of the window, in practice few.
- ``first(e)``: fixed window: the earliest event (late earlier events replace it; later ones
  never matter). Sliding window: every entered and pending event (the earliest inside slides).
  ``last(e)``: the latest entered event (older entered ones never become the latest) and every
  pending one. The picked event's value is tested at evaluation time, so picks add the timers of
  their test (``.timestamp more than 365 days ago``, anniversaries).
- Sequences: the events matching any step (with the steps they match), relevant to a chain that
  could still count. For each first-step event the chain (positive) or the deadline check
  (absent last) is recomputed from them; each start is active from ``max(chain complete or
  deadline passed, start inside the window's upper bound)`` until it leaves the window. Sliding
  first-step window: events older than the lower bound at ``W`` are dropped. Fixed, positive:
  a chain that counts counts forever (late events only add chains), so the state keeps the
  earliest instant one counts (each chain is found when its last event arrives, among the
  starts at most ``D`` before that event) and collapses to "done" once ``W`` reaches it; the
  events stay, for chains a late event may still complete. Fixed, absent last: the events stay
  (a late event of the absent step can break a chain at any time). Bound: the relevant events,
  capped.
- Attributes (``signup_at within last 30 days``, anniversaries), consents: no state; timers at
  the window edges of the attribute's value, and at the local midnight (profile time zone, as
  the in-memory evaluator reads it) of the next day on which an anniversary test turns.
- ``and``/``or``/``not``: combine; a timer is the earliest of the children's.

The cap
-------
Where the state holds "the events of a window", a node keeps at most ``max_events`` of them.
Past the cap it drops the oldest (or, for pending events of a fixed window, the newest) and
records when the dropped ones could still matter: until they leave a sliding window, from when
they would enter a fixed one. At those instants the node's answer is *unknown* and, unless the
rest of the tree decides the answer anyway (``and`` with a false part, ``or`` with a true one),
``member`` raises :class:`StateOverflow`: the caller evaluates that profile in batch meanwhile
(``next_change`` still gives the instant worth retrying at). A sequence with a fixed first-step
window summarises the starts it drops (the earliest instant one of them holds) and stays exact
unless a matching event arrives that is no later than ``D`` after the newest dropped one; from
then on it is unknown (a positive one still holds whenever the kept events prove it). Replaying
a history in timestamp order never causes that, so rebuilding a state that way restores
exactness. A number property that is NaN or infinite (not JSON, though Python's decoder reads
them) makes an aggregate or pick unknown while that event could matter, rather than storing it.
The answer is never wrong: it is exact or unknown.

Not streamable (:func:`plan`): a ``where`` filter whose result depends on the moment of
evaluation (a property test with a window moving with now, or an anniversary read in the
profile's time zone): whether an old event matches changes as time passes, so no state short of
the whole history answers it. Such audiences are evaluated in batch.

The tree must be checked, without ``in audience`` (expanded first): else ``ValueError``.

Pure: no I/O, no clock (``now`` is always an argument).
"""

from __future__ import annotations

import hashlib
import math
import operator
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any, Final, Protocol, TypeAlias

from waymark.model.schemas import FieldType
from waymark.segmentation.compile.memory import (
    MemoryEvent,
    PreparedProfile,
    ProfileData,
    compile_memory,
    compile_where,
    path_getter,
)
from waymark.segmentation.lang.ast import (
    COMPARE,
    Aggregate,
    AggregateFn,
    Ago,
    And,
    Anniversary,
    At,
    Attr,
    Between,
    CompareOp,
    Consent,
    Count,
    Duration,
    EventRef,
    Expr,
    Filter,
    FilterAnd,
    FilterNot,
    FilterOr,
    InAudience,
    Last,
    Next,
    Not,
    Occurs,
    Older,
    Or,
    Pick,
    Prop,
    Sequence,
    Test,
    Which,
    Window,
    Within,
    calendar_date,
    is_date_only,
    local_today,
    next_anniversary,
    parse_moment,
    read_number,
    reader,
)
from waymark.segmentation.lang.printer import to_text

__all__ = [
    "Asking",
    "Plan",
    "ProfileView",
    "State",
    "StateOverflow",
    "StreamingAudience",
    "compile_streaming",
    "from_micros",
    "plan",
    "to_micros",
]

#: The state of one (profile, audience): JSON (dicts, lists, strings, numbers, booleans, None).
State: TypeAlias = dict[str, Any]
#: A kept event: ``[timestamp_us, seq]`` or ``[timestamp_us, seq, value]``.
_Item: TypeAlias = list[Any]
#: An unknown span of instants ``[from, until]`` (None: unbounded), or None.
_Unknown: TypeAlias = list[int | None] | None

_VERSION: Final = 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final = timedelta(microseconds=1)
_DAY: Final = 86_400_000_000
_FIRST: Final = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MICRO
_LAST: Final = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MICRO
#: How many days ahead an anniversary's turn is looked for; it turns within two years or never.
_ANNIVERSARY_HORIZON: Final = 800

_OPS: Final = COMPARE


class StateOverflow(Exception):
    """The answer depends on what the state could not keep (events past a node's cap, or a
    number that is not JSON): evaluate this profile in batch. ``next_change`` still gives the
    instant at which to try the streaming answer again."""


class ProfileView(Protocol):
    """What ``member`` reads of the profile now (a :class:`.memory.ProfileData` will do):
    JSON-decoded attributes, and consents by (channel, purpose) (absent: ``"unknown"``)."""

    @property
    def attributes(self) -> Mapping[str, Any]: ...

    @property
    def consents(self) -> Mapping[tuple[str, str], str]: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """Whether a checked tree can be evaluated exactly with bounded state; if not, ``reason``
    says why, as a sentence for the user (the audience is then evaluated in batch)."""

    streamable: bool
    reason: str | None = None


# -- instants ---------------------------------------------------------------------------------


#: the instant converted last and its microseconds, as one tuple (replaced whole: threads safe)
_last: list[tuple[datetime | None, int]] = [(None, 0)]


def _micros(moment: datetime) -> int:
    known = _last[0]
    if moment is known[0]:  # the same "now" is converted for every audience of a profile
        return known[1]
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("instants must be aware datetimes")
    micros = (moment - _EPOCH) // _MICRO
    _last[0] = (moment, micros)
    return micros


def _moment(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


#: public names of the conversions, for the callers that store instants as the states do
to_micros = _micros
from_micros = _moment


def _span(duration: Duration) -> int:
    return duration.delta // _MICRO


def _after(candidates: Iterator[int | None] | list[int | None], t: int) -> int | None:
    """The earliest candidate instant after ``t``."""
    best: int | None = None
    for candidate in candidates:
        if candidate is not None and candidate > t and (best is None or candidate < best):
            best = candidate
    return best


def _earliest(*instants: int | None) -> int | None:
    present = [instant for instant in instants if instant is not None]
    return min(present) if present else None


@dataclass(frozen=True, slots=True)
class _Bounds:
    """A window at instant ``t``: ``lo_abs <= x``, ``t + lo_off <= x``, ``x <= hi_abs`` (``<``
    if ``hi_abs_open``) and ``x <= t + hi_off`` (``<`` if ``hi_off_open``); None: no such bound.
    The moving bounds only move forward with ``t``."""

    lo_abs: int | None = None
    lo_off: int | None = None
    hi_abs: int | None = None
    hi_abs_open: bool = False
    hi_off: int | None = None
    hi_off_open: bool = False

    @property
    def sliding(self) -> bool:
        """Whether the lower bound moves (events leave the window)."""
        return self.lo_off is not None

    def fixed_ok(self, x: int) -> bool:
        """Whether ``x`` is inside the fixed bounds (the same at every instant)."""
        if self.lo_abs is not None and x < self.lo_abs:
            return False
        if self.hi_abs is None:
            return True
        return x < self.hi_abs if self.hi_abs_open else x <= self.hi_abs

    def lo_ok(self, x: int, t: int) -> bool:
        return self.lo_off is None or x >= t + self.lo_off

    def hi_ok(self, x: int, t: int) -> bool:
        if self.hi_off is None:
            return True
        return x < t + self.hi_off if self.hi_off_open else x <= t + self.hi_off

    def contains(self, x: int, t: int) -> bool:
        return self.fixed_ok(x) and self.lo_ok(x, t) and self.hi_ok(x, t)

    def enter(self, x: int) -> int | None:
        """The first instant at which ``x`` is inside the moving upper bound (None: always)."""
        if self.hi_off is None:
            return None
        return x - self.hi_off + (1 if self.hi_off_open else 0)

    def leave(self, x: int) -> int | None:
        """The first instant at which ``x`` is below the moving lower bound (None: never)."""
        return None if self.lo_off is None else x - self.lo_off + 1

    def entered_count(self, items: list[_Item], t: int) -> int:
        """How many of ``items`` (ordered) are inside the moving upper bound at ``t``: a prefix."""
        if self.hi_off is None:
            return len(items)
        edge = t + self.hi_off
        if self.hi_off_open:
            return bisect_left(items, edge, key=_stamp)
        return bisect_right(items, edge, key=_stamp)

    def gone_count(self, items: list[_Item], t: int) -> int:
        """How many of ``items`` (ordered) are below the moving lower bound at ``t``: a prefix."""
        if self.lo_off is None:
            return 0
        return bisect_left(items, t + self.lo_off, key=_stamp)


def _at(bound: At) -> int:
    moment = parse_moment(bound.text)
    if moment is None:  # the checker refuses these
        raise ValueError(f"not a date or timestamp: {bound.text!r}")
    return _micros(moment)


def _bounds(window: Window | None, *, events: bool) -> _Bounds:
    """The bounds of ``window`` as :func:`.ast.resolve` reads it; for events (``events``) also
    the visibility bound ``x <= t``, which caps ``within next`` at now."""
    if window is None:
        return _Bounds(hi_off=0)
    if isinstance(window, Last):
        return _Bounds(lo_off=-_span(window.duration), hi_off=0)
    if isinstance(window, Next):
        return _Bounds(lo_off=0, hi_off=0 if events else _span(window.duration))
    if isinstance(window, Older):
        return _Bounds(hi_off=-_span(window.duration), hi_off_open=True)
    if not isinstance(window, Between):
        raise ValueError(f"not a window: {window!r}")
    lo_abs = lo_off = hi_abs = hi_off = None
    hi_abs_open = False
    if isinstance(window.start, Ago):
        lo_off = -_span(window.start.duration)
    else:
        lo_abs = _at(window.start)
    if isinstance(window.end, Ago):
        hi_off = -_span(window.end.duration)
        if events:
            hi_off = min(hi_off, 0)
    else:
        hi_abs = _at(window.end)
        if is_date_only(window.end.text):
            hi_abs += _DAY
            hi_abs_open = True
        if events:
            hi_off = 0
    return _Bounds(lo_abs, lo_off, hi_abs, hi_abs_open, hi_off)


# -- kept events ----------------------------------------------------------------------------------


#: a kept event's timestamp, and its order (timestamp, seq): both integers in every state
_stamp: Final[Callable[[_Item], int]] = operator.itemgetter(0)
_key: Final[Callable[[_Item], tuple[int, int]]] = operator.itemgetter(0, 1)


def _merge(older: list[_Item], newer: list[_Item]) -> list[_Item]:
    """Two ordered lists as one."""
    if not newer:
        return older
    if not older or _key(older[-1]) <= _key(newer[0]):
        return older + newer
    return sorted(older + newer, key=_key)


def _unknown_at(unknown: _Unknown, t: int) -> bool:
    if unknown is None:
        return False
    start, until = unknown
    return (start is None or t >= start) and (until is None or t <= until)


def _widen(unknown: _Unknown, start: int | None, until: int | None) -> list[int | None]:
    """The smallest span holding ``unknown`` and ``[start, until]`` (None: unbounded)."""
    if unknown is None:
        return [start, until]
    old_start, old_until = unknown
    return [
        None if old_start is None or start is None else min(old_start, start),
        None if old_until is None or until is None else max(old_until, until),
    ]


def _settle(unknown: _Unknown, w: int) -> _Unknown:
    """``unknown``, forgotten once it ends before the watermark."""
    if unknown is not None and unknown[1] is not None and unknown[1] < w:
        return None
    return unknown


def _unknown_edges(unknown: _Unknown) -> list[int | None]:
    if unknown is None:
        return []
    start, until = unknown
    return [start, None if until is None else until + 1]


# -- exact sums -----------------------------------------------------------------------------------
# A sum is kept exactly as ``mantissa * 2**exponent`` (every float is one), stored as
# ``[str(mantissa), exponent]``; it rounds once, correctly, as ``math.fsum`` does.

_Exact: TypeAlias = tuple[int, int]
_ZERO: Final[_Exact] = (0, 0)


def _exact(value: float) -> _Exact:
    numerator, denominator = value.as_integer_ratio()
    return numerator, 1 - denominator.bit_length()


def _plus(left: _Exact, right: _Exact) -> _Exact:
    if left[0] == 0:
        return right
    if right[0] == 0:
        return left
    exponent = min(left[1], right[1])
    mantissa = (left[0] << (left[1] - exponent)) + (right[0] << (right[1] - exponent))
    if mantissa == 0:
        return _ZERO
    shift = (mantissa & -mantissa).bit_length() - 1
    return mantissa >> shift, exponent + shift


def _rounded(total: _Exact) -> float:
    """The float nearest to ``total`` (``OverflowError`` beyond the float range, like fsum)."""
    mantissa, exponent = total
    if exponent >= 0:
        return float(mantissa << exponent)
    return mantissa / (1 << -exponent)


def _load_exact(stored: list[Any]) -> _Exact:
    return int(stored[0]), int(stored[1])


def _dump_exact(total: _Exact) -> list[Any]:
    return [str(total[0]), total[1]]


# -- values -------------------------------------------------------------------------------------


def _nest(path: str, value: Any) -> dict[str, Any]:
    """Properties in which ``path`` reads ``value``."""
    if value is None:
        return {}
    out: dict[str, Any] = {}
    inner = out
    *parents, leaf = path.split(".")
    for part in parents:
        inner[part] = {}
        inner = inner[part]
    inner[leaf] = value
    return out


def _finite(value: Any) -> bool:
    """Whether a JSON-decoded value holds no NaN or infinity (not JSON, though Python's decoder
    accepts them): such a value makes a node's answer unknown, never a non-JSON state."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    if isinstance(value, list):
        return all(_finite(item) for item in value)
    return True


def _zone(attributes: Mapping[str, Any]) -> str | None:
    zone = attributes.get("timezone")
    return zone if isinstance(zone, str) else None


def _anniversary_turn(day: date, ahead: int, zone: str | None, t: int) -> int | None:
    """The first instant after ``t`` at which ``in next ahead days`` of ``day`` turns, in the
    profile's zone; None when it never does."""
    span = timedelta(days=ahead)

    def holds(today: date) -> bool:
        return next_anniversary(day, today) <= today + span

    try:
        today = local_today(_moment(t), zone)
        now = holds(today)
        for offset in range(1, _ANNIVERSARY_HORIZON):
            target = today + timedelta(days=offset)
            if holds(target) != now:
                break
        else:
            return None
    except OverflowError:  # the end of the calendar
        return None
    # The first instant whose local date is ``target`` (local dates only move forward).
    low, high = t, min(t + (offset + 2) * _DAY, _LAST)
    if local_today(_moment(high), zone) < target:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if local_today(_moment(middle), zone) >= target:
            high = middle
        else:
            low = middle
    return high


@lru_cache(maxsize=1024)
def _value_bounds(window: Window) -> _Bounds:
    """The bounds of an attribute's window (cached: a workspace has few windows)."""
    return _bounds(window, events=False)


def _turns(test: Test, kind: FieldType) -> Callable[[Any, str | None, int], int | None] | None:
    """For a test that time alone can turn (a window or an anniversary), the function of a
    stored value ``raw``, the profile's zone and an instant ``t`` that gives the first instant
    after ``t`` at which the test may turn; None for any other test."""
    if isinstance(test, Within):
        bounds = _value_bounds(test.window)
        read = reader(kind)

        def within(raw: Any, _zone: str | None, t: int) -> int | None:
            moment = read(raw)
            if not isinstance(moment, datetime):
                return None
            x = _micros(moment)
            return _after([bounds.enter(x), bounds.leave(x)], t)

        return within
    if isinstance(test, Anniversary):
        days = test.days

        def anniversary(raw: Any, zone: str | None, t: int) -> int | None:
            day = calendar_date(raw, kind)
            return None if day is None else _anniversary_turn(day, days, zone, t)

        return anniversary
    return None


def _timeless(node: Filter) -> bool:
    """Whether no property test of the filter reads the moment (a window or anniversary)."""
    if isinstance(node, Prop):
        return not isinstance(node.test, Within | Anniversary)
    if isinstance(node, FilterAnd | FilterOr):
        return all(_timeless(item) for item in node.items)
    if isinstance(node, FilterNot):
        return _timeless(node.item)
    raise ValueError(f"not a property filter: {node!r}")


#: the profile the filters without a moment are given (they never read it)
_TIMELESS: Final = PreparedProfile(ProfileData({}, (), {}), datetime(1970, 1, 1, tzinfo=UTC))


def _matcher(ref: EventRef) -> Callable[[MemoryEvent], bool]:
    """Whether an event matches ``ref``'s name and ``where`` (not its window), as the in-memory
    evaluator decides it for that event alone. The filter must not depend on the moment."""
    name = ref.name
    if ref.where is None:
        return lambda event: event.name == name
    if _timeless(ref.where):
        where = compile_where(ref.where)

        def test(event: MemoryEvent) -> bool:
            return event.name == name and where(event.properties, _TIMELESS)

        return test
    run = compile_memory(Occurs(EventRef(name, ref.where))).run

    def match(event: MemoryEvent) -> bool:
        if event.name != name:
            return False
        return run(PreparedProfile(ProfileData({}, (event,), {}), event.timestamp))

    return match


# -- evaluation -----------------------------------------------------------------------------------


class Asking:
    """One question: a profile (attributes and consents now) at one instant ``now`` (aware).
    Build it once per profile and instant and pass it to :meth:`StreamingAudience.step` of
    every audience asked about that profile then: what the audiences read of the profile is
    prepared once for all of them."""

    __slots__ = ("_prepared", "attributes", "consents", "judged", "now", "t", "zone")

    def __init__(self, profile: ProfileView, now: datetime, t: int | None = None) -> None:
        self.attributes = profile.attributes
        self.consents = profile.consents
        self.now = now
        #: ``now`` in microseconds since 1970
        self.t: int = _micros(now) if t is None else t
        self.zone = _zone(self.attributes)
        self._prepared: PreparedProfile | None = None
        #: answers and turns of attribute and consent conditions, by condition: audiences
        #: that share one judge it once
        self.judged: dict[str, tuple[bool | None, int | None]] = {}

    @property
    def prepared(self) -> PreparedProfile:
        """The profile without events, for attribute and consent conditions."""
        if self._prepared is None:
            profile = ProfileData(self.attributes, (), self.consents)
            self._prepared = PreparedProfile(profile, self.now)
        return self._prepared

    def at(self, t: int) -> Asking:
        """The same profile asked at ``t`` (microseconds)."""
        if t == self.t:
            return self
        return Asking(self, _moment(t), t)


_Context = Asking


#: a new event with its timestamp in microseconds
Stamped: TypeAlias = tuple[int, MemoryEvent]


class Arrivals:
    """One profile's new events, each with its timestamp in microseconds, grouped by name once
    for every audience asked about the profile: each condition reads only the events it can
    take, in the order given (the order in which :meth:`StreamingAudience.step` folds them)."""

    __slots__ = ("_of_names", "events", "groups")

    def __init__(self, events: list[Stamped]) -> None:
        self.events = events
        groups: dict[str, list[Stamped]] = {}
        for item in events:
            group = groups.get(item[1].name)
            if group is None:
                groups[item[1].name] = [item]
            else:
                group.append(item)
        #: event name -> its events, in the order given
        self.groups = groups
        self._of_names: dict[frozenset[str], list[Stamped]] = {}

    def of(self, names: frozenset[str]) -> list[Stamped]:
        """The events named one of ``names``, in the order given (kept for the next caller)."""
        found = self._of_names.get(names)
        if found is None:
            found = [item for item in self.events if item[1].name in names]
            self._of_names[names] = found
        return found


#: no new events
NO_ARRIVALS: Final = Arrivals([])


class _Node:
    """A compiled condition: its answer (None: unknown) and its next turn, from the state."""

    def value(self, slots: list[Any], ctx: _Context) -> bool | None:
        raise NotImplementedError

    def change(self, slots: list[Any], ctx: _Context) -> int | None:
        raise NotImplementedError

    def judge(self, slots: list[Any], ctx: _Context) -> tuple[bool | None, int | None]:
        """``value`` and ``change`` at once."""
        return self.value(slots, ctx), self.change(slots, ctx)


class _All(_Node):
    def __init__(self, items: tuple[_Node, ...]) -> None:
        self.items = items

    def value(self, slots: list[Any], ctx: _Context) -> bool | None:
        answer: bool | None = True
        for item in self.items:
            found = item.value(slots, ctx)
            if found is False:
                return False
            if found is None:
                answer = None
        return answer

    def change(self, slots: list[Any], ctx: _Context) -> int | None:
        return _earliest(*(item.change(slots, ctx) for item in self.items))

    def judge(self, slots: list[Any], ctx: _Context) -> tuple[bool | None, int | None]:
        answer: bool | None = True
        turn: int | None = None
        for item in self.items:
            found, when = item.judge(slots, ctx)
            if found is False:
                answer = False
            elif found is None and answer is True:
                answer = None
            if when is not None and (turn is None or when < turn):
                turn = when
        return answer, turn


class _Any(_Node):
    def __init__(self, items: tuple[_Node, ...]) -> None:
        self.items = items

    def value(self, slots: list[Any], ctx: _Context) -> bool | None:
        answer: bool | None = False
        for item in self.items:
            found = item.value(slots, ctx)
            if found is True:
                return True
            if found is None:
                answer = None
        return answer

    def change(self, slots: list[Any], ctx: _Context) -> int | None:
        return _earliest(*(item.change(slots, ctx) for item in self.items))

    def judge(self, slots: list[Any], ctx: _Context) -> tuple[bool | None, int | None]:
        answer: bool | None = False
        turn: int | None = None
        for item in self.items:
            found, when = item.judge(slots, ctx)
            if found is True:
                answer = True
            elif found is None and answer is False:
                answer = None
            if when is not None and (turn is None or when < turn):
                turn = when
        return answer, turn


class _Negation(_Node):
    def __init__(self, item: _Node) -> None:
        self.item = item

    def value(self, slots: list[Any], ctx: _Context) -> bool | None:
        found = self.item.value(slots, ctx)
        return None if found is None else not found

    def change(self, slots: list[Any], ctx: _Context) -> int | None:
        return self.item.change(slots, ctx)

    def judge(self, slots: list[Any], ctx: _Context) -> tuple[bool | None, int | None]:
        found, turn = self.item.judge(slots, ctx)
        return None if found is None else not found, turn


class _Profile(_Node):
    """An attribute or consent condition: read from the profile now, by the in-memory
    evaluator; an attribute's time tests turn at its window edges or anniversary."""

    def __init__(self, node: Attr | Consent) -> None:
        self.run = compile_memory(node).run
        attr = node if isinstance(node, Attr) else None
        #: when time alone turns the test (a window or an anniversary): its turns
        self.turns = (
            _turns(attr.test, attr.kind) if attr is not None and attr.kind is not None else None
        )
        self.get = path_getter(node.path) if isinstance(node, Attr) else None
        #: the condition, the same for every audience with it: one answer per question
        self.key = repr(node)

    def value(self, slots: list[Any], ctx: _Context) -> bool | None:
        return self.run(ctx.prepared)

    def change(self, slots: list[Any], ctx: _Context) -> int | None:
        turns = self.turns
        if turns is None or self.get is None:
            return None
        return turns(self.get(ctx.attributes), ctx.zone, ctx.t)

    def judge(self, slots: list[Any], ctx: _Context) -> tuple[bool | None, int | None]:
        judged = ctx.judged
        found = judged.get(self.key)
        if found is None:
            turn = None if self.turns is None else self.change(slots, ctx)
            found = (self.run(ctx.prepared), turn)
            judged[self.key] = found
        return found


class _EventNode(_Node):
    """An event condition with its own slot of the state."""

    def __init__(self, index: int, ref: EventRef, cap: int) -> None:
        self.index = index
        self.cap = cap
        self.bounds = bounds = _bounds(ref.window, events=True)
        self.match = _matcher(ref)
        #: the names of the events this node reads
        self.names: frozenset[str] = frozenset({ref.name})
        self.name = ref.name
        #: the one name this node reads (None when it reads several)
        self.only_name: str | None = ref.name
        #: whether the event's name is all ``accepts`` needs to look at
        self.by_name_only = ref.where is None and bounds.lo_abs is None and bounds.hi_abs is None

    def accepts(self, event: MemoryEvent, x: int) -> bool:
        if self.by_name_only:
            return event.name == self.name
        return self.bounds.fixed_ok(x) and self.match(event)

    def new(self) -> dict[str, Any]:
        raise NotImplementedError

    def add(self, slot: dict[str, Any], event: MemoryEvent, x: int, w: int) -> dict[str, Any]:
        """``slot`` with ``event`` (at ``x``) folded in, pruned for the watermark ``w``; the
        same object when the event does not concern this node. Never mutates ``slot``."""
        raise NotImplementedError

    def add_all(self, slot: dict[str, Any], taken: list[Stamped], w: int) -> dict[str, Any]:
        """``slot`` with each of ``taken`` (in the order given) folded in by :meth:`add`."""
        add = self.add
        for x, event in taken:
            slot = add(slot, event, x, w)
        return slot

    def _sliding_cap(
        self, entered: list[_Item], pending: list[_Item], unknown: _Unknown
    ) -> tuple[list[_Item], list[_Item], _Unknown]:
        """Drop the oldest kept events beyond the cap (sliding windows): the answer is unknown
        until the newest dropped one leaves the window."""
        excess = len(entered) + len(pending) - self.cap
        if excess <= 0:
            return entered, pending, unknown
        lo_off = self.bounds.lo_off
        assert lo_off is not None
        merged = entered + pending
        newest = _stamp(merged[excess - 1])
        cut = min(excess, len(entered))
        return entered[cut:], pending[excess - cut :], _widen(unknown, None, newest - lo_off)

    def _unknowable(self, slot: dict[str, Any], x: int) -> dict[str, Any]:
        """``slot``, unknown while an event at ``x`` with a non-finite value could matter."""
        lo_off = self.bounds.lo_off
        return {**slot, "u": _widen(slot.get("u"), None, None if lo_off is None else x - lo_off)}

    def _pending_cap(self, pending: list[_Item], unknown: _Unknown) -> tuple[list[_Item], _Unknown]:
        """Drop the newest pending events beyond the cap (fixed windows): the answer is unknown
        from when the first dropped one would enter, on."""
        if len(pending) <= self.cap:
            return pending, unknown
        dropped = pending[self.cap]
        return pending[: self.cap], _widen(unknown, self.bounds.enter(_stamp(dropped)), None)


class _CountNode(_EventNode):
    """``count(e) OP k`` (and ``e`` as ``count(e) >= 1``)."""

    def __init__(self, index: int, ref: EventRef, op: CompareOp, value: int, cap: int) -> None:
        super().__init__(index, ref, cap)
        self.op = _OPS[op]
        self.target = float(value)
        #: Only min(count, keep) matters for the comparison.
        self.keep = value if op in (CompareOp.GE, CompareOp.LT) else value + 1
        #: a sliding window whose kept events fit under the cap: its slots with nothing
        #: pending or unknown take the fast paths of :meth:`add`, :meth:`add_all` and :meth:`judge`
        self.simple_kind = self.bounds.sliding and self.keep <= cap

    def new(self) -> dict[str, Any]:
        return {"c": 0, "e": [], "p": [], "u": None}

    def add(self, slot: dict[str, Any], event: MemoryEvent, x: int, w: int) -> dict[str, Any]:
        if self.by_name_only:
            if event.name != self.name or self.keep <= 0:
                return slot
        elif self.keep <= 0 or not self.accepts(event, x):
            return slot
        bounds = self.bounds
        if self.simple_kind and not slot["p"] and slot["u"] is None:
            hi_off = bounds.hi_off
            if hi_off is None or (x < w + hi_off if bounds.hi_off_open else x <= w + hi_off):
                # The common case, the same as below: a sliding window with nothing pending
                # or unknown, and an event that is inside the upper bound now.
                lo = w + bounds.lo_off  # type: ignore[operator]
                if x < lo:
                    return slot  # already gone
                entered: list[_Item] = slot["e"]
                seq = event.seq
                keep = self.keep
                if entered and _key(entered[-1]) > (x, seq):
                    if len(entered) >= keep and _key(entered[0]) > (x, seq):
                        return slot  # older than every kept one, and they are enough
                    entered = list(entered)
                    insort(entered, [x, seq], key=_key)
                elif len(entered) < keep:
                    entered = [*entered, [x, seq]]
                else:  # the newest: the oldest kept one makes way
                    entered = [*entered[len(entered) - keep + 1 :], [x, seq]]
                cut = max(
                    bisect_left(entered, lo, key=_stamp) if entered[0][0] < lo else 0,
                    len(entered) - keep,
                )
                return {"c": slot["c"], "e": entered[cut:] if cut else entered, "p": [], "u": None}
        counter: int = slot["c"]
        entered = slot["e"]
        pending: list[_Item] = list(slot["p"])
        unknown: _Unknown = _settle(slot["u"], w)
        insort(pending, [x, event.seq], key=_key)
        moved = bounds.entered_count(pending, w)
        arrived, pending = pending[:moved], pending[moved:]
        if bounds.sliding:
            entered = _merge(entered, arrived)
            entered = entered[bounds.gone_count(entered, w) :]
            pending = pending[bounds.gone_count(pending, w) :]
            entered = entered[max(len(entered) - self.keep, 0) :]
            entered, pending, unknown = self._sliding_cap(entered, pending, unknown)
        else:
            counter = min(counter + len(arrived), self.keep)
            pending = pending[: max(self.keep - counter, 0)]
            pending, unknown = self._pending_cap(pending, unknown)
        return {"c": counter, "e": entered, "p": pending, "u": unknown}

    def add_all(self, slot: dict[str, Any], taken: list[Stamped], w: int) -> dict[str, Any]:
        # The common run at once: a sliding window by name alone with nothing pending or
        # unknown, and events each newer than the last, all inside the upper bound. Folded one
        # by one, each keeps the newest ``keep`` events not below the lower bound, so together
        # they keep those of all the kept and new ones.
        if not (self.simple_kind and self.by_name_only) or slot["p"] or slot["u"] is not None:
            return super().add_all(slot, taken, w)
        keep = self.keep
        if keep <= 0 or len(taken) < 2:
            return super().add_all(slot, taken, w)
        bounds = self.bounds
        hi_off = bounds.hi_off
        entered: list[_Item] = slot["e"]
        last = _key(entered[-1]) if entered else None
        for x, event in taken:
            if last is not None and (x, event.seq) <= last:
                return super().add_all(slot, taken, w)
            last = (x, event.seq)
        if hi_off is not None:
            x = taken[-1][0]  # the newest
            if not (x < w + hi_off if bounds.hi_off_open else x <= w + hi_off):
                return super().add_all(slot, taken, w)
        lo = w + bounds.lo_off  # type: ignore[operator]
        fresh = [[x, event.seq] for x, event in taken if x >= lo]
        if not fresh:
            return slot  # all already gone
        merged = [*entered, *fresh]
        start = max(len(merged) - keep, bisect_left(merged, lo, key=_stamp))
        return {"c": slot["c"], "e": merged[start:], "p": [], "u": None}

    def judge(self, slots: list[Any], ctx: _Context) -> tuple[bool | None, int | None]:
        if self.keep <= 0:
            return self.op(0.0, self.target), None
        slot = slots[self.index]
        if not self.simple_kind or slot["p"] or slot["u"] is not None:
            return self.value(slots, ctx), self.change(slots, ctx)
        # Every kept event is inside the upper bound; they leave oldest first.
        lo_off: int = self.bounds.lo_off  # type: ignore[assignment]
        entered: list[_Item] = slot["e"]
        inside = bisect_left(entered, ctx.t + lo_off, key=_stamp)
        count = slot["c"] + len(entered) - inside
        op, target = self.op, self.target
        before = op(float(count), target)
        last = len(entered) - 1
        for position in range(inside, last + 1):
            count -= 1
            x = entered[position][0]
            if position < last and entered[position + 1][0] == x:
                continue  # leaves at the same instant as the next one
            if op(float(count), target) != before:
                return before, x - lo_off + 1
        return before, None

    def value(self, slots: list[Any], ctx: _Context) -> bool | None:
        if self.keep <= 0:
            return self.op(0.0, self.target)
        slot = slots[self.index]
        t = ctx.t
        if _unknown_at(slot["u"], t):
            return None
        bounds = self.bounds
        count = sum(1 for item in slot["e"] if bounds.lo_ok(item[0], t))
        count += sum(
            1 for item in slot["p"] if bounds.hi_ok(item[0], t) and bounds.lo_ok(item[0], t)
        )
        return self.op(float(slot["c"] + count), self.target)

    def change(self, slots: list[Any], ctx: _Context) -> int | None:
        """Exact: sweep the instants at which kept events enter and leave, in order, to the
        first at which the comparison turns."""
        if self.keep <= 0:
            return None
        slot = slots[self.index]
        t = ctx.t
        edges = _after(_unknown_edges(slot["u"]), t)
        bounds = self.bounds
        count = slot["c"]
        steps: dict[int, int] = {}
        for item in slot["e"] + slot["p"]:
            x = item[0]
            entry, leaving = bounds.enter(x), bounds.leave(x)
            if bounds.hi_ok(x, t) and bounds.lo_ok(x, t):
                count += 1
            elif entry is None or entry <= t or (leaving is not None and leaving <= entry):
                continue  # gone, or never inside
            else:
                steps[entry] = steps.get(entry, 0) + 1
            if leaving is not None:
                steps[leaving] = steps.get(leaving, 0) - 1
        before = self.op(float(count), self.target)
        for instant in sorted(steps):
            if edges is not None and instant >= edges:
                break
            count += steps[instant]
            if self.op(float(count), self.target) != before:
                return instant
        return edges


class _AggregateNode(_EventNode):
    """``sum/avg/min/max(e.path) OP x`` over the matching events with a number there."""

    def __init__(self, index: int, node: Aggregate, cap: int) -> None:
        super().__init__(index, node.event, cap)
        self.fn = node.fn
        self.get = path_getter(node.path)
        self.op = _OPS[node.op]
        self.target = float(node.value)
        self.best: Callable[[float, float], bool] = (
            operator.lt if node.fn is AggregateFn.MIN else operator.gt
        )

    def new(self) -> dict[str, Any]:
        if self.bounds.sliding:
            return {"e": [], "p": [], "u": None}
        return {"s": _dump_exact(_ZERO), "n": 0, "m": None, "p": [], "u": None}

    def _beaten(self, items: list[_Item], champion: float | None) -> list[_Item]:
        """The items (oldest first) each strictly better than ``champion`` and every older one."""
        kept = []
        for item in items:
            if champion is None or self.best(item[2], champion):
                kept.append(item)
                champion = item[2]
        return kept

    def add(self, slot: dict[str, Any], event: MemoryEvent, x: int, w: int) -> dict[str, Any]:
        number = read_number(self.get(event.properties))
        if number is None or not self.accepts(event, x):
            return slot
        if not math.isfinite(number):
            return self._unknowable(slot, x)
        bounds = self.bounds
        pending: list[_Item] = list(slot["p"])
        unknown: _Unknown = _settle(slot["u"], w)
        insort(pending, [x, event.seq, number], key=_key)
        moved = bounds.entered_count(pending, w)
        arrived, pending = pending[:moved], pending[moved:]
        ranked = self.fn in (AggregateFn.MIN, AggregateFn.MAX)
        if bounds.sliding:
            entered = _merge(slot["e"], arrived)
            entered = entered[bounds.gone_count(entered, w) :]
            pending = pending[bounds.gone_count(pending, w) :]
            if ranked:  # a newer entered value at least as good outlives an older one
                entered = self._beaten(entered[::-1], None)[::-1]
            entered, pending, unknown = self._sliding_cap(entered, pending, unknown)
            return {"e": entered, "p": pending, "u": unknown}
        total = _load_exact(slot["s"])
        count: int = slot["n"]
        champion: float | None = slot["m"]
        for item in arrived:
            total = _plus(total, _exact(item[2]))
            count += 1
            if champion is None or self.best(item[2], champion):
                champion = item[2]
        if ranked:
            pending = self._beaten(pending, champion)
        pending, unknown = self._pending_cap(pending, unknown)
        return {"s": _dump_exact(total), "n": count, "m": champion, "p": pending, "u": unknown}

    def value(self, slots: list[Any], ctx: _Context) -> bool | None:
        slot = slots[self.index]
        t = ctx.t
        if _unknown_at(slot["u"], t):
            return None
        bounds = self.bounds
        arrived = [
            item[2] for item in slot["p"] if bounds.hi_ok(item[0], t) and bounds.lo_ok(item[0], t)
        ]
        fn = self.fn
        if bounds.sliding:
            numbers = [item[2] for item in slot["e"] if bounds.lo_ok(item[0], t)] + arrived
            if fn is AggregateFn.SUM:
                return self.op(math.fsum(numbers), self.target)
            if not numbers:
                return False
            if fn is AggregateFn.AVG:
                return self.op(math.fsum(numbers) / len(numbers), self.target)
            found = min(numbers) if fn is AggregateFn.MIN else max(numbers)
            return self.op(found, self.target)
        if fn in (AggregateFn.SUM, AggregateFn.AVG):
            total = _load_exact(slot["s"])
            for number in arrived:
                total = _plus(total, _exact(number))
            if fn is AggregateFn.SUM:
                return self.op(_rounded(total), self.target)
            count = slot["n"] + len(arrived)
            if count == 0:
                return False
            return self.op(_rounded(total) / count, self.target)
        candidates = arrived if slot["m"] is None else [slot["m"], *arrived]
        if not candidates:
            return False
        found = min(candidates) if fn is AggregateFn.MIN else max(candidates)
        return self.op(found, self.target)

    def change(self, slots: list[Any], ctx: _Context) -> int | None:
        slot = slots[self.index]
        bounds = self.bounds
        candidates: list[int | None] = [bounds.leave(item[0]) for item in slot.get("e", ())]
        for item in slot["p"]:
            candidates += [bounds.enter(item[0]), bounds.leave(item[0])]
        return _after(candidates + _unknown_edges(slot["u"]), ctx.t)


class _PickNode(_EventNode):
    """``first/last(e).path TEST``: the picked event's value, tested at the instant."""

    def __init__(self, index: int, node: Pick, cap: int) -> None:
        super().__init__(index, node.event, cap)
        self.first = node.which is Which.FIRST
        self.name = node.event.name
        self.path = node.path
        self.get = None if node.path is None else path_getter(node.path)
        self.test = node.test
        self.kind = FieldType.TIMESTAMP if node.path is None else node.kind
        self.turns = None if self.kind is None else _turns(node.test, self.kind)
        alone = Pick(node.which, EventRef(node.event.name), node.path, node.test, node.kind)
        self.run = compile_memory(alone).run
        #: The earliest event of a fixed window is all a ``first`` needs.
        self.single = self.first and not self.bounds.sliding

    def new(self) -> dict[str, Any]:
        if self.single:
            return {"f": None, "u": None}
        if self.first:
            return {"e": [], "p": [], "u": None}
        return {"l": None, "p": [], "u": None}

    def add(self, slot: dict[str, Any], event: MemoryEvent, x: int, w: int) -> dict[str, Any]:
        if not self.accepts(event, x):
            return slot
        item: _Item = [x, event.seq]
        if self.get is not None:
            item.append(self.get(event.properties))
        bounds = self.bounds
        if self.single:
            earliest = slot["f"]
            if earliest is not None and _key(earliest) <= _key(item):
                return slot  # never the first
        if self.get is not None and not _finite(item[2]):
            return self._unknowable(slot, x)
        if self.single:
            return {"f": item, "u": slot["u"]}
        pending: list[_Item] = list(slot["p"])
        unknown: _Unknown = _settle(slot["u"], w)
        insort(pending, item, key=_key)
        moved = bounds.entered_count(pending, w)
        arrived, pending = pending[:moved], pending[moved:]
        pending = pending[bounds.gone_count(pending, w) :]
        if self.first:
            entered = _merge(slot["e"], arrived)
            entered = entered[bounds.gone_count(entered, w) :]
            entered, pending, unknown = self._sliding_cap(entered, pending, unknown)
            return {"e": entered, "p": pending, "u": unknown}
        latest = slot["l"]
        if arrived and (latest is None or _key(latest) < _key(arrived[-1])):
            latest = arrived[-1]
        if latest is not None and not bounds.lo_ok(latest[0], w):
            latest = None  # older entered events are gone too
        pending, unknown = self._pending_cap(pending, unknown)
        return {"l": latest, "p": pending, "u": unknown}

    def _picked(self, slot: dict[str, Any], t: int) -> _Item | None:
        """The event picked at ``t`` (its slot must be known there)."""
        bounds = self.bounds
        if self.single:
            earliest = slot["f"]
            return earliest if earliest is not None and bounds.hi_ok(earliest[0], t) else None
        if self.first:
            for item in slot["e"]:
                if bounds.lo_ok(item[0], t):
                    return item  # type: ignore[no-any-return]
            for item in slot["p"]:
                if bounds.hi_ok(item[0], t) and bounds.lo_ok(item[0], t):
                    return item  # type: ignore[no-any-return]
            return None
        latest = slot["l"]
        for item in slot["p"]:
            if not bounds.hi_ok(item[0], t):
                break
            latest = item
        return latest if latest is not None and bounds.lo_ok(latest[0], t) else None

    def _raw(self, item: _Item) -> Any:
        return _moment(item[0]).isoformat() if self.path is None else item[2]

    def value(self, slots: list[Any], ctx: _Context) -> bool | None:
        slot = slots[self.index]
        if _unknown_at(slot["u"], ctx.t):
            return None
        item = self._picked(slot, ctx.t)
        if item is None:
            return False
        properties = {} if self.path is None else _nest(self.path, item[2])
        event = MemoryEvent(self.name, _moment(item[0]), item[1], properties)
        return self.run(PreparedProfile(ProfileData(ctx.attributes, (event,), {}), ctx.now))

    def change(self, slots: list[Any], ctx: _Context) -> int | None:
        slot = slots[self.index]
        bounds = self.bounds
        t = ctx.t
        kept: list[_Item] = [slot[name] for name in ("f", "l") if slot.get(name) is not None]
        kept += slot.get("e", []) + slot.get("p", [])
        candidates: list[int | None] = _unknown_edges(slot["u"])
        for item in kept:
            candidates += [bounds.enter(item[0]), bounds.leave(item[0])]
        if not _unknown_at(slot["u"], t):
            picked = self._picked(slot, t)
            if picked is not None and self.turns is not None:
                candidates.append(self.turns(self._raw(picked), ctx.zone, t))
        return _after(candidates, t)


class _SequenceNode(_EventNode):
    """``A then B ... within D`` and ``A then ... then not Z within D``."""

    def __init__(self, index: int, node: Sequence, cap: int) -> None:
        if len(node.steps) < 2:
            raise ValueError("a sequence has at least two steps")
        super().__init__(index, node.steps[0], cap)
        self.steps = tuple(_matcher(step) for step in node.steps)
        #: per event name, the steps it may play: (bit, whether it is the first step, the
        #: matcher when the step has a ``where`` filter, else None)
        plays: dict[str, list[tuple[int, bool, Callable[[MemoryEvent], bool] | None]]] = {}
        for position, (step, match) in enumerate(zip(node.steps, self.steps, strict=True)):
            filtered = None if step.where is None else match
            plays.setdefault(step.name, []).append((1 << position, position == 0, filtered))
        self.plays = plays
        #: with no filter and no fixed bound, the steps of an event by its name alone
        self.masks: dict[str, int] | None = None
        unfiltered = all(match is None for each in plays.values() for _b, _f, match in each)
        if unfiltered and self.bounds.lo_abs is None and self.bounds.hi_abs is None:
            self.masks = {name: sum(bit for bit, _f, _m in each) for name, each in plays.items()}
        #: each step's bit in a kept event's mask, and all of them
        self.bits = tuple(1 << position for position in range(len(node.steps)))
        self.every = (1 << len(node.steps)) - 1
        self.names = frozenset(step.name for step in node.steps)
        self.only_name = node.steps[0].name if len(self.names) == 1 else None
        self.within = _span(node.within)
        self.absent = node.absent_last
        #: Positive with a fixed first-step window: a chain, once it counts, counts forever,
        #: so the earliest instant one counts (``e``) is the whole answer.
        self.monotone = not self.absent and self.bounds.lo_off is None

    def new(self) -> dict[str, Any]:
        return {"b": [], "e": None, "x": None, "z": False, "d": False, "u": None}

    def _mask(self, event: MemoryEvent, x: int) -> int:
        """The steps ``event`` can play: the first within its window's fixed bounds, the others
        no earlier than the window's start and no later than ``D`` after its end."""
        plays = self.plays.get(event.name)
        if plays is None:
            return 0
        bounds = self.bounds
        later = (bounds.lo_abs is None or x >= bounds.lo_abs) and (
            bounds.hi_abs is None or x <= bounds.hi_abs + self.within
        )
        mask = 0
        for bit, first, match in plays:
            fits = bounds.fixed_ok(x) if first else later
            if fits and (match is None or match(event)):
                mask |= bit
        return mask

    def _table(self, kept: list[_Item]) -> list[tuple[list[tuple[int, int]], list[int]]]:
        """Per step, the keys and timestamps of the kept events that can play it."""
        table: list[tuple[list[tuple[int, int]], list[int]]] = [([], []) for _ in self.steps]
        bits = self.bits
        for item in kept:
            mask = item[2]
            key = (item[0], item[1])
            for bit, (keys, stamps) in zip(bits, table, strict=True):
                if mask & bit:
                    keys.append(key)
                    stamps.append(key[0])
        return table

    def _active(
        self, table: list[tuple[list[tuple[int, int]], list[int]]], start: tuple[int, int]
    ) -> tuple[int, int | None] | None:
        """When the chain from ``start`` counts: ``[from, until)`` (None: forever), or None.

        Positive: the greedy chain (the earliest next step each time) ends earliest of all
        chains from this start; it counts once it has ended. Absent last: greedy earliest steps
        up to the one before the last positive step, then the latest last positive step by the
        deadline, then no event of the absent step after it up to the deadline; it counts once
        the deadline has passed. Either way also while the start is inside the window."""
        deadline = start[0] + self.within
        previous = start
        steps = table[1:]
        last_positive = len(steps) - (1 if self.absent else 0)
        for position, (keys, stamps) in enumerate(steps[:last_positive], start=1):
            if self.absent and position == last_positive:
                latest = bisect_right(stamps, deadline)
                if latest == 0 or keys[latest - 1] <= previous:
                    return None
                previous = keys[latest - 1]
                break
            following = bisect_right(keys, previous)
            if following == len(keys) or keys[following][0] > deadline:
                return None
            previous = keys[following]
        if self.absent:
            absent = steps[-1][0]
            following = bisect_right(absent, previous)
            if following < len(absent) and absent[following][0] <= deadline:
                return None
            begins = deadline
        else:
            begins = previous[0]
        bounds = self.bounds
        entry = bounds.enter(start[0])
        if entry is not None:
            begins = max(begins, entry)
        until = bounds.leave(start[0])
        if until is not None and until <= begins:
            return None
        return begins, until

    def _spans(self, kept: list[_Item]) -> list[tuple[int, int | None]]:
        """When each kept start's chain counts (see :meth:`_active`), in the starts' order."""
        if self.absent and len(self.bits) == 2:
            return self._pair_spans(kept)
        return self._table_spans(kept)

    def _table_spans(self, kept: list[_Item]) -> list[tuple[int, int | None]]:
        """:meth:`_spans` by the table of steps, for any sequence."""
        table = self._table(kept)
        spans = []
        for start in table[0][0]:
            active = self._active(table, start)
            if active is not None:
                spans.append(active)
        return spans

    def _pair_spans(self, kept: list[_Item]) -> list[tuple[int, int | None]]:
        """:meth:`_spans` of ``A then not B within D`` in one pass from the newest kept event:
        a start's chain counts from its deadline (and its window's entry) until it leaves the
        window, unless the first B after it comes by the deadline."""
        within = self.within
        bounds = self.bounds
        spans: list[tuple[int, int | None]] = []
        following: _Item | None = None  # the first B after the position reached
        for item in reversed(kept):
            mask = item[2]
            if mask & 1:
                x = item[0]
                if following is not None and following[0] == x and following[1] == item[1]:
                    return self._table_spans(kept)  # a B tied with its start is not after it
                deadline = x + within
                if following is None or following[0] > deadline:
                    entry = bounds.enter(x)
                    begins = deadline if entry is None or entry < deadline else entry
                    until = bounds.leave(x)
                    if until is None or until > begins:
                        spans.append((begins, until))
            if mask & 2:
                following = item
        spans.reverse()
        return spans

    def add(self, slot: dict[str, Any], event: MemoryEvent, x: int, w: int) -> dict[str, Any]:
        if slot["d"]:
            return slot
        masks = self.masks
        mask = self._mask(event, x) if masks is None else masks.get(event.name, 0)
        if not mask:
            return slot
        bounds = self.bounds
        before: list[_Item] = slot["b"]
        item = [x, event.seq, mask]
        # the newest kept event (the usual case: events come about in time order)
        latest = not before or _key(before[-1]) < (x, event.seq)
        if latest:
            kept = [*before, item]
        else:
            kept = list(before)
            insort(kept, item, key=_key)
        held: int | None = slot["e"]
        lost: int | None = slot["x"]
        poisoned: bool = slot["z"]
        unknown: _Unknown = slot["u"]
        if unknown is not None:
            unknown = _settle(unknown, w)
        if bounds.lo_off is not None:
            kept = kept[bounds.gone_count(kept, w) :]
        elif lost is not None and x <= lost + self.within:
            poisoned = True  # it may form or break a chain with dropped events
        if self.monotone:
            # Every chain is found when its last event arrives: it starts at most D before it.
            # The newest event can only be a chain's last step, so one that cannot play the
            # last step completes no chain.
            if not latest or mask & self.bits[-1]:
                held = _earliest(held, self._completed_through(kept, x))
            if held is not None and held <= w:  # a chain that has held holds forever
                return {"b": [], "e": None, "x": None, "z": False, "d": True, "u": None}
        excess = len(kept) - self.cap
        if excess > 0:
            newest = _stamp(kept[excess - 1])
            if bounds.lo_off is not None:
                unknown = _widen(unknown, None, newest - bounds.lo_off)
            else:
                if self.absent:  # summarise the dropped starts that hold
                    table = self._table(kept)
                    for item in kept[:excess]:
                        active = self._active(table, _key(item)) if item[2] & 1 else None
                        if active is not None:
                            held = _earliest(held, active[0])
                lost = newest if lost is None else max(lost, newest)
            kept = kept[excess:]
        return {"b": kept, "e": held, "x": lost, "z": poisoned, "d": False, "u": unknown}

    def add_all(self, slot: dict[str, Any], taken: list[Stamped], w: int) -> dict[str, Any]:
        # The common run at once: a positive sequence with a fixed window and steps known by
        # name alone, nothing lost, unknown or held by now, and events each newer than the
        # last that cannot play the last step. Folded one by one, each is only kept (it
        # completes no chain), so together they are kept, if under the cap.
        masks = self.masks
        held = slot["e"]
        if (
            masks is None
            or not self.monotone
            or slot["d"]
            or slot["x"] is not None
            or slot["u"] is not None
            or (held is not None and held <= w)
        ):
            return super().add_all(slot, taken, w)
        before: list[_Item] = slot["b"]
        last = _key(before[-1]) if before else None
        final = self.bits[-1]
        fresh: list[_Item] = []
        for x, event in taken:
            seq = event.seq
            mask = masks.get(event.name, 0)
            if mask & final or (last is not None and (x, seq) <= last):
                return super().add_all(slot, taken, w)
            last = (x, seq)
            if mask:
                fresh.append([x, seq, mask])
        if not fresh:
            return slot
        if len(before) + len(fresh) > self.cap:
            return super().add_all(slot, taken, w)
        return {"b": [*before, *fresh], "e": held, "x": None, "z": slot["z"], "d": False, "u": None}

    def _completed_through(self, kept: list[_Item], x: int) -> int | None:
        """The earliest instant at which a chain starting no more than D before ``x`` (so
        possibly through the event at ``x``) counts."""
        low = bisect_left(kept, x - self.within, key=_stamp)
        high = bisect_right(kept, x + self.within, key=_stamp)
        near = kept[low:high]
        played = 0
        for item in near:
            played |= item[2]
        if played != self.every:  # a step no event near can play: no chain
            return None
        table = self._table(near)
        first: int | None = None
        for start in table[0][0]:
            if start[0] > x:
                break
            active = self._active(table, start)
            if active is not None:
                first = _earliest(first, active[0])
        return first

    def value(self, slots: list[Any], ctx: _Context) -> bool | None:
        slot = slots[self.index]
        if slot["d"]:
            return True
        t = ctx.t
        if _unknown_at(slot["u"], t):
            return None
        held = slot["e"] is not None and slot["e"] <= t
        if not held and not self.monotone:
            held = any(
                begins <= t and (until is None or t < until)
                for begins, until in self._spans(slot["b"])
            )
        if slot["z"] and not (held and not self.absent):
            return None
        return held

    def change(self, slots: list[Any], ctx: _Context) -> int | None:
        slot = slots[self.index]
        if slot["d"]:
            return None
        candidates: list[int | None] = [slot["e"], *_unknown_edges(slot["u"])]
        if not self.monotone:
            for begins, until in self._spans(slot["b"]):
                candidates += [begins, until]
        return _after(candidates, ctx.t)

    def judge(self, slots: list[Any], ctx: _Context) -> tuple[bool | None, int | None]:
        slot = slots[self.index]
        if slot["d"]:
            return True, None
        t = ctx.t
        spans = () if self.monotone else self._spans(slot["b"])
        candidates: list[int | None] = [slot["e"], *_unknown_edges(slot["u"])]
        for begins, until in spans:
            candidates += [begins, until]
        turn = _after(candidates, t)
        if _unknown_at(slot["u"], t):
            return None, turn
        held = slot["e"] is not None and slot["e"] <= t
        if not held:
            held = any(begins <= t and (until is None or t < until) for begins, until in spans)
        if slot["z"] and not (held and not self.absent):
            return None, turn
        return held, turn


# -- compilation ----------------------------------------------------------------------------------


def _event_refs(expr: Expr) -> Iterator[EventRef]:
    if isinstance(expr, And | Or):
        for item in expr.items:
            yield from _event_refs(item)
    elif isinstance(expr, Not):
        yield from _event_refs(expr.item)
    elif isinstance(expr, Occurs | Count | Aggregate | Pick):
        yield expr.event
    elif isinstance(expr, Sequence):
        yield from expr.steps


def _reads_profile(expr: Expr) -> bool:
    """Whether evaluating ``expr`` reads the profile (attributes, consents, or the time zone an
    anniversary of a picked event's value is read in; no other test of a pick reads it)."""
    if isinstance(expr, And | Or):
        return any(_reads_profile(item) for item in expr.items)
    if isinstance(expr, Not):
        return _reads_profile(expr.item)
    if isinstance(expr, Pick):
        return isinstance(expr.test, Anniversary)
    return isinstance(expr, Attr | Consent)


def _moving_test(node: Filter) -> Prop | None:
    """A property test of ``node`` whose result depends on the moment of evaluation."""
    if isinstance(node, Prop):
        test = node.test
        if isinstance(test, Anniversary):
            return node
        if isinstance(test, Within):
            window = test.window
            fixed = (
                isinstance(window, Between)
                and isinstance(window.start, At)
                and isinstance(window.end, At)
            )
            return None if fixed else node
        return None
    if isinstance(node, FilterAnd | FilterOr):
        for item in node.items:
            found = _moving_test(item)
            if found is not None:
                return found
        return None
    if isinstance(node, FilterNot):
        return _moving_test(node.item)
    raise ValueError(f"not a property filter: {node!r}")


def _refuse_audiences(expr: Expr) -> None:
    if isinstance(expr, InAudience):
        raise ValueError(f"in audience {expr.name!r} must be expanded before evaluation")
    if isinstance(expr, And | Or):
        for item in expr.items:
            _refuse_audiences(item)
    elif isinstance(expr, Not):
        _refuse_audiences(expr.item)


def plan(expr: Expr) -> Plan:
    """Whether ``expr`` (checked, ``in audience`` expanded; else ``ValueError``) can be
    evaluated exactly event by event with bounded state, and if not, why."""
    _refuse_audiences(expr)
    compile_memory(expr)  # refuses unchecked trees
    for ref in _event_refs(expr):
        if ref.where is None:
            continue
        moving = _moving_test(ref.where)
        if moving is not None:
            shown = to_text(Occurs(EventRef(ref.name, moving)))
            return Plan(
                False,
                f"Whether an event matches “{shown}” depends on when the audience is "
                "evaluated, not only on the event, so membership cannot be kept up to date "
                "event by event; this audience is evaluated in batch on a schedule.",
            )
    return Plan(True)


def compile_streaming(expr: Expr, *, max_events: int = 1000) -> StreamingAudience:
    """``expr`` (checked) as a streaming audience whose nodes keep at most ``max_events`` events
    each; ``ValueError`` when :func:`plan` finds it not streamable."""
    if max_events < 1:
        raise ValueError("max_events must be at least 1")
    verdict = plan(expr)
    if not verdict.streamable:
        raise ValueError(verdict.reason)
    return StreamingAudience(expr, max_events)


class StreamingAudience:
    """A compiled streaming audience (see the module docstring). Use :func:`compile_streaming`.

    States are plain JSON; methods never mutate the state they are given (a new state may
    share unchanged parts with the old one, so treat both as read-only)."""

    def __init__(self, expr: Expr, max_events: int) -> None:
        self.expr = expr
        self.max_events = max_events
        self._events: list[_EventNode] = []
        self._root = self._compile(expr)
        self._definition = hashlib.sha256(repr(expr).encode()).hexdigest()[:16]
        #: identifies the definition (and so its states): equal keys, interchangeable states
        self.key: str = f"{_VERSION}:{max_events}:{self._definition}"
        #: the event names whose events can change a state of this audience
        self.names: frozenset[str] = frozenset(ref.name for ref in _event_refs(expr))
        #: whether the answer reads the profile's attributes or consents (else only events)
        self.reads_profile: bool = _reads_profile(expr)
        by_name: dict[str, list[_EventNode]] = {}
        for node in self._events:
            for name in node.names:
                by_name.setdefault(name, []).append(node)
        self._by_name = by_name
        self._empty: State | None = None

    def _compile(self, node: Expr) -> _Node:
        index, cap = len(self._events), self.max_events
        built: _EventNode
        if isinstance(node, And):
            return _All(tuple(self._compile(item) for item in node.items))
        if isinstance(node, Or):
            return _Any(tuple(self._compile(item) for item in node.items))
        if isinstance(node, Not):
            return _Negation(self._compile(node.item))
        if isinstance(node, Attr | Consent):
            return _Profile(node)
        if isinstance(node, Occurs):
            built = _CountNode(index, node.event, CompareOp.GE, 1, cap)
        elif isinstance(node, Count):
            built = _CountNode(index, node.event, node.op, node.value, cap)
        elif isinstance(node, Aggregate):
            built = _AggregateNode(index, node, cap)
        elif isinstance(node, Pick):
            built = _PickNode(index, node, cap)
        elif isinstance(node, Sequence):
            built = _SequenceNode(index, node, cap)
        else:
            raise ValueError(f"not an audience expression for streaming: {node!r}")
        self._events.append(built)
        return built

    def new_state(self) -> State:
        """The state of a profile with no events yet (one shared object: read-only, like every
        state)."""
        empty = self._empty
        if empty is None:
            empty = self._empty = {
                "v": _VERSION,
                "f": self._definition,
                "w": None,
                "n": [node.new() for node in self._events],
            }
        return empty

    def _slots(self, state: State) -> list[Any]:
        if not self.owns(state):
            raise ValueError("not a state of this audience definition")
        slots: list[Any] = state["n"]
        return slots

    def owns(self, state: Any) -> bool:
        """Whether ``state`` is a state of this definition (cheaper than :meth:`watermark`)."""
        if not isinstance(state, dict):
            return False
        slots = state.get("n")
        return (
            state.get("f") == self._definition
            and state.get("v") == _VERSION
            and type(slots) is list
            and len(slots) == len(self._events)
        )

    def watermark(self, state: State) -> datetime | None:
        """The latest ``now`` the state was given: no question may be asked before it."""
        self._slots(state)
        w = state["w"]
        return None if w is None else _moment(w)

    def on_event(self, state: State, event: MemoryEvent, *, now: datetime) -> State:
        """``state`` with ``event`` folded in, at the current time ``now`` (aware). Events come
        in any timestamp order (ties are ordered by ``seq``); one dated after ``now`` counts
        from its timestamp on. ``now`` earlier than an earlier call's is taken as that one."""
        slots = self._slots(state)
        x = _micros(event.timestamp)
        w = _micros(now) if state["w"] is None else max(state["w"], _micros(now))
        new_slots = list(slots)
        for node in self._events:
            new_slots[node.index] = node.add(slots[node.index], event, x, w)
        return {"v": _VERSION, "f": self._definition, "w": w, "n": new_slots}

    def on_events(self, state: State, events: Iterable[MemoryEvent], *, now: datetime) -> State:
        """``state`` with every one of ``events`` folded in (as :meth:`on_event` one by one,
        at the same ``now``); the same object when none of them concerns this audience."""
        nodes_of = self._by_name
        slots: list[Any] | None = None
        new_slots: list[Any] = []
        w = 0
        for event in events:
            nodes = nodes_of.get(event.name)
            if not nodes:
                continue
            if slots is None:
                slots = self._slots(state)
                new_slots = list(slots)
                w = _micros(now) if state["w"] is None else max(state["w"], _micros(now))
            x = _micros(event.timestamp)
            for node in nodes:
                new_slots[node.index] = node.add(new_slots[node.index], event, x, w)
        if slots is None:
            return state
        return {"v": _VERSION, "f": self._definition, "w": w, "n": new_slots}

    def _context(self, state: State, profile: ProfileView, now: datetime) -> tuple[Any, _Context]:
        slots = self._slots(state)
        t = _micros(now)
        if state["w"] is not None and t < state["w"]:
            raise ValueError(
                f"{now.isoformat()} is before the state's watermark "
                f"{_moment(state['w']).isoformat()}: the state no longer knows that instant"
            )
        return slots, _Context(profile, now, t)

    def member(self, state: State, profile: ProfileView, now: datetime) -> bool:
        """Whether the profile (its current attributes and consents, and the events folded into
        ``state``) is in the audience at ``now`` (no earlier than the watermark).
        :class:`StateOverflow` when the answer depends on events dropped at the cap."""
        slots, ctx = self._context(state, profile, now)
        answer = self._root.value(slots, ctx)
        if answer is None:
            raise StateOverflow(
                "this profile has more events than the streaming state keeps "
                f"({self.max_events} per condition) in the window that decides the answer at "
                f"{now.isoformat()}; evaluate it in batch"
            )
        return answer

    def evaluate(
        self, state: State, profile: ProfileView, now: datetime
    ) -> tuple[bool | None, datetime | None]:
        """:meth:`member` (None where it would raise :class:`StateOverflow`) and
        :meth:`next_change` at once, sharing their work."""
        slots, ctx = self._context(state, profile, now)
        answer = self._root.value(slots, ctx)
        turn = self._root.change(slots, ctx)
        if turn is None or turn > _LAST or turn < _FIRST:
            return answer, None
        return answer, _moment(turn)

    def step(
        self, state: State, events: Iterable[tuple[int, MemoryEvent]], asking: Asking
    ) -> tuple[State, bool | None, int | None]:
        """Fold ``events`` (each with its timestamp in microseconds) into ``state`` at
        ``asking.now``, as :meth:`on_events` does, and answer as :meth:`evaluate` does, at
        ``asking.now`` or at the state's watermark if that is later (the clock went back).
        Returns the new state (the same object when no event concerns this audience), the
        answer (None: unknown past the cap) and the next change in microseconds (None: never).
        The fast path of the streaming worker: the state is validated once, no instant is
        converted."""
        self._slots(state)
        return self.advance(state, Arrivals(list(events)), asking)

    def advance(
        self, state: State, arrivals: Arrivals, asking: Asking
    ) -> tuple[State, bool | None, int | None]:
        """:meth:`step` for a state known to be of this definition (:meth:`owns` said so, or
        :meth:`new_state` made it), not validated again, with the new events grouped."""
        slots: list[Any] = state["n"]
        t = asking.t
        w = state["w"]
        if w is None or w < t:
            w = t
        new_slots: list[Any] | None = None
        if arrivals.events:
            groups = arrivals.groups
            for node in self._events:
                only = node.only_name
                taken = groups.get(only) if only is not None else arrivals.of(node.names)
                if not taken:
                    continue
                if new_slots is None:
                    new_slots = list(slots)
                index = node.index
                if len(taken) == 1:
                    x, event = taken[0]
                    new_slots[index] = node.add(new_slots[index], event, x, w)
                else:
                    new_slots[index] = node.add_all(new_slots[index], taken, w)
        if new_slots is not None:
            state = {"v": _VERSION, "f": self._definition, "w": w, "n": new_slots}
            slots = new_slots
        elif state["w"] is not None:
            w = state["w"]
        answer, turn = self._root.judge(slots, asking if w <= t else asking.at(w))
        if turn is not None and (turn > _LAST or turn < _FIRST):
            turn = None
        return state, answer, turn

    def next_change(self, state: State, profile: ProfileView, now: datetime) -> datetime | None:
        """The earliest instant after ``now`` at which the answer may change with no new input
        (an event, or a change of the attributes or consents); None if never. Before it the
        answer is the one at ``now``; at it, it may be the same (a spare timer is harmless)."""
        slots, ctx = self._context(state, profile, now)
        turn = self._root.change(slots, ctx)
        if turn is None or turn > _LAST or turn < _FIRST:
            return None
        return _moment(turn)
