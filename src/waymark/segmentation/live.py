"""Streaming audiences, kept up to date as events arrive (``waymark serve``).

Where it sits: acknowledged events wait in the state store's inbox until the mover
(:mod:`waymark.ingestion.mover`) appends them to the event log. The mover hands every batch it
moves to :class:`Folder`, which folds the events into the streaming states of their profiles
and writes the membership changes *in the transaction that removes those events from the
inbox*: each acknowledged event is folded exactly once, whatever crashes. Computing happens
before that transaction (:meth:`Folder.prepare`; SQLite allows one writer, and ingestion must
not wait for Python), writing in it (:meth:`Folder.commit`), which re-reads what another writer
may have changed meanwhile (merged or deleted profiles, memberships).

State: one ``stream_states`` row per profile holds, per streaming audience, the evaluator's
JSON state (:mod:`.compile.streaming`) and the instant at which time alone may change that
membership; the row's ``due`` is the earliest of them. :func:`maintain` (run by ``serve`` after
each move) fires due timers, re-evaluates profiles queued in ``stream_recheck`` (a merge asks
for the survivor's states to be rebuilt from its history) and builds the states of audiences
that are new, changed or invalidated (a file import appends to the log directly), a chunk of
profiles at a time. While an audience is being built, profiles beyond its build cursor are
neither folded nor evaluated for it (their memberships stay as they are until the build reaches
them); the build reads the log, which holds exactly the events already folded (the maintenance
runs after a move completes, under the mover's lock).

When a state cannot answer (:class:`~.compile.streaming.StateOverflow`: more events in a window
than the state keeps), that profile is evaluated by the in-memory evaluator over its whole
history from the log: exact, slower.

Ties: an event's ``seq`` in the states is its log ``seq``; events folded while recovering from a
crash between the log append and the inbox cleanup look theirs up by message id
(``RECOVERY_SEQ + inbox seq`` only if the log somehow lacks one).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from typing import Any, Final

import orjson
from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from waymark.core.errors import InvalidInput
from waymark.gcpause import collector_paused
from waymark.hub import Hub
from waymark.profiles.schema_store import schema_in_force
from waymark.segmentation.compile.memory import (
    CompiledAudience,
    MemoryEvent,
    PreparedProfile,
    ProfileData,
    compile_memory,
)
from waymark.segmentation.compile.streaming import (
    NO_ARRIVALS,
    Arrivals,
    Asking,
    State,
    StreamingAudience,
    compile_streaming,
    from_micros,
    to_micros,
)
from waymark.segmentation.compile.streaming import plan as streaming_plan
from waymark.segmentation.lang import ast
from waymark.segmentation.lang.check import check, expand, references
from waymark.segmentation.lang.jsonform import from_json
from waymark.storage.database import streaming_lock
from waymark.storage.eventlog import EventLog, pg_histories
from waymark.storage.hotpath import fetch_rows, param_marks
from waymark.storage.tables import (
    audience_changes,
    audience_members,
    audiences,
    imports,
    profiles,
    read_time,
    stream_recheck,
    stream_states,
)

__all__ = [
    "CHUNK",
    "RECOVERY_SEQ",
    "SERVE_CHUNK",
    "FoldWork",
    "Folder",
    "Moved",
    "decide_modes",
    "invalidate",
    "maintain",
    "recheck_mark",
    "stream_status",
]

log = logging.getLogger(__name__)

#: Base of the ``seq`` of events folded while recovering from a crash (see the module text).
RECOVERY_SEQ: Final = 1 << 40
#: Profiles per chunk of a build, of the timers fired and of the recheck queue in one step.
CHUNK: Final = 2000
#: Profiles of due timers and of rechecks per step in ``serve``, between two moves of the
#: inbox: a newly acknowledged event waits for one such step, not for 2,000 profiles' worth.
SERVE_CHUNK: Final = 100
#: Events a streaming state keeps per condition before it answers "evaluate in batch".
MAX_EVENTS: Final = 1000


@dataclass(frozen=True, slots=True)
class Moved:
    """One event moved into the log, as the states need it."""

    workspace_id: str
    profile_id: str
    name: str
    timestamp: datetime
    seq: int
    properties: Mapping[str, Any]


# -- the streaming audiences of a workspace ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Live:
    """A streaming audience as ``serve`` runs it."""

    id: str
    workspace_id: str
    name: str
    compiled: StreamingAudience
    memory: CompiledAudience
    #: the build: the key stored with it, how far it went, whether it is complete
    built_key: str | None
    through: str | None
    ready: bool
    #: the newest profile id when the build began (None: a build begun before frontiers):
    #: profiles created since have nothing to build, and are kept up to date from the start
    frontier: str | None = None

    def covers(self, profile_id: str) -> bool:
        """Whether this profile's state for the audience is built (so it is kept up to date)."""
        if self.built_key != self.compiled.key:
            return False
        return (
            self.ready
            or (self.through is not None and profile_id <= self.through)
            or (self.frontier is not None and profile_id > self.frontier)
        )


_compiled: dict[tuple[str, str], tuple[StreamingAudience, CompiledAudience]] = {}


_expansions: dict[tuple[Any, ...], dict[str, ast.Expr | None]] = {}


_LIGHT = (
    audiences.c.id,
    audiences.c.name,
    audiences.c.version,
    audiences.c.mode,
    audiences.c.stream_key,
    audiences.c.stream_through,
    audiences.c.stream_ready,
    audiences.c.stream_frontier,
)


