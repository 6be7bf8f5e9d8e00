"""Moving acknowledged events from the state store's inbox to the event log.

Safe at any crash point: the log records the highest inbox ``seq`` it holds in the same
transaction as the append, so after a crash the same rows are skipped, not appended again; the
inbox rows are deleted only after the log has them. Each event is folded into the streaming
audiences once: embedded, the fold commits first and marks its inbox rows with the log numbers
reserved for them (``log_seq``), which a recovery appends as they are, without folding again;
rows the log holds unfolded are folded by the recovery. Merges recorded in ``profile_merges``
are applied to the log after the events, in ``seq`` order, also idempotently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
from sqlalchemy import Engine, delete, select, text

from waymark.gcpause import collector_paused
from waymark.hub import Hub
from waymark.segmentation.live import RECOVERY_SEQ, Folder, Moved
from waymark.storage.database import streaming_lock, write_tx
from waymark.storage.eventlog import EVENT_ARROW_SCHEMA, EventLog
from waymark.storage.hotpath import INBOX_COLUMNS, fetch_rows
from waymark.storage.tables import event_inbox, profile_merges

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FlushStats:
    """What one flush moved."""

    events: int
    merges: int


def _rows_to_arrow(rows: list[tuple[Any, ...]]) -> pa.Table:
    """Inbox rows (``INBOX_COLUMNS`` order; more columns after them are ignored) as the log's
    Arrow batch; JSON stays text."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in INBOX_COLUMNS]
    data = dict(zip(INBOX_COLUMNS, columns, strict=False))
    arrays: dict[str, pa.Array] = {}
    for field in EVENT_ARROW_SCHEMA:
        values = list(data[field.name])
        if pa.types.is_timestamp(field.type) and values and isinstance(values[0], str):
            # SQLite keeps UTC instants as text: Arrow parses the column in one call
            arrays[field.name] = pa.array(values).cast(pa.timestamp("us")).cast(field.type)
        else:
            arrays[field.name] = pa.array(values, field.type)
    return pa.table(arrays, schema=EVENT_ARROW_SCHEMA)


_PG_MOVE = text(
    """
    WITH moved AS (
        DELETE FROM event_inbox WHERE seq IN (
            SELECT seq FROM event_inbox ORDER BY seq LIMIT :n FOR UPDATE SKIP LOCKED)
        RETURNING *
    ), logged AS (
        INSERT INTO events (workspace_id, profile_id, message_id, type, name, timestamp,
            received_at, identities, properties, traits, context, source, flags, previous_id,
            group_id)
        SELECT workspace_id, profile_id, message_id, type, name, timestamp, received_at,
            identities::jsonb, properties::jsonb, traits::jsonb, context::jsonb, source,
            flags::jsonb, previous_id, group_id
        FROM moved ORDER BY seq
        RETURNING workspace_id, profile_id, name, timestamp, seq, properties
    )
    SELECT workspace_id, profile_id, name, timestamp, seq, properties FROM logged
    """
)


def _commit_moved(
    engine: Engine, folder: Folder | None, table: pa.Table, seqs: list[int], *, upto: int
) -> None:
    """Delete the inbox rows up to ``upto`` (now in the log), folding ``table`` (rows the log
    holds with these ``seqs``, not folded yet) in that transaction."""
    with collector_paused():  # see _move_folding
        prepared = None
        if folder is not None and table.num_rows:
            with engine.connect() as conn:
                prepared = folder.prepare(conn, _moved(table, seqs))
        with write_tx(engine) as conn:
            if folder is not None and prepared is not None:
                folder.commit(conn, prepared)
            conn.execute(delete(event_inbox).where(event_inbox.c.seq <= upto))
        del prepared


def _clean(engine: Engine, upto: int) -> None:
    """Delete the inbox rows up to ``upto``, now in the log (their own transaction)."""
    with write_tx(engine) as conn:
        conn.execute(delete(event_inbox).where(event_inbox.c.seq <= upto))


class _Taken(Exception):
    """Another mover took the batch first (its rows were stamped, appended or deleted)."""


