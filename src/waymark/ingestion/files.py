"""Batch ingestion from files: CSV, JSON Lines and Parquet files of profiles or of events.

Entry point: :func:`run_import` (the CLI's ``waymark import`` and the API's ``POST /v1/imports``
call it). Contracts:

* **Formats.** CSV (first line names the columns; every cell is text, read leniently as the
  schema's type; an empty cell is no value), JSON Lines (one flat JSON object per line, same
  column conventions; values keep their JSON types) and Parquet (typed columns; text columns are
  read leniently like CSV). Files are streamed in chunks: memory does not grow with file size.
* **Columns.** Each source column has a target, by convention or by ``mapping``
  (``identity:<ns>``, ``attribute:<name>``, ``consent:<channel>:<purpose>``, ``timestamp``,
  ``message_id``, ``type``, ``event``, ``properties``, ``property:<name>``, ``context``,
  ``traits``, ``ignore``); see :func:`default_target`.
* **Bad input.** A row with a problem is rejected with one line per problem (row, field, reason)
  in the error report ``<file>.errors.csv`` (or ``error_report``), written only when something
  was rejected; every other row is kept. Rows are numbered from 1, header excluded (for CSV a
  row is a record: a value spanning lines belongs to one row). Problems with the whole file
  (unknown format, no header, bad mapping, a missing required column) raise
  :class:`~waymark.core.errors.InvalidInput` before anything is written.
* **Idempotency.** A file is identified by its SHA-256 in the ``imports`` table. Importing a
  finished file again changes nothing and returns the earlier report with ``already_done``;
  an interrupted import (status ``running`` or ``failed``) resumes where it stopped.
* **Profiles** are applied chunk by chunk, one state-store transaction per chunk that also
  advances ``imports.rows_committed``. Rows whose identities are all new are written set-wise;
  the others go through :class:`ProfileWriter`. Large files are converted and validated by
  worker processes (one per core), a few chunks ahead of the writes.
* **Events** are appended to the event log directly (not through the inbox), in three phases:
  (1) every row is read and validated (pieces on one thread per core); its log columns are
  spilled to an Arrow file and its identities, time and message id staged in an in-memory
  DuckDB database that spills beyond its budget (both in a private folder under
  ``<data>/tmp``, removed at the end); (2) identities are resolved in bulk on the
  distinct identity tuples of the whole file: connected groups of identities that no profile
  holds become one new profile, new identities of a group held by one profile are linked to
  it, and groups that would merge profiles or break a unique namespace go through
  :class:`ProfileWriter`; so a device browsing anonymously in January and logging in in March
  lands on one profile without a merge; (3) groups of rows are appended, each append waiting
  until the profiles and identity links its rows need are committed (they are written set-wise
  meanwhile, in the order the file first needs them), carrying the marker
  ``("import:<id>", last row)`` in the log's own transaction, then a state transaction
  advances ``rows_committed``. ``first_seen``/``last_seen`` of existing profiles are widened
  with one grouped min/max, alongside the appends. A crash at any point neither loses nor
  duplicates an event: phases 1-2 are redone (idempotently) and rows at or below the log's
  marker are not appended again. A row repeating an earlier row's ``message_id`` is skipped,
  and so is a row whose ``message_id`` the hub already holds (from the API or another file).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import csv
import functools
import hashlib
import io
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, TypeAlias

import duckdb
import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc
import pyarrow.parquet as pq
from sqlalchemy import Connection, bindparam, case, insert, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from waymark.access.service import record_audit
from waymark.core.errors import Conflict, InvalidInput, Issue, NotFound
from waymark.core.ids import new_id, stable_id
from waymark.gcpause import collector_paused
from waymark.hub import Hub
from waymark.identity.graph import MergePolicy
from waymark.identity.service import ProfileWriter
from waymark.ingestion.mover import flush_hub
from waymark.ingestion.payloads import NAMESPACE_PATTERN, Limits, parse_timestamp
from waymark.ingestion.pipeline import limits_of, policy_of
from waymark.model.events import (
    STANDARD_NAMESPACES,
    ConsentStatus,
    ConsentUpdate,
    EventType,
    Identity,
    normalize_identity,
)
from waymark.model.json import to_jsonable
from waymark.model.schemas import NAME_PATTERN, Schema, validate_attributes
from waymark.model.schemas import validate_event as schema_validate_event
from waymark.profiles.schema_store import current_schema
from waymark.segmentation.live import invalidate as invalidate_streaming
from waymark.storage.tables import (
    audit_log,
    consents,
    event_inbox,
    identities,
    imports,
    profile_merges,
    profiles,
    sqlite_time,
    workspaces,
)

__all__ = [
    "FORMATS",
    "ImportKind",
    "ImportReport",
    "RowError",
    "default_target",
    "detect_format",
    "run_import",
]

log = logging.getLogger(__name__)

ImportKind = Literal["profiles", "events"]
Progress = Callable[[int, int | None], None]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

#: File formats understood, by name; :func:`detect_format` maps file extensions to them.
FORMATS: tuple[str, ...] = ("csv", "jsonl", "parquet")
_EXTENSIONS = {
    ".csv": "csv",
    ".txt": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
SOURCE = "import"  # the source name of imported attributes, consents and events
_NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)
_CSV_BLOCK_BYTES = 4 << 20
_CSV_JOIN_LINES = 200  # a quoted value may span at most this many lines
_MAX_ID_CHARS = 255
_MAX_NAME_CHARS = 200
_WRITE_BATCH = 20_000  # rows per executemany in the profile chunks
_BULK_BATCH = 50_000  # rows per transaction in the set-wise phases of events imports
_SEEN_BATCH = 50_000  # profiles per transaction when widening seen times during appends
_KNOWN_BATCH = 250_000  # identity links read per batch from the state store
_SQLITE_CACHE_KB = 65_536  # SQLite page cache during set-wise writes
_KNOWN_BATCH_ROWS = 1_000_000  # message ids checked against the log per query
_STAGE_MEMORY_MB = 384  # DuckDB's memory budget for staging an events import
_STAGE_APPEND_MEMORY_MB = 96  # ... while the events are appended (the log needs its own)
_WRITER_BATCH = 2_000  # records per ProfileWriter transaction
_PARALLEL_ROWS = 100_000  # profile files this large are converted by worker processes
_PARALLEL_BYTES = 32 << 20
_APPEND_ROWS = 200_000  # rows per event log append (DuckDB appends best in large batches)
_VALIDATE_THREADS = 4  # at most, one per core
_CHECK_CACHE = 50_000  # distinct (event, properties) validations remembered
_IMPORTABLE_TYPES = (EventType.TRACK, EventType.IDENTIFY, EventType.PAGE, EventType.SCREEN)
_CONSENT_WORDS = {s.value for s in ConsentStatus}
_PLAN_LOCK = threading.Lock()  # validating threads share one _Plan


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class RowError:
    """One problem of one rejected row: ``row`` counts data rows from 1 (header excluded),
    ``field`` names the source column ("" for the row as a whole)."""

    row: int
    field: str
    reason: str


@dataclass(frozen=True, slots=True)
class ImportReport:
    """The outcome of one import. ``rows_read`` = accepted + rejected + skipped (skipped: rows
    repeating an earlier row's ``message_id``). ``error_report`` is the path of the report of
    rejected rows, ``None`` when nothing was rejected."""

    import_id: str
    kind: str
    file: str
    status: str
    rows_read: int
    rows_accepted: int
    rows_rejected: int
    rows_skipped: int
    profiles_created: int
    profiles_merged: int
    error_report: str | None
    elapsed_seconds: float
    already_done: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the API's and the CLI's answer)."""
        return {
            "import_id": self.import_id,
            "kind": self.kind,
            "file": self.file,
            "status": self.status,
            "rows_read": self.rows_read,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "rows_skipped": self.rows_skipped,
            "profiles_created": self.profiles_created,
            "profiles_merged": self.profiles_merged,
            "error_report": self.error_report,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "already_done": self.already_done,
        }


# ----------------------------------------------------------------------------------------------
# Column targets


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one source column goes: ``what`` is the target kind, ``name`` its argument
    (namespace, attribute or property name, consent channel) and ``purpose`` a consent's."""

    what: str
    name: str = ""
    purpose: str = ""

    def __str__(self) -> str:
        if self.what == "consent":
            return f"consent:{self.name}:{self.purpose}"
        return f"{self.what}:{self.name}" if self.name else self.what


_PROFILE_TARGETS = frozenset({"identity", "attribute", "consent", "timestamp", "ignore"})
_EVENT_TARGETS = frozenset(
    {
        "identity",
        "timestamp",
        "message_id",
        "type",
        "event",
        "properties",
        "property",
        "context",
        "traits",
        "ignore",
    }
)
_BARE_TARGETS = frozenset(
    {"timestamp", "message_id", "type", "event", "properties", "context", "traits", "ignore"}
)


def _parse_target(text: str, column: str) -> _Target:
    """Read a mapping target such as ``identity:email``; raise InvalidInput naming ``column``."""
    head, _, rest = text.strip().partition(":")
    problem: str | None = None
    target: _Target | None = None
    if head in _BARE_TARGETS and not rest:
        target = _Target(head)
    elif head == "identity":
        if _NAMESPACE_RE.fullmatch(rest):
            target = _Target("identity", rest)
        else:
            problem = f"identity namespace {rest!r} must match {NAMESPACE_PATTERN}"
    elif head in ("attribute", "property"):
        if NAME_PATTERN.fullmatch(rest):
            target = _Target(head, rest)
        else:
            problem = f"{head} name {rest!r} must match {NAME_PATTERN.pattern}"
    elif head == "consent":
        channel, _, purpose = rest.partition(":")
        purpose = purpose or "marketing"
        if _NAMESPACE_RE.fullmatch(channel) and _NAMESPACE_RE.fullmatch(purpose):
            target = _Target("consent", channel, purpose)
        else:
            problem = f"consent channel and purpose must match {NAMESPACE_PATTERN}"
    if target is None:
        reason = problem or (
            f"unknown target {text!r}; use identity:<namespace>, attribute:<name>, "
            "consent:<channel>:<purpose>, timestamp, message_id, type, event, properties, "
            "property:<name>, context, traits or ignore"
        )
        raise InvalidInput([Issue(f"mapping.{column}", reason)])
    return target


def default_target(kind: ImportKind, column: str) -> str:
    """The target a column goes to when ``mapping`` does not name it.

    Both kinds: ``user_id``, ``anonymous_id``, ``email``, ``phone`` and ``identity.<ns>`` are
    identities. Profiles: ``consent.<channel>.<purpose>`` (or ``consent.<channel>``, purpose
    marketing) are consents, ``updated_at`` or ``timestamp`` the record's time, anything else an
    attribute. Events: ``message_id``, ``type``, ``event``, ``timestamp``, ``properties``,
    ``context`` and ``traits`` are themselves, anything else a property of that name.
    """
    name = column.strip()
    if name in STANDARD_NAMESPACES:
        return f"identity:{name}"
    if name.startswith("identity."):
        return f"identity:{name.removeprefix('identity.')}"
    if kind == "profiles":
        if name.startswith("consent."):
            return "consent:" + name.removeprefix("consent.").replace(".", ":", 1)
        if name in ("updated_at", "timestamp"):
            return "timestamp"
        return f"attribute:{name}"
    if name in _BARE_TARGETS - {"ignore"}:
        return name
    return f"property:{name}"


@dataclass
class _Plan:
    """The targets of a file's columns for one import (checked once per column)."""

    kind: ImportKind
    mapping: Mapping[str, str]
    targets: dict[str, _Target] = field(default_factory=dict)
    by_target: dict[str, str] = field(default_factory=dict)

    def target(self, column: str) -> _Target:
        """The target of ``column``; raises InvalidInput for a bad or duplicate target."""
        known = self.targets.get(column)
        if known is not None:
            return known
        given = self.mapping.get(column)
        text = given or default_target(self.kind, column)
        try:
            target = _parse_target(text, column)
        except InvalidInput as exc:
            if given:
                raise
            reason = (
                f"column {column!r} would go to {text!r}, which is not valid "
                f"({exc.issues[0].reason}); map it (e.g. to attribute:some_name) or ignore it"
            )
            raise InvalidInput([Issue(f"mapping.{column}", reason)]) from None
        allowed = _PROFILE_TARGETS if self.kind == "profiles" else _EVENT_TARGETS
        if target.what not in allowed:
            reason = f"target {text!r} does not apply to an import of {self.kind}"
            raise InvalidInput([Issue(f"mapping.{column}", reason)])
        if target.what != "ignore":
            key = str(target)
            if self.kind == "profiles" and target.what == "timestamp":
                key = "timestamp"
            other = self.by_target.get(key)
            if other is not None:
                reason = f"both {other!r} and {column!r} map to {key}; ignore one of them"
                raise InvalidInput([Issue(f"mapping.{column}", reason)])
            self.by_target[key] = column
        self.targets[column] = target
        return target

    def columns(self, what: str) -> list[tuple[str, _Target]]:
        """The columns seen so far with targets of kind ``what``, in file order."""
        return [(c, t) for c, t in self.targets.items() if t.what == what]

    def check(self, names: Sequence[str]) -> None:
        """Resolve every column of a file whose columns are known up front."""
        missing = sorted(set(self.mapping) - set(names))
        if missing:
            reason = f"the file has no column {missing[0]!r} (columns: {', '.join(names)})"
            raise InvalidInput([Issue(f"mapping.{missing[0]}", reason)])
        for name in names:
            self.target(name)


# ----------------------------------------------------------------------------------------------
# Reading: each reader yields pieces; every data row number appears in exactly one piece, in
# ``rows`` (parsed) or in ``errors`` (rejected while reading).


@dataclass
class _Piece:
    """Some rows of the file as columns. ``text`` names columns holding text to be read as the
    schema's type; ``json`` names columns whose values are JSON texts (nested JSON Lines
    values); ``last_row`` is the highest row number this piece accounts for."""

    table: pa.Table
    rows: I64
    errors: list[RowError]
    last_row: int
    text: frozenset[str] = frozenset()
    json: frozenset[str] = frozenset()


def detect_format(path: Path, fmt: str | None = None) -> str:
    """The format to read ``path`` as: ``fmt`` when given, else from the extension (a trailing
    ``.gz`` is not supported). Raises InvalidInput for an unknown one."""
    if fmt is not None:
        name = fmt.lower().removeprefix(".")
        name = {"ndjson": "jsonl", "json": "jsonl", "pq": "parquet"}.get(name, name)
        if name not in FORMATS:
            reason = f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}"
            raise InvalidInput([Issue("format", reason)])
        return name
    found = _EXTENSIONS.get(path.suffix.lower())
    if found is None:
        reason = (
            f"cannot tell the format of {path.name!r} from its extension; "
            f"pass the format ({', '.join(FORMATS)})"
        )
        raise InvalidInput([Issue("format", reason)])
    return found


