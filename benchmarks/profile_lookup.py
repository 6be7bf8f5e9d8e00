"""Profile look-up by identity, in process, on the embedded default.

Generates the demo shop with ``--profiles`` customers, imports the profiles file, then looks up
``--lookups`` random customers by e-mail (and by user id) through the same service the API
calls: identity -> profile, attributes, identities, consents. Prints p50/p99/max latency.

    PYTHONPATH=src .venv/bin/python benchmarks/profile_lookup.py --profiles 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from waymark.access import service as access
from waymark.demo.generate import generate
from waymark.hub import Hub
from waymark.ingestion.files import run_import
from waymark.profiles import service as profiles
from waymark.settings import load_settings

from _machine import machine, peak_rss_mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profiles", type=int, default=100_000)
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--data", type=Path, default=None, help="reuse a generated dataset folder")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="waymark-lookup-"))
    data = args.data or work / "dataset"
    if args.data is None:
        generate(data, profiles=args.profiles, end=datetime(2026, 6, 1, tzinfo=UTC), days=30)
    hub = Hub.open(load_settings(environ={}, data_dir=work / "hub"))
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="bench", actor="bench", at=hub.clock.now())
    t0 = time.monotonic()
    report = run_import(
        hub, workspace_id=ws.id, kind="profiles", path=data / "profiles.parquet", actor="bench"
    )
    load_s = time.monotonic() - t0
    n = report.to_json().get("rows_accepted", args.profiles)

    rng = random.Random(7)
    import pyarrow.parquet as pq

    table = pq.read_table(data / "profiles.parquet", columns=["user_id", "email"])
    emails = table.column("email").to_pylist()
    users = table.column("user_id").to_pylist()
    results = {}
    for label, namespace, values in (("email", "email", emails), ("user_id", "user_id", users)):
        picks = [values[rng.randrange(len(values))] for _ in range(args.lookups)]
        latencies = []
        with hub.engine.connect() as conn:
            for value in picks:
                s = time.perf_counter()
                profiles.lookup(conn, ws.id, namespace, value)
                latencies.append(time.perf_counter() - s)
                conn.rollback()  # one read transaction per look-up, as a request would
        latencies.sort()
        results[label] = {
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
            "max_ms": round(latencies[-1] * 1000, 3),
        }
        print(
            f"look-up by {label} among {n:,} profiles: p50 {results[label]['p50_ms']} ms, "
            f"p99 {results[label]['p99_ms']} ms, max {results[label]['max_ms']} ms"
        )
    hub.close()
    print(
        json.dumps(
            {
                "benchmark": "profile_lookup",
                "profiles": n,
                "lookups": args.lookups,
                "import_seconds": round(load_s, 1),
                "results": results,
                "peak_rss_mib": peak_rss_mib(),
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
