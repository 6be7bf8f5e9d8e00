"""The audience endpoints: authoring (validate, explain, estimate), runs, members, memberships."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import Response

from waymark.access.service import Principal, Scope
from waymark.core.errors import InvalidInput, Issue
from waymark.hub import Hub
from waymark.profiles import service as profiles
from waymark.segmentation import service as segments
from waymark.segmentation.live import stream_status
from waymark.workers import flush_once

JSONObject = dict[str, Any]
Authorize = Callable[[Request, Scope], Principal]

_SAVE_KEYS = {"name", "definition", "description", "schedule"}


def _as_of(hub: Hub, text: str | None) -> datetime:
    return segments.as_of(text, hub.clock.now())


def _attachment(name: str, suffix: str) -> dict[str, str]:
    """A download's file name, for any audience name (RFC 6266 / 5987)."""
    ascii_name = "".join(c if (c.isascii() and c.isalnum()) or c in " -_." else "_" for c in name)
    return {
        "content-disposition": f'attachment; filename="{ascii_name}{suffix}"; '
        f"filename*=UTF-8''{quote(name + suffix, safe='')}"
    }


def _definition_of(body: JSONObject, key: str = "definition") -> object:
    if key not in body:
        raise InvalidInput([Issue(key, "is required: the text form (a string) or the JSON form")])
    return body[key]