def _expanded_all(conn: Connection, workspace_id: str) -> dict[str, tuple[Any, ast.Expr | None]]:
    """Every audience of the workspace: its row (without the definition) and its definition
    expanded and checked against the schema in force (None when that fails: the schema
    changed under it). Expansions are cached by the audiences' versions and the schema's, so
    a round of streaming reads two small queries' worth."""
    return _expanded_rows(conn, workspace_id)[1]


def _expanded_rows(
    conn: Connection, workspace_id: str
) -> tuple[tuple[Any, ...], dict[str, tuple[Any, ast.Expr | None]]]:
    """:func:`_expanded_all`, with a key that changes whenever anything it returns may: the
    schema version and the audiences' rows as read."""
    rows = conn.execute(select(*_LIGHT).where(audiences.c.workspace_id == workspace_id)).all()
    version, schema = schema_in_force(conn, workspace_id)
    key = (workspace_id, version, tuple(sorted((r.id, r.version) for r in rows)))
    fulls = _expansions.get(key)
    if fulls is None:
        stored = conn.execute(
            select(audiences.c.name, audiences.c.definition).where(
                audiences.c.workspace_id == workspace_id
            )
        ).all()
        definitions = {name: from_json(doc) for name, doc in stored}
        fulls = {}
        for r in rows:
            try:
                fulls[r.name] = check(expand(definitions[r.name], definitions), schema)
            except (InvalidInput, KeyError):
                fulls[r.name] = None
        if len(_expansions) > 256:
            _expansions.clear()
        _expansions[key] = fulls
    read = (workspace_id, version, tuple(tuple(r) for r in rows))
    return read, {r.name: (r, fulls.get(r.name)) for r in rows}


_modes: dict[int, tuple[ast.Expr, str]] = {}


def _mode_of(full: ast.Expr | None) -> str:
    if full is None:
        return "batch"
    known = _modes.get(id(full))
    if known is None or known[0] is not full:  # cached per expansion (they are cached too)
        if len(_modes) > 4096:
            _modes.clear()
        known = (full, "streaming" if streaming_plan(full).streamable else "batch")
        _modes[id(full)] = known
    return known[1]


def decide_modes(conn: Connection, workspace_id: str, changed: str | None = None) -> None:
    """Store each audience's evaluation mode: streaming when its expanded definition can be
    streamed, else batch. Call after any audience of the workspace changes, naming it
    (``changed``): its streaming states, and those of every audience containing it, are
    dropped to be built again (a definition changed and changed back must not find states
    that missed the events moved in between), as are those of an audience whose mode
    changes."""
    expanded = _expanded_all(conn, workspace_id)
    users = _containing(conn, workspace_id, changed) if changed is not None else set()
    for name, (row, full) in expanded.items():
        mode = _mode_of(full)
        if mode != row.mode or name in users:
            conn.execute(
                update(audiences)
                .where(audiences.c.id == row.id)
                .values(
                    mode=mode,
                    stream_key=None,
                    stream_through=None,
                    stream_ready=False,
                    stream_frontier=None,
                )
            )


def _containing(conn: Connection, workspace_id: str, name: str) -> set[str]:
    """``name`` and every audience whose definition contains it, directly or not."""
    direct: dict[str, set[str]] = {}
    for other, doc in conn.execute(
        select(audiences.c.name, audiences.c.definition).where(
            audiences.c.workspace_id == workspace_id
        )
    ):
        direct[other] = references(from_json(doc))
    found = {name}
    grew = True
    while grew:
        grew = False
        for other, refs in direct.items():
            if other not in found and refs & found:
                found.add(other)
                grew = True
    return found


#: (audience id, id of an expansion) -> (that expansion, its compiled forms): the expansions are
#: cached, so each round finds its audiences here without printing their definitions
_compiled_by_identity: dict[tuple[str, int], tuple[Any, tuple[Any, Any]]] = {}


def _compiled_of(aid: str, full: ast.Expr) -> tuple[StreamingAudience, CompiledAudience]:
    known = _compiled_by_identity.get((aid, id(full)))
    if known is not None and known[0] is full:
        return known[1]
    cache_key = (aid, repr(full))  # an equal definition expanded again (a schema change)
    compiled = _compiled.get(cache_key)
    if compiled is None:
        if len(_compiled) > 4096:
            _compiled.clear()
        compiled = (compile_streaming(full, max_events=MAX_EVENTS), compile_memory(full))
        _compiled[cache_key] = compiled
    if len(_compiled_by_identity) > 4096:
        _compiled_by_identity.clear()
    _compiled_by_identity[(aid, id(full))] = (full, compiled)
    return compiled


#: the streaming audiences last built per workspace, with the key of what they were built from
_lives: dict[str, tuple[tuple[Any, ...], list[Live]]] = {}


def live_audiences(conn: Connection, workspace_id: str) -> list[Live]:
    """The workspace's streaming audiences, compiled (cached by definition; the list is
    kept while the audiences' rows and the schema stay as they were)."""
    read, expanded = _expanded_rows(conn, workspace_id)
    known = _lives.get(workspace_id)
    if known is not None and known[0] == read:
        return list(known[1])  # a copy: the kept list stays as built
    found: list[Live] = []
    for row, full in expanded.values():
        if row.mode != "streaming" or _mode_of(full) != "streaming":
            continue
        assert full is not None
        compiled = _compiled_of(row.id, full)
        found.append(
            Live(
                id=row.id,
                workspace_id=workspace_id,
                name=row.name,
                compiled=compiled[0],
                memory=compiled[1],
                built_key=row.stream_key,
                through=row.stream_through,
                ready=bool(row.stream_ready) and row.stream_key == compiled[0].key,
                frontier=row.stream_frontier,
            )
        )
    if len(_lives) > 256:
        _lives.clear()
    _lives[workspace_id] = (read, found)
    return list(found)


