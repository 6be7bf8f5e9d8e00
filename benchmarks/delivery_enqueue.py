"""Benchmark: render + rules + enqueue of personalized emails through the outbox.

    PYTHONPATH=src .venv/bin/python benchmarks/delivery_enqueue.py
    PYTHONPATH=src .venv/bin/python benchmarks/delivery_enqueue.py --processes 2
    PYTHONPATH=src .venv/bin/python benchmarks/delivery_enqueue.py \
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench

Sets up a workspace with the demo schema and ``--profiles`` profiles (email, first name, city,
time zone, an email marketing opt-in for most), a personalized email template (``--template
simple``: subject and preheader with profile values, an HTML body of about 2 KB with two more
and the unsubscribe link; ``rich``: five profile values, a loop over the offer's items, a
condition, a filter chain and a fragment; the text part derived in both) and rules with two
frequency caps and a quiet hours window. Then writes one send intent per profile in batches
of ``--batch`` (each batch one transaction, as a campaign or a journey worker would): each is
rendered, decided (address, suppression, consent, quiet hours in the profile's zone, caps counted
against the messages already written) and written with its status history. With
``--processes N`` the profiles are split between N processes writing at the same time. On
PostgreSQL the outbox's statistics are gathered after the first two batches, as autovacuum
does in a running database (the planner otherwise plans for an empty table).
Prints messages per second and the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from waymark.access import service as access
from waymark.core.clock import ManualClock
from waymark.delivery import store
from waymark.delivery.outbox import Outbox, SendIntent, Source
from waymark.demo.generate import load_demo_schema
from waymark.hub import Hub
from waymark.ingestion.pipeline import Ingestor
from waymark.profiles.schema_store import save_schema
from waymark.settings import load_settings
from waymark.storage.tables import messages, profiles

from _machine import machine

NOW = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)
ZONES = ("Europe/Berlin", "Europe/Paris", "America/New_York", "Asia/Tokyo", "UTC")
CITIES = ("Berlin", "Paris", "New York", "Tokyo", "London", "Köln")
HTML = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>{{ campaign.name }}</title>
<style>body{font-family:sans-serif} .cta{background:#0a7;color:#fff;padding:8px}</style></head>
<body><table width="600" align="center"><tr><td>
<h1>Hello {{ profile.first_name | default: "there" }},</h1>
<p>Spring is here in {{ profile.city | default: "your city" }}. As one of our
{% if profile.plan == "pro" %}Pro{% else %}valued{% endif %} customers you get early access
to the new collection, with free shipping on every order this week.</p>
<ul>{% for item in offer.tags %}<li><a href="https://shop.example.com/p/{{ item }}">
{{ item | capitalize }}</a></li>{% endfor %}</ul>
<p>Your lifetime value with us: {{ profile.lifetime_value | default: 0 | round: 2 }}.</p>
<p><a class="cta" href="https://shop.example.com/new?c={{ campaign.id }}">Shop the collection
</a></p>
<p>Questions? Reply to this email or visit our help centre; we answer within a day. Our stores
are open every day from nine to eight, and returns are free for thirty days.</p>
{% render "footer", unsubscribe: message.unsubscribe_url, preferences: message.preferences_url %}
</td></tr></table></body></html>"""
SIMPLE = """<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{font-family:sans-serif}
</style></head><body><table width="600" align="center"><tr><td>
<h1>Hello {{ profile.first_name | default: "there" }},</h1>
<p>Spring is here in {{ profile.city | default: "your city" }}. As one of our valued customers
you get early access to the new collection, with free shipping on every order this week: boots,
scarves, light jackets and the sandals everyone asked for are back in every size.</p>
<p><a href="https://shop.example.com/new?c=spring">Shop the collection</a></p>
<p>Questions? Reply to this email or visit our help centre; we answer within a day. Our stores
are open every day from nine to eight, and returns are free for thirty days.</p>
<p style="font-size:11px;color:#888">You receive this because you subscribed.
<a href="{{ message.unsubscribe_url }}">Unsubscribe</a>. Example Shop GmbH, Musterstraße 1,
10115 Berlin.</p></td></tr></table></body></html>"""
FOOTER = """<p style="font-size:11px;color:#888">You receive this because you subscribed.
<a href="{{ unsubscribe }}">Unsubscribe</a> or <a href="{{ preferences }}">manage your
preferences</a>. Example Shop GmbH, Musterstraße 1, 10115 Berlin.</p>"""
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
    ],
    "quiet_hours": [
        {"name": "night", "channels": ["sms", "push"], "start": "21:00", "end": "08:00"}
    ],
}


def _settings(folder: Path, url: str | None) -> Any:
    return load_settings(environ={}, data_dir=folder, database_url=url)


