"""The demo shop generator: counts, determinism, identity stitching, realism, file formats."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import available_timezones

import phonenumbers
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from email_validator import validate_email

from waymark.demo.generate import (
    PAGE_NAMES,
    TRACK_EVENTS,
    Format,
    GenerateSummary,
    generate,
    load_demo_schema,
)

END = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
DAYS = 120
PROFILES = 300
FORMATS: tuple[Format, ...] = ("parquet", "csv", "jsonl")
PROFILE_COLUMNS = [
    "user_id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "country",
    "city",
    "timezone",
    "signup_at",
    "plan",
    "lifetime_value",
    "birthday",
    "consent.email.marketing",
    "consent.sms.marketing",
    "updated_at",
]
EVENT_COLUMNS = [
    "message_id",
    "type",
    "event",
    "timestamp",
    "user_id",
    "anonymous_id",
    "properties",
]
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _rows(path: Path) -> list[dict[str, Any]]:
    """Read any of the three formats into row dicts with ISO timestamps and None for missing."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    if path.suffix == ".csv":
        header = path.read_text("utf-8").split("\n", 1)[0]
        names = [name.strip('"') for name in header.split(",")]
        types = {name: pa.string() for name in names}
        if "lifetime_value" in types:
            types["lifetime_value"] = pa.float64()
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
        )
        read: list[dict[str, Any]] = table.to_pylist()
        return read
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    for row in rows:
        for key, value in row.items():
            if isinstance(value, datetime):
                row[key] = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return rows


