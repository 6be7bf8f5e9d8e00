"""One definition, one meaning: the in-memory evaluator and the SQL on DuckDB and PostgreSQL find
the same members for random definitions over random histories aimed at their edges."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_postgres
from tests.segmentation.data import Event, Person, people
from tests.segmentation.engines import DuckEngine, PgEngine, memory_members
from tests.segmentation.strategies import audiences
from waymark.model.schemas import Schema, parse_schema
from waymark.segmentation.lang import ast
from waymark.segmentation.lang.check import check
from waymark.segmentation.lang.parser import parse

SCHEMA: Schema = parse_schema(
    {
        "attributes": {
            "country": {"type": "string"},
            "email": {"type": "string"},
            "plan": {"type": "string", "enum": ["free", "plus", "pro"]},
            "lifetime_value": {"type": "number"},
            "orders": {"type": "integer"},
            "vip": {"type": "boolean"},
            "signup_at": {"type": "timestamp"},
            "birthday": {"type": "string"},
            "timezone": {"type": "string"},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "events": {
            "purchase": {
                "properties": {
                    "revenue": {"type": "number"},
                    "category": {"type": "string"},
                    "items": {"type": "integer"},
                    "gift": {"type": "boolean"},
                    "shipped_at": {"type": "timestamp"},
                }
            },
            "cart_add": {"properties": {"sku": {"type": "string"}, "price": {"type": "number"}}},
            "product_view": {"properties": {"category": {"type": "string"}}},
            "Order Completed": {"properties": {"total": {"type": "number"}}},
        },
    }
)

NOWS = (
    datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
    datetime(2024, 2, 29, 23, 30, tzinfo=UTC),  # a leap day, late: other dates east of UTC
    datetime(2026, 12, 31, 11, 0, tzinfo=UTC),  # New Year already in Auckland
)


@pytest.fixture(scope="module")
def duck() -> Iterator[DuckEngine]:
    engine = DuckEngine()
    yield engine
    engine.conn.close()


@pytest.fixture(scope="module")
def pg(pg_database_url: str) -> Iterator[PgEngine]:
    require_postgres()
    engine = PgEngine(pg_database_url)
    yield engine
    engine.close()


def _agree(
    duck: DuckEngine, pg: PgEngine | None, expr: ast.Expr, crowd: list[Person], now: datetime
) -> set[str]:
    expected = memory_members(expr, crowd, now)
    duck.load(crowd)
    assert duck.members(expr, now) == expected, "DuckDB disagrees with the in-memory evaluator"
    if pg is not None:
        pg.load(crowd)
        assert pg.members(expr, now) == expected, (
            "PostgreSQL disagrees with the in-memory evaluator"
        )
    return expected


_SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@_SETTINGS
@given(data=st.data())
def test_random_definitions_agree_on_duckdb_postgres_and_in_memory(
    duck: DuckEngine, pg: PgEngine, data: st.DataObject
) -> None:
    expr = data.draw(audiences(SCHEMA, names=(), depth=2), label="definition")
    now = data.draw(st.sampled_from(NOWS), label="now")
    crowd = data.draw(people(SCHEMA, expr, now), label="people")
    _agree(duck, pg, expr, crowd, now)


_CONSENTS = {"d-in": {("email", "marketing"): "opted_in"}, "b": {("email", "marketing"): "unknown"}}


def _person(
    pid: str, attributes: dict[str, object], *events: tuple[str, datetime, dict[str, object]]
) -> Person:
    return Person(
        pid,
        attributes,
        _CONSENTS.get(pid, {}),
        tuple(Event(name, ts, i, props) for i, (name, ts, props) in enumerate(events, start=1)),
    )


NOW = NOWS[0]
DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("text", "members"),
    [
        ("count(purchase within last 30 days) >= 2", {"a", "b"}),
        ("purchase within last 30 days", {"a", "b"}),  # b's purchase is exactly 30 days ago
        ("purchase more than 30 days ago", {"c"}),
        ("not purchase within last 30 days", {"c", "d-in"}),
        ("sum(purchase.revenue within last 30 days) >= 15", {"a"}),
        ("avg(purchase.revenue) > 6", {"a", "c"}),
        ("max(purchase.revenue) < 6", {"b"}),
        ('last(purchase).category = "shoes"', {"a", "c"}),  # c's later one is in the future
        ("cart_add then purchase within 1 hour", {"a"}),
        ("cart_add then not purchase within 1 hour", {"b"}),
        ('email ends with "@EXAMPLE.com"', {"a", "b"}),
        ('country in ("DE", "AT") and not (plan = "free")', {"a", "c"}),
        ("consent(email, marketing) = opted_in", {"d-in"}),
        ("consent(email, marketing) = unknown", {"a", "b", "c"}),  # b's record says unknown
        ("consent(email, marketing) != opted_out", {"a", "b", "c", "d-in"}),
        ("birthday in next 7 days", {"d-in"}),
        ("signup_at within last 30 days", {"b"}),
    ],
)
def test_known_members_on_every_engine(
    duck: DuckEngine, request: pytest.FixtureRequest, text: str, members: set[str]
) -> None:
    pg = request.getfixturevalue("pg")
    crowd = [
        _person(
            "a",
            {
                "country": "DE",
                "plan": "pro",
                "email": "a@example.com",
                "signup_at": (NOW - 90 * DAY).isoformat(),
            },
            ("cart_add", NOW - 2 * DAY, {"sku": "x"}),
            (
                "purchase",
                NOW - 2 * DAY + timedelta(minutes=30),
                {"revenue": 10.0, "category": "hats"},
            ),
            ("purchase", NOW - DAY, {"revenue": 5.0, "category": "shoes"}),
        ),
        _person(
            "b",
            {
                "country": "FR",
                "plan": "free",
                "email": "b@example.com",
                "signup_at": (NOW - 30 * DAY).isoformat(),
            },
            ("purchase", NOW - 30 * DAY, {"revenue": 5.0}),
            ("cart_add", NOW - 2 * DAY, {"sku": "y"}),
            ("purchase", NOW - 2 * DAY + timedelta(hours=1, seconds=1), {"revenue": "n/a"}),
        ),
        _person(
            "c",
            {"country": "AT", "plan": "plus", "email": "c@example.org"},
            ("purchase", NOW - 31 * DAY, {"revenue": 7.0, "category": "shoes"}),
            ("purchase", NOW + DAY, {"revenue": 1.0, "category": "hats"}),  # not yet visible
        ),
        _person("d-in", {"birthday": "1990-03-05", "timezone": "Pacific/Auckland"}),
    ]
    expr = parse(text, SCHEMA)
    assert _agree(duck, pg, expr, crowd, NOW) == members


def test_a_checked_tree_is_what_check_gives(duck: DuckEngine) -> None:
    expr = parse('country = "DE"', SCHEMA)
    assert check(expr, SCHEMA) == expr


_ZONES = ("UTC", "Pacific/Auckland", "America/Los_Angeles", "Asia/Kolkata", "Not/A_Zone")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    days=st.integers(0, 366),
    now=st.datetimes(
        min_value=datetime(2023, 1, 1), max_value=datetime(2029, 12, 31), timezones=st.just(UTC)
    ),
    births=st.lists(
        st.tuples(
            st.dates()
            | st.sampled_from([datetime(2000, 2, 29).date(), datetime(1999, 12, 31).date()]),
            st.sampled_from(_ZONES),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_anniversaries_agree_across_zones_and_leap_days(
    duck: DuckEngine, pg: PgEngine, days: int, now: datetime, births: list[tuple[object, str, bool]]
) -> None:
    crowd = []
    for i, (day, zone, as_timestamp) in enumerate(births):
        stamp = f"{day}T00:00:00+00:00" if as_timestamp else f"{day}"
        crowd.append(
            Person(f"p{i}", {"birthday": str(day), "signup_at": stamp, "timezone": zone}, {}, ())
        )
    for text in (f"birthday in next {days} days", f"signup_at in next {days} days"):
        _agree(duck, pg, parse(text, SCHEMA), crowd, now)


@pytest.mark.parametrize(
    ("stored", "reads"),
    [
        ("2026-02-01T10:00:00+00:00", True),
        ("2026-02-01T10:00:00.123456Z", True),
        ("2026-02-01T10:00:00+05:30", True),
        ("2024-02-29T00:00:00+00:00", True),
        ("2026-02-29T00:00:00+00:00", False),  # no such day
        ("2026-02-30T00:00:00Z", False),
        ("2026-02-01T24:00:00+00:00", False),
        ("2026-02-01T10:00:60+00:00", False),
        ("2026-02-01T10:00:00+16:00", False),  # beyond PostgreSQL's offsets
        ("0000-01-01T00:00:00+00:00", False),
        ("2026-02-01", False),  # a date is not the stored form of a timestamp
        ("2026-02-01 10:00:00+00:00", False),
        ("yesterday", False),
    ],
)
def test_stored_timestamps_read_alike(
    duck: DuckEngine, request: pytest.FixtureRequest, stored: str, reads: bool
) -> None:
    pg = request.getfixturevalue("pg")
    crowd = [Person("p", {"signup_at": stored}, {}, ())]
    for text in ("signup_at exists", "signup_at more than 1 days ago"):
        assert _agree(duck, pg, parse(text, SCHEMA), crowd, NOW) == ({"p"} if reads else set())