def _codec(encoding: str) -> str:
    """The codec's canonical name; only encodings that write ASCII as ASCII are supported."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        raise InvalidInput([Issue("encoding", f"unknown encoding {encoding!r}")]) from None
    try:
        ascii_compatible = '\n,"{}az09'.encode(info.name) == b'\n,"{}az09'
    except UnicodeError:
        ascii_compatible = False
    if not ascii_compatible:
        reason = f"encoding {encoding!r} is not supported; convert the file to UTF-8"
        raise InvalidInput([Issue("encoding", reason)])
    return info.name


def _encoding_hint(codec: str) -> str:
    if codec == "utf-8":
        return (
            "if the file uses another encoding, import it with --encoding (e.g. latin-1 or cp1252)"
        )
    return f"check that the file really is {codec} (--encoding)"


def _undecodable(line: bytes, codec: str) -> str | None:
    """Why ``line`` is not valid ``codec`` text, or None when it is."""
    try:
        line.decode(codec)
    except UnicodeDecodeError as exc:
        shown = line[exc.start : exc.start + 1].hex()
        return (
            f"is not valid {'UTF-8' if codec == 'utf-8' else codec} text "
            f"(byte 0x{shown} at position {exc.start + 1}); {_encoding_hint(codec)}"
        )
    return None


def _rechunk(pieces: Iterable[_Piece], rows: int) -> Iterator[_Piece]:
    """Merge small pieces into pieces of at least ``rows`` rows (the last may be smaller)."""
    held: list[_Piece] = []
    count = 0
    for piece in pieces:
        held.append(piece)
        count += piece.table.num_rows
        if count >= rows:
            yield _merge_pieces(held)
            held, count = [], 0
    if held:
        yield _merge_pieces(held)


def _merge_pieces(held: list[_Piece]) -> _Piece:
    if len(held) == 1:
        return held[0]
    tables = [p.table for p in held if p.table.num_rows or p.table.num_columns]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else held[0].table
    return _Piece(
        table=table,
        rows=np.concatenate([p.rows for p in held]).astype(np.int64),
        errors=[e for p in held for e in p.errors],
        last_row=held[-1].last_row,
        text=frozenset().union(*(p.text for p in held)),
        json=frozenset().union(*(p.json for p in held)),
    )


# -- CSV ---------------------------------------------------------------------------------------


def _csv_header(first: bytes, codec: str) -> list[str]:
    if first.startswith(codecs.BOM_UTF8) and codec == "utf-8":
        first = first[len(codecs.BOM_UTF8) :]
    try:
        text = first.decode(codec).rstrip("\r\n")
    except UnicodeDecodeError:
        reason = f"the header line is not valid {codec} text; {_encoding_hint(codec)}"
        raise InvalidInput([Issue("header", reason)]) from None
    if not text.strip():
        raise InvalidInput([Issue("header", "the first line must name the columns")])
    names = [n.strip() for n in next(csv.reader([text]))]
    blank = [i + 1 for i, n in enumerate(names) if not n]
    if blank:
        raise InvalidInput([Issue("header", f"column {blank[0]} of the header has no name")])
    repeated = [n for n, count in Counter(names).items() if count > 1]
    if repeated:
        raise InvalidInput([Issue("header", f"the header names {repeated[0]!r} twice")])
    return names


class _CsvReader:
    """Streams a CSV file in blocks of whole lines.

    A block whose lines all hold an even number of quotes (no value spans lines) and that is
    valid text is parsed by Arrow at once. Otherwise lines are taken one by one: a line with an
    odd number of quotes either opens a value continued on a later line (joined when the joined
    record has the header's number of values and no line in between would be a row by itself),
    or is rejected alone as broken quoting; a line that is not valid text is rejected alone.
    """

    def __init__(self, path: Path, codec: str) -> None:
        self.path = path
        self.codec = codec
        self.names: list[str] = []
        with path.open("rb") as f:
            first = f.readline()
        if not first:
            raise InvalidInput([Issue("file", "the file is empty")])
        self.names = _csv_header(first, codec)
        self._header_bytes = len(first)
        self._types = {n: pa.string() for n in self.names}

    def pieces(self) -> Iterator[_Piece]:
        row = 0  # the last row number given out
        carry = b""
        with self.path.open("rb") as f:
            f.seek(self._header_bytes)
            while True:
                block = f.read(_CSV_BLOCK_BYTES)
                final = not block
                data = carry + block
                if final:
                    if not data:
                        return
                    if not data.endswith(b"\n"):
                        data += b"\n"
                    cut = len(data)
                else:
                    cut = data.rfind(b"\n") + 1
                    if cut == 0:
                        carry = data  # a line longer than a block: read on
                        continue
                piece, used = self._block(data[:cut], row, final=final)
                carry = data[used:]
                row = piece.last_row
                yield piece
                if final:
                    return

    # -- one block ------------------------------------------------------------------------

    def _block(self, data: bytes, row: int, *, final: bool) -> tuple[_Piece, int]:
        """Parse whole lines ``data``; return the piece and how many bytes were used."""
        if self.codec != "utf-8":
            try:
                utf8 = data.decode(self.codec).encode("utf-8")
            except UnicodeDecodeError:
                return self._slow(data, row, final=final)
        else:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return self._slow(data, row, final=final)
            utf8 = data
        raw = np.frombuffer(utf8, dtype=np.uint8)
        ends = np.flatnonzero(raw == 10)
        quotes = np.flatnonzero(raw == 34)
        per_line = np.diff(np.searchsorted(quotes, ends), prepend=0)
        if quotes.size and np.any(per_line % 2):
            return self._slow(data, row, final=final)
        starts = np.concatenate(([0], ends[:-1] + 1))
        length = ends - starts  # without the newline
        blank = (length == 0) | ((length == 1) & (raw[np.maximum(ends - 1, 0)] == 13))
        numbers = [row + i + 1 for i in range(ends.size)]
        table, rows, errors = self._parse(utf8, numbers)
        if blank.any():  # an empty line is no row (Arrow reads it as one of nulls)
            table, rows = _without(table, rows, {numbers[i] for i in np.flatnonzero(blank)})
        piece = _Piece(table, rows, errors, row + int(ends.size), text=frozenset(self.names))
        return piece, len(data)

    def _parse(self, utf8: bytes, numbers: list[int]) -> tuple[pa.Table, I64, list[RowError]]:
        """Parse records (UTF-8, newline-terminated) whose row numbers are ``numbers``."""
        invalid: list[tuple[int | None, str, int]] = []

        def on_invalid(bad: pacsv.InvalidRow) -> str:
            invalid.append((bad.number, bad.text, bad.actual_columns))
            return "skip"

        table = pacsv.read_csv(
            pa.BufferReader(utf8),
            read_options=pacsv.ReadOptions(
                column_names=self.names, use_threads=False, block_size=max(len(utf8) + 1, 1 << 20)
            ),
            parse_options=pacsv.ParseOptions(
                invalid_row_handler=on_invalid, newlines_in_values=True, ignore_empty_lines=False
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=self._types,
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        errors: list[RowError] = []
        skip: set[int] = set()
        for number, text, got in invalid:
            if number is None or not 1 <= number <= len(numbers):
                return self._parse_by_python(utf8, numbers)
            skip.add(number)
            if text.strip():
                reason = (
                    f"has {got} value{'s' if got != 1 else ''} but the header names "
                    f"{len(self.names)} columns"
                )
                errors.append(RowError(numbers[number - 1], "", reason))
        rows = np.array([n for i, n in enumerate(numbers, 1) if i not in skip], dtype=np.int64)
        if rows.size != table.num_rows:
            return self._parse_by_python(utf8, numbers)
        return table, rows, errors

    def _parse_by_python(
        self, utf8: bytes, numbers: list[int]
    ) -> tuple[pa.Table, I64, list[RowError]]:
        """The same, record by record (used if Arrow cannot tell which rows it skipped)."""
        columns: list[list[str | None]] = [[] for _ in self.names]
        rows: list[int] = []
        errors: list[RowError] = []
        records = csv.reader(io.StringIO(utf8.decode("utf-8"), newline=""))
        for number, values in zip(numbers, records, strict=False):
            if not values or (len(values) == 1 and not values[0].strip()):
                continue
            if len(values) != len(self.names):
                reason = f"has {len(values)} values but the header names {len(self.names)} columns"
                errors.append(RowError(number, "", reason))
                continue
            rows.append(number)
            for column, value in zip(columns, values, strict=True):
                column.append(value if value != "" else None)
        table = pa.table(
            {n: pa.array(c, pa.string()) for n, c in zip(self.names, columns, strict=True)}
        )
        return table, np.array(rows, dtype=np.int64), errors

    def _slow(self, data: bytes, row: int, *, final: bool) -> tuple[_Piece, int]:
        """Line by line: join values spanning lines, reject broken or undecodable lines."""
        lines = _lines(data)
        good: list[bytes] = []
        numbers: list[int] = []
        errors: list[RowError] = []
        used = 0
        i = 0
        while i < len(lines):
            line = lines[i]
            undecodable = _undecodable(line, self.codec)
            if undecodable is not None:
                row += 1
                errors.append(RowError(row, self._field_of(line), undecodable))
                used += len(line)
                i += 1
                continue
            if line.count(b'"') % 2 == 0:
                row += 1
                good.append(line)
                numbers.append(row)
                used += len(line)
                i += 1
                continue
            joined = self._join(lines, i, final=final)
            if joined is None:  # need more lines than this block holds
                break
            row += 1
            if joined == 0:
                reason = (
                    'has a quote (") that is never closed; quote the whole value and double '
                    "each quote inside it"
                )
                errors.append(RowError(row, self._field_of(line), reason))
                used += len(line)
                i += 1
                continue
            record = b"".join(lines[i : i + joined])
            good.append(record if record.endswith(b"\n") else record + b"\n")
            numbers.append(row)
            used += len(record)
            i += joined
        if good:
            text = b"".join(good)
            if self.codec != "utf-8":
                text = text.decode(self.codec).encode("utf-8")
            table, rows, more = self._parse(text, numbers)
            errors.extend(more)
            blanks = {n for n, line in zip(numbers, good, strict=True) if not line.strip()}
            if blanks:
                table, rows = _without(table, rows, blanks)
        else:
            table, rows = _empty_table(self.names), np.zeros(0, dtype=np.int64)
        errors.sort(key=lambda e: e.row)
        return _Piece(table, rows, errors, row, text=frozenset(self.names)), used

    def _join(self, lines: list[bytes], start: int, *, final: bool) -> int | None:
        """How many lines from ``start`` make one record (0: the line is broken by itself);
        None when the answer needs lines beyond this block."""
        end = min(len(lines), start + _CSV_JOIN_LINES)
        for j in range(start + 1, end):
            if _undecodable(lines[j], self.codec) is not None:
                return 0
            if lines[j].count(b'"') % 2 == 0:
                if self._complete_row(lines[j]):
                    return 0  # a whole row by itself: the opening line is the broken one
                continue
            record = b"".join(lines[start : j + 1]).decode(self.codec)
            values = next(csv.reader(io.StringIO(record, newline="")), [])
            return j + 1 - start if len(values) == len(self.names) else 0
        if not final and end == len(lines):
            return None
        return 0

    def _complete_row(self, line: bytes) -> bool:
        text = line.decode(self.codec).rstrip("\r\n")
        values = next(csv.reader([text]), [])
        return len(values) == len(self.names) and len(self.names) > 1

    def _field_of(self, line: bytes) -> str:
        """The column holding the first undecodable byte or the unclosed quote (best effort)."""
        text = line.decode(self.codec, errors="surrogateescape").rstrip("\r\n")
        column, quoted, opened_in = 0, False, None
        for ch in text:
            if "\udc80" <= ch <= "\udcff":
                opened_in = column
                break
            if ch == '"':
                quoted = not quoted
                if quoted:
                    opened_in = column
            elif ch == "," and not quoted:
                column += 1
        else:
            if not quoted:
                return ""
        if opened_in is None or opened_in >= len(self.names):
            return ""
        return self.names[opened_in]


def _without(table: pa.Table, rows: I64, numbers: set[int]) -> tuple[pa.Table, I64]:
    """``table`` and its row numbers without the rows numbered ``numbers``."""
    keep = ~np.isin(rows, np.fromiter(numbers, dtype=np.int64))
    return table.filter(pa.array(keep)), rows[keep]


def _lines(data: bytes) -> list[bytes]:
    """Split newline-terminated ``data`` into lines, each keeping its ``\\n``."""
    parts = data.split(b"\n")
    return [part + b"\n" for part in parts[:-1]]


def _empty_table(names: Sequence[str]) -> pa.Table:
    return pa.table({n: pa.array([], pa.string()) for n in names})


# -- JSON Lines --------------------------------------------------------------------------------


def _json_column(values: list[Any]) -> tuple[pa.Array, bool]:
    """An Arrow column for JSON values: typed when all values share a scalar type, else the
    values' JSON texts (second result True)."""
    kinds = {type(v) for v in values if v is not None}
    try:
        if kinds <= {str}:
            return pa.array(values, pa.string()), False
        if kinds == {bool}:
            return pa.array(values, pa.bool_()), False
        if kinds == {int}:
            return pa.array(values, pa.int64()), False
        exact = all(abs(v) < 2**53 for v in values if isinstance(v, int))
        if kinds in ({int, float}, {float}) and exact:
            return pa.array(values, pa.float64()), False
    except (pa.ArrowInvalid, OverflowError, TypeError):
        pass
    texts = [None if v is None else orjson.dumps(v).decode() for v in values]
    return pa.array(texts, pa.string()), True


def _jsonl_pieces(path: Path, codec: str, rows_per_piece: int) -> Iterator[_Piece]:
    utf8 = codec == "utf-8"
    objects: list[dict[str, Any]] = []
    numbers: list[int] = []
    errors: list[RowError] = []
    row = 0

    def piece() -> _Piece:
        keys: dict[str, None] = {}
        for obj in objects:
            keys.update(dict.fromkeys(obj))
        arrays: dict[str, pa.Array] = {}
        json_columns: set[str] = set()
        for key in keys:
            array, is_json = _json_column([obj.get(key) for obj in objects])
            arrays[key] = array
            if is_json:
                json_columns.add(key)
        table = pa.table(arrays) if arrays else pa.table({"_": pa.nulls(len(objects))})
        rows = np.array(numbers, dtype=np.int64)
        return _Piece(table, rows, list(errors), row, json=frozenset(json_columns))

    with path.open("rb") as f:
        for line in f:
            row += 1
            text = line.strip()
            if row == 1 and utf8 and text.startswith(codecs.BOM_UTF8):
                text = text[len(codecs.BOM_UTF8) :]
            if not text:
                continue
            try:
                obj = orjson.loads(text if utf8 else text.decode(codec))
            except (orjson.JSONDecodeError, UnicodeDecodeError) as exc:
                reason = _undecodable(text, codec) or f"is not valid JSON: {exc}"
                errors.append(RowError(row, "", reason))
                continue
            if not isinstance(obj, dict):
                kind = "array" if isinstance(obj, list) else type(obj).__name__
                errors.append(RowError(row, "", f"must be a JSON object, got {kind}"))
                continue
            objects.append(obj)
            numbers.append(row)
            if len(objects) >= rows_per_piece:
                yield piece()
                objects, numbers, errors = [], [], []
    if objects or errors or row:
        yield piece()


# -- Parquet -----------------------------------------------------------------------------------


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, pre_buffer=False)  # page by page: memory stays small
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput([Issue("file", f"not a readable Parquet file: {exc}")]) from None


def _parquet_pieces(pf: pq.ParquetFile, rows_per_piece: int) -> Iterator[_Piece]:
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=rows_per_piece):
            columns: dict[str, pa.Array] = {}
            text: set[str] = set()
            for name, column in zip(batch.schema.names, batch.columns, strict=True):
                array: pa.Array = column
                if pa.types.is_dictionary(array.type):
                    array = array.dictionary_decode()
                if pa.types.is_large_string(array.type) or pa.types.is_string_view(array.type):
                    array = array.cast(pa.string())
                if pa.types.is_string(array.type):
                    text.add(name)
                columns[name] = array
            n = batch.num_rows
            yield _Piece(
                pa.table(columns),
                np.arange(row + 1, row + n + 1, dtype=np.int64),
                [],
                row + n,
                text=frozenset(text),
            )
            row += n
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput([Issue("file", f"the Parquet file cannot be read: {exc}")]) from None


# ----------------------------------------------------------------------------------------------
# The error report


