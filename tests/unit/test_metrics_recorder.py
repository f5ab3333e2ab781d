"""The metrics recorder on a fake store: batches, retries without loss, the memory bound, the clock-skew
rule, the flush at stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import OperationalError

from services.api.fleet.metrics_history import MAX_SKEW_S, MetricsRecorder, sample_row
from shared.protocol import DiskUsage, MetricsEvent, MetricsSample


def event(host: str, at: float, disks: tuple[float, ...] = (10.0, 70.0)) -> MetricsEvent:
    sample = MetricsSample(
        timestamp=at,
        cpu_percent=12.5,
        load_1=0.5,
        load_5=0.4,
        load_15=0.3,
        memory_total=100,
        memory_available=60,
        memory_used=40,
        memory_percent=40.0,
        swap_total=0,
        swap_used=0,
        swap_percent=0.0,
        disks=tuple(
            DiskUsage(mount=f"/{i}", total=1, used=0, free=1, percent=p) for i, p in enumerate(disks)
        ),
        net_bytes_sent=300,
        net_bytes_recv=700,
        net_packets_sent=1,
        net_packets_recv=1,
        uptime_s=1.0,
        process_count=1,
    )
    return MetricsEvent.model_validate({"host_id": host, "gateway_id": "gw", "sample": sample})


class FakeStore:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.writes: list[list[dict[str, Any]]] = []

    async def write(self, rows: Sequence[dict[str, Any]], pinged_at: float) -> None:
        if self.failures:
            self.failures -= 1
            raise OperationalError("INSERT", {}, ConnectionError("down"))
        self.writes.append(list(rows))


def test_a_row_keeps_the_agents_time_unless_far_off_and_the_fullest_disk() -> None:
    now = time.time()
    row = dict(
        zip(
            ("host_id", "at", "cpu", "load_1", "mem", "swap", "disk", "rx", "tx"),
            sample_row(event("h", now - 20), now),
            strict=False,
        )
    )
    assert row == {
        "host_id": "h",
        "at": now - 20,
        "cpu": 12.5,
        "load_1": 0.5,
        "mem": 40.0,
        "swap": 0.0,
        "disk": 70.0,
        "rx": 700.0,
        "tx": 300.0,
    }
    assert sample_row(event("h", now - MAX_SKEW_S - 1), now)[1] == now  # a wrong clock: the API's time
    assert sample_row(event("h", now, disks=()), now)[6] is None


async def test_samples_are_written_in_batches_and_retried_without_loss() -> None:
    store = FakeStore(failures=3)
    recorder = MetricsRecorder(store, max_batch=100, flush_s=0.05, backoff=(0.01, 0.02))
    now = time.time()
    for i in range(1000):
        recorder.submit(event(f"h{i % 10}", now - i * 0.001))
    await asyncio.wait_for(recorder.drained(), 5)
    written = [row for batch in store.writes for row in batch]
    assert len(written) == 1000
    assert [row["at"] for row in written] == [now - i * 0.001 for i in range(1000)]  # in arrival order
    assert all(len(batch) <= 100 for batch in store.writes)
    assert len(store.writes) == 10
    assert (recorder.failures, recorder.recorded, recorder.dropped) == (3, 1000, 0)
    await recorder.stop()


async def test_past_the_bound_the_oldest_are_dropped_and_counted() -> None:
    store = FakeStore(failures=10**9)
    recorder = MetricsRecorder(store, max_batch=50, flush_s=0.01, max_queued=200, backoff=(0.01, 0.01))
    now = time.time()
    for i in range(500):
        recorder.submit(event("h", now + i * 0.001))
        if i % 100 == 0:
            await asyncio.sleep(0.02)  # batches fail meanwhile
    assert recorder.queued == 200
    assert recorder.dropped == 300
    store.failures = 0
    await asyncio.wait_for(recorder.drained(), 5)
    written = [row["at"] for batch in store.writes for row in batch]
    assert written == [now + i * 0.001 for i in range(300, 500)]  # the newest 200
    await recorder.stop()


async def test_stop_flushes_without_waiting_for_the_batch_window() -> None:
    store = FakeStore()
    recorder = MetricsRecorder(store, flush_s=60.0)
    recorder.submit(event("h", time.time()))
    started = time.monotonic()
    await recorder.stop(grace=5)
    assert time.monotonic() - started < 2
    assert sum(len(batch) for batch in store.writes) == 1
