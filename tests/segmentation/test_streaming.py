"""The streaming evaluator: the same members as the in-memory evaluator at every instant, for
random definitions and histories replayed in random order (late and future-dated events), with
timers that never miss a change; and the constructs one by one (timers, late events, exact sums,
bounded state, JSON round trips, the cap, what is not streamable and why)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.segmentation.data import Person, moments, people
from tests.segmentation.strategies import audiences
from tests.segmentation.test_equivalence import NOWS, SCHEMA
from waymark.segmentation.compile.memory import (
    CompiledAudience,
    MemoryEvent,
    ProfileData,
    compile_memory,
    evaluate,
)
from waymark.segmentation.compile.streaming import (
    Asking,
    State,
    StateOverflow,
    StreamingAudience,
    _CountNode,
    _SequenceNode,
    compile_streaming,
    from_micros,
    plan,
    to_micros,
)
from waymark.segmentation.lang.ast import (
    And,
    Attr,
    Compare,
    CompareOp,
    Count,
    Duration,
    EventRef,
    Expr,
    InAudience,
    Occurs,
)
from waymark.segmentation.lang.parser import parse

US = timedelta(microseconds=1)
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
#: Instants the in-memory evaluator can take (its windows reach 3,650 days either way).
EARLIEST = datetime(1971, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
NOBODY = ProfileData({}, (), {})


# -- the replay ---------------------------------------------------------------------------------


class _Skip(Exception):
    """The in-memory evaluator cannot answer (an fsum overflowing the float range)."""


@dataclass
class Replay:
    """One person's events arriving one by one, compared with the in-memory evaluator."""

    audience: StreamingAudience
    reference: CompiledAudience
    person: Person
    checks: list[datetime]
    rng: random.Random
    exact: bool = True  # False: the cap may make answers unknown (never wrong)
    roundtrip: bool = False

    def __post_init__(self) -> None:
        self.view = ProfileData(self.person.attributes, (), self.person.consents)
        self.state = self.audience.new_state()
        self.seen: list[MemoryEvent] = []

    def expected(self, t: datetime) -> bool:
        profile = ProfileData(self.person.attributes, tuple(self.seen), self.person.consents)
        try:
            return self.reference(profile, t)
        except OverflowError as exc:
            raise _Skip from exc

    def answer(self, t: datetime) -> bool | None:
        """The streaming answer at ``t`` (None: unknown, only when not ``exact``)."""
        try:
            return self.audience.member(self.state, self.view, t)
        except StateOverflow:
            if self.exact:
                raise
            return None

    def agree(self, t: datetime) -> bool | None:
        got = self.answer(t)
        if got is not None:
            assert got == self.expected(t), f"at {t.isoformat()} after {self.seen}"
        return got

    def chase(self, start: datetime, steps: int) -> None:
        """Follow the timers from ``start``: before each one the answer is the one at its
        start (checked against the in-memory evaluator at the instants where it could turn),
        and at each one it is right again."""
        t = start
        value = self.agree(t)
        for _ in range(steps):
            turn = self.audience.next_change(self.state, self.view, t)
            assert turn is None or turn > t
            end = LATEST if turn is None or turn > LATEST else turn
            between = [x for x in self.checks if t < x < end]
            # just after t, the next local midnights, the day before the timer, and instants
            # spread over every scale of the interval
            between += [t + US, t + DAY, t + 2 * DAY, end - DAY, end - US]
            span = (end - t) // US
            between += [t + int(span ** self.rng.random()) * US for _ in range(4)]
            for x in between:
                if t <= x < end:
                    assert self.answer(x) == value, f"{x.isoformat()} before the timer {turn}"
                    if value is not None:
                        assert self.expected(x) == value, (
                            f"the answer turns at {x.isoformat()}, before the timer {turn} "
                            f"(from {t.isoformat()}, after {self.seen})"
                        )
            if turn is None or turn > LATEST:
                return
            t = turn
            value = self.agree(t)

    def same_step(self, before: State, item: MemoryEvent, now: datetime) -> None:
        """``step`` (the worker's fast path) folds and answers as ``on_event``, ``evaluate``
        and ``next_change`` do (at the watermark when ``now`` is earlier)."""
        stepped, answer, turn = self.audience.step(
            before, [(to_micros(item.timestamp), item)], Asking(self.view, now)
        )
        if item.name in self.audience.names:
            assert stepped == self.state
        else:  # no condition reads it: the same state, its watermark not moved
            assert stepped is before
        at = max(now, self.audience.watermark(stepped) or now)
        expected, change = self.audience.evaluate(stepped, self.view, at)
        assert answer == expected
        assert turn == (None if change is None else to_micros(change))
        assert change == self.audience.next_change(stepped, self.view, at)

    def run(self, order: Sequence[MemoryEvent], arrivals: Sequence[datetime]) -> None:
        first = arrivals[0] if arrivals else LATEST
        for t in [x for x in self.checks if x < first][:4]:
            self.agree(t)  # an empty state answers at any instant
        for index, (item, now) in enumerate(zip(order, arrivals, strict=True)):
            before = self.state
            self.state = self.audience.on_event(self.state, item, now=now)
            self.same_step(before, item, now)
            if self.roundtrip:
                self.state = json.loads(json.dumps(self.state, allow_nan=False))
            self.seen.append(item)
            until = arrivals[index + 1] if index + 1 < len(arrivals) else LATEST
            window = [x for x in self.checks if now <= x < until]
            for t in [now, *self.rng.sample(window, min(3, len(window)))]:
                self.agree(t)
            self.chase(now, 2)
        last = arrivals[-1] if arrivals else EARLIEST
        for t in self.checks:
            if t >= last:
                self.agree(t)
        self.chase(max(last, self.checks[0]), 20)


def _memory_events(person: Person) -> list[MemoryEvent]:
    return [MemoryEvent(e.name, e.timestamp, e.seq, e.properties) for e in person.events]


def _durations(node: object) -> set[timedelta]:
    """Every duration in a tree (windows, relative bounds, sequence gaps)."""
    if isinstance(node, Duration):
        return {node.delta}
    if isinstance(node, tuple):
        return set().union(*(_durations(item) for item in node))
    if dataclasses.is_dataclass(node):
        return set().union(*(_durations(getattr(node, f.name)) for f in dataclasses.fields(node)))
    return set()


