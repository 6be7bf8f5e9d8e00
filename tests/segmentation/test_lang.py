"""Tests of the audience language: the text form, the JSON form, the checker and expansion."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.segmentation.strategies import AUDIENCE_NAMES, audiences
from waymark.core.errors import InvalidInput
from waymark.model.schemas import FieldType, Schema, parse_schema
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
    Text,
    TextOp,
    Unit,
    Which,
    Within,
)
from waymark.segmentation.lang.check import check, expand, references
from waymark.segmentation.lang.jsonform import from_json, to_json
from waymark.segmentation.lang.parser import TERMINAL_WORDS, _lark, parse
from waymark.segmentation.lang.printer import to_text

DOCS = Path(__file__).resolve().parents[2] / "docs" / "audiences.md"
S, N, INT, B, T = (
    FieldType.STRING,
    FieldType.NUMBER,
    FieldType.INTEGER,
    FieldType.BOOLEAN,
    FieldType.TIMESTAMP,
)


def _schema() -> Schema:
    """The demo shop schema, plus one field of each remaining kind and awkward event names."""
    document = json.loads(files("waymark.demo").joinpath("schema.json").read_text("utf-8"))
    document["attributes"].update(
        {
            "vip": {"type": "boolean"},
            "age": {"type": "integer"},
            "tier": {"type": "integer", "enum": [1, 2, 3]},
            "count": {"type": "integer"},  # spelt like a keyword
            "renews_at": {"type": "timestamp"},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "geo": {"type": "object", "properties": {"lat": {"type": "number"}}},
                },
            },
            "prefs": {"type": "object"},  # free-form
            "tags": {"type": "array", "items": {"type": "string"}},
        }
    )
    document["events"].update(
        {
            "Order Completed": {
                "properties": {
                    "revenue": {"type": "number"},
                    "coupon": {"type": "boolean"},
                    "shipped_at": {"type": "timestamp"},
                    "shipping": {
                        "type": "object",
                        "properties": {"country": {"type": "string"}},
                    },
                }
            },
            "page.view": {"properties": {"seconds": {"type": "integer"}}},
            "consent": {"properties": {"channel": {"type": "string"}}},  # spelt like a keyword
        }
    )
    return parse_schema(document)


SCHEMA = _schema()


def _examples() -> list[str]:
    block = DOCS.read_text("utf-8").split("## Examples", 1)[1]
    block = block.split("```text", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


EXAMPLES = _examples()


def _parse(text: str, schema: Schema = SCHEMA) -> Expr:
    return parse(text, schema, AUDIENCE_NAMES)


def _error(text: str, schema: Schema = SCHEMA) -> str:
    """The message of the error parsing ``text`` raises (it must raise)."""
    with pytest.raises(InvalidInput) as caught:
        parse(text, schema, AUDIENCE_NAMES)
    for issue in caught.value.issues:
        assert issue.path == "definition"
        assert re.match(r"line \d+, column \d+: ", issue.reason), issue.reason
    return caught.value.message


def _same(left: object, right: object) -> None:
    """Equal, and with the same Python types throughout (``100`` is not ``100.0``)."""
    assert left == right
    assert repr(left) == repr(right)


def _unchecked(node: Any) -> Any:
    """``node`` with every ``kind`` reset to None (what the JSON form holds)."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        values = {f.name: _unchecked(getattr(node, f.name)) for f in dataclasses.fields(node)}
        if "kind" in values:
            values["kind"] = None
        return type(node)(**values)
    if isinstance(node, tuple):
        return tuple(_unchecked(item) for item in node)
    return node


def _round_trips(tree: Expr) -> None:
    text = to_text(tree)
    _same(_parse(text), tree)
    assert to_text(_parse(text)) == text
    _same(from_json(to_json(tree)), _unchecked(tree))
    wire = json.loads(json.dumps(to_json(tree)))
    _same(check(from_json(wire), SCHEMA, audiences=AUDIENCE_NAMES), tree)


# -- the examples of the docs --------------------------------------------------------------------


def test_the_docs_hold_the_examples():
    assert len(EXAMPLES) == 18
    assert EXAMPLES[0].startswith('country = "DE"')


@pytest.mark.parametrize("text", EXAMPLES)
def test_every_example_of_the_docs_parses_and_round_trips(text: str) -> None:
    tree = _parse(text)
    _same(check(tree, SCHEMA, audiences=AUDIENCE_NAMES), tree)
    _round_trips(tree)


# -- exact trees ---------------------------------------------------------------------------------

D30 = Duration(30, Unit.DAYS)
PURCHASE = EventRef("purchase")