class _ErrorSink:
    """Appends rejected rows to the report (CSV: row, field, reason) as they are found.

    ``keep_upto`` keeps the lines of an earlier, interrupted run for rows up to that number and
    drops the rest (they are read again); 0 starts a new report.
    """

    def __init__(self, path: Path, *, keep_upto: int = 0) -> None:
        self.path = path
        self.rows: list[int] = []  # distinct rejected rows found by this run, ascending
        self._file: io.TextIOWrapper | None = None
        self._writer: Any = None
        self._kept = False
        if path.exists():
            if keep_upto > 0:
                self._keep(keep_upto)
            else:
                path.unlink()

    def _keep(self, upto: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        kept = 0
        with (
            self.path.open(newline="", encoding="utf-8") as src,
            tmp.open("w", newline="", encoding="utf-8") as dst,
        ):
            reader = csv.reader(src)
            writer = csv.writer(dst)
            for record in reader:
                header = bool(record) and record[0] == "row"
                if header or (record and record[0].isdigit() and int(record[0]) <= upto):
                    writer.writerow(record)
                    kept += not header
        os.replace(tmp, self.path)
        self._kept = kept > 0
        if not self._kept:
            self.path.unlink()

    def add(self, errors: Sequence[RowError]) -> None:
        """Record the problems of rejected rows (in any order)."""
        if not errors:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            exists = self.path.exists()
            self._file = self.path.open("a", newline="", encoding="utf-8")
            self._writer = csv.writer(self._file)
            if not exists:
                self._writer.writerow(["row", "field", "reason"])
        ordered = sorted(errors, key=lambda e: e.row)
        self._writer.writerows((e.row, e.field, e.reason) for e in ordered)
        last = self.rows[-1] if self.rows else 0
        for e in ordered:
            if e.row != last:
                self.rows.append(e.row)
                last = e.row
        self._file.flush()

    def count_upto(self, row: int) -> int:
        """How many distinct rows up to ``row`` this run rejected."""
        return int(np.searchsorted(np.asarray(self.rows, dtype=np.int64), row, side="right"))

    def close(self) -> str | None:
        """Close the report; return its path, or None when no row was rejected."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return str(self.path) if (self.rows or self._kept) else None


# ----------------------------------------------------------------------------------------------
# The ``imports`` row: claiming the file, progress, completion


@dataclass
class _Job:
    """One import being run (possibly resuming an interrupted one)."""

    id: str
    workspace_id: str
    kind: ImportKind
    path: Path
    sha256: str
    resumed: bool
    committed: int  # rows_committed when this run started
    accepted: int
    rejected: int
    clock_start: float
    created: int = 0
    merged: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def marker(self) -> str:
        """The event log watermark key of this import."""
        return f"import:{self.id}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def options_fingerprint(fmt: str, codec: str, mapping: Mapping[str, str]) -> str:
    """What identifies how a file is read, beside its content: format, encoding (for text
    formats) and column mapping. The same file read otherwise is another import."""
    options = {
        "format": fmt,
        "encoding": codec if fmt != "parquet" else "",
        "mapping": sorted(mapping.items()),
    }
    return hashlib.sha256(orjson.dumps(options, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _claim(
    hub: Hub,
    *,
    workspace_id: str,
    kind: ImportKind,
    path: Path,
    sha256: str,
    options: str,
    actor: str,
) -> _Job | ImportReport:
    """Find or create the ``imports`` row of this file read with these options; a finished
    one gives its report.

    The same events file read with other options would store again every event the earlier
    import accepted (their message ids come from the file), so that is refused with
    :class:`Conflict`; a profiles file may be read again with other options (applying the
    same records twice changes nothing)."""
    now = hub.clock.now()
    try:
        with hub.tx() as conn:
            rows = (
                conn.execute(
                    select(imports).where(
                        imports.c.workspace_id == workspace_id,
                        imports.c.kind == kind,
                        imports.c.file_sha256 == sha256,
                    )
                )
                .mappings()
                .all()
            )
            row = next((r for r in rows if r["options_sha256"] == options), None)
            earlier = [
                r
                for r in rows
                if r["options_sha256"] != options
                and (r["status"] == "running" or int(r["rows_accepted"]) > 0)
            ]
            if kind == "events" and earlier:
                first = earlier[0]
                raise Conflict(
                    f"{path.name} was imported before with other options (import "
                    f"{first['id']}, {first['status']}, {first['rows_accepted']} events "
                    "accepted); reading it again otherwise would store those events twice. "
                    "Import the rows it rejected (see its error report) as a file of their "
                    "own, or use the same options to resume or repeat it"
                )
            if row is not None and row["status"] == "done":
                return _done_report(conn, row)
            if row is not None:
                conn.execute(
                    update(imports)
                    .where(imports.c.id == row["id"])
                    .values(status="running", actor=actor[:200], finished_at=None)
                )
                invalidate_streaming(conn, workspace_id)  # the import changes what they read
                return _Job(
                    id=row["id"],
                    workspace_id=workspace_id,
                    kind=kind,
                    path=path,
                    sha256=sha256,
                    resumed=True,
                    committed=int(row["rows_committed"]),
                    accepted=int(row["rows_accepted"]),
                    rejected=int(row["rows_rejected"]),
                    clock_start=time.perf_counter(),
                )
            job_id = new_id()
            conn.execute(
                insert(imports).values(
                    id=job_id,
                    workspace_id=workspace_id,
                    kind=kind,
                    file_name=path.name[:500],
                    file_sha256=sha256,
                    options_sha256=options,
                    status="running",
                    rows_committed=0,
                    rows_accepted=0,
                    rows_rejected=0,
                    started_at=now,
                    actor=actor[:200],
                )
            )
            invalidate_streaming(conn, workspace_id)  # the import changes what they read
    except IntegrityError:
        raise Conflict(
            f"{path.name} is being imported into this workspace by another process right now"
        ) from None
    return _Job(
        id=job_id,
        workspace_id=workspace_id,
        kind=kind,
        path=path,
        sha256=sha256,
        resumed=False,
        committed=0,
        accepted=0,
        rejected=0,
        clock_start=time.perf_counter(),
    )


def _done_report(conn: Connection, row: Any) -> ImportReport:
    """The report of a finished import, as recorded when it finished."""
    details = conn.execute(
        select(audit_log.c.details)
        .where(
            audit_log.c.workspace_id == row["workspace_id"],
            audit_log.c.action == "import.done",
            audit_log.c.target_id == row["id"],
        )
        .order_by(audit_log.c.id.desc())
        .limit(1)
    ).scalar()
    info: dict[str, Any] = details or {}
    read = int(row["rows_committed"])
    accepted, rejected = int(row["rows_accepted"]), int(row["rows_rejected"])
    return ImportReport(
        import_id=row["id"],
        kind=row["kind"],
        file=row["file_name"],
        status="done",
        rows_read=read,
        rows_accepted=accepted,
        rows_rejected=rejected,
        rows_skipped=max(read - accepted - rejected, 0),
        profiles_created=int(info.get("profiles_created", 0)),
        profiles_merged=int(info.get("profiles_merged", 0)),
        error_report=row["error_report"],
        elapsed_seconds=float(info.get("elapsed_seconds", 0.0)),
        already_done=True,
    )


def _commit_progress(
    conn: Connection, job: _Job, *, rows_committed: int, accepted: int, rejected: int
) -> None:
    """Advance the import's checkpoint (in the caller's transaction)."""
    conn.execute(
        update(imports)
        .where(imports.c.id == job.id)
        .values(rows_committed=rows_committed, rows_accepted=accepted, rows_rejected=rejected)
    )


def _record_progress(
    hub: Hub, job: _Job, *, rows_committed: int, accepted: int, rejected: int
) -> None:
    """Advance the checkpoint in a transaction of its own (events, after each log append)."""
    with hub.tx() as conn:
        _commit_progress(
            conn, job, rows_committed=rows_committed, accepted=accepted, rejected=rejected
        )


def _finish(
    hub: Hub, job: _Job, *, rows_read: int, accepted: int, rejected: int, report: str | None
) -> ImportReport:
    elapsed = time.perf_counter() - job.clock_start
    result = ImportReport(
        import_id=job.id,
        kind=job.kind,
        file=job.path.name,
        status="done",
        rows_read=rows_read,
        rows_accepted=accepted,
        rows_rejected=rejected,
        rows_skipped=max(rows_read - accepted - rejected, 0),
        profiles_created=job.created,
        profiles_merged=job.merged,
        error_report=report,
        elapsed_seconds=elapsed,
    )
    now = hub.clock.now()
    with hub.tx() as conn:
        # streaming audiences are built again from the log, now holding the whole import
        invalidate_streaming(conn, job.workspace_id)
        conn.execute(
            update(imports)
            .where(imports.c.id == job.id)
            .values(
                status="done",
                rows_committed=rows_read,
                rows_accepted=accepted,
                rows_rejected=rejected,
                error_report=report[:1000] if report else None,
                finished_at=now,
            )
        )
        record_audit(
            conn,
            workspace_id=job.workspace_id,
            actor="import",
            action="import.done",
            target_type="import",
            target_id=job.id,
            details=result.to_json(),
            at=now,
        )
    return result


def _mark_failed(hub: Hub, job: _Job) -> None:
    with contextlib.suppress(Exception), hub.tx() as conn:
        conn.execute(update(imports).where(imports.c.id == job.id).values(status="failed"))
        invalidate_streaming(conn, job.workspace_id)


# ----------------------------------------------------------------------------------------------
# Values


def _blank(value: Any, is_text: bool) -> bool:
    """No value: null, or (for text read from a file) an empty or all-blank cell."""
    return value is None or (is_text and isinstance(value, str) and not value.strip())


def _identity_text(value: Any) -> str | None:
    """An identifier as text: strings, whole numbers; None for other values."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def _instant(value: Any) -> datetime:
    """A timestamp cell as an aware UTC datetime: ISO-8601 text (naive means UTC), epoch
    milliseconds (number or digits), a datetime or a date. Raises ValueError with a reason."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return parse_timestamp(int(text))
        return parse_timestamp(text)
    return parse_timestamp(value)


def _window_problem(at: datetime, now: datetime, limits: Limits) -> str | None:
    if at - now > limits.max_future:
        return f"is more than {limits.max_future} in the future (now is {now.isoformat()})"
    if now - at > limits.max_past:
        return f"is more than {limits.max_past.days} days in the past"
    return None


def _in_batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _owners(conn: Connection, workspace_id: str, wanted: Iterable[Identity]) -> dict[Identity, str]:
    """The profiles holding ``wanted`` identities (unknown ones are left out)."""
    by_namespace: dict[str, list[str]] = {}
    for identity in set(wanted):
        by_namespace.setdefault(identity.namespace, []).append(identity.value)
    found: dict[Identity, str] = {}
    for namespace, values in by_namespace.items():
        values.sort()
        for part in _in_batches(values, 900):
            rows = conn.execute(
                select(identities.c.value, identities.c.profile_id).where(
                    identities.c.workspace_id == workspace_id,
                    identities.c.namespace == namespace,
                    identities.c.value.in_(part),
                )
            )
            found.update({Identity(namespace, v): p for v, p in rows})
    return found


# ----------------------------------------------------------------------------------------------
# Profiles


@dataclass(slots=True)
class _Record:
    """One accepted profile row."""

    row: int
    ids: tuple[Identity, ...]
    attributes: dict[str, Any] | None  # None: see ``sqlite[0]`` (records from workers)
    consents: tuple[ConsentUpdate, ...]
    at: datetime
    #: for SQLite, prepared where the row is converted: the ``attributes`` and
    #: ``attribute_meta`` documents of a new profile and ``at`` as stored
    sqlite: tuple[str, str, str] | None = None


@dataclass
class _Context:
    """What every chunk of one import needs."""

    hub: Hub
    job: _Job
    schema: Schema
    policy: MergePolicy
    limits: Limits
    now: datetime
    plan: _Plan
    checked: dict[str, _Checked] = field(default_factory=dict)  # validated property objects

    @property
    def rules(self) -> _Rules:
        lite = self.hub.engine.dialect.name == "sqlite"
        return _Rules(self.schema, self.plan, self.limits, self.now, lite)


@dataclass(frozen=True)
class _Rules:
    """What converting rows needs; picklable, so worker processes can convert too."""

    schema: Schema
    plan: _Plan
    limits: Limits
    now: datetime
    sqlite: bool = False


def _profile_records(ctx: _Rules, piece: _Piece) -> tuple[list[_Record], list[RowError]]:
    """Convert and validate the rows of one piece of a profiles file."""
    plan = ctx.plan
    columns = piece.table.column_names
    targets = {c: plan.target(c) for c in columns}
    id_columns = [(c, t.name) for c, t in targets.items() if t.what == "identity"]
    explicit = {t.name for t in targets.values() if t.what == "attribute"}
    attr_columns = {c: t.name for c, t in targets.items() if t.what == "attribute"}
    for c, ns in id_columns:  # e-mail and phone are also attributes
        if ns in ("email", "phone") and ns not in explicit:
            attr_columns[c] = ns
    consent_columns = [(c, t) for c, t in targets.items() if t.what == "consent"]
    time_column = next((c for c, t in targets.items() if t.what == "timestamp"), None)
    column_of = {name: c for c, name in attr_columns.items()}
    used = {c for c, _ in id_columns} | set(attr_columns) | {c for c, _ in consent_columns}
    if time_column is not None:
        used.add(time_column)
    values = {c: piece.table.column(c).to_pylist() for c in used}
    identity_names = _identity_names(plan)
    records: list[_Record] = []
    errors: list[RowError] = list(piece.errors)

    def cell_at(i: int, column: str) -> tuple[Any, bool]:
        value = values[column][i]
        if column in piece.json and value is not None:
            return orjson.loads(value), False
        return value, column in piece.text

    for i, row in enumerate(piece.rows.tolist()):
        problems: list[RowError] = []
        cell = functools.partial(cell_at, i)
        at = ctx.now
        if time_column is not None:
            raw, is_text = cell(time_column)
            if not _blank(raw, is_text):
                try:
                    at = _instant(raw)
                except ValueError as exc:
                    problems.append(RowError(row, time_column, str(exc)))
                else:
                    window = _window_problem(at, ctx.now, ctx.limits)
                    if window:
                        problems.append(RowError(row, time_column, window))
        ids: dict[Identity, None] = {}
        for column, namespace in id_columns:
            raw, is_text = cell(column)
            if _blank(raw, is_text):
                continue
            text = _identity_text(raw)
            if text is None:
                problems.append(RowError(row, column, "an identity must be text or a whole number"))
                continue
            try:
                ids[normalize_identity(namespace, text)] = None
            except ValueError as exc:
                problems.append(RowError(row, column, str(exc)))
        text_attrs: dict[str, Any] = {}
        typed_attrs: dict[str, Any] = {}
        for column, name in attr_columns.items():
            raw, is_text = cell(column)
            if _blank(raw, is_text):
                continue
            (text_attrs if is_text else typed_attrs)[name] = raw
        updates: list[ConsentUpdate] = []
        for column, target in consent_columns:
            raw, is_text = cell(column)
            if _blank(raw, True):
                continue
            word = raw.strip().lower() if isinstance(raw, str) else raw
            if word not in _CONSENT_WORDS:
                shown = repr(raw) if isinstance(raw, str) else type(raw).__name__
                reason = f"must be one of opted_in, opted_out, unknown, got {shown}"
                problems.append(RowError(row, column, reason))
                continue
            updates.append(
                ConsentUpdate(target.name, target.purpose, ConsentStatus(word), at, SOURCE)
            )
        attributes: dict[str, Any] = {}
        for given, lenient in ((text_attrs, True), (typed_attrs, False)):
            if not given:
                continue
            res = validate_attributes(ctx.schema, given, path="", lenient=lenient)
            attributes.update(res.value)
            for issue in res.issues:
                head = re.split(r"[.\[]", issue.path, maxsplit=1)[0]
                where = str(column_of.get(head, head)) + issue.path[len(head) :]
                problems.append(RowError(row, where, issue.reason))
        if not ids and not any(p.field in {c for c, _ in id_columns} for p in problems):
            reason = f"has no identity: give a value in at least one of {identity_names}"
            problems.append(RowError(row, identity_names, reason))
        if problems:
            errors.extend(problems)
            continue
        prepared = None
        if ctx.sqlite:  # the writing process then only assembles rows
            visible = {k: v for k, v in attributes.items() if v is not None}
            stamp = at.isoformat()
            prepared = (
                orjson.dumps(visible, option=orjson.OPT_NON_STR_KEYS).decode(),
                orjson.dumps({k: [stamp, SOURCE] for k in sorted(attributes)}).decode(),
                sqlite_time(at),
            )
        records.append(_Record(row, tuple(ids), attributes, tuple(updates), at, prepared))
    return records, errors


def _identity_names(plan: _Plan) -> str:
    """The identity columns seen so far, for reasons (the standard ones before any is seen)."""
    names = [plan.by_target.get(f"identity:{ns}", ns) for ns in _namespaces(plan)]
    return "/".join(names or STANDARD_NAMESPACES)


def _namespaces(plan: _Plan) -> list[str]:
    return [t.name for _, t in plan.columns("identity")]


def _apply_profiles(ctx: _Context, conn: Connection, records: list[_Record]) -> None:
    """Write one chunk of profile records (in the caller's transaction).

    Records whose identities are all unknown and appear in no other record of the chunk make
    new profiles, written set-wise; the others go through :class:`ProfileWriter` (linking,
    merging, attribute precedence). Consents follow the same split.
    """
    ws = ctx.job.workspace_id
    counts = Counter(i for r in records for i in r.ids)
    known = _owners(conn, ws, counts)
    limit = ctx.policy.max_identities
    fresh: list[_Record] = []
    rest: list[_Record] = []
    for rec in records:
        alone = len(rec.ids) <= limit and all(counts[i] == 1 and i not in known for i in rec.ids)
        (fresh if alone else rest).append(rec)
    _insert_fresh(ctx, conn, fresh)
    if not rest:
        return
    writer = ProfileWriter(
        conn,
        workspace_id=ws,
        policy=ctx.policy,
        now=ctx.now,
        shared_event_log=ctx.hub.settings.shared_event_log,
    )
    writer.preload(i for r in rest for i in r.ids)
    for rec in rest:
        attributes = _attributes_of(ctx.schema, rec)
        pid = writer.record(list(rec.ids), attributes, at=rec.at, source=SOURCE)
        for cu in rec.consents:
            writer.set_consent(pid, cu)
    stats = writer.flush()
    ctx.job.created += stats.created
    ctx.job.merged += stats.merged


def _attributes_of(schema: Schema, rec: _Record) -> dict[str, Any]:
    """A record's attributes; those shipped as their document are typed again by the schema
    (the same values: validation is idempotent and the document holds them as stored)."""
    if rec.attributes is not None:
        return rec.attributes
    assert rec.sqlite is not None
    return validate_attributes(schema, orjson.loads(rec.sqlite[0]), path="").value


def _insert_fresh(ctx: _Context, conn: Connection, records: list[_Record]) -> None:
    """New profiles, one per record, written set-wise.

    For a record whose identities are all new (and within the identity limit) the graph's
    outcome is fixed: every identity linked at the record's time, every attribute set by it,
    first and last seen at that time, so the rows are built directly (this is what
    :func:`apply_record` on :func:`new_profile` yields; a test holds them equal).
    """
    if not records:
        return
    ws, lite = ctx.job.workspace_id, conn.dialect.name == "sqlite"

    def when(instant: datetime) -> Any:
        return sqlite_time(instant) if lite else instant

    def document(value: dict[str, Any]) -> Any:
        # orjson writes datetimes and dates as isoformat() does, like to_jsonable + the engine
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode() if lite else value

    now = when(ctx.now)
    rows: dict[str, list[Any]] = {k: [] for k in ("id", "attributes", "attribute_meta", "at")}
    links: dict[str, list[Any]] = {k: [] for k in ("namespace", "value", "profile_id", "at")}
    grants: dict[str, list[Any]] = {
        k: [] for k in ("profile_id", "channel", "purpose", "status", "at", "source")
    }
    for rec in records:
        pid = new_id()
        rows["id"].append(pid)
        if lite and rec.sqlite is not None:
            attributes, meta, at = rec.sqlite
        else:
            given = _attributes_of(ctx.schema, rec)
            at, stamp = when(rec.at), rec.at.isoformat()
            visible = {k: v for k, v in given.items() if v is not None}
            attributes = document(visible if lite else to_jsonable(visible))
            meta = document({k: [stamp, SOURCE] for k in sorted(given)})
        rows["attributes"].append(attributes)
        rows["attribute_meta"].append(meta)
        rows["at"].append(at)
        for identity in sorted(set(rec.ids)):
            links["namespace"].append(identity.namespace)
            links["value"].append(identity.value)
            links["profile_id"].append(pid)
            links["at"].append(at)
        for cu in {(cu.channel, cu.purpose): cu for cu in rec.consents}.values():
            grants["profile_id"].append(pid)
            grants["channel"].append(cu.channel)
            grants["purpose"].append(cu.purpose)
            grants["status"].append(cu.status.value)
            grants["at"].append(at if cu.timestamp == rec.at else when(cu.timestamp))
            grants["source"].append(cu.source)
    n = len(records)
    _insert_rows(
        conn,
        profiles,
        {
            "id": rows["id"],
            "workspace_id": _repeat(ws, n),
            "attributes": rows["attributes"],
            "attribute_meta": rows["attribute_meta"],
            "first_seen": rows["at"],
            "last_seen": rows["at"],
            "created_at": _repeat(now, n),
            "updated_at": _repeat(now, n),
        },
    )
    _insert_rows(
        conn,
        identities,
        {
            "workspace_id": _repeat(ws, len(links["value"])),
            "namespace": links["namespace"],
            "value": links["value"],
            "profile_id": links["profile_id"],
            "first_seen": links["at"],
        },
    )
    _insert_rows(
        conn,
        consents,
        {
            "workspace_id": _repeat(ws, len(grants["channel"])),
            "profile_id": grants["profile_id"],
            "channel": grants["channel"],
            "purpose": grants["purpose"],
            "status": grants["status"],
            "updated_at": grants["at"],
            "source": grants["source"],
        },
    )
    ctx.job.created += n


_WORKER_RULES: list[_Rules] = []  # set in worker processes by _start_worker


def _start_worker(rules: _Rules) -> None:
    _WORKER_RULES[:] = [rules]


_Packed: TypeAlias = tuple[
    int, tuple[tuple[str, str], ...], Any, tuple[tuple[str, str, str], ...], datetime, Any
]


def _convert_in_worker(piece: _Piece) -> tuple[list[_Packed], list[RowError]]:
    records, errors = _profile_records(_WORKER_RULES[0], piece)
    return _pack(records), errors


def _pack(records: list[_Record]) -> list[_Packed]:
    """Records as plain tuples: they cross process boundaries ten times faster than objects.
    Attributes travel as their prepared document when there is one."""
    return [
        (
            r.row,
            tuple((i.namespace, i.value) for i in r.ids),
            None if r.sqlite is not None else r.attributes,
            tuple((c.channel, c.purpose, c.status.value) for c in r.consents),
            r.at,
            r.sqlite,
        )
        for r in records
    ]


def _unpack(packed: list[_Packed]) -> list[_Record]:
    return [
        _Record(
            row,
            tuple(Identity(ns, value) for ns, value in ids),
            attributes,
            tuple(ConsentUpdate(ch, pu, ConsentStatus(st), at, SOURCE) for ch, pu, st in grants),
            at,
            prepared,
        )
        for row, ids, attributes, grants, at, prepared in packed
    ]


def _converted(
    rules: _Rules, pieces: Iterable[_Piece], *, workers: int
) -> Iterator[tuple[_Piece, list[_Record], list[RowError]]]:
    """Pieces with their converted rows, in order. With ``workers`` (large files) rows are
    converted and validated by that many processes, a few chunks ahead of the writes
    (validating e-mails and phone numbers is pure Python and the slowest part of a profile
    import)."""
    pool: ProcessPoolExecutor | None = None
    if workers > 0 and not multiprocessing.current_process().daemon:
        try:
            # fork where there is one: spawn would re-run an unguarded ``__main__`` script
            methods = multiprocessing.get_all_start_methods()
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("fork" if "fork" in methods else "spawn"),
                initializer=_start_worker,
                initargs=(rules,),
            )
        except (OSError, ValueError) as exc:  # pragma: no cover - restricted environments
            log.warning("converting in this process only", extra={"reason": str(exc)})
    if pool is None:
        for piece in pieces:
            yield (piece, *_profile_records(rules, piece))
        return
    with pool:
        ahead: collections.deque[tuple[_Piece, Future[Any]]] = collections.deque()
        for piece in pieces:
            ahead.append((piece, pool.submit(_convert_in_worker, piece)))
            if len(ahead) > workers:
                done, future = ahead.popleft()
                packed, errors = future.result()
                yield done, _unpack(packed), errors
        while ahead:
            done, future = ahead.popleft()
            packed, errors = future.result()
            yield done, _unpack(packed), errors


def _unseen(pieces: Iterable[_Piece], committed: int) -> Iterator[_Piece]:
    """The pieces (and rows) after ``committed``: a resumed import skips what is done."""
    for given in pieces:
        if given.last_row <= committed:
            continue
        keep = given.rows > committed
        yield _Piece(
            given.table.filter(pa.array(keep)) if not keep.all() else given.table,
            given.rows[keep],
            [e for e in given.errors if e.row > committed],
            given.last_row,
            given.text,
            given.json,
        )


def _import_profiles(
    ctx: _Context,
    pieces: Iterable[_Piece],
    sink: _ErrorSink,
    progress: Progress | None,
    total: int | None,
    *,
    workers: int = 0,
) -> ImportReport:
    job = ctx.job
    accepted, rejected, done = job.accepted, job.rejected, job.committed
    converted = _converted(ctx.rules, _unseen(pieces, job.committed), workers=workers)
    while True:
        with _phase(job, "read_convert"):
            item = next(converted, None)
        if item is None:
            break
        piece, records, errors = item
        sink.add(errors)
        rejected += len({e.row for e in errors})
        accepted += len(records)
        with _phase(job, "write"), _bulk_tx(ctx.hub) as conn:
            if records:
                _apply_profiles(ctx, conn, records)
            _commit_progress(
                conn, job, rows_committed=piece.last_row, accepted=accepted, rejected=rejected
            )
        done = piece.last_row
        if progress is not None:
            progress(done, total)
    report = sink.close()
    read = max(done, job.committed)
    return _finish(
        ctx.hub, job, rows_read=read, accepted=accepted, rejected=rejected, report=report
    )


# ----------------------------------------------------------------------------------------------
# Events, phase 1: validate and stage


class _Rejects:
    """The problems found in one piece of events; a row with any problem is rejected."""

    def __init__(self, rows: I64) -> None:
        self.rows = rows
        self.bad = np.zeros(rows.size, dtype=np.bool_)
        self.errors: list[RowError] = []

    def add(self, index: int, field: str, reason: str) -> None:
        self.bad[index] = True
        self.errors.append(RowError(int(self.rows[index]), field, reason))

    def add_mask(
        self, mask: pa.Array | Mask, field: str, reason: str | Callable[[int], str]
    ) -> None:
        where = np.asarray(
            mask.to_numpy(zero_copy_only=False) if isinstance(mask, pa.Array) else mask
        )
        for index in np.flatnonzero(where):
            self.add(int(index), field, reason(int(index)) if callable(reason) else reason)


def _is_null_or_blank(array: pa.Array) -> pa.Array:
    """Null, empty or only (ASCII) blanks: no value in a cell."""
    blank = pc.equal(pc.binary_length(pc.ascii_trim_whitespace(array)), 0)
    return pc.fill_null(pc.or_kleene(pc.is_null(array), blank), True)


def _texts(
    rejects: _Rejects, column: str, array: pa.Array, is_json: bool, *, numbers: bool = False
) -> pa.Array:
    """A column as text (null for no value); other values are rejected with a reason."""
    kind = array.type
    if pa.types.is_string(kind) and not is_json:
        return array
    if numbers and pa.types.is_integer(kind):
        return pc.cast(array, pa.string())
    out: list[str | None] = []
    for index, cell in enumerate(array.to_pylist()):
        value = orjson.loads(cell) if is_json and cell is not None else cell
        if value is None or isinstance(value, str):
            out.append(value)
            continue
        text = _identity_text(value) if numbers else None
        if text is None:
            rejects.add(index, column, f"must be text, got {_type_name(value)}")
        out.append(text)
    return pa.array(out, pa.string())


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _times(
    ctx: _Context, rejects: _Rejects, column: str, array: pa.Array, is_json: bool, text: bool
) -> pa.Array:
    """The timestamp column as ``timestamp[us, UTC]``; unusable values are rejected."""
    utc = pa.timestamp("us", tz="UTC")
    kind = array.type
    result: pa.Array | None = None
    if pa.types.is_timestamp(kind):
        naive = array.cast(pa.timestamp(kind.unit, tz=kind.tz or "UTC"))
        result = pc.cast(naive, utc, safe=False)
    elif pa.types.is_date(kind):
        result = pc.cast(pc.cast(array, pa.timestamp("s")), pa.timestamp("us")).cast(utc)
    elif pa.types.is_integer(kind):
        millis = pc.cast(array, pa.int64())
        in_range = pc.fill_null(pc.and_(pc.greater(millis, -(2**43)), pc.less(millis, 2**43)), True)
        rejects.add_mask(pc.invert(in_range), column, "is out of range as epoch milliseconds")
        safe = pc.if_else(in_range, millis, None)
        result = pc.cast(pc.multiply(safe, 1000), pa.int64()).cast(utc)
    elif pa.types.is_string(kind) and not is_json:
        try:
            result = pc.cast(array, utc)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            result = None
    if result is None:  # value by value
        values: list[datetime | None] = []
        for index, cell in enumerate(array.to_pylist()):
            value = orjson.loads(cell) if is_json and cell is not None else cell
            if _blank(value, text or isinstance(value, str)):
                values.append(None)
                continue
            try:
                values.append(_instant(value))
            except ValueError as exc:
                rejects.add(index, column, str(exc))
                values.append(None)
        result = pa.array(values, utc)
    missing = pc.and_(pc.is_null(result), pc.invert(pa.array(rejects.bad)))
    rejects.add_mask(missing, column, "is required: when the event happened")
    now = pa.scalar(ctx.now, utc)
    future = pc.fill_null(
        pc.greater(result, pa.scalar(ctx.now + ctx.limits.max_future, utc)), False
    )
    past = pc.fill_null(pc.less(result, pa.scalar(ctx.now - ctx.limits.max_past, utc)), False)
    if pc.any(future).as_py() or pc.any(past).as_py():
        stamps = result.to_pylist()
        for where in np.flatnonzero(np.asarray(pc.or_(future, past))).tolist():
            problem = _window_problem(stamps[where], now.as_py(), ctx.limits)
            rejects.add(where, column, problem or "is out of range")
    return result


def _identity_values(
    rejects: _Rejects, column: str, namespace: str, array: pa.Array, is_json: bool
) -> pa.Array:
    """Normalized identity values (as :func:`normalize_identity`), null for no value."""
    texts = _texts(rejects, column, array, is_json, numbers=True)
    texts = pc.if_else(_is_null_or_blank(texts), None, texts)
    # printable ASCII is normalized column-wise; anything else by normalize_identity itself
    special = pc.fill_null(pc.invert(pc.ascii_is_printable(texts)), False)
    raw = texts
    texts = pc.utf8_trim_whitespace(texts)
    long = pc.fill_null(pc.greater(pc.utf8_length(texts), _MAX_ID_CHARS), False)
    rejects.add_mask(
        pc.and_(long, pc.invert(special)),
        column,
        f"identity {namespace!r} is longer than 255 characters",
    )
    if namespace == "email":
        normal = pc.utf8_lower(texts)
    elif namespace == "phone":
        normal = pc.replace_substring_regex(texts, r"[^0-9+]", "")
    else:
        normal = texts
    if pc.any(special).as_py():  # rare: leave the exact rules to normalize_identity
        values = normal.to_pylist()
        originals = raw.to_pylist()
        for index in np.flatnonzero(np.asarray(special)):
            try:
                values[index] = normalize_identity(namespace, originals[index]).value
            except ValueError as exc:
                rejects.add(int(index), column, str(exc))
                values[index] = None
        normal = pa.array(values, pa.string())
    if namespace == "phone":
        empty = pc.and_(pc.equal(pc.utf8_length(normal), 0), pc.is_valid(texts))
        rejects.add_mask(pc.fill_null(empty, False), column, "identity 'phone' has no digits")
        normal = pc.if_else(pc.fill_null(empty, False), None, normal)
    return normal


def _json_problem(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"is not valid JSON: {exc}"
    if not isinstance(value, dict):
        return f"must be a JSON object, got {_type_name(value)}"
    return None


def _objects(rejects: _Rejects, column: str, array: pa.Array, is_json: bool) -> pa.Array:
    """A properties/context/traits column as JSON object texts ("{}" for no value)."""
    kind = array.type
    if pa.types.is_struct(kind) or pa.types.is_map(kind):
        texts: pa.Array = pa.array(
            [
                None if v is None else orjson.dumps(dict(v), default=str).decode()
                for v in array.to_pylist()
            ],
            pa.string(),
        )
    elif pa.types.is_string(kind):
        texts = array
    else:
        rejects.add_mask(pc.is_valid(array), column, "must be a JSON object")
        return pa.array(["{}"] * len(array), pa.string())
    if not is_json:
        texts = pc.if_else(_is_null_or_blank(texts), None, texts)
    encoded = texts.dictionary_encode()
    problems = [_json_problem(t) for t in encoded.dictionary.to_pylist()]
    if any(problems):
        indices = encoded.indices.to_numpy(zero_copy_only=False)
        valid = np.asarray(pc.is_valid(encoded.indices))
        for index in np.flatnonzero(valid):
            problem = problems[int(indices[index])]
            if problem:
                rejects.add(int(index), column, problem)
    return pc.fill_null(texts, "{}")


def _with_property_columns(
    ctx: _Context,
    rejects: _Rejects,
    piece: _Piece,
    base: pa.Array,
    columns: list[tuple[str, str]],
) -> pa.Array:
    """Lay the ``property:<name>`` columns over the properties objects (a value wins)."""
    texts = base.to_pylist()
    extras = {c: piece.table.column(c).to_pylist() for c, _ in columns}
    out: list[str] = []
    for index, text in enumerate(texts):
        extra: dict[str, Any] = {}
        for column, name in columns:
            value = extras[column][index]
            if column in piece.json and value is not None:
                value = orjson.loads(value)
            if not _blank(value, column in piece.text):
                extra[name] = value
        if not extra:
            out.append(text)
            continue
        try:
            props = orjson.loads(text)
        except orjson.JSONDecodeError:
            out.append(text)  # already rejected
            continue
        if isinstance(props, dict):
            props.update(extra)
        try:
            out.append(orjson.dumps(props, default=str).decode())
        except TypeError as exc:
            rejects.add(index, columns[0][0], f"cannot be stored as JSON: {exc}")
            out.append("{}")
    return pa.array(out, pa.string())


@dataclass
class _Checked:
    """The outcome of schema validation for one distinct value."""

    problems: list[tuple[str, str]]  # (field, reason)
    text: str | None  # the coerced value's JSON, when it differs from the input
    flags: list[str]


def _validate_unique(
    keys: pa.Array, check: Callable[[str], _Checked], cache: dict[str, _Checked]
) -> tuple[pa.Array, list[_Checked]]:
    """Run ``check`` once per distinct non-null key (remembered in ``cache`` across chunks);
    return the keys' dictionary indices and the results."""
    encoded = keys.dictionary_encode()
    results: list[_Checked] = []
    for key in encoded.dictionary.to_pylist():
        known = cache.get(key)
        if known is None:
            known = check(key)
            if len(cache) >= _CHECK_CACHE:
                cache.clear()
            cache[key] = known
        results.append(known)
    return encoded.indices, results


def _field_of_path(path: str, base: str, property_columns: Mapping[str, str]) -> str:
    """The source column (and sub-path) a validation issue at ``path`` points to."""
    rest = path.removeprefix("properties").removeprefix(".")
    head = re.split(r"[.\[]", rest, maxsplit=1)[0]
    column = property_columns.get(head)
    if column is not None:
        return column + rest[len(head) :]
    return f"{base}.{rest}" if rest else base


def _has_quote_or_backslash(array: pa.Array) -> bool:
    """Whether any value of a string array may contain ``"`` or ``\\`` (one scan of its
    bytes; True when unsure)."""
    if not len(array) or array.null_count == len(array):
        return False
    if array.type != pa.string() or array.buffers()[2] is None:
        return True
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[
        array.offset : array.offset + len(array) + 1
    ]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return bool(np.any((data == ord('"')) | (data == ord("\\"))))


def _identities_object(values: Mapping[str, pa.Array]) -> pa.Array:
    """Per row, the JSON object of its identities (``{"user_id": "u1", ...}``; no nulls)."""
    parts: list[pa.Array] = []
    for namespace, given in values.items():
        array = given
        unsafe = pc.fill_null(pc.invert(pc.ascii_is_printable(array)), False)
        if _has_quote_or_backslash(array):  # rare: look row by row
            quoted = pc.or_(pc.match_substring(array, '"'), pc.match_substring(array, "\\"))
            unsafe = pc.or_(unsafe, pc.fill_null(quoted, False))
        if pc.any(unsafe).as_py():
            texts = array.to_pylist()
            for index in np.flatnonzero(np.asarray(unsafe)):
                texts[index] = orjson.dumps(texts[index]).decode()[1:-1]
            array = pa.array(texts, pa.string())
        part = pc.binary_join_element_wise(f',"{namespace}":"', array, '"', "")
        parts.append(pc.fill_null(part, ""))
    if not parts:
        return pa.array([], pa.string())
    # (null_handling="skip" would be shorter, but pyarrow drops rows whose parts are all null)
    inner = pc.utf8_slice_codeunits(pc.binary_join_element_wise(*parts, ""), 1)
    return pc.binary_join_element_wise("{", inner, "}", "")


def _stage_events(ctx: _Context, piece: _Piece) -> tuple[pa.Table, list[RowError]]:
    """Validate one piece of an events file; return its good rows as staging columns."""
    plan = ctx.plan
    table = piece.table
    n = table.num_rows
    rejects = _Rejects(piece.rows)
    with _PLAN_LOCK:  # (a JSON Lines column first seen here extends the plan)
        targets = {c: plan.target(c) for c in table.column_names}

    def column(what: str) -> str | None:
        return next((c for c, t in targets.items() if t.what == what), None)

    def array(name: str) -> pa.Array:
        return table.column(name).combine_chunks()

    # message ids: given, else derived from the file and the row
    mid_col = column("message_id")
    if mid_col is not None:
        mids = _texts(rejects, mid_col, array(mid_col), mid_col in piece.json)
        mids = pc.if_else(_is_null_or_blank(mids), None, mids)
        too_long = pc.fill_null(pc.greater(pc.utf8_length(mids), _MAX_ID_CHARS), False)
        rejects.add_mask(too_long, mid_col, "is longer than 255 characters")
    else:
        mids = pa.nulls(n, pa.string())
    missing = np.asarray(pc.is_null(mids))
    if missing.any():
        fills = [
            stable_id(ctx.job.workspace_id, ctx.job.sha256, str(r))
            for r in piece.rows[missing].tolist()
        ]
        mids = pc.replace_with_mask(mids, pa.array(missing), pa.array(fills, pa.string()))

    # call type and name
    type_col = column("type")
    if type_col is not None:
        types = _texts(rejects, type_col, array(type_col), type_col in piece.json)
        types = pc.utf8_lower(pc.utf8_trim_whitespace(types))
        types = pc.if_else(_is_null_or_blank(types), "track", types)
        allowed = pa.array([t.value for t in _IMPORTABLE_TYPES])
        unknown = pc.invert(pc.is_in(types, value_set=allowed))
        shown = types.to_pylist() if pc.any(unknown).as_py() else []

        def type_reason(index: int) -> str:
            if shown[index] in ("alias", "group"):
                return f"{shown[index]} calls cannot be imported from a file; use the API"
            return f"must be one of track, identify, page, screen, got {shown[index]!r}"

        rejects.add_mask(unknown, type_col, type_reason)
    else:
        types = pa.array(["track"] * n, pa.string())
    name_col = column("event")
    if name_col is not None:
        names = _texts(rejects, name_col, array(name_col), name_col in piece.json)
    else:
        names = pa.nulls(n, pa.string())
    is_track = pc.equal(types, "track")
    blank_name = _is_null_or_blank(names)
    rejects.add_mask(
        pc.and_(is_track, blank_name),
        name_col or "event",
        "is required for track events: the event's name",
    )
    names = pc.if_else(pc.and_(pc.is_null(names), pc.equal(types, "identify")), "identify", names)
    names = pc.fill_null(names, "")
    too_long = pc.greater(pc.utf8_length(names), _MAX_NAME_CHARS)
    rejects.add_mask(too_long, name_col or "event", "is longer than 200 characters")

    # time
    time_col = column("timestamp")
    if time_col is None:  # (JSON Lines only: other files are checked up front)
        stamps = pa.nulls(n, pa.timestamp("us", tz="UTC"))
        rejects.add_mask(np.ones(n, dtype=np.bool_), "timestamp", "is required")
    else:
        stamps = _times(
            ctx,
            rejects,
            time_col,
            array(time_col),
            time_col in piece.json,
            time_col in piece.text,
        )

    # identities
    id_values: dict[str, pa.Array] = {}
    id_columns = [(c, t.name) for c, t in targets.items() if t.what == "identity"]
    before = rejects.bad.copy()
    for col, namespace in id_columns:
        id_values[namespace] = _identity_values(
            rejects, col, namespace, array(col), col in piece.json
        )
    some = np.zeros(n, dtype=np.bool_)
    for values in id_values.values():
        some |= np.asarray(pc.is_valid(values))
    identity_names = _identity_names(plan)
    rejects.add_mask(
        ~some & ~(rejects.bad & ~before),  # (a bad identity value is reported already)
        identity_names,
        f"has no identity: give a value in at least one of {identity_names}",
    )

    # properties, context, traits
    props_col = column("properties")
    if props_col is not None:
        props = _objects(rejects, props_col, array(props_col), props_col in piece.json)
    else:
        props = pa.array(["{}"] * n, pa.string())
    property_columns = [(c, t.name) for c, t in targets.items() if t.what == "property"]
    if property_columns:
        props = _with_property_columns(ctx, rejects, piece, props, property_columns)
    context_col, traits_col = column("context"), column("traits")
    contexts = (
        _objects(rejects, context_col, array(context_col), context_col in piece.json)
        if context_col
        else pa.array(["{}"] * n, pa.string())
    )
    traits = (
        _objects(rejects, traits_col, array(traits_col), traits_col in piece.json)
        if traits_col
        else pa.array(["{}"] * n, pa.string())
    )
    sizes = pc.add(
        pc.add(pc.binary_length(props), pc.binary_length(contexts)), pc.binary_length(traits)
    )
    rejects.add_mask(
        pc.greater(sizes, ctx.limits.max_event_bytes),
        props_col or "properties",
        f"the event is larger than the limit of {ctx.limits.max_event_bytes} bytes",
    )

    # schema: declared track events are validated once per distinct (name, properties)
    lenient = any(c in piece.text for c, _ in property_columns)
    by_property = {name: c for c, name in property_columns}
    props_field = props_col or "properties"
    schema = ctx.schema
    track_names = pc.if_else(is_track, names, None)

    def check_props(key: str) -> _Checked:
        if key[0] == "U":  # an undeclared event: flagged, or rejected by policy
            res = schema_validate_event(schema, key[1:], {})
            name, given = key[1:], {}
        else:
            name, _, text = key[1:].partition("\x1f")
            try:
                given = orjson.loads(text)
            except orjson.JSONDecodeError:
                return _Checked([], None, [])  # rejected above
            if not isinstance(given, dict):
                return _Checked([], None, [])
            res = schema_validate_event(schema, name, given, lenient=lenient)
        problems = [
            (_field_of_path(i.path, props_field, by_property), i.reason)
            if i.path != "event"
            else (name_col or "event", i.reason)
            for i in res.issues
        ]
        changed = None
        if res.value != given:
            changed = orjson.dumps(to_jsonable(res.value), default=str).decode()
        return _Checked(problems, changed, list(res.flags))

    declared = pa.array(list(schema.events), pa.string())
    needs_props = pc.fill_null(pc.is_in(track_names, value_set=declared), False)
    keys = pc.if_else(
        needs_props,
        pc.binary_join_element_wise("D", names, "\x1f", props, ""),
        pc.binary_join_element_wise("U", track_names, ""),  # only the name matters
    )
    keys = pc.if_else(pa.array(rejects.bad), None, keys)  # one problem at a time
    indices, results = _validate_unique(keys, check_props, ctx.checked)
    flags_by_key = [orjson.dumps(r.flags).decode() if r.flags else "[]" for r in results]
    flag_texts = pc.fill_null(pc.take(pa.array(flags_by_key, pa.string()), indices), "[]")
    new_texts = pc.take(pa.array([r.text for r in results], pa.string()), indices)
    props = pc.coalesce(new_texts, props)
    if any(r.problems for r in results):
        idx = indices.to_numpy(zero_copy_only=False)
        valid = np.asarray(pc.is_valid(indices))
        for index in np.flatnonzero(valid):
            for field_name, reason in results[int(idx[index])].problems:
                rejects.add(int(index), field_name, reason)

    # traits of identify calls become attributes: validated once per distinct value
    has_traits = pc.and_(pc.not_equal(traits, "{}"), pa.array(~rejects.bad))
    if pc.any(has_traits).as_py():

        def check_traits(text: str) -> _Checked:
            try:
                given = orjson.loads(text)
            except orjson.JSONDecodeError:
                return _Checked([], None, [])
            res = validate_attributes(schema, given, path="traits")
            problems = [
                (f"{traits_col or 'traits'}{i.path.removeprefix('traits')}", i.reason)
                for i in res.issues
            ]
            changed = None
            if res.value != given:
                changed = orjson.dumps(to_jsonable(res.value), default=str).decode()
            return _Checked(problems, changed, list(res.flags))

        t_indices, t_results = _validate_unique(
            pc.if_else(has_traits, traits, None), check_traits, {}
        )
        traits = pc.coalesce(
            pc.take(pa.array([r.text for r in t_results], pa.string()), t_indices), traits
        )
        t_idx = t_indices.to_numpy(zero_copy_only=False)
        flag_list = flag_texts.to_pylist()
        for index in np.flatnonzero(np.asarray(pc.is_valid(t_indices))):
            result = t_results[int(t_idx[index])]
            for field_name, reason in result.problems:
                rejects.add(int(index), field_name, reason)
            if result.flags:
                flag_list[index] = orjson.dumps(
                    [*orjson.loads(flag_list[index]), *result.flags]
                ).decode()
        flag_texts = pa.array(flag_list, pa.string())

    keep = pa.array(~rejects.bad)
    columns: dict[str, pa.Array] = {
        "row": pa.array(piece.rows, pa.int64()),
        "message_id": mids,
        "type": types,
        "name": names,
        "timestamp": stamps,
        "identities": _identities_object(id_values),
        "properties": props,
        "traits": traits,
        "context": contexts,
        "flags": flag_texts,
        "apply_traits": pc.and_(pc.equal(types, "identify"), has_traits),
    }
    for namespace, values in id_values.items():
        columns[f"id_{namespace}"] = values
    staged = pa.table(columns).filter(keep)
    return staged, [*piece.errors, *rejects.errors]


#: Columns of the event log spilled to the stage's Arrow file (all but profile and constants).
_SPILL_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("message_id", pa.string()),
        ("type", pa.string()),
        ("name", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("identities", pa.string()),
        ("properties", pa.string()),
        ("traits", pa.string()),
        ("context", pa.string()),
        ("flags", pa.string()),
    ]
)


