"""The browser stream's fleet side: NATS events fanned out to this instance's browsers, their keys watched,
and the outcomes of runs announced to every instance.

    browser ─POST /api/ws-tickets (API key)─▶ TicketStore.issue ─▶ {"ticket", "expires_in"}
    browser ─GET /api/ws?ticket=...────────▶ TicketStore.consume (once, before expiry, on any instance)
                                             ─▶ BrowserConn
    NATS warlock.presence.*, warlock.metrics.*, warlock.output.*.*, warlock.events.command.*  (plain
         subscriptions: every instance hears every message and serves its own browsers)
         ─▶ BrowserHub ─▶ each subscribed BrowserConn's queue

Tickets are rows of the database every instance shares (`services.api.store.tickets`), hashed: behind a
load balancer the socket may reach another instance than the ticket's request did.

A browser whose key carries a label scope receives events of its hosts only: the hub looks the host's labels
up (cached for `LABEL_TTL` seconds) before it queues a scoped connection's frame. Every `key_check_interval`
seconds (half the API's auth cache TTL) the hub checks the keys of its open connections in one query: a
connection whose key was revoked, has expired or was deleted, on any instance, is ended (`BrowserConn.end`,
close code 4403), so a key stops seeing events within the auth cache's bound, as it stops being accepted.

Each connection has a bounded send queue (frames and bytes): a browser that does not read fills it and is
dropped (`BrowserConn.slow` set, counted in ``warlock_browser_dropped_total{reason="slow"}``); the hub never
waits for a browser.

Command events (``warlock.events.command.<host>``): ``recorded`` when this instance's runner writes a run,
``finished`` whenever an UPDATE settling a run actually changed its row: the runner's own outcome
(`CommandEvents`), a late result (`services.api.fleet.bus`, the runner's late reply), the reconciler settling
an orphan, a cancel that settles the row itself (`services.api.fleet.cancel`). Every such UPDATE is guarded by
the run's status, so two instances, or a late result racing the runner, announce one change once; a late
result that replaces a ``timed_out`` outcome is a second change, announced as a second ``finished`` (the last
one is the run's outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Gauge
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.store.models import CommandRun, Host, utcnow
from services.api.store.runstore import HostTarget, NewRun, RunStore
from services.api.store.tickets import TicketHolder, TicketStore, closed_keys
from shared import subjects
from shared.errors import InvalidIdError, ProtocolError
from shared.protocol import MetricsEvent, OutputChunk, decode_model, decode_presence

log = logging.getLogger(__name__)

LABEL_TTL = 5.0  # seconds a host's labels are cached for scope checks
TOPICS = ("presence", "metrics", "output", "commands")
MAX_TRACKED_RUNS = 100_000  # runs in flight whose host `CommandEvents` remembers until they finish

BROWSERS = Gauge("warlock_browser_connections", "Browser WebSocket connections open on this API instance")
DROPPED = Counter(
    "warlock_browser_dropped_total",
    "Browser WebSocket connections this instance closed: slow (send queue full), protocol (bad frames), "
    "key (its API key revoked, expired or deleted)",
    ["reason"],
)
KEY_CLOSE_CODE = 4403  # the connection's API key was revoked, has expired or was deleted

__all__ = [
    "KEY_CLOSE_CODE",
    "TOPICS",
    "BrowserConn",
    "BrowserHub",
    "CommandEvents",
    "TicketHolder",
    "TicketStore",
    "Topic",
    "announce_finished",
    "announce_run",
    "key_check_interval",
]


@dataclass(frozen=True, slots=True)
class Topic:
    """One subscription of a browser: a topic, for one host or all (`host` None), for one command (output)."""

    topic: str
    host: str | None = None
    command_id: str | None = None


@dataclass(eq=False)
class BrowserConn:
    """One browser's connection as the hub sees it: who, what it subscribed to, its bounded send queue."""

    holder: TicketHolder
    max_frames: int
    max_bytes: int
    topics: set[Topic] = field(default_factory=set)
    queue: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    queued_bytes: int = 0
    slow: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # `end` was called: close with `ending`
    ending: tuple[int, str] = (1000, "")

    def end(self, code: int, reason: str) -> None:
        """Ask the connection's session to close with `code` and `reason` (first call wins)."""
        if not self.ended.is_set():
            self.ending = (code, reason)
            self.ended.set()

    def offer(self, frame: str) -> bool:
        """Queue `frame` without waiting; False (and `slow` set) once the queue is over its bound."""
        if self.slow.is_set():
            return False
        if self.queue.qsize() >= self.max_frames or self.queued_bytes + len(frame) > self.max_bytes:
            self.slow.set()
            return False
        self.queue.put_nowait(frame)
        self.queued_bytes += len(frame)
        return True

    async def next_frame(self) -> str:
        """The next frame to send (waits for one)."""
        frame = await self.queue.get()
        self.queued_bytes -= len(frame)
        return frame

    def wants(self, topic: str, host: str, command_id: str | None = None) -> bool:
        """Whether one of its subscriptions matches an event of `topic` on `host`."""
        for sub in self.topics:
            if sub.topic != topic or (sub.host is not None and sub.host != host):
                continue
            if sub.command_id is not None and sub.command_id != command_id:
                continue
            return True
        return False


