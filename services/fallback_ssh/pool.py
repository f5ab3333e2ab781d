"""Pooled SSH connections, one per (address, port, username, pinned host key), with a per-host channel cap.

- A live connection is reused; one that died while idle is dropped and redialled on next use. A command
  is retried on a fresh connection only when its channel never opened (so it cannot have started).
- At most `max_channels_per_host` commands run on a host at once; the next waits up to `queue_timeout`,
  then gets `Busy`.
- A sweeper closes connections unused for `idle_timeout`; a connection with channels in flight (or
  requests waiting for one) is never closed.
- Every connection verifies the server against the pinned key (an unpinned host is refused); the
  machine's ssh config, known_hosts and agent are not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import asyncssh
from asyncssh.public_key import get_default_public_key_algs

from services.fallback_ssh.errors import Busy, Disconnected, ExecFailed, TargetRefused, connect_error
from services.fallback_ssh.settings import FallbackSettings
from shared.protocol import SshTarget

log = logging.getLogger(__name__)


class NotStarted(Exception):
    """A command's `abort` said stop before it was sent (`Pool.process`): nothing ran."""


Process = asyncssh.SSHClientProcess[bytes]


@dataclass(frozen=True)
class PoolKey:
    """What a pooled connection is for: a connection verified against `host_key` serves only it."""

    address: str
    port: int
    username: str
    host_key: str

    def where(self) -> str:
        """``user@address:port``, for messages and logs."""
        return f"{self.username}@{self.address}:{self.port}"


