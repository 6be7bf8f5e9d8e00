"""Benchmark: a frequency-cap check at send time, as the dispatcher makes it.

    PYTHONPATH=src .venv/bin/python benchmarks/delivery_caps.py
    PYTHONPATH=src .venv/bin/python benchmarks/delivery_caps.py \
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench

Each profile has ``--history`` messages counted toward its caps in the last six days (sent by
earlier campaigns), and the workspace has three caps (3 marketing emails per 7 days, 5
messages of any kind per day, 1 per hour) and a quiet hours window. One check is what
:meth:`Outbox.redecide` does for one message about to go, inside the write transaction of a
dispatcher's claim (100 checks per transaction here; the commit is the claim's, not timed):
take the profile's cap lock (PostgreSQL), read the rules in force, the profile, its consents, its
suppressions and the messages counted in the longest cap window, and decide. Prints the
median, p99 and max of ``--checks`` checks (each on a random profile) and the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from waymark.core.clock import ManualClock
from waymark.delivery import store
from waymark.delivery.outbox import Outbox, SendIntent, Source
from waymark.hub import Hub
from waymark.storage.tables import messages

from _machine import machine
from delivery_enqueue import NOW, _settings, setup

RULES = {
    "caps": [
        {
            "name": "weekly email",
            "channel": "email",
            "purpose": "marketing",
            "limit": 3,
            "per": "7d",
        },
        {"name": "daily any", "limit": 5, "per": "1d"},
        {"name": "hourly", "limit": 1, "per": "1h"},
    ],
    "quiet_hours": [
        {"name": "night", "channels": ["sms", "push"], "start": "21:00", "end": "08:00"}
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=5000)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--checks", type=int, default=3000)
    parser.add_argument("--database-url", default=None, help="PostgreSQL (default: SQLite)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="wm-caps-"))
    try:
        ws, ids = setup(folder, args.database_url, args.profiles)
        clock = ManualClock(NOW - timedelta(days=6))
        hub = Hub.open(_settings(folder, args.database_url), clock, migrate_now=False)
        outbox = Outbox()
        with hub.tx() as conn:
            store.save_rules(conn, ws, {}, actor="b", now=clock.now())
        step = timedelta(days=6) / args.history
        for n in range(args.history):  # earlier campaigns, no caps then
            with hub.tx() as conn:
                outbox.enqueue(
                    conn,
                    ws,
                    [
                        SendIntent(f"h{n}:{p}", p, "spring", Source("campaign", f"h{n}"))
                        for p in ids
                    ],
                    now=clock.now(),
                )
            clock.advance(step)
        if hub.engine.dialect.name == "postgresql":  # as autovacuum would have by now
            with hub.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.exec_driver_sql("ANALYZE messages, message_events")
        with hub.tx() as conn:
            store.save_rules(conn, ws, RULES, actor="b", now=clock.now())
            rows = {
                r.profile_id: dict(r._mapping)
                for r in conn.execute(select(messages).where(messages.c.source_id == "h0"))
            }
        rng = random.Random(7)
        timings: list[float] = []
        outcomes: dict[str, int] = {}
        queued = [r for r in rows.values() if r["status"] == "queued"]
        for start in range(0, args.checks, 100):  # a dispatcher's claim: one transaction
            with hub.tx() as conn:
                for _ in range(min(100, args.checks - start)):
                    row = rng.choice(queued)
                    started = time.perf_counter()
                    decision = outbox.redecide(conn, ws, [row], now=clock.now())[row["id"]]
                    timings.append(time.perf_counter() - started)
                    kind = type(decision).__name__
                    outcomes[kind] = outcomes.get(kind, 0) + 1
        hub.close()
        timings.sort()
        print(
            json.dumps(
                {
                    "benchmark": "delivery_caps",
                    "checks": len(timings),
                    "history_per_profile": args.history,
                    "outcomes": outcomes,
                    "store": "postgresql" if args.database_url else "sqlite",
                    "median_ms": round(statistics.median(timings) * 1000, 3),
                    "p99_ms": round(timings[int(len(timings) * 0.99)] * 1000, 3),
                    "max_ms": round(timings[-1] * 1000, 3),
                    "machine": machine(),
                }
            )
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
