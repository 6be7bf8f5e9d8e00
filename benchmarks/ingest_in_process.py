"""Ingestion without HTTP: the cost per event of each step of one batch transaction.

Feeds Segment ``batch`` bodies of 100 track events (userId + anonymousId, ``--users`` people)
straight to the ingestion service on a fresh embedded hub, timing each step. The first
``--warmup`` batches are not counted.

    PYTHONPATH=src .venv/bin/python benchmarks/ingest_in_process.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from waymark.access import service as access
from waymark.hub import Hub
from waymark.identity import service as identity_service
from waymark.ingestion import service as ingest
from waymark.ingestion.payloads import parse_segment_call
from waymark.ingestion.pipeline import policy_of
from waymark.model.schemas import Schema
from waymark.settings import load_settings

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine

SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--users", type=int, default=20_000)
    args = ap.parse_args()

    ingest.claim_message_ids = timed("claim message ids", ingest.claim_message_ids)
    ingest.insert_inbox = timed("inbox insert", ingest.insert_inbox)
    ingest.validate_event_item = timed("validate", ingest.validate_event_item)
    writer = identity_service.ProfileWriter
    writer.preload = timed("identity look-up", writer.preload)  # type: ignore[method-assign]
    writer.record = timed("identity resolution", writer.record)  # type: ignore[method-assign]
    writer.flush = timed("profile writes", writer.flush)  # type: ignore[method-assign]

    hub = Hub.open(load_settings(environ={}, data_dir=Path(tempfile.mkdtemp())))
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="bench", actor="bench", at=hub.clock.now())
    policy = policy_of(hub)
    bodies = [
        orjson.dumps(
            {
                "batch": [
                    {
                        "type": "track",
                        "event": "product_view",
                        "messageId": f"b{n}-{i}",
                        "userId": f"u{(n * 31 + i) % args.users}",
                        "anonymousId": f"d{(n * 31 + i) % args.users}",
                        "properties": {"sku": f"S{i}", "price": 19.5},
                    }
                    for i in range(100)
                ]
            }
        )
        for n in range(args.batches)
    ]
    counted = 0
    started = 0.0
    for n, raw in enumerate(bodies):
        if n == args.warmup:
            SPENT.clear()
            started = time.perf_counter()
        t = time.perf_counter()
        parsed = parse_segment_call(
            "batch", orjson.loads(raw), workspace_id=ws.id, received_at=hub.clock.now()
        )
        SPENT["parse + normalize"] += time.perf_counter() - t
        t = time.perf_counter()
        with hub.tx() as conn:
            ingest.ingest_events(
                conn,
                workspace_id=ws.id,
                parsed=parsed,
                schema=Schema.empty(),
                policy=policy,
                now=hub.clock.now(),
            )
            t_commit = time.perf_counter()
        SPENT["commit"] += time.perf_counter() - t_commit
        SPENT["transaction total"] += time.perf_counter() - t
        if n >= args.warmup:
            counted += 100
    elapsed = time.perf_counter() - started
    hub.close()
    per_event = {
        k: round(v / counted * 1e6, 1) for k, v in sorted(SPENT.items(), key=lambda kv: -kv[1])
    }
    print(f"{counted / elapsed:,.0f} events/s in process over {counted:,} events")
    for name, us in per_event.items():
        print(f"  {name:22s} {us:7.1f} µs/event")
    print(
        json.dumps(
            {
                "benchmark": "ingest_in_process",
                "events": counted,
                "events_per_s": round(counted / elapsed),
                "us_per_event": per_event,
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
