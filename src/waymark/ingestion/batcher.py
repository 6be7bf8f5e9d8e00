"""Group commit: batches from concurrent requests share one state-store transaction.

Each submitted batch runs inside its own savepoint, so one failing batch does not undo the
others, and the single commit (one fsync) acknowledges them all. A request's future resolves
only after that commit: an acknowledged event is durable.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from waymark.hub import Hub
from waymark.identity.graph import MergePolicy
from waymark.ingestion.payloads import Parsed
from waymark.ingestion.pipeline import policy_of
from waymark.ingestion.service import IngestResult, ingest_events
from waymark.model.events import Event
from waymark.model.schemas import Schema
from waymark.profiles.schema_store import current_schema

log = logging.getLogger(__name__)


@dataclass
class _Job:
    workspace_id: str
    parsed: Parsed[Event]
    future: Future[IngestResult] = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(self.parsed.items)


class GroupCommitter:
    """A writer thread that drains waiting batches into one transaction at a time."""

    def __init__(self, hub: Hub, *, max_events: int = 5_000) -> None:
        self.hub = hub
        self.max_events = max_events
        self.policy: MergePolicy = policy_of(hub)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="waymark-ingest", daemon=True)
        self._thread.start()

    def submit(self, workspace_id: str, parsed: Parsed[Event]) -> Future[IngestResult]:
        """Queue a batch; the future resolves after its transaction commits."""
        job = _Job(workspace_id, parsed)
        self._queue.put(job)
        return job.future

    async def store(self, workspace_id: str, parsed: Parsed[Event]) -> IngestResult:
        """Await the durable outcome of one batch."""
        return await asyncio.wrap_future(self.submit(workspace_id, parsed))

    def close(self) -> None:
        """Finish the queued batches and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _take(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs, total = [first], first.size
        while total < self.max_events:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)
                break
            jobs.append(nxt)
            total += nxt.size
        return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            outcomes: list[IngestResult | BaseException] = []
            try:
                with self.hub.tx() as conn:
                    schemas: dict[str, Schema] = {}
                    now = self.hub.clock.now()
                    for job in jobs:
                        try:
                            with conn.begin_nested():
                                schema = schemas.get(job.workspace_id)
                                if schema is None:
                                    schema = current_schema(conn, job.workspace_id).schema
                                    schemas[job.workspace_id] = schema
                                outcomes.append(
                                    ingest_events(
                                        conn,
                                        workspace_id=job.workspace_id,
                                        parsed=job.parsed,
                                        schema=schema,
                                        policy=self.policy,
                                        now=now,
                                        shared_event_log=self.hub.settings.shared_event_log,
                                    )
                                )
                        except Exception as exc:  # this batch only; the others go on
                            log.exception("ingest batch failed")
                            outcomes.append(exc)
            except Exception as exc:  # the commit itself failed: nobody is acknowledged
                log.exception("ingest commit failed")
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            for job, outcome in zip(jobs, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)