TREES: list[tuple[str, Expr]] = [
    (
        'country = "DE" and count(purchase within last 30 days) >= 3 and lifetime_value > 100',
        And(
            (
                Attr("country", Compare(CompareOp.EQ, "DE"), S),
                Count(EventRef("purchase", None, Last(D30)), CompareOp.GE, 3),
                Attr("lifetime_value", Compare(CompareOp.GT, 100), N),
            )
        ),
    ),
    (
        "cart_add then not purchase within 1 hour",
        Sequence((EventRef("cart_add"), PURCHASE), Duration(1, Unit.HOURS), absent_last=True),
    ),
    (
        "product_view between 30 days ago and 7 days ago then not purchase within 7 days",
        Sequence(
            (
                EventRef("product_view", None, Between(Ago(D30), Ago(Duration(7, Unit.DAYS)))),
                PURCHASE,
            ),
            Duration(7, Unit.DAYS),
            absent_last=True,
        ),
    ),
    (
        'purchase where (category = "shoes" and revenue > 100) '
        'between "2026-01-01" and "2026-03-31"',
        Occurs(
            EventRef(
                "purchase",
                FilterAnd(
                    (
                        Prop("category", Compare(CompareOp.EQ, "shoes"), S),
                        Prop("revenue", Compare(CompareOp.GT, 100), N),
                    )
                ),
                Between(At("2026-01-01"), At("2026-03-31")),
            )
        ),
    ),
    (
        'purchase where category = "shoes" and country = "DE"',
        And(
            (
                Occurs(EventRef("purchase", Prop("category", Compare(CompareOp.EQ, "shoes"), S))),
                Attr("country", Compare(CompareOp.EQ, "DE"), S),
            )
        ),
    ),
    (
        "first(app_open).timestamp more than 365 days ago",
        Pick(
            Which.FIRST,
            EventRef("app_open"),
            None,
            Within(Older(Duration(365, Unit.DAYS))),
            T,
        ),
    ),
    (
        "last(purchase where revenue > 10.5).items >= 2",
        Pick(
            Which.LAST,
            EventRef("purchase", Prop("revenue", Compare(CompareOp.GT, 10.5), N)),
            "items",
            Compare(CompareOp.GE, 2),
            INT,
        ),
    ),
    (
        "sum(purchase.revenue within last 90 days) >= 500",
        Aggregate(
            AggregateFn.SUM,
            EventRef("purchase", None, Last(Duration(90, Unit.DAYS))),
            "revenue",
            CompareOp.GE,
            500,
        ),
    ),
    (
        'avg("Order Completed".revenue where coupon = true) < 20.0',
        Aggregate(
            AggregateFn.AVG,
            EventRef("Order Completed", Prop("coupon", Compare(CompareOp.EQ, True), B)),
            "revenue",
            CompareOp.LT,
            20.0,
        ),
    ),
    (
        'in audience "vip" and consent(email, marketing) = opted_in',
        And(
            (
                InAudience("vip"),
                Consent("email", "marketing", ConsentStatus.OPTED_IN),
            )
        ),
    ),
    (
        "consent(sms, transactional) != unknown",
        Consent("sms", "transactional", ConsentStatus.UNKNOWN, negated=True),
    ),
    (
        'not (plan = "free" or country in ("US", "CA"))',
        Not(
            Or(
                (
                    Attr("plan", Compare(CompareOp.EQ, "free"), S),
                    Attr("country", InList(("US", "CA")), S),
                )
            )
        ),
    ),
    ("birthday in next 7 days", Attr("birthday", Anniversary(7), S)),
    ("renews_at in next 1 day", Attr("renews_at", Anniversary(1), T)),
    ("renews_at within next 2 weeks", Attr("renews_at", Within(Next(Duration(2, Unit.WEEKS))), T)),
    (
        'email starts with "ann" and city contains "berlin" and email ends with ".de"',
        And(
            (
                Attr("email", Text(TextOp.STARTS_WITH, "ann"), S),
                Attr("city", Text(TextOp.CONTAINS, "berlin"), S),
                Attr("email", Text(TextOp.ENDS_WITH, ".de"), S),
            )
        ),
    ),
    (
        'plan not in ("free") or phone is missing',
        Or(
            (
                Attr("plan", InList(("free",), negated=True), S),
                Attr("phone", Exists(False), S),
            )
        ),
    ),
    # not binds tighter than and, and tighter than or
    (
        "vip = true or age >= 18 and not phone exists",
        Or(
            (
                Attr("vip", Compare(CompareOp.EQ, True), B),
                And(
                    (
                        Attr("age", Compare(CompareOp.GE, 18), INT),
                        Not(Attr("phone", Exists(True), S)),
                    )
                ),
            )
        ),
    ),
    # keywords are case-insensitive, names are not
    (
        "COUNT(purchase WITHIN LAST 30 Days) >= 3 AND NOT phone IS MISSING",
        And(
            (
                Count(EventRef("purchase", None, Last(D30)), CompareOp.GE, 3),
                Not(Attr("phone", Exists(False), S)),
            )
        ),
    ),
    # comments and line breaks
    (
        'country = "DE"  # Germany\n  and # the rest:\n  phone exists\n',
        And((Attr("country", Compare(CompareOp.EQ, "DE"), S), Attr("phone", Exists(True), S))),
    ),
    (
        '"Order Completed" within last 7 days',
        Occurs(EventRef("Order Completed", None, Last(Duration(7, Unit.DAYS)))),
    ),
    ('event "consent"', Occurs(EventRef("consent"))),
    ('count("consent") >= 1', Count(EventRef("consent"), CompareOp.GE, 1)),
    (
        "page.view within last 10 minutes",
        Occurs(EventRef("page.view", None, Last(Duration(10, Unit.MINUTES)))),
    ),
    ("attribute count > 3", Attr("count", Compare(CompareOp.GT, 3), INT)),
    ("address.geo.lat >= 52.5", Attr("address.geo.lat", Compare(CompareOp.GE, 52.5), N)),
    ("address exists", Attr("address", Exists(True), FieldType.OBJECT)),
    (
        '"Order Completed" where shipping.country = "FR"',
        Occurs(
            EventRef("Order Completed", Prop("shipping.country", Compare(CompareOp.EQ, "FR"), S))
        ),
    ),
    (
        'purchase where (not (category = "a" or category = "b"))',
        Occurs(
            EventRef(
                "purchase",
                FilterNot(
                    FilterOr(
                        (
                            Prop("category", Compare(CompareOp.EQ, "a"), S),
                            Prop("category", Compare(CompareOp.EQ, "b"), S),
                        )
                    )
                ),
            )
        ),
    ),
    (
        'signup_at between "2026-03-01T10:00:00Z" and "2026-03-01"',
        Attr("signup_at", Within(Between(At("2026-03-01T10:00:00Z"), At("2026-03-01"))), T),
    ),
    (
        'city = "\\u00e9t\\u00e9 \\"x\\" \\ud83c\\udf89"',
        Attr("city", Compare(CompareOp.EQ, 'été "x" 🎉'), S),
    ),
]