def _ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def datasets(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[GenerateSummary, list[dict[str, Any]], list[dict[str, Any]]]]:
    out: dict[str, tuple[GenerateSummary, list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for fmt in FORMATS:
        summary = generate(
            tmp_path_factory.mktemp(fmt), profiles=PROFILES, seed=11, end=END, days=DAYS, fmt=fmt
        )
        out[fmt] = (summary, _rows(summary.files[0]), _rows(summary.files[1]))
    return out


@pytest.fixture(scope="module")
def data(
    datasets: dict[str, tuple[GenerateSummary, list[dict[str, Any]], list[dict[str, Any]]]],
) -> tuple[GenerateSummary, list[dict[str, Any]], list[dict[str, Any]]]:
    return datasets["parquet"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_and_columns_match_the_summary(
    datasets: dict[str, tuple[GenerateSummary, list[dict[str, Any]], list[dict[str, Any]]]],
    fmt: str,
) -> None:
    summary, profiles, events = datasets[fmt]
    assert [path.name for path in summary.files] == [
        f"profiles.{fmt}",
        f"events.{fmt}",
        "schema.json",
    ]
    assert all(path.exists() for path in summary.files)
    assert not list(summary.files[0].parent.glob("*.partial"))
    assert summary.profiles == len(profiles) == PROFILES
    assert summary.events == len(events)
    assert summary.anonymous_visitors == PROFILES // 2
    assert 5 * PROFILES < summary.events < 40 * PROFILES
    assert list(profiles[0]) == PROFILE_COLUMNS
    assert list(events[0]) == EVENT_COLUMNS
    for event in events:
        assert isinstance(json.loads(event["properties"]), dict)
        assert ISO_MS.match(event["timestamp"])
        assert UUID.match(event["message_id"])


def test_formats_hold_the_same_data(
    datasets: dict[str, tuple[GenerateSummary, list[dict[str, Any]], list[dict[str, Any]]]],
) -> None:
    _, base_profiles, base_events = datasets["parquet"]
    for fmt in ("csv", "jsonl"):
        _, profiles, events = datasets[fmt]
        assert events == base_events
        assert profiles == base_profiles


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_seed_gives_byte_identical_files(tmp_path: Path, fmt: Format) -> None:
    first = generate(tmp_path / "a", profiles=200, seed=3, end=END, days=60, fmt=fmt)
    second = generate(tmp_path / "b", profiles=200, seed=3, end=END, days=60, fmt=fmt)
    other = generate(tmp_path / "c", profiles=200, seed=4, end=END, days=60, fmt=fmt)
    assert first.events == second.events
    for a, b, c in zip(first.files, second.files, other.files, strict=True):
        assert a.read_bytes() == b.read_bytes()
        if a.name != "schema.json":
            assert a.read_bytes() != c.read_bytes()


def test_timestamps_fall_in_the_window_and_are_sorted(data: Any) -> None:
    _, profiles, events = data
    stamps = [_ts(event["timestamp"]) for event in events]
    assert min(stamps) >= END - timedelta(days=DAYS)
    assert max(stamps) <= END
    assert stamps == sorted(stamps)  # a single chunk at this size: sorted throughout
    for profile in profiles:
        assert _ts(profile["signup_at"]) <= _ts(profile["updated_at"]) <= END


def test_message_ids_and_order_ids_are_unique(data: Any) -> None:
    _, _, events = data
    assert len({event["message_id"] for event in events}) == len(events)
    orders = [json.loads(e["properties"])["order_id"] for e in events if e["event"] == "purchase"]
    assert orders and len(set(orders)) == len(orders)


def test_every_purchase_is_complete_and_by_a_known_customer(data: Any) -> None:
    _, _, events = data
    purchases = [event for event in events if event["event"] == "purchase"]
    assert purchases
    for event in purchases:
        props = json.loads(event["properties"])
        assert event["type"] == "track"
        assert event["user_id"] is not None
        assert isinstance(props["order_id"], str) and props["order_id"]
        assert props["revenue"] > 0
        assert props["items"] >= 1
        assert props["currency"] in {"USD", "GBP", "EUR", "SEK", "CAD", "AUD"}


def test_identify_links_devices_and_anonymous_browsing_comes_first(data: Any) -> None:
    summary, _, events = data
    by_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        assert event["anonymous_id"]
        by_device[event["anonymous_id"]].append(event)
    identifies = [event for event in events if event["type"] == "identify"]
    assert identifies
    anonymous_first = 0
    for event in identifies:
        assert event["event"] == "identify"
        assert event["user_id"] and event["anonymous_id"]
        device = by_device[event["anonymous_id"]]
        at = device.index(event)
        assert all(e["user_id"] is None for e in device[:at])  # browsing before login
        assert all(e["user_id"] == event["user_id"] for e in device[at:])  # and after it
        anonymous_first += at > 0
    assert anonymous_first == len(identifies)  # login always follows some anonymous events
    # One person per device; devices that never log in are the anonymous-only visitors.
    users = {a: {e["user_id"] for e in evs} - {None} for a, evs in by_device.items()}
    assert all(len(found) <= 1 for found in users.values())
    anonymous_only = [a for a, found in users.items() if not found]
    assert len(anonymous_only) == summary.anonymous_visitors
    for anonymous_id in anonymous_only:
        assert all(e["event"] != "purchase" for e in by_device[anonymous_id])


def test_customers_have_one_to_three_devices(data: Any) -> None:
    _, _, events = data
    devices: dict[str, set[str]] = defaultdict(set)
    for event in events:
        if event["user_id"]:
            devices[event["user_id"]].add(event["anonymous_id"])
    counts = Counter(len(found) for found in devices.values())
    assert set(counts) <= {1, 2, 3}
    assert counts[1] > counts[2] > 0


def test_activity_is_heavy_tailed(data: Any) -> None:
    _, profiles, events = data
    per_user = Counter(event["user_id"] for event in events if event["user_id"])
    counts = sorted((per_user.get(p["user_id"], 0) for p in profiles), reverse=True)
    top = sum(counts[: len(counts) // 10])
    assert top / sum(counts) > 0.4
    assert counts[len(counts) // 2] < counts[0] / 10  # the median customer is far below the top


def test_funnel_ratios_are_plausible(data: Any) -> None:
    _, _, events = data
    n = Counter(event["event"] for event in events)
    fewest_sessions = n["Home"] + n["Product"] + n["app_open"]  # not counting Category landings
    assert n["product_view"] > n["cart_add"] > n["checkout_started"] > n["purchase"] > 0
    assert 0.03 < n["cart_add"] / n["product_view"] < 0.3
    assert n["purchase"] / fewest_sessions < 0.1
    assert n["app_open"] > 0 and n["search"] > 0
    # Somebody put something in a cart and never bought afterwards.
    last: dict[str, tuple[datetime, str]] = {}
    for event in events:
        if event["user_id"] and event["event"] in {"cart_add", "purchase"}:
            last[event["user_id"]] = (_ts(event["timestamp"]), event["event"])
    assert any(kind == "cart_add" for _, kind in last.values())


def test_lifetime_value_covers_the_purchases(data: Any) -> None:
    _, profiles, events = data
    revenue: Counter[str] = Counter()
    for event in events:
        if event["event"] == "purchase":
            revenue[event["user_id"]] += json.loads(event["properties"])["revenue"]
    start = END - timedelta(days=DAYS)
    for profile in profiles:
        spent = revenue[profile["user_id"]]
        assert profile["lifetime_value"] >= spent - 0.005
        if _ts(profile["signup_at"]) >= start:  # signed up in the window: nothing before
            assert profile["lifetime_value"] == pytest.approx(spent, abs=0.005)
    assert any(p["lifetime_value"] > 100 for p in profiles)


def test_profiles_are_valid_and_consistent(data: Any) -> None:
    _, profiles, _ = data
    zones = available_timezones()
    emails = [p["email"] for p in profiles]
    assert len(set(emails)) == len(emails)
    phones = [p["phone"] for p in profiles if p["phone"]]
    assert len(set(phones)) == len(phones)
    assert 0.45 < len(phones) / len(profiles) < 0.75
    for profile in profiles:
        assert re.fullmatch(r"u\d{7}", profile["user_id"])
        validate_email(profile["email"], check_deliverability=False)
        assert profile["email"].rsplit("@", 1)[1] in {"example.com", "example.net", "example.org"}
        if profile["phone"]:
            assert re.fullmatch(r"\+[1-9]\d{7,14}", profile["phone"])
            number = phonenumbers.parse(profile["phone"])
            assert phonenumbers.is_valid_number(number)
            assert phonenumbers.region_code_for_number(number) == profile["country"]
        assert profile["timezone"] in zones
        prefix = {"US": "America/", "CA": "America/", "AU": "Australia/"}
        assert profile["timezone"].startswith(prefix.get(profile["country"], "Europe/"))
        assert profile["plan"] in {"free", "plus", "pro"}
        assert profile["consent.email.marketing"] in {"opted_in", "opted_out", "unknown"}
        assert profile["consent.sms.marketing"] in {"opted_in", "opted_out", "unknown"}
        if not profile["phone"]:
            assert profile["consent.sms.marketing"] == "unknown"
        if profile["birthday"] is not None:
            born = datetime.strptime(profile["birthday"], "%Y-%m-%d").replace(tzinfo=UTC)
            assert 17 < (END - born).days / 365.25 < 81
        assert profile["first_name"] and profile["last_name"] and profile["city"]
    assert len({p["country"] for p in profiles}) >= 6
    assert Counter(p["country"] for p in profiles).most_common(1)[0][0] == "US"
    assert any(p["birthday"] is None for p in profiles)


def test_schema_declares_every_emitted_event(data: Any) -> None:
    summary, profiles, events = data
    schema = load_demo_schema()
    assert json.loads(summary.files[2].read_text("utf-8")) == schema
    assert schema["unknown_events"] == "accept"
    assert schema["attributes"]["plan"]["enum"] == ["free", "plus", "pro"]
    assert schema["events"]["purchase"]["properties"]["order_id"]["required"] is True
    allowed = {"type", "format", "enum", "required", "items", "properties", "description"}

    def check(spec: dict[str, Any]) -> None:
        assert set(spec) <= allowed
        assert spec["type"] in {
            "string",
            "number",
            "integer",
            "boolean",
            "timestamp",
            "object",
            "array",
        }
        for child in spec.get("properties", {}).values():
            check(child)

    for spec in schema["attributes"].values():
        check(spec)
    for event_spec in schema["events"].values():
        assert set(event_spec) == {"properties"}
        for spec in event_spec["properties"].values():
            check(spec)
    emitted = {e["event"] for e in events if e["type"] in {"track", "identify"}}
    assert emitted == set(TRACK_EVENTS) | {"identify"}
    assert emitted <= set(schema["events"])
    assert {e["event"] for e in events if e["type"] == "page"} == set(PAGE_NAMES)
    for event in events:
        declared = schema["events"].get(event["event"])
        if declared is None:
            continue
        props = json.loads(event["properties"])
        assert set(props) <= set(declared["properties"])
        for name, spec in declared["properties"].items():
            assert name in props or not spec.get("required")
    assert set(schema["attributes"]) <= set(profiles[0])


def test_progress_is_reported_per_chunk(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    generate(tmp_path, profiles=40, end=END, days=30, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(40, 40)]


def test_more_sessions_give_more_events_for_the_same_people(tmp_path: Path) -> None:
    """``sessions`` scales the events, not the people: the same profiles, more events, and the
    default is the scale of 1.0."""
    runs = {}
    for scale in (1.0, 1.5):
        folder = tmp_path / str(scale)
        runs[scale] = generate(folder, profiles=2000, end=END, days=DAYS, sessions=scale)
    default = generate(tmp_path / "default", profiles=2000, end=END, days=DAYS)
    assert default.events == runs[1.0].events
    assert runs[1.5].profiles == runs[1.0].profiles
    assert 1.2 * runs[1.0].events < runs[1.5].events < 1.6 * runs[1.0].events


def test_a_single_profile_works(tmp_path: Path) -> None:
    summary = generate(tmp_path, profiles=1, end=END, days=1, fmt="csv")
    assert summary.profiles == 1
    assert len(_rows(summary.files[0])) == 1
    assert len(_rows(summary.files[1])) == summary.events


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"end": datetime(2025, 1, 1)}, "timezone-aware"),
        ({"profiles": 0}, "profiles"),
        ({"days": 0}, "days"),
        ({"seed": -1}, "seed"),
        ({"fmt": "xml"}, "fmt"),
        ({"sessions": 0.0}, "sessions"),
        ({"sessions": 11.0}, "sessions"),
        ({"sessions": float("nan")}, "sessions"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"profiles": 10, "end": END, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **arguments)
    assert not list(tmp_path.iterdir())
