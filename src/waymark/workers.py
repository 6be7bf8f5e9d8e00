"""Background work of ``waymark serve``: the inbox mover (which folds events into the streaming
audiences), streaming upkeep, unfinished privacy deletions and scheduled audience runs."""

from __future__ import annotations

import asyncio
import gc
import logging

from starlette.concurrency import run_in_threadpool

from waymark.delivery.runtime import DeliveryRuntime
from waymark.hub import Hub
from waymark.ingestion.mover import flush_hub
from waymark.profiles.service import finish_deletions
from waymark.segmentation.live import CHUNK, SERVE_CHUNK, maintain, recheck_mark
from waymark.segmentation.service import fail_interrupted_runs, run_due
from waymark.storage.database import checkpoint

log = logging.getLogger(__name__)


def stream_once(hub: Hub, *, chunk: int = CHUNK) -> tuple[int, bool]:
    """Move waiting events to the log, folding them into the streaming audiences, then one
    round of streaming upkeep (up to ``chunk`` profiles of rechecks and of due timers, a chunk
    of each pending build); returns how many events moved and whether upkeep work is left
    for another round."""
    with hub.mover_lock:
        mark = recheck_mark(hub)
        moved = flush_hub(hub).events
        upkeep = maintain(hub, recheck_upto=mark, chunk=chunk)
    busy = upkeep["built"] > 0 or upkeep["timers"] >= chunk or upkeep["rechecked"] >= chunk
    return moved, busy


def flush_once(hub: Hub) -> int:
    """:func:`stream_once` until no upkeep is left, then checkpoint the SQLite WAL (so the
    ingestion writer's commits need not); returns how many events moved."""
    moved = 0
    while True:
        count, busy = stream_once(hub)
        moved += count
        if not busy:
            break
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


async def _checkpoints(hub: Hub, interval: float) -> None:
    """Checkpoint the SQLite WAL every ``interval``, beside the mover (not between its rounds:
    a round waiting for a checkpoint would delay the memberships of the events it folds). A
    checkpoint still slows the commits of the rounds it overlaps, so it runs every 10 s by
    default (every second gave a p99 from event to membership change about 15 ms higher)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await run_in_threadpool(checkpoint, hub.engine)
        except Exception:  # the next one retries
            log.exception("checkpoint failed")


async def _dispatching(hub: Hub, delivery: DeliveryRuntime, interval: float) -> None:
    """Deliver due messages: a round at once when the outbox signals new messages, at least
    every ``interval`` seconds, and back to back while rounds find work."""
    while True:
        try:
            stats = await run_in_threadpool(delivery.dispatcher.run_once)
        except Exception:  # keep serving; the next round retries (leases keep messages safe)
            log.exception("dispatching messages failed")
            stats = None
        if stats is None or stats.claimed == 0:
            await run_in_threadpool(hub.outbox_signal.wait, interval)
            hub.outbox_signal.clear()


async def run_background(hub: Hub, delivery: DeliveryRuntime | None = None) -> None:
    """Run until cancelled: finish pending deletions once, then move the inbox (folding the
    events into the streaming audiences) as soon as ingestion signals new events, at least every
    ``flush_interval_ms``, run scheduled audiences when due, and (given ``delivery``) send due
    messages."""
    done = await run_in_threadpool(finish_pending_deletions, hub)
    if done:
        log.info("finished interrupted privacy deletions", extra={"count": done})
    stale = await run_in_threadpool(fail_interrupted_runs, hub)
    if stale:
        log.warning("marked interrupted audience runs as failed", extra={"count": stale})
    interval = hub.settings.flush_interval_ms / 1000
    # the cyclic collector's full passes over a serving heap took ~100 ms each, stalling the
    # mover (and so every membership change behind it): leave what start-up built out of them,
    # and run them less often
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    schedules = asyncio.create_task(_audience_schedules(hub))
    checkpoints = asyncio.create_task(_checkpoints(hub, hub.settings.checkpoint_interval_ms / 1000))
    dispatching = (
        asyncio.create_task(_dispatching(hub, delivery, interval)) if delivery is not None else None
    )
    try:
        while True:
            busy = False
            try:
                # short timer and recheck steps, back to back while work is left: events
                # arriving meanwhile wait for one of them, not for the whole upkeep
                _moved, busy = await run_in_threadpool(stream_once, hub, chunk=SERVE_CHUNK)
            except Exception:  # keep serving; the next round retries
                log.exception("moving events to the log failed")
            if not busy:
                await run_in_threadpool(hub.inbox_signal.wait, interval)
            hub.inbox_signal.clear()
    finally:
        schedules.cancel()
        checkpoints.cancel()
        if dispatching is not None:
            dispatching.cancel()
        # the process may go on (an app whose lifespan ended, in tests): collect as before
        gc.set_threshold(*thresholds)
        gc.unfreeze()