def add_audience_routes(app: FastAPI, hub: Hub, principal: Authorize) -> None:
    """Register the ``/v1/audiences`` endpoints on ``app``."""

    @app.get("/v1/audiences", tags=["audiences"])
    def list_audiences(request: Request) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return {
                "audiences": [a.to_json() for a in segments.list_audiences(conn, p.workspace_id)]
            }

    @app.post("/v1/audiences", tags=["audiences"], status_code=201, summary="Create or replace")
    def save_audience(
        request: Request,
        body: Annotated[
            JSONObject,
            Body(
                description='{"name": "vip", "definition": "count(purchase) >= 3", '
                '"description": "...", "schedule": "0 6 * * *"}'
            ),
        ],
    ) -> JSONObject:
        p = principal(request, Scope.WRITE)
        unknown = set(body) - _SAVE_KEYS
        if unknown:
            raise InvalidInput([Issue(k, "unknown field") for k in sorted(unknown)])
        with hub.tx() as conn:
            saved = segments.save_audience(
                conn,
                p.workspace_id,
                name=body.get("name", ""),
                definition=_definition_of(body),
                description=body.get("description") or "",
                schedule=body.get("schedule"),
                actor=p.actor,
                now=hub.clock.now(),
            )
        return saved.to_json()

    @app.post("/v1/audiences/validate", tags=["audiences"])
    def validate(
        request: Request,
        body: Annotated[JSONObject, Body(description='{"definition": "..."}')],
        dialect: Annotated[list[str] | None, Query()] = None,
        as_of: str | None = None,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            expr = segments.read_definition(conn, p.workspace_id, _definition_of(body))
            return {
                "valid": True,
                **segments.explain(
                    conn, p.workspace_id, expr, now=_as_of(hub, as_of), dialects=dialect
                ),
            }

    @app.get("/v1/audiences/{name}", tags=["audiences"])
    def get_audience(request: Request, name: str) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            audience = segments.get_audience(conn, p.workspace_id, name)
            found = audience.to_json()
            if audience.mode == "streaming":  # how far serve has built its states
                found["stream_progress"] = stream_status(conn, p.workspace_id, audience.id)
            return found

    @app.delete("/v1/audiences/{name}", tags=["audiences"], status_code=204)
    def delete_audience(request: Request, name: str) -> Response:
        p = principal(request, Scope.WRITE)
        with hub.tx() as conn:
            segments.delete_audience(conn, p.workspace_id, name, actor=p.actor, now=hub.clock.now())
        return Response(status_code=204)

    @app.get("/v1/audiences/{name}/explain", tags=["audiences"])
    def explain(
        request: Request,
        name: str,
        dialect: Annotated[list[str] | None, Query()] = None,
        as_of: str | None = None,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            audience = segments.get_audience(conn, p.workspace_id, name)
            return segments.explain(
                conn, p.workspace_id, audience.definition, now=_as_of(hub, as_of), dialects=dialect
            )

    def _definition(p: Principal, name: str) -> Any:
        with hub.engine.connect() as conn:
            return segments.get_audience(conn, p.workspace_id, name).definition

    @app.get("/v1/audiences/{name}/estimate", tags=["audiences"])
    def estimate(
        request: Request,
        name: str,
        percent: Annotated[int, Query(ge=1, le=100)] = 5,
        as_of: str | None = None,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        return segments.estimate(
            hub, p.workspace_id, _definition(p, name), now=_as_of(hub, as_of), percent=percent
        )

    @app.get("/v1/audiences/{name}/count", tags=["audiences"], summary="The exact size now")
    def count(request: Request, name: str, as_of: str | None = None) -> JSONObject:
        p = principal(request, Scope.READ)
        moment = _as_of(hub, as_of)
        found = segments.member_ids(hub, p.workspace_id, _definition(p, name), now=moment)
        return {"count": len(found), "as_of": moment.isoformat()}

    @app.get("/v1/audiences/{name}/preview", tags=["audiences"], summary="Sample members now")
    def preview(
        request: Request,
        name: str,
        limit: Annotated[int, Query(ge=1, le=100)] = 10,
        as_of: str | None = None,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        moment = _as_of(hub, as_of)
        found = sorted(segments.member_ids(hub, p.workspace_id, _definition(p, name), now=moment))
        with hub.engine.connect() as conn:
            sample = [profiles.get_profile(conn, p.workspace_id, pid) for pid in found[:limit]]
        return {"count": len(found), "as_of": moment.isoformat(), "members": sample}

    @app.get("/v1/audiences/{name}/overlap/{other}", tags=["audiences"])
    def overlap(request: Request, name: str, other: str, as_of: str | None = None) -> JSONObject:
        p = principal(request, Scope.READ)
        moment = _as_of(hub, as_of)
        result = segments.overlap(
            hub, p.workspace_id, _definition(p, name), _definition(p, other), now=moment
        )
        return {
            "first_audience": name,
            "second_audience": other,
            "as_of": moment.isoformat(),
            **result,
        }

    @app.post(
        "/v1/audiences/{name}/runs", tags=["audiences"], summary="Evaluate now, store changes"
    )
    def run(request: Request, name: str, as_of: str | None = None) -> JSONObject:
        p = principal(request, Scope.WRITE)
        flush_once(hub)  # events still waiting in the inbox count too
        return segments.run_audience(
            hub, p.workspace_id, name, now=_as_of(hub, as_of), trigger="manual", actor=p.actor
        )

    @app.get("/v1/audiences/{name}/members", tags=["audiences"], summary="Stored members")
    def members(
        request: Request,
        name: str,
        status: Literal["realized", "exited", "all"] = "realized",
        format: Literal["json", "csv", "parquet"] = "json",
        limit: Annotated[int | None, Query(ge=1)] = None,
    ) -> Any:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            rows = segments.members_of(conn, p.workspace_id, name, status=status, limit=limit)
        if format == "json":
            return {"audience": name, "members": rows}
        if format == "csv":
            out = io.StringIO()
            writer = csv.DictWriter(
                out, fieldnames=["profile_id", "status", "realized_at", "exited_at"]
            )
            writer.writeheader()
            writer.writerows(rows)
            return Response(
                out.getvalue(),
                media_type="text/csv",
                headers=_attachment(name, ".csv"),
            )
        buffer = io.BytesIO()
        columns = ("profile_id", "status", "realized_at", "exited_at")
        pq.write_table(
            pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in columns}), buffer
        )
        return Response(
            buffer.getvalue(),
            media_type="application/vnd.apache.parquet",
            headers=_attachment(name, ".parquet"),
        )

    @app.get("/v1/profiles/{namespace}/{value}/audiences", tags=["profiles", "audiences"])
    def memberships(request: Request, namespace: str, value: str) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            pid = profiles.find_profile_id(
                conn, p.workspace_id, profiles.parse_identity(namespace, value)
            )
            return {
                "profile_id": pid,
                "audiences": segments.profile_memberships(conn, p.workspace_id, pid),
            }
