from __future__ import annotations

import pytest
from sqlalchemy import select

from waymark.access import service as access
from waymark.core.errors import Conflict, Forbidden, InvalidInput, Unauthenticated
from waymark.hub import Hub
from waymark.storage.tables import api_keys


def test_workspace_keys_are_shown_once_stored_hashed_and_authenticate(hub: Hub) -> None:
    now = hub.clock.now()
    with hub.tx() as conn:
        ws, write, admin = access.create_workspace(conn, name="shop", actor="cli:test", at=now)
    assert write.secret.startswith("wmw_") and admin.secret.startswith("wms_")
    with hub.tx() as conn:
        stored = list(conn.execute(select(api_keys.c.secret_hash, api_keys.c.prefix)))
        assert all(write.secret not in (h, p) and admin.secret not in (h, p) for h, p in stored)
        p = access.authenticate(conn, write.secret)
        assert p.workspace_id == ws.id and p.scopes == {access.Scope.INGEST}
        with pytest.raises(Forbidden):
            p.require(access.Scope.READ)
        a = access.authenticate(conn, admin.secret)
        a.require(access.Scope.READ)  # admin implies every scope
        with pytest.raises(Unauthenticated):
            access.authenticate(conn, admin.secret + "x")
        with pytest.raises(Unauthenticated):
            access.authenticate(conn, "")


def test_duplicate_workspace_name_and_bad_inputs(hub: Hub) -> None:
    now = hub.clock.now()
    with hub.tx() as conn:
        access.create_workspace(conn, name="shop", actor="t", at=now)
    with hub.tx() as conn, pytest.raises(Conflict, match="shop"):
        access.create_workspace(conn, name="shop", actor="t", at=now)
    with hub.tx() as conn, pytest.raises(InvalidInput) as err:
        access.create_workspace(conn, name="Bad Name!", actor="t", at=now)
    assert err.value.issues[0].path == "name"
    with hub.tx() as conn:
        ws = access.get_workspace(conn, "shop")
        with pytest.raises(InvalidInput, match="ingest"):
            access.create_key(
                conn, workspace_id=ws.id, kind="write", scopes=["admin"], actor="t", at=now
            )
        with pytest.raises(InvalidInput, match="bogus"):
            access.create_key(
                conn, workspace_id=ws.id, kind="secret", scopes=["bogus"], actor="t", at=now
            )


def test_revoked_key_stops_working_and_everything_is_audited(hub: Hub) -> None:
    now = hub.clock.now()
    with hub.tx() as conn:
        ws, _w, _admin = access.create_workspace(conn, name="shop", actor="cli:alice", at=now)
        key = access.create_key(
            conn,
            workspace_id=ws.id,
            kind="secret",
            scopes=["read"],
            name="reporting",
            actor="cli:alice",
            at=now,
        )
    with hub.tx() as conn:
        access.authenticate(conn, key.secret)
        access.revoke_key(conn, workspace_id=ws.id, key_id=key.id, actor="cli:alice", at=now)
    with hub.tx() as conn:
        with pytest.raises(Unauthenticated):
            access.authenticate(conn, key.secret)
        actions = [(e["action"], e["actor"]) for e in access.list_audit(conn, ws.id)]
    assert ("key.revoke", "cli:alice") in actions
    assert ("workspace.create", "cli:alice") in actions
    assert sum(1 for a, _ in actions if a == "key.create") == 3


def test_user_roles_decide_token_scopes(hub: Hub) -> None:
    now = hub.clock.now()
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="shop", actor="t", at=now)
        _u, viewer_token = access.create_user(
            conn, workspace_id=ws.id, email="V@x.io", role="viewer", actor="t", at=now
        )
        _m, marketer_token = access.create_user(
            conn, workspace_id=ws.id, email="m@x.io", role="marketer", actor="t", at=now
        )
        with pytest.raises(Conflict):
            access.create_user(
                conn, workspace_id=ws.id, email="v@x.io", role="viewer", actor="t", at=now
            )
        with pytest.raises(InvalidInput, match="role"):
            access.create_user(
                conn, workspace_id=ws.id, email="z@x.io", role="owner", actor="t", at=now
            )
    with hub.tx() as conn:
        viewer = access.authenticate(conn, viewer_token.secret)
        viewer.require(access.Scope.READ)
        with pytest.raises(Forbidden):
            viewer.require(access.Scope.WRITE)
        marketer = access.authenticate(conn, marketer_token.secret)
        marketer.require(access.Scope.WRITE)
        assert marketer.actor.startswith("user:")
        assert sorted(u["email"] for u in access.list_users(conn, ws.id)) == ["m@x.io", "v@x.io"]