def _checks(expr: Expr, now: datetime, crowd: list[Person]) -> list[datetime]:
    """Instants to ask at and to deliver events at: the window edges, the events' timestamps,
    and each timestamp plus each duration of the tree (where events enter and leave windows
    and sequences reach their deadlines), a microsecond either side."""
    instants = set(moments(expr, now))
    shifts = {timedelta(0)} | _durations(expr)
    for person in crowd:
        for item in person.events:
            instants.update({item.timestamp - SECOND, item.timestamp + SECOND})
            for shift in shifts:
                edge = item.timestamp + shift
                instants.update({edge - US, edge, edge + US})
    return sorted(x for x in instants if EARLIEST <= x <= LATEST)


_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


def _replay_all(data: st.DataObject, *, depth: int, max_events: int, exact: bool) -> None:
    expr = data.draw(audiences(SCHEMA, names=(), depth=depth), label="definition")
    verdict = plan(expr)
    if not verdict.streamable:
        event("not streamable")
        assert verdict.reason
        with pytest.raises(ValueError, match="batch"):
            compile_streaming(expr)
        return
    event("streamable")
    now = data.draw(st.sampled_from(NOWS), label="now")
    for _ in range(3):  # a history without events says little: draw again
        crowd = data.draw(people(SCHEMA, expr, now, max_people=4), label="people")
        if any(person.events for person in crowd):
            break
    audience = compile_streaming(expr, max_events=max_events)
    reference = compile_memory(expr)
    checks = _checks(expr, now, crowd)
    rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
    try:
        for person in crowd:
            events = _memory_events(person)
            # in a random order, arriving at random (non-decreasing) instants: late and future
            order = data.draw(st.permutations(events), label="order")
            arrivals = sorted(
                data.draw(
                    st.lists(st.sampled_from(checks), min_size=len(order), max_size=len(order)),
                    label="arrivals",
                )
            )
            Replay(audience, reference, person, checks, rng, exact, roundtrip=True).run(
                order, arrivals
            )
            # in timestamp order, each arriving at its own instant (a live stream)
            timely = sorted(events, key=lambda e: (e.timestamp, e.seq))
            Replay(audience, reference, person, checks, rng, exact).run(
                timely, [e.timestamp for e in timely]
            )
    except _Skip:
        event("the in-memory sum overflows")


@settings(_SETTINGS, max_examples=500)
@given(data=st.data())
def test_each_condition_agrees_with_memory_at_every_instant_and_timer(
    data: st.DataObject,
) -> None:
    _replay_all(data, depth=0, max_events=1000, exact=True)


@settings(_SETTINGS, max_examples=150)
@given(data=st.data())
def test_combinations_agree_with_memory_at_every_instant_and_timer(data: st.DataObject) -> None:
    _replay_all(data, depth=2, max_events=1000, exact=True)


@settings(_SETTINGS, max_examples=100)
@given(data=st.data())
def test_past_the_cap_answers_are_exact_or_unknown_never_wrong(data: st.DataObject) -> None:
    _replay_all(data, depth=1, max_events=2, exact=False)


def test_most_drawn_definitions_are_streamable() -> None:
    verdicts: list[bool] = []

    @settings(max_examples=200, database=None, derandomize=True, deadline=None)
    @given(audiences(SCHEMA, names=(), depth=2))
    def collect(expr: Expr) -> None:
        verdicts.append(plan(expr).streamable)

    collect()
    assert len(verdicts) >= 150
    assert sum(verdicts) >= 0.75 * len(verdicts)
    assert not all(verdicts)  # the drawn trees include the non-streamable constructs


# -- helpers for the hand-written cases ---------------------------------------------------------


def _compile(text: str, max_events: int = 1000) -> tuple[StreamingAudience, Expr]:
    expr = parse(text, SCHEMA)
    return compile_streaming(expr, max_events=max_events), expr


_seq = iter(range(1, 10**9))


def ev(name: str, at: datetime, **properties: Any) -> MemoryEvent:
    return MemoryEvent(name, at, next(_seq), properties)


def feed(
    audience: StreamingAudience,
    events: Sequence[MemoryEvent],
    now: datetime | None = None,
    state: State | None = None,
) -> State:
    """The state after ``events`` arrive in this order, each at ``now`` (default: its own
    timestamp, or the latest so far)."""
    state = audience.new_state() if state is None else state
    clock = EARLIEST
    for item in events:
        clock = max(clock, item.timestamp if now is None else now)
        state = audience.on_event(state, item, now=clock)
    return state


def memory(expr: Expr, events: Sequence[MemoryEvent], t: datetime, view: Any = NOBODY) -> bool:
    return evaluate(expr, ProfileData(view.attributes, tuple(events), view.consents), t)


def kept(state: State, index: int = 0) -> int:
    """How many events node ``index`` keeps."""
    slot = state["n"][index]
    return sum(len(slot[name]) for name in ("e", "p", "b") if isinstance(slot.get(name), list))


# -- timers ---------------------------------------------------------------------------------------


def test_three_purchases_in_30_days_leave_when_the_oldest_ages_out() -> None:
    audience, expr = _compile("count(purchase within last 30 days) >= 3")
    events = [ev("purchase", T0), ev("purchase", T0 + 2 * DAY), ev("purchase", T0 + 5 * DAY)]
    state = feed(audience, events)
    now = T0 + 5 * DAY
    assert audience.member(state, NOBODY, now)
    leaves = audience.next_change(state, NOBODY, now)
    assert leaves == T0 + 30 * DAY + US  # the oldest is inside up to now - 30 days, included
    assert audience.member(state, NOBODY, leaves - US)
    assert not audience.member(state, NOBODY, leaves)
    assert memory(expr, events, leaves - US) and not memory(expr, events, leaves)
    # a fourth purchase keeps the profile in until the second oldest ages out
    state = feed(audience, [ev("purchase", T0 + 20 * DAY)], state=state)
    assert audience.member(state, NOBODY, leaves)
    assert audience.next_change(state, NOBODY, T0 + 20 * DAY) == T0 + 32 * DAY + US
    assert not audience.member(state, NOBODY, T0 + 35 * DAY)
    assert audience.next_change(state, NOBODY, T0 + 35 * DAY) is None  # never three again


