"""The FastAPI application.

Handlers are thin: authenticate, read the body within its limits, call a service in a
transaction, answer. Ingestion goes through the group committer (one commit for many
concurrent requests); everything else runs in FastAPI's thread pool.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import DataError
from starlette.concurrency import run_in_threadpool

from waymark import __version__
from waymark.access import service as access
from waymark.access.service import Principal, Scope
from waymark.api.audiences import add_audience_routes
from waymark.api.auth import KeyCache, presented_key
from waymark.api.delivery import add_delivery_routes
from waymark.api.errors import (
    data_error_handler,
    validation_error_handler,
    waymark_error_handler,
)
from waymark.api.responses import JSONAnswer
from waymark.api.sink import sink_router
from waymark.api.tracking import add_tracking_routes
from waymark.channels.sink import SinkStore
from waymark.core.errors import InvalidInput, Issue, LimitExceeded, WaymarkError
from waymark.delivery.outbox import Outbox
from waymark.delivery.providers import KINDS, uses_sink
from waymark.delivery.runtime import DeliveryRuntime
from waymark.hub import Hub
from waymark.ingestion.batcher import GroupCommitter
from waymark.ingestion.pipeline import Ingestor, limits_of
from waymark.ingestion.pool import IngestPool, Kind, decode_body, parse_request
from waymark.ingestion.service import IngestResult
from waymark.model.events import Identity
from waymark.profiles import service as profiles
from waymark.profiles.schema_store import current_schema, save_schema, schema_history
from waymark.segmentation.live import decide_modes

SEGMENT_CALLS = ("identify", "track", "page", "screen", "alias", "group", "batch")
JSONObject = dict[str, Any]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, gunzipped if needed; :class:`LimitExceeded` past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise LimitExceeded(f"the body is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise LimitExceeded(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if request.headers.get("content-encoding", "").lower() == "gzip":
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            raw = d.decompress(raw, limit + 1)
        except zlib.error as exc:
            raise InvalidInput([Issue("", f"the gzip body cannot be decompressed: {exc}")]) from exc
        if len(raw) > limit:
            raise LimitExceeded(f"the decompressed body is over the limit of {limit} bytes")
    return raw


def ingest_answer(result: IngestResult) -> JSONAnswer:
    """200 when anything was stored (or all were duplicates), 400 when every item was bad."""
    body = {"success": not result.rejected, **result.to_json()}
    nothing_kept = result.accepted == 0 and result.duplicates == 0 and result.rejected
    if nothing_kept:
        issues = [e for r in body["rejected"] for e in r["errors"]]
        return JSONAnswer(
            {
                "success": False,
                "error": {
                    "code": "invalid_input",
                    "message": "no item was accepted",
                    "errors": issues,
                },
                **result.to_json(),
            },
            status_code=400,
        )
    return JSONAnswer(body)


def subject(body: JSONObject) -> Identity:
    """The person a privacy request is about: ``{"namespace": ..., "value": ...}``."""
    namespace, value = body.get("namespace"), body.get("value")
    issues = [
        Issue(key, "required: a string")
        for key, v in (("namespace", namespace), ("value", value))
        if not isinstance(v, str) or not v
    ]
    if issues:
        raise InvalidInput(issues)
    return profiles.parse_identity(str(namespace), str(value))


def json_body(description: str) -> dict[str, Any]:
    """OpenAPI text for a JSON object body that the handler reads itself (within limits)."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }


