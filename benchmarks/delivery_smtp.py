"""Benchmark: SMTP delivery by the dispatcher to a local aiosmtpd server, with connection reuse.

    PYTHONPATH=src .venv/bin/python benchmarks/delivery_smtp.py
    PYTHONPATH=src .venv/bin/python benchmarks/delivery_smtp.py --workers 4 --messages 5000

Queues ``--messages`` personalized emails through the outbox (the simple template of
``delivery_enqueue.py``), then times the dispatcher delivering all of them: claiming batches
(deciding each again under the rules), tracking its links (signed click redirects, the open
pixel and the signed List-Unsubscribe, as ``serve`` sends; ``--no-tracking`` turns clicks and
opens off), building the MIME message, sending it over SMTP (one reused connection per worker
thread) to an aiosmtpd server, and recording each result before the worker's next send
(results finishing together share a commit; a crash can duplicate at most one message per
worker). The server, in its own process, counts messages and distinct Message-IDs. Prints
messages per second, the count the server received, and the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from sqlalchemy import func, select, update

from waymark.channels.email import EmailSettings, SmtpProvider
from waymark.core.clock import ManualClock
from waymark.delivery.dispatcher import Dispatcher, DispatchSettings
from waymark.delivery.outbox import Outbox, SendIntent, Source
from waymark.delivery.templates import Channel
from waymark.hub import Hub
from waymark.storage.tables import messages, workspaces

from _machine import machine
from delivery_enqueue import NOW, _settings, setup

_MESSAGE_ID = re.compile(rb"^Message-ID: *(\S+)", re.MULTILINE | re.IGNORECASE)


class Counting:
    """An SMTP handler that counts each message and its distinct Message-IDs (found in the
    headers; the body is not parsed, as a relay would not)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.ids: set[str] = set()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        raw = envelope.original_content or b""
        found = _MESSAGE_ID.search(raw, 0, raw.find(b"\r\n\r\n"))
        with self.lock:
            self.count += 1
            self.ids.add(found.group(1).decode() if found else "")
        return "250 OK"


def _serve(port: int, ready: Any, stop: Any, counts: Any) -> None:
    """The SMTP server, in its own process (as a real sink would be)."""
    handler = Counting()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    ready.set()
    stop.wait()
    controller.stop()
    counts.put((handler.count, len(handler.ids)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--database-url", default=None, help="PostgreSQL (default: SQLite)")
    parser.add_argument(
        "--no-tracking",
        action="store_true",
        help="the workspace tracks no clicks and opens (the signed List-Unsubscribe stays)",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="wm-smtp-"))
    with socket.socket() as probe:  # aiosmtpd 1.4 cannot report a port 0 asked it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ready, stop, counts = ctx.Event(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=_serve, args=(port, ready, stop, counts), daemon=True)
    try:
        ws, ids = setup(folder, args.database_url, args.messages)
        clock = ManualClock(NOW)
        hub = Hub.open(_settings(folder, args.database_url), clock, migrate_now=False)
        outbox = Outbox(public_url="https://hub.example.com")
        if args.no_tracking:
            with hub.tx() as conn:
                conn.execute(
                    update(workspaces)
                    .where(workspaces.c.id == ws)
                    .values(settings={"tracking": {"clicks": False, "opens": False}})
                )
        for start in range(0, len(ids), 1000):
            with hub.tx() as conn:
                outbox.enqueue(
                    conn,
                    ws,
                    [
                        SendIntent(f"k{pid}", pid, "spring", Source("campaign", "spring"))
                        for pid in ids[start : start + 1000]
                    ],
                    now=NOW,
                )
        with hub.engine.connect() as conn:
            queued = conn.execute(
                select(func.count()).select_from(messages).where(messages.c.status == "queued")
            ).scalar_one()
        server.start()
        if not ready.wait(30):
            raise RuntimeError("the SMTP server did not start")
        sender = EmailSettings(from_address="shop@example.com")
        dispatcher = Dispatcher(
            hub,
            {
                Channel.EMAIL: lambda: SmtpProvider(
                    sender, host="127.0.0.1", port=port, security="none"
                )
            },
            outbox=outbox,
            settings=DispatchSettings(workers=args.workers, batch=args.batch),
            content_hook=outbox.tracker.content_hook(hub),  # tracked links, as serve sends
        )
        started = time.perf_counter()
        stats = dispatcher.run_until_idle(rounds=100_000)
        elapsed = time.perf_counter() - started
        connections = sum(getattr(p, "connections", 0) for p in dispatcher._made)
        dispatcher.close()
        hub.close()
        stop.set()
        received, distinct = counts.get(timeout=30)
        print(
            json.dumps(
                {
                    "benchmark": "delivery_smtp",
                    "queued": queued,
                    "sent": stats.sent,
                    "received_by_server": received,
                    "distinct_message_ids": distinct,
                    "smtp_connections": connections,
                    "workers": args.workers,
                    "tracking": not args.no_tracking,
                    "store": "postgresql" if args.database_url else "sqlite",
                    "seconds": round(elapsed, 2),
                    "messages_per_s": round(stats.sent / elapsed),
                    "machine": machine(),
                }
            )
        )
    finally:
        stop.set()
        server.join(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
