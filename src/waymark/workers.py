"""Background work of ``waymark serve``: the inbox mover and unfinished privacy deletions."""

from __future__ import annotations

import asyncio
import logging

from starlette.concurrency import run_in_threadpool

from waymark.hub import Hub
from waymark.ingestion.mover import flush
from waymark.profiles.service import finish_deletions
from waymark.storage.database import checkpoint

log = logging.getLogger(__name__)


def flush_once(hub: Hub) -> int:
    """Move waiting events to the log once, then checkpoint the SQLite WAL (so the
    ingestion writer's commits need not); returns how many moved."""
    with hub.mover_lock:
        moved = flush(hub.engine, hub.events, shared=hub.settings.shared_event_log).events
    checkpoint(hub.engine)
    return moved


def finish_pending_deletions(hub: Hub) -> int:
    """Complete deletions interrupted by a crash."""
    with hub.mover_lock, hub.tx() as conn:
        return finish_deletions(conn, hub.events, now=hub.clock.now())


async def run_background(hub: Hub) -> None:
    """Run until cancelled: finish pending deletions once, then flush the inbox periodically."""
    done = await run_in_threadpool(finish_pending_deletions, hub)
    if done:
        log.info("finished interrupted privacy deletions", extra={"count": done})
    interval = hub.settings.flush_interval_ms / 1000
    while True:
        try:
            await run_in_threadpool(flush_once, hub)
        except Exception:  # keep serving; the next round retries
            log.exception("moving events to the log failed")
        await asyncio.sleep(interval)
