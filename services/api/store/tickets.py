"""The browser stream's one-time tickets, in the database (table ``ws_ticket``), and the key check of open
browser connections.

    issue(holder)    prune up to `PRUNE_BATCH` expired rows, count the key's unexpired tickets (at most
                     `max_per_key`, else None: 429), insert SHA-256(ticket) with the holder and its expiry
    consume(ticket)  ``DELETE ... WHERE ticket_hash = :h RETURNING ...``: one statement, so a ticket opens one
                     socket however many API instances it is presented to at once; an expired row is
                     deleted too and refused

Every API instance on the database shares the tickets: a load balancer needs no sticky sessions. Only the
hash is stored; the ticket itself is neither stored nor logged. ``RETURNING`` on a ``DELETE`` needs SQLite
3.35 or later (PostgreSQL has it): `check_sqlite` says so at start instead of on the first socket.

The outstanding-ticket bound is per API key, not global: one key asking for tickets in a loop cannot starve
the browsers of another (the key's read rate limit applies on top). Count and insert are not serialised
across instances, so concurrent issues may overshoot the bound by a few: it bounds storage, it is no quota.
Expired rows are deleted when presented, and pruned by every issue (a bounded batch: each issue adds one
row and may delete many, so they cannot pile up).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.store.models import ApiKey, WsTicket, utcnow
from shared.errors import ConfigError

MAX_TICKETS_PER_KEY = 1_000  # unexpired tickets one API key may have outstanding
PRUNE_BATCH = 100  # expired rows an issue deletes at most
MAX_TICKET_CHARS = 200  # longer is no ticket of ours: refused without a query
KEY_CHECK_BATCH = 500  # key names per query of `closed_keys`

TICKETS: Table = WsTicket.__table__  # type: ignore[attr-defined]
KEYS: Table = ApiKey.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class TicketHolder:
    """Who a ticket was issued to: the API key's name, role and label scope."""

    key_name: str
    role: str
    scope: dict[str, str] | None


def ticket_hash(ticket: str) -> str:
    """The SHA-256 hex of `ticket`: what is stored."""
    return hashlib.sha256(ticket.encode("utf-8", "replace")).hexdigest()


def check_sqlite(engine: AsyncEngine) -> None:
    """ConfigError on a SQLite older than 3.35 (no ``DELETE ... RETURNING``)."""
    if engine.dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
        raise ConfigError(
            "database_url", f"SQLite {sqlite3.sqlite_version} is too old: the API needs 3.35 or later"
        )


class TicketStore:
    """Single-use tickets shared by every API instance on the database, each valid `ttl` seconds."""

    def __init__(
        self,
        engine: AsyncEngine,
        ttl: float,
        max_per_key: int = MAX_TICKETS_PER_KEY,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        check_sqlite(engine)
        self.engine = engine
        self.ttl = ttl
        self.max_per_key = max_per_key
        self._clock = clock

    async def issue(self, holder: TicketHolder) -> str | None:
        """A new ticket for `holder`; None when its key has `max_per_key` unexpired tickets outstanding.
        Database errors propagate (503)."""
        now = self._clock()
        expired = select(TICKETS.c.ticket_hash).where(TICKETS.c.expires_at <= now).limit(PRUNE_BATCH)
        outstanding = (
            select(func.count())
            .select_from(TICKETS)
            .where(TICKETS.c.key_name == holder.key_name)
            .where(TICKETS.c.expires_at > now)
        )
        ticket = secrets.token_urlsafe(32)
        async with self.engine.begin() as conn:
            await conn.execute(delete(TICKETS).where(TICKETS.c.ticket_hash.in_(expired.scalar_subquery())))
            if (await conn.execute(outstanding)).scalar_one() >= self.max_per_key:
                return None
            await conn.execute(
                insert(TICKETS).values(
                    ticket_hash=ticket_hash(ticket),
                    key_name=holder.key_name,
                    role=holder.role,
                    scope=holder.scope,
                    expires_at=now + timedelta(seconds=self.ttl),
                )
            )
        return ticket

    async def consume(self, ticket: str) -> TicketHolder | None:
        """The holder of `ticket` if it is known and unexpired; it is spent either way (once, across every
        instance: the row is deleted by the statement that reads it). Database errors propagate."""
        if not ticket or len(ticket) > MAX_TICKET_CHARS:
            return None
        stmt = (
            delete(TICKETS)
            .where(TICKETS.c.ticket_hash == ticket_hash(ticket))
            .returning(TICKETS.c.key_name, TICKETS.c.role, TICKETS.c.scope, TICKETS.c.expires_at)
        )
        async with self.engine.begin() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None or row.expires_at <= self._clock():
            return None
        scope = dict(row.scope) if isinstance(row.scope, dict) and row.scope else None
        return TicketHolder(row.key_name, row.role, scope)

    async def outstanding(self) -> int:
        """The unexpired tickets of every key (for tests and diagnostics)."""
        stmt = select(func.count()).select_from(TICKETS).where(TICKETS.c.expires_at > self._clock())
        async with self.engine.connect() as conn:
            return int((await conn.execute(stmt)).scalar_one())


async def closed_keys(engine: AsyncEngine, names: Collection[str], now: datetime) -> dict[str, str]:
    """Of the API keys `names`, those no longer valid at `now`: name → ``revoked``, ``expired`` or
    ``deleted`` (no such key). One query per `KEY_CHECK_BATCH` names; database errors propagate."""
    wanted = sorted(set(names))
    found: dict[str, Any] = {}
    async with engine.connect() as conn:
        for at in range(0, len(wanted), KEY_CHECK_BATCH):
            batch = wanted[at : at + KEY_CHECK_BATCH]
            stmt = select(KEYS.c.name, KEYS.c.revoked_at, KEYS.c.expires_at).where(KEYS.c.name.in_(batch))
            for key in await conn.execute(stmt):
                found[key.name] = key
    closed: dict[str, str] = {}
    for name in wanted:
        row: Any = found.get(name)
        if row is None:
            closed[name] = "deleted"
        elif row.revoked_at is not None:
            closed[name] = "revoked"
        elif row.expires_at is not None and row.expires_at <= now:
            closed[name] = "expired"
    return closed
