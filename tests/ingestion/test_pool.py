"""Ingestion worker processes: the same outcomes as the API process's own committer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from waymark.access import service as access
from waymark.core.errors import InvalidInput
from waymark.hub import Hub
from waymark.ingestion.pool import IngestPool, WorkerFailed
from waymark.ingestion.service import IngestResult
from waymark.profiles import service as profiles


@pytest.fixture
def pool(hub: Hub) -> Iterator[IngestPool]:
    p = IngestPool(hub.settings, 1, parsers=1)  # the default shape of `serve`
    try:
        yield p
    finally:
        p.close()


def _workspace(hub: Hub) -> str:
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="shop", actor="t", at=hub.clock.now())
    return ws.id


def _batch(*ids: str) -> bytes:
    return orjson.dumps(
        {
            "batch": [
                {
                    "type": "track",
                    "event": "product_view",
                    "messageId": mid,
                    "userId": f"user-{mid}",
                    "properties": {"sku": "S1"},
                }
                for mid in ids
            ]
        }
    )


def _one_good_one_bad(good: str, bad: str) -> bytes:
    """A batch whose second item has no identity."""
    return orjson.dumps(
        {
            "batch": [
                {"type": "track", "event": "a", "messageId": good, "userId": "u1"},
                {"type": "track", "event": "b", "messageId": bad},
            ]
        }
    )


def _store(pool: IngestPool, hub: Hub, ws: str, raw: bytes, call: str = "batch") -> IngestResult:
    return asyncio.run(pool.store("segment", call, ws, raw, hub.clock.now()))


def test_a_worker_stores_a_batch_durably_and_a_retry_adds_nothing(
    hub: Hub, pool: IngestPool
) -> None:
    ws = _workspace(hub)
    first = _store(pool, hub, ws, _batch("m1", "m2", "m3"))
    assert (first.accepted, first.duplicates) == (3, 0)
    again = _store(pool, hub, ws, _batch("m1", "m2", "m3"))
    assert (again.accepted, again.duplicates) == (0, 3)
    # committed by the worker, so this process sees it at once
    with hub.engine.connect() as conn:
        found = profiles.lookup(conn, ws, "user_id", "user-m2")
    assert [(i["namespace"], i["value"]) for i in found["identities"]] == [("user_id", "user-m2")]


def test_bad_items_are_reported_and_a_malformed_body_is_an_error_with_its_reason(
    hub: Hub, pool: IngestPool
) -> None:
    ws = _workspace(hub)
    result = _store(pool, hub, ws, _one_good_one_bad("ok-1", "bad-1"))
    assert result.accepted == 1
    assert [e.index for e in result.rejected] == [1]
    with pytest.raises(InvalidInput) as caught:
        _store(pool, hub, ws, b'{"batch": [')
    assert "malformed JSON" in str(caught.value)
    with pytest.raises(InvalidInput) as empty:
        _store(pool, hub, ws, b'{"batch": []}')
    assert empty.value.issues[0].path == "batch"


def test_concurrent_requests_are_each_answered_with_their_own_outcome(
    hub: Hub, pool: IngestPool
) -> None:
    ws = _workspace(hub)

    async def many() -> list[IngestResult]:
        return await asyncio.gather(
            *(
                pool.store("segment", "batch", ws, _batch(f"c{n}-a", f"c{n}-b"), hub.clock.now())
                for n in range(40)
            )
        )

    results = asyncio.run(many())
    assert [r.accepted for r in results] == [2] * 40
    assert sum(len(r.accepted_indices) for r in results) == 80


def _wait_for_live_worker(
    pool: IngestPool, not_this: object, seconds: float = 60, *, role: str = "store"
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        workers = pool._workers if role == "store" else pool._parsers
        if workers[0] is not not_this and workers[0].alive:
            return
        time.sleep(0.05)
    raise AssertionError("no new worker started")


def _kill(worker: Any) -> None:
    """Kill a worker process outright and wait until the pool has seen it go."""
    assert worker.process.pid is not None
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.join(10)
    worker.reader.join(10)


def test_a_dead_worker_is_replaced_in_the_background(hub: Hub, pool: IngestPool) -> None:
    ws = _workspace(hub)
    assert _store(pool, hub, ws, _batch("before")).accepted == 1
    worker = pool._workers[0]
    _kill(worker)
    # until the new one is up, requests are refused at once (503), never left waiting
    with contextlib.suppress(WorkerFailed):
        _store(pool, hub, ws, _batch("meanwhile"))
    _wait_for_live_worker(pool, worker)
    assert _store(pool, hub, ws, _batch("after")).accepted == 1


def test_without_a_parse_worker_the_store_worker_parses_and_a_new_one_starts(
    hub: Hub, pool: IngestPool
) -> None:
    ws = _workspace(hub)
    parser = pool._parsers[0]
    _kill(parser)
    # a request in the parser's hands at that moment fails (503); the next ones go straight
    # to the store worker, which parses them itself, with the same outcome
    with contextlib.suppress(WorkerFailed):
        _store(pool, hub, ws, _batch("meanwhile"))
    alone = _store(pool, hub, ws, _one_good_one_bad("np-1", "np-2"))
    assert alone.accepted == 1
    assert [e.index for e in alone.rejected] == [1]
    _wait_for_live_worker(pool, parser, role="parse")
    assert pool._parsers[0].process.pid != parser.process.pid
    assert _store(pool, hub, ws, _batch("after")).accepted == 1


def test_a_batch_is_validated_by_the_parse_worker_against_the_schema_in_force(
    hub: Hub, pool: IngestPool
) -> None:
    from waymark.profiles.schema_store import save_schema

    ws = _workspace(hub)
    with hub.tx() as conn:
        save_schema(
            conn,
            workspace_id=ws,
            document={
                "unknown_events": "reject",
                "events": {"purchase": {"properties": {"revenue": {"type": "number"}}}},
            },
            actor="t",
            at=hub.clock.now(),
        )
    raw = orjson.dumps(
        {
            "batch": [
                {
                    "type": "track",
                    "event": "purchase",
                    "messageId": "s1",
                    "userId": "u1",
                    "properties": {"revenue": 12.5},
                },
                {
                    "type": "track",
                    "event": "purchase",
                    "messageId": "s2",
                    "userId": "u1",
                    "properties": {"revenue": "lots"},
                },
                {"type": "track", "event": "unheard_of", "messageId": "s3", "userId": "u1"},
            ]
        }
    )
    result = _store(pool, hub, ws, raw)
    assert result.accepted == 1
    assert [(e.index, e.issues[0].path) for e in result.rejected] == [
        (1, "properties.revenue"),
        (2, "event"),
    ]


def test_ctrl_c_reaches_the_api_process_not_the_workers(hub: Hub, pool: IngestPool) -> None:
    ws = _workspace(hub)
    worker = pool._workers[0]
    assert worker.process.pid is not None
    os.kill(worker.process.pid, signal.SIGINT)
    os.kill(worker.process.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert worker.alive  # it stops when the pool closes, after finishing its requests
    assert _store(pool, hub, ws, _batch("still-here")).accepted == 1


def test_a_request_whose_caller_gave_up_does_not_disturb_the_next(
    hub: Hub, pool: IngestPool
) -> None:
    ws = _workspace(hub)

    async def impatient() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                pool.store("segment", "batch", ws, _batch("gave-up"), hub.clock.now()), 0.0001
            )

    asyncio.run(impatient())  # its event loop is closed when the worker answers
    assert _store(pool, hub, ws, _batch("next-one")).accepted == 1
    assert pool._workers[0].alive


def test_a_closed_pool_refuses_work_with_a_retryable_error(hub: Hub) -> None:
    pool = IngestPool(hub.settings, 1)
    worker = pool._workers[0]
    pool.close()
    assert not worker.process.is_alive()
    with pytest.raises(WorkerFailed):
        _store(pool, hub, "ws", _batch("late"))


def test_requests_in_flight_when_a_worker_dies_are_answered_with_an_error(hub: Hub) -> None:
    pool = IngestPool(hub.settings, 1)
    try:
        ws = _workspace(hub)
        worker = pool._workers[0]

        async def send_then_kill() -> None:
            pending = asyncio.ensure_future(
                pool.store("segment", "batch", ws, _batch("k1"), hub.clock.now())
            )
            await asyncio.sleep(0)  # the request is in the pipe
            assert worker.process.pid is not None
            os.kill(worker.process.pid, signal.SIGKILL)
            try:
                await asyncio.wait_for(pending, 30)
            except WorkerFailed:
                return  # killed before it answered: the client retries
            # or it answered first: then it was stored

        asyncio.run(send_then_kill())
    finally:
        pool.close()


def test_the_api_hands_ingestion_to_its_workers_with_the_same_answers(hub: Hub) -> None:
    import base64

    from fastapi.testclient import TestClient

    from waymark.api.app import create_app

    with hub.tx() as conn:
        ws, write, _admin = access.create_workspace(
            conn, name="shop", actor="t", at=hub.clock.now()
        )
    basic = {"Authorization": "Basic " + base64.b64encode(f"{write.secret}:".encode()).decode()}
    assert hub.settings.ingest_workers >= 1
    with TestClient(create_app(hub, background=True)) as client:
        ok = client.post("/v1/batch", content=_batch("api-1", "api-2"), headers=basic)
        assert ok.status_code == 200, ok.text
        assert ok.json()["accepted"] == 2
        # the write key in the body, as some Segment clients send it
        body = orjson.dumps({"writeKey": write.secret, "userId": "u9", "event": "x"})
        assert client.post("/v1/track", content=body).json()["accepted"] == 1
        bad = client.post("/v1/batch", content=b"{nope", headers=basic)
        assert bad.status_code == 400
        assert "malformed JSON" in bad.text
        denied = client.post(
            "/v1/batch", content=_batch("api-3"), headers={"Authorization": "Basic eDo="}
        )
        assert denied.status_code == 401
        native = client.post(
            "/v1/events",
            content=orjson.dumps({"events": [{"event": "y", "identities": {"user_id": "n1"}}]}),
            headers=basic,
        )
        assert native.status_code == 200, native.text
        assert native.json()["accepted"] == 1
    with hub.engine.connect() as conn:
        assert profiles.lookup(conn, ws.id, "user_id", "n1")["id"]
