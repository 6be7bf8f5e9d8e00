"""The development sink's pages: what Waymark sent in the demo, newest first.

``GET /dev/sink`` lists the messages (a channel filter by ``?channel=``), ``GET /dev/sink/{id}``
shows one, ``GET /dev/sink/{id}/raw`` its stored file as text, and ``GET /dev/sink/messages.json``
is the listing as JSON. There is no authentication: mount the router only for development.

The pages are server-rendered HTML without JavaScript; every value shown is escaped. An email's
HTML part is never part of the page: it is shown in an ``<iframe sandbox srcdoc="...">`` (no
scripts, no forms, no same origin), and the pages' Content-Security-Policy forbids scripts as a
second fence (a ``srcdoc`` frame inherits it).
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Annotated, Any, Final

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from waymark.channels.sink import CallDetail, EmailDetail, SinkEntry, SinkStore
from waymark.delivery.templates import Channel

__all__ = ["sink_router"]

_HEADERS: Final = {
    "Content-Security-Policy": (
        "script-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_STYLE: Final = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:72rem;padding:0 1rem;
color:#1d2430}
h1{font-size:1.3rem;margin:0 0 .6rem}h2{font-size:1rem;margin:1.4rem 0 .4rem}
a{color:#1f5fbf}nav a{margin-right:.7rem}nav a.on{font-weight:600;color:#1d2430}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;vertical-align:top;padding:.3rem .6rem;border-bottom:1px solid #e3e6eb}
th{font-weight:600;color:#5a6474;white-space:nowrap}
td.when{white-space:nowrap;color:#5a6474}
.tag{display:inline-block;padding:0 .4rem;border-radius:.3rem;background:#eef1f5;font-size:.85em}
pre{background:#f6f7f9;padding:.7rem;overflow:auto;white-space:pre-wrap;margin:0}
iframe{width:100%;height:32rem;border:1px solid #d5d9e0;background:#fff}
.empty{color:#5a6474}
"""

Limit = Annotated[int, Query(ge=1, le=1000)]


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    """A whole page; ``body`` is HTML whose values are escaped already."""
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)} · Waymark sink</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return HTMLResponse(document, status_code=status_code, headers=_HEADERS)


def _when(entry: SinkEntry) -> str:
    return entry.received_at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _rows(rows: list[tuple[str, str]]) -> str:
    """A two-column table; both columns are escaped here."""
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _listing(request: Request, entries: list[SinkEntry], channel: Channel | None) -> str:
    links = [("all messages", None), *((c.value, c) for c in Channel)]
    nav = "".join(
        f'<a href="{_filter_href(request, c)}"{" class=on" if c is channel else ""}>'
        f"{escape(label)}</a>"
        for label, c in links
    )
    if not entries:
        table = '<p class="empty">Nothing received yet.</p>'
    else:
        rows = "".join(
            "<tr>"
            f'<td class="when">{escape(_when(e))}</td>'
            f'<td><span class="tag">{escape(e.channel.value)}</span></td>'
            f"<td>{escape(e.to)}</td>"
            f'<td><a href="{_href(request, "sink_entry", entry_id=e.id)}">'
            f"{escape(e.summary or '(empty)')}</a></td>"
            "</tr>"
            for e in entries
        )
        table = (
            "<table><tr><th>received</th><th>channel</th><th>to</th><th>subject / summary</th>"
            f"</tr>{rows}</table>"
        )
    return f"<h1>Sent by Waymark</h1><nav>{nav}</nav>{table}"


def _href(request: Request, name: str, **path_params: str) -> str:
    """The escaped URL of the route ``name``."""
    return escape(str(request.url_for(name, **path_params)))


def _filter_href(request: Request, channel: Channel | None) -> str:
    url = request.url_for("sink_list")
    return escape(str(url if channel is None else url.include_query_params(channel=channel.value)))


