"""Stored output chunks (`services.api.store.output`) and the API's chunk subscription
(`services.api.fleet.output.OutputHub`) against real SQLite / PostgreSQL and a real nats-server: only runs
of the publishing host are kept, within the per-command cap, each (command, seq) once; old chunks are swept;
a stream merges live and stored chunks and ends with the recorded outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import NotFound
from services.api.fleet.output import ChunkEvent, EndEvent, OutputHub
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store import output as store
from services.api.store.db import initialise, make_engine, sessionmaker
from services.api.store.models import CommandRun, CommandStatus, Host, Via, utcnow
from shared import subjects
from shared.protocol import OutputChunk, encode
from tests.support.db import BACKENDS, fresh_database
from tests.support.natsserver import NatsServer


@pytest.fixture(params=BACKENDS)
async def sessions(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A fresh initialised database with a pending run `cmd-1` on `web-1` and `cmd-2` on `db-1`."""
    async with fresh_database(request.param, tmp_path) as url:
        engine: AsyncEngine = make_engine(url)
        try:
            await initialise(engine, ApiSettings(api_key_file=tmp_path / "key"), bootstrap_key=False)
            made = sessionmaker(engine)
            async with made() as session:
                session.add(Host(id="web-1", address="10.0.0.1"))
                session.add(CommandRun(command_id="cmd-1", host_id="web-1", command="yes"))
                session.add(CommandRun(command_id="cmd-2", host_id="db-1", command="yes"))
                await session.commit()
            yield made
        finally:
            await engine.dispose()


def chunk(seq: int, data: str = "x", host: str = "web-1", command: str = "cmd-1") -> store.Chunk:
    return store.Chunk(host, command, seq, "stdout", data)


async def test_chunks_are_kept_once_for_their_own_host_within_the_cap(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        written = await store.add_chunks(
            session,
            [
                chunk(2, "bb"),
                chunk(1, "a"),
                chunk(1, "forged", host="db-1"),  # cmd-1 is web-1's: a chunk on db-1's subject is not kept
                chunk(1, "nobody", command="cmd-9"),  # no such run
            ],
            cap_bytes=10,
        )
        assert written == 2
        assert await store.add_chunks(session, [chunk(2, "again")], cap_bytes=10) == 0  # same seq: skipped
        # the cap: 3 bytes stored, 7 left; "ééééé" is 10 bytes, cut on a character boundary
        assert await store.add_chunks(session, [chunk(3, "ééééé"), chunk(4, "late")], cap_bytes=10) == 1
        assert await store.add_chunks(session, [chunk(5, "more")], cap_bytes=10) == 0
        rows = await store.read_chunks(session, "cmd-1", 0)
        assert [(r.seq, r.data, r.truncated) for r in rows] == [
            (1, "a", False),
            (2, "bb", False),
            (3, "ééé", True),
        ]
        assert sum(r.size for r in rows) <= 10
        assert [r.seq for r in await store.read_chunks(session, "cmd-1", 1, limit=1)] == [2]
        assert await store.read_chunks(session, "cmd-2", 0) == []


async def test_old_chunks_are_swept(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session:
        await store.add_chunks(session, [chunk(1), chunk(2)], cap_bytes=100)
        assert await store.purge(session, utcnow() - timedelta(hours=1)) == 0
        assert await store.purge(session, utcnow() + timedelta(seconds=1)) == 2
        assert await store.read_chunks(session, "cmd-1", 0) == []


async def test_the_hub_stores_published_chunks_and_a_stream_merges_live_and_stored(
    sessions: async_sessionmaker[AsyncSession], nats_server: NatsServer, nc: NATS
) -> None:
    """Chunks published before the stream opens come from the database, later ones live; a lost seq is
    skipped after the gap wait; the stream ends with the outcome once the run is final."""
    gateway = await nats_server.connect("gateway")
    hub = OutputHub(nc, sessions, ready=lambda: True, flush_interval=0.05, gap_wait=0.3)
    await hub.start()
    try:
        subject = subjects.output("web-1", "cmd-1")

        async def publish(seq: int, data: str) -> None:
            await gateway.publish(
                subject, encode(OutputChunk(command_id="cmd-1", seq=seq, stream="stdout", data=data))
            )
            await gateway.flush()

        await publish(1, "one\n")
        await gateway.publish(subject, b"not json")  # dropped, counted
        await gateway.publish(
            subjects.output("web-1", "cmd-2"), encode(OutputChunk(command_id="cmd-1", seq=9, stream="stdout"))
        )
        await gateway.flush()
        stored: list[str] = []
        for _ in range(100):  # the writer's batch (every 0.05 s; later on a loaded machine)
            async with sessions() as session:
                stored = [r.data for r in await store.read_chunks(session, "cmd-1", 0)]
            if stored and hub.dropped == 2:
                break
            await asyncio.sleep(0.05)
        assert stored == ["one\n"]
        assert hub.dropped == 2

        with pytest.raises(NotFound):
            await hub.open("cmd-404", 0)
        events = await hub.open("cmd-1", 0)
        got: list[ChunkEvent | EndEvent] = []

        async def read() -> None:
            async for event in events:
                assert isinstance(event, ChunkEvent | EndEvent)
                got.append(event)

        reading = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        await publish(2, "two\n")
        await publish(4, "four\n")  # 3 is lost on the way: skipped after the gap wait (0.3 s)
        for _ in range(100):
            if len(got) >= 3:
                break
            await asyncio.sleep(0.05)
        assert [e.seq for e in got if isinstance(e, ChunkEvent)] == [1, 2, 4]
        async with sessions() as session:
            values = {
                "status": CommandStatus.SUCCEEDED,
                "via": Via.AGENT,
                "exit_code": 0,
                "finished_at": utcnow(),
            }
            assert await crud.update_run(session, "cmd-1", values, when=(CommandStatus.PENDING,))
        await publish(5, "five\n")  # after the outcome, before the writer's batch: still in the stream
        async with asyncio.timeout(3):
            await reading
        assert [e.seq for e in got if isinstance(e, ChunkEvent)] == [1, 2, 4, 5]
        end = got[-1]
        assert isinstance(end, EndEvent)
        assert (end.outcome["status"], end.outcome["exit_code"], end.outcome["via"]) == (
            "succeeded",
            0,
            "agent",
        )
        # a replay after Last-Event-ID 2: stored chunks only, then the outcome at once
        replay = [e async for e in await hub.open("cmd-1", 2)]
        assert [e.seq for e in replay if isinstance(e, ChunkEvent)] == [4, 5]
        assert isinstance(replay[-1], EndEvent)
    finally:
        await hub.stop()
        await gateway.close()
