"""The end-to-end demo on the embedded default: ``./dev demo`` (or ``waymark demo run``).

It generates a synthetic shop, imports it, serves the API, streams live Segment-spec calls as
a browser would, looks the shopper up, searches, builds audiences (validated, estimated, run
in batch, compared) and runs a privacy export and deletion. Each capability that lands adds its
step here.
"""

from __future__ import annotations

import base64
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import uvicorn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from waymark.access import service as access
from waymark.demo.generate import generate, load_demo_schema
from waymark.hub import Hub
from waymark.ingestion.files import run_import
from waymark.profiles.schema_store import save_schema
from waymark.settings import load_settings
from waymark.storage.tables import identities, profile_merges
from waymark.storage.tables import profiles as profiles_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """uvicorn in a thread, on a loopback port, for the demo's live traffic."""

    def __init__(self, hub: Hub, port: int) -> None:
        from waymark.api.app import create_app

        self.port = port
        config = uvicorn.Config(
            create_app(hub), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the demo API did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def _progress(bar: Progress, task: TaskID) -> Callable[[int, int | None], None]:
    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return update


def _basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def _live_session(now: datetime) -> dict[str, Any]:
    """A shopper browsing anonymously, logging in, and buying: what analytics.js would send."""
    anon = "demo-browser-7f3a"
    stamp = now.isoformat()
    ctx = {"library": {"name": "analytics.js", "version": "5.2.0"}, "ip": "203.0.113.7"}
    return {
        "batch": [
            {
                "type": "page",
                "anonymousId": anon,
                "name": "Home",
                "timestamp": stamp,
                "messageId": "demo-live-1",
                "context": ctx,
            },
            {
                "type": "track",
                "anonymousId": anon,
                "event": "product_view",
                "timestamp": stamp,
                "messageId": "demo-live-2",
                "properties": {"sku": "SKU-1042", "category": "shoes", "price": 89.0},
            },
            {
                "type": "track",
                "anonymousId": anon,
                "event": "cart_add",
                "timestamp": stamp,
                "messageId": "demo-live-3",
                "properties": {"sku": "SKU-1042", "category": "shoes", "price": 89.0},
            },
            {
                "type": "identify",
                "anonymousId": anon,
                "userId": "demo-live-user",
                "timestamp": stamp,
                "messageId": "demo-live-4",
                "traits": {
                    "email": "live.shopper@example.com",
                    "first_name": "Robin",
                    "country": "NL",
                    "plan": "plus",
                },
            },
            {
                "type": "track",
                "userId": "demo-live-user",
                "anonymousId": anon,
                "event": "purchase",
                "timestamp": stamp,
                "messageId": "demo-live-5",
                "properties": {
                    "order_id": "DEMO-1",
                    "revenue": 89.0,
                    "currency": "EUR",
                    "items": 1,
                    "category": "shoes",
                },
            },
            {
                "type": "track",
                "userId": "demo-live-user",
                "event": "purchase",
                "timestamp": stamp,
                "messageId": "demo-live-6",
                "properties": {"revenue": "a lot"},
            },  # bad on purpose: rejected with a reason
        ],
        "sentAt": stamp,
    }


#: The demo's audiences: one of each kind of condition the language has.
DEMO_AUDIENCES = {
    "recent buyers": "count(purchase within last 30 days) >= 2",
    "big spenders": "sum(purchase.revenue within last 90 days) >= 250",
    "window shoppers": "product_view within last 7 days and not purchase within last 7 days",
    "abandoned carts": "cart_add within last 3 days then not purchase within 1 hour",
    "shoe fans": 'count(purchase where category = "shoes") >= 2 or last(product_view).category '
    '= "shoes"',
    "german big spenders": 'country = "DE" and in audience "big spenders"',
    "email marketable": "consent(email, marketing) = opted_in and email exists",
    "birthday this week": "birthday in next 7 days",
}


def _audiences(out: Console, http: httpx.Client, auth: dict[str, str]) -> None:
    """Validate, save, estimate and run the demo audiences through the API; show the results."""
    bad = http.post("/v1/audiences/validate", json={"definition": 'contry = "DE"'}, headers=auth)
    out.print(f"a typo is caught: {bad.json()['error']['errors'][0]['reason']}")
    t = Table(title="audiences: streaming ones built by serve, then a batch run of each agrees")
    for column in ("audience", "definition", "mode", "estimate (5 %)", "members", "run ms"):
        t.add_column(column, justify="right" if column in ("members", "run ms") else "left")
    for name, text in DEMO_AUDIENCES.items():
        saved = http.post("/v1/audiences", json={"name": name, "definition": text}, headers=auth)
        saved.raise_for_status()
        guess = http.get(f"/v1/audiences/{name}/estimate", headers=auth).json()
        started = time.monotonic()
        run = http.post(f"/v1/audiences/{name}/runs", headers=auth).json()
        elapsed = (time.monotonic() - started) * 1000
        t.add_row(
            name,
            saved.json()["text"],
            saved.json()["mode"],
            f"{guess['estimate']:,} ({guess['low']:,}–{guess['high']:,})",
            f"{run['members']:,}",
            f"{elapsed:.0f}",
        )
    out.print(t)
    both = http.get("/v1/audiences/recent buyers/overlap/big spenders", headers=auth).json()
    out.print(
        f"recent buyers / big spenders: {both['both']:,} in both, "
        f"{both['only_first']:,} and {both['only_second']:,} in one only"
    )
    sql = http.get("/v1/audiences/abandoned carts/explain?dialect=duckdb", headers=auth).json()
    lines = sql["sql"]["duckdb"].splitlines()
    out.print(
        f"abandoned carts compiles to {len(lines)} lines of DuckDB SQL (also 6 other dialects)"
    )
    mine = http.get("/v1/profiles/email/live.shopper@example.com/audiences", headers=auth).json()
    out.print(
        "the live shopper is in: "
        + (", ".join(m["audience"] for m in mine["audiences"] if m["status"] == "realized") or "-")
    )


def _in(http: httpx.Client, auth: dict[str, str], user: str) -> set[str]:
    found = http.get(f"/v1/profiles/user_id/{user}/audiences", headers=auth)
    if found.status_code == 404:
        return set()
    return {m["audience"] for m in found.json()["audiences"] if m["status"] == "realized"}


def _live_audiences(
    out: Console, http: httpx.Client, write: dict[str, str], auth: dict[str, str]
) -> None:
    """A new shopper's events, one call at a time: after each, how long until serve has
    updated the streaming memberships (read back through the API)."""
    user = "demo-live-buyer"
    before: set[str] = set()
    t = Table(title="a new shopper, live: each call, then the memberships serve keeps")
    for column in ("call", "entered", "left", "ms until visible"):
        t.add_column(column, justify="right" if column.startswith("ms") else "left")
    steps: list[tuple[str, dict[str, Any]]] = [
        ("identify (country FR)", {"type": "identify", "traits": {"country": "FR"}}),
        (
            "purchase 150 (shoes)",
            {"type": "track", "event": "purchase", "properties": {"revenue": 150.0}},
        ),
        (
            "purchase 120 (shoes)",
            {"type": "track", "event": "purchase", "properties": {"revenue": 120.0}},
        ),
        ("identify (moved to DE)", {"type": "identify", "traits": {"country": "DE"}}),
    ]
    for n, (label, call) in enumerate(steps):
        body = {**call, "userId": user, "messageId": f"demo-stream-{n}"}
        if call["type"] == "track":
            body["properties"] = {**call["properties"], "order_id": f"L{n}", "category": "shoes"}
        started = time.monotonic()
        r = http.post(
            "/v1/track" if call["type"] == "track" else "/v1/identify", json=body, headers=write
        )
        r.raise_for_status()
        now = before
        waited = 0.0
        while time.monotonic() - started < 1.5:
            now = _in(http, auth, user)
            waited = (time.monotonic() - started) * 1000
            if now != before:
                break
            time.sleep(0.005)
        t.add_row(
            label,
            ", ".join(sorted(now - before)) or "-",
            ", ".join(sorted(before - now)) or "-",
            f"{waited:.0f}" if now != before else "(no change)",
        )
        before = now
    out.print(t)


WELCOME = {
    "channel": "email",
    "subject": "{{ profile.first_name | default: 'Hello' }}, new arrivals in shoes",
    "preheader": "Picked for {{ profile.city | default: 'you' }}",
    "html": (
        "<html><body><h1>Hi {{ profile.first_name | default: 'there' }}!</h1>"
        "<p>New boots and sneakers are in. <a href='https://shop.example.com/shoes'>Have a "
        "look</a>.</p>{% render 'footer', unsubscribe: message.unsubscribe_url, "
        "preferences: message.preferences_url %}</body></html>"
    ),
}
FOOTER = (
    "<p style='font-size:11px'><a href='{{ unsubscribe }}'>Unsubscribe</a> · "
    "<a href='{{ preferences }}'>Preferences</a></p>"
)
DEMO_RULES = {
    "caps": [
        {"name": "two a week", "channel": "email", "purpose": "marketing", "limit": 2, "per": "7d"}
    ],
    "quiet_hours": [
        {"name": "night", "channels": ["sms", "push"], "start": "21:00", "end": "08:00"}
    ],
}


def _wait_sent(http: httpx.Client, auth: dict[str, str], ids: list[str]) -> dict[str, Any]:
    """The messages once none is waiting to be sent (serve's dispatcher sends them)."""
    deadline = time.monotonic() + 30
    while True:
        found = [http.get(f"/v1/messages/{i}", headers=auth).json() for i in ids]
        if all(m["status"] not in ("queued", "sending") for m in found) or (
            time.monotonic() > deadline
        ):
            return {m["id"]: m for m in found}
        time.sleep(0.2)


def _messages(out: Console, http: httpx.Client, auth: dict[str, str], base: str) -> None:
    """Templates checked when saved, rules, a send to an audience through the outbox, the
    dispatcher delivering to the development sink, a tracked click and a one-click
    unsubscribe becoming events and consent."""
    bad = http.post(
        "/v1/templates/validate",
        json={"definition": {"channel": "sms", "text": "Hi {{ profile.frist_name }}"}},
        headers=auth,
    )
    out.print(f"a template typo is caught: {bad.json()['error']['errors'][0]['reason']}")
    http.put("/v1/fragments/footer", json={"source": FOOTER}, headers=auth).raise_for_status()
    http.put("/v1/templates/new arrivals", json=WELCOME, headers=auth).raise_for_status()
    http.put("/v1/delivery/rules", json=DEMO_RULES, headers=auth).raise_for_status()
    members = http.get(
        "/v1/audiences/shoe fans/members", params={"limit": 200}, headers=auth
    ).json()["members"]
    intents = [
        {
            "key": f"demo:new-arrivals:{m['profile_id']}",
            "profile": m["profile_id"],
            "template": "new arrivals",
        }
        for m in members
    ]
    started = time.monotonic()
    written = http.post("/v1/messages", json={"messages": intents}, headers=auth).json()
    again = http.post("/v1/messages", json={"messages": intents[:5]}, headers=auth).json()
    ids = [m["message_id"] for m in written["messages"]]
    done = _wait_sent(http, auth, ids)
    elapsed = time.monotonic() - started
    outcomes: dict[str, int] = {}
    for m in done.values():
        label = m["status"] if m["status"] != "excluded" else f"excluded: {m['reason']}"
        outcomes[label] = outcomes.get(label, 0) + 1
    t = Table(
        title=f"'new arrivals' to {len(intents)} shoe fans, decided and sent in {elapsed:.1f} s"
    )
    t.add_column("outcome")
    t.add_column("messages", justify="right")
    for label, count in sorted(outcomes.items()):
        t.add_row(label, f"{count:,}")
    out.print(t)
    out.print(
        f"the same 5 intents written again: {sum(m['duplicate'] for m in again['messages'])} "
        "duplicates, nothing sent twice"
    )
    sink = http.get("/dev/sink/messages.json", params={"limit": 500}).json()["messages"]
    out.print(f"the development sink received {len(sink)} emails: {base}/dev/sink")
    sent = next((m for m in done.values() if m["status"] == "sent"), None)
    if sent is None:
        return
    html = sent["content"]["fields"]["html"]
    mail = next(e for e in sink if e["id"] and sent["to"] in e["to"])
    raw = http.get(f"/dev/sink/{mail['id']}/raw").text
    tracked = re.search(
        r"http://127\.0\.0\.1:\d+/t/[^/]+/c/[A-Za-z0-9_=-]+", raw.replace("=\n", "")
    )
    if tracked:
        click = http.get(tracked.group(0), follow_redirects=False)
        out.print(
            f"a click on the tracked link -> {click.status_code} to {click.headers['location']}"
        )
    unsubscribe = re.search(r"/t/[^/]+/u/[A-Za-z0-9_=-]+", html)
    if unsubscribe:
        done_page = http.post(unsubscribe.group(0), data={"List-Unsubscribe": "One-Click"})
        out.print(f"one-click unsubscribe -> {done_page.status_code}")
    names: set[str] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not {"message.clicked", "message.unsubscribed"} <= names:
        time.sleep(0.2)  # serve moves the feedback events into the log within a second
        events = http.get(f"/v1/profiles/email/{sent['to']}/events", headers=auth)
        if events.status_code == 200:
            names = {
                str(e["name"])
                for e in events.json()["events"]
                if str(e["name"]).startswith("message.")
            }
    out.print("the recipient's profile now has the events: " + (", ".join(sorted(names)) or "-"))
    later = http.post(
        "/v1/messages",
        json={
            "messages": [
                {"key": "demo:later", "profile": sent["profile_id"], "template": "new arrivals"}
            ]
        },
        headers=auth,
    ).json()["messages"][0]
    out.print(
        f"the next marketing email to them: {later['status']} "
        f"({later['decision'].get('reason', '-')}: {later['decision'].get('detail', '')})"
    )


def run_demo(folder: Path, *, profiles: int = 2000, console: Console | None = None) -> None:
    """Run every step of the demo in ``folder`` (its hub is recreated each run)."""
    out = console or Console()
    started = time.monotonic()
    hub_dir = folder / "hub"
    if hub_dir.exists():
        shutil.rmtree(hub_dir)
    dataset = folder / "dataset"
    now = datetime.now(UTC)

    out.rule("[bold]1. Synthetic shop data")
    with Progress(console=out) as bar:
        task = bar.add_task("generating", total=profiles)
        summary = generate(
            dataset,
            profiles=profiles,
            end=now,
            days=90,
            fmt="parquet",
            progress=lambda d, t: bar.update(task, completed=d, total=t),
        )
    out.print(
        f"{summary.profiles:,} customers, {summary.events:,} events, "
        f"{summary.anonymous_visitors:,} anonymous visitors in {dataset}"
    )

    port = _free_port()
    # tracked links, the pixel and unsubscribe pages point at the demo's own server
    settings = load_settings(environ={}, data_dir=hub_dir, public_url=f"http://127.0.0.1:{port}")
    hub = Hub.open(settings)
    try:
        out.rule("[bold]2. Workspace, keys and schema")
        with hub.tx() as conn:
            ws, write, admin = access.create_workspace(
                conn, name="demo-shop", actor="demo", at=hub.clock.now()
            )
            reader = access.create_key(
                conn,
                workspace_id=ws.id,
                kind="secret",
                scopes=["read"],
                name="demo reader",
                actor="demo",
                at=hub.clock.now(),
            )
            saved = save_schema(
                conn,
                workspace_id=ws.id,
                document=load_demo_schema(),
                actor="demo",
                at=hub.clock.now(),
            )
        out.print(
            f"workspace {ws.name}; schema version {saved.version}; write key {write.secret[:10]}…"
        )

        out.rule("[bold]3. Batch import (Parquet)")
        kinds: tuple[Literal["profiles", "events"], ...] = ("profiles", "events")
        for kind in kinds:
            path = next(p for p in summary.files if p.name.startswith(kind))
            with Progress(
                "{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=out,
            ) as bar:
                report = run_import(
                    hub,
                    workspace_id=ws.id,
                    kind=kind,
                    path=path,
                    actor="demo",
                    progress=_progress(bar, bar.add_task(f"importing {kind}", total=None)),
                )
            data = report.to_json()
            out.print(
                {
                    k: v
                    for k, v in data.items()
                    if k
                    in (
                        "rows_read",
                        "rows_accepted",
                        "rows_rejected",
                        "profiles_created",
                        "profiles_merged",
                        "elapsed_seconds",
                    )
                }
            )

        out.rule("[bold]4. Live Segment-spec traffic over HTTP")
        with _Server(hub, port) as base, httpx.Client(base_url=base, timeout=30) as http:
            r = http.post(
                "/v1/batch", json=_live_session(hub.clock.now()), headers=_basic(write.secret)
            )
            answer = r.json()
            out.print(
                f"POST /v1/batch -> {r.status_code}: accepted {answer['accepted']}, "
                f"rejected {len(answer['rejected'])}"
            )
            for rej in answer["rejected"]:
                for err in rej["errors"]:
                    out.print(f"  item {rej['index']}: {err['path']}: {err['reason']}")

            out.rule("[bold]5. The shopper's profile, by any identity")
            auth = {"Authorization": f"Bearer {reader.secret}"}
            view = http.get("/v1/profiles/email/live.shopper@example.com", headers=auth).json()
            same = http.get("/v1/profiles/anonymous_id/demo-browser-7f3a", headers=auth).json()
            assert view["id"] == same["id"], "anonymous browsing and login are one profile"
            t = Table(title=f"profile {view['id']}")
            t.add_column("identities")
            t.add_column("attributes")
            t.add_row(
                "\n".join(f"{i['namespace']}: {i['value']}" for i in view["identities"]),
                "\n".join(f"{k} = {v}" for k, v in sorted(view["attributes"].items())),
            )
            out.print(t)
            events = http.get("/v1/profiles/user_id/demo-live-user/events", headers=auth).json()
            out.print(
                "timeline: " + ", ".join(e["name"] or e["type"] for e in reversed(events["events"]))
            )

            out.rule("[bold]6. Search")
            found = http.get(
                "/v1/profiles",
                headers=auth,
                params={"q": ["country=DE", "lifetime_value>100"], "limit": 5},
            )
            out.print(
                f"first {len(found.json()['profiles'])} customers in DE with "
                "lifetime value > 100: "
                + ", ".join(p["attributes"].get("email", p["id"]) for p in found.json()["profiles"])
            )

            out.rule("[bold]7. Audiences, built in batch and kept up to date by serve")
            _audiences(out, http, {"Authorization": f"Bearer {admin.secret}"})

            out.rule("[bold]8. Audiences, live as events stream in")
            _live_audiences(
                out, http, _basic(write.secret), {"Authorization": f"Bearer {admin.secret}"}
            )

            out.rule("[bold]9. Messages: templates, rules, sending, tracking")
            _messages(out, http, {"Authorization": f"Bearer {admin.secret}"}, base)

            out.rule("[bold]10. Privacy: export, then delete the shopper")
            admin_auth = {"Authorization": f"Bearer {admin.secret}"}
            person = {"namespace": "email", "value": "live.shopper@example.com"}
            exported = http.post("/v1/privacy/export", json=person, headers=admin_auth).json()
            out.print(f"export: profile + {len(exported['events'])} events")
            deleted = http.post("/v1/privacy/delete", json=person, headers=admin_auth).json()
            gone = http.get("/v1/profiles/email/live.shopper@example.com", headers=auth)
            out.print(f"delete: {deleted['status']}; lookup afterwards -> {gone.status_code}")

        out.rule("[bold]Summary")
        with hub.engine.connect() as conn:
            n_profiles = conn.execute(select(func.count()).select_from(profiles_table)).scalar_one()
            n_ids = conn.execute(select(func.count()).select_from(identities)).scalar_one()
            n_merges = conn.execute(select(func.count()).select_from(profile_merges)).scalar_one()
        t = Table()
        t.add_column("what")
        t.add_column("count", justify="right")
        for label, value in (
            ("profiles", n_profiles),
            ("identities", n_ids),
            ("profile merges", n_merges),
            ("events in the log", hub.events.count(ws.id)),
        ):
            t.add_row(label, f"{value:,}")
        out.print(t)
        out.print(f"done in {time.monotonic() - started:.1f} s; data in {hub_dir}")
        out.print("[dim]Journeys and campaigns join this demo as their issues land.[/]")
    finally:
        hub.close()
