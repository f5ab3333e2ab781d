"""Metrics sampling produces a valid MetricsSample of this host."""

from __future__ import annotations

import time

from services.agent import metrics
from shared.protocol import Metrics, MetricsSample, decode_agent_frame, encode


async def test_sample_validates_and_round_trips() -> None:
    """A sample taken in a thread has sane values and survives encode/decode as a Metrics frame."""
    metrics.prime()
    sample = await metrics.sample_async()
    assert isinstance(sample, MetricsSample)
    assert abs(sample.timestamp - time.time()) < 60
    assert sample.memory_total > 0
    assert 0 <= sample.cpu_percent <= 100 * 1024
    assert sample.process_count > 1
    assert sample.uptime_s > 0
    assert all(d.total >= d.used for d in sample.disks)
    frame = decode_agent_frame(encode(Metrics(sample=sample)))
    assert isinstance(frame, Metrics)
    assert frame.sample == sample