def setup(folder: Path, url: str | None, n: int, template: str = "simple") -> tuple[str, list[str]]:
    hub = Hub.open(_settings(folder, url), ManualClock(NOW))
    try:
        with hub.tx() as conn:
            ws, _w, _a = access.create_workspace(conn, name="bench", actor="b", at=NOW)
            save_schema(conn, workspace_id=ws.id, document=load_demo_schema(), actor="b", at=NOW)
            store.save_fragment(conn, ws.id, name="footer", source=FOOTER, actor="b", now=NOW)
            store.save_template(
                conn,
                ws.id,
                name="spring",
                document={
                    "channel": "email",
                    "subject": "{{ profile.first_name | default: 'Hi' }}, spring is here",
                    "preheader": "Early access for you in {{ profile.city }}",
                    "html": HTML if template == "rich" else SIMPLE,
                },
                actor="b",
                now=NOW,
            )
            store.save_rules(conn, ws.id, RULES, actor="b", now=NOW)
        ingest = Ingestor(hub)
        for start in range(0, n, 2000):
            records = []
            for i in range(start, min(n, start + 2000)):
                records.append(
                    {
                        "identities": {"user_id": f"u{i}"},
                        "attributes": {
                            "email": f"customer{i}@example.com",
                            "first_name": f"Name{i}",
                            "city": CITIES[i % len(CITIES)],
                            "timezone": ZONES[i % len(ZONES)],
                            "plan": ("free", "plus", "pro")[i % 3],
                            "lifetime_value": i * 1.5,
                        },
                        "timestamp": NOW.isoformat(),
                        "consents": [
                            {
                                "channel": "email",
                                "purpose": "marketing",
                                "status": "opted_in" if i % 10 else "opted_out",
                                "timestamp": NOW.isoformat(),
                            }
                        ],
                    }
                )
            result = ingest.native_profiles(ws.id, {"profiles": records})
            assert result.accepted == len(records), result.to_json()
        with hub.engine.connect() as conn:
            ids = list(conn.execute(profiles.select().with_only_columns(profiles.c.id)).scalars())
        return ws.id, ids
    finally:
        hub.close()


def enqueue(
    args: tuple[Path, str | None, str, list[str], int, int],
) -> tuple[int, float, dict[str, int]]:
    folder, url, ws, ids, batch, worker = args
    hub = Hub.open(_settings(folder, url), ManualClock(NOW), migrate_now=False)
    outbox = Outbox(public_url="https://hub.example.com")
    context = {
        "campaign": {"id": "spring-26", "name": "Spring"},
        "offer": {"id": "o1", "tags": ["boots", "scarves"]},
    }
    statuses: dict[str, int] = {}
    try:
        # compile and warm the caches on one message, not timed
        with hub.tx() as conn:
            outbox.enqueue(
                conn,
                ws,
                [
                    SendIntent(
                        f"warm-{worker}",
                        ids[0],
                        "spring",
                        Source("campaign", "spring"),
                        context=context,
                    )
                ],
                now=NOW,
            )
        started = time.perf_counter()
        for start in range(0, len(ids), batch):
            if start == 2 * batch and hub.engine.dialect.name == "postgresql":
                # statistics of the outbox as it grows, as autovacuum gathers them (migration
                # 0007 lowers its thresholds for these tables) in a database that has run a while
                with hub.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    c.exec_driver_sql("ANALYZE messages, message_events")
            chunk = ids[start : start + batch]
            intents = [
                SendIntent(
                    f"spring:{pid}", pid, "spring", Source("campaign", "spring"), context=context
                )
                for pid in chunk
            ]
            with hub.tx() as conn:
                for out in outbox.enqueue(conn, ws, intents, now=NOW):
                    statuses[out.status] = statuses.get(out.status, 0) + 1
        return len(ids), time.perf_counter() - started, statuses
    finally:
        hub.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--database-url", default=None, help="PostgreSQL (default: SQLite)")
    parser.add_argument(
        "--template",
        choices=("simple", "rich"),
        default="simple",
        help="simple: 2 KB of HTML with three profile values and the unsubscribe link; rich: "
        "five profile values, a loop, a condition, a filter chain and a fragment",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="wm-enqueue-"))
    try:
        ws, ids = setup(folder, args.database_url, args.profiles, args.template)
        parts = [ids[i :: args.processes] for i in range(args.processes)]
        jobs = [
            (folder, args.database_url, ws, part, args.batch, n) for n, part in enumerate(parts)
        ]
        started = time.perf_counter()
        if args.processes == 1:
            results = [enqueue(jobs[0])]
        else:
            with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
                results = pool.map(enqueue, jobs)
        wall = time.perf_counter() - started
        total = sum(r[0] for r in results)
        statuses: dict[str, int] = {}
        for _n, _t, found in results:
            for key, value in found.items():
                statuses[key] = statuses.get(key, 0) + value
        hub = Hub.open(_settings(folder, args.database_url), ManualClock(NOW), migrate_now=False)
        try:
            with hub.engine.connect() as conn:
                written = conn.execute(
                    messages.select()
                    .with_only_columns(messages.c.id)
                    .where(messages.c.source_id == "spring")
                ).all()
        finally:
            hub.close()
        busiest = max(r[1] for r in results)
        print(
            json.dumps(
                {
                    "benchmark": "delivery_enqueue",
                    "messages": total,
                    "written": len(written),
                    "statuses": statuses,
                    "template": args.template,
                    "batch": args.batch,
                    "processes": args.processes,
                    "store": "postgresql" if args.database_url else "sqlite",
                    "seconds": round(busiest, 2),
                    "messages_per_s": round(total / busiest),
                    "wall_seconds_with_process_start": round(wall, 2),
                    "machine": machine(),
                }
            )
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
