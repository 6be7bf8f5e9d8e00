"""Privacy requests across every store: export a person's data, or delete a person.

A deletion first moves waiting events into the log (so none can arrive there afterwards),
then deletes the person from the state store in one transaction that records a ``running``
request, then deletes their events from the log and marks the request done. If the process
dies in between, :func:`waymark.profiles.service.finish_deletions` completes it at the next
start.
"""

from __future__ import annotations

from typing import Any

from waymark.hub import Hub
from waymark.ingestion.mover import flush_hub
from waymark.model.events import Identity
from waymark.profiles import service as profiles


def delete_person(hub: Hub, *, workspace_id: str, identity: Identity, actor: str) -> dict[str, Any]:
    """Delete everything held about the person with ``identity``; returns the request record."""
    with hub.mover_lock:
        flush_hub(hub)
        with hub.tx() as conn:
            request_id, _ids = profiles.start_deletion(
                conn, workspace_id=workspace_id, identity=identity, actor=actor, now=hub.clock.now()
            )
        with hub.tx() as conn:
            profiles.finish_deletions(conn, hub.events, now=hub.clock.now())
            record = profiles.privacy_request_status(conn, workspace_id, request_id)
        if hub.engine.dialect.name == "sqlite":
            # the write-ahead log still holds the deleted rows' old pages until checkpointed
            raw = hub.engine.raw_connection()  # outside any transaction, or it cannot truncate
            try:
                raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()
        return record
