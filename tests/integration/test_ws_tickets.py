"""The browser stream's tickets in the database (`services.api.store.tickets`), on real SQLite and PostgreSQL:
a ticket is consumed once even when two engines (two API instances) race for it, only its hash is stored,
an expired one is refused and pruned, the outstanding bound is per key; the key check names revoked, expired
and deleted keys; a version 3 database is upgraded to 4 (the table made) at start."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.db import initialise, make_engine, sessionmaker
from services.api.store.models import SCHEMA_VERSION, utcnow
from services.api.store.tickets import TicketHolder, TicketStore, closed_keys, ticket_hash

WEB = TicketHolder("web-read", "read", {"role": "web"})


async def _schema(database: str, tmp_path: Path) -> None:
    engine = make_engine(database)
    try:
        await initialise(engine, ApiSettings(database_url=database, api_key_file=tmp_path / "key"))
    finally:
        await engine.dispose()


async def _warm(*engines: AsyncEngine) -> None:
    """Open five connections on each engine at once and return them to its pool."""

    async def hold(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await asyncio.sleep(0.1)

    await asyncio.gather(*(hold(engine) for engine in engines for _ in range(5)))


async def test_a_ticket_is_consumed_once_across_instances_and_only_its_hash_is_stored(
    database: str, tmp_path: Path
) -> None:
    await _schema(database, tmp_path)
    one, two = make_engine(database), make_engine(database)  # two API instances' engines
    try:
        issuer, other = TicketStore(one, ttl=30), TicketStore(two, ttl=30)
        ticket = await issuer.issue(WEB)
        assert ticket is not None
        async with one.connect() as conn:
            stored = (await conn.execute(text("SELECT ticket_hash, key_name, scope FROM ws_ticket"))).all()
        assert [(r[0], r[1]) for r in stored] == [(ticket_hash(ticket), "web-read")]
        assert ticket not in str(stored)
        await _warm(one, two)  # pooled connections ready: the attempts below really run at once
        # ten attempts at once, half on each instance: exactly one gets the holder, with its scope
        got = await asyncio.gather(*(store.consume(ticket) for store in [issuer, other] * 5))
        assert [g for g in got if g is not None] == [WEB]
        assert await other.consume(ticket) is None
        for bad in ("", "x" * 5000, "made-up"):
            assert await other.consume(bad) is None
        assert await issuer.outstanding() == 0
    finally:
        await one.dispose()
        await two.dispose()


async def test_expired_tickets_are_refused_and_pruned_and_the_bound_is_per_key(
    database: str, tmp_path: Path
) -> None:
    await _schema(database, tmp_path)
    engine = make_engine(database)
    now = [utcnow()]
    try:
        store = TicketStore(engine, ttl=5, max_per_key=3, clock=lambda: now[0])
        old = [await store.issue(WEB) for _ in range(3)]
        assert None not in old
        assert await store.issue(WEB) is None  # the key's bound: 429
        admin = await store.issue(TicketHolder("admin", "admin", None))
        assert admin is not None  # another key is not starved
        now[0] += timedelta(seconds=6)  # all of them expired
        assert await store.consume(str(old[0])) is None  # expired: refused (and deleted)
        fresh = await store.issue(WEB)  # the bound counts unexpired tickets only; this issue prunes
        assert fresh is not None
        async with engine.connect() as conn:
            left = (await conn.execute(text("SELECT count(*) FROM ws_ticket"))).scalar_one()
        assert left == 1  # the expired rows were pruned by the issue
        assert await store.consume(fresh) == WEB
    finally:
        await engine.dispose()


async def test_closed_keys_names_revoked_expired_and_deleted_keys(database: str, tmp_path: Path) -> None:
    await _schema(database, tmp_path)
    engine = make_engine(database)
    try:
        async with sessionmaker(engine)() as session:
            await crud.create_api_key(session, "fine")
            await crud.create_api_key(session, "soon", expires_at=utcnow() + timedelta(seconds=60))
            await crud.create_api_key(session, "gone")
            await crud.revoke_api_key(session, "gone")
        names = ["fine", "soon", "gone", "never-existed"]
        assert await closed_keys(engine, names, utcnow()) == {"gone": "revoked", "never-existed": "deleted"}
        later = utcnow() + timedelta(seconds=61)
        assert await closed_keys(engine, names, later) == {
            "gone": "revoked",
            "soon": "expired",
            "never-existed": "deleted",
        }
        many = [f"k{n}" for n in range(1200)] + ["fine"]  # more than one batch
        assert len(await closed_keys(engine, many, utcnow())) == 1200
    finally:
        await engine.dispose()


async def test_a_version_3_database_gets_the_ticket_table_at_start(database: str, tmp_path: Path) -> None:
    await _schema(database, tmp_path)
    engine = make_engine(database)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE ws_ticket"))
            await conn.execute(text("UPDATE schema_version SET version = 3"))
        settings = ApiSettings(database_url=database, api_key_file=tmp_path / "key")
        assert await initialise(engine, settings) is None  # upgraded in place, its key kept
        async with engine.connect() as conn:
            assert await conn.run_sync(lambda c: inspect(c).has_table("ws_ticket"))
            version = (await conn.execute(text("SELECT version FROM schema_version"))).scalar_one()
        assert version == SCHEMA_VERSION == 4
        assert await TicketStore(engine, ttl=30).issue(WEB) is not None
    finally:
        await engine.dispose()
