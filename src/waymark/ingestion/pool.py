"""Ingestion in worker processes: the API's process reads requests, workers parse and store.

One Python process runs on one core (the GIL), so ``waymark serve`` with ``ingest_workers``
above zero starts worker processes of two roles. The API process authenticates a request and
reads its body within the limits. A *parse* worker (``parse_workers``) decodes, parses and
validates the raw bytes against the schema in force and returns the checked batch, pickled;
the API process forwards those bytes, unopened, to a *store* worker (``ingest_workers``),
which stores them through its own group committer (one state-store transaction for many
requests) and answers. Parsing is about half of the work per event, and SQLite allows one
writer: this way the writer's core does little else than write, and parsing runs on the
other core. The API process answers the client only with the store worker's answer, so an
acknowledged event is still durable. Should the schema change between parsing and storing,
the store worker validates the batch again under the version in force. With no parse worker
alive, store workers parse raw requests themselves. The event log stays with the API
process (the embedded DuckDB file has one owner), which moves the inbox as before.

If a worker dies, its requests in flight fail (the client retries; ``messageId`` makes the
retry safe) and a new worker takes its place.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import orjson
from sqlalchemy.exc import DataError

from waymark.core.errors import Conflict, InvalidInput, Issue, LimitExceeded, StoreBusy
from waymark.hub import Hub
from waymark.ingestion.batcher import GroupCommitter
from waymark.ingestion.payloads import (
    Limits,
    Parsed,
    parse_native_events,
    parse_segment_call,
)
from waymark.ingestion.service import IngestResult, check_events
from waymark.logs import configure
from waymark.model.events import Event
from waymark.model.schemas import Schema
from waymark.profiles.schema_store import schema_in_force
from waymark.settings import Settings

log = logging.getLogger(__name__)

Kind = Literal["segment", "native"]
Role = Literal["parse", "store"]
_READY = b"ready"
_START_SECONDS = 60
_ANSWER_SECONDS = 300  # far beyond any commit; a request never waits forever


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
    """One request for a worker. ``raw`` is the request body, or (``checked`` set) a parse
    worker's pickled, validated :class:`Parsed` batch."""

    rid: int
    kind: Kind
    call: str
    workspace_id: str
    raw: bytes
    received_at: datetime
    #: the schema version a parse worker validated ``raw`` against
    checked: int | None = None


# An answer: ("ok", IngestResult); from a parse worker ("parsed", schema version, pickled
# Parsed); or ("error", kind, message, issues) where kind names how the API answers:
# "invalid" (400), "limit" (413), "conflict" (409), "failed" (503), "internal" (500).
_Answer = tuple[Any, ...]


def _failure(exc: BaseException) -> _Answer:
    """How a failure in a worker travels to the API process (as plain data: exceptions with
    their own constructors do not survive pickling)."""
    if isinstance(exc, InvalidInput):
        return ("error", "invalid", exc.message, [(i.path, i.reason, i.code) for i in exc.issues])
    if isinstance(exc, DataError):  # a value the database refuses: the request's fault
        return ("error", "invalid", str(exc.orig).splitlines()[0], [])
    if isinstance(exc, LimitExceeded):
        return ("error", "limit", exc.message, [])
    if isinstance(exc, Conflict):
        return ("error", "conflict", exc.message, [])
    if isinstance(exc, StoreBusy):
        return ("error", "failed", exc.message, [])
    return ("error", "internal", f"{type(exc).__name__}: {exc}", [])


def _raise(outcome: _Answer) -> None:
    """Raise, in the API process, the error a worker's answer describes."""
    _, kind, message, issues = outcome
    if kind == "invalid":
        raise InvalidInput([Issue(*i) for i in issues] or [Issue("", message)], message)
    if kind == "limit":
        raise LimitExceeded(message)
    if kind == "conflict":
        raise Conflict(message)
    if kind == "failed":
        raise WorkerFailed(message)
    raise RuntimeError(f"the ingestion worker failed: {message}")


# -- the worker process ----------------------------------------------------------------------


