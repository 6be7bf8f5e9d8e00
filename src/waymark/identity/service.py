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

from sqlalchemy import Connection, delete, insert, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from waymark.core.ids import new_id
from waymark.identity.graph import (
    AttributeValue,
    IdentityConflict,
    LinkedIdentity,
    MergePolicy,
    ProfileState,
    apply_record,
    merge_profiles,
    new_profile,
    resolve,
    visible_attributes,
)
from waymark.model.events import ConsentStatus, ConsentUpdate, Identity
from waymark.model.json import to_jsonable
from waymark.storage.eventlog import events_table
from waymark.storage.tables import consents, event_inbox, identities, profile_merges, profiles
from waymark.storage.upsert import upsert

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


def _row_values(state: ProfileState) -> dict[str, Any]:
    return {
        "attributes": to_jsonable(visible_attributes(state)),
        "attribute_meta": {
            k: [v.updated_at.isoformat(), v.source] for k, v in sorted(state.attributes.items())
        },
        "first_seen": state.first_seen,
        "last_seen": state.last_seen,
    }


@dataclass
class WriteStats:
    """What one batch did to profiles."""

    created: int = 0
    merged: int = 0
    conflicts: list[IdentityConflict] = field(default_factory=list)


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
        self.dirty: set[str] = set()
        self.absorbed: dict[str, str] = {}
        self.unlinked: set[Identity] = set()
        self.consent_updates: dict[tuple[str, str, str], ConsentUpdate] = {}
        self.stats = WriteStats()

    # -- loading -------------------------------------------------------------------------------

    def preload(self, wanted: Iterable[Identity]) -> None:
        """Load, in a few queries, the owners of ``wanted`` identities and their profiles."""
        missing = sorted({i for i in wanted if i not in self.owners})
        if not missing:
            return
        found: dict[Identity, str] = {}
        for chunk in _chunks(missing):
            rows = self.conn.execute(
                select(identities.c.namespace, identities.c.value, identities.c.profile_id).where(
                    identities.c.workspace_id == self.workspace_id,
                    tuple_(identities.c.namespace, identities.c.value).in_(
                        [(i.namespace, i.value) for i in chunk]
                    ),
                )
            )
            found.update({Identity(r.namespace, r.value): r.profile_id for r in rows})
        for identity in missing:
            self.owners[identity] = found.get(identity)
        self.load_profiles({p for p in found.values() if p not in self.states})

    def load_profiles(self, ids: Iterable[str]) -> None:
        """Load profiles by id (with all their links) into the batch."""
        todo = sorted(set(ids) - set(self.states))
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
                self.owners.setdefault(identity, r["profile_id"])
            for row in self.conn.execute(
                select(profiles).where(
                    profiles.c.workspace_id == self.workspace_id, profiles.c.id.in_(chunk)
                )
            ).mappings():
                self.states[row["id"]] = state_from_row(row, links[row["id"]])
                self.stored.add(row["id"])

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
    ) -> str:
        """Apply one record (identities + attributes at ``at``); return its profile's id.

        ``ids`` must not be empty. Profiles linked by the record are merged by the policy;
        identities refused by a unique-namespace conflict are reported in ``stats.conflicts``.
        """
        if not ids:
            raise ValueError("a record needs at least one identity")
        self.preload(ids)
        owners = {
            i: self.states[owner] for i in set(ids) if (owner := self.owners.get(i)) is not None
        }
        res = resolve(ids, owners, self.policy)
        self.stats.conflicts.extend(res.conflicts)
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
        for identity in kept:
            self.owners[identity] = state.profile_id
            self.unlinked.discard(identity)
        self.states[state.profile_id] = state
        self.dirty.add(state.profile_id)
        return state.profile_id

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
        # profiles
        for pid in sorted(self.dirty):
            values = _row_values(self.states[pid])
            if pid in self.stored:
                conn.execute(
                    update(profiles)
                    .where(profiles.c.workspace_id == ws, profiles.c.id == pid)
                    .values(**values, updated_at=self.now)
                )
            else:
                conn.execute(
                    insert(profiles).values(
                        id=pid, workspace_id=ws, created_at=self.now, updated_at=self.now, **values
                    )
                )
                self.stored.add(pid)
        # identity links
        gone = sorted(i for i in self.unlinked if self.owners.get(i) is None)
        for chunk in _chunks(gone):
            conn.execute(
                delete(identities).where(
                    identities.c.workspace_id == ws,
                    tuple_(identities.c.namespace, identities.c.value).in_(
                        [(i.namespace, i.value) for i in chunk]
                    ),
                )
            )
        links = [
            {
                "workspace_id": ws,
                "namespace": li.identity.namespace,
                "value": li.identity.value,
                "profile_id": pid,
                "first_seen": li.first_seen,
            }
            for pid in sorted(self.dirty)
            for li in self.states[pid].identities
        ]
        upsert(
            conn,
            identities,
            links,
            keys=["workspace_id", "namespace", "value"],
            update=["profile_id", "first_seen"],
        )
        # merges of stored profiles: consents, waiting events, the log, then the rows
        for absorbed, survivor in sorted(absorbed_stored.items()):
            self._move_consents(absorbed, survivor)
            conn.execute(
                update(event_inbox)
                .where(event_inbox.c.workspace_id == ws, event_inbox.c.profile_id == absorbed)
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
