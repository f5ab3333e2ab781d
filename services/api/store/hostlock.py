"""One lifecycle operation (install, uninstall, regenerate, ...) per host at a time, across API instances.

Within one API process an asyncio lock per host orders the operations; on PostgreSQL each operation also
holds a session-level advisory lock keyed by the host id for its duration, so two API instances of one
deployment never install and uninstall the same host at once. (SQLite means one API instance: the process
lock is the whole story.) The advisory lock lives on one pooled connection and is released when the
operation ends, or by PostgreSQL itself if that connection or the API dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

LOCK_NAMESPACE = 0x57A1  # first key of pg_advisory_lock(int, int): Warlock's host locks


def lock_key(host_id: str) -> int:
    """The second advisory-lock key of `host_id`: a signed 32-bit number derived from its SHA-256."""
    return int.from_bytes(hashlib.sha256(host_id.encode()).digest()[:4], "big", signed=True)


class HostLocks:
    """Per-host mutual exclusion: in this process, and on PostgreSQL across every API instance."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self._local: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, host_id: str) -> AsyncIterator[None]:
        """Hold `host_id`'s lock for the body of the `async with` (waiting for another holder first)."""
        async with self._local.setdefault(host_id, asyncio.Lock()), self.sessions() as session:
            conn = await session.connection()
            if conn.dialect.name != "postgresql":
                yield
                return
            keys = {"ns": LOCK_NAMESPACE, "k": lock_key(host_id)}
            await conn.execute(text("SELECT pg_advisory_lock(:ns, :k)"), keys)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a lost connection released it already
                    await conn.execute(text("SELECT pg_advisory_unlock(:ns, :k)"), keys)
