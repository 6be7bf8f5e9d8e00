"""Streaming audiences as ``serve`` runs them, on both backends: events folded as they move,
timers firing with no new event, attribute changes, merges, builds, crashes and state caps."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from waymark.access import service as access
from waymark.core.clock import ManualClock
from waymark.hub import Hub
from waymark.ingestion import mover
from waymark.ingestion.mover import _rows_to_arrow, flush_hub
from waymark.ingestion.pipeline import Ingestor
from waymark.model.events import Identity
from waymark.profiles import service as profiles
from waymark.profiles.schema_store import save_schema
from waymark.segmentation import live
from waymark.segmentation import service as segments
from waymark.storage.hotpath import INBOX_COLUMNS, fetch_rows
from waymark.storage.tables import (
    audience_changes,
    audience_members,
    audiences,
    imports,
    stream_recheck,
    stream_states,
)
from waymark.workers import flush_once, stream_once

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "src/waymark/demo/schema.json").read_text(encoding="utf-8")
)


def _workspace(hub: Hub) -> str:
    now = hub.clock.now()
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="shop", actor="t", at=now)
        save_schema(conn, workspace_id=ws.id, document=SCHEMA, actor="t", at=now)
    return ws.id


def _with_shipping(hub: Hub, ws: str) -> None:
    """The demo schema with a timestamp property on purchases (for batch-only filters)."""
    purchase = SCHEMA["events"]["purchase"]
    shipped = {**purchase["properties"], "shipped_at": {"type": "timestamp"}}
    events = {**SCHEMA["events"], "purchase": {**purchase, "properties": shipped}}
    with hub.tx() as conn:
        save_schema(
            conn,
            workspace_id=ws,
            document={**SCHEMA, "events": events},
            actor="t",
            at=hub.clock.now(),
        )


def _save(hub: Hub, ws: str, name: str, text: str) -> segments.Audience:
    with hub.tx() as conn:
        return segments.save_audience(
            conn, ws, name=name, definition=text, actor="t", now=hub.clock.now()
        )


def _send(hub: Hub, ws: str, *calls: dict[str, Any]) -> None:
    batch = []
    for i, call in enumerate(calls):
        batch.append(
            {
                "messageId": f"m-{hub.clock.now().timestamp()}-{i}-{random.random()}",
                "timestamp": hub.clock.now().isoformat(),
                **call,
            }
        )
    result = Ingestor(hub).segment(ws, "batch", {"batch": batch})
    assert not result.rejected, result.to_json()


def _track(user: str, event: str, **props: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": event, "properties": props}


def _buy(user: str, revenue: float = 20.0) -> dict[str, Any]:
    return _track(user, "purchase", order_id=f"o-{random.random()}", revenue=revenue)


def _pid(hub: Hub, ws: str, user: str) -> str:
    with hub.engine.connect() as conn:
        return profiles.find_profile_id(conn, ws, Identity("user_id", user))


def _members(hub: Hub, ws: str, name: str) -> set[str]:
    with hub.engine.connect() as conn:
        return {m["profile_id"] for m in segments.members_of(conn, ws, name)}


def _users(hub: Hub, ws: str, name: str, *users: str) -> set[str]:
    wanted = {_pid(hub, ws, u): u for u in users}
    return {wanted[p] for p in _members(hub, ws, name) if p in wanted}


def _changes(hub: Hub, ws: str) -> list[tuple[str, str, str | None]]:
    with hub.engine.connect() as conn:
        return [
            (r.profile_id, r.change, r.run_id)
            for r in conn.execute(
                select(audience_changes)
                .where(audience_changes.c.workspace_id == ws)
                .order_by(audience_changes.c.seq)
            )
        ]


def test_events_change_memberships_as_they_move(hub: Hub, clock: ManualClock) -> None:
    ws = _workspace(hub)
    saved = _save(hub, ws, "regulars", "count(purchase within last 30 days) >= 2")
    assert saved.mode == "streaming" and saved.stream == "pending"
    flush_once(hub)
    with hub.engine.connect() as conn:
        assert segments.get_audience(conn, ws, "regulars").stream == "ready"
    _send(hub, ws, _buy("ann"), _buy("bob"))
    flush_once(hub)
    assert _members(hub, ws, "regulars") == set()
    clock.advance(timedelta(days=1))
    _send(hub, ws, _buy("ann"))
    flush_once(hub)
    ann = _pid(hub, ws, "ann")
    assert _members(hub, ws, "regulars") == {ann}
    assert _changes(hub, ws) == [(ann, "realized", None)]  # streaming: no run
    # time alone: 30 days after ann's first purchase, one of two is left in the window
    clock.advance(timedelta(days=29, hours=1))
    flush_once(hub)
    assert _members(hub, ws, "regulars") == set()
    assert _changes(hub, ws)[-1] == (ann, "exited", None)
    # a batch run at the same instant agrees and changes nothing
    run = segments.run_audience(hub, ws, "regulars", now=hub.clock.now())
    assert (run["members"], run["realized"], run["exited"]) == (0, 0, 0)


def test_sequences_absence_and_timers(hub: Hub, clock: ManualClock) -> None:
    ws = _workspace(hub)
    _save(hub, ws, "abandoned", "cart_add within last 7 days then not purchase within 1 hours")
    _save(
        hub, ws, "browsers", "product_view within last 7 days and not purchase within last 7 days"
    )
    flush_once(hub)
    _send(
        hub,
        ws,
        _track("ann", "cart_add", sku="s1", price=10.0),
        _track("bob", "cart_add", sku="s2", price=10.0),
        _track("cy", "product_view", sku="s3", price=5.0),
    )
    flush_once(hub)
    assert _users(hub, ws, "abandoned", "ann", "bob", "cy") == set()  # the hour is not over
    assert _users(hub, ws, "browsers", "ann", "bob", "cy") == {"cy"}
    clock.advance(timedelta(minutes=30))
    _send(hub, ws, _buy("bob"), _buy("cy"))
    flush_once(hub)
    assert _users(hub, ws, "browsers", "ann", "bob", "cy") == set()
    clock.advance(timedelta(minutes=31))
    flush_once(hub)  # no event: ann's cart is now abandoned, bob bought in time
    assert _users(hub, ws, "abandoned", "ann", "bob", "cy") == {"ann"}
    clock.advance(timedelta(days=7))
    flush_once(hub)  # the cart leaves the 7-day window
    assert _users(hub, ws, "abandoned", "ann", "bob", "cy") == set()


def test_attribute_changes_and_profile_records(hub: Hub, clock: ManualClock) -> None:
    ws = _workspace(hub)
    _save(hub, ws, "german", 'country = "DE"')
    _save(hub, ws, "german buyers", 'in audience "german" and purchase')
    _send(
        hub,
        ws,
        {"type": "identify", "userId": "ann", "traits": {"country": "DE"}},
        {"type": "identify", "userId": "bob", "traits": {"country": "FR"}},
        _buy("ann"),
    )
    flush_once(hub)
    assert _users(hub, ws, "german", "ann", "bob") == {"ann"}
    assert _users(hub, ws, "german buyers", "ann", "bob") == {"ann"}
    clock.advance(timedelta(minutes=1))  # newer traits win
    _send(hub, ws, {"type": "identify", "userId": "ann", "traits": {"country": "AT"}})
    _send(hub, ws, {"type": "identify", "userId": "bob", "traits": {"country": "DE"}})
    flush_once(hub)
    assert _users(hub, ws, "german", "ann", "bob") == {"bob"}
    assert _users(hub, ws, "german buyers", "ann", "bob") == set()
    # profile records carry no event: they queue a recheck
    clock.advance(timedelta(minutes=1))
    Ingestor(hub).native_profiles(
        ws,
        {
            "profiles": [
                {"identities": {"user_id": "ann"}, "attributes": {"country": "DE"}},
                {"identities": {"user_id": "cy"}, "attributes": {"country": "DE"}},
            ]
        },
    )
    flush_once(hub)
    assert _users(hub, ws, "german", "ann", "bob", "cy") == {"ann", "bob", "cy"}
    assert _users(hub, ws, "german buyers", "ann", "bob", "cy") == {"ann"}
    with hub.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(stream_recheck)).scalar_one() == 0


def test_a_merge_rebuilds_the_survivor_from_the_merged_history(hub: Hub) -> None:
    ws = _workspace(hub)
    _save(hub, ws, "twice", "count(purchase) = 2")
    flush_once(hub)
    _send(hub, ws, {**_buy("x"), "userId": None, "anonymousId": "browser-1"})
    _send(hub, ws, _buy("ann"))
    flush_once(hub)  # one purchase each: two profiles, no member
    assert _members(hub, ws, "twice") == set()
    # the browser logs in as ann: the profiles merge, the survivor holds both purchases
    _send(hub, ws, {"type": "identify", "userId": "ann", "anonymousId": "browser-1"})
    flush_once(hub)
    assert _members(hub, ws, "twice") == {_pid(hub, ws, "ann")}
    _send(hub, ws, _buy("ann"))
    flush_once(hub)  # a third purchase, folded once into the rebuilt state
    assert _members(hub, ws, "twice") == set()
    with hub.engine.connect() as conn:
        rows = conn.execute(select(stream_states.c.profile_id)).scalars().all()
    assert _pid(hub, ws, "ann") in rows and len(rows) == 1  # the absorbed profile's went


def test_an_audience_saved_later_is_built_from_the_log(hub: Hub, clock: ManualClock) -> None:
    ws = _workspace(hub)
    for i in range(7):
        _send(hub, ws, *[_buy(f"u{i}", revenue=10.0 * i) for _ in range(i % 3 + 1)])
        clock.advance(timedelta(hours=5))
    flush_once(hub)
    _save(hub, ws, "spenders", "sum(purchase.revenue within last 30 days) >= 60")
    _save(hub, ws, "one-timers", "count(purchase) = 1")
    flush_once(hub)
    with hub.engine.connect() as conn:
        definitions = {
            name: segments.get_audience(conn, ws, name).definition
            for name in ("spenders", "one-timers")
        }
    expected = {
        name: set(segments.member_ids(hub, ws, definition, now=hub.clock.now()))
        for name, definition in definitions.items()
    }
    assert expected["spenders"] and expected["one-timers"]
    for name, members in expected.items():
        assert _members(hub, ws, name) == members, name
    # a new definition is a new build
    _save(hub, ws, "spenders", "sum(purchase.revenue within last 30 days) >= 100")
    flush_once(hub)
    with hub.engine.connect() as conn:
        again = segments.get_audience(conn, ws, "spenders")
    assert again.stream == "ready"
    assert _members(hub, ws, "spenders") == set(
        segments.member_ids(hub, ws, again.definition, now=hub.clock.now())
    )


def test_builds_proceed_in_chunks(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = _workspace(hub)
    _send(hub, ws, *[_buy(f"u{i}") for i in range(12)])
    flush_once(hub)
    monkeypatch.setattr(live, "CHUNK", 5)
    _save(hub, ws, "buyers", "purchase")
    with hub.mover_lock:
        assert live.maintain(hub, recheck_upto=0)["built"] == 5
        with hub.engine.connect() as conn:
            audience = segments.get_audience(conn, ws, "buyers")
            status = live.stream_status(conn, ws, audience.id)
        assert status == {"state": "building", "profiles_done": 5, "profiles": 12}
        assert len(_members(hub, ws, "buyers")) == 5
        # events moving meanwhile reach the built profiles now and the others with the build
        _send(hub, ws, _buy("u0"), _buy("u11"), _buy("newcomer"))
        flush_once(hub)
    assert len(_members(hub, ws, "buyers")) == 13
    with hub.engine.connect() as conn:
        assert segments.get_audience(conn, ws, "buyers").stream == "ready"


def test_profiles_created_during_a_build_are_kept_from_their_first_event(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build goes up to the newest profile when it began; a profile created since has no
    history to build, so its memberships follow its events at once, not once the build
    reaches it."""
    ws = _workspace(hub)
    _send(hub, ws, *[_buy(f"u{i}") for i in range(12)])
    flush_once(hub)
    monkeypatch.setattr(live, "CHUNK", 5)
    _save(hub, ws, "one purchase", "count(purchase) = 1")
    with hub.mover_lock:
        assert live.maintain(hub, recheck_upto=0)["built"] == 5
        _send(hub, ws, _buy("newcomer"), _buy("u11"))
        flush_hub(hub)  # moved and folded, the build not advanced
        assert _users(hub, ws, "one purchase", "newcomer", "u11") == {"newcomer"}
        with hub.engine.connect() as conn:
            audience = segments.get_audience(conn, ws, "one purchase")
            status = live.stream_status(conn, ws, audience.id)
        assert status == {"state": "building", "profiles_done": 6, "profiles": 13}
        assert live.maintain(hub, recheck_upto=0)["built"] == 5
        assert live.maintain(hub, recheck_upto=0)["built"] == 2  # the twelve, not the newcomer
    members = _users(hub, ws, "one purchase", *[f"u{i}" for i in range(12)], "newcomer")
    assert members == {f"u{i}" for i in range(11)} | {"newcomer"}  # u11 bought twice
    with hub.engine.connect() as conn:
        assert segments.get_audience(conn, ws, "one purchase").stream == "ready"
    _send(hub, ws, _buy("newcomer"))
    flush_once(hub)
    assert _users(hub, ws, "one purchase", "newcomer") == set()


