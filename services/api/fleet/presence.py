"""Presence events recorded in batches: a connect storm costs a few queries per batch, not several per agent.

`PresenceRecorder` queues every ``connected`` / ``disconnected`` event the API's presence subscription
hands it and records them in batches of up to `max_batch` hosts, each batch:

- one SELECT of the hosts' rows (is the host known, its agent public key, its recorded session and
  connection time: `crud.presence_rows`);
- the hellos verified in Python (signed by the host's agent key, fresh when the event *arrived*, so a
  batch retried after an outage does not reject a hello that was fresh when it came);
- one executemany UPDATE for the connects and one for the disconnects, each guarded in SQL as the record
  always was (a connect older than the recorded one of another session changes nothing; a disconnect
  changes only its own session), then one commit (`crud.record_presence_batch`).

Events of a host are applied in arrival order: a batch holds at most one event per host, and the next
event of that host waits for the next batch. A connect of a host whose agent key is not recorded yet (a
freshly installed agent dials in while its install is still returning the key) is looked at again every
`key_poll_s` for `key_wait_s`, without holding up the batch; only that host's later events wait behind it.

A database error never drops an event: the batch is retried with backoff (the hosts keep their place at
the front). Memory stays bounded: past `max_queued` queued events, each host keeps only its latest state
(its last connect and what followed it; a host with no connect queued keeps its last event) — presence is
state, the latest event wins — and that is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import DatabaseUnavailable
from services.api.fleet.verify import Rejections, hello_problem
from services.api.store import crud
from services.api.store.crud import PresenceRow
from shared.protocol import PresenceConnected, PresenceDisconnected

# a child of the bus's logger: its presence lines are where they always were (level and filters of the bus)
log = logging.getLogger("services.api.fleet.bus.presence")

Event = PresenceConnected | PresenceDisconnected
DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError, DatabaseUnavailable)

KEY_WAIT_S = 15.0  # a hello of a host without an agent key is checked again for this long
KEY_POLL_S = 0.5
PRESENCE_BATCH = 500  # hosts per batch at most (bind parameters: SQLite allows 32,766)
MAX_QUEUED = 200_000  # queued events past which each host keeps only its latest state
QUERY_TIMEOUT_S = 10.0  # a stuck batch is retried rather than waited for
BACKOFF_S = (0.1, 5.0)  # first and longest wait between retries of a failed batch
VERBOSE_BATCH = 16  # a batch this small logs each event at INFO (a quiet fleet); larger ones at DEBUG
STOP_GRACE_S = 5.0


class PresenceStore(Protocol):
    """What the recorder needs of the database (`SqlPresenceStore`; tests may fake it)."""

    async def rows(self, host_ids: Sequence[str]) -> dict[str, PresenceRow]: ...

    async def write(
        self, connected: Sequence[PresenceConnected], disconnected: Sequence[PresenceDisconnected]
    ) -> None: ...


class SqlPresenceStore:
    """`PresenceStore` on the API's database: one query to read a batch, one transaction to write it."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def rows(self, host_ids: Sequence[str]) -> dict[str, PresenceRow]:
        async with self.sessions() as session:
            return await crud.presence_rows(session, host_ids)

    async def write(
        self, connected: Sequence[PresenceConnected], disconnected: Sequence[PresenceDisconnected]
    ) -> None:
        async with self.sessions() as session:
            await crud.record_presence_batch(session, connected, disconnected)


@dataclass
class Batch:
    """What one batch did, counted and logged once it is written."""

    waiting: set[str]  # hosts whose connect waits for their agent key
    recorded: list[Event] = field(default_factory=list)
    ignored: list[Event] = field(default_factory=list)  # stale (or a disconnect of another session)
    rejected: list[tuple[PresenceConnected, str]] = field(default_factory=list)


@dataclass(slots=True)
class Pending:
    """A queued event, with when it arrived (wall clock: the hello's freshness is judged against it)."""

    event: Event
    arrived: float
    key_deadline: float  # loop time until which a missing agent key is waited for


