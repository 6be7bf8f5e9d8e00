"""Events cross process boundaries (ingestion workers) intact."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

from waymark.model.events import Event, EventType, Identity


def test_an_event_survives_pickling_field_for_field() -> None:
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    event = Event(
        "m1",
        EventType.IDENTIFY,
        "identify",
        at,
        at,
        (Identity("user_id", "u1"), Identity("email", "a@example.com")),
        {"nested": {"list": [1, 2.5, None]}},
        {"plan": "pro"},
        {"ip": "127.0.0.1"},
        "prev",
        "group",
        "segment",
        ("unknown_field:x",),
    )
    copy = pickle.loads(pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL))
    assert copy == event
    assert copy.type is EventType.IDENTIFY
    assert all(type(i) is Identity for i in copy.identities)
    assert copy.timestamp.tzinfo is UTC