def pinned_key(target: SshTarget) -> asyncssh.SSHKey:
    """The target's pinned host key; TargetRefused if there is none or it does not parse."""
    if not target.host_key or not target.host_key.strip():
        raise TargetRefused(
            f"{target.address}:{target.port} has no pinned host key; probe the host before running commands"
        )
    try:
        return asyncssh.import_public_key(target.host_key.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise TargetRefused(f"pinned host key of {target.address}:{target.port} does not parse") from exc


def pool_key(target: SshTarget) -> PoolKey:
    """The pool key of `target` (its pinned key normalised to ``<type> <base64>``)."""
    key = pinned_key(target)
    line = key.export_public_key("openssh").decode().split()
    return PoolKey(target.address, target.port, target.username, " ".join(line[:2]))


def host_key_algs(key: asyncssh.SSHKey) -> list[str]:
    """Host key algorithms to offer: the pinned key's first, then asyncssh's defaults.

    Offering more than the pinned type lets a host whose key type changed present its new key, so the
    answer is a clear host key mismatch rather than a failed key exchange.
    """
    pinned = [alg.decode() for alg in key.sig_algorithms]
    return pinned + [a.decode() for a in get_default_public_key_algs() if a.decode() not in pinned]


async def dial(
    address: str,
    port: int,
    username: str,
    host_key: asyncssh.SSHKey,
    client_key: asyncssh.SSHKey,
    settings: FallbackSettings,
) -> asyncssh.SSHClientConnection:
    """Open an SSH connection that trusts only `host_key`; raise the matching SshError on failure."""
    where = f"{username}@{address}:{port}"
    try:
        async with asyncio.timeout(settings.connect_timeout + 1.0):
            return await asyncssh.connect(
                address,
                port,
                username=username,
                client_keys=[client_key],
                known_hosts=([host_key], [], []),
                server_host_key_algs=host_key_algs(host_key),
                preferred_auth="publickey",
                agent_path=None,
                config=[],
                connect_timeout=settings.connect_timeout,
                keepalive_interval=settings.keepalive_interval,
                keepalive_count_max=3,
            )
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        raise connect_error(exc, where) from exc


@dataclass
class _Slot:
    """One pool entry: its connection (if any), dial lock, channel semaphore and usage."""

    key: PoolKey
    channels: asyncio.Semaphore
    conn: asyncssh.SSHClientConnection | None = None
    dial_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # requests waiting for a channel or running one
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PoolStats:
    """Counters for tests, the status endpoint and the benchmark."""

    connections: int
    in_flight: int
    dials: int
    reuses: int


class Pool:
    """Connections by PoolKey; `process()` runs one remote command on a pooled channel."""

    def __init__(self, client_key: asyncssh.SSHKey, settings: FallbackSettings) -> None:
        self.client_key = client_key
        self.settings = settings
        self._slots: dict[PoolKey, _Slot] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.dials = 0
        self.reuses = 0

    def start(self) -> None:
        """Start the idle sweeper."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="ssh-pool-sweeper")

    def stats(self) -> PoolStats:
        """Current counters."""
        live = [s for s in self._slots.values() if s.conn is not None and not s.conn.is_closed()]
        busy = sum(s.in_flight for s in self._slots.values())
        return PoolStats(connections=len(live), in_flight=busy, dials=self.dials, reuses=self.reuses)

    @contextlib.asynccontextmanager
    async def process(
        self, target: SshTarget, command: str, abort: Callable[[], bool] | None = None
    ) -> AsyncIterator[Process]:
        """Run `command` on a pooled channel to `target`; the channel is closed when the block exits.

        `abort` is asked once a channel is free, before the command is sent: True raises `NotStarted`
        (a cancel came while the command waited for a channel; nothing ran)."""
        key = pool_key(target)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(key, asyncio.Semaphore(self.settings.max_channels_per_host))
        slot.users += 1
        try:
            try:
                async with asyncio.timeout(self.settings.queue_timeout):
                    await slot.channels.acquire()
            except TimeoutError:
                raise Busy(
                    f"{key.where()}: {self.settings.max_channels_per_host} commands already running; "
                    f"no channel free within {self.settings.queue_timeout:g}s"
                ) from None
            slot.in_flight += 1
            try:
                if abort is not None and abort():
                    raise NotStarted(f"{key.where()}: cancelled before it started; nothing ran")
                proc = await self._open(slot, command)
                try:
                    yield proc
                finally:
                    proc.close()
            finally:
                slot.in_flight -= 1
                slot.channels.release()
        finally:
            slot.users -= 1
            slot.last_used = time.monotonic()

    @contextlib.asynccontextmanager
    async def side_process(self, target: SshTarget, command: str) -> AsyncIterator[Process]:
        """Run `command` on a connection of its own to `target`, outside the pool and its channel cap: a
        cancel must get through while every channel of the host is taken (by what it cancels)."""
        key = pool_key(target)
        host_key = asyncssh.import_public_key(key.host_key)
        conn = await dial(key.address, key.port, key.username, host_key, self.client_key, self.settings)
        try:
            try:
                proc = await conn.create_process(command, encoding=None)
            except (OSError, asyncssh.Error) as exc:
                raise ExecFailed(f"{key.where()}: could not start the command: {exc}") from exc
            try:
                yield proc
            finally:
                proc.close()
        finally:
            conn.close()
            with contextlib.suppress(OSError, asyncssh.Error):
                await conn.wait_closed()

    async def _connection(self, slot: _Slot) -> tuple[asyncssh.SSHClientConnection, bool]:
        """The slot's live connection, dialling one if needed; the flag says whether it is new."""
        async with slot.dial_lock:
            if slot.conn is not None and not slot.conn.is_closed():
                self.reuses += 1
                return slot.conn, False
            if slot.conn is not None:
                log.info("connection to %s was closed; redialling", slot.key.where())
            slot.conn = None
            key = slot.key
            self.dials += 1
            slot.conn = await dial(
                key.address,
                key.port,
                key.username,
                asyncssh.import_public_key(key.host_key),
                self.client_key,
                self.settings,
            )
            log.info("connected to %s", key.where())
            return slot.conn, True

    async def _open(self, slot: _Slot, command: str) -> Process:
        """Open a session channel and start `command`; retry once on a fresh connection if the channel
        of a reused connection never opened (the command cannot have started)."""
        for attempt in (1, 2):
            conn, fresh = await self._connection(slot)
            try:
                return await conn.create_process(command, encoding=None)
            except asyncssh.ChannelOpenError as exc:
                never_opened = exc.code == asyncssh.OPEN_CONNECT_FAILED
                if conn.is_closed():
                    self._forget(slot, conn)
                if never_opened and not fresh and attempt == 1:
                    continue
                if not never_opened and conn.is_closed():
                    raise Disconnected(
                        f"{slot.key.where()}: connection lost while starting the command; it may have run"
                    ) from exc
                raise ExecFailed(f"{slot.key.where()}: could not start the command: {exc.reason}") from exc
            except (OSError, asyncssh.Error) as exc:
                self._forget(slot, conn)
                raise Disconnected(
                    f"{slot.key.where()}: connection failed while starting the command; it may have run"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _forget(self, slot: _Slot, conn: asyncssh.SSHClientConnection) -> None:
        """Drop `conn` from `slot` if it is still the slot's connection."""
        if slot.conn is conn:
            slot.conn = None

    async def _sweep(self) -> None:
        """Every few seconds, close idle connections and forget unused slots."""
        period = min(max(self.settings.idle_timeout / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Close connections idle for `idle_timeout` with nothing in flight; return how many closed."""
        now = time.monotonic() if now is None else now
        closed = 0
        for key, slot in list(self._slots.items()):
            if slot.users or now - slot.last_used < self.settings.idle_timeout:
                continue
            if slot.conn is not None:
                log.info("closing idle connection to %s", key.where())
                self._close(slot.conn)
                closed += 1
            del self._slots[key]
        return closed

    def _close(self, conn: asyncssh.SSHClientConnection) -> None:
        """Close `conn` and wait for it in a tracked task."""
        conn.close()
        task = asyncio.create_task(conn.wait_closed())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Stop the sweeper and close every connection (call once nothing is in flight)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for slot in self._slots.values():
            if slot.conn is not None:
                self._close(slot.conn)
                slot.conn = None
        self._slots.clear()
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=5.0)
