"""File imports (CSV, JSON Lines, Parquet) on SQLite+DuckDB and on PostgreSQL."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from waymark.access import service as access
from waymark.core.errors import Conflict, InvalidInput
from waymark.demo.generate import generate, load_demo_schema
from waymark.hub import Hub
from waymark.identity.graph import MergePolicy, apply_record, new_profile
from waymark.ingestion import files
from waymark.ingestion.files import ImportReport, run_import
from waymark.ingestion.pipeline import Ingestor
from waymark.model.events import Identity
from waymark.profiles import service as profiles
from waymark.profiles.schema_store import save_schema
from waymark.storage.tables import consents, identities, imports
from waymark.storage.tables import profiles as profiles_table


@pytest.fixture
def ws(hub: Hub) -> str:
    """A workspace with the demo shop's schema (typed attributes, declared events)."""
    with hub.tx() as conn:
        workspace, _w, _a = access.create_workspace(
            conn, name="shop", actor="test", at=hub.clock.now()
        )
        save_schema(
            conn,
            workspace_id=workspace.id,
            document=load_demo_schema(),
            actor="t",
            at=hub.clock.now(),
        )
    return workspace.id


def other_workspace(hub: Hub, name: str = "other") -> str:
    with hub.tx() as conn:
        workspace, _w, _a = access.create_workspace(
            conn, name=name, actor="test", at=hub.clock.now()
        )
    return workspace.id


def stamp(hub: Hub, minutes: int) -> str:
    """An ISO time ``minutes`` after one day before the test clock's now."""
    return (hub.clock.now() - timedelta(days=1) + timedelta(minutes=minutes)).isoformat()


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
    return path


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def write_parquet(path: Path, columns: dict[str, pa.Array]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def report_lines(report: ImportReport) -> list[dict[str, str]]:
    assert report.error_report is not None
    with open(report.error_report, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def identity_set(view: dict[str, Any]) -> set[tuple[str, str]]:
    return {(i["namespace"], i["value"]) for i in view["identities"]}


def count(hub: Hub, table: Any, ws: str) -> int:
    with hub.tx() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(table).where(table.c.workspace_id == ws)
            ).scalar_one()
        )


def message_ids(hub: Hub, ws: str) -> list[str]:
    rows = hub.events.sql(
        "SELECT message_id FROM events WHERE workspace_id = "
        + ("?" if hub.settings.shared_event_log is False else ":p0"),
        [ws],
    )
    return sorted(r[0] for r in rows)


# -- profiles -----------------------------------------------------------------------------------

PROFILE_HEADER = (
    "user_id",
    "email",
    "phone",
    "first_name",
    "lifetime_value",
    "consent.email.marketing",
    "updated_at",
)


def profile_rows(hub: Hub) -> list[list[Any]]:
    return [
        ["u1", "Ann@Example.com", "+4915112345678", "Ann", "12.5", "opted_in", stamp(hub, 1)],
        ["u2", "bob@example.com", None, "Bob", None, "opted_out", stamp(hub, 2)],
        # no user id: the e-mail links this row's phone and name to u1's profile
        [None, "ann@example.com", "+14155550123", "Annie", "20", None, stamp(hub, 3)],
    ]


def check_profiles(hub: Hub, ws: str) -> None:
    with hub.tx() as conn:
        ann = profiles.lookup(conn, ws, "user_id", "u1")
        bob = profiles.lookup(conn, ws, "user_id", "u2")
    assert identity_set(ann) == {
        ("user_id", "u1"),
        ("email", "ann@example.com"),
        ("phone", "+4915112345678"),
        ("phone", "+14155550123"),
    }
    assert ann["attributes"]["first_name"] == "Annie"  # the later record wins
    assert ann["attributes"]["lifetime_value"] == 20
    assert ann["attributes"]["email"] == "ann@example.com"
    assert [(c["channel"], c["purpose"], c["status"]) for c in ann["consents"]] == [
        ("email", "marketing", "opted_in")
    ]
    assert bob["consents"][0]["status"] == "opted_out"
    assert "lifetime_value" not in bob["attributes"]  # an empty cell is no value
    assert count(hub, profiles_table, ws) == 2


