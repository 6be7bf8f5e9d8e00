"""Benchmark: two parts of the ingestion paths, measured alone.

1. Appending synthetic log rows to the embedded DuckDB event log (``DuckDBEventLog.append``),
   with DuckDB's default string compression and with ``dict_fsst`` disabled: time and file size.
2. Pickling a parsed, validated batch of Segment track events as the parse worker hands it to
   the store worker, and rebuilding it: µs per event.

    PYTHONPATH=src .venv/bin/python benchmarks/hot_path_parts.py --rows 2000000
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from waymark.ingestion.payloads import parse_segment_call
from waymark.ingestion.service import check_events
from waymark.model.schemas import Schema
from waymark.storage.eventlog import DuckDBEventLog

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine


def _log_rows(n: int, start: int, rng: np.random.Generator) -> pa.Table:
    """``n`` log rows shaped like the demo shop's: unique message ids, a few events per
    profile, small JSON properties."""
    people = rng.integers(0, max(n // 15, 1), n)
    person = pc.cast(pa.array(people + start // 15), pa.string())
    seq = pc.cast(pa.array(np.arange(start, start + n)), pa.string())
    prices = pc.cast(pa.array(rng.integers(100, 20_000, n) / 100), pa.string())
    stamps = pa.array(
        1_780_000_000_000_000 + rng.integers(0, 180 * 86_400_000_000, n), pa.int64()
    ).cast(pa.timestamp("us", tz="UTC"))

    def text(*parts: object) -> pa.Array:
        return pc.binary_join_element_wise(*parts, "")

    return pa.table(
        {
            "workspace_id": pa.array(["0190a1b2-0000-7000-8000-000000000001"] * n),
            "profile_id": text("0190a1b2-", person, "-7000-8000-000000000000"),
            "message_id": text("019e9477-", seq, "-7759-bd1c-766460ed2625"),
            "type": pa.array(["track"] * n),
            "name": pa.array(
                np.array(["product_view", "page", "cart_add", "purchase"])[rng.integers(0, 4, n)]
            ),
            "timestamp": stamps,
            "received_at": stamps,
            "identities": text('{"user_id":"u', person, '","anonymous_id":"d', person, '"}'),
            "properties": text('{"sku":"SKU-', person, '","price":', prices, "}"),
            "traits": pa.array(["{}"] * n),
            "context": pa.array(["{}"] * n),
            "source": pa.array(["import"] * n),
            "flags": pa.array(["[]"] * n),
        }
    )


def append(rows: int, *, dict_fsst: bool) -> dict[str, float]:
    """Append ``rows`` rows in groups of 200,000 (as an import does); time and file size."""
    rng = np.random.default_rng(7)
    groups = [_log_rows(min(200_000, rows - s), s, rng) for s in range(0, rows, 200_000)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.duckdb"
        log = DuckDBEventLog(path)
        if not dict_fsst:
            log.sql("SET disabled_compression_methods = 'dict_fsst'")
        started = time.perf_counter()
        for group in groups:
            log.append(group)
        seconds = time.perf_counter() - started
        log.close()
        size = path.stat().st_size
    return {"seconds": round(seconds, 2), "rows_per_s": round(rows / seconds), "mb": size // 10**6}


def pickling(batches: int = 200) -> dict[str, float]:
    """µs per event to pickle a checked batch of 100 track events and to load it back."""
    body = orjson.dumps(
        {
            "batch": [
                {
                    "type": "track",
                    "event": "product_view",
                    "messageId": f"b1-{i}",
                    "userId": f"u{i}",
                    "anonymousId": f"d{i}",
                    "properties": {"sku": f"S{i}", "price": 19.5},
                }
                for i in range(100)
            ]
        }
    )
    parsed = parse_segment_call(
        "batch", orjson.loads(body), workspace_id="w", received_at=datetime.now(UTC)
    )
    checked = check_events(parsed, Schema.empty())
    started = time.perf_counter()
    for _ in range(batches):
        blob = pickle.dumps(checked, protocol=pickle.HIGHEST_PROTOCOL)
    dumped = time.perf_counter()
    for _ in range(batches):
        pickle.loads(blob)
    loaded = time.perf_counter()
    events = batches * 100
    return {
        "dumps_us": round((dumped - started) / events * 1e6, 2),
        "loads_us": round((loaded - dumped) / events * 1e6, 2),
        "bytes_per_batch": len(blob),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=2_000_000)
    args = ap.parse_args()
    result = {
        "benchmark": "hot_path_parts",
        "rows": args.rows,
        "append_default": append(args.rows, dict_fsst=True),
        "append_without_dict_fsst": append(args.rows, dict_fsst=False),
        "event_pickle": pickling(),
        "machine": machine(),
    }
    a, b, p = result["append_default"], result["append_without_dict_fsst"], result["event_pickle"]
    print(
        f"append {args.rows:,} log rows: {a['seconds']} s, {a['mb']} MB (default); "
        f"{b['seconds']} s, {b['mb']} MB (dict_fsst disabled)"
    )
    print(f"pickle a checked batch: {p['dumps_us']} µs/event to dump, {p['loads_us']} to load")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
