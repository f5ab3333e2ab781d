"""Metrics history: the agents' samples recorded in batches, and the retention job.

`MetricsRecorder` queues every sample the API's metrics subscription hands it and writes them in batches:
it waits `flush_s` (0.5 s) after the first sample of a batch, or less once `max_batch` are queued, then
writes up to `max_batch` rows in one transaction — one executemany INSERT and one UPDATE of the hosts'
``last_ping`` (`services.api.store.metrics.write_samples`). At 100,000 agents sending a sample every 30 s
that is a handful of statements a second instead of 3,300 UPDATEs.

A database error never drops a sample while memory allows: the batch goes back to the front of the queue
and is retried with backoff. Past `max_queued` queued samples (an outage longer than the queue holds) the
oldest are dropped, counted (`dropped`) and logged: the newest history is worth the most.

A sample's time is the agent's clock (``sample.timestamp``), unless it is more than `MAX_SKEW_S` away from
when the API received it: then the API's clock (a host with a wrong clock still gets a history).

`maintain_forever` runs the retention job every `metrics_maintenance_interval` seconds
(`services.api.store.metrics.downsample`): on PostgreSQL under an advisory lock, so of several API
instances one does the work; on SQLite one API is all there is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import DatabaseUnavailable
from services.api.store import metrics as store
from shared.protocol import MetricsEvent

log = logging.getLogger("services.api.fleet.bus.metrics")

DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError, DatabaseUnavailable)
FLUSH_S = 0.5  # a batch collects for this long after its first sample
METRICS_BATCH = 5000  # rows per batch at most
MAX_QUEUED = 300_000  # queued samples past which the oldest are dropped (~330 bytes each: ~100 MB)
QUERY_TIMEOUT_S = 15.0
BACKOFF_S = (0.1, 5.0)
MAX_SKEW_S = 300.0  # an agent clock further off than this: the sample is stamped with the API's time
STOP_GRACE_S = 5.0


class MetricsStore(Protocol):
    """What the recorder needs of the database (`SqlMetricsStore`; tests may fake it)."""

    async def write(self, rows: Sequence[dict[str, Any]], pinged_at: float) -> None: ...


class SqlMetricsStore:
    """`MetricsStore` on the API's database: one transaction per batch."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def write(self, rows: Sequence[dict[str, Any]], pinged_at: float) -> None:
        async with self.sessions() as session:
            await store.write_samples(session, rows, pinged_at)


COLUMNS = ("host_id", "at", *store.VALUES)
Queued = tuple[Any, ...]  # a row's values in COLUMNS order, then when it was received (Unix seconds)


def sample_row(event: MetricsEvent, received: float) -> Queued:
    """The ``metric_sample`` values of `event` (COLUMNS order), then `received`: a tuple, not a dict, to
    keep a long queue small."""
    s = event.sample
    at = s.timestamp if abs(s.timestamp - received) <= MAX_SKEW_S else received
    disk = max((d.percent for d in s.disks), default=None)
    rx, tx = float(s.net_bytes_recv), float(s.net_bytes_sent)
    return (
        event.host_id,
        at,
        s.cpu_percent,
        s.load_1,
        s.memory_percent,
        s.swap_percent,
        disk,
        rx,
        tx,
        event.agent_rtt_ms,
        received,
    )


class MetricsRecorder:
    """Queues samples and writes them in batches (see the module's docstring)."""

    def __init__(
        self,
        store: MetricsStore,
        max_batch: int = METRICS_BATCH,
        flush_s: float = FLUSH_S,
        max_queued: int = MAX_QUEUED,
        timeout: float = QUERY_TIMEOUT_S,
        backoff: tuple[float, float] = BACKOFF_S,
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.flush_s = flush_s
        self.max_queued = max_queued
        self.timeout = timeout
        self.backoff = backoff
        self.batches = 0  # batches written
        self.recorded = 0  # samples written
        self.dropped = 0  # samples dropped past `max_queued`
        self.failures = 0  # failed attempts (each retried)
        self._queue: deque[Queued] = deque()
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Samples not written yet."""
        return len(self._queue)

    def submit(self, event: MetricsEvent) -> None:
        """Queue `event`'s sample (never blocks)."""
        self._queue.append(sample_row(event, time.time()))
        if len(self._queue) > self.max_queued:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning(
                    "metrics: %d samples queued (database down?): %d oldest dropped so far",
                    self.max_queued,
                    self.dropped,
                )
        self._idle.clear()
        self._wake.set()
        if len(self._queue) >= self.max_batch:
            self._full.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="metrics-recorder")
            self._runner.add_done_callback(_report_crash)

    async def drained(self) -> None:
        """Return once every queued sample is written."""
        await self._idle.wait()

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Flush what is queued (up to `grace` seconds), then stop; say what was left unwritten."""
        self._full.set()  # no collecting wait: write now
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.drained()
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._queue:
            log.warning("stopping with %d metrics samples not recorded", len(self._queue))

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < self.max_batch and not failures:  # collect a batch
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_s):
                        await self._full.wait()
            self._full.clear()
            count = min(self.max_batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            try:
                async with asyncio.timeout(self.timeout):
                    rows = [dict(zip(COLUMNS, item, strict=False)) for item in batch]
                    await self.store.write(rows, max(item[-1] for item in batch))
            except DB_ERRORS as exc:
                self.failures += 1
                failures += 1
                self._queue.extendleft(reversed(batch))  # back at the front, in order
                while len(self._queue) > self.max_queued:
                    self._queue.popleft()
                    self.dropped += 1
                wait = min(self.backoff[1], self.backoff[0] * 2 ** (failures - 1))
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "metrics: database unavailable (%s), %d samples queued; retry %d in %.1fs",
                        type(exc).__name__,
                        len(self._queue),
                        failures,
                        wait,
                    )
                await asyncio.sleep(wait)
                continue
            except Exception:  # a defect, not the database: do not retry it forever
                log.exception("metrics: batch of %d samples failed and was skipped", count)
                continue
            if failures:
                log.warning(
                    "metrics: database back after %d failed attempts; %d samples dropped in all",
                    failures,
                    self.dropped,
                )
                failures = 0
            self.batches += 1
            self.recorded += count
            if len(self._queue) >= self.max_batch:
                self._full.set()


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("metrics recorder stopped: %s: %s (the next sample restarts it)", type(exc).__name__, exc)


async def maintain_once(
    engine: AsyncEngine, raw_retention: float, rollup_retention: float, now: float | None = None
) -> store.Downsampled | None:
    """One retention pass (None: another API instance is doing it)."""
    async with engine.begin() as conn:
        done = await store.downsample(
            conn, time.time() if now is None else now, raw_retention, rollup_retention
        )
    if done is not None and (done.folded or done.expired):
        log.info(
            "metrics history: %d samples folded into %d 5-minute buckets, %d expired buckets deleted",
            done.folded,
            done.buckets,
            done.expired,
        )
    return done


async def maintain_forever(
    engine: AsyncEngine,
    interval: float,
    raw_retention: float,
    rollup_retention: float,
    ready: Callable[[], bool],
) -> None:
    """Run the retention job every `interval` seconds while the database is ready (errors: logged, next
    time again)."""
    while True:
        await asyncio.sleep(interval)
        if not ready():
            continue
        try:
            await maintain_once(engine, raw_retention, rollup_retention)
        except DB_ERRORS as exc:
            log.warning(
                "metrics history: retention pass failed (%s); next in %.0fs", type(exc).__name__, interval
            )