class _Stage:
    """The temporary store of one events import, removed when it ends: the rows' log columns
    in an Arrow file (one record batch per chunk, in row order) and, in DuckDB, the narrow
    columns identity resolution works on (``staged``), then the identity tuples and profiles.
    DuckDB (in memory) keeps to a memory budget and spills to the folder beyond it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # in memory (spilling to the folder): a database file would write every row twice
        # (its WAL, then a checkpoint) for data that never outlives the import
        self.db = duckdb.connect(":memory:")
        spill = directory / "spill"
        spill.mkdir(exist_ok=True)
        self.db.execute(f"SET threads = {max(os.cpu_count() or 1, 1)}")
        self.set_memory(_stage_memory_mb())
        self.db.execute(f"SET temp_directory = '{spill.as_posix()}'")
        self.db.execute("SET preserve_insertion_order = true")
        self.db.execute("SET TimeZone = 'UTC'")
        self.db.execute(
            "CREATE TABLE staged (row BIGINT, message_id VARCHAR, timestamp TIMESTAMPTZ, "
            "apply_traits BOOLEAN, traits VARCHAR)"
        )
        self.namespaces: list[str] = []
        self.rows = 0
        self.spill_path = directory / "rows.arrow"
        self._sink = pa.OSFile(str(self.spill_path), "wb")
        self._writer: pa.ipc.RecordBatchFileWriter | None = pa.ipc.new_file(
            self._sink, _SPILL_SCHEMA, options=pa.ipc.IpcWriteOptions(compression="lz4")
        )
        self.chunk_ends: list[int] = []  # last row covered by each spilled batch

    def add(self, table: pa.Table, last_row: int) -> None:
        """Keep one chunk's validated rows (the columns of :func:`_stage_events`)."""
        for name in table.column_names:
            if name.startswith("id_") and name[3:] not in self.namespaces:
                self.db.execute(f"ALTER TABLE staged ADD COLUMN {_q(name[3:])} VARCHAR")
                self.namespaces.append(name[3:])
        assert self._writer is not None
        self._writer.write_batch(
            pa.record_batch(
                [table.column(n).combine_chunks() for n in _SPILL_SCHEMA.names],
                schema=_SPILL_SCHEMA,
            )
        )
        self.chunk_ends.append(last_row)
        if not table.num_rows:
            return
        narrow = table.select(
            ["row", "message_id", "timestamp", "apply_traits"]
            + [n for n in table.column_names if n.startswith("id_")]
        ).append_column(
            "traits", pc.if_else(table.column("apply_traits"), table.column("traits"), None)
        )
        self.db.register("piece", narrow)
        try:
            self.db.execute("INSERT INTO staged BY NAME SELECT * FROM piece")
        finally:
            self.db.unregister("piece")
        self.rows += table.num_rows
        del narrow, table
        _release_memory()  # this thread's share of Arrow's allocator

    def execute(self, query: str, params: Sequence[Any] = ()) -> None:
        """Run one statement of the set-wise phases. Should DuckDB run out of its budget (a
        join or sort it could not spill, which memory pressure makes depend on timing), it
        runs again on one thread, which needs about half the memory (a statement that failed
        changed nothing, so running it again is safe)."""
        try:
            self.db.execute(query, list(params))
        except duckdb.OutOfMemoryException:
            log.warning("staging ran out of memory; running the statement on one thread")
            self.db.execute("SET threads = 1")
            try:
                self.db.execute(query, list(params))
            finally:
                self.db.execute(f"SET threads = {max(os.cpu_count() or 1, 1)}")

    def set_memory(self, mb: int) -> None:
        """Change DuckDB's budget (lowering it spills what is beyond it to the folder)."""
        self.db.execute(f"SET memory_limit = '{int(mb)}MB'")

    def finish_spill(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def one(self, query: str, params: Sequence[Any] = ()) -> Any:
        row = self.db.execute(query, list(params)).fetchall()
        return row[0][0] if row else None

    def batches(
        self, query: str, params: Sequence[Any] = (), size: int = _WRITE_BATCH
    ) -> Iterator[pa.Table]:
        """Stream a query's result in Arrow tables of at most ``size`` rows (own cursor)."""
        cursor = self.db.cursor()
        try:
            reader = cursor.sql(query, params=list(params)).to_arrow_reader(size)
            for batch in reader:
                yield pa.Table.from_batches([batch])
        finally:
            cursor.close()

    def put(self, name: str, table: pa.Table) -> None:
        """Append an Arrow table to the stage table ``name`` (created on first use)."""
        self.db.register("incoming", table)
        try:
            exists = self.one("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name])
            if exists:
                self.db.execute(f"INSERT INTO {name} SELECT * FROM incoming")
            else:
                self.db.execute(f"CREATE TABLE {name} AS SELECT * FROM incoming")
        finally:
            self.db.unregister("incoming")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.finish_spill()
        self.db.close()


class _Background:
    """Runs one job at a time on a worker thread (DuckDB and SQLite release the GIL), so the
    next chunk is prepared while the previous one is written. A job's error is raised by the
    next :meth:`submit` or by :meth:`wait`."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="waymark-import")
        self._pending: Future[Any] | None = None

    def submit(self, job: Callable[[], Any]) -> None:
        self.wait()
        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _stage_memory_mb(budget: int = _STAGE_MEMORY_MB) -> int:
    """DuckDB's budget for staging (it spills to disk beyond it): ``budget`` MB, or a quarter
    of the machine's memory when that is less."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        total = 2048
    return int(min(total // 4, budget))


def _work_dir(hub: Hub) -> Path:
    """A private temporary folder beside the data (the system's when there is no data folder)."""
    base = hub.settings.data_dir / "tmp"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="import-", dir=base))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="waymark-import-"))