def test_a_build_begun_during_a_file_import_has_no_frontier(hub: Hub) -> None:
    """Profiles a running import creates get their events through the log, not the inbox:
    a build begun meanwhile must reach them, so it takes no frontier."""
    ws = _workspace(hub)
    _send(hub, ws, _buy("ann"))
    flush_once(hub)
    now = hub.clock.now()
    with hub.tx() as conn:
        conn.execute(
            insert(imports).values(
                id="imp1",
                workspace_id=ws,
                kind="events",
                file_name="e.csv",
                file_sha256="0" * 64,
                status="running",
                started_at=now,
                actor="t",
            )
        )
    _save(hub, ws, "buyers", "purchase")
    with hub.mover_lock:
        live.maintain(hub, recheck_upto=0)
    with hub.engine.connect() as conn:
        frontier = conn.execute(
            select(audiences.c.stream_frontier).where(audiences.c.workspace_id == ws)
        ).scalar_one()
        [buyers] = live.live_audiences(conn, ws)
    assert frontier is None and buyers.ready
    assert not replace(buyers, ready=False, through="").covers("ffffffff")


def test_short_upkeep_rounds_let_events_through_between_them(hub: Hub, clock: ManualClock) -> None:
    """``serve`` fires due timers a few profiles per round and moves the inbox between rounds:
    an event acknowledged while many timers are due waits for one short round, not for all."""
    ws = _workspace(hub)
    _save(hub, ws, "buyers", "purchase within last 1 hours")
    flush_once(hub)
    _send(hub, ws, *[_buy(f"u{i}") for i in range(7)])
    flush_once(hub)
    assert len(_members(hub, ws, "buyers")) == 7
    clock.advance(timedelta(hours=2))  # seven timers due
    moved, busy = stream_once(hub, chunk=3)
    assert (moved, busy) == (0, True) and len(_members(hub, ws, "buyers")) == 4
    _send(hub, ws, _buy("late"))
    moved, busy = stream_once(hub, chunk=3)  # the new event moves before the next timers
    assert (moved, busy) == (1, True)
    assert _users(hub, ws, "buyers", "late") == {"late"}
    assert len(_members(hub, ws, "buyers")) == 2  # "late" and one of the seven left
    assert stream_once(hub, chunk=3) == (0, False)
    assert _members(hub, ws, "buyers") == {_pid(hub, ws, "late")}