def create_app(hub: Hub, *, background: bool = True) -> FastAPI:
    """Build the API for ``hub``. With ``background``, the app's lifespan also runs the
    inbox mover, finishes interrupted privacy deletions and (with ``ingest_workers``) starts
    the ingestion worker processes."""
    keys = KeyCache(hub)
    ingestor = Ingestor(hub)
    limits = limits_of(hub)
    settings = hub.settings
    state: dict[str, Any] = {}
    outbox = Outbox(public_url=settings.public_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # the writer thread and the event loop hand work to each other many times per
        # request; the default 5 ms GIL switch interval would dominate latency
        sys.setswitchinterval(0.0005)
        committer = GroupCommitter(hub)
        state["committer"] = committer
        task = None
        if background:
            from waymark.workers import run_background

            if settings.ingest_workers:
                state["pool"] = await run_in_threadpool(
                    functools.partial(
                        IngestPool,
                        settings,
                        settings.ingest_workers,
                        parsers=settings.parse_workers,
                    )
                )
            delivery = state["delivery"] = await run_in_threadpool(
                functools.partial(DeliveryRuntime, hub, outbox=outbox)
            )
            task = asyncio.create_task(run_background(hub, delivery))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            pool: IngestPool | None = state.pop("pool", None)
            if pool is not None:
                await run_in_threadpool(pool.close)
            running: DeliveryRuntime | None = state.pop("delivery", None)
            if running is not None:
                await run_in_threadpool(running.close)
            committer.close()
            if background:
                await run_in_threadpool(ingestor.flush)

    app = FastAPI(
        title="Waymark",
        version=__version__,
        description="Customer-data hub: Segment-compatible ingestion, profiles, schemas, privacy.",
        default_response_class=JSONAnswer,
        lifespan=lifespan,
    )
    app.add_exception_handler(WaymarkError, waymark_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(DataError, data_error_handler)

    def principal(request: Request, scope: Scope, body_key: str | None = None) -> Principal:
        key = presented_key(request) or body_key
        p = keys.resolve(key)
        p.require(scope)
        return p

    async def committed(workspace_id: str, parsed: Any) -> IngestResult:
        committer: GroupCommitter | None = state.get("committer")
        if committer is None:  # app used without its lifespan (e.g. a plain TestClient)
            return await run_in_threadpool(ingestor.store_events, workspace_id, parsed)
        return await committer.store(workspace_id, parsed)

    async def ingest(request: Request, kind: Kind, call: str, limit: int) -> Response:
        """Authenticate, read the body, then parse and store it: in a worker process when
        there are workers, else here through the group committer.

        A key in the headers is checked before the body is read. Segment calls may instead
        carry ``writeKey`` in the body (some libraries do), which needs the body decoded
        first; native calls must use a header."""
        p = principal(request, Scope.INGEST) if presented_key(request) or kind == "native" else None
        raw = await read_body(request, limit)
        data: Any = None
        if p is None:
            data = decode_body(raw)
            body_key = data.get("writeKey") if isinstance(data, dict) else None
            p = principal(request, Scope.INGEST, body_key if isinstance(body_key, str) else None)
        received_at = hub.clock.now()
        pool: IngestPool | None = state.get("pool")
        if pool is not None:
            result = await pool.store(kind, call, p.workspace_id, raw, received_at)
        else:
            if data is None:
                data = decode_body(raw)
            parsed = parse_request(
                kind,
                call,
                data,
                workspace_id=p.workspace_id,
                received_at=received_at,
                limits=limits,
            )
            result = await committed(p.workspace_id, parsed)
        if result.accepted:
            hub.inbox_signal.set()  # the mover folds them into the streaming audiences now
        return ingest_answer(result)

    # -- ingestion -----------------------------------------------------------------------------

    def segment_endpoint(call: str) -> Callable[..., Any]:
        async def endpoint(
            request: Request,
        ) -> Response:
            limit = settings.max_batch_bytes if call == "batch" else settings.max_event_bytes * 2
            return await ingest(request, "segment", call, limit)

        endpoint.__name__ = f"segment_{call}"
        return endpoint

    for call in SEGMENT_CALLS:
        app.post(
            f"/v1/{call}",
            tags=["ingestion (Segment spec)"],
            summary=f"Segment-compatible {call}",
            openapi_extra=json_body(f"A Segment-spec {call} call."),
        )(segment_endpoint(call))
    app.post("/v1/import", tags=["ingestion (Segment spec)"], include_in_schema=False)(
        segment_endpoint("batch")
    )

    @app.post(
        "/v1/events",
        tags=["ingestion"],
        summary="Native batch of events",
        openapi_extra=json_body('{"events": [{"event", "identities", "properties", ...}]}'),
    )
    async def native_events(
        request: Request,
    ) -> Response:
        return await ingest(request, "native", "events", settings.max_batch_bytes)

    @app.post(
        "/v1/profiles",
        tags=["ingestion"],
        summary="Native batch of profile records",
        openapi_extra=json_body('{"profiles": [{"identities", "attributes", "consents"}]}'),
    )
    async def native_profiles(
        request: Request,
    ) -> Response:
        p = principal(request, Scope.INGEST)
        data = decode_body(await read_body(request, settings.max_batch_bytes))
        items = data.get("profiles") if isinstance(data, dict) else None
        if isinstance(items, list) and any(isinstance(i, dict) and "consents" in i for i in items):
            # the public write key ships in web pages: it must not opt people in
            p.require(Scope.WRITE)
        result = await run_in_threadpool(ingestor.native_profiles, p.workspace_id, data)
        if result.accepted:
            hub.inbox_signal.set()  # streaming audiences re-evaluate these profiles now
        return ingest_answer(result)

    @app.post("/v1/imports/{kind}", tags=["ingestion"], summary="Upload a file to import")
    async def upload_import(
        request: Request,
        kind: Literal["profiles", "events"],
        format: Annotated[Literal["csv", "jsonl", "parquet"], Query()],
        encoding: Annotated[str, Query(pattern=r"^[A-Za-z0-9_.-]{1,40}$")] = "utf-8",
    ) -> Response:
        p = principal(request, Scope.WRITE)  # bulk loads are for servers, not the write key
        uploads = settings.data_dir / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        size = 0
        with tempfile.NamedTemporaryFile(dir=uploads, suffix=f".{format}", delete=False) as tmp:
            path = Path(tmp.name)
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > settings.max_upload_bytes:
                        raise LimitExceeded(
                            f"the upload is over the limit of {settings.max_upload_bytes} bytes"
                        )
                    tmp.write(chunk)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        from waymark.ingestion.files import run_import

        try:
            report = await run_in_threadpool(
                lambda: run_import(
                    hub,
                    workspace_id=p.workspace_id,
                    kind=kind,
                    path=path,
                    actor=p.actor,
                    fmt=format,
                    encoding=encoding,
                    error_report=uploads / f"{path.stem}.errors.csv",
                )
            )
        finally:
            path.unlink(missing_ok=True)
        return JSONAnswer(report.to_json())

    # -- profiles ------------------------------------------------------------------------------

    @app.get("/v1/profiles/{namespace}/{value}", tags=["profiles"])
    def get_profile(request: Request, namespace: str, value: str) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return profiles.lookup(conn, p.workspace_id, namespace, value)

    @app.get("/v1/profiles/{namespace}/{value}/events", tags=["profiles"])
    def get_timeline(
        request: Request,
        namespace: str,
        value: str,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            pid = profiles.find_profile_id(
                conn, p.workspace_id, profiles.parse_identity(namespace, value)
            )
            events = profiles.timeline(conn, hub.events, p.workspace_id, pid, limit=limit)
        return {"profile_id": pid, "events": events}

    @app.patch("/v1/profiles/{namespace}/{value}", tags=["profiles"])
    def patch_profile(
        request: Request,
        namespace: str,
        value: str,
        body: Annotated[JSONObject, Body(description='{"attributes": {...}, "consents": [...]}')],
        create: bool = False,
    ) -> JSONObject:
        p = principal(request, Scope.WRITE)
        unknown = set(body) - {"attributes", "consents"}
        if unknown:
            raise InvalidInput([Issue(k, "unknown field") for k in sorted(unknown)])
        attrs = body.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise InvalidInput([Issue("attributes", "expected an object")])
        identity = profiles.parse_identity(namespace, value)
        now = hub.clock.now()
        with hub.tx() as conn:
            return profiles.update_profile(
                conn,
                workspace_id=p.workspace_id,
                identity=identity,
                attributes=attrs,
                consent_updates=profiles.parse_consents(
                    body.get("consents"), now=now, source=p.actor
                ),
                schema=current_schema(conn, p.workspace_id).schema,
                policy=ingestor.policy,
                actor=p.actor,
                now=now,
                create=create,
                shared_event_log=settings.shared_event_log,
            )

    @app.get("/v1/profiles", tags=["profiles"], summary="Search profiles by attribute")
    def search_profiles(
        request: Request,
        q: Annotated[
            list[str] | None, Query(description="filters like country=DE, ltv>100")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        after: str | None = None,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return profiles.search(conn, p.workspace_id, q or [], limit=limit, after=after)

    # -- privacy -------------------------------------------------------------------------------

    @app.post("/v1/privacy/export", tags=["privacy"])
    def privacy_export(
        request: Request,
        body: Annotated[JSONObject, Body(description='{"namespace": "email", "value": "..."}')],
    ) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        identity = subject(body)
        with hub.tx() as conn:
            return profiles.export_person(
                conn,
                hub.events,
                workspace_id=p.workspace_id,
                identity=identity,
                actor=p.actor,
                now=hub.clock.now(),
            )

    @app.post("/v1/privacy/delete", tags=["privacy"])
    def privacy_delete(
        request: Request,
        body: Annotated[JSONObject, Body(description='{"namespace": "email", "value": "..."}')],
    ) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        identity = subject(body)
        from waymark.privacy import delete_person

        return delete_person(hub, workspace_id=p.workspace_id, identity=identity, actor=p.actor)

    # -- schema --------------------------------------------------------------------------------

    @app.get("/v1/schema", tags=["schema"])
    def get_schema(request: Request) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return current_schema(conn, p.workspace_id).to_json()

    @app.get("/v1/schema/versions", tags=["schema"])
    def get_schema_versions(request: Request) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return {"versions": [v.to_json() for v in schema_history(conn, p.workspace_id)]}

    @app.put("/v1/schema", tags=["schema"])
    def put_schema(request: Request, body: Annotated[JSONObject, Body()]) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        with hub.tx() as conn:
            saved = save_schema(
                conn, workspace_id=p.workspace_id, document=body, actor=p.actor, at=hub.clock.now()
            )
            decide_modes(conn, p.workspace_id)  # what can be streamed may change with the schema
        return saved.to_json()

    add_audience_routes(app, hub, principal)
    add_delivery_routes(app, hub, principal, outbox)
    add_tracking_routes(app, hub, outbox.tracker)
    if settings.local_only and any(uses_sink(settings.providers, c) for c in KINDS):
        # the development sink's pages: what was "sent" (no authentication: only while the hub
        # is reached on this machine alone)
        app.include_router(sink_router(SinkStore(settings.data_dir / "sink")))

    # -- access --------------------------------------------------------------------------------

    @app.get("/v1/keys", tags=["access"])
    def get_keys(request: Request) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        with hub.engine.connect() as conn:
            return {"keys": access.list_keys(conn, p.workspace_id)}

    @app.post("/v1/keys", tags=["access"], status_code=201)
    def post_key(request: Request, body: Annotated[JSONObject, Body()]) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        scopes = body.get("scopes", [])
        if not isinstance(scopes, list):
            raise InvalidInput([Issue("scopes", "expected an array of scope names")])
        with hub.tx() as conn:
            key = access.create_key(
                conn,
                workspace_id=p.workspace_id,
                kind=str(body.get("kind", "secret")),
                scopes=[str(s) for s in scopes],
                name=str(body.get("name", "")),
                actor=p.actor,
                at=hub.clock.now(),
            )
        return {"id": key.id, "kind": key.kind, "key": key.secret, "scopes": list(key.scopes)}

    @app.delete("/v1/keys/{key_id}", tags=["access"], status_code=204)
    def delete_key(request: Request, key_id: str) -> Response:
        p = principal(request, Scope.ADMIN)
        with hub.tx() as conn:
            access.revoke_key(
                conn, workspace_id=p.workspace_id, key_id=key_id, actor=p.actor, at=hub.clock.now()
            )
        keys.clear()
        return Response(status_code=204)

    @app.get("/v1/users", tags=["access"])
    def get_users(request: Request) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        with hub.engine.connect() as conn:
            return {"users": access.list_users(conn, p.workspace_id)}

    @app.post("/v1/users", tags=["access"], status_code=201)
    def post_user(request: Request, body: Annotated[JSONObject, Body()]) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        with hub.tx() as conn:
            user, token = access.create_user(
                conn,
                workspace_id=p.workspace_id,
                email=str(body.get("email", "")),
                role=str(body.get("role", "")),
                name=str(body.get("name", "")),
                actor=p.actor,
                at=hub.clock.now(),
            )
        return {"user": user, "token": token.secret}

    @app.get("/v1/audit", tags=["access"])
    def get_audit(
        request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        with hub.engine.connect() as conn:
            return {"entries": access.list_audit(conn, p.workspace_id, limit=limit)}

    @app.get("/health", tags=["operations"])
    def health() -> JSONObject:
        with hub.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok", "version": __version__}

    return app
