"""Background work of ``waymark serve``: the inbox mover, unfinished privacy deletions and
scheduled audience runs."""

from __future__ import annotations

import asyncio
import logging

from starlette.concurrency import run_in_threadpool

from waymark.hub import Hub
from waymark.ingestion.mover import flush
from waymark.profiles.service import finish_deletions
from waymark.segmentation.service import fail_interrupted_runs, run_due
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


def run_due_audiences(hub: Hub) -> int:
    """Move waiting events to the log, then run every batch audience whose schedule is due;
    returns how many ran."""
    flush_once(hub)
    return len(run_due(hub, now=hub.clock.now()))


#: How often ``serve`` looks for batch audiences whose cron schedule is due.
AUDIENCE_CHECK_SECONDS = 30.0


async def _audience_schedules(hub: Hub) -> None:
    while True:
        await asyncio.sleep(AUDIENCE_CHECK_SECONDS)
        try:
            ran = await run_in_threadpool(run_due_audiences, hub)
            if ran:
                log.info("ran scheduled audiences", extra={"count": ran})
        except Exception:  # a failed run is recorded on the run; keep serving
            log.exception("a scheduled audience run failed")


async def run_background(hub: Hub) -> None:
    """Run until cancelled: finish pending deletions once, then flush the inbox periodically
    and run scheduled audiences when due."""
    done = await run_in_threadpool(finish_pending_deletions, hub)
    if done:
        log.info("finished interrupted privacy deletions", extra={"count": done})
    stale = await run_in_threadpool(fail_interrupted_runs, hub)
    if stale:
        log.warning("marked interrupted audience runs as failed", extra={"count": stale})
    interval = hub.settings.flush_interval_ms / 1000
    schedules = asyncio.create_task(_audience_schedules(hub))
    try:
        while True:
            try:
                await run_in_threadpool(flush_once, hub)
            except Exception:  # keep serving; the next round retries
                log.exception("moving events to the log failed")
            await asyncio.sleep(interval)
    finally:
        schedules.cancel()