@pytest.mark.parametrize(("text", "tree"), TREES, ids=[t for t, _ in TREES])
def test_text_reads_as_this_exact_tree(text: str, tree: Expr) -> None:
    _same(_parse(text), tree)
    _round_trips(tree)


def test_numbers_keep_their_type():
    as_int = _parse("lifetime_value > 100")
    as_float = _parse("lifetime_value > 100.0")
    assert isinstance(as_int, Attr) and isinstance(as_float, Attr)
    assert isinstance(as_int.test, Compare) and isinstance(as_float.test, Compare)
    assert type(as_int.test.value) is int
    assert type(as_float.test.value) is float
    assert to_text(as_float) == "lifetime_value > 100.0"
    assert to_text(as_int) == "lifetime_value > 100"
    big = Attr("lifetime_value", Compare(CompareOp.GT, 1e20), N)
    assert to_text(big) == "lifetime_value > 1e+20"
    _same(_parse(to_text(big)), big)
    # integers accept whole floats and keep them as written
    whole = _parse("age = 2.0")
    assert isinstance(whole, Attr) and isinstance(whole.test, Compare)
    assert type(whole.test.value) is float


def test_a_name_declared_as_attribute_and_event_type_must_be_prefixed():
    clash = Schema(
        attributes={"purchase": SCHEMA.attributes["age"]},
        events={"purchase": SCHEMA.events["purchase"]},
    )
    message = _error("purchase exists", clash)
    assert "line 1, column 1" in message
    assert "both an attribute and an event type" in message
    assert "attribute purchase" in message and "event purchase" in message
    assert _parse("attribute purchase exists", clash) == Attr("purchase", Exists(True), INT)
    assert _parse("event purchase within last 30 days", clash) == Occurs(
        EventRef("purchase", None, Last(D30))
    )
    # inside count(...) only an event type can stand: no ambiguity
    assert _parse("count(purchase) > 1", clash) == Count(PURCHASE, CompareOp.GT, 1)
    # the printer writes names bare, so with such a schema its text is refused clearly
    with pytest.raises(InvalidInput, match="both an attribute and an event type"):
        _parse(to_text(Occurs(PURCHASE)), clash)


# -- the printer ---------------------------------------------------------------------------------


def _a(name: str) -> Attr:
    return Attr(name, Exists(True), S)


@pytest.mark.parametrize(
    ("tree", "text"),
    [
        (And((_a("email"), _a("phone"))), "email exists and phone exists"),
        (
            Or((And((_a("email"), _a("phone"))), _a("city"))),
            "email exists and phone exists or city exists",
        ),
        (
            And((Or((_a("email"), _a("phone"))), _a("city"))),
            "(email exists or phone exists) and city exists",
        ),
        (
            And((And((_a("email"), _a("phone"))), _a("city"))),
            "(email exists and phone exists) and city exists",
        ),
        (
            Or((_a("email"), Or((_a("phone"), _a("city"))))),
            "email exists or (phone exists or city exists)",
        ),
        (Not(Not(_a("email"))), "not not email exists"),
        (Not(And((_a("email"), _a("phone")))), "not (email exists and phone exists)"),
        (And((Not(_a("email")), _a("phone"))), "not email exists and phone exists"),
        (Attr("count", Exists(False), INT), "attribute count is missing"),
        (Occurs(EventRef("Order Completed")), '"Order Completed"'),
        (Occurs(EventRef("consent")), '"consent"'),
        (Occurs(EventRef("page.view")), '"page.view"'),
        (
            Aggregate(AggregateFn.MAX, EventRef("page.view"), "seconds", CompareOp.GE, 3),
            'max("page.view".seconds) >= 3',
        ),
        (
            Sequence((PURCHASE, EventRef("cart_add")), Duration(1, Unit.MINUTES)),
            "purchase then cart_add within 1 minute",
        ),
        (
            Occurs(
                EventRef(
                    "purchase",
                    FilterAnd(
                        (
                            Prop("category", Exists(True), S),
                            FilterOr(
                                (Prop("items", Exists(True), INT), Prop("revenue", Exists(True), N))
                            ),
                        )
                    ),
                    Older(Duration(2, Unit.WEEKS)),
                )
            ),
            "purchase where (category exists and (items exists or revenue exists)) "
            "more than 2 weeks ago",
        ),
    ],
)
def test_the_printer_writes_canonical_minimal_text(tree: Expr, text: str) -> None:
    assert to_text(tree) == text
    _round_trips(tree)


