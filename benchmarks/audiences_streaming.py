"""Benchmark: streaming audiences, as ``waymark serve`` keeps them.

    PYTHONPATH=src .venv/bin/python benchmarks/audiences_streaming.py throughput
    PYTHONPATH=src .venv/bin/python benchmarks/audiences_streaming.py demo
    PYTHONPATH=src .venv/bin/python benchmarks/audiences_streaming.py latency
    PYTHONPATH=src .venv/bin/python benchmarks/audiences_streaming.py round

``throughput``: 100 streaming audiences (the ten kinds of condition of ``audiences_edge.py``,
ten parameters each) in an embedded hub (SQLite state store, DuckDB log, in a temporary
folder). Events of ``--profiles`` shoppers are stored through the ingestion path first (not
timed), then the mover moves them from the inbox to the log and folds them into the
streaming states (fold, membership answers, timers, writes of states and changes), in
batches as ``serve`` does. Prints events per second of the move-and-fold, and of the
streaming evaluator alone on the same events (states in memory, no storage, the collector
kept as in ``demo``).

``demo``: the streaming evaluator alone (states in memory, no storage) on the demo generator's
event stream: ``--profiles`` customers over ``--days`` days (with its anonymous visitors, each
their own profile here), all events in time order; the states are built from all but the last
``--events`` (not timed), then those are folded in batches of ``--batch``, each batch at the
instant of its last event, ``--repeat`` times from the same states (the best run counts: this
machine's speed drifts within minutes). The garbage collector is set as ``waymark serve`` sets
it, and off while a batch folds, as the mover keeps it; the states kept between batches stand
for the state store's rows and are frozen out of its passes (in ``serve`` they are at rest in
the database).

``demo --rows`` also times reading the timed batches' state rows, whole or per audience.

``round``: mover rounds of ``--batch`` events in an embedded hub with the same 100 audiences,
where each round's time goes, and the WAL checkpoint's duration after five rounds.

``latency``: starts ``waymark serve`` (a subprocess, embedded default) with the same 100
audiences, sends ``--rate`` events per second over HTTP for ``--seconds`` (Segment ``/v1/batch``
calls of ``--batch`` events), among them first purchases of new shoppers, each of which makes
that shopper enter "purchase within last 1 days" (one of the 100). A thread polls the state
store for membership changes every millisecond. Prints p50/p99 from the moment the HTTP
answer acknowledged the purchase to the moment its membership change was visible to a reader.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from audiences_edge import TEMPLATES as EDGE_TEMPLATES
from waymark.access import service as access
from waymark.core.clock import ManualClock
from waymark.demo.generate import load_demo_schema
from waymark.gcpause import collector_paused
from waymark.hub import Hub
from waymark.ingestion.pipeline import Ingestor
from waymark.model.schemas import parse_schema
from waymark.profiles.schema_store import save_schema
from waymark.segmentation import live
from waymark.segmentation import service as segments
from waymark.segmentation.compile.memory import MemoryEvent, compile_memory
from waymark.segmentation.compile.streaming import compile_streaming
from waymark.segmentation.lang.parser import parse
from waymark.settings import load_settings
from waymark.workers import flush_once

from _machine import machine

#: the edge benchmark's ten kinds of condition, the birthday one replaced by an event window
#: (anniversaries change by time alone, not by events)
TEMPLATES = (*EDGE_TEMPLATES[:-1], "purchase within last {k} days")
NAMES = ("product_view", "product_view", "product_view", "cart_add", "purchase", "app_open")
CATEGORIES = ("shoes", "shirts", "bags", "hats")


def definitions() -> dict[str, str]:
    return {
        f"a{t:02d}-{i}": template.format(n=50 * (i + 1), d=7 * (i + 1), k=i + 1)
        for t, template in enumerate(TEMPLATES)
        for i in range(10)
    }


def _call(rng: random.Random, user: str, at: datetime, seq: int) -> dict[str, Any]:
    name = rng.choice(NAMES)
    if name == "purchase":
        props: dict[str, Any] = {
            "order_id": f"o{seq}",
            "revenue": round(rng.uniform(5, 300), 2),
            "category": rng.choice(CATEGORIES),
        }
    elif name in ("product_view", "cart_add"):
        props = {"sku": f"s{rng.randrange(500)}", "category": rng.choice(CATEGORIES)}
        props["price"] = round(rng.uniform(5, 300), 2)
    else:
        props = {"platform": "ios"}
    return {
        "type": "track",
        "userId": user,
        "event": name,
        "messageId": f"m{seq}",
        "timestamp": at.isoformat(),
        "properties": props,
    }


def _traits(rng: random.Random, user: str, at: datetime) -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": user,
        "messageId": f"id-{user}",
        "timestamp": at.isoformat(),
        "traits": {
            "country": rng.choice(["DE", "FR", "US"]),
            "lifetime_value": round(rng.uniform(0, 2000), 2),
            "email": f"{user}@example.com",
            "signup_at": (at - timedelta(days=rng.randrange(400))).isoformat(),
        },
    }


def throughput(args: argparse.Namespace) -> None:
    rng = random.Random(11)
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    clock = ManualClock(now - timedelta(hours=1))
    folder = Path(tempfile.mkdtemp(prefix="wm-stream-"))
    hub = Hub.open(load_settings(environ={}, data_dir=folder), clock)
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="bench", actor="b", at=clock.now())
        save_schema(
            conn, workspace_id=ws.id, document=load_demo_schema(), actor="b", at=clock.now()
        )
    users = [f"u{i}" for i in range(args.profiles)]
    ingest = Ingestor(hub)
    # the past: traits and --history events per shopper over 30 days, built into the states
    calls = [_traits(rng, u, clock.now() - timedelta(days=30)) for u in users]
    for i in range(args.profiles * args.history):
        at = clock.now() - timedelta(seconds=rng.randrange(0, 30 * 86_400))
        calls.append(_call(rng, rng.choice(users), at, -1 - i))
    for start in range(0, len(calls), 500):
        ingest.segment(ws.id, "batch", {"batch": calls[start : start + 500]})
    for name, text_ in definitions().items():
        with hub.tx() as conn:
            segments.save_audience(
                conn, ws.id, name=name, definition=text_, actor="b", now=clock.now()
            )
    built = time.perf_counter()
    flush_once(hub)
    built = time.perf_counter() - built
    # the present: --events events in the last hour, in time order, moved as serve does
    events = []
    for seq in range(args.events):
        at = clock.now() + timedelta(seconds=3600 * seq / args.events)
        events.append(_call(rng, rng.choice(users), at, seq))
    clock.advance(timedelta(hours=1))
    for start in range(0, len(events), 500):
        result = ingest.segment(ws.id, "batch", {"batch": events[start : start + 500]})
        assert not result.rejected, result.rejected[:3]
    started = time.perf_counter()
    moved = flush_once(hub)
    elapsed = time.perf_counter() - started
    with hub.engine.connect() as conn:
        changes = conn.execute(text("SELECT count(*) FROM audience_changes")).scalar_one()
    hub.close()
    print(
        f"build: {args.profiles:,} profiles with {args.profiles * args.history:,} events into 100 "
        f"streaming audiences in {built:.1f} s"
    )
    print(
        f"move and fold: {moved:,} events for {args.profiles:,} profiles through 100 streaming "
        f"audiences in {elapsed:.2f} s: {moved / elapsed:,.0f} events/s "
        f"({changes:,} membership changes in all)"
    )

    # the evaluator alone (what the mover runs per batch, without storage): states in memory
    schema = parse_schema(load_demo_schema())
    lives = []
    for name, text_ in definitions().items():
        expr = parse(text_, schema)
        compiled = compile_streaming(expr)
        lives.append(
            live.Live(
                id=name,
                workspace_id="w",
                name=name,
                compiled=compiled,
                memory=compile_memory(expr),
                built_key=compiled.key,
                through=None,
                ready=True,
            )
        )
    person = live._Profile(
        {"country": "DE", "lifetime_value": 900.0, "signup_at": "2026-02-20T00:00:00+00:00"},
        {("email", "marketing"): "opted_in"},
        now,
    )
    rows: dict[str, Any] = {}

    def fold(calls: list[dict[str, Any]], at: datetime) -> None:
        by_user: dict[str, list[MemoryEvent]] = {}
        for i, e in enumerate(calls):
            ts = datetime.fromisoformat(e["timestamp"])
            by_user.setdefault(e["userId"], []).append(
                MemoryEvent(e.get("event", "identify"), ts, i, e.get("properties", {}))
            )
        evaluator = live._Evaluator(lives, now=at, history=lambda ids, names: [])
        work = live.FoldWork("w")
        with collector_paused():  # as the mover folds
            for user, evs in by_user.items():
                live._evaluate_profile(work, evaluator, user, person, rows.get(user), events=evs)
            rows.update(work.rows)
            gc.freeze()  # the kept states stand for the state store's rows (see demo)

    fold(calls, now - timedelta(hours=1))  # the same past, not timed
    gc.freeze()  # the garbage collector as serve sets it
    gc.set_threshold(20_000, 20, 20)
    started = time.perf_counter()
    for start in range(0, len(events), args.batch):
        part = events[start : start + args.batch]
        fold(part, datetime.fromisoformat(part[-1]["timestamp"]))
    alone = time.perf_counter() - started
    memory_events = events
    print(
        f"evaluator alone: {len(memory_events) / alone:,.0f} events/s "
        f"({len(memory_events):,} events in batches of {args.batch:,}, 100 audiences)"
    )
    print(f"machine: {machine()}")
    print(
        json.dumps(
            {
                "events": moved,
                "profiles": args.profiles,
                "audiences": 100,
                "move_and_fold_events_per_s": round(moved / elapsed),
                "evaluator_events_per_s": round(len(memory_events) / alone),
            }
        )
    )


def demo(args: argparse.Namespace) -> None:
    import duckdb

    from waymark.demo.generate import generate

    folder = Path(tempfile.mkdtemp(prefix="wm-stream-demo-"))
    generate(folder, profiles=args.profiles, end=datetime(2026, 3, 1, tzinfo=UTC), days=args.days)
    rows = duckdb.sql(
        "SELECT coalesce(user_id, anonymous_id), "
        "CASE WHEN type = 'track' THEN event ELSE type END, timestamp, properties "
        f"FROM '{folder / 'events.parquet'}' ORDER BY timestamp"
    ).fetchall()
    stream = [
        (pid, MemoryEvent(name, ts, seq, json.loads(props) if props else {}))
        for seq, (pid, name, ts, props) in enumerate(rows)
    ]
    schema = parse_schema(load_demo_schema())
    lives = []
    for name, text_ in definitions().items():
        expr = parse(text_, schema)
        compiled = compile_streaming(expr)
        lives.append(
            live.Live(
                id=name,
                workspace_id="w",
                name=name,
                compiled=compiled,
                memory=compile_memory(expr),
                built_key=compiled.key,
                through=None,
                ready=True,
            )
        )
    person = live._Profile(
        {"country": "DE", "lifetime_value": 900.0, "signup_at": "2026-02-20T00:00:00+00:00"},
        {("email", "marketing"): "opted_in"},
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    states: dict[str, Any] = {}

    def fold(part: list[tuple[str, MemoryEvent]]) -> int:
        by_profile: dict[str, list[MemoryEvent]] = {}
        for pid, event in part:
            by_profile.setdefault(pid, []).append(event)
        evaluator = live._Evaluator(lives, now=part[-1][1].timestamp, history=lambda i, n: [])
        work = live.FoldWork("w")
        with collector_paused():  # as the mover folds
            for pid, events in by_profile.items():
                live._evaluate_profile(work, evaluator, pid, person, states.get(pid), events=events)
            states.update(work.rows)
            # The kept states stand for the state store's rows: in serve a batch's states die
            # with it, before the collector runs again, and none of its passes visits rows at
            # rest. So they are kept out of every pass.
            gc.freeze()
        return len(work.answers)

    past, timed = stream[: -args.events], stream[-args.events :]
    for start in range(0, len(past), 20_000):
        fold(past[start : start + 20_000])
    gc.freeze()  # as serve does after start-up
    gc.set_threshold(20_000, 20, 20)
    # states are never changed in place, so each repetition starts from the same ones
    before = dict(states)
    runs: list[float] = []
    answers = 0
    for _ in range(args.repeat):
        states.clear()
        states.update(before)
        answers = 0
        started = time.perf_counter()
        for start in range(0, len(timed), args.batch):
            answers += fold(timed[start : start + args.batch])
        runs.append(time.perf_counter() - started)
    elapsed = min(runs)
    names: dict[str, int] = {}
    for _pid, event in timed:
        names[event.name] = names.get(event.name, 0) + 1
    ranked = sorted(names.items(), key=lambda item: -item[1])
    mix = ", ".join(f"{name} {count / len(timed):.1%}" for name, count in ranked)
    print(
        f"demo stream: {len(stream):,} events of {len(states):,} profiles; the last "
        f"{len(timed):,} folded through 100 streaming audiences in {elapsed:.2f} s: "
        f"{len(timed) / elapsed:,.0f} events/s ({answers / len(timed):.1f} answers per event)"
    )
    if len(runs) > 1:
        each = ", ".join(f"{len(timed) / run:,.0f}" for run in runs)
        print(f"the best of {len(runs)} runs from the same states (events/s: {each})")
    print(f"event mix: {mix}")
    if args.rows:
        _row_parsing(lives, states, timed, args.batch)
    print(f"machine: {machine()}")
    print(json.dumps({"events": len(timed), "evaluator_events_per_s": round(len(timed) / elapsed)}))


def _row_parsing(
    lives: list[live.Live], states: dict[str, Any], timed: list[Any], batch: int
) -> None:
    """What reading the timed batches' state rows costs: whole rows (each audience's state an
    object, as rows were before 2026-12-02) against rows keeping each state as text, of which
    a round parses the states of the audiences the batch's events concern."""
    import orjson

    evaluator = live._Evaluator(lives, now=timed[-1][1].timestamp, history=None)
    whole = outer = touched = 0.0
    size = 0
    for start in range(0, len(timed), batch):
        names: dict[str, set[str]] = {}
        for pid, event in timed[start : start + batch]:
            names.setdefault(pid, set()).add(event.name)
        rows = {pid: states[pid][0] for pid in names if pid in states}
        old = [orjson.dumps(entries) for entries in rows.values()]
        new = {
            pid: orjson.dumps({a: live._stored_entry(e) for a, e in entries.items()})
            for pid, entries in rows.items()
        }
        size += sum(map(len, old))
        began = time.perf_counter()  # the parsed rows live through the round, as in serve
        parsed = [orjson.loads(text_) for text_ in old]
        whole += time.perf_counter() - began
        del parsed
        began = time.perf_counter()
        read = {pid: orjson.loads(text_) for pid, text_ in new.items()}
        kept: list[Any] = []
        outer += time.perf_counter() - began
        began = time.perf_counter()
        for pid, entries in read.items():
            for name in names[pid]:
                for audience in evaluator.by_name.get(name, ()):
                    entry = entries.get(audience.id)
                    if entry is not None:
                        kept.append(live._entry_state(entry))
        touched += time.perf_counter() - began
        del read, kept
    print(
        f"state rows of the timed batches ({size / 1e6:.0f} MB as whole objects): parsing them "
        f"whole {whole:.2f} s; as text per audience {outer:.2f} s for the rows and "
        f"{touched:.2f} s for the states the events concern"
    )


