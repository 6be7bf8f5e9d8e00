"""Benchmark: importing the demo shop's files (profiles, then events) into an embedded hub.

    PYTHONPATH=src .venv/bin/python benchmarks/import_files.py --profiles 100000

Generates the demo data with :func:`waymark.demo.generate.generate` (not timed), then imports
``profiles.<ext>`` and ``events.<ext>`` with :func:`waymark.ingestion.files.run_import` into a
fresh data folder (SQLite state store, DuckDB event log) in a temporary directory. Each step
runs in a process of its own, so the peak resident memory reported is that step's. Prints the
rates, the wall time of each step, the phases of each import, the machine, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # ru_maxrss is in KiB on Linux


def _cpu_seconds() -> float:
    """CPU time (user + system, every thread) this process and its children used so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1)


def _generate(
    out: str, profiles: int, fmt: str, seed: int, days: int, sessions: float
) -> dict[str, Any]:
    from waymark.demo.generate import generate

    started = time.perf_counter()
    summary = generate(
        Path(out),
        profiles=profiles,
        seed=seed,
        days=days,
        sessions=sessions,
        end=datetime.now(UTC),
        fmt=fmt,  # type: ignore[arg-type]
    )
    return {
        "profiles": summary.profiles,
        "events": summary.events,
        "anonymous_visitors": summary.anonymous_visitors,
        "seconds": time.perf_counter() - started,
        "bytes": {p.name: p.stat().st_size for p in summary.files},
    }


