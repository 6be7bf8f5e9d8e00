"""The public endpoints: links recipients follow and callbacks providers make.

None takes an API key: a signed token (:mod:`waymark.delivery.tracking`) or a provider's
request signature is the authentication, checked before anything is read or written.

- ``GET /t/{ws}/o/{token}.gif``: the open pixel, always (an open is recorded when the token is
  good); never cached.
- ``GET /t/{ws}/c/{token}``: a 302 to the destination the token carries, and a click recorded;
  a bad token gets a 404 page, never a redirect.
- ``GET /t/{ws}/u/{token}``: a page saying what will be unsubscribed, with a button: the GET
  changes nothing, since mail scanners follow links. ``POST`` unsubscribes, whatever its body
  (``List-Unsubscribe=One-Click`` from a mail client, RFC 8058, or the page's form).
- ``GET /t/{ws}/p/{token}``: the profile's consents per channel and purpose as checkboxes;
  ``POST`` saves the changes.
- ``POST /hooks/{ws}/twilio/status`` and ``/hooks/{ws}/twilio/inbound``: Twilio's callbacks,
  signed with the SMS provider's ``auth_token`` over ``{public_url}/hooks/…`` (the URL Twilio
  is given); an incoming STOP, START or HELP is answered in TwiML.
- ``POST /hooks/{ws}/sendgrid/events``: SendGrid's signed Event Webhook, verified with the
  email provider's ``event_public_key``.

A missing or failing signature is a 403. Pages are plain HTML, escaped, with no script, and a
policy that forbids any; they never show an internal error (it is logged). Clicks and opens are
recorded best effort: the recipient gets the pixel or the redirect even if the store is down.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from html import escape
from typing import Final, TypeVar
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape as xml_escape

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from waymark.channels.base import Feedback, FeedbackKind
from waymark.channels.email_api import (
    SIGNATURE_HEADER as SENDGRID_SIGNATURE,
)
from waymark.channels.email_api import (
    TIMESTAMP_HEADER as SENDGRID_TIMESTAMP,
)
from waymark.channels.email_api import (
    parse_sendgrid_events,
    verify_sendgrid_signature,
)
from waymark.channels.sms import (
    SIGNATURE_HEADER as TWILIO_SIGNATURE,
)
from waymark.channels.sms import (
    parse_twilio_inbound,
    parse_twilio_status,
    verify_twilio_signature,
)
from waymark.core.errors import Forbidden, InvalidInput, Issue, LimitExceeded
from waymark.delivery.feedback import (
    PURPOSE,
    Tracker,
    apply_inbound_text,
    apply_unsubscribe,
    brand_of,
    consent_choices,
    record_feedback,
    save_preferences,
    stored_tracking_keys,
)
from waymark.delivery.tracking import (
    PIXEL_GIF,
    BadToken,
    TrackingKeys,
    read_click,
    read_open,
    read_preferences,
    read_unsubscribe,
)
from waymark.hub import Hub

__all__ = ["add_tracking_routes"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The names messages record for the providers whose callbacks these are (their defaults in
#: :mod:`waymark.channels`): a callback finds its message by ``(provider, provider id)``.
TWILIO: Final = "twilio"
SENDGRID: Final = "sendgrid"
_FORM_LIMIT: Final = 64 * 1024
_EVENTS_LIMIT: Final = 8 * 1024 * 1024
_MAX_CHOICES: Final = 200
#: workspace ids are UUIDs; anything else cannot be one (and must not reach the database)
_WORKSPACE_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_CACHE: Final = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
_PAGE_HEADERS: Final = {
    **_NO_CACHE,
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "X-Robots-Tag": "noindex, nofollow",
}
_STYLE: Final = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:34rem;margin:3rem auto;padding:0 1rem;"
    "color:#222}button{font:inherit;padding:.5rem 1.2rem;cursor:pointer}"
    "label{display:block;margin:.4rem 0}fieldset{border:1px solid #ccc;margin:1rem 0}"
)
_CHANNELS: Final = {
    "email": "Email",
    "sms": "Text messages (SMS)",
    "push": "Push notifications",
    "inbox": "In-app messages",
    "webhook": "Webhooks",
}


def _page(title: str, *body: str, status: int = 200) -> HTMLResponse:
    """A small HTML page; ``body`` is HTML already escaped."""
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{''.join(body)}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=_PAGE_HEADERS)


def _p(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def _not_found() -> HTMLResponse:
    return _page(
        "Link not found",
        _p("This link is not valid. It may have been copied incompletely."),
        status=404,
    )


def _unavailable() -> HTMLResponse:
    return _page(
        "Please try again",
        _p("We could not do that just now. Please try again in a few minutes."),
        status=503,
    )


def _what(channel: str, purpose: str) -> str:
    """How a consent reads to a recipient: "marketing email", "all text messages (SMS)"."""
    label = _CHANNELS.get(channel, channel)
    label = label[:1].lower() + label[1:]
    return f"all {label}" if purpose == "*" else f"{purpose.replace('_', ' ')} {label}"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


async def _body(request: Request, limit: int) -> bytes:
    """The request body; :class:`LimitExceeded` past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise LimitExceeded(f"the body is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise LimitExceeded(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _form(raw: bytes) -> list[tuple[str, str]]:
    """The fields of a form-encoded body; :class:`InvalidInput` when it is not one."""
    try:
        return parse_qsl(
            raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=1000
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput([Issue("", "the body is not a form")]) from None


def _twiml(reply: str | None) -> Response:
    text = (
        "<Response/>"
        if reply is None
        else f"<Response><Message>{xml_escape(reply)}</Message></Response>"
    )
    return Response('<?xml version="1.0" encoding="UTF-8"?>' + text, media_type="application/xml")


def add_tracking_routes(app: FastAPI, hub: Hub, tracker: Tracker) -> None:
    """Register the endpoints of the module docstring on ``app``; ``tracker`` builds the links
    (its ``public_url`` is also the base of the URLs Twilio signs)."""
    settings = hub.settings

    def keys_of(workspace_id: str) -> TrackingKeys | None:
        if not _WORKSPACE_ID.fullmatch(workspace_id):
            return None
        with hub.engine.connect() as conn:
            return stored_tracking_keys(conn, workspace_id)

    def read(
        reader: Callable[..., T], workspace_id: str, token: str
    ) -> tuple[TrackingKeys, T] | None:
        """What a good token carries, with the workspace's keys; None for any bad token
        (store errors propagate: the caller decides what the recipient sees)."""
        keys = keys_of(workspace_id)
        if keys is None:
            return None
        try:
            return keys, reader(keys, token, now=hub.clock.now())
        except BadToken:
            return None

    def record(
        workspace_id: str,
        feedback: Feedback,
        *,
        provider: str | None = None,
        link_id: int | None = None,
    ) -> None:
        """Apply one report in its own transaction; the mover told if it wrote anything."""
        with hub.tx() as conn:
            applied = record_feedback(
                conn,
                workspace_id,
                feedback,
                provider=provider,
                now=hub.clock.now(),
                soft_bounce_limit=settings.soft_bounce_limit,
                soft_bounce_days=settings.soft_bounce_days,
                link_id=link_id,
            )
        if applied is not None:
            hub.inbox_signal.set()

    # -- recipients -------------------------------------------------------------------------

    @app.get("/t/{workspace_id}/o/{token}", tags=["tracking"], response_class=Response)
    def open_pixel(workspace_id: str, token: str) -> Response:
        """The open pixel (a 1x1 GIF) for any token; an open recorded for a good one."""
        try:
            found = read(read_open, workspace_id, token)
            if found is not None:
                opened = found[1].message_id
                record(
                    workspace_id, Feedback(FeedbackKind.OPENED, hub.clock.now(), message_id=opened)
                )
        except Exception:  # the pixel is served all the same
            log.exception("recording an open failed")
        return Response(PIXEL_GIF, media_type="image/gif", headers=_NO_CACHE)

    @app.get("/t/{workspace_id}/c/{token}", tags=["tracking"], response_class=HTMLResponse)
    def click(workspace_id: str, token: str) -> Response:
        """A redirect to the token's destination; 404 for a bad token."""
        try:
            found = read(read_click, workspace_id, token)
        except Exception:  # the token cannot be checked: no redirect
            log.exception("reading a click failed")
            return _unavailable()
        if found is None:
            return _not_found()
        clicked = found[1]
        feedback = Feedback(
            FeedbackKind.CLICKED, hub.clock.now(), message_id=clicked.message_id, url=clicked.url
        )
        try:
            record(workspace_id, feedback, link_id=clicked.link_id)
        except Exception:  # the recipient goes on all the same
            log.exception("recording a click failed")
        return RedirectResponse(
            clicked.url,
            status_code=302,
            headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
        )

    @app.get("/t/{workspace_id}/u/{token}", tags=["tracking"], response_class=HTMLResponse)
    def unsubscribe_page(workspace_id: str, token: str) -> Response:
        """What the link unsubscribes from, and a button to do it; changes nothing."""
        try:
            found = read(read_unsubscribe, workspace_id, token)
            if found is None:
                return _not_found()
            with hub.engine.connect() as conn:
                brand = brand_of(conn, workspace_id).name
        except Exception:
            log.exception("showing an unsubscribe page failed")
            return _unavailable()
        keys, asked = found
        manage = tracker.preferences_url(
            keys, workspace_id, message_id=asked.message_id, profile_id=asked.profile_id
        )
        return _page(
            "Unsubscribe",
            _p(f"Stop receiving {_what(asked.channel.value, asked.purpose)} from {brand}?"),
            '<form method="post"><input type="hidden" name="List-Unsubscribe" '
            'value="One-Click"><button type="submit">Unsubscribe</button></form>',
            f'<p><a href="{escape(manage)}">Manage all your preferences</a></p>',
        )

    @app.post("/t/{workspace_id}/u/{token}", tags=["tracking"], response_class=HTMLResponse)
    def unsubscribe(workspace_id: str, token: str) -> Response:
        """Unsubscribe (RFC 8058 one-click, or the page's button)."""
        try:
            found = read(read_unsubscribe, workspace_id, token)
            if found is None:
                return _not_found()
            asked = found[1]
            with hub.tx() as conn:
                done = apply_unsubscribe(conn, workspace_id, asked, now=hub.clock.now())
                brand = brand_of(conn, workspace_id).name
        except Exception:
            log.exception("unsubscribing failed")
            return _unavailable()
        if not done:
            return _page("Nothing to unsubscribe", _p("We no longer hold any data about you."))
        hub.inbox_signal.set()
        return _page(
            "You are unsubscribed",
            _p(f"You will get no more {_what(asked.channel.value, asked.purpose)} from {brand}."),
        )

    def preference_form(workspace_id: str, token: str, *, saved: bool) -> Response:
        found = read(read_preferences, workspace_id, token)
        if found is None:
            return _not_found()
        with hub.engine.connect() as conn:
            choices = consent_choices(conn, workspace_id, found[1])
            brand = brand_of(conn, workspace_id).name
        if choices is None:
            return _page("Your preferences", _p("We no longer hold any data about you."))
        rows: list[str] = []
        for channel, purpose, status in choices[1]:
            key = escape(f"{channel}:{purpose}")
            checked = " checked" if status == "opted_in" else ""
            rows.append(
                f'<input type="hidden" name="shown" value="{key}">'
                f'<label><input type="checkbox" name="on" value="{key}"{checked}> '
                f"{escape(_capital(_what(channel, purpose)))}"
                "</label>"
            )
        return _page(
            "Your preferences",
            _p("Your preferences are saved.") if saved else "",
            _p(f"Choose what {brand} may send you."),
            '<form method="post"><fieldset>',
            *(rows or [_p("You have no subscriptions.")]),
            '</fieldset><button type="submit">Save</button></form>',
        )

    @app.get("/t/{workspace_id}/p/{token}", tags=["tracking"], response_class=HTMLResponse)
    def preferences_page(workspace_id: str, token: str) -> Response:
        """The profile's consents, as a form."""
        try:
            return preference_form(workspace_id, token, saved=False)
        except Exception:
            log.exception("showing a preference page failed")
            return _unavailable()

    @app.post("/t/{workspace_id}/p/{token}", tags=["tracking"], response_class=HTMLResponse)
    async def save_preference_page(workspace_id: str, token: str, request: Request) -> Response:
        """Save the form: each shown consent checked is opted in, unchecked opted out."""
        try:
            fields = _form(await _body(request, _FORM_LIMIT))
        except (InvalidInput, LimitExceeded):
            return _page("Please try again", _p("The form could not be read."), status=400)
        shown = {v for k, v in fields if k == "shown"}
        on = {v for k, v in fields if k == "on"}
        wanted: dict[tuple[str, str], bool] = {}
        for value in sorted(shown)[:_MAX_CHOICES]:
            channel, _, purpose = value.partition(":")
            if not PURPOSE.fullmatch(purpose):
                return _page("Please try again", _p("The form could not be read."), status=400)
            wanted[(channel, purpose)] = value in on

        def save() -> Response:
            found = read(read_preferences, workspace_id, token)
            if found is None:
                return _not_found()
            with hub.tx() as conn:
                choices = consent_choices(conn, workspace_id, found[1])
                if choices is not None:
                    save_preferences(conn, workspace_id, choices[0], wanted, now=hub.clock.now())
            return preference_form(workspace_id, token, saved=True)

        try:
            return await run_in_threadpool(save)
        except InvalidInput:
            return _page("Please try again", _p("The form could not be read."), status=400)
        except Exception:
            log.exception("saving preferences failed")
            return _unavailable()

    # -- providers --------------------------------------------------------------------------

    async def twilio_params(workspace_id: str, request: Request, endpoint: str) -> dict[str, str]:
        """The callback's form fields once its signature verifies; :class:`Forbidden` else."""
        auth_token = (settings.providers.get("sms") or {}).get("auth_token")
        if not isinstance(auth_token, str) or not auth_token:
            raise Forbidden("no SMS provider with an auth token is configured")
        signature = request.headers.get(TWILIO_SIGNATURE)
        if not signature:
            raise Forbidden(f"the {TWILIO_SIGNATURE} header is missing")
        params = dict(_form(await _body(request, _FORM_LIMIT)))
        url = f"{tracker.public_url}/hooks/{workspace_id}/twilio/{endpoint}"
        if request.url.query:
            url += f"?{request.url.query}"
        if not verify_twilio_signature(auth_token, url, params, signature):
            raise Forbidden("the request signature does not verify")
        return params

    @app.post("/hooks/{workspace_id}/twilio/status", tags=["tracking"], status_code=204)
    async def twilio_status(workspace_id: str, request: Request) -> Response:
        """A Twilio status callback: delivered, undelivered or failed texts."""
        params = await twilio_params(workspace_id, request, "status")
        feedback = parse_twilio_status(params, at=hub.clock.now())
        if feedback is not None and _WORKSPACE_ID.fullmatch(workspace_id):
            await run_in_threadpool(record, workspace_id, feedback, provider=TWILIO)
        return Response(status_code=204)

    @app.post("/hooks/{workspace_id}/twilio/inbound", tags=["tracking"])
    async def twilio_inbound(workspace_id: str, request: Request) -> Response:
        """A text sent to the workspace's number: keywords acted on and answered in TwiML."""
        params = await twilio_params(workspace_id, request, "inbound")
        text = parse_twilio_inbound(params, at=hub.clock.now())

        def apply() -> str | None:
            if not _WORKSPACE_ID.fullmatch(workspace_id):
                return None
            with hub.tx() as conn:
                brand = brand_of(conn, workspace_id)
                return apply_inbound_text(
                    conn,
                    workspace_id,
                    text,
                    brand=brand.name,
                    help_text=brand.sms_help,
                    now=hub.clock.now(),
                )

        return _twiml(await run_in_threadpool(apply))

    @app.post("/hooks/{workspace_id}/sendgrid/events", tags=["tracking"], status_code=204)
    async def sendgrid_events(workspace_id: str, request: Request) -> Response:
        """SendGrid's Event Webhook: a signed JSON array of events."""
        key = (settings.providers.get("email") or {}).get("event_public_key")
        if not isinstance(key, str) or not key:
            raise Forbidden("no email provider with an event verification key is configured")
        signature = request.headers.get(SENDGRID_SIGNATURE)
        timestamp = request.headers.get(SENDGRID_TIMESTAMP)
        if not signature or not timestamp:
            raise Forbidden("the event webhook's signature headers are missing")
        body = await _body(request, _EVENTS_LIMIT)
        try:
            good = verify_sendgrid_signature(key, body, signature, timestamp)
        except ValueError:
            log.error("the email provider's event_public_key cannot be read")
            good = False
        if not good:
            raise Forbidden("the request signature does not verify")
        events = parse_sendgrid_events(body, at_fallback=hub.clock.now())
        if events and _WORKSPACE_ID.fullmatch(workspace_id):
            await run_in_threadpool(record_all, workspace_id, events)
        return Response(status_code=204)

    def record_all(workspace_id: str, events: Sequence[Feedback]) -> None:
        applied = False
        with hub.tx() as conn:
            for feedback in events:
                found = record_feedback(
                    conn,
                    workspace_id,
                    feedback,
                    provider=SENDGRID,
                    now=hub.clock.now(),
                    soft_bounce_limit=settings.soft_bounce_limit,
                    soft_bounce_days=settings.soft_bounce_days,
                )
                applied = applied or found is not None
        if applied:
            hub.inbox_signal.set()
