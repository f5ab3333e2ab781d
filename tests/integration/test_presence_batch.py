"""Presence in batches, on real PostgreSQL and SQLite and a real nats-server: a burst of connects published
as gateways publish them (hellos signed by each host's agent key) is recorded completely with far fewer
queries than events; a database outage in the middle of a burst loses none; a host's events end in the
right state; a forged hello is still rejected and counted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import event, func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from services.api.store.models import AgentConnection, AgentStatus, Host
from shared import subjects
from shared.protocol import PresenceDisconnected, encode
from shared.tokens import generate_token
from tests.support.db import PG_PORT, RunningApi, api_settings, eventually, fresh_database, running_api
from tests.support.fakeagent import AgentKey
from tests.support.fleet import fleet_rows, host_ids
from tests.support.natsserver import NatsServer

BURST = 2000
AGENT = AgentKey()  # every simulated host's agent key (the hellos are signed with it)


async def provision(url: str, hosts: list[str]) -> None:
    """Hosts and their agent records (with AGENT's public key), one executemany each."""
    host_rows, agent_rows = fleet_rows({host: generate_token() for host in hosts})
    for agent in agent_rows:
        agent["public_key"] = AGENT.public_key
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(Host.__table__), host_rows)  # type: ignore[attr-defined]
            await conn.execute(insert(AgentConnection.__table__), agent_rows)  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def states(url: str) -> dict[str, tuple[str, str | None]]:
    """host → (status, session) as recorded (read on a connection of the test's own)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(AgentConnection.host_id, AgentConnection.status, AgentConnection.session_id)  # type: ignore[call-overload]
            )
            return {host: (str(status), session) for host, status, session in rows.all()}
    finally:
        await engine.dispose()


async def connected_count(url: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            status = AgentConnection.status == str(AgentStatus.CONNECTED)
            return int((await conn.execute(select(func.count()).where(status))).scalar_one())  # type: ignore[arg-type]
    finally:
        await engine.dispose()


def connected(host: str, session: str, at: float, key: AgentKey = AGENT) -> bytes:
    return encode(key.connected(host, session, at))


def disconnected(host: str, session: str) -> bytes:
    values = {
        "host_id": host,
        "session_id": session,
        "gateway_id": "gw-1",
        "reason": "bye",
        "at": time.time(),
    }
    return encode(PresenceDisconnected.model_validate(values))


@contextlib.asynccontextmanager
async def api_on(tmp_path: Path, nats_server: NatsServer, url: str) -> AsyncIterator[RunningApi]:
    async with running_api(api_settings(tmp_path, nats_server.url, url)) as api:
        yield api


@pytest.fixture
async def gw(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A client with the gateway identity: publishes presence."""
    client = await nats_server.connect("gateway")
    yield client
    await client.drain()


async def test_a_burst_is_recorded_completely_in_few_queries(
    tmp_path: Path, nats_server: NatsServer, gw: NATS, database: str
) -> None:
    """2,000 connects of 2,000 hosts: all recorded; the presence statements number far fewer than the
    events (each batch is one SELECT and one executemany UPDATE)."""
    hosts = host_ids(BURST)
    async with api_on(tmp_path, nats_server, database) as api:
        await provision(database, hosts)
        statements: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "agent_connection" in statement:
                statements.append(statement.split(None, 1)[0].upper())

        event.listen(api.state.engine.sync_engine, "before_cursor_execute", count)
        try:
            now = time.time()
            for i, host in enumerate(hosts):
                await gw.publish(subjects.presence(host), connected(host, f"s-{i}", now))
            await gw.flush()

            async def all_connected() -> bool:
                return await connected_count(database) == BURST

            await eventually(all_connected, timeout=30)
        finally:
            event.remove(api.state.engine.sync_engine, "before_cursor_execute", count)
        assert len(statements) < BURST / 10, statements[:20]
        assert statements.count("UPDATE") < BURST / 20
        recorded = await states(database)
        assert all(recorded[host] == ("connected", f"s-{i}") for i, host in enumerate(hosts))


