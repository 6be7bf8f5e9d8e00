"""Ingestion in worker processes: the API's process reads requests, workers store them.

One Python process runs on one core (the GIL), so ``waymark serve`` with ``ingest_workers``
above zero starts that many worker processes. The API process authenticates a request, reads
its body within the limits and hands the raw bytes to a worker over a pipe; the worker parses
and validates them and stores them through its own group committer (one state-store
transaction for many requests), then answers. The API process answers the client only with
that answer, so an acknowledged event is still durable. The event log stays with the API
process (the embedded DuckDB file has one owner), which moves the inbox as before.

If a worker dies, its requests in flight fail (the client retries; ``messageId`` makes the
retry safe) and a new worker takes its place.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import multiprocessing
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import orjson

from waymark.core.errors import InvalidInput, Issue, StoreBusy
from waymark.hub import Hub
from waymark.ingestion.batcher import GroupCommitter
from waymark.ingestion.payloads import (
    Limits,
    Parsed,
    parse_native_events,
    parse_segment_call,
)
from waymark.ingestion.service import IngestResult
from waymark.logs import configure
from waymark.model.events import Event
from waymark.settings import Settings

log = logging.getLogger(__name__)

Kind = Literal["segment", "native"]
_READY = b"ready"
_START_SECONDS = 60
_PIPE_BYTES = 32_000  # bodies up to this size go into the pipe without blocking the loop


def decode_body(raw: bytes) -> Any:
    """Decode a JSON request body, naming what is wrong with a malformed one."""
    if not raw.strip():
        raise InvalidInput([Issue("", "the body is empty; send a JSON object")])
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput([Issue("", f"malformed JSON: {exc}")], f"malformed JSON: {exc}") from exc


def parse_request(
    kind: Kind,
    call: str,
    data: Any,
    *,
    workspace_id: str,
    received_at: datetime,
    limits: Limits,
) -> Parsed[Event]:
    """Parse one ingestion request's decoded body: a Segment-spec ``call`` or a native batch."""
    if kind == "segment":
        return parse_segment_call(
            call, data, workspace_id=workspace_id, received_at=received_at, limits=limits
        )
    return parse_native_events(
        data, workspace_id=workspace_id, received_at=received_at, limits=limits
    )


class WorkerFailed(StoreBusy):
    """A worker could not answer (it died, or failed unexpectedly); the request may be retried
    (answered 503)."""

    code = "ingest_worker_failed"


@dataclass(frozen=True, slots=True)
class _Request:
    rid: int
    kind: Kind
    call: str
    workspace_id: str
    raw: bytes
    received_at: datetime


# An answer: ("ok", IngestResult) | ("invalid", issues, message) | ("error", text).
_Answer = tuple[Any, ...]


# -- the worker process ----------------------------------------------------------------------


def _worker_main(settings_data: dict[str, Any], conn: Connection) -> None:
    """Entry point of a worker process: serve requests from ``conn`` until it closes."""
    settings = Settings.model_validate(settings_data)
    configure(settings.log_level, settings.log_format)
    hub = Hub.open(settings, migrate_now=False)
    committer = GroupCommitter(hub)
    limits = Limits(
        max_event_bytes=settings.max_event_bytes,
        max_future=settings.max_future,
        max_past=settings.max_past,
    )
    sending = threading.Lock()
    conn.send_bytes(_READY)

    def answer(rid: int, outcome: _Answer) -> None:
        data = pickle.dumps((rid, outcome), protocol=pickle.HIGHEST_PROTOCOL)
        with sending, suppress(OSError, EOFError):
            conn.send_bytes(data)

    def settle(rid: int, future: Future[IngestResult]) -> None:
        exc = future.exception()
        if exc is None:
            answer(rid, ("ok", future.result()))
        else:
            answer(rid, ("error", f"{type(exc).__name__}: {exc}"))

    try:
        while True:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                break
            if not message:  # the API process is shutting down
                break
            req: _Request = pickle.loads(message)
            try:
                parsed = parse_request(
                    req.kind,
                    req.call,
                    decode_body(req.raw),
                    workspace_id=req.workspace_id,
                    received_at=req.received_at,
                    limits=limits,
                )
            except InvalidInput as exc:
                answer(req.rid, ("invalid", list(exc.issues), exc.message))
                continue
            except Exception as exc:
                log.exception("parsing an ingestion request failed")
                answer(req.rid, ("error", f"{type(exc).__name__}: {exc}"))
                continue
            future = committer.submit(req.workspace_id, parsed)
            future.add_done_callback(functools.partial(settle, req.rid))
    finally:
        committer.close()
        hub.close()
        conn.close()


