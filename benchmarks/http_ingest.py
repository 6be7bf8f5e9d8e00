"""HTTP ingestion with durable acknowledgement, embedded default, server and client on one machine.

Starts ``waymark serve`` in its own process on a fresh data folder, then a concurrent asyncio
client (this process) sends Segment ``/v1/batch`` requests of ``--batch`` events, then single
``/v1/track`` requests. Prints events/s, requests/s and latency percentiles, and a JSON line.

    PYTHONPATH=src .venv/bin/python benchmarks/http_ingest.py --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system) used so far by process ``pid`` ("api") and each of its
    children, by process name (``waymark-store``, ``waymark-parse``, ...; Linux /proc, empty
    elsewhere): what the server spends, whatever else the machine runs."""
    proc = Path("/proc")
    if not proc.exists():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    spent: dict[str, float] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = tail.split()
        # after the command: state, ppid, ..., utime (index 11), stime (index 12)
        if int(entry.name) == pid or int(fields[1]) == pid:
            name = "api" if int(entry.name) == pid else head.split("(", 1)[1]
            spent[name] = spent.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return spent


def cpu_us_per_event(before: dict[str, float], after: dict[str, float], events: int) -> Any:
    """Server CPU per event between two readings: in total and per process name."""
    per = {k: round((v - before.get(k, 0.0)) / events * 1e6, 1) for k, v in sorted(after.items())}
    return round(sum(per.values()), 1), {k: v for k, v in per.items() if v >= 0.5}


def own_cpu_seconds() -> float:
    """CPU time used so far by this process (the client)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Connection:
    """A minimal HTTP/1.1 keep-alive client connection with TCP_NODELAY.

    httpx sends headers and body in separate writes without TCP_NODELAY, which meets delayed
    ACKs on loopback and caps any server at a few hundred requests/s; this client writes each
    request in one piece, as production clients (urllib3, Go, Node) effectively do.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def post(self, path: str, body: bytes, auth: str) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


async def drive(
    url: str, key: str, *, seconds: float, concurrency: int, batch: int | None, users: int
) -> dict[str, Any]:
    auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    counter = 0
    events = 0
    stop = time.monotonic() + seconds

    async def worker(wid: int) -> None:
        nonlocal counter, events
        conn = Connection(host, int(port))
        await conn.open()
        while time.monotonic() < stop:
            counter += 1
            n = counter
            if batch:
                body: dict[str, Any] = {
                    "batch": [
                        {
                            "type": "track",
                            "event": "product_view",
                            "messageId": f"b{wid}-{n}-{i}",
                            "userId": f"u{(n * 31 + i) % users}",
                            "anonymousId": f"d{(n * 31 + i) % users}",
                            "properties": {"sku": f"S{i}", "price": 19.5, "category": "shoes"},
                        }
                        for i in range(batch)
                    ]
                }
                path = "/v1/batch"
            else:
                body = {
                    "event": "product_view",
                    "messageId": f"s{wid}-{n}",
                    "userId": f"u{n % users}",
                    "properties": {"sku": "S1", "price": 9.5},
                }
                path = "/v1/track"
            payload = json.dumps(body).encode()
            t0 = time.perf_counter()
            status, answer = await conn.post(path, payload, auth)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"{status}: {answer[:300]!r}")
            events += json.loads(answer)["accepted"]

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "requests": len(latencies),
        "events": events,
        "seconds": round(elapsed, 2),
        "events_per_s": round(events / elapsed),
        "requests_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--single-concurrency", type=int, default=16)
    ap.add_argument("--users", type=int, default=20_000)
    args = ap.parse_args()

    data = Path(tempfile.mkdtemp(prefix="waymark-bench-"))
    env = {**os.environ, "WAYMARK_DATA_DIR": str(data), "WAYMARK_LOG_LEVEL": "warning"}
    exe = [sys.executable, "-m", "waymark.cli.main"]
    created = subprocess.run(
        [*exe, "workspace", "create", "bench", "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    key = json.loads(created.stdout)["write_key"]
    port = free_port()
    server = subprocess.Popen(
        [*exe, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        server_cpu, client_cpu = tree_cpu_seconds(server.pid), own_cpu_seconds()
        batched = asyncio.run(
            drive(
                url,
                key,
                seconds=args.seconds,
                concurrency=args.concurrency,
                batch=args.batch,
                users=args.users,
            )
        )
        total, per_process = cpu_us_per_event(
            server_cpu, tree_cpu_seconds(server.pid), batched["events"]
        )
        batched["server_cpu_us_per_event"] = total
        batched["server_cpu_us_per_event_by_process"] = per_process
        batched["client_cpu_us_per_event"] = round(
            (own_cpu_seconds() - client_cpu) / batched["events"] * 1e6, 1
        )
        single = asyncio.run(
            drive(
                url,
                key,
                seconds=args.seconds,
                concurrency=args.single_concurrency,
                batch=None,
                users=args.users,
            )
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = {
        "benchmark": "http_ingest",
        "batch_size": args.batch,
        "batched": batched,
        "single": single,
        "machine": machine(),
    }
    print(
        f"batches of {args.batch}, {args.concurrency} connections: "
        f"{batched['events_per_s']:,} events/s acknowledged durable "
        f"(p50 {batched['p50_ms']} ms, p99 {batched['p99_ms']} ms per batch); CPU per event: "
        f"server {batched['server_cpu_us_per_event']} µs "
        f"{batched['server_cpu_us_per_event_by_process']}, client "
        f"{batched['client_cpu_us_per_event']} µs"
    )
    print(
        f"single events, {args.single_concurrency} connections: "
        f"{single['requests_per_s']:,} requests/s, p50 {single['p50_ms']} ms, "
        f"p99 {single['p99_ms']} ms"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