def test_the_printer_normalizes_spelling():
    messy = 'NOT ( plan = "free"   OR country IN ("US","CA") ) # done'
    assert to_text(_parse(messy)) == 'not (plan = "free" or country in ("US", "CA"))'


def test_the_printer_refuses_non_finite_numbers():
    with pytest.raises(ValueError, match="non-finite"):
        to_text(Attr("lifetime_value", Compare(CompareOp.GT, math.inf), N))


# -- the JSON form -------------------------------------------------------------------------------


def test_the_json_form_has_the_documented_shape():
    tree = _parse(
        'country = "DE" and count(purchase where category = "shoes" within last 30 days) >= 3 '
        'and first(app_open).timestamp between 30 days ago and "2026-01-01" '
        "and cart_add then not purchase within 1 hour "
        'and in audience "vip" and consent(email, marketing) != opted_in'
    )
    days30 = {"amount": 30, "unit": "days"}
    assert to_json(tree) == {
        "kind": "and",
        "items": [
            {"kind": "attribute", "path": "country", "test": {"op": "=", "value": "DE"}},
            {
                "kind": "count",
                "event": {
                    "name": "purchase",
                    "where": {
                        "kind": "property",
                        "path": "category",
                        "test": {"op": "=", "value": "shoes"},
                    },
                    "window": {"last": days30},
                },
                "op": ">=",
                "value": 3,
            },
            {
                "kind": "pick",
                "which": "first",
                "event": {"name": "app_open"},
                "property": None,
                "test": {
                    "op": "within",
                    "window": {"between": [{"ago": days30}, {"at": "2026-01-01"}]},
                },
            },
            {
                "kind": "sequence",
                "steps": [{"name": "cart_add"}, {"name": "purchase"}],
                "within": {"amount": 1, "unit": "hours"},
                "absent_last": True,
            },
            {"kind": "in_audience", "audience": "vip"},
            {
                "kind": "consent",
                "channel": "email",
                "purpose": "marketing",
                "status": "opted_in",
                "negated": True,
            },
        ],
    }


def test_the_json_form_of_tests():
    def test_json(text: str) -> object:
        tree = _parse(text)
        assert isinstance(tree, Attr)
        return to_json(tree)["test"]

    assert test_json('plan in ("plus", "pro")') == {"op": "in", "values": ["plus", "pro"]}
    assert test_json('plan not in ("free")') == {"op": "not_in", "values": ["free"]}
    assert test_json('email starts with "a"') == {"op": "starts_with", "value": "a"}
    assert test_json("phone exists") == {"op": "exists"}
    assert test_json("phone is missing") == {"op": "missing"}
    assert test_json("birthday in next 7 days") == {"op": "anniversary", "days": 7}
    assert test_json("signup_at more than 2 weeks ago") == {
        "op": "within",
        "window": {"older": {"amount": 2, "unit": "weeks"}},
    }
    aggregate = to_json(_parse("sum(purchase.revenue) > 1.5"))
    assert aggregate == {
        "kind": "aggregate",
        "fn": "sum",
        "event": {"name": "purchase"},
        "property": "revenue",
        "op": ">",
        "value": 1.5,
    }
    assert to_json(_parse("purchase where (not items > 2)"))["event"]["where"] == {
        "kind": "not",
        "item": {"kind": "property", "path": "items", "test": {"op": ">", "value": 2}},
    }


def test_from_json_takes_defaults_for_optional_flags():
    tree = from_json(
        {
            "kind": "or",
            "items": [
                {
                    "kind": "sequence",
                    "steps": [{"name": "a"}, {"name": "b"}],
                    "within": {"amount": 1, "unit": "days"},
                },
                {"kind": "consent", "channel": "email", "purpose": "news", "status": "unknown"},
            ],
        }
    )
    assert tree == Or(
        (
            Sequence((EventRef("a"), EventRef("b")), Duration(1, Unit.DAYS), absent_last=False),
            Consent("email", "news", ConsentStatus.UNKNOWN, negated=False),
        )
    )


def _json_issues(data: object) -> dict[str, str]:
    with pytest.raises(InvalidInput) as caught:
        from_json(data)
    return {issue.path: issue.reason for issue in caught.value.issues}


def test_from_json_names_the_path_of_every_structural_problem():
    issues = _json_issues(
        {
            "kind": "and",
            "items": [
                {"kind": "attribute", "path": "country"},
                {"kind": "occurs", "event": {"name": "purchase", "windw": {}}},
                {"kind": "count", "event": {"name": "purchase"}, "op": "=>", "value": "3"},
                {"kind": "andd", "items": []},
                {
                    "kind": "occurs",
                    "event": {"name": "x", "window": {"last": {"amount": 1, "unit": "day"}}},
                },
                {"kind": "occurs", "event": {"name": "x", "window": {"last": {}, "next": {}}}},
                {
                    "kind": "attribute",
                    "path": "x",
                    "test": {
                        "op": "within",
                        "window": {"between": [{"ago": {"amount": 1, "unit": "days"}}]},
                    },
                },
                {"kind": "attribute", "path": "x", "test": {"op": "in", "values": [1, None, [2]]}},
                {
                    "kind": "pick",
                    "which": "first",
                    "event": {"name": "x"},
                    "property": 3,
                    "test": {"op": "exists"},
                },
                "nonsense",
            ],
        }
    )
    assert issues == {
        "definition.items[0].test": "missing key 'test' in condition 'attribute'",
        "definition.items[1].event.windw": (
            "unknown key 'windw' in event; expected name, where, window"
        ),
        "definition.items[2].op": "unknown op '=>'; expected one of =, !=, <, <=, >, >=",
        "definition.items[2].value": "expected a whole number, got a string",
        "definition.items[3].kind": ("unknown kind 'andd' in condition; did you mean \"and\"?"),
        "definition.items[4].event.window.last.unit": (
            "unknown unit 'day'; expected one of minutes, hours, days, weeks"
        ),
        "definition.items[5].event.window": (
            "a window has exactly one of last, next, older, between"
        ),
        "definition.items[6].test.window.between": (
            "expected an array of two bounds, got an array of 1"
        ),
        "definition.items[7].test.values[1]": "expected a string, number or boolean, got null",
        "definition.items[7].test.values[2]": "expected a string, number or boolean, got an array",
        "definition.items[8].property": (
            "expected a string, or null for the event's timestamp, got a number"
        ),
        "definition.items[9]": "expected an object (condition), got a string",
    }