def rounds(args: argparse.Namespace) -> None:
    """Mover rounds of ``--batch`` events in an embedded hub with the 100 audiences: each
    round's duration and where it goes, then WAL checkpoints after every five rounds."""
    import collections
    import contextlib

    from waymark import workers
    from waymark.ingestion import mover
    from waymark.storage import eventlog
    from waymark.storage.database import checkpoint

    spent: collections.Counter[str] = collections.Counter()

    def timed(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[label] += time.perf_counter() - began

        setattr(owner, name, wrapper)

    timed(live.Folder, "prepare", "fold: prepare (load, evaluate)")
    timed(live, "_evaluate_profile", "  of which evaluating")
    timed(live.Folder, "commit", "fold: write states and changes")
    timed(mover, "_move_folding", "move: fold, commit, append, delete")
    timed(eventlog.DuckDBEventLog, "append_numbered", "  the log append (DuckDB)")
    timed(eventlog.DuckDBEventLog, "inbox_watermark", "log watermarks (DuckDB, read once)")
    timed(eventlog.DuckDBEventLog, "merge_watermark", "log watermarks (DuckDB, read once)")
    timed(workers, "maintain", "upkeep (rechecks, timers, builds)")
    exits: list[float] = []  # when each state-store write transaction of a round committed
    real_tx = mover.write_tx

    @contextlib.contextmanager
    def noted_tx(engine: Any) -> Any:
        with real_tx(engine) as conn:
            yield conn
        exits.append(time.perf_counter())

    mover.write_tx = noted_tx  # type: ignore[assignment]
    visible: list[float] = []
    rng = random.Random(3)
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    clock = ManualClock(now)
    hub = Hub.open(
        load_settings(environ={}, data_dir=Path(tempfile.mkdtemp(prefix="wm-round-"))), clock
    )
    with hub.tx() as conn:
        ws, _w, _a = access.create_workspace(conn, name="bench", actor="b", at=now)
        save_schema(conn, workspace_id=ws.id, document=load_demo_schema(), actor="b", at=now)
    users = [f"u{i}" for i in range(args.profiles)]
    ingest = Ingestor(hub)
    calls = [_traits(rng, u, now - timedelta(days=30)) for u in users]
    for i in range(args.profiles * 5):
        at = now - timedelta(seconds=rng.randrange(0, 30 * 86_400))
        calls.append(_call(rng, rng.choice(users), at, -1 - i))
    for start in range(0, len(calls), 500):
        ingest.segment(ws.id, "batch", {"batch": calls[start : start + 500]})
    for name, text_ in definitions().items():
        with hub.tx() as conn:
            segments.save_audience(conn, ws.id, name=name, definition=text_, actor="b", now=now)
    flush_once(hub)
    seq = 0

    def one() -> float:
        nonlocal seq
        part = []
        for _ in range(args.batch):
            seq += 1
            part.append(_call(rng, rng.choice(users), clock.now(), seq))
        ingest.segment(ws.id, "batch", {"batch": part})
        exits.clear()
        began = time.perf_counter()
        workers.stream_once(hub)
        ended = time.perf_counter()
        if exits:  # the first commit of the round holds its memberships
            visible.append(exits[0] - began)
        return ended - began

    for _ in range(20):
        one()
    spent.clear()
    visible.clear()
    took = sorted(one() for _ in range(args.rounds))
    shown = sorted(visible)
    print(
        f"rounds of {args.batch} events ({args.profiles:,} shoppers, 100 audiences): "
        f"p50 {took[len(took) // 2] * 1e3:.1f} ms, p90 {took[int(len(took) * 0.9)] * 1e3:.1f} ms; "
        f"memberships committed after p50 {shown[len(shown) // 2] * 1e3:.1f} ms, "
        f"p90 {shown[int(len(shown) * 0.9)] * 1e3:.1f} ms"
    )
    for label, seconds in spent.items():
        print(f"  {label}: {seconds / args.rounds * 1e3:.1f} ms per round")
    copies = []
    for _ in range(20):
        for _ in range(5):
            one()
        began = time.perf_counter()
        checkpoint(hub.engine)
        copies.append(time.perf_counter() - began)
    copies.sort()
    print(
        f"WAL checkpoint after five rounds: p50 {copies[len(copies) // 2] * 1e3:.1f} ms, "
        f"max {copies[-1] * 1e3:.1f} ms"
    )
    hub.close()
    print(f"machine: {machine()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def latency(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="wm-stream-lat-"))
    env = {**os.environ, "WAYMARK_DATA_DIR": str(folder)}
    waymark = [str(Path(sys.executable).parent / "waymark")]
    created = subprocess.run(
        [*waymark, "workspace", "create", "bench", "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    info = json.loads(created.stdout)
    ws, write, admin = info["id"], info["write_key"], info["admin_key"]
    port = _free_port()
    server = subprocess.Popen(
        [*waymark, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            for _ in range(300):
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            bearer = {"Authorization": f"Bearer {admin}"}
            http.put("/v1/schema", json=load_demo_schema(), headers=bearer).raise_for_status()
            for name, text_ in definitions().items():
                http.post(
                    "/v1/audiences", json={"name": name, "definition": text_}, headers=bearer
                ).raise_for_status()
            basic = {"Authorization": "Basic " + base64.b64encode(f"{write}:".encode()).decode()}
            _measure(http, basic, folder, ws, args)
    finally:
        server.terminate()
        server.wait(30)


def _measure(
    http: httpx.Client, basic: dict[str, str], folder: Path, ws: str, args: argparse.Namespace
) -> None:
    engine = create_engine(f"sqlite:///{folder / 'state.db'}")
    # the shop's known customers first (not timed): traits for every shopper, folded
    warm = random.Random(9)
    at = datetime.now(UTC)
    users = [_traits(warm, f"u{i}", at) for i in range(args.profiles)]
    for start in range(0, len(users), 100):
        http.post("/v1/batch", json={"batch": users[start : start + 100]}, headers=basic)
    for _ in range(600):
        with engine.connect() as conn:
            waiting = conn.execute(text("SELECT count(*) FROM event_inbox")).scalar_one()
        if not waiting:
            break
        time.sleep(0.1)
    with engine.connect() as conn:
        probe_audience = conn.execute(
            text("SELECT id FROM audiences WHERE name = 'a09-0'")
        ).scalar_one()
    seen: dict[str, float] = {}
    stop = threading.Event()

    def poll() -> None:
        last = 0
        with engine.connect() as conn:
            while not stop.is_set():
                rows = conn.execute(
                    text(
                        "SELECT seq, profile_id FROM audience_changes WHERE seq > :s "
                        "AND audience_id = :a AND change = 'realized'"
                    ),
                    {"s": last, "a": probe_audience},
                ).all()
                conn.rollback()
                t = time.perf_counter()
                for seq, pid in rows:
                    seen.setdefault(pid, t)
                    last = max(last, seq)
                time.sleep(0.001)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rng = random.Random(3)
    acked: dict[str, float] = {}
    interval = args.batch / args.rate
    seq = 0
    deadline = time.perf_counter() + args.seconds
    next_send = time.perf_counter()
    probes = 0
    while time.perf_counter() < deadline:
        calls = []
        probe_user = None
        if probes < args.probes and rng.random() < 0.5:
            probe_user = f"probe{probes}"
            probes += 1
            calls.append(
                {
                    "type": "track",
                    "userId": probe_user,
                    "event": "purchase",
                    "messageId": f"probe-{probes}",
                    "timestamp": datetime.now(UTC).isoformat(),
                    "properties": {"order_id": f"p{probes}", "revenue": 10.0},
                }
            )
        while len(calls) < args.batch:
            seq += 1
            calls.append(_call(rng, f"u{rng.randrange(args.profiles)}", datetime.now(UTC), seq))
        r = http.post("/v1/batch", json={"batch": calls}, headers=basic)
        r.raise_for_status()
        if probe_user is not None:
            acked[probe_user] = time.perf_counter()
        next_send += interval
        pause = next_send - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    time.sleep(2)
    stop.set()
    poller.join()
    with engine.connect() as conn:
        ids = dict(
            conn.execute(
                text(
                    "SELECT value, profile_id FROM identities WHERE namespace = 'user_id' "
                    "AND value LIKE 'probe%'"
                )
            ).all()
        )
    waits = sorted(
        (seen[ids[user]] - at) * 1000 for user, at in acked.items() if ids.get(user) in seen
    )
    missing = len(acked) - len(waits)
    p50 = statistics.median(waits)
    p99 = waits[max(int(len(waits) * 0.99) - 1, 0)]
    sent = seq + probes
    print(
        f"{sent:,} events in {args.seconds} s ({args.rate:,}/s asked, batches of {args.batch}), "
        f"100 streaming audiences; {len(waits)} probes: acknowledged -> membership visible "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {waits[-1]:.1f} ms ({missing} not seen)"
    )
    print(f"machine: {machine()}")
    print(
        json.dumps(
            {
                "events": sent,
                "rate": args.rate,
                "probes": len(waits),
                "p50_ms": round(p50, 1),
                "p99_ms": round(p99, 1),
                "missing": missing,
            }
        )
    )


def _at_least_one(text: str) -> int:
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {count}")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--profiles", type=int, default=5000)
    t.add_argument("--events", type=int, default=40_000)
    t.add_argument("--history", type=int, default=10, help="past events per profile")
    t.add_argument("--batch", type=int, default=2_000, help="events per move (evaluator)")
    d = sub.add_parser("demo")
    d.add_argument("--profiles", type=int, default=20_000)
    d.add_argument("--days", type=int, default=60)
    d.add_argument("--events", type=int, default=50_000)
    d.add_argument("--batch", type=int, default=2_000)
    d.add_argument("--rows", action="store_true", help="also time reading the state rows")
    d.add_argument(
        "--repeat",
        type=_at_least_one,
        default=3,
        help="fold the timed events this often; the best counts",
    )
    r = sub.add_parser("round")
    r.add_argument("--profiles", type=int, default=2000)
    r.add_argument("--batch", type=int, default=20)
    r.add_argument("--rounds", type=int, default=100)
    lat = sub.add_parser("latency")
    lat.add_argument("--rate", type=int, default=2000, help="events per second")
    lat.add_argument("--batch", type=int, default=20, help="events per HTTP call")
    lat.add_argument("--seconds", type=int, default=20)
    lat.add_argument("--probes", type=int, default=400)
    lat.add_argument("--profiles", type=int, default=5000)
    args = parser.parse_args()
    if args.what == "throughput":
        throughput(args)
    elif args.what == "demo":
        demo(args)
    elif args.what == "round":
        rounds(args)
    else:
        latency(args)


if __name__ == "__main__":
    main()
