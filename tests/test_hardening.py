"""Hardening: PostgreSQL concurrency, crash and cancellation safety, privacy down to the bytes,
and bad input that must be answered with a 4xx.

The PostgreSQL-only tests interleave two real transactions the way two API requests (or two
worker processes) do; SQLite serializes writers (BEGIN IMMEDIATE), so there they do not apply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, func, select, text

from tests.api.conftest import Api, api  # noqa: F401  (the fixture)
from waymark.access import service as access
from waymark.hub import Hub
from waymark.ingestion.payloads import parse_segment_call
from waymark.ingestion.pipeline import Ingestor, policy_of
from waymark.ingestion.service import ingest_events
from waymark.model.events import Identity
from waymark.privacy import delete_person
from waymark.profiles import service as profiles
from waymark.profiles.schema_store import current_schema
from waymark.storage.tables import event_inbox, identities
from waymark.storage.tables import profiles as profiles_table
from waymark.workers import flush_once

# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def ws(hub: Hub) -> str:
    with hub.tx() as conn:
        workspace, _w, _a = access.create_workspace(conn, name="rv", actor="t", at=hub.clock.now())
    return workspace.id


def _postgres_only(hub: Hub) -> None:
    if hub.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serializes write transactions; the race needs PostgreSQL")


def _wait_until_blocked(hub: Hub, worker: threading.Thread, timeout: float = 10.0) -> None:
    """Return once another session of this database waits on a lock (or ``worker`` ended)."""
    deadline = time.monotonic() + timeout
    with hub.engine.connect() as probe:
        while time.monotonic() < deadline and worker.is_alive():
            waiting = probe.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar()
            if waiting:
                return
            time.sleep(0.02)


def _interleave(
    hub: Hub, first: Callable[[Connection], Any], second: Callable[[Connection], Any]
) -> None:
    """Run ``first`` in an open transaction, then ``second`` in its own transaction on another
    thread (as a concurrent request would), commit ``first`` while ``second`` waits on its
    locks, and let ``second`` finish and commit."""
    errors: list[BaseException] = []

    def run_second() -> None:
        try:
            with hub.tx() as conn:
                second(conn)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with hub.engine.connect() as base:
        conn = base.execution_options(waymark_write=True)
        tx = conn.begin()
        first(conn)
        worker = threading.Thread(target=run_second)
        worker.start()
        _wait_until_blocked(hub, worker)
        tx.commit()
    worker.join(timeout=30)
    assert not errors, errors


def _segment(hub: Hub, ws: str, conn: Connection, items: list[dict[str, Any]]) -> None:
    parsed = parse_segment_call(
        "batch", {"batch": items}, workspace_id=ws, received_at=hub.clock.now()
    )
    ingest_events(
        conn,
        workspace_id=ws,
        parsed=parsed,
        schema=current_schema(conn, ws).schema,
        policy=policy_of(hub),
        now=hub.clock.now(),
        shared_event_log=hub.settings.shared_event_log,
    )


def _patch(hub: Hub, ws: str, conn: Connection, attributes: dict[str, Any]) -> None:
    profiles.update_profile(
        conn,
        workspace_id=ws,
        identity=Identity("user_id", "u1"),
        attributes=attributes,
        consent_updates=[],
        schema=current_schema(conn, ws).schema,
        policy=policy_of(hub),
        actor="t",
        now=hub.clock.now(),
        create=True,
        shared_event_log=hub.settings.shared_event_log,
    )


@pytest.fixture
def http(api: Api) -> Api:  # noqa: F811  (the imported fixture)
    """The API test client of tests/api/conftest.py."""
    return api


@pytest.fixture
def lenient_client(http: Api) -> Iterator[TestClient]:
    """The API answering server errors as HTTP 500 instead of raising them into the test."""
    yield TestClient(http.client.app, raise_server_exceptions=False)


# -- 1. concurrent transactions on PostgreSQL ----------------------------------------------------


def test_pg_concurrent_attribute_updates_both_survive(hub: Hub, ws: str) -> None:
    """Two concurrent updates of one profile both keep their attribute (per-workspace lock)."""
    _postgres_only(hub)
    with hub.tx() as conn:
        _patch(hub, ws, conn, {"name": "Ann"})
    _interleave(
        hub,
        lambda c: _patch(hub, ws, c, {"email": "ann@x.io"}),
        lambda c: _patch(hub, ws, c, {"plan": "pro"}),
    )
    with hub.engine.connect() as conn:
        attrs = profiles.lookup(conn, ws, "user_id", "u1")["attributes"]
    assert attrs == {"name": "Ann", "email": "ann@x.io", "plan": "pro"}


def test_pg_concurrent_first_sight_of_an_identity_makes_one_profile(hub: Hub, ws: str) -> None:
    """Two transactions seeing a new identity at once create one profile, not an orphan."""
    _postgres_only(hub)
    _interleave(
        hub,
        lambda c: _segment(
            hub, ws, c, [{"type": "track", "userId": "u1", "event": "a", "messageId": "m1"}]
        ),
        lambda c: _segment(
            hub, ws, c, [{"type": "track", "userId": "u1", "event": "b", "messageId": "m2"}]
        ),
    )
    with hub.engine.connect() as conn:
        n_profiles = conn.execute(
            select(func.count())
            .select_from(profiles_table)
            .where(profiles_table.c.workspace_id == ws)
        ).scalar()
        pid = profiles.find_profile_id(conn, ws, Identity("user_id", "u1"))
        seen = {e["message_id"] for e in profiles.timeline(conn, hub.events, ws, pid)}
    assert (n_profiles, seen) == (1, {"m1", "m2"})


def test_pg_event_for_a_profile_merged_concurrently_follows_the_merge(hub: Hub, ws: str) -> None:
    """An event resolved while another transaction merges its profile lands on the survivor."""
    _postgres_only(hub)

    def ago(hours: int) -> str:
        return (hub.clock.now() - timedelta(hours=hours)).isoformat()

    with hub.tx() as conn:
        _segment(
            hub,
            ws,
            conn,
            [
                {"type": "identify", "userId": "u1", "messageId": "m1", "timestamp": ago(2)},
                {
                    "type": "track",
                    "anonymousId": "d1",
                    "event": "view",
                    "messageId": "m2",
                    "timestamp": ago(1),
                },
            ],
        )
    _interleave(
        hub,
        lambda c: _segment(
            hub,
            ws,
            c,
            [{"type": "identify", "userId": "u1", "anonymousId": "d1", "messageId": "m3"}],
        ),
        lambda c: _segment(
            hub, ws, c, [{"type": "track", "anonymousId": "d1", "event": "cart", "messageId": "m4"}]
        ),
    )
    with hub.engine.connect() as conn:
        orphans = (
            conn.execute(
                select(event_inbox.c.message_id).where(
                    event_inbox.c.workspace_id == ws,
                    event_inbox.c.profile_id.not_in(select(profiles_table.c.id)),
                )
            )
            .scalars()
            .all()
        )
        pid = profiles.find_profile_id(conn, ws, Identity("user_id", "u1"))
        seen = {e["message_id"] for e in profiles.timeline(conn, hub.events, ws, pid)}
    assert orphans == []
    assert seen == {"m1", "m2", "m3", "m4"}


# -- 1b. group commit: a cancelled request kills the writer thread -------------------------------


def test_a_cancelled_request_does_not_stop_group_commit(hub: Hub, ws: str) -> None:
    """A request cancelled while queued is dropped; the writer thread keeps serving the others."""
    import asyncio

    from waymark.ingestion.batcher import GroupCommitter

    def parsed(mid: str) -> Any:
        return parse_segment_call(
            "track",
            {"userId": "u1", "event": "e", "messageId": mid},
            workspace_id=ws,
            received_at=hub.clock.now(),
        )

    committer = GroupCommitter(hub, start=False)
    try:

        async def cancelled_request() -> None:
            task = asyncio.ensure_future(committer.store(ws, parsed("gone")))
            await asyncio.sleep(0.01)  # queued
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancelled_request())
        committer.start()
        later = committer.submit(ws, parsed("next"))
        assert later.result(timeout=3).accepted == 1
    finally:
        committer._queue.put(None)
        committer._thread.join(timeout=1)


# -- 2. identity ---------------------------------------------------------------------------------


def test_merge_chain_within_one_batch_is_consistent(hub: Hub, ws: str) -> None:
    """Touch, absorb, touch again and absorb the survivor, all in one batch: ids, consents,
    waiting events and links all end on the last survivor."""
    ing = Ingestor(hub)

    def ago(hours: int) -> str:
        return (hub.clock.now() - timedelta(hours=hours)).isoformat()

    ing.segment(
        ws,
        "batch",
        {
            "batch": [
                {
                    "type": "track",
                    "anonymousId": "d1",
                    "event": "v",
                    "messageId": "m1",
                    "timestamp": ago(3),
                },
                {
                    "type": "track",
                    "anonymousId": "d2",
                    "event": "v",
                    "messageId": "m2",
                    "timestamp": ago(4),
                },
            ]
        },
    )
    ing.native_profiles(
        ws,
        {
            "profiles": [
                {
                    "identities": {"anonymous_id": "d1"},
                    "consents": [{"channel": "email", "status": "opted_in"}],
                }
            ]
        },
    )
    ing.segment(
        ws,
        "batch",
        {
            "batch": [
                {
                    "type": "track",
                    "anonymousId": "d1",
                    "event": "a",
                    "messageId": "m3",
                    "timestamp": ago(2),
                },
                {
                    "type": "identify",
                    "userId": "u1",
                    "anonymousId": "d1",
                    "messageId": "m4",
                    "timestamp": ago(2),
                },
                {
                    "type": "track",
                    "anonymousId": "d1",
                    "event": "b",
                    "messageId": "m5",
                    "timestamp": ago(1),
                },
                {
                    "type": "identify",
                    "anonymousId": "d2",
                    "userId": "u1",
                    "messageId": "m6",
                    "traits": {"plan": "pro"},
                },
                {"type": "track", "userId": "u1", "event": "c", "messageId": "m7"},
            ]
        },
    )
    with hub.engine.connect() as conn:
        p = profiles.lookup(conn, ws, "user_id", "u1")
        events = profiles.timeline(conn, hub.events, ws, p["id"])
        n = conn.execute(select(func.count()).select_from(profiles_table)).scalar()
        links = conn.execute(select(identities.c.profile_id).distinct()).scalars().all()
    assert n == 1 and links == [p["id"]]
    assert {e["message_id"] for e in events} == {f"m{i}" for i in range(1, 8)}
    assert [c["status"] for c in p["consents"]] == ["opted_in"]
    assert p["system"]["first_seen"] == ago(4)


# -- 2b. identity: the touch fast path -------------------------------------------------------------


def test_backdated_event_lowers_first_seen_of_profile_and_link(hub: Hub, ws: str) -> None:
    """A backdated event lowers first_seen of the profile and of its identity link alike,
    with or without traits."""
    ing = Ingestor(hub)
    earlier = (hub.clock.now() - timedelta(hours=5)).isoformat()
    ing.segment(
        ws,
        "batch",
        {
            "batch": [
                {"type": "identify", "userId": "a", "messageId": "a1"},
                {"type": "identify", "userId": "b", "messageId": "b1"},
            ]
        },
    )
    ing.segment(
        ws,
        "batch",
        {
            "batch": [
                {
                    "type": "track",
                    "userId": "a",
                    "event": "e",
                    "messageId": "a2",
                    "timestamp": earlier,
                },
                {
                    "type": "identify",
                    "userId": "b",
                    "messageId": "b2",
                    "timestamp": earlier,
                    "traits": {"plan": "pro"},
                },
            ]
        },
    )
    with hub.engine.connect() as conn:
        a = profiles.lookup(conn, ws, "user_id", "a")
        b = profiles.lookup(conn, ws, "user_id", "b")
    assert b["identities"][0]["first_seen"] == b["system"]["first_seen"]  # apply_record path
    assert a["identities"][0]["first_seen"] == a["system"]["first_seen"]  # touch path


# -- 3. privacy ----------------------------------------------------------------------------------


def test_deleted_person_leaves_no_bytes_in_the_duckdb_file(hub: Hub, ws: str) -> None:
    """After a privacy deletion the person's data is not in the bytes of the DuckDB file."""
    if hub.engine.dialect.name != "sqlite":
        pytest.skip("embedded DuckDB log only")
    secret = "gift-note-for-ann-9183"
    ing = Ingestor(hub)
    ing.segment(
        ws,
        "batch",
        {
            "batch": [
                {
                    "type": "track",
                    "userId": "ann",
                    "event": "purchase",
                    "messageId": "a1",
                    "properties": {"note": secret},
                },
                {"type": "track", "userId": "bob", "event": "purchase", "messageId": "b1"},
            ]
        },
    )
    flush_once(hub)
    record = delete_person(hub, workspace_id=ws, identity=Identity("user_id", "ann"), actor="t")
    assert record["status"] == "done"
    path = hub.settings.data_dir / "events.duckdb"
    hub.close()
    assert secret.encode() not in path.read_bytes()