def test_an_abandoned_cart_turns_true_an_hour_after_the_add_and_a_late_purchase_undoes_it() -> None:
    audience, expr = _compile("cart_add then not purchase within 1 hour")
    cart = ev("cart_add", T0, sku="x")
    state = feed(audience, [cart])
    assert not audience.member(state, NOBODY, T0)
    assert audience.next_change(state, NOBODY, T0) == T0 + HOUR
    assert not audience.member(state, NOBODY, T0 + HOUR - US)
    assert audience.member(state, NOBODY, T0 + HOUR)
    assert audience.next_change(state, NOBODY, T0 + HOUR) is None
    # the purchase, made within the hour, arrives a day late
    purchase = ev("purchase", T0 + 59 * MINUTE, revenue=5.0)
    state = feed(audience, [purchase], now=T0 + DAY, state=state)
    assert not audience.member(state, NOBODY, T0 + DAY)
    assert not memory(expr, [cart, purchase], T0 + DAY)


def test_attribute_windows_turn_at_their_edges() -> None:
    signup = T0 - 10 * DAY
    view = ProfileData({"signup_at": signup.isoformat()}, (), {})
    cases = [
        ("signup_at within last 30 days", T0, True, signup + 30 * DAY + US),
        ("signup_at more than 30 days ago", T0, False, signup + 30 * DAY + US),
        ("signup_at within next 30 days", signup - 40 * DAY, False, signup - 30 * DAY),
        ('signup_at between "2026-01-01" and "2026-12-31"', T0, True, None),
    ]
    for text, now, inside, turn in cases:
        audience, expr = _compile(text)
        state = audience.new_state()
        assert audience.member(state, view, now) is inside
        assert memory(expr, [], now, view) is inside
        assert audience.next_change(state, view, now) == turn, text
        if turn is not None:
            assert audience.member(state, view, turn) is not inside
            assert memory(expr, [], turn, view) is not inside


def test_a_birthday_turns_at_local_midnight_in_the_profile_zone() -> None:
    audience, expr = _compile("birthday in next 7 days")
    view = ProfileData({"birthday": "1990-03-20", "timezone": "Pacific/Auckland"}, (), {})
    state = audience.new_state()
    assert not audience.member(state, view, T0)
    turn = audience.next_change(state, view, T0)
    # 13 March, 00:00 in Auckland (UTC+13 in March)
    assert turn == datetime(2026, 3, 12, 11, 0, tzinfo=UTC)
    assert not memory(expr, [], turn - US, view) and memory(expr, [], turn, view)
    assert audience.member(state, view, turn)
    # true through 20 March, local; false from 21 March, 00:00 in Auckland
    leaves = audience.next_change(state, view, turn)
    assert leaves == datetime(2026, 3, 20, 11, 0, tzinfo=UTC)
    assert memory(expr, [], leaves - US, view) and not memory(expr, [], leaves, view)
    # in UTC the same birthday turns 13 hours later; without one it never turns
    utc = ProfileData({"birthday": "1990-03-20"}, (), {})
    assert audience.next_change(state, utc, T0) == datetime(2026, 3, 13, tzinfo=UTC)
    assert audience.next_change(state, NOBODY, T0) is None


def test_a_birthday_test_that_always_holds_has_no_timer() -> None:
    audience, _ = _compile("birthday in next 366 days")
    view = ProfileData({"birthday": "2004-02-29"}, (), {})
    assert audience.member(audience.new_state(), view, T0)
    assert audience.next_change(audience.new_state(), view, T0) is None


def test_picks_test_their_value_at_the_instant() -> None:
    audience, expr = _compile("first(purchase).timestamp more than 365 days ago")
    first = ev("purchase", T0)
    state = feed(audience, [first, ev("purchase", T0 + DAY)])
    assert not audience.member(state, NOBODY, T0 + DAY)
    turn = audience.next_change(state, NOBODY, T0 + DAY)
    assert turn == T0 + 365 * DAY + US
    assert audience.member(state, NOBODY, turn) and memory(expr, [first], turn)


def test_future_events_count_from_their_timestamp() -> None:
    audience, expr = _compile("count(purchase) >= 2")
    events = [ev("purchase", T0 - DAY), ev("purchase", T0 + DAY)]  # the second is scheduled
    state = feed(audience, events, now=T0)
    assert not audience.member(state, NOBODY, T0)
    assert audience.next_change(state, NOBODY, T0) == T0 + DAY
    assert audience.member(state, NOBODY, T0 + DAY) and memory(expr, events, T0 + DAY)
    assert not memory(expr, events, T0 + DAY - US)


def test_events_age_into_more_than_d_ago() -> None:
    audience, expr = _compile("count(purchase more than 30 days ago) >= 2")
    events = [ev("purchase", T0 + day * DAY) for day in range(10)]
    state = feed(audience, events)
    assert kept(state) <= 2  # only the two oldest pending ones can matter
    now = T0 + 9 * DAY
    turn = audience.next_change(state, NOBODY, now)
    assert turn == T0 + DAY + 30 * DAY + US  # strictly before now - 30 days
    assert not audience.member(state, NOBODY, turn - US) and audience.member(state, NOBODY, turn)
    assert memory(expr, events, turn) and not memory(expr, events, turn - US)
    later = feed(audience, [ev("purchase", T0 + 50 * DAY)], state=state)
    assert later["n"][0]["c"] == 2 and kept(later) == 0  # saturated: true for good


def test_events_arriving_exactly_on_a_window_edge() -> None:
    # inside "within last 30 days" up to now - 30 days included: kept at that very instant
    audience, expr = _compile("count(purchase within last 30 days) >= 1")
    old = ev("purchase", T0 - 30 * DAY)
    state = feed(audience, [old], now=T0)
    assert audience.member(state, NOBODY, T0) and memory(expr, [old], T0)
    assert audience.next_change(state, NOBODY, T0) == T0 + US
    assert not audience.member(state, NOBODY, T0 + US)
    # "more than 30 days ago" is strictly before now - 30 days: not yet at that instant
    older, older_expr = _compile("count(purchase more than 30 days ago) >= 1")
    state = feed(older, [old], now=T0)
    assert not older.member(state, NOBODY, T0) and not memory(older_expr, [old], T0)
    assert older.next_change(state, NOBODY, T0) == T0 + US
    assert older.member(state, NOBODY, T0 + US)
    # a mean over events ageing into the window, counted as they arrive there
    mean, mean_expr = _compile("avg(purchase.revenue more than 1 day ago) >= 2")
    events = [ev("purchase", T0, revenue=3.0), ev("purchase", T0 + HOUR, revenue=0.0)]
    state = feed(mean, events, now=T0 + HOUR)
    for t in (T0 + DAY, T0 + DAY + US, T0 + DAY + HOUR, T0 + DAY + HOUR + US):
        assert mean.member(state, NOBODY, t) == memory(mean_expr, events, t), t
    assert mean.next_change(state, NOBODY, T0 + DAY + US) == T0 + DAY + HOUR + US