def test_from_json_rejects_non_objects_and_booleans_as_numbers():
    assert _json_issues([]) == {"definition": "expected an object (condition), got an array"}
    issues = _json_issues(
        {"kind": "count", "event": {"name": "purchase"}, "op": ">", "value": True}
    )
    assert issues == {"definition.value": "expected a whole number, got a boolean"}


def test_from_json_stops_at_the_nesting_limit_without_recursing():
    data: dict[str, Any] = {"kind": "attribute", "path": "phone", "test": {"op": "exists"}}
    for _ in range(50_000):
        data = {"kind": "not", "item": data}
    issues = _json_issues(data)
    assert list(issues) == ["definition" + ".item" * 32]
    assert "nested more than 32 levels" in next(iter(issues.values()))


def test_check_reports_json_paths_for_every_problem():
    data = {
        "kind": "and",
        "items": [
            {"kind": "attribute", "path": "age", "test": {"op": ">", "value": "x"}},
            {"kind": "attribute", "path": "contry", "test": {"op": "exists"}},
            {
                "kind": "occurs",
                "event": {"name": "purchase", "window": {"last": {"amount": 0, "unit": "days"}}},
            },
            {
                "kind": "pick",
                "which": "last",
                "event": {"name": "purchase"},
                "property": "timestamp",
                "test": {"op": "exists"},
            },
            {"kind": "and", "items": [{"kind": "in_audience", "audience": "vip"}]},
        ],
    }
    with pytest.raises(InvalidInput) as caught:
        check(from_json(data), SCHEMA, audiences=AUDIENCE_NAMES)
    issues = {issue.path: issue.reason for issue in caught.value.issues}
    assert set(issues) == {
        "definition.items[0].test.value",
        "definition.items[1].path",
        "definition.items[2].event.window.last.amount",
        "definition.items[3].property",
        "definition.items[4].items",
    }
    assert "expected a number" in issues["definition.items[0].test.value"]
    assert 'did you mean "country"' in issues["definition.items[1].path"]
    assert "at least 1 day" in issues["definition.items[2].event.window.last.amount"]
    assert "write null" in issues["definition.items[3].property"]
    assert "at least two items" in issues["definition.items[4].items"]


def test_check_fills_kinds_and_is_idempotent():
    tree = from_json(to_json(_parse('last(purchase where items > 1).currency = "EUR"')))
    assert isinstance(tree, Pick) and tree.kind is None
    checked = check(tree, SCHEMA)
    assert isinstance(checked, Pick) and checked.kind is S
    assert isinstance(checked.event.where, Prop) and checked.event.where.kind is INT
    assert check(checked, SCHEMA) == checked
    wrong = Attr("age", Exists(True), FieldType.STRING)
    assert check(wrong, SCHEMA) == Attr("age", Exists(True), INT)


# -- property tests ------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(audiences(SCHEMA))
def test_drawn_trees_are_valid(tree: Expr) -> None:
    _same(check(tree, SCHEMA, audiences=AUDIENCE_NAMES), tree)


@_SETTINGS
@given(audiences(SCHEMA))
def test_text_round_trips(tree: Expr) -> None:
    text = to_text(tree)
    _same(parse(text, SCHEMA, AUDIENCE_NAMES), tree)


@_SETTINGS
@given(audiences(SCHEMA))
def test_json_round_trips(tree: Expr) -> None:
    wire = json.loads(json.dumps(to_json(tree)))
    _same(check(from_json(wire), SCHEMA, audiences=AUDIENCE_NAMES), tree)
    _same(from_json(to_json(tree)), _unchecked(tree))


