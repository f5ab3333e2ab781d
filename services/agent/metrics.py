"""One psutil sample of the host as a `MetricsSample`; sampled in a thread so the loop never blocks."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import psutil

from shared.protocol import DiskUsage, MetricsSample

log = logging.getLogger(__name__)


def _disks() -> tuple[DiskUsage, ...]:
    """Usage of every mounted physical filesystem, skipping those that cannot be read."""
    disks: list[DiskUsage] = []
    seen: set[str] = set()
    for part in psutil.disk_partitions(all=False):
        if part.mountpoint in seen:
            continue
        seen.add(part.mountpoint)
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError as exc:
            log.debug("disk_usage(%s) failed: %s", part.mountpoint, exc)
            continue
        disks.append(
            DiskUsage(
                mount=part.mountpoint[:255],
                total=usage.total,
                used=usage.used,
                free=usage.free,
                percent=usage.percent,
            )
        )
    return tuple(disks)


def sample() -> MetricsSample:
    """Take one sample (blocking; CPU % is since the previous call, 0.0 on the very first)."""
    load_1, load_5, load_15 = os.getloadavg()
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    net = psutil.net_io_counters()
    now = time.time()
    return MetricsSample(
        timestamp=now,
        cpu_percent=psutil.cpu_percent(interval=None),
        load_1=load_1,
        load_5=load_5,
        load_15=load_15,
        memory_total=memory.total,
        memory_available=memory.available,
        memory_used=memory.used,
        memory_percent=memory.percent,
        swap_total=swap.total,
        swap_used=swap.used,
        swap_percent=swap.percent,
        disks=_disks(),
        net_bytes_sent=net.bytes_sent if net else 0,
        net_bytes_recv=net.bytes_recv if net else 0,
        net_packets_sent=net.packets_sent if net else 0,
        net_packets_recv=net.packets_recv if net else 0,
        uptime_s=max(0.0, now - psutil.boot_time()),
        process_count=len(psutil.pids()),
    )


def prime() -> None:
    """Start psutil's CPU counter so the next sample's CPU % covers the time since now."""
    psutil.cpu_percent(interval=None)


async def sample_async() -> MetricsSample:
    """Take one sample in a worker thread."""
    return await asyncio.to_thread(sample)