def key_check_interval(auth_cache_ttl: float) -> float:
    """Seconds between two key checks of the open connections: half the auth cache TTL (between 0.5 and
    30), so a revoked key's sockets close within the time its REST requests may still pass."""
    return min(30.0, max(0.5, auth_cache_ttl / 2))


def _in_scope(scope: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    if not scope:
        return True
    labels = labels or {}
    return all(labels.get(k) == v for k, v in scope.items())


class BrowserHub:
    """Fans presence, metrics and output events from NATS out to this instance's browser connections."""

    def __init__(
        self, nc: NATS, sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine | None = None
    ) -> None:
        self.nc = nc
        self.sessions = sessions
        self.engine = engine  # the keys of open connections are checked on it (None: never)
        self.conns: set[BrowserConn] = set()
        self._subs: list[Subscription] = []
        self._labels: dict[str, tuple[float, dict[str, str] | None]] = {}
        self.dropped_slow = 0
        self._keys_unchecked = False  # the last key check failed (logged once until one succeeds)

    async def start(self) -> None:
        """Subscribe (no queue group: every instance serves its own browsers)."""
        for subject, cb in (
            (subjects.ALL_PRESENCE, self._on_presence),
            (subjects.ALL_METRICS, self._on_metrics),
            (subjects.ALL_OUTPUT, self._on_output),
            (subjects.ALL_COMMAND_EVENTS, self._on_command),
        ):
            self._subs.append(await self.nc.subscribe(subject, cb=cb))

    async def stop(self) -> None:
        """Unsubscribe; the connections end with the server."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def add(self, conn: BrowserConn) -> None:
        """Start delivering to `conn`."""
        self.conns.add(conn)
        BROWSERS.set(len(self.conns))

    def remove(self, conn: BrowserConn, reason: str | None = None) -> None:
        """Stop delivering to `conn` (counted when `reason` says why it was dropped)."""
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        BROWSERS.set(len(self.conns))
        if reason is not None:
            DROPPED.labels(reason).inc()
            if reason == "slow":
                self.dropped_slow += 1

    async def key_problem(self, key_name: str) -> str | None:
        """Why `key_name` may no longer stream (``revoked``, ``expired``, ``deleted``), or None; None too
        when the database cannot say (the periodic check tries again)."""
        if self.engine is None:
            return None
        try:
            return (await closed_keys(self.engine, [key_name], utcnow())).get(key_name)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("browser stream: key %r not checked: %s", key_name, type(exc).__name__)
            return None

    async def check_keys(self) -> int:
        """End the connections whose key was revoked, has expired or was deleted (one query for all of
        them); return how many were ended. A database error keeps them open until the next check."""
        if self.engine is None or not self.conns:
            return 0
        names = {conn.holder.key_name for conn in self.conns}
        try:
            closed = await closed_keys(self.engine, names, utcnow())
        except (SQLAlchemyError, OSError) as exc:
            if not self._keys_unchecked:
                log.warning("browser stream: keys of open connections not checked: %s", type(exc).__name__)
            self._keys_unchecked = True
            return 0
        self._keys_unchecked = False
        ended = 0
        for conn in list(self.conns):
            why = closed.get(conn.holder.key_name)
            if why is not None and not conn.ended.is_set():
                conn.end(KEY_CLOSE_CODE, f"API key {why}")
                ended += 1
        if ended:
            log.info("browser stream: %d connection(s) of invalid keys ended", ended)
        return ended

    async def watch_keys(self, interval: float, ready: Callable[[], bool]) -> None:
        """`check_keys` every `interval` seconds while the database is ready; never raises."""
        while True:
            await asyncio.sleep(interval)
            if not ready():
                continue
            try:
                await self.check_keys()
            except Exception as exc:  # never let the loop die: the next pass tries again
                log.warning("browser stream key check failed: %s", type(exc).__name__)

    async def host_in_scope(self, scope: Mapping[str, str] | None, host: str) -> bool:
        """Whether `host` is within `scope` (an unknown or deleted host is outside every scope)."""
        if not scope:
            return True
        now = time.monotonic()
        cached = self._labels.get(host)
        if cached is None or cached[0] <= now:
            try:
                async with self.sessions() as session:
                    row = await session.get(Host, host)
            except (SQLAlchemyError, OSError) as exc:
                log.warning("browser stream: host labels unavailable: %s", type(exc).__name__)
                return False
            labels = dict(row.labels or {}) if row is not None else None
            if len(self._labels) > 100_000:
                self._labels.clear()
            cached = (now + LABEL_TTL, labels)
            self._labels[host] = cached
        return cached[1] is not None and _in_scope(scope, cached[1])

    async def _fan_out(
        self, topic: str, host: str, data: dict[str, Any], command_id: str | None = None
    ) -> None:
        targets = [c for c in self.conns if c.wants(topic, host, command_id)]
        if not targets:
            return
        frame = json.dumps(
            {"type": "event", "topic": topic, "host": host, "data": data}, separators=(",", ":")
        )
        for conn in targets:
            if conn.holder.scope and not await self.host_in_scope(conn.holder.scope, host):
                continue
            conn.offer(frame)

    async def _on_presence(self, msg: Msg) -> None:
        if not self.conns:
            return  # no browser here: not even decoded
        try:
            host = subjects.parse_presence(msg.subject)
            event = decode_presence(msg.data)
        except (InvalidIdError, ProtocolError):
            return
        if event.host_id != host:
            return
        data: dict[str, Any] = {"state": event.type, "gateway_id": event.gateway_id, "at": event.at}
        if event.type == "connected":
            data.update(hostname=event.hostname, platform=event.platform, agent_version=event.agent_version)
        else:
            data.update(reason=event.reason, close_code=event.close_code)
        await self._fan_out("presence", host, data)

    async def _on_metrics(self, msg: Msg) -> None:
        if not self.conns:
            return  # no browser here: not even decoded
        try:
            host = subjects.parse_metrics(msg.subject)
            event = decode_model(MetricsEvent, msg.data)
        except (InvalidIdError, ProtocolError):
            return
        if event.host_id != host:
            return
        await self._fan_out(
            "metrics", host, {**event.sample.model_dump(mode="json"), "rtt_ms": event.agent_rtt_ms}
        )

    async def _on_output(self, msg: Msg) -> None:
        if not self.conns:
            return  # no browser here: not even decoded
        try:
            host, command_id = subjects.parse_output(msg.subject)
            chunk = decode_model(OutputChunk, msg.data)
        except (InvalidIdError, ProtocolError):
            return
        if chunk.command_id != command_id:
            return
        data = {
            "command_id": command_id,
            "seq": chunk.seq,
            "stream": chunk.stream,
            "data": chunk.data,
            "truncated": chunk.truncated,
        }
        await self._fan_out("output", host, data, command_id)

    async def _on_command(self, msg: Msg) -> None:
        if not self.conns:
            return  # no browser here: not even decoded
        try:
            host = subjects.parse_command_event(msg.subject)
            data = json.loads(msg.data)
        except (InvalidIdError, ValueError):
            return
        if not isinstance(data, dict) or not isinstance(data.get("command_id"), str):
            return
        await self._fan_out("commands", host, data, data["command_id"])


def _plain(value: Any) -> Any:
    """An enum's value; a str, number or None as it is; anything else (an SQL expression) None."""
    value = getattr(value, "value", value)
    return value if value is None or isinstance(value, str | int | float) else None


FINISHED_FIELDS = ("status", "via", "exit_code", "duration_ms")


async def _publish(nc: NATS | None, host: str, data: dict[str, Any]) -> None:
    if nc is None:
        return
    try:
        await nc.publish(subjects.command_event(host), json.dumps(data).encode())
    except (nats.errors.Error, InvalidIdError) as exc:
        log.debug("command event not published: %s", type(exc).__name__)


async def announce_finished(nc: NATS | None, host: str, command_id: str, values: Mapping[str, Any]) -> None:
    """Publish a ``finished`` event of `command_id` on `host` with the outcome `values` just written (only
    `FINISHED_FIELDS`: no command text, no output); never raises (a lost event is logged at debug). Call it
    once the settling UPDATE reported that it changed the row."""
    event: dict[str, Any] = {"event": "finished", "command_id": command_id, "at": time.time()}
    event.update({k: _plain(values.get(k)) for k in FINISHED_FIELDS})
    await _publish(nc, host, event)


async def announce_run(nc: NATS | None, run: CommandRun | None) -> None:
    """`announce_finished` from the row as it now reads (where the UPDATE set SQL expressions, e.g. a late
    result's ``via``)."""
    if run is not None:
        values = {k: getattr(run, k) for k in FINISHED_FIELDS}
        await announce_finished(nc, run.host_id, run.command_id, values)


class CommandEvents:
    """A `RunStore` that also announces, on ``warlock.events.command.<host>``, each run this instance's
    runner records (``recorded``) and each outcome it writes (``finished``: status, via, exit code), for the
    browsers of every instance. No command text and no output in the event: those stay behind the REST
    API's scope checks (and the output has its own topic). Outcomes settled elsewhere call
    `announce_finished` / `announce_run` themselves (see the module's docstring)."""

    def __init__(self, store: RunStore, nc: NATS) -> None:
        self.store = store
        self.nc = nc
        self._hosts: dict[str, str] = {}

    async def _announce(self, host: str, data: dict[str, Any]) -> None:
        await _publish(self.nc, host, data)

    async def start(self, ref: str, run: NewRun) -> HostTarget | None:
        """As `RunStore.start`; a ``recorded`` event when the run was written."""
        target = await self.store.start(ref, run)
        if target is not None:
            if len(self._hosts) >= MAX_TRACKED_RUNS:
                self._hosts.clear()
            self._hosts[run.command_id] = target.id
            at = run.created_at.timestamp()
            await self._announce(target.id, {"event": "recorded", "command_id": run.command_id, "at": at})
        return target

    async def finish(self, command_id: str, values: dict[str, Any]) -> bool:
        """As `RunStore.finish`; a ``finished`` event when this call settled the run."""
        settled = await self.store.finish(command_id, values)
        host = self._hosts.pop(command_id, None)
        if settled and host is not None:
            await announce_finished(self.nc, host, command_id, values)
        return settled

    async def route_ssh(self, command_id: str) -> bool:
        """As `RunStore.route_ssh`."""
        return await self.store.route_ssh(command_id)

    async def close(self) -> None:
        """As `RunStore.close`."""
        await self.store.close()