def test_a_chain_completed_by_a_future_event_counts_from_its_timestamp() -> None:
    audience, expr = _compile("cart_add then purchase within 1 hour")
    events = [ev("cart_add", T0, sku="x"), ev("purchase", T0 + US, revenue=1.0)]
    state = feed(audience, events, now=T0)  # the purchase is dated a microsecond ahead
    assert not audience.member(state, NOBODY, T0) and not memory(expr, events, T0)
    assert audience.next_change(state, NOBODY, T0) == T0 + US
    assert audience.member(state, NOBODY, T0 + US)


def test_an_absent_step_counts_up_to_the_deadline_included() -> None:
    audience, expr = _compile("cart_add then not purchase within 1 hour")
    cart = ev("cart_add", T0, sku="x")
    for delay, abandoned in ((HOUR, False), (HOUR + US, True)):
        events = [cart, ev("purchase", T0 + delay, revenue=1.0)]
        state = feed(audience, events[::-1], now=T0 + 2 * HOUR)
        assert audience.member(state, NOBODY, T0 + 2 * HOUR) is abandoned
        assert memory(expr, events, T0 + 2 * HOUR) is abandoned


def test_a_birthday_of_today_only_turns_at_the_next_local_midnight() -> None:
    audience, expr = _compile("birthday in next 0 days")
    view = ProfileData({"birthday": "1990-03-02", "timezone": "Asia/Kolkata"}, (), {})
    now = datetime(2026, 3, 1, 20, 0, tzinfo=UTC)  # 2 March, 01:30 in Kolkata
    state = audience.new_state()
    assert audience.member(state, view, now) and memory(expr, [], now, view)
    turn = audience.next_change(state, view, now)
    assert turn == datetime(2026, 3, 2, 18, 30, tzinfo=UTC)  # 3 March, 00:00 in Kolkata
    assert memory(expr, [], turn - US, view) and not memory(expr, [], turn, view)
    assert audience.next_change(state, view, turn) == datetime(2027, 3, 1, 18, 30, tzinfo=UTC)


def test_a_sliding_minimum_forgets_only_values_a_newer_one_beats() -> None:
    audience, expr = _compile("min(cart_add.price within last 2 days) < 2")
    events = [
        ev("cart_add", T0, price=1.0),
        ev("cart_add", T0 + DAY, price=5.0),
        ev("cart_add", T0 + DAY + HOUR, price=1.5),
    ]
    state = feed(audience, events)
    assert [item[2] for item in state["n"][0]["e"]] == [1.0, 1.5]  # 5.0 never is the minimum
    t = T0 + DAY + HOUR
    while t is not None and t < T0 + 5 * DAY:
        assert audience.member(state, NOBODY, t) == memory(expr, events, t), t
        t = audience.next_change(state, NOBODY, t)
    assert t is None


# -- late events, ties, exact sums ----------------------------------------------------------------


def test_a_funnel_completed_by_a_late_middle_step() -> None:
    audience, expr = _compile("product_view then cart_add then purchase within 2 days")
    view = ev("product_view", T0, category="shoes")
    add = ev("cart_add", T0 + HOUR, sku="x")
    buy = ev("purchase", T0 + DAY, revenue=1.0)
    state = feed(audience, [buy, view], now=T0 + DAY)
    assert not audience.member(state, NOBODY, T0 + DAY)
    state = feed(audience, [add], now=T0 + 3 * DAY, state=state)  # arrives two days late
    assert audience.member(state, NOBODY, T0 + 3 * DAY)
    assert memory(expr, [buy, view, add], T0 + 3 * DAY)
    assert state["n"][0]["d"]  # a chain without a window holds for good: nothing is kept
    assert state["n"][0]["b"] == []


def test_a_late_step_completes_a_chain_that_then_slides_out_of_its_window() -> None:
    audience, expr = _compile("cart_add within last 7 days then purchase within 1 hour")
    add = ev("cart_add", T0, sku="x")
    buy = ev("purchase", T0 + 30 * MINUTE, revenue=1.0)
    state = feed(audience, [buy], now=T0 + HOUR)
    state = feed(audience, [add], now=T0 + 2 * HOUR, state=state)  # the start arrives late
    assert audience.member(state, NOBODY, T0 + 2 * HOUR)
    turn = audience.next_change(state, NOBODY, T0 + 2 * HOUR)
    assert turn == T0 + 7 * DAY + US
    assert not audience.member(state, NOBODY, turn)
    assert memory(expr, [add, buy], turn - US) and not memory(expr, [add, buy], turn)


def test_a_chain_counts_once_its_start_is_old_enough() -> None:
    audience, expr = _compile("cart_add more than 1 day ago then purchase within 1 hour")
    events = [ev("cart_add", T0, sku="x"), ev("purchase", T0 + 30 * MINUTE, revenue=1.0)]
    state = feed(audience, events)
    now = T0 + 30 * MINUTE
    assert not audience.member(state, NOBODY, now)  # complete, but the start is too recent
    turn = audience.next_change(state, NOBODY, now)
    assert turn == T0 + DAY + US
    assert not memory(expr, events, turn - US) and memory(expr, events, turn)
    assert audience.member(state, NOBODY, turn)