def invalidate(conn: Connection, workspace_id: str) -> None:
    """Ask for every streaming audience of the workspace to be built again from the log (events
    reached it other than through the inbox: a file import)."""
    conn.execute(
        update(audiences)
        .where(audiences.c.workspace_id == workspace_id, audiences.c.mode == "streaming")
        .values(stream_key=None, stream_through=None, stream_ready=False, stream_frontier=None)
    )


def stream_status(conn: Connection, workspace_id: str, audience_id: str) -> dict[str, Any]:
    """How far the streaming states of an audience are built: ``ready`` (kept up to date event
    by event), ``building`` (with the share of profiles done) or ``pending``."""
    row = conn.execute(
        select(
            audiences.c.stream_key,
            audiences.c.stream_through,
            audiences.c.stream_ready,
            audiences.c.stream_frontier,
        ).where(audiences.c.id == audience_id)
    ).first()
    if row is None or row.stream_key is None:
        return {"state": "pending"}
    if row.stream_ready:
        return {"state": "ready"}
    total = conn.execute(
        select(func.count()).select_from(profiles).where(profiles.c.workspace_id == workspace_id)
    ).scalar_one()
    done = 0
    if row.stream_through is not None:
        done = conn.execute(
            select(func.count())
            .select_from(profiles)
            .where(profiles.c.workspace_id == workspace_id, profiles.c.id <= row.stream_through)
        ).scalar_one()
    if row.stream_frontier is not None:  # created since the build began: kept from the start
        done += conn.execute(
            select(func.count())
            .select_from(profiles)
            .where(profiles.c.workspace_id == workspace_id, profiles.c.id > row.stream_frontier)
        ).scalar_one()
    return {"state": "building", "profiles_done": int(done), "profiles": int(total)}


# -- per-profile state rows --------------------------------------------------------------------

_micros = to_micros  # instants as the states keep them (microseconds since 1970, UTC)
_moment = from_micros


@dataclass(slots=True)
class _Profile:
    """What one profile's evaluation reads: current attributes and consents."""

    attributes: Mapping[str, Any]
    consents: dict[tuple[str, str], str]
    updated_at: datetime | None = None


_NOBODY: Final = _Profile({}, {})


@dataclass(slots=True)
class FoldWork:
    """States and answers computed for one workspace, waiting to be written."""

    workspace_id: str
    #: profile -> (audience id -> kept entry, profile updated_at); an entry is
    #: ``{"s": state, "d": due micros or None}`` when computed, ``[due, state JSON]`` as read
    #: (see :func:`_entry_state`)
    rows: dict[str, tuple[dict[str, Any], datetime | None]] = field(default_factory=dict)
    #: (audience id, profile id) -> member now
    answers: dict[tuple[str, str], bool] = field(default_factory=dict)
    #: audience id -> the key of the definition the answers and states were computed with
    keys: dict[str, str] = field(default_factory=dict)
    #: computing failed: the workspace's streaming audiences are to be built again instead
    failed: bool = False

    def answer(self, live: Live, pid: str, member: bool) -> None:
        self.answers[(live.id, pid)] = member
        self.keys[live.id] = live.compiled.key


def _chunks(items: Sequence[str], size: int = 900) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _load_rows(
    conn: Connection, workspace_id: str, ids: Sequence[str]
) -> dict[str, tuple[dict[str, Any], datetime | None]]:
    """The state rows of ``ids``: ``(states, seen)`` by profile (on the driver's cursor: the
    mover reads these every round)."""
    found: dict[str, tuple[dict[str, Any], datetime | None]] = {}
    for part in _chunks(ids):
        for pid, states, seen in fetch_rows(
            conn,
            "SELECT profile_id, states, seen FROM stream_states WHERE workspace_id = "
            f"{param_marks(conn, 1)} AND profile_id IN ({param_marks(conn, len(part))})",
            [workspace_id, *part],
        ):
            found[pid] = (orjson.loads(states), None if seen is None else read_time(seen))
    return found


def _load_profiles(conn: Connection, workspace_id: str, ids: Sequence[str]) -> dict[str, _Profile]:
    """Attributes, consents and ``updated_at`` of the profiles ``ids`` that exist (on the
    driver's cursor, as :func:`_load_rows`)."""
    found: dict[str, _Profile] = {}
    for part in _chunks(ids):
        marks = f"{param_marks(conn, 1)} AND {{}} IN ({param_marks(conn, len(part))})"
        for pid, stored, updated_at in fetch_rows(
            conn,
            "SELECT id, attributes, updated_at FROM profiles WHERE workspace_id = "
            + marks.format("id"),
            [workspace_id, *part],
        ):
            attributes = orjson.loads(stored) if isinstance(stored, str | bytes) else stored
            found[pid] = _Profile(attributes or {}, {}, read_time(updated_at))
        for pid, channel, purpose, status in fetch_rows(
            conn,
            "SELECT profile_id, channel, purpose, status FROM consents WHERE workspace_id = "
            + marks.format("profile_id"),
            [workspace_id, *part],
        ):
            profile = found.get(pid)
            if profile is not None:
                profile.consents[(channel, purpose)] = status
    return found


