"""The append-only event log: DuckDB (embedded) or PostgreSQL (server mode).

Acknowledged events first land in the state store's ``event_inbox`` inside the ingestion
transaction (durable at acknowledgement). The mover (:func:`waymark.ingestion.mover.flush`)
then appends them here in large batches; each append records the highest inbox ``seq`` it
contains in the same log transaction, so a crash between the append and the inbox cleanup
never appends an event twice. File imports append directly in bulk, each chunk carrying its own
marker (``import:<id>`` = last data row appended) in the same way. Profile merges are applied
here by re-pointing ``profile_id``.

Order of events is ``(timestamp, seq)``: ``seq`` is assigned by the log on append, so two events
with the same timestamp have one defined order in every evaluator.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import numpy as np
import orjson
import pyarrow as pa
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Identity,
    Index,
    MetaData,
    String,
    Table,
    and_,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url

from waymark.core.errors import InvalidInput, Issue, StoreBusy
from waymark.storage.database import create_state_engine
from waymark.storage.tables import UtcDateTime

#: Arrow schema of rows handed to :meth:`EventLog.append` (JSON columns as text).
EVENT_ARROW_SCHEMA = pa.schema(
    [
        ("workspace_id", pa.string()),
        ("profile_id", pa.string()),
        ("message_id", pa.string()),
        ("type", pa.string()),
        ("name", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("received_at", pa.timestamp("us", tz="UTC")),
        ("identities", pa.string()),
        ("properties", pa.string()),
        ("traits", pa.string()),
        ("context", pa.string()),
        ("source", pa.string()),
        ("flags", pa.string()),
        ("previous_id", pa.string()),
        ("group_id", pa.string()),
    ]
)
JSON_COLUMNS = ("identities", "properties", "traits", "context", "flags")


OPTIONAL_COLUMNS = ("previous_id", "group_id")


def conform(rows: pa.Table) -> pa.Table:
    """``rows`` in ``EVENT_ARROW_SCHEMA`` order and types; optional columns may be absent."""
    for name in OPTIONAL_COLUMNS:
        if name not in rows.column_names:
            rows = rows.append_column(name, pa.nulls(rows.num_rows, pa.string()))
    return rows.select(EVENT_ARROW_SCHEMA.names).cast(EVENT_ARROW_SCHEMA)


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One event as read back from the log."""

    seq: int
    workspace_id: str
    profile_id: str
    message_id: str
    type: str
    name: str
    timestamp: datetime
    received_at: datetime
    identities: dict[str, Any]
    properties: dict[str, Any]
    traits: dict[str, Any]
    context: dict[str, Any]
    source: str
    flags: list[str]
    previous_id: str | None = None
    group_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (timestamps as ISO-8601)."""
        return {
            "seq": self.seq,
            "message_id": self.message_id,
            "type": self.type,
            "name": self.name,
            "timestamp": self.timestamp.isoformat(),
            "received_at": self.received_at.isoformat(),
            "profile_id": self.profile_id,
            "identities": self.identities,
            "properties": self.properties,
            "traits": self.traits,
            "context": self.context,
            "source": self.source,
            "flags": self.flags,
            "previous_id": self.previous_id,
            "group_id": self.group_id,
        }


class EventLog(Protocol):
    """What the hub needs of an event log."""

    def append(self, rows: pa.Table, *, marker: tuple[str, int] | None = None) -> int:
        """Append ``rows`` (``EVENT_ARROW_SCHEMA``); return how many were appended.

        With ``marker=(key, value)`` the watermark ``key`` is raised to ``value`` in the same
        transaction, and nothing is appended (0 is returned) when it already is ``>= value``:
        a batch retried after a crash is never appended twice. The mover uses the key
        ``"inbox"`` (value: highest inbox ``seq``), file imports ``"import:<id>"`` (value:
        last data row of the chunk).
        """
        ...

    def append_numbered(
        self, rows: pa.Table, *, marker: tuple[str, int] | None = None, first: int | None = None
    ) -> list[int] | None:
        """:meth:`append`, returning the ``seq`` given to each row (in row order), or None
        when the marker says the rows were appended before. ``first``: the rows take
        ``first, first + 1, ...``, numbers :meth:`reserve` gave (``ValueError`` if the log
        gave any of them already, or numbers rows itself)."""
        ...

    def marker_value(self, key: str) -> int:
        """The value of the watermark ``key`` (0 when never set)."""
        ...

    def next_seq(self) -> int | None:
        """The ``seq`` the next append without ``first`` will give its first row, unless
        another append comes first; None when the log cannot tell beforehand (numbers drawn
        from a sequence)."""
        ...

    def reserve(self, count: int) -> int | None:
        """Set aside ``count`` numbers for one later :meth:`append_numbered` with ``first``,
        returning the first of them (appends without ``first`` give numbers after them); None
        when a sequence numbers the rows. Kept in this process only: whoever reserves keeps
        the numbers durably until appended, and gives them to :meth:`reserve_through` after a
        restart."""
        ...

    def reserve_through(self, seq: int) -> None:
        """Give no number up to ``seq`` to appends without ``first`` (numbers reserved before
        a restart and not appended yet)."""
        ...

    def inbox_watermark(self) -> int:
        """The highest inbox ``seq`` already appended (0 when none)."""
        ...

    def known_message_ids(self, workspace_id: str, candidates: Iterable[pa.Array]) -> set[str]:
        """Which of the ``candidates`` (string arrays, given a batch at a time to bound memory)
        are message ids of events the log holds for the workspace."""
        ...

    def merge_watermark(self) -> int:
        """The highest ``profile_merges.seq`` already applied (0 when none)."""
        ...

    def apply_merges(self, merges: Sequence[tuple[int, str, str, str]]) -> None:
        """Re-point events of absorbed profiles: ``(seq, workspace_id, absorbed, survivor)``
        in seq order; raises the merge watermark in the same transaction (idempotent)."""
        ...

    def events_for_profile(
        self, workspace_id: str, profile_id: str, *, limit: int = 100, before_seq: int | None = None
    ) -> list[LoggedEvent]:
        """The newest events of one profile, newest first."""
        ...

    def message_seqs(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The ``seq`` of each logged event by ``(workspace_id, message_id)`` (absent keys are
        left out): the streaming audiences' order of events recovered after a crash."""
        ...

    def histories(
        self, workspace_id: str, profile_ids: Sequence[str], names: Iterable[str]
    ) -> list[tuple[str, str, datetime, int, dict[str, Any]]]:
        """Every event named one of ``names`` of these profiles, as ``(profile_id, name,
        timestamp, seq, properties)``, ordered by profile, timestamp and seq."""
        ...

    def count(self, workspace_id: str) -> int:
        """How many events the workspace has in the log."""
        ...

    @property
    def dialect(self) -> str:
        """The sqlglot dialect of queries over this log (``duckdb`` or ``postgres``)."""
        ...

    def select_column(
        self, query: str, tables: Callable[[], Mapping[str, pa.Table]], *, work_mem_mb: int = 256
    ) -> list[Any]:
        """Run a read-only query over ``events`` and the state tables; return its first column.

        An embedded log reads the state tables from ``tables()`` (Arrow snapshots, registered
        by name for this query only); a log in the state database reads them in place and
        never calls it. ``work_mem_mb`` is PostgreSQL's per-operation memory for this query.
        """
        ...

    def delete_profiles(self, workspace_id: str, profile_ids: Sequence[str]) -> int:
        """Delete every event of these profiles; returns how many were deleted."""
        ...

    def purge(self) -> None:
        """Make deleted rows physically unrecoverable where the store allows it."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...


def final_survivors(merges: Sequence[tuple[int, str, str, str]]) -> dict[tuple[str, str], str]:
    """For merges ``(seq, workspace_id, absorbed, survivor)`` in seq order, where each absorbed
    profile's events end up: ``{(workspace_id, absorbed): last survivor}`` (a survivor may be
    absorbed later in turn; profile ids are never reused, so the chains have no cycles)."""
    into: dict[tuple[str, str], str] = {}
    for _seq, workspace_id, absorbed, survivor in merges:
        into[(workspace_id, absorbed)] = survivor
    final: dict[tuple[str, str], str] = {}
    for (workspace_id, absorbed), first in into.items():
        last, seen = first, {absorbed}
        while (workspace_id, last) in into and last not in seen:
            seen.add(last)
            last = into[(workspace_id, last)]
        final[(workspace_id, absorbed)] = last
    return final


def _decode(value: Any) -> Any:
    if value is None:
        return {}
    if isinstance(value, str | bytes):
        return orjson.loads(value)
    return value


def _row_to_event(row: Sequence[Any]) -> LoggedEvent:
    return LoggedEvent(
        seq=int(row[0]),
        workspace_id=row[1],
        profile_id=row[2],
        message_id=row[3],
        type=row[4],
        name=row[5],
        timestamp=row[6],
        received_at=row[7],
        identities=_decode(row[8]),
        properties=_decode(row[9]),
        traits=_decode(row[10]),
        context=_decode(row[11]),
        source=row[12],
        flags=_decode(row[13]) or [],
        previous_id=row[14],
        group_id=row[15],
    )


_COLUMNS = (
    "seq, workspace_id, profile_id, message_id, type, name, timestamp, received_at, "
    "identities, properties, traits, context, source, flags, previous_id, group_id"
)


@dataclass(slots=True)
class _Shared:
    """What every open DuckDBEventLog of this process on one file shares: the lock its
    transactions take, and ``log_meta`` as committed (``values``; ``present``: the keys that
    have a row, an absent one reads 0). DuckDB locks the file to one process and every write
    of ``log_meta`` goes through this class under ``lock``, which is held until the values
    kept here are those committed: a value kept is the file's (a read costs about a
    millisecond per statement; the mover reads the counters every round)."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    values: dict[str, int] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)
    #: instances open on the file (the counters are read afresh when it opens with none)
    users: int = 0
    #: the highest ``seq`` set aside by :meth:`DuckDBEventLog.reserve` (maybe not appended)
    reserved: int = 0