_PIECES = (
    "country",
    "purchase",
    "age",
    "=",
    ">",
    "!=",
    '"DE"',
    "3",
    "2.5",
    "-1",
    "and",
    "or",
    "not",
    "(",
    ")",
    ",",
    ".",
    "count",
    "sum",
    "first",
    "where",
    "within",
    "last",
    "next",
    "days",
    "hour",
    "ago",
    "between",
    "then",
    "in",
    "audience",
    '"vip"',
    "exists",
    "is",
    "missing",
    "consent",
    "email",
    "opted_in",
    "#",
    "\n",
    " ",
    "é",
    '"',
    "$",
    "\u200b",
    "event",
    "attribute",
    "starts",
    "with",
    "more",
    "than",
    "true",
)
_TERMINAL_NAMES = re.compile(
    r"\b(?:" + "|".join(re.escape(t.name) for t in _lark().terminals) + r")\b|\$END|__ANON"
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=14).map(" ".join))
def test_any_text_parses_or_fails_with_a_located_error_in_words(text: str) -> None:
    try:
        parse(text, SCHEMA, AUDIENCE_NAMES)
    except InvalidInput as error:
        for issue in error.issues:
            assert re.match(r"line \d+, column \d+: \S", issue.reason), issue.reason
            assert not _TERMINAL_NAMES.search(issue.reason), issue.reason


def test_every_terminal_has_words():
    names = {t.name for t in _lark().terminals} - {"COMMENT", "__IGNORE_0"}
    assert names <= set(TERMINAL_WORDS)
    assert not [name for name in names if name.startswith("__")]


# -- bad input: names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ('contry = "DE"', "line 1, column 1", 'unknown name "contry"'),
        ('contry = "DE"', "line 1, column 1", 'did you mean "country"'),
        (
            'country = "DE" and\n  purchse within last 7 days',
            "line 2, column 3",
            'did you mean "purchase"',
        ),
        ('purchase where categry = "shoes"', "line 1, column 16", 'did you mean "category"'),
        ('address.cty = "x"', "line 1, column 1", 'unknown attribute "address.cty"'),
        ('address.cty = "x"', "line 1, column 1", 'did you mean "address.city"'),
        ("count(purchse) >= 1", "line 1, column 7", 'unknown event type "purchse"'),
        ("count(country) >= 1", "line 1, column 7", "is an attribute, not an event type"),
        ("count(attribute country) >= 1", "line 1, column 7", "an event type is needed here"),
        ('in audience "vp"', "line 1, column 13", 'unknown audience "vp"; did you mean "vip"?'),
        ("sum(purchase.revenu) > 1", "line 1, column 14", 'did you mean "revenue"'),
        ("last(purchase).categoryy exists", "line 1, column 16", 'did you mean "category"'),
        ('prefs.color = "red"', "line 1, column 1", "free-form object"),
        ('city.name = "x"', "line 1, column 1", "it has no field"),
        ("Order_Completed exists", "line 1, column 1", 'did you mean "Order Completed"'),
    ],
)
def test_unknown_names_are_located_with_a_hint(text: str, where: str, what: str) -> None:
    message = _error(text)
    assert f"{where}: " in message
    assert what in message


def test_an_event_takes_only_a_window_and_an_attribute_needs_a_test():
    message = _error("purchase = 3")
    assert "line 1, column 10" in message
    assert "takes only a window" in message and "count(purchase) >= 2" in message
    assert "line 1, column 1: attribute country needs a test" in _error("country")
    message = _error('country where city = "x" exists')
    assert "line 1, column 9: country is an attribute; where filters" in message
    assert "a sequence step is an event type" in _error(
        "country exists then purchase within 1 hour"
    )


# -- bad input: types and values -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ('age > "x"', "line 1, column 7", "attribute age is an integer; expected a number"),
        ("age = 2.5", "line 1, column 7", "2.5 has a fraction"),
        ("age = true", "line 1, column 7", "expected a number, got true"),
        ('country > "A"', "line 1, column 9", "strings cannot be ordered with >"),
        ("vip >= true", "line 1, column 5", "compare it with = or != only"),
        ("vip = 1", "line 1, column 7", "expected true or false, got number 1"),
        ('plan = "gold"', "line 1, column 8", 'allowed: "free", "plus", "pro"'),
        ('plan in ("pro", "gold")', "line 1, column 17", '"gold" is not an allowed value'),
        ("tier = 4", "line 1, column 8", "allowed: 1, 2, 3"),
        ('signup_at < "yesterday"', "line 1, column 13", "not an ISO-8601 date or timestamp"),
        ("signup_at = 3", "line 1, column 13", "expected a date or timestamp"),
        ('lifetime_value contains "x"', "line 1, column 16", "contains tests text"),
        ("country within last 7 days", "line 1, column 9", "a window tests a timestamp"),
        ('address = "x"', "line 1, column 9", "only exists and is missing can test it"),
        ("tags in (1)", "line 1, column 6", "only exists and is missing"),
        ("sum(purchase.category) > 1", "line 1, column 14", "needs a number property"),
        ("lifetime_value in next 3 days", "line 1, column 16", "in next N days tests a date"),
        ("birthday in next 400 days", "line 1, column 18", "0 to 366 days"),
        ("birthday in next 2 weeks", "line 1, column 20", "counts days, not weeks"),
        ("count(purchase) >= -1", "line 1, column 20", "a count is never negative"),
        ("count(purchase) >= 1.5", "line 1, column 20", "a count is a whole number"),
        ("consent(Email, marketing) = opted_in", "line 1, column 9", "lowercase identifier"),
        ("consent(email, 2fa) = opted_in", "line 1, column 16", "unexpected the number 2"),
        ("consent(email, marketing) > opted_in", "line 1, column 27", "compared with = or !="),
        ('first(purchase).timestamp = "soon"', "line 1, column 29", "not an ISO-8601"),
        ('first(purchase).timestamp starts with "2026"', "line 1, column 27", "tests text"),
    ],
)
def test_type_errors_are_located_and_explained(text: str, where: str, what: str) -> None:
    message = _error(text)
    assert f"{where}: " in message
    assert what in message


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("signup_at between 7 days ago and 30 days ago", "line 1, column 11", "impossible window"),
        (
            "signup_at between 7 days ago and 30 days ago",
            "line 1, column 11",
            "between 30 days ago and 7 days ago",
        ),
        (
            'signup_at between "2026-03-01" and "2026-01-01"',
            "line 1, column 11",
            "impossible window",
        ),
        (
            'signup_at between "2026-03-02T00:00:00Z" and "2026-03-01"',
            "line 1, column 11",
            "impossible window",
        ),
        ('signup_at between "2026-13-01" and "2027-01-01"', "line 1, column 19", "not an ISO-8601"),
        ("signup_at within last 0 days", "line 1, column 23", "at least 1 day"),
        (
            "signup_at within last 3651 days",
            "line 1, column 23",
            "longer than the limit of 3,650 days",
        ),
        ("signup_at within next 522 weeks", "line 1, column 23", "longer than the limit"),
        (
            "signup_at more than 99999999999999999999999 weeks ago",
            "line 1, column 21",
            "longer than the limit",
        ),
        ("signup_at within last 1.5 days", "line 1, column 23", "a duration is a whole number"),
        (
            "cart_add then purchase within last 7 days within 1 hour",
            "line 1, column 24",
            "only the first step",
        ),
        (
            "cart_add then not purchase then checkout_started within 1 hour",
            "line 1, column 15",
            "only the last step",
        ),
        ("cart_add then purchase within 0 minutes", "line 1, column 31", "at least 1 minute"),
        ("cart_add then purchase within 3651 days", "line 1, column 31", "longer than the limit"),
    ],
)
def test_impossible_windows_and_bad_sequences(text: str, where: str, what: str) -> None:
    message = _error(text)
    assert f"{where}: " in message
    assert what in message