def test_a_crash_between_append_and_cleanup_folds_each_event_once(hub: Hub) -> None:
    if hub.settings.shared_event_log:
        pytest.skip("server mode moves and folds in one transaction: nothing to recover")
    ws = _workspace(hub)
    _save(hub, ws, "exactly two", "count(purchase) = 2")
    flush_once(hub)
    _send(hub, ws, _buy("ann"), _buy("ann"))
    # the mover appended the batch to the log, then the process died before the cleanup
    with hub.engine.connect() as conn:
        rows = fetch_rows(
            conn, f"SELECT {', '.join(INBOX_COLUMNS)}, seq FROM event_inbox ORDER BY seq"
        )
    hub.events.append(_rows_to_arrow(rows), marker=("inbox", int(rows[-1][-1])))
    flush_once(hub)
    assert _members(hub, ws, "exactly two") == {_pid(hub, ws, "ann")}
    assert hub.events.count(ws) == 2
    _send(hub, ws, _buy("ann"))
    flush_once(hub)
    assert _members(hub, ws, "exactly two") == set()


def _cap_states_at_three_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming states keep at most three events per condition (the compiled audiences and
    the lists kept of them are dropped: they were compiled with the usual cap)."""
    monkeypatch.setattr(live, "MAX_EVENTS", 3)
    monkeypatch.setattr(live, "_compiled", {})
    monkeypatch.setattr(live, "_compiled_by_identity", {})
    monkeypatch.setattr(live, "_lives", {})


def test_past_the_state_cap_the_profile_is_evaluated_from_its_history(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cap_states_at_three_events(monkeypatch)
    ws = _workspace(hub)
    _save(hub, ws, "big basket", "avg(purchase.revenue within last 30 days) > 25")
    flush_once(hub)
    _send(hub, ws, *[_buy("ann", revenue=r) for r in (100.0, 10.0, 10.0, 10.0, 10.0)])
    flush_once(hub)
    assert _members(hub, ws, "big basket") == {_pid(hub, ws, "ann")}  # avg 28 over all five
    _send(hub, ws, _buy("ann", revenue=10.0))
    flush_once(hub)
    assert _members(hub, ws, "big basket") == set()  # avg 25


def test_batch_audiences_are_left_to_runs(hub: Hub) -> None:
    ws = _workspace(hub)
    _with_shipping(hub, ws)
    saved = _save(hub, ws, "shipped lately", "purchase where shipped_at within last 2 days")
    assert saved.mode == "batch" and saved.stream is None
    # an audience containing a batch-only one is batch-only too, and changes with it
    outer = _save(hub, ws, "outer", 'in audience "shipped lately" or country = "DE"')
    assert outer.mode == "batch"
    shipped = _buy("ann")
    shipped["properties"]["shipped_at"] = hub.clock.now().isoformat()
    _send(hub, ws, shipped)
    flush_once(hub)
    assert _members(hub, ws, "shipped lately") == set()
    _save(hub, ws, "shipped lately", "purchase")
    with hub.engine.connect() as conn:
        assert segments.get_audience(conn, ws, "outer").mode == "streaming"
    flush_once(hub)
    assert _members(hub, ws, "outer") == {_pid(hub, ws, "ann")}


def test_streamed_memberships_match_batch_runs(hub: Hub, clock: ManualClock) -> None:
    """Random traffic over many rounds; after each, the streamed memberships equal what the
    SQL evaluator finds at the same instant."""
    ws = _workspace(hub)
    definitions = {
        "regulars": "count(purchase within last 3 days) >= 2",
        "spenders": "sum(purchase.revenue within last 2 days) > 50",
        "abandoned": "cart_add within last 2 days then not purchase within 6 hours",
        "viewers": "product_view within last 1 days and not cart_add within last 1 days",
        "funnel": "product_view then cart_add then purchase within 12 hours",
        "germans": 'country = "DE" and app_open within last 2 days',
        "first shoes": 'first(product_view).category = "shoes"',
    }
    for name, text in definitions.items():
        _save(hub, ws, name, text)
    flush_once(hub)
    rng = random.Random(5)
    users = [f"p{i}" for i in range(12)]
    for _round in range(10):
        calls = []
        for _ in range(rng.randrange(3, 15)):
            user = rng.choice(users)
            kind = rng.choice(["purchase", "cart_add", "product_view", "app_open", "identify"])
            if kind == "identify":
                calls.append(
                    {
                        "type": "identify",
                        "userId": user,
                        "traits": {"country": rng.choice(["DE", "FR"])},
                    }
                )
            elif kind == "purchase":
                calls.append(_buy(user, revenue=float(rng.randrange(5, 60))))
            elif kind == "app_open":
                calls.append(_track(user, "app_open", platform="ios"))
            else:
                category = rng.choice(["shoes", "bags"])
                calls.append(_track(user, kind, sku="s", category=category, price=9.0))
        # some events arrive late (an hour to two days old)
        for call in calls:
            if rng.random() < 0.3:
                late = hub.clock.now() - timedelta(minutes=rng.randrange(60, 2880))
                call["timestamp"] = late.isoformat()
        _send(hub, ws, *calls)
        clock.advance(timedelta(hours=rng.choice([1, 3, 7, 13])))
        flush_once(hub)
        with hub.engine.connect() as conn:
            saved = {n: segments.get_audience(conn, ws, n) for n in definitions}
        for name, audience in saved.items():
            expected = set(segments.member_ids(hub, ws, audience.definition, now=hub.clock.now()))
            assert _members(hub, ws, name) == expected, (name, _round)


def _batch_members(hub: Hub, ws: str, name: str) -> set[str]:
    with hub.engine.connect() as conn:
        audience = segments.get_audience(conn, ws, name)
    return set(segments.member_ids(hub, ws, audience.definition, now=hub.clock.now()))


def test_a_definition_changed_and_changed_back_is_built_again(hub: Hub) -> None:
    ws = _workspace(hub)
    _with_shipping(hub, ws)
    _save(hub, ws, "twice", "count(purchase) >= 2")
    flush_once(hub)
    _send(hub, ws, _buy("ann"))
    flush_once(hub)
    _save(hub, ws, "twice", "purchase where shipped_at within last 1 days")  # batch only
    _send(hub, ws, _buy("ann"))
    flush_once(hub)  # moved while the audience was batch: not folded for it
    _save(hub, ws, "twice", "count(purchase) >= 2")
    flush_once(hub)
    assert _members(hub, ws, "twice") == {_pid(hub, ws, "ann")} == _batch_members(hub, ws, "twice")


def test_profile_updates_through_the_api_reach_streaming_audiences(hub: Hub) -> None:
    ws = _workspace(hub)
    _save(hub, ws, "german", 'country = "DE"')
    _send(hub, ws, {"type": "identify", "userId": "ann", "traits": {"country": "FR"}})
    flush_once(hub)
    assert _members(hub, ws, "german") == set()
    with hub.tx() as conn:
        profiles.update_profile(
            conn,
            workspace_id=ws,
            identity=Identity("user_id", "ann"),
            attributes={"country": "DE"},
            consent_updates=[],
            schema=profiles_schema(conn, ws),
            policy=Ingestor(hub).policy,
            actor="t",
            now=hub.clock.now(),
        )
    flush_once(hub)
    assert _members(hub, ws, "german") == {_pid(hub, ws, "ann")}


def profiles_schema(conn: Any, ws: str) -> Any:
    from waymark.profiles.schema_store import current_schema

    return current_schema(conn, ws).schema


def test_events_recovered_after_a_crash_keep_the_logs_order(hub: Hub) -> None:
    if hub.settings.shared_event_log:
        pytest.skip("server mode moves and folds in one transaction: nothing to recover")
    ws = _workspace(hub)
    _save(hub, ws, "converted", "cart_add then purchase within 1 hours")
    flush_once(hub)
    _send(hub, ws, _track("ann", "cart_add", sku="s1", price=10.0))
    with hub.engine.connect() as conn:
        rows = fetch_rows(
            conn, f"SELECT {', '.join(INBOX_COLUMNS)}, seq FROM event_inbox ORDER BY seq"
        )
    hub.events.append(_rows_to_arrow(rows), marker=("inbox", int(rows[-1][-1])))  # then a crash
    _send(hub, ws, _buy("ann"))  # the same instant as the cart, logged after it
    flush_once(hub)
    assert _members(hub, ws, "converted") == {_pid(hub, ws, "ann")}
    assert _batch_members(hub, ws, "converted") == {_pid(hub, ws, "ann")}


def test_a_run_of_a_built_streaming_audience_only_compares(hub: Hub, clock: ManualClock) -> None:
    ws = _workspace(hub)
    _save(hub, ws, "buyers", "purchase within last 1 hours")
    flush_once(hub)
    _send(hub, ws, _buy("ann"))
    flush_once(hub)
    earlier = hub.clock.now() - timedelta(hours=2)
    run = segments.run_audience(hub, ws, "buyers", now=earlier)
    assert (run["status"], run["members"], run["exited"]) == ("compared", 0, 1)
    assert _members(hub, ws, "buyers") == {_pid(hub, ws, "ann")}  # serve's answer stands


def test_answers_for_an_audience_deleted_meanwhile_are_not_written(hub: Hub) -> None:
    ws = _workspace(hub)
    _save(hub, ws, "buyers", "purchase")
    flush_once(hub)
    _send(hub, ws, _buy("ann"))
    folder = live.Folder(hub)
    with hub.engine.connect() as conn:
        rows = fetch_rows(
            conn, f"SELECT {', '.join(INBOX_COLUMNS)}, seq FROM event_inbox ORDER BY seq"
        )
    moved = [live.Moved(r[0], r[1], r[4], datetime_of(r[5]), 1, {}) for r in rows]
    with hub.engine.connect() as conn:
        works = folder.prepare(conn, moved)
    with hub.tx() as conn:
        segments.delete_audience(conn, ws, "buyers", actor="t", now=hub.clock.now())
    with hub.tx() as conn:
        folder.commit(conn, works)
    with hub.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(audience_changes)).scalar_one() == 0


def datetime_of(value: Any) -> Any:
    from datetime import UTC, datetime

    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value


def test_a_streaming_definition_changed_and_back_between_rounds_is_built_again(
    hub: Hub,
) -> None:
    ws = _workspace(hub)
    _save(hub, ws, "two", "count(purchase) = 2")
    flush_once(hub)
    _send(hub, ws, _buy("ann"), _buy("ann"))
    flush_once(hub)
    assert _members(hub, ws, "two") == {_pid(hub, ws, "ann")}
    _save(hub, ws, "two", "count(purchase) = 3")
    _send(hub, ws, _buy("ann"))
    Ingestor(hub).flush()  # a move with no upkeep round: the changed audience is not folded
    _save(hub, ws, "two", "count(purchase) = 2")
    flush_once(hub)
    assert _members(hub, ws, "two") == set() == _batch_members(hub, ws, "two")


def _stored(hub: Hub, ws: str, pid: str) -> dict[str, Any]:
    with hub.engine.connect() as conn:
        text_ = conn.execute(
            select(stream_states.c.states).where(
                stream_states.c.workspace_id == ws, stream_states.c.profile_id == pid
            )
        ).scalar_one()
    return dict(json.loads(text_))


def test_state_rows_keep_each_audience_as_text_read_only_when_needed(
    hub: Hub, clock: ManualClock
) -> None:
    """A row keeps each audience's state as JSON text with its timer: an event of one audience
    rewrites that audience's entry and leaves the others as they were; rows written in the
    earlier form (``{"s": state, "d": due}``) still read, and are rewritten in the new one."""
    ws = _workspace(hub)
    _save(hub, ws, "buyers", "count(purchase within last 30 days) >= 2")
    _save(hub, ws, "viewers", "product_view within last 7 days")
    flush_once(hub)
    _send(hub, ws, _buy("ann"), _track("ann", "product_view", sku="s1", price=5.0))
    flush_once(hub)
    ann = _pid(hub, ws, "ann")
    with hub.engine.connect() as conn:
        ids = {a.name: a.id for a in live.live_audiences(conn, ws)}
    first = _stored(hub, ws, ann)
    assert set(first) == {ids["buyers"], ids["viewers"]}
    for _due, state in first.values():
        assert isinstance(state, str) and json.loads(state)["w"] is not None
    assert first[ids["buyers"]][0] is None  # one purchase: time alone changes nothing
    assert isinstance(first[ids["viewers"]][0], int)  # the view leaves the window
    clock.advance(timedelta(hours=1))
    _send(hub, ws, _buy("ann"))
    flush_once(hub)
    second = _stored(hub, ws, ann)
    assert second[ids["viewers"]] == first[ids["viewers"]]  # not parsed, written back as read
    assert second[ids["buyers"]] != first[ids["buyers"]]
    assert _users(hub, ws, "buyers", "ann") == {"ann"}
    # the earlier form: each entry an object with the state itself
    older = {aid: {"s": json.loads(state), "d": due} for aid, (due, state) in second.items()}
    with hub.tx() as conn:
        conn.execute(
            stream_states.update()
            .where(stream_states.c.workspace_id == ws, stream_states.c.profile_id == ann)
            .values(states=json.dumps(older))
        )
    clock.advance(timedelta(days=8))  # the view leaves its window: the timer fires
    flush_once(hub)
    assert _users(hub, ws, "viewers", "ann") == set()
    assert _users(hub, ws, "buyers", "ann") == {"ann"}
    _send(hub, ws, _track("ann", "product_view", sku="s2", price=5.0))
    flush_once(hub)
    assert _users(hub, ws, "viewers", "ann") == {"ann"}
    for due, state in _stored(hub, ws, ann).values():
        assert isinstance(state, str) and (due is None or isinstance(due, int))
    # unreadable entries (not written by Waymark) neither crash a round nor stay
    with hub.tx() as conn:
        conn.execute(
            stream_states.update()
            .where(stream_states.c.workspace_id == ws, stream_states.c.profile_id == ann)
            .values(states=json.dumps({ids["viewers"]: [], ids["buyers"]: "junk", "x": [1]}))
        )
    _send(hub, ws, _track("ann", "product_view", sku="s3", price=5.0))
    flush_once(hub)
    assert _users(hub, ws, "viewers", "ann") == {"ann"}
    assert set(_stored(hub, ws, ann)) == {ids["viewers"]}


def _embedded_only(hub: Hub) -> None:
    if hub.events.next_seq() is None:
        pytest.skip("the log numbers rows from a sequence: the mover appends, then folds")


def test_a_history_read_appends_the_batch_first(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mover folds before it appends the batch; a state past its cap reads the
    profile's history, which must hold the batch: the read has the batch appended first."""
    _embedded_only(hub)
    _cap_states_at_three_events(monkeypatch)
    ws = _workspace(hub)
    _save(hub, ws, "big basket", "avg(purchase.revenue within last 30 days) > 25")
    flush_once(hub)
    _send(hub, ws, *[_buy("ann", revenue=r) for r in (100.0, 10.0, 10.0, 10.0, 10.0)])
    flush_once(hub)
    assert _members(hub, ws, "big basket") == {_pid(hub, ws, "ann")}  # avg 28 over all five
    _send(hub, ws, _buy("ann", revenue=10.0))
    flush_once(hub)
    assert _members(hub, ws, "big basket") == set()  # avg 25 over the six
    assert hub.events.count(ws) == 6 and _inbox(hub) == []