def test_ties_are_ordered_by_seq() -> None:
    audience, expr = _compile("count(purchase within last 30 days) = 1")
    edge = T0 - 30 * DAY
    events = [ev("purchase", edge), ev("purchase", edge), ev("purchase", T0 - DAY)]
    state = feed(audience, [events[2], events[0], events[1]], now=T0 - DAY)
    assert not audience.member(state, NOBODY, T0)  # three, two of them exactly on the edge
    assert audience.next_change(state, NOBODY, T0) == T0 + US  # both leave at once
    assert audience.member(state, NOBODY, T0 + US)
    assert not memory(expr, events, T0) and memory(expr, events, T0 + US)
    assert audience.next_change(state, NOBODY, T0 + US) == T0 + 29 * DAY + US
    # a sequence of one event type needs two distinct events, in (timestamp, seq) order
    sequence, seq_expr = _compile("purchase then purchase within 1 minute")
    one = [ev("purchase", T0)]
    assert not sequence.member(feed(sequence, one), NOBODY, T0)
    two = [*one, ev("purchase", T0)]
    state = feed(sequence, list(reversed(two)))
    assert sequence.member(state, NOBODY, T0) and memory(seq_expr, two, T0)


@pytest.mark.parametrize("window", ["", " within last 30 days"])
def test_sums_are_exact_in_any_arrival_order(window: str) -> None:
    values = [0.1, 0.2, 0.3, 1e16, 1.0, -1e16]
    assert math.fsum(values) == 1.6 != sum(values)
    events = [ev("purchase", T0 + i * HOUR, revenue=v) for i, v in enumerate(values)]
    for text in (
        f"sum(purchase.revenue{window}) = 1.6",
        f"avg(purchase.revenue{window}) = {1.6 / 6!r}",
    ):
        audience, expr = _compile(text)
        now = T0 + DAY
        for order in (events, events[::-1], events[2:] + events[:2]):
            state = feed(audience, order, now=now)
            assert audience.member(state, NOBODY, now), (text, [e.properties for e in order])
            assert memory(expr, events, now)


def test_a_sum_of_a_fixed_window_keeps_one_exact_number() -> None:
    audience, _ = _compile("sum(purchase.revenue) = 0.6")
    values = [0.1, 0.2, 0.3]
    state = feed(
        audience, [ev("purchase", T0 + i * MINUTE, revenue=v) for i, v in enumerate(values)]
    )
    slot = state["n"][0]
    assert slot["n"] == 3 and slot["p"] == []
    assert audience.member(state, NOBODY, T0 + HOUR)  # 0.1 + 0.2 + 0.3 would be 0.6000000000000001


def test_first_and_last_with_late_events() -> None:
    audience, expr = _compile('first(purchase).category = "shoes"')
    hats = ev("purchase", T0, category="hats")
    shoes = ev("purchase", T0 - DAY, category="shoes")  # earlier, arrives later
    state = feed(audience, [hats], now=T0)
    assert not audience.member(state, NOBODY, T0)
    state = feed(audience, [shoes], now=T0 + HOUR, state=state)
    assert audience.member(state, NOBODY, T0 + HOUR) and memory(expr, [hats, shoes], T0 + HOUR)
    last, last_expr = _compile('last(purchase within last 7 days).category = "hats"')
    state = feed(last, [hats, shoes], now=T0 + HOUR)
    assert last.member(state, NOBODY, T0 + HOUR)
    assert last.next_change(state, NOBODY, T0 + HOUR) == T0 + 7 * DAY + US
    assert not last.member(state, NOBODY, T0 + 7 * DAY + US)
    assert not memory(last_expr, [hats, shoes], T0 + 7 * DAY + US)


# -- bounded state, JSON ----------------------------------------------------------------------


def test_state_stays_bounded_over_10000_events() -> None:
    count, _ = _compile("count(purchase within last 30 days) >= 3")
    total, _ = _compile("sum(purchase.revenue within last 1 day) > 100")
    chain, _ = _compile("product_view then purchase within 1 hour")
    abandoned, _ = _compile("cart_add then not purchase within 1 hour", max_events=50)
    states = [a.new_state() for a in (count, total, chain, abandoned)]
    for i in range(10_000):
        at = T0 + i * 5 * MINUTE
        states[0] = count.on_event(states[0], ev("purchase", at), now=at)
        states[1] = total.on_event(states[1], ev("purchase", at, revenue=1.0), now=at)
        states[2] = chain.on_event(states[2], ev("product_view", at), now=at)
        if i % 2:
            states[3] = abandoned.on_event(states[3], ev("cart_add", at, sku="x"), now=at)
        assert kept(states[0]) <= 3
        assert kept(states[1]) <= 24 * 12 + 1  # the purchases of the last day
        assert kept(states[3]) <= 50
    end = T0 + 10_000 * 5 * MINUTE
    assert count.member(states[0], NOBODY, end)
    assert total.member(states[1], NOBODY, end)
    assert kept(states[2]) == 1000  # a chain still possible through any view: capped
    assert len(json.dumps(states[0])) < 300
    # in timestamp order nothing is late, so the cap loses nothing
    assert abandoned.member(states[3], NOBODY, end)


def test_a_json_round_trip_changes_nothing() -> None:
    text = (
        "count(purchase within last 30 days) >= 2 and sum(purchase.revenue) > 1.5 "
        'or (last(purchase).category = "shoes" and not cart_add then purchase within 1 hour) '
        "or min(cart_add.price within last 7 days) < 3 or avg(purchase.revenue more than 3 "
        "days ago) >= 2 or first(product_view within last 2 days).category exists"
    )
    audience, expr = _compile(text)
    rng = random.Random(7)
    names = ["purchase", "cart_add", "product_view"]
    events = [
        ev(
            rng.choice(names),
            T0 + rng.randrange(-40 * 24, 40 * 24) * HOUR,
            revenue=rng.choice([0.1, 0.7, 2.5]),
            price=rng.choice([1.0, 5.0]),
            category=rng.choice(["shoes", "hats"]),
        )
        for _ in range(40)
    ]
    plain, stored = audience.new_state(), audience.new_state()
    for i, item in enumerate(events):
        now = T0 - 40 * DAY + i * 2 * DAY
        plain = audience.on_event(plain, item, now=now)
        stored = json.loads(json.dumps(audience.on_event(stored, item, now=now), allow_nan=False))
        assert stored == plain
        for t in (now, now + HOUR, now + 3 * DAY):
            assert audience.member(stored, NOBODY, t) == audience.member(plain, NOBODY, t)
            assert audience.member(plain, NOBODY, t) == memory(expr, events[: i + 1], t)
            assert audience.next_change(stored, NOBODY, t) == audience.next_change(plain, NOBODY, t)