def test_windows_at_the_limits_are_accepted():
    _parse("signup_at within last 3650 days")
    _parse("signup_at within last 521 weeks")
    _parse("signup_at within last 5256000 minutes")
    _parse("signup_at between 7 days ago and 7 days ago")
    _parse('signup_at between "2026-03-01" and "2026-03-01"')
    _parse("birthday in next 0 days")
    _parse("birthday in next 366 days")


def test_every_problem_is_reported_in_text_order():
    message = _error(
        'contry = "DE" and age > "x" and\ncount(purchse) >= 1 and signup_at within last 0 days'
    )
    positions = re.findall(r"line (\d+), column (\d+)", message)
    assert positions == [("1", "1"), ("1", "25"), ("2", "7"), ("2", "47")]


# -- bad input: limits ---------------------------------------------------------------------------


def test_nesting_is_limited_to_32_levels():
    _parse("not " * 32 + "phone exists")
    message = _error("not " * 33 + "phone exists")
    assert "line 1, column 129: nested more than 32 levels" in message
    nested = "phone exists"
    for _ in range(33):
        nested = f"(email exists and {nested})"
    assert "nested more than 32 levels" in _error(nested)
    # the groups of a where filter count too
    deep_filter = "not " * 30 + 'purchase where (not not not category = "x")'
    assert "nested more than 32 levels" in _error(deep_filter)
    _parse("not " * 30 + 'purchase where (not not category = "x")')


def test_very_deep_nesting_fails_cleanly():
    # no RecursionError anywhere: the parser, the tree building and the checker are iterative
    # or stop at the limit
    assert "nested more than 32 levels" in _error("not " * 15_000 + "phone exists")
    # parentheses alone add no level
    _same(_parse("(" * 20_000 + "phone exists" + ")" * 20_000), _a("phone"))
    unclosed = "(" * 20_000 + "phone exists" + ")" * 19_999
    end = len(unclosed) + 1
    assert f'line 1, column {end}: the text ends too early; expected ")"' in _error(unclosed)


def test_huge_literals_are_refused():
    _parse('city = "' + "x" * 1000 + '"')
    assert "line 1, column 8: string of 1,001 characters; strings are at most 1,000" in _error(
        'city = "' + "x" * 1001 + '"'
    )
    assert "not a finite number" in _error("lifetime_value > 1e999")
    assert "at most 100 digits" in _error("lifetime_value > " + "9" * 101)
    assert "number out of range" in _error("age > 99999999999999999999")
    values = ", ".join(str(n) for n in range(1001))
    assert "in (…) lists at most 1,000 values, got 1,001" in _error(f"age in ({values})")
    _parse("age in (" + ", ".join(str(n) for n in range(1000)) + ")")
    assert "more than 1,000 conditions" in _error(" or ".join(["phone exists"] * 1001))
    _parse(" or ".join(["phone exists"] * 1000))


def test_the_text_is_limited_to_64_kb():
    long = "phone exists" + " " * 70_000
    assert "longer than 65,536 bytes" in _error(long)
    # the limit counts bytes of UTF-8 ("é" is two): the 32,761st "é" crosses it
    text = "phone exists # " + "é" * 40_000
    assert len(text) < 65_536
    column = len("phone exists # ") + 32_761
    assert f"line 1, column {column}: the definition is longer than" in _error(text)