def _inbox(hub: Hub) -> list[tuple[Any, ...]]:
    """``(seq, log_seq)`` of every inbox row."""
    with hub.engine.connect() as conn:
        return [tuple(r) for r in fetch_rows(conn, "SELECT seq, log_seq FROM event_inbox")]


def _logged_seqs(hub: Hub, pid: str) -> list[int]:
    return [
        seq
        for (seq,) in hub.events.sql(
            "SELECT seq FROM events WHERE profile_id = ? ORDER BY seq", [pid]
        )
    ]


def test_an_import_between_the_fold_and_the_append_takes_later_numbers(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold is computed and committed with numbers the log reserved for the batch; an
    append coming between (a file import) takes numbers after them, and the batch is
    appended with its own, so the states order events as the log does."""
    _embedded_only(hub)
    ws = _workspace(hub)
    _save(hub, ws, "last shoes", 'last(purchase).category = "shoes"')
    flush_once(hub)
    real = hub.events.append_numbered
    taken: list[list[int] | None] = []

    def preceded(table: Any, *, marker: Any = None, first: Any = None) -> Any:
        if not taken:  # an import's chunk lands between the reservation and this append
            taken.append(real(table.slice(0, 1), marker=("import:x", 1)))
        return real(table, marker=marker, first=first)

    monkeypatch.setattr(hub.events, "append_numbered", preceded)
    _send(hub, ws, _track("ann", "purchase", order_id="o1", revenue=5.0, category="shoes"))
    flush_once(hub)
    ann = _pid(hub, ws, "ann")
    logged = _logged_seqs(hub, ann)
    assert taken and taken[0] is not None and len(logged) == 2  # the batch, the import's copy
    (state_text,) = [state for _due, state in _stored(hub, ws, ann).values()]
    kept = json.loads(state_text)["n"][0]["l"]  # the last purchase: [timestamp, seq, value]
    assert kept[1] == logged[0] < taken[0][0] == logged[1]
    assert _users(hub, ws, "last shoes", "ann") == {"ann"}
    assert hub.events.next_seq() == logged[1] + 1


def _read_inbox(hub: Hub) -> list[Any]:
    """The inbox as the mover reads it."""
    with hub.engine.connect() as conn:
        return fetch_rows(
            conn, f"SELECT {', '.join(INBOX_COLUMNS)}, log_seq, seq FROM event_inbox ORDER BY seq"
        )


@pytest.mark.parametrize("capped", [False, True], ids=["stamped", "history-read"])
def test_a_batch_another_mover_took_first_is_not_folded_again(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, capped: bool
) -> None:
    """Two movers read the same batch (two hubs of one process on one log): the second one
    writes nothing, whether the first one stamped the rows or (a history read) appended them
    first and deleted them."""
    _embedded_only(hub)
    if capped:
        _cap_states_at_three_events(monkeypatch)
    ws = _workspace(hub)
    _save(hub, ws, "exactly five", "count(purchase) = 5")
    flush_once(hub)
    _send(hub, ws, *[_buy("ann") for _ in range(5)])
    rows = _read_inbox(hub)
    upto = int(rows[-1][-1])
    first = mover._move_folding(hub.engine, hub.events, live.Folder(hub), rows, upto=upto)
    again = mover._move_folding(hub.engine, hub.events, live.Folder(hub), rows, upto=upto)
    assert (first, again) == (True, False)
    assert hub.events.count(ws) == 5 and _inbox(hub) == []
    assert _members(hub, ws, "exactly five") == {_pid(hub, ws, "ann")}  # not ten


class _Crash(Exception):
    pass


def _crash_at_append(monkeypatch: pytest.MonkeyPatch, hub: Hub) -> None:
    """The next append of a folded batch (numbers given) fails, as if the process died."""
    real = hub.events.append_numbered

    def dying(table: Any, *, marker: Any = None, first: Any = None) -> Any:
        if first is not None:
            monkeypatch.setattr(hub.events, "append_numbered", real)
            raise _Crash
        return real(table, marker=marker, first=first)

    monkeypatch.setattr(hub.events, "append_numbered", dying)


def _reopened(hub: Hub) -> Hub:
    """The hub of a new process on the same stores (this one closed)."""
    settings, clock = hub.settings, hub.clock
    hub.close()
    return Hub.open(settings, clock)


def test_a_crash_between_the_fold_and_the_append_appends_as_folded(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memberships are committed before the append: a crash between keeps each folded row's
    log number in the inbox; after the restart the rows are appended with those numbers and
    not folded again, and an import that comes first takes numbers after them."""
    _embedded_only(hub)
    ws = _workspace(hub)
    _save(hub, ws, "exactly two", "count(purchase) = 2")
    _save(hub, ws, "last shoes", 'last(purchase).category = "shoes"')
    flush_once(hub)
    _send(hub, ws, _buy("ann"), _track("ann", "purchase", order_id="o2", category="shoes"))
    _crash_at_append(monkeypatch, hub)
    with pytest.raises(_Crash):
        flush_once(hub)
    ann = _pid(hub, ws, "ann")
    assert _members(hub, ws, "exactly two") == {ann}  # visible before the append
    marked = _inbox(hub)
    assert len(marked) == 2 and all(log_seq is not None for _seq, log_seq in marked)
    assert hub.events.count(ws) == 0
    hub = _reopened(hub)
    try:
        with hub.engine.connect() as conn:
            rows = fetch_rows(conn, f"SELECT {', '.join(INBOX_COLUMNS)} FROM event_inbox")
        # an import (of a copy of one of them) before the mover's first round
        imported = hub.events.append_numbered(_rows_to_arrow(rows[:1]), marker=("import:y", 1))
        assert imported is not None and imported[0] > max(log_seq for _s, log_seq in marked)
        flush_once(hub)
        assert _logged_seqs(hub, ann) == [*sorted(log_seq for _s, log_seq in marked), *imported]
        assert _inbox(hub) == [] and hub.events.count(ws) == 3
        assert _members(hub, ws, "exactly two") == {ann}  # not folded twice (four)
        assert _users(hub, ws, "last shoes", "ann") == {"ann"}
        _send(hub, ws, _buy("ann"))
        flush_once(hub)
        assert _members(hub, ws, "exactly two") == set()
        assert _members(hub, ws, "last shoes") == set()
        assert hub.events.count(ws) == 4
    finally:
        hub.close()


def test_a_crash_between_the_append_and_the_cleanup_only_cleans_up(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folded, then appended, then a crash before the inbox delete: the rows are deleted, not
    folded nor appended again."""
    _embedded_only(hub)
    ws = _workspace(hub)
    _save(hub, ws, "exactly two", "count(purchase) = 2")
    flush_once(hub)
    _send(hub, ws, _buy("ann"), _buy("ann"))
    real = mover.write_tx
    writes = []

    def dying(engine: Any) -> Any:
        writes.append(1)
        if len(writes) == 2:  # the cleanup after the append
            raise _Crash
        return real(engine)

    monkeypatch.setattr(mover, "write_tx", dying)
    with pytest.raises(_Crash):
        flush_once(hub)
    monkeypatch.setattr(mover, "write_tx", real)
    assert len(_inbox(hub)) == 2 and hub.events.count(ws) == 2
    flush_once(hub)
    assert _inbox(hub) == [] and hub.events.count(ws) == 2
    assert _members(hub, ws, "exactly two") == {_pid(hub, ws, "ann")}
    _send(hub, ws, _buy("ann"))
    flush_once(hub)
    assert _members(hub, ws, "exactly two") == set()


def _realize(hub: Hub, ws: str, name: str, pid: str) -> None:
    """A realized membership that no streaming state accounts for."""
    with hub.tx() as conn:
        aid = conn.execute(
            select(audiences.c.id).where(audiences.c.workspace_id == ws, audiences.c.name == name)
        ).scalar_one()
        conn.execute(
            insert(audience_members).values(
                workspace_id=ws,
                audience_id=aid,
                profile_id=pid,
                status="realized",
                realized_at=hub.clock.now(),
                exited_at=None,
            )
        )


def test_answers_every_new_profile_shares_are_written_against_the_membership(
    hub: Hub,
) -> None:
    ws = _workspace(hub)
    _save(hub, ws, "lapsed", "not purchase within last 7 days")
    _save(hub, ws, "buyers", "purchase")
    flush_once(hub)
    # first events the audiences do not read: both answer as for any profile without events
    _send(hub, ws, _track("bob", "page"), _track("cy", "page"), _buy("dee"))
    _realize(hub, ws, "buyers", _pid(hub, ws, "cy"))
    _realize(hub, ws, "buyers", _pid(hub, ws, "dee"))
    flush_once(hub)
    assert _users(hub, ws, "lapsed", "bob", "cy", "dee") == {"bob", "cy"}
    # cy's membership had no purchase behind it; dee's first event is one (its own answer
    # wins over the one shared by new profiles)
    assert _users(hub, ws, "buyers", "bob", "cy", "dee") == {"dee"}
    changes = {(p, c) for p, c, _run in _changes(hub, ws)}
    assert (_pid(hub, ws, "cy"), "exited") in changes
    assert (_pid(hub, ws, "dee"), "exited") not in changes