class _Evaluator:
    """Evaluates streaming audiences for profiles of one workspace at one instant."""

    def __init__(
        self,
        audiences_: list[Live],
        *,
        now: datetime,
        history: Any,
    ) -> None:
        self.audiences = audiences_
        self.ids = frozenset(a.id for a in audiences_)
        by_name: dict[str, list[Live]] = defaultdict(list)
        for a in audiences_:
            for name in a.compiled.names:
                by_name[name].append(a)
        #: event name -> the audiences whose states its events may change
        self.by_name = dict(by_name)
        #: the audiences whose answers read the profile's attributes or consents
        self.readers = [a for a in audiences_ if a.compiled.reads_profile]
        self.now = now
        self.t = _micros(now)
        self.history = history  # (profile ids, names) -> list of history tuples
        self._empty: dict[str, tuple[bool, int | None]] = {}
        self._constants: dict[str, bool] | None = None
        self.keys = {a.id: a.compiled.key for a in audiences_}
        #: the audiences built for every profile (the rest ask :meth:`Live.covers`)
        self.whole = frozenset(
            a.id for a in audiences_ if a.ready and a.built_key == a.compiled.key
        )
        self.by_id = {a.id: a for a in audiences_}
        #: filled with the constants: their keys, and the audiences that are not constant
        self.constant_keys: dict[str, str] = {}
        self.variable: list[Live] = list(audiences_)

    def asking(self, profile: _Profile) -> Asking:
        """The question about ``profile`` now, shared by every audience asked about it."""
        return Asking(profile, self.now, self.t)

    def empty(self, live: Live) -> tuple[bool, int | None]:
        """The answer of an audience that reads no profile data for a profile with no event
        it reads: the same for every such profile, so computed once."""
        known = self._empty.get(live.id)
        if known is None:
            known = self.answer(live, live.compiled.new_state(), _NOBODY, "")
            self._empty[live.id] = known
        return known

    def constants(self) -> dict[str, bool]:
        """The audiences, built for every profile, that :meth:`empty` answers for good (no
        timer): audience id -> that answer for any profile with no event they read."""
        known = self._constants
        if known is None:
            known = {}
            for live in self.audiences:
                if live.compiled.reads_profile or not live.ready:
                    continue
                if live.built_key != live.compiled.key:
                    continue
                member, due = self.empty(live)
                if due is None:
                    known[live.id] = member
            self._constants = known
            self.constant_keys = {aid: self.keys[aid] for aid in known}
            self.variable = [a for a in self.audiences if a.id not in known]
        return known

    def answer(
        self, live: Live, state: State, profile: _Profile, pid: str, asking: Asking | None = None
    ) -> tuple[bool, int | None]:
        """(member now, next change in micros) for one profile (``asking``: the question about
        it, if already built)."""
        if asking is None:
            asking = self.asking(profile)
        _same, member, turn = live.compiled.step(state, (), asking)
        if member is None:  # past the state's cap: the whole history answers
            member = self._from_history(live, pid, profile)
        return member, turn

    def _from_history(self, live: Live, pid: str, profile: _Profile) -> bool:
        events = [
            MemoryEvent(name, ts, seq, props)
            for _pid, name, ts, seq, props in self.history([pid], live.compiled.names)
        ]
        data = ProfileData(profile.attributes, events, profile.consents)
        return live.memory.run(PreparedProfile(data, self.now))


_ORDER: Final = attrgetter("timestamp", "seq")


def _events_of(
    rows: Iterable[tuple[str, str, datetime, int, dict[str, Any]]],
) -> dict[str, list[MemoryEvent]]:
    by_profile: dict[str, list[MemoryEvent]] = defaultdict(list)
    for pid, name, ts, seq, props in rows:
        by_profile[pid].append(MemoryEvent(name, ts, seq, props))
    return by_profile


def _is_stored(entry: Any) -> bool:
    """Whether ``entry`` is in the form rows hold: ``[due, state as JSON text]``."""
    return type(entry) is list and len(entry) == 2 and isinstance(entry[1], str)


def _entry_state(entry: Any) -> Any:
    """The state in a kept entry: ``{"s": state, "d": due}`` as computed (and as rows written
    before 2026-12-02 hold them), or ``[due, state as JSON text]`` as rows hold them now, parsed
    only when asked for (a round reads a few of a profile's audiences); None if neither."""
    if type(entry) is dict:
        return entry.get("s")
    if _is_stored(entry):
        try:
            return orjson.loads(entry[1])
        except orjson.JSONDecodeError:
            return None
    return None


def _entry_due(entry: Any) -> int | None:
    """The timer (micros) of a kept entry (either form, see :func:`_entry_state`)."""
    if type(entry) is dict:
        due = entry.get("d")
    else:
        due = entry[0] if type(entry) is list and entry else None
    return due if type(due) is int else None


def _stored_entry(entry: Any) -> list[Any] | None:
    """A kept entry as a row holds it: ``[due, state as JSON text]`` (one kept as read is
    written back as it was, without parsing it); None for one of neither form (not written:
    unreadable, it reads as the empty state already)."""
    if type(entry) is list:
        return entry if _is_stored(entry) else None
    if type(entry) is dict and "s" in entry:
        return [_entry_due(entry), orjson.dumps(entry["s"]).decode()]
    return None


def _valid_state(live: Live, entry: Any) -> State | None:
    state = _entry_state(entry)
    return state if live.compiled.owns(state) else None  # else of an older definition