def _email(entry: SinkEntry, detail: EmailDetail) -> str:
    parts = [
        "<h2>Envelope</h2>",
        _rows([("MAIL FROM", detail.mail_from), *(("RCPT TO", r) for r in detail.rcpt_to)]),
        "<h2>Headers</h2>",
        _rows(list(detail.headers)),
    ]
    if detail.html is not None:
        # the message's HTML only ever inside the attribute, escaped: the frame's document
        parts += [
            "<h2>HTML part</h2>",
            f'<iframe sandbox="" title="HTML part of {escape(entry.summary)}" '
            f'srcdoc="{escape(detail.html, quote=True)}"></iframe>',
        ]
    if detail.text is not None:
        parts += ["<h2>Text part</h2>", f"<pre>{escape(detail.text)}</pre>"]
    if detail.attachments:
        names = "".join(f"<li>{escape(name)}</li>" for name in detail.attachments)
        parts += ["<h2>Attachments</h2>", f"<ul>{names}</ul>"]
    return "".join(parts)


def _call(detail: CallDetail) -> str:
    parts = [
        _rows([("message id", detail.message_id), ("created", detail.created_at.isoformat())]),
        "<h2>Fields</h2>",
        _fields(detail.fields),
    ]
    if detail.data:
        parts += ["<h2>Data</h2>", _fields(detail.data)]
    if detail.json is not None:
        shown = orjson.dumps(detail.json, option=orjson.OPT_INDENT_2).decode()
        parts += ["<h2>JSON body</h2>", f"<pre>{escape(shown)}</pre>"]
    if detail.headers:
        parts += ["<h2>Headers</h2>", _rows(list(detail.headers.items()))]
    return "".join(parts)


def _fields(values: Mapping[str, Any]) -> str:
    cells = "".join(
        f"<tr><th>{escape(str(k))}</th><td><pre>{escape(str(v))}</pre></td></tr>"
        for k, v in values.items()
    )
    return f"<table>{cells}</table>"


def sink_router(store: SinkStore) -> APIRouter:
    """The routes of the module docstring over ``store`` (left out of the OpenAPI schema)."""
    router = APIRouter(prefix="/dev/sink", tags=["development"], include_in_schema=False)

    @router.get("", name="sink_list")
    def listing(
        request: Request, channel: Channel | None = None, limit: Limit = 100
    ) -> HTMLResponse:
        entries = store.list(channel, limit)
        return _page("Messages", _listing(request, entries, channel))

    @router.get("/messages.json", name="sink_messages")
    def messages(channel: Channel | None = None, limit: Limit = 100) -> dict[str, Any]:
        return {"messages": [entry.to_json() for entry in store.list(channel, limit)]}

    @router.get("/{entry_id}", name="sink_entry")
    def entry(request: Request, entry_id: str) -> HTMLResponse:
        found = store.get(entry_id)
        back = f'<p><a href="{_href(request, "sink_list")}">← all messages</a></p>'
        if found is None:
            return _page("Not found", f"{back}<h1>No message {escape(entry_id)}</h1>", 404)
        detail = found.detail()
        about = [("channel", found.channel.value), ("to", found.to), ("received", _when(found))]
        body = "".join(
            [
                back,
                f"<h1>{escape(found.summary or '(empty)')}</h1>",
                _rows(about),
                f'<p><a href="{_href(request, "sink_raw", entry_id=found.id)}">stored file</a></p>',
                _email(found, detail) if isinstance(detail, EmailDetail) else _call(detail),
            ]
        )
        return _page(found.summary or found.id, body)

    @router.get("/{entry_id}/raw", name="sink_raw")
    def raw(entry_id: str) -> PlainTextResponse:
        found = store.get(entry_id)
        if found is None:
            return PlainTextResponse("not found", status_code=404, headers=_HEADERS)
        return PlainTextResponse(found.raw.decode("utf-8", "replace"), headers=_HEADERS)

    return router
