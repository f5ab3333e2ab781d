"""Browser stream fan-out (``--only browser-stream``): metrics events on NATS, as gateways publish them, to
browsers on ``/api/ws``, beside a raw nats-py subscriber receiving the same messages.

A real nats-server and `warlock-api` on PostgreSQL (127.0.0.1:5432). `browsers` WebSocket clients (the
`websockets` library, in this process, playing browsers) each take a one-time ticket and subscribe to the
metrics of every host; a raw NATS subscriber on ``warlock.metrics.*`` is the baseline. Each run publishes
`rate` samples per second for `seconds` seconds from `hosts` hosts, every sample stamped with its publish
time (Unix seconds) in ``sample.timestamp``; each receiver records ``receive time - timestamp``. Reported:
events published, events each browser received (none may be missing: a browser that falls behind would be
dropped with 4408 and counted), p50/p99 delivery latency of the browsers and of the raw subscriber, and the
API's CPU seconds. The API also stores every sample (its metrics recorder): that is part of the load.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.common import pct
from bench.metrics_ingest import _sample
from bench.storm import cpu_s
from shared import subjects
from tests.support.db import create_pg_database, drop_pg_database, pg_url
from tests.support.fleet import host_ids
from tests.support.natsserver import NatsServer
from tests.support.stack import Api, Stack


@dataclass
class Fanout:
    """One run's figures."""

    published: int
    seconds: float  # publishing
    browser_received: list[int]  # per browser
    browser_ms: list[float] = field(repr=False)  # delivery latencies, every browser's
    raw_received: int = 0
    raw_ms: list[float] = field(default_factory=list, repr=False)
    dropped: int = 0  # browsers closed by the API (4408: too slow)
    api_cpu_s: float = 0.0


async def _browser(api: Api, ready: asyncio.Event, latencies: list[float], counts: list[int], i: int) -> int:
    """One browser: ticket, socket, subscribe to every host's metrics; count and time events until closed.
    Returns the close code (1000 when the bench closed it)."""
    async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
        got = await http.post("/api/ws-tickets")
        got.raise_for_status()
        ticket = got.json()["ticket"]
    ws_url = api.url.replace("http://", "ws://") + f"/api/ws?ticket={ticket}"
    async with connect(ws_url, max_size=2**20) as ws:
        await ws.send(json.dumps({"type": "subscribe", "topic": "metrics", "id": 1}))
        ack = json.loads(await ws.recv())
        if ack.get("type") != "ack":
            raise RuntimeError(f"subscribe refused: {ack}")
        ready.set()
        return await _count(ws, latencies, counts, i)


async def _count(ws: ClientConnection, latencies: list[float], counts: list[int], i: int) -> int:
    try:
        async for raw in ws:
            now = time.time()
            frame = json.loads(raw)
            if frame.get("type") == "event":
                counts[i] += 1
                latencies.append((now - frame["data"]["timestamp"]) * 1000)
    except ConnectionClosed:
        pass  # the count ends; the close code is returned
    code = ws.close_code
    return 1000 if code is None else code


async def _one_run(
    server: NatsServer, api: Api, api_pid: int, hosts: list[str], browsers: int, rate: int, seconds: float
) -> Fanout:
    latencies: list[float] = []
    counts = [0] * browsers
    readies = [asyncio.Event() for _ in range(browsers)]
    tasks = [asyncio.create_task(_browser(api, readies[i], latencies, counts, i)) for i in range(browsers)]
    raw_ms: list[float] = []

    async def on_raw(msg: object) -> None:
        now = time.time()
        data = json.loads(msg.data)  # type: ignore[attr-defined]
        raw_ms.append((now - data["sample"]["timestamp"]) * 1000)

    raw = await server.connect("api")
    gateway = await server.connect("gateway")
    try:
        await raw.subscribe(subjects.ALL_METRICS, cb=on_raw)
        await raw.flush()
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
        await asyncio.sleep(0.5)
        cpu0 = cpu_s(api_pid)
        total = int(rate * seconds)
        tick = 0.01
        per_tick = max(1, int(rate * tick))
        start = time.monotonic()
        sent = 0
        while sent < total:
            for _ in range(min(per_tick, total - sent)):
                host = hosts[sent % len(hosts)]
                await gateway.publish(subjects.metrics(host), _sample(host, time.time(), sent))
                sent += 1
            await gateway.flush()
            lag = start + sent / rate - time.monotonic()
            if lag > 0:
                await asyncio.sleep(lag)
        published_s = time.monotonic() - start
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (min(counts) < total or len(raw_ms) < total):
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.05)
        api_cpu = cpu_s(api_pid) - cpu0
    finally:
        await gateway.drain()
        await raw.drain()
    for task in tasks:
        task.cancel()
    codes = await asyncio.gather(*tasks, return_exceptions=True)
    dropped = sum(1 for c in codes if c == 4408)
    return Fanout(total, published_s, counts, latencies, len(raw_ms), raw_ms, dropped, api_cpu)


def browser_stream(
    root: Path, hosts: int = 2000, browsers: int = 10, rate: int = 2000, seconds: float = 5.0, runs: int = 3
) -> list[Fanout]:
    """`runs` runs of `rate` metrics events/s for `seconds` to `browsers` browsers through one API."""
    root.mkdir(parents=True, exist_ok=True)
    server = NatsServer(root, "nats-browsers")
    stack = Stack(root, server.url)
    db_name = asyncio.run(create_pg_database())
    try:
        api = stack.start_api(pg_url(db_name), "browser-api")
        names = host_ids(hosts)
        return [
            asyncio.run(_one_run(server, api, api.proc.pid, names, browsers, rate, seconds))
            for _ in range(runs)
        ]
    finally:
        stack.close()
        server.stop()
        asyncio.run(drop_pg_database(db_name))


def print_browser_stream(runs: list[Fanout], browsers: int, rate: int) -> None:
    """The browser stream block as Markdown: every run, then the medians and the ratio to raw NATS."""
    print(
        f"\n## Browser stream: {rate} metrics events/s to {browsers} browsers on /api/ws, beside raw NATS\n"
    )
    print(
        "| run | published | each browser got (min) | dropped | browser p50 ms | browser p99 ms |"
        " raw NATS p50 ms | raw NATS p99 ms | API CPU s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(runs, 1):
        print(
            f"| {i} | {r.published} | {min(r.browser_received)} | {r.dropped} |"
            f" {pct(r.browser_ms, 0.5):.2f} | {pct(r.browser_ms, 0.99):.2f} |"
            f" {pct(r.raw_ms, 0.5):.2f} | {pct(r.raw_ms, 0.99):.2f} | {r.api_cpu_s:.2f} |"
        )
    p50 = statistics.median(pct(r.browser_ms, 0.5) for r in runs)
    raw50 = statistics.median(pct(r.raw_ms, 0.5) for r in runs)
    missing = sum(r.published * browsers - sum(r.browser_received) for r in runs)
    cpu = statistics.median(r.api_cpu_s / (r.published * browsers) * 1e6 for r in runs)
    print(
        f"\nMedian browser p50 {p50:.2f} ms vs raw NATS {raw50:.2f} ms (ratio {p50 / raw50:.1f}x); "
        f"events missing across all runs and browsers: {missing}; API CPU {cpu:.1f} µs per delivered event "
        "(storing the samples included)."
    )