class PresenceRecorder:
    """Queues presence events and records them in batches (see the module's docstring)."""

    def __init__(
        self,
        store: PresenceStore,
        rejections: Rejections,
        max_batch: int = PRESENCE_BATCH,
        key_wait_s: float = KEY_WAIT_S,
        key_poll_s: float = KEY_POLL_S,
        max_queued: int = MAX_QUEUED,
        timeout: float = QUERY_TIMEOUT_S,
        backoff: tuple[float, float] = BACKOFF_S,
    ) -> None:
        self.store = store
        self.rejections = rejections
        self.max_batch = max_batch
        self.key_wait_s = key_wait_s
        self.key_poll_s = key_poll_s
        self.max_queued = max_queued
        self.timeout = timeout
        self.backoff = backoff
        # counters (tests, the bench, logs)
        self.batches = 0  # batches recorded
        self.recorded = 0  # events written (their guard may still have found them stale)
        self.ignored = 0  # events found stale or about an unknown agent before writing
        self.rejected = 0  # connects whose hello did not verify (also in `rejections`)
        self.superseded = 0  # events dropped from an over-long queue: a later event of the host replaced them
        self.failures = 0  # failed attempts (each retried)
        self._queues: dict[str, deque[Pending]] = {}  # per host, arrival order
        self._ready: dict[str, None] = {}  # hosts whose first event can go in the next batch, in order
        self._waiting: dict[str, float] = {}  # hosts waiting for their agent key → loop time to look again
        self._queued = 0
        self._bound = max_queued  # raised while the hosts' latest states alone exceed `max_queued`
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Events not recorded yet."""
        return self._queued

    def submit(self, event: Event) -> None:
        """Queue `event` (never blocks; recorded by the next batches)."""
        loop = asyncio.get_running_loop()
        item = Pending(event, time.time(), loop.time() + self.key_wait_s)
        queue = self._queues.get(event.host_id)
        if queue is None:
            self._queues[event.host_id] = deque([item])
            self._ready[event.host_id] = None
        else:
            queue.append(item)
        self._queued += 1
        self._idle.clear()
        self._wake.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="presence-recorder")
            self._runner.add_done_callback(_report_crash)

    async def drained(self) -> None:
        """Return once every queued event is recorded (or rejected, or found stale)."""
        await self._idle.wait()

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Give the queue up to `grace` seconds to drain, then stop; say what was left unrecorded."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.drained()
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._queued:
            log.warning(
                "stopping with %d presence events of %d hosts not recorded", self._queued, len(self._queues)
            )

    # ------------------------------------------------------------------------- the batch loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self._compact()
            now = loop.time()
            for host in [h for h, due in self._waiting.items() if due <= now]:
                del self._waiting[host]
                self._ready[host] = None
            hosts = list(itertools.islice(self._ready, self.max_batch))
            if not hosts:
                if not self._queues:
                    self._bound = self.max_queued
                    self._idle.set()
                self._wake.clear()
                due = min(self._waiting.values(), default=None)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if due is None else max(0.0, due - now)):
                        await self._wake.wait()
                continue
            for host in hosts:
                del self._ready[host]
            try:
                async with asyncio.timeout(self.timeout):
                    batch = await self._record(hosts)
            except DB_ERRORS as exc:
                self.failures += 1
                failures += 1
                self._ready = dict.fromkeys(hosts) | self._ready  # back at the front, in order
                wait = min(self.backoff[1], self.backoff[0] * 2 ** (failures - 1))
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "presence: database unavailable (%s), %d events queued; retry %d in %.1fs",
                        type(exc).__name__,
                        self._queued,
                        failures,
                        wait,
                    )
                await asyncio.sleep(wait)
                continue
            except Exception:  # a defect, not the database: do not retry it forever, hold up nobody else
                log.exception(
                    "presence: batch of %d hosts failed; their first events are skipped", len(hosts)
                )
                batch = Batch(waiting=set())
            if failures:
                log.warning("presence: database back after %d failed attempts; nothing was dropped", failures)
                failures = 0
            self.batches += 1
            self._advance(hosts, batch.waiting, loop.time())
            self._log(batch)

    async def _record(self, hosts: list[str]) -> Batch:
        """Record the first event of each of `hosts` (one batch). Nothing is counted or logged before the
        write succeeded: a failed batch is retried as if it had not been tried."""
        items = [self._queues[host][0] for host in hosts]
        rows = await self.store.rows(hosts)
        now = asyncio.get_running_loop().time()
        batch = Batch(waiting=set())
        connects: list[PresenceConnected] = []
        disconnects: list[PresenceDisconnected] = []
        for item in items:
            event = item.event
            row = rows.get(event.host_id)
            if isinstance(event, PresenceDisconnected):
                disconnects.append(event)  # guarded in SQL: only its own session
                current = row is not None and row.session_id == event.session_id
                (batch.recorded if current else batch.ignored).append(event)
                continue
            if row is None:
                problem: str | None = f"unknown host {event.host_id}"
            elif row.public_key is None and now < item.key_deadline:
                batch.waiting.add(event.host_id)
                continue
            else:
                problem = hello_problem(row.public_key, event, now=item.arrived)
            if problem is not None or row is None:
                batch.rejected.append((event, problem or "unknown host"))
                continue
            connects.append(event)  # guarded in SQL too: another API instance may have written meanwhile
            at = crud.presence_time(event.at)
            stale = (
                row.session_id != event.session_id and row.connected_at is not None and row.connected_at > at
            )
            (batch.ignored if stale else batch.recorded).append(event)
        if connects or disconnects:
            await self.store.write(connects, disconnects)
        return batch

    def _log(self, batch: Batch) -> None:
        for refused, problem in batch.rejected:
            source = f"gateway {refused.gateway_id} for {refused.host_id}"
            self.rejections.reject("presence connected", source, problem)
        self.rejected += len(batch.rejected)
        self.recorded += len(batch.recorded)
        self.ignored += len(batch.ignored)
        level = logging.INFO if len(batch.recorded) + len(batch.ignored) <= VERBOSE_BATCH else logging.DEBUG
        if log.isEnabledFor(level):
            for event in batch.recorded:
                log.log(
                    level, "agent %s of %s (session %s) recorded", event.type, event.host_id, event.session_id
                )
            for event in batch.ignored:
                what = (event.type, event.host_id, event.session_id)
                log.log(level, "presence %s of %s (session %s) ignored: stale session or unknown host", *what)
        if level == logging.DEBUG:
            log.info(
                "presence batch: %d recorded, %d ignored (stale), %d rejected, %d await a key; %d queued",
                len(batch.recorded),
                len(batch.ignored),
                len(batch.rejected),
                len(batch.waiting),
                self._queued,
            )

    def _advance(self, hosts: list[str], waiting: set[str], now: float) -> None:
        """After a batch: done events leave their queue; hosts with more events go back in line."""
        for host in hosts:
            queue = self._queues[host]
            if host in waiting:
                self._waiting[host] = now + self.key_poll_s
                continue
            queue.popleft()
            self._queued -= 1
            if queue:
                self._ready[host] = None
            else:
                del self._queues[host]

    def _compact(self) -> None:
        """Past `max_queued`, keep each host's latest state only (between batches: nothing is in flight)."""
        if self._queued <= self._bound:
            return
        before = self._queued
        for host, queue in self._queues.items():
            if len(queue) < 2:
                continue
            last_connect = max(
                (i for i, item in enumerate(queue) if isinstance(item.event, PresenceConnected)), default=None
            )
            keep = list(queue)[-1:] if last_connect is None else list(queue)[last_connect:]
            if keep[0] is not queue[0] and host in self._waiting:  # its head changed: no key wait for it now
                del self._waiting[host]
                self._ready[host] = None
            self._queued -= len(queue) - len(keep)
            self._queues[host] = deque(keep)
        self.superseded += before - self._queued
        self._bound = max(self.max_queued, 2 * self._queued)  # not again at every batch if still over
        log.warning(
            "presence: %d events queued (over %d): kept each host's latest state, %d superseded dropped",
            before,
            self.max_queued,
            before - self._queued,
        )


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("presence recorder stopped: %s: %s (the next event restarts it)", type(exc).__name__, exc)