_SHARED: dict[str, _Shared] = {}
_SHARED_LOCK = threading.Lock()


class DuckDBEventLog:
    """The embedded event log in one DuckDB file (one writer process at a time)."""

    def __init__(self, path: Path, *, memory_mb: int = 256) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._memory_mb = memory_mb
        self._conn = self._connect()
        with _SHARED_LOCK:
            key = str(path.resolve())
            shared = _SHARED.get(key)
            if shared is None or shared.users == 0:  # read afresh from the file opened now
                shared = _SHARED[key] = _Shared()
            shared.users += 1
        self._shared = shared
        self._open = True
        self._lock = shared.lock
        self._conn.execute(
            """
            CREATE TABLE IF NOT EXISTS events (
                seq BIGINT NOT NULL,
                workspace_id VARCHAR NOT NULL,
                profile_id VARCHAR NOT NULL,
                message_id VARCHAR NOT NULL,
                type VARCHAR NOT NULL,
                name VARCHAR NOT NULL,
                timestamp TIMESTAMPTZ NOT NULL,
                received_at TIMESTAMPTZ NOT NULL,
                identities VARCHAR,
                properties VARCHAR,
                traits VARCHAR,
                context VARCHAR,
                source VARCHAR,
                flags VARCHAR,
                previous_id VARCHAR,
                group_id VARCHAR
            );
            CREATE TABLE IF NOT EXISTS log_meta (key VARCHAR PRIMARY KEY, value BIGINT NOT NULL);
            """
        )
        # The JSON columns are VARCHAR: every writer hands over JSON it encoded or checked
        # itself, and a JSON column would parse each value again on append (about a tenth
        # of an import's append time); DuckDB's JSON functions read VARCHAR all the same.
        # Logs created with JSON columns keep them (DuckDB then checks on append).
        # ``seq`` numbers come from a counter in log_meta, reserved a whole batch at a time:
        # a DuckDB sequence default costs a call per row (about a third of an append)
        if not self._conn.execute("SELECT 1 FROM log_meta WHERE key = 'seq'").fetchall():
            # a log created before the counter: start it after the highest seq (once)
            self._conn.execute(
                "INSERT INTO log_meta SELECT 'seq', coalesce(max(seq), 0) FROM events"
            )

    def _connect(self) -> duckdb.DuckDBPyConnection:
        try:
            conn = duckdb.connect(str(self._path))
        except duckdb.IOException as exc:
            raise StoreBusy(
                f"the event log {self._path} is in use by another process (is `waymark serve` "
                "running on this data folder?); stop it or send the data through its API"
            ) from exc
        # timestamps come back in UTC on every machine (GLOBAL: cursors are new sessions)
        conn.execute("SET GLOBAL TimeZone = 'UTC'")
        # without a cap DuckDB keeps up to 80% of the machine's memory in its buffer pool
        conn.execute(f"SET GLOBAL memory_limit = '{int(self._memory_mb)}MB'")
        # appends run on every core: rows carry their own ``seq``, and every read orders by it
        # (or by time), so the order rows are stored in means nothing
        conn.execute("SET GLOBAL preserve_insertion_order = false")
        return conn

    def purge(self) -> None:
        """Rewrite the file so that deleted rows leave no bytes behind (DuckDB keeps freed
        blocks as they were). Costs a copy of the log; privacy deletions call it."""
        with self._lock:
            fresh = self._path.with_name(self._path.name + ".purge")
            fresh.unlink(missing_ok=True)
            name = self._conn.execute("SELECT current_database()").fetchall()[0][0]
            self._conn.execute(f"ATTACH '{fresh}' AS purged")
            try:
                self._conn.execute(f'COPY FROM DATABASE "{name}" TO purged')
            finally:
                self._conn.execute("DETACH purged")
            self._conn.close()
            os.replace(fresh, self._path)
            self._conn = self._connect()

    @contextmanager
    def _tx(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def _meta(self, cur: duckdb.DuckDBPyConnection, key: str) -> int:
        """The committed value of ``key`` (0 when never set), read once per process."""
        return self._metas(cur, [key])[key]

    def _metas(self, cur: duckdb.DuckDBPyConnection, keys: Sequence[str]) -> dict[str, int]:
        """The committed values of ``keys``; call holding ``self._lock``."""
        shared = self._shared
        known = {key: shared.values[key] for key in keys if key in shared.values}
        missing = [key for key in keys if key not in known]
        if missing:
            found = dict(
                cur.execute(
                    "SELECT key, value FROM log_meta WHERE key IN (SELECT unnest(?))", [missing]
                ).fetchall()
            )
            for key in missing:
                known[key] = int(found.get(key, 0))
            shared.values.update({key: known[key] for key in missing})
            shared.present.update(found)
        return known

    def _write_metas(self, cur: duckdb.DuckDBPyConnection, values: Mapping[str, int]) -> None:
        """Set ``values`` in ``log_meta`` in one statement (an update when every key has a
        row already: about a millisecond less than an upsert)."""
        present = self._shared.present.issuperset(values)
        params: list[Any] = [item for pair in values.items() for item in pair]
        if present:
            cases = " ".join(["WHEN ? THEN ?"] * len(values))
            cur.execute(
                f"UPDATE log_meta SET value = CASE key {cases} END WHERE key IN (SELECT unnest(?))",
                [*params, list(values)],
            )
        else:
            cur.execute(
                "INSERT INTO log_meta VALUES "
                + ", ".join(["(?, ?)"] * len(values))
                + " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params,
            )

    def _committed(self, values: Mapping[str, int]) -> None:
        """Keep ``values`` as written by a transaction that has just committed (holding
        ``self._lock`` since before it began)."""
        self._shared.values.update(values)
        self._shared.present.update(values)

    def _forget(self, keys: Iterable[str]) -> None:
        """Read ``keys`` from the file again (a transaction writing them did not commit)."""
        for key in keys:
            self._shared.values.pop(key, None)
            self._shared.present.discard(key)

    def append(self, rows: pa.Table, *, marker: tuple[str, int] | None = None) -> int:
        seqs = self.append_numbered(rows, marker=marker)
        return 0 if seqs is None else len(seqs)

    def append_numbered(
        self, rows: pa.Table, *, marker: tuple[str, int] | None = None, first: int | None = None
    ) -> list[int] | None:
        rows = conform(rows)
        if marker is not None and marker[0] == "seq":
            raise ValueError("'seq' is the log's own counter, not a marker")
        keys = ["seq"] if marker is None else ["seq", marker[0]]
        written: dict[str, int] = {}
        with self._lock:  # until the counters kept are those committed
            try:
                given = self._append_in_tx(rows, marker, keys, written, first)
                if given is not None:
                    self._committed(written)
            except BaseException:
                self._forget(keys)
                raise
        if given is None:
            return None
        return list(range(given, given + rows.num_rows))

    def _append_in_tx(
        self,
        rows: pa.Table,
        marker: tuple[str, int] | None,
        keys: list[str],
        written: dict[str, int],
        first: int | None,
    ) -> int | None:
        """Append in one transaction; the first ``seq`` given (None: the marker says done),
        with the counters written in ``written``."""
        with self._tx() as cur:
            # the counters as kept (read once per process), one write of them
            known = self._metas(cur, keys)
            if marker is not None and known[marker[0]] >= marker[1]:
                return None
            if first is None:
                first = max(known["seq"], self._shared.reserved) + 1
            elif first <= known["seq"] and rows.num_rows:
                # rare (an import came between the reservation and this append): a check on
                # the numbers (zone maps keep it to the blocks that may hold them)
                given = cur.execute(
                    "SELECT count(*) FROM events WHERE seq BETWEEN ? AND ?",
                    [first, first + rows.num_rows - 1],
                ).fetchall()[0][0]
                if given:
                    raise ValueError(
                        f"seq {first} to {first + rows.num_rows - 1} were given already "
                        "(numbers must come from reserve())"
                    )
            written["seq"] = max(known["seq"], first + rows.num_rows - 1)
            if marker is not None:
                written[marker[0]] = marker[1]
            self._write_metas(cur, written)
            numbered = rows.append_column(
                "seq", pa.array(np.arange(first, first + rows.num_rows, dtype=np.int64))
            )
            cur.register("incoming_rows", numbered)
            try:
                cur.execute(
                    """
                    INSERT INTO events (seq, workspace_id, profile_id, message_id, type, name,
                        timestamp, received_at, identities, properties, traits, context,
                        source, flags, previous_id, group_id)
                    SELECT seq, workspace_id, profile_id, message_id, type, name, timestamp,
                        received_at, identities, properties, traits, context, source, flags,
                        previous_id, group_id
                    FROM incoming_rows
                    """
                )
            finally:
                cur.unregister("incoming_rows")
        return first

    def marker_value(self, key: str) -> int:
        with self._lock:
            if key in self._shared.values:
                return self._shared.values[key]
            return self._meta(self._conn.cursor(), key)

    def inbox_watermark(self) -> int:
        return self.marker_value("inbox")

    def next_seq(self) -> int:
        with self._lock:
            return max(self.marker_value("seq"), self._shared.reserved) + 1

    def reserve(self, count: int) -> int:
        if count < 0:
            raise ValueError("count must not be negative")
        with self._lock:
            first = self.next_seq()
            self._shared.reserved = max(self._shared.reserved, first + count - 1)
            return first

    def reserve_through(self, seq: int) -> None:
        with self._lock:
            self._shared.reserved = max(self._shared.reserved, seq)

    def known_message_ids(self, workspace_id: str, candidates: Iterable[pa.Array]) -> set[str]:
        known: set[str] = set()
        for batch in candidates:
            if not len(batch):
                continue
            with self._lock:
                cur = self._conn.cursor()
                try:
                    cur.register("candidate_ids", pa.table({"id": batch}))
                    # the candidates are the hash join's build side: the log is only scanned
                    rows = cur.execute(
                        "SELECT DISTINCT e.message_id FROM events e JOIN candidate_ids c "
                        "ON e.message_id = c.id WHERE e.workspace_id = ?",
                        [workspace_id],
                    ).fetchall()
                finally:
                    cur.close()
            known.update(r[0] for r in rows)
        return known

    def merge_watermark(self) -> int:
        return self.marker_value("merges")

    def apply_merges(self, merges: Sequence[tuple[int, str, str, str]]) -> None:
        if not merges:
            return
        with self._lock:  # until the counters kept are those committed
            try:
                done = self._apply_merges_in_tx(merges)
                if done is not None:
                    self._committed({"merges": done})
            except BaseException:
                self._forget(["merges"])
                raise

    def _apply_merges_in_tx(self, merges: Sequence[tuple[int, str, str, str]]) -> int | None:
        """Apply the merges not applied yet in one transaction; the merge watermark written
        (None: nothing to do)."""
        with self._tx() as cur:
            done = self._meta(cur, "merges")
            todo = [m for m in merges if m[0] > done]
            if not todo:
                return None
            final = final_survivors(todo)
            pairs = pa.table(
                {
                    "workspace_id": [w for w, _ in final],
                    "absorbed": [a for _, a in final],
                    "survivor": list(final.values()),
                }
            )
            cur.register("merge_pairs", pairs)
            try:  # one scan of the log for the whole batch, not one per merge
                cur.execute(
                    "UPDATE events SET profile_id = m.survivor FROM merge_pairs m "
                    "WHERE events.workspace_id = m.workspace_id "
                    "AND events.profile_id = m.absorbed"
                )
            finally:
                cur.unregister("merge_pairs")
            watermark = max(m[0] for m in todo)
            self._write_metas(cur, {"merges": watermark})
        return watermark

    def events_for_profile(
        self, workspace_id: str, profile_id: str, *, limit: int = 100, before_seq: int | None = None
    ) -> list[LoggedEvent]:
        with self._lock:
            cur = self._conn.cursor()
            rows = cur.execute(
                f"SELECT {_COLUMNS} FROM events WHERE workspace_id = ? AND profile_id = ? "
                "AND seq < ? ORDER BY timestamp DESC, seq DESC LIMIT ?",
                [workspace_id, profile_id, before_seq or 2**62, limit],
            ).fetchall()
        return [_row_to_event(r) for r in rows]

    def message_seqs(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        if not keys:
            return {}
        wanted = pa.table(
            {"ws": [k[0] for k in keys], "mid": [k[1] for k in keys]},
        )
        with self._lock:
            cur = self._conn.cursor()
            cur.register("wanted_messages", wanted)
            try:
                rows = cur.execute(
                    "SELECT e.workspace_id, e.message_id, e.seq FROM events e "
                    "JOIN wanted_messages w ON e.workspace_id = w.ws AND e.message_id = w.mid"
                ).fetchall()
            finally:
                cur.unregister("wanted_messages")
        return {(ws, mid): int(seq) for ws, mid, seq in rows}

    def histories(
        self, workspace_id: str, profile_ids: Sequence[str], names: Iterable[str]
    ) -> list[tuple[str, str, datetime, int, dict[str, Any]]]:
        wanted = sorted(set(names))
        if not profile_ids or not wanted:
            return []
        with self._lock:
            rows = (
                self._conn.cursor()
                .execute(
                    "SELECT profile_id, name, timestamp, seq, properties FROM events "
                    "WHERE workspace_id = ? AND profile_id IN (SELECT unnest(?::VARCHAR[])) "
                    "AND name IN (SELECT unnest(?::VARCHAR[])) "
                    "ORDER BY profile_id, timestamp, seq",
                    [workspace_id, list(profile_ids), wanted],
                )
                .fetchall()
            )
        return [
            (pid, name, ts, int(seq), orjson.loads(props) if props else {})
            for pid, name, ts, seq, props in rows
        ]

    def count(self, workspace_id: str) -> int:
        with self._lock:
            row = (
                self._conn.cursor()
                .execute("SELECT count(*) FROM events WHERE workspace_id = ?", [workspace_id])
                .fetchall()
            )
        return int(row[0][0])

    def delete_profiles(self, workspace_id: str, profile_ids: Sequence[str]) -> int:
        if not profile_ids:
            return 0
        with self._tx() as cur:
            row = cur.execute(
                "DELETE FROM events WHERE workspace_id = ? AND profile_id IN "
                "(SELECT unnest(?::VARCHAR[])) RETURNING seq",
                [workspace_id, list(profile_ids)],
            ).fetchall()
        return len(row)

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query (reports, tests, benchmarks)."""
        with self._lock:
            return self._conn.cursor().execute(query, list(params)).fetchall()

    @property
    def dialect(self) -> str:
        return "duckdb"

    def select_column(
        self, query: str, tables: Callable[[], Mapping[str, pa.Table]], *, work_mem_mb: int = 256
    ) -> list[Any]:
        snapshot = tables()  # read before taking the lock: it reads the state store
        with self._lock:
            cur = self._conn.cursor()
            try:
                for name, table in snapshot.items():
                    cur.register(name, table)
                return [row[0] for row in cur.execute(query).fetchall()]
            finally:
                for name in snapshot:
                    cur.unregister(name)
                cur.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._open:
                self._open = False
                with _SHARED_LOCK:
                    self._shared.users -= 1


log_metadata = MetaData()
events_table = Table(
    "events",
    log_metadata,
    Column("seq", BigInteger, Identity(), primary_key=True),
    Column("workspace_id", String(36), nullable=False),
    Column("profile_id", String(36), nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("type", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("timestamp", UtcDateTime, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Column("identities", JSONB),
    Column("properties", JSONB),
    Column("traits", JSONB),
    Column("context", JSONB),
    Column("source", String(100)),
    Column("flags", JSONB),
    Column("previous_id", String(255)),
    Column("group_id", String(255)),
    Index("ix_events_profile", "workspace_id", "profile_id", "timestamp"),
    Index("ix_events_workspace_ts", "workspace_id", "timestamp"),
)
log_meta_table = Table(
    "event_log_meta",
    log_metadata,
    Column("key", String(100), primary_key=True),  # "inbox", "merges", "import:<id>"
    Column("value", BigInteger, nullable=False),
)


class PostgresEventLog:
    """The event log as a PostgreSQL table (server mode); many processes may write."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(727001)"))
            log_metadata.create_all(conn)

    def _meta(self, conn: Any, key: str, *, lock: bool = False) -> int:
        stmt = select(log_meta_table.c.value).where(log_meta_table.c.key == key)
        if lock:
            conn.execute(
                text(
                    "INSERT INTO event_log_meta (key, value) VALUES (:k, 0) "
                    "ON CONFLICT (key) DO NOTHING"
                ),
                {"k": key},
            )
            stmt = stmt.with_for_update()
        value = conn.execute(stmt).scalar()
        return int(value or 0)

    def append(self, rows: pa.Table, *, marker: tuple[str, int] | None = None) -> int:
        seqs = self.append_numbered(rows, marker=marker)
        return 0 if seqs is None else len(seqs)

    def append_numbered(
        self, rows: pa.Table, *, marker: tuple[str, int] | None = None, first: int | None = None
    ) -> list[int] | None:
        if first is not None:
            raise ValueError("this log numbers rows from a sequence: it takes no first seq")
        rows = conform(rows)
        records = rows.to_pylist()
        for rec in records:
            for col in JSON_COLUMNS:
                rec[col] = orjson.loads(rec[col]) if rec[col] is not None else None
        with self._engine.begin() as conn:
            if marker is not None:
                key, value = marker
                if self._meta(conn, key, lock=True) >= value:
                    return None
                conn.execute(
                    update(log_meta_table).where(log_meta_table.c.key == key).values(value=value)
                )
            if not records:
                return []
            stmt = insert(events_table).returning(events_table.c.seq, sort_by_parameter_order=True)
            return [int(r[0]) for r in conn.execute(stmt, records)]

    def marker_value(self, key: str) -> int:
        with self._engine.connect() as conn:
            return self._meta(conn, key)

    def inbox_watermark(self) -> int:
        return self.marker_value("inbox")

    def next_seq(self) -> None:
        return None  # a sequence numbers the rows

    def reserve(self, count: int) -> None:
        return None

    def reserve_through(self, seq: int) -> None:
        return None

    def merge_watermark(self) -> int:
        with self._engine.connect() as conn:
            return self._meta(conn, "merges")

    def known_message_ids(self, workspace_id: str, candidates: Iterable[pa.Array]) -> set[str]:
        known: set[str] = set()
        with self._engine.begin() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cur:
                cur.execute("CREATE TEMP TABLE candidate_ids (id text) ON COMMIT DROP")
                for batch in candidates:
                    # COPY, then one hash join: message_id has no index of its own
                    cur.execute("TRUNCATE candidate_ids")
                    with cur.copy("COPY candidate_ids (id) FROM STDIN") as copy:
                        for value in batch.to_pylist():
                            copy.write_row((value,))
                    cur.execute(
                        "SELECT DISTINCT c.id FROM candidate_ids c JOIN events e "
                        "ON e.message_id = c.id WHERE e.workspace_id = %s",
                        (workspace_id,),
                    )
                    known.update(r[0] for r in cur.fetchall())
        return known

    def apply_merges(self, merges: Sequence[tuple[int, str, str, str]]) -> None:
        if not merges:
            return
        with self._engine.begin() as conn:
            done = self._meta(conn, "merges", lock=True)
            todo = [m for m in merges if m[0] > done]
            for _seq, workspace_id, absorbed, survivor in todo:
                conn.execute(
                    update(events_table)
                    .where(
                        and_(
                            events_table.c.workspace_id == workspace_id,
                            events_table.c.profile_id == absorbed,
                        )
                    )
                    .values(profile_id=survivor)
                )
            if todo:
                conn.execute(
                    update(log_meta_table)
                    .where(log_meta_table.c.key == "merges")
                    .values(value=max(m[0] for m in todo))
                )

    def events_for_profile(
        self, workspace_id: str, profile_id: str, *, limit: int = 100, before_seq: int | None = None
    ) -> list[LoggedEvent]:
        t = events_table
        stmt = (
            select(*t.c)
            .where(t.c.workspace_id == workspace_id, t.c.profile_id == profile_id)
            .order_by(t.c.timestamp.desc(), t.c.seq.desc())
            .limit(limit)
        )
        if before_seq is not None:
            stmt = stmt.where(t.c.seq < before_seq)
        with self._engine.connect() as conn:
            return [_row_to_event(tuple(r)) for r in conn.execute(stmt)]

    def message_seqs(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        found: dict[tuple[str, str], int] = {}
        t = events_table
        with self._engine.connect() as conn:
            for ws in sorted({k[0] for k in keys}):
                mids = [k[1] for k in keys if k[0] == ws]
                for mid, seq in conn.execute(
                    select(t.c.message_id, t.c.seq).where(
                        t.c.workspace_id == ws, t.c.message_id.in_(mids)
                    )
                ):
                    found[(ws, mid)] = int(seq)
        return found

    def histories(
        self, workspace_id: str, profile_ids: Sequence[str], names: Iterable[str]
    ) -> list[tuple[str, str, datetime, int, dict[str, Any]]]:
        with self._engine.connect() as conn:
            return pg_histories(conn, workspace_id, profile_ids, names)

    def count(self, workspace_id: str) -> int:
        with self._engine.connect() as conn:
            stmt = select(func.count()).where(events_table.c.workspace_id == workspace_id)
            return int(conn.execute(stmt).scalar_one())

    def delete_profiles(self, workspace_id: str, profile_ids: Sequence[str]) -> int:
        if not profile_ids:
            return 0
        with self._engine.begin() as conn:
            res = conn.execute(
                delete(events_table).where(
                    events_table.c.workspace_id == workspace_id,
                    events_table.c.profile_id.in_(list(profile_ids)),
                )
            )
            return int(res.rowcount or 0)

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query with ``%s``-free ``:p0, :p1`` parameters (reports, tests)."""
        with self._engine.connect() as conn:
            bind = {f"p{i}": v for i, v in enumerate(params)}
            return [tuple(r) for r in conn.execute(text(query), bind)]

    @property
    def dialect(self) -> str:
        return "postgres"

    def select_column(
        self, query: str, tables: Callable[[], Mapping[str, pa.Table]], *, work_mem_mb: int = 256
    ) -> list[Any]:
        # the log shares the state database, so the state tables are read in place; with
        # PostgreSQL's default work_mem, audience queries measured 100 times slower
        with self._engine.begin() as conn:
            cur = conn.connection.cursor()  # the driver's: no parameters, so '%' stays text
            try:
                cur.execute(f"SET LOCAL work_mem = '{int(work_mem_mb)}MB'")
                cur.execute(query)
                return [row[0] for row in cur.fetchall()]
            finally:
                cur.close()

    def purge(self) -> None:
        """PostgreSQL reclaims deleted rows through (auto)vacuum; nothing to do here."""

    def close(self) -> None:
        self._engine.dispose()


def pg_histories(
    conn: Any, workspace_id: str, profile_ids: Sequence[str], names: Iterable[str]
) -> list[tuple[str, str, datetime, int, dict[str, Any]]]:
    """:meth:`EventLog.histories` of a log in PostgreSQL, read through ``conn`` (so a
    transaction sees the events it has moved itself)."""
    wanted = sorted(set(names))
    if not profile_ids or not wanted:
        return []
    t = events_table
    stmt = (
        select(t.c.profile_id, t.c.name, t.c.timestamp, t.c.seq, t.c.properties)
        .where(
            t.c.workspace_id == workspace_id,
            t.c.profile_id.in_(list(profile_ids)),
            t.c.name.in_(wanted),
        )
        .order_by(t.c.profile_id, t.c.timestamp, t.c.seq)
    )
    return [(r[0], r[1], r[2], int(r[3]), r[4] or {}) for r in conn.execute(stmt)]


def open_event_log(url: str, *, memory_mb: int = 256) -> EventLog:
    """Open the event log named by ``url`` (``duckdb:///path`` or ``postgresql+psycopg://``);
    ``memory_mb`` caps the embedded DuckDB log's memory."""
    if url.startswith("duckdb:///"):
        return DuckDBEventLog(Path(url.removeprefix("duckdb:///")), memory_mb=memory_mb)
    if url.startswith(("postgresql", "postgres")):
        return PostgresEventLog(create_state_engine(url, pool_size=4))
    backend = make_url(url).get_backend_name() if "://" in url else url
    raise InvalidInput(
        [Issue("event_log_url", f"unsupported event log {backend!r}; use duckdb or postgresql")]
    )