# -- the API process's side ------------------------------------------------------------------


class _Worker:
    """One worker process, its pipe, and the requests it has not answered yet."""

    def __init__(self, settings: Settings, on_answer: Callable[[int, _Answer], None]) -> None:
        ctx = multiprocessing.get_context("spawn")  # the API process has threads: no fork
        self.conn, child = ctx.Pipe(duplex=True)
        self.process: BaseProcess = ctx.Process(
            target=_worker_main,
            args=(settings.model_dump(mode="json"), child),
            name="waymark-ingest-worker",
            daemon=True,
        )
        self.process.start()
        child.close()
        # the worker says it is ready once its stores are open; until then nothing is sent
        try:
            ready = self.conn.poll(_START_SECONDS) and self.conn.recv_bytes() == _READY
        except (EOFError, OSError):  # it died while starting
            ready = False
        if not ready:
            self.process.kill()
            raise WorkerFailed(
                f"an ingestion worker did not start within {_START_SECONDS} s (see its log)"
            )
        self.pending: set[int] = set()
        self.sending = threading.Lock()
        self._on_answer = on_answer
        self.reader = threading.Thread(target=self._read, name="waymark-ingest-reader", daemon=True)
        self.reader.start()

    def send(self, req: _Request) -> None:
        data = pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
        with self.sending:
            self.pending.add(req.rid)
            self.conn.send_bytes(data)

    def _read(self) -> None:
        while True:
            try:
                rid, outcome = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            self.pending.discard(rid)
            self._on_answer(rid, outcome)
        # the worker is gone: nobody will answer what it still held
        for rid in list(self.pending):
            self.pending.discard(rid)
            self._on_answer(rid, ("error", "the ingestion worker stopped"))

    @property
    def alive(self) -> bool:
        return self.process.is_alive() and self.reader.is_alive()

    def stop(self, timeout: float) -> None:
        with self.sending, suppress(OSError, EOFError):
            self.conn.send_bytes(b"")
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.reader.join(5)
        self.conn.close()


class IngestPool:
    """Worker processes that parse and store ingestion requests for the API process."""

    def __init__(self, settings: Settings, size: int) -> None:
        if size < 1:
            raise ValueError("an ingestion pool needs at least one worker")
        self._settings = settings
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[_Answer]]] = {}
        self._lock = threading.Lock()
        self._workers = [_Worker(settings, self._deliver) for _ in range(size)]
        self._closed = False

    def _deliver(self, rid: int, outcome: _Answer) -> None:
        with self._lock:
            waiting = self._waiting.pop(rid, None)
        if waiting is None:
            return
        loop, future = waiting

        def resolve() -> None:
            if not future.done():
                future.set_result(outcome)

        loop.call_soon_threadsafe(resolve)

    def _pick(self) -> _Worker:
        """The live worker with the fewest requests in flight (a dead one is replaced)."""
        for n, worker in enumerate(self._workers):
            if not worker.alive:
                log.warning("an ingestion worker stopped; starting a new one")
                worker.stop(timeout=1)
                self._workers[n] = _Worker(self._settings, self._deliver)
        return min(self._workers, key=lambda w: len(w.pending))

    async def store(
        self, kind: Kind, call: str, workspace_id: str, raw: bytes, received_at: datetime
    ) -> IngestResult:
        """Parse and store one request's raw body in a worker; returns the durable outcome.

        Raises :class:`InvalidInput` for a malformed body, :class:`WorkerFailed` when the
        worker could not answer."""
        if self._closed:
            raise WorkerFailed("the ingestion workers are shutting down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Answer] = loop.create_future()
        rid = next(self._ids)
        with self._lock:
            self._waiting[rid] = (loop, future)
            worker = self._pick()
        request = _Request(rid, kind, call, workspace_id, raw, received_at)
        try:
            if len(raw) > _PIPE_BYTES:  # may wait for the worker to drain the pipe
                await asyncio.to_thread(worker.send, request)
            else:
                worker.send(request)
        except (OSError, EOFError) as exc:
            with self._lock:
                self._waiting.pop(rid, None)
            raise WorkerFailed(f"the ingestion worker is unreachable: {exc}") from exc
        outcome = await future
        if outcome[0] == "ok":
            result: IngestResult = outcome[1]
            return result
        if outcome[0] == "invalid":
            raise InvalidInput(outcome[1], outcome[2])
        raise WorkerFailed(f"the ingestion worker failed: {outcome[1]}")

    def close(self, timeout: float = 30) -> None:
        """Let every worker finish what it holds, then stop them."""
        self._closed = True
        for worker in self._workers:
            worker.stop(timeout)
