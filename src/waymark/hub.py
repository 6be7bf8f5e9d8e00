"""The hub: the stores and the clock, opened once at the edge and handed to services."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, func, select

from waymark.core.clock import Clock, SystemClock
from waymark.settings import Settings
from waymark.storage.database import close_writer_lock, create_state_engine, migrate, write_tx
from waymark.storage.eventlog import EventLog, open_event_log
from waymark.storage.tables import event_inbox


@dataclass
class Hub:
    """Open stores for one process. The event log opens lazily: the embedded DuckDB file allows
    one writer process, so commands that do not need it do not take it."""

    settings: Settings
    engine: Engine
    clock: Clock = field(default_factory=SystemClock)
    _events: EventLog | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: held while events move from the inbox to the log (and are folded into the streaming
    #: audiences), and by privacy deletions; re-entrant
    mover_lock: threading.RLock = field(default_factory=threading.RLock)
    #: set when events were stored, so the mover runs now rather than at its next interval
    inbox_signal: threading.Event = field(default_factory=threading.Event)
    #: set when messages were written to the outbox, so the dispatcher runs now
    outbox_signal: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def open(
        cls, settings: Settings, clock: Clock | None = None, *, migrate_now: bool = True
    ) -> Hub:
        """Connect to the state store (migrating it to the newest schema unless told not to)."""
        settings.check_stores()
        engine = create_state_engine(settings.state_url)
        if migrate_now:
            migrate(engine)
        hub = cls(settings=settings, engine=engine, clock=clock or SystemClock())
        if settings.shared_event_log:
            _ = hub.events  # its tables must exist before the first merge re-points events
        return hub

    @property
    def events(self) -> EventLog:
        """The event log, opened on first use."""
        with self._lock:
            if self._events is None:
                opened = open_event_log(
                    self.settings.events_url, memory_mb=self.settings.event_log_memory_mb
                )
                if not self.settings.shared_event_log:
                    # numbers the mover folded inbox rows with before a restart, not yet
                    # appended: no other append may take them
                    try:
                        with self.engine.connect() as conn:
                            folded = conn.execute(select(func.max(event_inbox.c.log_seq))).scalar()
                    except BaseException:
                        opened.close()
                        raise
                    if folded is not None:
                        opened.reserve_through(int(folded))
                self._events = opened
            return self._events

    @property
    def events_open(self) -> bool:
        """Whether the event log has been opened by this process."""
        return self._events is not None

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """A state-store transaction, committed when the block ends without error."""
        with write_tx(self.engine) as conn:
            yield conn

    def close(self) -> None:
        """Release every store."""
        if self._events is not None:
            self._events.close()
            self._events = None
        if self.engine.dialect.name == "sqlite":
            raw = self.engine.raw_connection()  # keep the planner's statistics current
            try:
                raw.cursor().execute("PRAGMA optimize")
            finally:
                raw.close()
        close_writer_lock(self.engine)
        self.engine.dispose()