def _q(namespace: str) -> str:
    return f'"id_{namespace}"'


# -- set-wise writes to the state store ----------------------------------------------------------
# On SQLite these bypass SQLAlchemy's per-value type processing (the hot path of the bulk phases):
# instants are formatted column-wise exactly as ``UtcDateTime`` stores them (``sqlite_time``).

Column_: TypeAlias = pa.Array | pa.ChunkedArray | list[Any]


def _python_values(values: Column_, *, sqlite_text: bool) -> list[Any]:
    if isinstance(values, list):
        return values
    array = pa.array(values) if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_timestamp(array.type):
        utc = array.cast(pa.timestamp("us", tz="UTC"))
        if sqlite_text:
            return list(pc.strftime(utc, format="%Y-%m-%d %H:%M:%S").to_pylist())
        return list(utc.to_pylist())
    return list(array.to_pylist())


def _insert_rows(
    conn: Connection,
    table: Any,
    columns: Mapping[str, Column_],
    *,
    ignore_keys: Sequence[str] = (),
) -> None:
    """Insert rows given as equal-length columns; with ``ignore_keys``, rows whose key exists
    already are skipped."""
    names = list(columns)
    lite = conn.dialect.name == "sqlite"
    with _gc_paused():
        values = [_python_values(columns[n], sqlite_text=lite) for n in names]
        if not values or not values[0]:
            return
        if lite:
            conflict = f" ON CONFLICT ({', '.join(ignore_keys)}) DO NOTHING" if ignore_keys else ""
            sql = (
                f"INSERT INTO {table.name} ({', '.join(names)}) "
                f"VALUES ({', '.join('?' for _ in names)}){conflict}"
            )
            conn.exec_driver_sql(sql, list(zip(*values, strict=True)))
            return
        rows = [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]
        stmt: Any = insert(table)
        if ignore_keys:
            stmt = postgresql.insert(table).on_conflict_do_nothing(index_elements=list(ignore_keys))
        conn.execute(stmt, rows)