# -- 4. timestamps from the DuckDB log -----------------------------------------------------------


def test_timeline_order_on_a_non_utc_machine(
    hub: Hub, ws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timeline is in time order even when the machine's zone is not UTC."""
    if hub.engine.dialect.name != "sqlite":
        pytest.skip("embedded DuckDB log only")
    assert not hub.events_open
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        ing = Ingestor(hub)
        now = hub.clock.now()
        ing.segment(
            ws,
            "track",
            {
                "userId": "u1",
                "event": "newer",
                "messageId": "n",
                "timestamp": (now - timedelta(minutes=10)).isoformat(),
            },
        )
        ing.flush()  # opens the log under TZ=America/New_York
        ing.segment(
            ws,
            "track",
            {
                "userId": "u1",
                "event": "older",
                "messageId": "o",
                "timestamp": (now - timedelta(hours=3)).isoformat(),
            },
        )
        with hub.engine.connect() as conn:
            pid = profiles.find_profile_id(conn, ws, Identity("user_id", "u1"))
            events = profiles.timeline(conn, hub.events, ws, pid)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert [e["name"] for e in events] == ["newer", "older"]
    assert all(e["timestamp"].endswith("+00:00") for e in events)


# -- 5. errors that answer 500 instead of 4xx ----------------------------------------------------


def test_alias_with_nul_in_previous_id_is_a_400_not_a_500(
    lenient_client: TestClient, http: Api
) -> None:
    """A NUL in an alias's previousId rejects that item with a reason, not the whole request."""
    r = lenient_client.post(
        "/v1/batch",
        headers=http.basic(),
        json={
            "batch": [
                {"type": "track", "userId": "u1", "event": "ok", "messageId": "m1"},
                {"type": "alias", "userId": "u1", "previousId": "p\x00", "messageId": "m2"},
            ]
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1 and r.json()["rejected"][0]["index"] == 1


@pytest.mark.parametrize(
    "item",
    [
        {"type": "track", "userId": "u1", "event": "e\x00", "messageId": "m2"},
        {"type": "track", "userId": "u1", "event": "e", "messageId": "m\x002"},
        {"type": "group", "userId": "u1", "groupId": "g\x00", "messageId": "m2"},
    ],
    ids=["event-name", "message-id", "group-id"],
)
def test_nul_outside_properties_is_rejected_per_item(
    lenient_client: TestClient,
    http: Api,
    item: dict[str, Any],
) -> None:
    """NUL characters in names and ids are rejected per item on every backend."""
    r = lenient_client.post(
        "/v1/batch",
        headers=http.basic(),
        json={"batch": [{"type": "track", "userId": "u1", "event": "ok", "messageId": "m1"}, item]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1 and r.json()["rejected"][0]["index"] == 1


@pytest.mark.parametrize(
    "attributes", [{"big": 10**20}, {"note": "a\x00b"}], ids=["int-over-64-bit", "nul"]
)
def test_patch_profile_bad_attribute_is_a_400(
    lenient_client: TestClient,
    http: Api,
    attributes: dict[str, Any],
) -> None:
    """Unstorable attribute values (NUL, integers beyond 64 bits) in a PATCH answer 400."""
    r = lenient_client.patch(
        "/v1/profiles/user_id/u1?create=true",
        headers=http.bearer(),
        json={"attributes": attributes},
    )
    assert r.status_code == 400, (r.status_code, r.text)


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("get", "/v1/profiles/user_id/u1/events?limit=-1", None),
        ("get", "/v1/profiles?q=name%3Da%00", None),
        ("get", "/v1/profiles?after=%00", None),
        ("post", "/v1/users", {"email": "a\x00@x.io", "role": "viewer"}),
        ("post", "/v1/keys", {"kind": "secret", "scopes": ["read"], "name": "k\x00"}),
        ("delete", "/v1/keys/%00", None),
    ],
    ids=["timeline-negative-limit", "search-nul", "after-nul", "user-nul", "key-nul", "revoke-nul"],
)
def test_odd_inputs_answer_4xx(
    lenient_client: TestClient,
    http: Api,
    method: str,
    url: str,
    body: Any,
) -> None:
    """Odd query values (negative limits, NUL characters) answer 4xx, never 500."""
    http.client.post(
        "/v1/track", headers=http.basic(), json={"userId": "u1", "event": "e", "messageId": "m1"}
    )
    r = lenient_client.request(method, url, headers=http.bearer(), json=body)
    assert r.status_code < 500, (r.status_code, r.text)


# -- 6. security ---------------------------------------------------------------------------------


def test_public_write_key_cannot_set_consent(http: Api) -> None:
    """The public write key cannot set consent or upload imports."""
    r = http.client.post(
        "/v1/profiles",
        headers=http.basic(),
        json={
            "profiles": [
                {
                    "identities": {"email": "victim@x.io"},
                    "consents": [{"channel": "email", "status": "opted_in"}],
                }
            ]
        },
    )
    assert r.status_code == 403, r.text
