"""Metrics ingest (``--only metrics-ingest``): agents' samples published on NATS as gateways publish them,
stored by `warlock-api` on PostgreSQL (127.0.0.1:5432) in the metrics history.

A real nats-server, `warlock-api` on a fresh PostgreSQL database, `hosts` hosts provisioned in bulk
(`tests.support.fleet`). Each run publishes `rounds` samples per host (``warlock.metrics.<host>``, the
gateway's NATS identity) as fast as one client can, every sample encoded beforehand; timed from the first
publish until ``SELECT count(*) FROM metric_sample`` shows every sample (polled every 0.1 s), which also
checks none was lost. The API's CPU seconds (psutil) over the same span.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.storm import cpu_s
from services.api.store.db import make_engine
from shared import subjects
from shared.protocol import DiskUsage, MetricsEvent, MetricsSample, encode
from tests.support.db import create_pg_database, drop_pg_database, pg_url
from tests.support.fleet import host_ids, provision
from tests.support.natsserver import NatsServer
from tests.support.stack import Stack

TARGET = 5000.0  # samples/s


@dataclass
class Ingest:
    """One run's figures."""

    samples: int
    publish_s: float  # until the last publish was flushed
    seconds: float  # until every sample was counted in the table
    stored: int  # rows counted at the end (of this run's samples)
    api_cpu_s: float

    @property
    def rate(self) -> float:
        """Samples stored per second, end to end."""
        return self.stored / self.seconds


def _sample(host: str, at: float, i: int) -> bytes:
    sample = MetricsSample(
        timestamp=at,
        cpu_percent=float(i % 100),
        load_1=0.5,
        load_5=0.4,
        load_15=0.3,
        memory_total=8 << 30,
        memory_available=4 << 30,
        memory_used=4 << 30,
        memory_percent=50.0,
        swap_total=0,
        swap_used=0,
        swap_percent=0.0,
        disks=(DiskUsage(mount="/", total=100 << 30, used=40 << 30, free=60 << 30, percent=40.0),),
        net_bytes_sent=1000 * i,
        net_bytes_recv=2000 * i,
        net_packets_sent=10 * i,
        net_packets_recv=20 * i,
        uptime_s=1000.0 + i,
        process_count=200,
    )
    return encode(MetricsEvent.model_validate({"host_id": host, "gateway_id": "bench-gw", "sample": sample}))


def metrics_ingest(root: Path, hosts: int = 2000, rounds: int = 25, runs: int = 3) -> list[Ingest]:
    """`runs` bursts of `hosts` × `rounds` samples into one API on a fresh PostgreSQL database."""
    root.mkdir(parents=True, exist_ok=True)
    server = NatsServer(root, "nats-metrics")
    stack = Stack(root, server.url)
    db_name = asyncio.run(create_pg_database())
    try:
        url = pg_url(db_name)
        api = stack.start_api(url, "metrics-api")
        asyncio.run(provision(url, hosts))
        names = host_ids(hosts)
        results: list[Ingest] = []
        for run in range(runs):
            results.append(asyncio.run(_one_run(server, url, api.proc.pid, names, rounds, run)))
        return results
    finally:
        stack.close()
        server.stop()
        asyncio.run(drop_pg_database(db_name))


async def _one_run(
    server: NatsServer, url: str, api_pid: int, hosts: list[str], rounds: int, run: int
) -> Ingest:
    now = time.time()
    spacing = 290.0 / rounds  # within the API's clock-skew bound: the agents' own timestamps are kept
    messages = [
        (subjects.metrics(host), _sample(host, now - 290.0 + r * spacing, r))
        for r in range(rounds)
        for host in hosts
    ]
    total = len(messages)
    engine = make_engine(url)
    gateway = await server.connect("gateway")
    try:
        before = await _count(engine)
        cpu0 = cpu_s(api_pid)
        start = time.monotonic()
        for i, (subject, data) in enumerate(messages):
            await gateway.publish(subject, data)
            if i % 5000 == 4999:
                await gateway.flush()
        await gateway.flush()
        published = time.monotonic() - start
        stored = 0
        while time.monotonic() - start < 300:
            stored = await _count(engine) - before
            if stored >= total:
                break
            await asyncio.sleep(0.1)
        seconds = time.monotonic() - start
        return Ingest(total, published, seconds, stored, cpu_s(api_pid) - cpu0)
    finally:
        await gateway.drain()
        await engine.dispose()


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM metric_sample"))).scalar_one())


def print_metrics_ingest(runs: list[Ingest], hosts: int) -> None:
    """The metrics ingest block as Markdown: every run, then the median."""
    print(f"\n## Metrics ingest: samples of {hosts} hosts on NATS → the API → PostgreSQL\n")
    print(
        "| run | samples | publish s | stored s | samples/s | stored | lost | API CPU s | CPU ms/1k samples |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(runs, 1):
        print(
            f"| {i} | {r.samples} | {r.publish_s:.2f} | {r.seconds:.2f} | {r.rate:.0f} | {r.stored} |"
            f" {r.samples - r.stored} | {r.api_cpu_s:.1f} | {1000 * r.api_cpu_s / r.samples * 1000:.0f} |"
        )
    median = statistics.median(r.rate for r in runs)
    lost = sum(r.samples - r.stored for r in runs)
    print(f"\nMedian: **{median:.0f} samples/s**, {lost} lost; target ≥ {TARGET:.0f} samples/s, none lost.")
    print("One publisher as fast as it can (a burst); batches of up to 5,000 rows, each", end="")
    print(" one executemany INSERT and one last_ping UPDATE.")
