"""Benchmark: 100 audiences evaluated in memory for one profile with 1,000 events (the edge path
of decisions and journey conditions).

    PYTHONPATH=src .venv/bin/python benchmarks/audiences_edge.py

The 100 audiences are ten kinds of condition (attributes, counts in windows, sums, averages,
absence, sequences, abandoned carts, first/last picks, consent, anniversaries) with ten
different parameters each, compiled once. Each timed round prepares the profile (sorts and
indexes its events; this is done once per request) and runs all 100. Prints the median and p99
of a round, and the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from datetime import UTC, datetime, timedelta

from waymark.demo.generate import load_demo_schema
from waymark.model.schemas import parse_schema
from waymark.segmentation.compile.memory import (
    MemoryEvent,
    PreparedProfile,
    ProfileData,
    compile_memory,
)
from waymark.segmentation.lang.parser import parse

from _machine import machine

TEMPLATES = (
    'country = "DE" and lifetime_value > {n}',
    "count(purchase within last {d} days) >= {k}",
    "sum(purchase.revenue within last {d} days) >= {n}",
    "avg(cart_add.price) > {k}",
    "product_view within last {d} days and not purchase within last {k} days",
    "product_view then cart_add then purchase within {k} days",
    "cart_add within last {d} days then not purchase within {k} hours",
    'last(purchase where revenue > {k}).category = "shoes"',
    "consent(email, marketing) = opted_in and signup_at within last {d} days",
    "birthday in next {k} days",
)


def _profile(rng: random.Random, now: datetime, events: int) -> ProfileData:
    names = ("product_view", "product_view", "product_view", "cart_add", "purchase", "app_open")
    categories = ("shoes", "shirts", "bags", "hats")
    history = []
    for seq in range(events):
        name = rng.choice(names)
        ts = now - timedelta(minutes=rng.randrange(0, 180 * 24 * 60))
        if name == "purchase":
            props = {
                "order_id": f"o{seq}",
                "revenue": round(rng.uniform(5, 300), 2),
                "category": rng.choice(categories),
            }
        elif name in ("product_view", "cart_add"):
            props = {
                "sku": f"s{rng.randrange(500)}",
                "category": rng.choice(categories),
                "price": round(rng.uniform(5, 300), 2),
            }
        else:
            props = {"platform": "ios"}
        history.append(MemoryEvent(name, ts, seq, props))
    attributes = {
        "country": "DE",
        "lifetime_value": 1234.5,
        "birthday": "1990-03-04",
        "timezone": "Europe/Berlin",
        "signup_at": (now - timedelta(days=40)).isoformat(),
        "email": "ann@example.com",
    }
    return ProfileData(attributes, history, {("email", "marketing"): "opted_in"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    schema = parse_schema(load_demo_schema())
    rng = random.Random(7)
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    audiences = [
        compile_memory(parse(t.format(n=50 * (i + 1), d=7 * (i + 1), k=i + 1), schema))
        for t in TEMPLATES
        for i in range(10)
    ]
    profile = _profile(rng, now, args.events)
    members = 0
    rounds: list[float] = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        prepared = PreparedProfile(profile, now)
        members = sum(1 for a in audiences if a.run(prepared))
        rounds.append(time.perf_counter() - started)
    rounds.sort()
    median = statistics.median(rounds) * 1000
    p99 = rounds[int(len(rounds) * 0.99) - 1] * 1000
    print(
        f"{len(audiences)} audiences, one profile with {args.events:,} events: "
        f"median {median:.3f} ms, p99 {p99:.3f} ms per round ({members} audiences match)"
    )
    print(f"machine: {machine()}")
    print(
        json.dumps(
            {
                "audiences": len(audiences),
                "events": args.events,
                "median_ms": round(median, 3),
                "p99_ms": round(p99, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