def test_profiles_csv_with_consents_and_identity_linking(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "people.csv", PROFILE_HEADER, profile_rows(hub))
    seen: list[tuple[int, int | None]] = []
    report = run_import(
        hub,
        workspace_id=ws,
        kind="profiles",
        path=path,
        actor="t",
        progress=lambda done, total: seen.append((done, total)),
    )
    assert (report.status, report.rows_read, report.rows_accepted, report.rows_rejected) == (
        "done",
        3,
        3,
        0,
    )
    assert report.error_report is None and not (tmp_path / "people.csv.errors.csv").exists()
    assert seen and seen[-1][0] == 3
    check_profiles(hub, ws)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_profiles_jsonl_and_parquet(hub: Hub, ws: str, tmp_path: Path, fmt: str) -> None:
    rows = [dict(zip(PROFILE_HEADER, r, strict=True)) for r in profile_rows(hub)]
    for row in rows:  # typed values, as these formats carry them
        row["lifetime_value"] = float(row["lifetime_value"]) if row["lifetime_value"] else None
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "people.jsonl", rows)
    else:
        table = pa.Table.from_pylist(rows)
        path = tmp_path / "people.parquet"
        pq.write_table(table, path)
    report = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert (report.rows_accepted, report.rows_rejected) == (3, 0)
    check_profiles(hub, ws)


def test_a_new_profile_is_written_as_the_graph_would(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "one.csv", PROFILE_HEADER, profile_rows(hub)[:1])
    run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    with hub.tx() as conn:
        row = conn.execute(select(profiles_table)).mappings().one()
        links = conn.execute(select(identities.c.namespace, identities.c.value)).all()
    at = row["first_seen"]
    expected = apply_record(
        new_profile(row["id"], at),
        [Identity(ns, v) for ns, v in links],
        row["attributes"],
        at=at,
        source=files.SOURCE,
        policy=MergePolicy(),
    )
    assert {li.identity for li in expected.identities} == {Identity(ns, v) for ns, v in links}
    assert row["attribute_meta"] == {
        k: [v.updated_at.isoformat(), v.source] for k, v in expected.attributes.items()
    }
    assert (row["first_seen"], row["last_seen"]) == (expected.first_seen, expected.last_seen)


def test_mapping_overrides(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "crm.csv",
        ["Customer ID", "Mail", "ltv", "Opt In", "junk", "loyalty"],
        [["c-1", "c1@example.com", "7", "opted_in", "x", "gold"]],
    )
    mapping = {
        "Customer ID": "identity:crm_id",
        "Mail": "identity:email",
        "ltv": "attribute:lifetime_value",
        "Opt In": "consent:email:newsletter",
        "junk": "ignore",
    }
    report = run_import(
        hub, workspace_id=ws, kind="profiles", path=path, actor="t", mapping=mapping
    )
    assert report.rows_accepted == 1
    with hub.tx() as conn:
        view = profiles.lookup(conn, ws, "crm_id", "c-1")
    assert identity_set(view) == {("crm_id", "c-1"), ("email", "c1@example.com")}
    assert view["attributes"] == {"email": "c1@example.com", "lifetime_value": 7, "loyalty": "gold"}
    assert view["consents"][0]["purpose"] == "newsletter"
    unmapped = {k: v for k, v in mapping.items() if k != "Customer ID"}
    with pytest.raises(InvalidInput, match="map it"):  # by default it would be an attribute
        run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t", mapping=unmapped)
    for change, problem in (
        ({"missing": "ignore"}, "no column"),
        ({"junk": "nonsense"}, "unknown target"),
        ({"Customer ID": "identity:email"}, "both"),
        ({"ltv": "message_id"}, "does not apply"),
    ):
        with pytest.raises(InvalidInput, match=problem):
            run_import(
                hub,
                workspace_id=ws,
                kind="profiles",
                path=path,
                actor="t",
                mapping={**mapping, **change},
            )


