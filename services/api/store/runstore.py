"""The exec path's two writes, in plain SQL on the database driver.

    start(ref, run)   look the host (and its agent's public key) up by id (else address) and insert the
                      pending row: tens of microseconds on SQLite, one round trip on PostgreSQL; None
                      when the host is unknown
    finish(id, ...)   set the outcome if the row is still pending or running; False if it was not

Why not the ORM here: every REST command pays for these writes, and SQLAlchemy's ORM over the async
drivers costs about 0.7 ms per statement on this project's machines (a session, a pool checkout with its
reset, several thread hops on aiosqlite): the exec path's three statements cost more than the agent
chain's whole round trip.
Everything else in the API uses sqlmodel. Rows written here must read back through the ORM unchanged, so
values go in as the ORM stores them: enums as their string values, datetimes in UTC (naive text in
SQLAlchemy's format on SQLite, timestamptz on PostgreSQL); tests check the round trip on both backends.

Driver errors become `DatabaseUnavailable` (503). On PostgreSQL a statement that failed because the
connection was lost is retried once on a fresh one: both statements are safe to repeat (the insert is
keyed by command id and skips an existing row; the update is guarded by status). SQLite reopens its
connection on the next call instead.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from services.api.errors import DatabaseUnavailable
from services.api.store.models import UtcDateTime

T = TypeVar("T")
log = logging.getLogger(__name__)

# the columns an outcome sets, in statement order
OUTCOME_COLUMNS = (
    "status",
    "via",
    "exit_code",
    "signal",
    "stdout",
    "stderr",
    "truncated",
    "error_code",
    "error_description",
    "duration_ms",
    "started_at",
    "finished_at",
)


@dataclass(frozen=True, slots=True)
class HostTarget:
    """What the runner needs of a host: its id (the NATS subject), its SSH target, its agent's public
    key (results must verify with it; None: no agent key registered, so no agent result counts), and the
    gateway its agent is recorded connected through (None: not recorded connected), which the runner
    watches while it waits on the agent (`services.api.fleet.inflight`)."""

    id: str
    address: str
    ssh_port: int
    ssh_user: str
    host_key: str | None
    public_key: str | None = None
    gateway_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewRun:
    """A command about to be recorded as pending."""

    command_id: str
    command: str
    timeout: float
    requested_by: str | None
    created_at: datetime


class RunStore(Protocol):
    """The exec path's writes (see the module docstring)."""

    async def start(self, ref: str, run: NewRun) -> HostTarget | None:
        """Insert `run` as pending for the host `ref` names (id, else address); None if it names none."""
        ...

    async def finish(self, command_id: str, values: dict[str, Any]) -> bool:
        """Set `values` (every OUTCOME_COLUMNS key) if the run is still open; whether it was."""
        ...

    async def route_ssh(self, command_id: str) -> bool:
        """Record that the run goes over SSH (via = 'ssh', durably) if it is still pending; whether it is.

        Written before the SSH request is sent: a pending run without it never left by SSH, so the agent's
        ledger alone says whether it ran (`services.api.fleet.reconciler`)."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


def check_database_url(database_url: str) -> None:
    """ValueError unless `database_url` is a SQLite file or PostgreSQL URL with the async driver.

    An in-memory SQLite database is refused: each connection would get its own, empty one.
    """
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise ValueError("not a database URL (sqlite+aiosqlite:///path or postgresql+asyncpg://...)") from exc
    if url.drivername not in SUPPORTED_DRIVERS:
        raise ValueError(f"unsupported driver {url.drivername!r}: use one of {', '.join(SUPPORTED_DRIVERS)}")
    if url.get_backend_name() == "sqlite":
        path = url.database
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ValueError("give SQLite a file path (sqlite+aiosqlite:///path): in-memory is not shared")


def open_store(database_url: str) -> RunStore:
    """The store for `database_url` (the API's SQLAlchemy URL); connects lazily, on first use."""
    check_database_url(database_url)
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return SqliteRunStore(str(Path(url.database or "")))
    return PgRunStore(url.set(drivername="postgresql").render_as_string(hide_password=False))


# ----------------------------------------------------------------------------- SQLite

_SQLITE_HOST = (
    "SELECT h.id, h.address, h.ssh_port, h.ssh_user, h.host_key, a.public_key,"
    " CASE WHEN a.status = 'connected' THEN a.gateway_id END FROM host h"
    " LEFT JOIN agent_connection a ON a.host_id = h.id"
    " WHERE h.id = ?1 OR h.address = ?1 ORDER BY h.id = ?1 DESC LIMIT 1"
)
_SQLITE_INSERT = (
    "INSERT OR IGNORE INTO command_run (command_id, host_id, command, timeout, requested_by, status, stdout,"
    " stderr, truncated, created_at) VALUES (?, ?, ?, ?, ?, 'pending', '', '', 0, ?)"
)
_SQLITE_ROUTE_SSH = "UPDATE command_run SET via = 'ssh' WHERE command_id = ? AND status = 'pending'"
_SQLITE_UPDATE = (  # OUTCOME_COLUMNS, in order
    "UPDATE command_run SET status = ?, via = ?, exit_code = ?, signal = ?, stdout = ?, stderr = ?,"
    " truncated = ?, error_code = ?, error_description = ?, duration_ms = ?, started_at = ?, finished_at = ?"
    " WHERE command_id = ? AND status IN ('pending', 'running')"
)


def outcome_params(values: dict[str, Any], when: Callable[[datetime | None], Any]) -> list[Any]:
    """The OUTCOME_COLUMNS values in order: enums as their string values, datetimes through `when`."""
    params: list[Any] = []
    for column in OUTCOME_COLUMNS:
        value = values[column]
        if column.endswith("_at"):
            value = when(value)
        elif isinstance(value, Enum):
            value = value.value
        params.append(value)
    return params


_UTC_DATETIME = UtcDateTime()
_SQLITE_DIALECT = sqlite_dialect.dialect()


def sqlite_datetime(value: datetime | None) -> str | None:
    """`value` as the ORM stores a `UtcDateTime` on SQLite: naive UTC text with microseconds."""
    naive = _UTC_DATETIME.process_bind_param(value, _SQLITE_DIALECT)  # refuses naive datetimes
    return None if naive is None else naive.isoformat(" ", "microseconds")


class SqliteRunStore:
    """Each call is a few tens of microseconds of SQLite work, done where it costs least.

    First on the event loop's own connection, which never waits for a lock (busy timeout 0) and never
    checkpoints (the only step that fsyncs): the thread hop it saves cost more than the write itself
    (~80 us against ~20-40 us, measured here). If another writer holds the lock, the same call runs on a
    worker thread's connection, which waits up to 30 s as the engine's do; that thread also checkpoints
    the WAL every `CHECKPOINT_EVERY` writes made on the loop.
    """

    CHECKPOINT_EVERY = 256

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runstore")
        self._loop_conn: sqlite3.Connection | None = None  # used on the event loop only
        self._thread_conn: sqlite3.Connection | None = None  # used on self._thread only
        self._loop_writes = 0

    def _connect(self, timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")  # as the engine's connections (services.api.store.db)
        return conn

    def _on_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread_conn is None:
            self._thread_conn = self._connect(timeout=30)
        try:
            return fn(self._thread_conn)
        except sqlite3.Error:
            self._thread_conn.close()  # reopen next time: the file may have been replaced
            self._thread_conn = None
            raise

    def _checkpoint(self) -> None:
        try:
            self._on_thread(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)"))
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint failed: %s", exc)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            try:
                if self._loop_conn is None:
                    self._loop_conn = self._connect(timeout=0)
                    self._loop_conn.execute("PRAGMA wal_autocheckpoint=0")
                result = fn(self._loop_conn)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                return await loop.run_in_executor(self._thread, self._on_thread, fn)
        except sqlite3.Error as exc:
            if self._loop_conn is not None:
                self._loop_conn.close()
                self._loop_conn = None
            raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}: {exc}") from exc
        self._loop_writes += 1
        if self._loop_writes % self.CHECKPOINT_EVERY == 0:
            loop.run_in_executor(self._thread, self._checkpoint)  # in the background: PASSIVE never blocks
        return result

    async def start(self, ref: str, run: NewRun) -> HostTarget | None:
        """See `RunStore.start`."""
        created = sqlite_datetime(run.created_at)

        def start(conn: sqlite3.Connection) -> HostTarget | None:
            row = conn.execute(_SQLITE_HOST, (ref,)).fetchone()
            if row is None:
                return None
            target = HostTarget(*row)
            values = (run.command_id, target.id, run.command, run.timeout, run.requested_by, created)
            conn.execute(_SQLITE_INSERT, values)  # autocommit: one statement
            return target

        return await self._call(start)

    async def finish(self, command_id: str, values: dict[str, Any]) -> bool:
        """See `RunStore.finish`."""
        params = [*outcome_params(values, sqlite_datetime), command_id]

        def finish(conn: sqlite3.Connection) -> bool:
            return conn.execute(_SQLITE_UPDATE, params).rowcount == 1  # autocommit: one statement

        return await self._call(finish)

    async def route_ssh(self, command_id: str) -> bool:
        """See `RunStore.route_ssh`."""

        def route(conn: sqlite3.Connection) -> bool:
            return conn.execute(_SQLITE_ROUTE_SSH, (command_id,)).rowcount == 1

        return await self._call(route)

    async def close(self) -> None:
        """See `RunStore.close`."""

        def close() -> None:
            if self._thread_conn is not None:
                self._thread_conn.close()
                self._thread_conn = None

        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown(wait=True)
        if self._loop_conn is not None:
            self._loop_conn.close()
            self._loop_conn = None


# ----------------------------------------------------------------------------- PostgreSQL

_PG_START = """
WITH h AS (
    SELECT h.id, h.address, h.ssh_port, h.ssh_user, h.host_key, a.public_key,
           CASE WHEN a.status = 'connected' THEN a.gateway_id END AS gateway_id FROM host h
    LEFT JOIN agent_connection a ON a.host_id = h.id
    WHERE h.id = $1 OR h.address = $1 ORDER BY h.id = $1 DESC LIMIT 1
), ins AS (
    INSERT INTO command_run (command_id, host_id, command, timeout, requested_by, status, stdout, stderr,
                             truncated, created_at)
    SELECT $2, h.id, $3, $4, $5, 'pending', '', '', false, $6 FROM h
    ON CONFLICT (command_id) DO NOTHING
    RETURNING host_id
)
SELECT id, address, ssh_port, ssh_user, host_key, public_key, gateway_id FROM h
"""
_PG_UPDATE = (  # OUTCOME_COLUMNS, in order
    "UPDATE command_run SET status = $1, via = $2, exit_code = $3, signal = $4, stdout = $5, stderr = $6,"
    " truncated = $7, error_code = $8, error_description = $9, duration_ms = $10, started_at = $11,"
    " finished_at = $12 WHERE command_id = $13 AND status IN ('pending', 'running')"
)
_PG_ROUTE_SSH = "UPDATE command_run SET via = 'ssh' WHERE command_id = $1 AND status = 'pending'"
# a lost connection (server restart, terminated backend; asyncpg may notice it mid-call as an internal
# state error): worth one retry once the pool has dropped its connections
_PG_LOST = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    ConnectionError,
)
_PG_ERRORS = (
    TimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class PgRunStore:
    """Two small asyncpg pools of the API's own; each call is one autocommitted statement.

    The pending row is committed durably (the at-most-once contract rests on it: a command that may have
    run must have a row). The outcome goes through a pool with ``synchronous_commit=off``: its commit
    returns before the WAL is flushed, saving an fsync per command (~0.4 ms here). A PostgreSQL crash
    within a fraction of a second of it can leave that run pending, never re-run: what an API crash at
    the same moment leaves, and what SQLite's ``synchronous=NORMAL`` risks for both writes on a power cut.
    """

    def __init__(self, dsn: str, max_size: int = 5) -> None:
        self.dsn = dsn
        self.max_size = max_size
        self._pools: dict[bool, asyncpg.Pool] = {}  # durable? -> pool
        self._opening = asyncio.Lock()

    async def pool(self, durable: bool) -> asyncpg.Pool:
        """The pool whose commits are durable (`durable`) or return before the WAL flush."""
        pool = self._pools.get(durable)
        if pool is None:
            async with self._opening:
                pool = self._pools.get(durable)
                if pool is None:
                    pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=1,
                        max_size=self.max_size,
                        timeout=5,
                        command_timeout=30,
                        server_settings={"synchronous_commit": "on" if durable else "off"},
                    )
                    self._pools[durable] = pool
        return pool

    async def _call(self, durable: bool, fn: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        try:
            pool = await self.pool(durable)
            try:
                return await fn(pool)
            except _PG_LOST:
                await pool.expire_connections()  # every idle connection may be dead: reconnect them
                return await fn(pool)
        except _PG_ERRORS as exc:
            raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}: {exc}") from exc

    async def start(self, ref: str, run: NewRun) -> HostTarget | None:
        """See `RunStore.start`."""
        args = (ref, run.command_id, run.command, run.timeout, run.requested_by, run.created_at)

        async def start(pool: asyncpg.Pool) -> HostTarget | None:
            row = await pool.fetchrow(_PG_START, *args)
            return None if row is None else HostTarget(*row)

        return await self._call(True, start)

    async def finish(self, command_id: str, values: dict[str, Any]) -> bool:
        """See `RunStore.finish`."""
        params = outcome_params(values, lambda when: when)

        async def finish(pool: asyncpg.Pool) -> bool:
            status: str = await pool.execute(_PG_UPDATE, *params, command_id)
            return status == "UPDATE 1"

        return await self._call(False, finish)

    async def route_ssh(self, command_id: str) -> bool:
        """See `RunStore.route_ssh` (on the durable pool)."""

        async def route(pool: asyncpg.Pool) -> bool:
            status: str = await pool.execute(_PG_ROUTE_SSH, command_id)
            return status == "UPDATE 1"

        return await self._call(True, route)

    async def close(self) -> None:
        """See `RunStore.close`."""
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close()
