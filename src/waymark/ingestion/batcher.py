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
from datetime import datetime

from sqlalchemy import Connection

from waymark.hub import Hub
from waymark.identity.graph import MergePolicy
from waymark.ingestion.payloads import ItemError, Parsed
from waymark.ingestion.pipeline import policy_of
from waymark.ingestion.service import IngestResult, check_events, ingest_events, split_result
from waymark.model.events import Event
from waymark.model.schemas import Schema
from waymark.profiles.schema_store import schema_in_force

log = logging.getLogger(__name__)


@dataclass
class _Job:
    workspace_id: str
    parsed: Parsed[Event]
    #: the schema version the items were validated against (None: not validated yet)
    checked: int | None = None
    future: Future[IngestResult] = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(self.parsed.items)


class GroupCommitter:
    """A writer thread that drains waiting batches into one transaction at a time."""

    def __init__(self, hub: Hub, *, max_events: int = 5_000, start: bool = True) -> None:
        self.hub = hub
        self.max_events = max_events
        self.policy: MergePolicy = policy_of(hub)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="waymark-ingest", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start the writer thread (when constructed with ``start=False``)."""
        self._thread.start()

    def submit(
        self, workspace_id: str, parsed: Parsed[Event], *, checked: int | None = None
    ) -> Future[IngestResult]:
        """Queue a batch; the future resolves after its transaction commits.

        ``checked`` is the schema version the items were already validated against
        (:func:`check_events`); under any other version in force they are validated again."""
        job = _Job(workspace_id, parsed, checked)
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
        while (taken := self._take()) is not None:
            # a request cancelled while queued (client gone, shutdown) is dropped; the others
            # can no longer be cancelled, so answering them below cannot fail
            jobs = [job for job in taken if job.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            try:
                outcomes = self._commit(jobs)
            except Exception as exc:  # the commit itself failed: nobody is acknowledged
                log.exception("ingest commit failed")
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            for n, job in enumerate(jobs):
                outcome = outcomes[n]
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _commit(self, jobs: list[_Job]) -> dict[int, IngestResult | BaseException]:
        outcomes: dict[int, IngestResult | BaseException] = {}
        with self.hub.tx() as conn:
            now = self.hub.clock.now()
            by_workspace: dict[str, list[int]] = {}
            for n, job in enumerate(jobs):
                by_workspace.setdefault(job.workspace_id, []).append(n)
            # sorted, so that concurrent writers take per-workspace locks in one order
            for workspace_id in sorted(by_workspace):
                members = by_workspace[workspace_id]
                version, schema = schema_in_force(conn, workspace_id)
                for n in members:
                    job = jobs[n]
                    if job.checked != version:  # not validated, or under another version
                        job.parsed = check_events(job.parsed, schema)
                        job.checked = version
                outcomes.update(self._store(conn, workspace_id, schema, members, jobs, now))
        return outcomes

    def _ingest(
        self,
        conn: Connection,
        workspace_id: str,
        schema: Schema,
        parsed: Parsed[Event],
        now: datetime,
    ) -> IngestResult:
        return ingest_events(
            conn,
            workspace_id=workspace_id,
            parsed=parsed,
            schema=schema,
            policy=self.policy,
            now=now,
            shared_event_log=self.hub.settings.shared_event_log,
            validated=True,
        )

    def _store(
        self,
        conn: Connection,
        workspace_id: str,
        schema: Schema,
        members: list[int],
        jobs: list[_Job],
        now: datetime,
    ) -> dict[int, IngestResult | BaseException]:
        """Store one workspace's batches as one combined batch; should that fail, store each
        in its own savepoint so one bad batch cannot take the others down."""
        if len(members) > 1:
            items: list[tuple[int, Event]] = []
            errors: list[ItemError] = []
            bounds: list[tuple[int, int]] = []
            offset = 0
            for n in members:
                parsed = jobs[n].parsed
                width = len(parsed.items) + len(parsed.errors)
                items.extend((offset + i, e) for i, e in parsed.items)
                errors.extend(ItemError(offset + e.index, e.issues) for e in parsed.errors)
                bounds.append((offset, offset + width))
                offset += width
            try:
                with conn.begin_nested():
                    combined = self._ingest(conn, workspace_id, schema, Parsed(items, errors), now)
                parts = split_result(combined, bounds)
                return dict(zip(members, parts, strict=True))
            except Exception:
                log.exception("combined ingest failed; storing each batch alone")
        out: dict[int, IngestResult | BaseException] = {}
        for n in members:
            try:
                with conn.begin_nested():
                    out[n] = self._ingest(conn, workspace_id, schema, jobs[n].parsed, now)
            except Exception as exc:  # this batch only; the others go on
                log.exception("ingest batch failed")
                out[n] = exc
        return out