def test_attribute_and_consent_changes_need_no_event() -> None:
    audience, _ = _compile('country = "DE" and consent(email, marketing) = opted_in and purchase')
    state = feed(audience, [ev("purchase", T0)])
    before = ProfileData({"country": "FR"}, (), {("email", "marketing"): "opted_in"})
    after = ProfileData({"country": "DE"}, (), {("email", "marketing"): "opted_in"})
    withdrawn = ProfileData({"country": "DE"}, (), {("email", "marketing"): "opted_out"})
    assert not audience.member(state, before, T0)
    assert audience.member(state, after, T0)
    assert not audience.member(state, withdrawn, T0)


@pytest.mark.parametrize(
    ("text", "reads"),
    [
        ('country = "DE" and purchase', True),
        ("consent(email, marketing) = opted_in or purchase", True),
        ('last(purchase).category = "shoes"', False),
        ("first(purchase).timestamp more than 30 days ago", False),
        ("last(purchase).timestamp in next 7 days", True),  # an anniversary: the profile's zone
        ("count(purchase within last 7 days) >= 2 and not cart_add", False),
    ],
)
def test_what_reads_the_profile(text: str, reads: bool) -> None:
    """Only attributes, consents and anniversaries (read in the profile's zone) read the
    profile: an audience that does not is answered alike for every profile without events."""
    audience, _ = _compile(text)
    assert audience.reads_profile is reads
    if not reads:
        state = feed(audience, [ev("purchase", T0 - DAY, category="shoes")])
        zoned = ProfileData({"timezone": "Pacific/Kiritimati", "country": "DE"}, (), {})
        assert audience.evaluate(state, zoned, T0) == audience.evaluate(
            state, ProfileData({}, (), {}), T0
        )


# -- the cap --------------------------------------------------------------------------------------


def test_past_the_cap_a_sliding_window_is_unknown_until_the_dropped_events_leave() -> None:
    audience, expr = _compile("sum(purchase.revenue within last 1 day) >= 3", max_events=3)
    events = [ev("purchase", T0 + i * HOUR, revenue=1.0) for i in range(5)]
    state = feed(audience, events)
    assert kept(state) == 3
    now = T0 + 4 * HOUR
    with pytest.raises(StateOverflow):
        audience.member(state, NOBODY, now)
    back = audience.next_change(state, NOBODY, now)
    assert back == T0 + HOUR + DAY + US  # the newest dropped one has left the window
    assert audience.member(state, NOBODY, back) == memory(expr, events, back)
    # ... and an "or" with a part that holds answers anyway
    either, _ = _compile(
        "sum(purchase.revenue within last 1 day) >= 3 or count(purchase) >= 1", max_events=3
    )
    assert either.member(feed(either, events), NOBODY, now)


def test_past_the_cap_a_fixed_sequence_stays_exact_unless_an_event_comes_very_late() -> None:
    audience, expr = _compile("cart_add then not purchase within 1 hour", max_events=2)
    carts = [ev("cart_add", T0 + i * DAY, sku="x") for i in range(4)]
    state = feed(audience, carts)
    now = T0 + 3 * DAY
    assert kept(state) == 2
    assert audience.member(state, NOBODY, now) == memory(expr, carts, now)  # in order: exact
    # a purchase 30 minutes after the first (dropped) cart, arriving days late
    late = ev("purchase", T0 + 30 * MINUTE, revenue=1.0)
    state = feed(audience, [late], now=now, state=state)
    with pytest.raises(StateOverflow):
        audience.member(state, NOBODY, now)


def test_numbers_that_are_not_json_make_the_answer_unknown_not_the_state() -> None:
    nan, inf = float("nan"), float("inf")
    for text, value in (
        ("sum(purchase.revenue) > 1", nan),
        ("max(purchase.revenue) > 1", inf),
        ("last(purchase).revenue exists", nan),
        ("first(purchase).revenue > 1", inf),
    ):
        audience, _ = _compile(text)
        events = [ev("purchase", T0, revenue=value), ev("purchase", T0, revenue=1.5)]
        if "last" in text:  # the latest event is the one without a number
            events = [ev("purchase", T0, revenue=1.5), ev("purchase", T0, revenue=value)]
        state = feed(audience, events)
        json.dumps(state, allow_nan=False)  # strict JSON still
        with pytest.raises(StateOverflow):
            audience.member(state, NOBODY, T0 + DAY)
    # a first event that is finite is all a first pick needs
    audience, _ = _compile("first(purchase).revenue > 1")
    state = feed(audience, [ev("purchase", T0, revenue=1.5), ev("purchase", T0, revenue=nan)])
    assert audience.member(state, NOBODY, T0)
    # in a sliding window, only while that event is inside
    audience, expr = _compile("sum(purchase.revenue within last 1 day) > 1")
    events = [ev("purchase", T0, revenue=inf), ev("purchase", T0 + HOUR, revenue=2.0)]
    state = feed(audience, events)
    with pytest.raises(StateOverflow):
        audience.member(state, NOBODY, T0 + HOUR)
    assert audience.next_change(state, NOBODY, T0 + HOUR) == T0 + DAY + US
    assert audience.member(state, NOBODY, T0 + DAY + US) == memory(expr, events, T0 + DAY + US)


# -- what cannot stream, and refusals -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("count(purchase where shipped_at within last 7 days) >= 1", "shipped_at within last"),
        ('purchase where (category = "shoes" and shipped_at more than 3 days ago)', "more than"),
        ("sum(purchase.revenue where category in next 7 days) > 1", "in next 7 days"),
        ("last(cart_add where (not sku in next 3 days)).price > 1", "in next 3 days"),
        ("product_view then purchase where shipped_at within next 1 day within 1 hour", "next"),
    ],
)
def test_filters_that_depend_on_the_moment_are_not_streamable(text: str, shown: str) -> None:
    expr = parse(text, SCHEMA)
    verdict = plan(expr)
    assert not verdict.streamable
    assert verdict.reason is not None
    assert shown in verdict.reason and "batch" in verdict.reason
    with pytest.raises(ValueError, match="batch"):
        compile_streaming(expr)


