"""The in-memory evaluator: every node and every boundary of ``docs/audiences.md``, and a
brute-force reference for sequences compared on random histories."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waymark.model.schemas import FieldType
from waymark.segmentation.compile.memory import (
    CompiledAudience,
    MemoryEvent,
    PreparedProfile,
    ProfileData,
    compile_memory,
    evaluate,
)
from waymark.segmentation.lang.ast import (
    Aggregate,
    AggregateFn,
    Ago,
    And,
    Anniversary,
    At,
    Attr,
    Between,
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
    Sequence,
    Test,
    Text,
    TextOp,
    Unit,
    Which,
    Window,
    Within,
    read_value,
    reader,
    resolve,
)

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
STR, NUM, INT, BOOL, TS = (
    FieldType.STRING,
    FieldType.NUMBER,
    FieldType.INTEGER,
    FieldType.BOOLEAN,
    FieldType.TIMESTAMP,
)
_seqs = itertools.count(1)


def days(n: int) -> Duration:
    return Duration(n, Unit.DAYS)


def minutes(n: int) -> Duration:
    return Duration(n, Unit.MINUTES)


def ev(name: str, at: datetime, seq: int | None = None, **props: Any) -> MemoryEvent:
    return MemoryEvent(name, at, next(_seqs) if seq is None else seq, props)


def profile(
    attributes: Mapping[str, Any] | None = None,
    events: Iterable[MemoryEvent] = (),
    consents: Mapping[tuple[str, str], str] | None = None,
) -> ProfileData:
    return ProfileData(attributes or {}, tuple(events), consents or {})


def attrs(expr: Expr, now: datetime = NOW, **attributes: Any) -> bool:
    return evaluate(expr, profile(attributes), now)


def events(expr: Expr, *history: MemoryEvent, now: datetime = NOW) -> bool:
    return evaluate(expr, profile(events=history), now)


def iso(moment: datetime) -> str:
    return moment.isoformat()


def seq(*steps: EventRef, within: Duration, absent: bool = False) -> Sequence:
    return Sequence(tuple(steps), within, absent)


def ref(name: str, where: Filter | None = None, window: Window | None = None) -> EventRef:
    return EventRef(name, where, window)


# -- attribute tests ----------------------------------------------------------------------------


def test_numbers_compare_as_float() -> None:
    assert attrs(Attr("ltv", Compare(CompareOp.EQ, 3.0), NUM), ltv=3)
    assert attrs(Attr("n", Compare(CompareOp.EQ, 3), INT), n=3.0)
    assert attrs(Attr("ltv", Compare(CompareOp.GT, 100), NUM), ltv=100.5)
    assert not attrs(Attr("ltv", Compare(CompareOp.GT, 100), NUM), ltv=100)
    assert attrs(Attr("ltv", Compare(CompareOp.GE, 100), NUM), ltv=100)
    assert attrs(Attr("ltv", Compare(CompareOp.LT, 0), NUM), ltv=-0.5)
    assert not attrs(Attr("ltv", Compare(CompareOp.LE, 0), NUM), ltv=0.5)


@pytest.mark.parametrize(
    ("test", "kind"),
    [
        (Compare(CompareOp.EQ, 1), NUM),
        (Compare(CompareOp.NE, 1), NUM),
        (Compare(CompareOp.LT, 1), NUM),
        (Compare(CompareOp.GE, 1), NUM),
        (Compare(CompareOp.NE, "DE"), STR),
        (InList((1, 2)), NUM),
        (InList((1, 2), negated=True), NUM),
        (InList(("DE",), negated=True), STR),
        (Text(TextOp.CONTAINS, ""), STR),
        (Exists(True), NUM),
        (Within(Last(days(3650))), TS),
        (Within(Older(days(0))), TS),
        (Compare(CompareOp.NE, "2026-01-01"), TS),
        (Anniversary(366), TS),
        (Compare(CompareOp.NE, True), BOOL),
    ],
)
@pytest.mark.parametrize("stored", ["absent", "null", "wrong type"])
def test_missing_values_fail_every_test_but_is_missing(
    test: Test, kind: FieldType, stored: str
) -> None:
    # a value of another JSON type counts as missing (booleans are not numbers)
    wrong: dict[FieldType, Any] = {STR: ["a list"], NUM: True, BOOL: 1, TS: 5}
    values = {"absent": {}, "null": {"x": None}, "wrong type": {"x": wrong[kind]}}[stored]
    leaf = Attr("x", test, kind)
    assert not attrs(leaf, **values)
    assert attrs(Not(leaf), **values)  # two-valued: not of a false leaf is true
    assert attrs(Attr("x", Exists(False), kind), **values)


def test_present_values_pass_not_equal_and_not_in() -> None:
    # the counterpart of the missing-value cases: the same tests are true on a present value
    assert attrs(Attr("x", Compare(CompareOp.NE, 1), NUM), x=2)
    assert attrs(Attr("x", InList((1, 2), negated=True), NUM), x=3)
    assert not attrs(Attr("x", InList((1, 2), negated=True), NUM), x=2.0)
    assert attrs(Attr("x", Exists(True), NUM), x=0)
    assert not attrs(Attr("x", Exists(False), NUM), x=0)


def test_in_list() -> None:
    plan = Attr("plan", InList(("plus", "pro")), STR)
    assert attrs(plan, plan="pro")
    assert not attrs(plan, plan="free")
    assert not attrs(plan, plan="Pro")  # exact
    assert attrs(Attr("n", InList((1, 2.5)), NUM), n=2.5)
    assert attrs(Attr("n", InList((1, 2.5)), INT), n=1.0)
    assert attrs(Attr("plan", InList(("plus", "pro"), negated=True), STR), plan="free")


def test_strings_compare_exactly_and_text_tests_fold_ascii_only() -> None:
    assert not attrs(
        Attr("email", Compare(CompareOp.EQ, "ann@example.com"), STR), email="Ann@example.com"
    )
    assert attrs(
        Attr("email", Compare(CompareOp.NE, "ann@example.com"), STR), email="Ann@example.com"
    )
    ends = Attr("email", Text(TextOp.ENDS_WITH, "@Example.com"), STR)
    assert attrs(ends, email="ann@EXAMPLE.COM")
    assert not attrs(ends, email="ann@example.co")
    assert attrs(Attr("city", Text(TextOp.STARTS_WITH, "BER"), STR), city="berlin")
    assert not attrs(Attr("city", Text(TextOp.STARTS_WITH, "erl"), STR), city="berlin")
    assert attrs(Attr("city", Text(TextOp.CONTAINS, "ERL"), STR), city="Berlin")
    # only A-Z fold: É and é differ
    assert not attrs(Attr("school", Text(TextOp.STARTS_WITH, "é"), STR), school="École")
    assert attrs(Attr("school", Text(TextOp.STARTS_WITH, "É"), STR), school="École")


def test_booleans() -> None:
    vip = Attr("vip", Compare(CompareOp.EQ, True), BOOL)
    assert attrs(vip, vip=True)
    assert not attrs(vip, vip=False)
    assert not attrs(vip, vip=1)  # a number is not a boolean
    assert attrs(Attr("vip", Compare(CompareOp.NE, True), BOOL), vip=False)


def test_timestamps_compare_as_instants() -> None:
    same = Attr("seen", Compare(CompareOp.EQ, "2026-01-01T01:00:00+01:00"), TS)
    assert attrs(same, seen="2026-01-01T00:00:00Z")
    assert not attrs(same, seen="2026-01-01T01:00:00Z")
    before = Attr("seen", Compare(CompareOp.LT, "2026-01-01"), TS)  # naive/date-only means UTC
    assert attrs(before, seen="2025-12-31T23:59:59+00:00")
    assert not attrs(before, seen="2025-12-31T23:59:59-01:00")  # that is 00:59:59 UTC
    assert not attrs(before, seen="not a time")


def test_dotted_paths_walk_nested_objects() -> None:
    city = Attr("address.city", Compare(CompareOp.EQ, "Berlin"), STR)
    assert attrs(city, address={"city": "Berlin"})
    assert not attrs(city, address={"city": "Bonn"})
    flat = profile({"address.city": "Berlin"})
    assert not evaluate(city, flat, NOW)  # the path is walked, not a flat key
    missing = Attr("address.city", Exists(False), STR)
    assert attrs(missing, address="Berlin")  # a non-object on the way
    assert attrs(missing, address=["Berlin"])
    assert attrs(missing)
    assert not attrs(missing, address={"city": "Berlin"})
    deep = Attr("a.b.c", Compare(CompareOp.GE, 2), NUM)
    assert attrs(deep, a={"b": {"c": 2}})
    assert not attrs(deep, a={"b": {"c": {"d": 2}}})


def test_objects_and_arrays_only_exist() -> None:
    assert attrs(Attr("tags", Exists(True), FieldType.ARRAY), tags=[])
    assert not attrs(Attr("tags", Exists(True), FieldType.ARRAY), tags=None)
    assert attrs(Attr("address", Exists(True), FieldType.OBJECT), address={})
    with pytest.raises(ValueError, match="exists"):
        compile_memory(Attr("tags", Compare(CompareOp.EQ, "a"), FieldType.ARRAY))


# -- windows ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "moment", "inside"),
    [
        (Last(days(30)), NOW - timedelta(days=30), True),
        (Last(days(30)), NOW - timedelta(days=30) - US, False),
        (Last(days(30)), NOW, True),
        (Last(days(30)), NOW + US, False),
        (Last(Duration(1, Unit.WEEKS)), NOW - timedelta(days=7), True),
        (Last(Duration(24, Unit.HOURS)), NOW - timedelta(days=1) - US, False),
        (Next(days(30)), NOW + timedelta(days=30), True),
        (Next(days(30)), NOW + timedelta(days=30) + US, False),
        (Next(days(30)), NOW, True),
        (Next(days(30)), NOW - US, False),
        (Older(days(30)), NOW - timedelta(days=30), False),  # strictly before
        (Older(days(30)), NOW - timedelta(days=30) - US, True),
        (
            Between(At("2026-01-01"), At("2026-03-31")),
            datetime(2026, 3, 31, 23, 59, 59, 999999, UTC),
            True,
        ),
        (Between(At("2026-01-01"), At("2026-03-31")), datetime(2026, 4, 1, tzinfo=UTC), False),
        (Between(At("2026-01-01"), At("2026-03-31")), datetime(2026, 1, 1, tzinfo=UTC), True),
        (Between(At("2026-01-01"), At("2026-03-31")), datetime(2026, 1, 1, tzinfo=UTC) - US, False),
        (
            Between(At("2026-01-01"), At("2026-03-31T12:00:00Z")),
            datetime(2026, 3, 31, 12, tzinfo=UTC),
            True,
        ),
        (
            Between(At("2026-01-01"), At("2026-03-31T12:00:00Z")),
            datetime(2026, 3, 31, 12, tzinfo=UTC) + US,
            False,
        ),
        (Between(Ago(days(30)), Ago(days(7))), NOW - timedelta(days=7), True),
        (Between(Ago(days(30)), Ago(days(7))), NOW - timedelta(days=7) + US, False),
        (Between(Ago(days(30)), Ago(days(7))), NOW - timedelta(days=30), True),
        (Between(Ago(days(30)), Ago(days(7))), NOW - timedelta(days=30) - US, False),
    ],
)
def test_window_boundaries(window: Window, moment: datetime, inside: bool) -> None:
    assert attrs(Attr("at", Within(window), TS), at=iso(moment)) is inside
    # the same window on events (where an index lookup, not a value test, applies it)
    assert events(Occurs(ref("visit", window=window)), ev("visit", moment), now=NOW) is (
        inside and moment <= NOW
    )


def test_relative_bounds_move_with_now() -> None:
    signup = Attr("signup_at", Within(Between(Ago(days(30)), Ago(days(7)))), TS)
    at = iso(NOW - timedelta(days=10))
    assert attrs(signup, now=NOW, signup_at=at)
    assert not attrs(signup, now=NOW + timedelta(days=21), signup_at=at)
    assert not attrs(signup, now=NOW - timedelta(days=4), signup_at=at)


# -- anniversaries ------------------------------------------------------------------------------


def birthday(n: int, kind: FieldType = STR) -> Attr:
    return Attr("birthday", Anniversary(n), kind)


@pytest.mark.parametrize(
    ("now", "born", "n", "expected"),
    [
        (datetime(2026, 12, 28, 12, tzinfo=UTC), "1985-01-02", 5, True),  # across year end
        (datetime(2026, 12, 28, 12, tzinfo=UTC), "1985-01-02", 4, False),
        (datetime(2026, 12, 28, 12, tzinfo=UTC), "1985-12-28", 0, True),  # today
        (datetime(2026, 12, 28, 12, tzinfo=UTC), "1985-12-27", 7, False),  # yesterday: next year
        (datetime(2026, 12, 31, 23, 59, tzinfo=UTC), "1985-01-01", 1, True),
        (datetime(2027, 2, 28, tzinfo=UTC), "2000-02-29", 0, True),  # 29 Feb falls on 28 Feb
        (datetime(2027, 2, 27, tzinfo=UTC), "2000-02-29", 0, False),
        (datetime(2027, 2, 27, tzinfo=UTC), "2000-02-29", 1, True),
        (datetime(2027, 3, 1, tzinfo=UTC), "2000-02-29", 300, False),  # passed; next is 2028-02-29
        (datetime(2028, 2, 28, tzinfo=UTC), "2000-02-29", 0, False),  # leap year: on the 29th
        (datetime(2028, 2, 28, tzinfo=UTC), "2000-02-29", 1, True),
        (datetime(2026, 3, 15, tzinfo=UTC), "1990-03-22", 7, True),
        (datetime(2026, 3, 15, tzinfo=UTC), "1990-03-23", 7, False),
        (datetime(2026, 3, 15, tzinfo=UTC), "1990-03-15 and more text", 0, True),  # leading date
        (datetime(2026, 3, 15, tzinfo=UTC), "15/03/1990", 366, False),
    ],
)
def test_anniversaries(now: datetime, born: str, n: int, expected: bool) -> None:
    assert attrs(birthday(n), now=now, birthday=born) is expected


@pytest.mark.parametrize(
    ("zone", "now", "born", "expected"),
    [
        # 11:30 UTC on 1 March is already 2 March in Auckland (NZDT, UTC+13)
        ("Pacific/Auckland", datetime(2026, 3, 1, 11, 30, tzinfo=UTC), "1990-03-02", True),
        ("Pacific/Auckland", datetime(2026, 3, 1, 11, 30, tzinfo=UTC), "1990-03-01", False),
        ("UTC", datetime(2026, 3, 1, 11, 30, tzinfo=UTC), "1990-03-02", False),
        (None, datetime(2026, 3, 1, 11, 30, tzinfo=UTC), "1990-03-01", True),
        # 05:00 UTC on 1 March is still 28 February in Los Angeles (PST, UTC-8)
        ("America/Los_Angeles", datetime(2026, 3, 1, 5, tzinfo=UTC), "1990-02-28", True),
        ("America/Los_Angeles", datetime(2026, 3, 1, 5, tzinfo=UTC), "1990-03-01", False),
        (None, datetime(2026, 3, 1, 5, tzinfo=UTC), "1990-02-28", False),
        ("Not/AZone", datetime(2026, 3, 1, 5, tzinfo=UTC), "1990-03-01", True),  # unknown: UTC
        (-8, datetime(2026, 3, 1, 5, tzinfo=UTC), "1990-03-01", True),  # not a string: UTC
    ],
)
def test_anniversaries_count_in_the_profile_time_zone(
    zone: Any, now: datetime, born: str, expected: bool
) -> None:
    values = {"birthday": born} if zone is None else {"birthday": born, "timezone": zone}
    assert attrs(birthday(0), now=now, **values) is expected


def test_anniversary_of_a_timestamp_uses_its_utc_date() -> None:
    now = datetime(2026, 3, 2, 12, tzinfo=UTC)
    born = "1990-03-01T23:30:00-05:00"  # 04:30 UTC on 2 March
    assert attrs(birthday(0, TS), now=now, birthday=born)
    assert not attrs(birthday(0, STR), now=now, birthday=born)  # a string: its leading date
    assert not attrs(birthday(0, TS), now=now, birthday="1990-03-02 garbage")
    assert attrs(Not(birthday(0, TS)), now=now)  # missing


def test_anniversary_of_an_event_property_uses_the_profile_zone() -> None:
    now = datetime(2026, 3, 1, 11, 30, tzinfo=UTC)
    renewal = Occurs(ref("subscribed", Prop("renews_on", Anniversary(0), STR)))
    history = [ev("subscribed", now - timedelta(days=400), renews_on="2025-03-02")]
    auckland = profile({"timezone": "Pacific/Auckland"}, history)
    assert evaluate(renewal, auckland, now)
    assert not evaluate(renewal, profile({}, history), now)


# -- events -------------------------------------------------------------------------------------


def test_occurrence_and_visibility() -> None:
    purchase = Occurs(ref("purchase"))
    assert events(purchase, ev("purchase", NOW))  # at now: visible
    assert not events(purchase, ev("purchase", NOW + US))  # after now: not yet visible
    assert not events(purchase, ev("view", NOW - US))
    assert not events(purchase)
    # a future event is invisible to every node, not just occurrence
    future = ev("purchase", NOW + timedelta(hours=1), revenue=10)
    assert events(Count(ref("purchase"), CompareOp.EQ, 0), future)
    assert events(Aggregate(AggregateFn.SUM, ref("purchase"), "revenue", CompareOp.EQ, 0), future)
    assert not events(Pick(Which.LAST, ref("purchase"), "revenue", Exists(True), NUM), future)


def test_count_with_window_boundaries() -> None:
    history = [
        ev("purchase", NOW - timedelta(days=30)),  # in
        ev("purchase", NOW - timedelta(days=30) - US),  # out
        ev("purchase", NOW),  # in
        ev("purchase", NOW + US),  # not yet visible
        ev("refund", NOW - timedelta(days=1)),
    ]
    recent = ref("purchase", window=Last(days(30)))
    assert events(Count(recent, CompareOp.EQ, 2), *history)
    assert not events(Count(recent, CompareOp.EQ, 3), *history)
    assert events(Count(recent, CompareOp.GE, 2), *history)
    assert not events(Count(recent, CompareOp.GT, 2), *history)
    assert events(Count(ref("purchase"), CompareOp.EQ, 3), *history)
    old = ref("purchase", window=Older(days(30)))
    assert events(Count(old, CompareOp.EQ, 1), *history)  # only the one strictly before
    assert events(Count(ref("nothing"), CompareOp.EQ, 0), *history)
    assert events(Count(ref("nothing"), CompareOp.LT, 1), *history)


def test_where_filters() -> None:
    shoes = Prop("category", Compare(CompareOp.EQ, "shoes"), STR)
    pricey = Prop("revenue", Compare(CompareOp.GT, 100), NUM)
    history = [
        ev("purchase", NOW - timedelta(days=3), category="shoes", revenue=150),
        ev("purchase", NOW - timedelta(days=2), category="shoes", revenue=50),
        ev("purchase", NOW - timedelta(days=1), category="hats", revenue=500),
        ev("purchase", NOW - timedelta(days=1), revenue=500),
        ev("purchase", NOW - timedelta(days=1), category="shoes", revenue="200"),
    ]
    assert events(Count(ref("purchase", shoes), CompareOp.EQ, 3), *history)
    shoes_and_pricey = FilterAnd((shoes, pricey))
    both = ref("purchase", shoes_and_pricey)
    assert events(Count(both, CompareOp.EQ, 1), *history)
    either = ref("purchase", FilterOr((shoes, pricey)))
    assert events(Count(either, CompareOp.EQ, 5), *history)
    # not(category = "shoes") is true for the event without a category: two-valued
    assert events(Count(ref("purchase", FilterNot(shoes)), CompareOp.EQ, 2), *history)
    dated = ref("purchase", shoes_and_pricey, Between(At("2026-03-12"), At("2026-03-12")))
    assert events(Occurs(dated), *history)  # 3 days before NOW is 2026-03-12T12:00
    dated = ref("purchase", shoes_and_pricey, Between(At("2026-03-13"), At("2026-03-14")))
    assert not events(Occurs(dated), *history)
    nested = ref("purchase", Prop("item.sku", Compare(CompareOp.EQ, "A1"), STR))
    assert events(Occurs(nested), ev("purchase", NOW, item={"sku": "A1"}))
    assert not events(Occurs(nested), ev("purchase", NOW, item="A1"))


AGG_HISTORY = (
    ev("purchase", NOW - timedelta(days=1), revenue=300),
    ev("purchase", NOW - timedelta(days=2), revenue=250.5),
    ev("purchase", NOW - timedelta(days=3), revenue="100"),  # not a number
    ev("purchase", NOW - timedelta(days=4), revenue=True),  # booleans are not numbers
    ev("purchase", NOW - timedelta(days=5)),
    ev("purchase", NOW - timedelta(days=91), revenue=1000),  # outside the window
    ev("purchase", NOW + US, revenue=1000),  # not yet visible
)


@pytest.mark.parametrize(
    ("fn", "value"),
    [
        (AggregateFn.SUM, 550.5),
        (AggregateFn.AVG, 275.25),
        (AggregateFn.MIN, 250.5),
        (AggregateFn.MAX, 300),
    ],
)
def test_aggregates(fn: AggregateFn, value: float) -> None:
    recent = ref("purchase", window=Last(days(90)))
    assert events(Aggregate(fn, recent, "revenue", CompareOp.EQ, value), *AGG_HISTORY)
    assert events(Aggregate(fn, recent, "revenue", CompareOp.GE, value), *AGG_HISTORY)
    assert not events(Aggregate(fn, recent, "revenue", CompareOp.GT, value), *AGG_HISTORY)
    assert not events(Aggregate(fn, recent, "revenue", CompareOp.LT, value), *AGG_HISTORY)


@pytest.mark.parametrize("fn", [AggregateFn.AVG, AggregateFn.MIN, AggregateFn.MAX])
@pytest.mark.parametrize("op", list(CompareOp))
@pytest.mark.parametrize(
    "history",
    [(), (ev("purchase", NOW, revenue="12"), ev("purchase", NOW, other=1))],
    ids=["no events", "no numbers"],
)
def test_avg_min_max_of_nothing_are_missing(
    fn: AggregateFn, op: CompareOp, history: tuple[MemoryEvent, ...]
) -> None:
    leaf = Aggregate(fn, ref("purchase"), "revenue", op, 0)
    assert not events(leaf, *history)
    assert events(Not(leaf), *history)


def test_sum_of_nothing_is_zero() -> None:
    def total(op: CompareOp, value: float) -> Aggregate:
        return Aggregate(AggregateFn.SUM, ref("purchase"), "revenue", op, value)

    for history in [(), (ev("purchase", NOW, revenue="12"),)]:
        assert events(total(CompareOp.EQ, 0), *history)
        assert events(total(CompareOp.LE, 0), *history)
        assert not events(total(CompareOp.GT, 0), *history)
        assert not events(total(CompareOp.NE, 0), *history)


def test_aggregate_with_where_and_nested_path() -> None:
    shoes = Prop("category", Compare(CompareOp.EQ, "shoes"), STR)
    history = [
        ev("purchase", NOW, category="shoes", price={"gross": 10}),
        ev("purchase", NOW, category="shoes", price={"gross": 5}),
        ev("purchase", NOW, category="hats", price={"gross": 100}),
    ]
    assert events(
        Aggregate(AggregateFn.SUM, ref("purchase", shoes), "price.gross", CompareOp.EQ, 15),
        *history,
    )
    assert events(
        Aggregate(AggregateFn.MAX, ref("purchase"), "price.gross", CompareOp.EQ, 100), *history
    )


def test_first_and_last_order_by_timestamp_then_seq() -> None:
    t = NOW - timedelta(days=1)
    history = [  # listed out of order on purpose
        ev("purchase", t, seq=7, category="hats"),
        ev("purchase", t, seq=5, category="shoes"),
        ev("purchase", t - timedelta(hours=1), seq=9, category="socks"),
        ev("purchase", t + timedelta(days=2), seq=1, category="future"),  # after NOW
    ]

    def pick(which: Which, category: str) -> Pick:
        return Pick(which, ref("purchase"), "category", Compare(CompareOp.EQ, category), STR)

    assert events(pick(Which.LAST, "hats"), *history)
    assert not events(pick(Which.LAST, "shoes"), *history)
    assert events(pick(Which.FIRST, "socks"), *history)
    assert not events(pick(Which.LAST, "future"), *history)
    windowed = Pick(
        Which.FIRST,
        ref("purchase", window=Last(days(1))),
        "category",
        Compare(CompareOp.EQ, "shoes"),
        STR,
    )
    assert events(windowed, *history)


def test_pick_without_an_event_is_false_even_for_is_missing() -> None:
    missing = Pick(Which.LAST, ref("purchase"), "category", Exists(False), STR)
    assert not events(missing)
    assert not events(missing, ev("view", NOW))
    assert events(missing, ev("purchase", NOW))  # the event lacks the property
    assert not events(missing, ev("purchase", NOW, category="shoes"))
    assert events(Not(missing))


def test_pick_timestamp() -> None:
    def first_open(test: Test) -> Pick:
        return Pick(Which.FIRST, ref("app_open"), None, test, TS)

    old = first_open(Within(Older(days(365))))
    later = ev("app_open", NOW - timedelta(days=1))
    assert events(old, ev("app_open", NOW - timedelta(days=365) - US), later)
    assert not events(old, ev("app_open", NOW - timedelta(days=365)), later)  # strictly
    assert not events(old, later)
    assert not events(old)
    at = first_open(Compare(CompareOp.EQ, "2026-03-14T13:00:00+01:00"))
    assert events(at, ev("app_open", datetime(2026, 3, 14, 12, tzinfo=UTC)))
    anniversary = first_open(Anniversary(0))
    assert events(anniversary, ev("app_open", datetime(2025, 3, 15, 23, tzinfo=UTC)))
    assert not events(anniversary, ev("app_open", datetime(2025, 3, 14, 23, tzinfo=UTC)))


def test_pick_with_where() -> None:
    shoes = Prop("category", Compare(CompareOp.EQ, "shoes"), STR)
    pick = Pick(Which.LAST, ref("purchase", shoes), "revenue", Compare(CompareOp.GT, 100), NUM)
    assert events(
        pick,
        ev("purchase", NOW - timedelta(hours=2), category="shoes", revenue=150),
        ev("purchase", NOW - timedelta(hours=1), category="hats", revenue=5),
    )
    assert not events(
        pick,
        ev("purchase", NOW - timedelta(hours=2), category="shoes", revenue=150),
        ev("purchase", NOW - timedelta(hours=1), category="shoes", revenue=5),
    )


# -- sequences ----------------------------------------------------------------------------------

HOUR = Duration(1, Unit.HOURS)
T0 = NOW - timedelta(days=1)


def at(m: float) -> datetime:
    """T0 plus ``m`` minutes."""
    return T0 + timedelta(minutes=m)


CART_THEN_PURCHASE = seq(ref("cart_add"), ref("purchase"), within=HOUR)
ABANDONED = seq(ref("cart_add"), ref("purchase"), within=HOUR, absent=True)


def test_sequence_within_includes_its_end() -> None:
    assert events(CART_THEN_PURCHASE, ev("cart_add", at(0)), ev("purchase", at(60)))
    assert not events(CART_THEN_PURCHASE, ev("cart_add", at(0)), ev("purchase", at(60) + US))
    assert not events(CART_THEN_PURCHASE, ev("purchase", at(0)), ev("cart_add", at(1)))
    assert events(
        CART_THEN_PURCHASE, ev("purchase", at(0)), ev("cart_add", at(1)), ev("purchase", at(2))
    )


def test_sequence_ties_are_ordered_by_seq() -> None:
    assert events(CART_THEN_PURCHASE, ev("cart_add", at(0), seq=1), ev("purchase", at(0), seq=2))
    assert not events(
        CART_THEN_PURCHASE, ev("purchase", at(0), seq=1), ev("cart_add", at(0), seq=2)
    )
    assert events(CART_THEN_PURCHASE, ev("purchase", at(0), seq=2), ev("cart_add", at(0), seq=1))


def test_sequence_steps_are_distinct_events() -> None:
    twice = seq(ref("purchase"), ref("purchase"), within=HOUR)
    assert not events(twice, ev("purchase", at(0)))
    assert events(twice, ev("purchase", at(0), seq=1), ev("purchase", at(0), seq=2))


def test_sequence_events_after_now_are_invisible() -> None:
    history = (ev("cart_add", NOW - timedelta(minutes=5)), ev("purchase", NOW + US))
    assert not events(CART_THEN_PURCHASE, *history)
    assert events(CART_THEN_PURCHASE, *history, now=NOW + US)


def test_sequence_tries_every_start() -> None:
    abc = seq(ref("a"), ref("b"), ref("c"), within=HOUR)
    history = [ev("a", at(0)), ev("b", at(10)), ev("b", at(55)), ev("c", at(80))]
    assert not events(abc, *history)  # from a@0, c@80 is too late
    assert events(abc, *history, ev("a", at(50)))  # from a@50: b@55, c@80


def test_sequence_retries_a_start_exactly_d_before_the_failing_step() -> None:
    abc = seq(ref("a"), ref("b"), ref("c"), within=HOUR)
    history = [ev("a", at(0)), ev("b", at(10)), ev("a", at(20)), ev("b", at(30))]
    assert events(abc, *history, ev("c", at(80)))  # from a@20: c@80 is exactly at the deadline
    assert not events(abc, *history, ev("c", at(80) + US))


def test_sequence_needs_the_earliest_next_step() -> None:
    abc = seq(ref("a"), ref("b"), ref("c"), within=HOUR)
    # taking the latest b (b@40) would leave no c after it
    assert events(abc, ev("a", at(0)), ev("b", at(5)), ev("c", at(30)), ev("b", at(40)))
    assert not events(abc, ev("a", at(0)), ev("c", at(30)), ev("b", at(40)))


def test_four_step_funnel() -> None:
    funnel = seq(
        ref("product_view"),
        ref("cart_add"),
        ref("checkout_started"),
        ref("purchase"),
        within=Duration(2, Unit.DAYS),
    )
    d = timedelta(days=1)
    history = [
        ev("product_view", T0 - 3 * d),
        ev("cart_add", T0 - 3 * d + timedelta(hours=1)),
        ev("checkout_started", T0 - d),  # at that view's deadline: the purchase is too late
        ev("product_view", T0 - d - timedelta(hours=2)),
        ev("purchase", T0 - d + timedelta(hours=1)),
    ]
    assert not events(funnel, *history)  # second view has no cart_add after it
    history.append(ev("cart_add", T0 - d - timedelta(hours=1)))
    assert events(funnel, *history)
    # greedy-earliest matters: a later cart_add after the checkout must not hide the early one
    history.append(ev("cart_add", T0 - d + timedelta(minutes=30)))
    assert events(funnel, *history)
    assert not events(funnel, *[e for e in history if e.name != "purchase"])


def test_sequence_window_applies_to_the_first_step_only() -> None:
    step1 = ref("product_view", window=Between(Ago(days(30)), Ago(days(20))))
    view_then_buy = seq(step1, ref("purchase"), within=days(15))
    assert events(
        view_then_buy,
        ev("product_view", NOW - timedelta(days=25)),
        ev("purchase", NOW - timedelta(days=12)),
    )
    assert not events(
        view_then_buy,
        ev("product_view", NOW - timedelta(days=19)),
        ev("purchase", NOW - timedelta(days=12)),
    )


def test_sequence_with_where_on_steps() -> None:
    big = Prop("revenue", Compare(CompareOp.GT, 100), NUM)
    buy_big = seq(ref("cart_add"), ref("purchase", big), within=HOUR)
    assert not events(buy_big, ev("cart_add", at(0)), ev("purchase", at(5), revenue=50))
    assert events(buy_big, ev("cart_add", at(0)), ev("purchase", at(5), revenue=500))
    not_big = seq(ref("cart_add"), ref("purchase", big), within=HOUR, absent=True)
    assert events(not_big, ev("cart_add", at(0)), ev("purchase", at(5), revenue=50))
    assert not events(not_big, ev("cart_add", at(0)), ev("purchase", at(5), revenue=500))


def test_abandoned_cart_waits_for_the_hour() -> None:
    cart = NOW - timedelta(minutes=60)
    assert events(ABANDONED, ev("cart_add", cart))  # a + D <= now
    assert not events(ABANDONED, ev("cart_add", cart + US))  # the hour has not passed
    assert not events(ABANDONED, ev("cart_add", cart), now=cart + timedelta(minutes=59))
    assert not events(ABANDONED)


def test_abandoned_cart_purchase_boundaries() -> None:
    cart = ev("cart_add", at(0), seq=10)
    assert not events(ABANDONED, cart, ev("purchase", at(60)))  # up to a + D included
    assert events(ABANDONED, cart, ev("purchase", at(60) + US))
    assert events(ABANDONED, cart, ev("purchase", at(-1)))  # before the cart: no matter
    assert events(ABANDONED, cart, ev("purchase", at(0), seq=9))  # same instant, before
    assert not events(ABANDONED, cart, ev("purchase", at(0), seq=11))  # same instant, after


def test_abandoned_cart_any_cart_counts() -> None:
    bought = [
        ev("cart_add", NOW - timedelta(hours=3)),
        ev("purchase", NOW - timedelta(hours=2, minutes=30)),
    ]
    assert not events(ABANDONED, *bought, ev("cart_add", NOW - timedelta(minutes=30)))  # too soon
    assert events(ABANDONED, *bought, ev("cart_add", NOW - timedelta(hours=2)))
    # a purchase after the first cart's hour does not save it
    assert events(ABANDONED, ev("cart_add", at(0)), ev("cart_add", at(30)), ev("purchase", at(70)))


def test_absent_step_of_the_same_type_is_another_event() -> None:
    cheap = Prop("revenue", Compare(CompareOp.LT, 100), NUM)
    no_more = seq(ref("purchase", cheap), ref("purchase"), within=HOUR, absent=True)
    assert events(no_more, ev("purchase", at(0), revenue=5))  # it does not follow itself
    assert not events(no_more, ev("purchase", at(0), 1, revenue=5), ev("purchase", at(0), 2))
    assert events(no_more, ev("purchase", at(0), 1), ev("purchase", at(0), 2, revenue=5))
    assert events(no_more, ev("purchase", at(0), revenue=5), ev("purchase", at(61)))


def test_browse_abandonment_with_a_window() -> None:
    browse = seq(
        ref("product_view", window=Between(Ago(days(30)), Ago(days(7)))),
        ref("purchase"),
        within=days(7),
        absent=True,
    )
    view = ev("product_view", NOW - timedelta(days=10))
    assert events(browse, view)
    assert not events(browse, view, ev("purchase", NOW - timedelta(days=5)))
    assert events(browse, view, ev("purchase", NOW - timedelta(days=2)))
    assert not events(browse, ev("product_view", NOW - timedelta(days=5)))  # not in the window


def test_absent_last_takes_the_latest_step_before_it() -> None:
    abc = seq(ref("a"), ref("b"), ref("c"), within=HOUR, absent=True)
    # with b@10 a c follows; with b@30 none does
    assert events(abc, ev("a", at(0)), ev("b", at(10)), ev("c", at(20)), ev("b", at(30)))
    assert not events(abc, ev("a", at(0)), ev("b", at(10)), ev("c", at(20)))
    assert not events(abc, ev("a", at(0)), ev("b", at(10)), ev("c", at(20)), ev("b", at(61)))
    assert not events(abc, ev("a", at(0)))  # the positive steps must happen
    assert events(abc, ev("a", at(0)), ev("b", at(60)))
    assert not events(abc, ev("a", at(0)), ev("b", at(30)), now=at(60) - US)  # D must pass
    assert events(abc, ev("a", at(0)), ev("b", at(30)), now=at(60))


def test_four_step_absent_needs_earliest_prefix_and_latest_last_positive() -> None:
    abcd = seq(ref("a"), ref("b"), ref("c"), ref("d"), within=HOUR, absent=True)
    # earliest b is needed (no c after b@40); then c@30 and no d
    assert events(abcd, ev("a", at(0)), ev("b", at(5)), ev("c", at(30)), ev("b", at(40)))
    # latest c is needed: after c@10 a d follows, after c@40 none
    assert events(
        abcd, ev("a", at(0)), ev("b", at(5)), ev("c", at(10)), ev("d", at(15)), ev("c", at(40))
    )
    assert not events(abcd, ev("a", at(0)), ev("b", at(5)), ev("c", at(10)), ev("d", at(15)))
    assert not events(abcd, ev("a", at(0)), ev("b", at(5)), ev("c", at(70)))  # c too late
    assert not events(abcd, ev("a", at(0)), ev("c", at(3)), ev("b", at(5)))  # c before b


# -- consent and logic --------------------------------------------------------------------------


def test_consent() -> None:
    consents = {("email", "marketing"): "opted_in", ("sms", "marketing"): "opted_out"}
    person = profile(consents=consents)

    def check(channel: str, status: ConsentStatus, negated: bool = False) -> bool:
        return evaluate(Consent(channel, "marketing", status, negated), person, NOW)

    assert check("email", ConsentStatus.OPTED_IN)
    assert not check("email", ConsentStatus.OPTED_OUT)
    assert check("sms", ConsentStatus.OPTED_OUT)
    assert check("push", ConsentStatus.UNKNOWN)  # no record
    assert not check("push", ConsentStatus.OPTED_IN)
    assert check("push", ConsentStatus.OPTED_IN, negated=True)
    assert not check("email", ConsentStatus.OPTED_IN, negated=True)
    assert not evaluate(Consent("email", "transactional", ConsentStatus.OPTED_IN), person, NOW)


def test_and_or_not() -> None:
    de = Attr("country", Compare(CompareOp.EQ, "DE"), STR)
    rich = Attr("ltv", Compare(CompareOp.GT, 100), NUM)
    assert attrs(And((de, rich)), country="DE", ltv=101)
    assert not attrs(And((de, rich)), country="DE", ltv=100)
    assert attrs(Or((de, rich)), country="FR", ltv=101)
    assert not attrs(Or((de, rich)), country="FR", ltv=100)
    free = Attr("plan", Compare(CompareOp.EQ, "free"), STR)
    na = Attr("country", InList(("US", "CA")), STR)
    neither = Not(Or((free, na)))
    assert attrs(neither, plan="pro", country="DE")
    assert not attrs(neither, plan="pro", country="CA")
    assert attrs(neither)  # both missing: both false, so not(or) is true


def test_the_docs_first_example() -> None:
    audience = And(
        (
            Attr("country", Compare(CompareOp.EQ, "DE"), STR),
            Count(ref("purchase", window=Last(days(30))), CompareOp.GE, 3),
            Attr("lifetime_value", Compare(CompareOp.GT, 100), NUM),
        )
    )
    buys = [ev("purchase", NOW - timedelta(days=d)) for d in (1, 10, 30)]
    person = profile({"country": "DE", "lifetime_value": 250}, buys)
    assert evaluate(audience, person, NOW)
    assert not evaluate(audience, person, NOW + US)  # the oldest purchase leaves the window


# -- contract -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        InAudience("vip"),
        And((Attr("x", Exists(True), STR), Not(InAudience("vip")))),
        Attr("x", Exists(True)),  # not checked: no kind
        Occurs(ref("purchase", Prop("revenue", Exists(True)))),
        Attr("x", Compare(CompareOp.LT, "b"), STR),  # strings are not ordered
        Attr("x", Compare(CompareOp.EQ, "1"), NUM),  # literal of another type
        Attr("x", Compare(CompareOp.EQ, True), NUM),
        Attr("x", Compare(CompareOp.EQ, 1), BOOL),
        Attr("x", Compare(CompareOp.EQ, "yesterday"), TS),
        Attr("x", Text(TextOp.CONTAINS, "1"), NUM),
        Attr("x", Within(Last(days(1))), STR),
        Attr("x", Anniversary(1), NUM),
        Pick(Which.FIRST, ref("a"), None, Exists(True), STR),
        seq(ref("a"), within=HOUR),
        seq(ref("a"), ref("b", window=Last(days(1))), within=HOUR),
    ],
)
def test_unchecked_trees_are_refused(expr: Expr) -> None:
    with pytest.raises(ValueError):
        compile_memory(expr)


def test_prepared_profile_orders_groups_and_hides_the_future() -> None:
    history = [
        ev("b", at(5), seq=3),
        ev("a", at(5), seq=2),
        ev("a", at(5), seq=1),
        ev("a", at(1), seq=9),
        ev("a", NOW, seq=4),
        ev("a", NOW + US, seq=5),
    ]
    prepared = PreparedProfile(profile(events=history), NOW)
    assert [e.seq for e in prepared.events("a")] == [9, 1, 2, 4]
    assert [e.seq for e in prepared.events("b")] == [3]
    assert prepared.events("c") == ()
    with pytest.raises(ValueError, match="aware"):
        PreparedProfile(profile(), datetime(2026, 1, 1))


def test_audiences_sharing_a_prepared_profile_keep_their_references_apart() -> None:
    def category(name: str) -> Prop:
        return Prop("category", Compare(CompareOp.EQ, name), STR)

    recent = Last(days(1))
    audiences: list[tuple[Expr, bool]] = [
        (Count(ref("purchase", category("shoes")), CompareOp.EQ, 2), True),
        (Count(ref("purchase", category("hats")), CompareOp.EQ, 1), True),
        (Occurs(ref("purchase", category("socks"))), False),
        (Count(ref("purchase", category("shoes"), recent), CompareOp.EQ, 1), True),
        (Count(ref("refund", category("shoes")), CompareOp.EQ, 0), True),
        (Occurs(ref("purchase", category("shoes"))), True),
        (
            Aggregate(AggregateFn.SUM, ref("purchase", category("shoes")), "n", CompareOp.EQ, 3),
            True,
        ),
        (
            Pick(Which.LAST, ref("purchase", category("hats")), "n", Compare(CompareOp.EQ, 5), NUM),
            True,
        ),
    ]
    history = [
        ev("purchase", NOW - timedelta(days=2), category="shoes", n=1),
        ev("purchase", NOW - timedelta(hours=2), category="shoes", n=2),
        ev("purchase", NOW - timedelta(hours=1), category="hats", n=5),
    ]
    for order in (audiences, audiences[::-1]):
        prepared = PreparedProfile(profile(events=history), NOW)
        for expr, expected in order:
            assert compile_memory(expr)(prepared, NOW) is expected, expr


def test_compiled_audiences_share_one_prepared_profile() -> None:
    audiences: list[Expr] = [
        Occurs(ref("a")),
        Count(ref("a"), CompareOp.EQ, 2),
        Not(Occurs(ref("b"))),
        Attr("x", Compare(CompareOp.EQ, 1), NUM),
        seq(ref("a"), ref("a"), within=HOUR),
    ]
    person = profile({"x": 1}, [ev("a", at(0)), ev("a", at(5)), ev("b", NOW + US)])
    prepared = PreparedProfile(person, NOW)
    compiled = [compile_memory(audience) for audience in audiences]
    assert all(isinstance(c, CompiledAudience) for c in compiled)
    assert [c(prepared, NOW) for c in compiled] == [True, True, True, True, True]
    assert [c(person, NOW) for c in compiled] == [evaluate(a, person, NOW) for a in audiences]
    assert not compiled[2](person, NOW + US)
    with pytest.raises(ValueError, match="another instant"):
        compiled[0](prepared, NOW + US)


# -- a brute-force reference for sequences --------------------------------------------------------

NAMES = ("a", "b", "c")
GRID = timedelta(minutes=10)


def brute_matches(event: MemoryEvent, step: EventRef, now: datetime) -> bool:
    if event.name != step.name:
        return False
    if step.where is not None:
        assert isinstance(step.where, Prop) and isinstance(step.where.test, Compare)
        if event.properties.get(step.where.path) != step.where.test.value:
            return False
    return step.window is None or resolve(step.window, now).contains(event.timestamp)


def brute_sequence(node: Sequence, history: Iterable[MemoryEvent], now: datetime) -> bool:
    """The definition, literally: try every assignment of visible events to the steps."""
    visible = [e for e in history if e.timestamp <= now]
    steps = node.steps[:-1] if node.absent_last else node.steps
    within = node.within.delta

    def key(e: MemoryEvent) -> tuple[datetime, int]:
        return (e.timestamp, e.seq)

    candidates = [[e for e in visible if brute_matches(e, step, now)] for step in steps]
    for chain in itertools.product(*candidates):
        ordered = all(key(x) < key(y) for x, y in itertools.pairwise(chain))
        deadline = chain[0].timestamp + within
        if not ordered or chain[-1].timestamp > deadline:
            continue
        if not node.absent_last:
            return True
        if deadline > now:
            continue
        last = node.steps[-1]
        if not any(
            brute_matches(b, last, now) and key(b) > key(chain[-1]) and b.timestamp <= deadline
            for b in visible
        ):
            return True
    return False


@st.composite
def sequences(draw: st.DrawFn) -> Sequence:
    """2 to 4 steps, some filtered, the first maybe windowed; ``within`` often on the grid."""
    steps = []
    for i in range(draw(st.integers(2, 4))):
        value = draw(st.sampled_from([None, None, None, 0, 1]))
        where = None if value is None else Prop("v", Compare(CompareOp.EQ, value), INT)
        window: Window | None = None
        if i == 0:
            window = draw(
                st.sampled_from([None, None])
                | st.integers(0, 70).map(lambda m: Last(minutes(m)))
                | st.integers(0, 70).map(lambda m: Older(minutes(m)))
            )
        steps.append(EventRef(draw(st.sampled_from(NAMES)), where, window))
    within = minutes(draw(st.sampled_from([0, 10, 20, 30, 40, 60]) | st.integers(0, 70)))
    return Sequence(tuple(steps), within, draw(st.booleans()))


@st.composite
def histories(draw: st.DrawFn, names: tuple[str, ...]) -> list[MemoryEvent]:
    """Up to 10 events, mostly of ``names`` (the steps'), on a coarse grid so that ties
    happen, with sequence numbers unrelated to the time order."""
    n = draw(st.integers(0, 10))
    seqs = draw(st.permutations(range(n)))
    return [
        MemoryEvent(
            draw(st.sampled_from((*names, *names, "other"))),
            T0 + draw(st.integers(0, 6)) * GRID,
            seqs[i],
            draw(st.sampled_from([{}, {"v": 0}, {"v": 1}])),
        )
        for i in range(n)
    ]


@st.composite
def cases(draw: st.DrawFn) -> tuple[Sequence, list[MemoryEvent], datetime]:
    node = draw(sequences())
    history = draw(histories(tuple(step.name for step in node.steps)))
    return node, history, T0 + draw(st.integers(0, 10)) * GRID


@settings(max_examples=2000, deadline=None)
@given(case=cases())
def test_sequences_agree_with_the_brute_force_reference(
    case: tuple[Sequence, list[MemoryEvent], datetime],
) -> None:
    node, history, now = case
    expected = brute_sequence(node, history, now)
    assert evaluate(node, profile(events=history), now) is expected
    assert evaluate(Not(node), profile(events=history), now) is not expected


@settings(max_examples=300, deadline=None)
@given(case=cases(), rng=st.randoms(use_true_random=False))
def test_results_do_not_depend_on_the_order_of_the_events(
    case: tuple[Sequence, list[MemoryEvent], datetime], rng: random.Random
) -> None:
    node, history, now = case
    shuffled = list(history)
    rng.shuffle(shuffled)
    nodes: list[Expr] = [
        node,
        Pick(Which.LAST, node.steps[0], "v", Compare(CompareOp.EQ, 1), INT),
        Pick(Which.FIRST, node.steps[1], "v", Exists(False), INT),
        Count(node.steps[0], CompareOp.GE, 2),
    ]
    for expr in nodes:
        assert evaluate(expr, profile(events=history), now) is evaluate(
            expr, profile(events=shuffled), now
        )


def test_every_kinds_reader_reads_none_as_none() -> None:
    """The evaluators bind ``reader(kind)`` and call it on absent values as they are."""
    for kind in FieldType:
        assert reader(kind)(None) is None
        assert read_value(None, kind) is None