def test_bad_rows_are_reported_and_the_rest_kept(hub: Hub, ws: str, tmp_path: Path) -> None:
    rows = [
        ["u1", "ok@example.com", None, "A", "1", "opted_in", stamp(hub, 1)],
        [None, None, None, "Nobody", "2", None, stamp(hub, 2)],  # no identity
        ["u3", "not-an-email", None, "C", "lots", "maybe", stamp(hub, 3)],  # three problems
        ["u4", None, "no digits", "D", None, None, "yesterday"],
        ["u5", None, None, "E", "5", None, stamp(hub, 5)],
    ]
    path = write_csv(tmp_path / "people.csv", PROFILE_HEADER, rows)
    report = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (5, 2, 3)
    assert report.error_report == str(tmp_path / "people.csv.errors.csv")
    lines = report_lines(report)
    got = {(int(x["row"]), x["field"]) for x in lines}
    assert got == {
        (2, "user_id/email/phone"),
        (3, "email"),
        (3, "lifetime_value"),
        (3, "consent.email.marketing"),
        (4, "phone"),
        (4, "updated_at"),
    }
    reasons = {(int(x["row"]), x["field"]): x["reason"] for x in lines}
    assert "no identity" in reasons[(2, "user_id/email/phone")]
    assert "number" in reasons[(3, "lifetime_value")]
    assert "opted_in" in reasons[(3, "consent.email.marketing")]
    assert "ISO-8601" in reasons[(4, "updated_at")]
    assert count(hub, profiles_table, ws) == 2


