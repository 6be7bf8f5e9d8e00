"""The audience endpoints over HTTP, on both backends."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq

from tests.api.conftest import Api
from waymark.workers import flush_once

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "src/waymark/demo/schema.json").read_text(encoding="utf-8")
)


def _seed(api: Api) -> None:
    r = api.client.put("/v1/schema", json=SCHEMA, headers=api.bearer())
    assert r.status_code == 200, r.text
    now = api.hub.clock.now().isoformat()
    batch = [
        {
            "type": "identify",
            "userId": "ann",
            "timestamp": now,
            "traits": {"country": "DE", "email": "ann@example.com"},
        },
        {
            "type": "identify",
            "userId": "bob",
            "timestamp": now,
            "traits": {"country": "FR", "email": "bob@example.com"},
        },
        {
            "type": "track",
            "userId": "ann",
            "event": "purchase",
            "timestamp": now,
            "properties": {"order_id": "o1", "revenue": 20.0},
        },
    ]
    r = api.client.post("/v1/batch", json={"batch": batch}, headers=api.basic())
    assert r.status_code == 200, r.text
    flush_once(api.hub)


def test_author_run_and_export(api: Api) -> None:
    _seed(api)
    h = api.bearer()
    r = api.client.post("/v1/audiences/validate", json={"definition": 'country = "DE"'}, headers=h)
    assert r.status_code == 200 and r.json()["valid"] and "duckdb" in r.json()["sql"]

    r = api.client.post("/v1/audiences/validate", json={"definition": 'contry = "DE"'}, headers=h)
    assert r.status_code == 400
    assert "line 1, column 1" in r.text and "country" in r.text  # position and a hint

    r = api.client.post(
        "/v1/audiences",
        json={
            "name": "german buyers",
            "definition": 'country = "DE" and purchase within last 7 days',
        },
        headers=h,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["version"] == 1 and body["mode"] == "streaming"
    assert body["definition"]["kind"] == "and"

    # the JSON form round-trips through the API
    r = api.client.post(
        "/v1/audiences", json={"name": "copy", "definition": body["definition"]}, headers=h
    )
    assert r.status_code == 201 and r.json()["text"] == body["text"]

    assert (
        api.client.get("/v1/audiences/german buyers/estimate?percent=100", headers=h).json()[
            "estimate"
        ]
        == 1
    )
    assert api.client.get("/v1/audiences/german buyers/count", headers=h).json()["count"] == 1
    preview = api.client.get("/v1/audiences/german buyers/preview", headers=h).json()
    assert preview["members"][0]["attributes"]["email"] == "ann@example.com"
    over = api.client.get("/v1/audiences/german buyers/overlap/copy", headers=h).json()
    assert over["both"] == 1

    run = api.client.post("/v1/audiences/german buyers/runs", headers=h)
    # a streaming audience: the move before the run built it already, the run agrees
    assert run.status_code == 200, run.text
    assert (run.json()["members"], run.json()["realized"], run.json()["exited"]) == (1, 0, 0)
    members = api.client.get("/v1/audiences/german buyers/members", headers=h).json()["members"]
    assert len(members) == 1 and members[0]["status"] == "realized"
    csv_text = api.client.get("/v1/audiences/german buyers/members?format=csv", headers=h).text
    assert csv_text.splitlines()[0] == "profile_id,status,realized_at,exited_at"
    parquet = api.client.get(
        "/v1/audiences/german buyers/members?format=parquet", headers=h
    ).content
    assert pq.read_table(io.BytesIO(parquet)).num_rows == 1

    mine = api.client.get("/v1/profiles/user_id/ann/audiences", headers=h).json()
    # "copy" is streaming too: built by the same move
    assert [m["audience"] for m in mine["audiences"]] == ["copy", "german buyers"]

    explain = api.client.get(
        "/v1/audiences/german buyers/explain?dialect=bigquery", headers=h
    ).json()
    assert list(explain["sql"]) == ["bigquery"]
    assert api.client.delete("/v1/audiences/copy", headers=h).status_code == 204
    assert api.client.get("/v1/audiences/copy", headers=h).status_code == 404
    names = [a["name"] for a in api.client.get("/v1/audiences", headers=h).json()["audiences"]]
    assert names == ["german buyers"]


def test_bad_requests_get_clear_answers(api: Api) -> None:
    _seed(api)
    h = api.bearer()
    cases = [
        ({"name": "x"}, "definition"),
        ({"name": "x", "definition": 42}, "text form"),
        ({"name": "x", "definition": "count(purchase) >= "}, "line 1"),
        ({"name": "x", "definition": 'lifetime_value > "a lot"'}, "lifetime_value"),
        ({"name": "x", "definition": "purchase between 7 days ago and 30 days ago"}, "window"),
        ({"name": "", "definition": 'country = "DE"'}, "name"),
        ({"name": "x", "definition": 'country = "DE"', "schedule": "often"}, "cron"),
        ({"name": "x", "definition": 'country = "DE"', "colour": "red"}, "colour"),
        ({"name": "x", "definition": 'country = "DE"', "description": 5}, "description"),
        ({"name": "x", "definition": 'country = "DE"', "schedule": 5}, "schedule"),
        ({"name": "x", "definition": 'country = "DE"', "schedule": "0 0 6 * * *"}, "five"),
        ({"name": "a/b", "definition": 'country = "DE"'}, "name"),
        ({"name": 'say "hi"', "definition": 'country = "DE"'}, "name"),
        ({"name": 7, "definition": 'country = "DE"'}, "name"),
        ({"name": "x", "definition": "not " * 40 + 'country = "DE"'}, "nest"),
    ]
    for body, needle in cases:
        r = api.client.post("/v1/audiences", json=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        assert needle in r.text, (needle, r.text)
    # the write key may ingest but not author audiences
    r = api.client.post(
        "/v1/audiences", json={"name": "x", "definition": 'country = "DE"'}, headers=api.basic()
    )
    assert r.status_code in (401, 403)
    assert api.client.get("/v1/audiences/nope", headers=h).status_code == 404
    assert api.client.post("/v1/audiences/nope/runs", headers=h).status_code == 404


def test_any_name_exports_and_instants_are_bounded(api: Api) -> None:
    _seed(api)
    h = api.bearer()
    r = api.client.post(
        "/v1/audiences", json={"name": "Käufer 日本", "definition": 'country = "DE"'}, headers=h
    )
    assert r.status_code == 201, r.text
    assert api.client.post("/v1/audiences/Käufer 日本/runs", headers=h).status_code == 200
    for fmt in ("csv", "parquet"):
        r = api.client.get(f"/v1/audiences/Käufer 日本/members?format={fmt}", headers=h)
        assert (
            r.status_code == 200
            and "filename*=UTF-8''K%C3%A4ufer" in r.headers["content-disposition"]
        )
    for when in ("9999-12-31T00:00:00Z", "0001-01-02", "yesterday"):
        r = api.client.get(f"/v1/audiences/Käufer 日本/count?as_of={when}", headers=h)
        assert r.status_code == 400 and "as_of" in r.text, r.text
    r = api.client.post("/v1/audiences/Käufer 日本/runs?as_of=2999-01-01T00:00:00Z", headers=h)
    assert r.status_code == 400 and "future" in r.text


def test_a_schema_change_decides_modes_again(api: Api) -> None:
    _seed(api)
    h = api.bearer()
    saved = api.client.post(
        "/v1/audiences", json={"name": "german", "definition": 'country = "DE"'}, headers=h
    )
    assert saved.json()["mode"] == "streaming"
    flush_once(api.hub)
    built = api.client.get("/v1/audiences/german", headers=h).json()
    assert (built["stream"], built["stream_progress"]) == ("ready", {"state": "ready"})
    smaller = {
        **SCHEMA,
        "attributes": {k: v for k, v in SCHEMA["attributes"].items() if k != "country"},
    }
    assert api.client.put("/v1/schema", json=smaller, headers=h).status_code == 200
    # the definition no longer checks: not streamed (a run would say why)
    assert api.client.get("/v1/audiences/german", headers=h).json()["mode"] == "batch"
    assert api.client.put("/v1/schema", json=SCHEMA, headers=h).status_code == 200
    again = api.client.get("/v1/audiences/german", headers=h).json()
    assert (again["mode"], again["stream"]) == ("streaming", "pending")  # built again
    flush_once(api.hub)
    mine = api.client.get("/v1/profiles/user_id/ann/audiences", headers=h).json()
    assert [m["audience"] for m in mine["audiences"] if m["status"] == "realized"] == ["german"]