def _repeat(value: Any, n: int) -> list[Any]:
    return [value] * n


def _time_value(conn: Connection, instant: datetime) -> Any:
    return sqlite_time(instant) if conn.dialect.name == "sqlite" else instant


# ----------------------------------------------------------------------------------------------
# Events, phase 2: resolve identities in bulk


@contextlib.contextmanager
def _phase(job: _Job, name: str) -> Iterator[None]:
    """Time one phase of an import (logged at DEBUG, kept in ``job.timings``)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        job.timings[name] = job.timings.get(name, 0.0) + elapsed
        log.debug("import phase", extra={"import_id": job.id, "phase": name, "seconds": elapsed})


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while millions of short-lived rows (tuples,
    which it tracks) are built and dropped: it would scan them again and again for cycles
    they cannot form. Reference counting still frees them."""
    with collector_paused():  # shared with the mover's pauses
        yield


def _release_memory() -> None:
    """Return memory Arrow's allocator keeps after large transient tables."""
    pa.default_memory_pool().release_unused()


def _resolve(ctx: _Context, stage: _Stage) -> None:
    """Decide the profile of every distinct identity tuple of the staged rows.

    Leaves in the stage only what the later steps read: ``row_pid(row, pid)``, what to
    write (``write_plan``, ``write_links``, ``seen_plan``) and the identify calls whose
    traits apply (``traits_rows``). Only the ``writer`` components are written here (through
    ProfileWriter); the set-wise writes are :func:`_write_profiles`, run alongside the appends.
    """
    hub, ws = ctx.hub, ctx.job.workspace_id
    nss = stage.namespaces
    cols = ", ".join(_q(ns) for ns in nss)
    stage.execute(
        "CREATE OR REPLACE TABLE tuples AS SELECT row_number() OVER () AS tid, * FROM ("
        f"SELECT {cols}, min(timestamp) AS first_ts, max(timestamp) AS last_ts, "
        f"min(row) AS first_row FROM staged GROUP BY {cols})"
    )
    union = " UNION ALL ".join(
        f"SELECT tid, '{ns}' AS ns, {_q(ns)} AS value, first_ts FROM tuples "
        f"WHERE {_q(ns)} IS NOT NULL"
        for ns in nss
    )
    stage.execute(f"CREATE OR REPLACE TABLE edges AS {union}")
    with _phase(ctx.job, "load_known"):
        _load_known(hub, ws, stage)
    stage.execute(
        "CREATE OR REPLACE TABLE idents AS SELECT row_number() OVER () AS iid, g.*, "
        "k.profile_id AS owner FROM (SELECT ns, value, min(first_ts) AS first_ts FROM edges "
        "GROUP BY ns, value) g LEFT JOIN known k ON k.ns = g.ns AND k.value = g.value"
    )
    stage.execute(
        "CREATE OR REPLACE TABLE te AS SELECT e.tid, i.iid FROM edges e "
        "JOIN idents i ON i.ns = e.ns AND i.value = e.value"
    )
    stage.execute("DROP TABLE edges")
    with _phase(ctx.job, "components"):
        _components(stage)
        _classify(ctx, stage)
    start_seq = _last_merge_seq(ctx)
    with _phase(ctx.job, "writer"):
        _run_writer(ctx, stage)
    redirect = _merges_since(ctx, start_seq)
    if redirect is not None:  # owners absorbed by those merges: their survivors take over
        stage.db.register("redirect", redirect)
        try:
            stage.execute(
                "UPDATE comp_class SET owner = r.survivor FROM redirect r "
                "WHERE comp_class.owner = r.absorbed"
            )
            stage.execute(
                "UPDATE writer_pid SET pid = r.survivor FROM redirect r "
                "WHERE writer_pid.pid = r.absorbed"
            )
        finally:
            stage.db.unregister("redirect")
    with _phase(ctx.job, "plan_writes"):
        for batch in stage.batches("SELECT c FROM comp_class WHERE cls = 'new' ORDER BY c"):
            pids = pa.array([new_id() for _ in range(batch.num_rows)], pa.string())
            stage.put("comp_pid", pa.table({"c": batch.column("c"), "pid": pids}))
        stage.execute(
            "CREATE OR REPLACE TABLE tuple_pid AS SELECT tc.tid, tc.c, "
            "coalesce(w.pid, cp.pid, cc.owner) AS pid, cc.cls FROM tcomp tc "
            "JOIN comp_class cc USING (c) LEFT JOIN comp_pid cp USING (c) "
            "LEFT JOIN writer_pid w USING (tid)"
        )
        join = " AND ".join(f"s.{_q(ns)} IS NOT DISTINCT FROM t.{_q(ns)}" for ns in nss)
        stage.execute(
            "CREATE OR REPLACE TABLE row_pid AS SELECT s.row, tp.pid FROM staged s "
            f"JOIN tuples t ON {join} JOIN tuple_pid tp ON tp.tid = t.tid"
        )
        stage.execute(
            "CREATE OR REPLACE TABLE comp_first AS SELECT tc.c, min(t.first_row) AS first_row "
            "FROM tcomp tc JOIN tuples t USING (tid) GROUP BY tc.c"
        )
        # what _write_profiles writes, in the order the file first needs it
        todo = "(cc.cls = 'new' OR (cc.cls = 'attach' AND cc.n_new > 0))"
        stage.execute(
            "CREATE OR REPLACE TABLE write_plan AS SELECT f.first_row, cc.cls, cp.pid, "
            "cc.first_ts, cc.last_ts FROM comp_class cc JOIN comp_first f USING (c) "
            f"LEFT JOIN comp_pid cp USING (c) WHERE {todo} ORDER BY f.first_row"
        )
        stage.execute(
            "CREATE OR REPLACE TABLE write_links AS SELECT f.first_row, "
            "coalesce(cp.pid, cc.owner) AS pid, i.ns, i.value, i.first_ts "
            "FROM comp_class cc JOIN comp_first f USING (c) LEFT JOIN comp_pid cp USING (c) "
            f"JOIN ilab il USING (c) JOIN idents i USING (iid) WHERE {todo} "
            "AND i.owner IS NULL ORDER BY f.first_row, i.ns, i.value"
        )
        stage.execute(
            "CREATE OR REPLACE TABLE seen_plan AS SELECT tp.pid, min(t.first_ts) AS fs, "
            "max(t.last_ts) AS ls FROM tuple_pid tp JOIN tuples t USING (tid) "
            "WHERE tp.cls <> 'new' GROUP BY tp.pid ORDER BY tp.pid"
        )
        # what the appends and the traits still need; everything else goes
        stage.execute(
            f"CREATE OR REPLACE TABLE traits_rows AS SELECT row, timestamp, traits, {cols} "
            "FROM staged WHERE apply_traits"
        )
        for name in (
            "ilab",
            "idents",
            "te",
            "tcomp",
            "comp_first",
            "tuples",
            "staged",
            "tuple_pid",
            "comp_class",
            "comp_pid",
            "writer_pid",
        ):
            stage.execute(f"DROP TABLE IF EXISTS {name}")
    _release_memory()


def _load_known(hub: Hub, workspace_id: str, stage: _Stage) -> None:
    """Copy the workspace's identity links into the stage (``known``)."""
    stage.db.execute(
        "CREATE OR REPLACE TABLE known (ns VARCHAR, value VARCHAR, profile_id VARCHAR)"
    )
    with hub.engine.connect() as conn:
        if conn.dialect.name == "sqlite":  # a table scan beats walking the key index
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            cursor.execute(
                "SELECT namespace, value, profile_id FROM identities NOT INDEXED "
                "WHERE workspace_id = ?",
                (workspace_id,),
            )
            fetch = cursor.fetchmany
        else:
            query = select(identities.c.namespace, identities.c.value, identities.c.profile_id)
            result = conn.execution_options(yield_per=_BULK_BATCH).execute(
                query.where(identities.c.workspace_id == workspace_id)
            )
            fetch = result.fetchmany
        with _gc_paused():
            _copy_known(stage, fetch)


