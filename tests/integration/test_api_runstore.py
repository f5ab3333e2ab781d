"""The exec path's plain-SQL store against real SQLite and PostgreSQL: what it writes reads back through
the ORM unchanged, it finds hosts as the ORM does, it never overwrites a settled run, and it survives a
locked SQLite database and a lost PostgreSQL connection."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.errors import DatabaseUnavailable
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.db import initialise, make_engine, sessionmaker
from services.api.store.models import AgentStatus, CommandStatus, Host, Via
from services.api.store.runstore import HostTarget, NewRun, PgRunStore, RunStore, SqliteRunStore, open_store
from tests.support.db import BACKENDS, fresh_database

pytestmark = pytest.mark.parametrize("backend", BACKENDS)

Db = tuple[str, AsyncEngine]  # URL and engine of a fresh database
T0 = datetime(2026, 11, 26, 9, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture
async def database(backend: str, tmp_path: Path) -> AsyncIterator[Db]:
    """A fresh initialised database with hosts `web-1` (10.0.0.1) and `10.0.0.2` (address `web-1`)."""
    async with fresh_database(backend, tmp_path) as url:
        engine = make_engine(url)
        try:
            await initialise(engine, ApiSettings(api_key_file=tmp_path / "key"), bootstrap_key=False)
            async with sessionmaker(engine)() as session:
                web = Host(id="web-1", address="10.0.0.1", ssh_port=2222, ssh_user="ops", host_key="k1")
                session.add(web)
                session.add(Host(id="other", address="web-1"))  # an address that is another host's id
                await session.commit()
            yield url, engine
        finally:
            await engine.dispose()


@pytest.fixture
async def store(database: Db) -> AsyncIterator[RunStore]:
    """The store for the database."""
    opened = open_store(database[0])
    try:
        yield opened
    finally:
        await opened.close()


def _run(command_id: str = "cmd-1") -> NewRun:
    return NewRun(command_id, "echo hi", 12.5, "ops-key", T0)


def _outcome(**values: object) -> dict[str, object]:
    outcome: dict[str, object] = {
        "status": CommandStatus.SUCCEEDED,
        "via": Via.AGENT,
        "exit_code": 0,
        "signal": None,
        "stdout": "hi\n",
        "stderr": "",
        "truncated": True,
        "error_code": None,
        "error_description": None,
        "duration_ms": 3.25,
        "started_at": T0 + timedelta(milliseconds=1),
        "finished_at": (T0 + timedelta(milliseconds=5)).astimezone(timezone(timedelta(hours=2))),
    }
    outcome.update(values)
    return outcome


async def test_rows_read_back_through_the_orm(store: RunStore, database: Db) -> None:
    """The pending row and then the outcome read back through sqlmodel exactly as written."""
    target = await store.start("web-1", _run())
    assert target == HostTarget("web-1", "10.0.0.1", 2222, "ops", "k1")
    async with sessionmaker(database[1])() as session:
        pending = await crud.get_run(session, "cmd-1")
    assert (pending.host_id, pending.command, pending.timeout) == ("web-1", "echo hi", 12.5)
    assert (pending.requested_by, pending.status, pending.via) == ("ops-key", CommandStatus.PENDING, None)
    assert (pending.stdout, pending.truncated, pending.created_at) == ("", False, T0)
    assert await store.finish("cmd-1", _outcome())
    async with sessionmaker(database[1])() as session:
        done = await crud.get_run(session, "cmd-1")
    assert (done.status, done.via, done.exit_code, done.stdout) == ("succeeded", "agent", 0, "hi\n")
    assert (done.truncated, done.duration_ms) == (True, 3.25)
    assert done.started_at == T0 + timedelta(milliseconds=1)
    assert done.finished_at == T0 + timedelta(milliseconds=5)
    assert done.finished_at.tzinfo is not None


async def test_start_returns_the_agent_public_key(store: RunStore, database: Db) -> None:
    """The pending-row write also reads the host's agent key (results must verify with it); None until
    one is registered."""
    assert (await store.start("web-1", _run("k0"))) == HostTarget(
        "web-1", "10.0.0.1", 2222, "ops", "k1", None
    )
    public = "ed25519:" + "A" * 43
    async with sessionmaker(database[1])() as session:
        await crud.set_agent_public_key(session, "web-1", public)
    found = await store.start("10.0.0.1", _run("k1"))
    assert found is not None
    assert found.public_key == public
    other = await store.start("other", _run("k2"))
    assert other is not None
    assert other.public_key is None


async def test_host_is_found_by_id_before_address(store: RunStore) -> None:
    """`web-1` is one host's id and another's address: the id wins, as in the ORM's lookup."""
    by_id = await store.start("web-1", _run("a"))
    by_address = await store.start("10.0.0.1", _run("b"))
    assert by_id is not None
    assert by_address is not None
    assert by_id.id == by_address.id == "web-1"
    assert await store.start("web-2", _run("c")) is None


async def test_settled_runs_are_never_overwritten(store: RunStore, database: Db) -> None:
    """The first outcome wins; a second is refused (False), and an unknown id changes nothing."""
    await store.start("web-1", _run())
    assert await store.finish("cmd-1", _outcome(status=CommandStatus.TIMED_OUT, error_code="timeout"))
    assert not await store.finish("cmd-1", _outcome())
    assert not await store.finish("no-such-run", _outcome())
    async with sessionmaker(database[1])() as session:
        assert (await crud.get_run(session, "cmd-1")).status == CommandStatus.TIMED_OUT