@pytest.mark.parametrize(
    "text",
    [
        'purchase where shipped_at between "2026-01-01" and "2026-02-01"',
        'purchase where shipped_at > "2026-01-01T00:00:00Z" within last 30 days',
        "signup_at within last 30 days and birthday in next 7 days",
        "first(purchase).shipped_at within last 3 days",
    ],
)
def test_windows_outside_event_filters_stream(text: str) -> None:
    assert plan(parse(text, SCHEMA)).streamable
    assert plan(parse(text, SCHEMA)).reason is None


def test_refusals() -> None:
    with pytest.raises(ValueError, match="expanded"):
        plan(And((InAudience("vip"), Occurs(EventRef("purchase")))))
    with pytest.raises(ValueError, match="expanded"):
        compile_streaming(InAudience("vip"))
    with pytest.raises(ValueError, match="not checked"):
        plan(Attr("country", Compare(CompareOp.EQ, "DE")))  # no kind
    with pytest.raises(ValueError):
        compile_streaming(Count(EventRef("purchase"), CompareOp.GE, 1), max_events=0)
    audience, _ = _compile("count(purchase within last 30 days) >= 3")
    state = feed(audience, [ev("purchase", T0)], now=T0 + DAY)
    with pytest.raises(ValueError, match="watermark"):
        audience.member(state, NOBODY, T0)  # the state forgot what was before T0 + 1 day
    with pytest.raises(ValueError, match="watermark"):
        audience.next_change(state, NOBODY, T0)
    assert audience.watermark(state) == T0 + DAY
    other, _ = _compile("count(purchase within last 30 days) >= 4")
    with pytest.raises(ValueError, match="definition"):
        other.member(state, NOBODY, T0 + DAY)
    with pytest.raises(ValueError, match="aware"):
        audience.on_event(state, ev("purchase", T0), now=datetime(2026, 3, 1))


_SLIDING_COUNTS = (
    "purchase within last 30 minutes",
    "count(purchase within last 2 hours) >= 2",
    "count(purchase within last 1 days) < 3",
    "count(purchase where revenue > 10 within last 1 hours) > 1",
    "count(purchase within last 3 hours) = 2",
)


@settings(_SETTINGS, max_examples=200)
@given(
    text=st.sampled_from(_SLIDING_COUNTS),
    arrivals=st.lists(
        st.tuples(
            # how late the event arrives, in minutes (negative: dated in the future), often
            # exactly on a window's edge
            st.sampled_from([-10, 0, 1, 29, 30, 31, 59, 60, 61, 119, 120, 121, 180, 1440])
            | st.integers(-60, 300),
            st.integers(0, 240),  # the minute it arrives at (the watermark then)
            st.floats(0, 30),
        ),
        max_size=25,
    ),
)
def test_a_sliding_counts_fast_path_matches_the_general_one(
    text: str, arrivals: list[tuple[int, int, float]]
) -> None:
    """A sliding count's fold and answer without the general sweep (nothing pending or unknown)
    give the answers and timers the general code gives for the same arrivals, at each arrival
    and later (the states may differ: an event that arrives already out of the window leaves
    the fast path's state as it was, with kept events the general one drops, which no answer
    reads), and keep no more events than the count needs."""
    fast = compile_streaming(parse(text, SCHEMA))
    general = compile_streaming(parse(text, SCHEMA))
    for node in general._events:
        assert isinstance(node, _CountNode) and node.simple_kind
        node.simple_kind = False  # the general code for every slot
    states = [fast.new_state(), general.new_state()]
    arrived = T0 - 6 * HOUR
    for seq, (late, after, revenue) in enumerate(sorted(arrivals, key=lambda a: a[1])):
        arrived = max(arrived, T0 - 6 * HOUR + after * MINUTE)
        at = arrived - late * MINUTE
        event_ = MemoryEvent("purchase", at, seq, {"order_id": f"o{seq}", "revenue": revenue})
        asking = Asking(NOBODY, arrived)
        results = [
            audience.step(state, [(to_micros(at), event_)], asking)
            for audience, state in zip((fast, general), states, strict=True)
        ]
        assert results[0][1:] == results[1][1:], f"after {seq + 1} arrivals"
        states = [results[0][0], results[1][0]]
        for node, slot in zip(fast._events, states[0]["n"], strict=True):
            assert len(slot["e"]) <= max(node.keep, 1)
        turn = results[1][2]
        edges = [] if turn is None else [from_micros(turn) - US, from_micros(turn)]
        for later in (arrived, arrived + 30 * MINUTE, arrived + DAY, *edges):
            answers = [
                audience.step(state, (), Asking(NOBODY, later))[1:]
                for audience, state in zip((fast, general), states, strict=True)
            ]
            assert answers[0] == answers[1], f"at {later.isoformat()}"


def test_grouped_arrivals_fold_as_events_one_by_one() -> None:
    """``step`` groups a profile's new events by name for every condition: a sequence over
    several names, a count and a pick of one name each still take all their own events, so
    the state and answer equal those of folding the events one at a time."""
    audience = compile_streaming(
        parse(
            "(product_view then cart_add then purchase within 2 hours) "
            "or count(product_view within last 1 days) >= 3 "
            'or last(purchase).category = "shoes"',
            SCHEMA,
        )
    )
    names = ["product_view", "cart_add", "product_view", "purchase", "app_open", "cart_add"]
    events = [
        MemoryEvent(name, T0 + seq * 10 * MINUTE, seq, {"category": "shoes", "order_id": "o"})
        for seq, name in enumerate(names)
    ]
    asking = Asking(NOBODY, T0 + DAY)
    state, member, turn = audience.step(
        audience.new_state(), [(to_micros(e.timestamp), e) for e in events], asking
    )
    one_by_one = audience.new_state()
    for event_ in events:
        one_by_one = audience.on_event(one_by_one, event_, now=T0 + DAY)
    assert state == one_by_one
    expected, expected_turn = audience.evaluate(one_by_one, NOBODY, T0 + DAY)
    assert member is expected is True
    assert turn == (None if expected_turn is None else to_micros(expected_turn))