def _copy_known(stage: _Stage, fetch: Callable[[int], Sequence[Any]]) -> None:
    """Append ``(namespace, value, profile_id)`` rows read by ``fetch`` to ``known``."""
    while part := fetch(_KNOWN_BATCH):
        ns, value, pid = zip(*part, strict=True)
        stage.put(
            "known",
            pa.table(
                {
                    "ns": pa.array(ns, pa.string()),
                    "value": pa.array(value, pa.string()),
                    "profile_id": pa.array(pid, pa.string()),
                }
            ),
        )


def _components(stage: _Stage, max_rounds: int = 1000) -> None:
    """Connected components of identities linked by appearing in one tuple (min-label
    propagation): ``tcomp(tid, c)`` and ``ilab(iid, c)``."""
    stage.execute("CREATE OR REPLACE TABLE tcomp AS SELECT tid, min(iid) AS c FROM te GROUP BY tid")
    for _ in range(max_rounds):
        stage.execute(
            "CREATE OR REPLACE TABLE ilab AS SELECT te.iid, min(tc.c) AS c FROM te "
            "JOIN tcomp tc USING (tid) GROUP BY te.iid"
        )
        stage.execute(
            "CREATE OR REPLACE TABLE tnext AS SELECT te.tid, min(il.c) AS c FROM te "
            "JOIN ilab il USING (iid) GROUP BY te.tid"
        )
        changed = stage.one(
            "SELECT count(*) FROM tcomp JOIN tnext USING (tid) WHERE tcomp.c <> tnext.c"
        )
        stage.execute("DROP TABLE tcomp")
        stage.execute("ALTER TABLE tnext RENAME TO tcomp")
        if not changed:
            stage.execute(
                "CREATE OR REPLACE TABLE ilab AS SELECT te.iid, min(tc.c) AS c FROM te "
                "JOIN tcomp tc USING (tid) GROUP BY te.iid"
            )
            return
    # not converged (an extraordinarily long chain of links): let the writer decide it all
    stage.execute("CREATE OR REPLACE TABLE tcomp AS SELECT tid, 0::BIGINT AS c FROM tuples")
    stage.execute("CREATE OR REPLACE TABLE ilab AS SELECT iid, 0::BIGINT AS c FROM idents")


def _classify(ctx: _Context, stage: _Stage) -> None:
    """Sort components into ``new`` (no identity known: one new profile), ``attach`` (known
    identities all on one profile: link the new ones to it) and ``writer`` (merges, conflicts
    of unique namespaces, the identity limit: decided by ProfileWriter)."""
    unique = ", ".join(f"'{ns}'" for ns in sorted(ctx.policy.unique_namespaces)) or "NULL"
    limit = ctx.policy.max_identities
    stage.execute(
        "CREATE OR REPLACE TABLE comps AS SELECT il.c, count(*) AS n_ids, "
        "count(DISTINCT i.owner) AS n_owners, min(i.owner) AS owner, "
        "count(*) FILTER (WHERE i.owner IS NULL) AS n_new "
        "FROM ilab il JOIN idents i USING (iid) GROUP BY il.c"
    )
    stage.execute(
        "CREATE OR REPLACE TABLE bad_new AS SELECT DISTINCT il.c FROM ilab il "
        f"JOIN idents i USING (iid) WHERE i.ns IN ({unique}) GROUP BY il.c, i.ns "
        "HAVING count(*) > 1"
    )
    stage.execute(
        "CREATE OR REPLACE TABLE bad_owner AS "
        "WITH attach AS (SELECT * FROM comps WHERE n_owners = 1), "
        "vals AS (SELECT a.owner, i.ns, i.value FROM attach a JOIN ilab il USING (c) "
        f"JOIN idents i USING (iid) WHERE i.ns IN ({unique}) "
        "UNION SELECT k.profile_id, k.ns, k.value FROM known k "
        f"WHERE k.ns IN ({unique}) AND k.profile_id IN (SELECT owner FROM attach)), "
        "held AS (SELECT profile_id AS owner, count(*) AS n FROM known "
        "WHERE profile_id IN (SELECT owner FROM attach) GROUP BY profile_id), "
        "sizes AS (SELECT a.owner, sum(a.n_new) + any_value(coalesce(h.n, 0)) AS n "
        "FROM attach a LEFT JOIN held h USING (owner) GROUP BY a.owner) "
        "SELECT owner FROM vals GROUP BY owner, ns HAVING count(DISTINCT value) > 1 "
        f"UNION SELECT owner FROM sizes WHERE n > {limit}"
    )
    stage.execute(
        "CREATE OR REPLACE TABLE comp_class AS SELECT c.c, CASE "
        f"WHEN c.n_owners = 0 AND c.n_ids <= {limit} "
        "AND c.c NOT IN (SELECT c FROM bad_new) THEN 'new' "
        "WHEN c.n_owners = 1 AND c.owner NOT IN (SELECT owner FROM bad_owner) THEN 'attach' "
        "ELSE 'writer' END AS cls, c.owner, c.n_new, s.first_ts, s.last_ts FROM comps c JOIN ("
        "SELECT tc.c, min(t.first_ts) AS first_ts, max(t.last_ts) AS last_ts "
        "FROM tcomp tc JOIN tuples t USING (tid) GROUP BY tc.c) s USING (c)"
    )
    for name in ("comps", "bad_new", "bad_owner", "known"):
        stage.execute(f"DROP TABLE {name}")
    stage.execute("CREATE OR REPLACE TABLE comp_pid (c BIGINT, pid VARCHAR)")
    stage.execute("CREATE OR REPLACE TABLE writer_pid (tid BIGINT, pid VARCHAR)")


def _last_merge_seq(ctx: _Context) -> int:
    with ctx.hub.engine.connect() as conn:
        value = conn.execute(
            select(profile_merges.c.seq)
            .where(profile_merges.c.workspace_id == ctx.job.workspace_id)
            .order_by(profile_merges.c.seq.desc())
            .limit(1)
        ).scalar()
    return int(value or 0)


def _merges_since(ctx: _Context, since: int) -> pa.Table | None:
    """Merges recorded since ``since`` (by us or anyone) as ``absorbed -> final survivor``."""
    with ctx.hub.engine.connect() as conn:
        rows = conn.execute(
            select(profile_merges.c.absorbed_id, profile_merges.c.survivor_id)
            .where(
                profile_merges.c.workspace_id == ctx.job.workspace_id,
                profile_merges.c.seq > since,
            )
            .order_by(profile_merges.c.seq)
        ).all()
    if not rows:
        return None
    survivor = {a: s for a, s in rows}

    def final(pid: str) -> str:
        seen: set[str] = set()
        while pid in survivor and pid not in seen:
            seen.add(pid)
            pid = survivor[pid]
        return pid

    return pa.table(
        {
            "absorbed": pa.array(list(survivor), pa.string()),
            "survivor": pa.array([final(a) for a in survivor], pa.string()),
        }
    )


@contextlib.contextmanager
def _bulk_tx(hub: Hub) -> Iterator[Connection]:
    """A state transaction for set-wise writes (SQLite gets a larger page cache meanwhile)."""
    with hub.tx() as conn:
        lite = conn.dialect.name == "sqlite"
        if lite:
            conn.exec_driver_sql(f"PRAGMA cache_size = -{_SQLITE_CACHE_KB}")
        try:
            yield conn
        finally:
            if lite:
                conn.exec_driver_sql("PRAGMA cache_size = -2000")


class _Watermark:
    """How far (in rows) the profiles of the file are written; appends wait on it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._row = 0
        self._done = False
        self._failed: BaseException | None = None

    def advance(self, row: int) -> None:
        with self._cond:
            self._row = max(self._row, row)
            self._cond.notify_all()

    def finish(self, failed: BaseException | None = None) -> None:
        with self._cond:
            self._done, self._failed = True, failed
            self._cond.notify_all()

    def wait_for(self, row: int) -> None:
        """Block until every profile the rows up to ``row`` need is written."""
        with self._cond:
            while not self._done and self._row < row:
                self._cond.wait()
            if self._failed is not None:
                raise RuntimeError("writing the profiles of this import failed") from self._failed


def _write_profiles(ctx: _Context, stage: _Stage, written: _Watermark) -> None:
    """New profiles and new identity links, set-wise, in the order the file first needs them
    (one transaction per batch, advancing ``written``); then the seen times."""
    ws, now, hub = ctx.job.workspace_id, ctx.now, ctx.hub
    cursor = stage.db.cursor()
    try:
        for batch in stage.batches("SELECT * FROM write_plan", size=_BULK_BATCH):
            first = int(pc.min(batch.column("first_row")).as_py())
            last = int(pc.max(batch.column("first_row")).as_py())
            links = cursor.sql(
                "SELECT pid, ns, value, first_ts FROM write_links "
                "WHERE first_row >= ? AND first_row <= ? ORDER BY ns, value",
                params=[first, last],
            ).to_arrow_table()
            fresh = batch.filter(pc.equal(batch.column("cls"), "new"))
            n = fresh.num_rows
            with _bulk_tx(hub) as conn:
                lite = conn.dialect.name == "sqlite"
                _insert_rows(
                    conn,
                    profiles,
                    {
                        "id": fresh.column("pid"),
                        "workspace_id": _repeat(ws, n),
                        "attributes": _repeat("{}" if lite else {}, n),
                        "attribute_meta": _repeat("{}" if lite else {}, n),
                        "first_seen": fresh.column("first_ts"),
                        "last_seen": fresh.column("last_ts"),
                        "created_at": _repeat(_time_value(conn, now), n),
                        "updated_at": _repeat(_time_value(conn, now), n),
                    },
                )
                _insert_links(conn, ws, links, ignore=True)
            ctx.job.created += n
            written.advance(last)
            del links, fresh
            _release_memory()
    except BaseException as exc:
        written.finish(exc)
        raise
    finally:
        cursor.close()
    written.finish()
    _widen_seen(ctx, stage)


def _insert_links(
    conn: Connection, workspace_id: str, links: pa.Table, *, ignore: bool = False
) -> None:
    """Insert identity links given as columns (profile id, namespace, value, first seen)."""
    _insert_rows(
        conn,
        identities,
        {
            "workspace_id": _repeat(workspace_id, links.num_rows),
            "namespace": links.column(1),
            "value": links.column(2),
            "profile_id": links.column(0),
            "first_seen": links.column(3),
        },
        ignore_keys=("workspace_id", "namespace", "value") if ignore else (),
    )


def _tuple_identities(batch: pa.Table, namespaces: Sequence[str]) -> list[list[Identity]]:
    columns = [(ns, batch.column(f"id_{ns}").to_pylist()) for ns in namespaces]
    return [
        [Identity(ns, values[i]) for ns, values in columns if values[i] is not None]
        for i in range(batch.num_rows)
    ]


def _writer(ctx: _Context, conn: Connection) -> ProfileWriter:
    return ProfileWriter(
        conn,
        workspace_id=ctx.job.workspace_id,
        policy=ctx.policy,
        now=ctx.now,
        shared_event_log=ctx.hub.settings.shared_event_log,
    )


def _utc_list(array: pa.ChunkedArray | pa.Array) -> list[datetime]:
    return _python_values(array, sqlite_text=False)


def _run_writer(ctx: _Context, stage: _Stage) -> None:
    """Tuples of ``writer`` components, oldest first, through ProfileWriter."""
    cols = ", ".join(f"t.{_q(ns)}" for ns in stage.namespaces)
    for batch in stage.batches(
        f"SELECT t.tid, t.first_ts, {cols} FROM tuples t JOIN tcomp tc USING (tid) "
        "JOIN comp_class cc USING (c) WHERE cc.cls = 'writer' ORDER BY t.first_ts, t.tid",
        size=_WRITER_BATCH,
    ):
        ids = _tuple_identities(batch, stage.namespaces)
        stamps = _utc_list(batch.column("first_ts"))
        with ctx.hub.tx() as conn:
            writer = _writer(ctx, conn)
            writer.preload(i for group in ids for i in group)
            placed = [
                writer.record(group, {}, at=at, source=SOURCE)
                for group, at in zip(ids, stamps, strict=True)
            ]
            stats = writer.flush()
        ctx.job.created += stats.created
        ctx.job.merged += stats.merged
        stage.put(
            "writer_pid",
            pa.table(
                {
                    "tid": batch.column("tid"),
                    "pid": pa.array([writer.canonical(p) for p in placed], pa.string()),
                }
            ),
        )


def _apply_traits(ctx: _Context, stage: _Stage) -> None:
    """Traits of identify calls become attributes of their profiles, oldest call first."""
    cols = ", ".join(_q(ns) for ns in stage.namespaces)
    for batch in stage.batches(
        f"SELECT timestamp, traits, {cols} FROM traits_rows ORDER BY timestamp, row",
        size=_WRITER_BATCH,
    ):
        ids = _tuple_identities(batch, stage.namespaces)
        stamps = _utc_list(batch.column("timestamp"))
        texts = batch.column("traits").to_pylist()
        with ctx.hub.tx() as conn:
            writer = _writer(ctx, conn)
            writer.preload(i for group in ids for i in group)
            for group, at, text in zip(ids, stamps, texts, strict=True):
                res = validate_attributes(ctx.schema, orjson.loads(text), path="traits")
                writer.record(group, res.value, at=at, source=SOURCE)
            stats = writer.flush()
        ctx.job.created += stats.created
        ctx.job.merged += stats.merged


def _widen_seen(ctx: _Context, stage: _Stage) -> None:
    """Widen ``first_seen``/``last_seen`` of existing profiles: one grouped min/max, then
    batched updates that touch only rows that change (so a rerun writes nothing). Runs while
    the events are appended (it changes no identity), in small transactions."""
    ws = ctx.job.workspace_id
    for batch in stage.batches("SELECT pid, fs, ls FROM seen_plan", size=_SEEN_BATCH):
        _update_seen(ctx, ws, batch)


def _update_seen(ctx: _Context, ws: str, batch: pa.Table) -> None:
    with _bulk_tx(ctx.hub) as conn:
        lite = conn.dialect.name == "sqlite"
        pids = batch.column("pid").to_pylist()
        firsts = _python_values(batch.column("fs"), sqlite_text=lite)
        lasts = _python_values(batch.column("ls"), sqlite_text=lite)
        if lite:
            now = _time_value(conn, ctx.now)
            conn.exec_driver_sql(
                "UPDATE profiles SET first_seen = min(first_seen, ?), "
                "last_seen = max(last_seen, ?), updated_at = ? "
                "WHERE id = ? AND workspace_id = ? AND (first_seen > ? OR last_seen < ?)",
                [
                    (f, la, now, pid, ws, f, la)
                    for pid, f, la in zip(pids, firsts, lasts, strict=True)
                ],
            )
            return
        p = profiles.c
        fs = bindparam("b_fs", type_=p.first_seen.type)
        ls = bindparam("b_ls", type_=p.last_seen.type)
        stmt = (
            update(profiles)
            .where(p.workspace_id == ws, p.id == bindparam("b_pid"))
            .where((p.first_seen > fs) | (p.last_seen < ls))
            .values(
                first_seen=case((p.first_seen > fs, fs), else_=p.first_seen),
                last_seen=case((p.last_seen < ls, ls), else_=p.last_seen),
                updated_at=ctx.now,
            )
        )
        conn.execute(
            stmt,
            [
                {"b_pid": pid, "b_fs": f, "b_ls": la}
                for pid, f, la in zip(pids, firsts, lasts, strict=True)
            ],
        )


# ----------------------------------------------------------------------------------------------
# Events, phase 3: append to the log


def _append_groups(ends: Sequence[int], rows: int) -> list[tuple[int, int, list[int]]]:
    """Group spilled batches (by their last rows ``ends``) into appends of about ``rows`` rows:
    ``(low, high, batch indices)`` covering rows ``low < row <= high``."""
    groups: list[tuple[int, int, list[int]]] = []
    low, current = 0, []
    for index, end in enumerate(ends):
        current.append(index)
        if end - low >= rows or index == len(ends) - 1:
            groups.append((low, end, current))
            low, current = end, []
    return groups


def _append_events(
    ctx: _Context,
    stage: _Stage,
    sink: _ErrorSink,
    *,
    last_row: int,
    append_rows: int,
    written: _Watermark,
    progress: Progress | None,
) -> int:
    """Append the staged rows in groups (see the module doc): each append waits until the
    profiles its rows need are written, carries the import's marker, and is followed by the
    checkpoint (``rows_committed``). Returns how many of the file's rows are in the log.
    Appending one group overlaps with preparing the next."""
    hub, job = ctx.hub, ctx.job
    start = job.committed
    done = int(hub.events.marker_value(job.marker))
    accepted = int(stage.one("SELECT count(*) FROM row_pid WHERE row <= ?", [start]) or 0)
    spill = pa.OSFile(str(stage.spill_path), "rb")
    reader = pa.ipc.open_file(spill)
    micros = int((ctx.now - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)
    background = _Background()
    checkpoints = _Checkpoints(ctx)
    try:
        for low, high, indices in _append_groups(stage.chunk_ends, append_rows):
            if high <= start:
                continue
            count = int(
                stage.one("SELECT count(*) FROM row_pid WHERE row > ? AND row <= ?", [low, high])
            )
            accepted += count
            rejected = sink.count_upto(high)
            table: pa.Table | None = None
            since = max(low, done)
            if count and high > done:
                with _phase(job, "append_prepare"):
                    pids = stage.db.sql(
                        "SELECT row, pid FROM row_pid WHERE row > ? AND row <= ? ORDER BY row",
                        params=[since, high],
                    ).to_arrow_table()
                    spilled = pa.Table.from_batches([reader.get_batch(i) for i in indices])
                    spilled = spilled.filter(pc.is_in(spilled.column("row"), pids.column("row")))
                    if spilled.num_rows != pids.num_rows:  # pragma: no cover - a bug
                        raise RuntimeError("staged rows and their profiles do not line up")
                    table = _log_rows(ctx, spilled, pids.column("pid"), micros)
            commit = functools.partial(
                _commit_group,
                ctx,
                table,
                high=high,
                accepted=accepted,
                rejected=rejected,
                written=written,
                checkpoints=checkpoints,
            )
            with _phase(job, "append_wait"):
                background.submit(commit)
            del table
            _release_memory()
            if progress is not None:
                progress(last_row + high, 2 * last_row)
    finally:
        try:
            background.close()
        finally:
            checkpoints.close()
            spill.close()
    return accepted


class _Checkpoints:
    """Records checkpoints on a thread of its own, keeping only the newest one pending, so a
    state-store transaction in progress elsewhere never holds up the log appends. A
    checkpoint is handed over only after its append, so it never runs ahead of the log."""

    def __init__(self, ctx: _Context) -> None:
        self._ctx = ctx
        self._cond = threading.Condition()
        self._pending: tuple[int, int, int] | None = None
        self._closed = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="waymark-import-checkpoints")
        self._thread.start()

    def put(self, high: int, accepted: int, rejected: int) -> None:
        with self._cond:
            if self._failed is not None:
                raise self._failed
            self._pending = (high, accepted, rejected)
            self._cond.notify_all()

    def close(self) -> None:
        """Write the last pending checkpoint; raise the error of a failed one."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._failed is not None:
            raise self._failed

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                item, self._pending = self._pending, None
                if item is None:
                    return
            high, accepted, rejected = item
            try:
                _record_progress(
                    self._ctx.hub,
                    self._ctx.job,
                    rows_committed=high,
                    accepted=accepted,
                    rejected=rejected,
                )
            except BaseException as exc:
                with self._cond:
                    self._failed = exc
                return