async def test_a_hosts_events_end_in_the_right_state_and_forgeries_are_refused(
    tmp_path: Path, nats_server: NatsServer, gw: NATS, database: str
) -> None:
    """Per host, published in this order: connect s1, disconnect s1, connect s2 (newer), then a late
    connect of an older session s0 and its disconnect: every host ends connected with s2. A forged hello
    (another key) for 50 of them is rejected and counted and changes nothing."""
    hosts = host_ids(300)
    async with api_on(tmp_path, nats_server, database) as api:
        await provision(database, hosts)
        now = time.time()
        for host in hosts:
            await gw.publish(subjects.presence(host), connected(host, f"{host}-s1", now - 3))
            await gw.publish(subjects.presence(host), disconnected(host, f"{host}-s1"))
            await gw.publish(subjects.presence(host), connected(host, f"{host}-s2", now - 1))
            await gw.publish(subjects.presence(host), connected(host, f"{host}-s0", now - 10))
            await gw.publish(subjects.presence(host), disconnected(host, f"{host}-s0"))
        forger = AgentKey()
        for host in hosts[:50]:
            await gw.publish(subjects.presence(host), connected(host, "forged", now, key=forger))
        await gw.flush()

        async def counted() -> bool:
            return api.state.runner.rejections.count("presence connected") == 50

        await eventually(counted, timeout=30)
        expected = {host: ("connected", f"{host}-s2") for host in hosts}

        async def settled() -> bool:
            return await states(database) == expected

        await eventually(settled, timeout=30)


class TcpProxy:
    """127.0.0.1:<port> → PostgreSQL; `cut` breaks every connection and refuses new ones (an outage),
    `restore` listens again on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", PG_PORT)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await asyncio.sleep(0.1)

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()


async def test_a_database_outage_during_a_burst_loses_no_event(
    tmp_path: Path, nats_server: NatsServer, gw: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL behind a proxy: 1,000 connects, then the database goes away (connections broken, new ones
    refused) while 1,000 more arrive; 3 s later it is back: every one of the 2,000 is recorded."""
    proxy = TcpProxy()
    await proxy.start()
    async with fresh_database("postgresql", tmp_path) as direct:
        via_proxy = make_url(direct).set(port=proxy.port).render_as_string(hide_password=False)
        hosts = host_ids(BURST)
        try:
            async with api_on(tmp_path, nats_server, via_proxy):
                await provision(direct, hosts)
                now = time.time()
                for i, host in enumerate(hosts[:1000]):
                    await gw.publish(subjects.presence(host), connected(host, f"s-{i}", now))
                await gw.flush()

                async def some_recorded() -> bool:
                    return await connected_count(direct) > 0

                await eventually(some_recorded, timeout=20)
                await proxy.cut()
                for i, host in enumerate(hosts[1000:], start=1000):
                    await gw.publish(subjects.presence(host), connected(host, f"s-{i}", now))
                await gw.flush()

                await asyncio.sleep(3)
                assert await connected_count(direct) < BURST
                await proxy.restore()

                async def all_connected() -> bool:
                    return await connected_count(direct) == BURST

                await eventually(all_connected, timeout=40)
                assert "presence: database unavailable" in caplog.text  # it was: the batches were retried
                assert "database back after" in caplog.text
                assert "event dropped" not in caplog.text
        finally:
            await proxy.close()


async def test_two_apis_record_each_event_once_and_agree(
    tmp_path: Path, nats_server: NatsServer, gw: NATS
) -> None:
    """Two API instances on one PostgreSQL database (one queue group): per host an older and a newer
    session's connect, in either order, and a forged one. The newer session wins on every host whichever
    instance wrote last, and the forgeries are counted once in all (each event went to one instance)."""
    hosts = host_ids(1000)
    async with fresh_database("postgresql", tmp_path) as url:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        async with (
            api_on(tmp_path / "a", nats_server, url) as one,
            api_on(tmp_path / "b", nats_server, url) as two,
        ):
            await provision(url, hosts)
            now = time.time()
            forger = AgentKey()
            for i, host in enumerate(hosts):
                older, newer = connected(host, f"{host}-old", now - 5), connected(host, f"{host}-new", now)
                for data in (older, newer) if i % 2 else (newer, older):
                    await gw.publish(subjects.presence(host), data)
                await gw.publish(subjects.presence(host), connected(host, "forged", now + 1, key=forger))
            await gw.flush()

            def rejected() -> int:
                return sum(api.state.runner.rejections.count("presence connected") for api in (one, two))

            async def counted() -> bool:
                return rejected() == len(hosts)

            await eventually(counted, timeout=30)
            expected = {host: ("connected", f"{host}-new") for host in hosts}

            async def settled() -> bool:
                return await states(url) == expected

            await eventually(settled, timeout=30)
            await asyncio.sleep(0.5)
            assert rejected() == len(hosts)  # not one more: no event was handled twice
            assert all(api.state.runner.rejections.count("presence connected") > 0 for api in (one, two))