@settings(_SETTINGS, max_examples=200)
@given(
    text=st.sampled_from(
        [
            *_SLIDING_COUNTS,
            "product_view then cart_add then purchase within 2 hours",
            "cart_add within last 1 days then not purchase within 1 hours",
        ]
    ),
    batches=st.lists(
        st.tuples(
            st.integers(0, 240),  # the minute the batch arrives at (the watermark then)
            st.lists(
                st.tuples(
                    st.sampled_from(["product_view", "cart_add", "purchase"]),
                    # how late the event arrives, in minutes (negative: dated in the future)
                    st.sampled_from([-10, 0, 0, 0, 1, 60, 120, 121]) | st.integers(-30, 300),
                ),
                max_size=8,
            ),
        ),
        max_size=8,
    ),
    cap=st.sampled_from([3, 1000]),
)
def test_a_batch_of_events_folds_as_the_same_events_one_by_one(
    text: str, batches: list[tuple[int, list[tuple[str, int]]]], cap: int
) -> None:
    """Events that arrive together, folded at once (each condition taking its run of them in
    one go), give the state, answer and timer that folding them one at a time gives, also
    where they pass the cap."""
    audience = compile_streaming(parse(text, SCHEMA), max_events=cap)
    together = one_by_one = audience.new_state()
    seq = 0
    arrived = T0
    for minute, arrivals in sorted(batches, key=lambda b: b[0]):
        arrived = max(arrived, T0 + minute * MINUTE)
        events = []
        for name, late in arrivals:
            props = {"order_id": f"o{seq}", "revenue": 10.0, "category": "shoes", "price": 5.0}
            events.append(MemoryEvent(name, arrived - late * MINUTE, seq, props))
            seq += 1
        events.sort(key=lambda e: (e.timestamp, e.seq))
        asking = Asking(NOBODY, arrived)
        together, member, turn = audience.step(
            together, [(to_micros(e.timestamp), e) for e in events], asking
        )
        for event_ in events:
            one_by_one, alone, alone_turn = audience.step(
                one_by_one, [(to_micros(event_.timestamp), event_)], asking
            )
        if not events:
            one_by_one, alone, alone_turn = audience.step(one_by_one, (), asking)
        assert together == one_by_one, f"at {arrived.isoformat()}"
        assert (member, turn) == (alone, alone_turn), f"at {arrived.isoformat()}"


@pytest.mark.parametrize("cap", [2, 3, 6, 1000])
def test_a_run_of_first_steps_past_the_cap_folds_as_one_by_one(cap: int) -> None:
    """A run of events that only start or continue chains, more than the cap keeps, folded at
    once gives the state (dropped events remembered) that folding them one at a time gives."""
    audience = compile_streaming(
        parse("product_view then cart_add then purchase within 2 hours", SCHEMA),
        max_events=cap,
    )
    names = ["product_view", "cart_add", "product_view", "product_view", "app_open", "cart_add"]
    events = [MemoryEvent(name, T0 + seq * MINUTE, seq, {}) for seq, name in enumerate(names)]
    asking = Asking(NOBODY, T0 + HOUR)
    together = audience.step(
        audience.new_state(), [(to_micros(e.timestamp), e) for e in events], asking
    )
    one_by_one = audience.new_state()
    for event_ in events:
        one_by_one = audience.step(one_by_one, [(to_micros(event_.timestamp), event_)], asking)[0]
    assert together[0] == one_by_one
    assert together[1:] == audience.step(one_by_one, (), asking)[1:]


@settings(_SETTINGS, max_examples=300)
@given(
    text=st.sampled_from(
        [
            "cart_add then not purchase within 1 hours",
            "cart_add within last 1 days then not purchase within 1 hours",
            "cart_add within last 90 minutes then not purchase within 1 hours",
            'cart_add between "2026-03-01" and "2026-03-01T11:00:00Z" '
            "then not purchase within 30 minutes",
            "cart_add between 3 hours ago and 1 hours ago then not purchase within 20 minutes",
            "purchase within last 1 days then not purchase within 1 hours",
        ]
    ),
    kept=st.lists(
        st.tuples(st.integers(0, 6 * 60), st.sampled_from([1, 2, 3]), st.integers(0, 3)),
        max_size=12,
    ),
)
def test_the_one_pass_spans_of_an_abandoned_cart_match_the_table(
    text: str, kept: list[tuple[int, int, int]]
) -> None:
    """``A then not B within D`` finds when each start's chain counts in one pass; it gives
    the spans the general table of steps gives, for starts and absent events in any mix
    (an event that plays both, events at the same instant, a start and a B with the same
    timestamp and seq: that B is not after the start)."""
    audience = compile_streaming(parse(text, SCHEMA))
    (node,) = audience._events
    assert isinstance(node, _SequenceNode)
    base = to_micros(T0 - 3 * HOUR)
    items = sorted(
        ([base + minute * 60_000_000, seq, mask] for minute, mask, seq in kept),
        key=lambda item: (item[0], item[1]),
    )
    if not node.plays.get("cart_add"):  # A and B are both purchases: every event plays both
        items = [[x, seq, 3] for x, seq, _mask in items]
    assert node._pair_spans(items) == node._table_spans(items)


def test_audiences_sharing_a_condition_judge_it_once_with_the_same_answers() -> None:
    """The audiences asked about one profile at one instant share the answers of the
    attribute and consent conditions they have in common; each answer and timer is the one
    it gets when asked alone, and the same profile asked at a later instant judges again."""
    texts = [
        'country = "DE"',
        'country = "DE" and signup_at within last 1 days',
        'not country = "DE" or signup_at within last 2 days',
        "consent(email, marketing) = opted_in and signup_at within last 1 days",
        "consent(email, marketing) = opted_in",
    ]
    compiled = [compile_streaming(parse(text, SCHEMA)) for text in texts]
    person = ProfileData(
        {"country": "DE", "signup_at": (T0 - 20 * HOUR).isoformat()},
        (),
        {("email", "marketing"): "opted_in"},
    )
    for now in (T0, T0 + 5 * HOUR, T0 + DAY + HOUR):
        shared = Asking(person, now)
        together = [a.step(a.new_state(), (), shared)[1:] for a in compiled]
        alone = [a.step(a.new_state(), (), Asking(person, now))[1:] for a in compiled]
        assert together == alone, now.isoformat()
        assert len(shared.judged) == 4  # country, consent and the two windows
    late = Asking(person, T0).at(to_micros(T0 + DAY + HOUR))
    assert compiled[1].step(compiled[1].new_state(), (), late)[1] is False
