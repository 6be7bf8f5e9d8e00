"""Resolving identities and writing profiles, one micro-batch per transaction.

A :class:`ProfileWriter` loads the identities and profiles a batch touches in a few queries,
runs the pure graph functions (:mod:`waymark.identity.graph`) in memory, and writes the result
in :meth:`ProfileWriter.flush`: profiles, identity links, consents, merges (absorbed profiles
deleted, their links, consents and waiting events re-pointed, and a ``profile_merges`` row so
the event log re-points too). The caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from waymark.core.ids import new_id
from waymark.identity.graph import (
    AttributeValue,
    IdentityConflict,
    LinkedIdentity,
    MergePolicy,
    ProfileState,
    apply_record,
    fresh_profile,
    merge_profiles,
    new_profile,
    resolve,
    visible_attributes,
    widen_seen,
)
from waymark.model.events import ConsentStatus, ConsentUpdate, Identity
from waymark.storage import hotpath
from waymark.storage.database import streaming_lock
from waymark.storage.eventlog import events_table
from waymark.storage.tables import (
    FOLLOW_MERGE_TABLES,
    audience_changes,
    audience_members,
    consents,
    event_inbox,
    identities,
    profile_merges,
    profiles,
    stream_recheck,
    stream_states,
)

_CHUNK = 400  # bound on bind parameters per IN list


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def state_from_row(row: Mapping[Any, Any], links: Iterable[LinkedIdentity]) -> ProfileState:
    """Rebuild a :class:`ProfileState` from a ``profiles`` row and its identity links."""
    attrs: dict[str, Any] = row["attributes"] or {}
    meta: dict[str, Any] = row["attribute_meta"] or {}
    values = {
        key: AttributeValue(attrs.get(key), datetime.fromisoformat(m[0]), m[1])
        for key, m in meta.items()
    }
    return ProfileState(row["id"], tuple(links), values, row["first_seen"], row["last_seen"])


def _row_json(state: ProfileState) -> tuple[str, str]:
    """The profile row's JSON columns as text: visible attributes, and per attribute the
    ``[updated_at, source]`` the merge policy needs."""
    attributes = orjson.dumps(visible_attributes(state), option=orjson.OPT_NON_STR_KEYS)
    meta = {k: [v.updated_at.isoformat(), v.source] for k, v in sorted(state.attributes.items())}
    return attributes.decode(), orjson.dumps(meta).decode()


@dataclass
class WriteStats:
    """What one batch did to profiles."""

    created: int = 0
    merged: int = 0
    conflicts: list[IdentityConflict] = field(default_factory=list)
    #: for each conflict, the ``tag`` of the record that met it (e.g. its index in a batch)
    conflict_tags: list[int | None] = field(default_factory=list)


class ProfileWriter:
    """Profile and identity changes of one batch, applied in memory then flushed at once."""

    def __init__(
        self,
        conn: Connection,
        *,
        workspace_id: str,
        policy: MergePolicy,
        now: datetime,
        shared_event_log: bool = False,
    ) -> None:
        self.conn = conn
        self.shared_event_log = shared_event_log
        self.workspace_id = workspace_id
        self.policy = policy
        self.now = now
        self.owners: dict[Identity, str | None] = {}
        self.states: dict[str, ProfileState] = {}
        self.stored: set[str] = set()  # profile ids that exist in the database
        self.loaded: dict[str, ProfileState] = {}  # as last read from or written to the database
        self.loaded_links: dict[Identity, tuple[str, datetime]] = {}
        self.dirty: set[str] = set()
        self.absorbed: dict[str, str] = {}
        self.unlinked: set[Identity] = set()
        self.consent_updates: dict[tuple[str, str, str], ConsentUpdate] = {}
        # profiles seen again with nothing new but a time: (earliest, latest), written by one
        # UPDATE without loading the profile
        self.touches: dict[str, tuple[datetime, datetime]] = {}
        # when each known identity was first seen; an older record cannot be a mere touch
        self.link_first: dict[Identity, datetime] = {}
        self.stats = WriteStats()
        if conn.dialect.name == "postgresql":
            # identity writes of one workspace are serialized, as SQLite serializes all
            # writers: two transactions must not both create, or merge, the same person
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (workspace_id,))

    # -- loading -------------------------------------------------------------------------------

    def preload(self, wanted: Iterable[Identity]) -> None:
        """Find, in a few queries, which profiles own the ``wanted`` identities. Profiles are
        loaded later, only when a record needs more than a touch of ``last_seen``."""
        missing = sorted({i for i in wanted if i not in self.owners})
        if not missing:
            return
        found: dict[Identity, str] = {}
        by_namespace: dict[str, list[str]] = {}
        for identity in missing:
            by_namespace.setdefault(identity.namespace, []).append(identity.value)
        # one IN list per namespace: SQLite uses the primary key for it (not for row values)
        for namespace, values in by_namespace.items():
            for value, pid, first in hotpath.find_owners(
                self.conn, self.workspace_id, namespace, values
            ):
                found[Identity(namespace, value)] = pid
                self.link_first[Identity(namespace, value)] = first
        for identity in missing:
            self.owners[identity] = found.get(identity)

    def load_profiles(self, ids: Iterable[str]) -> None:
        """Load profiles by id (with all their links) into the batch."""
        states = self.states
        todo = sorted({i for i in ids if i not in states})
        for chunk in _chunks(todo):
            links: dict[str, list[LinkedIdentity]] = {p: [] for p in chunk}
            for r in self.conn.execute(
                select(identities).where(
                    identities.c.workspace_id == self.workspace_id,
                    identities.c.profile_id.in_(chunk),
                )
            ).mappings():
                identity = Identity(r["namespace"], r["value"])
                links[r["profile_id"]].append(LinkedIdentity(identity, r["first_seen"]))
                self.loaded_links[identity] = (r["profile_id"], r["first_seen"])
                self.link_first[identity] = r["first_seen"]
                self.owners.setdefault(identity, r["profile_id"])
            for row in self.conn.execute(
                select(profiles).where(
                    profiles.c.workspace_id == self.workspace_id, profiles.c.id.in_(chunk)
                )
            ).mappings():
                state = state_from_row(row, links[row["id"]])
                self.loaded[row["id"]] = state
                self.stored.add(row["id"])
                touch = self.touches.pop(row["id"], None)
                if touch is not None:
                    state = widen_seen(state, *touch)
                    self.dirty.add(row["id"])
                self.states[row["id"]] = state

    # -- changes -------------------------------------------------------------------------------

    def canonical(self, profile_id: str) -> str:
        """The id a profile has now, following merges made in this batch."""
        while profile_id in self.absorbed:
            profile_id = self.absorbed[profile_id]
        return profile_id

    def record(
        self,
        ids: Sequence[Identity],
        attributes: Mapping[str, Any],
        *,
        at: datetime,
        source: str,
        tag: int | None = None,
    ) -> str:
        """Apply one record (identities + attributes at ``at``); return its profile's id.

        ``ids`` must not be empty. Profiles linked by the record are merged by the policy;
        identities refused by a unique-namespace conflict are reported in ``stats.conflicts``.
        """
        if not ids:
            raise ValueError("a record needs at least one identity")
        if any(i not in self.owners for i in ids):
            self.preload(ids)
        owner_ids = {self.owners.get(i) for i in ids}
        if not attributes and len(owner_ids) == 1:
            only = next(iter(owner_ids))
            link_first = self.link_first
            if only is not None and all(i in link_first and link_first[i] <= at for i in ids):
                # every identity already on one profile, none seen for the first time now:
                # only the profile's seen-interval can change
                return self._touch(self.canonical(only), at)
        if not attributes and owner_ids == {None}:
            # only new identities: a new profile, without the full rules when they allow
            fresh = fresh_profile(new_id(), ids, at, self.policy)
            if fresh is not None:
                self.stats.created += 1
                return self._place(fresh)
        self.load_profiles({o for o in owner_ids if o is not None})
        owners = {
            i: self.states[owner] for i in set(ids) if (owner := self.owners.get(i)) is not None
        }
        res = resolve(ids, owners, self.policy)
        self.stats.conflicts.extend(res.conflicts)
        self.stats.conflict_tags.extend([tag] * len(res.conflicts))
        if res.profiles:
            outcome = merge_profiles(res.profiles, self.policy)
            for absorbed in outcome.absorbed_ids:
                self.absorbed[absorbed] = outcome.survivor_id
                self.states.pop(absorbed, None)
                self.dirty.discard(absorbed)
                self.stats.merged += 1
            base = outcome.state
            for li in outcome.dropped:
                self._unlink(li.identity)
        else:
            base = new_profile(new_id(), at)
            self.stats.created += 1
        state = apply_record(base, res.attach, attributes, at=at, source=source, policy=self.policy)
        kept = {li.identity for li in state.identities}
        for li in base.identities:
            if li.identity not in kept:
                self._unlink(li.identity)
        return self._place(state)

    def _place(self, state: ProfileState) -> str:
        """Make ``state`` the batch's current version of its profile, owning its identities."""
        pid = state.profile_id
        for li in state.identities:
            self.owners[li.identity] = pid
            self.unlinked.discard(li.identity)
            self.link_first[li.identity] = li.first_seen
        self.states[pid] = state
        self.dirty.add(pid)
        return pid

    def _touch(self, pid: str, at: datetime) -> str:
        state = self.states.get(pid)
        if state is not None:
            if at > state.last_seen or at < state.first_seen:
                self.states[pid] = widen_seen(state, at, at)
                self.dirty.add(pid)
            return pid
        known = self.touches.get(pid)
        self.touches[pid] = (min(known[0], at), max(known[1], at)) if known else (at, at)
        return pid

    def _unlink(self, identity: Identity) -> None:
        self.owners[identity] = None
        self.unlinked.add(identity)

    def find(self, identity: Identity) -> str | None:
        """The profile holding ``identity`` now, or ``None``."""
        self.preload([identity])
        owner = self.owners.get(identity)
        return self.canonical(owner) if owner else None

    def set_consent(self, profile_id: str, update_: ConsentUpdate) -> None:
        """Record a consent statement; the latest ``timestamp`` per channel and purpose wins."""
        key = (profile_id, update_.channel, update_.purpose)
        known = self.consent_updates.get(key)
        if known is None or (known.timestamp, known.status) <= (update_.timestamp, update_.status):
            self.consent_updates[key] = update_

    # -- writing -------------------------------------------------------------------------------

    def flush(self) -> WriteStats:
        """Write every change of the batch (in the caller's transaction)."""
        conn, ws = self.conn, self.workspace_id
        absorbed_stored = {a: self.canonical(a) for a in self.absorbed if a in self.stored}
        # profiles: one executemany for the changed, one for the new
        changed: list[tuple[Any, ...]] = []
        created: list[tuple[Any, ...]] = []
        for pid in sorted(self.dirty):
            state = self.states[pid]
            if self.loaded.get(pid) == state:
                continue
            attrs, meta = _row_json(state)
            if pid in self.stored:
                changed.append((ws, pid, attrs, meta, state.first_seen, state.last_seen))
            else:
                created.append((pid, ws, attrs, meta, state.first_seen, state.last_seen, self.now))
        hotpath.update_profiles(conn, changed, self.now)
        hotpath.insert_profiles(conn, created)
        self.stored.update(r[0] for r in created)
        hotpath.touch_profiles(
            conn, ws, [(p, f, la) for p, (f, la) in sorted(self.touches.items())]
        )
        self.touches.clear()
        # identity links: delete the removed, upsert the new or moved
        gone = sorted(i for i in self.unlinked if self.owners.get(i) is None)
        for identity in gone:
            self.loaded_links.pop(identity, None)
        if gone:
            conn.execute(
                delete(identities).where(
                    identities.c.workspace_id == bindparam("b_ws"),
                    identities.c.namespace == bindparam("b_ns"),
                    identities.c.value == bindparam("b_value"),
                ),
                [{"b_ws": ws, "b_ns": i.namespace, "b_value": i.value} for i in gone],
            )
        links = [
            (ws, li.identity.namespace, li.identity.value, pid, li.first_seen)
            for pid in sorted(self.dirty)
            for li in self.states[pid].identities
            if self.loaded_links.get(li.identity) != (pid, li.first_seen)
        ]
        hotpath.upsert_links(conn, links)
        for _ws, namespace, value, pid, first_seen in links:
            self.loaded_links[Identity(namespace, value)] = (pid, first_seen)
        for pid in self.dirty:
            self.loaded[pid] = self.states[pid]
        # merges of stored profiles: consents, waiting events, the log, then the rows
        if absorbed_stored:
            streaming_lock(conn)  # before rows a streaming fold writes (see streaming_lock)
        for absorbed, survivor in sorted(absorbed_stored.items()):
            self._move_consents(absorbed, survivor)
            self._move_memberships(absorbed, survivor)
            # streaming states: the absorbed profile's go; the survivor's are rebuilt from the
            # merged history once the log holds it (waymark.segmentation.live)
            conn.execute(
                delete(stream_states).where(
                    stream_states.c.workspace_id == ws, stream_states.c.profile_id == absorbed
                )
            )
            conn.execute(
                insert(stream_recheck).values(workspace_id=ws, profile_id=survivor, replay=True)
            )
            conn.execute(
                update(event_inbox)
                .where(event_inbox.c.workspace_id == ws, event_inbox.c.profile_id == absorbed)
                .values(profile_id=survivor)
            )
            for table in FOLLOW_MERGE_TABLES:
                conn.execute(
                    update(table)
                    .where(table.c.workspace_id == ws, table.c.profile_id == absorbed)
                    .values(profile_id=survivor)
                )
            if self.shared_event_log:
                conn.execute(
                    update(events_table)
                    .where(events_table.c.workspace_id == ws, events_table.c.profile_id == absorbed)
                    .values(profile_id=survivor)
                )
            conn.execute(
                insert(profile_merges).values(
                    workspace_id=ws, absorbed_id=absorbed, survivor_id=survivor, at=self.now
                )
            )
            conn.execute(
                delete(profiles).where(profiles.c.workspace_id == ws, profiles.c.id == absorbed)
            )
        # consent statements
        merged_updates: dict[tuple[str, str, str], ConsentUpdate] = {}
        for (pid, channel, purpose), cu in self.consent_updates.items():
            key = (self.canonical(pid), channel, purpose)
            known = merged_updates.get(key)
            if known is None or (known.timestamp, known.status) <= (cu.timestamp, cu.status):
                merged_updates[key] = cu
        for (pid, channel, purpose), cu in sorted(merged_updates.items()):
            self._write_consent(pid, channel, purpose, cu.status, cu.timestamp, cu.source)
        self.dirty.clear()
        self.unlinked.clear()
        self.consent_updates.clear()
        for absorbed in absorbed_stored:
            self.stored.discard(absorbed)
        return self.stats

    def _move_memberships(self, absorbed: str, survivor: str) -> None:
        """Audience memberships follow the survivor, told as changes (history is never
        rewritten: a consumer that read "absorbed realized" reads "absorbed exited"). The
        survivor enters what the absorbed profile was in, unless it already is in; the next
        evaluation of the merged profile decides whether it stays."""
        ws, members = self.workspace_id, audience_members
        rows = self.conn.execute(
            select(members.c.audience_id, members.c.status).where(
                members.c.workspace_id == ws, members.c.profile_id == absorbed
            )
        ).all()
        if not rows:
            return
        held = set(
            self.conn.execute(
                select(members.c.audience_id).where(
                    members.c.workspace_id == ws,
                    members.c.profile_id == survivor,
                    members.c.status == "realized",
                )
            ).scalars()
        )
        changes: list[dict[str, Any]] = []
        for audience_id, status in rows:
            if status != "realized":
                continue
            changes.append({"audience_id": audience_id, "profile_id": absorbed, "change": "exited"})
            if audience_id in held:
                continue
            self.conn.execute(
                delete(members).where(
                    members.c.workspace_id == ws,
                    members.c.audience_id == audience_id,
                    members.c.profile_id == survivor,
                )
            )
            self.conn.execute(
                insert(members).values(
                    workspace_id=ws,
                    audience_id=audience_id,
                    profile_id=survivor,
                    status="realized",
                    realized_at=self.now,
                    exited_at=None,
                )
            )
            changes.append(
                {"audience_id": audience_id, "profile_id": survivor, "change": "realized"}
            )
        self.conn.execute(
            delete(members).where(members.c.workspace_id == ws, members.c.profile_id == absorbed)
        )
        if changes:
            self.conn.execute(
                insert(audience_changes),
                [{"workspace_id": ws, "at": self.now, "run_id": None, **c} for c in changes],
            )

    def _move_consents(self, absorbed: str, survivor: str) -> None:
        rows = self.conn.execute(
            select(consents).where(
                consents.c.workspace_id == self.workspace_id, consents.c.profile_id == absorbed
            )
        ).mappings()
        moved = list(rows)
        self.conn.execute(
            delete(consents).where(
                consents.c.workspace_id == self.workspace_id, consents.c.profile_id == absorbed
            )
        )
        for r in moved:
            self._write_consent(
                survivor, r["channel"], r["purpose"], r["status"], r["updated_at"], r["source"]
            )

    def _write_consent(
        self, pid: str, channel: str, purpose: str, status: str, at: datetime, source: str
    ) -> None:
        values = {
            "workspace_id": self.workspace_id,
            "profile_id": pid,
            "channel": channel,
            "purpose": purpose,
            "status": ConsentStatus(status).value,
            "updated_at": at,
            "source": source,
        }
        ins = (postgresql if self.conn.dialect.name == "postgresql" else sqlite).insert(consents)
        stmt = ins.values(**values).on_conflict_do_update(
            index_elements=["workspace_id", "profile_id", "channel", "purpose"],
            set_={c: ins.excluded[c] for c in ("status", "updated_at", "source")},
            where=consents.c.updated_at <= ins.excluded.updated_at,
        )
        self.conn.execute(stmt)
