"""The delivery endpoints: templates and fragments, rules, suppressions, the message log, dead
letters, sends from API callers, and each profile's inbox and push subscriptions.

Scopes: ``read`` for every GET, previews and validation; ``write`` for authoring templates and
fragments, sending, cancelling, suppressing an address, and a profile's inbox and push
subscriptions (the public write key cannot: it ships in web pages, and a push subscription
registered to someone else's profile would receive their messages); ``admin`` for the rules
(consent), taking an address off the suppression list and replaying dead letters.

A profile is addressed by identity in paths (``/v1/profiles/{namespace}/{value}/...``) and, in
bodies, as ``{"namespace": ..., "value": ...}`` or by its id (a string).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import orjson
from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import Response
from sqlalchemy import Connection

from waymark.access.service import Principal, Scope
from waymark.api.responses import JSONAnswer
from waymark.core.errors import InvalidInput, Issue, NotFound
from waymark.delivery import messages as log
from waymark.delivery import store
from waymark.delivery.outbox import Outbox, SendIntent, Source
from waymark.delivery.templates import Channel, RenderFailed, parse_template
from waymark.hub import Hub
from waymark.profiles import service as profiles

JSONObject = dict[str, Any]
Authorize = Callable[[Request, Scope], Principal]

#: Most send intents one POST /v1/messages takes.
MAX_SENDS = 1000
_INTENT_KEYS = frozenset({"key", "profile", "template", "purpose", "transactional", "context"})


def _only(body: Mapping[str, Any], allowed: set[str] | frozenset[str], prefix: str = "") -> None:
    unknown = set(body) - allowed
    if unknown:
        raise InvalidInput([Issue(f"{prefix}{k}", "unknown field") for k in sorted(unknown)])


def _render_failed(exc: RenderFailed) -> JSONAnswer:
    """422: the request was well formed but the template cannot be rendered for this profile."""
    return JSONAnswer(
        {
            "error": {
                "code": exc.code,
                "message": f"the template cannot be rendered for this profile: {exc.message}",
                "errors": [{"path": exc.field, "reason": exc.reason, "code": exc.code}],
            }
        },
        status_code=422,
    )


def _next(items: list[Any], limit: int, cursor: Callable[[Any], str]) -> str | None:
    """The cursor of the next page, when this one is full."""
    return cursor(items[-1]) if len(items) == limit else None


def add_delivery_routes(app: FastAPI, hub: Hub, principal: Authorize, outbox: Outbox) -> None:
    """Register the delivery endpoints on ``app``; messages are written through ``outbox``."""
    push_settings = hub.settings.providers.get("push", {})
    allow_http = isinstance(push_settings, dict) and push_settings.get("allow_http") is True

    def profile_of(conn: Connection, p: Principal, namespace: str, value: str) -> str:
        return profiles.find_profile_id(
            conn, p.workspace_id, profiles.parse_identity(namespace, value)
        )

    # -- templates ---------------------------------------------------------------------------

    @app.get("/v1/templates", tags=["delivery"])
    def list_templates(request: Request) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return {"templates": [t.to_json() for t in store.list_templates(conn, p.workspace_id)]}

    @app.post("/v1/templates/validate", tags=["delivery"], summary="Check an unsaved template")
    def validate_template(
        request: Request,
        body: Annotated[
            JSONObject,
            Body(
                description='{"definition": {"channel": "sms", "text": "..."}, '
                '"profile": {"namespace": "user_id", "value": "ann"}, "context": {...}}; '
                "with a profile, the answer also holds its preview"
            ),
        ],
    ) -> Any:
        p = principal(request, Scope.READ)
        _only(body, {"definition", "profile", "context"})
        if "definition" not in body:
            raise InvalidInput([Issue("definition", "required: the template's JSON form")])
        definition = parse_template(body["definition"])
        with hub.engine.connect() as conn:
            compiled = store.compile_stored(conn, p.workspace_id, definition)
            answer: JSONObject = {
                "valid": True,
                "channel": definition.channel.value,
                "definition": definition.to_json(),
                "references": sorted(compiled.references),
            }
            if "profile" in body:
                pid = log.resolve_profile(conn, p.workspace_id, body["profile"])
                try:
                    rendered = log.preview(
                        conn,
                        p.workspace_id,
                        document=body["definition"],
                        profile_id=pid,
                        context=body.get("context"),
                        outbox=outbox,
                    )
                except RenderFailed as exc:
                    return _render_failed(exc)
                answer["preview"] = log.rendered_json(rendered)
        return answer

    @app.get("/v1/templates/{name}", tags=["delivery"])
    def get_template(request: Request, name: str) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return store.get_template(conn, p.workspace_id, name).to_json()

    @app.put("/v1/templates/{name}", tags=["delivery"], summary="Create or replace a template")
    def put_template(
        request: Request,
        name: str,
        body: Annotated[
            JSONObject,
            Body(description='The template\'s JSON form, e.g. {"channel": "sms", "text": "Hi"}'),
        ],
    ) -> JSONAnswer:
        p = principal(request, Scope.WRITE)
        with hub.tx() as conn:
            saved = store.save_template(
                conn, p.workspace_id, name=name, document=body, actor=p.actor, now=hub.clock.now()
            )
        return JSONAnswer(saved.to_json(), status_code=201 if saved.version == 1 else 200)

    @app.delete("/v1/templates/{name}", tags=["delivery"], status_code=204)
    def delete_template(request: Request, name: str) -> Response:
        p = principal(request, Scope.WRITE)
        with hub.tx() as conn:
            store.delete_template(conn, p.workspace_id, name, actor=p.actor, now=hub.clock.now())
        return Response(status_code=204)

    @app.post("/v1/templates/{name}/preview", tags=["delivery"], summary="Render for a profile")
    def preview(
        request: Request,
        name: str,
        body: Annotated[
            JSONObject,
            Body(
                description='{"profile": {"namespace": "user_id", "value": "ann"} or a profile '
                'id, "context": {"event": {...}}}'
            ),
        ],
    ) -> Any:
        p = principal(request, Scope.READ)
        _only(body, {"profile", "context"})
        with hub.engine.connect() as conn:
            pid = log.resolve_profile(conn, p.workspace_id, body.get("profile"))
            try:
                rendered = log.preview(
                    conn,
                    p.workspace_id,
                    template=name,
                    profile_id=pid,
                    context=body.get("context"),
                    outbox=outbox,
                )
            except RenderFailed as exc:
                return _render_failed(exc)
        return {"profile_id": pid, **(log.rendered_json(rendered) or {})}

    @app.post("/v1/templates/{name}/test-send", tags=["delivery"], summary="Send to seeds")
    def test_send(
        request: Request,
        name: str,
        body: Annotated[
            JSONObject,
            Body(
                description='{"profile": {"namespace": "user_id", "value": "ann"}, '
                '"to": ["qa@example.com"], "context": {...}}: rendered for the profile, sent '
                "to each seed address as a transactional test message"
            ),
        ],
    ) -> JSONObject:
        p = principal(request, Scope.WRITE)
        _only(body, {"profile", "to", "context"})
        to = body.get("to")
        if not isinstance(to, list):
            raise InvalidInput([Issue("to", "required: a list of seed addresses")])
        with hub.tx() as conn:
            pid = log.resolve_profile(conn, p.workspace_id, body.get("profile"))
            sent = log.test_send(
                conn,
                p.workspace_id,
                template=name,
                profile_id=pid,
                to=to,
                context=body.get("context"),
                outbox=outbox,
                now=hub.clock.now(),
                actor=p.actor,
            )
        hub.outbox_signal.set()  # the dispatcher sends them now
        return {"messages": [e.to_json() for e in sent]}

    # -- fragments ---------------------------------------------------------------------------

    @app.get("/v1/fragments", tags=["delivery"])
    def list_fragments(request: Request) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return {"fragments": store.list_fragments(conn, p.workspace_id)}

    @app.get("/v1/fragments/{name}", tags=["delivery"])
    def get_fragment(request: Request, name: str) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            found = [f for f in store.list_fragments(conn, p.workspace_id) if f["name"] == name]
        if not found:
            raise NotFound(f"no fragment named {name!r} in this workspace")
        return found[0]

    @app.put("/v1/fragments/{name}", tags=["delivery"], summary="Create or replace a fragment")
    def put_fragment(
        request: Request,
        name: str,
        body: Annotated[JSONObject, Body(description='{"source": "<p>{{ url }}</p>"}')],
    ) -> JSONAnswer:
        p = principal(request, Scope.WRITE)
        _only(body, {"source"})
        with hub.tx() as conn:
            version = store.save_fragment(
                conn,
                p.workspace_id,
                name=name,
                source=body.get("source"),
                actor=p.actor,
                now=hub.clock.now(),
            )
        return JSONAnswer(
            {"name": name, "version": version}, status_code=201 if version == 1 else 200
        )

    @app.delete("/v1/fragments/{name}", tags=["delivery"], status_code=204)
    def delete_fragment(request: Request, name: str) -> Response:
        p = principal(request, Scope.WRITE)
        with hub.tx() as conn:
            store.delete_fragment(conn, p.workspace_id, name, actor=p.actor, now=hub.clock.now())
        return Response(status_code=204)

    # -- rules and suppressions --------------------------------------------------------------

    @app.get("/v1/delivery/rules", tags=["delivery"])
    def get_rules(request: Request) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return store.current_rules(conn, p.workspace_id).to_json()

    @app.put("/v1/delivery/rules", tags=["delivery"], summary="Replace the rules")
    def put_rules(
        request: Request,
        body: Annotated[
            JSONObject,
            Body(description='{"caps": [...], "quiet_hours": [...], "require_consent": true}'),
        ],
    ) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        with hub.tx() as conn:
            saved = store.save_rules(conn, p.workspace_id, body, actor=p.actor, now=hub.clock.now())
        return saved.to_json()

    @app.get("/v1/suppressions", tags=["delivery"])
    def list_suppressions(
        request: Request,
        channel: str | None = None,
        after: Annotated[str | None, Query(description="the last address of a page")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            found = store.list_suppressions(
                conn, p.workspace_id, channel=channel, after=after, limit=limit
            )
        return {
            "suppressions": [s.to_json() for s in found],
            "next": _next(found, limit, lambda s: s.address),
        }

    @app.post("/v1/suppressions", tags=["delivery"], summary="Suppress an address")
    def add_suppression(
        request: Request,
        body: Annotated[
            JSONObject,
            Body(
                description='{"channel": "email", "address": "ann@example.com", '
                '"reason": "manual", "detail": "asked by phone"}'
            ),
        ],
    ) -> JSONAnswer:
        p = principal(request, Scope.WRITE)
        _only(body, {"channel", "address", "reason", "detail"})
        detail = body.get("detail", "")
        if not isinstance(detail, str):
            raise InvalidInput([Issue("detail", "must be a string")])
        with hub.tx() as conn:
            created = store.suppress(
                conn,
                p.workspace_id,
                channel=body.get("channel"),
                address=body.get("address"),
                reason=body.get("reason", "manual"),
                source=p.actor,
                detail=detail,
                now=hub.clock.now(),
            )
        channel = Channel(str(body["channel"]))
        return JSONAnswer(
            {
                "channel": channel.value,
                "address": store.normal_address(channel, str(body["address"])),
                "created": created,
            },
            status_code=201 if created else 200,
        )

    @app.delete("/v1/suppressions/{channel}/{address:path}", tags=["delivery"], status_code=204)
    def remove_suppression(request: Request, channel: str, address: str) -> Response:
        p = principal(request, Scope.ADMIN)
        with hub.tx() as conn:
            gone = store.unsuppress(
                conn,
                p.workspace_id,
                channel=channel,
                address=address,
                actor=p.actor,
                now=hub.clock.now(),
            )
        if not gone:
            raise NotFound(f"{address!r} is not on the {channel} suppression list")
        return Response(status_code=204)

    # -- messages ----------------------------------------------------------------------------

    @app.get("/v1/messages", tags=["delivery"], summary="The message log, newest first")
    def list_messages(
        request: Request,
        profile_id: str | None = None,
        profile: Annotated[
            str | None, Query(description="an identity, namespace:value (user_id:ann)")
        ] = None,
        source_kind: str | None = None,
        source_id: Annotated[
            str | None, Query(description="a journey's or campaign's id (its steps match too)")
        ] = None,
        status: str | None = None,
        channel: str | None = None,
        before: Annotated[str | None, Query(description="the last id of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            if profile is not None:
                namespace, sep, value = profile.partition(":")
                if not sep:
                    raise InvalidInput(
                        [Issue("profile", "write namespace:value, e.g. user_id:ann")]
                    )
                found_id = profile_of(conn, p, namespace, value)
                if profile_id is not None and profile_id != found_id:
                    return {"messages": [], "next": None}
                profile_id = found_id
            found = log.message_log(
                conn,
                p.workspace_id,
                profile_id=profile_id,
                source_kind=source_kind,
                source_id=source_id,
                status=status,
                channel=channel,
                before=before,
                limit=limit,
            )
        return {
            "messages": [e.to_json() for e in found],
            "next": _next(found, limit, lambda e: e.id),
        }

    @app.post("/v1/messages", tags=["delivery"], summary="Send messages (e.g. receipts)")
    def send(
        request: Request,
        body: Annotated[
            JSONObject,
            Body(
                description='{"messages": [{"key": "receipt:o-1", "profile": {"namespace": '
                '"user_id", "value": "ann"}, "template": "receipt", "purpose": "orders", '
                '"transactional": true, "context": {"event": {...}}}]}; each key is an '
                "idempotency key: sending it again answers with the first message"
            ),
        ],
    ) -> JSONObject:
        p = principal(request, Scope.WRITE)
        _only(body, {"messages"})
        items = body.get("messages")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_SENDS:
            raise InvalidInput([Issue("messages", f"a list of 1 to {MAX_SENDS} send intents")])
        with hub.tx() as conn:
            intents, issues = _intents(conn, p, items)
            if issues:
                raise InvalidInput(issues)
            try:
                sent = outbox.enqueue(conn, p.workspace_id, intents, now=hub.clock.now())
            except InvalidInput as exc:  # the outbox names items as [n]
                raise InvalidInput(
                    [Issue(f"messages{i.path}", i.reason, i.code) for i in exc.issues]
                ) from None
        hub.outbox_signal.set()  # the dispatcher sends them now
        return {"messages": [e.to_json() for e in sent]}

    def _intents(
        conn: Connection, p: Principal, items: list[Any]
    ) -> tuple[list[SendIntent], list[Issue]]:
        intents: list[SendIntent] = []
        issues: list[Issue] = []
        for n, item in enumerate(items):
            at = f"messages[{n}]"
            if not isinstance(item, dict):
                issues.append(Issue(at, "a send intent is an object"))
                continue
            unknown = sorted(set(item) - _INTENT_KEYS)
            issues += [Issue(f"{at}.{k}", "unknown field") for k in unknown]
            wrong = [
                Issue(f"{at}.{key}", reason)
                for key, ok, reason in (
                    ("key", isinstance(item.get("key"), str), "required: a string"),
                    ("template", isinstance(item.get("template"), str), "required: a name"),
                    ("purpose", isinstance(item.get("purpose", ""), str), "must be a string"),
                    (
                        "transactional",
                        isinstance(item.get("transactional", False), bool),
                        "must be true or false",
                    ),
                    ("context", isinstance(item.get("context", {}), dict), "must be an object"),
                )
                if not ok
            ]
            try:
                pid = log.resolve_profile(
                    conn, p.workspace_id, item.get("profile"), f"{at}.profile"
                )
            except InvalidInput as exc:
                wrong += exc.issues
            except NotFound as exc:
                wrong.append(Issue(f"{at}.profile", exc.message, "not_found"))
            if wrong:
                issues += wrong
                continue
            intents.append(
                SendIntent(
                    key=item["key"],
                    profile_id=pid,
                    template=item["template"],
                    source=Source("api", p.actor),
                    purpose=item.get("purpose", "marketing"),
                    transactional=item.get("transactional", False),
                    context=item.get("context", {}),
                )
            )
        return intents, issues

    @app.get("/v1/messages/{message_id}", tags=["delivery"])
    def get_message(request: Request, message_id: str) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            return log.get_message(conn, p.workspace_id, message_id).to_json()

    @app.post("/v1/messages/{message_id}/cancel", tags=["delivery"])
    def cancel(request: Request, message_id: str) -> JSONObject:
        p = principal(request, Scope.WRITE)
        with hub.tx() as conn:
            done = log.cancel(conn, p.workspace_id, message_id, actor=p.actor, now=hub.clock.now())
        return done.to_json()

    @app.get("/v1/dead-letters", tags=["delivery"])
    def list_dead_letters(
        request: Request,
        pending: Annotated[bool, Query(description="only those not replayed yet")] = False,
        before: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            found = log.list_dead_letters(
                conn, p.workspace_id, limit=limit, before=before, pending_only=pending
            )
        return {
            "dead_letters": [d.to_json() for d in found],
            "next": _next(found, limit, lambda d: d.message_id),
        }

    @app.post("/v1/dead-letters/replay", tags=["delivery"], summary="Queue dead messages again")
    def replay(
        request: Request,
        body: Annotated[
            JSONObject, Body(description='{"ids": ["<message id>", ...]} or {"all": true}')
        ],
    ) -> JSONObject:
        p = principal(request, Scope.ADMIN)
        _only(body, {"ids", "all"})
        every = body.get("all", False)
        ids = body.get("ids")
        if not isinstance(every, bool):
            raise InvalidInput([Issue("all", "must be true or false")])
        if every == (ids is not None):
            raise InvalidInput([Issue("ids", 'give either "ids" or "all": true')])
        if ids is not None and (
            not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids)
        ):
            raise InvalidInput([Issue("ids", "a non-empty list of message ids")])
        with hub.tx() as conn:
            count = log.replay(
                conn, p.workspace_id, None if every else ids, actor=p.actor, now=hub.clock.now()
            )
        hub.outbox_signal.set()
        return {"replayed": count}

    # -- a profile's inbox and push subscriptions --------------------------------------------

    @app.get("/v1/profiles/{namespace}/{value}/inbox", tags=["profiles", "delivery"])
    def get_inbox(
        request: Request,
        namespace: str,
        value: str,
        include_dismissed: bool = False,
        before: Annotated[
            str | None, Query(description="the last card of the previous page")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> JSONObject:
        p = principal(request, Scope.READ)
        now = hub.clock.now()
        with hub.engine.connect() as conn:
            pid = profile_of(conn, p, namespace, value)
            cards = log.inbox(
                conn,
                p.workspace_id,
                pid,
                now=now,
                include_dismissed=include_dismissed,
                limit=limit,
                before=before,
            )
            unread = log.unread_count(conn, p.workspace_id, pid, now=now)
        return {
            "profile_id": pid,
            "unread": unread,
            "cards": [c.to_json() for c in cards],
            "next": _next(cards, limit, lambda c: c.message_id),
        }

    def _mark(
        request: Request,
        namespace: str,
        value: str,
        message_id: str,
        how: Literal["read", "dismiss"],
    ) -> JSONObject:
        p = principal(request, Scope.WRITE)
        with hub.tx() as conn:
            pid = profile_of(conn, p, namespace, value)
            mark = log.mark_read if how == "read" else log.dismiss
            return mark(conn, p.workspace_id, pid, message_id, hub.clock.now()).to_json()

    @app.post(
        "/v1/profiles/{namespace}/{value}/inbox/{message_id}/read", tags=["profiles", "delivery"]
    )
    def read_card(request: Request, namespace: str, value: str, message_id: str) -> JSONObject:
        return _mark(request, namespace, value, message_id, "read")

    @app.post(
        "/v1/profiles/{namespace}/{value}/inbox/{message_id}/dismiss", tags=["profiles", "delivery"]
    )
    def dismiss_card(request: Request, namespace: str, value: str, message_id: str) -> JSONObject:
        return _mark(request, namespace, value, message_id, "dismiss")

    @app.get("/v1/profiles/{namespace}/{value}/push-subscriptions", tags=["profiles", "delivery"])
    def list_push(request: Request, namespace: str, value: str) -> JSONObject:
        p = principal(request, Scope.READ)
        with hub.engine.connect() as conn:
            pid = profile_of(conn, p, namespace, value)
            found = log.list_subscriptions(conn, p.workspace_id, pid)
        return {"profile_id": pid, "subscriptions": [s.to_json() for s in found]}

    @app.post(
        "/v1/profiles/{namespace}/{value}/push-subscriptions",
        tags=["profiles", "delivery"],
        status_code=201,
    )
    def register_push(
        request: Request,
        namespace: str,
        value: str,
        body: Annotated[
            JSONObject,
            Body(
                description='{"kind": "webpush", "address": <PushSubscription.toJSON()>, '
                '"label": "Firefox"} or {"kind": "fcm", "address": "<device token>"}'
            ),
        ],
    ) -> JSONObject:
        p = principal(request, Scope.WRITE)
        _only(body, {"kind", "address", "label"})
        address = body.get("address")
        if isinstance(address, dict):  # a browser's subscription as an object
            address = orjson.dumps(address).decode()
        with hub.tx() as conn:
            pid = profile_of(conn, p, namespace, value)
            sub_id = log.register_subscription(
                conn,
                p.workspace_id,
                pid,
                kind=body.get("kind"),
                address=address,
                label=body.get("label", ""),
                now=hub.clock.now(),
                allow_http=allow_http,
            )
        return {"id": sub_id, "profile_id": pid}

    @app.delete(
        "/v1/profiles/{namespace}/{value}/push-subscriptions/{subscription_id}",
        tags=["profiles", "delivery"],
        status_code=204,
    )
    def delete_push(request: Request, namespace: str, value: str, subscription_id: str) -> Response:
        p = principal(request, Scope.WRITE)
        with hub.tx() as conn:
            pid = profile_of(conn, p, namespace, value)
            log.delete_subscription(conn, p.workspace_id, subscription_id, profile_id=pid)
        return Response(status_code=204)