async def test_a_repeated_start_keeps_the_first_row(store: RunStore, database: Db) -> None:
    """A retried insert of the same command id (after a lost connection) is a no-op, not an error."""
    await store.start("web-1", _run())
    await store.finish("cmd-1", _outcome())
    assert await store.start("web-1", _run()) is not None
    async with sessionmaker(database[1])() as session:
        assert (await crud.get_run(session, "cmd-1")).status == CommandStatus.SUCCEEDED


async def test_waits_for_another_writer(backend: str, store: RunStore, database: Db) -> None:
    """Another connection holding the write lock delays the store; it does not fail it."""
    if backend == "sqlite":
        path = make_url(database[0]).database
        assert path is not None
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE host SET ssh_port = 2200 WHERE id = 'other'")
        pending = asyncio.ensure_future(store.start("web-1", _run()))
        await asyncio.sleep(0.3)
        assert not pending.done()  # waiting on the worker thread, not failed, not blocking the loop
        other.execute("COMMIT")
        other.close()
    else:
        dsn = make_url(database[0]).set(drivername="postgresql").render_as_string(hide_password=False)
        other_pg = await asyncpg.connect(dsn)
        tx = other_pg.transaction()
        await tx.start()
        await other_pg.execute("LOCK TABLE command_run IN EXCLUSIVE MODE")
        pending = asyncio.ensure_future(store.start("web-1", _run()))
        await asyncio.sleep(0.3)
        assert not pending.done()
        await tx.commit()
        await other_pg.close()
    assert await asyncio.wait_for(pending, 10) is not None
    assert await store.finish("cmd-1", _outcome())


async def test_lost_connection_is_retried_then_unavailable(
    backend: str, store: RunStore, database: Db
) -> None:
    """A PostgreSQL backend terminated under the pool is replaced on the next call; a database that is
    gone is DatabaseUnavailable (503), on either backend."""
    await store.start("web-1", _run("warm"))
    url = make_url(database[0])
    if backend == "postgresql":
        dsn = url.set(drivername="postgresql", database="test").render_as_string(hide_password=False)
        admin = await asyncpg.connect(dsn)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                url.database,
            )
        finally:
            await admin.close()
        assert killed >= 1
        assert await store.start("web-1", _run("after-kill")) is not None
        gone = open_store(url.set(database="warlock_no_such_db").render_as_string(hide_password=False))
    else:
        gone = SqliteRunStore(str(Path(url.database or "").parent))  # a directory: cannot be opened
    try:
        with pytest.raises(DatabaseUnavailable):
            await gone.start("web-1", _run("never"))
    finally:
        await gone.close()


async def test_commit_settings(backend: str, store: RunStore) -> None:
    """PostgreSQL: the pending row's pool commits synchronously, only the outcome's does not. SQLite: the
    event loop's connection never waits for a lock and never checkpoints (both would block the loop)."""
    if isinstance(store, PgRunStore):
        assert await (await store.pool(durable=True)).fetchval("SHOW synchronous_commit") == "on"
        assert await (await store.pool(durable=False)).fetchval("SHOW synchronous_commit") == "off"
        return
    assert isinstance(store, SqliteRunStore)
    assert backend == "sqlite"
    await store.start("web-1", _run())
    conn = store._loop_conn  # the connection used on the event loop
    assert conn is not None
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (0,)
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def _gateway(target: HostTarget | None) -> str | None:
    assert target is not None
    return target.gateway_id


async def test_the_target_names_the_recorded_gateway_and_the_ssh_route_is_recorded(
    store: RunStore, database: Db
) -> None:
    """The target carries the gateway the agent is recorded connected through (None when it is not, on
    both write paths); `route_ssh` marks a pending run via ssh, and nothing that is settled or unknown."""
    assert _gateway(await store.start("web-1", _run("r1"))) is None
    sessions = sessionmaker(database[1])
    async with sessions() as session:
        await crud.set_agent_public_key(session, "web-1", "ed25519:" + "A" * 43)
        agent = await crud.get_agent(session, "web-1")
        assert agent is not None
        agent.status, agent.gateway_id = AgentStatus.CONNECTED, "gw-2"
        session.add(agent)
        await session.commit()
    assert _gateway(await store.start("web-1", _run("r2"))) == "gw-2"
    async with sessions() as session:
        operator_target = await crud.start_run(session, "web-1", _run("r3"))
        assert operator_target is not None
        assert operator_target.gateway_id == "gw-2"
        assert await crud.mark_gateway_gone(session, "gw-2") == 1
        gone = await crud.start_run(session, "web-1", _run("r4"))
        assert gone is not None
        assert gone.gateway_id is None
    assert _gateway(await store.start("web-1", _run("r5"))) is None

    assert await store.route_ssh("r1")
    async with sessions() as session:
        routed = await crud.get_run(session, "r1")
    assert (routed.status, routed.via) == (CommandStatus.PENDING, Via.SSH)
    assert await store.finish("r1", _outcome(via=Via.SSH))
    assert not await store.route_ssh("r1")  # settled: never routed again
    assert not await store.route_ssh("no-such-run")
    async with sessions() as session:  # the reconciler's guard: an agent's word never settles an SSH run
        assert await store.route_ssh("r2")
        values = {"status": CommandStatus.FAILED, "error_code": "never_ran"}
        pending = (CommandStatus.PENDING,)
        assert not await crud.update_run(session, "r2", values, when=pending, unrouted=True)
        assert await crud.update_run(session, "r5", values, when=pending, unrouted=True)