def test_broken_quoting_rejects_one_row(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = tmp_path / "quotes.csv"
    path.write_text(
        "user_id,first_name,city\n"
        'u1,Ann,"Paris"\n'
        'u2,"Bob,Berlin\n'  # the quote is never closed
        "u3,Cid,Rome\n"
        'u4,"Dee\nDoe",Oslo\n'  # a value spanning two lines is one row
        "u5,Eve,Lima,extra\n"  # one value too many
        "u6,Fay,Kyiv\n",
        encoding="utf-8",
    )
    report = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (6, 4, 2)
    lines = report_lines(report)
    assert [(int(x["row"]), x["field"]) for x in lines] == [(2, "first_name"), (5, "")]
    assert "quote" in lines[0]["reason"] and "4 values" in lines[1]["reason"]
    with hub.tx() as conn:
        assert profiles.lookup(conn, ws, "user_id", "u4")["attributes"]["first_name"] == "Dee\nDoe"
        assert profiles.lookup(conn, ws, "user_id", "u3")["attributes"]["city"] == "Rome"


def test_wrong_encoding_rejects_the_rows_it_breaks(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("user_id,city\nu1,Paris\nu2,Málaga\nu3,Köln\nu4,Rome\n".encode("latin-1"))
    report = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert (report.rows_accepted, report.rows_rejected) == (2, 2)
    lines = report_lines(report)
    assert [(int(x["row"]), x["field"]) for x in lines] == [(2, "city"), (3, "city")]
    assert "UTF-8" in lines[0]["reason"] and "--encoding" in lines[0]["reason"]
    # the same bytes read as Latin-1 (a file is identified by its content, so in another
    # workspace: in this one the file counts as imported)
    other = other_workspace(hub)
    again = run_import(
        hub,
        workspace_id=other,
        kind="profiles",
        path=path,
        actor="t",
        encoding="latin-1",
        error_report=tmp_path / "latin1-again.csv",
    )
    assert (again.rows_accepted, again.rows_rejected, again.error_report) == (4, 0, None)
    with hub.tx() as conn:
        assert profiles.lookup(conn, other, "user_id", "u2")["attributes"]["city"] == "Málaga"
    with pytest.raises(InvalidInput, match="encoding"):
        run_import(
            hub, workspace_id=other, kind="profiles", path=path, actor="t", encoding="utf-16"
        )


def test_parquet_with_wrong_column_types(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "typed.parquet",
        {
            "user_id": pa.array([1, 2, 3], pa.int64()),  # whole numbers are identities too
            "lifetime_value": pa.array(["12.5", "abc", "3"]),  # text where numbers belong
            "updated_at": pa.array([stamp(hub, 1), stamp(hub, 2), "not a time"]),
            "signup_at": pa.array([1.5, None, None], pa.float64()),  # epoch seconds
        },
    )
    report = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert (report.rows_accepted, report.rows_rejected) == (1, 2)
    assert [(int(x["row"]), x["field"]) for x in report_lines(report)] == [
        (2, "lifetime_value"),
        (3, "updated_at"),
    ]
    with hub.tx() as conn:
        view = profiles.lookup(conn, ws, "user_id", "1")
    assert view["attributes"]["lifetime_value"] == 12.5
    assert view["attributes"]["signup_at"].startswith("1970-01-01T00:00:01.5")


def test_malformed_json_lines(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = tmp_path / "people.jsonl"
    path.write_text(
        '{"user_id": "u1", "plan": "pro"}\n'
        '{"user_id": "u2", "plan": \n'
        "\n"
        '["not", "an", "object"]\n'
        '{"user_id": "u5", "plan": "free"}\n',
        encoding="utf-8",
    )
    report = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert (report.rows_accepted, report.rows_rejected) == (2, 2)
    lines = report_lines(report)
    assert [(int(x["row"]), x["field"]) for x in lines] == [(2, ""), (4, "")]
    assert "not valid JSON" in lines[0]["reason"] and "object" in lines[1]["reason"]


def test_rerun_is_idempotent(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "people.csv", PROFILE_HEADER, profile_rows(hub))
    first = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    again = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert again.already_done and not first.already_done
    assert again.import_id == first.import_id
    assert (again.rows_read, again.rows_accepted, again.profiles_created) == (3, 3, 2)
    assert count(hub, profiles_table, ws) == 2
    assert count(hub, identities, ws) == 6
    assert count(hub, consents, ws) == 2


def test_interrupted_profile_import_resumes(
    hub: Hub, ws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [
        [f"u{i}", None, None, f"N{i}", "nope" if i == 1 else str(i), None, stamp(hub, i)]
        for i in range(10)
    ]
    path = write_csv(tmp_path / "people.csv", PROFILE_HEADER, rows)
    real = files._apply_profiles
    calls = {"n": 0}

    def crash_on_third(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")
        real(*args, **kwargs)

    monkeypatch.setattr(files, "_apply_profiles", crash_on_third)
    monkeypatch.setattr(files, "_CSV_BLOCK_BYTES", 64)  # several chunks from a tiny file
    with pytest.raises(RuntimeError):
        run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t", chunk_rows=2)
    with hub.tx() as conn:
        row = conn.execute(select(imports)).mappings().one()
    assert row["status"] == "failed" and 0 < row["rows_committed"] < 10
    resumed = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t", chunk_rows=2)
    assert (resumed.rows_read, resumed.rows_accepted, resumed.rows_rejected) == (10, 9, 1)
    assert count(hub, profiles_table, ws) == 9
    assert [int(x["row"]) for x in report_lines(resumed)] == [2]


# -- events -------------------------------------------------------------------------------------

EVENT_HEADER = ("message_id", "type", "event", "timestamp", "user_id", "anonymous_id", "properties")


def event_rows(hub: Hub) -> list[list[Any]]:
    return [
        ["m1", "page", "Home", stamp(hub, 1), None, "dev-1", '{"path": "/"}'],
        ["m2", "track", "product_view", stamp(hub, 2), None, "dev-1", '{"sku": "A1"}'],
        ["m3", "identify", None, stamp(hub, 3), "u1", "dev-1", None],
        ["m4", None, "cart_add", stamp(hub, 4), "u1", None, '{"sku": "A1", "price": 5}'],
        ["m5", "track", "app_open", stamp(hub, 5), None, "dev-2", "{}"],
    ]


def check_events(hub: Hub, ws: str) -> None:
    assert message_ids(hub, ws) == ["m1", "m2", "m3", "m4", "m5"]
    with hub.tx() as conn:
        user = profiles.lookup(conn, ws, "user_id", "u1")
        device = profiles.lookup(conn, ws, "anonymous_id", "dev-1")
        other = profiles.lookup(conn, ws, "anonymous_id", "dev-2")
        events = profiles.timeline(conn, hub.events, ws, user["id"])
    assert user["id"] == device["id"] != other["id"]  # the login linked the device
    assert [e["message_id"] for e in events] == ["m4", "m3", "m2", "m1"]
    assert events[0]["properties"] == {"sku": "A1", "price": 5}
    assert events[0]["type"] == "track" and events[1]["name"] == "identify"
    assert events[1]["identities"] == {"user_id": "u1", "anonymous_id": "dev-1"}
    assert events[0]["source"] == files.SOURCE
    assert user["system"]["first_seen"] == stamp(hub, 1)
    assert user["system"]["last_seen"] == stamp(hub, 4)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_events_in_each_format(hub: Hub, ws: str, tmp_path: Path, fmt: str) -> None:
    rows = event_rows(hub)
    if fmt == "csv":
        path = write_csv(tmp_path / "events.csv", EVENT_HEADER, rows)
    else:
        dicts = [dict(zip(EVENT_HEADER, r, strict=True)) for r in rows]
        for d in dicts:
            d["properties"] = json.loads(d["properties"]) if d["properties"] else None
        if fmt == "jsonl":
            path = write_jsonl(tmp_path / "events.jsonl", dicts)
        else:
            for d in dicts:
                d["properties"] = json.dumps(d["properties"]) if d["properties"] else None
            path = tmp_path / "events.parquet"
            pq.write_table(pa.Table.from_pylist(dicts), path)
    report = run_import(hub, workspace_id=ws, kind="events", path=path, actor="t")
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (5, 5, 0)
    assert report.profiles_created == 2 and report.profiles_merged == 0
    check_events(hub, ws)


def test_events_join_known_profiles_and_columns_become_properties(
    hub: Hub, ws: str, tmp_path: Path
) -> None:
    people = write_csv(tmp_path / "people.csv", PROFILE_HEADER, profile_rows(hub)[:2])
    run_import(hub, workspace_id=ws, kind="profiles", path=people, actor="t")
    path = write_csv(
        tmp_path / "events.csv",
        ["event", "when", "email", "sku", "qty"],
        [
            ["order", stamp(hub, -60), "ANN@example.com", "A1", "2"],
            ["order", stamp(hub, 90), "bob@example.com", "B2", None],
        ],
    )
    report = run_import(
        hub,
        workspace_id=ws,
        kind="events",
        path=path,
        actor="t",
        mapping={"when": "timestamp"},
    )
    assert (report.rows_accepted, report.profiles_created) == (2, 0)
    with hub.tx() as conn:
        ann = profiles.lookup(conn, ws, "user_id", "u1")
        [event] = profiles.timeline(conn, hub.events, ws, ann["id"])
    assert event["properties"] == {"sku": "A1", "qty": "2"}
    assert event["message_id"]  # derived from the file and the row
    assert ann["system"]["first_seen"] == stamp(hub, -60)  # widened by the event


def test_event_problems(hub: Hub, ws: str, tmp_path: Path) -> None:
    with hub.tx() as conn:
        save_schema(
            conn,
            workspace_id=ws,
            actor="t",
            at=hub.clock.now(),
            document={
                "events": {"purchase": {"properties": {"revenue": {"type": "number"}}}},
                "unknown_events": "reject",
            },
        )
    rows = [
        ["e1", "track", "purchase", stamp(hub, 1), "u1", None, '{"revenue": 12.5}'],
        ["e2", "track", "purchase", stamp(hub, 2), "u1", None, '{"revenue": "lots"}'],
        ["e3", "track", "teleport", stamp(hub, 3), "u1", None, None],
        ["e4", "track", "purchase", stamp(hub, 4), None, None, None],
        ["e5", "track", "purchase", "soon", "u1", None, None],
        ["e6", "track", "purchase", stamp(hub, 60 * 24 * 3), "u1", None, None],
        ["e7", "alias", "purchase", stamp(hub, 7), "u1", None, None],
        ["e8", "track", None, stamp(hub, 8), "u1", None, None],
        ["e9", "track", "purchase", stamp(hub, 9), "u1", None, "[1, 2]"],
        ["e10", "track", "purchase", stamp(hub, 10), "u1", None, "{oops"],
        ["e1", "track", "purchase", stamp(hub, 11), "u1", None, None],  # repeats e1
    ]
    path = write_csv(tmp_path / "events.csv", EVENT_HEADER, rows)
    report = run_import(hub, workspace_id=ws, kind="events", path=path, actor="t")
    assert (report.rows_read, report.rows_accepted, report.rows_rejected, report.rows_skipped) == (
        11,
        1,
        9,
        1,
    )
    fields = {int(x["row"]): (x["field"], x["reason"]) for x in report_lines(report)}
    assert fields[2][0] == "properties.revenue" and "number" in fields[2][1]
    assert fields[3][0] == "event" and "teleport" in fields[3][1]
    assert fields[4][0] == "user_id/anonymous_id"
    assert fields[5][0] == "timestamp" and "ISO-8601" in fields[5][1]
    assert fields[6][0] == "timestamp" and "future" in fields[6][1]
    assert fields[7][0] == "type" and "API" in fields[7][1]
    assert fields[8][0] == "event" and "required" in fields[8][1]
    assert fields[9][0] == "properties" and "object" in fields[9][1]
    assert fields[10][0] == "properties" and "JSON" in fields[10][1]
    assert message_ids(hub, ws) == ["e1"]


def test_identify_traits_become_attributes(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "events.jsonl",
        [
            {
                "type": "identify",
                "timestamp": stamp(hub, 1),
                "user_id": "u1",
                "traits": {"plan": "pro", "email": "u1@example.com"},
            },
            {
                "type": "identify",
                "timestamp": stamp(hub, 2),
                "user_id": "u1",
                "traits": {"plan": "plus"},
            },
        ],
    )
    report = run_import(hub, workspace_id=ws, kind="events", path=path, actor="t")
    assert report.rows_accepted == 2
    with hub.tx() as conn:
        view = profiles.lookup(conn, ws, "user_id", "u1")
    assert view["attributes"] == {"plan": "plus", "email": "u1@example.com"}


def test_events_rerun_is_idempotent(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "events.csv", EVENT_HEADER, event_rows(hub))
    first = run_import(hub, workspace_id=ws, kind="events", path=path, actor="t")
    again = run_import(hub, workspace_id=ws, kind="events", path=path, actor="t")
    assert again.already_done and again.import_id == first.import_id
    assert (again.rows_accepted, again.profiles_created) == (5, 2)
    assert len(message_ids(hub, ws)) == 5
    assert count(hub, profiles_table, ws) == 2


def test_a_profiles_file_read_with_other_options_is_a_new_import(
    hub: Hub, ws: str, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "people.csv", ["user_id", "country"], [["p1", "DE"], ["p2", "FR"]])
    first = run_import(
        hub, workspace_id=ws, kind="profiles", path=path, actor="t", mapping={"country": "ignore"}
    )
    assert first.rows_accepted == 2
    with hub.tx() as conn:
        assert "country" not in profiles.lookup(conn, ws, "user_id", "p2")["attributes"]
    fixed = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert not fixed.already_done and fixed.import_id != first.import_id
    assert fixed.rows_accepted == 2
    with hub.tx() as conn:
        assert profiles.lookup(conn, ws, "user_id", "p2")["attributes"]["country"] == "FR"
    # each reading is itself idempotent
    again = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert again.already_done and again.import_id == fixed.import_id
    assert count(hub, profiles_table, ws) == 2


def test_an_events_file_read_again_with_other_options_is_refused(
    hub: Hub, ws: str, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "events.csv", EVENT_HEADER, event_rows(hub))
    run_import(hub, workspace_id=ws, kind="events", path=path, actor="t")
    with pytest.raises(Conflict, match=r"other options.*twice"):
        run_import(hub, workspace_id=ws, kind="events", path=path, actor="t", encoding="latin-1")
    assert len(message_ids(hub, ws)) == 5


@pytest.mark.parametrize("moved", [False, True], ids=["waiting", "in-the-log"])
def test_events_already_sent_over_the_api_are_not_imported_again(
    hub: Hub, ws: str, tmp_path: Path, moved: bool
) -> None:
    ingestor = Ingestor(hub)
    sent = ingestor.segment(
        ws,
        "track",
        {
            "messageId": "m2",
            "userId": "u1",
            "event": "product_view",
            "timestamp": stamp(hub, 2),
            "properties": {"sku": "A1"},
        },
    )
    assert sent.accepted == 1
    if moved:
        ingestor.flush()
    path = write_csv(tmp_path / "events.csv", EVENT_HEADER, event_rows(hub))
    report = run_import(hub, workspace_id=ws, kind="events", path=path, actor="t")
    assert (report.rows_accepted, report.rows_skipped) == (4, 1)
    ingestor.flush()
    assert message_ids(hub, ws) == ["m1", "m2", "m3", "m4", "m5"]


def test_overlapping_files_store_each_event_once(hub: Hub, ws: str, tmp_path: Path) -> None:
    rows = event_rows(hub)
    first = write_csv(tmp_path / "a.csv", EVENT_HEADER, rows[:3])
    second = write_csv(tmp_path / "b.csv", EVENT_HEADER, rows[1:])
    assert run_import(hub, workspace_id=ws, kind="events", path=first, actor="t").rows_accepted == 3
    again = run_import(hub, workspace_id=ws, kind="events", path=second, actor="t")
    assert (again.rows_accepted, again.rows_skipped) == (2, 2)
    assert message_ids(hub, ws) == ["m1", "m2", "m3", "m4", "m5"]


def test_a_crash_after_the_log_append_neither_loses_nor_duplicates(
    hub: Hub, ws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [
        [f"m{i:02d}", "track", "tap", stamp(hub, i), f"u{i % 3}", f"d{i % 4}", None]
        for i in range(40)
    ]
    path = write_csv(tmp_path / "events.csv", EVENT_HEADER, rows)
    real = files._record_progress
    calls = {"n": 0}

    def crash_once(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second chunk is in the log; its checkpoint is not
            raise RuntimeError("power cut")
        real(*args, **kwargs)

    monkeypatch.setattr(files, "_record_progress", crash_once)
    monkeypatch.setattr(files, "_CSV_BLOCK_BYTES", 256)
    with pytest.raises(RuntimeError, match="power cut"):
        run_import(hub, workspace_id=ws, kind="events", path=path, actor="t", chunk_rows=2)
    with hub.tx() as conn:
        row = conn.execute(select(imports)).mappings().one()
    assert row["status"] == "failed"
    in_log = len(message_ids(hub, ws))
    assert 0 < row["rows_committed"] < in_log  # appended, not checkpointed
    report = run_import(hub, workspace_id=ws, kind="events", path=path, actor="t", chunk_rows=2)
    assert (report.rows_read, report.rows_accepted) == (40, 40)
    assert message_ids(hub, ws) == [f"m{i:02d}" for i in range(40)]  # each exactly once
    with hub.tx() as conn:
        pids = {profiles.lookup(conn, ws, "user_id", f"u{i}")["id"] for i in range(3)}
    assert len(pids) == 3


# -- the demo generator's files -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_demo_files_load_unchanged(hub: Hub, ws: str, tmp_path: Path, fmt: str) -> None:
    summary = generate(tmp_path / "demo", profiles=12, end=hub.clock.now(), fmt=fmt)  # type: ignore[arg-type]
    people = run_import(
        hub, workspace_id=ws, kind="profiles", actor="t", path=tmp_path / "demo" / f"profiles.{fmt}"
    )
    events = run_import(
        hub, workspace_id=ws, kind="events", actor="t", path=tmp_path / "demo" / f"events.{fmt}"
    )
    assert (people.rows_accepted, people.rows_rejected) == (12, 0)
    assert (events.rows_accepted, events.rows_rejected) == (summary.events, 0)
    assert events.profiles_created == summary.anonymous_visitors
    assert count(hub, profiles_table, ws) == 12 + summary.anonymous_visitors
    assert len(message_ids(hub, ws)) == summary.events


def test_error_report_columns_and_custom_path(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", ["user_id", "plan"], [["u1", "pro"], [None, "free"]])
    target = tmp_path / "reports" / "bad.csv"
    report = run_import(
        hub, workspace_id=ws, kind="profiles", path=path, actor="t", error_report=target
    )
    assert report.error_report == str(target)
    assert target.read_text(encoding="utf-8").splitlines()[0] == "row,field,reason"
    assert report.to_json()["rows_rejected"] == 1
    with pytest.raises(InvalidInput, match="format"):
        run_import(
            hub, workspace_id=ws, kind="profiles", path=tmp_path / "in.csv", actor="t", fmt="xlsx"
        )


def test_json_lines_without_identity_or_time_reject_rows(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "events.jsonl",
        [
            {"event": "tap", "note": "nobody"},
            {"event": "tap", "user_id": "u1"},
            {"event": "tap", "user_id": "u1", "timestamp": stamp(hub, 1)},
        ],
    )
    report = run_import(hub, workspace_id=ws, kind="events", path=path, actor="t")
    assert (report.rows_accepted, report.rows_rejected) == (1, 2)
    lines = report_lines(report)
    assert {(int(x["row"]), x["field"]) for x in lines} >= {(1, "timestamp"), (2, "timestamp")}
    assert any("no identity" in x["reason"] for x in lines if x["row"] == "1")


def test_csv_with_bom_and_crlf_lines(hub: Hub, ws: str, tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfuser_id,plan\r\nu1,pro\r\n\r\nu2,free\r\n")
    report = run_import(hub, workspace_id=ws, kind="profiles", path=path, actor="t")
    assert (report.rows_accepted, report.rows_rejected) == (2, 0)
    with hub.tx() as conn:
        assert profiles.lookup(conn, ws, "user_id", "u2")["attributes"]["plan"] == "free"


def test_large_profile_files_are_converted_by_worker_processes(
    hub: Hub, ws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "_PARALLEL_ROWS", 1)
    rows = [
        [f"u{i}", f"p{i}@example.com", None, f"N{i}", str(i), "opted_in", stamp(hub, i)]
        for i in range(30)
    ]
    rows[7][1] = "not-an-email"
    rows[21][0] = None  # shares u20's e-mail (same chunk): goes through the profile writer
    rows[21][1] = rows[20][1]
    path = write_csv(tmp_path / "people.csv", PROFILE_HEADER, rows)
    report = run_import(
        hub, workspace_id=ws, kind="profiles", path=path, actor="t", chunk_rows=4, fmt="csv"
    )
    assert (report.rows_accepted, report.rows_rejected) == (29, 1)
    assert [int(x["row"]) for x in report_lines(report)] == [8]
    assert count(hub, profiles_table, ws) == 28
    with hub.tx() as conn:
        view = profiles.lookup(conn, ws, "user_id", "u20")
    assert view["attributes"]["first_name"] == "N21"  # the later record wins
    assert view["attributes"]["lifetime_value"] == 21  # typed again after the trip


def test_parquet_events_with_struct_properties_and_text_times(
    hub: Hub, ws: str, tmp_path: Path
) -> None:
    path = write_parquet(
        tmp_path / "events.parquet",
        {
            "event": pa.array(["product_view", "product_view", "cart_add"]),
            "timestamp": pa.array([stamp(hub, 1), "31/12/2025", stamp(hub, 3)]),
            "anonymous_id": pa.array(["d1", "d1", "d1"]),
            "properties": pa.array(
                [
                    {"sku": "A1", "price": 5.0},
                    {"sku": "A2", "price": 6.0},
                    {"sku": "A3", "price": 7.5},
                ],
                pa.struct([("sku", pa.string()), ("price", pa.float64())]),
            ),
            "session": pa.array([7, 7, 8], pa.int64()),  # any other column is a property
        },
    )
    report = run_import(hub, workspace_id=ws, kind="events", path=path, actor="t")
    assert (report.rows_accepted, report.rows_rejected) == (2, 1)
    assert [(int(x["row"]), x["field"]) for x in report_lines(report)] == [(2, "timestamp")]
    with hub.tx() as conn:
        pid = profiles.lookup(conn, ws, "anonymous_id", "d1")["id"]
        events = profiles.timeline(conn, hub.events, ws, pid)
    assert [e["properties"] for e in events] == [
        {"sku": "A3", "price": 7.5, "session": 8},
        {"sku": "A1", "price": 5.0, "session": 7},
    ]


def test_a_staging_statement_that_runs_out_of_memory_runs_again_on_one_thread(
    tmp_path: Path,
) -> None:
    import duckdb

    from waymark.ingestion.files import _Stage

    stage = _Stage(tmp_path)
    real = stage.db
    seen: list[str] = []

    class OnceShort:
        """DuckDB as it behaves under memory pressure: the first big statement fails."""

        failed = False

        def execute(self, query: str, params: object = None) -> object:
            seen.append(query)
            if query.startswith("CREATE") and not self.failed:
                self.failed = True
                raise duckdb.OutOfMemoryException("failed to pin block (test)")
            return real.execute(query, params or [])

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    stage.db = OnceShort()  # type: ignore[assignment]
    try:
        stage.execute("CREATE OR REPLACE TABLE t AS SELECT range AS n FROM range(10)")
        assert stage.one("SELECT count(*) FROM t") == 10
        assert "SET threads = 1" in seen
        assert seen[-2].startswith("SET threads = ")  # restored after the retry
        assert real.execute("SELECT current_setting('threads')").fetchall()[0][0] >= 1
    finally:
        stage.db = real
        stage.close()