def _stamped(events: Iterable[MemoryEvent]) -> list[tuple[int, MemoryEvent]]:
    """Events in time order, each with its timestamp in microseconds."""
    return [(_micros(e.timestamp), e) for e in sorted(events, key=_ORDER)]


def _evaluate_profile(
    work: FoldWork,
    evaluator: _Evaluator,
    pid: str,
    profile: _Profile,
    stored: tuple[dict[str, Any], datetime | None] | None,
    *,
    events: list[MemoryEvent] | None = None,
    history: list[MemoryEvent] | None = None,
    replay: Collection[str] = (),
    recheck: bool = False,
) -> None:
    """Bring one profile's streaming states and answers up to date in ``work``.

    ``events``: new events, folded into the state of every audience that covers the profile
    and reads their names. ``replay``: audiences whose states are rebuilt from ``history``
    (the profile's whole history of their event names). An audience is evaluated when its
    state changed, when it reads the profile and the profile changed since its last evaluation
    (its ``updated_at``), when ``recheck`` asks, or when the profile was never seen (no row)."""
    before, seen = stored if stored is not None else ({}, None)
    ids = evaluator.ids
    entries: dict[str, Any] = (
        dict(before) if ids.issuperset(before) else {k: v for k, v in before.items() if k in ids}
    )
    recheck = recheck or stored is None
    profile_changed = recheck or seen != profile.updated_at
    changed = profile_changed or len(entries) != len(before)
    arrivals = Arrivals(_stamped(events)) if events else NO_ARRIVALS
    concerned: dict[str, Live] = {}
    for name in arrivals.groups:
        for live in evaluator.by_name.get(name, ()):
            concerned[live.id] = live
    chosen: Iterable[Live]
    answers, keys = work.answers, work.keys
    if recheck and not replay:
        # The audiences that answer the same for every profile without their events and
        # state are answered at once; the rest one by one.
        constants = evaluator.constants()
        answers.update({(aid, pid): member for aid, member in constants.items()})
        keys.update(evaluator.constant_keys)
        changed = True
        # those with events now or a state kept are answered again, one by one
        again = {aid: a for aid, a in concerned.items() if aid in constants}
        again.update((aid, evaluator.by_id[aid]) for aid in entries if aid in constants)
        chosen = [*evaluator.variable, *again.values()]
    elif recheck:
        chosen = evaluator.audiences
    elif replay or (profile_changed and evaluator.readers):
        picked = dict(concerned)
        if profile_changed:
            picked.update((a.id, a) for a in evaluator.readers)
        picked.update((a.id, a) for a in evaluator.audiences if a.id in replay)
        chosen = picked.values()
    else:
        chosen = concerned.values()
    past = _stamped(history) if replay and history else []
    asking = evaluator.asking(profile)
    whole = evaluator.whole
    for live in chosen:
        compiled = live.compiled
        aid = live.id
        if aid in replay:
            state, member, due = compiled.step(compiled.new_state(), past, asking)
        else:
            if aid not in whole and not live.covers(pid):
                continue
            mine = aid in concerned
            entry = entries.get(aid)
            if entry is None and not mine and not compiled.reads_profile:
                member_, due_ = evaluator.empty(live)
                if due_ is None:  # nothing to keep, and the answer is known
                    answers[(aid, pid)] = member_
                    keys[aid] = compiled.key
                    changed = True
                    continue
            old = None if entry is None else _entry_state(entry)
            base = old if old is not None and compiled.owns(old) else compiled.new_state()
            state, member, due = compiled.advance(base, arrivals if mine else NO_ARRIVALS, asking)
        if member is None:  # past the state's cap: the whole history answers
            member = evaluator._from_history(live, pid, profile)
        answers[(aid, pid)] = member
        keys[aid] = compiled.key
        changed = True
        if state["w"] is None and due is None:
            entries.pop(aid, None)  # nothing to keep: the empty state answers the same
        else:
            entries[aid] = {"s": state, "d": due}
    if changed:
        work.rows[pid] = (entries, profile.updated_at)


# -- writing -----------------------------------------------------------------------------------


def _upsert(conn: Connection) -> Any:
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert


def _write(conn: Connection, work: FoldWork, *, now: datetime) -> tuple[int, int]:
    """Write ``work`` in the caller's transaction: state rows of profiles that still exist,
    membership changes against the membership as it is now; returns (realized, exited)."""
    ws = work.workspace_id
    in_force = {
        aid: key
        for aid, key in conn.execute(
            select(audiences.c.id, audiences.c.stream_key).where(
                audiences.c.workspace_id == ws, audiences.c.mode == "streaming"
            )
        )
    }
    stale = {aid for aid, key in work.keys.items() if in_force.get(aid) != key}
    if stale:  # deleted or redefined between computing and writing: their answers are void
        work.answers = {k: v for k, v in work.answers.items() if k[0] not in stale}
        work.rows = {
            pid: ({a: e for a, e in entries.items() if a not in stale}, seen)
            for pid, (entries, seen) in work.rows.items()
        }
    ids = sorted({*work.rows, *(p for _a, p in work.answers)})
    alive: set[str] = set()
    for part in _chunks(ids):
        alive.update(
            conn.execute(
                select(profiles.c.id).where(
                    profiles.c.workspace_id == ws, profiles.c.id.in_(list(part))
                )
            ).scalars()
        )
    gone = [p for p in ids if p not in alive]
    for part in _chunks(gone):
        conn.execute(
            delete(stream_states).where(
                stream_states.c.workspace_id == ws, stream_states.c.profile_id.in_(list(part))
            )
        )
    upsert = _upsert(conn)(stream_states)
    values = []
    for pid, (entries, seen) in work.rows.items():
        if pid not in alive:
            continue
        kept = {}
        for aid, entry in entries.items():
            stored = _stored_entry(entry)
            if stored is not None:
                kept[aid] = stored
        dues = [e[0] for e in kept.values() if type(e[0]) is int]
        values.append(
            {
                "workspace_id": ws,
                "profile_id": pid,
                "states": orjson.dumps(kept).decode(),
                "due": _moment(min(dues)) if dues else None,
                "seen": seen,
                "updated_at": now,
            }
        )
    if values:  # one statement, executed for many rows (compiled once)
        conn.execute(
            upsert.on_conflict_do_update(
                index_elements=["workspace_id", "profile_id"],
                set_={
                    "states": upsert.excluded.states,
                    "due": upsert.excluded.due,
                    "seen": upsert.excluded.seen,
                    "updated_at": upsert.excluded.updated_at,
                },
            ),
            values,
        )
    realized = exited = 0
    answers = {k: v for k, v in work.answers.items() if k[1] in alive}
    if answers:
        current: set[tuple[str, str]] = set()  # realized now (exited rows need no reading)
        answered = sorted({p for _a, p in answers})
        for part in _chunks(answered):
            found = conn.execute(
                select(audience_members.c.audience_id, audience_members.c.profile_id).where(
                    audience_members.c.workspace_id == ws,
                    audience_members.c.profile_id.in_(list(part)),
                    audience_members.c.status == "realized",
                )
            ).all()
            current.update((aid, pid) for aid, pid in found)
        entering = []
        leaving: dict[str, list[str]] = defaultdict(list)
        changes = []
        # only the answers that differ from the membership, in a stable order
        flips = sorted(key for key, member in answers.items() if bool(member) != (key in current))
        for aid, pid in flips:
            if (aid, pid) not in current:
                entering.append(
                    {
                        "workspace_id": ws,
                        "audience_id": aid,
                        "profile_id": pid,
                        "status": "realized",
                        "realized_at": now,
                        "exited_at": None,
                    }
                )
                changes.append((aid, pid, "realized"))
            else:
                leaving[aid].append(pid)
                changes.append((aid, pid, "exited"))
        ins = _upsert(conn)(audience_members)
        if entering:
            conn.execute(
                ins.on_conflict_do_update(
                    index_elements=["workspace_id", "audience_id", "profile_id"],
                    set_={
                        "status": "realized",
                        "realized_at": ins.excluded.realized_at,
                        "exited_at": None,
                    },
                ),
                entering,
            )
        if leaving:
            conn.execute(
                update(audience_members)
                .where(
                    audience_members.c.workspace_id == bindparam("b_ws"),
                    audience_members.c.audience_id == bindparam("b_aid"),
                    audience_members.c.profile_id == bindparam("b_pid"),
                )
                .values(status="exited", exited_at=now),
                [
                    {"b_ws": ws, "b_aid": aid, "b_pid": pid}
                    for aid, pids in leaving.items()
                    for pid in pids
                ],
            )
        if changes:
            conn.execute(
                insert(audience_changes),
                [
                    {
                        "workspace_id": ws,
                        "audience_id": aid,
                        "profile_id": pid,
                        "change": change,
                        "at": now,
                        "run_id": None,
                    }
                    for aid, pid, change in changes
                ],
            )
        realized = len(entering)
        exited = sum(len(p) for p in leaving.values())
    return realized, exited


def _lock(conn: Connection) -> None:
    streaming_lock(conn)


# -- folding moved events ----------------------------------------------------------------------


class Folder:
    """The mover's partner: folds each moved batch into the streaming states.

    ``prepare`` computes (it only reads, through ``conn``), ``commit`` writes in the
    transaction that removes the events from the inbox. On PostgreSQL both run in that one
    transaction (the moved rows are only visible inside it)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def history_reader(self, conn: Connection, ready: Callable[[], object] | None = None) -> Any:
        """Per workspace, a reader of profiles' histories from the log (``ready``: called
        before each read, returns once the log holds the batch being folded)."""
        events: EventLog = self.hub.events

        def read(ws: str) -> Any:
            def rows(ids: Sequence[str], names: Iterable[str]) -> list[Any]:
                if ready is not None:
                    ready()
                if events.dialect == "postgres" and self.hub.settings.shared_event_log:
                    return pg_histories(conn, ws, ids, names)
                return events.histories(ws, ids, names)

            return rows

        return read

    def prepare(
        self,
        conn: Connection,
        moved: Sequence[Moved],
        *,
        log_ready: Callable[[], object] | None = None,
    ) -> list[FoldWork]:
        """The states and answers after ``moved``, per workspace (nothing is written). On
        PostgreSQL ``conn`` is the moving transaction, which takes the streaming lock here so
        that the states it reads stay as read until it commits. ``log_ready``: when the
        batch is not in the log yet, puts it there (called before a history read)."""
        _lock(conn)
        now = self.hub.clock.now()
        by_ws: dict[str, dict[str, list[MemoryEvent]]] = defaultdict(lambda: defaultdict(list))
        for m in moved:
            by_ws[m.workspace_id][m.profile_id].append(
                MemoryEvent(m.name, m.timestamp, m.seq, m.properties)
            )
        reader = self.history_reader(conn, log_ready)
        out = []
        for ws, events in by_ws.items():
            lives = live_audiences(conn, ws)
            if not lives:
                continue
            ids = sorted(events)
            work = FoldWork(ws)
            try:
                evaluator = _Evaluator(lives, now=now, history=reader(ws))
                stored = _load_rows(conn, ws, ids)
                people = _load_profiles(conn, ws, ids)
                for pid in ids:  # the mover holds the collector off (see gcpause)
                    profile = people.get(pid)
                    if profile is None:  # deleted or merged away meanwhile
                        continue
                    _evaluate_profile(
                        work, evaluator, pid, profile, stored.get(pid), events=events[pid]
                    )
            except Exception:  # never hold up the move: build this workspace again instead
                log.exception("streaming fold failed", extra={"workspace": ws})
                work = FoldWork(ws, failed=True)
            out.append(work)
        return out

    def commit(self, conn: Connection, works: Sequence[FoldWork]) -> None:
        """Write what :meth:`prepare` computed, in the caller's transaction."""
        if not works:
            return
        _lock(conn)
        now = self.hub.clock.now()
        for work in works:
            if work.failed:
                invalidate(conn, work.workspace_id)
                continue
            realized, exited = _write(conn, work, now=now)
            if realized or exited:
                log.debug(
                    "streaming memberships",
                    extra={"workspace": work.workspace_id, "realized": realized, "exited": exited},
                )


