"""The dashboard's host list (``--only fleet-list``): ``GET /api/fleet`` at 1,000 and 10,000 hosts, beside
``GET /api/hosts`` and ``GET /api/agents`` (what a page would otherwise fetch and join itself).

`warlock-api` on a fresh PostgreSQL database (127.0.0.1:5432); the hosts provisioned in bulk
(`tests.support.fleet`) with 60 metrics samples each (30 minutes at the agents' pace), so the latest-sample
lookup works on a history, not on one row per host. Requests alternate between the three endpoints, one
at a time, over one keep-alive connection; medians and p95 of the wall time per request, and the answer's
size.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import insert

from bench.common import pct
from services.api.store.db import make_engine
from services.api.store.models import MetricSample
from tests.support.db import create_pg_database, drop_pg_database, pg_url
from tests.support.fleet import host_ids, provision
from tests.support.natsserver import NatsServer
from tests.support.stack import Stack

PATHS = ("/api/fleet", "/api/hosts", "/api/agents")
SAMPLES_PER_HOST = 60


@dataclass
class ListTimes:
    """One fleet size's figures: milliseconds per request and bytes per answer, by path."""

    hosts: int
    ms: dict[str, list[float]]
    size: dict[str, int]


async def _samples(url: str, hosts: list[str]) -> None:
    engine = make_engine(url)
    now = time.time()
    rows = [
        {
            "host_id": host,
            "at": now - 30 * k,
            "cpu": float(k % 100),
            "load_1": 0.5,
            "mem": 40.0,
            "swap": 0.0,
            "disk": 30.0,
            "net_rx": 0.0,
            "net_tx": 0.0,
            "rtt_ms": 0.4,
        }
        for host in hosts
        for k in range(SAMPLES_PER_HOST)
    ]
    try:
        async with engine.begin() as conn:
            for at in range(0, len(rows), 50_000):
                await conn.execute(insert(MetricSample.__table__), rows[at : at + 50_000])  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def _time(
    base: str, headers: dict[str, str], rounds: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    ms: dict[str, list[float]] = {p: [] for p in PATHS}
    size: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
        for path in PATHS:  # warm
            (await http.get(path)).raise_for_status()
        for _ in range(rounds):
            for path in PATHS:
                start = time.perf_counter()
                answer = await http.get(path)
                ms[path].append((time.perf_counter() - start) * 1000)
                answer.raise_for_status()
                size[path] = len(answer.content)
    return ms, size


def fleet_list(root: Path, sizes: tuple[int, ...] = (1000, 10_000), rounds: int = 20) -> list[ListTimes]:
    """For each size, a fresh database of that many hosts, one API, `rounds` alternating requests."""
    root.mkdir(parents=True, exist_ok=True)
    server = NatsServer(root, "nats-fleet-list")
    results: list[ListTimes] = []
    try:
        for count in sizes:
            (root / f"fleet-{count}").mkdir(exist_ok=True)
            stack = Stack(root / f"fleet-{count}", server.url)
            db_name = asyncio.run(create_pg_database())
            try:
                url = pg_url(db_name)
                api = stack.start_api(url, f"fleet-api-{count}")
                asyncio.run(provision(url, count))
                asyncio.run(_samples(url, host_ids(count)))
                ms, size = asyncio.run(_time(api.url, api.auth, rounds))
                results.append(ListTimes(count, ms, size))
            finally:
                stack.close()
                asyncio.run(drop_pg_database(db_name))
    finally:
        server.stop()
    return results


def print_fleet_list(results: list[ListTimes]) -> None:
    """The host-list block as Markdown."""
    title = f"Host list: GET /api/fleet beside /api/hosts and /api/agents ({SAMPLES_PER_HOST} samples/host)"
    print(f"\n## {title}\n")
    print("| hosts | path | p50 ms | p95 ms | KiB |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for r in results:
        for path in PATHS:
            values = r.ms[path]
            print(
                f"| {r.hosts} | `{path}` | {statistics.median(values):.1f} | {pct(values, 0.95):.1f} |"
                f" {r.size[path] / 1024:.0f} |"
            )
        both = statistics.median(r.ms["/api/hosts"]) + statistics.median(r.ms["/api/agents"])
        fleet = statistics.median(r.ms["/api/fleet"])
        print(f"| {r.hosts} | fleet / (hosts + agents) | {fleet / both:.2f}× | | |")