def _worker_main(settings_data: dict[str, Any], conn: Connection, role: Role = "store") -> None:
    """Entry point of a worker process: serve requests from ``conn`` until it closes.

    Ctrl-C and SIGTERM reach every process of the group; the worker ignores them and stops
    when the API process says so (an empty message) or goes away (end of the pipe), after
    finishing what it holds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _name_process(f"waymark-{role}")
    settings = Settings.model_validate(settings_data)
    configure(settings.log_level, settings.log_format)
    hub = Hub.open(settings, migrate_now=False)
    committer = GroupCommitter(hub) if role == "store" else None
    schemas = _Schemas(hub) if role == "parse" else None
    limits = Limits(
        max_event_bytes=settings.max_event_bytes,
        max_future=settings.max_future,
        max_past=settings.max_past,
    )
    sending = threading.Lock()
    conn.send_bytes(_READY)

    def answer(rid: int, outcome: _Answer) -> None:
        try:
            data = pickle.dumps((rid, outcome), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # never leave a request without an answer
            log.exception("an ingestion answer could not be encoded")
            data = pickle.dumps((rid, _failure(exc)), protocol=pickle.HIGHEST_PROTOCOL)
        with sending, suppress(OSError, EOFError):
            conn.send_bytes(data)

    def settle(rid: int, future: Future[IngestResult]) -> None:
        exc = future.exception()
        answer(rid, ("ok", future.result()) if exc is None else _failure(exc))

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
                if req.checked is not None:  # parsed and validated by a parse worker
                    parsed: Parsed[Event] = pickle.loads(req.raw)
                else:
                    parsed = parse_request(
                        req.kind,
                        req.call,
                        decode_body(req.raw),
                        workspace_id=req.workspace_id,
                        received_at=req.received_at,
                        limits=limits,
                    )
                if schemas is not None:  # a parse worker: validate and hand back
                    version, schema = schemas.of(req.workspace_id)
                    checked = check_events(parsed, schema)
                    blob = pickle.dumps(checked, protocol=pickle.HIGHEST_PROTOCOL)
                    answer(req.rid, ("parsed", version, blob))
                    continue
            except Exception as exc:
                if not isinstance(exc, InvalidInput):
                    log.exception("parsing an ingestion request failed")
                answer(req.rid, _failure(exc))
                continue
            assert committer is not None
            future = committer.submit(req.workspace_id, parsed, checked=req.checked)
            future.add_done_callback(functools.partial(settle, req.rid))
    finally:
        if committer is not None:
            committer.close()
        hub.close()
        conn.close()


def _name_process(name: str) -> None:
    """Show ``name`` for this process in ps and top (Linux; elsewhere nothing happens)."""
    with suppress(Exception):
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class _Schemas:
    """The schema in force per workspace, as a parse worker sees it: read at most once per
    ``ttl`` seconds. A version that is out of date costs only time, never correctness: the
    store worker validates a batch again when it was checked under another version than
    the one in force at its commit."""

    def __init__(self, hub: Hub, ttl: float = 1.0) -> None:
        self._hub = hub
        self._ttl = ttl
        self._known: dict[str, tuple[float, int, Schema]] = {}

    def of(self, workspace_id: str) -> tuple[int, Schema]:
        now = time.monotonic()
        known = self._known.get(workspace_id)
        if known is not None and now - known[0] < self._ttl:
            return known[1], known[2]
        with self._hub.engine.connect() as conn:
            version, schema = schema_in_force(conn, workspace_id)
        if len(self._known) >= 1024:
            self._known.clear()
        self._known[workspace_id] = (now, version, schema)
        return version, schema


# -- the API process's side ------------------------------------------------------------------


class _Worker:
    """One worker process, its pipe, the requests it has not answered yet, and two threads:
    one sends requests (so the event loop never waits on a full pipe), one reads answers."""

    def __init__(
        self,
        settings: Settings,
        on_answer: Callable[[int, _Answer], None],
        on_exit: Callable[[_Worker], None],
        role: Role = "store",
    ) -> None:
        self.role: Role = role
        ctx = multiprocessing.get_context("spawn")  # the API process has threads: no fork
        self.conn, child = ctx.Pipe(duplex=True)
        self.process: BaseProcess = ctx.Process(
            target=_worker_main,
            args=(settings.model_dump(mode="json"), child, role),
            name=f"waymark-{role}-worker",
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
            self.process.join(5)
            self.conn.close()
            raise WorkerFailed(
                f"an ingestion {role} worker did not start within {_START_SECONDS} s (see its log)"
            )
        self.pending: set[int] = set()
        self._pending_lock = threading.Lock()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._on_answer = on_answer
        self._on_exit = on_exit
        self.sender = threading.Thread(target=self._send, name="waymark-ingest-send", daemon=True)
        self.reader = threading.Thread(target=self._read, name="waymark-ingest-read", daemon=True)
        self.sender.start()
        self.reader.start()

    @property
    def alive(self) -> bool:
        return self.process.is_alive() and self.reader.is_alive()

    def submit(self, req: _Request) -> None:
        """Queue a request for the worker (never blocks)."""
        data = pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
        with self._pending_lock:
            self.pending.add(req.rid)
        self._outbox.put(data)

    def _send(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except (OSError, EOFError, ValueError):  # the worker is gone: the reader fails all
                break

    def _read(self) -> None:
        try:
            while True:
                try:
                    rid, outcome = pickle.loads(self.conn.recv_bytes())
                except (EOFError, OSError):
                    break
                except Exception:  # a damaged message: the stream can no longer be trusted
                    log.exception("an ingestion worker's answer could not be read")
                    break
                with self._pending_lock:
                    self.pending.discard(rid)
                self._on_answer(rid, outcome)
        finally:
            self.fail_pending("the ingestion worker stopped")
            self._on_exit(self)

    def fail_pending(self, reason: str) -> None:
        """Answer every request still held with :class:`WorkerFailed`."""
        with self._pending_lock:
            held, self.pending = self.pending, set()
        for rid in held:
            self._on_answer(rid, ("error", "failed", reason, []))

    def stop(self, timeout: float) -> None:
        """Ask the worker to finish what it holds and exit; kill it after ``timeout``."""
        self._outbox.put(b"")  # the worker's signal to stop, after the requests before it
        self._outbox.put(None)
        self.sender.join(timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        with suppress(OSError):
            self.conn.close()
        self.reader.join(5)
        self.fail_pending("the ingestion worker was stopped")


class IngestPool:
    """Worker processes that parse and store ingestion requests for the API process:
    ``size`` store workers and ``parsers`` parse workers (see the module doc).

    A worker that dies is replaced in the background (after a pause if it keeps dying);
    meanwhile requests go to the other workers of its role, store workers parse for
    themselves when no parse worker is alive, and requests are answered 503 when no store
    worker is."""

    def __init__(self, settings: Settings, size: int, *, parsers: int = 0) -> None:
        if size < 1:
            raise ValueError("an ingestion pool needs at least one worker")
        if parsers < 0:
            raise ValueError("parsers must not be negative")
        self._settings = settings
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[_Answer]]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        self._parsers: list[_Worker] = []
        try:
            for _ in range(size):
                self._workers.append(self._start("store"))
            for _ in range(parsers):
                self._parsers.append(self._start("parse"))
        except BaseException:
            self.close(timeout=5)
            raise

    def _start(self, role: Role) -> _Worker:
        return _Worker(self._settings, self._deliver, self._exited, role)

    def _deliver(self, rid: int, outcome: _Answer) -> None:
        with self._lock:
            waiting = self._waiting.pop(rid, None)
        if waiting is None:  # its caller gave up (timeout, cancelled)
            return
        loop, future = waiting

        def resolve() -> None:
            if not future.done():
                future.set_result(outcome)

        with suppress(RuntimeError):  # that event loop is closed: nobody waits any more
            loop.call_soon_threadsafe(resolve)

    def _exited(self, worker: _Worker) -> None:
        """A worker's reader ended: replace the worker in the background unless closing."""
        if self._closed:
            return
        log.warning("an ingestion %s worker stopped; starting a new one", worker.role)
        threading.Thread(
            target=self._replace, args=(worker,), name="waymark-ingest-restart", daemon=True
        ).start()

    def _replace(self, dead: _Worker) -> None:
        dead.stop(timeout=1)
        pause = 0.5
        while not self._closed:
            try:
                fresh = self._start(dead.role)
            except WorkerFailed:
                log.exception("an ingestion worker could not be restarted; trying again")
                time.sleep(pause)
                pause = min(pause * 2, 30)
                continue
            with self._lock:
                if not self._closed:
                    self._workers = [fresh if w is dead else w for w in self._workers]
                    self._parsers = [fresh if w is dead else w for w in self._parsers]
                    return
            fresh.stop(timeout=5)  # the pool closed while it started

    async def _ask(self, role: Role, make: Callable[[int], _Request]) -> _Answer | None:
        """Send the request ``make(rid)`` to the least busy live worker of ``role`` and await
        its answer; ``None`` when no worker of that role is alive (a parse worker is
        optional), :class:`WorkerFailed` when closing or after the deadline."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Answer] = loop.create_future()
        rid = next(self._ids)
        with self._lock:
            if self._closed:
                raise WorkerFailed("the ingestion workers are shutting down")
            live = [w for w in (self._parsers if role == "parse" else self._workers) if w.alive]
            if not live:
                return None
            worker = min(live, key=lambda w: len(w.pending))
            self._waiting[rid] = (loop, future)
        worker.submit(make(rid))
        try:
            return await asyncio.wait_for(future, _ANSWER_SECONDS)
        except TimeoutError:
            raise WorkerFailed(
                f"the ingestion {role} worker did not answer within {_ANSWER_SECONDS} s"
            ) from None
        finally:
            with self._lock:
                self._waiting.pop(rid, None)

    async def store(
        self, kind: Kind, call: str, workspace_id: str, raw: bytes, received_at: datetime
    ) -> IngestResult:
        """Parse and store one request's raw body in the workers; returns the durable outcome.

        Raises what the in-process path would (:class:`InvalidInput` for a malformed body,
        ...), and :class:`WorkerFailed` when no worker could answer."""
        checked: int | None = None
        body = raw
        # a single call is parsed where it is stored: a second hop would cost it more time
        # than its parsing saves the store worker
        outcome = (
            await self._ask(
                "parse", lambda rid: _Request(rid, kind, call, workspace_id, raw, received_at)
            )
            if kind == "native" or call == "batch"
            else None
        )
        if outcome is not None:
            if outcome[0] != "parsed":
                _raise(outcome)
            _, checked, body = outcome
        outcome = await self._ask(
            "store",
            lambda rid: _Request(rid, kind, call, workspace_id, body, received_at, checked),
        )
        if outcome is None:
            raise WorkerFailed("no ingestion worker is running; retry shortly")
        if outcome[0] == "ok":
            result: IngestResult = outcome[1]
            return result
        _raise(outcome)
        raise AssertionError("unreachable")

    def close(self, timeout: float = 30) -> None:
        """Let every worker finish what it holds, then stop them."""
        with self._lock:
            self._closed = True
            workers = list(self._parsers) + list(self._workers)
        for worker in workers:
            worker.stop(timeout)
