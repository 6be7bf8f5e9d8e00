"""Tests of HTTP payload parsing: the Segment tracking spec and the native format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from waymark.core.errors import InvalidInput, Issue
from waymark.ingestion.payloads import (
    ItemError,
    Limits,
    Parsed,
    native_event_to_event,
    native_profile_to_record,
    parse_native_events,
    parse_native_profiles,
    parse_segment_call,
    parse_timestamp,
    segment_item_to_event,
)
from waymark.model.events import ConsentStatus, Event, EventType, Identity, ProfileRecord

WS = "ws_1"
RECEIVED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def segment(call_type: str, body: Any, **kwargs: Any) -> Parsed[Event]:
    return parse_segment_call(call_type, body, workspace_id=WS, received_at=RECEIVED, **kwargs)


def accept(call_type: str, body: Any, **kwargs: Any) -> Event:
    parsed = segment(call_type, body, **kwargs)
    assert parsed.errors == [], parsed.errors
    [(index, event)] = parsed.items
    assert index == 0
    return event


def reject(call_type: str, body: Any, **kwargs: Any) -> tuple[Issue, ...]:
    parsed = segment(call_type, body, **kwargs)
    assert parsed.items == []
    [error] = parsed.errors
    assert error.index == 0
    return error.issues


def paths(issues: tuple[Issue, ...]) -> set[str]:
    return {issue.path for issue in issues}


def native(item: Any, **kwargs: Any) -> Event:
    return native_event_to_event(item, workspace_id=WS, received_at=RECEIVED, **kwargs)


def native_issues(item: Any, **kwargs: Any) -> tuple[Issue, ...]:
    with pytest.raises(InvalidInput) as caught:
        native(item, **kwargs)
    return tuple(caught.value.issues)


def profile(item: Any, **kwargs: Any) -> ProfileRecord:
    return native_profile_to_record(item, received_at=RECEIVED, **kwargs)


def profile_issues(item: Any) -> tuple[Issue, ...]:
    with pytest.raises(InvalidInput) as caught:
        profile(item)
    return tuple(caught.value.issues)


# --------------------------------------------------------------------------------------------
# Segment: each call type


def test_track() -> None:
    event = accept(
        "track",
        {
            "userId": "u1",
            "anonymousId": "a1",
            "event": "Order Completed",
            "messageId": "m-1",
            "timestamp": "2026-03-01T11:30:00Z",
            "properties": {"total": 12.5},
            "context": {"ip": "203.0.113.9", "library": {"name": "analytics-python"}},
            "integrations": {"All": False},
        },
    )
    assert event.type is EventType.TRACK
    assert event.name == "Order Completed"
    assert event.message_id == "m-1"
    assert event.identities == (Identity("user_id", "u1"), Identity("anonymous_id", "a1"))
    assert event.properties == {"total": 12.5}
    assert event.context == {"ip": "203.0.113.9", "library": {"name": "analytics-python"}}
    assert event.timestamp == datetime(2026, 3, 1, 11, 30, tzinfo=UTC)
    assert event.received_at == RECEIVED
    assert event.source == "segment"
    assert event.flags == ()
    assert event.traits == {}


def test_track_event_is_required_and_non_empty() -> None:
    issues = reject("track", {"userId": "u1"})
    assert [(i.path, i.code) for i in issues] == [("event", "required")]
    issues = reject("track", {"userId": "u1", "event": "   "})
    assert [(i.path, i.reason) for i in issues] == [("event", "must not be empty")]


def test_identify_traits_and_identities() -> None:
    event = accept(
        "identify",
        {
            "userId": "u1",
            "traits": {"email": " Ada@Example.COM ", "phone": "+44 20 7946 0958", "plan": "pro"},
            "context": {"traits": {"plan": "free", "locale": "en"}, "ip": "1.2.3.4"},
        },
    )
    assert event.type is EventType.IDENTIFY
    assert event.name == "identify"
    assert event.identities == (
        Identity("user_id", "u1"),
        Identity("email", "ada@example.com"),
        Identity("phone", "+442079460958"),
    )
    # identify traits win over context.traits; context keeps everything else.
    assert event.traits == {
        "plan": "pro",
        "locale": "en",
        "email": " Ada@Example.COM ",
        "phone": "+44 20 7946 0958",
    }
    assert event.context == {"ip": "1.2.3.4"}


def test_context_traits_feed_identities_on_any_call() -> None:
    event = accept(
        "track",
        {"anonymousId": "a1", "event": "x", "context": {"traits": {"email": "B@x.io"}}},
    )
    assert Identity("email", "b@x.io") in event.identities
    assert event.traits == {"email": "B@x.io"}
    assert "traits" not in event.context


def test_duplicate_identities_collapse() -> None:
    event = accept(
        "identify",
        {
            "userId": "u1",
            "traits": {"email": "a@x.io"},
            "context": {"traits": {"email": "A@X.IO"}},
        },
    )
    assert event.identities == (Identity("user_id", "u1"), Identity("email", "a@x.io"))


def test_blank_trait_email_is_ignored_but_blank_user_id_is_not() -> None:
    event = accept("identify", {"userId": "u1", "traits": {"email": "", "phone": None}})
    assert event.identities == (Identity("user_id", "u1"),)
    issues = reject("track", {"userId": " ", "anonymousId": "a1", "event": "x"})
    assert paths(issues) == {"userId"}


def test_page_name_and_category_go_to_properties() -> None:
    event = accept(
        "page",
        {
            "anonymousId": "a1",
            "name": "Pricing",
            "category": "Docs",
            "properties": {"url": "https://example.com/pricing"},
        },
    )
    assert event.type is EventType.PAGE
    assert event.name == "Pricing"
    assert event.properties == {
        "url": "https://example.com/pricing",
        "name": "Pricing",
        "category": "Docs",
    }


def test_page_keeps_existing_properties_and_allows_no_name() -> None:
    event = accept(
        "page",
        {"anonymousId": "a1", "name": "Home", "properties": {"name": "kept"}},
    )
    assert event.properties == {"name": "kept"}
    bare = accept("page", {"anonymousId": "a1", "name": None, "properties": {"path": "/"}})
    assert bare.name == ""
    assert bare.properties == {"path": "/"}


def test_screen() -> None:
    event = accept("screen", {"userId": "u1", "name": "Home", "category": "Main"})
    assert event.type is EventType.SCREEN
    assert event.name == "Home"
    assert event.properties == {"name": "Home", "category": "Main"}


def test_alias() -> None:
    event = accept("alias", {"userId": "u2", "previousId": "a1"})
    assert event.type is EventType.ALIAS
    assert event.name == "alias"
    assert event.previous_id == "a1"
    assert event.identities == (Identity("user_id", "u2"),)


def test_alias_needs_user_id_and_previous_id() -> None:
    issues = reject("alias", {"anonymousId": "a1"})
    assert paths(issues) == {"userId", "previousId"}
    assert all("alias needs both userId and previousId" in i.reason for i in issues)
    assert all(i.code == "required" for i in issues)
    issues = reject("alias", {"userId": "u1"})
    assert paths(issues) == {"previousId"}
    issues = reject("alias", {"userId": "u1", "previousId": {"x": 1}})
    assert [(i.path, i.code) for i in issues] == [("previousId", "type")]


def test_group() -> None:
    event = accept(
        "group",
        {
            "userId": "u1",
            "groupId": 9001,
            "traits": {"name": "Acme", "email": "billing@acme.example"},
            "context": {"traits": {"role": "admin"}},
        },
    )
    assert event.type is EventType.GROUP
    assert event.name == "group"
    assert event.group_id == "9001"
    assert event.properties == {"group_traits": {"name": "Acme", "email": "billing@acme.example"}}
    # Group traits describe the group: no person identity or trait comes from them.
    assert event.identities == (Identity("user_id", "u1"),)
    assert event.traits == {"role": "admin"}


def test_group_needs_group_id() -> None:
    issues = reject("group", {"userId": "u1"})
    assert [(i.path, i.code) for i in issues] == [("groupId", "required")]


def test_user_id_or_anonymous_id_required() -> None:
    issues = reject("track", {"event": "x", "userId": None})
    [issue] = issues
    assert issue.path == "userId"
    assert issue.code == "required"
    assert "userId or anonymousId" in issue.reason


def test_numeric_user_id_becomes_a_string() -> None:
    event = accept("track", {"userId": 42, "anonymousId": 7.0, "event": "x"})
    assert event.identities == (Identity("user_id", "42"), Identity("anonymous_id", "7"))


def test_external_ids() -> None:
    event = accept(
        "track",
        {
            "userId": "u1",
            "event": "x",
            "context": {
                "externalIds": [
                    {"id": "L-77", "type": "Loyalty_ID", "collection": "users"},
                    {"id": "C@X.io", "type": "email", "encoding": "none"},
                ],
                "app": {"name": "shop"},
            },
        },
    )
    assert event.identities == (
        Identity("user_id", "u1"),
        Identity("loyalty_id", "L-77"),
        Identity("email", "c@x.io"),
    )
    assert event.context == {"app": {"name": "shop"}}


@pytest.mark.parametrize(
    ("external_ids", "path"),
    [
        ("nope", "context.externalIds"),
        ([5], "context.externalIds[0]"),
        ([{"id": "1", "type": "9lives"}], "context.externalIds[0].type"),
        ([{"id": "1", "type": "has space"}], "context.externalIds[0].type"),
        ([{"id": "1", "type": "x" * 65}], "context.externalIds[0].type"),
        ([{"id": "1"}], "context.externalIds[0].type"),
        ([{"type": "crm"}], "context.externalIds[0].id"),
        ([{"id": "", "type": "crm"}], "context.externalIds[0].id"),
    ],
)
def test_external_ids_errors(external_ids: object, path: str) -> None:
    body = {"userId": "u1", "event": "x", "context": {"externalIds": external_ids}}
    assert paths(reject("track", body)) == {path}


def test_null_means_absent() -> None:
    event = accept(
        "track",
        {
            "userId": None,
            "anonymousId": "a1",
            "event": "x",
            "properties": None,
            "context": None,
            "timestamp": None,
            "messageId": None,
        },
    )
    assert event.properties == {}
    assert event.context == {}
    assert event.timestamp == RECEIVED


def test_unknown_fields_are_flagged_known_extras_are_not() -> None:
    event = accept(
        "track",
        {
            "userId": "u1",
            "event": "x",
            "version": 2,
            "channel": "server",
            "_metadata": {},
            "wat": 1,
        },
    )
    assert event.flags == ("unknown_field:wat",)
    # "traits" is not part of a track call: accepted but flagged and not used.
    event = accept("track", {"userId": "u1", "event": "x", "traits": {"email": "a@b.c"}})
    assert event.flags == ("unknown_field:traits",)
    assert event.identities == (Identity("user_id", "u1"),)


def test_type_field_must_match_the_endpoint() -> None:
    assert accept("track", {"type": "track", "userId": "u", "event": "x"}).name == "x"
    issues = reject("track", {"type": "identify", "userId": "u", "event": "x"})
    assert paths(issues) == {"type"}


def test_segment_item_to_event_per_item() -> None:
    event = segment_item_to_event(
        {"type": "track", "userId": "u", "event": "x", "timestamp": "2026-03-01T09:00:00Z"},
        workspace_id=WS,
        received_at=RECEIVED,
        source="replay",
        batch_context={"app": {"name": "shop"}},
        batch_sent_at=datetime(2026, 3, 1, 9, 0, 10, tzinfo=UTC),
    )
    assert event.source == "replay"
    assert event.context == {"app": {"name": "shop"}}
    assert event.timestamp == RECEIVED - timedelta(seconds=10)
    with pytest.raises(InvalidInput) as caught:
        segment_item_to_event(
            {"type": "track", "event": "x"}, workspace_id=WS, received_at=RECEIVED, path="row 7"
        )
    assert [i.path for i in caught.value.issues] == ["row 7.userId"]
    with pytest.raises(InvalidInput) as caught:
        segment_item_to_event(
            {"type": "track", "userId": "u", "event": "x"},
            workspace_id=WS,
            received_at=RECEIVED,
            path="row 8",
            batch_context={"n": 2**70},
        )
    assert [i.path for i in caught.value.issues] == ["row 8.context"]


def test_unknown_call_type_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="unknown Segment call type"):
        segment("bogus", {"userId": "u"})


# --------------------------------------------------------------------------------------------
# Segment: batches


def test_batch_mixed_good_and_bad_items() -> None:
    parsed = segment(
        "batch",
        {
            "batch": [
                {"type": "track", "userId": "u1", "event": "ok"},
                "not an object",
                {"type": "track", "userId": "u1", "event": "bad", "properties": [1]},
                {"type": "identify", "anonymousId": "a1", "traits": {"email": "x@y.z"}},
                {"userId": "u1", "event": "no type"},
                {"type": "batch", "userId": "u1"},
                {"type": "page", "event": "x"},
            ]
        },
    )
    assert [index for index, _ in parsed.items] == [0, 3]
    assert [event.name for _, event in parsed.items] == ["ok", "identify"]
    errors = {e.index: e.issues for e in parsed.errors}
    assert sorted(errors) == [1, 2, 4, 5, 6]
    assert paths(errors[1]) == {"batch[1]"}
    assert errors[1][0].code == "type"
    assert [(i.path, i.code) for i in errors[2]] == [("batch[2].properties", "type")]
    assert "must be an object, got array" in errors[2][0].reason
    assert [(i.path, i.code) for i in errors[4]] == [("batch[4].type", "required")]
    assert paths(errors[5]) == {"batch[5].type"}
    assert paths(errors[6]) == {"batch[6].userId"}
    assert parsed.items[1][1].identities == (
        Identity("anonymous_id", "a1"),
        Identity("email", "x@y.z"),
    )


def test_batch_context_is_merged_under_item_context() -> None:
    parsed = segment(
        "batch",
        {
            "batch": [
                {
                    "type": "track",
                    "userId": "u1",
                    "event": "x",
                    "context": {"app": {"version": "2"}, "ip": "9.9.9.9"},
                },
                {"type": "track", "userId": "u2", "event": "y"},
            ],
            "context": {"app": {"name": "shop", "version": "1"}, "ip": "1.1.1.1", "os": "ios"},
        },
    )
    first, second = (event for _, event in parsed.items)
    assert first.context == {"app": {"name": "shop", "version": "2"}, "ip": "9.9.9.9", "os": "ios"}
    assert second.context == {"app": {"name": "shop", "version": "1"}, "ip": "1.1.1.1", "os": "ios"}
    assert first.context is not second.context


def test_batch_item_errors_from_batch_context_traits_are_reported() -> None:
    parsed = segment(
        "batch",
        {
            "batch": [{"type": "track", "userId": "u1", "event": "x"}],
            "context": {"traits": {"email": ["x@y.z"]}},
        },
    )
    [error] = parsed.errors
    assert paths(error.issues) == {"batch[0].context.traits.email"}


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ([], ""),
        ("text", ""),
        (None, ""),
        ({}, "batch"),
        ({"batch": {}}, "batch"),
        ({"batch": []}, "batch"),
        ({"batch": [{}], "context": []}, "context"),
        ({"batch": [{}], "sentAt": "soon"}, "sentAt"),
        ({"batch": [{}], "context": {"n": 2**70}}, "context"),
    ],
)
def test_unusable_batch_body_is_rejected_whole(body: object, path: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        segment("batch", body)
    assert [i.path for i in caught.value.issues] == [path]


@pytest.mark.parametrize("body", [[{"userId": "u"}], "x", 3, None])
def test_non_object_single_call_body_is_rejected_whole(body: object) -> None:
    with pytest.raises(InvalidInput, match="must be a JSON object"):
        segment("track", body)


# --------------------------------------------------------------------------------------------
# Time


def test_clock_skew_correction_with_original_timestamp() -> None:
    # The client's clock is 5 minutes fast: it says it sent at 12:05 what happened at 12:04.
    event = accept(
        "track",
        {
            "userId": "u1",
            "event": "x",
            "originalTimestamp": "2026-03-01T12:04:00Z",
            "timestamp": "2020-01-01T00:00:00Z",
            "sentAt": "2026-03-01T12:05:00Z",
        },
    )
    assert event.timestamp == datetime(2026, 3, 1, 11, 59, tzinfo=UTC)


def test_clock_skew_correction_with_timestamp_and_offsets() -> None:
    event = accept(
        "track",
        {
            "userId": "u1",
            "event": "x",
            "timestamp": "2026-03-01T08:00:00.250-05:00",  # 13:00:00.250Z
            "sentAt": "2026-03-01T13:00:10Z",
        },
    )
    assert event.timestamp == datetime(2026, 3, 1, 11, 59, 50, 250000, tzinfo=UTC)


def test_batch_sent_at_applies_unless_the_item_has_its_own() -> None:
    parsed = segment(
        "batch",
        {
            "sentAt": "2026-03-01T10:00:30Z",  # the client clock is 2 hours slow
            "batch": [
                {"type": "track", "userId": "u", "event": "a", "timestamp": "2026-03-01T10:00:00Z"},
                {
                    "type": "track",
                    "userId": "u",
                    "event": "b",
                    "timestamp": "2026-03-01T10:00:00Z",
                    "sentAt": "2026-03-01T10:00:20Z",
                },
            ],
        },
    )
    assert [e.timestamp for _, e in parsed.items] == [
        datetime(2026, 3, 1, 11, 59, 30, tzinfo=UTC),
        datetime(2026, 3, 1, 11, 59, 40, tzinfo=UTC),
    ]


def test_timestamp_without_sent_at_is_taken_as_given() -> None:
    event = accept("track", {"userId": "u", "event": "x", "timestamp": "2026-02-27T09:15:00Z"})
    assert event.timestamp == datetime(2026, 2, 27, 9, 15, tzinfo=UTC)


def test_no_timestamp_means_received_at() -> None:
    event = accept("track", {"userId": "u", "event": "x", "sentAt": "2000-01-01T00:00:00Z"})
    assert event.timestamp == RECEIVED


def test_received_client_field_is_ignored() -> None:
    event = accept("track", {"userId": "u", "event": "x", "receivedAt": "1999-01-01T00:00:00Z"})
    assert event.received_at == RECEIVED
    assert event.timestamp == RECEIVED


def test_epoch_milliseconds() -> None:
    event = accept("track", {"userId": "u", "event": "x", "timestamp": 1772366400000 - 1500})
    assert event.timestamp == datetime(2026, 3, 1, 11, 59, 58, 500000, tzinfo=UTC)
    event = accept("track", {"userId": "u", "event": "x", "timestamp": 1772366399999.5})
    assert event.timestamp == datetime(2026, 3, 1, 11, 59, 59, 999500, tzinfo=UTC)


def test_naive_timestamps_are_utc() -> None:
    event = accept("track", {"userId": "u", "event": "x", "timestamp": "2026-03-01T11:00:00"})
    assert event.timestamp == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)


def test_received_at_is_normalized_to_utc() -> None:
    local = RECEIVED.astimezone(timezone(timedelta(hours=2)))
    parsed = parse_segment_call(
        "track", {"userId": "u", "event": "x"}, workspace_id=WS, received_at=local
    )
    event = parsed.items[0][1]
    assert event.received_at == RECEIVED
    assert event.received_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-03-01T12:00:00Z", RECEIVED),
        ("2026-03-01T12:00:00z", RECEIVED),
        ("2026-03-01T14:00:00+02:00", RECEIVED),
        ("2026-03-01T12:00:00.123456789Z", RECEIVED + timedelta(microseconds=123456)),
        ("2026-03-01 12:00:00", RECEIVED),
        (1772366400000, RECEIVED),
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_parse_timestamp(value: object, expected: datetime) -> None:
    assert parse_timestamp(value) == expected


@pytest.mark.parametrize(
    "value", ["yesterday", "", "2026-13-01T00:00:00Z", True, None, [], {}, float("inf"), 10**20]
)
def test_parse_timestamp_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(value)


def test_future_limit() -> None:
    issues = reject("track", {"userId": "u", "event": "x", "timestamp": "2026-03-03T12:00:00Z"})
    [issue] = issues
    assert issue.path == "timestamp"
    assert issue.code == "out_of_range"
    assert "2 days in the future" in issue.reason
    assert "1 day allowed" in issue.reason
    # Just inside the limit is fine.
    event = accept("track", {"userId": "u", "event": "x", "timestamp": "2026-03-02T12:00:00Z"})
    assert event.timestamp == datetime(2026, 3, 2, 12, tzinfo=UTC)


def test_past_limit_and_custom_limits() -> None:
    limits = Limits(max_past=timedelta(hours=1), max_future=timedelta(minutes=5))
    body = {"userId": "u", "event": "x", "timestamp": "2026-03-01T09:00:00Z"}
    [issue] = reject("track", body, limits=limits)
    assert issue.code == "out_of_range"
    assert "3 hours in the past" in issue.reason
    assert "1 hour allowed" in issue.reason
    old = {"userId": "u", "event": "x", "timestamp": "2010-01-01T00:00:00Z"}
    [issue] = reject("track", old)
    assert "in the past" in issue.reason
    assert "3650 days allowed" in issue.reason


def test_limit_applies_after_clock_skew_correction() -> None:
    # Wildly off clock, but consistent: corrected instant is fine.
    event = accept(
        "track",
        {
            "userId": "u",
            "event": "x",
            "timestamp": "2031-03-01T12:00:00Z",
            "sentAt": "2031-03-01T12:00:01Z",
        },
    )
    assert event.timestamp == RECEIVED - timedelta(seconds=1)
    # Timestamp 3 days after sentAt: out of range, measured on the corrected instant.
    [issue] = reject(
        "track",
        {
            "userId": "u",
            "event": "x",
            "originalTimestamp": "2026-03-04T12:00:00Z",
            "sentAt": "2026-03-01T12:00:00Z",
        },
    )
    assert issue.path == "originalTimestamp"
    assert "3 days in the future (after clock-skew correction)" in issue.reason


# --------------------------------------------------------------------------------------------
# Message ids and sizes


def test_derived_message_id_is_deterministic() -> None:
    body = {"userId": "u1", "event": "x", "properties": {"a": 1, "b": [1, 2]}}
    first = accept("track", {**body, "sentAt": "2026-03-01T12:00:00Z"}).message_id
    retry = accept("track", {**body, "sentAt": "2026-03-01T12:00:05Z"}).message_id
    reordered = accept("track", {"properties": {"b": [1, 2], "a": 1}, "event": "x", "userId": "u1"})
    assert first == retry == reordered.message_id
    assert accept("track", {**body, "properties": {"a": 2}}).message_id != first
    assert accept("page", {"userId": "u1", "name": "x"}).message_id != first
    other_ws = parse_segment_call("track", body, workspace_id="ws_2", received_at=RECEIVED)
    assert other_ws.items[0][1].message_id != first


def test_derived_message_id_same_in_batch_and_single_call() -> None:
    item = {"type": "track", "userId": "u1", "event": "x"}
    single = accept("track", item)
    batched = segment("batch", {"batch": [item], "sentAt": "2026-03-01T12:00:00Z"})
    assert batched.items[0][1].message_id == single.message_id


def test_message_id_limits() -> None:
    assert accept("track", {"userId": "u", "event": "x", "messageId": "m" * 255}).message_id
    [issue] = reject("track", {"userId": "u", "event": "x", "messageId": "m" * 256})
    assert (issue.path, issue.code) == ("messageId", "too_long")


def test_event_name_limit() -> None:
    assert accept("track", {"userId": "u", "event": "e" * 200}).name == "e" * 200
    [issue] = reject("track", {"userId": "u", "event": "e" * 201})
    assert (issue.path, issue.code) == ("event", "too_long")


def test_size_limit() -> None:
    body = {"userId": "u", "event": "x", "properties": {"blob": "z" * (32 * 1024)}}
    [issue] = reject("track", body)
    assert issue.path == ""
    assert issue.code == "too_large"
    assert "32768" in issue.reason
    assert f"is {len(orjson.dumps(body))} bytes" in issue.reason
    parsed = segment("batch", {"batch": [{"type": "track", **body}]})
    assert parsed.errors[0].issues[0].path == "batch[0]"
    small = Limits(max_event_bytes=40)
    [issue] = reject("track", {"userId": "u", "event": "x" * 30}, limits=small)
    assert issue.code == "too_large"


def test_unencodable_item_is_an_item_error() -> None:
    [issue] = reject("track", {"userId": "u", "event": "x", "properties": {"n": 2**70}})
    assert issue.path == ""
    assert "not encodable" in issue.reason


def test_odd_unicode_is_accepted() -> None:
    name = "😀 naïve\u200b\u0000 名前"
    event = accept("track", {"userId": "ユーザー", "event": name, "properties": {"ü": "\uffff"}})
    assert event.name == name
    assert event.identities == (Identity("user_id", "ユーザー"),)


# --------------------------------------------------------------------------------------------
# Wrong types, field by field


@pytest.mark.parametrize(
    ("call", "field", "value", "code"),
    [
        ("track", "properties", [1], "type"),
        ("track", "properties", "x", "type"),
        ("track", "context", "x", "type"),
        ("track", "event", 5, "type"),
        ("track", "event", ["x"], "type"),
        ("track", "timestamp", "yesterday", "invalid"),
        ("track", "timestamp", True, "invalid"),
        ("track", "originalTimestamp", {}, "invalid"),
        ("track", "sentAt", "later", "invalid"),
        ("track", "messageId", 5, "type"),
        ("track", "messageId", "", "invalid"),
        ("track", "userId", {"id": 1}, "type"),
        ("track", "userId", True, "type"),
        ("track", "anonymousId", [], "type"),
        ("track", "anonymousId", "x" * 256, "invalid"),
        ("identify", "traits", "x", "type"),
        ("page", "name", 3, "type"),
        ("page", "category", 3, "type"),
        ("screen", "name", "n" * 201, "too_long"),
        ("group", "groupId", {}, "type"),
        ("group", "groupId", "", "invalid"),
        ("group", "traits", [], "type"),
    ],
)
def test_wrong_types(call: str, field: str, value: object, code: str) -> None:
    body: dict[str, Any] = {"userId": "u1", "anonymousId": "a1", "event": "x", "groupId": "g"}
    body[field] = value
    issues = reject(call, body)
    assert [(i.path, i.code) for i in issues] == [(field, code)]
    parsed = segment("batch", {"batch": [{"userId": "u"}, {**body, "type": call}]})
    assert [(i.path, i.code) for i in parsed.errors[-1].issues] == [(f"batch[1].{field}", code)]


def test_context_traits_must_be_an_object() -> None:
    issues = reject("track", {"userId": "u", "event": "x", "context": {"traits": 1}})
    assert [(i.path, i.code) for i in issues] == [("context.traits", "type")]


def test_several_issues_are_all_reported() -> None:
    issues = reject(
        "track",
        {"event": 1, "properties": [], "timestamp": "never", "messageId": {}},
    )
    assert paths(issues) == {"event", "properties", "timestamp", "messageId", "userId"}


# --------------------------------------------------------------------------------------------
# Native events


def test_native_event_defaults_to_track() -> None:
    event = native(
        {
            "event": "purchase",
            "message_id": "n-1",
            "timestamp": "2026-03-01T11:00:00Z",
            "identities": {"user_id": "u1", "email": "A@B.c", "loyalty_id": "X"},
            "properties": {"sku": "s1"},
            "traits": {"tier": "gold"},
            "context": {"channel": "pos"},
        }
    )
    assert event.type is EventType.TRACK
    assert event.name == "purchase"
    assert event.message_id == "n-1"
    assert event.timestamp == datetime(2026, 3, 1, 11, tzinfo=UTC)
    assert event.identities == (
        Identity("user_id", "u1"),
        Identity("email", "a@b.c"),
        Identity("loyalty_id", "X"),
    )
    assert event.properties == {"sku": "s1"}
    assert event.traits == {"tier": "gold"}
    assert event.context == {"channel": "pos"}
    assert event.source == "api"


def test_native_identity_lists_and_other_types() -> None:
    event = native({"type": "identify", "identities": {"email": ["a@x.io", "b@x.io"]}})
    assert event.name == "identify"
    assert event.identities == (Identity("email", "a@x.io"), Identity("email", "b@x.io"))
    page = native({"type": "page", "identities": {"anonymous_id": "a"}})
    assert page.name == ""
    alias = native({"type": "alias", "identities": {"user_id": "u"}, "previous_id": "a"})
    assert alias.previous_id == "a"
    group = native({"type": "group", "identities": {"user_id": "u"}, "group_id": 7})
    assert group.group_id == "7"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"event": "x"}, [("identities", "required")]),
        ({"event": "x", "identities": {}}, [("identities", "required")]),
        ({"event": "x", "identities": []}, [("identities", "type")]),
        ({"event": "x", "identities": {"Email": "a@b.c"}}, [("identities.Email", "invalid")]),
        ({"event": "x", "identities": {"1x": "a"}}, [("identities.1x", "invalid")]),
        ({"event": "x", "identities": {"email": []}}, [("identities.email", "invalid")]),
        (
            {"event": "x", "identities": {"email": ["a@b.c", 1.5, {}]}},
            [("identities.email[2]", "type")],
        ),
        ({"event": "x", "identities": {"phone": "n/a"}}, [("identities.phone", "invalid")]),
        ({"identities": {"user_id": "u"}}, [("event", "required")]),
        ({"type": "batch", "identities": {"user_id": "u"}}, [("type", "invalid")]),
        ({"type": 3, "identities": {"user_id": "u"}}, [("type", "invalid")]),
        ({"type": "alias", "identities": {"user_id": "u"}}, [("previous_id", "required")]),
        ({"type": "group", "identities": {"user_id": "u"}}, [("group_id", "required")]),
        (
            {"event": "x", "identities": {"user_id": "u"}, "timestamp": "?"},
            [("timestamp", "invalid")],
        ),
        ({"event": "x", "identities": {"user_id": "u"}, "message_id": 1}, [("message_id", "type")]),
        ({"event": "x", "identities": {"user_id": "u"}, "traits": 1}, [("traits", "type")]),
    ],
)
def test_native_event_errors(item: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert [(i.path, i.code) for i in native_issues(item)] == expected


def test_native_event_float_identity_keeps_its_digits() -> None:
    event = native({"event": "x", "identities": {"crm_id": 1.5}})
    assert event.identities == (Identity("crm_id", "1.5"),)


def test_native_event_clock_skew_and_derived_id() -> None:
    item = {
        "event": "x",
        "identities": {"user_id": "u"},
        "timestamp": "2026-03-01T12:10:00Z",
        "sent_at": "2026-03-01T12:10:30Z",
    }
    event = native(item)
    assert event.timestamp == datetime(2026, 3, 1, 11, 59, 30, tzinfo=UTC)
    retry = native({**item, "sent_at": "2026-03-01T12:11:00Z"})
    assert retry.message_id == event.message_id
    assert native({**item, "event": "y"}).message_id != event.message_id


def test_native_event_unknown_fields_are_flagged() -> None:
    event = native({"event": "x", "identities": {"user_id": "u"}, "userId": "u"})
    assert event.flags == ("unknown_field:userId",)


def test_parse_native_events_batch() -> None:
    parsed = parse_native_events(
        {
            "events": [
                {"event": "a", "identities": {"user_id": "u"}},
                {"event": "b"},
                7,
                {"event": "c", "identities": {"user_id": "u"}, "properties": {"k": "v"}},
            ]
        },
        workspace_id=WS,
        received_at=RECEIVED,
        source="file",
    )
    assert [(i, e.name) for i, e in parsed.items] == [(0, "a"), (3, "c")]
    assert all(e.source == "file" for _, e in parsed.items)
    assert [(e.index, [i.path for i in e.issues]) for e in parsed.errors] == [
        (1, ["events[1].identities"]),
        (2, ["events[2]"]),
    ]


@pytest.mark.parametrize(
    ("body", "path"),
    [([], ""), ({}, "events"), ({"events": []}, "events"), ({"events": "x"}, "events")],
)
def test_parse_native_events_unusable_body(body: object, path: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_native_events(body, workspace_id=WS, received_at=RECEIVED)
    assert [i.path for i in caught.value.issues] == [path]


def test_native_event_size_limit() -> None:
    item = {"event": "x", "identities": {"user_id": "u"}, "properties": {"b": "z" * 40000}}
    [issue] = native_issues(item, path="line 3")
    assert (issue.path, issue.code) == ("line 3", "too_large")


# --------------------------------------------------------------------------------------------
# Native profiles


def test_profile_record_with_consents() -> None:
    record = profile(
        {
            "identities": {"email": "Ada@Example.com", "crm_id": 17},
            "attributes": {"first_name": "Ada"},
            "timestamp": "2026-03-01T10:00:00Z",
            "consents": [
                {"channel": "email", "purpose": "marketing", "status": "opted_in"},
                {"channel": "sms", "status": "opted_out", "timestamp": "2026-02-01T00:00:00Z"},
            ],
        },
        source="crm",
    )
    assert record.identities == (Identity("email", "ada@example.com"), Identity("crm_id", "17"))
    assert record.attributes == {"first_name": "Ada"}
    assert record.timestamp == datetime(2026, 3, 1, 10, tzinfo=UTC)
    assert record.source == "crm"
    first, second = record.consents
    assert (first.channel, first.purpose, first.status) == (
        "email",
        "marketing",
        ConsentStatus.OPTED_IN,
    )
    assert first.timestamp == record.timestamp
    assert first.source == "crm"
    assert (second.channel, second.purpose, second.status) == (
        "sms",
        "marketing",
        ConsentStatus.OPTED_OUT,
    )
    assert second.timestamp == datetime(2026, 2, 1, tzinfo=UTC)


def test_profile_defaults() -> None:
    record = profile({"identities": {"user_id": "u"}})
    assert record.attributes == {}
    assert record.timestamp == RECEIVED
    assert record.consents == ()


@pytest.mark.parametrize(
    ("consent", "path", "code"),
    [
        ({"channel": "email", "status": "yes"}, "consents[0].status", "invalid"),
        ({"channel": "email", "status": "OPTED_IN"}, "consents[0].status", "invalid"),
        ({"channel": "email", "status": True}, "consents[0].status", "invalid"),
        ({"channel": "email"}, "consents[0].status", "required"),
        ({"status": "opted_in"}, "consents[0].channel", "required"),
        ({"channel": "E-mail", "status": "opted_in"}, "consents[0].channel", "invalid"),
        ({"channel": 1, "status": "opted_in"}, "consents[0].channel", "type"),
        (
            {"channel": "email", "purpose": "", "status": "opted_in"},
            "consents[0].purpose",
            "invalid",
        ),
        (
            {"channel": "email", "status": "opted_in", "when": 1},
            "consents[0].when",
            "unknown_field",
        ),
        (
            {"channel": "email", "status": "opted_in", "timestamp": "2099-01-01T00:00:00Z"},
            "consents[0].timestamp",
            "out_of_range",
        ),
    ],
)
def test_consent_validation(consent: dict[str, Any], path: str, code: str) -> None:
    issues = profile_issues({"identities": {"user_id": "u"}, "consents": [consent]})
    assert [(i.path, i.code) for i in issues] == [(path, code)]


def test_consent_status_reason_lists_the_choices() -> None:
    [issue] = profile_issues(
        {"identities": {"user_id": "u"}, "consents": [{"channel": "email", "status": "maybe"}]}
    )
    assert "opted_in, opted_out, unknown" in issue.reason


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({}, [("identities", "required")]),
        ({"identities": {"user_id": "u"}, "attributes": []}, [("attributes", "type")]),
        ({"identities": {"user_id": "u"}, "consents": {}}, [("consents", "type")]),
        ({"identities": {"user_id": "u"}, "consents": [1]}, [("consents[0]", "type")]),
        ({"identities": {"user_id": "u"}, "traits": {}}, [("traits", "unknown_field")]),
        (
            {"identities": {"user_id": "u"}, "timestamp": "2000-01-01"},
            [("timestamp", "out_of_range")],
        ),
    ],
)
def test_profile_errors(item: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert [(i.path, i.code) for i in profile_issues(item)] == expected


def test_parse_native_profiles() -> None:
    parsed = parse_native_profiles(
        {"profiles": [{"identities": {"user_id": "u"}}, {"identities": {"user_id": ""}}]},
        received_at=RECEIVED,
    )
    assert [i for i, _ in parsed.items] == [0]
    assert parsed.errors == [
        ItemError(1, (Issue("profiles[1].identities.user_id", "identity 'user_id' is empty"),))
    ]
    with pytest.raises(InvalidInput):
        parse_native_profiles({"profiles": []}, received_at=RECEIVED)
    with pytest.raises(InvalidInput):
        parse_native_profiles("x", received_at=RECEIVED)


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        Limits(max_event_bytes=0)
    with pytest.raises(ValueError):
        Limits(max_future=timedelta(seconds=-1))


# --------------------------------------------------------------------------------------------
# Property: any JSON-ish item yields an Event or an ItemError, never an exception

_SEGMENT_KEYS = [
    "type",
    "userId",
    "anonymousId",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "context",
    "integrations",
    "properties",
    "traits",
    "event",
    "name",
    "category",
    "previousId",
    "groupId",
]
_NATIVE_KEYS = [
    "type",
    "event",
    "message_id",
    "timestamp",
    "sent_at",
    "identities",
    "properties",
    "traits",
    "context",
    "previous_id",
    "group_id",
    "attributes",
    "consents",
]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
    | st.sampled_from(
        [
            "track",
            "identify",
            "page",
            "screen",
            "alias",
            "group",
            "batch",
            "2026-03-01T11:00:00Z",
            "2026-03-01T11:00:00",
            "1990-01-01T00:00:00+05:00",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "a@b.c",
            "email",
            "Loyalty",
            "opted_in",
        ]
    )
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["email", "phone", "id", "type", "traits", "externalIds", "status", "channel"]
            )
            | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=16,
)
_instants = st.datetimes(
    min_value=datetime(2015, 1, 1),
    max_value=datetime(2026, 3, 3),
    timezones=st.sampled_from([None, UTC]),
)
_times = (
    _instants.map(datetime.isoformat)
    | _instants.map(lambda d: int(d.replace(tzinfo=UTC).timestamp() * 1000))
    | _scalars
)
_ids = st.text(min_size=1, max_size=8) | st.integers(min_value=0, max_value=10**9) | _scalars
_objects = st.dictionaries(st.text(max_size=5), _json, max_size=3) | _json
_segment_like = st.fixed_dictionaries(
    {"type": st.sampled_from([t.value for t in EventType]), "userId": _ids},
    optional={
        "anonymousId": _ids,
        "event": st.text(min_size=1, max_size=10) | _scalars,
        "name": st.text(max_size=10) | _scalars,
        "category": st.text(max_size=10) | _scalars,
        "previousId": _ids,
        "groupId": _ids,
        "messageId": st.text(max_size=10) | _scalars,
        "timestamp": _times,
        "originalTimestamp": _times,
        "sentAt": _times,
        "properties": _objects,
        "traits": st.fixed_dictionaries({}, optional={"email": _ids, "phone": _ids}) | _objects,
        "context": st.fixed_dictionaries(
            {},
            optional={
                "traits": st.fixed_dictionaries({}, optional={"email": _ids}) | _json,
                "externalIds": st.lists(
                    st.fixed_dictionaries(
                        {"id": _ids, "type": st.sampled_from(["crm", "Crm", "1x"])}
                    )
                    | _json,
                    max_size=2,
                )
                | _json,
            },
        )
        | _json,
        "integrations": _json,
    },
)
_native_like = st.fixed_dictionaries(
    {
        "identities": st.dictionaries(
            st.sampled_from(["user_id", "crm_id", "user_id", "email", "phone", "Bad"]),
            st.text(min_size=1, max_size=8) | _ids | st.lists(_ids, max_size=2),
            min_size=1,
            max_size=2,
        ),
        "event": st.sampled_from(["purchase", "signup"]) | _scalars,
    },
    optional={
        "type": st.sampled_from([t.value for t in EventType]) | _scalars,
        "timestamp": _times,
        "sent_at": _times,
        "message_id": st.text(max_size=10) | _scalars,
        "previous_id": _ids,
        "group_id": _ids,
        "properties": _objects,
        "attributes": _objects,
        "consents": st.lists(
            st.fixed_dictionaries(
                {
                    "channel": st.sampled_from(["email", "sms", "E"]) | _scalars,
                    "status": st.sampled_from([s.value for s in ConsentStatus]) | _scalars,
                },
                optional={"purpose": st.sampled_from(["marketing", ""]), "timestamp": _times},
            )
            | _json,
            max_size=2,
        )
        | _json,
    },
)
_items = st.one_of(
    _json,
    st.dictionaries(
        st.sampled_from(_SEGMENT_KEYS + _NATIVE_KEYS) | st.text(max_size=5), _json, max_size=10
    ),
    _segment_like,
    _native_like,
)


def _check(parsed: Parsed[Any], prefix: str, kind: type[Event | ProfileRecord]) -> None:
    assert len(parsed.items) + len(parsed.errors) == 1
    if parsed.items:
        [(index, value)] = parsed.items
        assert index == 0
        assert isinstance(value, kind)
        assert isinstance(value, Event | ProfileRecord)
        assert value.identities
        assert value.timestamp.tzinfo is UTC
    else:
        [error] = parsed.errors
        assert error.index == 0
        assert error.issues
        assert all(issue.path.startswith(prefix) for issue in error.issues)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    item=_items, batch_context=st.none() | st.dictionaries(st.text(max_size=4), _json, max_size=3)
)
def test_any_item_yields_an_event_or_an_item_error(item: object, batch_context: object) -> None:
    body: dict[str, Any] = {"batch": [item]}
    if batch_context is not None:
        body["context"] = batch_context
    try:
        parsed = segment("batch", body)
    except InvalidInput as exc:  # only an unencodable batch context rejects the whole request
        assert [i.path for i in exc.issues] == ["context"]
    else:
        _check(parsed, "batch[0]", Event)
    _check(
        parse_native_events({"events": [item]}, workspace_id=WS, received_at=RECEIVED),
        "events[0]",
        Event,
    )
    # A profile record has no "event": drop it so that valid records occur too.
    record = {k: v for k, v in item.items() if k != "event"} if isinstance(item, dict) else item
    _check(
        parse_native_profiles({"profiles": [record]}, received_at=RECEIVED),
        "profiles[0]",
        ProfileRecord,
    )
