"""Benchmark: ten typical audiences evaluated in batch on the embedded DuckDB event log.

    PYTHONPATH=src .venv/bin/python benchmarks/import_files.py --profiles 1000000 \\
        --workdir /tmp/aud1m --keep           # once: generates and imports the demo shop
    PYTHONPATH=src .venv/bin/python benchmarks/audiences_batch.py --data /tmp/aud1m/data

Opens the data folder as ``waymark serve`` would (the event log with its configured memory
limit), reads the snapshot of profiles and consents once (timed on its own), then for each
audience runs the SQL that Waymark generates and a hand-written DuckDB query for the same
audience on the same connection, alternately, ``--repeat`` times each. Reports the median of
each, their ratio, and checks that both return exactly the same members. ``now`` is the newest
event's timestamp, so the windows hold data however long ago the files were generated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from waymark.hub import Hub
from waymark.segmentation import service as segments
from waymark.segmentation.compile.sql import compile_sql
from waymark.settings import load_settings

from _machine import machine, peak_rss_mib


def _references(ws: str, now: datetime) -> dict[str, tuple[str, str]]:
    """name -> (definition, a hand-written DuckDB query for it)."""

    def at(delta: timedelta) -> str:
        return f"TIMESTAMPTZ '{(now - delta).isoformat(sep=' ')}'"

    now_ = at(timedelta(0))
    d = timedelta(days=1)
    ev = f"FROM events WHERE workspace_id = '{ws}' AND \"timestamp\" <= {now_}"
    prof = f"FROM profiles WHERE workspace_id = '{ws}'"
    return {
        "attributes": (
            'country = "DE" and plan in ("plus", "pro")',
            f"SELECT id {prof} AND attributes->>'$.country' = 'DE' "
            "AND attributes->>'$.plan' IN ('plus', 'pro')",
        ),
        "recent buyers": (
            "count(purchase within last 30 days) >= 3",
            f"SELECT profile_id {ev} AND name = 'purchase' AND \"timestamp\" >= {at(30 * d)} "
            "GROUP BY profile_id HAVING count(*) >= 3",
        ),
        "big spenders": (
            "sum(purchase.revenue within last 90 days) >= 500",
            f"SELECT profile_id {ev} AND name = 'purchase' AND \"timestamp\" >= {at(90 * d)} "
            "GROUP BY profile_id HAVING sum(CAST(properties->>'$.revenue' AS DOUBLE)) >= 500",
        ),
        "high ticket": (
            "max(purchase.revenue within last 180 days) > 200",
            f"SELECT profile_id {ev} AND name = 'purchase' AND \"timestamp\" >= {at(180 * d)} "
            "GROUP BY profile_id HAVING max(CAST(properties->>'$.revenue' AS DOUBLE)) > 200",
        ),
        "window shoppers": (
            "product_view within last 7 days and not purchase within last 7 days",
            f"SELECT profile_id {ev} AND name = 'product_view' AND \"timestamp\" >= {at(7 * d)} "
            f"EXCEPT SELECT profile_id {ev} AND name = 'purchase' "
            f'AND "timestamp" >= {at(7 * d)}',
        ),
        "abandoned carts": (
            "cart_add within last 7 days then not purchase within 1 hour",
            f'WITH e AS (SELECT profile_id, name, "timestamp" AS ts, seq {ev} '
            "AND name IN ('cart_add', 'purchase')) "
            "SELECT DISTINCT a.profile_id FROM e a WHERE a.name = 'cart_add' "
            f"AND a.ts >= {at(7 * d)} AND a.ts + INTERVAL 1 HOUR <= {now_} AND NOT EXISTS "
            "(SELECT 1 FROM e b WHERE b.profile_id = a.profile_id AND b.name = 'purchase' "
            "AND (b.ts > a.ts OR (b.ts = a.ts AND b.seq > a.seq)) "
            "AND b.ts <= a.ts + INTERVAL 1 HOUR)",
        ),
        "cart to purchase": (
            "cart_add within last 30 days then purchase within 1 day",
            f'WITH e AS (SELECT profile_id, name, "timestamp" AS ts, seq {ev} '
            "AND name IN ('cart_add', 'purchase')) "
            "SELECT DISTINCT a.profile_id FROM e a JOIN e b ON b.profile_id = a.profile_id "
            "AND (b.ts > a.ts OR (b.ts = a.ts AND b.seq > a.seq)) "
            "AND b.ts <= a.ts + INTERVAL 1 DAY "
            f"WHERE a.name = 'cart_add' AND a.ts >= {at(30 * d)} AND b.name = 'purchase'",
        ),
        "lapsed viewers": (
            'country = "DE" and count(purchase within last 30 days) >= 3 and lifetime_value > 100'
            " or product_view between 30 days ago and 7 days ago then not purchase within 7 days",
            f'WITH e AS (SELECT profile_id, name, "timestamp" AS ts, seq {ev} '
            "AND name IN ('product_view', 'purchase')), "
            "buyers AS (SELECT profile_id FROM e WHERE name = 'purchase' "
            f"AND ts >= {at(30 * d)} GROUP BY profile_id HAVING count(*) >= 3), "
            "lapsed AS (SELECT DISTINCT a.profile_id FROM e a WHERE a.name = 'product_view' "
            f"AND a.ts BETWEEN {at(30 * d)} AND {at(7 * d)} "
            f"AND a.ts + INTERVAL 7 DAY <= {now_} AND NOT EXISTS (SELECT 1 FROM e b "
            "WHERE b.profile_id = a.profile_id AND b.name = 'purchase' "
            "AND (b.ts > a.ts OR (b.ts = a.ts AND b.seq > a.seq)) "
            "AND b.ts <= a.ts + INTERVAL 7 DAY)) "
            f"SELECT p.id {prof.replace('FROM profiles', 'FROM profiles p')} AND "
            "((p.attributes->>'$.country' = 'DE' "
            "AND CAST(p.attributes->>'$.lifetime_value' AS DOUBLE) > 100 "
            "AND p.id IN (SELECT profile_id FROM buyers)) "
            "OR p.id IN (SELECT profile_id FROM lapsed))",
        ),
        "shoe lovers": (
            'last(purchase).category = "shoes"',
            "SELECT profile_id FROM (SELECT profile_id, properties->>'$.category' AS c, "
            'row_number() OVER (PARTITION BY profile_id ORDER BY "timestamp" DESC, seq DESC)'
            f" AS rn {ev} AND name = 'purchase') WHERE rn = 1 AND c = 'shoes'",
        ),
        "new and reachable": (
            "consent(email, marketing) = opted_in and signup_at within last 90 days",
            f"SELECT c.profile_id FROM consents c JOIN profiles p ON p.id = c.profile_id "
            f"WHERE c.workspace_id = '{ws}' AND p.workspace_id = '{ws}' "
            "AND c.channel = 'email' AND c.purpose = 'marketing' AND c.status = 'opted_in' "
            f"AND CAST(p.attributes->>'$.signup_at' AS TIMESTAMPTZ) BETWEEN {at(90 * d)} "
            f"AND {now_}",
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data folder (state.db, events.duckdb)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each query (median)")
    parser.add_argument("--only", action="append", help="run only these audiences")
    args = parser.parse_args()
    hub = Hub.open(load_settings(environ={}, data_dir=Path(args.data)), migrate_now=False)
    log = hub.events
    with hub.engine.connect() as conn:
        from waymark.access.service import list_workspaces

        ws = list_workspaces(conn)[0].id
    now = log.sql('SELECT max("timestamp") FROM events')[0][0]
    events = log.count(ws)

    started = time.perf_counter()
    tables = segments.snapshot(hub, ws)
    snapshot_s = time.perf_counter() - started
    profiles = tables["profiles"].num_rows
    print(
        f"{profiles:,} profiles, {events:,} events; snapshot of profiles and consents "
        f"read in {snapshot_s:.2f} s; now = {now.isoformat()}"
    )
    print(f"machine: {machine()}")
    print(f"event log memory limit: {hub.settings.event_log_memory_mb} MB")

    results: list[dict[str, Any]] = []
    for name, (text, reference) in _references(ws, now).items():
        if args.only and name not in args.only:
            continue
        with hub.engine.connect() as conn:
            expr = segments.expanded(conn, ws, segments.read_definition(conn, ws, text))
        # as member_ids compiles it for the embedded log (per-workspace snapshots)
        generated = compile_sql(
            expr, workspace_id=ws, now=now, dialect="duckdb", state_scoped=True
        ).sql("duckdb")
        ours: list[float] = []
        theirs: list[float] = []
        members: set[str] = set()
        expected: set[str] = set()
        for _ in range(args.repeat):
            t = time.perf_counter()
            members = set(log.select_column(generated, lambda: tables))
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            expected = set(log.select_column(reference, lambda: tables))
            theirs.append(time.perf_counter() - t)
        row = {
            "audience": name,
            "members": len(members),
            "waymark_s": round(statistics.median(ours), 3),
            "hand_written_s": round(statistics.median(theirs), 3),
            "same_members": members == expected,
        }
        row["ratio"] = round(row["waymark_s"] / max(row["hand_written_s"], 1e-9), 2)
        results.append(row)
        flag = "" if row["same_members"] else f"  MISMATCH: hand-written finds {len(expected):,}"
        print(
            f"{name:<18} {row['members']:>9,} members  waymark {row['waymark_s']:>7.3f} s  "
            f"hand-written {row['hand_written_s']:>7.3f} s  ratio {row['ratio']:>5.2f}{flag}"
        )
        sys.stdout.flush()
    total = sum(r["waymark_s"] for r in results)
    worst = max(r["ratio"] for r in results)
    print(
        f"total {total:.2f} s for {len(results)} audiences (snapshot {snapshot_s:.2f} s more); "
        f"worst ratio {worst:.2f}; peak RSS {peak_rss_mib():.0f} MiB"
    )
    print(
        json.dumps(
            {
                "profiles": profiles,
                "events": events,
                "snapshot_s": round(snapshot_s, 2),
                "total_s": round(total, 2),
                "worst_ratio": worst,
                "audiences": results,
            }
        )
    )
    hub.close()
    if not all(r["same_members"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