class _Append:
    """The log append of one moved batch, with numbers the log reserved for it: run once,
    when the fold's history read needs the batch in the log, or after the fold commits.
    ``taken``: the log's marker said the batch was appended already (by another mover)."""

    def __init__(self, events: EventLog, table: pa.Table, *, upto: int, first: int) -> None:
        self.events, self.table, self.upto, self.first = events, table, upto, first
        self.done = self.taken = False

    def __call__(self) -> None:
        if not self.done:
            given = self.events.append_numbered(
                self.table, marker=("inbox", self.upto), first=self.first
            )
            self.done, self.taken = True, given is None


def _move_folding(
    engine: Engine, events: EventLog, folder: Folder, rows: list[tuple[Any, ...]], *, upto: int
) -> bool:
    """Move and fold inbox ``rows`` (up to inbox seq ``upto``); False when the log already
    held them or another mover took them first (nothing was written: read the inbox
    again).

    Embedded: the fold is computed with numbers the log reserves for the batch and committed
    first, each folded inbox row keeping its number (``log_seq``), so memberships change
    without waiting for the append; then the batch is appended with those numbers and its
    inbox rows are deleted. A history read (a state past its cap) appends the batch first,
    and the fold's transaction deletes it. A log that numbers rows itself (a sequence) is
    appended first, and the fold is committed with the inbox delete."""
    table = _rows_to_arrow(rows)
    first = events.reserve(table.num_rows)
    if first is None:
        numbered = events.append_numbered(table, marker=("inbox", upto))
        if numbered is None:
            return False
        _commit_moved(engine, folder, table, numbered, upto=upto)
        return True
    seqs = list(range(first, first + table.num_rows))
    append = _Append(events, table, upto=upto, first=first)
    # The states a batch makes hold no cycles and die with it (dropped below, before the
    # collector is back on): no collector pass need look at them.
    with collector_paused():
        with engine.connect() as conn:
            prepared = folder.prepare(conn, _moved(table, seqs), log_ready=append)
        try:
            if append.taken:
                return False
            with write_tx(engine) as conn:
                folder.commit(conn, prepared)
                if append.done:
                    conn.execute(delete(event_inbox).where(event_inbox.c.seq <= upto))
                else:
                    raw = conn.connection.driver_connection  # SQLite: only its log reserves
                    assert raw is not None
                    stamped = raw.executemany(  # compiled once, bound per row
                        "UPDATE event_inbox SET log_seq = ? WHERE seq = ? AND log_seq IS NULL",
                        [(seq, int(row[-1])) for seq, row in zip(seqs, rows, strict=True)],
                    )
                    if stamped.rowcount != len(rows):  # rolled back with the stamps
                        raise _Taken
        except _Taken:
            return False
        finally:
            del prepared
    if not append.done:
        append()
        _clean(engine, upto)
    return True


def _append_folded(engine: Engine, events: EventLog, rows: list[tuple[Any, ...]]) -> None:
    """Append inbox ``rows`` folded before a crash (each with its ``log_seq``, second to
    last) with those numbers, a run of consecutive numbers at a time, then delete them."""
    run: list[tuple[Any, ...]] = []
    for row in [*rows, None]:
        if run and (row is None or int(row[-2]) != int(run[-1][-2]) + 1):
            upto = int(run[-1][-1])
            events.append_numbered(
                _rows_to_arrow(run), marker=("inbox", upto), first=int(run[0][-2])
            )
            _clean(engine, upto)
            run = []
        if row is not None:
            run.append(row)


def flush_shared(
    engine: Engine, *, batch_size: int = 20_000, folder: Folder | None = None
) -> FlushStats:
    """Server mode: the log shares the state store's PostgreSQL database, so each batch moves
    in one statement (safe with many worker processes: rows locked by another mover, or not
    yet committed, are left for later), and ``folder`` folds the moved events into the
    streaming states in the same transaction. Merges were applied in the merging
    transaction."""
    moved = 0
    while True:
        with write_tx(engine) as conn:
            if folder is not None:
                streaming_lock(conn)  # before the inbox rows: merges take it in this order too
            rows = conn.execute(_PG_MOVE, {"n": batch_size}).all()
            if folder is not None and rows:
                with collector_paused():  # see _move_folding
                    events = [Moved(r[0], r[1], r[2], r[3], int(r[4]), r[5] or {}) for r in rows]
                    folder.commit(conn, folder.prepare(conn, events))
                    del events
        moved += len(rows)
        if len(rows) < batch_size:
            return FlushStats(moved, 0)


