"""Output as it happens, on the API's side: chunks from ``warlock.output.<host>.<id>`` stored for replay, and
the event sequence ``GET /api/commands/{id}/stream`` sends (`OutputHub.events`).

Where chunks are kept, and why the database: every API instance subscribes to ``warlock.output.*.*`` in
the queue group ``warlock-api`` (each chunk reaches one instance) and writes what it received in batches
(one insert per `flush_interval`) to ``command_output`` (`services.api.store.output`: per-command byte cap,
swept after `retention`). The database is already what every instance shares, so a client served by
another instance than the one that ran the command (or reconnecting to a third) replays the same rows; a
JetStream stream would need JetStream enabled in every nats-server config and ``$JS`` permissions for the
API, and still a second store for the final outcome, which lives in ``command_run``.

Each instance serving a stream also subscribes to the command's own subject, without a queue group, so a
chunk reaches its client as soon as it is published, not after the batch write. Chunks are numbered per
command (`seq`, from 1); the client sees them in order, each once: live and stored chunks meet in one
buffer keyed by seq, a missing number is looked up in the database, and skipped only once it has been
missing for `gap_wait` (NATS is at-most-once: a chunk can be lost). The stream ends with the run's outcome
once ``command_run`` holds a final status and the chunk writer has had time to store the last chunks.

Chunks are not authoritative (a gateway can forge or drop them); the recorded result is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import DatabaseUnavailable
from services.api.store import crud
from services.api.store import output as store
from services.api.store.models import CommandRun, CommandStatus, utcnow
from shared import subjects
from shared.errors import InvalidIdError, ProtocolError
from shared.protocol import OutputChunk, decode_model

log = logging.getLogger(__name__)

DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError, DatabaseUnavailable)
OPEN = (CommandStatus.PENDING, CommandStatus.RUNNING)
FLUSH_INTERVAL_S = 0.1  # chunk batches are written at most this often
CAP_BYTES = 1024 * 1024  # stored output per command
RETENTION_S = 24 * 3600.0  # stored chunks older than this are swept
SWEEP_EVERY_S = 60.0
MAX_BUFFERED_BYTES = 8 * 1024 * 1024  # chunk data waiting for the writer; past it: dropped (counted)
TICK_S = 0.25  # a stream checks the run's status this often
DRAIN_TIMEOUT_S = 2.0  # stopping: the chunks already delivered to this instance are taken within this
GAP_WAIT_S = 2.0  # a missing seq is skipped after this long (another instance's batch may be late under load)
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
PAGE = 1000  # stored chunks read per query
LIVE_QUEUE = 4096  # live chunks waiting for one stream's client; past it they are read from the database


@dataclass(frozen=True, slots=True)
class ChunkEvent:
    """An output chunk for the client (`seq` is its event id)."""

    seq: int
    stream: str
    data: str
    truncated: bool


@dataclass(frozen=True, slots=True)
class EndEvent:
    """The run's recorded outcome: the last event."""

    outcome: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Nothing happened for a while."""


Event = ChunkEvent | EndEvent | Keepalive


def outcome_of(run: CommandRun) -> dict[str, Any]:
    """The fields of a final run the end event carries."""
    return {
        "command_id": run.command_id,
        "status": str(run.status),
        "exit_code": run.exit_code,
        "signal": run.signal,
        "via": str(run.via) if run.via is not None else None,
        "truncated": run.truncated,
        "error_code": run.error_code,
    }


class OutputHub:
    """Stores the chunks this instance receives (queue group) and follows commands for stream clients."""

    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        ready: Callable[[], bool],
        *,
        flush_interval: float = FLUSH_INTERVAL_S,
        cap_bytes: int = CAP_BYTES,
        retention: float = RETENTION_S,
        gap_wait: float = GAP_WAIT_S,
    ) -> None:
        self.nc = nc
        self.sessions = sessions
        self.ready = ready
        self.flush_interval = flush_interval
        self.cap_bytes = cap_bytes
        self.retention = retention
        self.gap_wait = gap_wait
        self.dropped = 0  # chunks not stored: buffer full, database down, undecodable
        self._buffer: list[store.Chunk] = []
        self._buffered = 0  # characters of chunk data in `_buffer`
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._writer: asyncio.Task[None] | None = None
        self.closing = asyncio.Event()  # the API is stopping: open streams end (resumable) at once

    # ------------------------------------------------------------------------- storing

    async def start(self) -> None:
        """Subscribe to every command's output (queue group) and start the writer."""
        self._sub = await self.nc.subscribe(subjects.ALL_OUTPUT, queue=subjects.API_QUEUE, cb=self._on_chunk)
        await self.nc.flush()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_forever(), name="output-writer")

    def close_streams(self) -> None:
        """End every open stream without its end event (the API is stopping; clients resume elsewhere)."""
        self.closing.set()

    async def stop(self) -> None:
        """End open streams; drain the subscription (the chunks NATS already handed this instance are
        taken, not dropped: they are in no other instance's database), write what is buffered, stop the
        writer."""
        self.close_streams()
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await asyncio.wait_for(sub.drain(), DRAIN_TIMEOUT_S)  # type: ignore[no-untyped-call]
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        with contextlib.suppress(*DB_ERRORS):
            await self._write()

    async def _on_chunk(self, msg: Msg) -> None:
        try:
            host, command_id = subjects.parse_output(msg.subject)
            chunk = decode_model(OutputChunk, msg.data)
        except (InvalidIdError, ProtocolError) as exc:
            self.dropped += 1
            log.debug("ignoring output on %s: %s", msg.subject, exc)
            return
        if chunk.command_id != command_id or self._buffered + len(chunk.data) > MAX_BUFFERED_BYTES:
            self.dropped += 1
            return
        self._buffered += len(chunk.data)
        self._buffer.append(
            store.Chunk(host, command_id, chunk.seq, chunk.stream, chunk.data, chunk.truncated)
        )
        self._wake.set()

    async def _write(self) -> None:
        batch, self._buffer, self._buffered = self._buffer, [], 0
        if not batch:
            return
        try:
            async with self.sessions() as session:
                await store.add_chunks(session, batch, self.cap_bytes)
        except DB_ERRORS as exc:
            self.dropped += len(batch)
            log.warning("%d output chunk(s) not stored: %s", len(batch), type(exc).__name__)

    async def _write_forever(self) -> None:
        swept = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SWEEP_EVERY_S):
                    await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.flush_interval)  # the batch fills meanwhile
            if not self.ready():
                continue
            await self._write()
            if time.monotonic() - swept >= SWEEP_EVERY_S:
                swept = time.monotonic()
                try:
                    async with self.sessions() as session:
                        gone = await store.purge(session, utcnow() - timedelta(seconds=self.retention))
                    if gone:
                        log.info("swept %d output chunk(s) older than %gs", gone, self.retention)
                except DB_ERRORS as exc:
                    log.warning("output sweep failed: %s", type(exc).__name__)

    # ------------------------------------------------------------------------- following

    @contextlib.asynccontextmanager
    async def _live(self, host_id: str, command_id: str) -> AsyncIterator[asyncio.Queue[OutputChunk]]:
        """This command's chunks as they are published (an empty queue when NATS is not connected)."""
        queue: asyncio.Queue[OutputChunk] = asyncio.Queue(LIVE_QUEUE)

        async def on_chunk(msg: Msg) -> None:
            with contextlib.suppress(ProtocolError, asyncio.QueueFull):
                chunk = decode_model(OutputChunk, msg.data)
                if chunk.command_id == command_id:
                    queue.put_nowait(chunk)  # full: the database has it (the gap is filled from there)

        sub: Subscription | None = None
        if self.nc.is_connected:
            try:
                sub = await self.nc.subscribe(subjects.output(host_id, command_id), cb=on_chunk)
                await self.nc.flush(timeout=2)  # live before the stored chunks are read: no gap between
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("stream of %s follows the database only: %s", command_id, type(exc).__name__)
        try:
            yield queue
        finally:
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def _run(self, command_id: str) -> CommandRun:
        async with self.sessions() as session:
            return await crud.get_run(session, command_id)  # NotFound: 404

    async def _stored(self, command_id: str, after: int) -> list[ChunkEvent]:
        """Every stored chunk after seq `after` (at most the per-command cap's worth), in pages."""
        events: list[ChunkEvent] = []
        async with self.sessions() as session:
            while True:
                rows = await store.read_chunks(session, command_id, after, PAGE)
                events.extend(ChunkEvent(r.seq, r.stream, r.data, r.truncated) for r in rows)
                if len(rows) < PAGE:
                    return events
                after = rows[-1].seq

    async def follow(self, command_id: str, after: int) -> tuple[str, AsyncIterator[Event]]:
        """The host `command_id` ran on and its stream's events after seq `after` (as `open`): raises
        NotFound when there is no such run, so the caller can check the host before any event."""
        run = await self._run(command_id)
        return run.host_id, self.events(run, after)

    async def open(self, command_id: str, after: int) -> AsyncIterator[Event]:
        """The events of `command_id`'s stream after seq `after`: raises NotFound (before any event) when
        there is no such run, so the caller can answer 404; see `events`."""
        run = await self._run(command_id)
        return self.events(run, after)

    async def events(self, run: CommandRun, after: int) -> AsyncIterator[Event]:
        """Chunks with seq > `after`, in order, each once, live until the run is final; then its outcome.
        When the API stops first (`close_streams`), the events end without the outcome: the client
        reconnects (to another instance) with the last chunk's id."""
        command_id = run.command_id
        next_seq = after + 1
        held: dict[int, ChunkEvent] = {}
        gap_since: float | None = None
        last_sent = time.monotonic()
        settle = self.flush_interval * 3 + 0.2  # the writer's batch, with room
        async with self._live(run.host_id, command_id) as live:
            # a chunk published just before the live subscription is stored a batch later: read again then
            live_since = time.monotonic()
            catch_up = [live_since + self.flush_interval * k + 0.05 for k in (1, 2, 4, 8)]
            for event in await self._stored(command_id, next_seq - 1):
                held.setdefault(event.seq, event)
            final: CommandRun | None = None if run.status in OPEN else run
            while True:
                while next_seq in held:  # everything in order that is known
                    event = held.pop(next_seq)
                    next_seq += 1
                    gap_since = None
                    last_sent = time.monotonic()
                    yield event
                for seq in [s for s in held if s < next_seq]:
                    del held[seq]
                if final is not None:
                    break
                if self.closing.is_set():
                    log.info("stream of %s ended: the API is stopping (the client resumes)", command_id)
                    return
                if catch_up and time.monotonic() >= catch_up[0]:
                    catch_up.pop(0)
                    for event in await self._stored(command_id, next_seq - 1):
                        held.setdefault(event.seq, event)
                    continue
                tick = min(TICK_S, max(0.0, catch_up[0] - time.monotonic())) if catch_up else TICK_S
                try:
                    chunk = await asyncio.wait_for(live.get(), tick)
                except TimeoutError:
                    chunk = None
                if chunk is not None:
                    if chunk.seq >= next_seq:
                        held[chunk.seq] = ChunkEvent(chunk.seq, chunk.stream, chunk.data, chunk.truncated)
                    while not live.empty():
                        more = live.get_nowait()
                        if more.seq >= next_seq:
                            held[more.seq] = ChunkEvent(more.seq, more.stream, more.data, more.truncated)
                    if next_seq in held:
                        continue
                now = time.monotonic()
                if held and next_seq not in held:  # a gap: look in the database, then give up on it
                    for event in await self._stored(command_id, next_seq - 1):
                        held.setdefault(event.seq, event)
                    if next_seq not in held:
                        gap_since = gap_since or now
                        if now - gap_since >= self.gap_wait:
                            log.info("stream of %s: chunk %d lost; skipped", command_id, next_seq)
                            next_seq = min(held)
                            gap_since = None
                    continue
                if chunk is None:
                    run = await self._run(command_id)
                    if run.status not in OPEN:
                        final = run
                    elif not self.nc.is_connected:
                        for event in await self._stored(command_id, next_seq - 1):
                            held.setdefault(event.seq, event)
                    if now - last_sent >= KEEPALIVE_S:
                        last_sent = now
                        yield Keepalive()
            # the run is final: give the writer time to store the last chunks, then read them
            finished = final.finished_at or final.created_at
            wait = settle - (utcnow() - finished).total_seconds()
            if wait > 0:
                await asyncio.sleep(wait)
            while not live.empty():
                more = live.get_nowait()
                if more.seq >= next_seq:
                    held.setdefault(more.seq, ChunkEvent(more.seq, more.stream, more.data, more.truncated))
            for event in await self._stored(command_id, next_seq - 1):
                held.setdefault(event.seq, event)
            for seq in sorted(held):
                if seq >= next_seq:
                    yield held[seq]
        assert final is not None
        yield EndEvent(outcome_of(final))
