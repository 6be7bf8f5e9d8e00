"""The HTTP ingestion endpoints: Segment spec, native batches, limits and bad input."""

from __future__ import annotations

import gzip

import orjson

from tests.api.conftest import Api
from waymark.workers import flush_once


def test_segment_batch_with_basic_auth_is_stored(api: Api) -> None:
    body = {
        "batch": [
            {"type": "identify", "userId": "u1", "traits": {"email": "a@b.io"}, "messageId": "1"},
            {
                "type": "track",
                "userId": "u1",
                "event": "purchase",
                "messageId": "2",
                "properties": {"revenue": 9.5},
            },
            {"type": "page", "anonymousId": "d1", "name": "Home", "messageId": "3"},
        ],
        "sentAt": "2026-03-01T12:00:00Z",
    }
    r = api.client.post("/v1/batch", json=body, headers=api.basic())
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 3 and r.json()["success"] is True
    again = api.client.post("/v1/batch", json=body, headers=api.basic())
    assert again.json()["duplicates"] == 3 and again.json()["accepted"] == 0
    flush_once(api.hub)
    assert api.hub.events.count(api.workspace_id) == 3


def test_write_key_in_body_and_gzip(api: Api) -> None:
    raw = gzip.compress(orjson.dumps({"userId": "u1", "event": "x", "writeKey": api.write_key}))
    r = api.client.post(
        "/v1/track",
        content=raw,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text


def test_wrong_or_missing_key(api: Api) -> None:
    r = api.client.post("/v1/track", json={"userId": "u1", "event": "x"})
    assert r.status_code == 401 and "no key" in r.json()["error"]["message"]
    r = api.client.post(
        "/v1/track", json={"userId": "u1", "event": "x"}, headers=api.basic("wmw_not-a-real-key")
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    r = api.client.post(
        "/v1/track", json={"userId": "u1", "event": "x"}, headers={"Authorization": "Basic !!!"}
    )
    assert r.status_code == 401


def test_write_key_cannot_read_profiles(api: Api) -> None:
    r = api.client.get("/v1/profiles/user_id/u1", headers=api.basic())
    assert r.status_code == 403 and "read" in r.json()["error"]["message"]


def test_malformed_json_and_non_utf8(api: Api) -> None:
    r = api.client.post("/v1/batch", content=b'{"batch": [', headers=api.basic())
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = api.client.post(
        "/v1/track", content=b'{"userId": "\xff\xfe", "event": "x"}', headers=api.basic()
    )
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = api.client.post("/v1/track", content=b"", headers=api.basic())
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_odd_unicode_is_kept(api: Api) -> None:
    nul = api.client.post(
        "/v1/track",
        json={"userId": "u1", "event": "view", "properties": {"t": ["ok", "a\u0000b"]}},
        headers=api.basic(),
    )
    assert nul.status_code == 400 and nul.json()["error"]["errors"][0]["path"] == "properties.t[1]"
    name = "caf\u00e9 \U0001f600 \u202e\u200dx \ufeff"
    r = api.client.post(
        "/v1/track",
        json={"userId": "\u00fc\u00f1\u00ee", "event": "view", "properties": {"title": name}},
        headers=api.basic(),
    )
    assert r.status_code == 200, r.text
    flush_once(api.hub)
    r = api.client.get("/v1/profiles/user_id/\u00fc\u00f1\u00ee/events", headers=api.bearer())
    assert r.json()["events"][0]["properties"]["title"] == name


def test_limits(api: Api) -> None:
    big = {"userId": "u1", "event": "x", "properties": {"blob": "a" * 40_000}}
    r = api.client.post("/v1/track", json=big, headers=api.basic())
    assert r.status_code in (400, 413)
    batch = {
        "batch": [
            {
                "type": "track",
                "userId": "u1",
                "event": "x",
                "messageId": str(i),
                "properties": {"blob": "b" * 20_000},
            }
            for i in range(30)
        ]
    }
    r = api.client.post("/v1/batch", json=batch, headers=api.basic())
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    mixed = {
        "batch": [
            {"type": "track", "userId": "u1", "event": "ok", "messageId": "ok"},
            {
                "type": "track",
                "userId": "u1",
                "event": "big",
                "messageId": "big",
                "properties": {"blob": "c" * 33_000},
            },
        ]
    }
    r = api.client.post("/v1/batch", json=mixed, headers=api.basic())
    assert r.status_code == 200
    assert r.json()["accepted"] == 1
    assert r.json()["rejected"][0]["index"] == 1
    assert r.json()["rejected"][0]["errors"][0]["code"] == "too_large"


def test_single_bad_call_answers_400_with_path(api: Api) -> None:
    r = api.client.post("/v1/track", json={"userId": "u1", "event": 42}, headers=api.basic())
    assert r.status_code == 400
    [err] = r.json()["error"]["errors"]
    assert err["path"] == "event"


def test_timestamps_far_in_future_or_past(api: Api) -> None:
    r = api.client.post(
        "/v1/track",
        json={"userId": "u1", "event": "x", "timestamp": "2199-01-01T00:00:00Z"},
        headers=api.basic(),
    )
    assert r.status_code == 400 and "future" in r.text
    r = api.client.post(
        "/v1/track",
        json={"userId": "u1", "event": "x", "timestamp": "1901-01-01T00:00:00Z"},
        headers=api.basic(),
    )
    assert r.status_code == 400 and "past" in r.text


def test_native_events_and_profiles(api: Api) -> None:
    r = api.client.post(
        "/v1/events",
        headers=api.basic(),
        json={
            "events": [
                {
                    "event": "purchase",
                    "identities": {"user_id": "u5", "loyalty_id": "L-1"},
                    "properties": {"revenue": 10},
                },
                {"event": "purchase", "identities": {}},
            ]
        },
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert r.json()["rejected"][0]["errors"][0]["path"] == "events[1].identities"
    body = {
        "profiles": [
            {
                "identities": {"loyalty_id": "L-1"},
                "attributes": {"tier": "gold"},
                "consents": [{"channel": "sms", "purpose": "marketing", "status": "opted_out"}],
            }
        ]
    }
    # the public write key may send attributes but never consent
    r = api.client.post("/v1/profiles", headers=api.basic(), json=body)
    assert r.status_code == 403 and "write" in r.json()["error"]["message"]
    r = api.client.post("/v1/profiles", headers=api.bearer(), json=body)
    assert r.status_code == 200, r.text
    view = api.client.get("/v1/profiles/user_id/u5", headers=api.bearer()).json()
    assert view["attributes"]["tier"] == "gold"
    assert view["consents"][0]["status"] == "opted_out"


def test_unknown_fields_and_events_under_each_policy(api: Api) -> None:
    declared = {
        "attributes": {"plan": {"type": "string"}},
        "events": {"purchase": {"properties": {"revenue": {"type": "number"}}}},
    }
    strict = {
        **declared,
        "unknown_attributes": "reject",
        "unknown_events": "reject",
        "unknown_properties": "reject",
    }
    assert api.client.put("/v1/schema", json=strict, headers=api.bearer()).status_code == 200
    r = api.client.post(
        "/v1/batch",
        headers=api.basic(),
        json={
            "batch": [
                {"type": "identify", "userId": "u1", "messageId": "a", "traits": {"shoe_size": 42}},
                {"type": "track", "userId": "u1", "messageId": "b", "event": "refund"},
                {
                    "type": "track",
                    "userId": "u1",
                    "messageId": "c",
                    "event": "purchase",
                    "properties": {"revenue": 5, "coupon": "X"},
                },
                {
                    "type": "track",
                    "userId": "u1",
                    "messageId": "d",
                    "event": "purchase",
                    "properties": {"revenue": 5},
                },
            ]
        },
    )
    body = r.json()
    assert body["accepted"] == 1
    errors = {e["index"]: e["errors"][0] for e in body["rejected"]}
    assert errors[0]["path"] == "traits.shoe_size"
    assert "refund" in errors[1]["reason"]
    assert errors[2]["path"] == "properties.coupon"

    lenient = {
        **declared,
        "unknown_attributes": "accept",
        "unknown_events": "accept",
        "unknown_properties": "accept",
    }
    assert api.client.put("/v1/schema", json=lenient, headers=api.bearer()).status_code == 200
    r = api.client.post(
        "/v1/batch",
        headers=api.basic(),
        json={
            "batch": [
                {"type": "identify", "userId": "u1", "messageId": "a", "traits": {"shoe_size": 42}},
                {"type": "track", "userId": "u1", "messageId": "b", "event": "refund"},
                {
                    "type": "track",
                    "userId": "u1",
                    "messageId": "c",
                    "event": "purchase",
                    "properties": {"revenue": 5, "coupon": "X"},
                },
            ]
        },
    )
    assert r.json()["accepted"] == 3
    flush_once(api.hub)
    events = api.client.get("/v1/profiles/user_id/u1/events", headers=api.bearer()).json()
    flags = {e["message_id"]: e["flags"] for e in events["events"]}
    assert "unknown_attribute:shoe_size" in flags["a"]
    assert "unknown_event:refund" in flags["b"]
    assert "unknown_property:coupon" in flags["c"]
    view = api.client.get("/v1/profiles/user_id/u1", headers=api.bearer()).json()
    assert view["attributes"]["shoe_size"] == 42
