"""The browser stream's fleet side: one-time tickets, and NATS events fanned out to this instance's browsers.

    browser ─POST /api/ws-tickets (API key)─▶ TicketBook.issue ─▶ {"ticket", "expires_in"}
    browser ─GET /api/ws?ticket=...────────▶ TicketBook.consume (once, before expiry) ─▶ BrowserConn
    NATS warlock.presence.*, warlock.metrics.*, warlock.output.*.*  (plain subscriptions: every instance
         hears every message and serves its own browsers) ─▶ BrowserHub ─▶ each subscribed BrowserConn's queue

Tickets live in the memory of the instance that issued them, hashed (SHA-256), with the key's name, role and
scope: a ticket is used within seconds of its issue by the same page, so behind a load balancer the pair of
requests must reach the same instance (sticky sessions, or one API); a ticket presented to another instance
is refused like an unknown one (4401) and the client asks for a new one. The ticket itself is never logged.

A browser whose key carries a label scope receives events of its hosts only: the hub looks the host's labels
up (cached for `LABEL_TTL` seconds) before it queues a scoped connection's frame.

Each connection has a bounded send queue (frames and bytes): a browser that does not read fills it and is
dropped (`BrowserConn.slow` set, counted in ``warlock_browser_dropped_total{reason="slow"}``); the hub never
waits for a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
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
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.store.models import Host
from services.api.store.runstore import HostTarget, NewRun, RunStore
from shared import subjects
from shared.errors import InvalidIdError, ProtocolError
from shared.protocol import MetricsEvent, OutputChunk, decode_model, decode_presence

log = logging.getLogger(__name__)

LABEL_TTL = 5.0  # seconds a host's labels are cached for scope checks
MAX_TICKETS = 10_000  # tickets outstanding on one instance (expired ones are pruned first)
TOPICS = ("presence", "metrics", "output", "commands")
MAX_TRACKED_RUNS = 100_000  # runs in flight whose host `CommandEvents` remembers until they finish

BROWSERS = Gauge("warlock_browser_connections", "Browser WebSocket connections open on this API instance")
DROPPED = Counter(
    "warlock_browser_dropped_total",
    "Browser WebSocket connections this instance closed: slow (send queue full), protocol (bad frames)",
    ["reason"],
)


@dataclass(frozen=True, slots=True)
class TicketHolder:
    """Who a ticket was issued to: the API key's name, role and label scope."""

    key_name: str
    role: str
    scope: dict[str, str] | None


class TicketBook:
    """Single-use tickets, hashed, in this instance's memory, each valid `ttl` seconds."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._tickets: dict[str, tuple[float, TicketHolder]] = {}

    @staticmethod
    def _hash(ticket: str) -> str:
        return hashlib.sha256(ticket.encode("utf-8", "replace")).hexdigest()

    def issue(self, holder: TicketHolder) -> str | None:
        """A new ticket for `holder`; None when `MAX_TICKETS` unexpired tickets are outstanding."""
        now = self._clock()
        if len(self._tickets) >= MAX_TICKETS:
            self._tickets = {h: v for h, v in self._tickets.items() if v[0] > now}
            if len(self._tickets) >= MAX_TICKETS:
                return None
        ticket = secrets.token_urlsafe(32)
        self._tickets[self._hash(ticket)] = (now + self.ttl, holder)
        return ticket

    def consume(self, ticket: str) -> TicketHolder | None:
        """The holder of `ticket` if it is known and unexpired; it is spent either way."""
        if not ticket or len(ticket) > 200:
            return None
        entry = self._tickets.pop(self._hash(ticket), None)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._tickets)


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


def _in_scope(scope: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    if not scope:
        return True
    labels = labels or {}
    return all(labels.get(k) == v for k, v in scope.items())


class BrowserHub:
    """Fans presence, metrics and output events from NATS out to this instance's browser connections."""

    def __init__(self, nc: NATS, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.nc = nc
        self.sessions = sessions
        self.conns: set[BrowserConn] = set()
        self._subs: list[Subscription] = []
        self._labels: dict[str, tuple[float, dict[str, str] | None]] = {}
        self.dropped_slow = 0

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


class CommandEvents:
    """A `RunStore` that also announces, on ``warlock.events.command.<host>``, each run this instance's
    runner records (``recorded``) and each outcome it writes (``finished``: status, via, exit code), for the
    browsers of every instance. No command text and no output in the event: those stay behind the REST
    API's scope checks (and the output has its own topic). Outcomes settled elsewhere (a late result, the
    reconciler) are not announced."""

    def __init__(self, store: RunStore, nc: NATS) -> None:
        self.store = store
        self.nc = nc
        self._hosts: dict[str, str] = {}

    async def _announce(self, host: str, data: dict[str, Any]) -> None:
        try:
            await self.nc.publish(subjects.command_event(host), json.dumps(data).encode())
        except (nats.errors.Error, InvalidIdError) as exc:
            log.debug("command event not published: %s", type(exc).__name__)

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
            event = {"event": "finished", "command_id": command_id, "at": time.time()}
            event.update({k: _plain(values.get(k)) for k in ("status", "via", "exit_code", "duration_ms")})
            await self._announce(host, event)
        return settled

    async def route_ssh(self, command_id: str) -> bool:
        """As `RunStore.route_ssh`."""
        return await self.store.route_ssh(command_id)

    async def close(self) -> None:
        """As `RunStore.close`."""
        await self.store.close()
