"""The token authority under a storm: concurrent checks share queries, and nothing is cached.

`services.api.fleet.bus.TokenLookup` on a real database (PostgreSQL, and SQLite): 400 concurrent checks are
answered right from a handful of queries; a token replaced or deleted stops verifying at the next check,
on this lookup and on another one (a second API instance) alike; a database that is down fails the checks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.fleet.bus import TokenLookup
from services.api.store import crud
from services.api.store.db import make_engine, sessionmaker
from services.dev.swarm import swarm_public_key
from services.gateway.server import SharedSync
from shared.ids import HostId
from shared.tokens import generate_token, hash_token
from tests.integration.gateway_fixtures import Fleet, agent, nats_server, running_gateway, token_authority
from tests.support.fleet import provision

COUNT = 400


async def test_concurrent_checks_share_queries_and_revocation_is_immediate(database: str) -> None:
    tokens = await provision(database, COUNT)
    engine = make_engine(database)
    sessions = sessionmaker(engine)
    first, second = TokenLookup(sessions), TokenLookup(sessions)
    try:
        unknown = hash_token(generate_token())
        asked = [hash_token(t) for t in tokens.values()] + [unknown]
        answers = await asyncio.gather(*(first.lookup(h) for h in asked))
        expected = [(host, swarm_public_key(token)) for host, token in tokens.items()]
        assert answers == [*expected, None]
        assert 1 <= first.queries <= 4  # the first query alone, then the rest at most 500 at a time

        victim, gone = "swarm-00007", "swarm-00008"
        old_hash = hash_token(tokens[victim])
        assert await second.lookup(old_hash) == (victim, swarm_public_key(tokens[victim]))
        async with sessions() as session:
            new_token, previous = await crud.replace_agent_token(session, victim)
            assert previous == old_hash
            assert await crud.delete_agent(session, gone) == (True, hash_token(tokens[gone]))
        for lookup in (first, second):  # both "instances" see it at once: nothing was cached
            assert await lookup.lookup(old_hash) is None
            assert await lookup.lookup(hash_token(tokens[gone])) is None
            assert await lookup.lookup(hash_token(new_token)) == (victim, swarm_public_key(tokens[victim]))
    finally:
        await first.stop()
        await second.stop()
        await engine.dispose()


async def test_checks_fail_when_the_database_is_down(tmp_path: Path) -> None:
    """A database that cannot be reached fails every waiting check (the bus answers `unavailable`)."""
    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nothing")
    lookup = TokenLookup(sessionmaker(engine))
    try:
        results = await asyncio.gather(
            *(lookup.lookup(hash_token(generate_token())) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, (OSError, SQLAlchemyError)) for r in results), results
    finally:
        await lookup.stop()
        await engine.dispose()


@pytest.mark.parametrize("max_batch", [1, 7])
async def test_small_batches_answer_everyone(tmp_path: Path, max_batch: int) -> None:
    """However small the batch, every waiting check gets its own answer."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'tokens.db'}"
    tokens = await provision(database, 30)
    engine = make_engine(database)
    lookup = TokenLookup(sessionmaker(engine), max_batch=max_batch)
    try:
        hashes = [hash_token(t) for t in tokens.values()]
        answers = await asyncio.gather(*(lookup.lookup(h) for h in hashes + hashes))
        assert [a[0] if a else None for a in answers] == list(tokens) * 2
        assert lookup.queries >= 60 // max_batch // 2
    finally:
        await lookup.stop()
        await engine.dispose()


async def test_sessions_registering_at_once_share_a_sync_that_began_after_them() -> None:
    """The gateway's SharedSync: a caller never returns on a sync that began before it called."""
    began: list[asyncio.Event] = []
    release: list[asyncio.Event] = []

    async def sync() -> None:
        began.append(asyncio.Event())
        release.append(asyncio.Event())
        began[-1].set()
        await release[-1].wait()

    shared = SharedSync(sync)
    first = asyncio.create_task(shared())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(began) == 1  # sync 1 runs for `first`
    later = [asyncio.create_task(shared()) for _ in range(50)]  # called while sync 1 runs
    await asyncio.sleep(0)
    release[0].set()
    await first
    await asyncio.sleep(0)
    assert not any(t.done() for t in later)  # sync 1 began before they called: not theirs
    assert len(began) == 2  # one more sync serves all fifty
    release[1].set()
    await asyncio.gather(*later)
    assert len(began) == 2


class _StuckSession:
    """A session whose query never returns (a half-open connection to the database)."""

    async def __aenter__(self) -> _StuckSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def exec(self, statement: object) -> None:
        await asyncio.sleep(3600)


async def test_a_stuck_query_fails_its_checks_and_the_next_query_runs() -> None:
    """A query that hangs fails its checks within the timeout; checks asked later get a query of their own."""
    calls: list[int] = []

    def sessions() -> _StuckSession:
        calls.append(1)
        return _StuckSession()

    lookup = TokenLookup(cast("async_sessionmaker[AsyncSession]", sessions), timeout=0.2)
    try:
        started = asyncio.get_running_loop().time()
        first = await asyncio.gather(lookup.lookup("a" * 64), return_exceptions=True)
        assert isinstance(first[0], TimeoutError)
        second = await asyncio.gather(lookup.lookup("b" * 64), return_exceptions=True)
        assert isinstance(second[0], TimeoutError)
        assert asyncio.get_running_loop().time() - started < 2.0
        assert len(calls) == 2
    finally:
        await lookup.stop()


async def test_a_session_keeps_no_copy_of_its_bearer_token(tmp_path: Path) -> None:
    """Once the handler runs, the upgrade's headers (the Authorization header among them) are dropped."""
    with nats_server(tmp_path) as nats_url:
        hosts = Fleet(tmp_path / "tokens.json", ("box",))
        async with (
            token_authority(nats_url, hosts.path),
            running_gateway(nats_url) as gateway,
            agent(gateway, "box", hosts.tokens["box"]),
        ):
            conn = gateway.sessions[HostId("box")].conn
            assert conn.request is not None
            assert conn.response is not None
            assert len(conn.request.headers) == 0
            assert len(conn.response.headers) == 0
            assert hosts.tokens["box"] not in repr(vars(conn))