class _Phases(logging.Handler):
    """Collects the phase timings the importer logs at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        phase = getattr(record, "phase", None)
        if phase is not None:
            spent = float(getattr(record, "seconds", 0.0))
            self.seconds[phase] = self.seconds.get(phase, 0.0) + spent


def _import(data: str, source: str, kind: str, fmt: str, chunk_rows: int) -> dict[str, Any]:
    from waymark.access import service as access
    from waymark.demo.generate import load_demo_schema
    from waymark.hub import Hub
    from waymark.ingestion.files import run_import
    from waymark.profiles.schema_store import save_schema
    from waymark.settings import load_settings
    from waymark.storage.tables import workspaces

    phases = _Phases()
    logger = logging.getLogger("waymark.ingestion.files")
    logger.addHandler(phases)
    logger.setLevel(logging.DEBUG)
    hub = Hub.open(load_settings(environ={}, data_dir=Path(data)))
    try:
        with hub.tx() as conn:
            ws = conn.execute(workspaces.select()).first()
            if ws is None:
                workspace, _w, _a = access.create_workspace(
                    conn, name="demo", actor="benchmark", at=hub.clock.now()
                )
                save_schema(
                    conn,
                    workspace_id=workspace.id,
                    document=load_demo_schema(),
                    actor="benchmark",
                    at=hub.clock.now(),
                )
                workspace_id = workspace.id
            else:
                workspace_id = ws.id
        started = time.perf_counter()
        report = run_import(
            hub,
            workspace_id=workspace_id,
            kind=kind,  # type: ignore[arg-type]
            path=Path(source) / f"{kind}.{fmt}",
            actor="benchmark",
            chunk_rows=chunk_rows,
        )
        seconds = time.perf_counter() - started
        in_log = hub.events.count(workspace_id) if kind == "events" else None
    finally:
        hub.close()
    return {
        "report": report.to_json(),
        "seconds": seconds,
        "rows_per_second": report.rows_read / seconds if seconds else 0.0,
        "peak_rss_mb": _peak_rss_mb(),
        "cpu_seconds": _cpu_seconds(),
        "phases": {k: round(v, 2) for k, v in sorted(phases.seconds.items())},
        "events_in_log": in_log,
    }


def _count_source(source: Path, fmt: str) -> dict[str, Any]:
    """The row counts of files generated earlier."""

    def rows(path: Path) -> int:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        with path.open("rb") as f:
            lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
        return lines - (1 if fmt == "csv" else 0)

    return {
        "profiles": rows(source / f"profiles.{fmt}"),
        "events": rows(source / f"events.{fmt}"),
        "seconds": 0.0,
    }


def _in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _machine() -> dict[str, Any]:
    memory_kb = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=100_000, help="customers to generate")
    parser.add_argument("--format", default="parquet", choices=["parquet", "csv", "jsonl"])
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument(
        "--sessions",
        type=float,
        default=1.0,
        help="scale of everyone's sessions (1.0: about 15 events per customer; 1.5 gives "
        "about 20M events for 1M customers)",
    )
    parser.add_argument("--workdir", help="where to put data (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files and data")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse files generated earlier in --workdir (and, with --keep, the data folder "
        "as it was after the profiles step)",
    )
    args = parser.parse_args(argv)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="waymark-bench-"))
    source, data = root / "source", root / "data"
    shutil.rmtree(data, ignore_errors=True)
    machine = _machine()
    print(f"machine: {machine['cpus']} cores, {machine['memory_gb']} GB, {machine['system']}")
    try:
        if args.reuse and (source / f"events.{args.format}").exists():
            generated = _count_source(source, args.format)
        else:
            generated = _in_child(
                _generate,
                str(source),
                args.profiles,
                args.format,
                args.seed,
                args.days,
                args.sessions,
            )
        print(
            f"generated {generated['profiles']:,} profiles and {generated['events']:,} events "
            f"({args.format}) in {generated['seconds']:.1f} s"
        )
        snapshot = root / "data-after-profiles"
        if args.reuse and args.keep and snapshot.is_dir():  # skip the profiles step
            shutil.copytree(snapshot, data)
            people = json.loads((snapshot / "profiles-step.json").read_text())
            print("profiles: reused the data folder of an earlier run")
        else:
            people = _in_child(
                _import, str(data), str(source), "profiles", args.format, args.chunk_rows
            )
            if args.keep:
                shutil.rmtree(snapshot, ignore_errors=True)
                shutil.copytree(data, snapshot)
                (snapshot / "profiles-step.json").write_text(json.dumps(people))
        print(
            f"profiles: {people['report']['rows_accepted']:,} in {people['seconds']:.1f} s = "
            f"{people['rows_per_second']:,.0f} profiles/s, peak RSS {people['peak_rss_mb']:.0f} MB"
        )
        events = _in_child(_import, str(data), str(source), "events", args.format, args.chunk_rows)
        print(
            f"events: {events['report']['rows_accepted']:,} in {events['seconds']:.1f} s = "
            f"{events['rows_per_second']:,.0f} events/s, peak RSS {events['peak_rss_mb']:.0f} MB, "
            f"CPU {events['cpu_seconds']:.0f} s"
        )
        print(f"events phases (s): {events['phases']}")
        print(f"wall time of both imports: {people['seconds'] + events['seconds']:.1f} s")
        ok = (
            events["report"]["rows_rejected"] == 0
            and events["events_in_log"] == generated["events"]
            and people["report"]["rows_accepted"] == generated["profiles"]
        )
        result = {
            "benchmark": "import_files",
            "format": args.format,
            "profiles": generated["profiles"],
            "events": generated["events"],
            "chunk_rows": args.chunk_rows,
            "profiles_seconds": round(people["seconds"], 2),
            "profiles_per_second": round(people["rows_per_second"]),
            "events_seconds": round(events["seconds"], 2),
            "events_per_second": round(events["rows_per_second"]),
            "wall_seconds": round(people["seconds"] + events["seconds"], 2),
            "peak_rss_mb": {
                "profiles": round(people["peak_rss_mb"]),
                "events": round(events["peak_rss_mb"]),
            },
            "cpu_seconds": {"profiles": people.get("cpu_seconds"), "events": events["cpu_seconds"]},
            "phases": {"profiles": people["phases"], "events": events["phases"]},
            "all_loaded": ok,
            **machine,
        }
        print(json.dumps(result))
        return 0 if ok else 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
