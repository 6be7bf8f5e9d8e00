"""Opening the state store: engines for SQLite (WAL) and PostgreSQL, and Alembic migrations."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from waymark.core.errors import InvalidInput, Issue, StoreBusy

try:
    import fcntl
except ImportError:  # not on Windows: threads still queue, processes use SQLite's busy wait
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
WAL_BACKSTOP_PAGES = 20_000  # 80 MB of 4 KB pages


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def create_state_engine(url: str, *, pool_size: int = 8) -> Engine:
    """Return an engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``).

    SQLite gets WAL journaling, a busy timeout and foreign keys; its folder is created.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InvalidInput([Issue("database_url", f"not a database URL: {url!r}")]) from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=NullPool if parsed.database in (None, "", ":memory:") else None,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged event survives power loss
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA secure_delete=ON")  # deleted people leave no bytes behind
            cur.execute("PRAGMA busy_timeout=30000")
            # the default 2 MB page cache is far smaller than the indexes ingestion writes into
            # (identities, seen message ids); pages are taken only as they are used
            cur.execute("PRAGMA cache_size=-65536")
            # a commit that finds the WAL beyond this many pages copies it into the database
            # first; `serve` checkpoints every second off the writer's path (checkpoint()),
            # so this is only the backstop (the default, 1000 pages, falls on the writer)
            cur.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
            cur.close()
            # let SQLAlchemy's BEGIN decide; pysqlite's own transaction handling is disabled
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # writers take the write lock up front (no deadlock on upgrade); readers do not
            immediate = conn.get_execution_options().get("waymark_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        lock_file = None
        if parsed.database and parsed.database != ":memory:":
            lock_file = Path(parsed.database).with_name(Path(parsed.database).name + "-writer")
        _WRITE_LOCKS[engine] = _WriterLock(lock_file)

        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(
            parsed,
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
        )
    raise InvalidInput(
        [Issue("database_url", f"unsupported state store {backend!r}; use sqlite or postgresql")]
    )


class _WriterLock:
    """Writers of one SQLite database queue here before ``BEGIN IMMEDIATE``: threads of this
    process on a lock, processes (API and ingestion workers) on an ``flock`` of a file beside
    the database. SQLite's own busy handler polls in sleeps of up to 100 ms, far too coarse for
    group commit; this waits in steps of at most 2 ms, and gives up after ``timeout`` seconds
    (:class:`StoreBusy`), as SQLite would."""

    def __init__(self, path: Path | None, timeout: float = 30.0) -> None:
        self._thread_lock = threading.Lock()
        self._path = path
        self._timeout = timeout
        self._fd: int | None = None
        self._closer: weakref.finalize[Any, Any] | None = None

    def __enter__(self) -> None:
        if not self._thread_lock.acquire(timeout=self._timeout):
            raise StoreBusy(f"no write turn on the state store within {self._timeout:.0f} s")
        try:
            self._lock_file()
        except BaseException:  # e.g. Ctrl-C while waiting: the next writer must not hang
            self._thread_lock.release()
            raise

    def _lock_file(self) -> None:
        if self._path is None or fcntl is None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                self._closer = weakref.finalize(self, os.close, self._fd)
        except OSError:  # e.g. a read-only folder: SQLite's busy handler still serializes
            log.debug("no writer lock file at %s", self._path, exc_info=True)
            return
        deadline = time.monotonic() + self._timeout
        pause = 0.0001
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusy(
                        f"another process has held the state store's write lock for "
                        f"{self._timeout:.0f} s ({self._path})"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.002)

    def __exit__(self, *_: object) -> None:
        try:
            if self._fd is not None and fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        """Close the lock file (the engine is being disposed of)."""
        if self._closer is not None:
            self._closer()
        self._closer, self._fd = None, None

    def after_fork(self) -> None:
        """In a forked child: its own thread lock, and its own descriptor once it writes (the
        inherited one shares the parent's lock)."""
        self._thread_lock = threading.Lock()
        self.close()


def close_writer_lock(engine: Engine) -> None:
    """Release what the writer lock of ``engine`` holds open (call when disposing of it)."""
    lock = _WRITE_LOCKS.pop(engine, None)
    if lock is not None:
        lock.close()


def _reset_writer_locks_after_fork() -> None:
    for lock in list(_WRITE_LOCKS.values()):
        lock.after_fork()


_held = threading.local()
_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, _WriterLock] = weakref.WeakKeyDictionary()
os.register_at_fork(after_in_child=_reset_writer_locks_after_fork)


@contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A write transaction, committed when the block ends without error.

    On SQLite, writers queue on a :class:`_WriterLock` before ``BEGIN IMMEDIATE``.
    """
    lock = _WRITE_LOCKS.get(engine)
    if lock is not None and getattr(_held, "engine", None) is engine:
        raise RuntimeError("a write transaction is already open in this thread; nest none")
    with lock if lock is not None else nullcontext():
        _held.engine = engine
        try:
            with engine.connect() as base:
                conn = base.execution_options(waymark_write=True)
                with conn.begin():
                    yield conn
        finally:
            _held.engine = None


#: PostgreSQL advisory lock serialising the streaming audiences' writers (waymark.segmentation.live)
STREAMING_LOCK = 727_002


def streaming_lock(conn: Connection) -> None:
    """On PostgreSQL, hold the streaming lock until ``conn``'s transaction ends: taken by every
    transaction that folds events or writes streaming states, and by merges and deletions of
    profiles *before* they touch rows a fold writes (so the two wait in one order and a fold
    never writes for a profile that a concurrent transaction removes). Nothing on SQLite,
    where writers are serialised anyway."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({STREAMING_LOCK})")


def checkpoint(engine: Engine) -> None:
    """Copy committed WAL pages into the SQLite database file (PASSIVE: writers and readers
    go on meanwhile; nothing happens on other backends). Called off the writers' path so
    their commits do not do it."""
    if engine.dialect.name != "sqlite":
        return
    raw = engine.raw_connection()
    try:
        raw.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        raw.close()


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the state store's schema to the newest migration (idempotent)."""
    with write_tx(engine) as conn:
        cfg = _alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def is_current(engine: Engine) -> bool:
    """Whether the store is at the newest migration."""
    script = ScriptDirectory.from_config(_alembic_config(engine))
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_heads()
    return set(current) == set(script.get_heads())