# -- maintenance: timers, rechecks, builds -----------------------------------------------------


def _timers(hub: Hub, folder: Folder, now: datetime, chunk: int) -> int:
    """Evaluate up to ``chunk`` profiles whose timer is due, earliest first; returns how
    many."""
    with hub.engine.connect() as conn:
        due = conn.execute(
            select(stream_states.c.workspace_id, stream_states.c.profile_id)
            .where(stream_states.c.due <= now)
            .order_by(stream_states.c.due)
            .limit(chunk)
        ).all()
    if not due:
        return 0
    by_ws: dict[str, list[str]] = defaultdict(list)
    for ws, pid in due:
        by_ws[ws].append(pid)
    with hub.tx() as conn:
        _lock(conn)
        reader = folder.history_reader(conn)
        for ws, ids in by_ws.items():
            ids.sort()
            lives = live_audiences(conn, ws)
            work = FoldWork(ws)
            evaluator = _Evaluator(lives, now=now, history=reader(ws))
            stored = _load_rows(conn, ws, ids)
            people = _load_profiles(conn, ws, ids)
            micros = _micros(now)
            for pid in ids:
                profile = people.get(pid)
                row = stored.get(pid)
                if profile is None or row is None:
                    work.rows[pid] = ({}, None)
                    continue
                kept = dict(row[0])
                asking = evaluator.asking(profile)
                for live in lives:
                    entry = kept.get(live.id)
                    timer = None if entry is None else _entry_due(entry)
                    if timer is None or timer > micros:
                        continue
                    state = _valid_state(live, entry)
                    if state is None or not live.covers(pid):
                        kept.pop(live.id, None)
                        continue
                    member, turn = evaluator.answer(live, state, profile, pid, asking)
                    work.answer(live, pid, member)
                    kept[live.id] = {"s": state, "d": turn}
                live_ids = {a.id for a in lives}
                work.rows[pid] = ({k: v for k, v in kept.items() if k in live_ids}, row[1])
            _write(conn, work, now=now)
    return len(due)


def _rechecks(hub: Hub, folder: Folder, now: datetime, upto: int, chunk: int) -> int:
    """Evaluate up to ``chunk`` of the profiles queued in ``stream_recheck`` (up to
    ``seq <= upto``)."""
    with hub.engine.connect() as conn:
        queued = conn.execute(
            select(
                stream_recheck.c.seq,
                stream_recheck.c.workspace_id,
                stream_recheck.c.profile_id,
                stream_recheck.c.replay,
            )
            .where(stream_recheck.c.seq <= upto)
            .order_by(stream_recheck.c.seq)
            .limit(chunk)
        ).all()
    if not queued:
        return 0
    by_ws: dict[str, dict[str, bool]] = defaultdict(dict)
    for _seq, ws, pid, replay in queued:
        by_ws[ws][pid] = by_ws[ws].get(pid, False) or bool(replay)
    with hub.tx() as conn:
        _lock(conn)
        reader = folder.history_reader(conn)
        for ws, wanted in by_ws.items():
            lives = live_audiences(conn, ws)
            if lives:
                _rebuild_profiles(conn, ws, lives, sorted(wanted), reader(ws), now, replay=wanted)
        # only those read: on PostgreSQL a lower seq may commit after a higher one
        conn.execute(delete(stream_recheck).where(stream_recheck.c.seq.in_([q[0] for q in queued])))
    return len(queued)


