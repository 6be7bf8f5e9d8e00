"""Group commit: many requests in one transaction, each answered with its own outcome."""

from __future__ import annotations

from typing import Any

from waymark.access import service as access
from waymark.hub import Hub
from waymark.ingestion.batcher import GroupCommitter
from waymark.ingestion.payloads import parse_segment_call
from waymark.workers import flush_once


def test_combined_batches_are_split_back_per_request(hub: Hub, monkeypatch: Any) -> None:
    from waymark.ingestion import batcher

    splits: list[int] = []
    real = batcher.split_result
    monkeypatch.setattr(
        batcher,
        "split_result",
        lambda result, bounds: splits.append(len(bounds)) or real(result, bounds),
    )
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="g", actor="t", at=hub.clock.now())
    committer = GroupCommitter(hub, start=False)
    try:

        def parsed(items: list[object]) -> object:
            return parse_segment_call(
                "batch", {"batch": items}, workspace_id=ws.id, received_at=hub.clock.now()
            )

        bodies = [
            [
                {"type": "track", "userId": "u1", "event": "a", "messageId": "m1"},
                {"type": "track", "event": "no identity", "messageId": "m2"},
            ],
            [
                {"type": "track", "userId": "u2", "event": "b", "messageId": "m1"},  # taken by #0
                {"type": "track", "userId": "u2", "event": "c", "messageId": "m3"},
            ],
            [{"type": "identify", "userId": "u3", "anonymousId": "d3", "messageId": "m4"}],
        ]
        # queued before the writer starts, all three share one transaction
        futures = [committer.submit(ws.id, parsed(b)) for b in bodies]
        committer.start()
        first, second, third = (f.result(timeout=30) for f in futures)
    finally:
        committer.close()
    assert (first.accepted, first.duplicates, [e.index for e in first.rejected]) == (1, 0, [1])
    assert (second.accepted, second.duplicates, second.duplicate_indices) == (1, 1, [0])
    assert (third.accepted, third.rejected) == (1, [])
    flush_once(hub)
    assert hub.events.count(ws.id) == 3
    assert splits == [3]  # one combined batch, cut in three


def test_a_batch_checked_under_an_older_schema_is_validated_again(hub: Hub) -> None:
    """A parse worker validated the batch, then the schema changed before the store: the
    version in force decides."""
    from waymark.ingestion.service import check_events
    from waymark.model.schemas import Schema
    from waymark.profiles.schema_store import save_schema

    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="v", actor="t", at=hub.clock.now())
    raw = parse_segment_call(
        "batch",
        {
            "batch": [
                {"type": "track", "userId": "u1", "event": "known", "messageId": "v1"},
                {"type": "track", "userId": "u1", "event": "unknown", "messageId": "v2"},
            ]
        },
        workspace_id=ws.id,
        received_at=hub.clock.now(),
    )
    checked = check_events(raw, Schema.empty())  # version 0: everything goes
    with hub.tx() as conn:
        save_schema(
            conn,
            workspace_id=ws.id,
            document={"unknown_events": "reject", "events": {"known": {}}},
            actor="t",
            at=hub.clock.now(),
        )
    committer = GroupCommitter(hub)
    try:
        stale = committer.submit(ws.id, checked, checked=0).result(timeout=30)
        trusted = committer.submit(
            ws.id,
            check_events(
                parse_segment_call(
                    "track",
                    {"userId": "u2", "event": "unknown", "messageId": "v3"},
                    workspace_id=ws.id,
                    received_at=hub.clock.now(),
                ),
                Schema.empty(),
            ),
            checked=1,  # claims the version in force: taken as validated
        ).result(timeout=30)
    finally:
        committer.close()
    assert stale.accepted == 1
    assert [(e.index, e.issues[0].path) for e in stale.rejected] == [(1, "event")]
    assert trusted.accepted == 1