def _commit_group(
    ctx: _Context,
    table: pa.Table | None,
    *,
    high: int,
    accepted: int,
    rejected: int,
    written: _Watermark,
    checkpoints: _Checkpoints,
) -> None:
    """Steps 2 and 3 for one group: the log append with its marker, then the checkpoint."""
    job = ctx.job
    if table is not None and table.num_rows:
        with _phase(job, "append_profiles_wait"):
            written.wait_for(high)
        with _phase(job, "append_log"):
            ctx.hub.events.append(table, marker=(job.marker, high))
    del table
    _release_memory()
    checkpoints.put(high, accepted, rejected)


def _log_rows(ctx: _Context, spilled: pa.Table, pids: pa.ChunkedArray, micros: int) -> pa.Table:
    """The event log's columns for spilled rows whose profiles are ``pids``."""
    n = spilled.num_rows
    constant = np.zeros(n, dtype=np.int32)
    received = pa.array(np.full(n, micros, dtype=np.int64), pa.int64()).cast(
        pa.timestamp("us", tz="UTC")
    )
    return pa.table(
        {
            "workspace_id": pa.DictionaryArray.from_arrays(
                constant, pa.array([ctx.job.workspace_id])
            ).cast(pa.string()),
            "profile_id": pids,
            "message_id": spilled.column("message_id"),
            "type": spilled.column("type"),
            "name": spilled.column("name"),
            "timestamp": spilled.column("timestamp"),
            "received_at": received,
            "identities": spilled.column("identities"),
            "properties": spilled.column("properties"),
            "traits": spilled.column("traits"),
            "context": spilled.column("context"),
            "source": pa.DictionaryArray.from_arrays(constant, pa.array([SOURCE])).cast(
                pa.string()
            ),
            "flags": spilled.column("flags"),
        }
    )


def _dedupe(stage: _Stage) -> None:
    """Rows repeating an earlier row's ``message_id`` are skipped (``dups``): candidates by a
    64-bit hash, then compared exactly."""
    stage.execute(
        "CREATE TABLE dups AS WITH twice AS (SELECT hash(message_id) AS h FROM staged "
        "GROUP BY h HAVING count(*) > 1) SELECT row FROM (SELECT row, row_number() OVER "
        "(PARTITION BY message_id ORDER BY row) AS n FROM staged "
        "WHERE hash(message_id) IN (SELECT h FROM twice)) WHERE n > 1"
    )
    if stage.one("SELECT count(*) FROM dups"):
        stage.execute("DELETE FROM staged WHERE row IN (SELECT row FROM dups)")


def _drop_known(ctx: _Context, stage: _Stage) -> None:
    """Rows whose message id the hub already holds, in the event log or waiting in the inbox
    (sent over the API, or by another file), are skipped, as the API skips a retried event.
    Rows up to this import's own log marker are left alone: a resumed import appended those
    itself, and the marker keeps them from being appended twice."""
    hub, workspace_id = ctx.hub, ctx.job.workspace_id
    after = hub.events.marker_value(ctx.job.marker)
    batches = stage.batches(
        "SELECT message_id FROM staged WHERE row > ?", [after], size=_KNOWN_BATCH_ROWS
    )
    known = hub.events.known_message_ids(
        workspace_id, (t.column(0).combine_chunks() for t in batches)
    )
    with hub.engine.connect() as conn:
        known.update(
            conn.execute(
                select(event_inbox.c.message_id).where(event_inbox.c.workspace_id == workspace_id)
            ).scalars()
        )
    if not known:
        return
    stage.db.register("known_ids", pa.table({"id": pa.array(sorted(known), pa.string())}))
    try:
        stage.db.execute(
            "DELETE FROM staged WHERE row > ? AND message_id IN (SELECT id FROM known_ids)",
            [after],
        )
    finally:
        stage.db.unregister("known_ids")


def _validated(
    ctx: _Context, pieces: Iterable[_Piece]
) -> Iterator[tuple[int, pa.Table, list[RowError]]]:
    """``(last row, staging columns, errors)`` of each piece, in file order. Pieces are
    validated by one thread per core, a piece ahead each: most of the work is Arrow compute,
    which runs without the GIL."""
    job = ctx.job
    workers = max(1, min(os.cpu_count() or 1, _VALIDATE_THREADS))

    def validate(piece: _Piece) -> tuple[int, pa.Table, list[RowError]]:
        table, errors = _stage_events(ctx, piece)
        return piece.last_row, table, errors

    source = iter(pieces)
    ahead: collections.deque[Future[tuple[int, pa.Table, list[RowError]]]] = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="waymark-validate") as pool:
        try:
            while True:
                with _phase(job, "read"):
                    piece = next(source, None)
                if piece is not None:
                    ahead.append(pool.submit(validate, piece))
                    del piece
                    if len(ahead) <= workers:
                        continue
                if not ahead:
                    return
                with _phase(job, "validate"):
                    done = ahead.popleft().result()
                yield done
                del done
        finally:
            for pending in ahead:
                pending.cancel()


def _import_events(
    ctx: _Context,
    pieces: Iterable[_Piece],
    sink: _ErrorSink,
    *,
    chunk_rows: int,
    progress: Progress | None,
    total: int | None,
) -> ImportReport:
    hub, job = ctx.hub, ctx.job
    work = _work_dir(hub)
    merges_before = job.merged
    try:
        stage = _Stage(work)
        try:
            last_row = 0
            background = _Background()
            try:
                for last_row, table, errors in _validated(ctx, pieces):
                    sink.add(errors)
                    with _phase(job, "stage_wait"):
                        background.submit(functools.partial(stage.add, table, last_row))
                    del table
                    _release_memory()
                    if progress is not None:
                        progress(last_row, 2 * total if total is not None else None)
            finally:
                background.close()
            stage.finish_spill()
            for ns in _namespaces(ctx.plan):
                if ns not in stage.namespaces:
                    stage.db.execute(f"ALTER TABLE staged ADD COLUMN {_q(ns)} VARCHAR")
                    stage.namespaces.append(ns)
            with _phase(job, "dedupe"):
                _dedupe(stage)
                _drop_known(ctx, stage)
            accepted = 0
            if stage.rows:
                with _phase(job, "resolve"):
                    _resolve(ctx, stage)
                # the event log's buffers grow during the appends: the stage gives way
                stage.set_memory(_stage_memory_mb(_STAGE_APPEND_MEMORY_MB))
                written = _Watermark()
                writes = _Background()
                try:
                    writes.submit(functools.partial(_write_profiles, ctx, stage, written))
                    with _phase(job, "append"):
                        accepted = _append_events(
                            ctx,
                            stage,
                            sink,
                            last_row=last_row,
                            append_rows=max(chunk_rows, min(4 * chunk_rows, _APPEND_ROWS)),
                            written=written,
                            progress=progress,
                        )
                finally:
                    with _phase(job, "writes_wait"):
                        writes.close()
                with _phase(job, "traits"):
                    _apply_traits(ctx, stage)
        finally:
            stage.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = sink.close()
    if job.merged > merges_before and not hub.settings.shared_event_log:
        flush_hub(hub)  # re-point earlier events of absorbed profiles
    return _finish(
        hub, job, rows_read=last_row, accepted=accepted, rejected=len(sink.rows), report=report
    )


# ----------------------------------------------------------------------------------------------
# Entry point


def _open(
    path: Path, fmt: str, codec: str, plan: _Plan, rows: int
) -> tuple[Iterator[_Piece], int | None]:
    """Open the file (checking what can be checked before anything is written)."""
    if fmt == "csv":
        reader = _CsvReader(path, codec)
        plan.check(reader.names)
        _require_columns(plan)
        return _rechunk(reader.pieces(), rows), None
    if fmt == "parquet":
        pf = _parquet_file(path)
        plan.check(pf.schema_arrow.names)
        _require_columns(plan)
        return _parquet_pieces(pf, rows), int(pf.metadata.num_rows)
    return _jsonl_pieces(path, codec, rows), None


def _require_columns(plan: _Plan) -> None:
    if not plan.columns("identity"):
        reason = f"an import of {plan.kind} needs an identity column, e.g. user_id"
        raise InvalidInput([Issue("columns", reason)])
    if plan.kind == "events" and not plan.columns("timestamp"):
        raise InvalidInput([Issue("columns", "an events file needs a timestamp column")])


def run_import(
    hub: Hub,
    *,
    workspace_id: str,
    kind: ImportKind,
    path: Path,
    actor: str,
    fmt: str | None = None,
    mapping: Mapping[str, str] | None = None,
    encoding: str = "utf-8",
    progress: Progress | None = None,
    chunk_rows: int = 50_000,
    error_report: Path | None = None,
) -> ImportReport:
    """Import the profiles or events of one file into a workspace (see the module doc).

    ``fmt`` is ``csv``, ``jsonl`` or ``parquet`` (default: from the extension); ``mapping``
    maps source columns to targets, overriding :func:`default_target`; ``encoding`` applies to
    CSV and JSON Lines. ``progress(done, total)`` is called after each chunk: ``done`` grows
    to ``total`` (rows; for events two steps per row, reading then committing, so ``total`` is
    twice the row count) and ``total`` is None while unknown. ``chunk_rows`` is the unit of
    reading and validating, and of the profile transactions; event log appends group up to
    four chunks (200,000 rows at most, unless a chunk is larger).

    Raises InvalidInput for a file that cannot be imported at all (nothing is written; a JSON
    Lines key first seen deep in the file is checked when seen, which fails the import there),
    NotFound for an unknown workspace, Conflict when another process is importing the same
    file, and StoreBusy (events, embedded) when a running server holds the event log.
    """
    if kind not in ("profiles", "events"):
        raise InvalidInput([Issue("kind", f"must be profiles or events, got {kind!r}")])
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    path = Path(path)
    if not path.is_file():
        raise InvalidInput([Issue("file", f"{path} is not a readable file")])
    fmt_name = detect_format(path, fmt)
    codec = _codec(encoding)
    plan = _Plan(kind, dict(mapping or {}))
    for column, text in plan.mapping.items():
        _parse_target(text, column)
    _check_workspace(hub, workspace_id)
    pieces, total = _open(path, fmt_name, codec, plan, chunk_rows)
    if kind == "events":
        _ = hub.events  # the embedded log may be held by a running server: fail before writing
    claimed = _claim(
        hub,
        workspace_id=workspace_id,
        kind=kind,
        path=path,
        sha256=_sha256(path),
        options=options_fingerprint(fmt_name, codec, plan.mapping),
        actor=actor,
    )
    if isinstance(claimed, ImportReport):
        return claimed
    job = claimed
    report_path = Path(error_report) if error_report else path.with_name(path.name + ".errors.csv")
    try:
        with hub.tx() as conn:
            schema = current_schema(conn, workspace_id).schema
        ctx = _Context(
            hub=hub,
            job=job,
            schema=schema,
            policy=policy_of(hub),
            limits=limits_of(hub),
            now=hub.clock.now(),
            plan=plan,
        )
        if kind == "profiles":
            sink = _ErrorSink(report_path, keep_upto=job.committed)
            return _import_profiles(
                ctx, pieces, sink, progress, total, workers=_workers_for(path, total)
            )
        return _import_events(
            ctx,
            pieces,
            _ErrorSink(report_path),
            chunk_rows=chunk_rows,
            progress=progress,
            total=total,
        )
    except BaseException:
        _mark_failed(hub, job)
        raise


def _workers_for(path: Path, total: int | None) -> int:
    """Processes converting profile rows for large files: one per core, at most 4 (the
    writing process mostly waits for them); 0 converts in this process."""
    cpus = os.cpu_count() or 1
    large = (total or 0) >= _PARALLEL_ROWS or path.stat().st_size >= _PARALLEL_BYTES
    return min(cpus, 4) if cpus > 1 and large else 0


def _check_workspace(hub: Hub, workspace_id: str) -> None:
    with hub.engine.connect() as conn:
        found = conn.execute(
            select(workspaces.c.id).where(workspaces.c.id == workspace_id)
        ).scalar()
    if found is None:
        raise NotFound(f"workspace {workspace_id} does not exist")