def _rebuild_profiles(
    conn: Connection,
    ws: str,
    lives: list[Live],
    ids: list[str],
    history: Any,
    now: datetime,
    *,
    replay: Mapping[str, bool] | None = None,
    build: Collection[str] = (),
) -> None:
    """Evaluate ``ids`` again and write the result: audiences in ``build`` are replayed from
    each profile's history; a profile with ``replay[pid]`` has every audience that covers it
    replayed; the others are re-evaluated from their states."""
    work = FoldWork(ws)
    evaluator = _Evaluator(lives, now=now, history=history)
    stored = _load_rows(conn, ws, ids)
    people = _load_profiles(conn, ws, ids)
    replay = replay or {}
    readers = [p for p in ids if build or replay.get(p)]
    names: set[str] = set()
    for live in lives:
        names |= live.compiled.names
    past = _events_of(history(readers, names)) if readers else {}
    with collector_paused():  # states make no cycles (see gcpause)
        for pid in ids:
            profile = people.get(pid)
            if profile is None:
                continue
            if replay.get(pid):
                again = {a.id for a in lives if a.covers(pid) or a.id in build}
            else:
                again = set(build)
            _evaluate_profile(
                work,
                evaluator,
                pid,
                profile,
                stored.get(pid),
                history=past.get(pid, []),
                replay=again,
                recheck=not build or bool(replay.get(pid)),
            )
    _write(conn, work, now=now)


def _builds(hub: Hub, folder: Folder, now: datetime) -> int:
    """Advance the build of streaming audiences that are not ready by one chunk of profiles;
    returns how many profiles were built."""
    with hub.engine.connect() as conn:
        workspaces = list(
            conn.execute(
                select(audiences.c.workspace_id)
                .where(audiences.c.mode == "streaming", audiences.c.stream_ready.is_(False))
                .distinct()
            ).scalars()
        )
        ready_but_stale = list(
            conn.execute(
                select(audiences.c.workspace_id)
                .where(audiences.c.mode == "streaming", audiences.c.stream_ready.is_(True))
                .distinct()
            ).scalars()
        )
    done = 0
    for ws in sorted({*workspaces, *ready_but_stale}):
        with hub.engine.connect() as conn:  # most rounds: nothing to build, no write lock
            if all(a.ready for a in live_audiences(conn, ws)):
                continue
        with hub.tx() as conn:
            _lock(conn)
            lives = live_audiences(conn, ws)
            pending = [a for a in lives if not (a.ready and a.built_key == a.compiled.key)]
            if not pending:
                continue
            # restart those whose definition changed, up to the newest profile now (those
            # created later are kept up to date from their first event); build the
            # furthest-behind group first
            restarted = [a for a in pending if a.built_key != a.compiled.key]
            if restarted:
                newest = conn.execute(
                    select(func.max(profiles.c.id)).where(profiles.c.workspace_id == ws)
                ).scalar()
                # a file import running creates profiles whose events go to the log, not
                # through the inbox: the build must reach them (its end builds again)
                importing = conn.execute(
                    select(imports.c.id)
                    .where(imports.c.workspace_id == ws, imports.c.status == "running")
                    .limit(1)
                ).first()
                # "" with no profile yet: every profile is newer
                frontier_now = None if importing is not None else newest or ""
                for a in restarted:
                    conn.execute(
                        update(audiences)
                        .where(audiences.c.id == a.id)
                        .values(
                            stream_key=a.compiled.key,
                            stream_through=None,
                            stream_ready=False,
                            stream_frontier=frontier_now,
                        )
                    )
            lives = live_audiences(conn, ws)
            pending = [a for a in lives if not a.ready]
            if not pending:
                continue

            def place(a: Live) -> tuple[str, str]:  # "~": no frontier (after every id)
                return a.through or "", "~" if a.frontier is None else a.frontier

            through, frontier = min(place(a) for a in pending)
            group = [a for a in pending if place(a) == (through, frontier)]
            query = select(profiles.c.id).where(
                profiles.c.workspace_id == ws, profiles.c.id > through
            )
            if frontier != "~":  # (a frontier of a build begun before frontiers: none)
                query = query.where(profiles.c.id <= frontier)
            ids = list(conn.execute(query.order_by(profiles.c.id).limit(CHUNK)).scalars())
            reader = folder.history_reader(conn)
            if ids:
                built = {a.id for a in group}
                _rebuild_profiles(conn, ws, lives, ids, reader(ws), now, build=built)
            finished = len(ids) < CHUNK
            for a in group:
                conn.execute(
                    update(audiences)
                    .where(audiences.c.id == a.id)
                    .values(
                        stream_key=a.compiled.key,
                        stream_through=None if finished else ids[-1],
                        stream_ready=finished,
                    )
                )
            done += len(ids)
    return done


def recheck_mark(hub: Hub) -> int:
    """The newest entry of the recheck queue: read it *before* a move, so that the merges
    behind the entries up to it are applied to the log by that move."""
    with hub.engine.connect() as conn:
        return int(conn.execute(select(func.max(stream_recheck.c.seq))).scalar() or 0)


def maintain(
    hub: Hub, *, recheck_upto: int, folder: Folder | None = None, chunk: int | None = None
) -> dict[str, int]:
    """One round of streaming upkeep, right after a move, under ``hub.mover_lock``: up to
    ``chunk`` profiles (default :data:`CHUNK`) of the rechecks queued up to ``recheck_upto``
    (:func:`recheck_mark`, read before the move), as many of the due timers, and one chunk of
    :data:`CHUNK` profiles of each pending build. Events that arrive meanwhile wait for the
    round: ``serve`` keeps its timer and recheck steps short (:data:`SERVE_CHUNK`) and runs
    rounds back to back while work is left. A build's chunks stay large: profiles beyond a
    build's progress (new ones among them) are not kept up to date until it reaches them."""
    folder = folder or Folder(hub)
    now = hub.clock.now()
    size = CHUNK if chunk is None else chunk
    return {
        "rechecked": _rechecks(hub, folder, now, recheck_upto, size),
        "timers": _timers(hub, folder, now, size),
        "built": _builds(hub, folder, now),
    }