def _moved(table: pa.Table, seqs: list[int]) -> list[Moved]:
    """The appended rows as the streaming states read them, with their log ``seq``."""
    columns = [
        table.column(name).to_pylist()
        for name in ("workspace_id", "profile_id", "name", "timestamp", "properties")
    ]
    return [
        Moved(ws, pid, name, ts, seq, orjson.loads(props) if props else {})
        for ws, pid, name, ts, props, seq in zip(*columns, seqs, strict=True)
    ]


def flush_hub(hub: Hub, *, batch_size: int = 20_000) -> FlushStats:
    """:func:`flush` for ``hub``, folding what moves into the streaming audiences: how every
    caller in the application moves events, under ``hub.mover_lock`` (one mover at a time:
    a second one would take the first one's batch for a crash to recover from)."""
    with hub.mover_lock:
        return flush(
            hub.engine,
            hub.events,
            batch_size=batch_size,
            shared=hub.settings.shared_event_log,
            folder=Folder(hub),
        )


def flush(
    engine: Engine,
    events: EventLog,
    *,
    batch_size: int = 20_000,
    shared: bool = False,
    folder: Folder | None = None,
) -> FlushStats:
    """Move everything waiting in the inbox to ``events`` and apply pending merges.

    With a SQLite state store (one writer at a time, so inbox ``seq`` order is commit order)
    the log's watermarks make each step idempotent; ``shared`` selects :func:`flush_shared`.
    ``folder`` folds each moved batch into the streaming states in the transaction that
    deletes it from the inbox (computed just before it), so each event is folded once.
    """
    if shared:
        return flush_shared(engine, batch_size=batch_size, folder=folder)
    moved = 0
    while True:
        done = events.inbox_watermark()
        # read without the write lock (the ingestion writer goes on meanwhile): a snapshot
        # holds a prefix of the inbox in seq order, as writers commit one at a time
        with engine.connect() as conn:
            rows = fetch_rows(
                conn,
                f"SELECT {', '.join(INBOX_COLUMNS)}, log_seq, seq FROM event_inbox "
                f"ORDER BY seq LIMIT {int(batch_size)}",
            )
        if rows and int(rows[0][-1]) <= done:
            # rows already in the log (a crash came between the append and the cleanup):
            # fold those not folded yet with their log seqs, finish the cleanup, read again
            logged = [r for r in rows if int(r[-1]) <= done and r[-2] is None]
            ws_at, mid_at = INBOX_COLUMNS.index("workspace_id"), INBOX_COLUMNS.index("message_id")
            known = events.message_seqs([(r[ws_at], r[mid_at]) for r in logged])
            seqs = [known.get((r[ws_at], r[mid_at]), RECOVERY_SEQ + int(r[-1])) for r in logged]
            _commit_moved(engine, folder, _rows_to_arrow(logged), seqs, upto=done)
            continue
        if rows and rows[0][-2] is not None:
            # rows folded, then a crash before the append: append them as folded
            folded = []
            for row in rows:
                if row[-2] is None:
                    break
                folded.append(row)
            _append_folded(engine, events, folded)
            continue
        if not rows:
            break
        upto = int(rows[-1][-1])
        if folder is None:
            table = _rows_to_arrow(rows)
            if events.append_numbered(table, marker=("inbox", upto)) is None:
                continue  # appended meanwhile by another mover of this log: recover
            _clean(engine, upto)
        elif not _move_folding(engine, events, folder, rows, upto=upto):
            continue
        moved += len(rows)
        if len(rows) < batch_size:
            break
    merges = 0
    applied = events.merge_watermark()
    with engine.connect() as conn:
        pending = [
            (int(r.seq), r.workspace_id, r.absorbed_id, r.survivor_id)
            for r in conn.execute(
                select(profile_merges)
                .where(profile_merges.c.seq > applied)
                .order_by(profile_merges.c.seq)
            )
        ]
    if pending:
        events.apply_merges(pending)
        merges = len(pending)
    if moved or merges:
        log.debug("flushed inbox", extra={"events": moved, "merges": merges})
    return FlushStats(moved, merges)