# -- bad input: syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ('country = "DE', "line 1, column 11", "unterminated string"),
        ('country = "DE" and\ncity = "Ber', "line 2, column 8", "unterminated string"),
        ('country = "\\q"', "line 1, column 11", "invalid string: strings use JSON escapes"),
        ('country = "a\tb"', "line 1, column 11", "invalid string"),
        ("country = 'DE'", "line 1, column 11", "not single quotes"),
        ('country = "DE" $$$', "line 1, column 16", 'unexpected "$"; expected "and", "or"'),
        ('country = "DE" and )', "line 1, column 20", 'unexpected ")"; expected a condition'),
        # where a name may stand, a keyword is a name: this "and" is an (unknown) name
        ('country = "DE" and and', "line 1, column 20", 'unknown name "and"'),
        ('(country = "DE"', "line 1, column 16", "the text ends too early; expected"),
        ('(country = "DE"', "line 1, column 16", '")"'),
        ("country = DE", "line 1, column 11", 'text values need double quotes: "DE"'),
        ("country =", "line 1, column 10", "ends too early; expected a value"),
        ("purchase within 7 days", "line 1, column 10", 'a window is "within last …"'),
        ("count = 3", "line 1, column 7", "count is a keyword: write attribute count"),
        (
            "signup_at within last 7 months",
            "line 1, column 25",
            "a unit (minutes, hours, days or weeks)",
        ),
        ("count(purchase) >= x", "line 1, column 20", "expected a number"),
        ("a then b within", "line 1, column 16", "ends too early"),
    ],
)
def test_syntax_errors_say_where_what_was_found_and_what_was_expected(
    text: str, where: str, what: str
) -> None:
    message = _error(text)
    assert f"{where}: " in message
    assert what in message


@pytest.mark.parametrize("text", ["", "   \n\t ", "# nothing but a comment\n# and another"])
def test_empty_text_is_refused(text: str) -> None:
    assert "line 1, column 1: the definition is empty" in _error(text)


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ('country = "\ud800"', "line 1, column 12", "U+D800, a lone surrogate"),
        ('country = "\\ud800"', "line 1, column 11", "lone surrogate"),
        ("country = “DE”", "line 1, column 11", "use straight double quotes"),
        ("café = 1", "line 1, column 4", "names use ASCII letters"),
        ("phone\u200bexists", "line 1, column 6", "U+200B (ZERO WIDTH SPACE)"),
        ("phone exists \x00", "line 1, column 14", "U+0000"),
        ("\ufeffphone exists", "line 1, column 1", "U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
        ('country = "DE" ＡＮＤ city = "x"', "line 1, column 16", 'unexpected "ＡＮＤ"'),
    ],
)
def test_odd_unicode_is_located(text: str, where: str, what: str) -> None:
    message = _error(text)
    assert f"{where}: " in message
    assert what in message


def test_unicode_in_strings_and_quoted_names_is_fine():
    assert _parse('city = "Zürich 🎉"') == Attr("city", Compare(CompareOp.EQ, "Zürich 🎉"), S)
    assert _parse('city\u00a0=\u2003"x"') == Attr("city", Compare(CompareOp.EQ, "x"), S)


def test_parse_refuses_what_is_not_text():
    with pytest.raises(InvalidInput, match="expected the text of a definition"):
        parse(b"phone exists", SCHEMA)  # type: ignore[arg-type]


# -- audiences of audiences ----------------------------------------------------------------------


def test_references_lists_the_audiences_named_directly():
    tree = _parse('in audience "vip" or not (in audience "churn risk" and phone exists)')
    assert references(tree) == {"vip", "churn risk"}
    assert references(_parse("phone exists")) == set()


def test_expand_inlines_definitions_recursively():
    vip = _parse("lifetime_value > 1000")
    churn = Or((_parse('in audience "vip"'), _a("phone")))
    # "churn risk" refers to "vip": both are inlined, recursively
    definitions = {"vip": vip, "churn risk": churn}
    tree = _parse('not in audience "churn risk" and in audience "vip"')
    assert expand(tree, definitions) == And((Not(Or((vip, _a("phone")))), vip))
    assert references(expand(tree, definitions)) == set()
    assert expand(vip, definitions) == vip


def test_expand_refuses_cycles_and_unknown_audiences():
    definitions: dict[str, Expr] = {
        "vip": And((InAudience("gold"), _a("phone"))),
        "gold": Not(InAudience("vip")),
        "self": Or((InAudience("self"), _a("email"))),
    }
    with pytest.raises(InvalidInput) as caught:
        expand(InAudience("vip"), definitions)
    assert 'in a cycle: "vip" -> "gold" -> "vip";' in caught.value.message
    assert caught.value.issues[0].path == "definition"
    with pytest.raises(InvalidInput, match='in a cycle: "self" -> "self";'):
        expand(Or((_a("city"), InAudience("self"))), definitions)
    with pytest.raises(InvalidInput, match='unknown audience "gld"; did you mean "gold"'):
        expand(InAudience("gld"), definitions)


def test_in_audience_needs_a_known_audience():
    expected = 'line 1, column 13: unknown audience "vip"; there are no other audiences'
    with pytest.raises(InvalidInput, match=re.escape(expected)):
        parse('in audience "vip"', SCHEMA)
    assert check(InAudience("vip"), SCHEMA, audiences={"vip"}) == InAudience("vip")
    with pytest.raises(InvalidInput) as caught:
        check(InAudience("vip"), SCHEMA)
    assert [issue.path for issue in caught.value.issues] == ["definition.audience"]
